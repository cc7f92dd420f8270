"""How memory, disk and time grow with the model (issue 20 item 1).

Runs the pipeline's steps on each model, one at a time, and records for each: wall time, the
peak anonymous memory of the whole process tree (RssAnon summed over the process and its
children, sampled every SAMPLE_S: the memory a step needs, without the pages of memory-mapped
files, which the kernel can drop and re-read), the peak total RSS (with those pages), and the
bytes the step wrote under its work directory.  Then a least-squares line per step through the
(parameters, peak anonymous memory) points and its value at 32 B parameters, and one through the
(parameters of one block, peak anonymous memory) points, the quantity block streaming makes the
memory follow, at the block of Qwen2.5-32B (bench/synth_model.py's shape, 488 M parameters).

Steps (each a command as a user types it):
  convert      lrq-convert SRC lrq2.gguf --bits 2 --group-size 64            (round to nearest)
  convert-act  ... --scale-search act-mse --calib-text sotu-calib --calib-tokens T (statistics)
  calibrate    lrq-calibrate lrq2.gguf cal.gguf --source SRC --tokens T --steps 2
  eval         lrq-eval --ref SRC --ref-type source --stock "" --chunks 2 lrq2.gguf
  select       lrq-select SRC -o plan.json --k 2 --tokens T
  distill      lrq-distill lrq2.gguf dist.gguf --source SRC --tokens T --steps 2 --top-k 256

Models: the bundled SmolLM2-135M (Q4_1) and Qwen2.5-Coder-1.5B (Q4_K_M) and random F16 models
of Qwen2.5-0.5B / 3B / 7B shape (bench/synth_model.py, written first when missing).

    flock /tmp/lrq-heavy.lock .venv/bin/python bench/growth.py --models smollm2-135m,qwen2.5-0.5b \\
        --work out/growth
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SAMPLE_S = 0.2
BIN = Path(sys.executable).parent
STEPS = ("convert", "convert-act", "calibrate", "eval", "select", "distill")
BUNDLED = {"smollm2-135m": 0.1348e9, "qwen2.5-1.5b": 1.777e9}      # parameters (lrq-inspect)


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _rss_kib(pid: int) -> tuple[int, int]:
    anon = total = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
                elif line.startswith("VmRSS:"):
                    total = int(line.split()[1])
    except OSError:
        pass
    return anon, total


def _bytes_under(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def run_step(cmd: list[str], work: Path, log: Path) -> dict:
    """Run ``cmd``; wall s, peak anon / total MiB of its process tree, MiB written under work."""
    before = _bytes_under(work)
    load0 = os.getloadavg()[0]
    t0 = time.monotonic()
    with open(log, "w") as lf:
        p = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT)
        peak_anon = peak_total = 0
        while p.poll() is None:
            a = t = 0
            for q in _tree(p.pid):
                qa, qt = _rss_kib(q)
                a, t = a + qa, t + qt
            peak_anon, peak_total = max(peak_anon, a), max(peak_total, t)
            time.sleep(SAMPLE_S)
    wall = time.monotonic() - t0
    return {"rc": p.returncode, "wall_s": wall, "anon_mib": peak_anon / 1024, "rss_mib": peak_total / 1024,
            "written_mib": (_bytes_under(work) - before) / 2**20, "load": max(load0, os.getloadavg()[0])}


# what each step writes under the model's directory: removed before the step runs, so that a
# rerun's "written" counts its output again instead of the difference to the earlier one
OUTPUTS = {"convert": "lrq2.gguf", "convert-act": "lrq2-act.gguf", "calibrate": "cal.gguf",
           "eval": "eval", "select": "plan.json", "distill": "dist.gguf"}


def remove_output(w: Path, step: str) -> None:
    import shutil
    out = w / OUTPUTS[step]
    if out.is_dir() and not out.is_symlink():
        shutil.rmtree(out)
    elif out.exists() or out.is_symlink():
        out.unlink()


def commands(src: Path, w: Path, tokens: int) -> dict[str, list[str]]:
    lrq2 = str(w / "lrq2.gguf")
    return {
        "convert": [str(BIN / "lrq-convert"), str(src), lrq2, "--bits", "2", "--group-size", "64", "-q"],
        "convert-act": [str(BIN / "lrq-convert"), str(src), str(w / "lrq2-act.gguf"), "--bits", "2",
                        "--group-size", "64", "--scale-search", "act-mse", "--calib-text", "sotu-calib",
                        "--calib-tokens", str(tokens), "-q"],
        "calibrate": [str(BIN / "lrq-calibrate"), lrq2, str(w / "cal.gguf"), "--source", str(src),
                      "--tokens", str(tokens), "--window", "512", "--steps", "2", "--threads", "2", "-q"],
        "eval": [str(BIN / "lrq-eval"), "--ref", str(src), "--ref-type", "source", "--stock", "",
                 "--chunks", "2", "-t", "2", "--work-dir", str(w / "eval"), "-q", lrq2],
        "select": [str(BIN / "lrq-select"), str(src), "-o", str(w / "plan.json"), "--k", "2",
                   "--tokens", str(tokens), "-q"],
        "distill": [str(BIN / "lrq-distill"), lrq2, str(w / "dist.gguf"), "--source", str(src),
                    "--tokens", str(tokens), "--steps", "2", "--top-k", "256", "--threads", "2", "-q"],
    }


def source_of(model: str, work: Path) -> tuple[Path, float]:
    import synth_model
    if model in BUNDLED:
        from lrq import assets
        return assets.path(model), BUNDLED[model]
    out = work / f"{model}.f16.gguf"
    if not out.exists():
        print(f"writing {out} ...", flush=True)
        synth_model.write(model, out)
    return out, float(synth_model.n_params(model))


def block_params_of(src: Path) -> int:
    """Parameters of block 0 of a GGUF (the tensor shapes of blk.0.*)."""
    from lrq.gguf_hparams import numpy_shape, open_reader
    import numpy as np
    return sum(int(np.prod(numpy_shape(t))) for t in open_reader(src).tensors if t.name.startswith("blk.0."))


def fit(rows: list[dict], step: str, key: str = "params") -> tuple[float, float] | None:
    """(MiB per B of ``key``, intercept MiB) of peak anon memory, least squares."""
    pts = [(r[key] / 1e9, r["anon_mib"]) for r in rows if r["step"] == step and r["rc"] == 0]
    if len(pts) < 2:
        return None
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else 0.0
    return slope, my - slope * mx


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,qwen2.5-0.5b,qwen2.5-1.5b,qwen2.5-3b")
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--tokens", type=int, default=1024, help="calibration tokens of every step (default 1024)")
    ap.add_argument("--work", type=Path, default=REPO / "out" / "growth")
    ap.add_argument("--report", action="store_true", help="run nothing: the tables of the recorded runs")
    a = ap.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    results = a.work / "growth.jsonl"
    rows = [json.loads(l) for l in results.read_text().splitlines()] if results.exists() else []
    for model in ([] if a.report else a.models.split(",")):
        src, params = source_of(model, a.work)
        w = a.work / model
        w.mkdir(exist_ok=True)
        cmds = commands(src, w, a.tokens)
        for step in a.steps.split(","):
            if step in ("calibrate", "eval", "distill") and not (w / OUTPUTS["convert"]).exists():
                raise SystemExit(f"{w / OUTPUTS['convert']} is missing: run the convert step first")
            remove_output(w, step)
            r = run_step(cmds[step], w, w / f"{step}.log")
            r.update(model=model, step=step, params=params, source=src.name,
                     source_mib=src.stat().st_size / 2**20, cmd=" ".join(cmds[step]))
            rows = [x for x in rows if (x["model"], x["step"]) != (model, step)] + [r]
            results.write_text("".join(json.dumps(x) + "\n" for x in rows))
            busy = " BUSY" if r["load"] > os.cpu_count() else ""
            print(f"{model:14s} {step:12s} rc {r['rc']} {r['wall_s']:8.1f} s  anon {r['anon_mib']:8.0f} MiB  "
                  f"rss {r['rss_mib']:8.0f} MiB  wrote {r['written_mib']:8.0f} MiB  load {r['load']:.1f}{busy}",
                  flush=True)
    print("\n| model | params (B) | source MiB | step | wall s | peak anon MiB | peak RSS MiB | written MiB | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["params"], STEPS.index(r["step"]))):
        flag = " (busy)" if r["load"] > os.cpu_count() else ""
        rc = "" if r["rc"] == 0 else f" (exit {r['rc']})"
        print(f"| {r['model']} | {r['params'] / 1e9:.2f} | {r['source_mib']:.0f} | {r['step']}{rc} | "
              f"{r['wall_s']:.0f}{flag} | {r['anon_mib']:.0f} | {r['rss_mib']:.0f} | {r['written_mib']:.0f} | "
              f"{r['load']:.1f} |")
    import synth_model
    blocks = {}
    for r in rows:
        if r["model"] not in blocks:
            blocks[r["model"]] = block_params_of(source_of(r["model"], a.work)[0])
        r["block_params"] = blocks[r["model"]]
    target = synth_model.block_params("qwen2.5-32b") / 1e9
    print("\n| step | anon MiB per B params | intercept MiB | at 32 B params (GiB) | anon MiB per B block "
          f"params | intercept MiB | at Qwen2.5-32B's block, {target * 1e3:.0f} M (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for step in STEPS:
        f, g = fit(rows, step), fit(rows, step, "block_params")
        if f and g:
            print(f"| {step} | {f[0]:.0f} | {f[1]:.0f} | {(f[0] * 32 + f[1]) / 1024:.1f} | {g[0]:.0f} | {g[1]:.0f} | "
                  f"{(g[0] * target + g[1]) / 1024:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
