"""lrq.rotate: the rotation is orthogonal, the rotated model computes the same logits (float64
reference executor), and an outlier channel is spread out."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

from lrq.model_file import open_model
from lrq.quant import ReplicaParams
from lrq.reference import Reference
from lrq.rotate import (RotateError, hadamard, kurtosis, rotate_model, rotated_tensors,
                        rotation_matrix)
from tiny_models import make_tiny_gguf

# Q Q^T = I up to float64 rounding of products of d ~ 10^3 terms of size ~1/sqrt(d)
ORTHO_TOL = 1e-12
# float64 rotation, float64 execution: only rounding of the extra products remains
# (measured ~1e-30 on the tiny models)
NMSE_F64 = 1e-24
# rotated weights stored as F32: each weight carries a relative error <= 2^-24 ~ 6e-8, i.e. an
# NMSE ~ 4e-15 a weight, amplified by 3 layers (measured 1.3e-14 .. 1.8e-14)
NMSE_F32_FILE = 1e-12

TOKENS = np.random.default_rng(0).integers(3, 320, 24)


def nmse(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(((a - b) ** 2).sum() / (a ** 2).sum())


@pytest.mark.parametrize("d", [1, 3, 8, 64, 96, 576, 1536])
def test_rotation_matrix_is_orthogonal(d):
    q = rotation_matrix(d, seed=3)
    assert q.shape == (d, d)
    assert np.abs(q @ q.T - np.eye(d)).max() < ORTHO_TOL
    p = d & -d
    if d // p == 1 and d > 1:   # a pure (signed, normalized) Hadamard matrix: all |q| = 1/sqrt(d)
        assert np.allclose(np.abs(q), 1 / np.sqrt(d), rtol=0, atol=1e-15)
    else:                       # the Hadamard factor spreads every entry to <= 1/sqrt(p)
        assert np.abs(q).max() <= 1 / np.sqrt(p) + 1e-15
    assert not np.array_equal(q, rotation_matrix(d, seed=4)) or d == 1


def test_hadamard():
    h = hadamard(8)
    assert np.array_equal(h @ h.T, 8 * np.eye(8)) and set(np.unique(h)) == {-1.0, 1.0}
    with pytest.raises(RotateError, match="power of two"):
        hadamard(12)


class _Mem:
    """A model-file stand-in holding float64 tensors in memory (the executor's interface)."""

    def __init__(self, base, tensors: dict):
        self.path = base.path
        self._t = tensors
        self.hparams = dataclasses.replace(base.hparams, tied_embeddings="output.weight" not in tensors)
        self.schedule = base.schedule
        self.bos_id, self.add_bos = base.bos_id, base.add_bos

    tensor_names = property(lambda self: list(self._t))

    def has_tensor(self, n):
        return n in self._t

    def tensor(self, n):
        return self._t[n]

    def weight(self, n, replica=0):
        return self._t[n], ReplicaParams()


@pytest.fixture(scope="module")
def d96_gguf(tmp_path_factory):
    """d = 96 = 32 x 3: the Hadamard x random-orthogonal path (the tiny models have d = 64)."""
    return make_tiny_gguf("llama", tmp_path_factory.mktemp("d96"), hidden_size=96, num_attention_heads=4,
                          num_key_value_heads=2)


def _model(request, name, tiny_models):
    return request.getfixturevalue("d96_gguf") if name == "llama-d96" else tiny_models.gguf(name)


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "llama-d96"])
def test_logits_unchanged_float64(name, tiny_models, request):
    src = _model(request, name, tiny_models)
    base = open_model(src)
    rot = dict(rotated_tensors(src, seed=7))
    assert "output.weight" in rot                     # untied (tied sources get a head)
    for n, a in rot.items():
        if re.match(r"^(blk\.\d+\.(attn_norm|ffn_norm)|output_norm)\.weight$", n):
            assert np.array_equal(a, np.ones_like(a))  # norms folded away
    want = Reference(base, torch.float64).logits(TOKENS)
    got = Reference(_Mem(base, rot), torch.float64).logits(TOKENS)
    assert nmse(want, got) < NMSE_F64
    # and the rotation really changed the weights (not an identity pass-through)
    assert nmse(base.tensor("blk.0.attn_q.weight"), rot["blk.0.attn_q.weight"]) > 0.1


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3", "llama-d96"])
def test_rotated_file_logits(name, tiny_models, request, tmp_path):
    src = _model(request, name, tiny_models)
    out = tmp_path / "rot.gguf"
    s = rotate_model(src, out, seed=1)
    assert s.untied == open_model(src).hparams.tied_embeddings
    m = open_model(out)
    assert {m.tensor_type(n) for n in m.tensor_names} == {"F32"}
    assert not m.hparams.tied_embeddings
    assert nmse(Reference(src).logits(TOKENS), Reference(m).logits(TOKENS)) < NMSE_F32_FILE


