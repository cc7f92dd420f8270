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


STOCK_PARAMS = ("gain", "bias")


class StockReplicaLinear(torch.nn.Module):
    """A stock-typed weight (format v2, FORMAT.md 6.1) seen through one replica:

        y[t, o] = gain[o] * (clamp(x[t], -clip, clip) @ W[o]) + bias[o]  (+ the model's own bias)

    W (dequantized by gguf-py) is frozen; gain and bias are Parameters.  ``act_clip`` is the clip
    as a ratio of the largest |x| this module has seen (so the calibrator's clip-ratio search
    works for both kinds of weight); the file stores the absolute bound ``clip``.
    ``start_lsq`` / ``finish_lsq`` give the closed-form per-channel least-squares gain and bias
    that make this replica's outputs best match a reference weight's on the inputs seen between.
    """

    def __init__(self, w: np.ndarray, params: ReplicaParams | None = None,
                 model_bias: np.ndarray | None = None, learn: tuple[str, ...] = STOCK_PARAMS):
        super().__init__()
        p = params or ReplicaParams()
        w = np.asarray(w, dtype=np.float32)
        n_out = w.shape[0]
        self.n_out, self.n_in = w.shape
        self.learn = tuple(n for n in learn if n in STOCK_PARAMS)
        self.register_buffer("w", torch.from_numpy(w))
        self.register_buffer("model_bias", None if model_bias is None
                             else torch.as_tensor(np.asarray(model_bias, dtype=np.float32)))
        gain = p.gain if p.gain is not None else np.ones(n_out)
        bias = p.bias if p.bias is not None else np.zeros(n_out)
        self.gain = torch.nn.Parameter(torch.as_tensor(np.asarray(gain, np.float32)).reshape(n_out).clone(),
                                       requires_grad="gain" in self.learn)
        self.bias = torch.nn.Parameter(torch.as_tensor(np.asarray(bias, np.float32)).reshape(n_out).clone(),
                                       requires_grad="bias" in self.learn)
        self.clip = float(p.clip)
        self.absmax = 0.0              # largest |x| seen; frozen once a clip ratio is set
        self._absmax_frozen = False
        self._lsq: dict | None = None

    # the clip as a ratio of the largest input seen (1 = no clip)
    @property
    def act_clip(self) -> float:
        if not np.isfinite(self.clip) or self.absmax <= 0:
            return 1.0
        return min(1.0, self.clip / self.absmax)

    @act_clip.setter
    def act_clip(self, c: float) -> None:
        # the ratio's reference stays fixed from here on, so that a ratio read back (act_clip)
        # and set again gives the very bound that was evaluated
        self._absmax_frozen = True
        self.clip = float(np.float32(c * self.absmax)) if c < 1.0 and self.absmax > 0 else float("inf")

    def weight(self) -> torch.Tensor:
        return self.gain[:, None] * self.w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._absmax_frozen:
            self.absmax = max(self.absmax, float(x.detach().abs().max()))
        xc = x.clamp(-self.clip, self.clip) if np.isfinite(self.clip) else x
        q = xc @ self.w.T
        if self._lsq is not None:
            self._accumulate(x.detach(), q.detach())
        y = q * self.gain + self.bias
        if self.model_bias is not None:
            y = y + self.model_bias
        return y

    # ---- closed form --------------------------------------------------------------------------
    def start_lsq(self, w_ref: torch.Tensor) -> None:
        """Collect, over the next forward passes, the statistics of q = clamp(x) W^T against
        f = x W_ref^T, per output channel (float64)."""
        z = lambda: torch.zeros(self.n_out, dtype=torch.float64)
        self._lsq = {"w_ref": w_ref.to(torch.float32), "n": 0, "q": z(), "f": z(), "qq": z(), "qf": z()}

    def _accumulate(self, x: torch.Tensor, q: torch.Tensor) -> None:
        s = self._lsq
        f = (x @ s["w_ref"].T).reshape(-1, self.n_out).to(torch.float64)
        q = q.reshape(-1, self.n_out).to(torch.float64)
        s["n"] += q.shape[0]
        s["q"] += q.sum(0)
        s["f"] += f.sum(0)
        s["qq"] += (q * q).sum(0)
        s["qf"] += (q * f).sum(0)

    @torch.no_grad()
    def finish_lsq(self) -> None:
        """gain, bias = argmin sum_t (gain * q + bias - f)^2 per channel (only the learnable ones;
        a channel without variance keeps its values)."""
        s, self._lsq = self._lsq, None
        if not s or s["n"] == 0:
            return
        n = float(s["n"])
        if "bias" in self.learn:
            var = n * s["qq"] - s["q"] ** 2
            ok = var > 1e-12 * n * s["qq"].clamp_min(1e-300)
            g = torch.where(ok, (n * s["qf"] - s["q"] * s["f"]) / torch.where(ok, var, torch.ones_like(var)),
                            self.gain.double())
            if "gain" not in self.learn:
                g = self.gain.double()
            b = (s["f"] - g * s["q"]) / n
            self.gain.copy_(g.float())
            self.bias.copy_(b.float())
        elif "gain" in self.learn:
            ok = s["qq"] > 0
            g = torch.where(ok, s["qf"] / torch.where(ok, s["qq"], torch.ones_like(s["qq"])), self.gain.double())
            self.gain.copy_(g.float())

    # ---- the calibrator's interface (as ReplicaLinear) ----------------------------------------
    @torch.no_grad()
    def round_to_storage(self) -> None:
        """gain and bias are stored as F32, the clip bound as F32: nothing to round."""

    @torch.no_grad()
    def copy_from(self, other: "StockReplicaLinear") -> None:
        self.gain.copy_(other.gain)
        self.bias.copy_(other.bias)
        self.clip = other.clip

    def state(self) -> dict:
        return {"gain": self.gain.detach().clone(), "bias": self.bias.detach().clone(), "clip": self.clip}

    @torch.no_grad()
    def load(self, st: dict) -> None:
        self.gain.copy_(st["gain"])
        self.bias.copy_(st["bias"])
        self.clip = st["clip"]

    def export(self, params: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """{param: F32 array} for gain / bias among ``params``; ``clip`` when there is one."""
        out = {n: getattr(self, n).detach().numpy().astype(np.float32)
               for n in (params if params is not None else STOCK_PARAMS) if n in STOCK_PARAMS}
        if np.isfinite(self.clip):
            out["clip"] = np.array([self.clip], dtype=np.float32)
        return out

    def replica_params(self) -> ReplicaParams:
        g = lambda n: getattr(self, n).detach().numpy().astype(np.float64)
        return ReplicaParams(gain=g("gain"), bias=g("bias"), clip=self.clip)
