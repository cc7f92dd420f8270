"""Build the CPU emulation harness of the Metal kernels (tests/metal/harness.cpp).

The shader source metal/lrq.metal is copied with its `[[...]]` attributes removed (g++ would
otherwise see `[[threadgroup(0)]]` after the shim has defined `threadgroup` away) and, on request,
with textual mutations applied (tests/test_metal.py's broken-kernel controls). Nothing else of the
source changes: the kernels g++ compiles are the ones Metal compiles.

    python tests/metal/build.py OUT_DIR [--tsan]      # prints the harness path

A build is cached under OUT_DIR by a hash of its inputs and flags.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
METAL_SOURCE = ROOT / "metal" / "lrq.metal"
INPUTS = [METAL_SOURCE, ROOT / "metal" / "lrq-kargs.h", ROOT / "native" / "include" / "lrq-dequant.h",
          ROOT / "native" / "include" / "lrq-kernels.h", ROOT / "native" / "lrq" / "lrq-impl.h",
          ROOT / "native" / "lrq" / "ref.c", ROOT / "tests" / "metal" / "harness.cpp",
          ROOT / "tests" / "metal" / "shim" / "metal_stdlib"]

ATTRIBUTE = re.compile(r"\[\[[^\[\]]*\]\]")


def shader_source(mutations: list[tuple[str, str]] = ()) -> str:
    """metal/lrq.metal without attributes, each (old, new) of `mutations` applied exactly once."""
    text = METAL_SOURCE.read_text()
    for old, new in mutations:
        if text.count(old) != 1:
            raise ValueError(f"mutation anchor {old!r} occurs {text.count(old)} times in {METAL_SOURCE}")
        text = text.replace(old, new)
    return ATTRIBUTE.sub("", text)


def build(out_dir: Path, *, tsan: bool = False, mutations: list[tuple[str, str]] = ()) -> Path:
    """Compile the harness (and ref.c) into out_dir; returns the executable's path."""
    source = shader_source(mutations)
    flags = ["-O1", "-g", "-fsanitize=thread"] if tsan else ["-O2"]
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
    (d / "lrq.metal").write_text(source)
    inc = ["-I", str(ROOT / "tests" / "metal" / "shim"), "-I", str(ROOT / "metal"),
           "-I", str(ROOT / "native" / "include"), "-I", str(ROOT / "native" / "lrq")]
    # the reference as the library builds it: C11, no fused multiply-adds (CMakeLists.txt)
    subprocess.run(["gcc", "-std=c11", *flags, "-ffp-contract=off", *inc, "-c",
                    str(ROOT / "native" / "lrq" / "ref.c"), "-o", str(d / "ref.o")], check=True)
    # -ffp-contract=off: the float sums of the kernels as written (Metal may fuse; the bounds
    # of tests/test_metal.py do not depend on it)
    subprocess.run(["g++", "-std=c++20", *flags, "-ffp-contract=off", "-pthread", "-Wall", "-Wno-attributes",
                    "-Wno-unknown-pragmas", *inc, f'-DLRQ_METAL_SOURCE="{d / "lrq.metal"}"',
                    str(ROOT / "tests" / "metal" / "harness.cpp"), str(d / "ref.o"), "-o", str(exe) + ".tmp", "-lm"],
                   check=True)
    Path(str(exe) + ".tmp").rename(exe)
    return exe


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--tsan", action="store_true", help="ThreadSanitizer build")
    args = ap.parse_args(argv)
    print(build(args.out_dir, tsan=args.tsan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
