"""A streaming, atomic GGUF writer that refuses calls in the wrong order.

The file is written in GGUF order, and so are the calls:

    KV (add_*)  ->  TENSOR_INFO (add_tensor_info)  ->  DATA (write_header, write_tensor...)  ->  DONE (finish)

Every tensor is declared (name, shape, type) before any data is written, so the data can be
produced and written one tensor at a time: peak memory is one tensor's working set, never the
model.  Everything goes to a temporary file next to the destination (lrq.atomic), fsynced and
renamed over it by ``finish()``; ``abort()`` (or leaving the ``with`` block with an exception)
deletes it, so an error leaves nothing half-written behind.  A killed writer leaves only its
temporary file, which the next writer of the same destination removes.

gguf-py's GGUFWriter does the byte-level encoding (its own state checks stay active underneath).

    with GGUFStreamWriter(out, "lrq-llama") as w:
        w.add_uint32("lrq.format_version", 1)
        w.add_tensor_info("blk.0.attn_q.weight", (576, 576), LRQType.LRQ2)
        w.write_header()
        w.write_tensor("blk.0.attn_q.weight", codes)
        w.finish()
"""

from __future__ import annotations

import os
from enum import Enum, auto
from pathlib import Path
from typing import Any, Sequence

import gguf
import numpy as np

from . import atomic, gguf_types

GGUFValueType = gguf.GGUFValueType


class WriterError(RuntimeError):
    """Wrong call order, a tensor that does not match its declaration, or an unwritable output."""


class State(Enum):
    KV = auto()
    TENSOR_INFO = auto()
    DATA = auto()
    DONE = auto()
    ABORTED = auto()


def tensor_nbytes(shape: Sequence[int], ggml_type: int) -> int:
    """Bytes of a tensor of numpy shape ``shape`` (last axis = ne0) and ggml type."""
    gguf_types.register()
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(ggml_type))]
    n = int(np.prod(shape, dtype=np.int64))
    if shape and shape[-1] % block:
        raise WriterError(f"a row of {shape[-1]} elements is not a whole number of {block}-element blocks")
    return n // block * size


