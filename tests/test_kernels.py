"""The C kernels (native/lrq via lrq._native.kernels) against independent references:

- fp16 conversion against numpy's astype (bit for bit, incl. subnormals, overflow, ties);
- the C quantizer against lrq.quant byte for byte (codes, d, m) for every bits x group size x
  mode x scale search, on widths that leave a partial last group and on awkward rows;
- C dequantization against lrq.quant.dequantize with per-group / per-channel / per-tensor
  replica parameters;
- the reference mat-mul against numpy dequantize-then-matmul in float64, the fast (int8
  activation) mat-mul against the reference, its AVX2 and portable versions against each other,
  and row ranges computed separately against the whole.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import pytest

from lrq import quant
from lrq import _native  # built by `make build`; a missing build must fail, not skip
from numerics import int8_error_power, nmse

K = _native.kernels

# float32 values of these are exact (the C side receives act_clip as float32; numpy gets the same
# value as a Python float, so both clip at the same limit).
ACT_SETTINGS = [(1.0, 0), (0.75, 0), (float(np.float32(0.9)), 4), (0.875, 8), (1.0, 12)]

# C dequantization computes W_r in float64 in lrq.quant's operation order and rounds once to
# float32: the only difference to numpy's float64 result is that rounding, |err| <= 2^-24 |w|.
DEQUANT_REL_TOL = 2.0 ** -24
# Reference mat-mul: float64 weights and sums like numpy, but a float32 output (relative error
# <= 2^-24 per element, NMSE <= 2^-48 ~ 4e-15) and another summation order (~1e-16 relative).
REF_NMSE_TOL = 1e-12
# Fast path with int8 activations (act_bits 0 or > 8): every activation is rounded to a step of
# s_b = max|x_block| / 127, an error of variance s_b^2 / 12 independent of the others, so the
# expected error power of y is sum_t sum_o sum_i W_r[o,i]^2 s_b(t,i)^2 / 12 (int8_error_power).
# The measured error power is that sum times ~1: 0.9 .. 1.04 on 256 x 1536 matrices, 0.5 .. 2.1
# on the small ones of these tests (n_in = 96 has only 3 blocks per token, so few independent
# terms).  4 covers that and still fails on any real error: a wrong code, scale or offset term
# is orders of magnitude larger.  (Gaussian activations: NMSE ~2.9e-5; with the outlier
# channels of the tests ~1e-4.)
FAST_ERR_FACTOR = 4.0
# Fast path with 2..8 activation bits: the spec's integer levels are the int8 values, so only
# float32 sums (and the step s as float32) differ from the double reference (measured <= 1e-13).
FAST_EXACT_ACT_NMSE_TOL = 1e-10
# AVX2 vs portable C fast path: identical integer block dots, float32 sums in another order.
SIMD_NMSE_TOL = 1e-10

MODES_BITS = [("asym", 1), ("asym", 2), ("asym", 3), ("asym", 4),
              ("sym", 1), ("sym", 2), ("sym", 3), ("sym", 4), ("ternary", 2)]
GROUPS = [32, 64, 128, 256]
# n_out = 21 / 37: not a multiple of the 8-float SIMD width nor of the 16-row block.
N_OUT_Q = 21
N_OUT_MM = 37


def _bits16(a):
    return None if a is None else np.asarray(a).view(np.uint16)


# ---- fp16 -------------------------------------------------------------------------------------

def test_fp32_to_fp16_is_bit_exact_with_numpy():
    rng = np.random.default_rng(7)
    # random bit patterns over the whole float32 range, plus dense coverage of the exponents
    # where fp16 rounds (normal, subnormal, underflow and overflow boundaries)
    pats = rng.integers(0, 2 ** 32, size=200_000, dtype=np.uint64).astype(np.uint32)
    exps = rng.integers(100, 145, size=200_000).astype(np.uint32)      # 2^-27 .. 2^17
    dense = (exps << 23) | rng.integers(0, 2 ** 23, size=200_000).astype(np.uint32)
    dense |= rng.integers(0, 2, size=200_000).astype(np.uint32) << 31
    edges = np.array([0.0, -0.0, 65504.0, 65519.996, 65520.0, 65536.0, 1e9, np.inf, -np.inf,
                      2.0 ** -14, 2.0 ** -24, 2.0 ** -25, 2.0 ** -25 * (1 + 2 ** -23), 3 * 2.0 ** -26,
                      2.0 ** -24 * 1.5, 2.0 ** -24 * 2.5, 2.0 ** -14 * (1 - 2 ** -11),
                      1 + 2 ** -11, 1 + 3 * 2 ** -11, 1e-30, -1e-30], dtype=np.float32)
    x = np.concatenate([pats.view(np.float32), dense.view(np.float32), edges])
    x = x[~np.isnan(x)]                       # NaN payloads are not specified (checked below)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    got = K.fp32_to_fp16(x)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"{bad.size} mismatches, first: {x[bad[:5]]!r} -> {got[bad[:5]]} != {want[bad[:5]]}"
    nan16 = K.fp32_to_fp16(np.array([np.nan, -np.nan], dtype=np.float32)).view(np.float16)
    assert np.isnan(nan16).all()


def test_fp16_to_fp32_is_exact_for_every_pattern():
    h = np.arange(2 ** 16, dtype=np.uint32).astype(np.uint16)
    want = h.view(np.float16).astype(np.float32)
    got = K.fp16_to_fp32(h)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


# ---- packing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_pack_matches_numpy_and_unpacks(bits):
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 1 << bits, size=(5, 160), dtype=np.uint8)
    p = K.pack(q, bits)
    assert np.array_equal(p, quant.pack(q, bits))
    assert np.array_equal(K.unpack(p, bits, 160), q)


def test_worked_example_of_format_md():
    """docs/FORMAT.md 4.1, bytes written out there (independent of lrq.quant)."""
    w = ((np.arange(32) - 12) / 16).astype(np.float32)[None, :]
    codes, d, m = K.quantize(w, 2, 32, "asym", "minmax")
    assert codes.tobytes() == bytes.fromhex("a4a4e4e4e4e4e5e5")
    assert _bits16(d)[0, 0] == 0x392B and _bits16(m)[0, 0] == 0xBA00
    codes, d, m = K.quantize(w, 3, 32, "asym", "minmax")
    assert codes.tobytes() == bytes.fromhex("48888889 9ddddddef0f0f0f0".replace(" ", ""))
    assert _bits16(d)[0, 0] == 0x346E and _bits16(m)[0, 0] == 0xBA00


# ---- quantizer: byte-exact with lrq.quant ---------------------------------------------------------

def _awkward_weights(n_out, n_in, seed):
    """Gaussian rows plus rows that stress the edge cases of the quantizer."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_out, n_in)) * 0.05
    j = np.arange(n_in)
    w[0] = (j % 32 - 12) / 16                 # exact ties of rint (half steps)
    w[1] = 0.0                                 # d = 0 -> all codes 0
    w[2] = 0.3                                 # constant row: range 0 (asym d = 0)
    w[3] *= 1e-5 / 0.05                        # d is an fp16 subnormal
    w[4] *= 1e-9                               # d underflows to 0 in fp16
    w[5] = rng.standard_t(2, n_in) * 0.05      # heavy tails: mse search clips hard
    w[6] *= 2000.0                             # large values, still within fp16
    w[7] = np.abs(w[7])                        # one-signed rows
    w[8] = -np.abs(w[8])
    w[9, ::7] = 0.0                            # exact zeros inside a row
    return w.astype(np.float32)


