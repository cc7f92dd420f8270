"""Layer selection: which layers to replicate (lrq-select).

    from lrq.select import QuantSpec, select_layers, choose, write_plan
    scores = select_layers("model.gguf", QuantSpec(bits=2, group_size=64), text="sotu-calib",
                           n_tokens=2048, ctx=512, measure_tokens=512)
    choice = choose([s.score for s in scores], "top-k", k=8)        # {layer: copies}
    write_plan("plan.json", choice, n_layer=len(scores))             # lrq-convert --plan plan.json

score.py has the method's formula, measure.py the activation capture (a subclass hook on the
torch reference) and the measured score, strategy.py the strategies and the plan file.
"""

from __future__ import annotations

import os

import numpy as np

from .score import (LINEARS, MASSIVE_FACTOR, MASSIVE_WEIGHT, ActStats, LayerScore, QuantSpec,
                    SelectError, quantize_dequantize, relative_error, relative_error_pairs, score)
from .strategy import STRATEGIES, choose, plan_dict, ranking, write_plan

__all__ = ["LINEARS", "MASSIVE_FACTOR", "MASSIVE_WEIGHT", "ActStats", "LayerScore", "QuantSpec",
           "SelectError", "quantize_dequantize", "relative_error", "relative_error_pairs", "score",
           "STRATEGIES", "choose", "plan_dict", "ranking", "write_plan", "select_layers"]


def select_layers(model_path: str | os.PathLike, spec: QuantSpec, text: str | os.PathLike = "sotu-calib",
                  n_tokens: int = 2048, ctx: int = 512, measure_tokens: int = 0,
                  threads: int | None = None, progress: bool = False) -> list[LayerScore]:
    """Score every base layer of a plain GGUF (see score.py); ``measure_tokens > 0`` also runs
    the measured score (KL / NLL increase with only that layer quantized) on that many tokens
    (the first windows of the same calibration text)."""
    import torch
    from tqdm import tqdm

    from ..quant import QuantError
    from ..reference import STREAM_BLOCKS
    from .measure import (CaptureReference, calib_tokens, capture_stats, layer_weights,
                          measured_loss, open_plain, set_threads)

    try:
        spec_check = np.zeros((1, 32), dtype=np.float32)
        quantize_dequantize(spec_check, spec)
    except QuantError as e:
        raise SelectError(f"quantizer options: {e}") from None
    if measure_tokens < 0:
        raise SelectError(f"--measure-tokens must be >= 0, got {measure_tokens}")
    set_threads(threads)
    model = open_plain(model_path)
    n_layer = model.hparams.n_layer
    windows = calib_tokens(model_path, text, max(n_tokens, measure_tokens), ctx)
    stat_windows = windows[: max(1, n_tokens // ctx)]
    # the score alone needs one pass, block by block: the source streamed; the measured score
    # runs the model from every layer on, so it keeps every block
    ref = CaptureReference(model, torch.float32, max_blocks=None if measure_tokens else STREAM_BLOCKS)
    stats = capture_stats(ref, stat_windows, progress)
    missing = [k for k in range(n_layer) if k not in stats]
    if missing:
        raise SelectError(f"{model_path}: no activations captured for layer(s) {missing}")

    quantized: dict[int, dict[str, np.ndarray]] = {}
    out: list[LayerScore] = []
    for k in tqdm(range(n_layer), desc="quant error", unit="layer", disable=not progress, leave=False):
        def pairs(k=k):       # one linear at a time: its error is summed, the weights dropped
            for name, w in layer_weights(model, k):
                wq = quantize_dequantize(w, spec)
                if measure_tokens:
                    quantized.setdefault(k, {})[name] = wq.astype(np.float32)
                yield w, wq
        err = relative_error_pairs(pairs())
        sens, mass = stats[k].sensitivity(), stats[k].massive()
        out.append(LayerScore(k, err, sens, mass, score(err, sens, mass)))
    del stats
    if measure_tokens:
        mw = windows[: max(1, measure_tokens // ctx)]
        for k, (kl, dnll) in measured_loss(ref, mw, quantized, progress).items():
            out[k].kl, out[k].dnll = kl, dnll
    return out
