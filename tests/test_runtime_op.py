"""GGML_OP_LRQ_MUL_MAT on ggml's CPU backend (patch 0002 + native/lrq/lrq-cpu.c).

`_native.kernels.ggml_op` builds a one-node ggml graph with the LRQ code tensor (type LRQ1..4),
its F16 group parameters and the replica tensors, and computes it with ggml's CPU graph executor
on 1 or 2 threads.  Checked against two independent references:

- numpy: lrq.quant's act_r and dequantization, then a float64 matmul (the spec, FORMAT.md 6);
- the C reference kernel lrq_mul_mat_ref (double accumulation), via `_native.kernels.mul_mat`.

for every bits x group size x mode (asym / sym / ternary), n_out = 37 (not a multiple of the 8-float
SIMD width nor of the kernel's 16-row block), n_in = 576 (g = 128 and 256 leave a short last group),
1 token (decode) and 45 tokens (two token chunks of the op: 32 + 13), replica parameters of every
broadcast shape, and activation clip / bits.
"""

from __future__ import annotations

import numpy as np
import pytest

from lrq import quant
from lrq import _native  # built by `make build`; a missing build must fail, not skip
from numerics import int8_error_power, nmse

K = _native.kernels

MODES_BITS = [("asym", 1), ("asym", 2), ("asym", 3), ("asym", 4),
              ("sym", 1), ("sym", 2), ("sym", 3), ("sym", 4), ("ternary", 2)]
GROUPS = [32, 64, 128, 256]
N_OUT = 37
N_IN = 576
TOKENS = [1, 45]
# (clip ratio, act bits): float32-exact values (the C side receives them as float32)
ACT_SETTINGS = [(1.0, 0), (0.75, 0), (0.875, 8), (1.0, 12)]

# The op's fast path is lrq_quantize_act_q8 + lrq_mul_mat_q8, called on (64-row x 32-token)
# chunks.  64 and 32 are multiples of the kernel's 16-row and 4-token blocks and activations are
# quantized per token, so every output element is computed by the same float operations as one
# whole-matrix lrq_mul_mat call: the op must equal it bit for bit, on any number of threads.
# In ggml's reference mode the op calls lrq_mul_mat_ref per chunk; its elements are independent
# double sums, so it must equal the whole-matrix reference bit for bit too.
# Against numpy (float64 dequantize-then-matmul, independent of the C code):
#  - reference mode: only the float32 output rounding and the summation order differ, NMSE
#    <= 2^-48 + tiny (same bound as tests/test_kernels.py);
REF_NMSE_TOL = 1e-12
#  - fast path: int8 activations (act bits 0 or > 8) add an error of expected power
#    sum W_r^2 * s_b^2 / 12 per output (s_b = max|x_block| / 127, see int8_error_power);
#    measured ratios are ~0.5..2 on these small matrices (tests/test_kernels.py: FAST_ERR_FACTOR),
#    and any real fault (a wrong code, group or offset) is orders of magnitude larger.
FAST_ERR_FACTOR = 4.0
#  - fast path with 2..8 activation bits: the spec's levels are the int8 values themselves, only
#    float32 sums differ from the double reference.
FAST_EXACT_ACT_NMSE_TOL = 1e-10


def _replica(rng, n_out, n_groups, kind):
    if kind == "none":
        return None, None, None, None
    shape = {"group": (n_out, n_groups), "channel": (n_out, 1), "tensor": (1, 1)}[kind]
    alpha = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float16)
    beta = (0.5 * rng.uniform(-1, 1, shape)).astype(np.float16)
    gain = (1.0 + 0.2 * rng.standard_normal(n_out)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(n_out)).astype(np.float32)
    return alpha, beta, gain, bias


