"""Calibration activations: of the full-precision source, or of the model being quantized.

``SourceActivations`` runs ``lrq.reference.Reference`` on the source GGUF over calibration
windows and gives, per block L:

- ``block_input(L)`` / ``block_output(L)``: the residual stream entering / leaving block L,
  float32 ``[n_windows, window, n_embd]``;
- ``linear_stats(L)``: per linear, the sum X^T X over all calibration tokens of its input
  (float64 ``[n_in, n_in]``, GPTQ's Hessian up to a factor 2/n; not gathered with
  ``full_stats=False``), the token count, E[x_i^2] and max |x_i| per input channel;
- ``linear_inputs(L)``: the raw inputs ``[n_tokens, n_in]`` (memory heavy; for small models,
  tests and diagnostics).

The source's weights are loaded block by block as the stream reaches them (``STREAM_BLOCKS``
held at once, Reference's ``max_blocks``).  Nothing is kept for every layer at once except the
residual stream at the block inputs
(checkpoints, ``n_tokens * n_embd * 4`` bytes a layer, capped by ``max_checkpoint_bytes``: beyond
the cap only every k-th layer is kept and the rest recomputed).  The block math is the
reference's own (``Reference._block``): a block whose linears are wrapped to record their input.
q/k/v read the same normed input, as do gate/up, so their statistics are computed once.

``QuantizedStream`` is what sequential GPTQ needs instead: the residual stream of the model as
it is being quantized, layer after layer.  Block L's linears are quantized in the order their
inputs become available (``STAGES``): q/k/v from the attention norm of the stream that left the
already-quantized blocks 0..L-1, then attn_output from the attention computed with the quantized
q/k/v, then gate/up, then ffn_down from the quantized gate/up; the stream then moves on through
the quantized block.  Each stage is a pass of the reference's own block (``Reference._block``)
that stops at the linear whose input it records, so the block math is never written twice.
At 2 bits that stream drifts far from the float one (SmolLM2: cosine 0.49 after layer 15), and
Hessians of the float stream put GPTQ's error where the real inputs carry energy.

    >>> acts = SourceActivations("model.gguf", windows)          # doctest: +SKIP
    >>> st = acts.linear_stats(5)["ffn_down"]; st.xtx.shape, st.n  # doctest: +SKIP
    >>> qs = QuantizedStream("model.gguf", windows)               # doctest: +SKIP
    >>> w_hats = qs.quantize_layer(lambda name, st: my_quantizer(name, st))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..model_file import open_model
from ..reference import STREAM_BLOCKS, Reference
from ..reference.executor import _LINEARS, Block
from ..reference.ops import rope_angles

LINEARS = _LINEARS
# which linear's input each linear reads (q/k/v share the attention norm's output, gate/up the
# FFN norm's output)
SHARED_INPUT = {"attn_q": "attn_q", "attn_k": "attn_q", "attn_v": "attn_q",
                "attn_output": "attn_output", "ffn_gate": "ffn_gate", "ffn_up": "ffn_gate",
                "ffn_down": "ffn_down"}
DEFAULT_MAX_CHECKPOINT_BYTES = 2 << 30
# a block's linears grouped by the input they read, in the order the block computes them
STAGES = (("attn_q", "attn_k", "attn_v"), ("attn_output",), ("ffn_gate", "ffn_up"), ("ffn_down",))


@dataclass
class LinearStats:
    """Second-moment statistics of one linear's input over the calibration tokens."""
    xtx: np.ndarray | None   # float64 [n_in, n_in]: sum_t x_t x_t^T; None: not gathered (full=False)
    n: int                   # tokens
    abs_max: np.ndarray      # float64 [n_in]: max_t |x_t,i|
    sq_sum: np.ndarray       # float64 [n_in]: sum_t x_t,i^2 (in float64, with or without xtx)

    @property
    def sq_mean(self) -> np.ndarray:
        """E[x_i^2] per input channel (the importance of AWQ-style searches)."""
        return self.sq_sum / max(self.n, 1)


class _StatsSink:
    """Accumulates LinearStats of the inputs handed to it.  ``full``: also X^T X, n_in^2 float64
    (GPTQ needs it; act-mse and the low-rank initialisation need only E[x^2], and X^T X of a 32B
    model's ffn_down alone is 6.1 GB)."""

    def __init__(self, full: bool = True):
        self.full = full
        self.xtx = self.amax = self.sq = None
        self.n = 0

    def __call__(self, x):
        x = x.detach()
        sq = (x.to(torch.float64) ** 2).sum(dim=0).numpy()
        amax = x.abs().amax(dim=0).to(torch.float64).numpy()
        xtx = (x.T @ x).to(torch.float64).numpy() if self.full else None
        if self.n == 0:
            self.xtx, self.amax, self.sq = xtx, amax, sq
        else:
            if self.full:
                self.xtx += xtx
            self.amax = np.maximum(self.amax, amax)
            self.sq += sq
        self.n += x.shape[0]

    def stats(self) -> LinearStats:
        return LinearStats(self.xtx, self.n, self.amax, self.sq)


