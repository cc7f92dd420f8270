"""A two-level asymmetric 2-bit layout (numpy): 4-bit sub-block scales and mins under an fp16
super-scale and super-min, as llama.cpp's Q2_K, for any row width (issue 12, item 3).

A row of n weights (n a multiple of 32) is cut into super-blocks of S weights (S = 256 by
default; the last one is shorter when S does not divide n, e.g. 576 = 256 + 256 + 64), each
super-block into sub-blocks of B weights (16 or 32). Per super-block: fp16 ``d`` and ``dmin``;
per sub-block: a 4-bit scale index ``sc`` and a 4-bit min index ``mn``; per weight: a 2-bit
code ``q``. The weight is

    w = d * sc * q - dmin * mn          (d_sub = d * sc, m_sub = dmin * mn, as in Q2_K)

so every sub-block's range contains zero or lies below it (its "min" is <= 0).

Storage per row (the byte count a kernel would read; the code packing is the kernel's choice)::

    bits(n) = 2 n + 8 n / B + 32 ceil(n / S)
    bpw(n)  = 2 + 8 / B + 32 ceil(n / S) / n

S=256, B=16: 2.625 bpw on rows of 256k (exactly Q2_K's 84 bytes per 256); 576-wide rows
(three super-blocks): 2.6667. S=256, B=32: 2.375 (2.4167 at 576). lrq's fp16-scale asym groups
of g cost 2 + 32 / g (g32 3.0, g64 2.5, g128 2.25).

Parameter search: a port of ggml's ``quantize_row_q2_K_impl`` (the importance-matrix path of
llama.cpp's Q2_K) in IEEE float32 with every sum accumulated in index order, as the C code does,
so that on 256-wide super-blocks with 16-wide sub-blocks it gives llama.cpp's own Q2_K bytes:

1. per super-block, sigma2 = sum(x^2) / L and per-weight weights
   ``imp_i * sqrt(sigma2 + x_i^2)`` (imp = E[x_i^2] of input channel i; 1 without statistics);
2. per sub-block, ``make_qkx3_quants`` (nmax 3): start from the min/max grid (min clamped to
   <= 0), then 37 candidate inverse scales (3 - 0.9 + 0.05 k) / (max - min), each with a weighted
   least-squares (scale, min) refit on its codes; keep the lowest weighted squared error;
3. per super-block, ``make_qp_quants`` (nmax 15) on the sub-block scales and on the sub-block
   mins (weights: each sub-block's sum of weights): the 4-bit indices and the fp16 d / dmin
   (9 candidate scales, then up to 5 rounds of coordinate descent on the indices);
4. the codes are recomputed on the stored grid: q = clamp(rint((x + dmin mn) / (d sc)), 0, 3).

The only departure from the C code: a negative sub-block scale (a least-squares refit can in
principle produce one) is clamped to index 0 instead of being stored as a wrapped byte.

    >>> t = quantize(w, importance=imp)                    # doctest: +SKIP
    >>> w_hat = dequantize(t)                               # float64 [n_out, n_in]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .constants import LRQ_BLOCK

__all__ = ["TwoLevelTensor", "TwoLevelError", "quantize", "dequantize", "row_bits", "bpw",
           "SUPER_SIZE", "SUB_SIZES", "QKX3_RMIN", "QKX3_RDELTA", "QKX3_NSTEP", "QP_TRIES"]

SUPER_SIZE = 256
SUB_SIZES = (16, 32)
CODE_MAX = 3          # 2-bit codes
INDEX_MAX = 15        # 4-bit sub-block scale / min indices
# make_qkx3_quants' candidate grid as quantize_row_q2_K_impl calls it: iscale =
# (nmax + RMIN + RDELTA k) / (max - min), k = 0 .. NSTEP
QKX3_RMIN = np.float32(-0.9)
QKX3_RDELTA = np.float32(0.05)
QKX3_NSTEP = 36
# make_qp_quants: candidate inverse scales (nmax + 0.1 k) / max, k = -4..4, then at most this
# many rounds of coordinate descent on the indices
QP_TRIES = 5
GROUP_MAX_EPS = np.float32(1e-15)   # ggml: a super-block whose sub-scales are all below is zero


class TwoLevelError(ValueError):
    """Bad arguments to the two-level quantizer (sizes, shapes, values)."""


@dataclass
class TwoLevelTensor:
    """One quantized weight in the two-level layout (unpacked)."""

    codes: np.ndarray      # uint8 [n_out, n_in], 0..3
    sc: np.ndarray         # uint8 [n_out, n_sub], 0..15
    mn: np.ndarray         # uint8 [n_out, n_sub], 0..15
    d: np.ndarray          # float16 [n_out, n_super]
    dmin: np.ndarray       # float16 [n_out, n_super]
    super_size: int
    sub_size: int

    @property
    def n_out(self) -> int:
        return int(self.codes.shape[0])

    @property
    def n_in(self) -> int:
        return int(self.codes.shape[1])

    @property
    def bpw(self) -> float:
        return bpw(self.n_in, self.super_size, self.sub_size)


def _check_sizes(n_in: int, super_size: int, sub_size: int) -> None:
    if sub_size not in SUB_SIZES:
        raise TwoLevelError(f"sub-block size must be one of {SUB_SIZES}, got {sub_size}")
    if super_size <= 0 or super_size % sub_size or super_size // sub_size > 256:
        raise TwoLevelError(f"super-block size must be a multiple of the sub-block size {sub_size} "
                            f"(at most 256 sub-blocks), got {super_size}")
    if n_in <= 0 or n_in % LRQ_BLOCK:
        raise TwoLevelError(f"n_in = {n_in} is not a positive multiple of {LRQ_BLOCK}")


def row_bits(n_in: int, super_size: int = SUPER_SIZE, sub_size: int = 16) -> int:
    """Bits of one row: 2 per code, 8 per sub-block (sc, mn), 32 per super-block (d, dmin)."""
    _check_sizes(n_in, super_size, sub_size)
    return 2 * n_in + 8 * (n_in // sub_size) + 32 * (-(-n_in // super_size))


def bpw(n_in: int, super_size: int = SUPER_SIZE, sub_size: int = 16) -> float:
    return row_bits(n_in, super_size, sub_size) / n_in


# ---- ggml's helpers, float32 ----------------------------------------------------------------

def _rint(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int (round half to even for |v| < 2^22) as float32."""
    return np.rint(v).astype(np.float32)


