"""LRQ files from small declarative recipes: base quantizer, replication, calibration, rotation.

    from lrq.eval.recipe import Recipe, Builder
    b = Builder(src, work_dir, BuildSettings(calib_tokens=1024, calib_steps=20))
    r = Recipe("mse + selected + calibrated", scale_search="mse", replication="selected",
               calibrated=True)
    built = b.build(r)            # built.path, built.seconds {"select": .., "convert": .., ...}

One recipe is one row of a results table (bench/results.py, the demo's final table).  The
steps, in order, each timed:

1. ``rotate``      (recipe.rotate) lrq.rotate.rotate_model: the source becomes a rotated F32 GGUF
                   (same function); conversion and calibration then read it;
2. ``select``      (replication "selected") lrq.select.select_layers on the calibration text
                   with the recipe's quantizer (gptq bases are ranked with minmax), ranked by
                   BuildSettings.select_rank_by, strategy / k from the settings; the plan JSON
                   gets the recipe's mode (serial / parallel).  Scores are computed once per
                   (source, quantizer) and reused by every recipe that needs them;
3. ``convert``     lrq.convert with ConvertOptions(bits, group_size, scale_search, gptq, plan,
                   grid_offset, **recipe.convert) — ``convert`` carries any further option, e.g.
                   a future ``{"base_type": "IQ2_XS"}``: an option the converter does not know
                   yet makes the recipe *skipped* (RecipeSkipped), not a crash;
4. ``calibrate``   (recipe.calibrated) lrq.calib.calibrate.calibrate on the calibration text,
                   against the (rotated) source.

Built files are shared between recipes that differ only in later steps (an uncalibrated and a
calibrated recipe share the converted file).  Nothing is cached across runs: ``work`` is the
caller's directory.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

REPLICATIONS = ("none", "selected", "all")
MODES = ("serial", "parallel")


class RecipeSkipped(RuntimeError):
    """A recipe cannot be built here (an option this version lacks, a model too large ...)."""


def add_time(into: dict, key: str, fn, *a, **kw):
    """fn(*a, **kw), its seconds added to into[key] (also when it raises)."""
    t0 = time.monotonic()
    try:
        return fn(*a, **kw)
    finally:
        into[key] = into.get(key, 0.0) + time.monotonic() - t0


@dataclass(frozen=True)
class Recipe:
    """One LRQ configuration.  New rows are one line each; unknown converter options go in
    ``convert`` (e.g. ``convert={"base_type": "IQ2_XS"}``)."""
    name: str
    bits: int = 2
    group_size: int = 64
    # minmax | mse | act-mse; None: the converter's default for the quantizer (MSE with GPTQ,
    # minmax otherwise: lrq.convert.ConvertOptions), so a GPTQ row is what `lrq-convert --gptq` makes
    scale_search: str | None = None
    gptq: bool = False
    replication: str = "none"             # none | selected | all
    mode: str = "serial"                  # serial | parallel (of the replicated layers)
    calibrated: bool = False
    rotate: bool = False
    grid_offset: float = 0.0              # initial grid offset of replicas r >= 1 (FORMAT.md 8)
    convert: tuple[tuple[str, object], ...] = ()   # further ConvertOptions fields
    note: str = ""                        # what the row shows (ablation), printed in reports

    def __post_init__(self):
        if self.scale_search is None:
            object.__setattr__(self, "scale_search", "mse" if self.gptq else "minmax")
        if self.replication not in REPLICATIONS:
            raise ValueError(f"recipe {self.name}: replication {self.replication!r} is not one of "
                             f"{', '.join(REPLICATIONS)}")
        if self.mode not in MODES:
            raise ValueError(f"recipe {self.name}: mode {self.mode!r} is not serial or parallel")
        if isinstance(self.convert, dict):
            object.__setattr__(self, "convert", tuple(sorted(self.convert.items())))

    @property
    def slug(self) -> str:
        s = "".join(c if c.isalnum() else "-" for c in self.name.lower())
        while "--" in s:
            s = s.replace("--", "-")
        return s.strip("-")

    def base_key(self) -> tuple:
        """What the converted (uncalibrated) file depends on."""
        return (self.bits, self.group_size, self.scale_search, self.gptq, self.replication,
                self.mode, self.rotate, self.grid_offset, self.convert)


@dataclass
class BuildSettings:
    calib_text: str = "sotu-calib"
    # layer selection (lrq-select)
    select_strategy: str = "top-k"
    select_k: int = 4
    select_rank_by: str = "kl"            # score | kl | nll (kl / nll: measured, select_measure_tokens)
    select_tokens: int = 512
    select_measure_tokens: int = 512
    select_ctx: int = 512
    # GPTQ / act-mse bases
    gptq_tokens: int = 2048
    # stock-typed bases (ConvertOptions.base_type): the imatrix of the stock rows, and where
    # lrq.eval.stock caches the F32 / stock intermediates (None: its default)
    imatrix: str | None = None
    stock_work: str | None = None
    # calibration (lrq-calibrate)
    calib_tokens: int = 1024
    calib_window: int = 512
    calib_steps: int = 20
    torch_threads: int = 1
    seed: int = 0
    progress: bool = False


@dataclass
class Built:
    recipe: Recipe
    path: Path
    source: Path                          # the source the file was converted from (rotated or not)
    plan: str                             # "none", "all" or the plan file
    choice: dict[int, int] = field(default_factory=dict)   # selected {layer: copies}
    seconds: dict[str, float] = field(default_factory=dict)   # every step the file needed
    calib_loss: float = float("nan")      # final residual-stream MSE on the calibration tokens
    reused: frozenset = frozenset()       # steps of ``seconds`` done earlier for another recipe

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


class Builder:
    """Builds recipes for one source model into ``work`` (see the module doc)."""

    def __init__(self, src: str | os.PathLike, work: str | os.PathLike,
                 settings: BuildSettings | None = None, log: Callable[[str], None] = lambda s: None):
        self.src = Path(src)
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.s = settings or BuildSettings()
        self.log = log
        self._rotated: Path | None = None
        self._rot_seconds = 0.0
        self._scores: dict[tuple, tuple[list, float]] = {}
        self._converted: dict[tuple, Built] = {}
        self._calibrated: dict[tuple, Built] = {}

    # ---- steps --------------------------------------------------------------------------------
    def source_for(self, recipe: Recipe) -> tuple[Path, float]:
        if not recipe.rotate:
            return self.src, 0.0
        if self._rotated is None:
            from ..rotate import rotate_model
            t0 = time.monotonic()
            out = self.work / f"{self.src.stem}.rotated.F32.gguf"
            self.log(f"rotate {self.src.name} -> {out.name}")
            rotate_model(self.src, out, seed=self.s.seed)
            self._rotated, self._rot_seconds = out, time.monotonic() - t0
            return out, self._rot_seconds
        return self._rotated, 0.0          # counted by the recipe that made it

    def scores(self, source: Path, recipe: Recipe) -> tuple[list, float, bool]:
        """lrq-select's per-layer scores for the recipe's quantizer, the seconds they took and
        whether an earlier recipe already computed them (cached per run)."""
        from ..select import QuantSpec, select_layers
        search = recipe.scale_search if recipe.scale_search in ("minmax", "mse") else "minmax"
        key = (str(source), recipe.bits, recipe.group_size, search)
        if key in self._scores:
            return self._scores[key][0], self._scores[key][1], True
        t0 = time.monotonic()
        measure = self.s.select_measure_tokens if self.s.select_rank_by != "score" else 0
        self.log(f"lrq-select {source.name} ({recipe.bits}-bit g{recipe.group_size} {search}, "
                 f"rank by {self.s.select_rank_by})")
        sc = select_layers(source, QuantSpec(recipe.bits, recipe.group_size, "asym", search),
                           self.s.calib_text, self.s.select_tokens, self.s.select_ctx, measure,
                           self.s.torch_threads, progress=self.s.progress)
        dt = time.monotonic() - t0
        self._scores[key] = (sc, dt)
        return sc, dt, False

    def plan_for(self, source: Path, recipe: Recipe) -> tuple[str, dict[int, int], float, bool]:
        from ..model_file import open_model
        from ..select import choose, write_plan
        n_layer = int(open_model(source).hparams["n_layer"])
        if recipe.replication == "none":
            return "none", {}, 0.0, False
        if recipe.replication == "all":
            choice = {l: 2 for l in range(n_layer)}
            if recipe.mode == "serial":
                return "all", choice, 0.0, False
            seconds, reused = 0.0, False
        else:
            sc, seconds, reused = self.scores(source, recipe)
            attr = {"score": "score", "kl": "kl", "nll": "dnll"}[self.s.select_rank_by]
            choice = choose([getattr(x, attr) for x in sc], self.s.select_strategy, self.s.select_k)
        path = self.work / f"plan-{recipe.replication}-{recipe.mode}-{recipe.scale_search}-" \
                           f"{'rot' if recipe.rotate else 'plain'}.json"
        write_plan(path, choice, n_layer, recipe.mode)
        return str(path), choice, seconds, reused

    def convert_options(self, recipe: Recipe, plan: str):
        from ..convert import ConvertOptions
        kw = dict(bits=recipe.bits, group_size=recipe.group_size, scale_search=recipe.scale_search,
                  gptq=recipe.gptq, plan=plan, grid_offset=recipe.grid_offset, seed=self.s.seed,
                  progress=self.s.progress)
        if recipe.gptq or recipe.scale_search == "act-mse":
            kw.update(calib_text=self.s.calib_text, calib_tokens=self.s.gptq_tokens,
                      calib_window=self.s.calib_window)
        names = {f.name for f in fields(ConvertOptions)}
        extra = dict(recipe.convert)
        unknown = sorted(set(extra) - names)
        if unknown:
            raise RecipeSkipped(f"ConvertOptions has no option {', '.join(unknown)} in this version")
        if extra.get("base_type"):       # llama-quantize makes the codes: its imatrix, its cache
            kw.update(calib_text=self.s.calib_text, imatrix=self.s.imatrix, work=self.s.stock_work)
        kw.update(extra)
        return ConvertOptions(**kw)

    def converted(self, recipe: Recipe) -> Built:
        key = recipe.base_key()
        if key in self._converted:
            b = self._converted[key]
            return Built(recipe, b.path, b.source, b.plan, dict(b.choice), dict(b.seconds),
                         reused=frozenset(b.seconds))
        self.convert_options(recipe, "none")       # an unknown option skips before any work
        source, t_rot = self.source_for(recipe)
        plan, choice, t_sel, sel_reused = self.plan_for(source, recipe)
        opts = self.convert_options(recipe, plan)
        out = self.work / f"{self.src.stem}.{recipe.slug}.lrq.gguf"
        from ..convert import convert
        self.log(f"lrq-convert -> {out.name}")
        t0 = time.monotonic()
        convert(source, out, opts)
        secs = {"rotate": t_rot, "select": t_sel, "convert": time.monotonic() - t0}
        b = Built(recipe, out, source, plan, choice, {k: v for k, v in secs.items() if v},
                  reused=frozenset({"select"} if sel_reused else ()))
        self._converted[key] = b
        return b

    def build(self, recipe: Recipe) -> Built:
        """The recipe's file (RecipeSkipped, ConvertError, CalibError, SelectError on failure)."""
        base = self.converted(recipe)
        if not recipe.calibrated:
            return base
        key = recipe.base_key()
        if key in self._calibrated:
            b = self._calibrated[key]
            return Built(recipe, b.path, b.source, b.plan, dict(b.choice), dict(b.seconds),
                         b.calib_loss, frozenset(b.seconds))
        import torch

        from ..calib.calibrate import CalibrateOptions, calibrate
        out = base.path.with_name(base.path.name.replace(".lrq.gguf", ".cal.lrq.gguf"))
        if out == base.path:
            out = base.path.with_suffix(".cal.gguf")
        opts = CalibrateOptions(text=self.s.calib_text, n_tokens=self.s.calib_tokens,
                                window=self.s.calib_window, steps=self.s.calib_steps, seed=self.s.seed,
                                progress=self.s.progress)
        n = torch.get_num_threads()
        if self.s.torch_threads:
            torch.set_num_threads(self.s.torch_threads)
        self.log(f"lrq-calibrate -> {out.name} ({opts.n_tokens} tokens, {opts.steps} steps, "
                 f"{torch.get_num_threads()} torch threads)")
        t0 = time.monotonic()
        try:
            s = calibrate(base.path, out, base.source, opts)
        finally:
            torch.set_num_threads(n)
        secs = dict(base.seconds)
        secs["calibrate"] = time.monotonic() - t0
        b = Built(recipe, out, base.source, base.plan, dict(base.choice), secs, s.final_loss,
                  base.reused)
        self._calibrated[key] = b
        return b


def plan_summary(choice: dict[int, int]) -> str:
    return ", ".join(f"{l}x{r}" for l, r in sorted(choice.items())) or "(none)"


__all__ = ["REPLICATIONS", "MODES", "Recipe", "RecipeSkipped", "BuildSettings", "Built", "Builder",
           "add_time", "plan_summary"]