class _Recorder:
    """Wraps a reference Linear: calls it unchanged, hands its input to ``sink``."""

    def __init__(self, lin, sink):
        self.lin, self.sink = lin, sink

    def __call__(self, x):
        self.sink(x)
        return self.lin(x)


def rope_context(ref: Reference, n: int):
    """(pos, cos, sin) of positions 0..n-1 with the reference's rope settings."""
    hp = ref.hp
    pos = torch.arange(n)
    cos, sin = rope_angles(pos, hp.rope_dim, hp.rope_theta, ref._freq_scale, ref._freq_factors,
                           ref.dtype)
    return pos, cos, sin


def run_block(ref: Reference, blk: Block, x: torch.Tensor, ctx=None) -> torch.Tensor:
    """Block ``blk`` (the reference's math) on every window of x [n_win, T, d], each from an
    empty KV cache (positions 0..T-1).  Differentiable when blk's linears are."""
    pos, cos, sin = ctx if ctx is not None else rope_context(ref, x.shape[1])
    outs = []
    for w in range(x.shape[0]):
        cache = ref.new_cache()
        outs.append(ref._block(x[w], blk, cache, 0, pos, cos, sin))
    return torch.stack(outs)


class _Stream:
    """A model (the reference executor on ``source``) run on calibration windows [n, T]."""

    def __init__(self, source: str | os.PathLike, windows: np.ndarray, dtype: torch.dtype,
                 progress: bool, reference=None, full_stats: bool = True):
        """full_stats False: the statistics gathered hold E[x^2] and max |x| only (no X^T X)."""
        self.ref = (reference if reference is not None
                    else Reference(open_model(source), dtype, max_blocks=STREAM_BLOCKS))
        self.hp = self.ref.hp
        self.n_layer = self.hp.n_layer
        self.windows = np.asarray(windows, dtype=np.int64)
        if self.windows.ndim != 2:
            raise ValueError(f"windows must be [n_windows, window], got shape {self.windows.shape}")
        self.ctx = rope_context(self.ref, self.windows.shape[1])
        self.progress = progress
        self.full_stats = full_stats


class SourceActivations(_Stream):
    """The full-precision source on calibration windows, block by block (see module doc)."""

    def __init__(self, source: str | os.PathLike, windows: np.ndarray, *,
                 dtype: torch.dtype = torch.float32, progress: bool = False,
                 max_checkpoint_bytes: int = DEFAULT_MAX_CHECKPOINT_BYTES, reference=None,
                 full_stats: bool = True):
        super().__init__(source, windows, dtype, progress, reference, full_stats)
        x0 = self.ref.embed(self.windows)
        per_layer = x0.numel() * x0.element_size()
        self.stride = max(1, math.ceil(per_layer * self.n_layer / max(max_checkpoint_bytes, 1)))
        self._ckpt: dict[int, torch.Tensor] = {0: x0}
        self._stats_layer: int | None = None
        self._stats: dict[str, LinearStats] = {}

    @property
    def n_tokens(self) -> int:
        return int(self.windows.size)

    def block(self, layer: int) -> Block:
        return self.ref.blocks[(layer, 0)]

    def _advance(self, layer: int) -> torch.Tensor:
        """Residual stream entering ``layer`` (from the nearest checkpoint below)."""
        if not 0 <= layer <= self.n_layer:
            raise IndexError(f"layer {layer} outside 0..{self.n_layer}")
        start = max(k for k in self._ckpt if k <= layer)
        x = self._ckpt[start]
        bar = None
        if self.progress and layer - start > 1:
            from tqdm import tqdm
            bar = tqdm(total=layer - start, desc="calibration activations", unit="layer", leave=False)
        with torch.no_grad():
            for l in range(start, layer):
                x = run_block(self.ref, self.block(l), x, self.ctx)
                if (l + 1) % self.stride == 0 or l + 1 == self.n_layer:
                    self._ckpt[l + 1] = x
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return x

    def block_input(self, layer: int) -> torch.Tensor:
        return self._advance(layer)

    def block_output(self, layer: int) -> torch.Tensor:
        return self._advance(layer + 1)

    def _capture(self, layer: int, sink_for) -> torch.Tensor:
        blk = self.block(layer)
        wrapped = {n: (_Recorder(l, sink_for(n)) if SHARED_INPUT[n] == n else l)
                   for n, l in blk.lin.items()}
        rec = dataclasses.replace(blk, lin=wrapped)     # keeps a MoE block's router and experts
        with torch.no_grad():
            return run_block(self.ref, rec, self.block_input(layer), self.ctx)

    def linear_stats(self, layer: int) -> dict[str, LinearStats]:
        """{linear name: LinearStats} of block ``layer`` (the last layer asked is cached)."""
        if self._stats_layer == layer:
            return self._stats
        sinks: dict[str, _StatsSink] = {}
        self._capture(layer, lambda name: sinks.setdefault(name, _StatsSink(self.full_stats)))
        # a MoE block has no dense ffn_* linears (their inputs were never recorded)
        self._stats = {n: sinks[SHARED_INPUT[n]].stats() for n in LINEARS if SHARED_INPUT[n] in sinks}
        self._stats_layer = layer
        return self._stats

    def linear_inputs(self, layer: int) -> dict[str, torch.Tensor]:
        """{linear name: its inputs [n_tokens, n_in]} of block ``layer`` (all windows)."""
        got: dict[str, list] = {}

        def sink_for(name):
            return lambda x: got.setdefault(name, []).append(x.detach().clone())

        self._capture(layer, sink_for)
        return {n: torch.cat(got[SHARED_INPUT[n]]) for n in LINEARS if SHARED_INPUT[n] in got}


