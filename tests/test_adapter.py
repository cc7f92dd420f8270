"""lrq adapters (docs/FORMAT.md section 11) and schedules that revisit layers (7.1, rule S3).

- the content hash against an independent CRC-32 (a table-driven one written here) over a
  sample whose chunk positions are computed in floating point;
- write_adapter -> AdapterFile round trip, the binding computed independently from the base;
- split_lrq_file: the stock base is the LRQ file's stock tensors byte for byte, and the reference
  executor's logits of base + adapter equal those of the LRQ file exactly (stock-typed and LRQ
  codes);
- the reference executor runs a schedule that goes back to earlier layers as the blocks run in
  that order by hand;
- BAD_ADAPTERS: one bad adapter or base per row, refused by the Python readers (``bind``) and
  ``lrq-inspect BASE --adapter A`` with the expected words, the adapter and the base named.
  Rows are (name, make(files, tmp) -> (base, adapter), expected substring): the C++ loader's
  verdict can be added to the same table.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from lrq.adapter import (AdapterError, AdapterFile, _binding, _write, bind, sample_crc32,
                         split_lrq_file, write_adapter)
from lrq.cli import inspect as inspect_cli
from lrq.constants import ADAPTER_ARCH, FORMAT_VERSION, Keys
from lrq.convert import ConvertOptions, convert
from lrq.convert.update import set_replica_params
from lrq.gguf_hparams import open_reader
from lrq.model_file import open_model
from lrq.plan import Plan, layer_map
from lrq.reference import Reference
from gguf_edit import read, rewrite

V = gguf.GGUFValueType
F32, F16 = int(gguf.GGMLQuantizationType.F32), int(gguf.GGMLQuantizationType.F16)
# the tiny llama: 3 layers, d = 64, ffn 192
N_LAYER, D, FF = 3, 64, 192
PLAN = {"layers": {"0": {"replicas": 2, "mode": "serial"}, "2": {"replicas": 2, "mode": "parallel"}}}
TOKENS = np.array([1, 17, 42, 99, 7, 250, 3, 64])


# ---- an independent CRC-32 (reflected polynomial 0xEDB88320, init and final xor 0xFFFFFFFF) --------

def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc_table()


def _crc32(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _sample(data: bytes) -> bytes:
    """FORMAT.md 11's sample, chunk starts computed in float64 (exact for these sizes)."""
    if len(data) <= 65536:
        return data
    starts = [int(np.floor(k * (len(data) - 4096) / 15.0)) for k in range(16)]
    return b"".join(data[s:s + 4096] for s in starts)


@pytest.mark.parametrize("n", [0, 1, 4097, 65536, 65537, 100_003, 1 << 20])
def test_sample_crc32_against_an_independent_crc(n):
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    want = _crc32(_sample(data))
    assert sample_crc32(data) == want
    assert sample_crc32(np.frombuffer(data, np.uint8)) == want
    if n % 4 == 0:          # a typed view of the same bytes hashes the bytes, not the values
        assert sample_crc32(np.frombuffer(data, np.float32)) == want


def test_sample_crc32_covers_first_and_last_chunk_only_of_a_large_tensor():
    n = 1 << 20
    data = bytearray(np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes())
    h = sample_crc32(bytes(data))
    gap = 4096 + (n - 4096) // 15 // 2            # between chunk 0 and chunk 1: not sampled
    data[gap] ^= 1
    assert sample_crc32(bytes(data)) == h
    data[n - 1] ^= 1                              # the last byte is in chunk 15
    assert sample_crc32(bytes(data)) != h


# ---- files ------------------------------------------------------------------------------------------

