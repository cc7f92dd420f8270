"""Reference quantizer of the LRQ format (numpy), exactly as docs/FORMAT.md specifies it.

A C quantizer is compared with this one byte for byte, so every step that decides a code is
spelled out in IEEE float32 (parameters rounded to fp16 before the codes are computed, true
divisions, round-half-to-even = numpy.rint = C nearbyintf) and every sum that decides a
parameter is accumulated in float64 in index order (np.cumsum is sequential; np.sum is not).

    >>> qt = quantize(w, bits=2, group_size=64, mode="asym")          # doctest: +SKIP
    >>> w_hat = dequantize(qt)                                          # float64 [n_out, n_in]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .constants import ACT_BITS_MAX, BITS_CHOICES, GROUP_SIZES, LRQ_BLOCK, MODES, TERNARY_BITS

__all__ = ["QuantizedTensor", "ReplicaParams", "quantize", "quantize_codes", "dequantize",
           "dequantize_codes", "dequantize_torch", "pack", "unpack", "row_bytes", "n_groups",
           "group_index", "zero_point", "max_code", "quantize_activations",
           "quantize_activations_torch", "mse_shrink_factors", "QuantError"]

# MSE scale search: candidate k shrinks the group's range by s_k = 1 - MSE_STEP * k.
# 20 candidates (1.0 .. 0.525) cover the clipping optimum of 2..4-bit groups of Gaussian-like
# weights; ternary's optimum (d ~ 0.5 amax) lies lower, so it searches further (1.0 .. 0.125).
MSE_STEP = 0.025
MSE_STEPS = 20
MSE_STEPS_TERNARY = 36


class QuantError(ValueError):
    """Bad arguments to the quantizer (bits, group size, mode, shapes, values)."""


def mse_shrink_factors(mode: str) -> np.ndarray:
    """float32 shrink factors s_k = (float)(1.0 - MSE_STEP * k), k = 0 .. steps-1."""
    steps = MSE_STEPS_TERNARY if mode == "ternary" else MSE_STEPS
    return np.array([1.0 - MSE_STEP * k for k in range(steps)], dtype=np.float64).astype(np.float32)


def zero_point(bits: int, mode: str) -> float:
    """z of level(q) = q - z."""
    if mode == "asym":
        return 0.0
    if mode == "sym":
        return ((1 << bits) - 1) / 2.0
    if mode == "ternary":
        return 1.0
    raise QuantError(f"unknown mode '{mode}'; known: {', '.join(MODES)}")


def max_code(bits: int, mode: str) -> int:
    return 2 if mode == "ternary" else (1 << bits) - 1


def n_groups(n_in: int, group_size: int) -> int:
    return -(-n_in // group_size)


def group_index(n_in: int, group_size: int) -> np.ndarray:
    """Group of every input column: i // g (the last group may be shorter)."""
    return np.arange(n_in) // group_size


def row_bytes(n_in: int, bits: int) -> int:
    return n_in // LRQ_BLOCK * 4 * bits


def _check(bits: int, group_size: int, mode: str) -> None:
    if mode not in MODES:
        raise QuantError(f"unknown mode '{mode}'; known: {', '.join(MODES)}")
    if bits not in BITS_CHOICES:
        raise QuantError(f"bits must be one of {BITS_CHOICES}, got {bits}")
    if mode == "ternary" and bits != TERNARY_BITS:
        raise QuantError(f"ternary codes are stored with {TERNARY_BITS} bits, got bits={bits}")
    if group_size not in GROUP_SIZES:
        raise QuantError(f"group size must be one of {GROUP_SIZES}, got {group_size}")


@dataclass
class QuantizedTensor:
    """One quantized weight: planar codes plus its per-group base parameters."""

    codes: np.ndarray            # uint8 [n_out, row_bytes(n_in, bits)]
    scale: np.ndarray            # float16 [n_out, n_groups]: d
    min: np.ndarray | None       # float16 [n_out, n_groups]: m (asym), None otherwise
    bits: int
    group_size: int
    mode: str
    n_in: int

    @property
    def n_out(self) -> int:
        return int(self.codes.shape[0])

    @property
    def n_groups(self) -> int:
        return n_groups(self.n_in, self.group_size)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes + (self.min.nbytes if self.min is not None else 0)