def _boundary_rows(n_rows, n_in, bits, group_size, mode, seed):
    """Rows whose weights sit within a few ulps of the rounding boundaries (half steps) of their
    own minmax grid, so that any deviation from the spec's float32 steps (a reciprocal instead of
    a division, a fused multiply-add, another rounding rule) flips codes.  The extreme weights of
    each group are kept, so the group parameters stay what numpy computed (asym and sym)."""
    rng = np.random.default_rng(seed)
    qm = quant.max_code(bits, mode)
    z = np.float32(quant.zero_point(bits, mode))
    w = (rng.standard_normal((n_rows, n_in)) * 0.05).astype(np.float32)
    _, d, m = quant.quantize_codes(w, bits, group_size, mode)
    for r in range(n_rows):
        for G, s in enumerate(range(0, n_in, group_size)):
            seg = w[r, s:s + group_size]
            keep = [int(seg.argmin()), int(seg.argmax())]
            d32 = np.float32(d[r, G])
            k = rng.integers(0, qm, size=seg.size).astype(np.float32) + np.float32(0.5)
            if mode == "asym":
                v = np.float32(m[r, G]) + k * d32
            else:
                v = (k - z) * d32
            for _ in range(3):                 # move -1..+1 ulps, twice ... three times at random
                v = np.where(rng.random(v.size) < 0.5, np.nextafter(v, np.float32(np.inf)),
                             np.nextafter(v, np.float32(-np.inf))).astype(np.float32)
            v = np.clip(v, seg.min(), seg.max()) if mode == "asym" else np.clip(v, -np.abs(seg).max(), np.abs(seg).max())
            v[keep] = seg[keep]
            w[r, s:s + group_size] = v
    return w


