#!/usr/bin/env python
"""lrq-search on a bundled model, measured against lrq-select's top-K and a hand-made plan at equal
bits and equal decode work, on the evaluation texts (docs/search.md, "RESULTS").

    flock /tmp/lrq-heavy.lock .venv/bin/python bench/search_model.py --out out/search-smollm2
    flock /tmp/lrq-heavy.lock .venv/bin/python bench/search_model.py --model qwen2.5-1.5b \
        --budget 12 --out out/search-qwen

1. ``lrq-search MODEL --base IQ2_XS --base Q2_K --pareto``: stage 1 grid (8 groups, each
   alone repeated at strength 0.5 and 1) + stage 2 TPE, scored on held-out windows of sotu-calib.
2. On the base of the lowest-KLD trial, at K extra executions (the same decode work): the searched
   best map with K extra executions, lrq-select's top-K (``--rank-by kl``, as the demo) and the
   hand-made last-K; each as a bare layer map (or the searched gains) and with an adapter
   calibrated by lrq-calibrate (gain, bias; the same tokens and steps for all); plus the base
   alone and the base with a calibrated adapter and no repeat.
3. Every row: KLD / PPL / top-1 against the F32 reference by llama-perplexity on sotu-eval and
   botchan (--chunks), bpw of base + adapter, decode tokens/s by llama-bench (--lrq-adapter /
   --lrq-layers), and the held-out calibration-text KLD the search saw.
Writes OUT/search.md (tables + the commands) and OUT/rows.json; the search's own outputs
(trials.csv, front.md, search.png, best.*) are in OUT/search/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="bundled model (default smollm2-135m)")
    ap.add_argument("--out", default=None, help="output directory (default out/search-MODEL)")
    ap.add_argument("--budget", type=int, default=30, help="stage-2 trials (default 30)")
    ap.add_argument("--k", type=int, default=4, help="extra executions of the equal-decode comparison (default 4)")
    ap.add_argument("--chunks", type=int, default=10, help="llama-perplexity chunks per evaluation text")
    ap.add_argument("--bases", default="IQ2_XS,Q2_K", help="stock bases searched (default IQ2_XS,Q2_K)")
    ap.add_argument("--no-cost", action="store_true",
                    help="search on KLD alone (lrq-search --no-cost instead of --pareto: no llama-bench per "
                         "trial, which on a 1.5B model costs more than the KLD); decode is still measured per row")
    ap.add_argument("--windows", type=int, default=4, help="held-out windows per trial (default 4)")
    ap.add_argument("--calibrate", default="all",
                    help="rows that also get a calibrated adapter: all, or a comma list of base,searched,"
                         "select,hand,best (calibrating a 1.5B model takes ~10x SmolLM2's time)")
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--calib-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib-threads", type=int, default=1,
                    help="torch threads of the calibrations (1 is faster on a busy 2-core machine)")
    args = ap.parse_args()
    out = Path(args.out or f"out/search-{args.model}")
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.monotonic()
    times: dict[str, float] = {}

    from lrq import assets
    from lrq.calib.calibrate import CalibrateOptions, calibrate
    from lrq.calib.data import calibration_windows
    from lrq.cli import search as search_cli
    from lrq.eval import base_logits, evaluate_model, make_imatrix, make_stock, reference_f32
    from lrq.eval.speed import bench_speed, busy_cpu
    from lrq.search import Evaluator, SearchConfig, holdout_windows, load_study, open_storage, results
    from lrq.select import QuantSpec, choose, select_layers

    src = assets.path(args.model)
    ref = reference_f32(src)
    imat = make_imatrix(ref, "sotu-calib", threads=args.threads)
    bases = {t: make_stock(ref, t, imatrix=imat) for t in args.bases.split(",")}

    # 1. the search
    sdir = out / "search"
    cmd = [args.model, "-o", str(sdir), "--ref", str(ref),
           *[a for b in bases.values() for a in ("--base", str(b))], "--groups", "8", "--max-copies", "2", "--params", "strength",
           *(["--no-cost"] if args.no_cost else ["--pareto"]), "--budget", str(args.budget), "--windows", str(args.windows), "--ctx", "256",
           "--calib-tokens", str(args.calib_tokens), "--calib-window", "512", "-t", str(args.threads),
           "--seed", "0"]
    t0 = time.monotonic()
    rc = search_cli.main(cmd)
    times["search"] = time.monotonic() - t0
    if rc != 0:
        return rc
    study, cfg = load_study(open_storage(None, sdir), sdir.resolve().name)
    rows = results(study, cfg)
    space = cfg.space_obj()
    n_layer = space.n_layer
    trial_s = [r.seconds for r in rows if math.isfinite(r.seconds)]

    best = min(rows, key=lambda r: (r.kld, r.n_exec))
    base = best.candidate.base
    at_k = [r for r in rows if r.candidate.base == base and r.n_exec == n_layer + args.k]
    if not at_k:
        print(f"no searched candidate with {args.k} extra executions on {base}", file=sys.stderr)
        return 1
    sk = min(at_k, key=lambda r: r.kld)

    # 2. lrq-select top-K (measured KL ranking, as the demo) and the hand-made last-K
    t0 = time.monotonic()
    scores = select_layers(src, QuantSpec(2, 64), "sotu-calib", 1024, 512, measure_tokens=512,
                           threads=args.threads)
    times["lrq-select"] = time.monotonic() - t0
    topk = choose([s.kl for s in scores], "top-k", k=args.k)
    top_map = ",".join(f"{l}x{c}" for l, c in sorted(topk.items()))
    last_map = ",".join(f"{l}x2" for l in range(n_layer - args.k, n_layer))

    calib = calibration_windows(cfg.ref, cfg.text, cfg.calib_tokens, cfg.calib_window)
    wins = holdout_windows(cfg.ref, cfg.text, cfg.windows, cfg.ctx, avoid=calib)
    ev = Evaluator(cfg.ref, space, wins, out / "work", threads=args.threads, bench_tg=cfg.bench_tg,
                   bench_ctx=cfg.bench_ctx, cost_get=lambda k: study.user_attrs.get(k),
                   cost_set=lambda k, v: None)

    # rows: (label, map, searched adapter or None), each with a key for --calibrate
    sk_adapter = None
    if sk.candidate.needs_adapter():
        sk_adapter = ev.write_adapter(sk.candidate, out / "searched-k.adapter.gguf")
    plans = [("base", "base alone", "", None), ("searched", f"searched, +{args.k} exec", sk.map, sk_adapter),
             ("select", f"lrq-select top-{args.k}", top_map, None), ("hand", f"hand-made last-{args.k}", last_map, None)]
    if best.n_exec != n_layer and best is not sk:
        plans.insert(1, ("best", "searched, lowest KLD", best.map,
                         ev.write_adapter(best.candidate, out / "searched-best.adapter.gguf")
                         if best.candidate.needs_adapter() else None))

    import torch
    torch.set_num_threads(args.calib_threads)
    variants = []
    wanted = None if args.calibrate == "all" else set(args.calibrate.split(","))
    for key, label, m, ad in plans:
        variants.append((label, m, ad, None))
        if wanted is not None and key not in wanted:
            continue
        cal = out / f"cal-{len(variants)}.adapter.gguf"
        t0 = time.monotonic()
        calibrate(base, cal, cfg.ref, CalibrateOptions(text=cfg.text, n_tokens=args.calib_tokens, window=512,
                                                       steps=args.calib_steps, params=("gain", "bias"),
                                                       progress=False),
                  plan=m or None, adapter=True)
        variants.append((label + " + calibrated", m, cal, time.monotonic() - t0))
        print(f"calibrated {label} ({m or 'no map'}) in {variants[-1][3]:.0f} s", flush=True)

    # 3. evaluation texts, held-out KLD, decode speed
    evals = {t: base_logits(ref, t, ctx=512, chunks=args.chunks, threads=args.threads)
             for t in ("sotu-eval", "botchan")}
    table = []
    for label, m, ad, tcal in variants:
        n_exec = n_layer + sum(int(x.split("x")[1]) - 1 for x in m.split(",")) if m else n_layer
        held = ev.measure_files(base, n_exec, adapter=ad, layers=m if ad is None else "")
        row = {"label": label, "map": m or "-", "adapter": str(ad) if ad else None, "n_exec": n_exec,
               "calib_s": tcal, "held_kld": held.kld, "held_top1": held.top1}
        load = {"adapter": ad} if ad is not None else ({"layers": m} if m else {})
        for t, b in evals.items():
            r = evaluate_model(base, b, label, threads=args.threads, **load)
            row[t] = {"ppl": r.ppl, "ppl_err": r.ppl_err, "kld": r.kld, "kld_err": r.kld_err,
                      "top1": r.top1, "seconds": r.seconds}
            row["bpw"] = r.bpw
        extra = ["--lrq-adapter", str(ad)] if ad is not None else (["--lrq-layers", m] if m else [])
        sp = bench_speed(base, threads=args.threads, reps=3, tg=64, extra=extra)
        row["tg"], row["tg_std"], row["load1"] = sp.tg, sp.tg_std, sp.load1
        row["busy"] = busy_cpu(sp.load1)
        table.append(row)
        print(json.dumps(row), flush=True)
    times["total"] = time.monotonic() - t_all
    (out / "rows.json").write_text(json.dumps({"rows": table, "times": times, "base": str(base),
                                               "top_k": top_map, "last_k": last_map,
                                               "searched_k": sk.map, "searched_best": best.map}, indent=1))

    md = [f"Model: {args.model}. Base: `{Path(base).name}` (the base of the lowest-KLD trial). Search: {len(rows)} candidates "
          f"measured ({len(study.trials)} trials), {times['search'] / 60:.1f} min, "
          f"median {sorted(trial_s)[len(trial_s) // 2]:.1f} s per measured trial; lrq-select "
          f"{times['lrq-select']:.0f} s; whole benchmark {times['total'] / 60:.1f} min.", "",
          "| configuration | layer map | exec | bpw | held-out KLD (sotu-calib) | sotu-eval KLD | sotu-eval PPL | "
          "sotu-eval top-1 | botchan KLD | botchan PPL | decode t/s | calib s |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        a, b = r["sotu-eval"], r["botchan"]
        cs = "" if r["calib_s"] is None else f"{r['calib_s']:.0f}"
        md.append(f"| {r['label']} | `{r['map']}` | {r['n_exec']} | {r['bpw']:.3f} | {r['held_kld']:.4f} | "
                  f"{a['kld']:.4f} ± {a['kld_err']:.4f} | {a['ppl']:.2f} | {100 * a['top1']:.1f} % | "
                  f"{b['kld']:.4f} ± {b['kld_err']:.4f} | {b['ppl']:.2f} | {r['tg']:.1f}"
                  f"{' (busy)' if r['busy'] else ''} | {cs} |")
    text = "\n".join(md) + "\n"
    (out / "search.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
