#!/usr/bin/env python3
"""Fetch the pinned llama.cpp, verify it, and apply patches/*.patch in order.

    python patches/prepare.py build/llama.cpp

The source is the PyPI sdist named in patches/LLAMA_CPP_VERSION (sha256 checked); its
``vendor/llama.cpp`` must be a clean git checkout of the pinned commit.  Every patch becomes one
commit in the prepared tree, whose subject is the patch's file name, so that
``patches/regenerate.sh`` can turn edited commits back into patch files.

The tree is rebuilt only when the sdist or a patch changes, and files whose bytes did not change
keep their modification time, so ninja recompiles only what a patch edit touched.
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "python"))

from lrq.fetch import FetchError, cache_dir, pypi_file  # noqa: E402

STAMP = ".lrq-prepared"
GIT_ID = ["-c", "user.name=lrq", "-c", "user.email=lrq@localhost", "-c", "commit.gpgsign=false"]
GIT_ENV = {"GIT_AUTHOR_DATE": "2000-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2000-01-01T00:00:00Z"}


class PrepareError(RuntimeError):
    pass


def read_pin(path: Path = HERE / "LLAMA_CPP_VERSION") -> dict[str, str]:
    pin = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            pin[key.strip()] = value.strip()
    for key in ("package", "version", "filename", "sha256", "commit"):
        if key not in pin:
            raise PrepareError(f"{path}: missing key '{key}'")
    return pin


def patch_files(patch_dir: Path) -> list[Path]:
    return sorted(patch_dir.glob("*.patch"))


def stamp_of(pin: dict[str, str], patches: list[Path]) -> str:
    h = hashlib.sha256()
    h.update(pin["sha256"].encode())
    h.update(pin["commit"].encode())
    for p in patches:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def git(tree: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, **GIT_ENV)
    proc = subprocess.run(["git", *GIT_ID, "-C", str(tree), *args], capture_output=True,
                          text=True, env=env)
    if check and proc.returncode != 0:
        raise PrepareError(f"git {' '.join(args)} in {tree} failed: {proc.stderr.strip()}")
    return proc


def _safe_extract(tar: tarfile.TarFile, dest: Path) -> None:
    if hasattr(tarfile, "data_filter"):
        tar.extractall(dest, filter="data")
    else:  # pragma: no cover - Python < 3.11.4
        tar.extractall(dest)


def extract_vendor(sdist: Path, pin: dict[str, str], work: Path) -> Path:
    """Extract the sdist into ``work`` and return a standalone git tree of vendor/llama.cpp."""
    with tarfile.open(sdist) as tar:
        _safe_extract(tar, work)
    top = work / sdist.name.removesuffix(".tar.gz")
    vendor = top / "vendor" / "llama.cpp"
    if not vendor.is_dir():
        raise PrepareError(f"{sdist}: no vendor/llama.cpp inside")
    head = git(vendor, "rev-parse", "HEAD").stdout.strip()
    if head != pin["commit"]:
        raise PrepareError(f"{sdist}: vendor/llama.cpp is at {head}, expected {pin['commit']}")
    dirty = git(vendor, "status", "--porcelain").stdout.strip()
    if dirty:
        raise PrepareError(f"{sdist}: vendor/llama.cpp is not a clean checkout:\n{dirty[:2000]}")
    # vendor/llama.cpp/.git is a file pointing into the sdist's superproject; make the tree
    # self-contained so it survives being moved out of the sdist.
    gitdir = top / ".git" / "modules" / "vendor" / "llama.cpp"
    (vendor / ".git").unlink()
    shutil.move(str(gitdir), str(vendor / ".git"))
    subprocess.run(["git", "config", "--file", str(vendor / ".git" / "config"), "--unset", "core.worktree"],
                   capture_output=True)
    return vendor


def apply_patches(tree: Path, patches: list[Path]) -> None:
    for p in patches:
        proc = git(tree, "apply", "--whitespace=nowarn", str(p), check=False)
        if proc.returncode != 0:
            raise PrepareError(
                f"patch {p.name} does not apply to llama.cpp {read_pin()['commit'][:12]}:\n"
                f"{proc.stderr.strip()}")
        git(tree, "add", "-A")
        git(tree, "commit", "-q", "--allow-empty", "-m", p.stem)


def sync_tree(src: Path, dst: Path) -> int:
    """Make ``dst`` equal to ``src``, rewriting only files whose bytes differ; returns that count."""
    changed = 0
    dst.mkdir(parents=True, exist_ok=True)
    for root, dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        if rel.parts[:1] == (".git",):
            continue
        if rel == Path("."):
            dirs[:] = [d for d in dirs if d != ".git"]
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for f in files:
            s, d = Path(root) / f, dst / rel / f
            if s.is_symlink() or not d.exists() or d.is_symlink() or not filecmp.cmp(s, d, shallow=False):
                if d.exists() or d.is_symlink():
                    d.unlink()
                shutil.copy2(s, d, follow_symlinks=False)
                changed += 1
    for root, dirs, files in os.walk(dst, topdown=False):
        rel = Path(root).relative_to(dst)
        if rel.parts[:1] == (".git",):
            continue
        for f in files:
            if not (src / rel / f).exists() and not (src / rel / f).is_symlink():
                (Path(root) / f).unlink()
                changed += 1
        if not (src / rel).exists():
            shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(dst / ".git", ignore_errors=True)
    shutil.copytree(src / ".git", dst / ".git", symlinks=True)
    return changed


def prepare(dest: Path, patch_dir: Path = HERE, force: bool = False) -> Path:
    pin = read_pin()
    patches = patch_files(patch_dir)
    stamp = stamp_of(pin, patches)
    stamp_file = dest.with_name(dest.name + STAMP)
    if not force and stamp_file.exists() and stamp_file.read_text().strip() == stamp:
        return dest
    sdist = pypi_file(pin["package"], pin["filename"], pin["sha256"])
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".prepare-") as tmp:
        tree = extract_vendor(sdist, pin, Path(tmp))
        apply_patches(tree, patches)
        n = sync_tree(tree, dest)
    stamp_file.write_text(stamp + "\n")
    print(f"llama.cpp {pin['commit'][:12]} + {len(patches)} patch(es) -> {dest} ({n} files updated)")
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dest", type=Path, help="where the patched tree goes, e.g. build/llama.cpp")
    ap.add_argument("--patches", type=Path, default=HERE, help="directory of *.patch files")
    ap.add_argument("--force", action="store_true", help="re-extract even if up to date")
    args = ap.parse_args(argv)
    try:
        prepare(args.dest.resolve(), args.patches.resolve(), args.force)
    except (PrepareError, FetchError) as e:
        print(f"prepare: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