def _seq(a: np.ndarray) -> np.ndarray:
    """float32 sum over the last axis in index order (np.cumsum accumulates sequentially)."""
    return np.cumsum(a, axis=-1, dtype=np.float32)[..., -1]


def _make_qkx3(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx3_quants(n, 3, x, w, L, &the_min, Laux, -0.9, 0.05, 36, false) on every row of
    x, w [N, n] float32 -> (scale [N], the_min [N] (>= 0), L [N, n] float32 codes)."""
    f = np.float32
    nmax = f(CODE_MAX)
    mn = np.minimum(x.min(axis=-1), f(0))
    mx = x.max(axis=-1)
    sum_w = _seq(w)
    sum_x = _seq(w * x)
    flat = ~(mx > mn)                                  # max <= min: all codes 0, scale 0
    rng = np.where(flat, f(1), mx - mn)
    iscale = nmax / rng
    scale = f(1) / iscale
    L = np.clip(_rint(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    diff = scale[:, None] * L + mn[:, None] - x
    best = _seq(w * (diff * diff))
    for k in range(QKX3_NSTEP + 1):
        # as in ggml, a better candidate's min moves the range of every later candidate
        rng = np.where(flat, f(1), mx - mn)
        iscale = (QKX3_RMIN + QKX3_RDELTA * f(k) + nmax) / rng
        La = np.clip(_rint(iscale[:, None] * (x - mn[:, None])), 0, nmax)
        wl = w * La
        sum_l = _seq(wl)
        sum_l2 = _seq(wl * La)
        sum_xl = _seq(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = np.where(ok, D, f(1))
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
            pos = this_min > 0
            this_min = np.where(pos, f(0), this_min)
            this_scale = np.where(pos, sum_xl / np.where(sum_l2 > 0, sum_l2, f(1)), this_scale)
            diff = this_scale[:, None] * La + this_min[:, None] - x
            mad = _seq(w * (diff * diff))
        better = ok & (mad < best) & ~flat
        L = np.where(better[:, None], La, L)
        best = np.where(better, mad, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    L = np.where(flat[:, None], f(0), L)
    scale = np.where(flat, f(0), scale)
    return scale.astype(np.float32), (-mn).astype(np.float32), L


def _make_qp(x: np.ndarray, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qp_quants(n, 15, x, L, qw) on every row of x, qw [N, n] float32 (x >= 0)
    -> (scale [N] float32, L [N, n] float32 indices)."""
    f = np.float32
    nmax = f(INDEX_MAX)
    mx = np.maximum(x.max(axis=-1), f(0))
    zero = mx < GROUP_MAX_EPS
    safe = np.where(zero, f(1), mx)
    iscale = nmax / safe
    L = _rint(iscale[:, None] * x)
    scale = f(1) / iscale
    diff = x - scale[:, None] * L
    best = _seq((qw * diff) * diff)
    for k in range(-4, 5):
        if k == 0:
            continue
        isc = (f(0.1) * f(k) + nmax) / safe
        sc = f(1) / isc
        l = np.minimum(nmax, _rint(isc[:, None] * x))
        diff = x - sc[:, None] * l
        mse = _seq((qw * diff) * diff)
        better = mse < best
        best = np.where(better, mse, best)
        iscale = np.where(better, isc, iscale)
    L = np.minimum(nmax, _rint(iscale[:, None] * x))
    sumlx = _seq((qw * x) * L)
    suml2 = _seq((qw * L) * L)
    active = ~zero
    for _ in range(QP_TRIES):
        changed = np.zeros_like(active)
        for i in range(x.shape[1]):
            w, xi, li = qw[:, i], x[:, i], L[:, i]
            slx = sumlx - (w * xi) * li
            sl2 = suml2 - (w * li) * li
            go = active & (slx > 0) & (sl2 > 0)
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                new_l = np.minimum(nmax, _rint((xi * sl2) / np.where(go, slx, f(1))))
                go &= new_l != li
                slx = slx + (w * xi) * new_l
                sl2 = sl2 + (w * new_l) * new_l
                go &= (slx * slx) * suml2 > (sumlx * sumlx) * sl2
            L[:, i] = np.where(go, new_l, li)
            sumlx = np.where(go, slx, sumlx)
            suml2 = np.where(go, sl2, suml2)
            changed |= go
        active &= changed                              # a row stops once a round changes nothing
        if not active.any():
            break
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, f(1)), f(0))
    L = np.where(zero[:, None], f(0), L)
    return np.where(zero, f(0), s).astype(np.float32), L


