"""Calibration tokens, activation capture and the measured per-layer loss, on the torch reference.

**The capture hook.**  ``CaptureReference`` subclasses lrq.reference.Reference and overrides its
per-block method ``_block(x, blk, cache, slot, ...)`` to record ``x`` — the residual stream
entering the block — before calling the original.  Nothing in the executor changes; the hook
depends on ``_block``'s signature and on ``slot`` being the execution index (documented in
executor.py).  It runs in float32 (a faster check than the float64 oracle; statistics are
accumulated in float64).

**The measured score.**  For layer k only, the seven block linears are replaced by their
quantized versions Q(W); the model runs on the calibration windows and we record
``KL(p_ref || p_k)`` (mean over all positions, nats) and the increase of the next-token NLL.
The input of layer k is unchanged by construction, so each run restarts from the reference's
captured input of layer k (layers 0..k-1 are not recomputed).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch

from ..model_file import open_model
from ..reference import Reference, rms_norm, rope_angles
from .score import LINEARS, ActStats, QuantSpec, SelectError, quantize_dequantize


def calib_tokens(model_path: str | os.PathLike, text: str | os.PathLike, n_tokens: int,
                 ctx: int) -> np.ndarray:
    """``n_tokens // ctx`` windows [n_win, ctx] of the text, tokenized by llama.cpp with the
    model's BOS policy; when the vocab adds BOS, each window starts with it (as llama-perplexity
    does).  Only as much text as needed is tokenized."""
    from .. import _native
    from ..assets import AssetError, text as read_text
    if ctx < 2:
        raise SelectError(f"--ctx must be >= 2, got {ctx}")
    n_win = n_tokens // ctx
    if n_win < 1:
        raise SelectError(f"--tokens {n_tokens} is less than one window of --ctx {ctx}")
    try:
        body = read_text(text)
    except AssetError as e:
        raise SelectError(str(e)) from None
    m = open_model(model_path)
    native = _native.Model(str(model_path), n_ctx=ctx, vocab_only=True)
    need = n_win * ctx
    chars = need * 8                       # ~4 characters per token in English; 2x margin
    while True:
        try:
            toks = np.asarray(native.tokenize(body[:chars], True), dtype=np.int64)
        except Exception as e:   # e.g. an SPM vocab without byte tokens meets an unknown char
            raise SelectError(f"{model_path}: llama.cpp cannot tokenize text '{os.fspath(text)}' "
                              f"with this vocabulary ({type(e).__name__}: {e})") from None
        if len(toks) >= need or chars >= len(body):
            break
        chars *= 2
    if len(toks) < need:
        raise SelectError(f"text '{os.fspath(text)}' has {len(toks)} tokens; {n_win} windows of {ctx} "
                          f"need {need}")
    win = toks[:need].reshape(n_win, ctx).copy()
    if m.add_bos:
        if m.bos_id is None:
            raise SelectError(f"{model_path}: the vocab adds BOS but has no BOS id")
        win[:, 0] = m.bos_id
    return win


class CaptureReference(Reference):
    """Reference that records each block's input (see the module doc)."""

    def __init__(self, model, dtype: torch.dtype = torch.float32, max_blocks: int | None = None):
        super().__init__(model, dtype, max_blocks)
        self.stats: dict[int, ActStats] | None = None
        self.inputs: dict[int, torch.Tensor] | None = None

    def _block(self, x, blk, cache, slot, pos, cos, sin):
        layer = self.schedule[slot].layer
        if self.stats is not None:
            self.stats.setdefault(layer, ActStats()).add(x.numpy())
        if self.inputs is not None:
            self.inputs[layer] = x
        return super()._block(x, blk, cache, slot, pos, cos, sin)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return rms_norm(x, self.output_norm, self.hp.rms_eps) @ self.output.T

    def run_from(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Logits of a window whose residual entering ``layer`` is ``x`` (positions 0..n-1,
        fresh caches).  Only serial schedules (plain models) are supported."""
        hp, n = self.hp, x.shape[0]
        pos = torch.arange(n)
        cos, sin = rope_angles(pos, hp.rope_dim, hp.rope_theta, self._freq_scale,
                               self._freq_factors, self.dtype)
        cache = self.new_cache()
        with torch.no_grad():
            for s in self.steps:
                if s.layer < layer:
                    continue
                x = self._block(x, self.blocks[(s.layer, s.replicas[0])], cache, s.execs[0], pos, cos, sin)
        return self.head(x)


def open_plain(model_path: str | os.PathLike):
    m = open_model(model_path)
    if getattr(m, "format_version", None) is not None or any(e.replica for e in m.schedule):
        raise SelectError(f"{model_path}: is an LRQ file; select layers on the source model")
    return m


def capture_stats(ref: CaptureReference, windows: np.ndarray, progress: bool = False) -> dict[int, ActStats]:
    """Input statistics of every layer over the windows.  The windows go through the model block
    by block (all of them through block k, then block k + 1), so a streamed reference
    (``max_blocks``) holds one block at a time; each block's input is recorded window by window
    in window order, the order of a window-by-window pass, so the sums are the same."""
    from tqdm import tqdm
    windows = np.asarray(windows, dtype=np.int64)
    hp = ref.hp
    pos = torch.arange(windows.shape[1])
    cos, sin = rope_angles(pos, hp.rope_dim, hp.rope_theta, ref._freq_scale, ref._freq_factors, ref.dtype)
    ref.stats, ref.inputs = {}, None
    try:
        x = ref.embed(windows)
        with torch.no_grad():
            for s in tqdm(ref.steps, desc="capture", unit="layer", disable=not progress, leave=False):
                blk = ref.blocks[(s.layer, s.replicas[0])]
                x = torch.stack([ref._block(x[w], blk, ref.new_cache(), s.execs[0], pos, cos, sin)
                                 for w in range(x.shape[0])])
        return ref.stats
    finally:
        stats, ref.stats = ref.stats, None
        del stats


def layer_weights(model, layer: int) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float64 weight) of the layer's quantizable block linears (n_in a multiple of 32),
    loaded one at a time: a caller that drops each weight before the next holds one linear, not
    the block (a float64 block of Qwen2.5-32B is 3.9 GB)."""
    found = False
    for lin in LINEARS:
        name = f"blk.{layer}.{lin}.weight"
        w = model.tensor(name)
        if w.ndim == 2 and w.shape[1] % 32 == 0:
            found = True
            yield name, w
        del w
    if not found:
        raise SelectError(f"{getattr(model, 'path', 'model')}: layer {layer} has no quantizable linear")


def _log_softmax(l: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(l.to(torch.float64), dim=-1)


def measured_loss(ref: CaptureReference, windows: np.ndarray, quantized: dict[int, dict[str, np.ndarray]],
                  progress: bool = False) -> dict[int, tuple[float, float]]:
    """{layer: (mean KL(ref || only-this-layer-quantized), NLL increase)} over the windows."""
    from tqdm import tqdm
    layers = sorted(quantized)
    kl = {k: 0.0 for k in layers}
    dnll = {k: 0.0 for k in layers}
    n_pos = n_tgt = 0
    bar = tqdm(total=len(windows) * len(layers), desc="measure", unit="layer", disable=not progress,
               leave=False)
    for w in windows:
        ref.stats, ref.inputs = None, {}
        x = ref.hidden(w)
        inputs, ref.inputs = ref.inputs, None
        lp_ref = _log_softmax(ref.head(x))
        tgt = torch.as_tensor(w[1:])
        nll_ref = -lp_ref[:-1].gather(1, tgt[:, None]).sum().item()
        p_ref = lp_ref.exp()
        for k in layers:
            blk = ref.blocks[(k, 0)]
            saved = {}
            for name, wq in quantized[k].items():
                lin = name.split(".")[2]
                saved[lin] = blk.lin[lin].weight
                blk.lin[lin].weight = torch.from_numpy(np.asarray(wq)).to(ref.dtype)
            try:
                lp = _log_softmax(ref.run_from(inputs[k], k))
            finally:
                for lin, t in saved.items():
                    blk.lin[lin].weight = t
            kl[k] += float((p_ref * (lp_ref - lp)).sum().item())
            dnll[k] += -lp[:-1].gather(1, tgt[:, None]).sum().item() - nll_ref
            bar.update(1)
        n_pos += len(w)
        n_tgt += len(w) - 1
    bar.close()
    return {k: (kl[k] / n_pos, dnll[k] / n_tgt) for k in layers}


def quantized_layer(model, layer: int, spec: QuantSpec) -> dict[str, np.ndarray]:
    """Q(W) (float32) of the layer's quantizable linears."""
    return {n: quantize_dequantize(w, spec).astype(np.float32) for n, w in layer_weights(model, layer)}


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(int(threads))


__all__ = ["calib_tokens", "CaptureReference", "capture_stats", "measured_loss", "layer_weights",
           "quantized_layer", "open_plain", "set_threads"]
