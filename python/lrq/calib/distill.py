"""End-to-end distillation of the per-replica parameters of an LRQ file (``lrq-distill``).

The block-wise fit of ``lrq-calibrate`` matches each layer's residual stream; its errors still
add up over the layers, and the residual-stream MSE weighs tokens by their norm rather than by
what they do to the prediction.  Distillation fine-tunes, after that fit, every per-replica
parameter of every layer at once (gains, biases, scale multipliers, grid offsets and any other
trainable tensor the replica modules expose) so that the quantized model's next-token
distribution matches the full-precision reference's:

    loss = mean over calibration tokens t of KL(p_ref(. | t) || p_quant(. | t))

Codes, base parameters, norms, embeddings and the output head stay frozen.  The model is the
calibrator's own torch form (``QuantLayer`` per layer: ReplicaLinear / StockReplicaLinear
modules over the file's codes, the reference executor's block math, the file's schedule), so
what is trained is what ``lrq.reference`` runs from the written file, in schedule order (a
schedule that goes back to an earlier layer trains that layer's parameters on every visit).
Each schedule step runs under ``torch.utils.checkpoint`` (its activations are recomputed in the
backward pass): memory holds one step's activations plus one residual stream per step.

The reference runs once, block by block over every window (the source streamed: two of its
blocks held, then freed): its log-probabilities (all of them, or the top-k and the remaining
mass with ``top_k``) are kept for the whole run, and with a resume directory also on disk.  The
quantized model is held whole: LRQ codes packed as in the file, a stock-typed base's weights
dequantized to float32.
Every ``checkpoint_every`` steps the parameters, Adam's state, the step and the loss curve are
written atomically to the resume directory; a run given the same directory continues from
there and ends with the same parameters as an uninterrupted run (the windows of step s are a
function of the seed and s only).  At the end the parameters are rounded to their storage
types exactly as the calibrator rounds them, the KL is measured again on every calibration
window, and the file is written with ``lrq.convert.update.set_replica_params``.  A run whose
final KL is not below its start keeps the input's parameters (it is never made worse on the
calibration text).

    >>> s = distill("cal.gguf", "dist.gguf", "src.gguf",
    ...             DistillOptions(n_tokens=2048, steps=100))      # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from .. import atomic
from ..constants import replica_param_name
from ..lrq_file import LRQModelFile
from ..plan import Execution
from ..reference import STREAM_BLOCKS, Reference
from ..reference.ops import rms_norm
from .activations import SourceActivations, rope_context
from .calibrate import CalibrateOptions, QuantLayer, check_pairing, open_job
from .data import CalibError
from .replica import GRANULARITIES, PARAMS

STATE_FILE = "state.pt"
TARGET_FILE = "target.pt"
# Adam's learning rate per parameter kind relative to --lr: grid offsets are in code units
# (a quarter step moves a weight by a quarter of its group's scale), biases in output units;
# the block-wise fit uses the same ratios (lrq-calibrate: 5e-3 / 2e-2 / 1e-3).  Any other
# trainable tensor (e.g. low-rank factors) gets --lr itself.
LR_RATIO = {"grid_offset": 4.0, "bias": 0.2}
# the log-probability of the tail mass of a top-k target is clamped here: a reference that puts
# all its mass on the top k has log(0) there (its KL term is 0 either way)
_LOG_TINY = -1e4


@dataclass
class DistillOptions:
    text: str = "sotu-calib"
    # tokens and steps from the budget curve (RESULTS "Calibration budgets"): held-out KLD still
    # falls at 160 steps with 16384 tokens; with 1024-4096 tokens the windows are over-fitted
    n_tokens: int = 16384
    window: int = 512
    steps: int = 160                   # Adam steps in all (a resumed run continues to this)
    batch_windows: int = 1             # windows per Adam step
    lr: float = 1e-3                   # scale_mult, gain and any other parameter (LR_RATIO)
    params: tuple[str, ...] = PARAMS   # which replica parameters are trained
    granularity: str = "channel"       # of scale_mult / grid_offset absent from the input file
    top_k: int = 256                   # 0: full reference distributions; k: top-k + tail mass
                                       # (16384 tokens of a 151,936-token vocabulary: 50 MB, not 10 GB)
    checkpoint_every: int = 10         # steps between resume checkpoints (with resume)
    resume: str | None = None          # resume directory (created if missing)
    grad_checkpoint: bool = True       # recompute each layer's activations in the backward pass
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        if self.n_tokens < 1 or self.window < 4 or self.n_tokens < self.window:
            raise CalibError(f"--tokens {self.n_tokens} must be at least one window "
                             f"(--window {self.window} >= 4)")
        if self.steps < 0:
            raise CalibError(f"--steps must be >= 0, got {self.steps}")
        if self.batch_windows < 1:
            raise CalibError(f"--batch-windows must be >= 1, got {self.batch_windows}")
        if not (np.isfinite(self.lr) and self.lr > 0):
            raise CalibError(f"--lr must be a finite value > 0, got {self.lr}")
        if self.top_k < 0:
            raise CalibError(f"--top-k must be >= 0, got {self.top_k}")
        if self.checkpoint_every < 1:
            raise CalibError(f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        if self.granularity not in GRANULARITIES:
            raise CalibError(f"--granularity must be one of {', '.join(GRANULARITIES)}, "
                             f"got '{self.granularity}'")
        bad = set(self.params) - set(PARAMS)
        if bad or not self.params:
            raise CalibError(f"--params: {', '.join(sorted(bad)) or 'none given'}; choose from "
                             f"{', '.join(PARAMS)}")


@dataclass
class DistillSummary:
    output: Path
    log: Path
    n_tokens: int = 0
    window: int = 0
    steps: int = 0                     # steps taken in all (including a resumed run's earlier ones)
    resumed_from: int = 0
    n_params: int = 0                  # trainable scalars
    kl_start: float = float("nan")     # mean KL per token on every calibration window
    kl_end: float = float("nan")       # after rounding to storage: what the file does
    kept_input: bool = False
    seconds: float = 0.0               # this run
    seconds_reference: float = 0.0
    seconds_train: float = 0.0
    bpw: dict = field(default_factory=dict)

    def lines(self) -> list[str]:
        res = f" (resumed at step {self.resumed_from})" if self.resumed_from else ""
        kept = ("; the final KL was not lower, the input's parameters are kept"
                if self.kept_input else "")
        return [f"wrote {self.output} in {self.seconds:.1f} s{res}: {self.n_tokens} calibration "
                f"tokens (windows of {self.window}), {self.steps} Adam steps, {self.n_params} "
                f"trainable parameters",
                f"  KL(reference || quantized) per token on the calibration windows: "
                f"{self.kl_start:.5g} -> {self.kl_end:.5g}{kept}",
                f"  reference {self.seconds_reference:.1f} s, training {self.seconds_train:.1f} s; "
                f"loss curve {self.log}"]


# ---- the quantized model as torch modules ---------------------------------------------------

class QuantModel:
    """The whole LRQ file as torch: frozen embeddings, norms and head; one QuantLayer per layer
    (the schedule's executions, serial and parallel, exactly as the calibrator runs them)."""

    def __init__(self, f: LRQModelFile, ref: Reference, opts: DistillOptions):
        self.f, self.ref = f, ref
        copts = CalibrateOptions(granularity=opts.granularity, params=tuple(opts.params))
        groups: dict[int, list[list[Execution]]] = {}
        for g in f.plan.groups():
            groups.setdefault(g[0].layer, []).append(g)
        hp = f.hparams
        self.layers = [QuantLayer(f, l, groups[l], copts) for l in range(hp.n_layer)]
        # run group by group in schedule order, each with its layer's modules: a schedule that
        # goes back to an earlier layer (FORMAT.md 7.1) reuses that layer's parameters, and a
        # schedule in layer order runs exactly as layer by layer
        self.steps = f.plan.groups()
        self.rms_eps = float(hp.rms_eps)
        t32 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))
        self.out_norm = t32(f.tensor("output_norm.weight"))
        self.head = t32(f.tensor("token_embd.weight" if hp.tied_embeddings else "output.weight"))
        self.grad_checkpoint = opts.grad_checkpoint
        self.ctx = None

    def named_parameters(self):
        """(key, Parameter) of every trainable tensor of every replica module, in a fixed order:
        every Parameter with requires_grad that the modules expose, whatever its name."""
        for ql in self.layers:
            for r in ql.replicas:
                for lin, m in ql.mods[r].items():
                    for pn, p in m.named_parameters():
                        if p.requires_grad:
                            yield f"blk.{ql.layer}.{lin}.r{r}.{pn}", p

    def modules(self):
        for ql in self.layers:
            for r in ql.replicas:
                for lin, m in ql.mods[r].items():
                    yield ql.layer, r, lin, m

    def embed(self, windows: np.ndarray) -> torch.Tensor:
        # the file's own embeddings (a stock-typed base quantizes them too), as the calibrator
        return torch.from_numpy(self.f.rows("token_embd.weight", windows).astype(np.float32))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: the embedded windows [n, T, d] -> logits [n, T, n_vocab]."""
        if self.ctx is None or self.ctx[0].numel() != x.shape[1]:
            self.ctx = rope_context(self.ref, x.shape[1])
        for g in self.steps:
            ql = self.layers[g[0].layer]
            run = lambda h, ql=ql, g=g: ql.forward(self.ref, h, [g], self.ctx)
            if self.grad_checkpoint and torch.is_grad_enabled():
                x = checkpoint(run, x, use_reentrant=False)
            else:
                x = run(x)
        return rms_norm(x, self.out_norm, self.rms_eps) @ self.head.T

    def round_to_storage(self) -> None:
        for ql in self.layers:
            ql.round_to_storage()

    def export(self) -> dict[str, dict[str, np.ndarray]]:
        """{weight name + replica: {param: array in storage type}} of every module."""
        return {f"blk.{l}.{lin}.weight|{r}": m.export() for l, r, lin, m in self.modules()}


# ---- the loss -------------------------------------------------------------------------------

def reference_target(logits: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
    """What the loss needs of the reference's logits [.., V]: all log-probabilities, or the
    top-k ones (``idx``, ``logp``) and the log of the remaining mass (``tail``)."""
    logp = torch.log_softmax(logits.to(torch.float64), dim=-1)
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return {"logp": logp.to(torch.float32)}
    v, i = torch.topk(logp, top_k, dim=-1)
    rest = torch.log1p(-torch.exp(torch.logsumexp(v, dim=-1)).clamp(max=1.0))
    return {"idx": i.to(torch.int32), "logp": v.to(torch.float32),
            "tail": rest.clamp_min(_LOG_TINY).to(torch.float32)}


def kl_sum(logits: torch.Tensor, target: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over tokens of KL(p_ref || p_quant) for logits [.., V] and a reference_target().
    With a top-k target it is the KL between the two distributions coarsened to the reference's
    top k tokens and one bucket for the rest (a lower bound of the full KL; equal when the
    quantized model's tail is proportional to the reference's)."""
    logq = torch.log_softmax(logits, dim=-1)
    if "idx" not in target:
        logp = target["logp"]
        return (torch.exp(logp) * (logp - logq)).sum()
    idx = target["idx"].long()
    logp, tail = target["logp"], target["tail"]
    logq_k = logq.gather(-1, idx)
    masked = logq.scatter(-1, idx, float("-inf"))
    logq_tail = torch.logsumexp(masked, dim=-1)
    top = (torch.exp(logp) * (logp - logq_k)).sum()
    p_tail = torch.exp(tail)
    return top + (p_tail * (tail - logq_tail)).sum()


