"""Speed of the LRQ CPU mat-mul kernels (lrq._native.kernels.mul_mat), single thread.

    .venv/bin/python bench/kernels.py [--bits 2] [--group-size 64] [--mode asym] [--tokens 1 16]
    .venv/bin/python bench/kernels.py --two-level [--tokens 1 16]

For each weight shape (SmolLM2-135M's attention-ish 1536x576 -- n_out x n_in -- and
Qwen2.5-1.5B's ffn_up-sized 8960x1536) it prints the time per call and tokens/s of the fast path
(int8 activations, AVX2 when available) and of the double-precision reference, and the
speed-up.  Times include the Python call and the per-call activation quantization (what a
ggml op would pay once per batch).  No assertions: numbers depend on the machine.

--two-level: the fast path of the two-level 2-bit layout (format v4; super-blocks of 256,
sub-blocks of 16 or 32) against single-level LRQ2 asym g64 and g32, on the same weights and
activations.  The layouts are timed round-robin (each round times every layout once; the best
round is kept), so that a load change during the run hits all of them; the 1-minute load
average is printed before and after, and the figures are marked busy when it exceeds the
machine's core count.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from lrq import _native

K = _native.kernels
SHAPES = [(1536, 576), (8960, 1536)]


def _time(fn, min_time: float, max_reps: int) -> float:
    """Median seconds per call over repetitions lasting at least min_time in total."""
    fn()                                       # warm caches / page in
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# (label, bits per weight on 576-wide rows, quantizer, mul_mat keyword arguments)
def _layouts(w: np.ndarray):
    from lrq import quant_two_level as tl
    out = []
    for g in (64, 32):
        codes, d, m = K.quantize(w, 2, g, "asym", "minmax")
        out.append((f"LRQ2 g{g}", 2 + 32 / g, dict(codes=codes, d=d, m=m, bits=2, group_size=g, mode="asym")))
    for B in (16, 32):
        codes, d, dmin, sub = K.quantize_two_level(w, 256, B)
        out.append((f"two-level S256 B{B}", tl.bpw(w.shape[1], 256, B),
                    dict(codes=codes, d=d, m=dmin, bits=2, group_size=256, mode="asym", sub=sub)))
    return out


def two_level(args) -> None:
    rng = np.random.default_rng(0)
    ncpu = os.cpu_count() or 1
    load0 = os.getloadavg()[0]
    print(f"two-level vs single-level LRQ2, fast path = {K.info()['simd']}, 1 thread; "
          f"load average (1 min) {load0:.2f} on {ncpu} cores")
    hdr = f"{'n_out x n_in':>13} {'tokens':>6} {'layout':>18} {'bpw':>6} {'ms/call':>9} {'tokens/s':>10} {'vs g64':>7}"
    print(hdr)
    print("-" * len(hdr))
    for n_out, n_in in SHAPES:
        w = (rng.standard_normal((n_out, n_in)) * 0.02).astype(np.float32)
        lays = _layouts(w)
        for n_tok in args.tokens:
            x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
            best = {lab: float("inf") for lab, _, _ in lays}
            for _ in range(args.rounds):
                for lab, _, kw in lays:
                    t = _time(lambda kw=kw: K.mul_mat(x=x, impl="fast", **kw), args.min_time / args.rounds, 1000)
                    best[lab] = min(best[lab], t)
            base = best["LRQ2 g64"]
            for lab, b, _ in lays:
                t = best[lab]
                print(f"{f'{n_out}x{n_in}':>13} {n_tok:>6} {lab:>18} {b:6.3f} {t * 1e3:9.3f} {n_tok / t:10.1f} "
                      f"{t / base:6.2f}x")
    load1 = os.getloadavg()[0]
    busy = max(load0, load1) > ncpu
    print(f"load average (1 min) after: {load1:.2f}" + ("  -> BUSY: the figures are not speed figures of this "
                                                          "machine; compare only within a row group" if busy else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--mode", default="asym")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per measurement")
    ap.add_argument("--two-level", action="store_true",
                    help="compare the two-level layout's fast path with LRQ2 g64 / g32 (module doc)")
    ap.add_argument("--rounds", type=int, default=5, help="--two-level: round-robin rounds (best kept)")
    args = ap.parse_args()
    if args.two_level:
        two_level(args)
        return

    rng = np.random.default_rng(0)
    print(f"LRQ{args.bits} {args.mode} g{args.group_size}, fast path = {K.info()['simd']}, 1 thread")
    hdr = f"{'n_out x n_in':>13} {'tokens':>6} {'impl':>5} {'ms/call':>9} {'tokens/s':>10} {'speed-up':>8}"
    print(hdr)
    print("-" * len(hdr))
    for n_out, n_in in SHAPES:
        w = (rng.standard_normal((n_out, n_in)) * 0.02).astype(np.float32)
        codes, d, m = K.quantize(w, args.bits, args.group_size, args.mode, "minmax")
        for n_tok in args.tokens:
            x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
            res = {}
            for impl in ("fast", "ref"):
                def call(impl=impl):
                    K.mul_mat(codes, d, m, args.bits, args.group_size, args.mode, x, impl=impl)
                # the reference is ~100x slower: fewer repetitions
                res[impl] = _time(call, args.min_time, 1000 if impl == "fast" else 5)
            for impl in ("fast", "ref"):
                t = res[impl]
                up = f"{res['ref'] / t:7.1f}x" if impl == "fast" else ""
                print(f"{f'{n_out}x{n_in}':>13} {n_tok:>6} {impl:>5} {t * 1e3:9.3f} {n_tok / t:10.1f} {up:>8}")


if __name__ == "__main__":
    main()
