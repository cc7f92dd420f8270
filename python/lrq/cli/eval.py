"""lrq-eval: perplexity, KL-divergence and top-1 agreement of GGUF files against a reference (default F32).

Examples:
    lrq-eval --ref smollm2-135m --stock Q4_0,Q2_K,IQ2_XS model.lrq.gguf
    lrq-eval --ref smollm2-135m --stock default --chunks 40 --threads 2 -o results/smollm2
    lrq-eval --ref qwen2.5-1.5b --chunks 20 --text my.txt a.gguf b.gguf --csv r.csv --plot r.png
    lrq-eval --ref Qwen2.5-32B-BF16.gguf --ref-type source model.lrq.gguf   # no reference copy

The reference is SRC dequantized to F32 (`llama-quantize --allow-requantize SRC ref F32`, cached
in --work-dir); --ref-type F16 / BF16 / Q8_0 makes that copy in another type (half the F32 size,
or ~1/4 with Q8_0), --ref-type source takes SRC itself as it is (no copy at all: a download in
F16, BF16 or Q8_0 is its own reference).  The header, the reference row and the CSV's ref_type
column say which reference was used, and the cached reference logits are kept per reference
(and so are stock files quantized from it).  Its logits are stored once with --kl-divergence-base, then every model runs
llama-perplexity --kl-divergence on the same windows (DATA.md's protocol: -c 512, the second half
of each window scored).  bpw = 8 x all tensor bytes / base parameters (embeddings included).
Stock types that need an importance matrix (IQ2_XS, IQ2_XXS, ...) get one from llama-imatrix on
--imatrix-text; --imatrix-all uses it for every stock type.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lrq-eval", description=__doc__.splitlines()[0],
                                 epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", metavar="MODEL.gguf", help="GGUF files to evaluate (LRQ or stock)")
    ap.add_argument("--ref", required=True, metavar="SRC",
                    help="source model (a bundled model name or a GGUF); its F32 dequantization is the reference")
    ap.add_argument("--ref-type", default="F32", metavar="F32|F16|BF16|Q8_0|source",
                    help="the reference: SRC copied into this type by llama-quantize (cached), or "
                         "'source': SRC itself, no copy (default F32)")
    ap.add_argument("--stock", default="", metavar="T1,T2|default",
                    help="also make and evaluate these llama-quantize types from the reference "
                         "(default = Q4_0,Q3_K_S,Q2_K,IQ2_XS,IQ2_XXS)")
    ap.add_argument("--imatrix-text", default="sotu-calib", metavar="NAME|FILE",
                    help="text for llama-imatrix (default sotu-calib; never the evaluation text)")
    ap.add_argument("--imatrix-chunks", type=int, default=None, help="imatrix chunks (default 64)")
    ap.add_argument("--imatrix-all", action="store_true",
                    help="quantize every stock type with the imatrix (default: only those that need one)")
    ap.add_argument("--text", default="sotu-eval", metavar="NAME|FILE", help="evaluation text (default sotu-eval)")
    ap.add_argument("-c", "--ctx", type=int, default=512, help="context (default 512)")
    ap.add_argument("--chunks", type=int, default=40, help="chunks (SmolLM2: 40, Qwen 1.5B: 20; default 40)")
    ap.add_argument("-t", "--threads", type=int, default=None, help="llama.cpp threads (default: its own)")
    ap.add_argument("--work-dir", default=None, help="cache of reference, stock files, logits (default ~/.cache/lrq/eval)")
    ap.add_argument("-o", "--out", default=None, metavar="PREFIX", help="write PREFIX.csv and PREFIX.png")
    ap.add_argument("--csv", default=None, help="CSV output path")
    ap.add_argument("--plot", default=None, help="PNG output path")
    ap.add_argument("--adapter", default=None, metavar="A.gguf",
                    help="evaluate every MODEL.gguf with this lrq adapter applied at load time "
                         "(docs/FORMAT.md 11; llama-perplexity --lrq-adapter)")
    ap.add_argument("--layers", default=None, metavar="MAP",
                    help="evaluate every MODEL.gguf with this layer map, e.g. 0..15,11..29 "
                         "(docs/FORMAT.md 7.1; llama-perplexity --lrq-layers)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return ap


def _ref_source(ref: str) -> Path:
    from .. import assets
    if ref in assets.ASSETS:
        if assets.ASSETS[ref].kind != "model":
            raise ValueError(f"--ref: '{ref}' is a bundled text, not a model")
        return assets.path(ref)
    p = Path(ref)
    if not p.is_file():
        raise ValueError(f"--ref: '{ref}' is neither a bundled model ({', '.join(k for k, a in assets.ASSETS.items() if a.kind == 'model')}) nor a file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .. import eval as ev
    from ..assets import AssetError
    from ..tools import ToolError

    err = lambda m: print(f"lrq-eval: error: {m}", file=sys.stderr)  # noqa: E731
    if args.ctx < 4 or args.ctx % 2:
        err(f"--ctx must be an even number >= 4, got {args.ctx}"); return 2
    if args.chunks < 1:
        err(f"--chunks must be >= 1, got {args.chunks}"); return 2
    ref_type = args.ref_type.upper() if args.ref_type.lower() != "source" else "source"
    if ref_type not in ev.REF_TYPES:
        err(f"--ref-type: '{args.ref_type}' is not one of {', '.join(ev.REF_TYPES)}"); return 2
    for m in args.models:
        if not Path(m).is_file():
            err(f"{m}: no such model file"); return 1
    if args.adapter is not None and args.layers is not None:
        err("--adapter and --layers are not combined (an adapter's parameters were fitted for its own "
            "schedule)"); return 2
    if (args.adapter is not None or args.layers is not None) and not args.models:
        err("--adapter / --layers apply to MODEL.gguf files; none given"); return 2
    if args.adapter is not None and not Path(args.adapter).is_file():
        err(f"{args.adapter}: no such adapter file"); return 1
    stock = [t.strip().upper() for t in (",".join(ev.STOCK_DEFAULT) if args.stock == "default"
                                         else args.stock).split(",") if t.strip()]
    if not args.models and not stock:
        err("nothing to evaluate: give MODEL.gguf files and/or --stock TYPES"); return 2
    csv_path = args.csv or (f"{args.out}.csv" if args.out else None)
    png_path = args.plot or (f"{args.out}.png" if args.out else None)
    for p in (csv_path, png_path):
        if p and not Path(p).resolve().parent.is_dir():
            err(f"output directory of {p} does not exist"); return 1
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    try:
        src = _ref_source(args.ref)
        work = ev.work_dir(args.work_dir)
        log(f"reference: {src} itself" if ref_type == "source" else f"reference: {src} -> {ref_type} ...")
        ref = ev.reference_model(src, ref_type, work)
        ref_label = ev.ref_type_label(ref_type, ref)
        # stock files quantized from a reference other than the F32 copy: their own names, and
        # llama-quantize may have to requantize (a Q8_0 reference, a quantized source)
        stock_kw = {} if ref_type == "F32" else {"requantize": True,
                                                 "tag": "ref-source" if ref_type == "source" else ""}
        jobs: list[tuple[Path, str, str]] = []
        imat = None
        for t in stock:
            use = t in ev.IMATRIX_REQUIRED or args.imatrix_all
            if use and imat is None:
                log(f"importance matrix on {args.imatrix_text} ...")
                kw = {"chunks": args.imatrix_chunks} if args.imatrix_chunks else {}
                imat = ev.make_imatrix(ref, args.imatrix_text, ctx=args.ctx, threads=args.threads,
                                       work=work, **kw)
            log(f"stock {t}{' + imatrix' if use else ''} ...")
            jobs.append((ev.make_stock(ref, t, imat if use else None, work, **stock_kw),
                         f"{t}{'+imat' if use else ''}", "stock"))
        suffix = (f" + {Path(args.adapter).name}" if args.adapter is not None
                  else f" layers {args.layers}" if args.layers is not None else "")
        jobs += [(Path(m), Path(m).name + suffix, None) for m in args.models]
        log(f"reference logits on {args.text} (-c {args.ctx}, {args.chunks} chunks) ...")
        base = ev.base_logits(ref, args.text, args.ctx, args.chunks, args.threads, work, ref_type=ref_label)
        rows = [ev.reference_row(base)]
        from tqdm import tqdm
        for path, label, kind in tqdm(jobs, desc="lrq-eval", unit="model", disable=args.quiet):
            load = {} if kind == "stock" else {"adapter": args.adapter, "layers": args.layers}
            rows.append(ev.evaluate_model(path, base, label, args.threads, kind, **load))
    except (ev.EvalError, ev.StockError, ToolError, AssetError, ValueError, OSError) as e:
        err(e); return 1
    except KeyboardInterrupt:
        err("interrupted"); return 130
    ev.mark_pareto(rows)
    n_ch = base.result.n_chunks if base.result.n_chunks > 0 else args.chunks
    what = ("F32 dequantization" if ref_type == "F32" else
            f"the source file itself, {ref_label.split(':', 1)[-1]}" if ref_type == "source" else
            f"{ref_type} copy by llama-quantize")
    header = (f"model {src.name} (reference: {what}; ref_type {ref_label}), text {args.text}, "
              f"-c {args.ctx}, {n_ch} chunks, threads {args.threads or 'default'}")
    print(ev.table(rows, header))
    if csv_path:
        ev.write_csv(rows, csv_path); print(f"wrote {csv_path}")
    if png_path:
        ev.plot(rows, png_path, header); print(f"wrote {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