class Files:
    def __init__(self, tiny_models, root: Path):
        self.root = root
        self.src = tiny_models.gguf("llama")
        plan = root / "plan.json"
        plan.write_text(json.dumps(PLAN))
        rng = np.random.default_rng(0)
        sbase = root / "stock.base.gguf"
        convert(self.src, sbase, ConvertOptions(base_type="F32", plan=str(plan), work=str(root / "work"),
                                                progress=False))
        self.stock = set_replica_params(sbase, root / "stock.lrq.gguf", {
            "blk.0.ffn_up.lrq_r1.gain": (1 + 0.1 * rng.standard_normal(FF)).astype(np.float32),
            "blk.0.ffn_up.lrq_r1.bias": (0.01 * rng.standard_normal(FF)).astype(np.float32),
            "blk.0.ffn_up.lrq_r1.clip": np.array([2.0], np.float32),
            "blk.1.attn_q.lrq_r0.gain": (1 + 0.1 * rng.standard_normal(D)).astype(np.float32),
            "blk.2.attn_v.lrq_r1.lr_u": (0.01 * rng.standard_normal((32, 4))).astype(np.float32),
            "blk.2.attn_v.lrq_r1.lr_v": (0.01 * rng.standard_normal((4, D))).astype(np.float32)})
        base = root / "own.base.gguf"
        convert(self.src, base, ConvertOptions(bits=2, group_size=32, plan=str(plan), grid_offset=0.5,
                                               scale_delta=0.1, progress=False))
        self.own = set_replica_params(base, root / "own.lrq.gguf", {
            "blk.0.attn_q.lrq_r1.gain": (1 + 0.1 * rng.standard_normal(D)).astype(np.float32),
            "blk.0.attn_v.lrq_r1.act": np.array([0.9, 8], np.float32)})
        # a good adapter for the plain F32 GGUF: map 0..2,1..2 (layers 1, 2 run twice)
        self.plan = layer_map("0..2,1..2", N_LAYER)
        self.tensors = {
            "blk.1.attn_q.lrq_r1.gain": ((1 + 0.2 * rng.standard_normal(D)).astype(np.float32), F32),
            "blk.1.ffn_down.lrq_r1.bias": ((0.05 * rng.standard_normal(D)).astype(np.float32), F32),
            "blk.2.ffn_up.lrq_r0.clip": (np.array([1.5], np.float32), F32),
        }
        self.adapter = write_adapter(self.src, self.plan, self.tensors, root / "good.adapter.gguf")


@pytest.fixture(scope="module")
def files(tiny_models, tmp_path_factory) -> Files:
    return Files(tiny_models, tmp_path_factory.mktemp("adapters"))


# ---- round trip ---------------------------------------------------------------------------------

def test_write_then_read_round_trip(files):
    a = AdapterFile(files.adapter)
    assert a.kv["general.architecture"] == ADAPTER_ARCH and a.version == 1
    assert a.plan.executions == files.plan.executions
    assert a.base_arch == "llama" and a.base_block_count == N_LAYER
    assert a.base_file == files.src.name
    # the binding, computed here from the base's bytes with the independent CRC
    r, ts = read(files.src)
    want = sorted({n.rsplit(".lrq_r", 1)[0] + ".weight" for n in files.tensors})
    assert a.base_tensors == want
    assert a.base_types == [int(ts[n].tensor_type) for n in want]
    assert a.base_shapes == [x for n in want for x in (ts[n].shape[0], ts[n].shape[1])]
    raw = files.src.read_bytes()
    assert a.base_crc32 == [_crc32(_sample(raw[int(ts[n].data_offset):int(ts[n].data_offset) + int(ts[n].n_bytes)]))
                            for n in want]
    for name, (arr, typ) in files.tensors.items():
        assert int(a.tensors[name].tensor_type) == typ
        assert np.array_equal(np.asarray(a.tensors[name].data).reshape(arr.shape), arr)


def test_bound_view_applies_the_adapter(files):
    m = bind(files.src, files.adapter)
    plain = open_model(files.src)
    assert m.version == FORMAT_VERSION and m.arch == "llama" and m.schedule == list(files.plan.executions)
    g = files.tensors["blk.1.attn_q.lrq_r1.gain"][0].astype(np.float64)
    w1, p1 = m.weight("blk.1.attn_q.weight", 1)
    assert np.array_equal(w1, plain.tensor("blk.1.attn_q.weight") * g[:, None]) and p1.gain_folded
    w0, p0 = m.weight("blk.1.attn_q.weight", 0)
    assert np.array_equal(w0, plain.tensor("blk.1.attn_q.weight")) and p0.gain is None
    assert m.replica_params("blk.2.ffn_up.weight", 0).clip == 1.5
    # open_model gives the same view; a layer map and an adapter together are refused
    assert open_model(files.src, adapter=files.adapter).schedule == m.schedule
    with pytest.raises(AdapterError, match="not combined"):
        open_model(files.src, adapter=files.adapter, layers="0..2")


