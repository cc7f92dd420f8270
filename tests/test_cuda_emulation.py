"""The CUDA kernels of native/cuda/lrq-cuda.cuh, run on the CPU, against the C library.

No GPU is needed: tests/cuda/harness.cpp compiles the real kernel source with g++ through a shim
(tests/cuda/shim/lrq-cuda-shim.h: a thread block as cooperative fibers, one per CUDA thread, with
__syncthreads, __shfl_xor_sync over full warps and __dp4a; shared memory filled with NaN before each
block) and runs every kernel over a simulated grid.  This is the only numerical check of the CUDA
arithmetic possible without a GPU; what it cannot see (nvcc's code generation, memory ordering and
timing on real hardware) is left to bench/cuda.sh on a GPU.  Each case compares

- the quantize kernel with lrq_quantize_act_q8 (native/lrq/q8.c): the same int8 activations, block
  scales and block sums, bit for bit;
- the mat-mul kernels, fed the CPU's int8 activations, with lrq_mul_mat_q8_generic (the same integer
  dot products; only the float summation order differs);
- quantize + mat-mul with lrq_mul_mat_ref (FORMAT.md 6 in float64, itself checked against lrq.quant
  by tests/test_kernels.py): the int8 rounding of the activations;

over every bits x mode (1-4 asym / sym, ternary) x group size (32..256) on n_in = 352 (a short last
group for g = 64, 128, 256); the mat-vec kernel with 1, 2, 3 (a masked column) and 8 tokens, the tiled
kernel with 40 tokens on 37 and 100 rows, and the fused parallel-replica mat-vec (3 replicas x 1 token,
2 replicas x 4 tokens), each replica with its own activations and parameters; replica parameters
cycled over the cases (none, alpha / beta per group, row and tensor, gain, bias, clip, 4-, 8- and
12-bit activations); padded code and activation rows, absent sources as NULL, output guards.

Controls: broken copies of the kernels (one small change each) must fail every case they touch,
among them a tiled kernel without its second __syncthreads.

ggml-cuda's glue (native/cuda/lrq-cuda-ggml.c, called by patches/0009) is run the same way on real
ggml nodes (tests/cuda/glue_check.cpp: padded activation rows, per-row and per-group broadcast of
scale_mult / grid_offset, a fused run of three nodes) against the CPU fast path, with the runs the
fusion accepts and refuses and the loader's supports_op probes; a glue with the broadcast strides
swapped must fail.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "cuda"))
import cuda_build as harness_build  # noqa: E402  (tests/metal has a build.py too)

CACHE = Path(tempfile.gettempdir()) / "lrq-cuda-harness"

# Mat-mul kernels vs the CPU fast path on the same int8 activations: the integer block dots are
# exact, the float sums differ in order (~2^-24 relative per operation over 11 blocks x 4 lanes);
# measured NMSE 0 .. 2.7e-13 over the 288 cases.  1e-10 keeps three orders of margin, and one wrong
# code among the 37 x 352 weights of a case (an error of d * x in one of 37 outputs) is an NMSE of
# ~1e-4: a decoding, group, parameter or replica mix-up is far outside.
CUDA_Q8_NMSE_TOL = 1e-10
# Quantize + mat-mul vs the float64 spec: the int8 rounding of the activations (at most half a step
# of max|x_block| / 127 each; the outlier channels, 8 sigma, make the steps coarse in their blocks).
# Measured 8e-15 .. 4.0e-4; the CPU fast path has the same error (the activations are identical).
# 2e-3 is 5x the largest; activations that are not rounded at all (an identity instead of the int8
# step) or rounded to 4 bits everywhere are the wrong implementations just inside / outside: the
# former is caught by the bit-exact quantize check, the latter (NMSE ~5e-3 .. 1e-2) falls outside.
CUDA_REF_NMSE_TOL = 2e-3
# 4- and 8-bit activations are integers in [-127, 127] that the int8 path carries exactly: only the
# float sums remain (measured <= 1e-13).  A one-level error of the k-bit rounding in one activation
# is an NMSE of ~1e-5.
CUDA_EXACT_ACT_NMSE_TOL = 1e-10
# A broken control must be wrong by more than this in every case it touches (measured 1e-3 .. inf).
BROKEN_NMSE_MIN = 1e-6

N_MODES_BITS, N_GROUPS, N_KCONFS = 9, 4, 8
KERNELS = {"mv_c1", "mv_c2", "mv_c4", "mv_c8", "mm", "fused_c1", "fused_c4"}
REPLICA_KINDS = {"none", "group", "row", "tensor_clip", "act4", "act8_group", "act12"}
HARNESS_TIMEOUT_S = 300

CASE = re.compile(r"^case (.*)$")

# (old, new) edits of native/cuda/lrq-cuda.cuh, and the kernels whose every case must then fail.
MUTANTS = {
    # the sign of the offset term, in both mat-mul kernels
    "offset_sign": ([("acc[r][c] += ad * (rp.dx[tb] * (float) sumi) + (il == 0 ? off * rp.sx[tb] : 0.0f);",
                      "acc[r][c] += ad * (rp.dx[tb] * (float) sumi) - (il == 0 ? off * rp.sx[tb] : 0.0f);"),
                     ("acc[i] += fac[2 * (cr + i)] * (dxt * (float) sumi) + fac[2 * (cr + i) + 1] * sxt;",
                      "acc[i] += fac[2 * (cr + i)] * (dxt * (float) sumi) - fac[2 * (cr + i) + 1] * sxt;")], KERNELS),
    # a wrong weight index in the decoding both kernels share
    "code_index": ([("w1 |= lrq_dq_code(blk, BITS, 8 * quarter + 4 + j) << (8 * j);",
                     "w1 |= lrq_dq_code(blk, BITS, 8 * quarter + 3 + j) << (8 * j);")], KERNELS),
    # the tiled kernel overwrites its tiles while other threads still read them
    "mm_no_second_sync": ([("            acc[i] += fac[2 * (cr + i)] * (dxt * (float) sumi) + fac[2 * (cr + i) + 1] * sxt;\n"
                            "        }\n        __syncthreads();\n",
                            "            acc[i] += fac[2 * (cr + i)] * (dxt * (float) sumi) + fac[2 * (cr + i) + 1] * sxt;\n"
                            "        }\n")], {"mm"}),
    # every replica of a fused call reads the first replica's parameters
    "fused_replica": ([("            const lrq_cuda_replica & rp = a.rep[r];\n            float ad, off;",
                        "            const lrq_cuda_replica & rp = a.rep[0];\n            float ad, off;")],
                      {"fused_c1", "fused_c4"}),
}


def _parse(stdout: str) -> list[dict]:
    cases = []
    for line in stdout.splitlines():
        m = CASE.match(line)
        if m:
            f = dict(kv.split("=", 1) for kv in m.group(1).split())
            for k in ("dx_err", "sx_err", "nmse_q8", "nmse_ref", "power"):
                f[k] = float(f[k])   # "nan" / "inf" parse
            f["q_mis"] = int(f["q_mis"])
            cases.append(f)
    return cases


def _run(exe: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=HARNESS_TIMEOUT_S)


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    r = _run(harness_build.build(CACHE))
    assert r.returncode == 0, r.stderr
    return _parse(r.stdout)


def test_harness_covers_every_type_group_kernel_and_replica(cases):
    assert len(cases) == N_MODES_BITS * N_GROUPS * N_KCONFS
    assert {c["kernel"] for c in cases} == KERNELS
    assert len({(c["kernel"], c["mode"], c["bits"], c["g"]) for c in cases}) == len(KERNELS) * N_MODES_BITS * N_GROUPS
    assert {c["rep"] for c in cases} == REPLICA_KINDS
    assert {c["n_tok"] for c in cases} == {"1", "2", "3", "4", "8", "40"}
    assert {c["n_rep"] for c in cases} == {"1", "2", "3"}
    assert all(c["power"] > 0 for c in cases)   # a reference that is not all zero


def test_quantize_kernel_is_the_cpu_quantization(cases):
    bad = [c for c in cases if c["q_mis"] != 0 or c["dx_err"] != 0.0 or c["sx_err"] != 0.0]
    assert not bad, f"{len(bad)} of {len(cases)} cases differ, first: {bad[0]}"


def test_mul_mat_kernels_match_the_cpu_fast_path(cases):
    bad = [c for c in cases if not (c["nmse_q8"] <= CUDA_Q8_NMSE_TOL) or c["ok_guard"] != "1"]
    assert not bad, f"{len(bad)} of {len(cases)} cases fail, first: {bad[0]}"


def test_kernels_match_the_reference(cases):
    bad = [c for c in cases if not (c["nmse_ref"] <= CUDA_REF_NMSE_TOL)]
    assert not bad, f"{len(bad)} of {len(cases)} cases fail, first: {bad[0]}"
    exact = [c for c in cases if c["n_rep"] == "1" and c["rep"] in ("act4", "act8_group")]
    assert len(exact) >= 40
    bad = [c for c in exact if not (c["nmse_ref"] <= CUDA_EXACT_ACT_NMSE_TOL)]
    assert not bad, f"{len(bad)} of {len(exact)} k-bit cases fail, first: {bad[0]}"


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_broken_kernel_fails_every_case_it_touches(name):
    mutations, touched = MUTANTS[name]
    r = _run(harness_build.build(CACHE, mutations=mutations), "--quick")
    assert r.returncode == 0, r.stderr
    cases = _parse(r.stdout)
    hit = [c for c in cases if c["kernel"] in touched]
    assert hit
    passing = [c for c in hit if c["nmse_q8"] <= BROKEN_NMSE_MIN]
    assert not passing, f"{name}: {len(passing)} of {len(hit)} cases pass with the broken kernel, first: {passing[0]}"


# ---- ggml-cuda's glue ----------------------------------------------------------------------------

GLUE_CASES = 9 * 2 * 3 + 3   # every type x mode, g 32 / 128, 1 / 5 / 40 tokens; three fused runs
GLUE_CHECKS = 3 + 4 + 4 + 2 + 2 + 3   # fusable (3 token counts + 4 refusals / caps), supports (4 + 2 + 2 + the
                                      # two-level node and probes, declined)
# alpha [1, n_out] read with the strides of [n_groups, 1] and the other way round
GLUE_SWAPPED = [("*rs = t && t->ne[1] > 1 ? (int32_t) t->ne[0] : 0;\n    *gs = t && t->ne[0] > 1 ? 1 : 0;",
                 "*gs = t && t->ne[1] > 1 ? (int32_t) t->ne[0] : 0;\n    *rs = t && t->ne[0] > 1 ? 1 : 0;")]


def _glue(mutations=()) -> tuple[list[dict], list[str]]:
    r = _run(harness_build.build_glue(CACHE, mutations=mutations))
    assert r.returncode == 0, r.stderr
    cases = [dict(kv.split("=", 1) for kv in ln.split()[1:]) for ln in r.stdout.splitlines() if ln.startswith("case ")]
    checks = [ln for ln in r.stdout.splitlines() if ln.startswith(("fusable ", "supported "))]
    return cases, checks


def test_ggml_glue_matches_the_cpu_fast_path():
    cases, checks = _glue()
    assert len(cases) == GLUE_CASES and len(checks) == GLUE_CHECKS
    bad = [c for c in cases if not (float(c["nmse"]) <= CUDA_Q8_NMSE_TOL)]
    assert not bad, f"{len(bad)} of {len(cases)} glue cases fail, first: {bad[0]}"
    assert all(ln.endswith("ok=1") for ln in checks), [ln for ln in checks if not ln.endswith("ok=1")]


def test_ggml_glue_with_swapped_strides_fails():
    cases, _ = _glue(GLUE_SWAPPED)
    assert len(cases) == GLUE_CASES
    assert all(float(c["nmse"]) > BROKEN_NMSE_MIN for c in cases)
