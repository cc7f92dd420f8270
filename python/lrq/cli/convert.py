"""lrq-convert: quantize a GGUF or Hugging Face model into an LRQ GGUF (docs/FORMAT.md).

Examples:
    lrq-convert model.Q4_1.gguf out.lrq.gguf --bits 2 --group-size 64
    lrq-convert model.gguf out.gguf --bits 2 --plan last-8 --grid-offset 0.5
    lrq-convert hf-model-dir/ out.gguf --ternary --scale-search mse --plan plan.yaml
    lrq-convert model.gguf out.gguf --keep 'token_embd|output' --plan progressive
    lrq-convert model.Q4_1.gguf out.gguf --bits 2 --gptq --calib-text sotu-calib --calib-tokens 4096
    lrq-convert model.Q4_1.gguf out.gguf --bits 2 --awq --calib-text my-text.txt
    lrq-convert model.Q4_1.gguf out.gguf --bits 2 --mix q2k --gptq --calib-text sotu-calib
    lrq-convert model.Q4_1.gguf out.gguf --bits 2 --group-size 256 --layout two-level --mix q2k --gptq --calib-text sotu-calib
    lrq-convert model.Q4_1.gguf out.gguf --base-type IQ2_XS --calib sotu-calib --plan last-4
    lrq-convert model.Q4_1.gguf out.gguf --rotate --scale-search mse    # keeps model.Q4_1.rotated-seed0.F32.gguf

Plans: none (default), all (every layer twice), last-N (last N layers twice), progressive
(first third x1, middle x2, last third x3), or a JSON/YAML file
{"layers": {"27": {"replicas": 2, "mode": "serial"}}}.
Tensors other than the block linears (embeddings, output, norms, biases) keep their source type.
--base-type TYPE instead lets the pinned llama-quantize make every weight (any type it knows,
with an imatrix from --imatrix or built by llama-imatrix on --calib); replicas of such a file
carry per-output-channel gain / bias and an input clip (format v2), fitted by lrq-calibrate.
"""

from __future__ import annotations

import argparse
import sys