def test_layer_map_view_of_a_stock_gguf(files):
    m = open_model(files.src, layers="0..2,1..2")
    assert [(e.layer, e.replica) for e in m.schedule] == [(0, 0), (1, 0), (2, 0), (1, 1), (2, 1)]
    assert m.version == FORMAT_VERSION and m.is_replicable("blk.0.attn_q.weight") and not m.is_lrq("blk.0.attn_q.weight")
    with pytest.raises(AdapterError, match="layer 3 does not exist"):
        open_model(files.src, layers="0..3")
    # lrq-inspect shows the same view, and refuses the bad map by name
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert inspect_cli.main([str(files.src), "--layers", "0..2,1..2", "--json"]) == 0
    info = json.loads(out.getvalue())
    assert [(e["layer"], e["replica"]) for e in info["schedule"]] == [(0, 0), (1, 0), (2, 0), (1, 1), (2, 1)]
    assert info["layer_map"] == "0..2,1..2" and info["base_architecture"] == "llama"
    rc, err = _inspect([str(files.src), "--layers", "0..3"])
    assert rc == 1 and "layer map '0..3'" in err and str(files.src) in err, err


# ---- schedules that go back to an earlier layer ----------------------------------------------------

def test_reference_runs_a_revisiting_schedule_in_order(files):
    """Map 0..2,1..2 with the adapter's replica-1 tensors: the reference equals the blocks run in
    the schedule's order by hand, each execution with its own cache slot; and it differs from the
    plain model (the revisits are not skipped)."""
    import torch
    ref = Reference(bind(files.src, files.adapter))
    got = ref.logits(TOKENS)
    hp = ref.hp
    from lrq.reference.ops import rms_norm, rope_angles
    pos = torch.arange(len(TOKENS))
    cos, sin = rope_angles(pos, hp.rope_dim, hp.rope_theta, 1.0, None, torch.float64)
    cache = ref.new_cache()
    x = ref.tok_embd[torch.as_tensor(TOKENS)]
    with torch.no_grad():
        for slot, (layer, replica) in enumerate([(0, 0), (1, 0), (2, 0), (1, 1), (2, 1)]):
            x = ref._block(x, ref.blocks[(layer, replica)], cache, slot, pos, cos, sin)
        want = (rms_norm(x, ref.output_norm, hp.rms_eps) @ ref.output.T).numpy()
    assert np.array_equal(got, want)
    assert not np.allclose(got, Reference(files.src).logits(TOKENS))
    # replica 1 of layer 1 differs from replica 0 (the adapter's gain is applied on the revisit)
    assert not torch.equal(ref.blocks[(1, 1)].lin["attn_q"].weight, ref.blocks[(1, 0)].lin["attn_q"].weight)


def test_layer_by_layer_tools_refuse_a_revisiting_schedule(files, tmp_path):
    from lrq.calib import CalibError
    from lrq.calib.calibrate import CalibrateOptions, calibrate
    with pytest.raises(CalibError) as ei:
        calibrate(files.src, tmp_path / "a.gguf", files.src, CalibrateOptions(n_tokens=64, window=32, steps=1,
                                                                              progress=False),
                  windows=np.zeros((2, 32), np.int64) + 5, plan="0..2,1..2", adapter=True)
    assert "layer 1 after layer 2" in str(ei.value) and str(files.src) in str(ei.value)
    assert not (tmp_path / "a.gguf").exists()