def _with_outlier_channel(src, out, channel=5, factor=40.0):
    """Copy of ``src`` whose attn/ffn norm weights have one channel ``factor`` times larger: after
    folding, every reader weight has an outlier input column (like real LLMs' massive channels)."""
    import gguf
    from lrq.gguf_hparams import dequantize_tensor, numpy_shape, open_reader
    from lrq.gguf_write import GGUFStreamWriter
    r = open_reader(src)
    with GGUFStreamWriter(out, "llama") as w:
        for k, f in r.fields.items():
            if not k.startswith("GGUF.") and k != "general.architecture":
                w.copy_field(f)
        for t in r.tensors:
            w.add_tensor_info(t.name, numpy_shape(t), int(gguf.GGMLQuantizationType.F32))
        w.write_header()
        for t in r.tensors:
            a = dequantize_tensor(t)
            if re.match(r"^blk\.\d+\.(attn|ffn)_norm\.weight$", t.name):
                a = a.copy()
                a[channel] *= factor
            w.write_tensor(t.name, a.astype(np.float32))
        w.finish()
    return out


def test_rotation_spreads_an_outlier_channel(tiny_models, tmp_path):
    src = _with_outlier_channel(tiny_models.gguf("llama"), tmp_path / "outlier.gguf")
    readers = re.compile(r"^blk\.\d+\.(attn_[qkv]|ffn_gate|ffn_up)\.weight$")
    folded = {n: a for n, a in rotated_tensors(src, rotate=False) if readers.match(n)}
    rotated = {n: a for n, a in rotated_tensors(src, seed=0) if readers.match(n)}
    k_f = np.array([kurtosis(folded[n]) for n in folded])
    k_r = np.array([kurtosis(rotated[n]) for n in folded])
    ratio_f = np.array([np.abs(a).max() / a.std() for a in folded.values()])
    ratio_r = np.array([np.abs(rotated[n]).max() / rotated[n].std() for n in folded])
    # the folded weights carry the outlier column (kurtosis far above a Gaussian's 3) ...
    assert k_f.mean() > 10
    # ... which the rotation spreads: both measures fall, on every tensor
    assert (k_r < k_f).all() and k_r.mean() < 0.5 * k_f.mean()
    assert (ratio_r < ratio_f).all()


def test_rotate_errors(tiny_models, tmp_path):
    from lrq.convert import ConvertOptions, convert
    src = tiny_models.gguf("llama")
    lrq = tmp_path / "x.lrq.gguf"
    convert(src, lrq, ConvertOptions(progress=False))
    with pytest.raises(RotateError, match="is an LRQ file"):
        rotate_model(lrq, tmp_path / "y.gguf")
    with pytest.raises(RotateError, match="no such file"):
        rotate_model(tmp_path / "missing.gguf", tmp_path / "y.gguf")
    with pytest.raises(RotateError, match="overwrite the source"):
        rotate_model(src, src)
    with pytest.raises(RotateError, match="does not exist"):
        rotate_model(src, tmp_path / "nodir" / "y.gguf")
    assert not (tmp_path / "y.gguf").exists()


