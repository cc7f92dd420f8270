"""lrq-search: which layers to repeat and with which parameters, searched with Optuna.

Examples:
    lrq-search smollm2-135m -o search/ --base IQ2_XS --base Q2_K --budget 40
    lrq-search smollm2-135m -o search/ --groups 8 --max-copies 3 --params strength,scale --gamma 0.002
    lrq-search smollm2-135m -o search/ --pareto --budget 60          # the KLD / bpw / ms front
    lrq-search smollm2-135m -o search/ --max-memory-mib 260 --calibrate-top 3 --calib-params gain,bias
    lrq-search smollm2-135m -o s/ --storage postgresql://lrq:pw@db/lrq --study smol   # first machine
    lrq-search --worker --storage postgresql://lrq:pw@db/lrq --study smol             # every other one
    lrq-search --report -o s/ --storage postgresql://lrq:pw@db/lrq --study smol       # tables, plot

A candidate is a base GGUF (--base: a file, or a llama-quantize type made from MODEL and cached)
+ a layer map (every layer of a group of adjacent layers runs --max-copies times at most) + an
adapter of per-group gains when --params asks for them (strength: the gain of a repeated copy's
residual update, 0..1; scale: the gain of the first copy's, 0.9..1.1).  Nothing is rewritten per
trial.  Stage 1 is a grid (each group alone repeated at each --grid-strengths, each --grid-scales
alone), stage 2 Optuna's TPE seeded with the grid's results, --budget trials.  Each trial: KLD to
the F32 reference and top-1 on --windows held-out windows of the calibration text (never
evaluation text; the windows share no 16-token run with the final calibration's), decode ms/token
from llama-bench, memory from llama.cpp's own buffer report.  Objective: alpha KLD + beta bpw +
gamma ms/token, subject to --max-memory-mib; --pareto minimises (KLD, bpw, ms/token) and reports
the front.

The study lives in an Optuna storage: OUT/search.journal by default (run the same command again
to resume after a kill), or a database URL for workers on many machines (--worker joins it).
OUT gets trials.csv, front.md, search.png, best.plan.json, best.map, best.adapter.gguf (when the
best has gains) and, with --calibrate-top N, adapters calibrated by lrq-calibrate for the N best
layer maps (final-*.adapter.gguf, final.md, best.calibrated.adapter.gguf).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

EVAL_TEXTS = ("sotu-eval", "botchan")


def _floats(s: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{s}' is not a comma-separated list of numbers") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lrq-search", description=__doc__.splitlines()[0],
                                 epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", metavar="MODEL", nargs="?", default=None,
                    help="the full-precision model (GGUF or bundled name, e.g. smollm2-135m)")
    ap.add_argument("-o", "--out", metavar="DIR", default=None, help="output directory (created)")
    ap.add_argument("--ref", metavar="F32.gguf", default=None,
                    help="the F32 reference (default: MODEL dequantized to F32 by llama-quantize, cached)")
    ap.add_argument("--base", action="append", default=None, metavar="FILE|TYPE",
                    help="base GGUF to search on, or a llama-quantize type made from the reference "
                         "(repeatable: the base is then a dimension; default IQ2_XS)")
    s = ap.add_argument_group("search space")
    s.add_argument("--groups", type=int, default=8, help="groups of adjacent layers sharing parameters (default 8)")
    s.add_argument("--max-copies", type=int, default=2, help="most executions of a layer (default 2)")
    s.add_argument("--params", default="strength",
                   help="per-group gains searched: strength, scale, both (comma) or none (default strength)")
    s.add_argument("--grid-strengths", type=_floats, default=(0.5, 1.0), help="stage-1 strengths (default 0.5,1)")
    s.add_argument("--grid-scales", type=_floats, default=(0.96, 1.04), help="stage-1 scales (default 0.96,1.04)")
    s.add_argument("--no-grid", action="store_true", help="skip stage 1 (TPE starts with 10 random trials)")
    s.add_argument("--budget", type=int, default=50, help="stage-2 (TPE) trials for the whole study (default 50)")
    o = ap.add_argument_group("objective")
    o.add_argument("--alpha", type=float, default=1.0, help="weight of KLD (nats; default 1)")
    o.add_argument("--beta", type=float, default=0.0, help="weight of bits per weight (default 0)")
    o.add_argument("--gamma", type=float, default=0.0, help="weight of decode ms/token (default 0)")
    o.add_argument("--max-memory-mib", type=float, default=None,
                   help="constraint: llama.cpp's reported memory at --bench-ctx (MiB)")
    o.add_argument("--pareto", action="store_true", help="multi-objective: KLD, bpw, ms/token; report the front")
    m = ap.add_argument_group("measurement")
    m.add_argument("--text", default="sotu-calib", metavar="NAME|FILE", help="calibration text (default sotu-calib)")
    m.add_argument("--windows", type=int, default=4, help="held-out windows per trial (default 4)")
    m.add_argument("--ctx", type=int, default=256, help="tokens per held-out window (default 256)")
    m.add_argument("--calib-tokens", type=int, default=1024,
                   help="tokens of the final calibration (held-out windows avoid them; default 1024)")
    m.add_argument("--calib-window", type=int, default=512, help="window of the final calibration (default 512)")
    m.add_argument("--bench-tg", type=int, default=32, help="llama-bench decode tokens (default 32)")
    m.add_argument("--bench-ctx", type=int, default=512, help="context of the memory report (default 512)")
    m.add_argument("--no-cost", action="store_true", help="measure KLD and bpw only (no llama-bench, no memory)")
    m.add_argument("-t", "--threads", type=int, default=2, help="llama.cpp / torch threads (default 2)")
    st = ap.add_argument_group("study")
    st.add_argument("--storage", default=None, metavar="URL|FILE",
                    help="Optuna storage: a journal file (default OUT/search.journal) or a database URL")
    st.add_argument("--study", default=None, help="study name (default: OUT's directory name)")
    st.add_argument("--worker", action="store_true", help="join an existing study (its configuration) and run trials")
    st.add_argument("--report", action="store_true", help="only write OUT's tables and plot from the study")
    st.add_argument("--remeasure-cost", action="store_true",
                    help="with --report: measure the decode time of every (base, executions, adapter) "
                         "again and keep the fastest figure (for a study run on a busy machine)")
    st.add_argument("--timeout", type=float, default=None, help="stop this process's trials after S seconds")
    st.add_argument("--seed", type=int, default=None, help="TPE seed (default random)")
    f = ap.add_argument_group("final stage")
    f.add_argument("--calibrate-top", type=int, default=0, metavar="N",
                   help="calibrate adapters (lrq-calibrate) for the N best layer maps (default 0)")
    f.add_argument("--calib-steps", type=int, default=20, help="Adam steps per layer (default 20)")
    f.add_argument("--calib-params", default="gain,bias",
                   help="calibrated parameter kinds; ';' separates alternatives tried each (default gain,bias)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no per-trial lines")
    return ap


def _base_path(spec: str, ref: Path, threads: int) -> Path:
    from ..eval.stock import IMATRIX_REQUIRED, make_imatrix, make_stock
    p = Path(spec)
    if p.is_file():
        return p.resolve()
    if p.suffix == ".gguf" or os.sep in spec:
        raise FileNotFoundError(f"--base {spec}: no such file")
    qtype = spec.upper()
    imat = make_imatrix(ref, "sotu-calib", threads=threads) if qtype in IMATRIX_REQUIRED else None
    return make_stock(ref, qtype, imatrix=imat, threads=threads).resolve()


def _n_layer(path: Path) -> int:
    from ..gguf_hparams import open_reader, read_kv
    kv = read_kv(open_reader(path))
    arch = str(kv.get("general.architecture"))
    n = kv.get(f"{arch}.block_count")
    if n is None:
        raise ValueError(f"{path}: key {arch}.block_count is missing (not a llama.cpp model GGUF)")
    return int(n)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    err = lambda m: print(f"lrq-search: error: {m}", file=sys.stderr)  # noqa: E731
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    if args.worker or args.report:
        if args.storage is None and args.out is None:
            ap.error("--worker / --report need --storage (or -o OUT with its search.journal)")
        if args.worker and args.report:
            ap.error("--worker and --report are separate runs")
        if args.report and args.out is None:
            ap.error("--report writes its tables to -o OUT")
    elif args.model is None or args.out is None:
        ap.error("give MODEL and -o OUT (or --worker / --report with --storage and --study)")
    if os.fspath(args.text) in EVAL_TEXTS:
        err(f"--text {args.text} is an evaluation text; the search scores on held-out calibration text"); return 2

    import optuna

    from .. import assets
    from ..calib import CalibError
    from ..eval.run import EvalError
    from ..eval.stock import StockError, reference_f32
    from ..model_file import ModelFileError
    from ..search import (Evaluator, SearchConfig, SearchError, Space, best, create_or_load,
                          holdout_windows, load_study, make_groups, open_storage, remaining,
                          results, run_worker)
    from ..search.study import refresh_costs
    from ..search import report
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(args.out) if args.out else None
    name = args.study or (out.resolve().name if out else None)
    if name is None:
        ap.error("--study NAME is needed without -o OUT")
    try:
        if out is not None:
            if not out.resolve().parent.is_dir():
                raise SearchError(f"-o {out}: directory {out.parent} does not exist")
            out.mkdir(exist_ok=True)
        storage = open_storage(args.storage, out)
        if args.worker or args.report:
            study, cfg = load_study(storage, name, args.seed)
        else:
            model = (assets.path(args.model) if args.model in assets.ASSETS and
                     assets.ASSETS[args.model].kind == "model" else Path(args.model))
            if not model.is_file():
                raise SearchError(f"{model}: no such model file")
            ref = Path(args.ref).resolve() if args.ref else reference_f32(model).resolve()
            if not ref.is_file():
                raise SearchError(f"--ref {ref}: no such file")
            bases = tuple(str(_base_path(b, ref, args.threads)) for b in (args.base or ["IQ2_XS"]))
            n_layer = _n_layer(ref)
            for b in bases:
                if _n_layer(Path(b)) != n_layer:
                    raise SearchError(f"--base {b}: {_n_layer(Path(b))} layers, the reference {ref} has {n_layer}")
            kinds = () if args.params.strip() == "none" else tuple(
                p.strip() for p in args.params.split(",") if p.strip())
            space = Space(n_layer, bases, make_groups(n_layer, args.groups), args.max_copies, kinds,
                          args.grid_strengths, args.grid_scales)
            cfg = SearchConfig(str(ref), space.to_dict(), os.fspath(args.text), args.windows, args.ctx,
                               args.calib_tokens, args.calib_window, args.alpha, args.beta, args.gamma,
                               args.max_memory_mib, args.pareto, args.budget, not args.no_grid,
                               not args.no_cost, args.bench_tg, args.bench_ctx)
            study = create_or_load(storage, name, cfg, args.seed)
        space = cfg.space_obj()
        work = Path(tempfile.mkdtemp(prefix="lrq-search-")) if out is None else out / "work"
        evaluator = None
        if not args.report:
            from ..calib.data import calibration_windows
            calib = calibration_windows(cfg.ref, cfg.text, cfg.calib_tokens, cfg.calib_window)
            wins = holdout_windows(cfg.ref, cfg.text, cfg.windows, cfg.ctx, avoid=calib)
            evaluator = Evaluator(cfg.ref, space, wins, work, threads=args.threads, bench_tg=cfg.bench_tg,
                                  bench_ctx=cfg.bench_ctx, cost_get=lambda k: study.user_attrs.get(k),
                                  cost_set=study.set_user_attr, measure_cost=cfg.cost)
            log(f"study '{name}': {remaining(study, cfg)} trials to run; {len(space.groups)} groups of "
                f"{space.n_layer} layers, bases {', '.join(Path(b).name for b in space.bases)}")
            n = run_worker(study, cfg, evaluator, log, timeout=args.timeout)
            log(f"this process ran {n} trials")
        if args.worker:
            return 0
        if evaluator is None:        # --report: no windows to score, only adapters to write, costs
            import numpy as np
            evaluator = Evaluator(cfg.ref, space, np.zeros((1, 32), dtype=np.int64), work, threads=args.threads,
                                  bench_tg=cfg.bench_tg, bench_ctx=cfg.bench_ctx,
                                  cost_get=lambda k: study.user_attrs.get(k), cost_set=study.set_user_attr,
                                  measure_cost=cfg.cost)
        if args.remeasure_cost:
            if not args.report or not cfg.cost:
                raise SearchError("--remeasure-cost goes with --report, on a study that measures the cost")
            refresh_costs(study, cfg, evaluator, log)
        rows = results(study, cfg)
        if not rows:
            raise SearchError(f"study '{name}' has no complete trial yet")
        report.write_csv(rows, out / "trials.csv")
        front = [r for r in rows if r.front]
        md = report.table(front, f"Front of study '{name}' ({len(rows)} candidates measured)")
        b = best(rows)
        info = report.write_best(b, cfg, out, evaluator)
        finals = []
        if args.calibrate_top > 0:
            if args.report:
                raise SearchError("--calibrate-top runs with a search, not with --report")
            sets = [tuple(p.strip() for p in s.split(",") if p.strip()) for s in args.calib_params.split(";")]
            finals = report.calibrate_finalists(rows, cfg, evaluator, out, args.calibrate_top,
                                                args.calib_steps, sets, args.threads, log)
            (out / "final.md").write_text(report.final_table(finals))
            md += "\nCalibrated finalists (lrq-calibrate --adapter):\n\n" + report.final_table(finals)
        (out / "front.md").write_text(md)
        report.plot(rows, out / "search.png", f"lrq-search '{name}'",
                    [(f.label, f.kld, f.bpw, f.ms_per_token) for f in finals])
        print(md)
        print(f"best: trial {b.number}: {b.describe} on {Path(b.candidate.base).name}: KLD {b.kld:.5f}, "
              f"bpw {b.bpw:.3f}, {b.ms_per_token:.2f} ms/token -> {info['files']['plan']}"
              + (f", {info['files']['adapter']}" if "adapter" in info["files"] else ""))
        print(f"run it: {info['use']}")
    except (SearchError, CalibError, EvalError, StockError, ModelFileError, assets.AssetError,
            FileNotFoundError, ValueError) as e:
        err(e); return 1
    except KeyboardInterrupt:
        err("interrupted; the study keeps every finished trial (run the same command to resume)"); return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
