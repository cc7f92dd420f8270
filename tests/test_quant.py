"""lrq.quant against independent references: the spec's formulas written out element by element,
a bit-by-bit packer, the worked example of docs/FORMAT.md, and error bounds."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from lrq.quant import (QuantError, ReplicaParams, dequantize, dequantize_codes, dequantize_torch,
                       pack, quantize, quantize_activations, quantize_activations_torch,
                       quantize_codes, unpack)

FORMAT_MD = Path(__file__).resolve().parent.parent / "docs" / "FORMAT.md"

# Gaussian weights, rows of 576 (SmolLM2's width: 576 is not a multiple of 128 or 256, so the
# partial last group is exercised at g = 128 and 256).
N_OUT, N_IN = 48, 576
# fp16 has an 11-bit significand: rounding d and m moves a dequantized level by at most
# (|m| + qmax * d) * 2^-11; this slack covers it with a factor-2 margin.
FP16_REL = 2.0 ** -10
# Normalised MSE bounds of asym minmax round-to-nearest on the seeded Gaussian weights below,
# per (bits, group size): the measured value x ~1.25.  They fail if the grid, the rounding or
# the partial-group handling is off by a step (one bit less roughly quadruples the error).
NMSE_BOUND = {
    (1, 32): 2.4, (1, 64): 3.4, (1, 128): 4.3, (1, 256): 5.3,
    (2, 32): 0.19, (2, 64): 0.25, (2, 128): 0.30, (2, 256): 0.35,
    (3, 32): 0.035, (3, 64): 0.046, (3, 128): 0.056, (3, 256): 0.065,
    (4, 32): 0.0077, (4, 64): 0.0099, (4, 128): 0.012, (4, 256): 0.014,
}
# stochastic rounding is unbiased: the mean over this many seeds is this close to w (in steps d)
SR_SEEDS = 400
SR_MEAN_TOL = 0.1


@pytest.fixture(scope="module")
def gauss():
    return np.random.default_rng(1234).standard_normal((N_OUT, N_IN)).astype(np.float32) * 0.05


def _groups(n_in, g):
    return [(s, min(s + g, n_in)) for s in range(0, n_in, g)]


# ---- packing --------------------------------------------------------------------------------

def _pack_bitwise(codes, bits):
    """The spec's packing, one bit at a time (independent of lrq.quant.pack)."""
    out = []
    for blk in range(0, len(codes), 32):
        q = [int(c) for c in codes[blk:blk + 32]]
        if bits == 3:
            planes = [([c & 3 for c in q], 2), ([c >> 2 for c in q], 1)]
        else:
            planes = [(q, bits)]
        for vals, b in planes:
            nb = 4 * b
            block = [0] * nb
            for j, v in enumerate(vals):
                for bit in range(b):
                    if v >> bit & 1:
                        block[j % nb] |= 1 << (b * (j // nb) + bit)
            out += block
    return bytes(out)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_pack_matches_bitwise_reference_and_unpacks(bits):
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 1 << bits, size=(3, 96), dtype=np.uint8)
    p = pack(q, bits)
    assert p.shape == (3, 96 // 32 * 4 * bits)
    for row in range(3):
        assert p[row].tobytes() == _pack_bitwise(q[row], bits)
    assert np.array_equal(unpack(p, bits, 96), q)


def test_pack_refuses_codes_that_do_not_fit():
    with pytest.raises(QuantError, match="does not fit in 2 bits"):
        pack(np.full((1, 32), 4, np.uint8), 2)
    with pytest.raises(QuantError, match="multiple of 32"):
        pack(np.zeros((1, 40), np.uint8), 2)


def _doc_example(tag):
    text = FORMAT_MD.read_text()
    m = re.search(rf"<!-- example-{tag} -->\s*```text\s*\ncodes:([^\n]*)\nbytes:([^\n]*)\n```", text)
    assert m, f"docs/FORMAT.md lost its example-{tag} block"
    codes = np.array([int(c) for c in m.group(1).split()], dtype=np.uint8)
    return codes, bytes.fromhex(m.group(2).replace(" ", ""))


@pytest.mark.parametrize("tag,bits,d_hex", [("2bit", 2, 0x392b), ("3bit", 3, 0x346e)])
def test_format_md_worked_example(tag, bits, d_hex):
    codes, want = _doc_example(tag)
    assert len(codes) == 32
    assert pack(codes[None], bits)[0].tobytes() == want
    assert np.array_equal(unpack(np.frombuffer(want, np.uint8)[None], bits, 32)[0], codes)
    # and the quantizer produces exactly these codes and fp16 parameters from w_j = (j-12)/16
    w = ((np.arange(32) - 12) / 16).astype(np.float32)[None]
    q, d, m = quantize_codes(w, bits, 32, "asym")
    assert np.array_equal(q[0], codes)
    assert int(d.view(np.uint16)[0, 0]) == d_hex
    assert int(m.view(np.uint16)[0, 0]) == 0xba00


# ---- the quantizer against the spec ----------------------------------------------------------

def _spec_asym(w, bits, g):
    """FORMAT.md 3.1 asym, group by group, element by element."""
    qmax = (1 << bits) - 1
    n_out, n_in = w.shape
    q = np.zeros(w.shape, np.uint8)
    d = np.zeros((n_out, len(_groups(n_in, g))), np.float16)
    m = np.zeros_like(d)
    for o in range(n_out):
        for G, (s, e) in enumerate(_groups(n_in, g)):
            lo, hi = np.float32(w[o, s:e].min()), np.float32(w[o, s:e].max())
            d[o, G] = np.float16((hi - lo) / np.float32(qmax))
            m[o, G] = np.float16(lo)
            df, mf = np.float32(d[o, G]), np.float32(m[o, G])
            for i in range(s, e):
                q[o, i] = 0 if df == 0 else min(max(np.rint((w[o, i] - mf) / df), 0), qmax)
    return q, d, m


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("g", [32, 64, 128, 256])
def test_asym_minmax_equals_spec(gauss, bits, g):
    w = gauss[:4]
    q, d, m = quantize_codes(w, bits, g, "asym")
    rq, rd, rm = _spec_asym(w, bits, g)
    assert d.shape == (4, -(-N_IN // g))
    assert np.array_equal(d.view(np.uint16), rd.view(np.uint16))
    assert np.array_equal(m.view(np.uint16), rm.view(np.uint16))
    assert np.array_equal(q, rq)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("g", [32, 64, 128, 256])
def test_round_trip_error_bounds(gauss, bits, g):
    qt = quantize(gauss, bits, g, "asym")
    w_hat = dequantize(qt)
    err = np.abs(w_hat - gauss)
    # per element: half a step plus the fp16 rounding of d and m
    for G, (s, e) in enumerate(_groups(N_IN, g)):
        d = qt.scale[:, G].astype(np.float64)[:, None]
        m = qt.min[:, G].astype(np.float64)[:, None]
        bound = d / 2 + FP16_REL * (np.abs(m) + ((1 << bits) - 1) * d) + 1e-12
        assert (err[:, s:e] <= bound).all(), f"group {G}"
    nmse = ((w_hat - gauss) ** 2).sum() / (gauss.astype(np.float64) ** 2).sum()
    assert nmse < NMSE_BOUND[bits, g]


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_sym_error_bound_and_grid(gauss, bits):
    qt = quantize(gauss, bits, 64, "sym")
    w_hat = dequantize(qt)
    d = qt.scale.astype(np.float64)[:, np.arange(N_IN) // 64]
    assert (np.abs(w_hat - gauss) <= d / 2 + FP16_REL * bits * d * (1 << bits)).all()
    # the sym grid is symmetric and has no zero level
    q = unpack(qt.codes, bits, N_IN)
    levels = np.unique(q.astype(np.float64) - ((1 << bits) - 1) / 2)
    assert 0.0 not in levels and np.allclose(levels, -levels[::-1])


def test_ternary_codes_and_mean_abs_scale(gauss):
    qt = quantize(gauss, 2, 64, "ternary")
    q = unpack(qt.codes, 2, N_IN)
    assert set(np.unique(q)) <= {0, 1, 2}
    # d = fp16(mean |w|) per group (sum in float64)
    want = np.abs(gauss.astype(np.float64)).reshape(N_OUT, -1, 64).mean(axis=2).astype(np.float32).astype(np.float16)
    assert np.array_equal(qt.scale, want)
    with pytest.raises(QuantError, match="ternary"):
        quantize(gauss, 3, 64, "ternary")


def test_partial_last_group_uses_only_its_own_weights():
    w = np.zeros((2, 576), np.float32)
    w[:, :512] = np.linspace(-8, 8, 512, dtype=np.float32)
    w[:, 512:] = np.linspace(0.25, 0.5, 64, dtype=np.float32)   # last group of g=128: 64 weights
    qt = quantize(w, 2, 128, "asym")
    assert qt.scale.shape == (2, 5)
    assert float(qt.min[0, 4]) == 0.25
    assert qt.scale[0, 4] == np.float16(np.float32(0.25) / np.float32(3))


def test_round_half_to_even_and_zero_scale():
    # min 0, max 3 -> d = 1, m = 0: t = w exactly; halves go to the even code
    w = np.zeros((1, 32), np.float32)
    w[0, :6] = [0.0, 3.0, 0.5, 1.5, 2.5, 1.4999999]
    q, d, _ = quantize_codes(w, 2, 32, "asym")
    assert float(d[0, 0]) == 1.0
    assert q[0, :6].tolist() == [0, 3, 0, 2, 2, 1]
    # a constant group: d = 0, every code 0, dequantizes to the constant
    c = np.full((1, 32), 0.125, np.float32)
    q, d, m = quantize_codes(c, 2, 32, "asym")
    assert float(d[0, 0]) == 0 and not q.any() and float(m[0, 0]) == 0.125


@pytest.mark.parametrize("mode", ["asym", "sym", "ternary"])
def test_mse_search_never_worse_than_minmax_per_group(gauss, mode):
    # candidate 0 of the search is the minmax grid, so per group the chosen error cannot be larger
    ref = quantize(gauss, 2, 64, mode)
    if mode == "ternary":   # ternary minmax uses mean|w|, not a candidate of the search: compare sums
        mse = quantize(gauss, 2, 64, mode, scale_search="mse")
        assert ((dequantize(mse) - gauss) ** 2).sum() < ((dequantize(ref) - gauss) ** 2).sum()
        return
    mse = quantize(gauss, 2, 64, mode, scale_search="mse")
    e_ref = ((dequantize(ref) - gauss) ** 2).reshape(N_OUT, -1, 64).sum(axis=2)
    e_mse = ((dequantize(mse) - gauss) ** 2).reshape(N_OUT, -1, 64).sum(axis=2)
    assert (e_mse <= e_ref * (1 + 1e-12)).all()
    assert e_mse.sum() < e_ref.sum()


def test_stochastic_rounding_seeded_and_unbiased():
    w = np.random.default_rng(7).standard_normal((2, 64)).astype(np.float32)
    a = quantize(w, 2, 64, rounding="stochastic", seed=1)
    b = quantize(w, 2, 64, rounding="stochastic", seed=1)
    c = quantize(w, 2, 64, rounding="stochastic", seed=2)
    assert np.array_equal(a.codes, b.codes) and not np.array_equal(a.codes, c.codes)
    mean = np.mean([dequantize(quantize(w, 2, 64, rounding="stochastic", seed=s)) for s in range(SR_SEEDS)], axis=0)
    d = a.scale.astype(np.float64)
    assert (np.abs(mean - w) <= SR_MEAN_TOL * d).all()


def test_noise_changes_codes_reproducibly(gauss):
    a = quantize(gauss, 2, 64, noise=0.3, seed=5)
    b = quantize(gauss, 2, 64, noise=0.3, seed=5)
    assert np.array_equal(a.codes, b.codes)
    assert not np.array_equal(a.codes, quantize(gauss, 2, 64).codes)


@pytest.mark.parametrize("kw,msg", [(dict(bits=5, group_size=64), "bits"),
                                    (dict(bits=2, group_size=48), "group size"),
                                    (dict(bits=2, group_size=64, mode="nf4"), "mode")])
def test_bad_arguments(gauss, kw, msg):
    with pytest.raises(QuantError, match=msg):
        quantize(gauss, **kw)


# ---- replicas and activations ----------------------------------------------------------------

def test_dequantize_with_replica_params_equals_formula():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((3, 96)).astype(np.float32)
    qt = quantize(w, 3, 64, "asym")              # groups of 64 and 32
    alpha = np.array([[1.1, 0.9], [1.0, 1.2], [0.8, 1.05]])
    beta = np.array([[0.5], [-0.25], [0.0]])      # per output channel
    gamma = np.array([2.0, 0.5, 1.5])
    got = dequantize(qt, ReplicaParams(scale_mult=alpha, grid_offset=beta, gain=gamma))
    q = unpack(qt.codes, 3, 96)
    for o in range(3):
        for i in range(96):
            G = i // 64
            want = gamma[o] * (alpha[o, G] * float(qt.scale[o, G]) * (int(q[o, i]) + beta[o, 0])
                               + float(qt.min[o, G]))
            assert got[o, i] == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert np.array_equal(dequantize_torch(qt).numpy(), dequantize(qt))
    with pytest.raises(QuantError, match="scale_mult"):
        dequantize(qt, ReplicaParams(scale_mult=np.ones((3, 5))))


def test_activation_clip_and_quant_hand_example():
    x = np.array([[1.0, -2.0, 0.5, 4.0]])
    # c = 0.5: a = 4, clip at 2; k = 3: s = 2/3, xc/s = 1.5, -3, 0.75, 3 -> 2, -3, 1, 3 (half to even)
    want = np.array([[4 / 3, -2.0, 2 / 3, 2.0]])
    assert np.allclose(quantize_activations(x, 0.5, 3), want)
    assert np.allclose(quantize_activations(x, 0.5, 0), [[1.0, -2.0, 0.5, 2.0]])
    assert np.array_equal(quantize_activations(np.zeros((1, 4)), 1.0, 4), np.zeros((1, 4)))
    import torch
    assert np.allclose(quantize_activations_torch(torch.from_numpy(x), 0.5, 3).numpy(), want)
    with pytest.raises(QuantError):
        quantize_activations(x, 0.0, 0)
    with pytest.raises(QuantError):
        quantize_activations(x, 1.0, 1)
