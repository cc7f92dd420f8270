"""A differentiable torch form of FORMAT.md §6 (replica dequantization over shared codes).

    W_r[o, i] = gamma[o] * ( alpha[o, G] * d[o, G] * (level(q[o, i]) + beta[o, G]) + m[o, G] )
    y_r[t, o] = sum_i W_r[o, i] * act(x)[t, i] + bias[o]  (+ the model's own bias, e.g. qwen2 q/k/v)

``ReplicaLinear`` holds the frozen codes (packed, as in the file), the frozen fp16 base
parameters d and m (one per group), and the replica's parameters alpha (scale_mult), beta
(grid_offset), gamma (gain) and bias as torch Parameters (alpha and beta of shape
[n_out, n_groups] or [n_out, 1]); the activation clip ratio c and bits k are plain attributes.  ``export()`` gives the tensors to write with
``lrq.convert.update.set_replica_params`` (F16 alpha / beta, F32 gain / bias / act);
``round_to_storage()`` rounds alpha and beta to fp16 in place so what is evaluated is what is
written.

Both module kinds may carry a low-rank correction (format v3, FORMAT.md 6.2), the Parameters
``lr_u`` [n_out, k] and ``lr_v`` [k, n_in] (None without one): ``y += (x @ V^T) @ U^T`` with x
the unclipped input.  ``init_lowrank`` sets them from the truncated SVD of the
activation-weighted error between a full-precision weight and the replica's (``lowrank_init``);
they are stored as F16.
"""

from __future__ import annotations

import numpy as np
import torch

from ..quant import QuantizedTensor, ReplicaParams, group_index, unpack_torch, zero_point
from ..reference.ops import act_clip_quant

PARAMS = ("scale_mult", "grid_offset", "gain", "bias")
GRANULARITIES = ("group", "channel")
LOWRANK = ("lr_u", "lr_v")
# E[x_i^2] below this fraction of its mean over the inputs is raised to it before D^-1 is taken
# (an input channel the calibration text never excites would otherwise give V an infinite column)
SQ_MEAN_FLOOR = 1e-6


