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

``refit`` (both quantizers): once a group's codes are fixed, its (d, m) are refitted by weighted
least squares on those codes (closed form, 2x2 normal equations per group; m = 0 for sym and
ternary).  Round to nearest minimises ``sum_i E[x_i^2] (w_i - (d l_i + m))^2`` and then alternates
re-rounding and refitting (each step can only lower that error); GPTQ minimises the part of its
own objective the group's columns contribute, ``||(y - d l - m) U_gg^-1||^2`` with ``y`` the
group's error-updated weights and ``U_gg`` its block of the inverse Hessian's Cholesky factor,
then hands the changed errors of the group's columns on to the not-yet-quantized columns, so the
error feedback stays exact for the parameters actually stored.  A group keeps its old parameters
where the fit is degenerate (all codes equal) or, after fp16 rounding, not better.

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
# round-to-nearest with refit: at most this many rounds of (refit the parameters, re-round the
# codes), fewer once no group improves; on the tiny test models' linears (2-bit g64) the weighted
# error fell 5.4 % in 16 rounds (2.9 % after the first, 5.0 % after 4) and not at all after 16
REFIT_ROUNDS = 16
# a group's 2x2 normal equations count as singular below this relative determinant (all codes
# of the group equal, or only one weight with importance)
REFIT_DET_RTOL = 1e-9


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