# 4-bit g32 codes against the float model: the tiny random model is very sensitive to rounding
# (measured: plain conversion 0.139, rotated 0.130; 2 bits 1.2, an unrelated model ~2), so the
# rotated file is held to the plain conversion's error, not to an absolute bound
ROTATED_VS_PLAIN_Q4 = 1.5


def test_convert_rotate_flag(tiny_models, tmp_path):
    """lrq-convert --rotate = rotate_model, then the plain conversion of the rotated file (same
    bytes); the rotated source is kept and named in the file; the model still computes the source's
    function up to 4-bit rounding; --rotate with a stock base is refused."""
    from lrq.cli.convert import main as convert_main
    from lrq.constants import Keys
    from lrq.convert import ConvertError, ConvertOptions, convert
    from lrq.gguf_hparams import open_reader, read_kv
    src = tiny_models.gguf("llama")
    out = tmp_path / "rot.lrq.gguf"
    rc = convert_main([str(src), str(out), "--rotate", "--bits", "4", "--group-size", "32",
                       "--seed", "3", "--work", str(tmp_path / "w"), "-q"])
    assert rc == 0
    rot = tmp_path / "w" / f"{src.stem}.rotated-seed3.F32.gguf"
    assert rot.is_file() and read_kv(open_reader(out))[Keys.SOURCE] == rot.name
    # the same bytes as the two steps done by hand
    by_hand = tmp_path / "hand-rot.gguf"
    rotate_model(src, by_hand, seed=3)
    assert by_hand.read_bytes() == rot.read_bytes()
    two_step = tmp_path / "two-step.lrq.gguf"
    convert(by_hand, two_step, ConvertOptions(bits=4, group_size=32, seed=3, progress=False))
    a, b = open_reader(out), open_reader(two_step)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for ta, tb in zip(a.tensors, b.tensors):
        assert np.array_equal(np.asarray(ta.data), np.asarray(tb.data)), ta.name
    # the function is the source's (float64 reference executor on both)
    want = Reference(open_model(src), torch.float64).logits(TOKENS)
    got = Reference(open_model(out), torch.float64).logits(TOKENS)
    plain = tmp_path / "plain4.lrq.gguf"
    convert(src, plain, ConvertOptions(bits=4, group_size=32, seed=3, progress=False))
    plain_err = nmse(want, Reference(open_model(plain), torch.float64).logits(TOKENS))
    assert nmse(want, got) < ROTATED_VS_PLAIN_Q4 * plain_err and plain_err < 0.5
    # refused: a stock base; an unsupported source leaves no rotated file behind
    with pytest.raises(ConvertError, match="--rotate applies to LRQ codes"):
        convert(src, tmp_path / "x.gguf", ConvertOptions(rotate=True, base_type="IQ2_XS", progress=False))
    lrq_src = tmp_path / "plain.lrq.gguf"
    convert(src, lrq_src, ConvertOptions(progress=False))
    with pytest.raises(ConvertError, match="is an LRQ file"):
        convert(lrq_src, tmp_path / "y.gguf", ConvertOptions(rotate=True, progress=False))
    assert not list(tmp_path.glob("plain.lrq.rotated*")) and not (tmp_path / "y.gguf").exists()


def test_convert_rotate_refuses_an_output_named_like_the_rotated_source(tiny_models, tmp_path):
    from lrq.convert import ConvertError, ConvertOptions, convert
    src = tiny_models.gguf("llama")
    out = tmp_path / f"{src.stem}.rotated-seed0.F32.gguf"
    with pytest.raises(ConvertError, match="the rotated source would overwrite"):
        convert(src, out, ConvertOptions(rotate=True, progress=False))
    assert not out.exists()