def lowrank_init(w_float, w_replica, sq_mean, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(U [n_out, rank], V [rank, n_in]) float32 minimising ||(W - W_r - U V) D||_F, D =
    diag(sqrt(E[x^2])): the truncated SVD (E - P S Q^T) of E = (W - W_r) D, U = P_k S_k^1/2,
    V = S_k^1/2 Q_k^T D^-1 (LQER / EoRA).  The output error of x -> U V x on inputs with those
    second moments (uncorrelated) is then the tail sum of S^2 (Eckart-Young)."""
    w_float = torch.as_tensor(np.asarray(w_float, dtype=np.float64))
    w_replica = torch.as_tensor(np.asarray(w_replica, dtype=np.float64))
    sq = torch.as_tensor(np.asarray(sq_mean, dtype=np.float64)).clamp_min(0)
    d = torch.sqrt(torch.clamp(sq, min=SQ_MEAN_FLOOR * float(sq.mean()) + 1e-300))
    n_out, n_in = w_float.shape
    if not 1 <= rank <= min(n_out, n_in):
        raise ValueError(f"rank {rank} is outside 1..{min(n_out, n_in)}")
    p, sv, qt = torch.linalg.svd((w_float - w_replica) * d[None, :], full_matrices=False)
    root = torch.sqrt(sv[:rank])
    u = p[:, :rank] * root[None, :]
    v = root[:, None] * qt[:rank] / d[None, :]
    return u.float().numpy(), v.float().numpy()


class _LowRank:
    """The low-rank correction shared by both module kinds (mixed into torch.nn.Module)."""

    def _init_lowrank_params(self, p: ReplicaParams, rank: int) -> None:
        """rank > 0: zero factors of that rank (``init_lowrank`` gives them values); rank 0:
        the file's own factors, if the replica has any (trained too)."""
        if rank > 0:
            u, v = np.zeros((self.n_out, rank), np.float32), np.zeros((rank, self.n_in), np.float32)
        elif p.lr_u is not None:
            u, v = np.asarray(p.lr_u, np.float32), np.asarray(p.lr_v, np.float32)
        else:
            self.register_parameter("lr_u", None)
            self.register_parameter("lr_v", None)
            return
        self.lr_u = torch.nn.Parameter(torch.from_numpy(np.array(u)))
        self.lr_v = torch.nn.Parameter(torch.from_numpy(np.array(v)))

    @property
    def rank(self) -> int:
        return 0 if self.lr_u is None else int(self.lr_u.shape[1])

    def lowrank_term(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.lr_u is None:
            return None
        return (x @ self.lr_v.T) @ self.lr_u.T

    @torch.no_grad()
    def init_lowrank(self, w_float, sq_mean) -> None:
        """Factors from the SVD of (w_float - this replica's weight) diag(sqrt(sq_mean))."""
        if self.lr_u is None:
            return
        w = self.weight().detach().numpy()
        u, v = lowrank_init(w_float, w, sq_mean, self.rank)
        self.lr_u.copy_(torch.from_numpy(u))
        self.lr_v.copy_(torch.from_numpy(v))

    @torch.no_grad()
    def _round_lowrank(self) -> None:
        if self.lr_u is not None:
            self.lr_u.copy_(self.lr_u.half().float())
            self.lr_v.copy_(self.lr_v.half().float())

    @torch.no_grad()
    def _copy_lowrank(self, other) -> None:
        if self.lr_u is not None and other.lr_u is not None:
            self.lr_u.copy_(other.lr_u)
            self.lr_v.copy_(other.lr_v)

    def _lowrank_state(self) -> dict:
        return {} if self.lr_u is None else {n: getattr(self, n).detach().clone() for n in LOWRANK}

    @torch.no_grad()
    def _load_lowrank(self, st: dict) -> None:
        if self.lr_u is not None and "lr_u" in st:
            self.lr_u.copy_(st["lr_u"])
            self.lr_v.copy_(st["lr_v"])

    def _export_lowrank(self) -> dict[str, np.ndarray]:
        """float32 factors (set_replica_params stores them as F16)."""
        return {} if self.lr_u is None else {n: getattr(self, n).detach().numpy().astype(np.float32)
                                             for n in LOWRANK}

    def _lowrank_params(self) -> dict:
        return {} if self.lr_u is None else {n: getattr(self, n).detach().numpy().astype(np.float64)
                                             for n in LOWRANK}


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


class _ReplicaMatmul(torch.autograd.Function):
    """x @ W^T for W = alpha * (d * level + d * beta) + m (``ReplicaLinear.base_weight``), W rebuilt
    from the codes in backward instead of kept: autograd would keep d, the bracket and W itself,
    12 bytes per weight for every linear of a block until its backward.  alpha and beta come in
    as the module expands them ([n_out, 1] or [n_out, n_in]); the backward makes the products and
    reductions autograd makes, in its order, so the gradients are the same bits
    (tests/test_calib.py)."""

    @staticmethod
    def forward(ctx, x, alpha, beta, mod):
        with torch.no_grad():
            w = mod._compose(alpha, beta)
        ctx.save_for_backward(x, alpha, beta)
        ctx.mod = mod
        x2 = x.reshape(-1, x.shape[-1])
        return (x2 @ w.T).reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, gy):
        x, alpha, beta = ctx.saved_tensors
        mod = ctx.mod
        with torch.no_grad():
            w, inner, d = mod._compose_parts(alpha, beta)
            x2, g2 = x.reshape(-1, x.shape[-1]), gy.reshape(-1, gy.shape[-1])
            gx = (g2 @ w).reshape(x.shape) if ctx.needs_input_grad[0] else None
            ga = gb = None
            if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
                gw = g2.T @ x2                          # autograd's gradient of W in x @ W.T
                if ctx.needs_input_grad[1]:
                    ga = _sum_to(gw * inner, alpha.shape)
                if ctx.needs_input_grad[2]:
                    gb = _sum_to((gw * alpha) * d, beta.shape)
        return gx, ga, gb, None


def _sum_to(g: torch.Tensor, shape) -> torch.Tensor:
    """autograd's reduction of a broadcast operand's gradient to its shape."""
    return g.sum(dim=1, keepdim=True) if tuple(shape) != tuple(g.shape) else g


class ReplicaLinear(_LowRank, torch.nn.Module):
    """One LRQ weight seen through one replica's parameters (see the module doc)."""

    def __init__(self, qt: QuantizedTensor, params: ReplicaParams | None = None,
                 model_bias: np.ndarray | None = None, granularity: str = "channel",
                 learn: tuple[str, ...] = PARAMS, lowrank: int = 0):
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
        # The codes stay packed (bits / 8 bytes per weight) and d / m one value per group: W is
        # rebuilt from them at every step (per-weight float32 buffers would hold 12 more bytes per
        # weight for as long as the module lives; RESULTS "How the pipeline grows with the
        # model").  The float32 operations are those of the expanded form: the same bits.
        self.register_buffer("codes", torch.from_numpy(np.array(qt.codes, dtype=np.uint8)))
        self.bits = qt.bits
        self.zero_point = float(np.float32(zero_point(qt.bits, qt.mode)))
        self.register_buffer("gidx", torch.from_numpy(group_index(n_in, qt.group_size)))
        self.register_buffer("d", torch.from_numpy(qt.scale.astype(np.float32)))
        self.register_buffer("m", None if qt.min is None else torch.from_numpy(qt.min.astype(np.float32)))
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
        self._init_lowrank_params(p, lowrank)

    def _expand(self, p: torch.Tensor) -> torch.Tensor:
        return p[:, self.gidx] if p.shape[1] > 1 else p

    def _level(self) -> torch.Tensor:
        return unpack_torch(self.codes, self.bits, self.n_in).to(torch.float32) - self.zero_point

    def _compose_parts(self, alpha: torch.Tensor, beta: torch.Tensor):
        """(W, the bracket d * level + d * beta, d expanded): W = alpha * bracket + m."""
        # alpha * d * (level + beta) + m = alpha * (d * level + d * beta) + m
        d = self.d[:, self.gidx]
        inner = d * self._level() + d * beta
        w = alpha * inner
        if self.m is not None:
            w = w + self.m[:, self.gidx]
        return w, inner, d

    def _compose(self, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        return self._compose_parts(alpha, beta)[0]

    def base_weight(self) -> torch.Tensor:
        """alpha * d * (level + beta) + m (without the gain), float32 [n_out, n_in]."""
        return self._compose(self._expand(self.scale_mult), self._expand(self.grid_offset))

    def weight(self) -> torch.Tensor:
        """W_r of FORMAT.md §6, gain included."""
        return self.gain[:, None] * self.base_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _ReplicaMatmul.apply(act_clip_quant(x, self.act_clip, self.act_bits),
                                 self._expand(self.scale_mult), self._expand(self.grid_offset), self) \
            * self.gain + self.bias
        lr = self.lowrank_term(x)
        if lr is not None:
            y = y + lr
        if self.model_bias is not None:
            y = y + self.model_bias
        return y

    @torch.no_grad()
    def round_to_storage(self) -> None:
        """alpha, beta and the low-rank factors are stored as F16, gain and bias as F32: round
        them in place."""
        self.scale_mult.copy_(self.scale_mult.half().float())
        self.grid_offset.copy_(self.grid_offset.half().float())
        self._round_lowrank()

    @torch.no_grad()
    def copy_from(self, other: "ReplicaLinear") -> None:
        for n in PARAMS:
            getattr(self, n).copy_(getattr(other, n))
        self.act_clip, self.act_bits = other.act_clip, other.act_bits
        self._copy_lowrank(other)

    def state(self) -> dict:
        return {**{n: getattr(self, n).detach().clone() for n in PARAMS},
                "act": (self.act_clip, self.act_bits), **self._lowrank_state()}

    @torch.no_grad()
    def load(self, st: dict) -> None:
        for n in PARAMS:
            getattr(self, n).copy_(st[n])
        self.act_clip, self.act_bits = st["act"]
        self._load_lowrank(st)

    def export(self, params: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """{param: array} in storage types (scale_mult / grid_offset F16, gain / bias / act F32);
        ``act`` only when it is not the default (c = 1, k = 0); the low-rank factors (float32)
        whenever the module has them."""
        out = {}
        for n in (params if params is not None else PARAMS):
            v = getattr(self, n).detach().numpy()
            out[n] = v.astype(np.float16) if n in ("scale_mult", "grid_offset") else v.astype(np.float32)
        if self.act_clip != 1.0 or self.act_bits != 0:
            out["act"] = np.array([self.act_clip, self.act_bits], dtype=np.float32)
        out.update(self._export_lowrank())
        return out

    def replica_params(self) -> ReplicaParams:
        """The current parameters as lrq.quant.ReplicaParams (float64), for the numpy reference."""
        g = lambda n: getattr(self, n).detach().numpy().astype(np.float64)
        return ReplicaParams(scale_mult=g("scale_mult"), grid_offset=g("grid_offset"),
                             gain=g("gain"), bias=g("bias"), act_clip=self.act_clip,
                             act_bits=self.act_bits, **self._lowrank_params())


STOCK_PARAMS = ("gain", "bias")


class StockReplicaLinear(_LowRank, torch.nn.Module):
    """A stock-typed weight (format v2, FORMAT.md 6.1) seen through one replica:

        y[t, o] = gain[o] * (clamp(x[t], -clip, clip) @ W[o]) + bias[o]  (+ the model's own bias)

    W (dequantized by gguf-py) is frozen; gain and bias are Parameters.  ``act_clip`` is the clip
    as a ratio of the largest |x| this module has seen (so the calibrator's clip-ratio search
    works for both kinds of weight); the file stores the absolute bound ``clip``.
    ``start_lsq`` / ``finish_lsq`` give the closed-form per-channel least-squares gain and bias
    that make this replica's outputs best match a reference weight's on the inputs seen between.
    """

    def __init__(self, w: np.ndarray, params: ReplicaParams | None = None,
                 model_bias: np.ndarray | None = None, learn: tuple[str, ...] = STOCK_PARAMS,
                 lowrank: int = 0):
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
        self._init_lowrank_params(p, lowrank)

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
        lr = self.lowrank_term(x)
        if self._lsq is not None:
            self._accumulate(x.detach(), q.detach(), None if lr is None else lr.detach())
        y = q * self.gain + self.bias
        if lr is not None:
            y = y + lr
        if self.model_bias is not None:
            y = y + self.model_bias
        return y

    # ---- closed form --------------------------------------------------------------------------
    def start_lsq(self, w_ref: torch.Tensor) -> None:
        """Collect, over the next forward passes, the statistics of q = clamp(x) W^T against
        f = x W_ref^T minus this replica's low-rank term, per output channel (float64)."""
        z = lambda: torch.zeros(self.n_out, dtype=torch.float64)
        self._lsq = {"w_ref": w_ref.to(torch.float32), "n": 0, "q": z(), "f": z(), "qq": z(), "qf": z()}

    def _accumulate(self, x: torch.Tensor, q: torch.Tensor, lr: torch.Tensor | None) -> None:
        s = self._lsq
        f = x @ s["w_ref"].T
        if lr is not None:
            f = f - lr
        f = f.reshape(-1, self.n_out).to(torch.float64)
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
        """gain and bias are stored as F32, the clip bound as F32, the low-rank factors as F16:
        round those."""
        self._round_lowrank()

    @torch.no_grad()
    def copy_from(self, other: "StockReplicaLinear") -> None:
        self.gain.copy_(other.gain)
        self.bias.copy_(other.bias)
        self.clip = other.clip
        self._copy_lowrank(other)

    def state(self) -> dict:
        return {"gain": self.gain.detach().clone(), "bias": self.bias.detach().clone(), "clip": self.clip,
                **self._lowrank_state()}

    @torch.no_grad()
    def load(self, st: dict) -> None:
        self.gain.copy_(st["gain"])
        self.bias.copy_(st["bias"])
        self.clip = st["clip"]
        self._load_lowrank(st)

    def export(self, params: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """{param: F32 array} for gain / bias among ``params``; ``clip`` when there is one; the
        low-rank factors (float32) whenever the module has them."""
        out = {n: getattr(self, n).detach().numpy().astype(np.float32)
               for n in (params if params is not None else STOCK_PARAMS) if n in STOCK_PARAMS}
        if np.isfinite(self.clip):
            out["clip"] = np.array([self.clip], dtype=np.float32)
        out.update(self._export_lowrank())
        return out

    def replica_params(self) -> ReplicaParams:
        g = lambda n: getattr(self, n).detach().numpy().astype(np.float64)
        return ReplicaParams(gain=g("gain"), bias=g("bias"), clip=self.clip, **self._lowrank_params())
