"""Mixture-of-experts architectures (qwen2moe, qwen3moe, llama with experts = Mixtral): the attention linears become LRQ
codes (or stay stock-typed, format v2) like a dense model's; the FFN of every block is a router
``ffn_gate_inp`` [n_expert, n_embd] and three stacked expert tensors ``ffn_{gate,up,down}_exps``
[n_expert, n_out, n_in] (qwen2moe adds a shared expert ``ffn_*_shexp`` and its gate
``ffn_gate_inp_shexp``).

Why the expert tensors are not LRQ candidates: the LRQ op is a 2-D matrix product, and the
runtime multiplies stacked experts with ggml's ``mul_mat_id`` (the routed experts of each token),
which takes stock types only.  They keep their source type here, or the stock type that
llama-quantize gives them (``lrq-convert --base-type TYPE``, the v2 path).  The router and the
norms are never quantized by lrq (llama-quantize keeps ``ffn_gate_inp`` in F32 too): a routing
decision flipped by a rounding error changes which weights a token sees at all.
"""

from __future__ import annotations

from .arch import ArchConverter, LlamaConverter, register

_ATTENTION = ("attn_q", "attn_k", "attn_v", "attn_output")
_MOE_BLOCK = ("attn_norm.weight", "ffn_norm.weight", "attn_q.weight", "attn_k.weight",
              "attn_v.weight", "attn_output.weight", "ffn_gate_inp.weight",
              "ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")


class MoEConverter(ArchConverter):
    """Common part of the MoE layouts: only the attention linears are LRQ candidates."""

    linear_kinds = _ATTENTION
    required_block_tensors = _MOE_BLOCK


@register
class Qwen2MoeConverter(MoEConverter):
    arch = "qwen2moe"
    hf_architectures = ("Qwen2MoeForCausalLM",)
    # q/k/v biases as in qwen2; the shared expert and its sigmoid gate
    required_block_tensors = _MOE_BLOCK + (
        "attn_q.bias", "attn_k.bias", "attn_v.bias", "ffn_gate_inp_shexp.weight",
        "ffn_gate_shexp.weight", "ffn_up_shexp.weight", "ffn_down_shexp.weight")


@register
class Qwen3MoeConverter(MoEConverter):
    arch = "qwen3moe"
    hf_architectures = ("Qwen3MoeForCausalLM",)
    required_block_tensors = _MOE_BLOCK + ("attn_q_norm.weight", "attn_k_norm.weight")


class MixtralConverter(MoEConverter, LlamaConverter):
    """llama with experts (Mixtral): GGUF architecture ``llama`` with ``llama.expert_count`` > 0.
    Not in the registry (one converter per architecture name): LlamaConverter hands a source
    with experts to this class."""
