"""Speed of the LRQ CPU mat-mul kernels (lrq._native.kernels.mul_mat), single thread.

    .venv/bin/python bench/kernels.py [--bits 2] [--group-size 64] [--mode asym] [--tokens 1 16]
    .venv/bin/python bench/kernels.py --two-level [--tokens 1 16]
    .venv/bin/python bench/kernels.py --cpu-time [--bits 2] [--group-size 64] [--tokens 1 4]
    .venv/bin/python bench/kernels.py --replicas [--tokens 1]

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

--cpu-time: the q8 mat-mul kernels alone (activations quantized once, outside the timed loop) at
Qwen2.5-Coder-1.5B's linear shapes (q/o 1536x1536, k/v 256x1536, gate/up 8960x1536, down
1536x8960), as thread CPU seconds per call (CLOCK_THREAD_CPUTIME_ID inside the binding, no
Python in the loop): a figure that a busy machine inflates far less than wall time (only through
cache and SMT sharing).  Every kernel this CPU can run (generic, avx2, avx512) is timed
round-robin, the best of --rounds kept; the activation quantization's CPU time per call is
printed beside.  --cold: each call on another copy of the weight (copies spanning more than
the last-level cache, each called once per round, no warm-up), so that the codes stream from
memory as in a model's decode, where every linear's weights are read once per token.

--replicas: the members of a parallel group (lrq_mul_mat_q8_multi, LRQ2 asym g64) at the same
shapes, thread CPU time per call, round-robin, best of --rounds: replica 0 alone; a replica with a
per-channel grid offset (beta [n_out, 1], as lrq-convert writes a replica) alone; two members
(replica 0 and such a replica) with inputs of their own, fused and as two calls; two members that
read one input (q / k / v, gate / up of a group whose members share the block input), fused.
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


COLD_BYTES = 96 << 20     # more than this machine's 32 MiB L3 (and the L2s)
QWEN_SHAPES = [(1536, 1536), (256, 1536), (8960, 1536), (1536, 8960)]   # (n_out, n_in)


def cpu_time(args) -> None:
    rng = np.random.default_rng(0)
    impls = []
    for impl in ("generic", "avx2", "avx512"):
        try:                                   # ValueError: not in this build / not on this CPU
            K.bench_mul_mat_q8(*K.quantize(np.zeros((1, 32), np.float32), args.bits, 32, args.mode, "minmax"),
                               args.bits, 32, args.mode, np.zeros((1, 32), np.float32), impl=impl, reps=1)
            impls.append(impl)
        except ValueError:
            pass
    if not args.generic:
        impls = [i for i in impls if i != "generic"] or impls
    load0 = os.getloadavg()[0]
    print(f"LRQ{args.bits} {args.mode} g{args.group_size}: thread CPU time per call, 1 thread, best of "
          f"{args.rounds} rounds; kernels here: {', '.join(impls)} (lrq_mul_mat_q8 takes avx512 for LRQ2, single-level "
          f"or two-level, where present, else avx2); load average (1 min) {load0:.2f} "
          f"on {os.cpu_count()} cores")
    hdr = (f"{'n_out x n_in':>13} {'tokens':>6} " + " ".join(f"{i + ' us':>11}" for i in impls) +
           f" {'act us':>8} {'best/avx2':>9}")
    print(hdr)
    print("-" * len(hdr))
    for n_out, n_in in QWEN_SHAPES:
        w = (rng.standard_normal((n_out, n_in)) * 0.02).astype(np.float32)
        codes, d, m = K.quantize(w, args.bits, args.group_size, args.mode, "minmax")
        for n_tok in args.tokens:
            x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
            # about min_time / rounds seconds per measurement at ~1 ns per weight x token
            reps = max(3, int(args.min_time / args.rounds / (n_out * n_in * n_tok * 1e-9)))
            best = {i: float("inf") for i in impls}
            act = float("inf")
            if args.cold:
                copies = [(codes.copy(), d.copy(), m.copy())
                          for _ in range(max(2, int(COLD_BYTES // (codes.nbytes + d.nbytes + m.nbytes)) + 1))]
                per = {i: [] for i in impls}
                for _ in range(args.rounds):
                    for impl in impls:
                        tot = 0.0
                        for c, dd, mm in copies:
                            tot += K.bench_mul_mat_q8(c, dd, mm, args.bits, args.group_size, args.mode, x, impl=impl,
                                                      reps=1, warmup=False)["kernel_s"]
                        per[impl].append(tot / len(copies))
                best = {i: statistics.median(v) for i, v in per.items()}
                print(f"{f'{n_out}x{n_in}':>13} {n_tok:>6} " + " ".join(f"{best[i] * 1e6:11.1f}" for i in impls) +
                      f" {'':>8} {min(best.values()) / best.get('avx2', float('nan')):9.2f}  (cold, median)")
                continue
            for _ in range(args.rounds):
                for impl in impls:
                    r = K.bench_mul_mat_q8(codes, d, m, args.bits, args.group_size, args.mode, x, impl=impl,
                                           reps=reps if impl != "generic" else max(1, reps // 8))
                    best[impl] = min(best[impl], r["kernel_s"])
                    act = min(act, r["act_s"])
            ratio = min(best.values()) / best["avx2"] if "avx2" in best else float("nan")
            print(f"{f'{n_out}x{n_in}':>13} {n_tok:>6} " + " ".join(f"{best[i] * 1e6:11.1f}" for i in impls) +
                  f" {act * 1e6:8.1f} {ratio:9.2f}")
    load1 = os.getloadavg()[0]
    print(f"load average (1 min) after: {load1:.2f}")


def replicas(args) -> None:
    rng = np.random.default_rng(0)
    load0 = os.getloadavg()[0]
    print(f"LRQ2 asym g64 replicas: thread CPU time per call (us), 1 thread, best of {args.rounds} rounds; load "
          f"average (1 min) {load0:.2f} on {os.cpu_count()} cores; ratios to replica 0 alone")
    cols = ["r0", "r1", "2 own, fused", "2 own, 2 calls", "2 one input, fused"]
    hdr = f"{'n_out x n_in':>13} {'tokens':>6} " + " ".join(f"{c:>20}" for c in cols)
    print(hdr)
    print("-" * len(hdr))
    for n_out, n_in in QWEN_SHAPES:
        codes, d, m = K.quantize((rng.standard_normal((n_out, n_in)) * 0.02).astype(np.float32), 2, 64, "asym", "minmax")
        r1 = {"beta": (0.3 * rng.standard_normal((n_out, 1))).astype(np.float16)}
        for n_tok in args.tokens:
            x0, x1 = (rng.standard_normal((n_tok, n_in)).astype(np.float32) for _ in range(2))
            calls = {"r0": ([x0], [{}], True), "r1": ([x0], [r1], True), "2 own, fused": ([x0, x1], [{}, r1], True),
                     "2 own, 2 calls": ([x0, x1], [{}, r1], False), "2 one input, fused": ([x0, x0], [{}, r1], True)}
            reps = max(3, int(args.min_time / args.rounds / (n_out * n_in * n_tok * 1e-9)))
            best = {c: float("inf") for c in cols}
            for _ in range(args.rounds):
                for c in cols:
                    xs, rs, fused = calls[c]
                    best[c] = min(best[c], K.bench_mul_mat_multi(codes, d, m, 2, 64, "asym", xs, rs, fused=fused,
                                                                 reps=reps))
            print(f"{f'{n_out}x{n_in}':>13} {n_tok:>6} " +
                  " ".join(f"{best[c] * 1e6:11.1f} ({best[c] / best['r0']:.2f}x)" for c in cols))
    print(f"load average (1 min) after: {os.getloadavg()[0]:.2f}")


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
    ap.add_argument("--cpu-time", action="store_true",
                    help="thread CPU time per call of each q8 kernel at Qwen2.5-1.5B's shapes (module doc)")
    ap.add_argument("--generic", action="store_true", help="--cpu-time: also time the portable C kernel")
    ap.add_argument("--cold", action="store_true", help="--cpu-time: weights read from memory (module doc)")
    ap.add_argument("--replicas", action="store_true",
                    help="a parallel group's members in one call against one at a time (module doc)")
    args = ap.parse_args()
    if args.replicas:
        if args.tokens == [1, 16]:
            args.tokens = [1]
        replicas(args)
        return
    if args.cpu_time:
        if args.tokens == [1, 16]:
            args.tokens = [1, 4]
        cpu_time(args)
        return
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
