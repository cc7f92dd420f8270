"""Every bad LRQ file gets the same verdict from every reader (docs/FORMAT.md section 10).

One table of bad files, each made from a good file by changing one thing: wrong key types
(string / float / int64 arrays, scalars for arrays), out-of-range and non-monotonic schedules,
orphan or mis-shaped replica tensors, NaN / inf parameters, truncation at several offsets, wrong
versions.  Each file goes through

- the Python readers: ``lrq-inspect`` (its ``main``), ``lrq-calibrate`` (its ``main``) and the
  float64 reference executor (``Reference``), and
- the C++ loader: the binding (``lrq._native.Model``) and the patched ``llama-cli``,

and every one of them must refuse it — a non-zero exit or the reader's own error type, never a
crash or an abort (a signal) — with a message that names the file and the key or tensor.  The good
files the table starts from are accepted by all of them (the control: a reader that refuses
everything fails there).  The C++ key-type table and Python's must be the same table.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import signal
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

from lrq import _native, assets, tools
from lrq.cli import calibrate as calibrate_cli
from lrq.cli import inspect as inspect_cli
from lrq.constants import FORMAT_VERSION, KEY_TYPES, MAX_EXECUTIONS, Keys
from lrq.convert import ConvertOptions, convert
from lrq.convert.update import set_replica_params
from lrq.lrq_file import LRQModelFile
from lrq.reference import Reference
from gguf_edit import read, rewrite
from tiny_models import tiny_vocab_text

REPO = Path(__file__).resolve().parent.parent
V = gguf.GGUFValueType
F32, F16 = int(gguf.GGMLQuantizationType.F32), int(gguf.GGMLQuantizationType.F16)
I8, I16 = int(gguf.GGMLQuantizationType.I8), int(gguf.GGMLQuantizationType.I16)
LRQ2 = 44
# the tiny llama: 3 layers, d = 64, ffn 192, 4 heads over 2 KV heads, vocab 320
N_LAYER, D, FF = 3, 64, 192
# layer 0 twice (serial), layer 2 as a parallel group of two replicas
PLAN = {"layers": {"0": {"replicas": 2, "mode": "serial"},
                   "2": {"replicas": 2, "mode": "parallel"}}}
SCHED_LAYER = [0, 0, 1, 2, 2]
SCHED_REPLICA = [0, 1, 0, 0, 1]
SCHED_GROUP = [0, 1, 2, 3, 3]
SCHED_WEIGHT = [1.0, 1.0, 1.0, 0.5, 0.5]


class Files:
    def __init__(self, tiny_models, root: Path):
        self.root = root
        self.src = tiny_models.gguf("llama")
        plan = root / "plan.json"
        plan.write_text(json.dumps(PLAN))
        base = root / "own.base.gguf"
        convert(self.src, base, ConvertOptions(bits=2, group_size=32, plan=str(plan), grid_offset=0.5,
                                               scale_delta=0.1, progress=False))
        rng = np.random.default_rng(0)
        self.own = set_replica_params(base, root / "own.gguf", {
            "blk.0.attn_q.lrq_r1.gain": (1 + 0.1 * rng.standard_normal(D)).astype(np.float32),
            "blk.0.attn_q.lrq_r1.bias": (0.01 * rng.standard_normal(D)).astype(np.float32),
            "blk.0.attn_v.lrq_r1.act": np.array([0.9, 8], np.float32)})
        # the two-level layout (format v4): LRQ2 codes, super-blocks of 64, sub-blocks of 16
        self.tl = root / "tl.gguf"
        convert(self.src, self.tl, ConvertOptions(bits=2, group_size=64, two_level=16, plan=str(plan),
                                                  grid_offset=0.5, scale_delta=0.1, progress=False))
        sbase = root / "stock.base.gguf"
        convert(self.src, sbase, ConvertOptions(base_type="F32", plan=str(plan), work=str(root / "work"),
                                                progress=False))
        self.stock = set_replica_params(sbase, root / "stock.gguf", {
            "blk.0.ffn_up.lrq_r1.gain": np.full(FF, 1.1, np.float32),
            "blk.0.ffn_up.lrq_r1.bias": np.full(FF, 0.01, np.float32),
            "blk.0.ffn_up.lrq_r1.clip": np.array([2.0], np.float32)})
        self.text = tiny_vocab_text(self.src, assets.text("sotu-calib")[:6000].replace("\n", " "),
                                    root / "calib.txt")


@pytest.fixture(scope="module")
def files(tiny_models, tmp_path_factory) -> Files:
    return Files(tiny_models, tmp_path_factory.mktemp("bad-files"))


# ---- the readers ---------------------------------------------------------------------------------

def _inspect(path: Path) -> tuple[bool, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = inspect_cli.main([str(path), "--no-tensors"])
    assert rc in (0, 1), rc
    return rc == 0, err.getvalue()


def _calibrate(path: Path, files: Files, out: Path) -> tuple[bool, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = calibrate_cli.main([str(path), str(out), "--source", str(files.src), "--text", str(files.text),
                                 "--tokens", "64", "--window", "32", "--steps", "1", "-q"])
    assert rc in (0, 1), rc
    return rc == 0, err.getvalue()


def _reference(path: Path) -> tuple[bool, str]:
    try:
        Reference(path)
    except ValueError as e:       # GGUFFileError, LRQFileError, PlanError, ReferenceError
        return False, str(e)
    return True, ""


def _binding(path: Path) -> tuple[bool, str]:
    try:
        _native.Model(str(path), n_ctx=32, n_threads=1)
    except _native.LoadError as e:
        return False, str(e)
    return True, ""


# The tiny models have no chat template, and llama-cli's default one has characters their
# vocabulary (no byte fallback) cannot encode: a template that passes the message through.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def _run_tool(tool: str, args: list[str]) -> tuple[int, str]:
    proc = subprocess.run([str(tools.tool(tool)), *args], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=120)
    out = proc.stdout + proc.stderr
    # never a crash: no signal (SIGABRT from a GGML_ASSERT, SIGSEGV), no assertion text
    assert proc.returncode >= 0 and proc.returncode != 128 + signal.SIGABRT, (proc.returncode, out[-3000:])
    assert "GGML_ASSERT" not in out and "GGML_ABORT" not in out, out[-3000:]
    return proc.returncode, out


def _llama_cli(path: Path) -> tuple[bool, str]:
    template = path.parent / "passthrough.jinja"
    template.write_text(CHAT_TEMPLATE)
    rc, out = _run_tool("llama-cli", ["-m", str(path), "-p", "the", "-n", "2", "-st", "--temp", "0", "-t", "1",
                                      "-c", "64", "--jinja", "--chat-template-file", str(template)])
    # accepted = loaded and answered (llama-cli exits 0 after some errors of the chat loop)
    return rc == 0 and "Error" not in out and re.search(r"> the\n\S", out) is not None, out


def verdicts(path: Path, files: Files, tmp: Path) -> dict[str, tuple[bool, str]]:
    return {"lrq-inspect": _inspect(path), "lrq-calibrate": _calibrate(path, files, tmp / "cal.gguf"),
            "reference": _reference(path), "binding": _binding(path), "llama-cli": _llama_cli(path)}


# ---- the good files ------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["own", "stock"])
def test_good_files_are_accepted_everywhere(files, which, tmp_path):
    path = getattr(files, which)
    got = verdicts(path, files, tmp_path)
    assert all(ok for ok, _ in got.values()), {k: m[-1500:] for k, (ok, m) in got.items() if not ok}


def test_two_level_file_is_accepted_by_every_reader(files, tmp_path):
    """The two-level layout (format v4) loads in both readers; lrq-calibrate, which fits replicas
    of single-level weights only, refuses it by name instead of misreading it."""
    got = verdicts(files.tl, files, tmp_path)
    cal_ok, cal_msg = got.pop("lrq-calibrate")
    assert all(ok for ok, _ in got.values()), {k: m[-1500:] for k, (ok, m) in got.items() if not ok}
    assert not cal_ok and "two-level" in cal_msg and str(files.tl) in cal_msg, cal_msg[-1500:]


def test_a_string_that_is_not_utf8_is_accepted_everywhere(files, tmp_path):
    """gguf and llama.cpp take any bytes as a string; the Python readers must accept the same file
    (found by bench/fuzz: gguf-py's decode raised UnicodeDecodeError out of the reader)."""
    data = bytearray(files.own.read_bytes())
    key = b"general.name"
    at = data.index(key) + len(key)
    assert int.from_bytes(data[at:at + 4], "little") == 8            # a GGUF string follows
    data[at + 12] = 0xFF                                              # its first byte: not UTF-8
    path = tmp_path / "latin.gguf"
    path.write_bytes(bytes(data))
    got = verdicts(path, files, tmp_path)
    assert all(ok for ok, _ in got.values()), {k: m[-1500:] for k, (ok, m) in got.items() if not ok}
    assert "\ufffd" in LRQModelFile(path).kv["general.name"]


# ---- the bad files -------------------------------------------------------------------------------

def _lrq2_bytes(n_out: int, n_in: int) -> np.ndarray:
    return np.zeros(n_out * n_in // 32 * 8, np.uint8)


def _arr(values, sub):
    return (list(values), V.ARRAY, sub)


def _sched(layer=SCHED_LAYER, replica=SCHED_REPLICA, group=SCHED_GROUP, weight=SCHED_WEIGHT):
    return {Keys.SCHEDULE_LAYER: _arr(layer, V.UINT32), Keys.SCHEDULE_REPLICA: _arr(replica, V.UINT32),
            Keys.SCHEDULE_GROUP: _arr(group, V.UINT32), Keys.SCHEDULE_WEIGHT: _arr(weight, V.FLOAT32)}


def _nan_at(a: np.ndarray, value=np.nan) -> np.ndarray:
    a = np.array(a, copy=True)
    a.reshape(-1)[3] = value
    return a


def _tensor(path: Path, name: str) -> np.ndarray:
    _, t = read(path)
    return np.asarray(t[name].data)


def _lowrank(stem: str, n_out: int, n_in: int, rank: int = 8, *, rank_v: int | None = None,
             n_in_v: int | None = None, u_type: int = F16, v_value: float | None = None,
             q8_v_inf: bool = False) -> dict:
    """lr_u / lr_v tensors of replica 1 of ``stem`` (``add=`` of rewrite), valid unless told."""
    rng = np.random.default_rng(1)
    rv, ni = rank_v or rank, n_in_v or n_in
    u = (0.01 * rng.standard_normal((n_out, rank))).astype(np.float16 if u_type == F16 else np.float32)
    v = (0.01 * rng.standard_normal((rv, ni))).astype(np.float32)
    if v_value is not None:
        v = _nan_at(v, v_value)
    if q8_v_inf:       # Q8_0 blocks {F16 d, 32 x int8}: the first block's d = +inf
        raw = gguf.quants.quantize(v, gguf.GGMLQuantizationType.Q8_0)
        raw[0, 0:2] = np.frombuffer(np.float16(np.inf).tobytes(), np.uint8)
        vt = (raw, int(gguf.GGMLQuantizationType.Q8_0), (rv, ni))
    else:
        vt = (v.astype(np.float16), F16)
    return {f"{stem}.lrq_r1.lr_u": (u, u_type), f"{stem}.lrq_r1.lr_v": vt}


# (id, base file, rewrite arguments or a callable (src, dst) -> None, what the message must name,
#  FORMAT.md rule).  Each changes one thing of a good file.
CASES = [
    # K1: key types (the first is the file that used to abort llama.cpp: an array of strings)
    ("layer-strings", "own", dict(kv={Keys.SCHEDULE_LAYER: _arr(map(str, SCHED_LAYER), V.STRING)}),
     Keys.SCHEDULE_LAYER, "K1"),
    ("layer-float", "own", dict(kv={Keys.SCHEDULE_LAYER: _arr(map(float, SCHED_LAYER), V.FLOAT32)}),
     Keys.SCHEDULE_LAYER, "K1"),
    ("layer-int64", "own", dict(kv={Keys.SCHEDULE_LAYER: _arr(SCHED_LAYER, V.INT64)}), Keys.SCHEDULE_LAYER, "K1"),
    ("replica-int32", "own", dict(kv={Keys.SCHEDULE_REPLICA: _arr(SCHED_REPLICA, V.INT32)}),
     Keys.SCHEDULE_REPLICA, "K1"),
    ("weight-uint32", "own", dict(kv={Keys.SCHEDULE_WEIGHT: _arr([1, 1, 1, 1, 1], V.UINT32)}),
     Keys.SCHEDULE_WEIGHT, "K1"),
    ("group-scalar", "own", dict(kv={Keys.SCHEDULE_GROUP: (0, V.UINT32)}), Keys.SCHEDULE_GROUP, "K1"),
    ("version-string", "own", dict(kv={Keys.FORMAT_VERSION: ("2", V.STRING)}), Keys.FORMAT_VERSION, "K1"),
    ("version-uint64", "own", dict(kv={Keys.FORMAT_VERSION: (2, V.UINT64)}), Keys.FORMAT_VERSION, "K1"),
    ("group-size-string", "own", dict(kv={Keys.GROUP_SIZE: ("32", V.STRING)}), Keys.GROUP_SIZE, "K1"),
    ("mode-uint32", "own", dict(kv={Keys.QUANT_MODE: (0, V.UINT32)}), Keys.QUANT_MODE, "K1"),
    ("base-arch-uint32", "own", dict(kv={Keys.BASE_ARCH: (1, V.UINT32)}), Keys.BASE_ARCH, "K1"),
    ("unused-key-bpw-string", "own", dict(kv={Keys.BPW_LRQ: ("2.5", V.STRING)}), Keys.BPW_LRQ, "K1"),
    ("unused-key-seed-float", "stock", dict(kv={Keys.SEED: (0.0, V.FLOAT32)}), Keys.SEED, "K1"),
    ("base-key-string", "own", dict(kv={"llama.block_count": ("3", V.STRING)}), "llama.block_count", "K1"),
    # V1, A1, Q1
    ("version-newer", "own", dict(kv={Keys.FORMAT_VERSION: (FORMAT_VERSION + 1, V.UINT32)}),
     f"format version {FORMAT_VERSION + 1}", "V1"),
    ("version-0", "own", dict(kv={Keys.FORMAT_VERSION: (0, V.UINT32)}), "format version 0", "V1"),
    ("version-missing", "own", dict(kv={Keys.FORMAT_VERSION: None}), Keys.FORMAT_VERSION, "V1"),
    ("base-arch-mismatch", "own", dict(kv={Keys.BASE_ARCH: ("qwen2", V.STRING)}), Keys.BASE_ARCH, "A1"),
    ("base-arch-missing", "stock", dict(kv={Keys.BASE_ARCH: None}), Keys.BASE_ARCH, "A1"),
    ("arch-unknown", "own", dict(arch="lrq-mamba"), "lrq-mamba", "A1"),
    ("mode-unknown", "own", dict(kv={Keys.QUANT_MODE: ("foo", V.STRING)}), Keys.QUANT_MODE, "Q1"),
    ("group-size-48", "own", dict(kv={Keys.GROUP_SIZE: (48, V.UINT32)}), Keys.GROUP_SIZE, "Q1"),
    ("group-size-missing", "own", dict(kv={Keys.GROUP_SIZE: None}), Keys.GROUP_SIZE, "Q1"),
    ("group-size-bad-on-stock", "stock", dict(kv={Keys.GROUP_SIZE: (7, V.UINT32)}), Keys.GROUP_SIZE, "Q1"),
    # S1..S5: the schedule
    ("replica-missing", "own", dict(kv={Keys.SCHEDULE_REPLICA: None}), Keys.SCHEDULE_REPLICA, "S1"),
    ("lengths-differ", "own", dict(kv={Keys.SCHEDULE_REPLICA: _arr(SCHED_REPLICA[:-1], V.UINT32)}),
     Keys.SCHEDULE_REPLICA, "S1"),
    ("too-many-executions", "stock",
     dict(kv=_sched(layer=[0] * (MAX_EXECUTIONS - 1) + [1, 2], replica=list(range(MAX_EXECUTIONS - 1)) + [0, 0],
                    group=list(range(MAX_EXECUTIONS + 1)), weight=[1.0] * (MAX_EXECUTIONS + 1))),
     "executions", "S1"),
    ("layer-out-of-range", "own", dict(kv=_sched(layer=[0, 0, 1, 2, 3])), "layer", "S2"),
    ("replica-out-of-range", "stock", dict(kv=_sched(replica=[0, MAX_EXECUTIONS, 0, 0, 1])), "replica", "S2"),
    # layers may come in any order (a valid revisiting schedule), but this one never runs replica 1
    # of layer 2, whose tensors the file holds
    ("revisit-leaves-a-replica-unrun", "own", dict(kv=_sched(layer=[0, 1, 0, 1, 2], replica=[0, 0, 1, 1, 0],
                                                             group=[0, 1, 2, 3, 4], weight=[1.0] * 5)),
     "never runs", "T3"),
    ("groups-decrease", "own", dict(kv=_sched(group=[0, 2, 1, 3, 3])), "group", "S3"),
    ("group-spans-layers", "own", dict(kv=_sched(group=[0, 1, 1, 2, 2], weight=[1.0, 0.5, 0.5, 0.5, 0.5])),
     "group", "S3"),
    ("group-repeats-replica", "own", dict(kv=_sched(replica=[0, 1, 0, 1, 1])), "replica", "S3"),
    ("layer-skipped", "own", dict(kv=_sched(layer=[0, 0, 2, 2, 2], replica=[0, 1, 0, 0, 1])), "layer", "S4"),
    ("schedule-ends-early", "own", dict(kv=_sched(layer=[0, 0, 1, 1, 1], replica=[0, 1, 0, 0, 1])),
     "layer", "S4"),
    ("weight-nan", "own", dict(kv=_sched(weight=[1.0, float("nan"), 1.0, 0.5, 0.5])), "weight", "S5"),
    ("weight-inf", "stock", dict(kv=_sched(weight=[1.0, 1.0, 1.0, float("inf"), 0.5])), "weight", "S5"),
    # T1..T6: tensors
    ("embedding-lrq-typed", "own",
     dict(replace={"token_embd.weight": (_lrq2_bytes(320, D), LRQ2, (320, D))}), "token_embd.weight", "T1"),
    ("v1-stock-base", "stock", dict(kv={Keys.FORMAT_VERSION: (1, V.UINT32)}), "format version 1", "T1"),
    ("scale-missing", "own", dict(drop={"blk.1.ffn_up.lrq_scale"}), "blk.1.ffn_up.lrq_scale", "T2"),
    ("min-missing", "own", dict(drop={"blk.1.ffn_down.lrq_min"}), "ffn_down", "T2"),
    ("min-in-sym-file", "own", dict(kv={Keys.QUANT_MODE: ("sym", V.STRING)}), "lrq_min", "T2"),
    ("scale-wrong-shape", "own", dict(replace={"blk.1.attn_k.lrq_scale": (np.ones((32, 3), np.float16), F16)}),
     "blk.1.attn_k.lrq_scale", "T2"),
    ("scale-f32", "own", dict(replace={"blk.1.attn_k.lrq_scale": (np.ones((32, 2), np.float32), F32)}),
     "attn_k", "T2"),
    ("orphan-scale", "own", dict(add={"blk.0.attn_norm.lrq_scale": (np.ones((1, 2), np.float16), F16)}),
     "blk.0.attn_norm.lrq_scale", "T2"),
    ("replica-not-scheduled", "own", dict(add={"blk.1.attn_q.lrq_r1.gain": (np.ones(D, np.float32), F32)}),
     "blk.1.attn_q.lrq_r1.gain", "T3"),
    ("clip-on-lrq-weight", "own", dict(add={"blk.0.attn_k.lrq_r1.clip": (np.ones(1, np.float32), F32)}),
     "blk.0.attn_k.lrq_r1.clip", "T3"),
    ("scale-mult-on-stock", "stock",
     dict(add={"blk.0.attn_q.lrq_r1.scale_mult": (np.ones((D, 1), np.float16), F16)}),
     "blk.0.attn_q.lrq_r1.scale_mult", "T3"),
    ("replica-of-a-norm", "stock", dict(add={"blk.0.attn_norm.lrq_r1.gain": (np.ones(D, np.float32), F32)}),
     "blk.0.attn_norm.lrq_r1.gain", "T3"),
    # T7: the two-level layout's sub-block indices (format v4)
    ("two-level-in-v3-file", "tl", dict(kv={Keys.FORMAT_VERSION: (3, V.UINT32)}), "lrq_sub", "T7"),
    ("two-level-sub-wrong-shape", "tl", dict(replace={"blk.1.attn_k.lrq_sub": (np.zeros((32, 3), np.int8), I8)}),
     "blk.1.attn_k.lrq_sub", "T7"),
    ("two-level-sub-int16", "tl", dict(replace={"blk.1.ffn_up.lrq_sub": (np.zeros((FF, D // 16), np.int16), I16)}),
     "blk.1.ffn_up.lrq_sub", "T7"),
    ("two-level-sub-32-on-16", "tl", dict(replace={"blk.2.ffn_down.lrq_sub": (np.zeros((D, FF // 48), np.int8), I8)}),
     "blk.2.ffn_down.lrq_sub", "T7"),
    ("orphan-sub", "tl", dict(add={"blk.0.attn_norm.lrq_sub": (np.zeros((1, 4), np.int8), I8)}),
     "blk.0.attn_norm.lrq_sub", "T7"),
    ("gain-wrong-length", "own", dict(replace={"blk.0.attn_q.lrq_r1.gain": (np.ones(D + 1, np.float32), F32)}),
     "blk.0.attn_q.lrq_r1.gain", "T4"),
    ("gain-f16", "own", dict(replace={"blk.0.attn_q.lrq_r1.gain": (np.ones(D, np.float16), F16)}),
     "blk.0.attn_q.lrq_r1.gain", "T4"),
    ("scale-mult-row-shape", "own",
     dict(replace={"blk.0.ffn_up.lrq_r1.scale_mult": (np.ones((1, 2), np.float16), F16)}),
     "blk.0.ffn_up.lrq_r1.scale_mult", "T4"),
    ("act-three-values", "own", dict(replace={"blk.0.attn_v.lrq_r1.act": (np.array([1, 8, 0], np.float32), F32)}),
     "blk.0.attn_v.lrq_r1.act", "T4"),
    ("clip-two-values", "stock", dict(replace={"blk.0.ffn_up.lrq_r1.clip": (np.array([1, 2], np.float32), F32)}),
     "blk.0.ffn_up.lrq_r1.clip", "T4"),
    ("gain-nan", "own", lambda f: dict(replace={"blk.0.attn_q.lrq_r1.gain": (
        _nan_at(_tensor(f.own, "blk.0.attn_q.lrq_r1.gain")), F32)}), "blk.0.attn_q.lrq_r1.gain", "T5"),
    ("bias-inf", "stock", lambda f: dict(replace={"blk.0.ffn_up.lrq_r1.bias": (
        _nan_at(_tensor(f.stock, "blk.0.ffn_up.lrq_r1.bias"), np.inf), F32)}), "blk.0.ffn_up.lrq_r1.bias", "T5"),
    ("scale-mult-nan", "own", lambda f: dict(replace={"blk.2.ffn_gate.lrq_r1.scale_mult": (
        _nan_at(_tensor(f.own, "blk.2.ffn_gate.lrq_r1.scale_mult").reshape(FF, 1)), F16)}),
     "blk.2.ffn_gate.lrq_r1.scale_mult", "T5"),
    ("group-scale-inf", "own", lambda f: dict(replace={"blk.1.attn_output.lrq_scale": (
        _nan_at(_tensor(f.own, "blk.1.attn_output.lrq_scale").reshape(D, 2), np.inf), F16)}),
     "blk.1.attn_output.lrq_scale", "T5"),
    ("clip-zero", "stock", dict(replace={"blk.0.ffn_up.lrq_r1.clip": (np.zeros(1, np.float32), F32)}),
     "blk.0.ffn_up.lrq_r1.clip", "T6"),
    ("clip-nan", "stock", dict(replace={"blk.0.ffn_up.lrq_r1.clip": (np.full(1, np.nan, np.float32), F32)}),
     "blk.0.ffn_up.lrq_r1.clip", "T6"),
    ("act-clip-zero", "own", dict(replace={"blk.0.attn_v.lrq_r1.act": (np.array([0, 8], np.float32), F32)}),
     "blk.0.attn_v.lrq_r1.act", "T6"),
    ("act-bits-17", "own", dict(replace={"blk.0.attn_v.lrq_r1.act": (np.array([1, 17], np.float32), F32)}),
     "blk.0.attn_v.lrq_r1.act", "T6"),
    ("act-bits-nan", "own", dict(replace={"blk.0.attn_v.lrq_r1.act": (np.array([1, np.nan], np.float32), F32)}),
     "blk.0.attn_v.lrq_r1.act", "T6"),
    ("act-bits-inf", "own", dict(replace={"blk.0.attn_v.lrq_r1.act": (np.array([1, np.inf], np.float32), F32)}),
     "blk.0.attn_v.lrq_r1.act", "T6"),
    ("act-bits-fraction", "own", dict(replace={"blk.0.attn_v.lrq_r1.act": (np.array([1, 2.5], np.float32), F32)}),
     "blk.0.attn_v.lrq_r1.act", "T6"),
    # low-rank corrections (format v3, FORMAT.md 6.2)
    ("lowrank-in-v2-file", "own", dict(kv={Keys.FORMAT_VERSION: (2, V.UINT32)}, add=_lowrank("blk.0.attn_q", D, D)),
     "blk.0.attn_q.lrq_r1.lr_u", "T3"),
    ("lowrank-not-scheduled", "stock", dict(add=_lowrank("blk.1.ffn_up", FF, D)), "blk.1.ffn_up.lrq_r1.lr_u", "T3"),
    ("lowrank-u-without-v", "own", dict(add={k: v for k, v in _lowrank("blk.0.attn_q", D, D).items()
                                             if k.endswith("lr_u")}), "blk.0.attn_q.lrq_r1.lr_v", "T4"),
    ("lowrank-ranks-differ", "own", dict(add=_lowrank("blk.0.attn_q", D, D, rank_v=4)),
     "blk.0.attn_q.lrq_r1.lr_v", "T4"),
    ("lowrank-rank-65", "stock", dict(add=_lowrank("blk.0.ffn_down", D, FF, rank=65)),
     "blk.0.ffn_down.lrq_r1.lr_u", "T4"),
    ("lowrank-v-wrong-n-in", "own", dict(add=_lowrank("blk.2.ffn_up", FF, D, n_in_v=32)),
     "blk.2.ffn_up.lrq_r1.lr_v", "T4"),
    ("lowrank-u-f32", "stock", dict(add=_lowrank("blk.0.attn_k", 32, D, u_type=F32)),
     "blk.0.attn_k.lrq_r1.lr_u", "T4"),
    ("lowrank-v-nan", "own", dict(add=_lowrank("blk.0.ffn_gate", FF, D, v_value=np.nan)),
     "blk.0.ffn_gate.lrq_r1.lr_v", "T5"),
    ("lowrank-q8-v-inf", "stock", dict(add=_lowrank("blk.2.attn_output", D, D, rank=32, q8_v_inf=True)),
     "blk.2.attn_output.lrq_r1.lr_v", "T5"),
]
def _repeat_token(files: Files, dst: Path) -> Path:
    """Token 20's string overwritten by token 10's (when both have one length): rule F2."""
    from lrq.model_file import open_model
    toks = open_model(files.src).tokens
    i, j = next((i, j) for j in range(20, len(toks)) for i in range(10, j)
                if len(toks[i].encode()) == len(toks[j].encode()) and toks[i] != toks[j])
    data = bytearray(files.own.read_bytes())
    a, b = toks[i].encode(), toks[j].encode()
    at = data.index(len(b).to_bytes(8, "little") + b, data.index(b"tokenizer.ggml.tokens"))
    data[at + 8:at + 8 + len(b)] = a
    dst.write_bytes(bytes(data))
    return dst


def test_repeated_token_is_refused_everywhere(files, tmp_path):
    """llama.cpp's vocabulary loader aborted the process on this file (bench/fuzz)."""
    bad = _repeat_token(files, tmp_path / "repeated-token.gguf")
    _check_refused(bad, ["tokenizer.ggml.tokens"], files, tmp_path)


# F1: truncation at several places: inside the header, the keys, the tensor table, the data
TRUNCATIONS = [("truncated-header", 20), ("truncated-keys", 600), ("truncated-tensor-table", -1),
               ("truncated-data", -2), ("truncated-last-tensor", -3)]


def _build(case, files: Files, dst: Path) -> Path:
    _, base, spec, _, _ = case
    src = getattr(files, base)
    rewrite(src, dst, **(spec(files) if callable(spec) else spec))
    return dst


def _truncate(files: Files, where: int, dst: Path) -> Path:
    data = files.own.read_bytes()
    meta_end = min(o for *_, o in _tensor_offsets(files.own))
    # -3: past the alignment padding (< 32 bytes) that follows the last tensor's data
    cut = {-1: meta_end - 200, -2: (meta_end + len(data)) // 2, -3: len(data) - 40}.get(where, where)
    dst.write_bytes(data[:cut])
    return dst


def _tensor_offsets(path: Path):
    from lrq.gguf_meta import read_metadata
    return read_metadata(path)["GGUF.tensor_infos"]


def _check_refused(path: Path, names: list[str], files: Files, tmp: Path) -> None:
    got = verdicts(path, files, tmp)
    accepted = [k for k, (ok, _) in got.items() if ok]
    assert not accepted, f"{path.name}: accepted by {accepted}, refused by the others: " + \
        "; ".join(f"{k}: {m[-300:]}" for k, (ok, m) in got.items() if not ok)
    for reader, (_, msg) in got.items():
        assert str(path) in msg, f"{reader} does not name the file {path}: {msg[-1500:]}"
        for n in names:
            assert n in msg, f"{reader} does not name {n!r}: {msg[-1500:]}"
    assert not (tmp / "cal.gguf").exists()      # lrq-calibrate left nothing behind


def test_the_table_covers_every_rule():
    rules = {c[4] for c in CASES} | {"F1", "F2"}
    assert rules == {"F1", "F2", "K1", "V1", "A1", "Q1", "S1", "S2", "S3", "S4", "S5", "T1", "T2", "T3", "T4",
                     "T5", "T6", "T7"}
    assert len(CASES) + len(TRUNCATIONS) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_file_is_refused_everywhere(case, files, tmp_path):
    bad = _build(case, files, tmp_path / f"{case[0]}.gguf")
    _check_refused(bad, [case[3]], files, tmp_path)


@pytest.mark.parametrize("name,where", TRUNCATIONS, ids=[t[0] for t in TRUNCATIONS])
def test_truncated_file_is_refused_everywhere(name, where, files, tmp_path):
    bad = _truncate(files, where, tmp_path / f"{name}.gguf")
    _check_refused(bad, [], files, tmp_path)


def test_long_schedule_loads_with_a_kv_warning(files, tmp_path):
    """Rule S6: 5 executions per layer load everywhere, and both readers state the KV cost."""
    n = 5 * N_LAYER
    layer = [i // 5 for i in range(n)]
    replica = [i % 5 for i in range(n)]
    path = rewrite(files.stock, tmp_path / "long.gguf", kv=_sched(layer, replica, list(range(n)), [1.0] * n))
    got = verdicts(path, files, tmp_path)
    assert all(ok for ok, _ in got.values()), {k: m[-800:] for k, (ok, m) in got.items() if not ok}
    # llama-cli shows no loader warnings; llama-completion prints the same loader's log
    rc, log = _run_tool("llama-completion", ["-m", str(path), "-p", "the", "-n", "1", "-no-cnv", "-t", "1",
                                             "-c", "64"])
    assert rc == 0, log[-2000:]
    for out in (got["lrq-inspect"][1], log):
        assert "15 executions of 3 base layers" in out and "KV cache" in out and str(path) in out, out[-2000:]
    # the figure is the same in both: 5x the base model's F16 K and V per token
    per_1k = [re.search(r"([\d.]+) MiB per 1024 tokens", out).group(1) for out in (got["lrq-inspect"][1], log)]
    assert per_1k[0] == per_1k[1]
    assert LRQModelFile(files.stock).warnings == []


def test_cpp_and_python_key_tables_are_one_table():
    """native/include/lrq-keys.h LRQ_KEY_SPECS == lrq.constants.KEY_TYPES (key, type, element type)."""
    text = (REPO / "native" / "include" / "lrq-keys.h").read_text()
    macros = dict(re.findall(r'#define (LRQ_KEY_\w+)\s+"([^"]+)"', text))
    table = {}
    for key, typ, sub in re.findall(r'\{\s*(\w+|"[^"]+"),\s*GGUF_TYPE_(\w+),\s*GGUF_TYPE_(\w+)\s*\}', text):
        key = key.strip('"') if key.startswith('"') else macros[key]
        table[key] = f"array:{sub.lower()}" if typ == "ARRAY" else typ.lower()
    assert table == KEY_TYPES
    assert set(KEY_TYPES) == set(Keys.all().values())
