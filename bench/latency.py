#!/usr/bin/env python3
"""Latency across prompt lengths: time to first token and decode speed after the prompt, LRQ
schedules against stock 2-bit types, with llama.cpp's own KV-cache quantization, and the memory
each configuration needs split into weights / KV cache / compute buffers.

    flock /tmp/lrq-heavy.lock .venv/bin/python bench/latency.py                      # SmolLM2
    flock /tmp/lrq-heavy.lock .venv/bin/python bench/latency.py --model qwen2.5-1.5b --reps 1

Files (cached under --work): LRQ 2-bit asym g64 with the schedules none, "selected" (the last 8
layers replicated serially, bench/runtime.py's plan) and all, and stock Q2_K and IQ2_XS (with an
importance matrix of sotu-calib) made by the same build's llama-quantize from the F32 reference.
For each file and KV-cache type (f16, q8_0, q4_0 for both K and V; flash attention on for all, as
llama.cpp needs it for a quantized V cache):

* **time to first token** at prompt lengths P: ``llama-bench -p P -n 0`` gives prompt tokens/s,
  TTFT = P / (tokens/s) (the prompt's whole batch; sampling the first token is negligible);
* **decode tokens/s after a prompt of P tokens**: ``llama-bench -p 0 -n TG -d P`` (the KV cache
  holds P tokens when the timed decode starts);
* **memory** at a context of max(P) + TG: the buffers llama.cpp reports when it loads the file
  (``llama-completion -v``; lrq.search.measure.memory_split): weights (model buffers, including
  repacked copies), KV cache, compute and output buffers.

Every llama-bench figure is min / median / max over --reps processes' averages (each process runs
llama-bench's own repetitions once, so the spread covers process start and page cache state), with
the 1-minute load average when each file's runs started; a row whose load exceeded the core
count is marked busy, and no ratio is printed from a busy row. Nothing is asserted: targets are
reported in docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lrq import assets, tools
from lrq.eval.speed import busy_cpu
from lrq.eval.stock import make_imatrix, make_stock, reference_f32
from lrq.search.measure import memory_split

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime import lrq_file  # noqa: E402  (bench/runtime.py: the same LRQ files and plans)

PROMPTS = (128, 512, 2048, 4096)
KV_TYPES = ("f16", "q8_0", "q4_0")
LRQ_PLANS = {"none": "none", "selected (last 8)": "last-8", "all": "all"}
STOCK = ("Q2_K", "IQ2_XS")


@dataclass
class Cell:
    """min / median / max of one figure over the repetitions."""
    values: list[float] = field(default_factory=list)

    def fmt(self, digits: int = 1) -> str:
        v = [x for x in self.values if math.isfinite(x)]
        if not v:
            return "–"
        med = statistics.median(v)
        return f"{med:.{digits}f} ({min(v):.{digits}f}–{max(v):.{digits}f})" if len(v) > 1 else f"{med:.{digits}f}"

    def median(self) -> float:
        v = [x for x in self.values if math.isfinite(x)]
        return statistics.median(v) if v else math.nan


@dataclass
class Result:
    file: str
    kv: str
    ttft_ms: dict[int, Cell] = field(default_factory=dict)
    tg: dict[int, Cell] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    load1: list[float] = field(default_factory=list)
    error: str = ""


def bench_json(model: Path, args: list[str], timeout: float) -> list[dict]:
    proc = tools.run("llama-bench", ["-m", model, *args, "-o", "json"], timeout=timeout)
    return json.loads(proc.stdout)


def measure(name: str, path: Path, kv: str, a) -> Result:
    res = Result(name, kv, {p: Cell() for p in a.prompts}, {p: Cell() for p in a.prompts})
    common = ["-t", a.threads, "-r", 1, "-ctk", kv, "-ctv", kv, "-fa", "on"]
    plist = ",".join(str(p) for p in a.prompts)
    try:
        for _ in range(a.reps):
            res.load1.append(os.getloadavg()[0])
            for r in bench_json(path, ["-p", plist, "-n", 0, *common], a.timeout):
                if r.get("n_gen") == 0 and r.get("n_prompt") in res.ttft_ms:
                    res.ttft_ms[r["n_prompt"]].values.append(1000.0 * r["n_prompt"] / float(r["avg_ts"]))
            for r in bench_json(path, ["-p", 0, "-n", a.tg, "-d", plist, *common], a.timeout):
                if r.get("n_gen") == a.tg and r.get("n_depth") in res.tg:
                    res.tg[r["n_depth"]].values.append(float(r["avg_ts"]))
        proc = tools.run("llama-completion", ["-m", path, "-c", max(a.prompts) + a.tg, "-n", 1, "-p", "a",
                                              "-no-cnv", "-t", a.threads, "-ctk", kv, "-ctv", kv, "-fa", "on",
                                              "-v"], timeout=a.timeout)
        res.memory = memory_split(proc.stdout + proc.stderr)
    except Exception as e:   # noqa: BLE001  (a row that fails is reported, the others still run)
        res.error = f"{type(e).__name__}: {e}"
    return res


def table(results: list[Result], a) -> str:
    ncpu = os.cpu_count() or 1
    head = " | ".join(f"TTFT {p}" for p in a.prompts) + " | " + " | ".join(f"tg @{p}" for p in a.prompts)
    out = [f"Model `{a.src.name}`, {a.threads} threads, {a.reps} repetitions (median (min–max)); TTFT in ms, "
           f"decode (tg{a.tg}) in tokens/s after a prompt of P tokens; memory in MiB at a context of "
           f"{max(a.prompts) + a.tg}.", "",
           f"| file | KV | {head} | weights | KV cache | compute + output | load avg |",
           "|---|---|" + "---:|" * (2 * len(a.prompts) + 4)]
    for r in results:
        if r.error:
            out.append(f"| {r.file} | {r.kv} | error: {r.error} |")
            continue
        busy = any(busy_cpu(x) for x in r.load1)
        m = r.memory
        out.append(f"| {r.file} | {r.kv} | " + " | ".join(r.ttft_ms[p].fmt(0) for p in a.prompts) + " | "
                   + " | ".join(r.tg[p].fmt(1) for p in a.prompts)
                   + f" | {m.get('model', math.nan):.0f} | {m.get('KV', math.nan):.0f} | "
                   + f"{m.get('compute', 0.0) + m.get('output', 0.0):.0f} | "
                   + f"{max(r.load1):.1f}{' busy' if busy else ''} |")
    # ratios to stock Q2_K with the same KV type, only between rows that were both quiet
    quiet = {(r.file, r.kv): r for r in results if not r.error and not any(busy_cpu(x) for x in r.load1)}
    lines = []
    for r in results:
        q2 = quiet.get(("stock Q2_K", r.kv))
        if (r.file, r.kv) not in quiet or q2 is None or r is q2:
            continue
        lines.append(f"| {r.file} | {r.kv} | "
                     + " | ".join(f"{q2.ttft_ms[p].median() / r.ttft_ms[p].median():.2f}" for p in a.prompts) + " | "
                     + " | ".join(f"{r.tg[p].median() / q2.tg[p].median():.2f}" for p in a.prompts) + " |")
    if lines:
        out += ["", "Speed relative to stock Q2_K with the same KV cache (> 1 is faster; quiet rows only):", "",
                "| file | KV | " + " | ".join(f"prompt {p}" for p in a.prompts) + " | "
                + " | ".join(f"decode @{p}" for p in a.prompts) + " |",
                "|---|---|" + "---:|" * (2 * len(a.prompts))] + lines
    else:
        out += ["", f"No ratios: every row ran with a load average above the {ncpu} cores (busy)."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a bundled model name or a GGUF path")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="llama-bench processes per figure (default 3)")
    ap.add_argument("--tg", type=int, default=32, help="decode tokens timed after each prompt (default 32)")
    ap.add_argument("--prompts", default=",".join(map(str, PROMPTS)), help="prompt lengths (default 128,512,2048,4096)")
    ap.add_argument("--kv", default=",".join(KV_TYPES), help="KV cache types (default f16,q8_0,q4_0)")
    ap.add_argument("--files", default=None,
                    help="comma list of rows to run (default all): none, selected, all, Q2_K, IQ2_XS")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--work", type=Path, default=Path("out/bench"))
    ap.add_argument("--out", type=Path, default=None, help="also write the table and JSON rows here (a .md path)")
    a = ap.parse_args(argv)
    a.prompts = [int(x) for x in a.prompts.split(",")]
    kvs = a.kv.split(",")
    a.src = assets.path(a.model) if a.model in assets.ASSETS else Path(a.model)
    if not a.src.is_file():
        print(f"latency: {a.src}: no such model file", file=sys.stderr)
        return 1
    a.work.mkdir(parents=True, exist_ok=True)
    want = None if a.files is None else set(a.files.split(","))

    ref = reference_f32(a.src, a.work)
    files: list[tuple[str, Path]] = []
    for name, plan in LRQ_PLANS.items():
        if want is None or name.split()[0] in want:
            files.append((f"LRQ2 g64 {name}", lrq_file(a.src, name, plan, a.work)))
    for qtype in STOCK:
        if want is None or qtype in want:
            imat = make_imatrix(ref, "sotu-calib", threads=a.threads, work=a.work) if qtype.startswith("IQ") else None
            files.append((f"stock {qtype}", make_stock(ref, qtype, imatrix=imat, work=a.work)))

    try:
        from tqdm import tqdm
        jobs = tqdm([(n, p, kv) for n, p in files for kv in kvs], desc="latency", leave=False)
    except ImportError:
        jobs = [(n, p, kv) for n, p in files for kv in kvs]
    t0 = time.monotonic()
    results = [measure(n, p, kv, a) for n, p, kv in jobs]
    text = table(results, a) + f"\nWall time {(time.monotonic() - t0) / 60:.1f} min.\n"
    print(text)
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
        a.out.with_suffix(".json").write_text(json.dumps(
            [{"file": r.file, "kv": r.kv, "ttft_ms": {p: c.values for p, c in r.ttft_ms.items()},
              "tg": {p: c.values for p, c in r.tg.items()}, "memory_mib": r.memory, "load1": r.load1,
              "error": r.error} for r in results], indent=1))
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
