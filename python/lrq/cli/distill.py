"""lrq-distill: train the per-replica parameters of a whole LRQ file end to end (KL to the reference).

Examples:
    lrq-distill smol.cal.gguf smol.dist.gguf --source SmolLM2-135M-Instruct.Q4_1.gguf \\
        --calib-text mix-calib --resume smol.dist.resume          # 16384 tokens, 160 steps, top-256
    lrq-distill in.gguf out.gguf --source src.gguf --calib-text my-text.txt --tokens 4096 --top-k 0 --lr 5e-4

Codes, base parameters, norms, embeddings and the head stay frozen.  Every per-replica
parameter of every layer (gains, biases, scale multipliers, grid offsets, and any other trainable
tensor of the replica modules) is trained jointly with Adam to minimise
KL(p_reference || p_quantized) of the next-token distributions over the calibration windows,
each layer under gradient checkpointing.  Run it after lrq-calibrate (the block-wise fit): it
starts from the file's parameters.  --source is the plain GGUF the file was converted from
(the reference is its float32 dequantization); its log-probabilities are computed once.
With --resume DIR the state (parameters, Adam, step, loss curve) is saved atomically every
--checkpoint-every steps and a later run with the same DIR continues from there.  The loss
curve is written beside OUT as OUT-without-.gguf + .distill.jsonl.  Never distil on the text
you evaluate on (sotu-eval, botchan).
"""

from __future__ import annotations

import argparse
import sys

from ._job import run_job


def build_parser() -> argparse.ArgumentParser:
    from ..calib.replica import PARAMS
    ap = argparse.ArgumentParser(prog="lrq-distill", description=__doc__.splitlines()[0],
                                 epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", metavar="IN.gguf", help="LRQ file (stock-typed or LRQ codes, any schedule)")
    ap.add_argument("out", metavar="OUT.gguf", help="distilled LRQ file (written atomically)")
    ap.add_argument("--source", required=True, metavar="SRC.gguf",
                    help="the plain GGUF IN was converted from (full-precision reference)")
    ap.add_argument("--calib-text", "--text", dest="text", default="sotu-calib", metavar="NAME|FILE",
                    help="calibration text: sotu-calib, mix-calib (several domains) or a text "
                         "file (default sotu-calib)")
    ap.add_argument("--tokens", type=int, default=16384, help="calibration tokens (default 16384)")
    ap.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    ap.add_argument("--steps", type=int, default=160,
                    help="Adam steps in all; a resumed run continues up to this (default 160)")
    ap.add_argument("--batch-windows", type=int, default=1, help="windows per Adam step (default 1)")
    ap.add_argument("--lr", type=float, default=1e-3,
                    help="Adam lr of gains, scale multipliers and other parameters; grid offsets "
                         "get 4x, biases 0.2x (default 1e-3)")
    ap.add_argument("--params", default=",".join(PARAMS),
                    help=f"replica parameters to train (default {','.join(PARAMS)})")
    ap.add_argument("--granularity", choices=("channel", "group"), default="channel",
                    help="shape of scale_mult / grid_offset the input lacks: per output channel "
                         "(default) or per group")
    ap.add_argument("--top-k", type=int, default=256,
                    help="keep only the reference's top-k log-probabilities and the rest's mass "
                         "(0 = all: n_tokens x vocabulary floats; default 256)")
    ap.add_argument("--resume", default=None, metavar="DIR",
                    help="resume directory: state saved there, and a run with the same DIR continues")
    ap.add_argument("--checkpoint-every", type=int, default=10,
                    help="steps between saved states and loss-curve writes (default 10)")
    ap.add_argument("--no-grad-checkpoint", action="store_true",
                    help="keep every layer's activations (faster, more memory)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (default: torch's choice; 1 is faster on a busy machine)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from ..calib import CalibError
    from ..calib.distill import DistillOptions, distill
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    opts = DistillOptions(text=args.text, n_tokens=args.tokens, window=args.window,
                          steps=args.steps, batch_windows=args.batch_windows, lr=args.lr,
                          params=tuple(p.strip() for p in args.params.split(",") if p.strip()),
                          granularity=args.granularity, top_k=args.top_k,
                          checkpoint_every=args.checkpoint_every, resume=args.resume,
                          grad_checkpoint=not args.no_grad_checkpoint, seed=args.seed,
                          progress=not args.quiet)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr))
    return run_job("lrq-distill", args.out,
                   lambda: distill(args.src, args.out, args.source, opts, log=log),
                   (CalibError,), args.quiet)


if __name__ == "__main__":
    sys.exit(main())
