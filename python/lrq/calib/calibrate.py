"""Per-replica parameter calibration of an LRQ file (``lrq-calibrate``).

Codes and base parameters stay frozen.  Block by block, in schedule order, the parameters of
every replica the schedule runs for layer L (replica 0 included) are fitted with Adam so that the
quantized layer L — all its executions, serial steps and parallel groups as the schedule says —
maps the *quantized* model's residual stream (the output of the already calibrated layers
0..L-1) as closely as possible (MSE) to the full-precision model's residual stream after
layer L (the float32 reference on the source).  Later layers can therefore correct earlier
layers' errors, and the loss of the last layer is the end-to-end error of the final residual
stream on the calibration tokens (``calibration_loss`` computes it independently from a file).

Replication never does worse than no replication on this loss, layer by layer: replica 0 is
first fitted alone ("norep"); that solution is embedded exactly into the replicated layer
(a serial extra replica gets gain 0 and bias 0 on attn_output and ffn_down, so it adds exactly
nothing; a member of a parallel group with replica 0 becomes a copy of it, and a weighted mean
of identical blocks is the block) and is one of the candidates; trained candidates start from it
("zero": as embedded, exact no-op start; "split": the serial executions share the residual
update 1/n each) and the candidate with the lowest full calibration loss (after rounding to the
stored precision) is kept.  For the same reason a fitted layer is kept only if it beats its
starting point.

With ``lowrank`` K > 0 every replicable linear of every replica also gets a rank-K correction
U (V x) (format v3, FORMAT.md 6.2): replica 0's factors start from the truncated SVD of its
activation-weighted error against the full-precision weight (E[x^2] of the full-precision
model's inputs to that linear) after its closed-form gain / bias, and are trained with the other
parameters; the other replicas start from replica 0's as they do for every parameter (an extra
serial replica embedded as a no-op gets U = 0).

With ``resume`` (a directory, lrq.resume) every finished layer's fitted parameters (the state
of every replica module of the layer), its report and the random generators' state after it are
written there; a rerun with the same inputs and options loads those layers, runs them with their
parameters to rebuild the quantized stream, and fits on from the first unfinished layer.  The
window order of every Adam step comes from one generator carried across layers, so restoring its
state makes the resumed run draw exactly what the uninterrupted run drew: the output is the same
file, byte for byte.

    >>> s = calibrate("in.lrq.gguf", "out.lrq.gguf", "src.gguf",
    ...               CalibrateOptions(n_tokens=4096))         # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..constants import LOWRANK_MAX_RANK, replica_param_name
from ..gguf_write import WriterError, check_output_path
from ..lrq_file import LRQFileError, LRQModelFile
from ..plan import Execution
from ..reference import Reference
from ..reference.executor import Block
from ..reference.ops import Linear, combine_group
from .activations import LINEARS, SourceActivations, run_block
from .data import CalibError, calibration_windows, check_source
from .replica import GRANULARITIES, PARAMS, ReplicaLinear, StockReplicaLinear

OUTPUT_LINEARS = ("attn_output", "ffn_down")
SERIAL_INITS = ("zero", "split", "both")
# What the block-wise fit minimises (docs/RESULTS.md "A loss that sees every token"):
#   mse:   the mean squared error of the residual stream.  On real models the first token of a
#          window is an attention sink whose residual norm is ~100x the others' (SmolLM2: ~24,000
#          against ~150 at layers 14-24), so it carries up to 98 % of this loss and the middle
#          layers are fitted to one token per window.
#   token: each token's squared error relative to that token's mean square in the full-precision
#          stream, ||y_q - y||^2 / (||y||^2 / d): every token counts alike.
LOSSES = ("mse", "token")
# A source whose weights are what the LRQ file quantized correlates with the dequantized codes
# far above this (2-bit RTN: cosine ~0.9; 1-bit ~0.7); an unrelated model of the same shapes
# gives ~0 (independent weights).
PAIRING_MIN_COSINE = 0.3


@dataclass
class CalibrateOptions:
    text: str = "sotu-calib"
    n_tokens: int = 4096
    window: int = 512
    steps: int = 50                    # Adam steps per layer and candidate
    batch_windows: int = 1             # windows per Adam step
    granularity: str = "channel"       # channel: alpha/beta [n_out, 1]; group: [n_out, n_groups]
    params: tuple[str, ...] = PARAMS   # which replica parameters are fitted
    lr: float = 5e-3                   # scale_mult and gain (relative units)
    lr_offset: float = 2e-2            # grid_offset (code units)
    lr_bias: float = 1e-3              # bias (output units)
    serial_init: str = "both"          # extra serial replicas start as: zero | split | both
    act_clip_grid: tuple[float, ...] = ()   # e.g. (0.99, 0.97, 0.95): per-linear grid search
    seed: int = 0
    progress: bool = True
    start_layer: int = 0               # layers below keep the file's parameters (resume)
    loss: str = "mse"                  # mse | token (LOSSES)
    lowrank: int = 0                   # rank of a low-rank correction per linear and replica (0: none new)
    lr_lowrank: float = 1e-3           # lr_u / lr_v (FORMAT.md 6.2)
    resume: str | None = None          # directory of finished layers (lrq.resume), created if missing

    def validate(self) -> None:
        if self.start_layer < 0:
            raise CalibError(f"--start-layer must be >= 0, got {self.start_layer}")
        if self.n_tokens < 1 or self.window < 4 or self.n_tokens < self.window:
            raise CalibError(f"--tokens {self.n_tokens} must be at least one window "
                             f"(--window {self.window} >= 4)")
        if self.steps < 0:
            raise CalibError(f"--steps must be >= 0, got {self.steps}")
        if self.batch_windows < 1:
            raise CalibError(f"--batch-windows must be >= 1, got {self.batch_windows}")
        if self.granularity not in GRANULARITIES:
            raise CalibError(f"--granularity must be one of {', '.join(GRANULARITIES)}, "
                             f"got '{self.granularity}'")
        bad = set(self.params) - set(PARAMS)
        if bad or not self.params:
            raise CalibError(f"--params: {', '.join(sorted(bad)) or 'none given'}; choose from "
                             f"{', '.join(PARAMS)}")
        for name, v in (("--lr", self.lr), ("--lr-offset", self.lr_offset), ("--lr-bias", self.lr_bias),
                        ("--lr-lowrank", self.lr_lowrank)):
            if not (np.isfinite(v) and v >= 0):
                raise CalibError(f"{name} must be a finite value >= 0, got {v}")
        if not 0 <= self.lowrank <= LOWRANK_MAX_RANK:
            raise CalibError(f"--lowrank must be in 0..{LOWRANK_MAX_RANK}, got {self.lowrank}")
        if self.loss not in LOSSES:
            raise CalibError(f"--loss must be one of {', '.join(LOSSES)}, got '{self.loss}'")
        if self.serial_init not in SERIAL_INITS:
            raise CalibError(f"--serial-init must be one of {', '.join(SERIAL_INITS)}")
        for c in self.act_clip_grid:
            if not 0.0 < c <= 1.0:
                raise CalibError(f"--act-clip-grid: clip ratio {c} is outside (0, 1]")


@dataclass
class LayerReport:
    layer: int
    replicas: list[int]
    loss_start: float          # the file's own parameters, on the quantized stream
    loss_norep: float          # replica 0 fitted alone
    loss: float                # the kept candidate
    choice: str                # start | norep | zero | split (+ "+act")
    seconds: float


@dataclass
class CalibrateSummary:
    output: Path
    layers: list[LayerReport] = field(default_factory=list)
    n_tokens: int = 0
    window: int = 0
    bpw: dict = field(default_factory=dict)
    seconds: float = 0.0
    resumed_layers: int = 0    # layers loaded from the resume directory (fitted by an earlier run)

    @property
    def final_loss(self) -> float:
        """MSE of the final residual stream against the full-precision model's."""
        return self.layers[-1].loss if self.layers else float("nan")

    def lines(self) -> list[str]:
        res = (f"; layers 0..{self.resumed_layers - 1} fitted by an earlier run"
               if self.resumed_layers else "")
        out = [f"wrote {self.output} in {self.seconds:.1f} s ({self.n_tokens} calibration tokens, "
               f"windows of {self.window}{res})"]
        for r in self.layers:
            out.append(f"  layer {r.layer:3d} replicas {r.replicas}: loss {r.loss_start:.4g} -> "
                       f"{r.loss:.4g} ({r.choice}; replica 0 alone {r.loss_norep:.4g}) {r.seconds:.1f} s")
        lrq = f"{self.bpw['lrq']:.3f} (LRQ weights incl. parameters), " if self.bpw.get("lrq") else ""
        out.append(f"  final residual-stream MSE {self.final_loss:.5g}; bpw {lrq}"
                   f"{self.bpw.get('linears', 0):.3f} (block linears), {self.bpw.get('file', 0):.3f} (whole file)")
        return out


