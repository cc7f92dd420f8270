"""The Optuna study behind lrq-search: storage, configuration, the two stages, workers, resume.

**Storage.**  A local journal file (``optuna.storages.JournalStorage`` over a
``JournalFileBackend``, file-locked appends) by default, ``OUT/search.journal``; a database URL
(``postgresql://``, ``mysql+pymysql://``, ``sqlite:///``) for workers on many machines
(``RDBStorage`` with a heartbeat: a worker that stops beating for GRACE_S seconds has its trial
failed and, through ``RetryFailedTrialCallback``, re-queued with the same parameters).

**Configuration.**  Everything a trial needs (reference and base paths, the space, the held-out
windows' text and sizes, the objective's weights, the memory bound, the budget) is stored in the
study's user attributes when the study is created, so ``lrq-search --worker --storage URL
--study NAME`` needs nothing else (paths must be valid on every machine: a shared file system
or the same layout).

**Stages.**  Stage 1 is the coarse grid (space.grid), enqueued as fixed trials when the study is
created: workers pop them from the storage, so each grid point runs once, whichever worker takes
it.  Stage 2 is Optuna's TPE sampler (multivariate), whose history starts with the grid's results
(n_startup_trials = 0: the grid replaces random start-up trials; TPE's split puts the best of
them in its "good" density).  The budget is len(grid) + budget stage-2 trials for the whole
study: each worker stops when the study holds that many counted trials (complete, pruned,
running, waiting or failed by the objective; a trial failed because its worker died is re-run and
does not count, nor does a proposal of a measured candidate; a worker also stops after
MAX_REPEATS_IN_ROW such proposals in a row: the sampler has converged, and the study records it
(user attribute ``converged``) so that no later worker or rerun spends the rest of the budget on
more proposals of measured candidates).  With several workers the study may end up to
workers - 1 trials over it.

**Resume.**  A killed run leaves its trial RUNNING.  On the journal storage the next lrq-search
on this machine fails the RUNNING trials whose worker process (host:pid, a user attribute) is
gone and re-queues a grid trial's parameters; then it continues to the budget.  Optuna makes a
trial RUNNING in one storage write and the objective tags it in the next, so a worker killed
between the two leaves a RUNNING trial with no tag.  Every worker therefore registers itself in
the study (a system attribute ``lrq.worker:host:pid``) before it takes any trial: an untagged
RUNNING trial is failed and re-queued when every registered worker is a dead process of this
host (a live one may be about to tag it; one on another host cannot be checked from here).

Two trials that propose the same candidate (equal canonical key) are measured once: the second
takes the first one's values (user attribute ``same_as``).
"""

from __future__ import annotations

import json
import math
import os
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .space import Candidate, SearchError, Space, candidate_from_params, grid, suggest

CONFIG_ATTR = "lrq_search"
CONFIG_VERSION = 1
HEARTBEAT_S, GRACE_S = 30, 120      # RDB storages: a worker silent for 2 minutes is dead
# TPE on a small discrete space ends up proposing measured candidates only (SmolLM2: "no repeat"
# again and again once it dominates); a worker that got this many in a row stops
MAX_REPEATS_IN_ROW = 25