def _quantize_supers(x: np.ndarray, imp: np.ndarray, sub: int):
    """Super-blocks x [N, L] (float32), importance imp [N, L] -> codes, sc, mn, d16, dmin16."""
    f = np.float32
    N, L = x.shape
    ns = L // sub
    sigma2 = _seq(x * x) / f(L)
    weight = imp * np.sqrt(sigma2[:, None] + x * x)
    xs = x.reshape(N * ns, sub)
    ws = weight.reshape(N * ns, sub)
    sw = _seq(ws).reshape(N, ns)
    scales, mins, codes = _make_qkx3(xs, ws)
    scales = np.maximum(scales, f(0))                  # see the module doc: never a wrapped index
    dm, Ls = _make_qp(scales.reshape(N, ns), sw)
    mm, Lm = _make_qp(mins.reshape(N, ns), sw)
    d16, dmin16 = dm.astype(np.float16), mm.astype(np.float16)
    d_sub = d16.astype(np.float32)[:, None] * Ls                        # [N, ns]
    m_sub = dmin16.astype(np.float32)[:, None] * Lm
    codes = codes.reshape(N, ns, sub)
    xr = x.reshape(N, ns, sub)
    nz = d_sub != 0                                    # d_sub == 0: ggml keeps the search's codes
    with np.errstate(divide="ignore", invalid="ignore"):
        req = np.clip(_rint((xr + m_sub[..., None]) / np.where(nz, d_sub, f(1))[..., None]), 0, CODE_MAX)
    codes = np.where(nz[..., None], req, codes)
    return (codes.reshape(N, L).astype(np.uint8), Ls.astype(np.uint8), Lm.astype(np.uint8), d16, dmin16)