def _target_slice(target: dict[str, torch.Tensor], idx) -> dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in target.items()}


def window_order(seed: int, step: int, n_win: int, batch: int) -> np.ndarray:
    """The windows of Adam step ``step`` (0-based): consecutive slices of one random permutation
    per epoch, so that any step's windows follow from (seed, step) alone (resume = no rerun)."""
    per_epoch = max(1, n_win // batch)
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n_win)
    if n_win < batch:        # fewer windows than a batch: every window, every step
        return np.arange(n_win)
    return np.sort(perm[k * batch:(k + 1) * batch])


def _mean_kl(model: QuantModel, x: torch.Tensor, target: dict[str, torch.Tensor]) -> float:
    tot = 0.0
    with torch.no_grad():
        for i in range(x.shape[0]):
            tot += float(kl_sum(model.logits(x[i:i + 1]), _target_slice(target, slice(i, i + 1))))
    return tot / (x.shape[0] * x.shape[1])


# ---- resume state ---------------------------------------------------------------------------

def _file_id(p: Path) -> dict:
    st = p.stat()
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _recipe(src: Path, source: Path, windows: np.ndarray, opts: DistillOptions) -> dict:
    """What a resume directory's state was made from; a resume with other inputs is refused."""
    o = asdict(opts)
    for k in ("steps", "checkpoint_every", "resume", "progress", "grad_checkpoint"):
        o.pop(k)         # free to change between runs: they do not change any step's result
    o["params"] = list(o["params"])
    return {"input": _file_id(src), "source": _file_id(source),
            "windows": hashlib.sha256(np.ascontiguousarray(windows, dtype=np.int64).tobytes()).hexdigest(),
            "options": o}


