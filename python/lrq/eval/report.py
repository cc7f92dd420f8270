"""Table, CSV and plot of evaluation rows (lrq.eval.run.Row), Pareto fronts marked."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Sequence

from ..atomic import atomic_path
from .pareto import pareto_front
from .run import Row

# ref_type: what every row's KLD / top-1 is against (lrq-eval --ref-type), last so that readers of
# the older columns by position are unaffected
CSV_FIELDS = ("label", "kind", "file_type", "bpw", "ppl", "ppl_err", "kld", "kld_err", "top1",
              "top1_err", "pareto_ppl", "pareto_kld", "seconds", "path", "ref_type")


def mark_pareto(rows: Sequence[Row]) -> None:
    """Set pareto_ppl / pareto_kld on the non-reference rows (the reference is the baseline)."""
    cand = [r for r in rows if r.kind != "reference"]
    for attr, key in (("pareto_ppl", "ppl"), ("pareto_kld", "kld")):
        for r in rows:
            setattr(r, attr, False)
        for i in pareto_front([(r.bpw, getattr(r, key)) for r in cand]):
            setattr(cand[i], attr, True)


def _fmt(v: float, nd: int) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def table(rows: Sequence[Row], header: str = "") -> str:
    """A fixed-width table; '*' marks the PPL / KLD Pareto front."""
    lines = [header] if header else []
    lines.append(f"{'model':34s} {'type':36s} {'bpw':>6s} {'PPL':>18s} {'KLD':>17s} {'top-1 %':>15s}  P")
    for r in rows:
        ppl = f"{_fmt(r.ppl, 3)} ± {_fmt(r.ppl_err, 3)}"
        kld = f"{_fmt(r.kld, 4)} ± {_fmt(r.kld_err, 4)}"
        top = f"{_fmt(100 * r.top1, 2)} ± {_fmt(100 * r.top1_err, 2)}"
        mark = ("p" if r.pareto_ppl else "-") + ("k" if r.pareto_kld else "-")
        lines.append(f"{r.label[:34]:34s} {r.file_type[:36]:36s} {r.bpw:6.3f} {ppl:>18s} {kld:>17s} "
                     f"{top:>15s}  {mark if r.kind != 'reference' else 'ref'}")
    lines.append("P: p = on the PPL-vs-bpw Pareto front, k = on the KLD-vs-bpw front")
    return "\n".join(lines)


def write_csv(rows: Sequence[Row], path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.as_dict().items()})
    return path


def plot(rows: Sequence[Row], path: str | os.PathLike, title: str = "") -> Path:
    """PPL and KLD against bpw (two panels, log y), Pareto fronts as step lines; the reference
    is a dashed horizontal line (its 32 bpw would crush the x axis)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    cand = [r for r in rows if r.kind != "reference"]
    refs = [r for r in rows if r.kind == "reference"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {"stock": "tab:blue", "lrq": "tab:red"}
    for ax, key, flag, ylabel in ((axes[0], "ppl", "pareto_ppl", "perplexity"),
                                  (axes[1], "kld", "pareto_kld", "mean KL divergence (nats)")):
        pts = [(r.bpw, getattr(r, key), r) for r in cand
               if math.isfinite(getattr(r, key)) and getattr(r, key) > 0]
        for kind in sorted({r.kind for _, _, r in pts}):
            xs = [x for x, _, r in pts if r.kind == kind]
            ys = [y for _, y, r in pts if r.kind == kind]
            ax.scatter(xs, ys, color=colors.get(kind, "tab:gray"), label=kind, zorder=3)
        for x, y, r in pts:
            ax.annotate(r.label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        front = sorted([(x, y) for x, y, r in pts if getattr(r, flag)])
        if front:
            ax.step([x for x, _ in front], [y for _, y in front], where="post", color="black",
                    lw=1, ls="-", zorder=2, label="Pareto front")
            ax.scatter([x for x, _ in front], [y for _, y in front], s=120, facecolors="none",
                       edgecolors="black", zorder=4)
        if key == "ppl":
            for r in refs:
                ax.axhline(r.ppl, color="tab:green", ls="--", lw=1, label=f"{r.label} ({r.ppl:.2f})")
        if pts:
            ax.set_yscale("log")
        ax.set_xlabel("bits per weight (whole file)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:       # the temporary name keeps the suffix: the format
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
    return path
