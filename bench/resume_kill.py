"""A SmolLM2 lrq-calibrate killed with SIGKILL halfway and resumed (docs/resume.md).

    flock /tmp/lrq-heavy.lock .venv/bin/python bench/resume_kill.py [--out out/resume] [--kill-at 15]
    # a larger model, against an uninterrupted run made before with the same options (bench/growth.py's):
    .venv/bin/python bench/resume_kill.py --out out/resume-3b --lrq out/growth/qwen2.5-3b/lrq2.gguf \
        --source out/growth/qwen2.5-3b.f16.gguf --tokens 512 --steps 2 --threads 2 --kill-at 17 \
        --uninterrupted out/growth/qwen2.5-3b/cal.gguf

1. ``lrq-convert SRC x.gguf --base-type IQ2_XS --plan none --calib sotu-calib`` (kept when there);
2. ``lrq-calibrate x.gguf y.gguf --source <F32 ref> --tokens 512 --steps 10 --threads 1``
   uninterrupted, without and with ``--resume`` (the cost of writing the layer files);
3. the same with ``--resume D``, SIGKILLed once layer ``--kill-at`` is in D, then run again;
each run under ``/usr/bin/time -v`` (wall time, peak RSS); the outputs are compared byte for byte.
Prints a markdown table.  A heavy job: run it under the heavy lock on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / ".venv" / "bin"
TIME_RE = {"wall": re.compile(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)"),
           "rss_kb": re.compile(r"Maximum resident set size \(kbytes\): (\d+)")}


def _wall(s: str) -> float:
    parts = [float(p) for p in s.split(":")]
    return sum(p * 60 ** i for i, p in enumerate(reversed(parts)))


def _parse_time(text: str) -> dict:
    out = {}
    m = TIME_RE["wall"].search(text)
    out["wall"] = _wall(m.group(1)) if m else float("nan")
    m = TIME_RE["rss_kb"].search(text)
    out["rss_mib"] = int(m.group(1)) / 1024 if m else float("nan")
    return out


def timed(cmd: list[str], log: Path, kill_when: Path | None = None) -> dict:
    """Run ``cmd`` under /usr/bin/time -v; with ``kill_when``, SIGKILL the command (not time)
    once that file exists.  Returns wall seconds, peak RSS MiB, exit status."""
    with open(log, "w") as f:
        p = subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
        if kill_when is not None:
            while p.poll() is None and not kill_when.exists():
                time.sleep(0.01)
            kids = Path(f"/proc/{p.pid}/task/{p.pid}/children")
            pids = kids.read_text().split() if kids.exists() else []
            for pid in pids:
                os.kill(int(pid), signal.SIGKILL)
        p.wait()
    r = _parse_time(log.read_text(errors="replace"))
    r["rc"] = p.returncode
    r["killed"] = "terminated by signal 9" in log.read_text(errors="replace")
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "out" / "resume"))
    ap.add_argument("--kill-at", type=int, default=15, help="kill once this layer's file exists (default 15)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lrq", default=None, help="calibrate this file instead of SmolLM2's IQ2_XS conversion")
    ap.add_argument("--source", default=None, help="with --lrq: its source")
    ap.add_argument("--uninterrupted", default=None,
                    help="with --lrq: the output of an uninterrupted run with these options, made earlier "
                         "(e.g. bench/growth.py's cal.gguf): the two uninterrupted runs are skipped")
    a = ap.parse_args()
    sys.path.insert(0, str(REPO / "python"))
    from lrq import assets
    from lrq.eval.stock import reference_f32
    from lrq.resume import LAYER_FILE

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.lrq:
        x, ref = Path(a.lrq), Path(a.source)
    else:
        src = assets.path("smollm2-135m")
        ref = reference_f32(src)
        x = out / "x.IQ2_XS.gguf"
        if not x.exists():
            subprocess.run([str(BIN / "lrq-convert"), str(src), str(x), "--base-type", "IQ2_XS", "--plan", "none",
                            "--calib", "sotu-calib", "-q"], check=True)
    cal = [str(BIN / "lrq-calibrate"), str(x)]
    opts = ["--source", str(ref), "--tokens", str(a.tokens), "--window", str(a.window), "--steps", str(a.steps),
            "--threads", str(a.threads), "-q"]
    for d in ("D1", "D2"):
        shutil.rmtree(out / d, ignore_errors=True)
    rows = []
    y0_path = Path(a.uninterrupted) if a.uninterrupted else out / "y0.gguf"
    if not a.uninterrupted:
        r0 = timed(cal + [str(out / "y0.gguf"), *opts], out / "run0.log")
        rows.append(("uninterrupted, no --resume", r0))
        r1 = timed(cal + [str(out / "y1.gguf"), *opts, "--resume", str(out / "D1")], out / "run1.log")
        rows.append(("uninterrupted, --resume D1 (fresh)", r1))
    r2 = timed(cal + [str(out / "y2.gguf"), *opts, "--resume", str(out / "D2")], out / "run2.log",
               kill_when=out / "D2" / LAYER_FILE.format(a.kill_at))
    n_left = len([n for n in os.listdir(out / "D2") if n.startswith("layer-")])
    rows.append((f"--resume D2, SIGKILL once layer {a.kill_at} is written ({n_left} layers kept)", r2))
    r3 = timed(cal + [str(out / "y2.gguf"), *opts, "--resume", str(out / "D2")], out / "run3.log")
    rows.append(("--resume D2 again (resumed)", r3))
    y0 = y0_path.read_bytes()
    same1 = a.uninterrupted is not None or (out / "y1.gguf").read_bytes() == y0
    same2 = (out / "y2.gguf").read_bytes() == y0
    print("| run | exit | wall s | peak RSS MiB |")
    print("|---|---|---|---|")
    for what, r in rows:
        rc = "SIGKILL" if r["killed"] else str(r["rc"])
        print(f"| {what} | {rc} | {r['wall']:.1f} | {r['rss_mib']:.0f} |")
    print(f"\noutput of the --resume run == uninterrupted: {same1}; resumed after the kill == uninterrupted: {same2}")
    kept = out / ("D2" if a.uninterrupted else "D1")
    print(f"resume directory: {sum(f.stat().st_size for f in kept.iterdir()) / 2**20:.2f} MiB "
          f"({len(list(kept.iterdir()))} files)")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    return 0 if (same1 and same2 and r2["killed"]) else 1


if __name__ == "__main__":
    sys.exit(main())
