"""Bits per weight of an LRQ file's tensor set (docs/FORMAT.md section 9), in one place.

The converter (before any data is written), the replica-parameter rewriter, the stock-base
wrapper and the reader all describe a file as (name, numpy shape, ggml type id, bytes) per tensor
and get the same figures from ``count_bpw``.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from .constants import is_aux_tensor, is_block_linear, lrq_bits, parse_replica_param_name


def _owner(name: str) -> str:
    """The weight an aux tensor belongs to (``blk.0.attn_q.lrq_r1.gain`` -> ``blk.0.attn_q.weight``)."""
    parsed = parse_replica_param_name(name)
    return parsed[0] if parsed else name.rsplit(".", 1)[0] + ".weight"


def count_bpw(tensors: Iterable[tuple[str, tuple[int, ...], int, int]]) -> dict:
    """lrq: bits of LRQ codes + their parameter tensors / LRQ weights;
    linears: bits of every 2-D block linear (LRQ or stock-typed) + every parameter tensor /
    block-linear weights; file: bits of all tensors / base parameters (aux tensors excluded).
    Parameter tensors are every ``lrq_scale`` / ``lrq_min`` / ``lrq_r*`` tensor, so a replica's
    low-rank factors (``lrq_r*.lr_u`` / ``lr_v``, format v3) count in the bits of the weight they
    correct and never as weights.  A figure without any weight to divide by is 0."""
    ts = [(n, tuple(s), int(t), int(b)) for n, s, t, b in tensors]
    size = {n: int(np.prod(s)) for n, s, _, _ in ts}
    lrq_w = {n for n, _, t, _ in ts if lrq_bits(t) is not None}
    lin_w = lrq_w | {n for n, s, _, _ in ts if is_block_linear(n) and len(s) == 2}
    aux = {n for n, _, _, _ in ts if is_aux_tensor(n)}
    nbytes = {n: b for n, _, _, b in ts}
    n_lrq = sum(size[n] for n in lrq_w)
    n_lin = sum(size[n] for n in lin_w)
    n_base = sum(size[n] for n in size if n not in aux)
    lrq_bytes = sum(nbytes[n] for n in lrq_w) + sum(nbytes[n] for n in aux if _owner(n) in lrq_w)
    lin_bytes = sum(nbytes[n] for n in lin_w | aux)
    all_bytes = sum(nbytes.values())
    div = lambda bits, n: bits / n if n else 0.0
    return {"lrq": div(8 * lrq_bytes, n_lrq), "linears": div(8 * lin_bytes, n_lin),
            "file": div(8 * all_bytes, n_base),
            "n_lrq_weights": n_lrq, "n_linear_weights": n_lin, "n_base_params": n_base,
            "lrq_bytes": lrq_bytes, "linear_bytes": lin_bytes, "tensor_bytes": all_bytes}