# ---- helpers -------------------------------------------------------------------------------

def open_lrq(path: str | os.PathLike) -> LRQModelFile:
    p = Path(path)
    if not p.is_file():
        raise CalibError(f"{p}: LRQ file not found")
    try:
        f = LRQModelFile(p)
    except (LRQFileError, ValueError) as e:
        raise CalibError(f"{p}: not a valid LRQ file ({e})") from None
    two_level = [n for n in f.lrq_weights() if f.is_two_level(n)]
    if two_level:       # format v4's two-level layout: ReplicaLinear models single-level groups only
        raise CalibError(f"{p}: {two_level[0]} is in the two-level layout (format v4); lrq-calibrate "
                         f"fits replicas of single-level LRQ weights and stock-typed weights only")
    return f


def check_pairing(lrq: LRQModelFile, source_ref: Reference, source: Path) -> None:
    """The LRQ file must be a quantization of ``source``: same shapes, correlated weights."""
    a, b = lrq.hparams, source_ref.hp
    for k in ("n_layer", "n_embd", "n_ff", "n_head", "n_head_kv", "n_vocab", "head_dim"):
        if getattr(a, k) != getattr(b, k):
            raise CalibError(f"{lrq.path} was not converted from {source}: {k} = {getattr(a, k)} "
                             f"vs {getattr(b, k)}")
    for name in [n for n in lrq.replicable_weights() if n.startswith("blk.0.")]:
        w_q = lrq.tensor(name).ravel()
        w_s, _ = source_ref.model.weight(name)
        w_s = np.asarray(w_s, dtype=np.float64).ravel()
        if w_q.shape != w_s.shape:
            raise CalibError(f"{lrq.path} was not converted from {source}: {name} has "
                             f"{w_q.size} vs {w_s.size} weights")
        cos = float(w_q @ w_s / (np.linalg.norm(w_q) * np.linalg.norm(w_s) + 1e-30))
        if cos < PAIRING_MIN_COSINE:
            raise CalibError(f"{lrq.path} was not converted from {source}: its {name} does not "
                             f"match the source's (cosine {cos:.2f} < {PAIRING_MIN_COSINE})")


