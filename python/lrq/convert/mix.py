"""Mixed precision: which block linears get more code bits than ``--bits`` (``lrq-convert --mix``).

A mix is a preset name or a comma-separated list of ``PATTERN=BITS`` rules; PATTERN is a regular
expression searched in the tensor name (``blk.N.attn_v.weight``), the first rule that matches
decides, and a tensor no rule matches gets ``--bits``.  Each tensor's LRQ type records its own bits
(FORMAT.md: the type rules, ``lrq.quant.bits`` is the nominal default), so a mixed file needs no
new key and loads wherever a uniform one does.

The presets follow llama.cpp's mixed file types, whose "2-bit" files keep the linears that hurt
most at 2 bits wider (llama_tensor_get_type in the pinned llama.cpp; measured on SmolLM2: its Q2_K
file has attn_v in Q4_K, attn_output and ffn_down in Q3_K, only q, k, gate and up in Q2_K).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..constants import BITS_CHOICES

MIX_PRESETS: dict[str, str] = {
    # llama.cpp's Q2_K file: v at 4 bits, o and down at 3, the rest at --bits
    "q2k": r"attn_v\.=4,attn_output\.=3,ffn_down\.=3",
    # only the value projection wider (the cheapest of llama.cpp's rules: v is small under GQA)
    "v4": r"attn_v\.=4",
    # v and down, the two llama.cpp raises first in its Q3_K_S / IQ3 files
    "v4-down3": r"attn_v\.=4,ffn_down\.=3",
}


class MixError(ValueError):
    pass


@dataclass(frozen=True)
class Mix:
    spec: str                                        # as given (a preset name or the rules)
    rules: tuple[tuple[re.Pattern, int], ...]

    def bits_for(self, name: str, default: int) -> int:
        for pat, bits in self.rules:
            if pat.search(name):
                return bits
        return default


def parse_mix(spec: str | None) -> Mix:
    """The rules of a preset name or a ``PATTERN=BITS[,PATTERN=BITS...]`` list; MixError names the
    part that is wrong and what was expected."""
    if spec is None or spec == "":
        return Mix("", ())
    text = MIX_PRESETS.get(spec, spec)
    rules = []
    for part in text.split(","):
        pat, eq, bits = part.rpartition("=")
        if not eq or not pat:
            known = ", ".join(MIX_PRESETS)
            raise MixError(f"--mix: '{part}' is neither a preset ({known}) nor PATTERN=BITS")
        try:
            b = int(bits)
        except ValueError:
            b = -1
        if b not in BITS_CHOICES:
            raise MixError(f"--mix: '{part}': bits must be one of {', '.join(map(str, BITS_CHOICES))}")
        try:
            rules.append((re.compile(pat), b))
        except re.error as e:
            raise MixError(f"--mix: '{pat}' is not a valid regular expression ({e})") from None
    return Mix(spec, tuple(rules))