from ._job import run_job


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lrq-convert", description=__doc__.splitlines()[0],
                                 epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", metavar="SRC", help="GGUF file (any type gguf-py dequantizes) or HF model directory")
    ap.add_argument("out", metavar="OUT.gguf", help="output LRQ GGUF (written atomically)")
    q = ap.add_argument_group("quantizer")
    q.add_argument("--bits", type=int, choices=(1, 2, 3, 4), default=None, help="code bits (default 2)")
    m = q.add_mutually_exclusive_group()
    m.add_argument("--asym", dest="mode", action="store_const", const="asym",
                   help="per-group scale and minimum (default)")
    m.add_argument("--sym", dest="mode", action="store_const", const="sym", help="per-group scale, symmetric grid")
    m.add_argument("--ternary", dest="mode", action="store_const", const="ternary",
                   help="codes -1/0/+1 times a per-group scale (2-bit storage)")
    q.add_argument("--group-size", type=int, choices=(32, 64, 128, 256), default=64)
    q.add_argument("--layout", metavar="single|two-level[:16|:32]", default="single",
                   help="two-level: 2-bit codes with 4-bit sub-block scales and mins (16 or 32 weights, "
                        "default 16) under fp16 super-block scales of --group-size weights (use 256), "
                        "as llama.cpp's Q2_K, for any row width (format v4); needs --bits 2 --asym. "
                        "Importance from --scale-search act-mse, GPTQ with --gptq; with --mix the "
                        "tensors it widens get single-level groups of --group-size (default single)")
    q.add_argument("--mix", metavar="PRESET|RULES", default=None,
                   help="mixed precision: a preset (q2k: llama.cpp's Q2_K file, attn_v 4 bits, "
                        "attn_output and ffn_down 3; v4; v4-down3) or PATTERN=BITS[,...] rules, "
                        "PATTERN a regex searched in the tensor name, first match wins; the other "
                        "block linears get --bits")
    q.add_argument("--scale-search", choices=("minmax", "mse", "act-mse"), default=None,
                   help="mse: per-group clipping that minimises the squared error; act-mse: the "
                        "error weighted by E[x^2] of each input channel (needs --calib-text) "
                        "(default: mse with --gptq, minmax otherwise)")
    q.add_argument("--awq", dest="scale_search", action="store_const", const="act-mse",
                   help="same as --scale-search act-mse (activation-aware clipping search)")
    c = ap.add_argument_group("calibration-aware quantizers (need --calib-text)")
    c.add_argument("--gptq", action="store_true",
                   help="GPTQ: codes column by column with Hessian error feedback on the "
                        "quantized model's own inputs; group parameters from --scale-search "
                        "(default mse), then refitted on their codes (see --refit)")
    c.add_argument("--calib-text", "--calib", metavar="NAME|FILE", default=None,
                   help="calibration text: a bundled text (sotu-calib) or a text file")
    c.add_argument("--calib-tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    c.add_argument("--calib-window", type=int, default=512, help="tokens per window (default 512)")
    c.add_argument("--gptq-damp", type=float, default=0.1,
                   help="GPTQ dampening, a fraction of mean(diag(H)) (default 0.1)")
    c.add_argument("--resume", metavar="DIR", default=None,
                   help="keep each finished layer's quantized tensors in DIR; the same command again "
                        "after a kill goes on at the first unfinished layer, with the same output "
                        "byte for byte (other inputs or options are refused by name)")
    c.add_argument("--calib-stream", "--gptq-stream", choices=("quantized", "float"), default=None,
                   help="inputs the statistics come from: quantized = the model being quantized, "
                        "layer by layer and sub-layer by sub-layer (sequential GPTQ); float = the "
                        "full-precision source's (default: quantized with --gptq, float for act-mse)")
    q.add_argument("--refit", action=argparse.BooleanOptionalAction, default=None,
                   help="refit each group's scale and min by least squares on its codes, weighted "
                        "by E[x^2] of the input channels (uniform without --calib-text; inside "
                        "GPTQ against its own objective) (default: on with --gptq or an "
                        "act-mse search, off otherwise)")
    q.add_argument("--rounding", choices=("nearest", "stochastic"), default="nearest")
    q.add_argument("--noise", type=float, default=0.0,
                   help="std of Gaussian noise (in code units) added before rounding")
    q.add_argument("--seed", type=int, default=0, help="seed of stochastic rounding / noise")
    q.add_argument("--keep", metavar="REGEX", default=None,
                   help="tensors whose name matches keep their source type (e.g. 'ffn_down')")
    s = ap.add_argument_group("stock-typed base (format v2)")
    s.add_argument("--base-type", metavar="TYPE", default=None,
                   help="llama-quantize type of the shared weights (IQ2_XXS, IQ2_XS, Q2_K, Q4_K, ...) "
                        "instead of LRQ codes")
    s.add_argument("--imatrix", metavar="FILE", default=None,
                   help="importance matrix for llama-quantize (default: llama-imatrix on --calib, "
                        "when given)")
    s.add_argument("--work", metavar="DIR", default=None,
                   help="directory of the F32 reference / imatrix / stock intermediates "
                        "(default: lrq's evaluation cache, shared with lrq-eval) and of --rotate's "
                        "rotated source (default: beside OUT)")
    q.add_argument("--rotate", action="store_true",
                   help="rotate the residual stream first (QuaRot-style, lrq.rotate; --seed picks the "
                        "rotation); the rotated F32 source is kept in --work, else beside OUT: it is "
                        "the file's full-precision reference (lrq-calibrate --source)")
    r = ap.add_argument_group("replication")
    r.add_argument("--plan", default="none", metavar="FILE|PRESET",
                   help="none | all | last-N | progressive | plan.json | plan.yaml (default none)")
    r.add_argument("--grid-offset", type=float, default=0.0,
                   help="initial grid offset (code units) of replicas r>=1: +x, -x, +2x, ...")
    r.add_argument("--scale-delta", type=float, default=0.0,
                   help="initial scale multipliers of replicas r>=1: 1+d, 1-d, 1+2d, ...")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from ..convert import ConvertError, ConvertOptions, convert
    from ..gguf_write import WriterError

    if args.base_type is not None:
        clash = [o for o, v in (("--bits", args.bits), ("--asym/--sym/--ternary", args.mode)) if v is not None]
        if clash:
            print(f"lrq-convert: error: --base-type {args.base_type}: {', '.join(clash)} only apply "
                  f"to LRQ codes", file=sys.stderr)
            return 2
    mode = args.mode or "asym"
    bits = args.bits if args.bits is not None else 2
    layout = args.layout.strip()
    if layout == "single":
        two_level = 0
    elif layout in ("two-level", "two-level:16", "two-level:32"):
        two_level = int(layout.split(":")[1]) if ":" in layout else 16
    else:
        print(f"lrq-convert: error: --layout: '{args.layout}' is not single, two-level, two-level:16 or "
              f"two-level:32", file=sys.stderr)
        return 2
    opts = ConvertOptions(bits=bits, mode=mode, group_size=args.group_size, two_level=two_level,
                          scale_search=args.scale_search, rounding=args.rounding,
                          noise=args.noise, gptq=args.gptq, calib_text=args.calib_text,
                          calib_tokens=args.calib_tokens, calib_window=args.calib_window,
                          gptq_damp=args.gptq_damp, calib_stream=args.calib_stream, refit=args.refit,
                          grid_offset=args.grid_offset, scale_delta=args.scale_delta, keep=args.keep,
                          mix=args.mix,
                          plan=args.plan, seed=args.seed, progress=not args.quiet,
                          base_type=args.base_type, imatrix=args.imatrix, work=args.work,
                          rotate=args.rotate, resume=args.resume)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr))
    return run_job("lrq-convert", args.out, lambda: convert(args.src, args.out, opts, log=log),
                   (ConvertError, WriterError), args.quiet)


if __name__ == "__main__":
    sys.exit(main())