def check_output_path(path: str | os.PathLike) -> Path:
    """The destination as a Path; WriterError unless its directory exists and is writable."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise WriterError(f"output directory {parent} does not exist (for {p})")
    if p.is_dir():
        raise WriterError(f"output {p} is a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise WriterError(f"output directory {parent} is not writable (for {p})")
    return p


class GGUFStreamWriter:
    def __init__(self, path: str | os.PathLike, arch: str):
        gguf_types.register()
        self.path = check_output_path(path)
        parent = self.path.parent if str(self.path.parent) else Path(".")
        atomic.remove_stale_temps(parent, self.path.name)     # left by killed writers
        try:
            # created by the kernel with mode 0666 & ~umask, the permissions open() gives
            fd, tmp = atomic.create_temp(self.path)
        except OSError as e:
            raise WriterError(f"cannot create a file in {parent}: {e.strerror or e}") from None
        os.close(fd)
        self.tmp_path = tmp
        self._w = gguf.GGUFWriter(None, arch)
        self._order: list[tuple[str, int]] = []        # (name, nbytes) in declaration order
        self._next = 0
        self.state = State.KV
        self.data_bytes = 0

    # ---- order checks -------------------------------------------------------------------
    def _require(self, *states: State, action: str) -> None:
        if self.state not in states:
            raise WriterError(f"cannot {action} in state {self.state.name} "
                              f"(allowed in: {', '.join(s.name for s in states)})")

    # ---- KV -----------------------------------------------------------------------------
    def add_kv(self, key: str, value: Any, vtype: GGUFValueType, sub_type: GGUFValueType | None = None) -> None:
        self._require(State.KV, action=f"add key {key!r}")
        if vtype == GGUFValueType.ARRAY and len(value) == 0:
            raise WriterError(f"key {key!r}: GGUF arrays cannot be empty")
        if key in self._w.kv_data[0]:   # general.architecture is set by the constructor
            raise WriterError(f"key {key!r} added twice")
        self._w.add_key_value(key, value, vtype, sub_type)

    def add_uint32(self, key: str, v: int) -> None:
        if not (0 <= int(v) < 1 << 32):
            raise WriterError(f"key {key!r}: {v} does not fit in uint32")
        self.add_kv(key, int(v), GGUFValueType.UINT32)

    def add_float32(self, key: str, v: float) -> None:
        self.add_kv(key, float(v), GGUFValueType.FLOAT32)

    def add_string(self, key: str, v: str) -> None:
        self.add_kv(key, str(v), GGUFValueType.STRING)

    def add_array(self, key: str, values: Sequence[Any], sub_type: GGUFValueType) -> None:
        self.add_kv(key, list(values), GGUFValueType.ARRAY, sub_type)

    def copy_field(self, field) -> None:
        """Copy a key of a gguf.GGUFReader (scalars, strings, one-level arrays)."""
        types = list(field.types)
        # strings are copied as their bytes: GGUF strings need not be UTF-8 (llama.cpp takes any
        # bytes), and a copy must not change them
        if types[0] == GGUFValueType.ARRAY:
            if len(types) != 2:
                raise WriterError(f"key {field.name!r}: nested arrays are not supported")
            value = ([bytes(field.parts[i]) for i in field.data] if types[1] == GGUFValueType.STRING
                     else field.contents())
            self.add_kv(field.name, value, GGUFValueType.ARRAY, types[1])
        elif types[0] == GGUFValueType.STRING:
            self.add_kv(field.name, bytes(field.parts[field.data[0]]), types[0])
        else:
            self.add_kv(field.name, field.contents(), types[0])

    # ---- tensor infos --------------------------------------------------------------------
    def add_tensor_info(self, name: str, shape: Sequence[int], ggml_type: int) -> int:
        """Declare a tensor (numpy shape, i.e. [n_out, n_in] for a weight); returns its bytes."""
        self._require(State.KV, State.TENSOR_INFO, action=f"declare tensor {name!r}")
        shape = tuple(int(s) for s in shape)
        nbytes = tensor_nbytes(shape, ggml_type)
        try:
            # a float32 dtype tells gguf-py that `shape` is already in elements
            self._w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes,
                                    raw_dtype=gguf.GGMLQuantizationType(int(ggml_type)))
        except ValueError as e:
            raise WriterError(f"tensor {name!r}: {e}") from None
        self._order.append((name, nbytes))
        self.state = State.TENSOR_INFO
        return nbytes

    # ---- header and data -----------------------------------------------------------------
    def write_header(self) -> None:
        """Write header, KV and tensor infos; tensor data may follow."""
        self._require(State.KV, State.TENSOR_INFO, action="write the header")
        self._w.write_header_to_file(self.tmp_path)
        self._w.write_kv_data_to_file()
        self._w.write_ti_data_to_file()
        self.state = State.DATA

    def write_tensor(self, name: str, data: np.ndarray) -> None:
        """Write the next declared tensor's bytes (any dtype; the byte count must match)."""
        self._require(State.DATA, action=f"write tensor {name!r}")
        if self._next >= len(self._order):
            raise WriterError(f"tensor {name!r} was never declared (all {len(self._order)} written)")
        want, nbytes = self._order[self._next]
        if name != want:
            raise WriterError(f"tensor {name!r} written out of order: {want!r} comes next")
        data = np.ascontiguousarray(data)
        if data.nbytes != nbytes:
            raise WriterError(f"tensor {name!r}: {data.nbytes} bytes given, {nbytes} declared")
        self._w.write_tensor_data(data)
        self._next += 1
        self.data_bytes += nbytes

    def finish(self) -> Path:
        """Check every tensor was written, then atomically rename the file into place."""
        self._require(State.DATA, action="finish")
        if self._next != len(self._order):
            missing = self._order[self._next][0]
            raise WriterError(f"{len(self._order) - self._next} declared tensors were not written "
                              f"(next: {missing!r})")
        fout = self._w.fout[0]
        fout.flush()
        os.fsync(fout.fileno())
        self._w.close()
        atomic.commit(self.tmp_path, self.path, synced=True)
        self.state = State.DONE
        return self.path

    def abort(self) -> None:
        """Drop everything written so far (idempotent)."""
        if self.state in (State.DONE, State.ABORTED):
            return
        try:
            self._w.close()
        finally:
            self.tmp_path.unlink(missing_ok=True)
            self.state = State.ABORTED

    def __enter__(self) -> "GGUFStreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.state != State.DONE:
            self.abort()
            if exc_type is None:
                raise WriterError(f"{self.path}: the writer was left without finish(); nothing written")
