"""patches/prepare.py: the pinned llama.cpp is verified and patched; a bad patch is named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PREPARE = ROOT / "patches" / "prepare.py"
BAD_PATCH = """diff --git a/src/llama.cpp b/src/llama.cpp
--- a/src/llama.cpp
+++ b/src/llama.cpp
@@ -1,3 +1,4 @@
 this line is not in llama.cpp
+and so this patch cannot apply
 neither is this one
 nor this one
"""


def test_patch_that_does_not_apply_is_reported_by_name(tmp_path):
    patches = tmp_path / "patches"
    patches.mkdir()
    for p in sorted((ROOT / "patches").glob("*.patch")):
        (patches / p.name).write_bytes(p.read_bytes())
    (patches / "9999-broken.patch").write_text(BAD_PATCH)
    dest = tmp_path / "llama.cpp"
    proc = subprocess.run([sys.executable, str(PREPARE), str(dest), "--patches", str(patches)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "9999-broken.patch" in proc.stderr
    assert "src/llama.cpp" in proc.stderr
    assert not (tmp_path / "llama.cpp.lrq-prepared").exists()


def test_prepared_tree_has_one_commit_per_patch():
    tree = ROOT / "build" / "llama.cpp"
    if not tree.is_dir():
        pytest.fail("build/llama.cpp is missing: run `make build`")
    pin = dict(l.split("=", 1) for l in (ROOT / "patches" / "LLAMA_CPP_VERSION").read_text().split("\n")
               if l and not l.startswith("#"))
    subjects = subprocess.run(["git", "-C", str(tree), "log", "--format=%s", f"{pin['commit']}..HEAD"],
                              capture_output=True, text=True, check=True).stdout.split()
    assert sorted(subjects) == sorted(p.stem for p in (ROOT / "patches").glob("*.patch"))
    status = subprocess.run(["git", "-C", str(tree), "status", "--porcelain"], capture_output=True,
                            text=True, check=True).stdout
    assert status == ""
