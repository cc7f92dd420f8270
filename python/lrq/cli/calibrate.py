"""lrq-calibrate: fit the per-replica parameters of an LRQ file on calibration text.

Examples:
    lrq-calibrate smol.lrq.gguf smol.cal.lrq.gguf --source SmolLM2-135M-Instruct.Q4_1.gguf \\
        --text sotu-calib --tokens 4096
    lrq-calibrate in.gguf out.gguf --source src.gguf --text my-text.txt --granularity group --steps 100
    lrq-calibrate in.gguf out.gguf --source src.gguf --lowrank 8      # + rank-8 corrections (format v3)
    lrq-calibrate smol.IQ2_XS.gguf --adapter smol.adapter.gguf --source smol.f32.gguf --plan last-8
        # an unchanged stock GGUF + an adapter (schedule and fitted parameters, docs/FORMAT.md 11)
    lrq-calibrate in.gguf out.gguf --source src.gguf --resume cal-state/
        # killed? the same command again goes on at the first unfinished layer
    lrq-calibrate moe.entries.gguf moe.cal.gguf --source moe.f32.gguf --tokens 2048 --window 256
        # a MoE file with expert-replication entries (lrq-select --moe): per-expert fit

Codes stay frozen.  Block by block, every replica the schedule runs (replica 0 included) gets
scale multipliers, grid offsets, gains and biases fitted with Adam so that the quantized layer,
fed the quantized model's own residual stream, reproduces the full-precision model's residual
stream after that layer (MSE).  A replicated layer keeps its replicas only when they beat
replica 0 alone (extra serial replicas otherwise get gain 0 on attn_output and ffn_down).
--lowrank K adds to every calibrated linear of every replica a rank-K correction U (V x)
(docs/FORMAT.md 6.2), initialised from the truncated SVD of its activation-weighted quantization
error and trained with the other parameters; it costs 16 K (n_out + n_in) bits per linear and
replica (SmolLM2, K = 8: +0.37 bpw in the block linears, +0.29 whole file).
--source is the plain GGUF the LRQ file was converted from (the full-precision reference is its
float32 dequantization).  Never calibrate on the text you evaluate on.
--adapter OUT leaves IN untouched — a stock GGUF of any type llama-quantize makes, or an LRQ file
without replica tensors — runs it with --plan (a preset, plan file or layer map such as
0..15,11..29; default none: each layer once, gain / bias / clip per linear) and writes only the
schedule and the fitted parameters, bound to IN by name, type, shape and CRC-32: load it with
--lrq-adapter OUT in the patched llama.cpp tools, Model(IN, adapter=OUT) or lrq-eval --adapter.
--resume DIR keeps every finished layer's fitted parameters in DIR (written atomically, with a
manifest of the inputs and options); the same command again, after a kill at any point, loads
them, reruns those layers with them to rebuild the stream and fits on from the first unfinished
layer.  The output is byte-identical to an uninterrupted run's.  Other options or other input
files are refused, naming what differs.  DIR is kept after success (remove it when done).
A mixture-of-experts file with expert-replication entries (docs/moe.md) is calibrated per expert
instead: on the calibration tokens routed to each listed expert, per-output-channel gains and
biases of its replica fitted by least squares to the source's expert (lrq.calib.experts); of the
options only --text, --tokens, --window and --threads apply there.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from ._job import run_job


def _floats(s: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{s}' is not a comma-separated list of numbers") from None


def build_parser() -> argparse.ArgumentParser:
    from ..calib.calibrate import LOSSES
    from ..calib.replica import PARAMS
    ap = argparse.ArgumentParser(prog="lrq-calibrate", description=__doc__.splitlines()[0],
                                 epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", metavar="IN.gguf", help="LRQ file to calibrate (with --adapter: the base, any GGUF)")
    ap.add_argument("out", metavar="OUT.lrq.gguf", nargs="?", default=None,
                    help="calibrated LRQ file (written atomically); not with --adapter")
    ap.add_argument("--adapter", metavar="OUT.gguf", default=None,
                    help="write an adapter for the unchanged IN instead of a whole file (docs/FORMAT.md 11)")
    ap.add_argument("--plan", default=None, metavar="PRESET|FILE|MAP",
                    help="with --adapter: the schedule of IN + adapter (none, all, last-N, progressive, a "
                         ".json / .yaml plan or a layer map; default none)")
    ap.add_argument("--source", required=True, metavar="SRC.gguf",
                    help="the plain GGUF IN was converted from (full-precision reference)")
    ap.add_argument("--text", default="sotu-calib", metavar="NAME|FILE",
                    help="calibration text: bundled name or a text file (default sotu-calib)")
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    ap.add_argument("--window", type=int, default=512, help="tokens per window (default 512)")
    ap.add_argument("--steps", type=int, default=50, help="Adam steps per layer and candidate (default 50)")
    ap.add_argument("--batch-windows", type=int, default=1, help="windows per Adam step (default 1)")
    ap.add_argument("--granularity", choices=("channel", "group"), default="channel",
                    help="scale_mult / grid_offset per output channel [n_out,1] (default) or per "
                         "group [n_out,n_groups]")
    ap.add_argument("--params", default=",".join(PARAMS),
                    help=f"replica parameters to fit (default {','.join(PARAMS)})")
    ap.add_argument("--lr", type=float, default=5e-3, help="Adam lr of scale_mult and gain (default 5e-3)")
    ap.add_argument("--lr-offset", type=float, default=2e-2, help="Adam lr of grid_offset, code units (default 2e-2)")
    ap.add_argument("--lr-bias", type=float, default=1e-3, help="Adam lr of bias (default 1e-3)")
    ap.add_argument("--serial-init", choices=("zero", "split", "both"), default="both",
                    help="start of extra serial replicas: zero (exact no-op), split (1/n of the "
                         "update each) or both, keeping the better (default both)")
    ap.add_argument("--act-clip-grid", type=_floats, default=(), metavar="C1,C2,...",
                    help="activation clip ratios to try per linear (e.g. 0.99,0.97,0.95); off by default")
    ap.add_argument("--start-layer", type=int, default=0,
                    help="layers below this keep their parameters and are only run (resume)")
    ap.add_argument("--loss", choices=LOSSES, default="mse",
                    help="block-wise loss: mse (residual stream, dominated by attention-sink "
                         "tokens) or token (each token's error relative to its own norm); "
                         "default mse")
    ap.add_argument("--lowrank", type=int, default=0, metavar="K",
                    help="rank of a low-rank correction per linear and replica, 0..64 (default 0: "
                         "none added; factors the file has are kept and trained)")
    ap.add_argument("--lr-lowrank", type=float, default=1e-3,
                    help="Adam lr of the low-rank factors (default 1e-3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", metavar="DIR", default=None,
                    help="keep finished layers in DIR and go on from there when rerun (created if "
                         "missing; see above)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (default: torch's choice; 1 is faster on a busy machine)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if (args.out is None) == (args.adapter is None):
        ap.error("give either OUT.lrq.gguf or --adapter OUT.gguf (one output)")
    if args.plan is not None and args.adapter is None:
        ap.error("--plan goes with --adapter (an LRQ file is calibrated with its own schedule)")
    out = args.adapter if args.adapter is not None else args.out
    import torch

    from ..calib import CalibError
    from ..calib.calibrate import CalibrateOptions, calibrate
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    opts = CalibrateOptions(text=args.text, n_tokens=args.tokens, window=args.window,
                            steps=args.steps, batch_windows=args.batch_windows,
                            granularity=args.granularity,
                            params=tuple(p.strip() for p in args.params.split(",") if p.strip()),
                            lr=args.lr, lr_offset=args.lr_offset, lr_bias=args.lr_bias,
                            serial_init=args.serial_init, act_clip_grid=args.act_clip_grid,
                            seed=args.seed, progress=not args.quiet, start_layer=args.start_layer,
                            loss=args.loss, lowrank=args.lowrank, lr_lowrank=args.lr_lowrank,
                            resume=args.resume)
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr))
    if args.adapter is None and _has_expert_entries(args.src):
        return _calibrate_experts(ap, args, out)
    return run_job("lrq-calibrate", out,
                   lambda: calibrate(args.src, out, args.source, opts, log=log, plan=args.plan,
                                     adapter=args.adapter is not None),
                   (CalibError,), args.quiet)


# the options of the block-wise Adam fit, which the per-expert least-squares fit has no use for
_ADAM_ONLY = ("steps", "batch_windows", "granularity", "params", "lr", "lr_offset", "lr_bias",
              "serial_init", "act_clip_grid", "start_layer", "loss", "lowrank", "lr_lowrank", "seed",
              "resume")


def _has_expert_entries(path: str) -> bool:
    """Whether ``path`` is an LRQ file with expert-replication entries (anything unreadable is
    left to the dense calibrator, which names what is wrong with it)."""
    from ..lrq_file import LRQModelFile
    try:
        f = LRQModelFile(path)
    except Exception:       # noqa: BLE001 - reported by calibrate()'s own checks
        return False
    try:
        return bool(f.expert_entries)
    finally:
        f.close()


@dataclass
class _ExpertSummary:
    output: str
    n_tensors: int
    n_tokens: int

    def lines(self) -> list[str]:
        return [f"wrote {self.output}: {self.n_tensors} per-expert gain / bias tensors fitted on "
                f"{self.n_tokens} calibration tokens"]


def _calibrate_experts(ap: argparse.ArgumentParser, args, out: str) -> int:
    from ..calib import CalibError
    from ..calib.experts import ExpertCalibError, calibrate_experts
    from ..lrq_file import LRQFileError
    from ..model_file import ModelFileError
    from ..select import SelectError
    given = [k for k in _ADAM_ONLY if getattr(args, k) != ap.get_default(k)]
    if given:
        flag = "--" + given[0].replace("_", "-")
        print(f"lrq-calibrate: error: {args.src} has expert-replication entries, fitted per expert by "
              f"least squares: {flag} does not apply (only --text, --tokens, --window, --threads)",
              file=sys.stderr)
        return 2

    def job():
        if Path(out).resolve() == Path(args.src).resolve():
            raise CalibError(f"{out}: the output would overwrite the input")
        t = calibrate_experts(args.src, out, args.source, args.text, args.tokens, args.window)
        return _ExpertSummary(out, len(t), args.tokens)
    return run_job("lrq-calibrate", out, job,
                   (CalibError, ExpertCalibError, SelectError, ModelFileError, LRQFileError), args.quiet)


if __name__ == "__main__":
    sys.exit(main())