def _t32(a) -> torch.Tensor | None:
    return None if a is None else torch.as_tensor(np.asarray(a, dtype=np.float32))


class QuantLayer:
    """Layer L of an LRQ file as torch modules: one Block of ReplicaLinears per replica."""

    def __init__(self, f: LRQModelFile, layer: int, groups: list[list[Execution]],
                 opts: CalibrateOptions, lowrank: int = 0):
        """lowrank > 0: every replicable linear of every replica gets new (zero) low-rank factors
        of that rank (at most min(n_out, n_in)); 0: the file's own factors, where it has any."""
        self.layer = layer
        self.groups = groups
        self.replicas = sorted({e.replica for g in groups for e in g})
        p = f"blk.{layer}"
        opt = lambda n: _t32(f.tensor(n)) if f.has_tensor(n) else None
        norms = (_t32(f.tensor(f"{p}.attn_norm.weight")), _t32(f.tensor(f"{p}.ffn_norm.weight")),
                 opt(f"{p}.attn_q_norm.weight"), opt(f"{p}.attn_k_norm.weight"))
        self.mods: dict[int, dict[str, ReplicaLinear | StockReplicaLinear]] = {}
        self.blocks: dict[int, Block] = {}
        stock_w: dict[str, np.ndarray] = {}      # a stock weight is dequantized once per layer
        for r in self.replicas:
            lin, mods = {}, {}
            for name in LINEARS:
                wn = f"{p}.{name}.weight"
                mb = f.tensor(f"{p}.{name}.bias") if f.has_tensor(f"{p}.{name}.bias") else None
                n_out, n_in = f.tensor_info(wn).shape
                rank = min(lowrank, n_out, n_in)
                if f.is_lrq(wn):
                    m = ReplicaLinear(f.quantized(wn), f.replica_params(wn, r), mb,
                                      opts.granularity, opts.params, rank)
                    lin[name] = mods[name] = m
                elif f.is_replicable(wn):     # a stock-typed weight (format v2): gain / bias / clip
                    if wn not in stock_w:
                        stock_w[wn] = f.tensor(wn)
                    m = StockReplicaLinear(stock_w[wn], f.replica_params(wn, r), mb, opts.params, rank)
                    lin[name] = mods[name] = m
                else:      # kept in its source type (--keep): fixed, shared by the replicas
                    w, _ = f.weight(wn, r)
                    lin[name] = Linear(_t32(w), _t32(mb))
            self.mods[r], self.blocks[r] = mods, Block(norms[0], norms[1], lin, norms[2], norms[3])

    def modules(self, replicas=None):
        for r in (self.replicas if replicas is None else replicas):
            yield from self.mods[r].values()

    def forward(self, ref: Reference, x: torch.Tensor, groups=None, ctx=None) -> torch.Tensor:
        for g in (self.groups if groups is None else groups):
            x = combine_group(x, [run_block(ref, self.blocks[e.replica], x, ctx) for e in g],
                              [e.weight for e in g])
        return x

    def state(self, replicas=None) -> dict:
        return {(r, n): m.state() for r in (self.replicas if replicas is None else replicas)
                for n, m in self.mods[r].items()}

    def load(self, st: dict) -> None:
        for (r, n), s in st.items():
            self.mods[r][n].load(s)

    def round_to_storage(self) -> None:
        for m in self.modules():
            m.round_to_storage()


