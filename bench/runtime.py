#!/usr/bin/env python3
"""Decode and prompt speed of LRQ files against stock llama.cpp types, side by side in one run.

    .venv/bin/python bench/runtime.py                          # SmolLM2, 2 threads
    .venv/bin/python bench/runtime.py --model qwen2.5-1.5b     # rows that take true Q2_K
    .venv/bin/python bench/runtime.py --short                  # the demo's compact table

For one model and thread count it builds (cached under --work): LRQ 2-bit asym g64 with the
schedules none, all, last-8 serial and last-8 parallel, and stock Q2_K, Q4_0 and F32 made by the
same build's llama-quantize from the F32 reference. Each file runs in its own `llama-bench`
process (pp512 and tg128), in --reps rounds that run every file once; the table gives tokens/s, each as a ratio to stock
Q2_K, file size, whole-file bits per weight and the process's peak RSS, and decode as achieved GB/s
of weights read (bench/bandwidth.py's bytes per token x tokens/s) and as a fraction of the
machine's read bandwidth, probed with the same threads right before each run (bench/bandwidth.py;
on this virtual machine it moves between ~30 and ~55 GB/s within minutes). Each speed is given as
median (min-max) over the rounds, and the 1-minute load average is read before and
after every llama-bench process: when it exceeds the machine's core count the run is marked BUSY
and no ratio is printed for it (a figure from a busy machine is not a speed of the machine).
Nothing is asserted: targets are reported in docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lrq import assets, tools
from lrq.convert import ConvertError, ConvertOptions, convert
from lrq.eval.bpw import file_bpw
from lrq.eval.stock import make_stock, reference_f32

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bandwidth import bytes_per_token, probe  # noqa: E402  (bench/bandwidth.py: one probe, one byte count)

STOCK = ("Q2_K", "Q4_0", "F32")
PROBE_MIB, PROBE_REPS = 1024, 3       # one probe: the best of 3 reads of 1 GiB (~0.1 s)
LRQ_PLANS = {"none": "none", "all": "all", "last-8 serial": "last-8", "last-8 parallel": None}


@dataclass
class Row:
    name: str
    path: Path | None
    pp: float | None = None
    tg: float | None = None
    rss_mib: float | None = None
    size_mib: float | None = None
    bpw: float | None = None
    gbs: float | None = None          # decode: GB/s of weights read
    pp_range: tuple[float, float] = (0.0, 0.0)   # min, max over the repetitions
    tg_range: tuple[float, float] = (0.0, 0.0)
    load: float = 0.0                 # highest 1-minute load average seen around the run
    bytes: int = 0                    # weight bytes a decode step reads (bench/bandwidth.py)
    limit: float = 0.0                # median read bandwidth probed beside this row's runs, GB/s
    error: str = ""


def parallel_plan(n_layer: int, last: int, work: Path) -> Path:
    """A plan file running each of the last ``last`` layers as a parallel pair (mean)."""
    p = work / f"plan-last{last}-parallel-{n_layer}.json"
    layers = {str(i): {"replicas": 2, "mode": "parallel"} for i in range(n_layer - last, n_layer)}
    p.write_text(json.dumps({"layers": layers}))
    return p


def lrq_file(src: Path, name: str, plan: str, work: Path) -> Path:
    out = work / f"{src.stem}.lrq2-g64.{name.replace(' ', '-')}.gguf"
    if not out.exists():
        convert(src, out, ConvertOptions(bits=2, group_size=64, plan=plan, grid_offset=0.5, progress=False))
    return out


# Peak RSS is read by a small launcher process: a child forked straight from this (large) Python
# process would inherit its RSS high-water mark, since Linux keeps ru_maxrss across fork and exec.
_LAUNCHER = """
import os, subprocess, sys
p = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(p.pid, 0)
sys.stderr.write("LRQ_PEAK_RSS_KB=%d\\n" % usage.ru_maxrss)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _stats(rec: dict) -> tuple[float, float, float]:
    """(median, min, max) tokens/s of one llama-bench test over its repetitions."""
    xs = rec.get("samples_ts") or [rec["avg_ts"]]
    return statistics.median(xs), min(xs), max(xs)


