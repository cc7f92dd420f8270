"""Teach gguf-py the LRQ ggml types — the one place that does it.

gguf-py only knows the stock ggml types: ``GGUFReader`` raises on an unknown type id and
``GGUFWriter`` sizes quantized tensors through ``GGML_QUANT_SIZES``.  ``register()`` adds
LRQ1..LRQ4 (block of 32 weights, 4*b bytes) to both as value-only enum members (they are not
added to the enum's iteration order, so code that lists gguf-py's types is unaffected).

Call it before reading or writing an LRQ GGUF with gguf-py; it is idempotent and cheap.
lrq.lrq_file and lrq.gguf_write call it themselves.
"""

from __future__ import annotations

import gguf

from .constants import LRQ_BLOCK, LRQType, lrq_bits, lrq_block_bytes

_done = False


def register() -> None:
    global _done
    if _done:
        return
    cls = gguf.GGMLQuantizationType
    for t in LRQType:
        member = cls._value2member_map_.get(int(t))
        if member is None:
            member = int.__new__(cls, int(t))
            member._name_ = t.name
            member._value_ = int(t)
            cls._value2member_map_[int(t)] = member
            cls._member_map_[t.name] = member
        elif member.name != t.name:
            # a future gguf-py defines this id as something else: the ids must never collide
            raise RuntimeError(f"gguf-py already defines ggml type {int(t)} as {member.name}; "
                               f"LRQ type {t.name} needs that id (see lrq.constants.LRQType)")
        gguf.GGML_QUANT_SIZES[member] = (LRQ_BLOCK, lrq_block_bytes(lrq_bits(t)))
    _done = True


def type_name(type_id: int) -> str:
    """Name of any ggml type id (stock or LRQ), 'type<N>' when unknown."""
    try:
        return LRQType(int(type_id)).name
    except ValueError:
        pass
    try:
        return gguf.GGMLQuantizationType(int(type_id)).name
    except ValueError:
        return f"type{int(type_id)}"
