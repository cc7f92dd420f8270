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
    """Copy a GGUF changing keys / dropping, replacing or adding tensors (to build bad files)."""
    kv, replace, add = kv or {}, replace or {}, add or {}
    r, tensors = read(src)
    w = GGUFStreamWriter(dst, arch or str(r.fields["general.architecture"].contents()))
    with w:
        for k, f in r.fields.items():
            if k.startswith("GGUF.") or k == "general.architecture":
                continue
            if k in kv:
                v, vt = kv[k]
                w.add_kv(k, v, vt)
            else:
                w.copy_field(f)
        data = {}
        for t in r.tensors:
            if t.name in drop:
                continue
            arr, typ = replace.get(t.name, (np.asarray(t.data), int(t.tensor_type)))
            shape = arr.shape if t.name in replace else tuple(reversed(t.shape.tolist()))
            w.add_tensor_info(t.name, shape, typ)
            data[t.name] = arr
        for name, (arr, typ) in add.items():
            w.add_tensor_info(name, arr.shape, typ)
            data[name] = arr
        w.write_header()
        for name, arr in data.items():
            w.write_tensor(name, arr)
        w.finish()
    return dst
