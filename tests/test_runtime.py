"""LRQ files on the patched llama.cpp (patches 0002 + 0003, native/lrq/lrq-*.c*).

The logits of `_native.Model` (virtual layers aliasing the base layer's codes, one KV slot per
execution, GGML_OP_LRQ_MUL_MAT) against the float64 reference executor `lrq.reference` (torch,
which reads the same file independently: numpy dequantization, float activations, its own
schedule interpretation) for tiny llama / qwen2 / qwen3 models and the plans none / all / last-1 /
progressive / a parallel plan file, twice: with the op on the spec's arithmetic and an F32 KV
cache (the graph must then be exact), and as llama.cpp runs by default (int8 activations, F16 KV).
Also: SmolLM2 at 2 bits (greedy decoding), llama-perplexity / llama-bench / llama-server on LRQ
files, file / model / KV sizes, and refusal of bad files with a LoadError naming the file.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

from lrq import tools
from lrq.convert import ConvertOptions, convert
from lrq.convert.update import set_replica_params
from lrq.gguf_hparams import numpy_shape, open_reader
from lrq.gguf_write import GGUFStreamWriter
from lrq.model_file import open_model
from lrq.reference import Reference
from tiny_models import TINY_VOCAB

from lrq import _native  # built by `make build`; a missing build must fail, not skip
from numerics import nmse

THREADS = 2

# Two native configurations are compared with the float64 reference:
#
# exact: the op on the spec's arithmetic (LRQ_CPU_REF=1: float activations, double sums), an F32
#   KV cache and no flash attention.  Then only float32 rounding in the rest of the graph differs
#   from float64: measured logit NMSE <= 8e-12 and relative PPL <= 4e-6 over all archs and plans
#   (with F16 KV and flash attention the same graph gives 1e-9 .. 3e-2: the tiny random models
#   have very sharp attention at some positions, where F16 rounding of K/V flips the softmax).
#   Any schedule, aliasing, KV-slot, replica-parameter or group-combine error is many orders of
#   magnitude above this (the control below: ignoring the schedule gives NMSE > 0.5).
EXACT_NMSE = 1e-9
EXACT_PPL_REL = 1e-5
# fast: what llama.cpp runs by default (int8 activations per block of 32 in every LRQ matmul, F16
#   KV, flash attention auto).  The int8 rounding (NMSE ~3e-5 per matmul on Gaussian activations,
#   tests/test_kernels.py) is amplified by these chaotic random models, more with more executions,
#   and differently for each (arch, plan): measured on x86-64 with 2 threads (deterministic for a
#   given build and thread count) from 4.8e-4 to 0.15.  Each case has its own bound, about twice
#   its measured NMSE, and each bound is at least CONTROL_MARGIN times below its control, asserted:
#   for a replicated plan the plain quantized model (the schedule ignored: measured 0.51 .. 1.94),
#   for plan none the float source model (quantization ignored).  A wrong replica parameter, a
#   wrong KV slot or a dropped group member moves the NMSE to the control's order.
FAST_TINY_NMSE = {
    ("llama", "none"): 1.7e-3, ("llama", "all"): 0.15, ("llama", "last-1"): 3.1e-3,
    ("llama", "progressive"): 0.023, ("llama", "parallel"): 0.17,
    ("qwen2", "none"): 1.0e-3, ("qwen2", "all"): 1.1e-3, ("qwen2", "last-1"): 1.6e-3,
    ("qwen2", "progressive"): 0.04, ("qwen2", "parallel"): 0.025,
    ("qwen3", "none"): 1.7e-3, ("qwen3", "all"): 0.3, ("qwen3", "last-1"): 3.6e-3,
    ("qwen3", "progressive"): 0.17, ("qwen3", "parallel"): 1.6e-3,
}
CONTROL_MARGIN = 5.0
# llama-perplexity and the binding run the same graph on the same CPU code, but llama-perplexity
# sizes its own batch / threads; the issue asks for agreement within 0.5 %.
TOOL_PPL_REL = 0.005

PARALLEL_PLAN = {"layers": {"0": {"replicas": 2, "mode": "serial"},
                            # the last layer: its group combine also runs on the rows that the
                            # output-row selection (inp_out_ids) keeps
                            "2": {"replicas": 3, "mode": "parallel", "weights": [0.5, 0.3, 0.2]}}}
PLANS = ["none", "all", "last-1", "progressive", "parallel"]


def _replica_extras(path: Path) -> dict[str, np.ndarray]:
    """Per-replica parameters of every kind for replica 1 of the first replicated layer, so that
    gain, bias, clip / act bits and per-group scale multipliers all reach the op."""
    f = open_model(path)
    out = {}
    reps = [(e.layer, e.replica) for e in f.schedule if e.replica > 0]
    if not reps:
        return out
    layer, r = reps[0]
    rng = np.random.default_rng(layer * 10 + r)
    for stem in ("attn_q", "attn_v", "ffn_up", "ffn_down"):
        name = f"blk.{layer}.{stem}.weight"
        n_out, n_in = f.tensor_info(name).shape
        g = f.group_size
        pre = f"blk.{layer}.{stem}.lrq_r{r}."
        out[pre + "gain"] = (1 + 0.1 * rng.standard_normal(n_out)).astype(np.float32)
        out[pre + "bias"] = (0.02 * rng.standard_normal(n_out)).astype(np.float32)
        if stem == "attn_v":
            out[pre + "act"] = np.array([0.9, 8], np.float32)       # clip + 8-bit activations
        if stem == "ffn_up":
            out[pre + "act"] = np.array([0.8, 0], np.float32)       # clip only
        if stem == "ffn_down":
            ng = -(-n_in // g)
            out[pre + "scale_mult"] = (1 + 0.05 * rng.standard_normal((n_out, ng))).astype(np.float16)
    return out


class LRQFiles:
    def __init__(self, tiny_models, root: Path):
        self.tiny = tiny_models
        self.root = root
        self._cache: dict[tuple, Path] = {}

    def get(self, arch: str, plan: str, bits: int = 3, extras: bool = True) -> Path:
        key = (arch, plan, bits, extras)
        if key not in self._cache:
            spec = plan
            if plan == "parallel":
                spec = str(self.root / "parallel-plan.json")
                Path(spec).write_text(json.dumps(PARALLEL_PLAN))
            out = self.root / f"{arch}-{plan}-b{bits}{'-x' if extras else ''}.gguf"
            base = out.with_suffix(".base.gguf") if extras else out
            # replicas start on shifted / stretched grids so that they really differ
            convert(self.tiny.gguf(arch), base, ConvertOptions(bits=bits, group_size=32, plan=spec,
                                                               grid_offset=0.5, scale_delta=0.1, progress=False))
            if extras:
                set_replica_params(base, out, _replica_extras(base))
            self._cache[key] = out
        return self._cache[key]


@pytest.fixture(scope="session")
def lrq_files(tiny_models, tmp_path_factory) -> LRQFiles:
    return LRQFiles(tiny_models, tmp_path_factory.mktemp("lrq-files"))


def _tokens(seed: int, n: int) -> np.ndarray:
    t = np.random.default_rng(seed).integers(3, TINY_VOCAB, size=n).astype(np.int32)
    t[0] = 1
    return t


# ---- logits and perplexity against the reference executor --------------------------------------

@pytest.mark.parametrize("plan", PLANS)
def test_lrq_graph_is_exact(lrq_files, tiny_arch, plan, monkeypatch):
    path = lrq_files.get(tiny_arch, plan)
    ref = Reference(open_model(path))
    monkeypatch.setenv("LRQ_CPU_REF", "1")          # read by the op at every compute
    native = _native.Model(str(path), n_ctx=64, n_threads=THREADS, kv_f32=True, flash_attn=0)
    assert native.n_layer == len(open_model(path).schedule)     # one virtual layer per execution
    toks = _tokens(7, 48)
    got = native.eval(toks)
    e = nmse(got, ref.logits(toks))
    assert e < EXACT_NMSE, f"{tiny_arch} {plan}: NMSE {e:.3g}"
    # perplexity scores only the second half of each window: the graph then keeps only those
    # rows on the last execution (inp_out_ids), which the group combine must follow
    long = _tokens(8, 70)
    ours, theirs = ref.perplexity(long, n_ctx=32), native.perplexity(long, n_ctx=32)
    assert (ours.n_chunks, ours.count) == (theirs.n_chunks, theirs.count) == (2, 30)
    assert abs(ours.ppl - theirs.ppl) / theirs.ppl < EXACT_PPL_REL, (ours.ppl, theirs.ppl)


def test_serial_step_weight_is_applied_everywhere(lrq_files, tiny_arch, monkeypatch, tmp_path):
    """FORMAT.md section 7: a serial step of weight w computes x + w (B(x) - x).  The runtime, the
    reference executor and the calibrator share that rule (lrq.reference.ops.combine_group); a
    reference that ignores w (the earlier defect) is the control."""
    from gguf_edit import rewrite
    from lrq.constants import Keys
    src = lrq_files.get(tiny_arch, "all")          # every layer twice, serial, weights 1
    n = len(open_model(src).schedule)
    weights = [1.0, 0.7, 1.0, -0.25, 0.5, 1.5][:n]   # any finite weight, also < 0 and > 1
    path = rewrite(src, tmp_path / "weighted.gguf", kv={Keys.SCHEDULE_WEIGHT: (
        weights, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32)})
    monkeypatch.setenv("LRQ_CPU_REF", "1")
    native = _native.Model(str(path), n_ctx=64, n_threads=THREADS, kv_f32=True, flash_attn=0)
    toks = _tokens(11, 40)
    got = native.eval(toks)
    assert nmse(got, Reference(open_model(path)).logits(toks)) < EXACT_NMSE
    # the control: the same schedule with every weight 1 (what ignoring w computes)
    control = nmse(got, Reference(open_model(src)).logits(toks))
    assert control > 1e6 * EXACT_NMSE, control


@pytest.mark.parametrize("plan", PLANS)
def test_lrq_fast_path_matches_reference(lrq_files, tiny_arch, plan):
    path = lrq_files.get(tiny_arch, plan)
    native = _native.Model(str(path), n_ctx=64, n_threads=THREADS)     # llama.cpp's defaults
    toks = _tokens(7, 48)
    got = native.eval(toks)
    e = nmse(got, Reference(open_model(path)).logits(toks))
    bound = FAST_TINY_NMSE[(tiny_arch, plan)]
    assert e < bound, f"{tiny_arch} {plan}: NMSE {e:.3g}"
    # the control: the plain quantized model (the schedule ignored) for a replicated plan, the
    # float source (the quantization ignored) for plan none
    wrong = (lrq_files.tiny.gguf(tiny_arch) if plan == "none" else lrq_files.get(tiny_arch, "none"))
    control = nmse(got, Reference(open_model(wrong)).logits(toks))
    assert control > CONTROL_MARGIN * bound, (control, bound)


def test_lrq_decode_one_token_at_a_time_matches_batch(lrq_files):
    # the decode path (T = 1 per op, KV of every execution reused) against the prompt path
    path = lrq_files.get("qwen2", "parallel")
    native = _native.Model(str(path), n_ctx=64, n_threads=THREADS, n_batch=1)
    batch = _native.Model(str(path), n_ctx=64, n_threads=THREADS)
    toks = _tokens(9, 20)
    a, b = native.eval(toks), batch.eval(toks)
    # the op quantizes activations per token and its chunks are multiples of the kernel's token
    # block, so its rows do not depend on the batch; only attention's float32 sums are ordered
    # differently for one ubatch of 20 tokens and 20 ubatches of one (measured 9.3e-15)
    assert nmse(a, b) < 1e-10


def test_llama_perplexity_tool_equals_binding(lrq_files, tmp_path):
    path = lrq_files.get("llama", "progressive")
    text = tmp_path / "text.txt"
    words = np.random.default_rng(3).integers(0, 26, size=4000)
    text.write_text(" ".join("abcdefghijklmnopqrstuvwxyz"[w] * (1 + w % 4) for w in words))
    native = _native.Model(str(path), n_ctx=64, n_threads=THREADS)
    toks = native.tokenize(text.read_text())
    ours = native.perplexity(toks, n_ctx=64, n_chunks=4)
    proc = subprocess.run([str(tools.tool("llama-perplexity")), "-m", str(path), "-f", str(text), "-c", "64",
                           "--chunks", "4", "-t", str(THREADS), "-b", "64"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", proc.stdout + proc.stderr)
    assert m, (proc.stdout + proc.stderr)[-2000:]
    tool_ppl = float(m.group(1))
    assert abs(tool_ppl - ours.ppl) / ours.ppl < TOOL_PPL_REL, (tool_ppl, ours.ppl)


# ---- sizes: aliasing, not copying ------------------------------------------------------------------

def _tensor_bytes(path: Path) -> dict[str, int]:
    r = open_reader(path)
    return {t.name: int(t.n_bytes) for t in r.tensors}


def _kv_report(path: Path) -> tuple[float, int]:
    """(KV MiB, layers) from llama.cpp's own log line `llama_kv_cache: size = ... MiB (... layers`."""
    # -v: the line is logged at INFO level; "-f /dev/null" stops the tool right after the context
    # is made (the last report is the real context's, an earlier one may be --fit's probe)
    proc = subprocess.run([str(tools.tool("llama-perplexity")), "-m", str(path), "-f", "/dev/null", "-c", "64",
                           "-t", "1", "-v"], capture_output=True, text=True, timeout=120)
    m = re.findall(r"llama_kv_cache: size =\s*([0-9.]+) MiB \(\s*\d+ cells,\s*(\d+) layers", proc.stderr)
    assert m, proc.stderr[-3000:]
    return float(m[-1][0]), int(m[-1][1])