@dataclass
class ReplicaParams:
    """Parameters of replica r of a weight (docs/FORMAT.md "Per-replica parameters").

    None means the default (alpha 1, beta 0, gain 1, bias 0, no low-rank term).  ``gain_folded``
    is True when a matrix handed out with these params already includes the gain
    (LRQModelFile.weight does that): the caller must then not multiply by ``gain`` again.
    ``lr_u`` / ``lr_v`` (format v3) add U (V x) to the output, x the linear's input before any
    clip; the gain does not scale that term (docs/FORMAT.md section 6.2).
    """

    scale_mult: np.ndarray | None = None    # alpha: [n_out, n_groups] | [n_out, 1] | [1, 1]
    grid_offset: np.ndarray | None = None   # beta (code units), same shapes
    gain: np.ndarray | None = None          # gamma: [n_out]
    bias: np.ndarray | None = None          # [n_out], added after the matmul
    act_clip: float = 1.0                   # c in (0, 1]
    act_bits: int = 0                       # k: 0 = off, 2..16
    clip: float = float("inf")              # stock-typed weights: clamp(x, -clip, clip) (v2)
    lr_u: np.ndarray | None = None          # U [n_out, rank] (v3)
    lr_v: np.ndarray | None = None          # V [rank, n_in] (v3)
    gain_folded: bool = field(default=False)

    @property
    def rank(self) -> int:
        return 0 if self.lr_u is None else int(np.shape(self.lr_u)[1])

    def is_identity(self) -> bool:
        return all(v is None for v in (self.scale_mult, self.grid_offset, self.gain, self.bias,
                                       self.lr_u, self.lr_v)) \
            and self.act_clip == 1.0 and self.act_bits == 0 and self.clip == float("inf")


# ---- quantization --------------------------------------------------------------------------

def _seq_sum(x: np.ndarray) -> np.ndarray:
    """Sum over the last axis in float64, in index order (as a C loop does)."""
    return np.cumsum(x.astype(np.float64), axis=-1)[..., -1]


def _params(x: np.ndarray, bits: int, mode: str, s: np.float32) -> tuple[np.ndarray, np.ndarray | None]:
    """fp16 (d, m) of every group of x [..., L] with the range shrunk by s (float32 math)."""
    qm = np.float32(max_code(bits, mode))
    if mode == "asym":
        lo = s * x.min(axis=-1)
        hi = s * x.max(axis=-1)
        return ((hi - lo) / qm).astype(np.float16), lo.astype(np.float16)
    amax = np.abs(x).max(axis=-1)
    if mode == "sym":
        return ((np.float32(2) * (s * amax)) / qm).astype(np.float16), None
    # ternary: range = amax (used by the mse search only; minmax uses mean |w|)
    return (s * amax).astype(np.float16), None


def _ternary_mean_abs(x: np.ndarray) -> np.ndarray:
    mean = (_seq_sum(np.abs(x)) / x.shape[-1]).astype(np.float32)
    return mean.astype(np.float16)


def _codes(x: np.ndarray, d16: np.ndarray, m16: np.ndarray | None, bits: int, mode: str,
           rounding: str, noise: float, rng: np.random.Generator | None) -> np.ndarray:
    """uint8 codes of x [..., L] given fp16 params [...] (the float32 formulas of FORMAT.md)."""
    d = d16.astype(np.float32)[..., None]
    safe = np.where(d == 0, np.float32(1), d)         # d == 0 -> q = 0, set below
    with np.errstate(over="ignore", invalid="ignore"):
        if mode == "asym":
            t = (x - m16.astype(np.float32)[..., None]) / safe
        elif mode == "sym":
            t = x / safe + np.float32(zero_point(bits, mode))
        else:
            t = x / safe
    if noise:
        t = t + (noise * rng.standard_normal(t.shape)).astype(np.float32)
    if rounding == "nearest":
        r = np.rint(t)
    else:
        r = np.floor(t + rng.random(t.shape, dtype=np.float32))
    if mode == "ternary":
        r = r + np.float32(1)                          # q = rint(w/d) + 1, as FORMAT.md says
    q = np.clip(r, 0, max_code(bits, mode))
    q = np.where(d == 0, 0, q)
    return q.astype(np.uint8)


def _sq_error(x: np.ndarray, q: np.ndarray, d16: np.ndarray, m16: np.ndarray | None,
              z: float) -> np.ndarray:
    """Per-group squared error in float64, summed in index order."""
    deq = d16.astype(np.float64)[..., None] * (q.astype(np.float64) - z)
    if m16 is not None:
        deq = deq + m16.astype(np.float64)[..., None]
    return _seq_sum((x.astype(np.float64) - deq) ** 2)