def _parallel_with_zero(groups: list[list[Execution]]) -> set[int]:
    return {e.replica for g in groups if len(g) > 1 and any(x.replica == 0 for x in g) for e in g}


# ---- the calibration -----------------------------------------------------------------------

def token_weights(y: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-token weights [..., T, 1] of the squared error for ``loss`` (LOSSES), from the
    full-precision stream y [..., T, d]; their mean is 1, so the two losses share a scale."""
    if loss == "mse":
        return torch.ones(y.shape[:-1] + (1,), dtype=y.dtype)
    ms = (y.to(torch.float64) ** 2).mean(dim=-1, keepdim=True)
    w = 1.0 / ms.clamp_min(1e-12 * float(ms.mean()) + 1e-30)
    return (w / w.mean()).to(y.dtype)


def weighted_error(out: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum over tokens of w_t ||out_t - y_t||^2 (a 0-d tensor)."""
    return (w * (out - y) ** 2).sum()


class _Fitter:
    def __init__(self, ref: Reference, ctx, x: torch.Tensor, y: torch.Tensor, opts: CalibrateOptions,
                 rng: np.random.Generator, fp_block: Block | None = None,
                 sq_mean: dict[str, np.ndarray] | None = None):
        self.ref, self.ctx, self.x, self.y, self.opts, self.rng = ref, ctx, x, y, opts, rng
        self.fp_block = fp_block       # the full-precision layer (closed-form fits)
        self.sq_mean = sq_mean         # {linear: E[x^2] of its input} (low-rank initialisation)
        self.w = token_weights(y, opts.loss)

    def loss(self, ql: QuantLayer, groups=None) -> float:
        with torch.no_grad():
            tot = 0.0
            for i in range(self.x.shape[0]):      # window by window: bounded memory
                out = ql.forward(self.ref, self.x[i:i + 1], groups, self.ctx)
                tot += float(weighted_error(out, self.y[i:i + 1], self.w[i:i + 1]))
        return tot / self.y.numel()

    def train(self, ql: QuantLayer, replicas, groups=None) -> None:
        o = self.opts
        mods = list(ql.modules(replicas))
        pg = []
        for names, lr in ((("scale_mult", "gain"), o.lr), (("grid_offset",), o.lr_offset),
                          (("bias",), o.lr_bias), (("lr_u", "lr_v"), o.lr_lowrank)):
            ps = [getattr(m, n) for m in mods for n in names
                  if getattr(m, n, None) is not None and getattr(m, n).requires_grad]
            if ps and lr > 0:
                pg.append({"params": ps, "lr": lr})
        if not pg or o.steps == 0:
            return
        opt = torch.optim.Adam(pg)
        n_win = self.x.shape[0]
        order = np.array([], dtype=np.int64)
        for _ in range(o.steps):
            if len(order) < o.batch_windows:
                order = np.concatenate([order, self.rng.permutation(n_win)])
            idx, order = order[:o.batch_windows], order[o.batch_windows:]
            idx = torch.from_numpy(np.sort(idx))
            out = ql.forward(self.ref, self.x[idx], groups, self.ctx)
            loss = weighted_error(out, self.y[idx], self.w[idx]) / out.numel()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        ql.round_to_storage()


def _closed_form(fit: _Fitter, ql: QuantLayer, groups) -> None:
    """Replica 0's stock-typed linears: per-channel least-squares gain and bias against the
    full-precision linear on the same inputs (one pass over the calibration windows)."""
    mods = {n: m for n, m in ql.mods[0].items() if isinstance(m, StockReplicaLinear) and m.learn}
    if not mods or fit.fp_block is None:
        return
    for n, m in mods.items():
        m.start_lsq(fit.fp_block.lin[n].weight)
    fit.loss(ql, groups)
    for m in mods.values():
        m.finish_lsq()


def _init_lowrank(fit: _Fitter, ql: QuantLayer, replicas) -> None:
    """Low-rank factors of ``replicas`` from the SVD of each linear's activation-weighted error
    against the full-precision layer (replica.lowrank_init); before this they are zero, and zero
    factors get no gradient."""
    if fit.fp_block is None or fit.sq_mean is None:
        return
    for r in replicas:
        for n, m in ql.mods[r].items():
            if m.lr_u is not None:
                m.init_lowrank(fit.fp_block.lin[n].weight.detach().numpy(), fit.sq_mean[n])


def _embed_norep(ql: QuantLayer) -> None:
    """Replica 0's parameters into every other replica so the layer equals replica 0 alone."""
    par = _parallel_with_zero(ql.groups)
    with torch.no_grad():
        for r in ql.replicas:
            if r == 0:
                continue
            for n, m in ql.mods[r].items():
                m.copy_from(ql.mods[0][n])
                if r not in par and n in OUTPUT_LINEARS:
                    m.gain.zero_()
                    m.bias.zero_()
                    if m.lr_u is not None:     # U = 0 keeps V's gradient alive (U's is V x)
                        m.lr_u.zero_()


def _split_serial(ql: QuantLayer) -> None:
    """From the embedded state: every serial execution of the layer gets 1/n of the residual
    update (output gains and biases of replica 0's copy scaled by 1/n)."""
    serial = [g[0].replica for g in ql.groups if len(g) == 1]
    par = _parallel_with_zero(ql.groups)
    n = len(serial)
    with torch.no_grad():
        for r in set(serial) - par:
            for name in OUTPUT_LINEARS:
                if name in ql.mods[r]:
                    src = ql.mods[0][name]
                    ql.mods[r][name].gain.copy_(src.gain / n)
                    ql.mods[r][name].bias.copy_(src.bias / n)
                    if src.lr_u is not None and ql.mods[r][name].lr_u is not None:
                        ql.mods[r][name].lr_u.copy_(src.lr_u / n)
        # replica 0 itself last (the others copied its unscaled values above)
        if 0 in serial and 0 not in par:
            for name in OUTPUT_LINEARS:
                if name in ql.mods[0] and n > 1:
                    ql.mods[0][name].gain.div_(n)
                    ql.mods[0][name].bias.div_(n)
                    if ql.mods[0][name].lr_u is not None:
                        ql.mods[0][name].lr_u.div_(n)


def _act_search(fit: _Fitter, ql: QuantLayer, grid, best: float) -> tuple[float, bool]:
    """Greedy per-linear search of the activation clip ratio over ``grid``."""
    changed = False
    for r in ql.replicas:
        for m in ql.mods[r].values():
            keep = m.act_clip
            for c in grid:
                if c == keep:
                    continue
                m.act_clip = float(c)
                l = fit.loss(ql)
                if l < best:
                    best, keep, changed = l, float(c), True
            m.act_clip = keep
    return best, changed


def calibrate_layer(fit: _Fitter, ql: QuantLayer, opts: CalibrateOptions) -> LayerReport:
    t0 = time.monotonic()
    norep_groups = [[Execution(ql.layer, 0, 0, 1.0)]]
    plain = (len(ql.groups) == 1 and len(ql.groups[0]) == 1 and ql.groups[0][0].replica == 0
             and ql.groups[0][0].weight == 1.0)
    loss_start = fit.loss(ql)
    cands: list[tuple[float, str, dict]] = [(loss_start, "start", ql.state())]
    # replica 0 alone, from the file's parameters; kept only if it beats its start
    start0 = ql.state([0])
    l_start0 = loss_start if plain else fit.loss(ql, norep_groups)
    _closed_form(fit, ql, norep_groups)
    if fit.opts.lowrank:
        _init_lowrank(fit, ql, [0])
    fit.train(ql, [0], norep_groups)
    l0 = fit.loss(ql, norep_groups)
    if l_start0 < l0:
        ql.load(start0)
        l0 = l_start0
    loss_norep = l0
    if plain:
        cands.append((l0, "norep", ql.state()))
    else:
        _embed_norep(ql)
        embedded = ql.state()
        cands.append((fit.loss(ql), "norep", embedded))
        serial_extra = any(len(g) == 1 and g[0].replica != 0 for g in ql.groups)
        inits = []
        if opts.serial_init in ("zero", "both") or not serial_extra:
            inits.append("zero")
        if serial_extra and opts.serial_init in ("split", "both"):
            inits.append("split")
        for init in inits:
            ql.load(embedded)
            if init == "split":
                _split_serial(ql)
            fit.train(ql, ql.replicas)
            cands.append((fit.loss(ql), init, ql.state()))
    best, choice, st = min(cands, key=lambda c: c[0])
    ql.load(st)
    if opts.act_clip_grid:
        best, changed = _act_search(fit, ql, opts.act_clip_grid, best)
        choice += "+act" if changed else ""
    return LayerReport(ql.layer, ql.replicas, loss_start, loss_norep, best, choice,
                       time.monotonic() - t0)


def open_adapter_base(src: str | os.PathLike, plan: str | None) -> LRQModelFile:
    """``src`` — a stock GGUF of any type llama-quantize makes, or an LRQ file without replica
    tensors — seen with schedule ``plan`` (a preset, plan file or layer map; default "none") as
    one LRQ model, the base of an adapter (FORMAT.md 11).  CalibError names what is wrong."""
    from ..adapter import BoundModelFile
    from ..plan import PlanError, make_plan
    p = Path(src)
    if not p.is_file():
        raise CalibError(f"{p}: file not found")
    try:
        f = BoundModelFile(p)
        reps = [n for n in f.tensor_names if ".lrq_r" in n]
        if reps:
            raise CalibError(f"{p}: holds replica tensors ({reps[0]}, ...): the base of an adapter must "
                             f"not (AD4); split the file first (lrq.adapter.split_lrq_file) and calibrate "
                             f"its base")
        n_layer = f.hparams_dict["n_layer"]
        f.close()
        return BoundModelFile(p, layers=make_plan(plan or "none", n_layer))
    except (PlanError, LRQFileError, ValueError) as e:
        if isinstance(e, CalibError):
            raise
        raise CalibError(f"{p}: cannot be the base of an adapter ({e})") from None


def open_job(src, out, source, text, n_tokens: int, window: int, windows: np.ndarray | None = None,
             plan: str | None = None, adapter: bool = False, in_layer_order: bool = False):
    """What a job that rewrites LRQ file ``src``'s parameters into ``out`` against the
    full-precision ``source`` starts with (lrq-calibrate, lrq-distill): the checked output path,
    the opened file, the checked source and the calibration windows (int64 [n, T]; ``windows``
    overrides the text options).  ``adapter``: ``src`` is the base of an adapter ``out``, seen
    with schedule ``plan`` (open_adapter_base).  ``in_layer_order``: refuse a schedule that goes
    back to an earlier layer (a fit layer by layer in index order cannot follow it).  CalibError
    names what is wrong."""
    src, out = Path(src), Path(out)
    try:
        out = check_output_path(out)
    except WriterError as e:
        raise CalibError(str(e)) from None
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise CalibError(f"{out}: the output would overwrite the input")
    f = open_adapter_base(src, plan) if adapter else open_lrq(src)
    from ..constants import MOE_ARCHS
    if f.arch in MOE_ARCHS or f.has_tensor("blk.0.ffn_gate_inp.weight"):
        # the fits below know the seven dense block linears; a MoE FFN is a router + experts
        raise CalibError(f"{f.path}: '{f.arch}' is a mixture-of-experts model, whose layers lrq-calibrate "
                         f"and lrq-distill do not fit (docs/moe.md); its schedule runs as converted.  "
                         f"lrq-calibrate fits per-expert replicas: give it a file with expert-replication "
                         f"entries (lrq-select --moe, then lrq-convert --plan)")
    back = f.plan.first_backstep() if in_layer_order else None
    if back is not None:
        ex = f.plan.executions
        raise CalibError(f"{f.path}: the schedule{f' (plan {plan!r})' if adapter else ''} runs layer "
                         f"{ex[back].layer} after layer {ex[back - 1].layer} (execution {back}): "
                         f"lrq-calibrate fits layer by layer in order and cannot fit a schedule that goes "
                         f"back to an earlier layer")
    source = check_source(source)
    if windows is None:
        windows = calibration_windows(source, text, n_tokens, window)
    return out, f, source, np.asarray(windows, dtype=np.int64)


def calibrate(src: str | os.PathLike, out: str | os.PathLike, source: str | os.PathLike,
              opts: CalibrateOptions | None = None, log: Callable[[str], None] = lambda s: None,
              windows: np.ndarray | None = None, plan: str | None = None,
              adapter: bool = False) -> CalibrateSummary:
    """Fit the replica parameters of the LRQ file ``src`` against the full-precision ``source``
    on calibration text and write ``out`` (see the module doc).  CalibError on bad input;
    nothing is written unless the calibration succeeds.  ``windows`` (int [n, T]) overrides
    the text / token options.  ``adapter``: ``src`` is a base (a stock GGUF of any type, or an
    LRQ file without replica tensors) left untouched, run with schedule ``plan`` (preset, plan
    file or layer map; default "none"), and ``out`` is the adapter (FORMAT.md 11) holding the
    schedule and the fitted parameters."""
    t0 = time.monotonic()
    opts = opts or CalibrateOptions()
    opts.validate()
    if plan is not None and not adapter:
        raise CalibError("a plan is given to the base of an adapter only (--plan with --adapter); an "
                         "LRQ file is calibrated with its own schedule")
    out, f, source, windows = open_job(src, out, source, opts.text, opts.n_tokens, opts.window, windows,
                                       plan=plan, adapter=adapter, in_layer_order=True)
    store = _resume_dir(opts, f, src, source, windows, adapter, log) if opts.resume else None
    n_done = store.finished() if store is not None else 0
    try:
        acts = SourceActivations(source, windows, progress=opts.progress, full_stats=False)   # E[x^2] only
    except ValueError as e:       # ModelFileError / ReferenceError: the source cannot be run
        raise CalibError(f"{source}: {e}") from None
    check_pairing(f, acts.ref, source)
    ref = acts.ref
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    groups_by_layer: dict[int, list[list[Execution]]] = {}
    for g in f.plan.groups():
        groups_by_layer.setdefault(g[0].layer, []).append(g)

    summary = CalibrateSummary(output=out, n_tokens=int(windows.size), window=int(windows.shape[1]),
                               resumed_layers=min(n_done, acts.n_layer))
    if n_done:
        log(f"resuming: layers 0..{min(n_done, acts.n_layer) - 1} were fitted by an earlier run ({store.dir})")
    params: dict[str, np.ndarray] = {}
    # the quantized model's own input: a stock-typed base (llama-quantize) quantizes the token
    # embeddings too, so the first block must see the file's embeddings, not the source's
    x_q = torch.from_numpy(f.rows("token_embd.weight", windows).astype(np.float32))
    bar = None
    if opts.progress:
        from tqdm import tqdm
        bar = tqdm(total=acts.n_layer, desc="lrq-calibrate", unit="layer", leave=False)
    try:
        for layer in range(acts.n_layer):
            ql = QuantLayer(f, layer, groups_by_layer[layer], opts,
                            opts.lowrank if layer >= opts.start_layer else 0)
            if layer < n_done:                 # fitted by an earlier run: its parameters, as left
                rep = _load_layer(store, layer, ql, rng)
                log(f"layer {layer}: fitted by an earlier run ({store.layer_path(layer).name}), "
                    f"loss {rep.loss:.4g}")
            else:
                y_fp = acts.block_output(layer)
                sq = ({n: s.sq_mean for n, s in acts.linear_stats(layer).items()}
                      if opts.lowrank and layer >= opts.start_layer else None)
                fit = _Fitter(ref, acts.ctx, x_q, y_fp, opts, rng, acts.block(layer), sq)
                if layer < opts.start_layer:       # kept as it is: only its output is needed
                    l = fit.loss(ql)
                    rep = LayerReport(layer, ql.replicas, l, l, l, "kept", 0.0)
                else:
                    rep = calibrate_layer(fit, ql, opts)
                if store is not None:
                    _save_layer(store, layer, ql, rep, rng)
                log(f"layer {layer}: loss {rep.loss_start:.4g} -> {rep.loss:.4g} ({rep.choice})")
            summary.layers.append(rep)
            with torch.no_grad():
                x_q = torch.cat([ql.forward(ref, x_q[i:i + 1], None, acts.ctx)
                                 for i in range(x_q.shape[0])])
            if layer < opts.start_layer:
                if bar is not None:
                    bar.update(1)
                continue
            for r in ql.replicas:
                for name, m in ql.mods[r].items():
                    wn = f"blk.{layer}.{name}.weight"
                    names = tuple(opts.params) + tuple(
                        n for n, dflt in (("gain", 1.0), ("bias", 0.0))
                        if n not in opts.params and bool((getattr(m, n) != dflt).any()))
                    for p, v in m.export(names).items():
                        params[replica_param_name(wn, r, p)] = v
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    from ..convert.arch import ConvertError
    from ..convert.update import set_replica_params
    if adapter:
        summary.bpw = _write_adapter(f, src, out, params, source, plan)
        summary.seconds = time.monotonic() - t0
        return summary
    try:
        set_replica_params(src, out, params)
    except ConvertError as e:
        raise CalibError(str(e)) from None
    summary.bpw = LRQModelFile(out).bpw()
    summary.seconds = time.monotonic() - t0
    return summary


# ---- resume directory (lrq.resume) ------------------------------------------------------------

# option keys whose command-line flag is not --<key with dashes>
_FLAGS = {"n_tokens": "--tokens", "windows": "the calibration windows (--text, its content, --tokens, "
          "--window)", "adapter": "--adapter (an adapter instead of a whole file)",
          "schedule": "the schedule (--plan)"}


def _resume_dir(opts: CalibrateOptions, f: LRQModelFile, src, source: Path, windows: np.ndarray,
                adapter: bool, log):
    """The resume directory of this calibration: inputs IN and --source, every option that changes
    what a layer's fit gives (progress and the directory itself do not)."""
    from ..resume import ResumeDir, ResumeError
    o = asdict(opts)
    # the text is known by its windows (a path to the same text given otherwise is the same run)
    for k in ("progress", "resume", "text"):
        o.pop(k)
    o.update(adapter=adapter,
             windows=hashlib.sha256(np.ascontiguousarray(windows, dtype=np.int64).tobytes()).hexdigest(),
             # the schedule itself, not the --plan spelling (a plan file may change under its name)
             schedule=[[e.layer, e.replica, e.group, e.weight] for e in f.plan.executions])
    try:
        return ResumeDir(opts.resume, "lrq-calibrate", {"IN": src, "--source": source}, o,
                         soft={"threads": torch.get_num_threads()}, flags=_FLAGS, log=log)
    except ResumeError as e:
        raise CalibError(str(e)) from None


def _save_layer(store, layer: int, ql: QuantLayer, rep: LayerReport, rng: np.random.Generator) -> None:
    """Everything the layer's fit changed (each replica module's state), its report, and the state
    of the random generators after it (the next layer's Adam steps draw from them)."""
    state: dict[int, dict[str, dict]] = {}
    for (r, n), st in ql.state().items():
        state.setdefault(r, {})[n] = st
    store.save(layer, {"state": state, "report": asdict(rep),
                       "rng": json.dumps(rng.bit_generator.state), "torch_rng": torch.get_rng_state()})


def _load_layer(store, layer: int, ql: QuantLayer, rng: np.random.Generator) -> LayerReport:
    """A finished layer's parameters into ``ql`` and the generators' state after it into ``rng``
    and torch's; CalibError naming the file when it does not fit this layer."""
    from ..resume import ResumeError
    try:
        d = store.load(layer)
        try:
            state = d["state"]
            have = {(r, n) for r in ql.replicas for n in ql.mods[r]}
            got = {(r, n) for r, mods in state.items() for n in mods}
            if got != have:
                raise store.damaged(layer, f"holds parameters of {sorted(got)}, this layer has {sorted(have)}")
            ql.load({(r, n): st for r, mods in state.items() for n, st in mods.items()})
            rep = LayerReport(**d["report"])
            rng.bit_generator.state = json.loads(d["rng"])
            torch.set_rng_state(d["torch_rng"])
        except ResumeError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise store.damaged(layer, f"its content does not fit ({type(e).__name__}: {e})") from None
    except ResumeError as e:
        raise CalibError(str(e)) from None
    return rep


def _write_adapter(f: LRQModelFile, src, out: Path, params: dict[str, np.ndarray], source: Path,
                   plan: str | None) -> dict:
    """The fitted ``params`` as the adapter ``out`` of base ``src`` (each in its storage type, as
    set_replica_params stores them; low-rank factors F16); returns the bound model's bpw."""
    from ..adapter import AdapterError, bind, write_adapter
    from ..constants import Keys, parse_replica_param_name
    from ..convert.update import PARAM_TYPE
    from ..gguf_write import WriterError as _WriterError
    tensors = {}
    for name, v in params.items():
        typ = PARAM_TYPE[parse_replica_param_name(name)[2]]
        tensors[name] = (np.asarray(v, dtype=np.float16 if typ == PARAM_TYPE["scale_mult"] else np.float32), typ)
    try:
        write_adapter(src, f.plan, tensors, out,
                      provenance={Keys.SOURCE: Path(source).name, Keys.PLAN: plan or "none"})
        return bind(src, out).bpw()
    except (AdapterError, _WriterError) as e:
        raise CalibError(str(e)) from None


def calibration_loss(model: str | os.PathLike, source: str | os.PathLike, windows: np.ndarray,
                     dtype: torch.dtype = torch.float32, loss: str = "mse") -> float:
    """The calibration loss (``loss``: LOSSES) between the final residual streams (after the last
    execution, before the output norm) of ``model`` and the full-precision ``source`` on
    ``windows`` — computed with the reference executor on the files themselves, independently of
    the calibrator's modules."""
    from ..model_file import open_model
    a = Reference(open_model(model), dtype)
    b = Reference(open_model(source), dtype)
    ys, outs = [], []
    for w in np.asarray(windows, dtype=np.int64):
        outs.append(a.hidden(w).to(torch.float64))
        ys.append(b.hidden(w).to(torch.float64))
    y, out = torch.stack(ys), torch.stack(outs)
    return float(weighted_error(out, y, token_weights(y, loss))) / y.numel()
