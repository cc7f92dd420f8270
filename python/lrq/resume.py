"""Resume directories of the layer-by-layer jobs (lrq-calibrate --resume, lrq-convert --resume).

A job that fits or quantizes a model one block at a time keeps each finished block's results in
a directory: ``layer-NNNNN.pt`` per finished layer and ``manifest.json`` naming what they were
made from (the input files, the options that change the results).  A rerun with the same
arguments loads the finished layers, replays them (their outputs feed the next layer) and goes on
at the first unfinished one, so a job killed at any point loses at most the layer it was in.

Every file is written atomically (lrq.atomic: temporary, fsync, rename, fsync of the directory),
so a kill leaves either a complete layer file or none.  A damaged one (disk error, a hand edit)
is an error naming the file, not recomputed silently: the layers after it were computed from it,
and a file that cannot be read is a sign of a problem the user should see.

The manifest identifies each input file by size and mtime and by its sha256; a file whose size
or mtime changed is hashed again and accepted when its content is the same (a copy, a
``touch``, a re-made deterministic intermediate), refused otherwise.  An option that differs from
the manifest's is refused by name; ``soft`` options (torch threads) only warn, since they change
at most the last bits of a float sum.

Layer files are ``torch.save`` dictionaries read back with ``weights_only=True`` (tensors,
numbers, strings and containers only: nothing in the directory runs code), preceded by the
sha256 of those bytes.  Each carries the manifest's run id, so a layer file of another run is
refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

from . import atomic

MANIFEST = "manifest.json"
LAYER_FILE = "layer-{:05d}.pt"
_LAYER_RE = re.compile(r"^layer-(\d{5})\.pt$")
_HASH_CHUNK = 1 << 22
# a layer file: this tag, the sha256 of the rest, the rest (torch.save's zip does not check its
# members' CRCs on reading, so a flipped byte in a tensor would load silently)
_MAGIC = b"lrq-resume-layer\n"


class ResumeError(ValueError):
    """A resume directory cannot be used for this job; the message names the file or option."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def option_flag(key: str) -> str:
    """The command-line spelling of an option key (``lr_offset`` -> ``--lr-offset``)."""
    return key if key.startswith("-") else "--" + key.replace("_", "-")


