"""lrq-search: which layers to repeat, how strongly, on which base — a two-stage Optuna search.

    from lrq.search import Space, SearchConfig, make_groups, open_storage, create_or_load, run_worker
    sp = Space(30, ("smol.IQ2_XS.gguf",), make_groups(30, 8), max_copies=2)
    cfg = SearchConfig(ref="smol.F32.gguf", space=sp.to_dict(), budget=40)
    study = create_or_load(open_storage(None, "out"), "smol", cfg)
    run_worker(study, cfg, Evaluator(cfg.ref, sp, holdout_windows(...), Path("out/work")))

A candidate is a base GGUF + a layer map (+ a small adapter of per-group gains): nothing is
rewritten per trial.  space.py has the space and the grid, measure.py how a candidate is measured
(KLD on held-out calibration windows through the binding, llama-bench decode time, llama.cpp's
memory report), study.py the Optuna study (journal file or database, workers, resume), report.py
the outputs (CSV, front table, plot, best plan and adapter, calibrated finalists).
"""

from .measure import Evaluator, Measurement, OverBound, holdout_windows, kld_top1, memory_report, memory_split
from .space import (PARAM_KINDS, Candidate, SearchError, Space, candidate_from_params, grid,
                    make_groups, suggest)
from .study import (SearchConfig, best, create_or_load, load_study, open_storage, reclaim_stale,
                    register_worker, remaining, results, run_worker, total_budget)

__all__ = ["Evaluator", "Measurement", "OverBound", "holdout_windows", "kld_top1", "memory_report", "memory_split",
           "PARAM_KINDS", "Candidate", "SearchError", "Space", "candidate_from_params", "grid",
           "make_groups", "suggest", "SearchConfig", "best", "create_or_load", "load_study",
           "open_storage", "reclaim_stale", "register_worker", "remaining", "results", "run_worker", "total_budget"]
