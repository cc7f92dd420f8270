"""Prompt / decode speed of a GGUF file through the patched ``llama-bench`` (one process per file).

    s = bench_speed("q.gguf", threads=2, reps=1, pp=0, tg=32)      # s.tg = decode tokens/s

``pp = 0`` skips prompt processing (the decode figure alone is the cheap one).  llama-bench's JSON
output is parsed; a failing run raises EvalError naming the file.  bench/runtime.py measures the
same way and also records peak RSS (through a launcher process).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from .. import tools
from .run import EvalError


@dataclass(frozen=True)
class Speed:
    pp: float          # prompt tokens/s (nan when pp = 0)
    tg: float          # decode tokens/s (nan when tg = 0)
    tg_std: float      # llama-bench's standard deviation over the repetitions
    threads: int
    reps: int
    load1: float = math.nan   # 1-minute load average when the run started (os.getloadavg)


def busy_cpu(load1: float, slack: float = 0.5) -> bool:
    """True when more threads wanted the CPU than it has cores (other jobs were running):
    llama.cpp's spinning worker threads then make decode figures unreliable (seen on the shared
    2-core machine: the same tiny model decoded at 2 or at 9000 tokens/s)."""
    return math.isfinite(load1) and load1 > (os.cpu_count() or 1) + slack


def bench_speed(model: str | os.PathLike, threads: int = 2, reps: int = 1, pp: int = 0, tg: int = 32,
                timeout: float | None = 900, extra: list[str] | None = None) -> Speed:
    """One ``llama-bench -m MODEL -p PP -n TG -r REPS -t THREADS -o json`` run; ``extra``: more
    llama-bench options (``--lrq-adapter FILE``, ``--lrq-layers MAP``)."""
    model = Path(model)
    if not model.is_file():
        raise EvalError(f"{model}: no such model file")
    if pp <= 0 and tg <= 0:
        raise EvalError("bench_speed: nothing to measure (pp and tg are both 0)")
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = math.nan
    try:
        proc = tools.run("llama-bench", ["-m", model, "-p", max(pp, 0), "-n", max(tg, 0), "-r", reps,
                                         "-t", threads, "-o", "json", *(extra or [])], timeout=timeout)
        res = json.loads(proc.stdout)
    except (tools.ToolError, json.JSONDecodeError, OSError) as e:
        raise EvalError(f"llama-bench on {model}: {e}") from None
    pp_ts = tg_ts = tg_sd = math.nan
    for r in res:
        if pp > 0 and r.get("n_prompt") == pp and r.get("n_gen") == 0:
            pp_ts = float(r["avg_ts"])
        if tg > 0 and r.get("n_gen") == tg and r.get("n_prompt") == 0:
            tg_ts, tg_sd = float(r["avg_ts"]), float(r.get("stddev_ts", math.nan))
    if (pp > 0 and math.isnan(pp_ts)) or (tg > 0 and math.isnan(tg_ts)):
        raise EvalError(f"llama-bench on {model}: no pp{pp} / tg{tg} result in its JSON output")
    return Speed(pp_ts, tg_ts, tg_sd, threads, reps, load1)
