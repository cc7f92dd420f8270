"""The two-level 2-bit layout (format v4) in the C kernels against independent references:

- the C quantizer (lrq_quantize_row_two_level_ref) against lrq.quant_two_level byte for byte
  (codes, d, dmin, sub-block bytes), with and without importance, on widths with a shorter last
  super-block and on awkward rows;
- C dequantization against lrq.quant_two_level.dequantize_replica with per-super-block,
  per-channel and per-tensor replica parameters;
- the reference mat-mul against numpy dequantize-then-matmul in float64, the int8 fast path
  against the reference, its AVX2 and portable versions against each other, the AVX-512 VNNI
  kernel against the portable one (where the CPU has it), ggml's op (the CPU backend) against the
  kernels; and controls that a wrong implementation (the min nibble ignored,
  the wrong sub-block size) falls outside each bound.

The NEON version is checked against the portable one in tests/test_neon.py (qemu-aarch64).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from lrq import quant, quant_two_level as tl
from lrq import _native  # built by `make build`; a missing build must fail, not skip
from numerics import int8_error_power, nmse
from test_kernels import AVX512_FLAGS, _cpu_flags   # q8.c's run-time check and this CPU's flags

K = _native.kernels

# C dequantization computes W_r in float64 in dequantize_replica's order (d sc and dmin mn are
# exact products) and rounds once to float32: equal to numpy's float64 result rounded to float32.
# Equality, not a tolerance: an off-by-one sub-block or a dropped term changes whole sub-blocks.
# Reference mat-mul: float64 like numpy, float32 output and another summation order (the
# single-level bound of test_kernels.py, REF_NMSE_TOL).  Ignoring the min nibble gives NMSE ~1e-1.
REF_NMSE_TOL = 1e-12
# Fast path, int8 activations (act_bits 0 or > 8): error power within FAST_ERR_FACTOR times the
# int8 rounding's expected power (test_kernels.py explains the factor; measured here 0.6 .. 1.6).
# The wrong sub-block size or the min nibble ignored is ~1e4 times that.
FAST_ERR_FACTOR = 4.0
# 2..8 activation bits are exact int8 levels: only float32 sums differ (measured <= 1e-13).
FAST_EXACT_ACT_NMSE_TOL = 1e-10
# AVX2 (or NEON) vs portable C and ggml's op vs the kernel: the same integer dots, float32 sums in
# another order (measured <= 1e-14).
SIMD_NMSE_TOL = 1e-10
# A control (a wrong implementation) must miss the fast path's bound by at least this factor
# (smallest measured margins below, in the test).
CONTROL_MARGIN = 10.0
# the largest ratio of fast-path error to the int8 rounding's expected power over a test's cases
# is above this (0.3 .. 3.4 measured); a fast path that silently ran the reference gives ~1e-6
INT8_SEEN = 0.2
ACT_SETTINGS = [(1.0, 0), (0.75, 0), (float(np.float32(0.9)), 4), (1.0, 12)]
# (n_in, super-block = group size, sub-block): 576 = 256 + 256 + 64 and 96 = 64 + 32 leave a
# shorter last super-block
SHAPES = [(256, 256, 16), (576, 256, 16), (576, 256, 32), (576, 128, 16), (96, 64, 32), (96, 32, 16)]
N_OUT = 37          # not a multiple of the 16-row block nor of the SIMD widths


def _weights(rng, n_out, n_in):
    w = (rng.standard_normal((n_out, n_in)) * 0.05).astype(np.float32)
    w[:, ::13] *= 5.0                       # outlier input channels: sub-blocks of unlike ranges
    w[1] = 0.0                              # all-zero row: every scale 0
    w[2] = 0.3                              # constant positive row: min clamped to 0
    w[3] = -0.2                             # constant negative row
    w[4] *= 1e-6                            # tiny values
    w[5] *= 300.0                           # large values, still within fp16
    w[6, ::3] = 0.0
    return w


# impl="fast" runs the AVX-512 kernel for two-level weights here (lrq_mul_mat_q8's choice)
AVX512_FAST = AVX512_FLAGS <= _cpu_flags() and os.environ.get("LRQ_NO_AVX512") != "1"


def _files(t):
    codes, d, dmin, sub = tl.to_file(t)
    return codes, d, dmin, sub


@pytest.mark.parametrize("n_in,S,B", SHAPES)
def test_quantizer_bytes_equal_numpy(n_in, S, B):
    rng = np.random.default_rng(n_in + S + B)
    w = _weights(rng, N_OUT, n_in)
    imp = (rng.random(n_in) ** 2).astype(np.float32)
    subs = {}
    for name, im in (("uniform", None), ("importance", imp)):
        t = tl.quantize(w, im, super_size=S, sub_size=B)
        want = _files(t)
        got = K.quantize_two_level(w, S, B, im)
        for what, a, b in zip(("codes", "d", "dmin", "sub"), want, got):
            a, b = np.asarray(a), np.asarray(b)
            assert a.shape == b.shape, (name, what, a.shape, b.shape)
            bad = np.argwhere(a.view(np.uint8) != b.view(np.uint8))
            assert bad.size == 0, f"{name}: {what} differs at {bad[:3].tolist()}"
        subs[name] = want[3]
    # control: the importance really reaches the search (a quantizer that ignored it would pass
    # the comparison above only if numpy ignored it too)
    assert not np.array_equal(subs["uniform"], subs["importance"])


def test_quantizer_rejects_bad_arguments():
    w = np.zeros((2, 64), np.float32)
    with pytest.raises(ValueError, match="sub_size"):
        K.quantize_two_level(w, 64, 8)
    with pytest.raises(ValueError, match="group size"):
        K.quantize_two_level(w, 48, 16)
    with pytest.raises(ValueError, match="multiple of 32"):
        K.quantize_two_level(np.zeros((2, 48), np.float32), 64, 16)


def _replica(rng, n_out, n_super, kind):
    shape = {"super": (n_out, n_super), "channel": (n_out, 1), "tensor": (1, 1)}[kind]
    alpha = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float16)
    beta = (0.5 * rng.standard_normal(shape)).astype(np.float16)
    gain = (1 + 0.2 * rng.standard_normal(n_out)).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32)
    return alpha, beta, gain, bias


@pytest.mark.parametrize("kind", ["none", "super", "channel", "tensor"])
def test_dequantize_equals_numpy(kind):
    rng = np.random.default_rng(len(kind))
    for n_in, S, B in SHAPES:
        w = _weights(rng, N_OUT, n_in)
        t = tl.quantize(w, super_size=S, sub_size=B)
        codes, d, dmin, sub = _files(t)
        alpha = beta = gain = None
        rp = None
        if kind != "none":
            alpha, beta, gain, _ = _replica(rng, N_OUT, d.shape[1], kind)
            rp = quant.ReplicaParams(scale_mult=alpha, grid_offset=beta, gain=gain)
        ref = tl.dequantize_replica(t, rp)
        got = K.dequantize(codes, d, dmin, 2, S, "asym", alpha=alpha, beta=beta, gain=gain, sub=sub)
        assert got.dtype == np.float32 and got.shape == ref.shape
        assert np.array_equal(got, ref.astype(np.float32)), f"n_in={n_in} S={S} B={B} {kind}"
        if rp is None:      # the unpacked numpy dequantizer of the quantizer agrees too
            assert np.array_equal(got, tl.dequantize(t).astype(np.float32))
        # controls: the min nibble ignored, the codes read as a single-level asym file
        no_min = K.dequantize(codes, d, dmin, 2, S, "asym", alpha=alpha, beta=beta, gain=gain, sub=sub & 15)
        assert not np.array_equal(no_min, got)
        flat = K.dequantize(codes, d, dmin, 2, S, "asym", alpha=alpha, beta=beta, gain=gain)
        assert not np.array_equal(flat, got)


def _mm(codes, d, dmin, sub, S, x, impl, rep, act, **kw):
    alpha, beta, gain, bias = rep
    return K.mul_mat(codes, d, dmin, 2, S, "asym", x, alpha=alpha, beta=beta, gain=gain, bias=bias,
                     act_clip=act[0], act_bits=act[1], impl=impl, sub=sub, **kw)


@pytest.mark.parametrize("n_in,S,B", SHAPES)
def test_mul_mat_ref_and_fast_against_numpy(n_in, S, B):
    rng = np.random.default_rng(7 * n_in + B)
    w = _weights(rng, N_OUT, n_in)
    t = tl.quantize(w, super_size=S, sub_size=B)
    codes, d, dmin, sub = _files(t)
    kinds = ["none", "super", "channel", "tensor"]
    ratios, margins = [], []
    for case, n_tok in enumerate((1, 6, 13)):
        x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
        x[:, ::17] *= 6.0
        for a, act in enumerate(ACT_SETTINGS):
            kind = kinds[(case + a) % len(kinds)]
            if kind == "none":
                rep, rp = (None,) * 4, None
            else:
                rep = _replica(rng, N_OUT, d.shape[1], kind)
                rp = quant.ReplicaParams(scale_mult=rep[0], grid_offset=rep[1], gain=rep[2], bias=rep[3])
            xa = quant.quantize_activations(x, *act)
            w_r = tl.dequantize_replica(t, rp)
            want = xa @ w_r.T + (0 if rp is None else rep[3].astype(np.float64))
            where = f"n_in={n_in} S={S} B={B} n_tok={n_tok} act={act} replica={kind}"

            ref = _mm(codes, d, dmin, sub, S, x, "ref", rep, act)
            assert nmse(ref, want) <= REF_NMSE_TOL, f"ref: {where}: {nmse(ref, want):.3g}"
            fast = _mm(codes, d, dmin, sub, S, x, "fast", rep, act)
            e = nmse(fast, ref)
            expected = int8_error_power(xa, w_r) / float((ref.astype(np.float64) ** 2).sum())
            if 2 <= act[1] <= 8:
                assert e <= FAST_EXACT_ACT_NMSE_TOL, f"fast: {where}: {e:.3g}"
            else:
                ratios.append(e / expected)
                assert e <= FAST_ERR_FACTOR * expected, f"fast: {where}: {e:.3g} > {FAST_ERR_FACTOR} x {expected:.3g}"
            generic = _mm(codes, d, dmin, sub, S, x, "generic", rep, act)
            assert nmse(generic, fast) <= SIMD_NMSE_TOL, f"generic vs fast: {where}"
            if AVX512_FAST:     # the dispatch really takes the AVX-512 kernel for two-level weights
                assert np.array_equal(_mm(codes, d, dmin, sub, S, x, "avx512", rep, act), fast), where
            half = 19       # rows split as ggml splits them over threads
            parts = [_mm(codes, d, dmin, sub, S, x, "fast", rep, act, row0=0, row1=half),
                     _mm(codes, d, dmin, sub, S, x, "fast", rep, act, row0=half, row1=N_OUT)]
            assert np.array_equal(np.concatenate(parts, axis=1), fast), where

            # controls, each outside the bound of its case: the min nibble ignored; the other
            # sub-block size (a kernel reading sub-block i // 32 of 16-wide indices, or i // 16 of
            # 32-wide ones, wrapping around the row)
            bound = FAST_EXACT_ACT_NMSE_TOL if 2 <= act[1] <= 8 else FAST_ERR_FACTOR * expected
            bad = _mm(codes, d, dmin, sub & 15, S, x, "fast", rep, act)
            margins.append(nmse(bad, ref) / bound)
            other = sub[:, :n_in // 32] if B == 16 else np.concatenate([sub, sub], axis=1)
            bad = _mm(codes, d, dmin, other, S, x, "generic", rep, act)
            margins.append(nmse(bad, ref) / bound)
    assert min(margins) > CONTROL_MARGIN, sorted(margins)[:4]
    # the int8 rounding is really there (a fast path that ran the reference would pass the bounds;
    # single cases range 0.02 .. 3.4: few tokens, outlier rows)
    assert max(ratios) > INT8_SEEN, ratios


def _swap_sub_pairs(sub: np.ndarray) -> np.ndarray:
    """sub with the bytes of sub-blocks 2j and 2j + 1 exchanged (an even count kept)."""
    out = sub.copy()
    n = sub.shape[1] // 2 * 2
    out[:, 0:n:2], out[:, 1:n:2] = sub[:, 1:n:2], sub[:, 0:n:2]
    return out


# (n_out, n_in, super-block, tokens): n_out 37 / 21 / 130: row blocks of 16 and a partial one;
# 576 = 256 + 256 + 64 and 576 = 4 x 128 + 64, 96 = 64 + 32, 2080 = 8 x 256 + 32: a shorter last
# super-block; 2080 at B = 16: 130 sub-blocks, more than the kernel's stack scratch holds (its
# malloc path) and a last chunk of 2 sub-block bytes; tokens in passes of 4 and 1 (9 = 4 + 4 + 1).
AVX512_CASES = [(37, 576, 256, 1), (21, 576, 128, 4), (37, 96, 64, 9), (130, 1536, 256, 1), (21, 2080, 256, 5)]


@pytest.mark.parametrize("B", [16, 32])
def test_avx512_kernel_equals_generic(B):
    """The AVX-512 VNNI kernel on two-level weights against the portable kernel: the same integer
    dots (with B = 16 each block's dot split into its two sub-blocks), float32 sums in another order."""
    if not AVX512_FLAGS <= _cpu_flags():
        pytest.skip("the CPU lacks AVX-512 F/BW/VL/DQ/VNNI")
    rng = np.random.default_rng(B)
    kinds = ["none", "super", "channel", "tensor"]
    for case, (n_out, n_in, S, n_tok) in enumerate(AVX512_CASES):
        w = _weights(rng, n_out, n_in)
        codes, d, dmin, sub = _files(tl.quantize(w, super_size=S, sub_size=B))
        x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
        x[:, ::17] *= 6.0
        for a, act in enumerate(ACT_SETTINGS[:3]):
            kind = kinds[(case + a) % len(kinds)]
            rep = (None,) * 4 if kind == "none" else _replica(rng, n_out, d.shape[1], kind)
            where = f"{n_out}x{n_in} S={S} B={B} n_tok={n_tok} act={act} replica={kind}"
            generic = _mm(codes, d, dmin, sub, S, x, "generic", rep, act)
            simd = _mm(codes, d, dmin, sub, S, x, "avx512", rep, act)
            e = nmse(simd, generic)
            assert e <= SIMD_NMSE_TOL, f"avx512 vs generic: {where}: {e:.3g}"
            if AVX512_FAST:
                assert np.array_equal(_mm(codes, d, dmin, sub, S, x, "fast", rep, act), simd), where
            # rows split anywhere (ggml's threads) give the same bits
            for half in (5, 19):
                parts = [_mm(codes, d, dmin, sub, S, x, "avx512", rep, act, row0=0, row1=half),
                         _mm(codes, d, dmin, sub, S, x, "avx512", rep, act, row0=half, row1=n_out)]
                assert np.array_equal(np.concatenate(parts, axis=1), simd), f"row split at {half}: {where}"
            # control: the bound catches a kernel that gives a block's halves (B = 16) or
            # neighbouring blocks (B = 32) each other's factors
            wrong = _mm(codes, d, dmin, _swap_sub_pairs(sub), S, x, "generic", rep, act)
            assert nmse(wrong, generic) > 1e3 * SIMD_NMSE_TOL, f"control: {where}"


@pytest.mark.parametrize("B", [16, 32])
def test_ggml_op_runs_the_two_level_kernels(B):
    """GGML_OP_LRQ_MUL_MAT with the sub-block source on the CPU backend: ggml's reference mode
    is the reference kernel, its fast mode the int8 kernel (2 threads: row chunks split)."""
    rng = np.random.default_rng(B)
    n_in, S = 576, 256
    w = _weights(rng, 150, n_in)
    t = tl.quantize(w, super_size=S, sub_size=B)
    codes, d, dmin, sub = _files(t)
    rep = _replica(rng, 150, d.shape[1], "super")
    x = rng.standard_normal((9, n_in)).astype(np.float32)
    kw = dict(alpha=rep[0], beta=rep[1], gain=rep[2], bias=rep[3], sub=sub)
    ref = K.mul_mat(codes, d, dmin, 2, S, "asym", x, impl="ref", **kw)
    fast = K.mul_mat(codes, d, dmin, 2, S, "asym", x, impl="fast", **kw)
    op_ref = K.ggml_op(codes, d, dmin, 2, S, "asym", x, n_threads=2, use_ref=True, **kw)
    op = K.ggml_op(codes, d, dmin, 2, S, "asym", x, n_threads=2, **kw)
    assert nmse(op_ref, ref) <= SIMD_NMSE_TOL
    assert nmse(op, fast) <= SIMD_NMSE_TOL
    # control: the same op without the sub-block source is a different (single-level) weight
    plain = K.ggml_op(codes, d, dmin, 2, S, "asym", x, n_threads=2, alpha=rep[0], beta=rep[1], gain=rep[2],
                      bias=rep[3])
    assert nmse(plain, ref) > 1e-2


@pytest.mark.parametrize("n_in,S,B", [(576, 256, 16), (96, 64, 32)])
def test_multi_replica_call_equals_one_replica_at_a_time(n_in, S, B):
    """lrq_mul_mat_q8_multi on two-level codes (the members in turn over each row range): every
    member gets the bits lrq_mul_mat_q8 gives it alone; the control swaps the members' parameters."""
    rng = np.random.default_rng(n_in + B)
    codes, d, dmin, sub = _files(tl.quantize(_weights(rng, N_OUT, n_in), super_size=S, sub_size=B))
    for n_rep, n_tok in ((2, 1), (3, 5)):
        xs = [rng.standard_normal((n_tok, n_in)).astype(np.float32) for _ in range(n_rep)]
        reps = [dict(zip(("alpha", "beta", "gain", "bias"), _replica(rng, N_OUT, d.shape[1], kind)),
                     act_clip=ACT_SETTINGS[j][0], act_bits=ACT_SETTINGS[j][1])
                for j, kind in enumerate(["super", "channel", "tensor"][:n_rep])]
        fused = K.mul_mat_multi(codes, d, dmin, 2, S, "asym", xs, reps, sub=sub)
        alone = [_mm(codes, d, dmin, sub, S, x, "fast", tuple(r[k] for k in ("alpha", "beta", "gain", "bias")),
                     (r["act_clip"], r["act_bits"])) for x, r in zip(xs, reps)]
        for j in range(n_rep):
            assert np.array_equal(fused[j], alone[j]), f"member {j} of {n_rep}, {n_tok} tokens"
        swapped = K.mul_mat_multi(codes, d, dmin, 2, S, "asym", xs, reps[1:] + reps[:1], sub=sub)
        assert not np.array_equal(swapped[0], alone[0])


def test_sub_argument_is_checked():
    rng = np.random.default_rng(0)
    t = tl.quantize(_weights(rng, 8, 64), super_size=64, sub_size=16)
    codes, d, dmin, sub = _files(t)
    with pytest.raises(ValueError, match="sub must have shape"):
        K.dequantize(codes, d, dmin, 2, 64, "asym", sub=sub[:, :3])
    with pytest.raises(ValueError, match="bits 2 and mode 'asym'"):
        K.dequantize(codes, d, None, 2, 64, "sym", sub=sub)