class _Stop(Exception):
    """Ends a block pass once the recorded linear's input is seen."""


class _Tap:
    """Wraps a reference Linear: hands its input to ``sink`` and stops the block there."""

    def __init__(self, sink):
        self.sink = sink

    def __call__(self, x):
        self.sink(x)
        raise _Stop


# quantize_fn(linear name, stats of its input on the quantized stream) -> the dequantized weight
# [n_out, n_in] the block should use from now on, or None to keep the source's weight
QuantizeFn = Callable[[str, LinearStats], "np.ndarray | None"]


class QuantizedStream(_Stream):
    """The quantized model's residual stream on calibration windows (see module doc).

    ``quantize_layer(fn)`` quantizes the next block (0, 1, ... in order) through ``fn`` and
    advances the stream through it; ``x`` is the stream entering block ``layer``."""

    def __init__(self, source: str | os.PathLike, windows: np.ndarray, *,
                 dtype: torch.dtype = torch.float32, progress: bool = False, reference=None,
                 full_stats: bool = True):
        super().__init__(source, windows, dtype, progress, reference, full_stats)
        self.x = self.ref.embed(self.windows)
        self.layer = 0

    @property
    def n_tokens(self) -> int:
        return int(self.windows.size)

    def _record(self, blk: Block, name: str) -> LinearStats:
        """Stats of linear ``name``'s input: block passes up to that linear, every window."""
        sink = _StatsSink(self.full_stats)
        tapped = dataclasses.replace(blk, lin={**blk.lin, name: _Tap(sink)})
        pos, cos, sin = self.ctx
        with torch.no_grad():
            for w in range(self.x.shape[0]):
                try:
                    self.ref._block(self.x[w], tapped, self.ref.new_cache(), 0, pos, cos, sin)
                except _Stop:
                    pass
        return sink.stats()

    def quantize_layer(self, quantize_fn: QuantizeFn) -> dict[str, np.ndarray | None]:
        """Quantize block ``self.layer`` stage by stage (``STAGES``) and advance the stream.
        Returns {linear: what quantize_fn returned}."""
        if self.layer >= self.n_layer:
            raise IndexError(f"every layer (0..{self.n_layer - 1}) is quantized already")
        blk = self.ref.blocks[(self.layer, 0)]
        lin = dict(blk.lin)
        out: dict[str, np.ndarray | None] = {}
        for stage in STAGES:
            st = self._record(dataclasses.replace(blk, lin=lin), stage[0])
            for name in stage:
                w_hat = out[name] = quantize_fn(name, st)
                if w_hat is not None:
                    want = tuple(lin[name].weight.shape)
                    if tuple(np.shape(w_hat)) != want:
                        raise ValueError(f"blk.{self.layer}.{name}: quantized weight has shape "
                                         f"{np.shape(w_hat)}, the source {want}")
                    lin[name] = dataclasses.replace(
                        lin[name], weight=torch.as_tensor(np.asarray(w_hat)).to(self.ref.dtype))
        with torch.no_grad():
            self.x = run_block(self.ref, dataclasses.replace(blk, lin=lin), self.x, self.ctx)
        self.layer += 1
        return out