def test_replication_costs_only_replica_tensors_and_kv(lrq_files, tiny_arch):
    none = lrq_files.get(tiny_arch, "none", extras=False)
    both = lrq_files.get(tiny_arch, "all", extras=False)
    tn, tb = _tensor_bytes(none), _tensor_bytes(both)
    replica = {n: b for n, b in tb.items() if ".lrq_r" in n}
    assert replica, "the 'all' file has replica tensors (grid_offset / scale_delta are set)"
    # every tensor of the plain file is in the replicated one with the same size, nothing else
    # was added but replica parameters: the codes are stored once
    assert {n: b for n, b in tb.items() if n not in replica} == tn
    # the loaded model: llama_model_size counts every tensor once (aliases add nothing)
    m_none = _native.Model(str(none), n_ctx=64, n_threads=1)
    m_both = _native.Model(str(both), n_ctx=64, n_threads=1)
    assert m_both.size_bytes - m_none.size_bytes == sum(replica.values())
    assert m_both.n_layer == 2 * m_none.n_layer
    # and the file on disk grows by those bytes plus metadata (longer schedule arrays, ...)
    grow = both.stat().st_size - none.stat().st_size - sum(replica.values())
    assert 0 <= grow < 4096 + 128 * len(replica), grow     # tensor-info entries + alignment padding
    # KV cache: one slot per execution, so twice the plain file's (llama.cpp's own report)
    kv_none, layers_none = _kv_report(none)
    kv_both, layers_both = _kv_report(both)
    assert layers_both == 2 * layers_none
    assert kv_both == pytest.approx(2 * kv_none, rel=1e-6)


