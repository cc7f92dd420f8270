"""The reference's building blocks, written to mirror ggml's CPU operators term by term.

Shapes: activations are ``[n_tokens, n_features]``; per-head tensors ``[n_heads, n_tokens, d]``.
Every function computes in the dtype of its inputs (float64 for the oracle).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """ggml_rms_norm then ggml_mul: x / sqrt(mean(x^2) + eps) * weight (over the last dim)."""
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def act_clip_quant(x: torch.Tensor, clip: float, bits: int) -> torch.Tensor:
    """LRQ activation clip/quant of a matmul input, per token (row) t (lrq-design.md):

    a_t = max|x_t|; xc = clamp(x, -c a_t, c a_t); k > 0: s_t = c a_t / (2^(k-1) - 1),
    xa = round_half_even(xc / s_t) * s_t (s_t = 0 -> 0); k == 0: xa = xc.
    """
    if clip == 1.0 and bits == 0:
        return x          # clamping at max|x| is the identity
    if not (0.0 < clip <= 1.0):
        raise ValueError(f"activation clip ratio {clip} is outside (0, 1]")
    if bits != 0 and not (2 <= bits <= 16):
        raise ValueError(f"activation bits {bits} is not 0 or in 2..16")
    bound = clip * x.abs().amax(dim=-1, keepdim=True)
    xc = torch.maximum(torch.minimum(x, bound), -bound)
    if bits == 0:
        return xc
    s = bound / (2 ** (bits - 1) - 1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    # torch.round rounds half to even, like numpy.rint and C nearbyintf
    return torch.where(s > 0, torch.round(xc / safe) * s, torch.zeros_like(xc))


@dataclass
class Linear:
    """One projection of one replica:

        y = gain * (act(clamp(x)) @ W^T) + replica_bias + (x @ V^T) @ U^T + bias

    ``clip`` is the absolute input bound of a stock-typed weight's replica (FORMAT.md 6.1,
    ggml_clamp); ``act_clip`` / ``act_bits`` the per-token clip and quantization of LRQ codes.
    ``lr_u`` [n_out, rank] / ``lr_v`` [rank, n_in] are the replica's low-rank correction
    (FORMAT.md 6.2): it reads the input x before any clip or quantization (the LRQ op clips
    inside its kernel, so no ggml tensor holds the clipped input) and is not scaled by the gain."""
    weight: torch.Tensor                   # [n_out, n_in]
    bias: torch.Tensor | None = None       # the model's own bias tensor (e.g. qwen2 attn_q.bias)
    gain: torch.Tensor | None = None       # per-replica gain gamma [n_out]
    replica_bias: torch.Tensor | None = None
    act_clip: float = 1.0
    act_bits: int = 0
    clip: float = float("inf")
    lr_u: torch.Tensor | None = None       # U [n_out, rank]
    lr_v: torch.Tensor | None = None       # V [rank, n_in]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x0 = x
        if self.clip != float("inf"):
            x = x.clamp(-self.clip, self.clip)
        y = act_clip_quant(x, self.act_clip, self.act_bits) @ self.weight.T
        if self.gain is not None:
            y = y * self.gain
        if self.replica_bias is not None:
            y = y + self.replica_bias
        if self.lr_u is not None:
            y = y + (x0 @ self.lr_v.T) @ self.lr_u.T
        if self.bias is not None:
            y = y + self.bias
        return y


def rope_angles(positions: torch.Tensor, n_rot: int, theta_base: float, freq_scale: float = 1.0,
                freq_factors: torch.Tensor | None = None, dtype=torch.float64
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [n_tokens, n_rot/2] of ggml_rope_cache_init without YaRN:
    theta_i(p) = freq_scale * p * base^(-2i/n_rot) / freq_factor_i."""
    i = torch.arange(0, n_rot // 2, dtype=torch.float64)
    inv = theta_base ** (-2.0 * i / n_rot)
    if freq_factors is not None:
        inv = inv / freq_factors.to(torch.float64)
    theta = freq_scale * positions.to(torch.float64)[:, None] * inv[None, :]
    return torch.cos(theta).to(dtype), torch.sin(theta).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mode: str) -> torch.Tensor:
    """Rotate the first n_rot dims of x [n_heads, n_tokens, head_dim].

    mode "norm": pairs (2i, 2i+1) (ggml mode 0, llama after convert's q/k permutation);
    mode "neox": pairs (i, i + n_rot/2) (GGML_ROPE_TYPE_NEOX, qwen2/qwen3).
    """
    n_rot = 2 * cos.shape[-1]
    rot, rest = x[..., :n_rot], x[..., n_rot:]
    if mode == "norm":
        x0, x1 = rot[..., 0::2], rot[..., 1::2]
        y0, y1 = x0 * cos - x1 * sin, x0 * sin + x1 * cos
        out = torch.stack((y0, y1), dim=-1).flatten(-2)
    elif mode == "neox":
        half = n_rot // 2
        x0, x1 = rot[..., :half], rot[..., half:]
        out = torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    else:
        raise ValueError(f"unknown rope mode {mode!r}")
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
              scale: float) -> torch.Tensor:
    """Causal GQA attention. q [n_head, n_q, d], k/v [n_head_kv, n_kv, d] holding positions
    0..n_kv-1; query head h reads KV head h // (n_head / n_head_kv) (ggml's broadcast).
    Returns [n_q, n_head * d_v]."""
    n_head, n_kv_head = q.shape[0], k.shape[0]
    rep = n_head // n_kv_head
    k = k.repeat_interleave(rep, dim=0)
    v = v.repeat_interleave(rep, dim=0)
    scores = (q @ k.transpose(-1, -2)) * scale
    kv_pos = torch.arange(k.shape[1])
    masked = kv_pos[None, :] > q_pos[:, None]            # key after the query: invisible
    scores = scores.masked_fill(masked[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = probs @ v                                       # [n_head, n_q, d_v]
    return out.transpose(0, 1).reshape(q.shape[1], -1)


def combine_group(x: torch.Tensor, outputs, weights) -> torch.Tensor:
    """One step of the schedule (docs/FORMAT.md section 7): ``x + sum_j w_j (B_j(x) - x)`` over
    the group's block outputs ``outputs`` (callables or tensors) and their weights.

    A serial step is a group of one: ``x + w (B(x) - x)``, which for w = 1 is ``B(x)`` itself,
    returned as is (exactly the stock graph, as the runtime builds it).  The reference executor
    and the calibrator both call this, so the two cannot apply the schedule differently."""
    outputs, weights = list(outputs), [float(w) for w in weights]
    if len(outputs) != len(weights) or not outputs:
        raise ValueError(f"a group needs one weight per output, got {len(outputs)} and {len(weights)}")
    ys = [y() if callable(y) else y for y in outputs]
    if len(ys) == 1 and weights[0] == 1.0:
        return ys[0]
    acc = None
    for y, w in zip(ys, weights):
        d = y - x if w == 1.0 else w * (y - x)
        acc = d if acc is None else acc + d
    return x + acc
