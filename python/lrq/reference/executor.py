"""The torch reference executor: the project's oracle for llama / qwen2 / qwen3 GGUFs.

It follows llama.cpp's graphs (src/models/llama.cpp, qwen2.cpp, qwen3.cpp) and the model's
LRQ schedule (lrq-design.md): executions in order; a group of one execution is a serial step
x -> B(x; theta_r); a parallel group computes x + sum_j w_j (B(x; theta_j) - x); every
execution has its OWN KV cache.  Per-replica weights come from ``model.weight(name, replica)``;
the replica's gain and bias are applied after the matmul and its activation clip/quant before;
its low-rank correction U (V x) (format v3) is added to the output, read from the unclipped x.

    ref = Reference(open_model("tiny.gguf"))            # float64 by default
    logits = ref.logits(np.array([1, 42, 7]))           # [3, n_vocab], positions 0..2
    cache = ref.new_cache(); ref.forward(t[:2], cache); ref.forward(t[2:], cache)
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..model_file import HParams, open_model
from .ops import (Linear, act_clip_quant, apply_rope, attention, combine_group,  # noqa: F401
                  rms_norm, rope_angles)
from .moe import EXPERT_NORM_W, MoEFFN, expert_replicas
from .perplexity import PerplexityResult, perplexity as _perplexity

_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


class ReferenceError(ValueError):
    """The model or its schedule cannot be executed by the reference."""


@dataclass
class Block:
    """The parameters of one (base layer, replica)."""
    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    lin: dict[str, Linear]
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    moe: MoEFFN | None = None               # the FFN of a mixture-of-experts layer


@dataclass
class KVCache:
    """One K and one V per execution (virtual layer), each [n_head_kv, n_past, head_dim]."""
    k: list[torch.Tensor | None]
    v: list[torch.Tensor | None]
    n_past: int = 0


@dataclass
class _Step:
    """A schedule group: serial (one execution) or parallel (several, with weights)."""
    layer: int
    execs: list[int]                        # execution indices (= KV cache slots)
    replicas: list[int]
    weights: list[float] = field(default_factory=list)


def _replica_terms(params) -> tuple[np.ndarray | None, np.ndarray | None, float, int, float]:
    """(gain, bias, act_clip, act_bits, clip) to apply around the matmul for
    lrq.quant.ReplicaParams.

    A gain already folded into the handed-out W (``gain_folded``) is not applied again."""
    if params is None:
        return None, None, 1.0, 0, float("inf")
    gain = None if params.gain_folded else params.gain
    return gain, params.bias, float(params.act_clip), int(params.act_bits), float(params.clip)


def _lowrank_terms(params) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(U, V) of a replica's low-rank correction (FORMAT.md 6.2), (None, None) without one."""
    if params is None:
        return None, None
    return getattr(params, "lr_u", None), getattr(params, "lr_v", None)


# blocks a streamed pass holds at once (Reference(max_blocks=...) of lrq-calibrate, lrq-convert's
# statistics and lrq-select): the block being worked on and the one a pass recomputes through
# (passes reach their blocks in order, so more would only be dropped later); the model's weights
# are never all in memory (Qwen2.5-1.5B's float32 source: 7.1 GB, a block 0.19)
STREAM_BLOCKS = 2


class BlockCache(Mapping):
    """The blocks of a Reference, loaded on first use, at most ``max_blocks`` kept (the least
    recently used is dropped, with its layer's norms and MoE tensors once no block of that layer
    is left).  ``loads`` counts the loads and ``peak`` the most blocks held at once."""

    def __init__(self, ref: "Reference", keys: list[tuple[int, int]], max_blocks: int):
        if max_blocks < 1:
            raise ReferenceError(f"max_blocks must be >= 1, got {max_blocks}")
        # a dict for its order (iteration) and its O(1) membership (every block access asks)
        self._ref, self._keys, self.max_blocks = ref, dict.fromkeys(keys), int(max_blocks)
        self._held: OrderedDict[tuple[int, int], Block] = OrderedDict()
        self.loads = 0
        self.peak = 0

    def __getitem__(self, key: tuple[int, int]) -> Block:
        if key in self._held:
            self._held.move_to_end(key)
            return self._held[key]
        if key not in self._keys:
            raise KeyError(key)
        while len(self._held) >= self.max_blocks:
            self._drop(next(iter(self._held)))
        blk = self._held[key] = self._ref._load_block(*key)
        self.loads += 1
        self.peak = max(self.peak, len(self._held))
        return blk

    def _drop(self, key: tuple[int, int]) -> None:
        del self._held[key]
        if all(k[0] != key[0] for k in self._held):
            self._ref._norms.pop(key[0], None)
            self._ref._moe.pop(key[0], None)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._keys

    def held(self) -> list[tuple[int, int]]:
        return list(self._held)

    def clear(self) -> None:
        for k in list(self._held):
            self._drop(k)


