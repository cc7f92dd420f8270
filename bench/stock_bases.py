"""Replication on llama.cpp's own quant types: the same stock codes with and without replicas.

Example:
    .venv/bin/python bench/stock_bases.py --model smollm2-135m --bases IQ2_XS,Q2_K --chunks 20
    .venv/bin/python bench/stock_bases.py --bases IQ2_XS --plans none,all --tokens 512 --steps 10

For each base type: llama-quantize makes the shared codes from the F32 reference (with an imatrix
from sotu-calib, as lrq-eval makes its stock rows, so the unreplicated row IS the stock file),
lrq-convert --base-type wraps them with each plan (none / selected / all), lrq-calibrate fits the
replicas' per-channel gains and biases (and input clips) on sotu-calib, and every file is scored
with llama-perplexity against the F32 reference on the evaluation text (PPL, KLD, top-1), plus
decode speed (llama-bench tg) relative to the unreplicated stock file, measured in the same run.
Prints a markdown table; --out writes it (and a CSV) too.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path


def _decode_tps(path: Path, threads: int, tg: int, reps: int) -> float:
    from lrq import tools
    out = tools.run("llama-bench", ["-m", path, "-p", "0", "-n", tg, "-t", threads, "-r", reps, "-o", "csv"],
                    timeout=1200)
    rows = list(csv.DictReader(out.stdout.strip().splitlines()))
    return float(rows[-1]["avg_ts"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="bundled model name or a GGUF")
    ap.add_argument("--bases", default="IQ2_XXS,IQ2_XS,Q2_K")
    ap.add_argument("--plans", default="none,selected,all",
                    help="none, all, last-N, selected (lrq-select top-k --k K), or plan files")
    ap.add_argument("--k", type=int, default=8, help="layers replicated by the selected plan")
    ap.add_argument("--text", default="sotu-eval")
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=1024, help="calibration tokens (sotu-calib)")
    ap.add_argument("--steps", type=int, default=20, help="Adam steps per layer")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tg", type=int, default=32, help="llama-bench decode tokens")
    ap.add_argument("--reps", type=int, default=2, help="llama-bench repetitions")
    ap.add_argument("--work", type=Path, default=Path("out/stock-bases"))
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table (and .csv) here")
    args = ap.parse_args(argv)

    import torch

    from lrq import assets
    from lrq.calib.calibrate import CalibrateOptions, calibrate
    from lrq.cli import select as select_cli
    from lrq.convert import ConvertOptions, convert
    from lrq.eval.run import base_logits, evaluate_model
    from lrq.eval.stock import make_imatrix, make_stock, reference_f32

    torch.set_num_threads(1)        # faster than 2 on a busy 2-core machine
    src = assets.path(args.model) if args.model in assets.ASSETS else Path(args.model)
    args.work.mkdir(parents=True, exist_ok=True)
    ref = reference_f32(src)
    imat = make_imatrix(ref, "sotu-calib")
    base = base_logits(ref, args.text, chunks=args.chunks, threads=args.threads)
    rows = []

    def add(label, path, base_type, plan, t_cal, stock_tps):
        r = evaluate_model(path, base, label=label)
        tps = _decode_tps(path, args.threads, args.tg, args.reps)
        from lrq.eval.bpw import file_bpw
        rows.append({"base": base_type, "plan": plan, "calibrated": t_cal is not None,
                     "bpw": file_bpw(path).bpw, "ppl": r.ppl, "kld": r.kld, "top1": 100 * r.top1,
                     "tg_rel": tps / stock_tps if stock_tps else 1.0, "tg": tps,
                     "calib_s": t_cal or 0.0})
        print(f"  {label}: bpw {rows[-1]['bpw']:.3f} PPL {r.ppl:.3f} KLD {r.kld:.4f} top-1 {100 * r.top1:.1f}% "
              f"tg {tps:.1f} t/s ({rows[-1]['tg_rel']:.2f}x)", flush=True)

    plans = [p.strip() for p in args.plans.split(",") if p.strip()]
    for bt in [b.strip().upper() for b in args.bases.split(",") if b.strip()]:
        stock = make_stock(ref, bt, imatrix=imat)
        stock_tps = _decode_tps(stock, args.threads, args.tg, args.reps)
        print(f"{bt}: stock file {stock.name}", flush=True)
        add(f"{bt} stock", stock, bt, "-", None, stock_tps)
        for plan in plans:
            spec = plan
            if plan == "selected":
                spec = str(args.work / f"plan-top{args.k}.json")
                if not Path(spec).exists():
                    select_cli.main([str(src), "-o", spec, "--strategy", "top-k", "--k", str(args.k), "-q"])
            raw = args.work / f"{bt}-{plan}.gguf"
            convert(src, raw, ConvertOptions(base_type=bt, plan=spec, calib_text="sotu-calib", progress=False))
            cal = args.work / f"{bt}-{plan}.cal.gguf"
            t0 = time.monotonic()
            calibrate(raw, cal, src, CalibrateOptions(n_tokens=args.tokens, steps=args.steps,
                                                      act_clip_grid=(), progress=False))
            add(f"{bt} {plan} calibrated", cal, bt, plan, time.monotonic() - t0, stock_tps)

    head = ("| base | plan | calibrated | bpw (file) | PPL | KLD | top-1 % | decode vs stock | calib s |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [head] + [f"| {r['base']} | {r['plan']} | {'yes' if r['calibrated'] else 'no'} | {r['bpw']:.3f} | "
                      f"{r['ppl']:.3f} | {r['kld']:.4f} | {r['top1']:.1f} | {r['tg_rel']:.2f}x | "
                      f"{r['calib_s']:.0f} |" for r in rows]
    table = "\n".join(lines)
    print(f"\n{args.model}, {args.text} ({args.chunks} chunks of 512), {args.tokens} calibration tokens, "
          f"{args.steps} steps\n{table}")
    if args.out:
        args.out.write_text(table + "\n")
        with open(args.out.with_suffix(".csv"), "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
