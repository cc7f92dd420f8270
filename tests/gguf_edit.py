"""Copies of GGUF files with keys or tensors changed, written without lrq's validation, so that
tests can build the bad files the loaders must refuse."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from lrq import gguf_types
from lrq.gguf_write import GGUFStreamWriter


def read(path):
    """(gguf-py reader, {name: tensor}) of a GGUF, LRQ types included."""
    gguf_types.register()
    r = gguf.GGUFReader(path)
    return r, {t.name: t for t in r.tensors}


def rewrite(src: Path, dst: Path, arch=None, kv=None, drop=(), replace=None, add=None):
    """Copy a GGUF changing keys / dropping, replacing or adding tensors (to build bad files).

    kv: {key: (value, type) | (value, ARRAY, element type) | None}: a key is replaced in place,
    added at the end when the source has none, or dropped (None).  replace / add: {name: (array,
    ggml type) | (array, ggml type, element shape)} (the shape, numpy order, for quantized data
    whose array holds bytes)."""
    kv, replace, add = kv or {}, replace or {}, add or {}
    r, tensors = read(src)
    w = GGUFStreamWriter(dst, arch or str(r.fields["general.architecture"].contents()))

    def put(k, spec):
        if spec is not None:
            w.add_kv(k, spec[0], spec[1], *spec[2:])

    with w:
        for k, f in r.fields.items():
            if k.startswith("GGUF.") or k == "general.architecture":
                continue
            if k in kv:
                put(k, kv[k])
            else:
                w.copy_field(f)
        for k, spec in kv.items():
            if k not in r.fields:
                put(k, spec)
        data = {}

        def declare(name, spec):
            arr, typ = spec[0], spec[1]
            w.add_tensor_info(name, spec[2] if len(spec) > 2 else arr.shape, typ)
            data[name] = arr

        for t in r.tensors:
            if t.name in drop:
                continue
            if t.name in replace:
                declare(t.name, replace[t.name])
            else:
                declare(t.name, (np.asarray(t.data), int(t.tensor_type), tuple(reversed(t.shape.tolist()))))
        for name, spec in add.items():
            declare(name, spec)
        w.write_header()
        for name, arr in data.items():
            w.write_tensor(name, arr)
        w.finish()
    return dst
