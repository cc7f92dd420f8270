"""lrq-search's outputs: the trials (CSV), the front (Markdown table), the plot (KLD vs bpw vs
decode time, matplotlib like lrq-eval's), the best plan (plan file + layer map + adapter) and the
final stage (adapters calibrated by lrq-calibrate for the best few candidates)."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..atomic import atomic_path, atomic_write_text
from .space import SearchError
from .study import Result, SearchConfig


def _f(v: float, nd: int) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.{nd}f}"


def table(rows: Sequence[Result], title: str = "") -> str:
    head = ("| trial | stage | base | repeats (layer map) | KLD | top-1 | bpw | ms/token | MiB | objective | front |\n"
            "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|:-:|\n")
    lines = [f"| {r.number} | {r.stage} | {Path(r.candidate.base).name} | {r.describe} "
             f"(`{r.map or '-'}`) | {_f(r.kld, 5)} | {_f(r.top1, 3)} | {_f(r.bpw, 3)} | "
             f"{_f(r.ms_per_token, 2)} | {_f(r.memory_mib, 0)} | {_f(r.objective, 5)} | {'*' if r.front else ''} |"
             for r in rows]
    return (f"{title}\n\n" if title else "") + head + "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Result], path: str | os.PathLike) -> Path:
    path = Path(path)
    fields = ["number", "stage", "base", "map", "describe", "kld", "top1", "bpw", "ms_per_token",
              "memory_mib", "objective", "n_exec", "seconds", "front", "key"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({"number": r.number, "stage": r.stage, "base": Path(r.candidate.base).name,
                        "map": r.map, "describe": r.describe, "kld": r.kld, "top1": r.top1, "bpw": r.bpw,
                        "ms_per_token": r.ms_per_token, "memory_mib": r.memory_mib,
                        "objective": r.objective, "n_exec": r.n_exec, "seconds": r.seconds,
                        "front": int(r.front), "key": r.key})
    return path


def plot(rows: Sequence[Result], path: str | os.PathLike, title: str = "",
         extra: Sequence[tuple[str, float, float, float]] = ()) -> Path:
    """Two panels: KLD vs bpw and KLD vs decode ms/token, colour = the other cost; the front
    ringed; ``extra``: (label, kld, bpw, ms) points drawn as labelled crosses (final adapters)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path = Path(path)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    k = [r.kld for r in rows]
    b = [r.bpw for r in rows]
    ms = [r.ms_per_token if math.isfinite(r.ms_per_token) else 0.0 for r in rows]
    for ax, x, c, xl, cl in ((axes[0], b, ms, "bits per weight (base + adapter)", "ms/token"),
                             (axes[1], ms, b, "decode ms/token (llama-bench)", "bpw")):
        sc = ax.scatter(x, k, c=c, cmap="viridis", s=22)
        fig.colorbar(sc, ax=ax, label=cl)
        fx = [xi for xi, r in zip(x, rows) if r.front]
        fk = [r.kld for r in rows if r.front]
        ax.scatter(fx, fk, facecolors="none", edgecolors="red", s=70, label="front")
        for lab, kv, bv, mv in extra:
            xv = bv if ax is axes[0] else mv
            ax.scatter([xv], [kv], marker="x", color="black", s=50)
            ax.annotate(lab, (xv, kv), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(xl)
        ax.set_ylabel("KLD to F32 (held-out calibration text)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=110)
    plt.close(fig)
    return path


def write_best(r: Result, cfg: SearchConfig, out_dir: Path, evaluator) -> dict:
    """OUT/best.plan.json (lrq-convert --plan / lrq-calibrate --plan), OUT/best.map (the
    --lrq-layers string), OUT/best.adapter.gguf when the candidate has gains, OUT/best.json."""
    from ..select.strategy import write_plan
    sp = cfg.space_obj()
    files = {}
    reps = r.candidate.repeats(sp)
    files["plan"] = str(write_plan(out_dir / "best.plan.json", reps, sp.n_layer))
    atomic_write_text(out_dir / "best.map", (r.map or "") + "\n")
    files["map"] = str(out_dir / "best.map")
    stale = out_dir / "best.adapter.gguf"
    if r.candidate.needs_adapter():
        files["adapter"] = str(evaluator.write_adapter(r.candidate, stale))
    elif stale.exists():
        stale.unlink()
    info = {"trial": r.number, "base": r.candidate.base, "map": r.map, "describe": r.describe,
            "kld": r.kld, "top1": r.top1, "bpw": r.bpw, "ms_per_token": r.ms_per_token,
            "memory_mib": r.memory_mib, "objective": r.objective, "files": files,
            "use": (f"llama-cli -m {r.candidate.base} "
                    + (f"--lrq-adapter {files['adapter']}" if "adapter" in files
                       else (f"--lrq-layers {r.map}" if r.map else "")))}
    atomic_write_text(out_dir / "best.json", json.dumps(info, indent=1) + "\n")
    return info


@dataclass
class Final:
    label: str
    result: Result
    params: tuple[str, ...]
    adapter: Path
    kld: float
    top1: float
    bpw: float
    ms_per_token: float
    memory_mib: float
    seconds_calibrate: float


def calibrate_finalists(rows: Sequence[Result], cfg: SearchConfig, evaluator, out_dir: Path,
                        top: int, steps: int, param_sets: Sequence[tuple[str, ...]], threads: int = 1,
                        log=lambda s: None) -> list[Final]:
    """The final stage: for the ``top`` best distinct layer maps (by objective; in Pareto mode the
    front by KLD), an adapter calibrated by lrq-calibrate on the calibration text (the windows the
    held-out windows avoid), for each parameter set; measured like every trial."""
    import time

    import torch

    from ..calib import CalibError
    from ..calib.calibrate import CalibrateOptions, calibrate
    pool = [r for r in rows if r.front] if cfg.pareto else list(rows)
    pool.sort(key=lambda r: (r.kld if cfg.pareto else r.objective, r.n_exec, r.number))
    chosen, seen = [], set()
    for r in pool:
        k = (r.candidate.base, r.map)
        if k not in seen:
            seen.add(k)
            chosen.append(r)
        if len(chosen) >= top:
            break
    if threads:
        torch.set_num_threads(threads)
    out = []
    for i, r in enumerate(chosen):
        for ps in param_sets:
            label = f"final-{i}-{'+'.join(ps)}"
            adapter = out_dir / f"{label}.adapter.gguf"
            opts = CalibrateOptions(text=cfg.text, n_tokens=cfg.calib_tokens, window=cfg.calib_window,
                                    steps=steps, params=tuple(ps), progress=False)
            t0 = time.monotonic()
            try:
                calibrate(r.candidate.base, adapter, cfg.ref, opts, plan=r.map or None, adapter=True)
            except CalibError as e:
                raise SearchError(f"calibrating {label} ({r.describe}): {e}") from None
            tc = time.monotonic() - t0
            m = evaluator.measure_files(r.candidate.base, r.n_exec, adapter=adapter)
            out.append(Final(label, r, tuple(ps), adapter, m.kld, m.top1, m.bpw, m.ms_per_token,
                             m.memory_mib, tc))
            log(f"{label}: {r.describe} on {Path(r.candidate.base).name}: calibrated in {tc:.0f} s, "
                f"KLD {r.kld:.5f} -> {m.kld:.5f}")
    if out:
        b = min(out, key=lambda f: cfg.objective(f.kld, f.bpw, f.ms_per_token))
        shutil.copyfile(b.adapter, out_dir / "best.calibrated.adapter.gguf")
        atomic_write_text(out_dir / "best.calibrated.json", json.dumps(
            {"label": b.label, "base": b.result.candidate.base, "map": b.result.map, "params": b.params,
             "kld": b.kld, "top1": b.top1, "bpw": b.bpw, "ms_per_token": b.ms_per_token,
             "adapter": str(out_dir / "best.calibrated.adapter.gguf")}, indent=1) + "\n")
    return out


def final_table(finals: Sequence[Final]) -> str:
    head = ("| finalist | base | repeats | calibrated | KLD search -> calibrated | top-1 | bpw | ms/token | calib s |\n"
            "|---|---|---|---|---:|---:|---:|---:|---:|\n")
    return head + "\n".join(
        f"| {f.label} | {Path(f.result.candidate.base).name} | {f.result.describe} (`{f.result.map or '-'}`) | "
        f"{','.join(f.params)} | {_f(f.result.kld, 5)} -> {_f(f.kld, 5)} | {_f(f.top1, 3)} | {_f(f.bpw, 3)} | "
        f"{_f(f.ms_per_token, 2)} | {f.seconds_calibrate:.0f} |" for f in finals) + "\n"


__all__ = ["table", "write_csv", "plot", "write_best", "Final", "calibrate_finalists", "final_table"]
