"""Replication schedules: which base layer runs, with which replica, in which order.

A ``Plan`` is the ordered list of executions of docs/FORMAT.md "Schedule".  It is built from a
preset (``none``, ``all``, ``last-N``, ``progressive``), a layer map (FORMAT.md 7.1, e.g.
``0..15,11..31`` or ``27x2``) or an explicit JSON / YAML file::

    {"layers": {"27": {"replicas": 2, "mode": "serial"},
                "28": {"replicas": 3, "mode": "parallel", "weights": [0.5, 0.25, 0.25]}}}

(layers not named run once, replica 0), validated against a model's layer count, and stored as
the four ``lrq.schedule.*`` key arrays.

A plan file of a mixture-of-experts model may also replicate the MoE FFN of a layer for some
experts only (format v4, docs/moe.md), stored as the ``lrq.moe.*`` arrays::

    {"layers": {...}, "experts": [{"layer": 2, "experts": [0, 5], "mode": "serial", "weight": 1.0}]}
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from .constants import (MAX_EXECUTIONS, MOE_KEYS, MOE_MODES, MOE_PARALLEL, MOE_WEIGHT_SUM_TOL,
                        Keys)

PRESETS = ("none", "all", "last-N", "progressive")
_LAST_N = re.compile(r"^last-(\d+)$")
# weights of a parallel group are normally 1/size; the converter accepts explicit ones that sum
# to 1 within this tolerance (float32 storage of e.g. 1/3 is not exact)
WEIGHT_SUM_TOL = 1e-5


class PlanError(ValueError):
    """A plan or schedule is invalid; the message names the file / key and the layer."""


@dataclass(frozen=True)
class Execution:
    layer: int          # base layer index
    replica: int        # replica of that layer (0 = the base parameters)
    group: int          # parallel-group id (non-decreasing along the schedule)
    weight: float = 1.0  # weight in its group


@dataclass(frozen=True)
class ExpertEntry:
    """Replica ``replica`` (>= 1) of the MoE FFN of base ``layer`` for ``experts`` only
    (docs/moe.md): parallel E' = E + a (E_r - E), serial E' = E + a E_r, for a listed expert."""
    layer: int
    replica: int
    experts: tuple[int, ...]
    mode: str            # "parallel" | "serial"
    weight: float


@dataclass(frozen=True)
class Plan:
    executions: tuple[Execution, ...]
    source: str = ""     # what it was made from (preset name or file), for messages and lrq.plan
    experts: tuple[ExpertEntry, ...] = ()   # expert-level replication entries (format v4)

    @property
    def n_exec(self) -> int:
        return len(self.executions)

    @property
    def n_layer(self) -> int:
        return max((e.layer for e in self.executions), default=-1) + 1

    def replicas(self, layer: int) -> list[int]:
        """Distinct replica indices the schedule runs for ``layer``, sorted."""
        return sorted({e.replica for e in self.executions if e.layer == layer})

    def groups(self) -> list[list[Execution]]:
        """Executions split into their parallel groups, in order."""
        out: list[list[Execution]] = []
        for e in self.executions:
            if out and out[-1][0].group == e.group:
                out[-1].append(e)
            else:
                out.append([e])
        return out

    def validate(self, n_layer: int, where: str = "plan") -> "Plan":
        """Raise PlanError (naming ``where`` and the layer) unless the schedule is valid."""
        if not self.executions:
            raise PlanError(f"{where}: the schedule is empty")
        if len(self.executions) > MAX_EXECUTIONS:
            raise PlanError(f"{where}: the schedule has {len(self.executions)} executions; at most "
                            f"{MAX_EXECUTIONS} (llama.cpp's layer limit) are supported")
        # layers may come in any order (FORMAT.md rule S3): a schedule may go back to an earlier
        # layer; only the group ids must not decrease
        prev_group = -1
        for i, e in enumerate(self.executions):
            if not (0 <= e.layer < n_layer):
                raise PlanError(f"{where}: layer {e.layer} does not exist in a model with {n_layer} "
                                f"layers (valid: 0..{n_layer - 1})")
            if not (0 <= e.replica < MAX_EXECUTIONS):
                raise PlanError(f"{where}: execution {i} (layer {e.layer}) has replica {e.replica}; "
                                f"replica indices are 0..{MAX_EXECUTIONS - 1}")
            if e.group < prev_group:
                raise PlanError(f"{where}: execution {i} (layer {e.layer}) has group id {e.group} after "
                                f"{prev_group}; group ids must be non-decreasing")
            if not math.isfinite(e.weight):
                raise PlanError(f"{where}: execution {i} (layer {e.layer}) has weight {e.weight}")
            prev_group = e.group
        for grp in self.groups():
            if len({e.layer for e in grp}) != 1:
                raise PlanError(f"{where}: parallel group {grp[0].group} mixes layers "
                                f"{sorted({e.layer for e in grp})}")
            reps = [e.replica for e in grp]
            if len(set(reps)) != len(reps):
                raise PlanError(f"{where}: parallel group {grp[0].group} of layer {grp[0].layer} "
                                f"runs a replica twice: {reps}")
        missing = sorted(set(range(n_layer)) - {e.layer for e in self.executions})
        if missing:
            raise PlanError(f"{where}: layer(s) {', '.join(map(str, missing))} never run; every layer "
                            f"0..{n_layer - 1} must appear at least once")
        return self

    def first_backstep(self) -> int | None:
        """Index of the first execution whose layer is lower than the one before it (a schedule
        that goes back to an earlier layer, or starts past layer 0), None when the layers never
        decrease: the tools that fit layer by layer in index order need the latter."""
        for i in range(1, len(self.executions)):
            if self.executions[i].layer < self.executions[i - 1].layer:
                return i
        return None

    # ---- GGUF key arrays ------------------------------------------------------------------
    def to_gguf_arrays(self) -> dict[str, list]:
        return {
            Keys.SCHEDULE_LAYER: [e.layer for e in self.executions],
            Keys.SCHEDULE_REPLICA: [e.replica for e in self.executions],
            Keys.SCHEDULE_GROUP: [e.group for e in self.executions],
            Keys.SCHEDULE_WEIGHT: [float(e.weight) for e in self.executions],
        }

    @classmethod
    def from_gguf_arrays(cls, arrays: dict[str, list], where: str = "schedule") -> "Plan":
        keys = (Keys.SCHEDULE_LAYER, Keys.SCHEDULE_REPLICA, Keys.SCHEDULE_GROUP, Keys.SCHEDULE_WEIGHT)
        for k in keys:
            if k not in arrays or arrays[k] is None:
                raise PlanError(f"{where}: key {k} is missing")
        lens = {k: len(arrays[k]) for k in keys}
        if len(set(lens.values())) != 1:
            raise PlanError(f"{where}: schedule arrays differ in length: "
                            + ", ".join(f"{k}={n}" for k, n in lens.items()))
        ex = tuple(Execution(int(l), int(r), int(g), float(w)) for l, r, g, w in
                   zip(*(arrays[k] for k in keys)))
        return cls(ex, where)

    def expert_gguf_arrays(self) -> dict[str, list]:
        """The six lrq.moe.* arrays of the expert entries ({} without entries: the keys are
        written only when there are entries)."""
        return expert_entries_to_gguf_arrays(self.experts)

    def describe(self) -> str:
        """One line: executions, layers, replicated layers."""
        rep = {e.layer for e in self.executions if e.replica > 0}
        par = sum(1 for g in self.groups() if len(g) > 1)
        return (f"{self.n_exec} executions over {self.n_layer} layers; {len(rep)} layers replicated"
                f"{f', {par} parallel groups' if par else ''}")


# ---- expert-level replication entries (format v4, docs/moe.md) ------------------------------

def expert_entries_to_gguf_arrays(entries) -> dict[str, list]:
    if not entries:
        return {}
    return {Keys.MOE_LAYER: [e.layer for e in entries], Keys.MOE_REPLICA: [e.replica for e in entries],
            Keys.MOE_EXPERTS: [x for e in entries for x in e.experts],
            Keys.MOE_COUNT: [len(e.experts) for e in entries],
            Keys.MOE_MODE: [MOE_MODES[e.mode] for e in entries],
            Keys.MOE_WEIGHT: [float(e.weight) for e in entries]}


def expert_entries_from_gguf_arrays(arrays: dict, where: str) -> tuple[ExpertEntry, ...]:
    """Entries of the lrq.moe.* arrays ({key: list or None}); rule X1's all-or-none and lengths.
    The same checks, in the same order, as lrq_load_hparams in native/lrq/lrq-llama.cpp."""
    present = [k for k in MOE_KEYS if arrays.get(k) is not None]
    if not present:
        return ()
    for k in MOE_KEYS:
        if arrays.get(k) is None:
            raise PlanError(f"{where}: key {k} is missing; expert replication needs all of "
                            f"{', '.join(MOE_KEYS)} (rule X1)")
    m = len(arrays[Keys.MOE_LAYER])
    for k in (Keys.MOE_REPLICA, Keys.MOE_COUNT, Keys.MOE_MODE, Keys.MOE_WEIGHT):
        if len(arrays[k]) != m:
            raise PlanError(f"{where}: key {k} has {len(arrays[k])} entries, {Keys.MOE_LAYER} has {m} "
                            f"(rule X1)")
    counts = [int(c) for c in arrays[Keys.MOE_COUNT]]
    if sum(counts) != len(arrays[Keys.MOE_EXPERTS]):
        raise PlanError(f"{where}: key {Keys.MOE_EXPERTS} has {len(arrays[Keys.MOE_EXPERTS])} entries, the "
                        f"sum of {Keys.MOE_COUNT} is {sum(counts)} (rule X1)")
    inv = {v: k for k, v in MOE_MODES.items()}
    out, at = [], 0
    for i in range(m):
        mode = int(arrays[Keys.MOE_MODE][i])
        if mode not in inv:
            raise PlanError(f"{where}: key {Keys.MOE_MODE}: entry {i} has mode {mode}; 0 = parallel, "
                            f"1 = serial (rule X1)")
        out.append(ExpertEntry(int(arrays[Keys.MOE_LAYER][i]), int(arrays[Keys.MOE_REPLICA][i]),
                               tuple(int(x) for x in arrays[Keys.MOE_EXPERTS][at:at + counts[i]]),
                               inv[mode], float(arrays[Keys.MOE_WEIGHT][i])))
        at += counts[i]
    return tuple(out)


def check_expert_entries(entries, n_layer: int, n_expert: int | None, where: str) -> None:
    """Rules X1 (layers, replicas), X2 (experts) and X3 (weights) of docs/moe.md; n_expert None
    skips the bound of X2 (a plan file, before the model is known)."""
    if entries and n_expert is not None and n_expert < 1:
        raise PlanError(f"{where}: key {Keys.MOE_LAYER}: expert replication needs a mixture-of-experts "
                        f"model; this one has no experts (rule X1)")
    seen: set[tuple[int, int]] = set()
    par_sum: dict[int, float] = {}
    for i, e in enumerate(entries):
        if not 0 <= e.layer < n_layer:
            raise PlanError(f"{where}: key {Keys.MOE_LAYER}: entry {i} names layer {e.layer} of a model "
                            f"with {n_layer} layers (rule X1)")
        if not 1 <= e.replica < MAX_EXECUTIONS:
            raise PlanError(f"{where}: key {Keys.MOE_REPLICA}: entry {i} has replica {e.replica}; expert "
                            f"replicas are 1..{MAX_EXECUTIONS - 1} (rule X1)")
        if (e.layer, e.replica) in seen:
            raise PlanError(f"{where}: key {Keys.MOE_REPLICA}: entry {i} repeats replica {e.replica} of "
                            f"layer {e.layer} (rule X1)")
        seen.add((e.layer, e.replica))
        if not e.experts:
            raise PlanError(f"{where}: key {Keys.MOE_COUNT}: entry {i} lists no expert (rule X2)")
        for a, b in zip(e.experts, e.experts[1:]):
            if not a < b:
                raise PlanError(f"{where}: key {Keys.MOE_EXPERTS}: entry {i} lists experts {a}, {b}; each "
                                f"entry's list is sorted and names an expert once (rule X2)")
        if n_expert is not None and e.experts[-1] >= n_expert:
            raise PlanError(f"{where}: key {Keys.MOE_EXPERTS}: entry {i} names expert {e.experts[-1]}; the "
                            f"model has {n_expert} experts per layer (0..{n_expert - 1}; rule X2)")
        if not math.isfinite(e.weight):
            raise PlanError(f"{where}: key {Keys.MOE_WEIGHT}: entry {i} has weight {e.weight} (rule X3)")
        if MOE_MODES[e.mode] == MOE_PARALLEL:
            if e.weight < 0:
                raise PlanError(f"{where}: key {Keys.MOE_WEIGHT}: parallel entry {i} has weight {e.weight} "
                                f"< 0 (rule X3)")
            par_sum[e.layer] = par_sum.get(e.layer, 0.0) + e.weight
            if par_sum[e.layer] > 1.0 + MOE_WEIGHT_SUM_TOL:
                raise PlanError(f"{where}: key {Keys.MOE_WEIGHT}: the parallel entries of layer {e.layer} "
                                f"weigh {par_sum[e.layer]:.7g} together, more than 1 (rule X3)")


def _experts_from_spec(spec, where: str) -> tuple[ExpertEntry, ...]:
    """The plan file's "experts" list -> entries; replica defaults to 1 + earlier entries of
    the layer."""
    if not isinstance(spec, list):
        raise PlanError(f"{where}: \"experts\" must be a list of objects {{\"layer\": L, \"experts\": "
                        f"[...], \"mode\": \"parallel\"|\"serial\", \"weight\": a}}")
    out: list[ExpertEntry] = []
    for i, item in enumerate(spec):
        if not isinstance(item, dict):
            raise PlanError(f"{where}: experts entry {i}: expected an object, got {item!r}")
        unknown = set(item) - {"layer", "experts", "mode", "weight", "replica"}
        if unknown:
            raise PlanError(f"{where}: experts entry {i}: unknown field(s) {', '.join(sorted(unknown))} "
                            f"(known: layer, experts, mode, weight, replica)")

        def integer(v, what):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise PlanError(f"{where}: experts entry {i}: {what} must be an integer >= 0, got {v!r}")
            return v
        layer = integer(item.get("layer"), "layer")
        xs = item.get("experts")
        if not isinstance(xs, list) or not xs:
            raise PlanError(f"{where}: experts entry {i}: experts must be a non-empty list of expert indices")
        xs = tuple(sorted(integer(x, "each expert") for x in xs))
        mode = item.get("mode", "serial")
        if mode not in MOE_MODES:
            raise PlanError(f"{where}: experts entry {i}: mode must be 'parallel' or 'serial', got {mode!r}")
        weight = item.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise PlanError(f"{where}: experts entry {i}: weight must be a number, got {weight!r}")
        replica = item.get("replica", 1 + sum(1 for e in out if e.layer == layer))
        out.append(ExpertEntry(layer, integer(replica, "replica"), xs, mode, float(weight)))
    return tuple(out)


# ---- building plans ------------------------------------------------------------------------

def from_replicas(counts: dict[int, tuple[int, str, list[float] | None]], n_layer: int,
                  source: str = "") -> Plan:
    """Plan from {layer: (replicas, "serial" | "parallel", weights | None)}; others run once."""
    ex: list[Execution] = []
    group = 0
    for layer in range(n_layer):
        n, mode, weights = counts.get(layer, (1, "serial", None))
        if mode == "parallel" and n > 1:
            ws = weights if weights is not None else [1.0 / n] * n
            ex += [Execution(layer, r, group, float(ws[r])) for r in range(n)]
            group += 1
        else:
            for r in range(n):
                ex.append(Execution(layer, r, group, 1.0))
                group += 1
    return Plan(tuple(ex), source)


def preset(name: str, n_layer: int) -> Plan:
    """none | all | last-N | progressive (serial replicas)."""
    if name == "none":
        counts = {}
    elif name == "all":
        counts = {l: (2, "serial", None) for l in range(n_layer)}
    elif m := _LAST_N.match(name):
        n = int(m.group(1))
        if not (1 <= n <= n_layer):
            raise PlanError(f"plan '{name}': N must be in 1..{n_layer} for a model with {n_layer} layers")
        counts = {l: (2, "serial", None) for l in range(n_layer - n, n_layer)}
    elif name == "progressive":
        third = n_layer // 3
        counts = {l: (2 if l < n_layer - third else 3, "serial", None) for l in range(third, n_layer)}
    else:
        raise PlanError(f"unknown plan preset '{name}'; presets: none, all, last-N (e.g. last-8), "
                        f"progressive, a .json / .yaml file, or a layer map "
                        f"(e.g. 0..15,11..31 or 27x2)")
    return from_replicas(counts, n_layer, name)


# ---- layer maps (docs/FORMAT.md section 7.1) ---------------------------------------------------

_MAP_CHARS = re.compile(r"^[0-9.,x ]+$")
_MAP_N = re.compile(r"^(\d+)$")
_MAP_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")
_MAP_REPEAT = re.compile(r"^(\d+)x(\d+)$")


def looks_like_layer_map(spec: str) -> bool:
    """Only digits, '.', ',', 'x' and spaces, with a digit: what make_plan hands to layer_map."""
    return bool(_MAP_CHARS.match(spec)) and any(c.isdigit() for c in spec)


def layer_map(spec: str, n_layer: int) -> Plan:
    """The schedule of layer map ``spec`` (FORMAT.md 7.1) for a model of ``n_layer`` layers.

    A map whose items are all ``NxK`` is a repeat list (every layer once, in order, layer N K
    times); any other map lists every execution (``N``, ``A..B`` both ends included, ``NxK``).
    Execution e runs its layer with replica = the number of earlier executions of that layer,
    in a serial step of weight 1 (group e).  PlanError names the map and the layer count."""
    where = f"layer map '{spec}' (a model with {n_layer} layers)"

    def bad(msg: str) -> PlanError:
        return PlanError(f"{where}: {msg}")

    text = spec.replace(" ", "")
    if not text:
        raise bad("the map is empty; expected items N, A..B or NxK separated by commas")
    items = []                     # (kind, a, b): "n" (a), "range" (a..b), "repeat" (a x b)
    for it in text.split(","):
        if m := _MAP_N.match(it):
            items.append(("n", int(m.group(1)), 1))
        elif m := _MAP_RANGE.match(it):
            a, b = int(m.group(1)), int(m.group(2))
            if a > b:
                raise bad(f"item '{it}': the range runs backwards ({a} > {b}); write A..B with A <= B")
            items.append(("range", a, b))
        elif m := _MAP_REPEAT.match(it):
            n, k = int(m.group(1)), int(m.group(2))
            if k < 1:
                raise bad(f"item '{it}': a layer must run at least once (K >= 1)")
            items.append(("repeat", n, k))
        else:
            raise bad(f"item '{it}' is not N, A..B or NxK (decimal integers)")
    for kind, a, b in items:
        top = b if kind == "range" else a
        if top >= n_layer:       # the first layer of the item that does not exist
            raise bad(f"layer {max(a, n_layer)} does not exist (valid: 0..{n_layer - 1})")
    if all(kind == "repeat" for kind, _, _ in items):
        counts: dict[int, int] = {}
        for _, n, k in items:
            if n in counts:
                raise bad(f"layer {n} is named twice in a repeat list")
            counts[n] = k
        n_exec = n_layer + sum(k - 1 for k in counts.values())
        layers = None if n_exec > MAX_EXECUTIONS else [l for l in range(n_layer) for _ in range(counts.get(l, 1))]
    else:
        n_exec = sum(b - a + 1 if kind == "range" else b for kind, a, b in items)
        layers = None if n_exec > MAX_EXECUTIONS else [
            l for kind, a, b in items
            for l in (range(a, b + 1) if kind == "range" else [a] * (b if kind == "repeat" else 1))]
    if layers is None:      # counted before expanding: a map like 0x99999999 costs nothing
        raise bad(f"the map runs {n_exec} executions; at most {MAX_EXECUTIONS} (llama.cpp's layer "
                  f"limit) are supported")
    missing = sorted(set(range(n_layer)) - set(layers))
    if missing:
        raise bad(f"layer(s) {', '.join(map(str, missing))} never run; every layer 0..{n_layer - 1} "
                  f"must run at least once")
    seen: dict[int, int] = {}
    ex = []
    for e, l in enumerate(layers):
        ex.append(Execution(l, seen.get(l, 0), e, 1.0))
        seen[l] = seen.get(l, 0) + 1
    try:
        return Plan(tuple(ex), spec).validate(n_layer, where)
    except PlanError as err:       # unreachable for a map parsed above; kept as a safety net
        raise bad(str(err)) from None


def _load_file(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise PlanError(f"plan file {path}: cannot read it ({e.strerror or e})") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        raise PlanError(f"plan file {path}: not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: {e}") from None
    return data


def from_file(path: str | os.PathLike, n_layer: int) -> Plan:
    """Plan from an explicit JSON / YAML file, validated against n_layer."""
    path = Path(path)
    data = _load_file(path)
    where = f"plan file {path}"
    if (not isinstance(data, dict) or set(data) - {"layers", "experts"}
            or not isinstance(data.get("layers", {}), dict) or not data):
        raise PlanError(f"{where}: expected an object {{\"layers\": {{\"<layer>\": {{\"replicas\": N, "
                        f"\"mode\": \"serial\"|\"parallel\"}}}}}} (and, for a mixture-of-experts model, "
                        f"\"experts\": [...])")
    experts = _experts_from_spec(data["experts"], where) if "experts" in data else ()
    check_expert_entries(experts, n_layer, None, where)
    counts: dict[int, tuple[int, str, list[float] | None]] = {}
    for key, spec in data.get("layers", {}).items():
        try:
            layer = int(key)
        except (TypeError, ValueError):
            raise PlanError(f"{where}: layer key '{key}' is not an integer") from None
        if not (0 <= layer < n_layer):
            raise PlanError(f"{where}: layer {layer} does not exist in a model with {n_layer} layers "
                            f"(valid: 0..{n_layer - 1})")
        if not isinstance(spec, dict):
            raise PlanError(f"{where}: layer {layer}: expected an object, got {spec!r}")
        unknown = set(spec) - {"replicas", "mode", "weights"}
        if unknown:
            raise PlanError(f"{where}: layer {layer}: unknown field(s) {', '.join(sorted(unknown))} "
                            f"(known: replicas, mode, weights)")
        n = spec.get("replicas", 1)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise PlanError(f"{where}: layer {layer}: replicas must be an integer >= 1, got {n!r}")
        mode = spec.get("mode", "serial")
        if mode not in ("serial", "parallel"):
            raise PlanError(f"{where}: layer {layer}: mode must be 'serial' or 'parallel', got {mode!r}")
        weights = spec.get("weights")
        if weights is not None:
            if mode != "parallel":
                raise PlanError(f"{where}: layer {layer}: weights are only meaningful with mode 'parallel'")
            if (not isinstance(weights, list) or len(weights) != n
                    or not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights)):
                raise PlanError(f"{where}: layer {layer}: weights must be a list of {n} numbers")
            if abs(sum(weights) - 1.0) > WEIGHT_SUM_TOL:
                raise PlanError(f"{where}: layer {layer}: weights sum to {sum(weights)}, not 1")
        counts[layer] = (n, mode, weights)
    plan = from_replicas(counts, n_layer, str(path)).validate(n_layer, where)
    return replace(plan, experts=experts) if experts else plan


def make_plan(spec: str, n_layer: int) -> Plan:
    """A preset name, a plan file path or a layer map (FORMAT.md 7.1) -> a validated Plan for a
    model of n_layer layers.  A preset wins over a file of that name, a file over a map."""
    if spec in ("none", "all", "progressive") or _LAST_N.match(spec):
        return preset(spec, n_layer).validate(n_layer, f"plan '{spec}'")
    p = Path(spec)
    if p.suffix.lower() in (".json", ".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise PlanError(f"plan file {p} does not exist")
        return from_file(p, n_layer)
    if looks_like_layer_map(spec):
        return layer_map(spec, n_layer)
    return preset(spec, n_layer)   # raises the unknown-preset error