def _fp16_ok(v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return np.isfinite(v) & np.isfinite(v.astype(np.float16))


def _solve_dm(aa, ab, bb, ac, bc, asym: bool):
    """Least-squares (d, m) of min ||c - d a - m b||^2 from the sums aa = a.a, ab, bb, ac, bc
    (arrays over groups) and a mask of the groups where the system is regular."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if asym:
            det = aa * bb - ab * ab
            ok = det > REFIT_DET_RTOL * aa * bb
            d = (ac * bb - ab * bc) / det
            m = (aa * bc - ab * ac) / det
        else:
            ok = aa > 0
            d = ac / aa
            m = None
    ok = ok & _fp16_ok(d) & (_fp16_ok(m) if asym else True)
    return d, m, ok


def refit_params(x: np.ndarray, q: np.ndarray, d16: np.ndarray, m16: np.ndarray | None,
                 imp: np.ndarray, bits: int, mode: str) -> tuple[np.ndarray, np.ndarray | None]:
    """fp16 (d, m) [...] of groups x [..., L] with codes q [..., L] minimising
    sum_i imp_i (x_i - (d (q_i - z) + m))^2; the old (d16, m16) where that is not lower."""
    z = zero_point(bits, mode)
    asym = m16 is not None
    h = np.broadcast_to(np.asarray(imp, dtype=np.float64), x.shape)
    l = q.astype(np.float64) - z
    y = x.astype(np.float64)
    hl = h * l
    d, m, ok = _solve_dm((hl * l).sum(-1), hl.sum(-1), h.sum(-1), (hl * y).sum(-1),
                         (h * y).sum(-1), asym)
    nd = np.where(ok, d, d16).astype(np.float16)
    nm = np.where(ok, m, m16).astype(np.float16) if asym else None
    old = (h * (y - _deq(q, d16, m16, z)) ** 2).sum(-1)
    new = (h * (y - _deq(q, nd, nm, z)) ** 2).sum(-1)
    better = new < old
    return (np.where(better, nd, d16),
            np.where(better, nm, m16) if asym else None)


def _refit_rounds(x: np.ndarray, q: np.ndarray, d16, m16, imp, bits: int, mode: str,
                  rounds: int = REFIT_ROUNDS):
    """Alternate refit_params and nearest re-rounding; every group keeps its best (q, d, m)."""
    z = zero_point(bits, mode)
    imp = np.asarray(imp, dtype=np.float64)

    def err(q, d, m):
        return (imp * (x.astype(np.float64) - _deq(q, d, m, z)) ** 2).sum(-1)

    best = err(q, d16, m16)
    for _ in range(rounds):
        d2, m2 = refit_params(x, q, d16, m16, imp, bits, mode)
        q2 = _codes(x, d2, m2, bits, mode, "nearest", 0.0, None)
        e2 = err(q2, d2, m2)
        better = e2 < best
        if not better.any():
            break
        best = np.where(better, e2, best)
        q = np.where(better[..., None], q2, q)
        d16 = np.where(better, d2, d16)
        if m16 is not None:
            m16 = np.where(better, m2, m16)
    return q, d16, m16


def refit_codes(w: np.ndarray, q: np.ndarray, d: np.ndarray, m: np.ndarray | None, bits: int,
                group_size: int, mode: str, importance: np.ndarray | None = None):
    """(q, d, m) of a round-to-nearest encoding of w improved by alternating weighted
    least-squares refits and re-rounding (module doc); importance None: uniform."""
    _check(bits, group_size, mode)
    w = _check_w(w)
    imp = np.ones(w.shape[1]) if importance is None else _check_imp(importance, w.shape[1])
    q, d = q.copy(), d.copy()
    m = None if m is None else m.copy()
    for k, (a, b) in enumerate(_group_bounds(w.shape[1], group_size)):
        qk, dk, mk = _refit_rounds(w[:, a:b], q[:, a:b], d[:, k], None if m is None else m[:, k],
                                   imp[a:b], bits, mode)
        q[:, a:b], d[:, k] = qk, dk
        if m is not None:
            m[:, k] = mk
    return q, d, m


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
                            importance: np.ndarray, *, refit: bool = False):
    """Round to nearest with per-group parameters from the importance-weighted search
    (``refit``: then alternate weighted least-squares refits and re-rounding, see module doc)."""
    _check(bits, group_size, mode)
    w = _check_w(w)
    imp = _check_imp(importance, w.shape[1])
    qs, ds, ms = [], [], []
    for a, b in _group_bounds(w.shape[1], group_size):
        x = w[:, a:b]
        d16, m16 = weighted_params(x, imp[a:b], bits, mode)
        q = _codes(x, d16, m16, bits, mode, "nearest", 0.0, None)
        if refit:
            q, d16, m16 = _refit_rounds(x, q, d16, m16, imp[a:b], bits, mode)
        qs.append(q)
        ds.append(d16); ms.append(m16)
    return (np.concatenate(qs, axis=1), np.stack(ds, axis=1),
            np.stack(ms, axis=1) if mode == "asym" else None)


def gptq_quantize_codes(w: np.ndarray, hessian: np.ndarray, bits: int, group_size: int,
                        mode: str = "asym", *, scale_search: str = "minmax",
                        importance: np.ndarray | None = None, damp: float = GPTQ_DAMP,
                        block: int = GPTQ_BLOCK, static_groups: bool = True, refit: bool = False):
    """GPTQ with per-group parameters (see the module doc).  ``hessian``: X^T X (any positive
    scale) of the layer's input, [n_in, n_in]; ``scale_search``: minmax | mse | act-mse (the
    latter weights by ``importance``, default diag(hessian)).  ``static_groups``: every group's
    parameters come from the original weights instead of the error-updated ones.  ``refit``: each
    group's (d, m) refitted on its codes against GPTQ's own objective (module doc)."""
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
    # n_in^2 float64 each (ffn_down of Qwen2.5-32B: 6.1 GB): at most two held at once
    try:
        L = np.linalg.cholesky(H)
        del H
        Linv = np.linalg.inv(L)
        del L
        Hinv = Linv.T @ Linv                                    # H^-1 = L^-T L^-1
        del Linv
        U = np.linalg.cholesky(Hinv).T                          # H^-1 = U^T U, U upper
        del Hinv
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
        y = None
        for i in range(i2 - i1):
            col = i1 + i
            if col % group_size == 0:
                gl = min(group_size, n_in - col)
                grp = w[:, col:col + gl] if static_groups else W1[:, i:i + gl].astype(np.float32)
                d16, m16 = params(grp, col, col + gl)
                if refit:
                    y = W1[:, i:i + gl].copy()
            x = W1[:, i:i + 1].astype(np.float32)
            q = _codes(x, d16, m16, bits, mode, "nearest", 0.0, None)[:, 0]
            Q[:, col] = q
            err = (W1[:, i] - _deq(q[:, None], d16, m16, z)[:, 0]) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            E1[:, i] = err
            if (col + 1) % group_size == 0 or col + 1 == n_in:
                g0 = col + 1 - gl - i1                  # the group's first column in the block
                if refit:
                    d16, m16 = _gptq_refit(y, Q[:, col + 1 - gl:col + 1], d16, m16,
                                           U1[g0:i + 1, g0:i + 1], E1[:, g0:i + 1], bits, mode)
                    # the group's columns now carry other errors: hand the difference on
                    e_new = _gptq_group_errors(y, Q[:, col + 1 - gl:col + 1], d16, m16,
                                               U1[g0:i + 1, g0:i + 1], z)
                    W1[:, i + 1:] -= (e_new - E1[:, g0:i + 1]) @ U1[g0:i + 1, i + 1:]
                    E1[:, g0:i + 1] = e_new
                D[:, col // group_size] = d16
                if M is not None:
                    M[:, col // group_size] = m16
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return Q, D, M


def _gptq_group_errors(y, q, d16, m16, Ug, z):
    """GPTQ's scaled errors e [n_out, L] of a group's columns: e Ug = y - w^ (Ug upper)."""
    return _solve_right(y - _deq(q, d16, m16, z), Ug)


def _solve_right(r: np.ndarray, Ug: np.ndarray) -> np.ndarray:
    """e with e Ug = r."""
    return np.linalg.solve(Ug.T, r.T).T


def _gptq_refit(y, q, d16, m16, Ug, e_old, bits: int, mode: str):
    """(d, m) fp16 [n_out] of one group minimising ||(y - d l - m) Ug^-1||^2 given its codes q."""
    z = zero_point(bits, mode)
    asym = m16 is not None
    l = q.astype(np.float64) - z
    a = _solve_right(l, Ug)
    c = _solve_right(y, Ug)
    b = _solve_right(np.ones((1, y.shape[1])), Ug)
    d, m, ok = _solve_dm((a * a).sum(1), (a * b).sum(1), float((b * b).sum()), (a * c).sum(1),
                         (b * c).sum(1), asym)
    nd = np.where(ok, d, d16).astype(np.float16)
    nm = np.where(ok, m, m16).astype(np.float16) if asym else None
    new = (_gptq_group_errors(y, q, nd, nm, Ug, z) ** 2).sum(1)
    better = new < (e_old ** 2).sum(1)
    return np.where(better, nd, d16), (np.where(better, nm, m16) if asym else None)


def output_error(w: np.ndarray, w_hat: np.ndarray, xtx: np.ndarray) -> float:
    """||X W^T - X W^_T||_F^2 = tr((W - W^) X^T X (W - W^)^T), from the Gram matrix X^T X."""
    e = np.asarray(w, dtype=np.float64) - np.asarray(w_hat, dtype=np.float64)
    return float(np.einsum("oi,ij,oj->", e, np.asarray(xtx, dtype=np.float64), e))


def weighted_error(w: np.ndarray, w_hat: np.ndarray, importance: np.ndarray) -> float:
    """sum_{o,i} imp_i (w_oi - w^_oi)^2."""
    e = np.asarray(w, dtype=np.float64) - np.asarray(w_hat, dtype=np.float64)
    return float((np.asarray(importance, dtype=np.float64)[None, :] * e * e).sum())


__all__ = ["GPTQ_DAMP", "GPTQ_BLOCK", "REFIT_ROUNDS", "weighted_params", "refit_params", "refit_codes",
           "weighted_quantize_codes",
           "gptq_quantize_codes", "output_error", "weighted_error", "max_code"]
