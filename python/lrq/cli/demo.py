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
pipeline running, not lrq's best quality.  The final step is the comparison that matters, the way
users meet lrq: llama.cpp's own IQ2_XS and Q2_K files of SmolLM2 (llama-quantize with an importance
matrix from the SOTU *calibration* text), each alone and with a small adapter that
``lrq-calibrate --adapter`` fits on the same calibration text (per-output-channel gain / bias of
every block linear; the stock file itself is never changed) — bpw, adapter size, PPL, KLD and
top-1 agreement against the F32 reference on the evaluation text, and decode tokens/s
(llama-bench --lrq-adapter) — with one line per adapter against its stock file and one saying
which row wins.  SmolLM2's 576-wide rows do not take 2-bit k-/i-quants, so llama.cpp's "IQ2_XS"
file is mostly IQ4_NL (~4.9 bpw): on this model the rows compare llama.cpp's own files, not 2-bit
ones (docs/RESULTS.md has Qwen2.5-Coder-1.5B, whose rows do).  Calibration is the expensive part
(about 3 minutes per adapter at the default 1024 tokens x 20 steps on one core); --calib-tokens /
--calib-steps trade time for quality.  Nothing is cached across runs except what lrq.eval.stock
caches (the F32 reference, the importance matrix, the stock files).
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


# ---- the final table: llama.cpp's own files + a calibrated adapter, against the same files alone ----

@dataclass
class FinalOptions:
    text: str = "sotu-eval"                # evaluation text (never calibrated on)
    calib_text: str = "sotu-calib"         # calibration: lrq-calibrate and the imatrix
    ctx: int = 512
    chunks: int = 10
    threads: int = 2                       # llama.cpp threads (perplexity, llama-bench)
    bases: tuple[str, ...] = ("IQ2_XS", "Q2_K")   # llama-quantize types, each with the imatrix
    plan: str = "none"                     # schedule of base + adapter (a preset, plan file or layer map)
    window: int = 512                      # token window of the calibration
    calib_tokens: int = 1024
    calib_steps: int = 20
    torch_threads: int = 1                 # torch threads of the calibration
    imatrix_chunks: int | None = None      # None: lrq.eval.stock's default (64)
    stock_work: Path | None = None         # lrq.eval.stock's cache (None: ~/.cache/lrq/eval)
    tg: int = 32                           # llama-bench decode tokens
    reps: int = 1
    progress: bool = False


@dataclass
class FinalResult:
    rows: list                             # lrq.eval.Row; reference first; row.extra["tg"] = t/s
    header: str
    adapters: dict = field(default_factory=dict)   # row label -> (adapter path, its stock row's label)
    seconds: dict[str, float] = field(default_factory=dict)
    calib_loss: dict = field(default_factory=dict)  # row label -> final residual-stream MSE


def _same_text(a: str, b: str) -> bool:
    from ..eval import text_file
    return text_file(a).resolve() == text_file(b).resolve()