# ---- bad files: LoadError naming the file, never an abort ----------------------------------------

def _rewrite(src: Path, out: Path, *, set_u32: dict | None = None, drop_keys=(), tensors: dict | None = None):
    """Copy a GGUF with some keys changed / dropped and some tensors replaced (name -> array, or
    None to drop).  The data of the replacement is written as given (no validation)."""
    set_u32, tensors = set_u32 or {}, tensors or {}
    r = open_reader(src)
    arch = str(r.fields["general.architecture"].contents())
    with GGUFStreamWriter(out, arch) as w:
        for key, field in r.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture" or key in drop_keys:
                continue
            if key in set_u32:
                w.add_uint32(key, set_u32[key])
            else:
                w.copy_field(field)
        order = [t for t in r.tensors if tensors.get(t.name, 0) is not None]
        for t in order:
            if t.name in tensors:
                a = tensors[t.name]
                w.add_tensor_info(t.name, a.shape, int(gguf.GGMLQuantizationType.F16 if a.dtype == np.float16
                                                       else gguf.GGMLQuantizationType.F32))
            else:
                w.add_tensor_info(t.name, numpy_shape(t), int(t.tensor_type))
        w.write_header()
        for t in order:
            w.write_tensor(t.name, tensors[t.name] if t.name in tensors else np.asarray(t.data))
        w.finish()
    return out