def _args(qt, x, rep, act):
    alpha, beta, gain, bias = rep
    return dict(codes=qt.codes, d=qt.scale, m=qt.min, bits=qt.bits, group_size=qt.group_size, mode=qt.mode, x=x,
                alpha=alpha, beta=beta, gain=gain, bias=bias, act_clip=act[0], act_bits=act[1])


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("mode,bits", MODES_BITS)
def test_ggml_op_against_numpy_and_c_reference(mode, bits, group_size):
    rng = np.random.default_rng(7000 + 100 * bits + group_size)
    kinds = ["none", "group", "channel", "tensor"]
    w = (rng.standard_normal((N_OUT, N_IN)) * 0.05).astype(np.float32)
    qt = quant.quantize(w, bits, group_size, mode)
    ratios = []
    for case, n_tok in enumerate(TOKENS):
        x = rng.standard_normal((n_tok, N_IN)).astype(np.float32)
        x[:, ::17] *= 6.0                                  # outlier channels: clipping matters
        for a, act in enumerate(ACT_SETTINGS):
            kind = kinds[(case + a) % len(kinds)]
            rep = _replica(rng, N_OUT, qt.n_groups, kind)
            rp = None if kind == "none" else quant.ReplicaParams(scale_mult=rep[0], grid_offset=rep[1],
                                                                 gain=rep[2], bias=rep[3])
            xa = quant.quantize_activations(x, *act)
            w_r = quant.dequantize(qt, rp)
            want = xa @ w_r.T
            if rp is not None:
                want = want + rep[3].astype(np.float64)
            where = f"{mode} b{bits} g{group_size} n_tok={n_tok} act={act} replica={kind}"
            kw = _args(qt, x, rep, act)

            c_fast = K.mul_mat(impl="fast", **kw)
            c_ref = K.mul_mat(impl="ref", **kw)
            for n_threads in (1, 2):
                y = K.ggml_op(n_threads=n_threads, **kw)
                assert y.shape == (n_tok, N_OUT), where
                assert np.array_equal(y, c_fast), f"op vs lrq_mul_mat: {where} threads={n_threads}"
                y_ref = K.ggml_op(n_threads=n_threads, use_ref=True, **kw)
                assert np.array_equal(y_ref, c_ref), f"op (ref mode) vs lrq_mul_mat_ref: {where} threads={n_threads}"
            assert nmse(y_ref, want) <= REF_NMSE_TOL, f"ref mode vs numpy: {where}: {nmse(y_ref, want):.3g}"
            e = nmse(y, want)
            if 2 <= act[1] <= 8:
                assert e <= FAST_EXACT_ACT_NMSE_TOL, f"op vs numpy: {where}: NMSE {e:.3g}"
            else:
                expected = int8_error_power(xa, w_r) / float((want ** 2).sum())
                ratios.append(e / expected)
                assert e <= FAST_ERR_FACTOR * expected, f"op vs numpy: {where}: NMSE {e:.3g} > {FAST_ERR_FACTOR} x {expected:.3g}"
    # the int8 rounding is really there (a fast path that silently ran the reference would pass
    # the upper bounds and leave the q8 kernel untested)
    assert min(ratios) > 0.1, ratios


def test_ggml_op_many_rows_and_tokens_threads_agree():
    # a shape with several row chunks and token chunks, so that 2 threads really split the work
    rng = np.random.default_rng(11)
    w = (rng.standard_normal((300, 256)) * 0.05).astype(np.float32)
    qt = quant.quantize(w, 2, 64, "asym")
    x = rng.standard_normal((100, 256)).astype(np.float32)
    kw = _args(qt, x, (None,) * 4, (1.0, 0))
    y1 = K.ggml_op(n_threads=1, **kw)
    y2 = K.ggml_op(n_threads=2, **kw)
    y3 = K.ggml_op(n_threads=3, **kw)
    assert np.array_equal(y1, y2) and np.array_equal(y1, y3)
    want = x.astype(np.float64) @ quant.dequantize(qt).T
    expected = int8_error_power(x, quant.dequantize(qt)) / float((want ** 2).sum())
    assert nmse(y1, want) <= FAST_ERR_FACTOR * expected
