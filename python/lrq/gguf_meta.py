"""Read the metadata (key/value) section of a GGUF file without touching its tensors.

gguf-py's GGUFReader parses the tensor table too and refuses tensor types it does not know
(the LRQ types of the patched ggml), so it cannot tell us what kind of file we hold.  This
scanner reads only the header and the key/value pairs, with errors that name the file.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

GGUF_MAGIC = b"GGUF"

# GGUF value type id -> struct format of one scalar (GGUF is little-endian on disk here)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFMetaError(ValueError):
    """The file is not a readable GGUF (missing, truncated, or not GGUF at all)."""


class _Cursor:
    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise GGUFMetaError(f"{self.path}: truncated GGUF header (needs byte {self.pos + n}, "
                                f"file has {len(self.data)})")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        return self.take(n).decode("utf-8", errors="replace")

    def value(self, vtype: int, keep: bool):
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.scalar("<I"), self.scalar("<Q")
            if etype in _SCALAR and not keep:
                self.take(n * struct.calcsize(_SCALAR[etype]))
                return None
            if etype in _SCALAR:
                fmt = _SCALAR[etype]
                return list(struct.unpack(f"<{n}{fmt[1]}", self.take(n * struct.calcsize(fmt))))
            items = [self.value(etype, keep) for _ in range(n)]
            return items if keep else None
        raise GGUFMetaError(f"{self.path}: unknown GGUF value type {vtype} at byte {self.pos}")


def read_metadata(path: str | os.PathLike, keep_arrays: bool = False) -> dict:
    """The key/value pairs of a GGUF file (arrays as None unless ``keep_arrays``).

    Adds ``GGUF.version``, ``GGUF.tensor_count``, ``GGUF.kv_count`` and ``GGUF.tensor_infos``:
    a list of (name, ggml dims, ggml type id, absolute data offset) read from the tensor table.
    """
    path = Path(path)
    if not path.is_file():
        raise GGUFMetaError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(4)
        if head != GGUF_MAGIC:
            raise GGUFMetaError(f"{path}: not a GGUF file (magic {head!r}, expected {GGUF_MAGIC!r})")
        f.seek(0)
        # The metadata of real models (token lists of ~150k entries) fits in a few MB; read
        # more only if the scan runs past what was read.
        size = os.path.getsize(path)
        want = min(size, 16 << 20)
        while True:
            f.seek(0)
            data = f.read(want)
            try:
                return _parse(data, path, keep_arrays)
            except GGUFMetaError:
                if want >= size:
                    raise
                want = min(size, want * 4)


def _parse(data: bytes, path: Path, keep_arrays: bool) -> dict:
    c = _Cursor(data, path)
    c.take(4)
    version = c.scalar("<I")
    if version not in (2, 3):
        raise GGUFMetaError(f"{path}: unsupported GGUF version {version} (expected 2 or 3)")
    n_tensors, n_kv = c.scalar("<Q"), c.scalar("<Q")
    if n_kv > 1_000_000 or n_tensors > 10_000_000:
        raise GGUFMetaError(f"{path}: implausible GGUF header ({n_tensors} tensors, {n_kv} keys)")
    out: dict = {"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_kv}
    for _ in range(n_kv):
        key = c.string()
        vtype = c.scalar("<I")
        out[key] = c.value(vtype, keep_arrays)
    infos = []
    for _ in range(n_tensors):
        name = c.string()
        n_dims = c.scalar("<I")
        if n_dims > 8:
            raise GGUFMetaError(f"{path}: tensor '{name}' has {n_dims} dimensions (corrupt tensor table)")
        dims = [c.scalar("<Q") for _ in range(n_dims)]
        ttype, offset = c.scalar("<I"), c.scalar("<Q")
        infos.append((name, dims, ttype, offset))
    align = int(out.get("general.alignment", 32) or 32)
    data_start = (c.pos + align - 1) // align * align
    out["GGUF.tensor_infos"] = [(n, d, t, data_start + o) for n, d, t, o in infos]
    return out


def check_tensor_extents(path: Path, meta: dict, type_sizes: dict[int, tuple[int, int]]) -> None:
    """Raise GGUFMetaError naming the file and the tensor when the data of a tensor runs past
    the end of the file.  ``type_sizes``: ggml type id -> (block size, bytes per block)."""
    size = Path(path).stat().st_size
    for name, dims, ttype, start in meta["GGUF.tensor_infos"]:
        if ttype not in type_sizes:
            raise GGUFMetaError(f"{path}: tensor '{name}' has unknown ggml type id {ttype}")
        block, nbytes = type_sizes[ttype]
        n = 1
        for d in dims:
            n *= d
        end = start + n // block * nbytes
        if end > size:
            raise GGUFMetaError(f"{path}: truncated: tensor '{name}' needs bytes up to {end}, "
                                f"the file has {size}")