def _load_error(path: Path) -> str:
    with pytest.raises(_native.LoadError) as ei:
        _native.Model(str(path), n_ctx=32, n_threads=1)
    msg = str(ei.value)
    assert str(path) in msg
    return msg


def test_unknown_format_version_is_a_load_error(lrq_files, tmp_path):
    from lrq.constants import FORMAT_VERSION, FORMAT_VERSION_MIN
    v = FORMAT_VERSION + 1
    bad = _rewrite(lrq_files.get("llama", "all"), tmp_path / f"v{v}.gguf", set_u32={"lrq.format_version": v})
    msg = _load_error(bad)
    assert f"LRQ format version {v} is not supported" in msg and \
        f"versions {FORMAT_VERSION_MIN}..{FORMAT_VERSION}" in msg, msg
    # a version 1 file (LRQ codes only) still loads
    old = _rewrite(lrq_files.get("llama", "all"), tmp_path / "v1.gguf", set_u32={"lrq.format_version": 1})
    assert _native.Model(str(old), n_ctx=32, n_threads=1).n_layer == 6
    # the process survives and still loads a good file
    assert _native.Model(str(lrq_files.get("llama", "all")), n_ctx=32, n_threads=1).n_layer == 6


def test_missing_schedule_key_is_a_load_error(lrq_files, tmp_path):
    bad = _rewrite(lrq_files.get("qwen3", "all"), tmp_path / "nosched.gguf", drop_keys=("lrq.schedule.replica",))
    assert "lrq.schedule.replica" in _load_error(bad)


