"""Rewrite an LRQ GGUF with new per-replica parameters (same codes, same schedule).

Calibration produces parameters for replicas; this writes them.  The shared codes and base
group parameters are copied byte for byte; a parameter tensor given here replaces the one of the
same name or is added.  Everything is validated before the first byte is written, and the
output appears only when complete (temp file + rename).

    >>> set_replica_params("in.gguf", "out.gguf",
    ...                    {"blk.3.ffn_down.lrq_r1.gain": np.zeros(576, np.float32)})  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import gguf
import numpy as np

from ..bpw_count import count_bpw
from ..constants import (LRQ_REPLICA_PARAMS, STOCK_REPLICA_PARAMS, Keys, is_block_linear,
                         layer_of, parse_replica_param_name)
from ..gguf_hparams import numpy_shape, open_reader
from ..gguf_write import GGUFStreamWriter, WriterError, tensor_nbytes
from ..lrq_file import LRQFileError, LRQModelFile
from ..quant import QuantError, check_activation_params, n_groups
from .arch import ConvertError

F16 = int(gguf.GGMLQuantizationType.F16)
F32 = int(gguf.GGMLQuantizationType.F32)
# storage type of each replica parameter (docs/FORMAT.md, "Per-replica parameters")
PARAM_TYPE = {"scale_mult": F16, "grid_offset": F16, "gain": F32, "bias": F32, "act": F32, "clip": F32}


def _check_param(f: LRQModelFile, name: str, value: np.ndarray) -> np.ndarray:
    parsed = parse_replica_param_name(name)
    if parsed is None:
        raise ConvertError(f"{name}: not a replica parameter name (<weight>.lrq_r<k>.<param>)")
    weight, replica, param = parsed
    if not f.has_tensor(weight) or not f.is_replicable(weight):
        v1 = (" (a format version 1 file: stock-typed weights take no replica parameters)"
              if f.has_tensor(weight) and f.version < 2 and is_block_linear(weight) else "")
        raise ConvertError(f"{name}: {weight} is not an LRQ weight of {f.path}{v1}")
    allowed = LRQ_REPLICA_PARAMS if f.is_lrq(weight) else STOCK_REPLICA_PARAMS
    if param not in allowed:
        kind = "LRQ-typed" if f.is_lrq(weight) else f"stock-typed ({f.tensor_type(weight)})"
        raise ConvertError(f"{name}: a replica of {kind} weight {weight} takes "
                           f"{', '.join(allowed)}, not {param}")
    layer = layer_of(weight)
    if replica not in {e.replica for e in f.schedule if e.layer == layer}:
        raise ConvertError(f"{name}: the schedule of {f.path} never runs replica {replica} of layer {layer}")
    n_out, n_in = f.tensor_info(weight).shape
    if param in ("scale_mult", "grid_offset"):
        shapes = [(n_out, n_groups(n_in, f.group_size)), (n_out, 1), (1, 1)]
    elif param in ("gain", "bias"):
        shapes = [(n_out,)]
    elif param == "clip":
        shapes = [(1,)]
    else:
        shapes = [(2,)]
    value = np.asarray(value)
    if value.shape not in shapes:
        raise ConvertError(f"{name}: shape {list(value.shape)}, expected "
                           + " or ".join(str(list(s)) for s in shapes))
    if not np.isfinite(value).all():
        raise ConvertError(f"{name}: contains NaN or infinite values")
    if param == "clip" and not value[0] > 0:
        raise ConvertError(f"{name}: the clip bound must be > 0, got {value[0]}")
    if param == "act":
        try:
            if value[1] != int(value[1]):
                raise QuantError(f"activation bits {value[1]} is not an integer")
            check_activation_params(float(value[0]), int(value[1]))
        except QuantError as e:
            raise ConvertError(f"{name}: {e}") from None
    return value.astype(np.float16 if PARAM_TYPE[param] == F16 else np.float32)


def set_replica_params(src: str | Path, out: str | Path, params: Mapping[str, np.ndarray]) -> Path:
    """Write ``src`` to ``out`` with the replica parameter tensors of ``params`` set."""
    src, out = Path(src), Path(out)
    try:
        f = LRQModelFile(src)
    except LRQFileError as e:
        raise ConvertError(str(e)) from None
    new = {name: _check_param(f, name, v) for name, v in params.items()}
    reader = open_reader(src)
    old = {t.name: t for t in reader.tensors}
    order = list(old) + sorted(n for n in new if n not in old)

    def info(name):
        if name in new:
            return new[name].shape, PARAM_TYPE[parse_replica_param_name(name)[2]]
        t = old[name]
        return numpy_shape(t), int(t.tensor_type)

    # lrq.bpw.lrq / lrq.bpw.linears count every replica's parameters: recompute them
    bpw = count_bpw((n, *info(n), tensor_nbytes(*info(n))) for n in order)

    try:
        with GGUFStreamWriter(out, f.kv["general.architecture"]) as w:
            for key, field in reader.fields.items():
                if key.startswith("GGUF.") or key in ("general.architecture", Keys.BPW_LRQ,
                                                      Keys.BPW_LINEARS):
                    continue
                w.copy_field(field)
            if bpw["n_lrq_weights"]:
                w.add_float32(Keys.BPW_LRQ, bpw["lrq"])
            if f.version >= 2 and bpw["n_linear_weights"]:
                w.add_float32(Keys.BPW_LINEARS, bpw["linears"])
            for name in order:
                shape, type_id = info(name)
                w.add_tensor_info(name, shape, type_id)
            w.write_header()
            for name in order:
                w.write_tensor(name, new[name] if name in new else np.asarray(old[name].data))
            w.finish()
    except WriterError as e:
        raise ConvertError(str(e)) from None
    return out
