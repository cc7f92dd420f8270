"""From a ranking of layers to a replication plan (docs/FORMAT.md section 7 plan file).

Strategies (``k`` layers; ``replicas`` copies each, serial or parallel):

- ``top-k``: the k layers with the highest ranking value get ``replicas`` copies;
- ``last-n``: the last k layers (position only; the ranking is printed for comparison);
- ``progressive``: the k highest get ``replicas + 1`` copies, the next k get ``replicas``
  (default k = n_layer // 3: the replica budget of the positional ``progressive`` preset, placed
  by sensitivity instead of depth).

Ties in the ranking are broken by the layer index (the lower layer ranks first), so a plan is a
deterministic function of the scores.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

from ..atomic import atomic_path
from .score import SelectError

STRATEGIES = ("top-k", "last-n", "progressive")


def ranking(values: Sequence[float]) -> list[int]:
    """Layer indices from the highest value to the lowest (NaN last; ties: lower index first)."""
    def key(i):
        v = values[i]
        return (1, 0.0, i) if v is None or math.isnan(v) else (0, -v, i)
    return sorted(range(len(values)), key=key)


def choose(values: Sequence[float], strategy: str, k: int | None = None,
           replicas: int = 2) -> dict[int, int]:
    """{layer: copies} for every layer with more than one copy."""
    n = len(values)
    if strategy not in STRATEGIES:
        raise SelectError(f"unknown strategy '{strategy}'; known: {', '.join(STRATEGIES)}")
    if n == 0:
        raise SelectError("no layers to choose from")
    if replicas < 2:
        raise SelectError(f"--replicas must be >= 2 (1 means no replication), got {replicas}")
    if k is None:
        k = max(1, n // 3) if strategy == "progressive" else None
    if k is None:
        raise SelectError(f"strategy '{strategy}' needs --k (number of layers)")
    limit = n // 2 if strategy == "progressive" else n
    if not (0 <= k <= limit):
        raise SelectError(f"--k {k} is outside 0..{limit} for strategy '{strategy}' on a model with "
                          f"{n} layers")
    if strategy == "last-n":
        return {l: replicas for l in range(n - k, n)}
    order = ranking(values)
    if strategy == "top-k":
        return {l: replicas for l in order[:k]}
    out = {l: replicas + 1 for l in order[:k]}
    out.update({l: replicas for l in order[k:2 * k]})
    return out


def plan_dict(choice: dict[int, int], mode: str = "serial") -> dict:
    """The plan file object: {"layers": {"<layer>": {"replicas": r, "mode": mode}}}."""
    if mode not in ("serial", "parallel"):
        raise SelectError(f"--mode must be serial or parallel, got {mode!r}")
    return {"layers": {str(l): {"replicas": int(r), "mode": mode}
                       for l, r in sorted(choice.items()) if r > 1}}


def write_plan(path: str | os.PathLike, choice: dict[int, int], n_layer: int, mode: str = "serial") -> Path:
    """Write the plan JSON and check it with lrq.plan.make_plan (the converter's own loader)."""
    from ..plan import PlanError, make_plan
    path = Path(path)
    if path.suffix.lower() != ".json":
        raise SelectError(f"{path}: the plan file must end in .json")
    if not path.resolve().parent.is_dir():
        raise SelectError(f"{path}: directory {path.parent} does not exist")
    # checked under its temporary name, so a plan that does not load never replaces the old one
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(plan_dict(choice, mode), indent=2) + "\n")
        try:
            make_plan(str(tmp), n_layer)
        except PlanError as e:
            raise SelectError(f"the plan for {path} does not load: {e}") from None
    return path