def _save_state(d: Path, recipe: dict, step: int, model: QuantModel, opt, curve: list) -> None:
    state = {"recipe": recipe, "step": step,
             "params": {k: p.detach().clone() for k, p in model.named_parameters()},
             "optimizer": opt.state_dict(), "curve": curve}
    with atomic.atomic_path(d / STATE_FILE) as tmp:
        torch.save(state, tmp)


def _load_state(d: Path, recipe: dict) -> dict | None:
    p = d / STATE_FILE
    if not p.is_file():
        return None
    try:
        st = torch.load(p, weights_only=True)
    except Exception as e:      # a damaged file: torch raises several kinds
        raise CalibError(f"{p}: cannot read the resume state ({type(e).__name__}: {e}); "
                         f"remove it to start again") from None
    if st.get("recipe") != recipe:
        old = st.get("recipe") or {}
        diff = sorted(k for k in set(old) | set(recipe) if old.get(k) != recipe.get(k))
        if "options" in diff:
            oo, no = old.get("options", {}), recipe["options"]
            diff = [d for d in diff if d != "options"] + sorted(
                f"--{k.replace('_', '-')}" for k in set(oo) | set(no) if oo.get(k) != no.get(k))
        raise CalibError(f"{d}: the resume state was made for other inputs ({', '.join(diff)} "
                         f"differ); use another --resume directory or remove {p}")
    return st


