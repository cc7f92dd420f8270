"""The Python fuzz target: lrq's GGUF / LRQ readers on arbitrary bytes.

One input = the bytes of one file, written to a tmpfs file (the readers take a path) and read by

1. ``lrq.gguf_meta.read_metadata(path, keep_arrays=True)``: may refuse with ``GGUFMetaError``;
2. ``lrq.model_file.open_model(path)``, which opens an LRQ file (an ``lrq.format_version`` key or
   an ``lrq-*`` architecture) with ``lrq.lrq_file.LRQModelFile`` (validates on open) and any other
   with ``ModelFile``, then what every executor reads first of an opened file: ``hparams``,
   ``schedule`` and, for an LRQ file, ``warnings``: may refuse with ``ModelFileError`` or
   ``GGUFFileError`` (``LRQFileError`` is one).

(LRQModelFile is not called on its own as well: on a file that open_model sends elsewhere it
only parses the GGUF again and refuses it for its missing lrq.* keys, at the cost of a third
gguf-py parse per execution, the bulk of the time.)

Anything else escaping (IndexError, KeyError, struct.error, OverflowError, ZeroDivisionError, a
plain ValueError from int("x"), numpy errors, ...) is a bug: a reader must say which file and key
is bad.  ``run_one`` raises ``Finding`` for it; ``TestOneInput`` is the atheris entry point.
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

# tmpfs when there is one: the input file is rewritten for every execution
_TMP_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(os.environ.get("TMPDIR", "/tmp"))
_PATH = _TMP_DIR / f"lrq-fuzz-{os.getpid()}.gguf"
# the input files of both fuzzers (lrq_load_fuzzer.cpp: lrq-load-fuzz-<pid>.gguf)
_PATTERNS = ("lrq-fuzz-*.gguf", "lrq-load-fuzz-*.gguf")


def sweep_stale() -> int:
    """Remove the input files of fuzzer processes that are gone: libFuzzer ends a process with
    exit() or a crash (every child of -fork mode), so none cleans up after itself."""
    n = 0
    for d in {_TMP_DIR, Path("/dev/shm"), Path("/tmp")}:
        for pat in _PATTERNS:
            for f in d.glob(pat) if d.is_dir() else ():
                try:
                    os.kill(int(f.stem.rsplit("-", 1)[1]), 0)
                    continue                  # its process is alive
                except ProcessLookupError:
                    pass
                except (ValueError, PermissionError):
                    continue
                f.unlink(missing_ok=True)
                n += 1
    return n

_READERS = None


def _readers():
    """Imported lazily so that atheris can instrument the modules first (run.py)."""
    global _READERS
    if _READERS is None:
        from lrq.gguf_hparams import GGUFFileError
        from lrq.gguf_meta import GGUFMetaError, read_metadata
        from lrq.model_file import ModelFileError, open_model
        _READERS = dict(read_metadata=read_metadata, open_model=open_model,
                        meta_err=(GGUFMetaError,), model_err=(ModelFileError, GGUFFileError))
    return _READERS


class Finding(Exception):
    """An exception of a type the reader must not raise; ``signature`` identifies the bug."""

    def __init__(self, stage: str, exc: BaseException):
        self.stage, self.exc = stage, exc
        tb = traceback.extract_tb(exc.__traceback__)
        # innermost frame in lrq or gguf-py code: where the unchecked failure happened
        own = [f for f in tb if "/lrq/" in f.filename or "/gguf/" in f.filename] or tb
        where = f"{Path(own[-1].filename).name}:{own[-1].lineno}" if own else "?"
        self.signature = f"{stage}:{type(exc).__name__}@{where}"
        self.trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        super().__init__(f"{self.signature}: {exc}")


def _stage(name: str, allowed: tuple, fn) -> bool:
    """True when fn() returned, False when it refused with an allowed error; Finding otherwise."""
    try:
        fn()
        return True
    except allowed:
        return False
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as e:   # noqa: BLE001 - any other type is the finding
        raise Finding(name, e) from e


def run_one(data: bytes, path: Path | None = None) -> dict[str, bool]:
    """Read ``data`` as a file with every reader; {stage: accepted}.  Raises Finding."""
    r = _readers()
    path = Path(path or _PATH)
    # a new inode each time: a memmap of the previous input never sees this one's bytes
    path.unlink(missing_ok=True)
    path.write_bytes(data)
    out = {"read_metadata": _stage("read_metadata", r["meta_err"],
                                   lambda: r["read_metadata"](path, keep_arrays=True))}

    def model():
        m = r["open_model"](path)
        m.hparams, m.schedule
        if hasattr(m, "warnings"):   # LRQModelFile
            m.warnings
            m.close()

    out["open_model"] = _stage("open_model", r["model_err"], model)
    return out


class Collector:
    """Keep-going mode: each distinct finding's first input is saved to ``out_dir`` (with its
    traceback) and counted, and fuzzing goes on (atheris stops at the first crash otherwise)."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.counts: dict[str, int] = {}

    def __call__(self, data: bytes) -> None:
        try:
            run_one(data)
        except Finding as f:
            n = self.counts.get(f.signature, 0)
            self.counts[f.signature] = n + 1
            if n == 0:
                stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in f.signature)
                (self.out_dir / f"{stem}.gguf").write_bytes(data)
                (self.out_dir / f"{stem}.txt").write_text(f.trace)
            # libFuzzer ends the process with exit(), no Python clean-up runs: keep the file
            # current (a small write next to a reader run of ~10 ms)
            (self.out_dir / "counts.json").write_text(json.dumps(self.counts, indent=1))


def TestOneInput(data: bytes) -> None:   # noqa: N802 - atheris's name
    run_one(data)
