"""The mixture-of-experts FFN of the reference executor, mirroring llama.cpp's build_moe_ffn
(src/llama-graph.cpp) for qwen2moe, qwen3moe and llama with experts (Mixtral):

    p = softmax(h R^T)                         router R [n_expert, n_embd], kept full precision
    (w, e) = top-k of p per token              k = expert_used_count
    w = w / sum(w)                             only where the architecture renormalises (norm_w)
    y = sum_j w_j down_e_j(silu(gate_e_j h) * up_e_j h)
    + sigmoid(h g^T) * down_s(silu(gate_s h) * up_s h)     qwen2moe's shared expert, gate g [1, n_embd]

Experts are a loop over the experts that some token selected (the reference is an oracle, not
a kernel); the runtime does the same with ggml_mul_mat_id.

Expert-level replication (format v4, docs/moe.md): entry r of the layer lists experts S_r, a
mode and a weight a_r, and gives every projection of expert e a per-expert gain and bias
(E_e(h; r): each product g * (W_e x) + b with that expert's row of the entry's tensors).  The
routing is computed once, from the unquantized router, and is the same for every replica:

    E'_e = E_e(h; 0) + sum_{r: e in S_r} a_r (E_e(h; r) - E_e(h; 0))     parallel entries
    E'_e = E_e(h; 0) + sum_{r: e in S_r} a_r E_e(h; r)                    serial entries
    y = sum_j w_j E'_{e_j}(h)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# llama.cpp's norm_w argument of build_moe_ffn in each graph file (src/models/<arch>.cpp): the
# pinned qwen3moe.cpp passes true and qwen2moe.cpp false, whatever the HF config says.
# llama.cpp's llama.cpp graph (Mixtral: llama with experts) passes true as well.
EXPERT_NORM_W = {"qwen2moe": False, "qwen3moe": True, "llama": True}


_PROJS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


@dataclass
class ExpertReplica:
    """One expert-replication entry: its experts, mode, weight and per-expert parameters
    ({proj: [n_expert, n_out]}; a projection without a tensor takes the default)."""
    experts: frozenset[int]
    parallel: bool
    weight: float
    gain: dict[str, torch.Tensor] = field(default_factory=dict)
    bias: dict[str, torch.Tensor] = field(default_factory=dict)


def expert_replicas(model, layer: int, to_tensor) -> list[ExpertReplica]:
    """The entries of ``layer`` in a model file (none for a file without lrq.moe.* keys);
    ``to_tensor`` turns a numpy array into the executor's torch dtype."""
    out = []
    for e in getattr(model, "expert_entries", ()):
        if e.layer != layer:
            continue
        rep = ExpertReplica(frozenset(e.experts), e.mode == "parallel", float(e.weight))
        for proj in _PROJS:
            g, b = model.expert_params(layer, proj, e.replica)
            if g is not None:
                rep.gain[proj] = to_tensor(g)
            if b is not None:
                rep.bias[proj] = to_tensor(b)
        out.append(rep)
    return out


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
    entries: list[ExpertReplica] = field(default_factory=list)   # expert replicas (format v4)

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [n, k], expert ids [n, k]) of each token, largest probability first."""
        probs = torch.softmax(h @ self.router.T, dim=-1)
        w, idx = torch.topk(probs, self.n_used, dim=-1)
        if self.norm_w:
            w = w / w.sum(dim=-1, keepdim=True)
        return w, idx

    def expert(self, x: torch.Tensor, e: int, rep: ExpertReplica | None = None) -> torch.Tensor:
        """E_e(x; r): expert e with the per-expert gain and bias of entry ``rep`` (None: the
        plain expert, replica 0)."""
        def mm(proj: str, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            y = v @ w[e].T
            if rep is not None and proj in rep.gain:
                y = y * rep.gain[proj][e]
            if rep is not None and proj in rep.bias:
                y = y + rep.bias[proj][e]
            return y
        act = torch.nn.functional.silu(mm("ffn_gate_exps", self.gate, x)) * mm("ffn_up_exps", self.up, x)
        return mm("ffn_down_exps", self.down, act)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        silu = torch.nn.functional.silu
        w, idx = self.route(h)           # once per execution, shared by every expert replica
        out = torch.zeros(h.shape[0], self.down.shape[1], dtype=h.dtype)
        for e in torch.unique(idx).tolist():
            tok, slot = (idx == e).nonzero(as_tuple=True)
            x = h[tok]
            y0 = self.expert(x, e)
            y = y0
            for rep in self.entries:
                if e in rep.experts:
                    yr = self.expert(x, e, rep)
                    y = y + rep.weight * (yr - y0 if rep.parallel else yr)
            out.index_add_(0, tok, y * w[tok, slot, None])
        if self.shexp_gate_inp is not None:
            s = torch.sigmoid(h @ self.shexp_gate_inp.T)
            out = out + s * ((silu(h @ self.shexp_gate.T) * (h @ self.shexp_up.T)) @ self.shexp_down.T)
        return out
