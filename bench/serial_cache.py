#!/usr/bin/env python3
"""Do serial replicas decode faster when a layer's executions are consecutive (its weights still
in cache) than when the same executions are far apart?  Issue 15 item 3's cache question.

    flock /tmp/lrq-heavy.lock .venv/bin/python bench/serial_cache.py                 # SmolLM2
    flock /tmp/lrq-heavy.lock .venv/bin/python bench/serial_cache.py --model qwen2.5-1.5b

One file, three layer maps (``--lrq-layers``, FORMAT.md 7.1), so the weights, the arithmetic and
the KV cache are identical between the two replicated maps and only the order differs:

* ``once``: every layer once (the file's own schedule), the baseline;
* ``consecutive``: each chosen layer twice in a row (``0,0,1,1,...``): the second execution reads
  weights the first has just read;
* ``separated``: the whole pass, then the chosen layers again (``0..N-1,0..K``): by the time a
  layer runs again, every other layer's weights have gone through the cache.

The files are the stock Q2_K file made from the F32 reference and LRQ 2-bit g64 with no replicas
(bench/runtime.py's). Decode tokens/s by llama-bench, the maps interleaved in each round
(once, consecutive, separated, once, ...) so that drift of the machine hits all three alike;
min / median / max over --rounds processes, the load average of each round, a round with a load
above the core count marked busy. The cost of the extra executions is reported as (t_map -
t_once) / t_once per extra execution per layer; "consecutive cheaper than separated" is said only
from quiet rounds. A layer's weights: bytes of its tensors in the file, against the machine's
cache sizes (lscpu).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from lrq import assets, tools
from lrq.eval.speed import busy_cpu
from lrq.eval.stock import make_stock, reference_f32
from lrq.model_file import open_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime import lrq_file  # noqa: E402  (bench/runtime.py: the same LRQ file)


def _compact(items: list[tuple[int, int]]) -> str:
    """A full execution list (layer, times in a row) written with ranges (FORMAT.md 7.1), so that
    a 28-layer map stays under llama.cpp's 127-byte limit for --lrq-layers."""
    out: list[str] = []
    i = 0
    while i < len(items):
        layer, k = items[i]
        if k > 1:
            out.append(f"{layer}x{k}")
            i += 1
            continue
        j = i
        while j + 1 < len(items) and items[j + 1] == (items[j][0] + 1, 1):
            j += 1
        out.append(str(layer) if j == i else f"{layer}..{items[j][0]}")
        i = j + 1
    return ",".join(out)


def maps(n_layer: int, layers: list[int]) -> dict[str, str]:
    rest = list(range(n_layer))
    return {"once": _compact([(l, 1) for l in rest]),
            "consecutive": _compact([(l, 2 if l in layers else 1) for l in rest]),
            "separated": _compact([(l, 1) for l in rest + layers])}


def layer_bytes(path: Path, layer: int) -> int:
    from gguf import GGUFReader

    from lrq.gguf_types import register
    register()                                         # LRQ type ids for gguf-py
    r = GGUFReader(str(path))
    return sum(int(t.n_bytes) for t in r.tensors if t.name.startswith(f"blk.{layer}."))


def caches() -> str:
    try:
        out = subprocess.run(["lscpu", "-C"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    rows = [l.split() for l in out.splitlines()[1:] if l.strip()]
    return ", ".join(f"{r[0]} {r[1]}" for r in rows if len(r) >= 2)


def decode(path: Path, layer_map: str, threads: int, tg: int) -> float:
    proc = tools.run("llama-bench", ["-m", path, "-p", 0, "-n", tg, "-r", 1, "-t", threads, "-o", "json",
                                     "--lrq-layers", layer_map], timeout=1800)
    return float(json.loads(proc.stdout)[0]["avg_ts"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a bundled model name or a GGUF path")
    ap.add_argument("--layers", default="last-16",
                    help="replicated layers: all, or last-K (default last-16: every layer of a 28-30-layer model "
                         "twice in a row does not fit llama.cpp's 127-byte --lrq-layers)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tg", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("out/bench"))
    ap.add_argument("--out", type=Path, default=None, help="also write the table here (.md; JSON beside it)")
    a = ap.parse_args(argv)
    src = assets.path(a.model) if a.model in assets.ASSETS else Path(a.model)
    a.work.mkdir(parents=True, exist_ok=True)
    ref = reference_f32(src, a.work)
    files = {"stock Q2_K": make_stock(ref, "Q2_K", work=a.work), "LRQ2 g64": lrq_file(src, "none", "none", a.work)}
    n_layer = int(open_model(src).hparams["n_layer"])
    chosen = list(range(n_layer)) if a.layers == "all" else list(range(n_layer - int(a.layers.split("-")[1]), n_layer))
    m = maps(n_layer, chosen)

    res: dict[str, dict[str, list[float]]] = {f: {k: [] for k in m} for f in files}
    loads: list[float] = []
    for rnd in range(a.rounds):
        loads.append(os.getloadavg()[0])
        for f, path in files.items():
            for k, lm in m.items():
                res[f][k].append(decode(path, lm, a.threads, a.tg))
        print(f"round {rnd + 1}/{a.rounds}: load {loads[-1]:.1f}", file=sys.stderr, flush=True)
    quiet = [i for i, l in enumerate(loads) if not busy_cpu(l)]

    def cell(v: list[float]) -> str:
        return f"{statistics.median(v):.1f} ({min(v):.1f}–{max(v):.1f})"

    lines = [f"Model `{src.name}`, {a.threads} threads, tg{a.tg}, {a.rounds} rounds (median (min–max) tokens/s); "
             f"{len(chosen)} layers replicated; load averages {', '.join(f'{l:.1f}' for l in loads)}"
             f"{'' if len(quiet) == len(loads) else f' ({len(loads) - len(quiet)} busy rounds)'}; caches: {caches()}.",
             "", "| file | bytes of one layer | once | consecutive | separated | extra cost per execution, consecutive | "
             "same, separated |", "|---|---:|---:|---:|---:|---:|---:|"]
    for f, path in files.items():
        r = res[f]
        if quiet:
            q = {k: statistics.median([r[k][i] for i in quiet]) for k in r}
            # slower map -> (t_map / t_once - 1) spread over the extra executions, in units of an
            # average layer's share of the single pass
            per = {k: (q["once"] / q[k] - 1.0) * n_layer / len(chosen) for k in ("consecutive", "separated")}
            c1, c2 = f"{per['consecutive']:.3f}", f"{per['separated']:.3f}"
        else:
            c1 = c2 = "busy"
        lines.append(f"| {f} | {layer_bytes(path, chosen[0]) / 2**20:.2f} MiB | {cell(r['once'])} | "
                     f"{cell(r['consecutive'])} | {cell(r['separated'])} | {c1} | {c2} |")
    lines += ["", "Extra cost per execution: (decode time of the map / the single pass's - 1) x layers / "
              "replicated layers; 1.0 = an extra execution costs what an average layer costs in the single "
              "pass (from quiet rounds only)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text)
        a.out.with_suffix(".json").write_text(json.dumps({"maps": m, "tg": res, "load1": loads}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
