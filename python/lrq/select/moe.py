"""Expert selection for mixture-of-experts models (lrq-select --moe; docs/moe.md).

The routing frequency of each expert of each MoE layer on calibration text: the share of the
routed (token, slot) pairs that pick it, counted by the torch reference (float32) running the
model's router exactly as llama.cpp does (softmax, top-k).  The experts that the most tokens use
are the ones whose replication touches the most tokens; an expert that no token picks changes
nothing when replicated.  The top fraction of each layer (default 20 %) becomes a plan's
``"experts"`` list (format v4 expert replicas), which lrq-convert --plan writes.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from ..model_file import open_model
from ..reference import Reference
from .measure import calib_tokens
from .score import SelectError


def routing_frequency(model_path: str | os.PathLike, text, n_tokens: int, ctx: int,
                      threads: int | None = None) -> np.ndarray:
    """[n_layer, n_expert] share of each layer's routed slots that pick each expert (rows of
    dense layers are 0); windows of ``ctx`` tokens as lrq-select's statistics use them."""
    if threads:
        torch.set_num_threads(threads)
    windows = calib_tokens(model_path, text, n_tokens, ctx)
    model = open_model(model_path)
    hp = model.hparams
    if not hp.n_expert:
        raise SelectError(f"{model_path}: not a mixture-of-experts model (no experts to select)")
    ref = Reference(model, torch.float32)
    counts = np.zeros((hp.n_layer, hp.n_expert), np.int64)
    for layer, moe in ref._moe.items():
        def route(h, _orig=moe.route, _layer=layer):
            w, idx = _orig(h)
            counts[_layer] += np.bincount(idx.reshape(-1).numpy(), minlength=hp.n_expert)
            return w, idx
        moe.route = route           # this instance only: the class stays untouched
    with torch.no_grad():
        for win in windows:
            ref.logits(win)
    total = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, total, out=np.zeros(counts.shape), where=total > 0)


def top_experts(freq: np.ndarray, fraction: float) -> list[int]:
    """The round(fraction * n_expert) (at least 1) most-used experts of one layer, sorted by
    index (ties: the lower index first): 20 % of 8 experts is 2, of 32 experts 6."""
    if not 0 < fraction <= 1:
        raise SelectError(f"--top must be in (0, 1], got {fraction}")
    k = max(1, int(math.floor(fraction * len(freq) + 0.5)))
    order = sorted(range(len(freq)), key=lambda e: (-freq[e], e))
    return sorted(order[:k])