# --env KEY=VALUE: set for every llama-bench process (an A/B of a run-time switch such as
# LRQ_NO_LOCKSTEP=1 or LRQ_NO_AVX512=1, one run with it, one without)
BENCH_ENV: dict[str, str] = {}


def llama_bench(model: Path, threads: int, reps: int, pp: int, tg: int):
    """((pp median, min, max), (tg median, min, max), peak RSS MiB) from one llama-bench process."""
    cmd = [str(tools.tool("llama-bench")), "-m", str(model), "-p", str(pp), "-n", str(tg),
           "-r", str(reps), "-t", str(threads), "-o", "json"]
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, text=True,
                          env={**os.environ, **BENCH_ENV})
    if proc.returncode != 0:
        tail = " / ".join(proc.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"llama-bench exited with {proc.returncode}: {tail}")
    rss_kb = int(re.search(r"LRQ_PEAK_RSS_KB=(\d+)", proc.stderr).group(1))
    res = json.loads(proc.stdout)
    pp_ts = _stats(next(r for r in res if r["n_prompt"] == pp and r["n_gen"] == 0))
    tg_ts = _stats(next(r for r in res if r["n_gen"] == tg and r["n_prompt"] == 0))
    return pp_ts, tg_ts, rss_kb / 1024.0


def measure(rows: list[Row], args) -> None:
    """--reps rounds; in each round every file runs once (its own llama-bench process, one
    repetition), right after a read-bandwidth probe with the same threads.  Interleaving the files
    makes drift of the machine (a virtual machine's memory bandwidth moves by tens of per cent
    over minutes) hit every row alike, and each row's fraction of the limit uses the probes taken
    beside its own runs."""
    try:
        from tqdm import tqdm
        bar = tqdm(total=args.reps * sum(r.path is not None for r in rows), desc="llama-bench", leave=False)
    except ImportError:
        bar = None
    samples: dict[str, dict[str, list[float]]] = {r.name: {"pp": [], "tg": [], "lim": []} for r in rows}
    for row in rows:
        if row.path is None:
            continue
        try:
            row.size_mib = row.path.stat().st_size / 2**20
            row.bpw = file_bpw(row.path).bpw
            row.bytes = bytes_per_token(row.path, None)
        except (OSError, ValueError) as e:
            row.error = str(e)
    for _ in range(args.reps):
        for row in rows:
            if row.path is None or row.error:
                continue
            s = samples[row.name]
            try:
                load0 = os.getloadavg()[0]
                s["lim"].append(max(probe(PROBE_MIB, args.threads, PROBE_REPS)))
                (pp, *_), (tg, *_), rss = llama_bench(row.path, args.threads, 1, args.pp, args.tg)
                s["pp"].append(pp)
                s["tg"].append(tg)
                row.rss_mib = max(row.rss_mib or 0.0, rss)
                row.load = max(row.load, load0, os.getloadavg()[0])
            except (RuntimeError, OSError, ValueError) as e:
                row.error = str(e)
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    for row in rows:
        s = samples[row.name]
        if row.error or not s["tg"]:
            continue
        row.pp, row.pp_range = statistics.median(s["pp"]), (min(s["pp"]), max(s["pp"]))
        row.tg, row.tg_range = statistics.median(s["tg"]), (min(s["tg"]), max(s["tg"]))
        row.limit = statistics.median(s["lim"])
        row.gbs = row.bytes * row.tg / 1e9


def busy(row: Row) -> bool:
    return row.load > (os.cpu_count() or 1)