def _targets(ref: Reference, windows: np.ndarray, top_k: int, resume: Path | None,
             recipe: dict, progress: bool) -> dict[str, torch.Tensor]:
    """The reference's targets of every window (from the resume directory when there)."""
    def compute() -> dict[str, torch.Tensor]:
        # block by block over every window (the source streamed, two blocks held), then the
        # head window by window: the operations of ref.forward, so the same logits
        acts = SourceActivations(ref.model.path, windows, reference=ref, progress=progress,
                                 max_checkpoint_bytes=0, full_stats=False)
        h = acts.block_output(ref.hp.n_layer - 1)
        del acts
        parts = []
        with torch.no_grad():
            for x in h:
                parts.append(reference_target(rms_norm(x, ref.output_norm, ref.hp.rms_eps) @ ref.output.T,
                                              top_k))
        return {k: torch.stack([p[k] for p in parts]) for k in parts[0]}

    if resume is None:
        return compute()
    key = {"source": recipe["source"], "windows": recipe["windows"], "top_k": top_k}
    path = resume / TARGET_FILE
    if atomic.load_entry(path, key) is not None:
        try:
            return torch.load(path, weights_only=True)
        except Exception:          # a damaged entry is made again
            pass
    t = compute()
    atomic.store_entry(path, key, lambda tmp: torch.save(t, tmp))
    return t


def _write_curve(path: Path, curve: list) -> None:
    atomic.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in curve))


def curve_path(out: Path) -> Path:
    """The loss curve (JSON lines) of output ``out``: ``x.gguf`` -> ``x.distill.jsonl``."""
    return out.with_suffix(".distill.jsonl")


# ---- the distillation -----------------------------------------------------------------------

