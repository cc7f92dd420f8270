"""The NEON fast path (native/lrq/q8-neon.c) against the portable C path, under qemu-user.

tests/native/neon_check.c is cross-compiled for aarch64 with native/lrq/{ref,q8,q8-neon}.c twice:
with the dot-product extension (vdotq_s32) and for plain armv8-a (vmull_s8 + vpadalq_s16), and
run with qemu-aarch64.  It compares lrq_mul_mat_q8 (NEON on aarch64) with lrq_mul_mat_q8_generic
for every bits x group size x mode x tokens (1, 5) x replica shape, with the AVX2-vs-generic
bound of test_kernels.py (NMSE <= 1e-10; also max |diff| / max |y| <= 1e-5, row halves == whole).
Correctness only: emulated timings say nothing about ARM speed.

`make test` (its target testdeps) installs gcc-aarch64-linux-gnu and qemu-user; a missing tool fails, not skips.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CC = "aarch64-linux-gnu-gcc"
QEMU = "qemu-aarch64"
SYSROOT = "/usr/aarch64-linux-gnu"
SOURCES = [ROOT / "tests/native/neon_check.c"] + [ROOT / "native/lrq" / f for f in ("ref.c", "q8.c", "q8-neon.c")]
N_CASES = 9 * 4 * 2 * 4 + 4 + 2 * 4 * 2 * 4 + 1   # (mode, bits) x group x tokens x replica + heap scratch,
                                                 # two-level: sub size x super size x tokens x replica + heap


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} not found: run `make testdeps` (installs gcc-aarch64-linux-gnu and qemu-user)"
    return path


@pytest.mark.parametrize("march, dotprod", [("armv8.2-a+dotprod", 1), ("armv8-a", 0)])
def test_neon_matches_generic_under_qemu(tmp_path, march, dotprod):
    cc, qemu = _tool(CC), _tool(QEMU)
    exe = tmp_path / "neon_check"
    build = subprocess.run([cc, "-std=c11", "-O2", f"-march={march}", "-Wall", "-Wextra", "-Werror",
                            "-I", str(ROOT / "native/include"), *map(str, SOURCES), "-lm", "-o", str(exe)],
                           capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([qemu, "-L", SYSROOT, str(exe)], capture_output=True, text=True, timeout=120)
    out = run.stdout
    lines = out.splitlines()
    # the NEON kernel was really dispatched to, in the intended variant
    assert lines and lines[0] == f"simd=neon dotprod={dotprod}", out[:2000] + run.stderr
    failed = [ln for ln in lines if ln.startswith("FAIL")]
    assert not failed, "\n".join(failed[:20])
    passed = [ln for ln in lines if ln.startswith("PASS")]
    assert len(passed) == N_CASES, out[-2000:]
    assert re.search(rf"^{N_CASES}/{N_CASES} cases passed$", out, re.M), out[-2000:]
    assert run.returncode == 0, run.stderr