def final_table(src: Path, work: Path, o: FinalOptions, log=lambda s: None) -> FinalResult:
    """Build, evaluate and time the final table's rows (module doc): for each base type, the
    stock llama-quantize file (with the importance matrix) and the same file + an adapter fitted
    by lrq-calibrate --adapter.  ``work`` holds this run's adapters and reference logits; stock
    files come from lrq.eval.stock's cache and are never modified."""
    from .. import eval as ev
    from ..calib.calibrate import CalibrateOptions, calibrate
    from ..eval.recipe import add_time
    from ..eval.speed import bench_speed

    if _same_text(o.calib_text, o.text):
        raise ValueError(f"the calibration text {o.calib_text} is the evaluation text: never "
                         f"calibrate on the text you evaluate on")
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "eval", ignore_errors=True)      # never reuse a previous run's logits
    secs: dict[str, float] = {}
    timed = functools.partial(add_time, secs)

    log(f"F32 reference of {src.name}, importance matrix on {o.calib_text}, stock {', '.join(o.bases)}")
    ref = timed("reference + stock", ev.reference_f32, src, o.stock_work)
    kw = {"chunks": o.imatrix_chunks} if o.imatrix_chunks else {}
    imat = timed("reference + stock", ev.make_imatrix, ref, o.calib_text, ctx=o.ctx, threads=o.threads,
                 work=o.stock_work, **kw)
    copts = CalibrateOptions(text=o.calib_text, n_tokens=o.calib_tokens, window=o.window, steps=o.calib_steps,
                             progress=o.progress)
    models = []                                    # (label, base path, adapter or None, kind)
    adapters, losses = {}, {}
    for qtype in o.bases:
        stock = timed("reference + stock", ev.make_stock, ref, qtype, imat, o.stock_work)
        label = f"stock {qtype} + imatrix"
        models.append((label, stock, None, "stock"))
        adapter = work / f"{src.stem}.{qtype}.adapter.gguf"
        log(f"lrq-calibrate {stock.name} --adapter {adapter.name} --plan {o.plan}")
        n = torch_threads(o.torch_threads)
        try:
            summary = timed("calibrate", calibrate, stock, adapter, ref, copts, plan=o.plan, adapter=True)
        finally:
            torch_threads(n)
        a_label = f"{qtype} + adapter"
        models.append((a_label, stock, adapter, "lrq"))
        adapters[a_label] = (adapter, label)
        losses[a_label] = summary.final_loss

    log(f"reference logits on {o.text} (-c {o.ctx}, {o.chunks} chunks)")
    base = timed("evaluate", ev.base_logits, ref, o.text, o.ctx, o.chunks, o.threads, work / "eval")
    rows = [ev.reference_row(base)]
    try:
        for label, path, adapter, kind in models:
            log(f"evaluate {label}")
            rows.append(timed("evaluate", ev.evaluate_model, path, base, label, o.threads, kind, adapter=adapter))
    finally:
        base.logits.unlink(missing_ok=True)         # ~25 MB a chunk; nothing is kept across runs
    for row, (_, _, adapter, _) in zip(rows, [(None, None, None, None)] + models):
        log(f"llama-bench tg{o.tg} {row.label}")
        sp = timed("llama-bench", bench_speed, row.path, o.threads, o.reps, 0, o.tg,
                   extra=["--lrq-adapter", str(adapter)] if adapter else None)
        row.extra["tg"], row.extra["load1"] = sp.tg, sp.load1
    n_ch = base.result.n_chunks if base.result.n_chunks > 0 else o.chunks
    header = (f"model {src.name} (reference: its F32 dequantization), text {o.text}, -c {o.ctx}, "
              f"{n_ch} chunks, {o.threads} threads; decode = llama-bench tg{o.tg}, {o.reps} rep")
    return FinalResult(rows, header, adapters, secs, losses)


def torch_threads(n: int) -> int:
    """Set torch's thread count to ``n`` (when > 0); returns the previous count."""
    import torch
    prev = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    return prev


def adapter_lines(rows, adapters: dict) -> list[str]:
    """One line per adapter row: its KLD, PPL, bits and decode speed against its stock file's."""
    from ..eval.speed import busy_cpu
    by = {r.label: r for r in rows}
    out = []
    for label, (path, stock_label) in adapters.items():
        a, s = by.get(label), by.get(stock_label)
        if a is None or s is None or not (math.isfinite(a.kld) and math.isfinite(s.kld) and s.kld > 0):
            continue
        size = Path(path).stat().st_size if Path(path).exists() else 0
        tg_a, tg_s = a.extra.get("tg", math.nan), s.extra.get("tg", math.nan)
        # a figure from a busy machine is no speed: no ratio from it (the decode of one side may
        # have shared the cores with another job, e.g. 1.4 against 59.8 t/s)
        busy = any(busy_cpu(r.extra.get("load1", math.nan)) for r in (a, s))
        speed = ("" if not (tg_a > 0 and tg_s > 0) else
                 ", decode not compared (busy machine)" if busy else f", decode {tg_a / tg_s:.2f}x")
        out.append(f"{label}: KLD {a.kld:.4f} vs {s.kld:.4f} ({100 * (a.kld / s.kld - 1):+.0f} %), PPL {a.ppl:.2f} "
                   f"vs {s.ppl:.2f}, {size / 1e6:.2f} MB adapter (+{a.bpw - s.bpw:.3f} bpw){speed} against "
                   f"{stock_label} alone")
    return out


def winner_line(rows) -> str:
    """One line naming the row that wins on quality (lowest KLD) among the quantized rows."""
    cand = [r for r in rows if r.kind != "reference" and math.isfinite(r.kld)]
    if not cand:
        return "winner: none (no row was evaluated)"
    best = min(cand, key=lambda r: r.kld)
    fewest = all(best.bpw <= r.bpw for r in cand)
    runner = min((r for r in cand if r is not best), key=lambda r: r.kld, default=None)
    tail = (f"; next: {runner.label} (KLD {runner.kld:.4f} at {runner.bpw:.2f} bpw)" if runner else "")
    return (f"winner: {best.label} — lowest KLD ({best.kld:.4f}, PPL {best.ppl:.2f}) at {best.bpw:.2f} bpw"
            + (", the fewest bits per weight" if fewest else "") + tail + ".")