def distill(src: str | os.PathLike, out: str | os.PathLike, source: str | os.PathLike,
            opts: DistillOptions | None = None, log: Callable[[str], None] = lambda s: None,
            windows: np.ndarray | None = None,
            on_step: Callable[[int, float], None] | None = None) -> DistillSummary:
    """Distil the replica parameters of LRQ file ``src`` against the full-precision ``source``
    on calibration text and write ``out`` (see the module doc).  CalibError on bad input; the
    output appears only when complete.  ``windows`` (int [n, T]) overrides the text options;
    ``on_step(step, loss)`` is called after every Adam step (1-based step)."""
    t0 = time.monotonic()
    opts = opts or DistillOptions()
    opts.validate()
    src = Path(src)
    out, f, source, windows = open_job(src, out, source, opts.text, opts.n_tokens, opts.window, windows)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise CalibError(f"calibration windows must be [n, T >= 2], got shape {list(windows.shape)}")
    resume = None
    if opts.resume:
        resume = Path(opts.resume)
        try:
            resume.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CalibError(f"--resume {resume}: cannot create the directory ({e.strerror})") from None
    recipe = _recipe(src, source, windows, opts)
    state = _load_state(resume, recipe) if resume is not None else None

    try:
        ref = Reference(source, torch.float32, max_blocks=STREAM_BLOCKS)
    except ValueError as e:      # ModelFileError / ReferenceError: the source cannot be run
        raise CalibError(f"{source}: {e}") from None
    check_pairing(f, ref, source)
    summary = DistillSummary(output=out, log=curve_path(out), n_tokens=int(windows.size),
                             window=int(windows.shape[1]))
    t_ref = time.monotonic()
    target = _targets(ref, windows, opts.top_k, resume, recipe, opts.progress)
    summary.seconds_reference = time.monotonic() - t_ref
    # the source's weights are no longer needed, only its block math (hparams, rope): free them
    ref.blocks.clear()
    ref._norms.clear()
    ref.tok_embd = ref.output = None

    torch.manual_seed(opts.seed)
    model = QuantModel(f, ref, opts)
    exported0 = model.export()
    named = list(model.named_parameters())
    summary.n_params = sum(p.numel() for _, p in named)
    groups: dict[float, list] = {}
    for k, p in named:
        groups.setdefault(opts.lr * LR_RATIO.get(k.rsplit(".", 1)[1], 1.0), []).append(p)
    opt = torch.optim.Adam([{"params": ps, "lr": lr} for lr, ps in sorted(groups.items())]) if named else None
    x = model.embed(windows)
    n_win = x.shape[0]

    curve: list[dict] = []
    step = 0
    if state is not None:
        with torch.no_grad():
            have = dict(named)
            if set(have) != set(state["params"]):
                raise CalibError(f"{resume / STATE_FILE}: its parameters are not this file's")
            for k, p in have.items():
                p.copy_(state["params"][k])
        if opt is not None:
            opt.load_state_dict(state["optimizer"])
        step, curve = int(state["step"]), list(state["curve"])
        summary.resumed_from = step
        summary.kl_start = curve[0]["kl"] if curve and "kl" in curve[0] else float("nan")
        log(f"resumed at step {step} from {resume / STATE_FILE}")
    if step == 0:
        summary.kl_start = _mean_kl(model, x, target)
        curve = [{"step": 0, "kl": summary.kl_start, "windows": n_win}]
        log(f"step 0: KL {summary.kl_start:.5g} per token")

    bar = None
    if opts.progress and step < opts.steps:
        from tqdm import tqdm
        bar = tqdm(total=opts.steps, initial=step, desc="lrq-distill", unit="step", leave=False)
    t_train = time.monotonic()
    try:
        while step < opts.steps and opt is not None:
            idx = window_order(opts.seed, step, n_win, opts.batch_windows)
            ti = torch.from_numpy(idx)
            logits = model.logits(x[ti])
            loss = kl_sum(logits, _target_slice(target, ti)) / (len(idx) * x.shape[1])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise CalibError(f"the KL became {lv} at step {step}; lower --lr")
            curve.append({"step": step, "loss": lv, "windows": idx.tolist(),
                          "seconds": round(time.monotonic() - t_train, 3)})
            if bar is not None:
                bar.update(1)
                bar.set_postfix(kl=f"{lv:.4g}")
            if step % opts.checkpoint_every == 0 or step == opts.steps:
                if resume is not None:
                    _save_state(resume, recipe, step, model, opt, curve)
                _write_curve(summary.log, curve)
            if on_step is not None:
                on_step(step, lv)
    finally:
        if bar is not None:
            bar.close()
    summary.seconds_train = time.monotonic() - t_train
    summary.steps = step

    model.round_to_storage()
    summary.kl_end = _mean_kl(model, x, target)
    if not summary.kl_end < summary.kl_start:
        summary.kept_input = True          # the input's own parameters are written back
        summary.kl_end = summary.kl_start
    curve.append({"step": step, "kl": summary.kl_end, "windows": n_win,
                  "kept_input": summary.kept_input})
    log(f"step {step}: KL {summary.kl_end:.5g} per token (after rounding to storage)")

    params: dict[str, np.ndarray] = {}
    if not summary.kept_input:
        for key, vals in model.export().items():
            wn, r = key.split("|")
            before = exported0[key]
            present = {p for p in vals
                       if f.has_tensor(replica_param_name(wn, int(r), p))}
            for p, v in vals.items():
                # written: what the file had, and what distillation changed; a parameter the
                # input lacks and that did not move stays absent (no extra bits)
                if p in present or p not in before or not np.array_equal(before[p], v):
                    params[replica_param_name(wn, int(r), p)] = v

    from ..convert.arch import ConvertError
    from ..convert.update import set_replica_params
    try:
        set_replica_params(src, out, params)
    except ConvertError as e:
        raise CalibError(str(e)) from None
    _write_curve(summary.log, curve)
    summary.bpw = LRQModelFile(out).bpw()
    summary.seconds = time.monotonic() - t0
    return summary