def quantize(w: np.ndarray, importance: np.ndarray | None = None, *, super_size: int = SUPER_SIZE,
             sub_size: int = 16) -> TwoLevelTensor:
    """Quantize w [n_out, n_in] (float) with per-input-channel importance E[x^2] [n_in]
    (None: uniform) into the two-level layout (module doc)."""
    w = np.asarray(w)
    if w.ndim != 2:
        raise TwoLevelError(f"expected a 2-D weight [n_out, n_in], got shape {w.shape}")
    n_out, n_in = w.shape
    _check_sizes(n_in, super_size, sub_size)
    w = w.astype(np.float32, copy=False)
    if not np.isfinite(w).all():
        raise TwoLevelError("the weight contains NaN or infinite values")
    if importance is None:
        imp = np.ones(n_in, dtype=np.float32)
    else:
        imp = np.asarray(importance, dtype=np.float32).reshape(-1)
        if imp.shape != (n_in,):
            raise TwoLevelError(f"importance has {imp.size} values for n_in = {n_in}")
        if not np.isfinite(imp).all() or (imp < 0).any():
            raise TwoLevelError("importance must be finite and >= 0")
    parts = []
    n_full = n_in // super_size
    if n_full:
        x = w[:, :n_full * super_size].reshape(n_out * n_full, super_size)
        im = np.broadcast_to(imp[:n_full * super_size].reshape(1, n_full, super_size),
                             (n_out, n_full, super_size)).reshape(n_out * n_full, super_size)
        parts.append((n_full, _quantize_supers(x, im, sub_size)))
    tail = n_in - n_full * super_size
    if tail:        # the shorter last super-block: the same rules over its `tail` weights
        x = np.ascontiguousarray(w[:, n_full * super_size:])
        im = np.broadcast_to(imp[n_full * super_size:], (n_out, tail))
        parts.append((1, _quantize_supers(x, np.ascontiguousarray(im), sub_size)))
    out = [[], [], [], [], []]
    for _, res in parts:
        for k, a in enumerate(res):
            out[k].append(a.reshape(n_out, -1))      # rows are super-block-major within a row
    codes, sc, mn, d, dmin = (np.concatenate(o, axis=1) for o in out)
    return TwoLevelTensor(codes, sc, mn, d, dmin, super_size, sub_size)


def dequantize(t: TwoLevelTensor) -> np.ndarray:
    """float64 [n_out, n_in]: w = d sc q - dmin mn."""
    n_in = t.n_in
    sub_of = np.arange(n_in) // t.sub_size
    sup_of = np.arange(n_in) // t.super_size
    d = t.d.astype(np.float64)[:, sup_of] * t.sc.astype(np.float64)[:, sub_of]
    m = t.dmin.astype(np.float64)[:, sup_of] * t.mn.astype(np.float64)[:, sub_of]
    return d * t.codes.astype(np.float64) - m


# ---- GPTQ on the two-level grid -------------------------------------------------------------

GPTQ_BLOCK = 128    # columns updated lazily as one block (the paper's 128)


