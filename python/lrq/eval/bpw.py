"""Whole-file bits per weight of any GGUF, LRQ or stock (docs/FORMAT.md section 9).

bpw = 8 x (sum of all tensor data bytes) / (number of base parameters).  For an LRQ file the
base parameters exclude the LRQ parameter tensors (``lrq_scale``, ``lrq_min``, ``lrq_r*``) and
the figure comes from ``LRQModelFile.bpw()``; for a stock file every tensor is a base tensor.
Embeddings and the output head are included: this is the size a user downloads per weight.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..constants import Keys, is_block_linear
from ..gguf_hparams import open_reader, read_kv


@dataclass(frozen=True)
class FileBpw:
    bpw: float
    tensor_bytes: int
    n_params: int
    kind: str                 # "lrq" | "stock"
    file_type: str            # the most common tensor type of the block linears, or layout_label
    bpw_linears: float = float("nan")   # block linears only (LRQ: codes + every parameter tensor)


def _dominant_type(reader) -> str:
    from collections import Counter
    c: Counter = Counter()
    for t in reader.tensors:
        if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2:
            c[t.tensor_type.name if hasattr(t.tensor_type, "name") else str(t.tensor_type)] += int(t.n_elements)
    return c.most_common(1)[0][0] if c else "?"


def layout_label(f) -> str:
    """What an LRQ file's weights are, for lrq-eval's type column and lrq-inspect: "LRQ2 g64",
    "LRQ2 two-level B16/S256" (sub-blocks of B, super-blocks of S = the group size, FORMAT.md
    3.3); a mixed file (--mix) names its most common layout by weights, then the other widths
    ("LRQ2 two-level B16/S256 + LRQ3, LRQ4": those are single-level groups of the same size)."""
    from collections import Counter

    from ..constants import sub_name
    names = set(f.tensor_names)
    c: Counter = Counter()
    for name in f.lrq_weights():
        if not name.endswith(".weight"):            # low-rank factors are no base weights
            continue
        ti = f.tensor_info(name)
        n_out, n_in = ti.shape[0], ti.shape[-1]
        sub = sub_name(name)
        B = n_in // f.tensor_info(sub).shape[-1] if sub in names else 0
        c[(ti.lrq_bits, B)] += n_out * n_in
    if not c:
        return "LRQ"
    keys = [k for k, _ in c.most_common()]
    (bits, B), rest = keys[0], keys[1:]
    head = f"LRQ{bits} two-level B{B}/S{f.group_size}" if B else f"LRQ{bits} g{f.group_size}"
    if not rest:
        return head
    return head + " + " + ", ".join(f"LRQ{b}" + (f" two-level B{sb}" if sb else "") for b, sb in sorted(rest))


def file_bpw(path: str | os.PathLike, adapter: str | os.PathLike | None = None,
             layers: str | None = None) -> FileBpw:
    """Whole-file bpw of a GGUF; GGUFFileError / LRQFileError (naming the file) if unreadable.
    With ``adapter`` (FORMAT.md 11): of the base and the adapter's tensors together (what a user
    downloads); a layer map adds no tensor, so the base's own figure stands."""
    path = Path(path)
    if adapter is not None:
        from ..adapter import BoundModelFile
        m = BoundModelFile(path, adapter, layers)
        b = m.bpw()
        label = f"{_dominant_type(m._reader)} + adapter"
        return FileBpw(float(b["file"]), int(b["tensor_bytes"]), int(b["n_base_params"]), "lrq",
                       label, float(b["linears"]))
    if layers is not None:
        from ..adapter import BoundModelFile
        BoundModelFile(path, layers=layers).close()      # an invalid map is refused by name here
    reader = open_reader(path)
    kv = read_kv(reader)
    if Keys.FORMAT_VERSION in kv:
        from ..lrq_file import LRQModelFile
        f = LRQModelFile(path)
        b = f.bpw()
        # a stock-typed base (format v2) is named by its llama-quantize type, LRQ codes by their
        # layout, bits and group (layout_label)
        label = f"{kv[Keys.BASE_TYPE]} base" if Keys.BASE_TYPE in kv else layout_label(f)
        return FileBpw(float(b["file"]), int(b["tensor_bytes"]), int(b["n_base_params"]), "lrq",
                       label, float(b["linears"]))
    nbytes = sum(int(t.n_bytes) for t in reader.tensors)
    n = sum(int(t.n_elements) for t in reader.tensors)
    if n == 0:
        raise ValueError(f"{path}: the file has no tensors")
    lin = [t for t in reader.tensors if is_block_linear(t.name) and len(t.shape) == 2]
    ln = sum(int(t.n_elements) for t in lin)
    lin_bpw = 8.0 * sum(int(t.n_bytes) for t in lin) / ln if ln else float("nan")
    return FileBpw(8.0 * nbytes / n, nbytes, n, "stock", _dominant_type(reader), lin_bpw)
