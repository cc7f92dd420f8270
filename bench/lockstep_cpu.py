#!/usr/bin/env python3
"""CPU time per decoded token of parallel groups with and without the lockstep order and the fused run.

    .venv/bin/python bench/lockstep_cpu.py                      # Qwen2.5-1.5B files of bench/runtime.py
    .venv/bin/python bench/lockstep_cpu.py --rounds 5 --tokens 32

The files are bench/runtime.py's LRQ2 g64 rows (none, last-8 serial, last-8 parallel; build them
with `bench/runtime.py --model qwen2.5-1.5b` first).  Each configuration decodes --tokens tokens
one at a time (one-token graphs, as llama-bench's tg) through the lrq binding with ONE thread, and
the figure is the calling thread's CPU time (time.thread_time) per token: with one thread ggml
computes on the calling thread, so loading, warm-up and everything else in the process are left
out, and no thread spins at a barrier waiting for a descheduled partner.  On a shared machine
that is the steadiest figure there is (wall time stretches with the load; the process CPU time of
`perf stat -e task-clock llama-bench -t 2` moved by seconds between identical runs at load 4-6,
most of it ggml's threads spinning at barriers).  Memory stalls still count, so other jobs'
use of the memory bus and L3 still moves it: compare rows of one run, taken interleaved in rounds.
The parallel file runs three times: as built (lockstep order, each run of the members' nodes over
the same codes in one call: lrq_mul_mat_q8_multi), with LRQ_NO_FUSE=1 (lockstep order, one node
per call) and with LRQ_NO_LOCKSTEP=1 (the built order: nothing to fuse).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from lrq import _native

FILES = {
    "none": "lrq2-g64.none",
    "last-8 serial": "lrq2-g64.last-8-serial",
    "last-8 parallel": "lrq2-g64.last-8-parallel",
}
SWITCHES = ("LRQ_NO_LOCKSTEP", "LRQ_NO_FUSE")
# (row, file key, switches set to 1)
CONFIGS = [
    ("none", "none", ()),
    ("last-8 serial", "last-8 serial", ()),
    ("last-8 parallel, lockstep + fused", "last-8 parallel", ()),
    ("last-8 parallel, LRQ_NO_FUSE=1", "last-8 parallel", ("LRQ_NO_FUSE",)),
    ("last-8 parallel, LRQ_NO_LOCKSTEP=1", "last-8 parallel", ("LRQ_NO_LOCKSTEP",)),
]


def _set_switches(on: tuple[str, ...]) -> None:
    # LRQ_NO_LOCKSTEP is read by libllama whenever it builds a graph (context creation, a new batch
    # shape), LRQ_NO_FUSE by ggml-cpu at every graph computation
    for k in SWITCHES:
        if k in on:
            os.environ[k] = "1"
        else:
            os.environ.pop(k, None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("out/bench"))
    ap.add_argument("--stem", default="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M", help="bench/runtime.py's file stem")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args(argv)

    paths = {k: args.work / f"{args.stem}.{v}.gguf" for k, v in FILES.items()}
    for k, p in paths.items():
        if not p.exists():
            ap.error(f"{p} ({k}) does not exist: run bench/runtime.py --model ... first")
    toks = np.random.default_rng(0).integers(100, 20000, size=args.tokens).astype(np.int32)
    per_tok: dict[str, list[float]] = {name: [] for name, _, _ in CONFIGS}
    load = []
    for _ in range(args.rounds):
        for name, key, on in CONFIGS:   # interleaved: drift of the machine hits every row alike
            _set_switches(on)
            model = _native.Model(str(paths[key]), n_ctx=2 * args.tokens, n_threads=1, n_batch=1)
            model.eval(toks[:2])   # first graphs built, weights paged in
            load.append(os.getloadavg()[0])
            t0 = time.thread_time()
            model.eval(toks)
            per_tok[name].append((time.thread_time() - t0) / args.tokens * 1e3)
            del model
    _set_switches(())
    base = statistics.median(per_tok["none"])
    print(f"CPU ms per decoded token (calling thread's CPU time, 1 thread, {args.tokens} one-token decodes), "
          f"median (min-max) of {args.rounds} rounds; 1-minute load {min(load):.2f}-{max(load):.2f} on "
          f"{os.cpu_count()} cores")
    print("| row | CPU ms / token | vs none |\n|---|---:|---:|")
    for name, _, _ in CONFIGS:
        v = per_tok[name]
        med = statistics.median(v)
        print(f"| {name} | {med:.1f} ({min(v):.1f}-{max(v):.1f}) | {med / base:.3f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
