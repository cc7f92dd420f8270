"""Parsers of llama-perplexity's printed results (tools/perplexity/perplexity.cpp, pinned commit).

Two kinds of run are parsed:

- a plain / ``--kl-divergence-base`` run prints ``Final estimate: PPL = 32.6717 +/- 4.18121``;
- a ``--kl-divergence`` run prints a ``====== Perplexity statistics ======`` block
  (``Mean PPL(Q) : 38.454892 ± 4.733811``, ``Mean PPL(base) ...``), a KL block
  (``Mean    KLD:   0.252976 ±   0.007474``) and a token-probability block ending in
  ``Same top p: 69.608 ± 2.039 %`` (percent).  The tool prints these statistics only when more
  than 100 tokens were scored (``if (kld.count < 100) return;``): with fewer the parser raises.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_NUM = r"([-+]?(?:[0-9]*\.)?[0-9]+(?:[eE][-+]?[0-9]+)?|nan|inf|-nan|-inf)"
_PM = r"\s*(?:±|\+/-)\s*"

_FINAL = re.compile(r"Final estimate: PPL = " + _NUM + r"\s*\+/-\s*" + _NUM)
_CHUNKS = re.compile(r"(?:calculating perplexity|computing) over (\d+) chunks, n_ctx=(\d+)")
_PPL_Q = re.compile(r"Mean PPL\(Q\)\s*:\s*" + _NUM + _PM + _NUM)
_PPL_BASE = re.compile(r"Mean PPL\(base\)\s*:\s*" + _NUM + _PM + _NUM)
_KLD = re.compile(r"Mean\s+KLD:\s*" + _NUM + _PM + _NUM)
_TOP = re.compile(r"Same top p:\s*" + _NUM + _PM + _NUM + r"\s*%")
_RMS_DP = re.compile(r"RMS Δp\s*:\s*" + _NUM + _PM + _NUM + r"\s*%")


class ParseError(ValueError):
    """llama-perplexity's output lacks a figure the caller needs; the message says which."""


def _f(s: str) -> float:
    return float(s.replace("-nan", "nan"))


@dataclass(frozen=True)
class BaseResult:
    """A plain or --kl-divergence-base run."""
    ppl: float
    ppl_err: float
    n_chunks: int          # -1 when the tool did not say
    n_ctx: int


@dataclass(frozen=True)
class KLDResult:
    """A --kl-divergence run against a base logits file."""
    ppl: float             # Mean PPL(Q)
    ppl_err: float
    ppl_base: float        # Mean PPL(base), recomputed by the tool from the stored logits
    kld: float             # Mean KLD (nats / token)
    kld_err: float
    same_top_p: float      # fraction in [0, 1] (the tool prints percent)
    same_top_p_err: float
    rms_dp: float          # RMS of the change of the correct token's probability, fraction
    n_chunks: int
    n_ctx: int


def _chunks(log: str) -> tuple[int, int]:
    m = _CHUNKS.search(log)
    return (int(m.group(1)), int(m.group(2))) if m else (-1, -1)


def parse_base(log: str, what: str = "llama-perplexity") -> BaseResult:
    m = _FINAL.search(log)
    if not m:
        raise ParseError(f"{what}: no 'Final estimate: PPL = ...' line in the output")
    n, c = _chunks(log)
    return BaseResult(_f(m.group(1)), _f(m.group(2)), n, c)


def parse_kld(log: str, what: str = "llama-perplexity --kl-divergence") -> KLDResult:
    found = {}
    for key, rx in (("Mean PPL(Q)", _PPL_Q), ("Mean PPL(base)", _PPL_BASE), ("Mean KLD", _KLD),
                    ("Same top p", _TOP)):
        m = rx.search(log)
        if not m:
            hint = (" (the tool prints statistics only when at least 100 tokens are scored: "
                    "use more chunks or a longer context)" if "Perplexity statistics" not in log else "")
            raise ParseError(f"{what}: no '{key}' line in the output{hint}")
        found[key] = (_f(m.group(1)), _f(m.group(2)))
    rms = _RMS_DP.search(log)
    n, c = _chunks(log)
    return KLDResult(
        ppl=found["Mean PPL(Q)"][0], ppl_err=found["Mean PPL(Q)"][1],
        ppl_base=found["Mean PPL(base)"][0],
        kld=found["Mean KLD"][0], kld_err=found["Mean KLD"][1],
        same_top_p=found["Same top p"][0] / 100.0, same_top_p_err=found["Same top p"][1] / 100.0,
        rms_dp=_f(rms.group(1)) / 100.0 if rms else math.nan, n_chunks=n, n_ctx=c)