def test_missing_group_parameter_is_a_load_error(lrq_files, tmp_path):
    bad = _rewrite(lrq_files.get("qwen2", "none"), tmp_path / "noscale.gguf",
                   tensors={"blk.1.ffn_up.lrq_scale": None})
    assert "blk.1.ffn_up.lrq_scale" in _load_error(bad)


def test_replica_tensor_of_wrong_shape_is_a_load_error(lrq_files, tmp_path):
    src = lrq_files.get("llama", "all")
    n_out = open_model(src).tensor_info("blk.1.attn_q.weight").shape[0]
    # both replaced tensors exist in the file (converter: scale_mult [n_out, 1] of every replica;
    # _replica_extras: gain of layer 0)
    for name, value in (("blk.1.attn_q.lrq_r1.scale_mult", np.ones((n_out + 1, 1), np.float16)),
                        ("blk.0.attn_q.lrq_r1.gain", np.ones(n_out + 1, np.float32))):
        bad = _rewrite(src, tmp_path / "shape.gguf", tensors={name: value})
        msg = _load_error(bad)
        assert name in msg, msg


def test_orphan_replica_tensor_is_a_load_error(lrq_files, tmp_path):
    src = lrq_files.get("qwen3", "last-1")      # replica 1 of layer 2 only
    f = open_model(src)
    n_out = f.tensor_info("blk.0.ffn_down.weight").shape[0]
    out = tmp_path / "orphan.gguf"
    r = open_reader(src)
    arch = str(r.fields["general.architecture"].contents())
    with GGUFStreamWriter(out, arch) as w:
        for key, field in r.fields.items():
            if not key.startswith("GGUF.") and key != "general.architecture":
                w.copy_field(field)
        for t in r.tensors:
            w.add_tensor_info(t.name, numpy_shape(t), int(t.tensor_type))
        w.add_tensor_info("blk.0.ffn_down.lrq_r1.gain", (n_out,), int(gguf.GGMLQuantizationType.F32))
        w.write_header()
        for t in r.tensors:
            w.write_tensor(t.name, np.asarray(t.data))
        w.write_tensor("blk.0.ffn_down.lrq_r1.gain", np.ones(n_out, np.float32))
        w.finish()
    msg = _load_error(out)
    assert "is for replica 1 of layer 0, which the schedule never runs" in msg, msg


