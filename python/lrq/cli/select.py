"""lrq-select: rank layers by quantization sensitivity and write a replication plan.

Examples:
    lrq-select smollm2-135m -o plan.json --strategy top-k --k 8
    lrq-select model.gguf -o plan.json --bits 2 --group-size 64 --measure-tokens 512 --rank-by kl
    lrq-select model.gguf -o plan.json --strategy progressive --text my-calib.txt --tokens 4096
    lrq-convert model.gguf out.lrq.gguf --bits 2 --plan plan.json

Score (per layer k, the method's formula):
    Error_k       = ||W - Q(W)||_F / ||W||_F over the layer's block linears (lrq.quant, --bits ...)
    Sensitivity_k = std(x_k) / mean|x_k|, x_k = the residual stream entering layer k
    Massive_k     = fraction of |x_k| > 100 mean|x_k|
    Score_k       = Error_k * Sensitivity_k * (1 + 10 Massive_k)
on --tokens calibration tokens (float32 torch reference).  --measure-tokens N also measures, per
layer, the KL divergence and NLL increase on N tokens when only that layer is quantized
(one forward per layer; --rank-by kl|nll ranks by it).
Strategies: top-k (the K highest get --replicas copies), last-n (the last K layers),
progressive (the K highest get replicas+1, the next K get replicas; default K = n_layer // 3).

Mixture-of-experts models (--moe; docs/moe.md): the routing frequency of each expert of each
layer on the calibration text; the --top fraction (default 0.2) most-used experts of every
layer become one expert-replication entry per layer (--mode, --expert-weight) in the plan;
--moe-rank impact ranks by each expert's share of its layer's quantization error instead
(routing frequency x the expert's output error under the quantizer options):
    lrq-select moe.gguf -o plan.json --moe --top 0.2
    lrq-select moe.gguf -o plan.json --moe --moe-rank impact --bits 2 --scores experts.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

from ..atomic import atomic_path, atomic_write_text


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lrq-select", description=__doc__.splitlines()[0],
                                 epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", metavar="MODEL", help="plain GGUF (or a bundled model name, e.g. smollm2-135m)")
    ap.add_argument("-o", "--out", required=True, metavar="PLAN.json", help="plan file to write")
    s = ap.add_argument_group("strategy")
    s.add_argument("--strategy", default="top-k", choices=("top-k", "last-n", "progressive"))
    s.add_argument("--k", type=int, default=None, help="number of layers (top-k / last-n: required)")
    s.add_argument("--replicas", type=int, default=2, help="copies of a chosen layer (default 2)")
    s.add_argument("--mode", default="serial", choices=("serial", "parallel"), help="replica mode in the plan")
    s.add_argument("--rank-by", default="score", choices=("score", "kl", "nll"),
                   help="ranking value (kl / nll need --measure-tokens)")
    q = ap.add_argument_group("quantizer (as lrq-convert will use it)")
    q.add_argument("--bits", type=int, default=2, choices=(1, 2, 3, 4))
    q.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128, 256))
    q.add_argument("--quant-mode", default="asym", choices=("asym", "sym", "ternary"))
    q.add_argument("--scale-search", default="minmax", choices=("minmax", "mse"))
    c = ap.add_argument_group("calibration")
    c.add_argument("--text", default="sotu-calib", metavar="NAME|FILE", help="calibration text (default sotu-calib)")
    c.add_argument("--tokens", type=int, default=2048, help="tokens for the activation statistics (default 2048)")
    c.add_argument("--ctx", type=int, default=512, help="window length (default 512)")
    c.add_argument("--measure-tokens", type=int, default=0,
                   help="tokens for the measured score (0 = off; one forward per layer)")
    c.add_argument("-t", "--threads", type=int, default=None, help="torch threads")
    x = ap.add_argument_group("mixture of experts")
    x.add_argument("--moe", action="store_true", help="select experts by routing frequency (MoE models)")
    x.add_argument("--moe-rank", default="frequency", choices=("frequency", "impact"),
                   help="rank experts by routing frequency (the method's top-20 %% by usage; default) "
                        "or by impact: each expert's share of its layer's output error when its "
                        "matrices are quantized with the quantizer options (frequency x sensitivity)")
    x.add_argument("--top", type=float, default=0.2, help="fraction of each layer's experts to replicate (default 0.2)")
    x.add_argument("--expert-weight", type=float, default=1.0, help="weight a of each entry (default 1)")
    ap.add_argument("--scores", default=None, metavar="FILE.csv|.json", help="also write the per-layer table")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return ap


def _fmt(v: float, spec: str) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _select_experts(args, model: Path, out: Path, err) -> int:
    """--moe: routing frequencies -> the top experts of every MoE layer -> a plan's "experts"."""
    from ..plan import ExpertEntry, PlanError, check_expert_entries
    from ..select import SelectError
    from ..select import QuantSpec
    from ..select.moe import expert_statistics, top_experts
    if args.mode == "parallel" and not 0 <= args.expert_weight <= 1:
        err(f"--expert-weight {args.expert_weight}: a parallel entry weighs 0..1"); return 2
    if not 0 < args.top <= 1:
        err(f"--top must be in (0, 1], got {args.top}"); return 2
    try:
        spec = QuantSpec(args.bits, args.group_size, args.quant_mode, args.scale_search)
        stats = expert_statistics(model, args.text, args.tokens, args.ctx, spec, args.threads)
        freq, rank = stats["frequency"], stats[args.moe_rank]
        chosen = {L: top_experts(rank[L], args.top) for L in range(len(freq)) if freq[L].sum() > 0}
        entries = [ExpertEntry(L, 1, tuple(xs), args.mode, args.expert_weight) for L, xs in chosen.items()]
        check_expert_entries(entries, len(freq), freq.shape[1], f"{model}")
        atomic_write_text(out, json.dumps({"experts": [
            {"layer": e.layer, "experts": list(e.experts), "mode": e.mode, "weight": e.weight} for e in entries]},
            indent=1) + "\n")
        if args.scores:
            p = Path(args.scores)
            rows = [{"layer": L, "expert": e, "share": float(freq[L, e]),
                     "sensitivity": float(stats["sensitivity"][L, e]), "impact": float(stats["impact"][L, e]),
                     "chosen": e in chosen.get(L, ())}
                    for L in range(len(freq)) for e in range(freq.shape[1])]
            if p.suffix.lower() == ".json":
                atomic_write_text(p, json.dumps({"model": str(model), "text": str(args.text), "rows": rows}, indent=1))
            else:
                with atomic_path(p) as tmp, open(tmp, "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=list(rows[0]))
                    w.writeheader()
                    w.writerows(rows)
    except (SelectError, PlanError, OSError) as e:
        err(e); return 1
    except KeyboardInterrupt:
        err("interrupted; nothing written"); return 130
    n_tok = (args.tokens // args.ctx) * args.ctx
    print(f"{model.name}: {freq.shape[1]} experts per layer, routing frequency and {spec.describe()} "
          f"sensitivity on {n_tok} tokens of {args.text} (ctx {args.ctx}); top {args.top:g} per layer "
          f"by {args.moe_rank}")
    print(f"{'layer':>5s}  {'experts':24s} {'share':>6s} {'impact':>6s}  (uniform {1 / freq.shape[1]:.3f} each)")
    for L, xs in chosen.items():
        print(f"{L:5d}  {', '.join(map(str, xs)):24s} {freq[L, xs].sum():6.3f} {stats['impact'][L, xs].sum():6.3f}")
    print(f"{len(entries)} {args.mode} entries of weight {args.expert_weight:g} -> wrote {out}"
          + (f", {args.scores}" if args.scores else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .. import assets
    from ..model_file import ModelFileError
    from ..select import QuantSpec, SelectError, choose, ranking, select_layers, write_plan

    err = lambda m: print(f"lrq-select: error: {m}", file=sys.stderr)  # noqa: E731
    if args.rank_by != "score" and args.measure_tokens <= 0:
        err(f"--rank-by {args.rank_by} needs --measure-tokens N (N > 0)"); return 2
    if args.strategy in ("top-k", "last-n") and args.k is None and not args.moe:
        err(f"--strategy {args.strategy} needs --k"); return 2
    out = Path(args.out)
    if out.suffix.lower() != ".json":
        err(f"{out}: the plan file must end in .json"); return 2
    if not out.resolve().parent.is_dir():
        err(f"{out}: directory {out.parent} does not exist"); return 1
    try:
        model = (assets.path(args.model) if args.model in assets.ASSETS and
                 assets.ASSETS[args.model].kind == "model" else Path(args.model))
        if not model.is_file():
            err(f"{model}: no such model file"); return 1
        from ..select.measure import open_plain
        plain = open_plain(model)
        if args.moe:
            if not plain.hparams.n_expert:
                err(f"{model}: --moe selects experts, and '{plain.arch}' has none"); return 1
            return _select_experts(args, model, out, err)
        if plain.hparams.n_expert:
            # the per-layer scores quantize the seven dense block linears (docs/moe.md)
            err(f"{model}: '{plain.arch}' is a mixture-of-experts model, whose layers lrq-select does not "
                f"score; --moe selects its experts (docs/moe.md)"); return 1
        n_layer = plain.hparams.n_layer
        choose([0.0] * n_layer, args.strategy, args.k, args.replicas)   # bad --k fails before work
        spec = QuantSpec(args.bits, args.group_size, args.quant_mode, args.scale_search)
        scores = select_layers(model, spec, args.text, args.tokens, args.ctx, args.measure_tokens,
                               args.threads, progress=not args.quiet)
        n = len(scores)
        values = {"score": [s.score for s in scores], "kl": [s.kl for s in scores],
                  "nll": [s.dnll for s in scores]}[args.rank_by]
        choice = choose(values, args.strategy, args.k, args.replicas)
        write_plan(out, choice, n, args.mode)
    except (SelectError, ModelFileError, assets.AssetError, OSError) as e:
        err(e); return 1
    except KeyboardInterrupt:
        err("interrupted; nothing written"); return 130

    rank_s = {l: i + 1 for i, l in enumerate(ranking([s.score for s in scores]))}
    measured = args.measure_tokens > 0
    rank_m = {l: i + 1 for i, l in enumerate(ranking([s.kl for s in scores]))} if measured else {}
    print(f"{model.name}: {n} layers, quantizer {spec.describe()}, text {args.text}, "
          f"{(args.tokens // args.ctx) * args.ctx} tokens (ctx {args.ctx})"
          + (f", measured on {(args.measure_tokens // args.ctx) * args.ctx} tokens" if measured else ""))
    head = f"{'layer':>5s} {'Error':>8s} {'Sens':>7s} {'Massive':>9s} {'Score':>8s} {'rank':>4s}"
    if measured:
        head += f" {'KL':>9s} {'dNLL':>9s} {'rank':>4s}"
    print(head + "  copies")
    for s in scores:
        line = (f"{s.layer:5d} {s.error:8.4f} {s.sensitivity:7.3f} {s.massive:9.2e} {s.score:8.4f} "
                f"{rank_s[s.layer]:4d}")
        if measured:
            line += f" {_fmt(s.kl, '9.5f')} {_fmt(s.dnll, '9.5f')} {rank_m[s.layer]:4d}"
        print(line + f"  {choice.get(s.layer, 1)}")
    print(f"strategy {args.strategy} by {args.rank_by}: layers "
          f"{', '.join(f'{l}x{r}' for l, r in sorted(choice.items())) or '(none)'} -> wrote {out}")
    if args.scores:
        p = Path(args.scores)
        rows = [dict(layer=s.layer, error=s.error, sensitivity=s.sensitivity, massive=s.massive,
                     score=s.score, kl=s.kl, dnll=s.dnll, copies=choice.get(s.layer, 1)) for s in scores]
        try:
            if p.suffix.lower() == ".json":
                atomic_write_text(p, json.dumps({"model": str(model), "quant": spec.describe(),
                                                 "text": str(args.text), "layers": rows}, indent=1))
            else:
                with atomic_path(p) as tmp, open(tmp, "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=list(rows[0]))
                    w.writeheader()
                    w.writerows(rows)
        except OSError as e:
            err(f"{p}: {e.strerror or e}"); return 1
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
