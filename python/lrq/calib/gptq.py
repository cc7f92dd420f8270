"""Calibration-aware base quantizers whose output is an ordinary LRQ encoding (FORMAT.md §3).

``weighted_quantize_codes`` (lrq-convert ``--scale-search act-mse`` / ``--awq``): per group, the
clipping candidate s_k of FORMAT.md's mse search (plus the minmax parameters) that minimises the
importance-weighted error ``sum_i E[x_i^2] (w_i - w^_i)^2`` with E[x_i^2] the mean square of input
channel i over calibration tokens.  (AWQ proper also rescales input channels; LRQ v1 keeps norms
byte for byte and has no per-input scale, so only the activation-aware clipping search is done.)

``gptq_quantize_codes`` (``--gptq``): GPTQ (Frantar et al. 2022).  Columns are quantized left to
right; at the first column of each group the group's fp16 parameters are chosen (minmax, mse or
act-mse) from the group's original weights (``static_groups``, the default; or from its current
weights, already updated by the error feedback of earlier columns — measured unstable at 1 bit:
1.2x RTN's output error against 0.44x static on the tiny models), then every column's codes are the nearest grid codes of FORMAT.md
(``q = clamp(rint((w - m) / d), 0, qmax)``, float32) and its rounding error is spread over the
not-yet-quantized columns through the inverse Hessian's Cholesky factor.  Parameters are fixed
before any code of their group is decided, so the result is a valid encoding like any other.

Both return ``(codes uint8 [n_out, n_in], d fp16 [n_out, n_groups], m fp16 | None)``.
"""

from __future__ import annotations

import numpy as np

from ..constants import LRQ_BLOCK
from ..quant import (QuantError, _check, _codes, _params, _quantize_chunk, _ternary_mean_abs,
                     max_code, mse_shrink_factors, zero_point)

# GPTQ's dampening: lambda = GPTQ_DAMP * mean(diag(H)) added to H's diagonal (the paper's 1 %).
GPTQ_DAMP = 0.01
# columns updated lazily as one block (the paper's 128); rounded up to a multiple of the group
GPTQ_BLOCK = 128


def _deq(q: np.ndarray, d16: np.ndarray, m16: np.ndarray | None, z: float) -> np.ndarray:
    """float64 dequantized x of codes q [..., L] with fp16 params [...] (FORMAT.md §3)."""
    w = d16.astype(np.float64)[..., None] * (q.astype(np.float64) - z)
    if m16 is not None:
        w = w + m16.astype(np.float64)[..., None]
    return w