def test_bad_activation_parameters_are_a_load_error(lrq_files, tmp_path):
    src = lrq_files.get("llama", "all")
    name = "blk.0.attn_v.lrq_r1.act"
    bad = _rewrite(src, tmp_path / "act.gguf", tensors={name: np.array([0.0, 8], np.float32)})
    assert name in _load_error(bad)


def test_truncated_file_is_a_load_error(lrq_files, tmp_path):
    src = lrq_files.get("qwen2", "all")
    data = src.read_bytes()
    bad = tmp_path / "truncated.gguf"
    bad.write_bytes(data[: len(data) - 1000])
    msg = _load_error(bad)
    assert "not within the file bounds" in msg or "truncated" in msg, msg


# ---- SmolLM2-135M at 2 bits ---------------------------------------------------------------------

# Fast path (int8 activations, F16 KV) vs the float64 reference on 128 tokens of the evaluation
# text, 2-bit asym g64 minmax, plan none: measured NMSE 0.041 (top-1 agreement 72 %).  This
# 2-bit model is degenerate (greedy decoding repeats one token) and its residual stream has large
# outliers, which int8 blocks of 32 resolve poorly; at 4 bits the same comparison gives 1.8e-3
# (llama.cpp's own Q4_1 with Q8_1 activations: 9.5e-4, tests/test_reference_native.py).
SMOL_2BIT_FAST_NMSE = 0.1
# The spec-exact op (LRQ_CPU_REF=1) with llama.cpp's default F16 KV: measured 1.1e-4.
SMOL_2BIT_EXACT_NMSE = 1e-3
SMOL_GREEDY_TOKENS = 32