# ---- split_lrq_file ----------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["stock", "own"])
def test_split_lrq_file(files, which, tmp_path):
    lrq = getattr(files, which)
    adapter, base = split_lrq_file(lrq, tmp_path / "a.gguf", tmp_path / "base.gguf")
    rb, tb = read(base)
    rl, tl = read(lrq)
    kept = [n for n in tl if ".lrq_r" not in n]
    assert list(tb) == kept
    for n in kept:        # every base tensor byte for byte
        assert bytes(np.asarray(tb[n].data).tobytes()) == bytes(np.asarray(tl[n].data).tobytes()), n
        assert tb[n].tensor_type == tl[n].tensor_type
    arch = str(rb.fields["general.architecture"].contents())
    if which == "stock":
        assert arch == "llama" and not [k for k in rb.fields if k.startswith("lrq.")]
        assert open_model(base).__class__.__name__ == "ModelFile"
    else:
        assert arch == "lrq-llama" and open_model(base).schedule == list(layer_map("0..2", N_LAYER).executions)
    a = AdapterFile(adapter)
    assert a.base_arch == arch and set(a.tensors) == {n for n in tl if ".lrq_r" in n}
    want = Reference(lrq).logits(TOKENS)
    assert np.array_equal(Reference(open_model(base, adapter=adapter)).logits(TOKENS), want)
    # without base_out only the adapter is written; it binds to the base written above
    a2, b2 = split_lrq_file(lrq, tmp_path / "a2.gguf")
    assert b2 is None and bind(base, a2).schedule == bind(base, adapter).schedule


# ---- bad adapters and bases --------------------------------------------------------------------

def _edit_adapter(**kw):
    """make(): the good adapter rewritten with gguf_edit.rewrite(**kw), on the plain base."""
    def make(f: Files, tmp: Path):
        return f.src, rewrite(f.adapter, tmp / "bad.adapter.gguf", **kw)
    return make


def _raw_adapter(base_of, plan_of, tensors_of):
    """make(): an adapter written without validation (lrq.adapter._write), binding from the base."""
    def make(f: Files, tmp: Path):
        base, plan, tensors = base_of(f), plan_of(f), tensors_of(f)
        weights = sorted({n.rsplit(".lrq_r", 1)[0] + ".weight" for n in tensors})
        r = open_reader(base)
        arch = str(r.fields["general.architecture"].contents())
        out = _write(tmp / "bad.adapter.gguf", arch, N_LAYER, plan, tensors, _binding(r, weights, "test"),
                     weights, {}, lambda t: None)
        return base, out
    return make


def _edit_base(**kw):
    """make(): the plain base rewritten (same keys) with the good adapter."""
    def make(f: Files, tmp: Path):
        return rewrite(f.src, tmp / "bad.base.gguf", **kw), f.adapter
    return make


def _q_weight(f: Files, value: float) -> np.ndarray:
    _, ts = read(f.src)
    a = np.array(ts["blk.1.attn_q.weight"].data, dtype=np.float32, copy=True)
    a.reshape(-1)[5] += value
    return a


def _gain(n=D, v=1.1):
    return (np.full(n, v, np.float32), F32)


def _plan_of(path: Path) -> Plan:
    from lrq.lrq_file import LRQModelFile
    return LRQModelFile(path).plan


def _bad_base_type(f: Files, tmp: Path):
    """The listed weight in another type (the same values in F16)."""
    return rewrite(f.src, tmp / "bad.base.gguf",
                   replace={"blk.1.attn_q.weight": (_q_weight(f, 0.0).astype(np.float16), F16)}), f.adapter


def _bad_base_crc(f: Files, tmp: Path):
    """A different model: one value of a listed weight changed (same type and shape)."""
    return rewrite(f.src, tmp / "bad.base.gguf",
                   replace={"blk.1.attn_q.weight": (_q_weight(f, 0.5), F32)}), f.adapter


def _listed_unmodified(f: Files, tmp: Path):
    """The binding lists blk.1.attn_q.weight, but its only replica tensor is dropped."""
    return f.src, rewrite(f.adapter, tmp / "bad.adapter.gguf", drop={"blk.1.attn_q.lrq_r1.gain"})


