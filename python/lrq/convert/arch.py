"""One converter class per supported architecture, in a registry.

The base class holds the llama layout; a subclass changes only what differs, through override
points (class attributes and methods), never through flags:

- ``hf_architectures``: the Hugging Face ``architectures`` names that map to it;
- ``linear_kinds``: which block linears may become LRQ tensors;
- ``required_block_tensors``: what every block must contain (checked before any work);
- ``is_lrq_candidate(name, shape)``: the final say on a tensor;
- ``copy_key(key)``: which source keys are carried over.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from ..constants import LRQ_BLOCK, SUPPORTED_ARCHS, layer_of


class ConvertError(ValueError):
    """Bad input or options; the message names the file, tensor, key or option."""


_REGISTRY: dict[str, type["ArchConverter"]] = {}


def register(cls: type["ArchConverter"]) -> type["ArchConverter"]:
    if cls.arch in _REGISTRY:
        raise RuntimeError(f"two converters for architecture '{cls.arch}'")
    _REGISTRY[cls.arch] = cls
    return cls


def supported() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def converter_for(arch: str, where: str) -> type["ArchConverter"]:
    """The converter class of a GGUF architecture name; ConvertError listing the supported ones."""
    if arch in _REGISTRY:
        return _REGISTRY[arch]
    extra = " (it is already an LRQ file)" if arch.startswith("lrq-") else ""
    raise ConvertError(f"{where}: architecture '{arch}' is not supported{extra}; supported: "
                       f"{', '.join(_REGISTRY)}")


def converter_for_hf(hf_archs: list[str], where: str) -> type["ArchConverter"]:
    for cls in _REGISTRY.values():
        if any(a in cls.hf_architectures for a in hf_archs):
            return cls
    names = ", ".join(f"{a} ({', '.join(c.hf_architectures)})" for a, c in _REGISTRY.items())
    raise ConvertError(f"{where}: Hugging Face architecture {', '.join(hf_archs) or '(none given)'} "
                       f"is not supported; supported: {names}")


class ArchConverter:
    """llama layout; subclasses override what differs."""

    arch: ClassVar[str] = ""
    hf_architectures: ClassVar[tuple[str, ...]] = ()
    linear_kinds: ClassVar[tuple[str, ...]] = ("attn_q", "attn_k", "attn_v", "attn_output",
                                               "ffn_gate", "ffn_up", "ffn_down")
    required_block_tensors: ClassVar[tuple[str, ...]] = (
        "attn_norm.weight", "ffn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
        "attn_output.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
    # keys that would lie about an LRQ file
    dropped_keys: ClassVar[tuple[str, ...]] = ("general.architecture", "general.file_type")

    def __init__(self, kv: dict[str, Any], shapes: dict[str, tuple[int, ...]], where: str):
        self.kv = kv
        self.shapes = shapes
        self.where = where
        self._linear = re.compile(r"^blk\.\d+\.(" + "|".join(self.linear_kinds) + r")\.weight$")

    @property
    def n_layer(self) -> int:
        key = f"{self.arch}.block_count"
        if key not in self.kv:
            raise ConvertError(f"{self.where}: required key {key} is missing")
        return int(self.kv[key])

    def check(self) -> None:
        """Every block has its tensors, and no tensor names a block beyond n_layer."""
        n = self.n_layer
        for layer in range(n):
            for t in self.required_block_tensors:
                name = f"blk.{layer}.{t}"
                if name not in self.shapes:
                    raise ConvertError(f"{self.where}: tensor {name} is missing ({self.arch} blocks need "
                                       f"{', '.join(self.required_block_tensors)})")
        for name in self.shapes:
            layer = layer_of(name)
            if layer is not None and layer >= n:
                raise ConvertError(f"{self.where}: tensor {name} names layer {layer} but "
                                   f"{self.arch}.block_count = {n}")

    def is_lrq_candidate(self, name: str, shape: tuple[int, ...]) -> bool:
        return bool(self._linear.match(name)) and len(shape) == 2 and shape[1] % LRQ_BLOCK == 0

    def copy_key(self, key: str) -> bool:
        return key not in self.dropped_keys and not key.startswith("lrq.")


@register
class LlamaConverter(ArchConverter):
    arch = "llama"
    hf_architectures = ("LlamaForCausalLM", "MixtralForCausalLM")

    def __new__(cls, kv: dict[str, Any], shapes, where):
        # llama with experts (Mixtral) has another block layout (arch_moe.MixtralConverter)
        if cls is LlamaConverter and int(kv.get("llama.expert_count") or 0) > 0:
            from .arch_moe import MixtralConverter
            return super().__new__(MixtralConverter)
        return super().__new__(cls)


@register
class Qwen2Converter(ArchConverter):
    arch = "qwen2"
    hf_architectures = ("Qwen2ForCausalLM",)
    # Qwen2 has biases on q/k/v; they stay F32 (only .weight tensors become LRQ)
    required_block_tensors = ArchConverter.required_block_tensors + (
        "attn_q.bias", "attn_k.bias", "attn_v.bias")


@register
class Qwen3Converter(ArchConverter):
    arch = "qwen3"
    hf_architectures = ("Qwen3ForCausalLM",)
    # per-head RMS norms of q and k
    required_block_tensors = ArchConverter.required_block_tensors + (
        "attn_q_norm.weight", "attn_k_norm.weight")


from . import arch_moe  # noqa: E402,F401  (registers qwen2moe, qwen3moe)

assert supported() == SUPPORTED_ARCHS, "lrq.constants.SUPPORTED_ARCHS and the registry disagree"