def weighted_params(x: np.ndarray, imp: np.ndarray, bits: int, mode: str
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """fp16 (d, m) [...] of groups x [..., L] (float32) minimising sum_i imp_i (x_i - x^_i)^2.

    Candidates: FORMAT.md's mse shrink factors (s = 1 is minmax for asym/sym) and, for ternary,
    the minmax (mean |w|) scale.  Ties keep the earlier candidate."""
    z = zero_point(bits, mode)
    imp = np.asarray(imp, dtype=np.float64)
    cands = [_params(x, bits, mode, s) for s in mse_shrink_factors(mode)]
    if mode == "ternary":
        cands.insert(0, (_ternary_mean_abs(x), None))
    best_err = best_d = best_m = None
    for d16, m16 in cands:
        q = _codes(x, d16, m16, bits, mode, "nearest", 0.0, None)
        err = (imp * (x.astype(np.float64) - _deq(q, d16, m16, z)) ** 2).sum(axis=-1)
        if best_err is None:
            best_err, best_d, best_m = err, d16, m16
            continue
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_d = np.where(better, d16, best_d)
        if m16 is not None:
            best_m = np.where(better, m16, best_m)
    return best_d, best_m


def _group_bounds(n_in: int, group_size: int) -> list[tuple[int, int]]:
    return [(a, min(a + group_size, n_in)) for a in range(0, n_in, group_size)]


def _check_w(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2:
        raise QuantError(f"expected a 2-D weight [n_out, n_in], got shape {w.shape}")
    if w.shape[1] % LRQ_BLOCK:
        raise QuantError(f"n_in = {w.shape[1]} is not a multiple of {LRQ_BLOCK}")
    w = w.astype(np.float32, copy=False)
    if not np.isfinite(w).all():
        raise QuantError("the weight contains NaN or infinite values")
    return w


def _check_imp(imp, n_in: int) -> np.ndarray:
    imp = np.asarray(imp, dtype=np.float64).reshape(-1)
    if imp.shape != (n_in,):
        raise QuantError(f"importance has {imp.size} values for n_in = {n_in}")
    if not np.isfinite(imp).all() or (imp < 0).any():
        raise QuantError("importance must be finite and >= 0")
    return imp


def weighted_quantize_codes(w: np.ndarray, bits: int, group_size: int, mode: str,
                            importance: np.ndarray):
    """Round to nearest with per-group parameters from the importance-weighted search."""
    _check(bits, group_size, mode)
    w = _check_w(w)
    imp = _check_imp(importance, w.shape[1])
    qs, ds, ms = [], [], []
    for a, b in _group_bounds(w.shape[1], group_size):
        x = w[:, a:b]
        d16, m16 = weighted_params(x, imp[a:b], bits, mode)
        qs.append(_codes(x, d16, m16, bits, mode, "nearest", 0.0, None))
        ds.append(d16); ms.append(m16)
    return (np.concatenate(qs, axis=1), np.stack(ds, axis=1),
            np.stack(ms, axis=1) if mode == "asym" else None)


def gptq_quantize_codes(w: np.ndarray, hessian: np.ndarray, bits: int, group_size: int,
                        mode: str = "asym", *, scale_search: str = "minmax",
                        importance: np.ndarray | None = None, damp: float = GPTQ_DAMP,
                        block: int = GPTQ_BLOCK, static_groups: bool = True):
    """GPTQ with per-group parameters (see the module doc).  ``hessian``: X^T X (any positive
    scale) of the layer's input, [n_in, n_in]; ``scale_search``: minmax | mse | act-mse (the
    latter weights by ``importance``, default diag(hessian)).  ``static_groups``: every group's
    parameters come from the original weights instead of the error-updated ones."""
    _check(bits, group_size, mode)
    w = _check_w(w)
    n_out, n_in = w.shape
    H = np.array(hessian, dtype=np.float64)
    if H.shape != (n_in, n_in):
        raise QuantError(f"Hessian shape {H.shape} does not match n_in = {n_in}")
    if not np.isfinite(H).all():
        raise QuantError("the Hessian contains NaN or infinite values")
    if scale_search not in ("minmax", "mse", "act-mse"):
        raise QuantError(f"scale_search must be minmax, mse or act-mse, got '{scale_search}'")
    if not (damp > 0 and np.isfinite(damp)):
        raise QuantError(f"GPTQ dampening must be > 0, got {damp}")
    imp = _check_imp(np.diag(H) if importance is None else importance, n_in)
    z = zero_point(bits, mode)

    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    mean_diag = float(np.mean(np.diag(H)))
    H[np.diag_indices(n_in)] += damp * mean_diag
    try:
        L = np.linalg.cholesky(H)
        Hinv = np.linalg.inv(L).T @ np.linalg.inv(L)            # H^-1 = L^-T L^-1
        U = np.linalg.cholesky(Hinv).T                          # H^-1 = U^T U, U upper
    except np.linalg.LinAlgError as e:
        raise QuantError(f"the dampened Hessian is not positive definite ({e}); raise --gptq-damp") from None

    def params(x, a, b):
        if scale_search == "act-mse":
            return weighted_params(x, imp[a:b], bits, mode)
        _, d16, m16 = _quantize_chunk(x[:, None, :], bits, mode, scale_search, "nearest", 0.0, None)
        return d16[:, 0], (m16[:, 0] if m16 is not None else None)

    W = w.astype(np.float64)
    Q = np.zeros((n_out, n_in), dtype=np.uint8)
    ng = -(-n_in // group_size)
    D = np.zeros((n_out, ng), dtype=np.float16)
    M = np.zeros((n_out, ng), dtype=np.float16) if mode == "asym" else None
    B = -(-max(block, group_size) // group_size) * group_size     # groups never straddle blocks
    d16 = m16 = None
    for i1 in range(0, n_in, B):
        i2 = min(i1 + B, n_in)
        W1 = W[:, i1:i2].copy()
        E1 = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                gl = min(group_size, n_in - col)
                grp = w[:, col:col + gl] if static_groups else W1[:, i:i + gl].astype(np.float32)
                d16, m16 = params(grp, col, col + gl)
                D[:, col // group_size] = d16
                if M is not None:
                    M[:, col // group_size] = m16
            x = W1[:, i:i + 1].astype(np.float32)
            q = _codes(x, d16, m16, bits, mode, "nearest", 0.0, None)[:, 0]
            Q[:, col] = q
            err = (W1[:, i] - _deq(q[:, None], d16, m16, z)[:, 0]) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return Q, D, M


def output_error(w: np.ndarray, w_hat: np.ndarray, xtx: np.ndarray) -> float:
    """||X W^T - X W^_T||_F^2 = tr((W - W^) X^T X (W - W^)^T), from the Gram matrix X^T X."""
    e = np.asarray(w, dtype=np.float64) - np.asarray(w_hat, dtype=np.float64)
    return float(np.einsum("oi,ij,oj->", e, np.asarray(xtx, dtype=np.float64), e))


def weighted_error(w: np.ndarray, w_hat: np.ndarray, importance: np.ndarray) -> float:
    """sum_{o,i} imp_i (w_oi - w^_oi)^2."""
    e = np.asarray(w, dtype=np.float64) - np.asarray(w_hat, dtype=np.float64)
    return float((np.asarray(importance, dtype=np.float64)[None, :] * e * e).sum())


__all__ = ["GPTQ_DAMP", "GPTQ_BLOCK", "weighted_params", "weighted_quantize_codes",
           "gptq_quantize_codes", "output_error", "weighted_error", "max_code"]