def gptq_quantize(w: np.ndarray, hessian: np.ndarray, importance: np.ndarray | None = None, *,
                  damp: float = 0.1, super_size: int = SUPER_SIZE, sub_size: int = 16,
                  block: int = GPTQ_BLOCK, base: TwoLevelTensor | None = None) -> TwoLevelTensor:
    """GPTQ (Frantar et al. 2022) on the two-level grid: every parameter (d, dmin, sc, mn) is
    fixed first by ``quantize`` on the original weights (``importance``: default diag(hessian)),
    then columns are rounded left to right onto their sub-block's grid and each column's error
    is spread over the later columns through the inverse Hessian's Cholesky factor, as
    lrq.calib.gptq does with static groups.  ``hessian``: X^T X of the layer's input (any
    positive scale); ``damp``: lambda = damp * mean(diag(H)) added to its diagonal.  ``base``: the
    result of that ``quantize`` call when the caller has it already (e.g. from the C port, which
    gives the same bytes); its parameters are kept."""
    w = np.asarray(w)
    if base is not None:
        if base.codes.shape != w.shape or (base.super_size, base.sub_size) != (super_size, sub_size):
            raise TwoLevelError(f"base is {base.codes.shape} S={base.super_size} B={base.sub_size}, the weight "
                                f"{w.shape} S={super_size} B={sub_size}")
        t = base
    else:
        t = quantize(w, np.diag(np.asarray(hessian, dtype=np.float64)) if importance is None else importance,
                     super_size=super_size, sub_size=sub_size)
    n_out, n_in = t.codes.shape
    H = np.array(hessian, dtype=np.float64)
    if H.shape != (n_in, n_in):
        raise TwoLevelError(f"Hessian shape {H.shape} does not match n_in = {n_in}")
    if not np.isfinite(H).all():
        raise TwoLevelError("the Hessian contains NaN or infinite values")
    if not (damp > 0 and np.isfinite(damp)):
        raise TwoLevelError(f"GPTQ dampening must be > 0, got {damp}")
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    H[np.diag_indices(n_in)] += damp * float(np.mean(np.diag(H)))
    try:
        Lc = np.linalg.cholesky(H)
        Linv = np.linalg.inv(Lc)
        U = np.linalg.cholesky(Linv.T @ Linv).T                 # H^-1 = U^T U, U upper
    except np.linalg.LinAlgError as e:
        raise TwoLevelError(f"the dampened Hessian is not positive definite ({e})") from None
    sub_of = np.arange(n_in) // sub_size
    sup_of = np.arange(n_in) // super_size
    # the float32 grid of the requantization step and its float64 dequantization
    D32 = t.d.astype(np.float32)[:, sup_of] * t.sc.astype(np.float32)[:, sub_of]
    M32 = t.dmin.astype(np.float32)[:, sup_of] * t.mn.astype(np.float32)[:, sub_of]
    D64 = t.d.astype(np.float64)[:, sup_of] * t.sc.astype(np.float64)[:, sub_of]
    M64 = t.dmin.astype(np.float64)[:, sup_of] * t.mn.astype(np.float64)[:, sub_of]
    codes = t.codes.copy()
    W = w.astype(np.float64)
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        W1 = W[:, i1:i2].copy()
        E1 = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            nz = D32[:, c] != 0                                # d_sub == 0: every code gives -m
            x = W1[:, i].astype(np.float32)
            with np.errstate(divide="ignore", invalid="ignore"):
                q = np.clip(np.rint((x + M32[:, c]) / np.where(nz, D32[:, c], 1)), 0, CODE_MAX)
            codes[:, c] = np.where(nz, q, codes[:, c]).astype(np.uint8)
            err = (W1[:, i] - (D64[:, c] * codes[:, c] - M64[:, c])) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return TwoLevelTensor(codes, t.sc, t.mn, t.d, t.dmin, super_size, sub_size)


__all__ += ["gptq_quantize", "GPTQ_BLOCK"]


