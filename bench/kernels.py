"""Speed of the LRQ CPU mat-mul kernels (lrq._native.kernels.mul_mat), single thread.

    .venv/bin/python bench/kernels.py [--bits 2] [--group-size 64] [--mode asym] [--tokens 1 16]

For each weight shape (SmolLM2-135M's attention-ish 1536x576 -- n_out x n_in -- and
Qwen2.5-1.5B's ffn_up-sized 8960x1536) it prints the time per call and tokens/s of the fast path
(int8 activations, AVX2 when available) and of the double-precision reference, and the
speed-up.  Times include the Python call and the per-call activation quantization (what a
ggml op would pay once per batch).  No assertions: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--mode", default="asym")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per measurement")
    args = ap.parse_args()

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