def format_final(res: FinalResult, o: FinalOptions) -> str:
    lines = ["final table: " + res.header,
             f"{'file':30s} {'bpw':>6s} {'adapter':>9s} {'PPL':>17s} {'KLD':>8s} {'top-1':>7s} {'tg t/s':>7s}"]
    for r in res.rows:
        ppl = f"{r.ppl:.2f} ± {r.ppl_err:.2f}"
        tg = r.extra.get("tg", math.nan)
        a = res.adapters.get(r.label)
        size = f"{Path(a[0]).stat().st_size / 1e6:6.2f} MB" if a and Path(a[0]).exists() else f"{'–':>9s}"
        lines.append(f"{r.label[:30]:30s} {r.bpw:6.2f} {size:>9s} {ppl:>17s} {r.kld:8.4f} {100 * r.top1:6.1f}% "
                     f"{tg:7.1f}")
    lines.append(f"bpw = whole file (embeddings included; with an adapter: base + adapter); adapters: "
                 f"lrq-calibrate --adapter --plan {o.plan} on {o.calib_text}, {o.calib_tokens} tokens, "
                 f"{o.calib_steps} steps; the stock files are unchanged")
    lines.extend(adapter_lines(res.rows, res.adapters))
    lines.append(winner_line(res.rows))
    from ..eval.speed import busy_cpu
    loads = [r.extra.get("load1", math.nan) for r in res.rows]
    if any(busy_cpu(x) for x in loads):
        lines.append(f"note: other jobs shared the CPU during llama-bench (load average up to "
                     f"{max(x for x in loads if math.isfinite(x)):.1f} on {os.cpu_count()} cores): "
                     f"the tokens/s column is unreliable; rerun on a quiet machine")
    s = res.seconds
    order = ("reference + stock", "calibrate", "evaluate", "llama-bench")
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
    f = ap.add_argument_group("final table (llama.cpp's own IQ2_XS / Q2_K files + a calibrated adapter vs the same files)")
    f.add_argument("--calib-tokens", type=int, default=FinalOptions.calib_tokens,
                   help=f"calibration tokens (default {FinalOptions.calib_tokens}; lrq-calibrate's own default is 4096)")
    f.add_argument("--calib-steps", type=int, default=FinalOptions.calib_steps,
                   help=f"Adam steps per layer (default {FinalOptions.calib_steps}; lrq-calibrate: 50)")
    f.add_argument("--calib-threads", type=int, default=FinalOptions.torch_threads,
                   help="torch threads of the calibration (default 1: faster on a busy 2-core machine)")
    f.add_argument("--bases", default=",".join(FinalOptions.bases),
                   help=f"llama-quantize types of the final table (default {','.join(FinalOptions.bases)})")
    f.add_argument("--plan", default=FinalOptions.plan,
                   help="schedule of base + adapter: none (default), last-N, ... or a layer map such as 29x2")
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
                     threads=args.threads, bases=tuple(b.strip() for b in args.bases.split(",") if b.strip()),
                     plan=args.plan, calib_tokens=args.calib_tokens, calib_steps=args.calib_steps,
                     torch_threads=args.calib_threads)
    print(f"\nfinal table: llama.cpp's own {' and '.join(o.bases)} files of {model.name} (with an importance "
          f"matrix), each alone and with an adapter calibrated on {o.calib_text} ({o.calib_tokens} tokens, "
          f"{o.calib_steps} steps, plan {o.plan}) ...", flush=True)
    log = lambda m: print(f"  [{time.strftime('%H:%M:%S')}] {m}", flush=True)  # noqa: E731
    from ..calib import CalibError
    from ..eval import EvalError, StockError
    from ..tools import ToolError
    try:
        res = final_table(model, args.out / "final", o, log)
    except (CalibError, EvalError, StockError, ToolError, ValueError, OSError) as e:
        print(f"lrq-demo: error: {e}", file=sys.stderr)
        return 1
    print(format_final(res, o))
    return 0


if __name__ == "__main__":
    sys.exit(main())