# ---- the file layout (format v4, docs/two_level.md) ------------------------------------------
#
# In an LRQ file a two-level weight is an LRQ2 code tensor (the planar 2-bit blocks of every LRQ2
# weight), <w>.lrq_scale = d and <w>.lrq_min = dmin (F16 [n_out, n_super], the super-block being
# the file's group size) and <w>.lrq_sub (I8 [n_out, n_in / B]) whose byte k is sc_k | mn_k << 4.
# So it is an asym 2-bit weight with groups of B whose (d, m) are (d sc, -dmin mn).

def sub_bytes(t: TwoLevelTensor) -> np.ndarray:
    """int8 [n_out, n_sub]: low nibble the scale index, high nibble the min index."""
    return (t.sc.astype(np.uint8) | (t.mn.astype(np.uint8) << 4)).view(np.int8)


def split_sub(sub: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sc, mn) uint8 from the int8 (or uint8) bytes of a .lrq_sub tensor."""
    u = np.asarray(sub).view(np.uint8) if np.asarray(sub).dtype == np.int8 else np.asarray(sub, np.uint8)
    return u & 15, u >> 4


def sub_size_of(n_in: int, n_sub: int) -> int | None:
    """B from the shapes (n_in / n_sub), None when that is not one of SUB_SIZES."""
    if n_sub <= 0 or n_in % n_sub or n_in // n_sub not in SUB_SIZES:
        return None
    return n_in // n_sub


def to_file(t: TwoLevelTensor):
    """(LRQ2 codes uint8 [n_out, n_in / 4], d, dmin float16 [n_out, n_super], sub int8 [n_out, n_sub])."""
    from .quant import pack
    return pack(t.codes, 2), t.d, t.dmin, sub_bytes(t)


def from_file(codes: np.ndarray, d: np.ndarray, dmin: np.ndarray, sub: np.ndarray, n_in: int,
              super_size: int) -> TwoLevelTensor:
    """The inverse of to_file (packed codes [n_out, n_in / 4])."""
    from .quant import unpack
    sub = np.asarray(sub)
    n_out = sub.shape[0]
    B = sub_size_of(n_in, sub.shape[1])
    if B is None:
        raise TwoLevelError(f"{sub.shape[1]} sub-blocks per row of {n_in}: the sub-block size must be one of {SUB_SIZES}")
    sc, mn = split_sub(sub)
    q = unpack(np.asarray(codes, np.uint8).reshape(n_out, -1), 2, n_in)
    return TwoLevelTensor(q, sc, mn, np.asarray(d, np.float16).reshape(n_out, -1),
                          np.asarray(dmin, np.float16).reshape(n_out, -1), super_size, B)


def dequantize_replica(t: TwoLevelTensor, replica=None) -> np.ndarray:
    """float64 W_r = gamma * (alpha * (d sc) * (q + beta) + (-(dmin mn))): FORMAT.md section 6 with
    the sub-block's (d, m); alpha and beta per super-block ([n_out, n_super] | [n_out, 1] |
    [1, 1]).  Evaluated in lrq.quant.dequantize_codes' order (the C reference's)."""
    from .quant import ReplicaParams, _expand
    n_out, n_in = t.codes.shape
    S = t.super_size
    sub_of = np.arange(n_in) // t.sub_size
    d = _expand(t.d, n_out, n_in, S, "scale") * t.sc.astype(np.float64)[:, sub_of]
    m = -(_expand(t.dmin, n_out, n_in, S, "min") * t.mn.astype(np.float64)[:, sub_of])
    rp = replica or ReplicaParams()
    beta = _expand(rp.grid_offset, n_out, n_in, S, "grid_offset")
    alpha = _expand(rp.scale_mult, n_out, n_in, S, "scale_mult")
    level = t.codes.astype(np.float64)
    w = d * (level + beta) if beta is not None else d * level
    if alpha is not None:
        w = alpha * w
    w = w + m
    if rp.gain is not None:
        w = np.asarray(rp.gain, dtype=np.float64).reshape(n_out, 1) * w
    return w


__all__ += ["sub_bytes", "split_sub", "sub_size_of", "to_file", "from_file", "dequantize_replica"]
