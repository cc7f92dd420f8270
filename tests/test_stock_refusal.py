"""A stock (unpatched) llama.cpp refuses an LRQ file with a clear message instead of misreading it.

The pinned llama.cpp is prepared again WITHOUT lrq's patches, and only its ggml-base library (the
GGUF parser llama.cpp's loader runs first) is built, with ccache: a plain GGUF parses, an LRQ file
is refused naming the tensor and its unknown type (docs/FORMAT.md section 1).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lrq.convert import ConvertOptions, convert

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, **kw):
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, **kw)
    assert proc.returncode == 0, f"{cmd[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def stock_gguf_open(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("stock")
    no_patches = work / "no-patches"
    no_patches.mkdir()
    tree = work / "llama.cpp"
    _run([sys.executable, ROOT / "patches" / "prepare.py", tree, "--patches", no_patches])
    build = work / "build"
    # relative paths inside `work` let ccache reuse these objects from one run to the next
    env = dict(os.environ, CCACHE_BASEDIR=str(work), CCACHE_NOHASHDIR="1")
    _run(["cmake", "-S", tree, "-B", build, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
          "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=OFF", "-DLLAMA_BUILD_COMMON=OFF",
          "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TESTS=OFF",
          "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
          "-DLLAMA_OPENSSL=OFF"], env=env)
    _run(["cmake", "--build", build, "--target", "ggml-base"], env=env)
    lib = next(build.rglob("libggml-base.a"))
    exe = work / "gguf_open"
    _run([shutil.which("g++") or "g++", "-O1", "-o", exe, ROOT / "tests" / "native" / "gguf_open.c",
          "-x", "none", lib, "-I", tree / "ggml" / "include", "-fopenmp", "-lpthread", "-lm"], env=env)
    return exe


def test_stock_parser_refuses_lrq_file(stock_gguf_open, tiny_models, tmp_path):
    src = tiny_models.gguf("llama")
    ok = subprocess.run([stock_gguf_open, src], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.startswith("parsed:"), ok.stderr   # the control
    lrq = tmp_path / "tiny-lrq2.gguf"
    convert(src, lrq, ConvertOptions(bits=2, group_size=32, progress=False))
    bad = subprocess.run([stock_gguf_open, lrq], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    # the first LRQ-typed tensor in file order is named, with its id (LRQ2 = 44)
    assert re.search(r"tensor 'blk\.0\.\w+\.weight' has invalid ggml type 44\b", bad.stderr), bad.stderr