def _quantize_chunk(x: np.ndarray, bits: int, mode: str, scale_search: str, rounding: str,
                    noise: float, rng: np.random.Generator | None):
    """Quantize groups x [n_out, k, L] (all of length L) -> q [n_out,k,L], d16, m16 [n_out,k]."""
    if scale_search == "minmax":
        if mode == "ternary":
            d16, m16 = _ternary_mean_abs(x), None
        else:
            d16, m16 = _params(x, bits, mode, np.float32(1))
        return _codes(x, d16, m16, bits, mode, rounding, noise, rng), d16, m16
    # mse: every candidate is evaluated with nearest rounding (deterministic); the chosen
    # parameters are then used with the requested rounding
    z = zero_point(bits, mode)
    best_err = best_d = best_m = None
    for s in mse_shrink_factors(mode):
        d16, m16 = _params(x, bits, mode, s)
        q = _codes(x, d16, m16, bits, mode, "nearest", 0.0, None)
        err = _sq_error(x, q, d16, m16, z)
        if best_err is None:
            best_err, best_d, best_m = err, d16, m16
            continue
        better = err < best_err                        # strict: ties keep the smaller shrink
        best_err = np.where(better, err, best_err)
        best_d = np.where(better, d16, best_d)
        if m16 is not None:
            best_m = np.where(better, m16, best_m)
    return _codes(x, best_d, best_m, bits, mode, rounding, noise, rng), best_d, best_m