@pytest.mark.parametrize("search", ["minmax", "mse"])
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("mode,bits", MODES_BITS)
def test_quantizer_bytes_equal_numpy(mode, bits, group_size, search):
    for n_in in (576, 96, 1536):              # 576 and 96 leave a partial last group at g >= 128 / 64
        seed = bits * 100 + group_size + n_in
        w = _awkward_weights(N_OUT_Q, n_in, seed)
        if mode != "ternary":                  # ternary's d = mean |w| moves with every weight
            w = np.concatenate([w, _boundary_rows(8, n_in, bits, group_size, mode, seed)])
        qt = quant.quantize(w, bits, group_size, mode, scale_search=search)
        codes, d, m = K.quantize(w, bits, group_size, mode, search)
        where = f"n_in={n_in}"
        assert codes.shape == qt.codes.shape and d.shape == qt.scale.shape, where
        bad = np.argwhere(codes != qt.codes)
        assert bad.size == 0, f"{where}: {len(bad)} code bytes differ, first (row, byte) {bad[:3].tolist()}"
        assert np.array_equal(_bits16(d), _bits16(qt.scale)), f"{where}: d differs in rows " \
            f"{np.flatnonzero((_bits16(d) != _bits16(qt.scale)).any(axis=1)).tolist()}"
        if mode == "asym":
            assert np.array_equal(_bits16(m), _bits16(qt.min)), f"{where}: m differs"
        else:
            assert m is None and qt.min is None


# ---- dequantization ------------------------------------------------------------------------------

def _replica(rng, n_out, n_groups, kind):
    """alpha, beta (float16) broadcast per group / per channel / per tensor; gain, bias float32."""
    shape = {"group": (n_out, n_groups), "channel": (n_out, 1), "tensor": (1, 1)}[kind]
    alpha = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float16)
    beta = (0.5 * rng.standard_normal(shape)).astype(np.float16)
    gain = (1 + 0.2 * rng.standard_normal(n_out)).astype(np.float32)
    bias = rng.standard_normal(n_out).astype(np.float32)
    return alpha, beta, gain, bias


@pytest.mark.parametrize("kind", ["none", "group", "channel", "tensor"])
@pytest.mark.parametrize("mode,bits", MODES_BITS)
def test_dequantize_equals_numpy(mode, bits, kind):
    rng = np.random.default_rng(bits + 10 * len(kind))
    for group_size, n_in in ((64, 576), (256, 576), (128, 96), (32, 96)):
        w = (rng.standard_normal((N_OUT_Q, n_in)) * 0.05).astype(np.float32)
        qt = quant.quantize(w, bits, group_size, mode)
        if kind == "none":
            alpha = beta = gain = None
            rp = None
        else:
            alpha, beta, gain, _ = _replica(rng, N_OUT_Q, qt.n_groups, kind)
            rp = quant.ReplicaParams(scale_mult=alpha, grid_offset=beta, gain=gain)
        ref = quant.dequantize(qt, rp)
        got = K.dequantize(qt.codes, qt.scale, qt.min, bits, group_size, mode, alpha=alpha, beta=beta, gain=gain)
        assert got.dtype == np.float32 and got.shape == ref.shape
        err = np.abs(got.astype(np.float64) - ref)
        assert (err <= DEQUANT_REL_TOL * np.abs(ref)).all(), \
            f"g={group_size} n_in={n_in}: max error {err.max():.3g} at {np.unravel_index(err.argmax(), err.shape)}"


