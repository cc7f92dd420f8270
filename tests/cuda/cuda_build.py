"""Build the CPU emulation harness of the CUDA kernels (tests/cuda/harness.cpp) and the check of
ggml-cuda's glue (tests/cuda/glue_check.cpp).

The kernel source native/cuda/lrq-cuda.cuh is copied unchanged -- or, on request, with textual
mutations applied (tests/test_cuda_emulation.py's broken-kernel controls) -- and compiled by g++
through tests/cuda/shim/lrq-cuda-shim.h.  The kernels g++ compiles are the ones nvcc compiles.
The C library (reference and CPU fast path) is compiled from its sources with the flags of
CMakeLists.txt that matter for its numerics (C11, no fused multiply-adds).

    python tests/cuda/cuda_build.py OUT_DIR      # prints the harness path

A build is cached under OUT_DIR by a hash of its inputs and flags.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CUDA_SOURCE = ROOT / "native" / "cuda" / "lrq-cuda.cuh"
LIB_SOURCES = [ROOT / "native" / "lrq" / n for n in ("ref.c", "q8.c", "q8-avx2.c", "q8-neon.c")]
INPUTS = [CUDA_SOURCE, ROOT / "native" / "cuda" / "lrq-cuda.h", ROOT / "native" / "cuda" / "lrq-cuda-host.c",
          ROOT / "native" / "include" / "lrq-dequant.h", ROOT / "native" / "include" / "lrq-kernels.h",
          ROOT / "native" / "lrq" / "lrq-impl.h", ROOT / "tests" / "cuda" / "harness.cpp",
          ROOT / "tests" / "cuda" / "shim" / "lrq-cuda-shim.h", *LIB_SOURCES]


def kernel_source(mutations: list[tuple[str, str]] = ()) -> str:
    """native/cuda/lrq-cuda.cuh with each (old, new) of `mutations` applied exactly once."""
    text = CUDA_SOURCE.read_text()
    for old, new in mutations:
        if text.count(old) != 1:
            raise ValueError(f"mutation anchor {old!r} occurs {text.count(old)} times in {CUDA_SOURCE}")
        text = text.replace(old, new)
    return text


def build(out_dir: Path, *, mutations: list[tuple[str, str]] = ()) -> Path:
    """Compile the harness into out_dir; returns the executable's path."""
    source = kernel_source(mutations)
    flags = ["-O2"]
    h = hashlib.sha256()
    for p in INPUTS:
        h.update(p.read_bytes())
    h.update(source.encode())
    h.update(" ".join(flags).encode())
    d = Path(out_dir) / h.hexdigest()[:16]
    exe = d / "harness"
    if exe.exists():
        return exe
    d.mkdir(parents=True, exist_ok=True)
    (d / "lrq-cuda.cuh").write_text(source)
    inc = ["-I", str(ROOT / "tests" / "cuda" / "shim"), "-I", str(ROOT / "native" / "cuda"),
           "-I", str(ROOT / "native" / "include"), "-I", str(ROOT / "native" / "lrq")]
    objs = []
    for src in [*LIB_SOURCES, ROOT / "native" / "cuda" / "lrq-cuda-host.c"]:
        obj = d / (src.stem + ".o")
        # q8-avx2.c compiles to nothing without -mavx2 -mfma (the dispatch then stays generic)
        extra = ["-mavx2", "-mfma", "-mf16c"] if src.name == "q8-avx2.c" and _x86() else []
        subprocess.run(["gcc", "-std=c11", *flags, "-ffp-contract=off", *extra, *inc, "-c", str(src), "-o", str(obj)],
                       check=True)
        objs.append(str(obj))
    # -ffp-contract=off: the float sums of the kernels as written (nvcc may fuse; the bounds of
    # tests/test_cuda_emulation.py do not depend on it)
    subprocess.run(["g++", "-std=c++20", *flags, "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas", *inc,
                    f'-DLRQ_CUDA_SOURCE="{d / "lrq-cuda.cuh"}"', str(ROOT / "tests" / "cuda" / "harness.cpp"), *objs,
                    "-o", str(exe) + ".tmp", "-lm"], check=True)
    Path(str(exe) + ".tmp").rename(exe)
    return exe


GLUE_SOURCE = ROOT / "native" / "cuda" / "lrq-cuda-ggml.c"
BIN_DIR = ROOT / "build" / "cmake" / "bin"


def build_glue(out_dir: Path, *, mutations: list[tuple[str, str]] = ()) -> Path:
    """tests/cuda/glue_check.cpp with native/cuda/lrq-cuda-ggml.c (mutated on request), linked
    against the build's libggml-base (make build)."""
    text = GLUE_SOURCE.read_text()
    for old, new in mutations:
        if text.count(old) != 1:
            raise ValueError(f"mutation anchor {old!r} occurs {text.count(old)} times in {GLUE_SOURCE}")
        text = text.replace(old, new)
    h = hashlib.sha256()
    for p in [*INPUTS, ROOT / "tests" / "cuda" / "glue_check.cpp", BIN_DIR / "libggml-base.so"]:
        h.update(p.read_bytes())
    h.update(text.encode())
    # the executable finds libggml-base through its rpath: a checkout elsewhere (another clone
    # with a byte-identical library) needs its own build, or it runs against a removed directory
    h.update(str(BIN_DIR.resolve()).encode())
    d = Path(out_dir) / ("glue-" + h.hexdigest()[:16])
    exe = d / "glue_check"
    if exe.exists():
        return exe
    d.mkdir(parents=True, exist_ok=True)
    (d / "lrq-cuda-ggml.c").write_text(text)
    inc = ["-I", str(ROOT / "tests" / "cuda" / "shim"), "-I", str(ROOT / "native" / "cuda"),
           "-I", str(ROOT / "native" / "include"), "-I", str(ROOT / "native" / "lrq"),
           "-I", str(ROOT / "build" / "llama.cpp" / "ggml" / "include")]
    objs = []
    for src in [*LIB_SOURCES, ROOT / "native" / "cuda" / "lrq-cuda-host.c", d / "lrq-cuda-ggml.c"]:
        obj = d / (src.stem + ".o")
        extra = ["-mavx2", "-mfma", "-mf16c"] if src.name == "q8-avx2.c" and _x86() else []
        subprocess.run(["gcc", "-std=c11", "-O2", "-ffp-contract=off", *extra, *inc, "-c", str(src), "-o", str(obj)],
                       check=True)
        objs.append(str(obj))
    subprocess.run(["g++", "-std=c++20", "-O1", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas", *inc,
                    str(ROOT / "tests" / "cuda" / "glue_check.cpp"), *objs, f"-L{BIN_DIR}", "-lggml-base",
                    f"-Wl,-rpath,{BIN_DIR}", "-o", str(exe) + ".tmp", "-lm"], check=True)
    Path(str(exe) + ".tmp").rename(exe)
    return exe


def _x86() -> bool:
    import platform
    return platform.machine() in ("x86_64", "AMD64", "amd64")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    args = ap.parse_args(argv)
    print(build(args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
