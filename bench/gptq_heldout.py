"""Held-out output error of every block linear of LRQ files, each measured on its own stream.

For every FILE (an LRQ GGUF made from SRC) and block linear: the relative output error
``||X (W - W^)^T||^2 / ||X W^T||^2``, W the source's weight, W^ the file's (dequantized), X the
linear's inputs on held-out text while FILE itself runs (the quantized model's own residual
stream and its own quantized earlier sub-layers: lrq.calib.activations.SourceActivations of
FILE).  This is the error the quantized model meets at inference; measured on the calibration
text's float stream instead, GPTQ's errors looked 0.03-0.40 of round-to-nearest's on SmolLM2
while its perplexity was ten times worse.

    python bench/gptq_heldout.py SRC.gguf a.gguf b.gguf --text sotu-eval --tokens 2048
    python bench/gptq_heldout.py SRC.gguf a.gguf --layers 0,15,29 --per-layer
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from lrq.calib import calibration_windows                       # noqa: E402
from lrq.calib.activations import LINEARS, SourceActivations    # noqa: E402
from lrq.calib.gptq import output_error                         # noqa: E402
from lrq.model_file import open_model                           # noqa: E402


def relative_errors(src: Path, model: Path, windows: np.ndarray, layers) -> dict:
    """{(layer, linear): relative output error on ``model``'s own stream}."""
    sm = open_model(src)
    acts = SourceActivations(model, windows)
    out = {}
    for L in layers:
        st = acts.linear_stats(L)
        blk = acts.block(L)
        for name in LINEARS:
            w = sm.tensor(f"blk.{L}.{name}.weight").astype(np.float64)
            w_hat = blk.lin[name].weight.to(torch.float64).numpy()
            out[(L, name)] = (output_error(w, w_hat, st[name].xtx)
                              / output_error(w, np.zeros_like(w), st[name].xtx))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("files", type=Path, nargs="+")
    ap.add_argument("--text", default="sotu-eval", help="held-out text (default sotu-eval)")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--layers", default=None, help="comma-separated layers (default all)")
    ap.add_argument("--per-layer", action="store_true", help="print every (layer, linear)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    windows = calibration_windows(args.src, args.text, args.tokens, args.window)
    layers = ([int(v) for v in args.layers.split(",")] if args.layers
              else range(open_model(args.src).hparams.n_layer))
    print(f"held-out: {windows.size} tokens of {args.text}; relative output error "
          f"||X(W-W^)||^2/||XW||^2 on each file's own stream")
    print(f"{'file':40s} " + " ".join(f"{n:>11s}" for n in LINEARS) + f" {'mean':>8s}")
    for f in args.files:
        t0 = time.monotonic()
        e = relative_errors(args.src, f, windows, layers)
        per = {n: float(np.mean([e[(L, n)] for L in layers])) for n in LINEARS}
        mean = float(np.mean(list(e.values())))
        print(f"{f.name[:40]:40s} " + " ".join(f"{per[n]:11.4f}" for n in LINEARS)
              + f" {mean:8.4f}   ({time.monotonic() - t0:.0f} s)", flush=True)
        if args.per_layer:
            for L in layers:
                print(f"  layer {L:3d} {'':28s} " + " ".join(f"{e[(L, n)]:11.4f}" for n in LINEARS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
