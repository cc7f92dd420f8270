"""The search space of lrq-search: which layers run more than once, how strongly, on which base.

Layers are split into ``n_groups`` groups of adjacent layers (``numpy.array_split``: sizes differ
by at most one) that share their parameters, which keeps the space small (the method's chapter on
parameter optimisation groups 8 groups of adjacent layers).  Per group g:

- ``copies_g`` in 1..max_copies: every layer of the group runs that many times in a row (a repeat
  list ``NxK``, FORMAT.md 7.1): a layer map, so no weight is copied and no file rewritten;
- ``strength_g`` in [0, 1] (kind ``strength``): the gain on ``attn_output`` and ``ffn_down`` of the
  group's extra copies (replicas >= 1), i.e. how much of its residual update a repeated block
  adds.  1 is the plain repeat (no adapter needed); 0 makes the copy a no-op;
- ``scale_g`` in [0.9, 1.1] (kind ``scale``): the same gain on replica 0 of the group's layers —
  the method's per-group scale multiplier, on the residual update of a stock-typed block.

Plus ``base`` when several base GGUFs are given (the base type is a dimension).  A candidate with a
strength or scale other than 1 is base + layer map + a small adapter holding only those gains
(FORMAT.md 11), written per trial (kilobytes); the base is never rewritten.

Continuous parameters move in steps (STRENGTH_STEP, SCALE_STEP) so that two trials proposing the
same candidate can be recognised (their canonical key is equal) and measured once.

Activation clips are absolute bounds per linear (FORMAT.md 6.1), not ratios, so they are left to
the final calibration (lrq-calibrate fits them when asked, ``--calib-params``); parallel
replicas of the same weights with the same parameters average to the block itself, so the mode
``parallel`` only means something once calibrated, and the search runs serial copies.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

PARAM_KINDS = ("strength", "scale")
STRENGTH_RANGE, STRENGTH_STEP = (0.0, 1.0), 0.1
SCALE_RANGE, SCALE_STEP = (0.9, 1.1), 0.02
RESIDUAL_LINEARS = ("attn_output", "ffn_down")
MAX_COPIES = 4


class SearchError(ValueError):
    """Bad search input; the message names the option, file or study."""


def make_groups(n_layer: int, n_groups: int) -> tuple[tuple[int, ...], ...]:
    if n_layer < 1:
        raise SearchError(f"the model has {n_layer} layers")
    if not 1 <= n_groups <= n_layer:
        raise SearchError(f"--groups {n_groups} is outside 1..{n_layer} (the model's layer count)")
    return tuple(tuple(int(x) for x in a) for a in np.array_split(np.arange(n_layer), n_groups))


def _snap(v: float, lo: float, step: float) -> float:
    return round(lo + round((v - lo) / step) * step, 6)


@dataclass(frozen=True)
class Space:
    n_layer: int
    bases: tuple[str, ...]
    groups: tuple[tuple[int, ...], ...]
    max_copies: int = 2
    params: tuple[str, ...] = ("strength",)
    grid_strengths: tuple[float, ...] = (0.5, 1.0)
    grid_scales: tuple[float, ...] = (0.96, 1.04)

    def __post_init__(self):
        if not self.bases:
            raise SearchError("no base GGUF to search on (--base)")
        if not 1 <= self.max_copies <= MAX_COPIES:
            raise SearchError(f"--max-copies {self.max_copies} is outside 1..{MAX_COPIES}")
        bad = set(self.params) - set(PARAM_KINDS)
        if bad:
            raise SearchError(f"--params: unknown kind(s) {', '.join(sorted(bad))}; known: "
                              f"{', '.join(PARAM_KINDS)}")
        for s in self.grid_strengths:
            if not STRENGTH_RANGE[0] <= s <= STRENGTH_RANGE[1]:
                raise SearchError(f"--grid-strengths: {s} is outside {STRENGTH_RANGE}")
        for s in self.grid_scales:
            if not SCALE_RANGE[0] <= s <= SCALE_RANGE[1]:
                raise SearchError(f"--grid-scales: {s} is outside {SCALE_RANGE}")
        covered = sorted(l for g in self.groups for l in g)
        if covered != list(range(self.n_layer)):
            raise SearchError(f"the groups do not cover layers 0..{self.n_layer - 1} once each")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["groups"] = [list(g) for g in self.groups]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Space":
        return cls(int(d["n_layer"]), tuple(d["bases"]), tuple(tuple(g) for g in d["groups"]),
                   int(d["max_copies"]), tuple(d["params"]), tuple(d["grid_strengths"]),
                   tuple(d["grid_scales"]))

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    def plain(self, base: str) -> "Candidate":
        g = self.n_groups
        return Candidate(base, (1,) * g, (1.0,) * g, (1.0,) * g)


@dataclass(frozen=True)
class Candidate:
    base: str
    copies: tuple[int, ...]
    strength: tuple[float, ...]
    scale: tuple[float, ...]

    def normalized(self) -> "Candidate":
        """Parameters that change nothing set to their defaults (a strength of a group that is
        not repeated), values on their steps: equal candidates compare equal."""
        st = tuple(_snap(s, STRENGTH_RANGE[0], STRENGTH_STEP) if c > 1 else 1.0
                   for c, s in zip(self.copies, self.strength))
        sc = tuple(_snap(s, SCALE_RANGE[0], SCALE_STEP) for s in self.scale)
        return Candidate(self.base, tuple(int(c) for c in self.copies), st, sc)

    def repeats(self, space: Space) -> dict[int, int]:
        """{layer: copies} for every layer that runs more than once."""
        return {l: c for g, c in zip(space.groups, self.copies) if c > 1 for l in g}

    def layer_map(self, space: Space) -> str:
        """The repeat list (FORMAT.md 7.1), '' when every layer runs once."""
        return ",".join(f"{l}x{c}" for l, c in sorted(self.repeats(space).items()))

    def n_exec(self, space: Space) -> int:
        return space.n_layer + sum(c - 1 for c in self.repeats(space).values())

    def needs_adapter(self) -> bool:
        n = self.normalized()
        return any(s != 1.0 for s in n.strength) or any(s != 1.0 for s in n.scale)

    def key(self, space: Space) -> str:
        n = self.normalized()
        parts = [n.base, self.layer_map(space) or "-"]
        if n.needs_adapter():
            parts += ["st=" + ",".join(f"{s:g}" for s in n.strength),
                      "sc=" + ",".join(f"{s:g}" for s in n.scale)]
        return "|".join(parts)

    def describe(self, space: Space) -> str:
        n = self.normalized()
        rep = [f"g{i}({space.groups[i][0]}..{space.groups[i][-1]})x{c}"
               + (f"@{s:g}" if s != 1.0 else "") for i, (c, s) in enumerate(zip(n.copies, n.strength)) if c > 1]
        sc = [f"g{i}*{s:g}" for i, s in enumerate(n.scale) if s != 1.0]
        return " ".join(rep + sc) or "no repeat"

    def optuna_params(self, space: Space) -> dict:
        """The trial parameters that reproduce this candidate (for study.enqueue_trial)."""
        n = self.normalized()
        p: dict = {}
        if len(space.bases) > 1:
            p["base"] = n.base
        for g in range(space.n_groups):
            p[f"copies_g{g}"] = n.copies[g]
            if "strength" in space.params:
                p[f"strength_g{g}"] = n.strength[g]
            if "scale" in space.params:
                p[f"scale_g{g}"] = n.scale[g]
        return p

    def adapter_tensors(self, space: Space, n_out: dict[str, int]) -> dict[str, np.ndarray]:
        """{replica tensor name: gain} of the adapter (FORMAT.md 5: ``blk.N.<slot>.lrq_r{r}.gain``);
        ``n_out``: output width of each residual linear ({'attn_output': d, 'ffn_down': d})."""
        from ..constants import replica_param_name
        n = self.normalized()
        out = {}
        for gi, layers in enumerate(space.groups):
            for l in layers:
                for r in range(n.copies[gi]):
                    g = n.scale[gi] if r == 0 else n.strength[gi]
                    if g == 1.0:
                        continue
                    for lin in RESIDUAL_LINEARS:
                        out[replica_param_name(f"blk.{l}.{lin}.weight", r, "gain")] = \
                            np.full(n_out[lin], g, dtype=np.float32)
        return out


def suggest(trial, space: Space) -> Candidate:
    """The candidate of an Optuna trial (the same names as Candidate.optuna_params)."""
    base = trial.suggest_categorical("base", list(space.bases)) if len(space.bases) > 1 else space.bases[0]
    copies, st, sc = [], [], []
    for g in range(space.n_groups):
        copies.append(trial.suggest_int(f"copies_g{g}", 1, space.max_copies))
        st.append(trial.suggest_float(f"strength_g{g}", *STRENGTH_RANGE, step=STRENGTH_STEP)
                  if "strength" in space.params else 1.0)
        sc.append(trial.suggest_float(f"scale_g{g}", *SCALE_RANGE, step=SCALE_STEP)
                  if "scale" in space.params else 1.0)
    return Candidate(base, tuple(copies), tuple(st), tuple(sc)).normalized()


def grid(space: Space) -> list[Candidate]:
    """Stage 1, the coarse grid: per base, the base alone; then one group at a time: each copy
    count 2..max_copies at each grid strength, and each grid scale with no repeat.  (The full
    product of 8 groups is 3^8+ points; one factor at a time is 1 + 8 x |values| per base, and
    stage 2's TPE combines the factors.)"""
    out: list[Candidate] = []
    strengths = space.grid_strengths if "strength" in space.params else (1.0,)
    for base in space.bases:
        plain = space.plain(base)
        out.append(plain)
        for g in range(space.n_groups):
            for c in range(2, space.max_copies + 1):
                for s in strengths:
                    cp = list(plain.copies); cp[g] = c
                    stv = list(plain.strength); stv[g] = s
                    out.append(Candidate(base, tuple(cp), tuple(stv), plain.scale).normalized())
            if "scale" in space.params:
                for s in space.grid_scales:
                    scv = list(plain.scale); scv[g] = s
                    out.append(Candidate(base, plain.copies, plain.strength, tuple(scv)).normalized())
    seen, uniq = set(), []
    for c in out:
        k = c.key(space)
        if k not in seen:
            seen.add(k)
            uniq.append(c)
    return uniq


def candidate_from_params(params: dict, space: Space) -> Candidate:
    """Inverse of optuna_params (a finished trial's params -> its candidate)."""
    g = range(space.n_groups)
    return Candidate(params.get("base", space.bases[0]),
                     tuple(int(params[f"copies_g{i}"]) for i in g),
                     tuple(float(params.get(f"strength_g{i}", 1.0)) for i in g),
                     tuple(float(params.get(f"scale_g{i}", 1.0)) for i in g)).normalized()


__all__ = ["PARAM_KINDS", "STRENGTH_RANGE", "STRENGTH_STEP", "SCALE_RANGE", "SCALE_STEP",
           "RESIDUAL_LINEARS", "MAX_COPIES", "SearchError", "make_groups", "Space", "Candidate",
           "suggest", "grid", "candidate_from_params"]