BAD_ADAPTERS = [
    # AD1: the adapter alone
    ("not-an-adapter", _edit_adapter(arch="llama"), "lrq-adapter"),
    ("adapter-version-2", _edit_adapter(kv={Keys.ADAPTER_VERSION: (2, V.UINT32)}), "adapter version 2"),
    ("adapter-version-missing", _edit_adapter(kv={Keys.ADAPTER_VERSION: None}),
     f"{Keys.ADAPTER_VERSION} is missing"),
    ("crc-key-missing", _edit_adapter(kv={Keys.ADAPTER_BASE_CRC32: None}), f"{Keys.ADAPTER_BASE_CRC32} is missing"),
    ("format-version-9", _edit_adapter(kv={Keys.FORMAT_VERSION: (9, V.UINT32)}), "format version 9"),
    ("block-count-string", _edit_adapter(kv={Keys.ADAPTER_BASE_BLOCK_COUNT: ("3", V.STRING)}),
     Keys.ADAPTER_BASE_BLOCK_COUNT),
    ("non-replica-tensor", _edit_adapter(add={"blk.0.attn_norm.weight": (np.ones(D, np.float32), F32)}),
     "blk.0.attn_norm.weight is not a replica tensor"),
    ("replica-of-a-norm", _edit_adapter(add={"blk.0.attn_norm.lrq_r0.gain": _gain()}),
     "blk.0.attn_norm.lrq_r0.gain is not a replica tensor"),
    ("lowrank-in-v2", _edit_adapter(kv={Keys.FORMAT_VERSION: (2, V.UINT32)},
                                    add={"blk.1.attn_q.lrq_r1.lr_u": (np.zeros((D, 2), np.float16), F16)}),
     "low-rank"),
    # AD2: architecture, layer count, binding arrays
    ("wrong-arch", _edit_adapter(kv={Keys.ADAPTER_BASE_ARCH: ("qwen2", V.STRING)}), "'qwen2'"),
    ("wrong-block-count", _edit_adapter(kv={Keys.ADAPTER_BASE_BLOCK_COUNT: (4, V.UINT32)}), "4 but the base has 3"),
    ("types-too-short", _edit_adapter(kv={Keys.ADAPTER_BASE_TYPES: ([0], V.ARRAY, V.UINT32)}),
     Keys.ADAPTER_BASE_TYPES),
    ("unlisted-weight", _edit_adapter(add={"blk.0.attn_k.lrq_r0.gain": _gain(32)}),
     "blk.0.attn_k.weight, which lrq.adapter.base.tensors does not list"),
    ("listed-weight-unmodified", _listed_unmodified, "which no replica tensor"),
    # AD3: the base's weights
    ("wrong-type", _bad_base_type, "has type F16"),
    ("wrong-shape", _edit_adapter(kv={Keys.ADAPTER_BASE_SHAPES: ([D, D, D + 1, D, D, FF], V.ARRAY, V.UINT32)}),
     "shape (ne0, ne1)"),
    ("wrong-crc32", _bad_base_crc, "CRC-32"),
    ("base-lacks-weight", _edit_base(drop={"blk.1.ffn_down.weight"}), "no tensor blk.1.ffn_down.weight"),
    # AD4: names
    ("name-clash", _raw_adapter(lambda f: f.stock, lambda f: _plan_of(f.stock),
                                lambda f: {"blk.0.ffn_up.lrq_r1.gain": _gain(FF)}), "also a tensor of the base"),
    # AD5: base + adapter against section 10
    ("layer-never-run", _raw_adapter(lambda f: f.src, lambda f: Plan(layer_map("0..1,1", 2).executions),
                                     lambda f: {"blk.1.attn_q.lrq_r1.gain": _gain()}), "layer(s) 2 never run"),
    ("replica-not-run", _raw_adapter(lambda f: f.src, lambda f: layer_map("0..2", 3),
                                     lambda f: {"blk.1.attn_q.lrq_r1.gain": _gain()}), "never runs"),
    ("clip-on-lrq-codes", _raw_adapter(lambda f: f.own, lambda f: _plan_of(f.own),
                                       lambda f: {"blk.1.attn_q.lrq_r0.clip": (np.ones(1, np.float32), F32)}),
     "not clip"),
    ("gain-wrong-length", _raw_adapter(lambda f: f.src, lambda f: f.plan,
                                       lambda f: {"blk.1.attn_q.lrq_r1.gain": _gain(D + 1)}),
     "blk.1.attn_q.lrq_r1.gain has shape"),
]


