"""The CUDA sources of lrq compile, on every machine, with the pip CUDA compiler.

`make test` installs nvcc from PyPI into the virtual environment (the Makefile's testdeps: pinned
nvidia-cuda-nvcc / -crt / -runtime / -cccl / nvidia-nvvm); no GPU or driver is needed to compile.
So the kernels cannot rot on machines without a GPU:

- native/cuda/lrq-cuda.cu (the kernels of lrq-cuda.cuh and their launchers) for sm_80 (A100) and
  sm_90 (H100 / H200), with ggml-cuda's -use_fast_math, warnings as errors; every kernel
  instantiation the launchers can pick is compiled for both, none spills registers to local memory;
- the C glue that ggml-cuda links (lrq-cuda-host.c, lrq-cuda-ggml.c against the pinned, patched
  ggml headers) with gcc, warnings as errors;
- a control: a copy of the kernels with one type error must not compile (the check can fail).

What compiling cannot show (results and speed on a GPU) is tests/test_cuda_emulation.py's (the
arithmetic, on the CPU) and bench/cuda.sh's (on a GPU).
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "native" / "cuda"
ARCHS = ("80", "90")
COMPILE_TIMEOUT_S = 600

BITS = (1, 2, 3, 4)
MV_COLUMNS = (1, 2, 4, 8)    # lrq-cuda.cu launch_bits: the column counts of mul_mv
REPLICAS = (1, 2, 3, 4)      # 1..LRQ_CUDA_MAX_REP
# Itanium mangling of the kernel templates (int template arguments as Li<n>E)
EXPECTED_KERNELS = (
    {f"_Z22lrq_cuda_mul_mv_kernelILi{b}ELi{c}ELi{r}EEv13lrq_cuda_args" for b in BITS for c in MV_COLUMNS for r in REPLICAS}
    | {f"_Z22lrq_cuda_mul_mm_kernelILi{b}EEv13lrq_cuda_argsi" for b in BITS}
    | {"_Z28lrq_cuda_quantize_act_kernelPKflS0_iPaPfS2_"}
)
ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)'")
SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def nvcc() -> Path:
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations or []) if spec else []:
        exe = Path(base) / "cu13" / "bin" / "nvcc"
        if exe.exists():
            return exe
    pytest.fail("nvcc of nvidia-cuda-nvcc is not installed in this environment: run `make testdeps` "
                "(or `make test`), which installs the pinned pip CUDA compiler")


def _compile(src: Path, out: Path, archs=ARCHS, extra=()) -> subprocess.CompletedProcess:
    gencode = [a for arch in archs for a in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
    return subprocess.run([str(nvcc()), "-c", "-std=c++17", "-O3", "-use_fast_math", *gencode, "-Xptxas", "-v", "-Werror", "all-warnings",
                           "-Xcompiler", "-Wall", "-I", str(CUDA_DIR), "-I", str(ROOT / "native" / "include"), *extra,
                           str(src), "-o", str(out)], capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)


def test_kernels_compile_for_sm80_and_sm90(tmp_path):
    r = _compile(CUDA_DIR / "lrq-cuda.cu", tmp_path / "lrq-cuda.o")
    assert r.returncode == 0, r.stderr[-4000:]
    assert (tmp_path / "lrq-cuda.o").stat().st_size > 0
    log = r.stdout + r.stderr
    for arch in ARCHS:
        built = {name for name, sm in ENTRY.findall(log) if sm == arch}
        assert built == EXPECTED_KERNELS, (
            f"sm_{arch}: missing {sorted(EXPECTED_KERNELS - built)[:4]}, unexpected {sorted(built - EXPECTED_KERNELS)[:4]}")
    spills = [m for m in SPILL.findall(log) if m != ("0", "0")]
    assert not spills, f"register spills: {spills[:4]}"


def test_host_glue_compiles_against_the_pinned_ggml(tmp_path):
    gcc = shutil.which("gcc")
    assert gcc, "gcc not found"
    inc = ["-I", str(ROOT / "build" / "llama.cpp" / "ggml" / "include"), "-I", str(ROOT / "native" / "include"),
           "-I", str(CUDA_DIR)]
    for src in ("lrq-cuda-host.c", "lrq-cuda-ggml.c"):
        r = subprocess.run([gcc, "-std=c11", "-Wall", "-Wextra", "-Werror", *inc, "-c", str(CUDA_DIR / src),
                            "-o", str(tmp_path / (src + ".o"))], capture_output=True, text=True)
        assert r.returncode == 0, f"{src}: {r.stderr[-3000:]}"


def test_a_broken_kernel_does_not_compile(tmp_path):
    text = (CUDA_DIR / "lrq-cuda.cuh").read_text()
    anchor = "const int isum = lrq_cu_warp_sum_i((int) q);"
    assert text.count(anchor) == 1
    (tmp_path / "lrq-cuda.cuh").write_text(text.replace(anchor, "const int isum = lrq_cu_warp_sum_i(&q);"))
    shutil.copy(CUDA_DIR / "lrq-cuda.cu", tmp_path / "lrq-cuda.cu")
    shutil.copy(CUDA_DIR / "lrq-cuda.h", tmp_path / "lrq-cuda.h")
    r = _compile(tmp_path / "lrq-cuda.cu", tmp_path / "broken.o", archs=("80",), extra=("-I", str(tmp_path)))
    assert r.returncode != 0
    assert "lrq_cu_warp_sum_i" in r.stderr


def test_patch_and_cmake_wire_the_kernels_into_ggml_cuda():
    """patches/0009 calls the glue where ggml-cuda decides and computes; CMakeLists.txt builds
    exactly the sources this test compiles into ggml-cuda (the rest is checked by
    tests/test_cuda_emulation.py and, on a GPU, bench/cuda.sh)."""
    patch = sorted((ROOT / "patches").glob("*-cuda-lrq-kernels.patch"))
    assert len(patch) == 1, patch
    added = "\n".join(ln[1:] for ln in patch[0].read_text().splitlines() if ln.startswith("+"))
    for needle in ('#include "lrq-cuda-ggml.h"',
                   "case GGML_OP_LRQ_MUL_MAT:\n            ggml_cuda_lrq_mul_mat(ctx, &dst, 1);",
                   "ggml_lrq_mul_mat_cuda_fusable(cgraph->nodes + i, cgraph->n_nodes - i)",
                   "case GGML_OP_LRQ_MUL_MAT:\n            return ggml_lrq_mul_mat_cuda_supported(op);"):
        assert needle in added, needle
    cmake = (ROOT / "CMakeLists.txt").read_text()
    block = cmake[cmake.index("if (GGML_CUDA AND TARGET ggml-cuda)"):]
    block = block[:block.index("endif()")]
    srcs = set(re.findall(r"native/cuda/[\w.-]+", block))
    assert srcs == {"native/cuda/lrq-cuda.cu", "native/cuda/lrq-cuda-host.c", "native/cuda/lrq-cuda-ggml.c"}
    assert all((ROOT / s).exists() for s in srcs)