@pytest.mark.slow
def test_smollm2_2bit_greedy_decoding_equals_reference(tmp_path, monkeypatch):
    import torch

    from lrq import assets
    torch.set_num_threads(THREADS)
    path = tmp_path / "smollm2-b2-none.gguf"
    convert(assets.path("smollm2-135m"), path, ConvertOptions(bits=2, group_size=64, plan="none", progress=False))
    ref = Reference(open_model(path))                      # float64
    native = _native.Model(str(path), n_ctx=256, n_threads=THREADS)
    toks = native.tokenize(assets.path("sotu-eval").read_text(encoding="utf-8")[:5000])[:128]
    want = ref.logits(toks)
    assert nmse(native.eval(toks), want) < SMOL_2BIT_FAST_NMSE

    # Greedy decoding of 32 tokens: identical with the spec-exact op.  (With the int8 fast path
    # it is not: the first generated token already differs, see SMOL_2BIT_FAST_NMSE.)
    monkeypatch.setenv("LRQ_CPU_REF", "1")
    exact = _native.Model(str(path), n_ctx=256, n_threads=THREADS)
    assert nmse(exact.eval(toks), want) < SMOL_2BIT_EXACT_NMSE
    prompt = exact.tokenize("The President said that")
    cache = ref.new_cache()
    logits = ref.forward(prompt, cache)[-1]
    ours = []
    for _ in range(SMOL_GREEDY_TOKENS):
        ours.append(int(torch.argmax(logits)))
        logits = ref.forward(np.array([ours[-1]], np.int32), cache)[-1]
    seq = list(prompt)
    for _ in range(SMOL_GREEDY_TOKENS):
        seq.append(int(exact.eval(np.array(seq, np.int32))[-1].argmax()))
    assert seq[len(prompt):] == ours


# ---- tools: llama-bench, llama-server -----------------------------------------------------------

def test_llama_bench_runs_an_lrq_file(lrq_files):
    path = lrq_files.get("qwen3", "progressive")
    proc = subprocess.run([str(tools.tool("llama-bench")), "-m", str(path), "-p", "16", "-n", "4", "-r", "1",
                           "-t", str(THREADS), "-o", "json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout)
    assert {r["n_prompt"] for r in rows} == {0, 16} and {r["n_gen"] for r in rows} == {0, 4}
    for r in rows:
        assert r["avg_ts"] > 0
        # the description names the LRQ file and the virtual layers (lrq_model_desc)
        assert r["model_type"].startswith("lrq-qwen3") and "3 layers -> 6 executions" in r["model_type"], r
        assert r["model_size"] == sum(_tensor_bytes(path).values())


class _Server:
    """llama-server on a free port of 127.0.0.1, stopped on exit (bounded waits everywhere)."""

    def __init__(self, path: Path, *extra: str):
        import socket
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([str(tools.tool("llama-server")), "-m", str(path), "--host", "127.0.0.1",
                                      "--port", str(self.port), "-c", "512", "-t", str(THREADS), "-np", "1", *extra],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def __enter__(self):
        import time
        import urllib.request
        deadline = time.monotonic() + 120
        while True:                                   # /health answers 200 once the model is loaded
            assert self.proc.poll() is None, self.proc.stderr.read()[-3000:]
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            assert time.monotonic() < deadline, "llama-server did not become healthy in 120 s"
            time.sleep(0.5)

    def post(self, route: str, body: dict) -> dict:
        import urllib.request
        req = urllib.request.Request(self.url + route, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def test_llama_server_completion_from_an_lrq_file(lrq_files):
    # the tiny SentencePiece vocabulary has no chat template tokens (the chat endpoint answers
    # 400 "unordered_map::at" for the plain tiny GGUF too), so the chat route is tested on SmolLM2
    with _Server(lrq_files.get("llama", "all")) as srv:
        reply = srv.post("/completion", {"prompt": "Hello", "n_predict": 8, "temperature": 0})
    assert reply["tokens_predicted"] == 8 and isinstance(reply["content"], str)


@pytest.mark.slow
def test_llama_server_chat_completion_from_lrq_smollm2(tmp_path):
    from lrq import assets
    path = tmp_path / "smollm2-b4-last2.gguf"
    convert(assets.path("smollm2-135m"), path, ConvertOptions(bits=4, group_size=64, plan="last-2", progress=False))
    with _Server(path) as srv:
        reply = srv.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "What is the capital of France?"}],
                                                  "max_tokens": 16, "temperature": 0})
        props = srv.post("/completion", {"prompt": "Paris is", "n_predict": 1})
    assert reply["usage"]["completion_tokens"] >= 1
    assert isinstance(reply["choices"][0]["message"]["content"], str) and reply["choices"][0]["message"]["content"]
    assert props["tokens_predicted"] == 1