@dataclass
class SearchConfig:
    ref: str                        # the F32 reference (the full-precision model)
    space: dict                     # Space.to_dict()
    text: str = "sotu-calib"        # held-out windows come from this calibration text
    windows: int = 4
    ctx: int = 256
    calib_tokens: int = 1024        # the final calibration's tokens: held-out windows avoid them
    calib_window: int = 512
    alpha: float = 1.0              # objective = alpha KLD + beta bpw + gamma ms/token
    beta: float = 0.0
    gamma: float = 0.0
    memory_mib: float | None = None  # constraint: llama.cpp's reported memory at bench_ctx
    pareto: bool = False            # minimise (KLD, bpw, ms/token) jointly: the front
    budget: int = 50                # stage-2 trials (the whole study, all workers)
    grid: bool = True
    cost: bool = True               # measure decode time and memory (off: KLD and bpw only)
    bench_tg: int = 32
    bench_ctx: int = 512
    version: int = CONFIG_VERSION

    def stored(self) -> dict:
        """The configuration as the storage keeps it (JSON: tuples become lists)."""
        return json.loads(json.dumps(asdict(self)))

    def space_obj(self) -> Space:
        return Space.from_dict(self.space)

    def directions(self) -> list[str]:
        return ["minimize"] * (3 if self.pareto else 1)

    def objective(self, kld: float, bpw: float, ms: float) -> float:
        v = self.alpha * kld + self.beta * bpw
        return v + self.gamma * ms if self.gamma else v

    def validate(self) -> None:
        if self.budget < 0:
            raise SearchError(f"--budget must be >= 0, got {self.budget}")
        if self.pareto and not self.cost:
            raise SearchError("--pareto needs the decode time (do not combine it with --no-cost)")
        if self.gamma and not self.cost:
            raise SearchError("--gamma weights the decode time, which --no-cost does not measure")
        if self.memory_mib is not None and not self.cost:
            raise SearchError("--max-memory-mib needs llama.cpp's memory report (drop --no-cost)")
        for name in ("alpha", "beta", "gamma"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise SearchError(f"--{name} must be a finite value >= 0, got {v}")


# seconds a SQLite writer waits for the database lock before failing (sqlite3's default: 5)
SQLITE_LOCK_TIMEOUT_S = 300.0


def _serialize_sqlite(engine) -> None:
    """Every transaction on ``engine`` starts with BEGIN IMMEDIATE (the write lock).

    Optuna hands a queued trial to a worker by reading it WAITING and writing it RUNNING in one
    transaction, made atomic by SELECT ... FOR UPDATE, which SQLite ignores; and Python's sqlite3
    runs the read outside any transaction.  Two workers then both read WAITING and both run the
    trial: the second to finish fails with "Cannot tell a COMPLETE trial" (4 workers popping 40
    queued trials took 53-56 pops).  Taking the write lock at BEGIN makes read and write one step.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "begin")
    def _begin_immediate(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()        # connections opened before the listener: none of them is reused


def open_storage(spec: str | None, out_dir: str | os.PathLike | None):
    """None / a file path -> journal file storage; a URL (scheme://) -> RDB storage with heartbeat."""
    import warnings

    import optuna
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend
    if spec and "://" in spec:
        # the heartbeat is marked experimental in Optuna; it is what makes a dead worker's trial
        # run again, so it is used on purpose
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        try:
            try:      # Optuna >= 4.9
                from optuna.storages import RetryHeartbeatStaleTrialCallback
                retry = {"heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=3)}
            except ImportError:
                from optuna.storages import RetryFailedTrialCallback
                retry = {"failed_trial_callback": RetryFailedTrialCallback(max_retry=3)}
            # SQLite serialises writers with a file lock; its driver gives up after 5 s by default,
            # which two workers on a loaded machine exceed ("database is locked", a worker exiting
            # 1 mid-study).  A server database (PostgreSQL) has row locks and no such limit.
            sqlite = spec.startswith("sqlite")
            # isolation_level None: the driver begins no transaction of its own; _serialize_sqlite
            # begins each one itself
            engine = {"connect_args": {"timeout": SQLITE_LOCK_TIMEOUT_S, "isolation_level": None}} if sqlite else {}
            storage = RDBStorage(spec, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S, engine_kwargs=engine,
                                 **retry)
            if sqlite:
                _serialize_sqlite(storage.engine)
            return storage
        except (ImportError, ModuleNotFoundError) as e:
            raise SearchError(f"--storage {spec}: the database driver is not installed ({e}); "
                              f"e.g. pip install psycopg2-binary for postgresql://") from None
        except Exception as e:   # sqlalchemy's OperationalError etc.: the database cannot be reached
            raise SearchError(f"--storage {spec}: cannot open the database ({type(e).__name__}: {e})") from None
    path = Path(spec) if spec else Path(out_dir or ".") / "search.journal"
    if not path.resolve().parent.is_dir():
        raise SearchError(f"--storage {path}: directory {path.parent} does not exist")
    del optuna
    return JournalStorage(JournalFileBackend(str(path)))


def _sampler(cfg: SearchConfig, seed: int | None = None):
    import warnings

    import optuna
    # multivariate TPE is marked experimental; it models the groups jointly, which is the point
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna.samplers.TPESampler(n_startup_trials=0 if cfg.grid else 10, multivariate=True,
                                      seed=seed)


def create_or_load(storage, name: str, cfg: SearchConfig, seed: int | None = None):
    """The study ``name``: created with ``cfg`` (and stage 1 enqueued) when new; an existing one
    must hold the same configuration (a resumed run) — otherwise SearchError names the key."""
    import optuna
    cfg.validate()
    study = optuna.create_study(storage=storage, study_name=name, directions=cfg.directions(),
                                sampler=_sampler(cfg, seed), load_if_exists=True)
    have = study.user_attrs.get(CONFIG_ATTR)
    want = cfg.stored()
    if have is None:
        if study.trials:
            raise SearchError(f"study '{name}' has trials but no lrq-search configuration: not an "
                              f"lrq-search study")
        study.set_user_attr(CONFIG_ATTR, want)
        if cfg.grid:
            sp = cfg.space_obj()
            for c in grid(sp):
                study.enqueue_trial(c.optuna_params(sp), user_attrs={"stage": 1})
        return study
    diff = [k for k in want if have.get(k) != want[k]]
    if diff:
        raise SearchError(f"study '{name}' exists with another configuration ({', '.join(diff)} "
                          f"differ{'s' if len(diff) == 1 else ''}): resume it with the same options, "
                          f"join it with --worker, or choose another --study")
    return study


def load_study(storage, name: str, seed: int | None = None):
    """An existing lrq-search study and its configuration (``--worker``)."""
    import optuna
    try:
        summaries = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    except Exception as e:
        raise SearchError(f"cannot read the studies of the storage: {e}") from None
    if name not in summaries:
        raise SearchError(f"no study '{name}' in the storage (known: {', '.join(sorted(summaries)) or 'none'}); "
                          f"start it with lrq-search MODEL first")
    study = optuna.load_study(study_name=name, storage=storage)
    have = study.user_attrs.get(CONFIG_ATTR)
    if have is None:
        raise SearchError(f"study '{name}' is not an lrq-search study (no '{CONFIG_ATTR}' attribute)")
    if have.get("version") != CONFIG_VERSION:
        raise SearchError(f"study '{name}' was written by configuration version {have.get('version')}; "
                          f"this lrq-search reads {CONFIG_VERSION}")
    cfg = SearchConfig(**have)
    return optuna.load_study(study_name=name, storage=storage, sampler=_sampler(cfg, seed)), cfg


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


WORKER_ATTR_PREFIX = "lrq.worker:"


def register_worker(study, me: str | None = None) -> None:
    """Record this process as a worker of ``study`` (before it takes any trial: see Resume)."""
    study._storage.set_study_system_attr(study._study_id, WORKER_ATTR_PREFIX + (me or worker_id()), True)


def _dead_here(worker: str, host: str) -> bool:
    h, _, pid = worker.rpartition(":")
    return h == host and pid.isdigit() and not _alive(int(pid))


def reclaim_stale(study) -> list[int]:
    """Fail the RUNNING trials of dead worker processes of this host (and the untagged ones when
    every registered worker is such a process); re-queue their grid points.  Returns their trial
    numbers."""
    from optuna.trial import TrialState
    host, me = socket.gethostname(), worker_id()
    out = []
    st = study._storage
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    # read after the trials: a worker whose untagged trial was read had registered before it
    workers = [k[len(WORKER_ATTR_PREFIX):] for k in st.get_study_system_attrs(study._study_id)
               if k.startswith(WORKER_ATTR_PREFIX)]
    untagged_dead = all(_dead_here(w, host) for w in workers if w != me)
    for t in running:
        if "worker" in t.user_attrs:
            if not _dead_here(str(t.user_attrs["worker"]), host):
                continue
        elif not untagged_dead:
            continue
        st.set_trial_user_attr(t._trial_id, "reclaimed", True)
        if not st.set_trial_state_values(t._trial_id, TrialState.FAIL):
            continue
        fixed = t.system_attrs.get("fixed_params")
        if fixed is not None:
            study.enqueue_trial(fixed, user_attrs={"stage": t.user_attrs.get("stage", 1)})
        out.append(t.number)
    return out


def counted(t) -> bool:
    from optuna.trial import TrialState
    if t.state == TrialState.FAIL:
        return "error" in t.user_attrs          # failed by the objective, not by a dead worker
    # a proposal of an already measured candidate costs nothing and measures nothing new
    return not (t.state == TrialState.COMPLETE and "same_as" in t.user_attrs)


def total_budget(cfg: SearchConfig) -> int:
    return (len(grid(cfg.space_obj())) if cfg.grid else 0) + cfg.budget


def remaining(study, cfg: SearchConfig) -> int:
    from optuna.trial import TrialState
    trials = study.get_trials(deepcopy=False)
    waiting = sum(1 for t in trials if t.state == TrialState.WAITING)
    if "converged" in study.user_attrs:
        return waiting
    return max(total_budget(cfg) - sum(1 for t in trials if counted(t)), 0) + waiting


def run_worker(study, cfg: SearchConfig, evaluator, log: Callable[[str], None] = lambda s: None,
               timeout: float | None = None, adapter_dir: Path | None = None) -> int:
    """Run trials of ``study`` until its budget is spent (or ``timeout`` s); returns how many
    this process ran."""
    import optuna
    from optuna.trial import TrialState

    from .measure import OverBound, cost_key
    sp = cfg.space_obj()
    me = worker_id()
    ran = [0]
    repeats = [0]           # measured candidates proposed again, in a row (this worker)

    def objective(trial):
        trial.set_user_attr("worker", me)
        trial.set_user_attr("stage", trial.user_attrs.get("stage", 2))
        c = suggest(trial, sp)
        key = c.key(sp)
        trial.set_user_attr("key", key)
        trial.set_user_attr("map", c.layer_map(sp))
        trial.set_user_attr("describe", c.describe(sp))
        same = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.user_attrs.get("key") == key]
        repeats[0] = repeats[0] + 1 if same else 0
        if same:
            trial.set_user_attr("same_as", same[0].number)
            for k in ("kld", "top1", "bpw", "ms_per_token", "memory_mib", "n_exec", "adapter_bytes"):
                if k in same[0].user_attrs:
                    trial.set_user_attr(k, same[0].user_attrs[k])
            log(f"trial {trial.number} (stage {trial.user_attrs['stage']}): {c.describe(sp)} = trial "
                f"{same[0].number}")
            return same[0].values if cfg.pareto else same[0].values[0]
        try:
            m = evaluator.measure(c, adapter_out=(adapter_dir / f"trial-{trial.number}.adapter.gguf")
                                  if adapter_dir is not None and c.needs_adapter() else None,
                                  memory_bound=cfg.memory_mib)
        except OverBound as e:
            trial.set_user_attr("memory_mib", e.memory_mib)
            trial.set_user_attr("over_bound", True)
            log(f"trial {trial.number}: {c.describe(sp)}: {e.memory_mib:.1f} MiB > bound {cfg.memory_mib} MiB")
            raise optuna.TrialPruned(f"memory {e.memory_mib:.1f} MiB over the bound") from None
        except SearchError as e:
            trial.set_user_attr("error", str(e))
            raise
        for k, v in m.as_attrs().items():
            trial.set_user_attr(k, v)
        trial.set_user_attr("cost_key", cost_key(c.base, m.n_exec, m.adapter_bytes > 0))
        obj = cfg.objective(m.kld, m.bpw, m.ms_per_token)
        trial.set_user_attr("objective", obj)
        log(f"trial {trial.number} (stage {trial.user_attrs['stage']}): {c.describe(sp)}: KLD {m.kld:.5f} "
            f"top1 {m.top1:.3f} bpw {m.bpw:.3f} {m.ms_per_token:.2f} ms/tok {m.memory_mib:.0f} MiB "
            f"({m.seconds:.1f} s)")
        return (m.kld, m.bpw, m.ms_per_token) if cfg.pareto else obj

    def budget_cb(study, trial):
        ran[0] += 1
        if remaining(study, cfg) <= 0:
            study.stop()
        elif repeats[0] >= MAX_REPEATS_IN_ROW:
            log(f"the sampler proposed {repeats[0]} measured candidates in a row: it has converged, "
                f"the study is finished")
            study.set_user_attr("converged", trial.number)
            study.stop()

    register_worker(study, me)
    if reclaimed := reclaim_stale(study):
        log(f"re-queued the trials of dead workers: {reclaimed}")
    if remaining(study, cfg) <= 0:
        return 0
    study.optimize(objective, timeout=timeout, callbacks=[budget_cb], catch=(SearchError,),
                   gc_after_trial=False)
    return ran[0]


# ---- results -----------------------------------------------------------------------------------

@dataclass
class Result:
    number: int
    stage: int
    candidate: Candidate
    key: str
    map: str
    describe: str
    kld: float
    top1: float
    bpw: float
    ms_per_token: float
    memory_mib: float
    objective: float
    n_exec: int
    seconds: float
    same_as: int | None = None
    front: bool = False
    extra: dict = field(default_factory=dict)


def _trial_cost_key(t, c: Candidate) -> str:
    from .measure import cost_key
    u = t.user_attrs
    return u.get("cost_key") or cost_key(c.base, int(u["n_exec"]), int(u.get("adapter_bytes", 0)) > 0)


def results(study, cfg: SearchConfig) -> list[Result]:
    """The complete trials, each candidate once (a repeated proposal is folded into the first).
    Decode time and memory are the study's current figures for the trial's cost key (a later,
    quieter measurement of that key replaces the one the trial saw)."""
    from optuna.trial import TrialState
    sp = cfg.space_obj()
    costs = study.user_attrs
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        u = t.user_attrs
        if u.get("same_as") is not None:
            continue
        c = candidate_from_params(t.params, sp)
        now = costs.get(_trial_cost_key(t, c)) or {}
        ms = float(now.get("ms_per_token", u.get("ms_per_token", math.nan)))
        mem = float(now.get("memory_mib", u.get("memory_mib", math.nan)))
        out.append(Result(t.number, int(u.get("stage", 2)), c, u.get("key", c.key(sp)), c.layer_map(sp),
                          c.describe(sp), float(u["kld"]), float(u["top1"]), float(u["bpw"]), ms, mem,
                          cfg.objective(float(u["kld"]), float(u["bpw"]), ms),
                          int(u["n_exec"]), float(u.get("seconds", math.nan))))
    pts = [(r.kld, r.bpw, r.ms_per_token if math.isfinite(r.ms_per_token) else 0.0) for r in out]
    for i, r in enumerate(out):
        r.front = not any(all(b <= a for a, b in zip(pts[i], pts[j])) and pts[j] != pts[i]
                          for j in range(len(out)))
    return out


def refresh_costs(study, cfg: SearchConfig, evaluator, log: Callable[[str], None] = lambda s: None) -> int:
    """Measure the decode time of every cost key of the complete trials again (keeping the
    fastest figure): for a study whose figures were taken on a busy machine.  Returns the count."""
    from optuna.trial import TrialState
    sp = cfg.space_obj()
    seen: dict[str, Candidate] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.user_attrs.get("same_as") is None and "n_exec" in t.user_attrs:
            c = candidate_from_params(t.params, sp)
            seen.setdefault(_trial_cost_key(t, c), c)
    for key, c in sorted(seen.items()):
        adapter = evaluator.write_adapter(c, evaluator.work / "cost.adapter.gguf") if c.needs_adapter() else None
        load = ["--lrq-adapter", str(adapter)] if adapter else (["--lrq-layers", c.layer_map(sp)] if c.layer_map(sp) else [])
        before = (study.user_attrs.get(key) or {}).get("ms_per_token", math.nan)
        ms, _ = evaluator.cost(c.base, load, c.n_exec(sp), adapter is not None, force=True)
        log(f"{key}: {before:.2f} -> {ms:.2f} ms/token")
    return len(seen)


def best(rows: list[Result]) -> Result | None:
    ok = [r for r in rows if math.isfinite(r.objective)]
    return min(ok, key=lambda r: (r.objective, r.n_exec, r.number)) if ok else None


__all__ = ["CONFIG_ATTR", "CONFIG_VERSION", "SearchConfig", "open_storage", "create_or_load",
           "load_study", "worker_id", "register_worker", "reclaim_stale", "counted", "total_budget", "remaining",
           "run_worker", "Result", "results", "refresh_costs", "best"]