def table(rows: list[Row], model: str, args, short: bool) -> str:
    base = next((r for r in rows if r.name == "stock Q2_K" and r.tg), None)
    any_busy = any(busy(r) for r in rows if r.tg)

    def ratio(v, b):
        # no ratio at all when any run of the table was busy: both sides must be quiet
        return f"{v / b:5.2f}x" if v and b and not any_busy else "    -"

    def rng(v, r):
        return f"{v:.1f} ({r[0]:.1f}-{r[1]:.1f})"

    lims = [r.limit for r in rows if r.limit]
    head = (f"model {model}, {args.threads} threads, llama-bench pp{args.pp} / tg{args.tg}, "
            f"{args.reps} rounds (every file once per round); ratios to stock Q2_K; read bandwidth "
            f"probed before every run: {min(lims, default=0):.1f}-{max(lims, default=0):.1f} GB/s "
            f"(row medians); 'of limit' = a row's GB/s over its own probes' median")

    def frac(r):
        return f"{100 * r.gbs / r.limit:5.1f}%" if r.gbs and r.limit > 0 else "    -"

    loads = [r.load for r in rows if r.tg]
    head += (f"\n1-minute load average during the runs: {min(loads, default=0):.2f}-{max(loads, default=0):.2f} "
             f"on {os.cpu_count()} cores")
    if any_busy:
        head += " -- BUSY: these figures are not speeds of this machine, no ratio is given"
    if BENCH_ENV:
        head += "; environment " + " ".join(f"{k}={v}" for k, v in BENCH_ENV.items())
    lines = [head]
    if short:
        lines.append(f"{'file':25s} {'bpw':>5s} {'tg t/s':>8s} {'tg/Q2_K':>8s} {'GB/s':>6s} {'of limit':>8s}")
        for r in rows:
            if r.error:
                lines.append(f"{r.name:25s} error: {r.error[:90]}")
            elif r.tg:
                lines.append(f"{r.name:25s} {r.bpw:5.2f} {r.tg:8.1f} {ratio(r.tg, base and base.tg):>8s} "
                             f"{r.gbs:6.2f} {frac(r):>8s}")
        return "\n".join(lines)
    lines.append(f"{'file':25s} {'MiB':>7s} {'bpw':>5s} {'pp t/s median (min-max)':>24s} {'pp/Q2_K':>8s} "
                 f"{'tg t/s median (min-max)':>24s} {'tg/Q2_K':>8s} {'GB/s':>6s} {'of limit':>8s} "
                 f"{'peak RSS MiB':>13s} {'load':>5s}")
    for r in rows:
        if r.error:
            lines.append(f"{r.name:25s} error: {r.error[:100]}")
            continue
        lines.append(f"{r.name:25s} {r.size_mib:7.1f} {r.bpw:5.2f} {rng(r.pp, r.pp_range):>24s} "
                     f"{ratio(r.pp, base and base.pp):>8s} {rng(r.tg, r.tg_range):>24s} "
                     f"{ratio(r.tg, base and base.tg):>8s} {r.gbs:6.2f} {frac(r):>8s} "
                     f"{r.rss_mib:13.0f} {r.load:5.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a bundled model name or a GGUF path")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--work", type=Path, default=Path("out/bench"))
    ap.add_argument("--short", action="store_true", help="compact table (decode only)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="environment variable for every llama-bench process (repeatable)")
    args = ap.parse_args(argv)
    for kv in args.env:
        key, sep, value = kv.partition("=")
        if not sep or not key:
            ap.error(f"--env {kv!r}: expected KEY=VALUE")
        BENCH_ENV[key] = value

    src = assets.path(args.model) if args.model in assets.ASSETS else Path(args.model)
    args.work.mkdir(parents=True, exist_ok=True)
    ref = reference_f32(src, args.work)
    rows: list[Row] = []
    for name, plan in LRQ_PLANS.items():
        try:
            if plan is None:
                from lrq.model_file import open_model
                plan = str(parallel_plan(open_model(src).hparams["n_layer"], 8, args.work))
            rows.append(Row(f"LRQ2 g64 {name}", lrq_file(src, name, plan, args.work)))
        except ConvertError as e:
            rows.append(Row(f"LRQ2 g64 {name}", None, error=str(e)))
    for qtype in STOCK:
        rows.append(Row(f"stock {qtype}", ref if qtype == "F32" else make_stock(ref, qtype, work=args.work)))
    measure(rows, args)
    print(table(rows, src.name, args, args.short))
    return 0


if __name__ == "__main__":
    sys.exit(main())