# ---- mat-mul ----------------------------------------------------------------------------------------

def _mul_mat(qt, x, impl, rep, act, **kw):
    alpha, beta, gain, bias = rep
    return K.mul_mat(qt.codes, qt.scale, qt.min, qt.bits, qt.group_size, qt.mode, x, alpha=alpha, beta=beta,
                     gain=gain, bias=bias, act_clip=act[0], act_bits=act[1], impl=impl, **kw)


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("mode,bits", MODES_BITS)
def test_mul_mat_ref_and_fast_against_numpy(mode, bits, group_size):
    rng = np.random.default_rng(1000 * bits + group_size)
    kinds = ["none", "group", "channel", "tensor"]
    ratios = []
    for case, (n_in, n_tok) in enumerate(((576, 1), (576, 13), (96, 6))):
        w = (rng.standard_normal((N_OUT_MM, n_in)) * 0.05).astype(np.float32)
        qt = quant.quantize(w, bits, group_size, mode)
        x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
        x[:, ::17] *= 6.0                                # a few outlier channels: clipping matters
        for a, act in enumerate(ACT_SETTINGS):
            kind = kinds[(case + a) % len(kinds)]
            if kind == "none":
                rep, rp = (None,) * 4, None
            else:
                rep = _replica(rng, N_OUT_MM, qt.n_groups, kind)
                rp = quant.ReplicaParams(scale_mult=rep[0], grid_offset=rep[1], gain=rep[2], bias=rep[3])
            # independent reference: numpy act_r, numpy W_r, float64 matmul
            xa = quant.quantize_activations(x, *act)
            w_r = quant.dequantize(qt, rp)
            want = xa @ w_r.T
            if rp is not None:
                want = want + rep[3].astype(np.float64)
            where = f"n_in={n_in} n_tok={n_tok} act={act} replica={kind}"

            ref = _mul_mat(qt, x, "ref", rep, act)
            assert ref.shape == (n_tok, N_OUT_MM), where
            assert nmse(ref, want) <= REF_NMSE_TOL, f"ref: {where}: NMSE {nmse(ref, want):.3g}"

            fast = _mul_mat(qt, x, "fast", rep, act)
            e = nmse(fast, ref)
            if 2 <= act[1] <= 8:
                assert e <= FAST_EXACT_ACT_NMSE_TOL, f"fast: {where}: NMSE {e:.3g}"
            else:
                expected = int8_error_power(xa, w_r) / float((ref.astype(np.float64) ** 2).sum())
                ratios.append(e / expected)
                assert e <= FAST_ERR_FACTOR * expected, \
                    f"fast: {where}: NMSE {e:.3g} > {FAST_ERR_FACTOR} x {expected:.3g} (int8 rounding)"

            generic = _mul_mat(qt, x, "generic", rep, act)
            assert nmse(generic, fast) <= SIMD_NMSE_TOL, f"generic vs fast: {where}: {nmse(generic, fast):.3g}"

            # rows split as ggml splits them over threads: the halves are the whole, bit for bit
            half = 19
            for impl, whole in (("ref", ref), ("fast", fast)):
                parts = [_mul_mat(qt, x, impl, rep, act, row0=0, row1=half),
                         _mul_mat(qt, x, impl, rep, act, row0=half, row1=N_OUT_MM)]
                assert np.array_equal(np.concatenate(parts, axis=1), whole), f"{impl} row halves: {where}"
    # the int8 rounding is really there: a fast path that silently ran the reference would pass
    # the upper bounds above and leave the q8 kernels untested
    assert min(ratios) > 0.1, ratios


