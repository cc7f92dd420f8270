"""How lrq-search measures a candidate: KLD against the F32 reference on held-out *calibration*
text through the binding, decode speed by llama-bench, memory from llama.cpp's own report.

**Held-out windows.**  ``holdout_windows`` cuts ``n`` windows of ``ctx`` tokens from the
calibration text at evenly spaced places ((j + 1/2) / n of the text, at a line start) and moves a
window forward until it shares no run of NGRAM tokens with the windows lrq-calibrate would fit
on (``calibration_windows`` with the final stage's token count), so the search never scores a
candidate on text its adapter was fitted to, and never reads evaluation text (sotu-eval, botchan).

**KLD.**  The reference's log-probabilities of every window position are computed once per
process (``Model(ref).eval``); a candidate is ``Model(base, layers=MAP)`` or
``Model(base, adapter=FILE)``: mean over all positions of KL(p_ref || p_candidate) in nats, and
the fraction of positions whose argmax agrees (top-1).

**Cost.**  Decode ms/token from ``llama-bench -n TG`` (lrq.eval.speed.bench_speed) and memory
(MiB) as the sum of the buffers llama.cpp reports when it loads the candidate (model, repack, KV
cache, output and compute buffers: ``llama-completion -v -n 1`` at the search context).  Both
depend only on the base, the number of executions and whether an adapter is applied, so they are
measured once per such triple and shared by every trial (and every worker, through the study).
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .space import Candidate, SearchError, Space

# a decode figure taken while more threads wanted the CPU than it has (lrq.eval.speed.busy_cpu)
# is measured again by later trials of the same cost, at most this many times in all
COST_TRIES = 3
NGRAM = 16          # a held-out window may share no run of this many tokens with a calibration window
_BUFFER = re.compile(r"(\w+):\s+(\S+)\s+(model|KV|output|compute) buffer size =\s+([0-9.]+) MiB")


@dataclass
class Measurement:
    kld: float
    top1: float
    bpw: float
    ms_per_token: float
    memory_mib: float
    n_exec: int
    adapter_bytes: int
    seconds: float
    kld_windows: list

    def as_attrs(self) -> dict:
        return asdict(self)


def _line_start(s: str, pos: int) -> int:
    if pos <= 0:
        return 0
    nl = s.find("\n", pos)
    return nl + 1 if 0 <= nl < len(s) - 1 else pos


def _grams(windows) -> set:
    out = set()
    for w in windows:
        w = [int(t) for t in w[1:]]           # position 0 may be replaced by BOS
        out.update(tuple(w[i:i + NGRAM]) for i in range(len(w) - NGRAM + 1))
    return out


def holdout_windows(model: str | os.PathLike, text: str | os.PathLike, n: int, ctx: int,
                    avoid: np.ndarray | None = None) -> np.ndarray:
    """int64 [n, ctx] windows of ``text`` sharing no NGRAM-token run with ``avoid`` (see the
    module doc); BOS first when the vocab adds it."""
    from .. import _native
    from ..calib.data import CalibError, load_text
    from ..model_file import open_model
    if n < 1 or ctx < NGRAM + 1:
        raise SearchError(f"--windows {n} / --ctx {ctx}: need at least 1 window of more than {NGRAM} tokens")
    try:
        s = load_text(text)
    except CalibError as e:
        raise SearchError(str(e)) from None
    mf = open_model(model)
    tok = _native.Model(str(model), n_ctx=max(ctx, 4), n_threads=1, vocab_only=True)
    bad = _grams(avoid) if avoid is not None and len(avoid) else set()
    out = np.empty((n, ctx), dtype=np.int64)
    for j in range(n):
        start = _line_start(s, int((j + 0.5) * len(s) / n))
        while True:
            if start >= len(s):
                raise SearchError(f"--text {text}: no room for held-out window {j + 1} of {n} x {ctx} tokens "
                                  f"apart from the calibration windows")
            span = ctx * 8
            while True:
                ids = np.asarray(tok.tokenize(s[start:start + span], add_special=False), dtype=np.int64)
                if len(ids) > ctx or start + span >= len(s):
                    break
                span *= 2
            if len(ids) < ctx:
                raise SearchError(f"--text {text}: too short for {n} held-out windows of {ctx} tokens")
            w = ids[:ctx]
            if not (_grams([w]) & bad):
                break
            start = _line_start(s, start + ctx * 2)
        out[j] = w
    if mf.add_bos:
        if mf.bos_id is None:
            raise SearchError(f"{model}: the vocab adds BOS but has no BOS id")
        out[:, 0] = mf.bos_id
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def kld_top1(lp_ref: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """(mean over positions of KL(p_ref || softmax(logits)), top-1 agreement) of one window."""
    lp = _log_softmax(logits)
    lr = np.asarray(lp_ref, dtype=np.float64)
    kl = (np.exp(lr) * (lr - lp)).sum(axis=-1)
    return float(kl.mean()), float((lr.argmax(-1) == lp.argmax(-1)).mean())


def memory_split(log: str) -> dict[str, float]:
    """MiB per kind of buffer (``model``, ``KV``, ``output``, ``compute``) in the last load that
    llama.cpp reports (a tool that first fits its parameters prints a dry run with zero sizes; a
    load starts with its load_tensors lines, which may name one buffer type twice: the base's
    mapped tensors and an adapter's).  The model kind includes repacked copies of the weights."""
    cur: list[tuple[str, float]] = []
    prev = None
    for m in _BUFFER.finditer(log):
        if m.group(1) == "load_tensors" and prev not in (None, "load_tensors"):
            cur = []
        cur.append((m.group(3), float(m.group(4))))
        prev = m.group(1)
    if not cur:
        raise SearchError("llama.cpp reported no buffer sizes")
    split: dict[str, float] = {}
    for kind, mib in cur:
        split[kind] = split.get(kind, 0.0) + mib
    return split


def memory_report(log: str) -> float:
    """MiB: the sum of the buffers of the last load (memory_split)."""
    return sum(memory_split(log).values())


def load_memory(base: str | os.PathLike, ctx: int, load: list[str], threads: int) -> float:
    from .. import tools
    try:
        proc = tools.run("llama-completion", ["-m", base, *load, "-c", ctx, "-n", 1, "-p", "a",
                                              "-no-cnv", "-t", threads, "-v"], timeout=600)
    except (tools.ToolError, OSError) as e:
        raise SearchError(f"llama-completion on {base}: {e}") from None
    return memory_report(proc.stdout + proc.stderr)


class Evaluator:
    """Measures candidates of one search (one process; see the module doc).  ``cost_get`` /
    ``cost_set`` share the per-(base, executions, adapter) cost figures (the study's attributes)."""

    def __init__(self, ref: str | os.PathLike, space: Space, windows: np.ndarray, work: Path,
                 threads: int = 2, bench_tg: int = 32, bench_ctx: int = 512,
                 cost_get: Callable[[str], dict | None] = lambda k: None,
                 cost_set: Callable[[str, dict], None] = lambda k, v: None,
                 measure_cost: bool = True):
        self.ref, self.space, self.windows = Path(ref), space, np.asarray(windows, dtype=np.int64)
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.threads, self.bench_tg, self.bench_ctx = threads, bench_tg, bench_ctx
        self.cost_get, self.cost_set, self.measure_cost = cost_get, cost_set, measure_cost
        self._lp_ref: list[np.ndarray] | None = None
        self._n_out: dict[str, dict[str, int]] = {}
        self._bpw: dict[str, float] = {}

    @property
    def ctx(self) -> int:
        return int(self.windows.shape[1])

    def reference(self) -> list[np.ndarray]:
        if self._lp_ref is None:
            from .. import _native
            m = _native.Model(str(self.ref), n_ctx=self.ctx, n_threads=self.threads)
            self._lp_ref = [_log_softmax(m.eval(w.astype(np.int32))).astype(np.float32) for w in self.windows]
            del m
        return self._lp_ref

    def n_out(self, base: str) -> dict[str, int]:
        if base not in self._n_out:
            from ..gguf_hparams import open_reader
            shapes = {t.name: [int(x) for x in t.shape] for t in open_reader(base).tensors}
            self._n_out[base] = {lin: shapes[f"blk.0.{lin}.weight"][1] for lin in ("attn_output", "ffn_down")}
        return self._n_out[base]

    def write_adapter(self, c: Candidate, out: Path) -> Path:
        """The adapter of a candidate's gains (FORMAT.md 11), bound to its base."""
        import gguf

        from ..adapter import AdapterError, write_adapter
        from ..plan import PlanError, layer_map, make_plan
        sp = self.space
        F32 = int(gguf.GGMLQuantizationType.F32)
        tensors = {k: (v, F32) for k, v in c.adapter_tensors(sp, self.n_out(c.base)).items()}
        try:
            m = c.layer_map(sp)
            plan = layer_map(m, sp.n_layer) if m else make_plan("none", sp.n_layer)
            return write_adapter(c.base, plan, tensors, out, provenance=None)
        except (AdapterError, PlanError) as e:
            raise SearchError(f"candidate {c.key(sp)}: {e}") from None

    def cost(self, base: str, load: list[str], n_exec: int, has_adapter: bool,
             force: bool = False) -> tuple[float, float]:
        """(decode ms/token, memory MiB), measured once per (base, executions, adapter) — again
        (up to COST_TRIES times, keeping the fastest) while the figure was taken on a busy CPU,
        and again on ``force``."""
        if not self.measure_cost:
            return math.nan, math.nan
        key = cost_key(base, n_exec, has_adapter)
        got = self.cost_get(key)
        if got is None or force or (got.get("busy") and got.get("tries", 1) < COST_TRIES):
            from ..eval.run import EvalError
            from ..eval.speed import bench_speed, busy_cpu
            try:
                sp = bench_speed(base, threads=self.threads, reps=2, pp=0, tg=self.bench_tg, extra=load)
            except EvalError as e:
                raise SearchError(str(e)) from None
            new = {"ms_per_token": 1000.0 / sp.tg, "load1": sp.load1, "busy": busy_cpu(sp.load1),
                   "memory_mib": got["memory_mib"] if got else load_memory(base, self.bench_ctx, load, self.threads),
                   "tries": (got or {}).get("tries", 0) + 1}
            # timings only get slower under interference: the fastest run is the best estimate
            if got is not None and got["ms_per_token"] < new["ms_per_token"]:
                new.update(ms_per_token=got["ms_per_token"], load1=got.get("load1"), busy=got.get("busy", False))
            got = new
            self.cost_set(key, got)
        return float(got["ms_per_token"]), float(got["memory_mib"])

    def bpw(self, base: str, adapter: Path | None) -> float:
        from ..eval.bpw import file_bpw
        if adapter is not None:
            return file_bpw(base, adapter=adapter).bpw
        if base not in self._bpw:
            self._bpw[base] = file_bpw(base).bpw
        return self._bpw[base]

    def measure(self, c: Candidate, adapter_out: Path | None = None,
                memory_bound: float | None = None) -> Measurement:
        """Measure candidate ``c`` (its adapter, when it needs one, written to ``adapter_out``).
        With ``memory_bound`` (MiB) the cost comes first and an over-bound candidate raises
        OverBound before its KLD is measured."""
        c = c.normalized()
        adapter = None
        if c.needs_adapter():
            adapter = self.write_adapter(c, adapter_out or (self.work / f"cand-{os.getpid()}.adapter.gguf"))
        return self.measure_files(c.base, c.n_exec(self.space), adapter=adapter,
                                  layers=c.layer_map(self.space) if adapter is None else "",
                                  memory_bound=memory_bound, what=c.key(self.space))

    def measure_files(self, base: str | os.PathLike, n_exec: int, adapter: Path | None = None,
                      layers: str = "", memory_bound: float | None = None,
                      what: str | None = None) -> Measurement:
        """Measure ``base`` with ``adapter`` or the layer map ``layers`` (``n_exec`` executions)."""
        from .. import _native
        t0 = time.monotonic()
        base = str(base)
        load, kw = ((["--lrq-adapter", str(adapter)], {"adapter": str(adapter)}) if adapter is not None else
                    (["--lrq-layers", layers], {"layers": layers}) if layers else ([], {}))
        ms, mem = self.cost(base, load, n_exec, adapter is not None)
        if memory_bound is not None and mem > memory_bound:
            raise OverBound(mem)
        lp_ref = self.reference()
        try:
            m = _native.Model(base, n_ctx=self.ctx, n_threads=self.threads, **kw)
        except (RuntimeError, ValueError) as e:
            raise SearchError(f"{what or base}: llama.cpp refused it: {e}") from None
        klds, tops = [], []
        for w, lr in zip(self.windows, lp_ref):
            k, t = kld_top1(lr, m.eval(w.astype(np.int32)))
            klds.append(k)
            tops.append(t)
        del m
        return Measurement(float(np.mean(klds)), float(np.mean(tops)), self.bpw(base, adapter), ms, mem,
                           n_exec, adapter.stat().st_size if adapter is not None else 0,
                           time.monotonic() - t0, klds)


def cost_key(base: str | os.PathLike, n_exec: int, has_adapter: bool) -> str:
    """The study attribute that holds the cost figures of (base, executions, adapter)."""
    return f"cost:{Path(base).name}:{n_exec}:{int(bool(has_adapter))}"


class OverBound(Exception):
    def __init__(self, memory_mib: float):
        super().__init__(f"{memory_mib:.1f} MiB")
        self.memory_mib = memory_mib


__all__ = ["COST_TRIES", "cost_key", "NGRAM", "Measurement", "holdout_windows", "kld_top1", "memory_report", "memory_split", "load_memory",
           "Evaluator", "OverBound"]
