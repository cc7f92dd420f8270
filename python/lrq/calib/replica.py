"""A differentiable torch form of FORMAT.md §6 (replica dequantization over shared codes).

    W_r[o, i] = gamma[o] * ( alpha[o, G] * d[o, G] * (level(q[o, i]) + beta[o, G]) + m[o, G] )
    y_r[t, o] = sum_i W_r[o, i] * act(x)[t, i] + bias[o]  (+ the model's own bias, e.g. qwen2 q/k/v)

``ReplicaLinear`` holds the frozen codes (as float levels), the frozen fp16 base parameters d
and m, and the replica's parameters alpha (scale_mult), beta (grid_offset), gamma (gain) and bias
as torch Parameters (alpha and beta of shape [n_out, n_groups] or [n_out, 1]); the activation
clip ratio c and bits k are plain attributes.  ``export()`` gives the tensors to write with
``lrq.convert.update.set_replica_params`` (F16 alpha / beta, F32 gain / bias / act);
``round_to_storage()`` rounds alpha and beta to fp16 in place so what is evaluated is what is
written.
"""

from __future__ import annotations

import numpy as np
import torch

from ..quant import QuantizedTensor, ReplicaParams, group_index, unpack, zero_point
from ..reference.ops import act_clip_quant

PARAMS = ("scale_mult", "grid_offset", "gain", "bias")
GRANULARITIES = ("group", "channel")


def _init(value, n_out: int, ng: int, width: int, default: float) -> torch.Tensor:
    """A stored [n_out, ng] | [n_out, 1] | [1, 1] parameter (or None) as [n_out, width]
    (width = ng or 1; a per-group stored value keeps its own width)."""
    if value is None:
        return torch.full((n_out, width), default, dtype=torch.float32)
    v = torch.as_tensor(np.asarray(value, dtype=np.float32))
    if v.ndim == 1:
        v = v.reshape(-1, 1)
    if v.shape == (n_out, ng):
        return v.clone()
    return v.expand(n_out, width).clone()


class ReplicaLinear(torch.nn.Module):
    """One LRQ weight seen through one replica's parameters (see the module doc)."""

    def __init__(self, qt: QuantizedTensor, params: ReplicaParams | None = None,
                 model_bias: np.ndarray | None = None, granularity: str = "channel",
                 learn: tuple[str, ...] = PARAMS):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        unknown = set(learn) - set(PARAMS)
        if unknown:
            raise ValueError(f"unknown replica parameter(s) {sorted(unknown)}; known: {PARAMS}")
        p = params or ReplicaParams()
        n_out, n_in, ng = qt.n_out, qt.n_in, qt.n_groups
        self.n_out, self.n_in, self.n_groups, self.group_size = n_out, n_in, ng, qt.group_size
        self.learn = tuple(learn)
        level = unpack(qt.codes, qt.bits, n_in).astype(np.float32) - np.float32(zero_point(qt.bits, qt.mode))
        self.register_buffer("gidx", torch.from_numpy(group_index(n_in, qt.group_size)))
        gi = group_index(n_in, qt.group_size)
        d = qt.scale.astype(np.float32)[:, gi]
        # per-weight d, d * level and m, expanded once (the fit rebuilds W every step)
        self.register_buffer("d_w", torch.from_numpy(d))
        self.register_buffer("dl_w", torch.from_numpy(d * level))
        self.register_buffer("m_w", None if qt.min is None
                             else torch.from_numpy(qt.min.astype(np.float32)[:, gi]))
        self.register_buffer("model_bias", None if model_bias is None
                             else torch.as_tensor(np.asarray(model_bias, dtype=np.float32)))
        width = ng if granularity == "group" else 1
        self.scale_mult = torch.nn.Parameter(_init(p.scale_mult, n_out, ng, width, 1.0),
                                             requires_grad="scale_mult" in learn)
        self.grid_offset = torch.nn.Parameter(_init(p.grid_offset, n_out, ng, width, 0.0),
                                              requires_grad="grid_offset" in learn)
        gain = p.gain if (p.gain is not None) else np.ones(n_out)
        self.gain = torch.nn.Parameter(torch.as_tensor(np.asarray(gain, np.float32)).reshape(n_out).clone(),
                                       requires_grad="gain" in learn)
        bias = p.bias if p.bias is not None else np.zeros(n_out)
        self.bias = torch.nn.Parameter(torch.as_tensor(np.asarray(bias, np.float32)).reshape(n_out).clone(),
                                       requires_grad="bias" in learn)
        self.act_clip = float(p.act_clip)
        self.act_bits = int(p.act_bits)

    def _expand(self, p: torch.Tensor) -> torch.Tensor:
        return p[:, self.gidx] if p.shape[1] > 1 else p

    def base_weight(self) -> torch.Tensor:
        """alpha * d * (level + beta) + m (without the gain), float32 [n_out, n_in]."""
        # alpha * d * (level + beta) + m = alpha * (d * level + d * beta) + m
        w = self._expand(self.scale_mult) * (self.dl_w + self.d_w * self._expand(self.grid_offset))
        if self.m_w is not None:
            w = w + self.m_w
        return w

    def weight(self) -> torch.Tensor:
        """W_r of FORMAT.md §6, gain included."""
        return self.gain[:, None] * self.base_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (act_clip_quant(x, self.act_clip, self.act_bits) @ self.base_weight().T) * self.gain + self.bias
        if self.model_bias is not None:
            y = y + self.model_bias
        return y

    @torch.no_grad()
    def round_to_storage(self) -> None:
        """alpha and beta are stored as F16, gain and bias as F32: round them in place."""
        self.scale_mult.copy_(self.scale_mult.half().float())
        self.grid_offset.copy_(self.grid_offset.half().float())

    @torch.no_grad()
    def copy_from(self, other: "ReplicaLinear") -> None:
        for n in PARAMS:
            getattr(self, n).copy_(getattr(other, n))
        self.act_clip, self.act_bits = other.act_clip, other.act_bits

    def state(self) -> dict:
        return {**{n: getattr(self, n).detach().clone() for n in PARAMS},
                "act": (self.act_clip, self.act_bits)}

    @torch.no_grad()
    def load(self, st: dict) -> None:
        for n in PARAMS:
            getattr(self, n).copy_(st[n])
        self.act_clip, self.act_bits = st["act"]

    def export(self, params: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """{param: array} in storage types (scale_mult / grid_offset F16, gain / bias / act F32);
        ``act`` only when it is not the default (c = 1, k = 0)."""
        out = {}
        for n in (params if params is not None else PARAMS):
            v = getattr(self, n).detach().numpy()
            out[n] = v.astype(np.float16) if n in ("scale_mult", "grid_offset") else v.astype(np.float32)
        if self.act_clip != 1.0 or self.act_bits != 0:
            out["act"] = np.array([self.act_clip, self.act_bits], dtype=np.float32)
        return out

    def replica_params(self) -> ReplicaParams:
        """The current parameters as lrq.quant.ReplicaParams (float64), for the numpy reference."""
        g = lambda n: getattr(self, n).detach().numpy().astype(np.float64)
        return ReplicaParams(scale_mult=g("scale_mult"), grid_offset=g("grid_offset"),
                             gain=g("gain"), bias=g("bias"), act_clip=self.act_clip,
                             act_bits=self.act_bits)