def test_fast_path_uses_avx2_when_the_cpu_has_it():
    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine() in ("x86_64", "AMD64") and cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    want = "avx2" if {"avx2", "fma", "f16c"} <= flags else "generic"
    # LRQ2 (both layouts) on the AVX-512 VNNI kernel (AVX512_FLAGS below: q8.c's cpu_has_avx512)
    if want == "avx2" and AVX512_FLAGS <= flags and os.environ.get("LRQ_NO_AVX512") != "1":
        want = "avx512+avx2"
    if platform.machine() in ("aarch64", "arm64"):
        want = "neon"           # baseline on aarch64, no run-time check
    assert K.info()["simd"] == want


def test_single_token_many_rows_fast_equals_generic_and_ref():
    """A wider matrix (many row blocks, 4-token blocks plus a remainder) through every impl."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((130, 1536)) * 0.02).astype(np.float32)
    qt = quant.quantize(w, 2, 64, "asym")
    for n_tok in (1, 4, 9):
        x = rng.standard_normal((n_tok, 1536)).astype(np.float32)
        rep, act = (None,) * 4, (1.0, 0)
        ref = _mul_mat(qt, x, "ref", rep, act)
        fast = _mul_mat(qt, x, "fast", rep, act)
        generic = _mul_mat(qt, x, "generic", rep, act)
        expected = int8_error_power(x.astype(np.float64), quant.dequantize(qt)) / float((ref.astype(np.float64) ** 2).sum())
        assert nmse(fast, ref) <= FAST_ERR_FACTOR * expected
        assert nmse(generic, fast) <= SIMD_NMSE_TOL
        # each token is computed independently of the others in its token block
        one = np.concatenate([_mul_mat(qt, x[t:t + 1], "fast", rep, act) for t in range(n_tok)])
        assert nmse(one, fast) <= SIMD_NMSE_TOL


# ---- argument validation -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_qt():
    w = (np.random.default_rng(3).standard_normal((10, 96)) * 0.05).astype(np.float32)
    return quant.quantize(w, 2, 64, "asym")


@pytest.mark.parametrize("change,match", [
    (dict(d=np.zeros((10, 3), np.float16)), r"d must have shape \[n_out, n_groups\] = \[10, 2\]"),
    (dict(d=np.zeros((10, 2), np.float32)), r"d must have dtype float16"),
    (dict(m=None), r"m is required for mode 'asym'"),
    (dict(alpha=np.ones((10, 3), np.float16)), r"alpha must have shape .*\[10, 2\]"),
    (dict(beta=np.ones((1, 2), np.float16)), r"beta must have shape"),
    (dict(gain=np.ones(9, np.float32)), r"gain must have shape \[n_out\] = \[10\]"),
    (dict(x=np.zeros((2, 64), np.float32)), r"x must have shape \[n_tok, n_in\] = \[n_tok, 96\]"),
    (dict(codes=np.zeros((10, 23), np.uint8)), r"codes must have shape"),
    (dict(row0=4, row1=11), r"row range \[4, 11\)"),
    (dict(act_clip=1.5), r"act_clip must be in \(0, 1\]"),
    (dict(act_bits=1), r"act_bits must be 0 \(off\) or 2..16"),
    (dict(impl="gpu"), r"impl must be"),
    (dict(mode="sym"), r"m must be None for mode 'sym'"),
])
def test_mul_mat_rejects_bad_arguments(small_qt, change, match):
    args = dict(codes=small_qt.codes, d=small_qt.scale, m=small_qt.min, bits=2, group_size=64, mode="asym",
                x=np.zeros((2, 96), np.float32))
    args.update(change)
    with pytest.raises(ValueError, match=match):
        K.mul_mat(**args)


def test_quantize_rejects_bad_arguments():
    w = np.zeros((4, 96), np.float32)
    with pytest.raises(ValueError, match="n_in = 80 is not a positive multiple of 32"):
        K.quantize(np.zeros((4, 80), np.float32), 2, 64, "asym", "minmax")
    with pytest.raises(ValueError, match="invalid quantization parameters: bits"):
        K.quantize(w, 3, 64, "ternary", "minmax")
    with pytest.raises(ValueError, match="group size"):
        K.quantize(w, 2, 48, "asym", "minmax")
    with pytest.raises(ValueError, match="scale_search must be"):
        K.quantize(w, 2, 64, "asym", "best")


# ---- the AVX-512 VNNI kernel (LRQ2, q8-avx512.c; two-level: test_kernels_two_level.py) -----------------

AVX512_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"}   # q8.c's run-time check
# A control (a wrong kernel: the two 4-byte words of each block's codes swapped, the mistake a
# transposition or word index would make) must miss SIMD_NMSE_TOL by at least this factor
# (measured >= 1e10 x the bound over the cases below); the AVX-512 kernel passes it with ~1e-13.
CONTROL_MARGIN = 1e3


def _cpu_flags() -> set:
    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine() not in ("x86_64", "AMD64") or not cpuinfo.exists():
        return set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.fixture(scope="module")
def avx512():
    """Skip where the CPU lacks AVX-512 VNNI; where it has it, the kernel must be there."""
    if not AVX512_FLAGS <= _cpu_flags():
        pytest.skip("the CPU lacks AVX-512 F/BW/VL/DQ/VNNI")
    w = np.zeros((1, 32), np.float32)
    codes, d, m = K.quantize(w, 2, 32, "asym", "minmax")
    K.mul_mat(codes, d, m, 2, 32, "asym", w, impl="avx512")   # ValueError = missing from the build


def _swap_block_words(codes: np.ndarray) -> np.ndarray:
    """LRQ2 codes with bytes 0-3 and 4-7 of every block exchanged."""
    c = codes.reshape(codes.shape[0], -1, 2, 4)
    return np.ascontiguousarray(c[:, :, ::-1, :]).reshape(codes.shape)


# n_out 37 / 21: row blocks of 16 plus a partial one; n_in 96 / 544 / 576: a last 8-block chunk
# of 3 / 1 / 2 blocks (odd block counts too); tokens in passes of 4 and 1-token passes (9 = 4 + 4 + 1);
# n_in 2080 at g = 32: 65 groups, more than the kernel's stack scratch holds (its malloc path).
AVX512_CASES = [(37, 96, 1), (21, 544, 2), (37, 576, 3), (130, 1536, 1), (37, 576, 4), (37, 96, 9), (21, 2080, 5)]


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("mode", ["asym", "sym", "ternary"])
def test_avx512_kernel_equals_generic(avx512, mode, group_size):
    rng = np.random.default_rng(7 * group_size + len(mode))
    kinds = ["none", "group", "channel", "tensor"]
    for case, (n_out, n_in, n_tok) in enumerate(AVX512_CASES):
        w = (rng.standard_normal((n_out, n_in)) * 0.05).astype(np.float32)
        qt = quant.quantize(w, 2, group_size, mode)
        x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
        x[:, ::17] *= 6.0
        for a, act in enumerate(ACT_SETTINGS[:3]):
            kind = kinds[(case + a) % len(kinds)]
            rep = (None,) * 4 if kind == "none" else _replica(rng, n_out, qt.n_groups, kind)
            where = f"{n_out}x{n_in} n_tok={n_tok} act={act} replica={kind}"
            generic = _mul_mat(qt, x, "generic", rep, act)
            simd = _mul_mat(qt, x, "avx512", rep, act)
            e = nmse(simd, generic)
            assert e <= SIMD_NMSE_TOL, f"avx512 vs generic: {where}: {e:.3g}"
            # lrq_mul_mat_q8 dispatches LRQ2 to this kernel on this CPU
            assert np.array_equal(_mul_mat(qt, x, "fast", rep, act), simd), where
            # rows split anywhere (ggml's threads) give the same bits
            for half in (5, 19):
                parts = [_mul_mat(qt, x, "avx512", rep, act, row0=0, row1=half),
                         _mul_mat(qt, x, "avx512", rep, act, row0=half, row1=n_out)]
                assert np.array_equal(np.concatenate(parts, axis=1), simd), f"row split at {half}: {where}"
            # control: the bound catches a kernel that reads a block's code words in the wrong order
            wrong = K.mul_mat(_swap_block_words(qt.codes), qt.scale, qt.min, 2, group_size, mode, x,
                              alpha=rep[0], beta=rep[1], gain=rep[2], bias=rep[3], act_clip=act[0],
                              act_bits=act[1], impl="generic")
            assert nmse(wrong, generic) > CONTROL_MARGIN * SIMD_NMSE_TOL, f"control: {where}"


# (replicas, tokens, members that read member 0's input): the slot passes of 4 (2 x 2, 3 x 3 =
# 4 + 4 + 1, 4 x 1) and a lone replica; shared inputs as a parallel group's q / k / v and gate / up
# have them (lrq_act_q8_share: the dots once), also across the passes of 3 x 3
MULTI_CASES = [(2, 1, ()), (3, 1, (2,)), (2, 2, (1,)), (3, 3, (1, 2)), (4, 1, (1, 3)), (1, 5, ())]


@pytest.mark.parametrize("mode,bits", [("asym", 2), ("sym", 2), ("ternary", 2), ("asym", 3)])
def test_multi_replica_call_equals_one_replica_at_a_time(mode, bits):
    """lrq_mul_mat_q8_multi (the members of a parallel group in one pass over the codes; the
    AVX-512 kernel shares each block's load, transpose and unpack among them, other layouts run the
    members in turn) gives every member the bits lrq_mul_mat_q8 gives it alone: each member has its
    own activations, act clip / bits, alpha / beta, gain / bias.  Members that read one input
    (equal activations and act settings) share their integer dots.  A pass that mixed the members'
    factors or activations up would differ (the control below: the members' parameters swapped)."""
    rng = np.random.default_rng(31 * bits + len(mode))
    kinds = ["none", "group", "channel", "tensor"]
    for case, (n_rep, n_tok, same_input) in enumerate(MULTI_CASES):
        n_out, n_in, g = (37, 576, 64) if case % 2 else (21, 2080, 32)   # (2080, 32): the kernel's malloc path
        qt = quant.quantize((rng.standard_normal((n_out, n_in)) * 0.05).astype(np.float32), bits, g, mode)
        xs = [rng.standard_normal((n_tok, n_in)).astype(np.float32) for _ in range(n_rep)]
        for j in same_input:
            xs[j] = xs[0].copy()
        reps = []
        for j in range(n_rep):
            kind = kinds[(case + j) % len(kinds)]
            act = ACT_SETTINGS[0 if j in same_input or (j == 0 and same_input) else (case + j) % 3]
            r = {"act_clip": act[0], "act_bits": act[1]}
            if kind != "none":
                r.update(zip(("alpha", "beta", "gain", "bias"), _replica(rng, n_out, qt.n_groups, kind)))
            reps.append(r)
        where = f"{n_rep} replicas x {n_tok} tokens, {n_out}x{n_in} g{g}"
        fused = K.mul_mat_multi(qt.codes, qt.scale, qt.min, bits, g, mode, xs, reps)
        alone = [_mul_mat(qt, x, "fast", tuple(r.get(k) for k in ("alpha", "beta", "gain", "bias")),
                          (r["act_clip"], r["act_bits"])) for x, r in zip(xs, reps)]
        for j in range(n_rep):
            assert np.array_equal(fused[j], alone[j]), f"member {j}: {where}"
        if n_rep > 1:   # control: the members' parameters swapped
            swapped = K.mul_mat_multi(qt.codes, qt.scale, qt.min, bits, g, mode, xs, reps[1:] + reps[:1])
            assert not np.array_equal(swapped[0], alone[0]), f"control: {where}"


def test_multi_replica_call_rejects_bad_arguments(small_qt):
    qt = small_qt
    x = np.zeros((2, qt.n_in), np.float32)
    call = lambda xs, reps: K.mul_mat_multi(qt.codes, qt.scale, qt.min, qt.bits, qt.group_size, qt.mode, xs, reps)  # noqa: E731
    with pytest.raises(ValueError, match="one length"):
        call([x, x], [{}])
    with pytest.raises(ValueError, match="unknown key 'gian'"):
        call([x], [{"gian": None}])
    with pytest.raises(ValueError, match=r"xs\[1\]"):
        call([x, x[:1]], [{}, {}])
    with pytest.raises(ValueError, match="act_clip"):
        call([x], [{"act_clip": 0.0}])


def test_avx512_kernel_refuses_other_layouts(avx512):
    w = (np.random.default_rng(2).standard_normal((4, 64)) * 0.05).astype(np.float32)
    x = np.ones((1, 64), np.float32)
    codes, d, m = K.quantize(w, 4, 64, "asym", "minmax")
    with pytest.raises(ValueError):
        K.mul_mat(codes, d, m, 4, 64, "asym", x, impl="avx512")


# ---- int8 activations (lrq_quantize_act_q8; AVX2 code without clip / act_bits) -----------------------

def _act_q8_numpy(x: np.ndarray, group_size: int, half_away: bool = False):
    """The q8 scheme of lrq-kernels.h in float32 numpy: per block of 32 amax, dx = amax / 127,
    xq = round_half_even(x * (127 / amax)) clamped to +-127; Sx per group summed block by block
    in index order (float32, as the C code)."""
    xb = x.astype(np.float32).reshape(x.shape[0], -1, 32)
    amax = np.abs(xb).max(axis=-1)
    with np.errstate(divide="ignore"):
        idv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    v = xb * idv[..., None]
    v = np.sign(v) * np.floor(np.abs(v) + np.float32(0.5)) if half_away else np.rint(v)
    qs = np.clip(v, -127, 127).astype(np.int8).reshape(x.shape)
    dx = (amax / np.float32(127)).astype(np.float32)
    n_in = x.shape[1]
    ng = -(-n_in // group_size)
    sx = np.zeros((x.shape[0], ng), np.float32)
    for t in range(x.shape[0]):
        for G in range(ng):
            i0, i1 = G * group_size, min((G + 1) * group_size, n_in)
            acc = np.float32(0)
            for b in range(i0 // 32, -(-i1 // 32)):
                j0, j1 = max(b * 32, i0), min((b + 1) * 32, i1)
                acc = np.float32(acc + dx[t, b] * np.float32(int(qs[t, j0:j1].astype(np.int64).sum())))
            sx[t, G] = acc
    return qs, dx, sx


@pytest.mark.parametrize("group_size", [16, 32, 64, 256])
def test_quantize_act_q8_equals_numpy(group_size):
    rng = np.random.default_rng(group_size)
    x = rng.standard_normal((5, 544)).astype(np.float32)
    x[:, ::17] *= 6.0
    x[1, 32:64] = 0.0                                         # an all-zero block: dx = 0, codes 0
    # exact ties: amax 127, so x * (127 / amax) = x and k + 0.5 rounds to the even neighbour
    x[2, 64:96] = np.arange(32, dtype=np.float32) - 15.5
    x[2, 64] = 127.0
    qs, dx, sx = K.quantize_act_q8(x, group_size)
    want_qs, want_dx, want_sx = _act_q8_numpy(x, group_size)
    assert np.array_equal(qs, want_qs)
    assert np.array_equal(dx, want_dx)
    assert np.array_equal(sx, want_sx)
    # control: rounding half away from zero differs on the ties (the comparison is byte-exact)
    assert not np.array_equal(qs, _act_q8_numpy(x, group_size, half_away=True)[0])
    # act_clip < 1 takes the other (scalar) code, and the clip reaches it
    assert not np.array_equal(K.quantize_act_q8(x, group_size, 0.75, 0)[0], qs)