def _canonical(v: Any) -> Any:
    """The form a value has after a JSON round trip (tuples as lists, paths as strings), so that
    an option compares equal to its recorded self (1 == 1.0 holds as well)."""
    if isinstance(v, dict):
        return {str(k): _canonical(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_canonical(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if hasattr(v, "item"):          # a numpy scalar
        return v.item()
    return str(v)


class ResumeDir:
    """The resume directory of one job (see the module doc).

    ``inputs``: {role: file} whose content the results depend on (role as the user knows it,
    e.g. ``IN`` or ``--source``); ``options``: {key: value} of the options the results depend
    on (keys as ``option_flag`` spells them, or ``flags`` maps them); ``soft``: options that
    only warn through ``log`` when they differ.  ResumeError names what differs."""

    def __init__(self, directory: str | os.PathLike, job: str, inputs: Mapping[str, str | os.PathLike],
                 options: Mapping[str, Any], soft: Mapping[str, Any] | None = None,
                 flags: Mapping[str, str] | None = None, log: Callable[[str], None] = lambda s: None):
        self.dir = Path(directory)
        self.job = job
        self.flags = dict(flags or {})
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ResumeError(f"--resume {self.dir}: cannot create the directory ({e.strerror})") from None
        if not self.dir.is_dir():
            raise ResumeError(f"--resume {self.dir}: not a directory")
        atomic.remove_stale_temps(self.dir)
        options = _canonical(dict(options))
        soft = _canonical(dict(soft or {}))
        paths = {role: Path(p) for role, p in inputs.items()}
        man_path = self.dir / MANIFEST
        if man_path.is_file():
            self.manifest = self._check(man_path, paths, options, soft, log)
            self.resumed = True
        else:
            stray = self.layers_present()
            if stray:
                raise ResumeError(f"--resume {self.dir}: holds layer files ({LAYER_FILE.format(stray[0])}, "
                                  f"...) but no {MANIFEST}, so what they were made from is unknown; "
                                  f"remove them or use another directory")
            self.manifest = {"job": job, "options": options, "soft": soft,
                             "inputs": {role: {"path": str(p.resolve()), **_stamp(p), "sha256": sha256_file(p)}
                                        for role, p in paths.items()}}
            self._write_manifest()
            self.resumed = False
        ident = {"job": job, "options": options,
                 "inputs": {r: v["sha256"] for r, v in self.manifest["inputs"].items()}}
        self.run_id = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    # ---- the manifest --------------------------------------------------------------------------
    def _write_manifest(self) -> None:
        atomic.atomic_write_text(self.dir / MANIFEST, json.dumps(self.manifest, indent=1, sort_keys=True))

    def _flag(self, key: str) -> str:
        return self.flags.get(key, option_flag(key))

    def _check(self, man_path: Path, paths: dict[str, Path], options: dict, soft: dict, log) -> dict:
        try:
            man = json.loads(man_path.read_text(encoding="utf-8"))
            if not isinstance(man, dict) or not all(k in man for k in ("job", "options", "inputs")):
                raise ValueError("not a resume manifest")
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise ResumeError(f"{man_path}: cannot read the resume manifest ({e}); remove the "
                              f"directory to start again") from None
        if man["job"] != self.job:
            raise ResumeError(f"--resume {self.dir}: was made by {man['job']}, not {self.job}; use "
                              f"another directory")
        old = man["options"]
        diff = sorted(k for k in set(old) | set(options) if old.get(k) != options.get(k))
        if diff:
            what = ", ".join(f"{self._flag(k)} {_show(old.get(k))} -> {_show(options.get(k))}" for k in diff)
            raise ResumeError(f"--resume {self.dir}: made with other options ({what}); rerun with the "
                              f"options it was made with, or use another --resume directory")
        if set(man["inputs"]) != set(paths):
            raise ResumeError(f"--resume {self.dir}: made for inputs {sorted(man['inputs'])}, not "
                              f"{sorted(paths)}; use another directory")
        changed = False
        for role, p in paths.items():
            rec = man["inputs"][role]
            now = _stamp(p)
            if now["size"] == rec.get("size") and now["mtime_ns"] == rec.get("mtime_ns"):
                continue
            if now["size"] != rec.get("size") or sha256_file(p) != rec.get("sha256"):
                raise ResumeError(f"--resume {self.dir}: {role} {p} is not the file it was made from "
                                  f"({rec.get('path')}, sha256 {str(rec.get('sha256'))[:16]}...): its "
                                  f"content differs; use another --resume directory")
            rec.update(path=str(p.resolve()), **now)     # same content, new stamp: hash once only
            changed = True
        for k in sorted(set(man.get("soft", {})) | set(soft)):
            if man.get("soft", {}).get(k) != soft.get(k):
                log(f"note: {self._flag(k)} was {_show(man.get('soft', {}).get(k))} when {self.dir} was "
                    f"made, now {_show(soft.get(k))}: the resumed result may differ from an uninterrupted "
                    f"run's in the last bits")
        self.manifest = man
        if changed:
            self._write_manifest()
        return man

    # ---- layer files ---------------------------------------------------------------------------
    def layer_path(self, layer: int) -> Path:
        return self.dir / LAYER_FILE.format(layer)

    def layers_present(self) -> list[int]:
        return sorted(int(m[1]) for n in os.listdir(self.dir) if (m := _LAYER_RE.match(n)))

    def finished(self) -> int:
        """The number of layers 0..k-1 whose files are all there (the first unfinished is k)."""
        have = set(self.layers_present())
        k = 0
        while k in have:
            k += 1
        return k

    def save(self, layer: int, payload: dict) -> Path:
        import torch
        buf = io.BytesIO()
        torch.save({"run": self.run_id, "layer": layer, "data": payload}, buf)
        body = buf.getvalue()
        atomic.atomic_write_bytes(self.layer_path(layer), _MAGIC + hashlib.sha256(body).digest() + body)
        return self.layer_path(layer)

    def load(self, layer: int) -> dict:
        """The payload of a finished layer; ResumeError naming the file when it cannot be used."""
        import torch
        p = self.layer_path(layer)
        try:
            raw = p.read_bytes()
        except OSError as e:
            raise ResumeError(f"{p}: cannot read this finished layer ({e.strerror})") from None
        head = len(_MAGIC) + 32
        if len(raw) < head or raw[:len(_MAGIC)] != _MAGIC or hashlib.sha256(raw[head:]).digest() != raw[len(_MAGIC):head]:
            raise ResumeError(f"{p}: this finished layer's file is damaged (its sha256 does not match "
                              f"its content); remove it and the later layer files to compute them again")
        try:
            d = torch.load(io.BytesIO(raw[head:]), weights_only=True, map_location="cpu")
        except Exception as e:      # intact bytes torch cannot read: another torch's format
            raise ResumeError(f"{p}: cannot read this finished layer ({type(e).__name__}: {e}); remove "
                              f"it and the later layer files to compute them again") from None
        if not isinstance(d, dict) or d.get("run") != self.run_id or d.get("layer") != layer:
            raise ResumeError(f"{p}: not layer {layer} of this run (another run's file?); remove it and "
                              f"the later layer files to compute them again")
        return d["data"]

    def damaged(self, layer: int, why: str) -> ResumeError:
        """The error for a layer file that was read but does not fit this job."""
        return ResumeError(f"{self.layer_path(layer)}: {why}; remove it and the later layer files to "
                           f"compute them again")


def _show(v: Any) -> str:
    if v is None:
        return "(unset)"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, list):
        return ",".join(_show(x) for x in v) or "(none)"
    return str(v)