class Reference:
    """Run a model file's schedule in torch (float64: the oracle; float32: a faster check)."""

    def __init__(self, model, dtype: torch.dtype = torch.float64, max_blocks: int | None = None):
        """``max_blocks``: None loads every block now and keeps it (the oracle's default); k >= 1
        loads a block when a pass reaches it and keeps only the k most recently used (a pass
        through the model then holds k blocks' weights, not the model's: lrq-calibrate and
        lrq-convert --gptq on models larger than memory).  The tensors are the same either way."""
        if isinstance(model, (str, os.PathLike)):
            model = open_model(Path(model))
        if dtype not in (torch.float64, torch.float32):
            raise ReferenceError(f"dtype must be torch.float64 or torch.float32, not {dtype}")
        self.model = model
        self.dtype = dtype
        hp = self.hp = HParams.from_mapping(model.hparams, self._has)
        if hp.rope_scaling is not None and hp.rope_scaling.type not in ("linear", "none"):
            raise ReferenceError(f"{model.path}: rope scaling '{hp.rope_scaling.type}' is not "
                                 f"implemented by the reference (only linear)")
        self._freq_scale = 1.0 / hp.rope_scaling.factor if hp.rope_scaling else 1.0
        self._freq_factors = (self._t(model.tensor("rope_freqs.weight")).to(torch.float64)
                              if hp.has_rope_freqs else None)
        self.schedule = list(model.schedule)
        self.steps = self._plan_steps()
        # the embedding and the output head are loaded on first use: a block-wise job embeds
        # its windows (embed()) and never needs either whole (Qwen2.5-1.5B: 0.93 GB each)
        self._tok_embd: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self.output_norm = self._t(model.tensor("output_norm.weight"))
        self._norms: dict[int, tuple] = {}
        self._moe: dict[int, MoEFFN] = {}
        keys = list(dict.fromkeys((e.layer, e.replica) for e in self.schedule))
        if max_blocks is None:
            self.blocks: dict[tuple[int, int], Block] | BlockCache = {k: self._load_block(*k) for k in keys}
        else:
            # what loading would find missing is refused now, not halfway through a long job
            for layer in sorted({k[0] for k in keys}):
                self._check_block_tensors(layer)
            self.blocks = BlockCache(self, keys, max_blocks)

    # ---- loading ---------------------------------------------------------------------------
    @property
    def tok_embd(self) -> torch.Tensor:
        if self._tok_embd is None:
            self._tok_embd = self._t(self.model.tensor("token_embd.weight"))
        return self._tok_embd

    @tok_embd.setter
    def tok_embd(self, v: torch.Tensor | None) -> None:      # None: drop it (reloaded when used)
        self._tok_embd = v

    @property
    def output(self) -> torch.Tensor:
        if self._output is None:
            self._output = (self.tok_embd if self.hp.tied_embeddings
                            else self._t(self.model.tensor("output.weight")))
        return self._output

    @output.setter
    def output(self, v: torch.Tensor | None) -> None:
        self._output = v

    def embed(self, ids) -> torch.Tensor:
        """Token embeddings [*ids.shape, n_embd] (the same values as tok_embd[ids]); without
        the whole matrix loaded, only these rows are dequantized."""
        ids = np.asarray(ids, dtype=np.int64)
        if self._tok_embd is None:
            return self._t(self.model.rows("token_embd.weight", ids))
        return self.tok_embd[torch.from_numpy(ids)]

    def _t(self, a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(np.asarray(a, dtype=np.float64)).to(self.dtype)

    def _has(self, name: str) -> bool:
        m = self.model
        return m.has_tensor(name) if hasattr(m, "has_tensor") else name in m.tensor_names

    def _opt(self, name: str) -> torch.Tensor | None:
        return self._t(self.model.tensor(name)) if self._has(name) else None

    def _is_moe(self, layer: int) -> bool:
        return self._has(f"blk.{layer}.ffn_gate_inp.weight")

    def _linears(self, layer: int) -> tuple[str, ...]:
        """The block linears of a layer: a MoE layer's FFN is its router and experts instead."""
        return _LINEARS[:4] if self._is_moe(layer) else _LINEARS

    def _check_block_tensors(self, layer: int) -> None:
        p = f"blk.{layer}"
        names = [f"{p}.attn_norm.weight", f"{p}.ffn_norm.weight"] + [f"{p}.{n}.weight" for n in self._linears(layer)]
        if self._is_moe(layer):
            names += [f"{p}.ffn_{n}_exps.weight" for n in ("gate", "up", "down")]
        for n in names:
            if not self._has(n):
                raise ReferenceError(f"{getattr(self.model, 'path', 'model')}: tensor '{n}' is missing")

    def _load_block(self, layer: int, replica: int) -> Block:
        p = f"blk.{layer}"
        lin = {}
        moe = self._load_moe(layer) if self._is_moe(layer) else None
        for name in self._linears(layer):
            w, params = self.model.weight(f"{p}.{name}.weight", replica)
            gain, rbias, act_clip, bits, clip = _replica_terms(params)
            lr_u, lr_v = _lowrank_terms(params)
            lin[name] = Linear(self._t(w), self._opt(f"{p}.{name}.bias"), self._t(gain),
                               self._t(rbias), act_clip, bits, clip, self._t(lr_u), self._t(lr_v))
        # norms are not LRQ tensors: every replica of a layer shares one copy
        if layer not in self._norms:
            self._norms[layer] = (self._t(self.model.tensor(f"{p}.attn_norm.weight")),
                                  self._t(self.model.tensor(f"{p}.ffn_norm.weight")),
                                  self._opt(f"{p}.attn_q_norm.weight"),
                                  self._opt(f"{p}.attn_k_norm.weight"))
        attn_norm, ffn_norm, q_norm, k_norm = self._norms[layer]
        return Block(attn_norm, ffn_norm, lin, q_norm, k_norm, moe)

    def _load_moe(self, layer: int) -> MoEFFN:
        """Router, stacked experts and shared expert of a MoE layer: not replica tensors, so
        every replica of the layer shares one copy."""
        if layer not in self._moe:
            p, hp = f"blk.{layer}", self.hp
            if hp.arch not in EXPERT_NORM_W or hp.n_expert_used < 1:
                raise ReferenceError(f"{getattr(self.model, 'path', 'model')}: {p}.ffn_gate_inp.weight "
                                     f"in a '{hp.arch}' model with expert_used_count = "
                                     f"{hp.n_expert_used}: not a mixture of experts the reference runs")
            shexp_inp = self._opt(f"{p}.ffn_gate_inp_shexp.weight")
            self._moe[layer] = MoEFFN(
                self._t(self.model.tensor(f"{p}.ffn_gate_inp.weight")),
                self._t(self.model.tensor(f"{p}.ffn_gate_exps.weight")),
                self._t(self.model.tensor(f"{p}.ffn_up_exps.weight")),
                self._t(self.model.tensor(f"{p}.ffn_down_exps.weight")),
                hp.n_expert_used, EXPERT_NORM_W[hp.arch],
                # [1, n_embd] (a reader may drop ggml's trailing ne1 = 1)
                None if shexp_inp is None else shexp_inp.reshape(1, -1), self._opt(f"{p}.ffn_gate_shexp.weight"),
                self._opt(f"{p}.ffn_up_shexp.weight"), self._opt(f"{p}.ffn_down_shexp.weight"),
                expert_replicas(self.model, layer, self._t))
        return self._moe[layer]

    def _plan_steps(self) -> list[_Step]:
        """Group consecutive executions by group id and check the schedule's invariants."""
        where = getattr(self.model, "path", "model")
        steps: list[_Step] = []
        prev_group = None
        for i, e in enumerate(self.schedule):
            if prev_group is not None and e.group < prev_group:
                raise ReferenceError(f"{where}: schedule group ids decrease at execution {i}")
            if steps and e.group == prev_group:
                s = steps[-1]
                if e.layer != s.layer or e.replica in s.replicas:
                    raise ReferenceError(f"{where}: parallel group {e.group} mixes layers or repeats "
                                         f"a replica (execution {i})")
                s.execs.append(i); s.replicas.append(e.replica); s.weights.append(float(e.weight))
            else:
                # the layers may come in any order (FORMAT.md rule S3): each execution has its
                # own KV cache slot, so going back to an earlier layer is just another step
                steps.append(_Step(e.layer, [i], [e.replica], [float(e.weight)]))
            prev_group = e.group
        missing = set(range(self.hp.n_layer)) - {e.layer for e in self.schedule}
        if missing or any(not 0 <= e.layer < self.hp.n_layer for e in self.schedule):
            raise ReferenceError(f"{where}: schedule must run every layer 0..{self.hp.n_layer - 1} "
                                 f"(missing {sorted(missing)})")
        return steps

    # ---- execution -------------------------------------------------------------------------
    def new_cache(self) -> KVCache:
        n = len(self.schedule)
        return KVCache([None] * n, [None] * n, 0)

    def _block(self, x: torch.Tensor, blk: Block, cache: KVCache, slot: int,
               pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        hp, n = self.hp, x.shape[0]
        h = rms_norm(x, blk.attn_norm, hp.rms_eps)
        q = blk.lin["attn_q"](h).view(n, hp.n_head, hp.head_dim).transpose(0, 1)
        k = blk.lin["attn_k"](h).view(n, hp.n_head_kv, hp.head_dim).transpose(0, 1)
        v = blk.lin["attn_v"](h).view(n, hp.n_head_kv, hp.head_dim_v).transpose(0, 1)
        if blk.q_norm is not None:          # qwen3: per-head RMS norm before RoPE
            q = rms_norm(q, blk.q_norm, hp.rms_eps)
        if blk.k_norm is not None:
            k = rms_norm(k, blk.k_norm, hp.rms_eps)
        q = apply_rope(q, cos, sin, hp.rope_type)
        k = apply_rope(k, cos, sin, hp.rope_type)
        if cache.k[slot] is not None:
            k = torch.cat((cache.k[slot], k), dim=1)
            v = torch.cat((cache.v[slot], v), dim=1)
        cache.k[slot], cache.v[slot] = k, v
        x = x + blk.lin["attn_output"](attention(q, k, v, pos, hp.attn_scale))
        h = rms_norm(x, blk.ffn_norm, hp.rms_eps)
        if blk.moe is not None:
            return x + blk.moe(h)
        ffn = torch.nn.functional.silu(blk.lin["ffn_gate"](h)) * blk.lin["ffn_up"](h)
        return x + blk.lin["ffn_down"](ffn)

    def hidden(self, tokens, cache: KVCache | None = None) -> torch.Tensor:
        """Residual stream after the last execution, [n, n_embd], for ``tokens`` appended at
        positions cache.n_past.. (a fresh cache: 0..n-1); the cache is updated."""
        hp = self.hp
        cache = cache if cache is not None else self.new_cache()
        ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64).reshape(-1))
        if ids.numel() == 0:
            raise ReferenceError("no tokens to evaluate")
        if int(ids.min()) < 0 or int(ids.max()) >= self.tok_embd.shape[0]:
            raise ReferenceError(f"token ids must lie in 0..{self.tok_embd.shape[0] - 1}")
        pos = torch.arange(cache.n_past, cache.n_past + ids.numel())
        cos, sin = rope_angles(pos, hp.rope_dim, hp.rope_theta, self._freq_scale,
                               self._freq_factors, self.dtype)
        x = self.tok_embd[ids]
        with torch.no_grad():
            for s in self.steps:
                x = combine_group(x, [self._block(x, self.blocks[(s.layer, r)], cache, slot, pos, cos, sin)
                                      for slot, r in zip(s.execs, s.replicas)], s.weights)
        cache.n_past += ids.numel()
        return x

    def forward(self, tokens, cache: KVCache | None = None, first_output: int = 0) -> torch.Tensor:
        """Logits [n - first_output, n_vocab] (torch, reference dtype) of the new tokens."""
        x = self.hidden(tokens, cache)[first_output:]
        with torch.no_grad():
            return rms_norm(x, self.output_norm, self.hp.rms_eps) @ self.output.T

    def logits(self, tokens) -> np.ndarray:
        """Logits [n, n_vocab] of ``tokens`` at positions 0..n-1 of an empty cache."""
        return self.forward(tokens).numpy()

    def perplexity(self, tokens, n_ctx: int = 512, n_chunks: int = -1) -> PerplexityResult:
        """llama-perplexity's figure over ``tokens`` (tokenized with the BOS policy of the
        model, e.g. ``_native.Model.tokenize(text)``): see lrq.reference.perplexity."""
        first = n_ctx // 2
        return _perplexity(lambda w: self.forward(w, first_output=first).to(torch.float64).numpy(),
                           tokens, n_ctx, n_chunks, bos_id=self.model.bos_id,
                           add_bos=self.model.add_bos, logits_from=first)