def quantize_codes(w: np.ndarray, bits: int, group_size: int, mode: str = "asym", *,
                   scale_search: str = "minmax", rounding: str = "nearest", noise: float = 0.0,
                   seed: int | np.random.SeedSequence | list[int] = 0
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Unpacked codes uint8 [n_out, n_in], d fp16 [n_out, n_groups], m fp16 | None."""
    _check(bits, group_size, mode)
    if scale_search not in ("minmax", "mse"):
        raise QuantError(f"scale_search must be 'minmax' or 'mse', got '{scale_search}'")
    if rounding not in ("nearest", "stochastic"):
        raise QuantError(f"rounding must be 'nearest' or 'stochastic', got '{rounding}'")
    if noise < 0 or not np.isfinite(noise):
        raise QuantError(f"noise must be a finite value >= 0, got {noise}")
    w = np.asarray(w)
    if w.ndim != 2:
        raise QuantError(f"expected a 2-D weight [n_out, n_in], got shape {w.shape}")
    n_out, n_in = w.shape
    if n_in % LRQ_BLOCK:
        raise QuantError(f"n_in = {n_in} is not a multiple of {LRQ_BLOCK}")
    w = w.astype(np.float32, copy=False)
    if not np.isfinite(w).all():
        raise QuantError("the weight contains NaN or infinite values")
    rng = np.random.default_rng(seed) if (rounding == "stochastic" or noise) else None

    n_full = n_in // group_size
    tail = n_in - n_full * group_size
    qs, ds, ms = [], [], []
    if n_full:
        x = w[:, :n_full * group_size].reshape(n_out, n_full, group_size)
        q, d, m = _quantize_chunk(x, bits, mode, scale_search, rounding, noise, rng)
        qs.append(q.reshape(n_out, -1)); ds.append(d); ms.append(m)
    if tail:   # the partial last group: same rules over its `tail` weights
        x = w[:, n_full * group_size:].reshape(n_out, 1, tail)
        q, d, m = _quantize_chunk(x, bits, mode, scale_search, rounding, noise, rng)
        qs.append(q.reshape(n_out, -1)); ds.append(d); ms.append(m)
    q = np.concatenate(qs, axis=1)
    d = np.concatenate(ds, axis=1)
    m = np.concatenate(ms, axis=1) if mode == "asym" else None
    return q, d, m


def quantize(w: np.ndarray, bits: int, group_size: int, mode: str = "asym", **options) -> QuantizedTensor:
    """Quantize w [n_out, n_in] (float) -> QuantizedTensor with packed codes.

    options: scale_search ("minmax" | "mse"), rounding ("nearest" | "stochastic"),
    noise (std of Gaussian noise added in code units before rounding), seed.
    """
    q, d, m = quantize_codes(w, bits, group_size, mode, **options)
    return QuantizedTensor(pack(q, bits), d, m, bits, group_size, mode, int(q.shape[1]))


# ---- planar code packing --------------------------------------------------------------------

def _pack_simple(q: np.ndarray, bits: int) -> np.ndarray:
    """b in {1, 2, 4}: weight j of a block -> byte j % (4b), shift b * (j // (4b))."""
    nbytes = 4 * bits
    lead = q.shape[:-1]
    blocks = q.reshape(*lead, -1, LRQ_BLOCK // nbytes, nbytes)      # [..., nb, shift slot, byte]
    out = np.zeros((*blocks.shape[:-2], nbytes), dtype=np.uint8)
    for s in range(LRQ_BLOCK // nbytes):
        out |= (blocks[..., s, :] << (bits * s)).astype(np.uint8)
    return out.reshape(*lead, -1)


def _unpack_simple(p: np.ndarray, bits: int, n_in: int) -> np.ndarray:
    nbytes = 4 * bits
    lead = p.shape[:-1]
    blocks = p.reshape(*lead, n_in // LRQ_BLOCK, 1, nbytes)
    shifts = (bits * np.arange(LRQ_BLOCK // nbytes, dtype=np.uint8)).reshape(-1, 1)
    q = (blocks >> shifts) & np.uint8((1 << bits) - 1)              # [..., nb, slot, byte]
    return q.reshape(*lead, n_in)


def unpack_torch(packed, bits: int, n_in: int):
    """``unpack`` on a torch uint8 tensor [..., row_bytes] (the same arithmetic, torch ops):
    codes uint8 [..., n_in].  The calibrator keeps codes packed and unpacks them per step."""
    import torch
    if packed.shape[-1] != row_bytes(n_in, bits):
        raise QuantError(f"{packed.shape[-1]} bytes per row do not hold {n_in} {bits}-bit codes "
                         f"(expected {row_bytes(n_in, bits)})")

    def simple(p, b):
        nbytes = 4 * b
        blocks = p.reshape(*p.shape[:-1], n_in // LRQ_BLOCK, 1, nbytes)
        shifts = (b * torch.arange(LRQ_BLOCK // nbytes, dtype=torch.uint8)).reshape(-1, 1)
        return ((blocks >> shifts) & ((1 << b) - 1)).reshape(*p.shape[:-1], n_in)

    if bits != 3:
        return simple(packed, bits)
    blocks = packed.reshape(*packed.shape[:-1], -1, 12)
    lo = simple(blocks[..., :8].reshape(*packed.shape[:-1], -1), 2)
    hi = simple(blocks[..., 8:].reshape(*packed.shape[:-1], -1), 1)
    return lo | (hi << 2)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Codes uint8 [..., n_in] -> planar blocks uint8 [..., n_in / 32 * 4b] (FORMAT.md)."""
    q = np.asarray(q)
    if q.shape[-1] % LRQ_BLOCK:
        raise QuantError(f"the last axis ({q.shape[-1]}) is not a multiple of {LRQ_BLOCK}")
    if bits not in BITS_CHOICES:
        raise QuantError(f"bits must be one of {BITS_CHOICES}, got {bits}")
    if q.size and int(q.max()) >= (1 << bits):
        raise QuantError(f"a code ({int(q.max())}) does not fit in {bits} bits")
    q = q.astype(np.uint8)
    if bits != 3:
        return _pack_simple(q, bits)
    # 3 bits: per block, the low 2 bits as a 2-bit block (8 B) then the high bit as a 1-bit block (4 B)
    lead = q.shape[:-1]
    lo = _pack_simple(q & 3, 2).reshape(*lead, -1, 8)
    hi = _pack_simple(q >> 2, 1).reshape(*lead, -1, 4)
    return np.concatenate([lo, hi], axis=-1).reshape(*lead, -1)


def unpack(packed: np.ndarray, bits: int, n_in: int) -> np.ndarray:
    """Inverse of pack: uint8 [..., row_bytes] -> codes uint8 [..., n_in]."""
    packed = np.asarray(packed, dtype=np.uint8)
    if packed.shape[-1] != row_bytes(n_in, bits):
        raise QuantError(f"{packed.shape[-1]} bytes per row do not hold {n_in} {bits}-bit codes "
                         f"(expected {row_bytes(n_in, bits)})")
    if bits != 3:
        return _unpack_simple(packed, bits, n_in)
    lead = packed.shape[:-1]
    blocks = packed.reshape(*lead, -1, 12)
    lo = _unpack_simple(np.ascontiguousarray(blocks[..., :8]).reshape(*lead, -1), 2, n_in)
    hi = _unpack_simple(np.ascontiguousarray(blocks[..., 8:]).reshape(*lead, -1), 1, n_in)
    return lo | (hi << 2)


# ---- dequantization -------------------------------------------------------------------------

def _expand(p: np.ndarray | None, n_out: int, n_in: int, group_size: int, what: str) -> np.ndarray | None:
    """A per-group parameter [n_out, n_groups] | [n_out, 1] | [1, 1] -> per-weight (broadcastable)."""
    if p is None:
        return None
    p = np.asarray(p, dtype=np.float64)
    if p.ndim == 1:
        p = p.reshape(-1, 1)
    ng = n_groups(n_in, group_size)
    if p.shape == (n_out, ng):
        return p[:, group_index(n_in, group_size)]
    if p.shape in ((n_out, 1), (1, 1)):
        return p
    raise QuantError(f"{what}: shape {p.shape} is none of [{n_out}, {ng}], [{n_out}, 1], [1, 1]")


def dequantize_codes(q: np.ndarray, scale: np.ndarray, min_: np.ndarray | None, bits: int,
                     group_size: int, mode: str, replica: ReplicaParams | None = None) -> np.ndarray:
    """float64 W_r[o,i] = gamma[o] * (alpha * d * (level(q) + beta) + m) from unpacked codes."""
    n_out, n_in = q.shape
    level = q.astype(np.float64) - zero_point(bits, mode)
    d = _expand(scale, n_out, n_in, group_size, "scale")
    rp = replica or ReplicaParams()
    beta = _expand(rp.grid_offset, n_out, n_in, group_size, "grid_offset")
    alpha = _expand(rp.scale_mult, n_out, n_in, group_size, "scale_mult")
    w = d * (level + beta) if beta is not None else d * level
    if alpha is not None:
        w = alpha * w
    if min_ is not None:
        w = w + _expand(min_, n_out, n_in, group_size, "min")
    if rp.gain is not None:
        w = np.asarray(rp.gain, dtype=np.float64).reshape(n_out, 1) * w
    return w


def dequantize(qt: QuantizedTensor, replica: ReplicaParams | None = None) -> np.ndarray:
    """float64 [n_out, n_in] weight of replica ``replica`` (None: replica 0 = the base grid)."""
    q = unpack(qt.codes, qt.bits, qt.n_in)
    return dequantize_codes(q, qt.scale, qt.min, qt.bits, qt.group_size, qt.mode, replica)


def dequantize_torch(qt: QuantizedTensor, replica: ReplicaParams | None = None):
    """Same as dequantize, as a float64 torch tensor (for the torch reference executor)."""
    import torch
    return torch.from_numpy(dequantize(qt, replica))


# ---- activations ----------------------------------------------------------------------------

def check_activation_params(clip_ratio: float, act_bits: int) -> None:
    if not (0.0 < clip_ratio <= 1.0):
        raise QuantError(f"activation clip ratio must be in (0, 1], got {clip_ratio}")
    if act_bits != 0 and not (2 <= act_bits <= ACT_BITS_MAX):
        raise QuantError(f"activation bits must be 0 (off) or 2..{ACT_BITS_MAX}, got {act_bits}")


def quantize_activations(x: np.ndarray, clip_ratio: float = 1.0, act_bits: int = 0) -> np.ndarray:
    """Per token (last axis): clip to c * max|x|, then (k > 0) symmetric k-bit round-half-even."""
    check_activation_params(clip_ratio, act_bits)
    x = np.asarray(x, dtype=np.float64)
    if clip_ratio == 1.0 and act_bits == 0:
        return x
    lim = clip_ratio * np.abs(x).max(axis=-1, keepdims=True)
    xc = np.clip(x, -lim, lim)
    if act_bits == 0:
        return xc
    s = lim / ((1 << (act_bits - 1)) - 1)
    safe = np.where(s == 0, 1.0, s)
    return np.where(s == 0, 0.0, np.rint(xc / safe) * s)


def quantize_activations_torch(x, clip_ratio: float = 1.0, act_bits: int = 0):
    """torch version of quantize_activations (torch.round is round-half-even too)."""
    import torch
    check_activation_params(clip_ratio, act_bits)
    if clip_ratio == 1.0 and act_bits == 0:
        return x
    lim = clip_ratio * x.abs().amax(dim=-1, keepdim=True)
    xc = torch.maximum(torch.minimum(x, lim), -lim)
    if act_bits == 0:
        return xc
    s = lim / ((1 << (act_bits - 1)) - 1)
    safe = torch.where(s == 0, torch.ones_like(s), s)
    return torch.where(s == 0, torch.zeros_like(xc), torch.round(xc / safe) * s)
