"""The two-level 2-bit layout as an LRQ file (format v4, docs/two_level.md): lrq-convert
--layout two-level writes it, both readers accept it, the float64 reference executor and the
patched llama.cpp give the same logits, and replicas apply per super-block.

Bad variants (each refused by every reader by name) are rows of tests/test_bad_files.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from lrq import _native, quant_two_level as tl
from lrq.cli import convert as convert_cli
from lrq.constants import TWO_LEVEL_VERSION, Keys, sub_name
from lrq.convert import ConvertOptions, convert
from lrq.convert.arch import ConvertError
from lrq.convert.update import set_replica_params
from lrq.lrq_file import LRQModelFile
from lrq.reference import Reference
from numerics import nmse
from tiny_models import TINY_VOCAB

# Native with LRQ_CPU_REF=1 (the op's reference kernel: float activations, double sums), F32 KV
# and no flash attention against the float64 reference: the rest of the graph is exact to ~1e-11
# (tests/test_runtime.py); measured 1.4e-13 (B = 16), 2.2e-13 (B = 32).  The controls: the codes
# read as a single-level file give 1.5 .. 1.8, sub-block bytes read with the wrong sub-block size
# far above 1e3 x the bound.
NATIVE_REF_NMSE = 1e-9
# Native fast path (int8 activations per block of 32) against the reference: the int8 rounding
# through the random tiny model's 3 layers; measured 7.8e-4 (B = 16), 1.1e-3 (B = 32).
NATIVE_FAST_NMSE = 5e-3
# a replica with a half-step grid offset moves the 2-bit logits by far more than this
CHANGED_NMSE = 1e-4
THREADS = 2
I8 = 24        # ggml's I8 type id


@pytest.fixture(scope="module")
def files(tiny_models, tmp_path_factory):
    src = tiny_models.gguf("llama")
    d = tmp_path_factory.mktemp("two-level")
    out = {}
    for B in (16, 32):
        out[B] = d / f"tl{B}.gguf"
        convert(src, out[B], ConvertOptions(bits=2, group_size=256, two_level=B, plan="all", progress=False))
    out["single"] = d / "single.gguf"
    convert(src, out["single"], ConvertOptions(bits=2, group_size=64, plan="all", progress=False))
    out["src"] = src
    return out


@pytest.mark.parametrize("B", [16, 32])
def test_converter_writes_the_layout(files, B):
    f = LRQModelFile(files[B])
    assert f.format_version == TWO_LEVEL_VERSION
    from lrq.model_file import open_model
    m = open_model(files["src"])
    for name in f.lrq_weights():
        assert f.is_two_level(name)
        n_out, n_in = f.tensor_info(name).shape
        assert f.tensor_info(sub_name(name)).shape == (n_out, n_in // B)
        # the bytes are the numpy quantizer's on the source weight (uniform importance)
        want = tl.quantize(m.tensor(name).astype(np.float32), super_size=256, sub_size=B)
        got = f.two_level(name)
        assert np.array_equal(got.codes, want.codes) and np.array_equal(got.sc, want.sc)
        assert np.array_equal(got.mn, want.mn) and np.array_equal(got.d.view(np.uint16), want.d.view(np.uint16))
        assert np.array_equal(f.tensor(name), tl.dequantize(want))
    # bits per weight: codes + sub-block bytes + fp16 d and dmin per super-block of 256 (64-wide
    # rows: one super-block of 64, 192-wide: one of 192)
    bpw = f.bpw()
    want_bits = sum(tl.row_bits(f.tensor_info(n).shape[1], 256, B) * f.tensor_info(n).shape[0]
                    for n in f.lrq_weights())
    assert bpw["lrq"] == pytest.approx(want_bits / bpw["n_lrq_weights"], rel=1e-6)
    assert float(f.kv[Keys.BPW_LRQ]) == pytest.approx(bpw["lrq"], rel=1e-6)


@pytest.mark.parametrize("B", [16, 32])
def test_native_matches_the_reference(files, B, monkeypatch):
    toks = np.random.default_rng(7).integers(3, TINY_VOCAB, size=40).astype(np.int32)
    toks[0] = 1
    ref = Reference(files[B]).logits(toks)
    monkeypatch.setenv("LRQ_CPU_REF", "1")
    got = _native.Model(str(files[B]), n_ctx=64, n_threads=THREADS, kv_f32=True, flash_attn=0).eval(toks)
    assert nmse(got, ref) < NATIVE_REF_NMSE
    monkeypatch.delenv("LRQ_CPU_REF")
    fast = _native.Model(str(files[B]), n_ctx=64, n_threads=THREADS, kv_f32=True, flash_attn=0).eval(toks)
    assert nmse(fast, ref) < NATIVE_FAST_NMSE
    # control: the same codes read as a single-level file (sub-block bytes ignored) are another model
    single = Reference(files["single"]).logits(toks)
    assert nmse(single, ref) > 100 * NATIVE_FAST_NMSE


def test_wrong_sub_block_size_is_outside_the_bound(files, tmp_path, monkeypatch):
    """Control of NATIVE_REF_NMSE: a 32-wide file whose sub-block bytes are read 16-wide (each
    byte repeated: a valid file of another weight) gives logits far outside the bound."""
    from gguf_edit import read, rewrite
    _, t = read(files[32])
    rep = {n: (np.repeat(np.asarray(t[n].data), 2, axis=1), I8) for n in t if n.endswith(".lrq_sub")}
    # the repeated bytes describe the same weights (sub-blocks 2k, 2k+1 = old k): still the model
    same = rewrite(files[32], tmp_path / "same.gguf", replace=rep)
    toks = np.arange(1, 30, dtype=np.int32)
    ref = Reference(files[32]).logits(toks)
    monkeypatch.setenv("LRQ_CPU_REF", "1")
    assert nmse(_native.Model(str(same), n_ctx=64, n_threads=THREADS, kv_f32=True, flash_attn=0).eval(toks), ref) \
        < NATIVE_REF_NMSE
    # the first half of each row's bytes read as 32-wide sub-blocks of a 16-wide layout: wrong B
    _, t16 = read(files[16])
    half = {n: (np.ascontiguousarray(np.asarray(t16[n].data)[:, : np.asarray(t16[n].data).shape[1] // 2]), I8)
            for n in t16 if n.endswith(".lrq_sub")}
    wrong = rewrite(files[16], tmp_path / "wrong.gguf", replace=half)
    ref16 = Reference(files[16]).logits(toks)
    got = _native.Model(str(wrong), n_ctx=64, n_threads=THREADS, kv_f32=True, flash_attn=0).eval(toks)
    assert nmse(got, ref16) > 1e3 * NATIVE_REF_NMSE


def test_replicas_apply_per_super_block(files, tmp_path, monkeypatch):
    """scale_mult / grid_offset [n_out, n_super] of a two-level weight: the reference and native
    agree, and the replica changes the logits."""
    f = LRQModelFile(files[16])
    rng = np.random.default_rng(3)
    params = {}
    for name in f.lrq_weights():
        n_out, n_in = f.tensor_info(name).shape
        ns = -(-n_in // 256)
        stem = name[:-len(".weight")]
        params[f"{stem}.lrq_r1.scale_mult"] = (1 + 0.05 * rng.standard_normal((n_out, ns))).astype(np.float16)
        params[f"{stem}.lrq_r1.grid_offset"] = np.full((n_out, ns), 0.5, np.float16)
    out = set_replica_params(files[16], tmp_path / "rep.gguf", params)
    toks = np.arange(1, 40, dtype=np.int32)
    ref = Reference(out).logits(toks)
    assert nmse(ref, Reference(files[16]).logits(toks)) > CHANGED_NMSE
    monkeypatch.setenv("LRQ_CPU_REF", "1")
    got = _native.Model(str(out), n_ctx=64, n_threads=THREADS, kv_f32=True, flash_attn=0).eval(toks)
    assert nmse(got, ref) < NATIVE_REF_NMSE


def test_converter_refuses_bad_combinations(files, tmp_path):
    for kw, why in ((dict(bits=3), "--bits 2"), (dict(mode="sym"), "--asym"), (dict(two_level=8), "16, 32"),
                    (dict(refit=True), "--refit"), (dict(scale_search="mse"), "mse")):
        opts = dict(bits=2, group_size=256, two_level=16, progress=False)
        opts.update(kw)
        with pytest.raises(ConvertError, match=why):
            convert(files["src"], tmp_path / "x.gguf", ConvertOptions(**opts))
    assert convert_cli.main([str(files["src"]), str(tmp_path / "y.gguf"), "--layout", "three-level", "-q"]) == 2
    assert not list(tmp_path.iterdir())


def test_calibrated_quantizers_write_valid_files(files, tmp_path, monkeypatch):
    """--scale-search act-mse (importance E[x^2]) and --gptq (GPTQ on the two-level grid, the
    quantized model's own stream) on the tiny model: valid files, native == reference, and each
    differs from plain round to nearest (the statistics reach the quantizer)."""
    from lrq import assets
    from tiny_models import tiny_vocab_text
    text = tiny_vocab_text(files["src"], assets.text("sotu-calib")[:6000].replace("\n", " "), tmp_path / "calib.txt")
    toks = np.arange(1, 30, dtype=np.int32)
    rtn = LRQModelFile(files[16])
    for kw in (dict(scale_search="act-mse"), dict(gptq=True)):
        out = tmp_path / f"{'gptq' if kw.get('gptq') else 'act'}.gguf"
        convert(files["src"], out, ConvertOptions(bits=2, group_size=256, two_level=16, plan="all", calib_text=str(text),
                                                  calib_tokens=256, calib_window=64, progress=False, **kw))
        f = LRQModelFile(out)
        name = "blk.1.ffn_down.weight"
        assert f.is_two_level(name) and not np.array_equal(f.two_level(name).codes, rtn.two_level(name).codes)
        ref = Reference(out).logits(toks)
        monkeypatch.setenv("LRQ_CPU_REF", "1")
        got = _native.Model(str(out), n_ctx=64, n_threads=THREADS, kv_f32=True, flash_attn=0).eval(toks)
        monkeypatch.delenv("LRQ_CPU_REF")
        assert nmse(got, ref) < NATIVE_REF_NMSE
