"""The mixture-of-experts FFN of the reference executor, mirroring llama.cpp's build_moe_ffn
(src/llama-graph.cpp) for qwen2moe, qwen3moe and llama with experts (Mixtral):

    p = softmax(h R^T)                         router R [n_expert, n_embd], kept full precision
    (w, e) = top-k of p per token              k = expert_used_count
    w = w / sum(w)                             only where the architecture renormalises (norm_w)
    y = sum_j w_j down_e_j(silu(gate_e_j h) * up_e_j h)
    + sigmoid(h g^T) * down_s(silu(gate_s h) * up_s h)     qwen2moe's shared expert, gate g [1, n_embd]

Experts are a loop over the experts that some token selected (the reference is an oracle, not
a kernel); the runtime does the same with ggml_mul_mat_id.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# llama.cpp's norm_w argument of build_moe_ffn in each graph file (src/models/<arch>.cpp): the
# pinned qwen3moe.cpp passes true and qwen2moe.cpp false, whatever the HF config says.
# llama.cpp's llama.cpp graph (Mixtral: llama with experts) passes true as well.
EXPERT_NORM_W = {"qwen2moe": False, "qwen3moe": True, "llama": True}


@dataclass
class MoEFFN:
    router: torch.Tensor                     # [n_expert, n_embd]
    gate: torch.Tensor                       # [n_expert, n_ff_exp, n_embd]
    up: torch.Tensor                         # [n_expert, n_ff_exp, n_embd]
    down: torch.Tensor                       # [n_expert, n_embd, n_ff_exp]
    n_used: int
    norm_w: bool
    shexp_gate_inp: torch.Tensor | None = None   # [1, n_embd]
    shexp_gate: torch.Tensor | None = None       # [n_ff_shexp, n_embd]
    shexp_up: torch.Tensor | None = None
    shexp_down: torch.Tensor | None = None       # [n_embd, n_ff_shexp]

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [n, k], expert ids [n, k]) of each token, largest probability first."""
        probs = torch.softmax(h @ self.router.T, dim=-1)
        w, idx = torch.topk(probs, self.n_used, dim=-1)
        if self.norm_w:
            w = w / w.sum(dim=-1, keepdim=True)
        return w, idx

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        silu = torch.nn.functional.silu
        w, idx = self.route(h)
        out = torch.zeros(h.shape[0], self.down.shape[1], dtype=h.dtype)
        for e in torch.unique(idx).tolist():
            tok, slot = (idx == e).nonzero(as_tuple=True)
            x = h[tok]
            y = (silu(x @ self.gate[e].T) * (x @ self.up[e].T)) @ self.down[e].T
            out.index_add_(0, tok, y * w[tok, slot, None])
        if self.shexp_gate_inp is not None:
            s = torch.sigmoid(h @ self.shexp_gate_inp.T)
            out = out + s * ((silu(h @ self.shexp_gate.T) * (h @ self.shexp_up.T)) @ self.shexp_down.T)
        return out
