"""Expert selection for mixture-of-experts models (lrq-select --moe; docs/moe.md).

The routing frequency of each expert of each MoE layer on calibration text: the share of the
routed (token, slot) pairs that pick it, counted by the torch reference (float32) running the
model's router exactly as llama.cpp does (softmax, top-k).  The experts that the most tokens use
are the ones whose replication touches the most tokens; an expert that no token picks changes
nothing when replicated.  The top fraction of each layer (default 20 %) becomes a plan's
``"experts"`` list (format v4 expert replicas), which lrq-convert --plan writes.

Quantization sensitivity (``expert_statistics``): on the same routed tokens, each expert's
output with its three matrices quantized by lrq's quantizer at the given spec against its float
output, weighted by the routing weights.  ``sensitivity`` is that error relative to the expert's
own weighted output energy (how badly the codes hurt the expert wherever it is used);
``impact`` is the expert's share of its layer's weighted output error (frequency x sensitivity x
output scale: where the layer's quantization error actually comes from).  Ranking by impact
(``lrq-select --moe --moe-rank impact``) replicates the experts that carry the error rather than
the busiest ones.  The proxy quantizer is lrq's (the experts of a converted file keep a stock
type, which this does not emulate).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from ..model_file import open_model
from ..reference import Reference
from .measure import calib_tokens
from .score import QuantSpec, SelectError, quantize_dequantize


def expert_statistics(model_path: str | os.PathLike, text, n_tokens: int, ctx: int, spec: QuantSpec,
                      threads: int | None = None) -> dict[str, np.ndarray]:
    """{"frequency", "sensitivity", "impact"}: [n_layer, n_expert] each (rows of dense layers 0;
    an expert no token picks has sensitivity and impact 0).  frequency_e = the share of the
    layer's routed (token, slot) pairs that pick e;
    sensitivity_e = sum_t w_t^2 ||E_e^q(x_t) - E_e(x_t)||^2 / sum_t w_t^2 ||E_e(x_t)||^2 over
    the (token, slot) pairs routed to e (w_t its routing weight); impact_e = the numerator's
    share of its layer's sum."""
    if threads:
        torch.set_num_threads(threads)
    windows = calib_tokens(model_path, text, n_tokens, ctx)
    model = open_model(model_path)
    hp = model.hparams
    if not hp.n_expert:
        raise SelectError(f"{model_path}: not a mixture-of-experts model (no experts to select)")
    ref = Reference(model, torch.float32)
    seen: dict[int, list] = {layer: [] for layer in ref._moe}
    for layer, moe in ref._moe.items():
        def route(h, _orig=moe.route, _layer=layer):
            w, idx = _orig(h)
            seen[_layer].append((h.detach().clone(), w.detach().clone(), idx.clone()))
            return w, idx
        moe.route = route           # this instance only: the class stays untouched
    with torch.no_grad():
        for win in windows:
            ref.logits(win)
    shape = (hp.n_layer, hp.n_expert)
    counts, err, energy = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    with torch.no_grad():
        for layer, moe in ref._moe.items():
            del moe.route           # the instance's hook: back to the class method
            h = torch.cat([x[0] for x in seen[layer]])
            w = torch.cat([x[1] for x in seen[layer]])
            idx = torch.cat([x[2] for x in seen[layer]])
            for e in torch.unique(idx).tolist():
                tok, slot = (idx == e).nonzero(as_tuple=True)
                x, wt = h[tok].double(), w[tok, slot].double()
                mats = [getattr(moe, n)[e].double() for n in ("gate", "up", "down")]
                q = [torch.from_numpy(quantize_dequantize(m.float().numpy(), spec)) for m in mats]

                def ffn(g, u, d):
                    return (torch.nn.functional.silu(x @ g.T) * (x @ u.T)) @ d.T
                y, yq = ffn(*mats), ffn(*q)
                counts[layer, e] = len(tok)
                err[layer, e] = float(((wt[:, None] * (yq - y)) ** 2).sum())
                energy[layer, e] = float(((wt[:, None] * y) ** 2).sum())
            seen[layer].clear()
    total_c = counts.sum(axis=1, keepdims=True)
    total_e = err.sum(axis=1, keepdims=True)
    return {"frequency": np.divide(counts, total_c, out=np.zeros(shape), where=total_c > 0),
            "sensitivity": np.divide(err, energy, out=np.zeros(shape), where=energy > 0),
            "impact": np.divide(err, total_e, out=np.zeros(shape), where=total_e > 0)}


def top_experts(freq: np.ndarray, fraction: float) -> list[int]:
    """The round(fraction * n_expert) (at least 1) most-used experts of one layer, sorted by
    index (ties: the lower index first): 20 % of 8 experts is 2, of 32 experts 6."""
    if not 0 < fraction <= 1:
        raise SelectError(f"--top must be in (0, 1], got {fraction}")
    k = max(1, int(math.floor(fraction * len(freq) + 0.5)))
    order = sorted(range(len(freq)), key=lambda e: (-freq[e], e))
    return sorted(order[:k])