def _inspect(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = inspect_cli.main(argv)
    return rc, err.getvalue()


@pytest.mark.parametrize("name,make,msg", BAD_ADAPTERS, ids=[b[0] for b in BAD_ADAPTERS])
def test_bad_adapter_is_refused(files, name, make, msg, tmp_path):
    base, adapter = make(files, tmp_path)
    with pytest.raises(AdapterError) as ei:
        bind(base, adapter)
    text = str(ei.value)
    assert msg in text and str(adapter) in text, text
    rc, err = _inspect([str(base), "--adapter", str(adapter), "--no-tensors"])
    assert rc == 1 and msg in err and str(adapter) in err, err
    if "rule AD1" not in text:          # past AD1 the base is named too
        assert str(base) in text and str(base) in err, text


def test_good_adapters_are_accepted(files, tmp_path):
    """The control of the table: the files its rows start from bind and inspect cleanly."""
    assert bind(files.src, files.adapter).schedule
    assert _inspect([str(files.src), "--adapter", str(files.adapter), "--no-tensors"])[0] == 0
    assert _inspect([str(files.adapter)])[0] == 0
    for lrq in (files.stock, files.own):
        base, adapter = _raw_adapter(lambda f: lrq, lambda f: _plan_of(lrq),
                                     lambda f: {"blk.1.ffn_gate.lrq_r0.gain": _gain(FF)})(files, tmp_path)
        bind(base, adapter)


def test_inspect_shows_an_adapter(files):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert inspect_cli.main([str(files.adapter), "--json"]) == 0
    info = json.loads(out.getvalue())
    assert info["adapter_version"] == 1 and info["base"]["architecture"] == "llama"
    assert info["base"]["block_count"] == N_LAYER and info["base"]["file"] == files.src.name
    assert info["modified_tensors"] == 3 and len(info["replica_tensors"]) == 3
    assert info["file_bytes"] == files.adapter.stat().st_size
    assert [(e["layer"], e["replica"]) for e in info["schedule"]] == [(0, 0), (1, 0), (2, 0), (1, 1), (2, 1)]
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert inspect_cli.main([str(files.adapter)]) == 0
    assert "adapter v1" in text.getvalue() and "blk.1.attn_q.lrq_r1.gain" in text.getvalue()


# ---- lrq-calibrate --adapter ---------------------------------------------------------------------

def _calibrate_cli(argv: list[str]) -> tuple[int, str]:
    from lrq.cli import calibrate as calibrate_cli
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = calibrate_cli.main(argv)
    return rc, err.getvalue()


def test_calibrate_adapter_equals_the_whole_file_calibration(files, tmp_path):
    """The same calibration twice: of an LRQ file wrapping the F32 base (plan none) and, with
    --adapter, of the unchanged plain base.  The adapter holds exactly the whole file's replica
    tensors (same bytes), base + adapter gives the calibrated file's logits, the base is untouched."""
    from tiny_models import tiny_calib_text
    text = tiny_calib_text(files.src, tmp_path / "calib.txt")
    common = ["--source", str(files.src), "--text", str(text), "--tokens", "64", "--window", "32",
              "--steps", "2", "-q"]
    wrapped = tmp_path / "none.lrq.gguf"
    convert(files.src, wrapped, ConvertOptions(base_type="F32", plan="none", work=str(tmp_path / "w"),
                                               progress=False))
    _, tw = read(wrapped)
    _, ts = read(files.src)
    assert all(np.array_equal(np.asarray(tw[n].data), np.asarray(ts[n].data)) for n in ts)   # same weights
    before = hashlib.sha256(files.src.read_bytes()).hexdigest()
    whole = tmp_path / "cal.lrq.gguf"
    assert _calibrate_cli([str(wrapped), str(whole), *common]) == (0, "")
    adapter = tmp_path / "cal.adapter.gguf"
    rc, err = _calibrate_cli([str(files.src), "--adapter", str(adapter), *common])
    assert rc == 0, err
    assert hashlib.sha256(files.src.read_bytes()).hexdigest() == before
    a = AdapterFile(adapter)
    _, tc = read(whole)
    reps = {n for n in tc if ".lrq_r" in n}
    assert reps and set(a.tensors) == reps
    for n in reps:
        assert np.asarray(a.tensors[n].data).tobytes() == np.asarray(tc[n].data).tobytes(), n
    assert a.plan.executions == layer_map("0..2", N_LAYER).executions
    assert np.array_equal(Reference(bind(files.src, adapter)).logits(TOKENS), Reference(whole).logits(TOKENS))


@pytest.mark.parametrize("argv_tail,msg", [
    (["--plan", "0..2,1..2"], "layer 1 after layer 2"),
    (["--plan", "0..5"], "layer 3 does not exist"),
])
def test_calibrate_adapter_refusals(files, tmp_path, argv_tail, msg):
    out = tmp_path / "a.gguf"
    rc, err = _calibrate_cli([str(files.src), "--adapter", str(out), "--source", str(files.src),
                              "--tokens", "64", "--window", "32", "--steps", "1", "-q", *argv_tail])
    assert rc == 1 and msg in err and str(files.src) in err, err
    assert not out.exists()


def test_calibrate_adapter_refuses_a_base_with_replica_tensors(files, tmp_path):
    rc, err = _calibrate_cli([str(files.stock), "--adapter", str(tmp_path / "a.gguf"), "--source", str(files.src),
                              "--tokens", "64", "--window", "32", "--steps", "1", "-q"])
    assert rc == 1 and "holds replica tensors" in err and str(files.stock) in err, err


# ---- the C++ loader (the binding) on the same files ---------------------------------------------

# float32 ggml against the float64 reference on the tiny llama: measured 2e-6 on logits of
# magnitude ~4; the adapter's replica tensors (gain 1 +- 0.2, a bias, a clip) move the logits by
# far more than this, so a loader that dropped or misplaced any of them falls outside it
BINDING_LOGIT_TOL = 1e-4


def _cpp_model(path: Path, **kw):
    from lrq import _native
    return _native.Model(str(path), n_ctx=64, n_threads=1, kv_f32=True, flash_attn=0, **kw)


def test_binding_runs_a_python_written_adapter_as_the_reference(files):
    got = np.asarray(_cpp_model(files.src, adapter=str(files.adapter)).eval(TOKENS.tolist()))
    want = Reference(bind(files.src, files.adapter)).logits(TOKENS)
    assert np.abs(got - want).max() < BINDING_LOGIT_TOL
    # the control: the same schedule without the adapter's tensors is far outside the bound
    plain = Reference(open_model(files.src, layers="0..2,1..2")).logits(TOKENS)
    assert np.abs(plain - want).max() > 100 * BINDING_LOGIT_TOL


@pytest.mark.parametrize("name,make,msg", BAD_ADAPTERS, ids=[b[0] for b in BAD_ADAPTERS])
def test_bad_adapter_is_refused_by_the_binding(files, name, make, msg, tmp_path):
    """The C++ verdict on every row (its messages name the same difference in its own words)."""
    from lrq import _native
    base, adapter = make(files, tmp_path)
    with pytest.raises(_native.LoadError) as ei:
        _cpp_model(base, adapter=str(adapter))
    assert str(adapter) in str(ei.value), str(ei.value)


def test_distill_runs_a_revisiting_schedule_in_order(files, tmp_path):
    """lrq-distill trains group by group in schedule order: its step-0 KL on a file converted with
    map 0..2,1..2 is the KL the reference executor computes from that file (a distiller that ran
    each layer's groups together, i.e. 0,1,1,2,2, is far outside the bound)."""
    import torch
    from lrq.calib import calibration_windows
    from lrq.calib.distill import DistillOptions, distill
    from tiny_models import tiny_calib_text
    # float32 modules against the float64 reference: ~1e-6 relative (tests/test_distill.py)
    kl_rtol = 1e-4
    text = tiny_calib_text(files.src, tmp_path / "calib.txt")
    windows = calibration_windows(files.src, text, n_tokens=64, window=32)
    lrq = tmp_path / "revisit.lrq.gguf"
    convert(files.src, lrq, ConvertOptions(bits=2, group_size=32, plan="0..2,1..2", progress=False))
    assert [(e.layer, e.replica) for e in open_model(lrq).schedule] == [(0, 0), (1, 0), (2, 0), (1, 1), (2, 1)]
    s = distill(lrq, tmp_path / "d.gguf", files.src, DistillOptions(steps=0, top_k=0, progress=False), windows=windows)

    def kl(model_ref):
        src_ref = Reference(files.src)
        tot = 0.0
        for w in windows:
            lq = torch.log_softmax(torch.from_numpy(model_ref.logits(w)), -1).numpy()
            lp = torch.log_softmax(torch.from_numpy(src_ref.logits(w)), -1).numpy()
            tot += float((np.exp(lp) * (lp - lq)).sum())
        return tot / windows.size

    want = kl(Reference(lrq))
    assert s.kl_start == pytest.approx(want, rel=kl_rtol)
    grouped = Reference(lrq)
    grouped.steps.sort(key=lambda st: st.layer)          # the same executions, layer by layer
    assert abs(kl(grouped) - want) > 10 * kl_rtol * want


# ---- lrq-eval --adapter / --layers -------------------------------------------------------------

def test_eval_applies_an_adapter_and_a_layer_map(files, tmp_path, capsys):
    """llama-perplexity --kl-divergence of the base itself against its own F32 reference is ~0;
    with the adapter (or a map that revisits layers) applied it is not, and the identity map is
    the base again.  (-c 128, 2 chunks: as tests/test_eval.py on the tiny model.)"""
    import csv
    from lrq import assets
    from lrq.cli.eval import main as eval_main
    text = tmp_path / "botchan-flat.txt"
    text.write_text(assets.path("botchan").read_text(encoding="utf-8").replace("\n", " ")[:60_000])
    common = ["--ref", str(files.src), "--text", str(text), "-c", "128", "--chunks", "2", "-t", "2",
              "--work-dir", str(tmp_path / "w"), "-q"]
    rows = {}
    for tag, extra in (("adapter", ["--adapter", str(files.adapter)]), ("revisit", ["--layers", "0..2,1..2"]),
                       ("identity", ["--layers", "0..2"])):
        rc = eval_main(common + extra + ["--csv", str(tmp_path / f"{tag}.csv"), str(files.src)])
        assert rc == 0, capsys.readouterr().err
        rows[tag] = [r for r in csv.DictReader(open(tmp_path / f"{tag}.csv")) if r["label"] != "F32 reference"][0]
    assert rows["adapter"]["label"] == f"{files.src.name} + {files.adapter.name}"
    # measured: adapter 0.1257, the same schedule without its tensors 0.1221, identity 0: each
    # bound is ~3x inside what a run that ignored the flag (0) or the tensors (0.1221) gives
    assert float(rows["adapter"]["kld"]) > 1e-3 and float(rows["revisit"]["kld"]) > 1e-3
    assert abs(float(rows["adapter"]["kld"]) - float(rows["revisit"]["kld"])) > 1e-3
    assert abs(float(rows["identity"]["kld"])) < 1e-5
    # the adapter's tensors count in its bpw; a map adds none
    assert float(rows["adapter"]["bpw"]) > float(rows["identity"]["bpw"]) == float(rows["revisit"]["bpw"])
    assert eval_main(common + ["--adapter", str(files.adapter), "--layers", "0..2", str(files.src)]) == 2
    assert "not combined" in capsys.readouterr().err


def test_nothing_to_adapt_is_refused_by_name(files, tmp_path):
    """No replica tensors: no adapter (its binding arrays would be empty), and nothing written."""
    with pytest.raises(AdapterError, match="no replica tensors"):
        write_adapter(files.src, files.plan, {}, tmp_path / "a.gguf")
    plain = tmp_path / "none.lrq.gguf"
    convert(files.src, plain, ConvertOptions(bits=2, group_size=32, plan="none", progress=False))
    with pytest.raises(AdapterError, match="no replica tensors") as ei:
        split_lrq_file(plain, tmp_path / "a.gguf", tmp_path / "b.gguf")
    assert str(plain) in str(ei.value)
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "b.gguf").exists()
    with pytest.raises(AdapterError, match="layer 3 does not exist"):
        write_adapter(files.src, layer_map("0..3", 4), files.tensors, tmp_path / "a.gguf")
