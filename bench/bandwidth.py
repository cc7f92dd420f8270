#!/usr/bin/env python3
"""The machine's read bandwidth, and decode speed as a fraction of it (issue 15, item 1).

    .venv/bin/python bench/bandwidth.py                       # probe + SmolLM2's stock files
    .venv/bin/python bench/bandwidth.py --threads 2 --mib 1024 MODEL.gguf [MODEL.gguf --lrq-adapter A ...]

Probe (a STREAM-style read kernel): numpy takes the max of a buffer far larger than the caches
(--mib, default 1024 MiB) in --threads threads at once, each over its own slice (numpy releases
the GIL inside the reduction), --reps times; GB/s = bytes read / wall time of the slowest thread.
`max` is the fastest of numpy's reductions here (sum ~34 GB/s: its pairwise summation is not
free; max and a BLAS dot ~46 GB/s with 2 threads on this machine), so it is the one used.
Then each model decodes with `llama-bench -n TG -r REPS -t THREADS` (the same threads), and its
achieved weight bandwidth is bytes read per token x tokens/s: every tensor's bytes except the
token embedding, of which a token reads one row unless it is also the output head (tied
embeddings, no output.weight: read whole); a layer an LRQ schedule runs k times counts k times
(its replica tensors included, an upper bound); an adapter's tensors are added.  Reported with min / median / max and the load average before and
after; a run whose load average exceeds the cores is marked busy and gives no fraction.
Nothing is asserted: figures go to docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np


def probe(mib: int, threads: int, reps: int) -> list[float]:
    """GB/s of each repetition (read of mib MiB split over threads)."""
    buf = np.ones(mib * (1 << 20) // 8, dtype=np.float64)
    parts = np.array_split(buf, threads)
    buf.max()                                          # touch every page once
    out = []
    for _ in range(reps):
        barrier = threading.Barrier(threads + 1)
        ends = [0.0] * threads

        def work(i: int) -> None:
            barrier.wait()
            parts[i].max()
            ends[i] = time.perf_counter()

        ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for t in ts:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in ts:
            t.join()
        out.append(buf.nbytes / (max(ends) - t0) / 1e9)
    return out


def bytes_per_token(model: Path, adapter: Path | None) -> int:
    """Bytes a decode step reads: every tensor, token_embd as one row (whole again when it is the
    tied output head), plus the adapter's tensors."""
    import gguf

    from lrq.gguf_types import register
    register()                                         # LRQ type ids for gguf-py
    r = gguf.GGUFReader(str(model))
    tied = not any(t.name == "output.weight" for t in r.tensors)
    # an LRQ file's schedule runs some layers more than once: each execution reads its layer again
    field = r.fields.get("lrq.schedule.layer")
    runs: dict[int, int] = {}
    for layer in ([int(field.parts[i][0]) for i in field.data] if field is not None else []):
        runs[layer] = runs.get(layer, 0) + 1
    total = 0
    for t in r.tensors:
        if t.name == "token_embd.weight":
            total += int(t.n_bytes) // int(t.shape[1])     # the input: one row of n_vocab
            if tied:
                total += int(t.n_bytes)                     # the output head: all of it
        elif t.name.startswith("blk."):
            total += int(t.n_bytes) * runs.get(int(t.name.split(".")[1]), 1)
        else:
            total += int(t.n_bytes)
    if adapter is not None:
        total += sum(int(t.n_bytes) for t in gguf.GGUFReader(str(adapter)).tensors)
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help="GGUF files (default: SmolLM2's cached stock IQ2_XS and Q2_K files)")
    ap.add_argument("--lrq-adapter", action="append", default=[], metavar="MODEL=ADAPTER",
                    help="decode MODEL with this adapter too (repeatable)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tg", type=int, default=64)
    args = ap.parse_args(argv)

    from lrq.eval.speed import EvalError, bench_speed, busy_cpu
    cache = Path.home() / ".cache" / "lrq" / "eval"
    models = [Path(m) for m in args.models] or [cache / f"SmolLM2-135M-Instruct.Q4_1.{t}.imat.gguf"
                                                for t in ("IQ2_XS", "Q2_K")]
    runs: list[tuple[Path, Path | None]] = [(m, None) for m in models]
    for spec in args.lrq_adapter:
        m, _, a = spec.partition("=")
        runs.append((Path(m), Path(a)))
    for m, a in runs:
        if not m.is_file() or (a is not None and not a.is_file()):
            print(f"bandwidth: error: {a if m.is_file() else m}: no such file", file=sys.stderr)
            return 1

    load0 = os.getloadavg()[0]
    gbs = probe(args.mib, args.threads, args.reps)
    bw = statistics.median(gbs)
    print(f"read bandwidth ({args.threads} threads, {args.mib} MiB, {args.reps} reps): min {min(gbs):.2f} / "
          f"median {bw:.2f} / max {max(gbs):.2f} GB/s (load average {load0:.2f})")
    print(f"{'model':52s} {'MB/token':>9s} {'tg t/s':>8s} {'GB/s':>6s} {'of probe':>9s}")
    busy = busy_cpu(load0)
    for m, a in runs:
        try:
            sp = bench_speed(m, args.threads, args.reps, 0, args.tg,
                             extra=["--lrq-adapter", str(a)] if a is not None else None)
        except EvalError as e:
            print(f"bandwidth: error: {e}", file=sys.stderr)
            return 1
        busy = busy or busy_cpu(sp.load1)
        b = bytes_per_token(m, a)
        label = m.name + (f" + {a.name}" if a is not None else "")
        print(f"{label[:52]:52s} {b / 1e6:9.1f} {sp.tg:8.1f} {b * sp.tg / 1e9:6.2f} "
              f"{100 * b * sp.tg / 1e9 / bw:8.1f}%")
    load1 = os.getloadavg()[0]
    print(f"load average after: {load1:.2f}" + ("  BUSY: other jobs shared the CPU; no fraction is a "
                                                "measurement" if busy or busy_cpu(load1) else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
