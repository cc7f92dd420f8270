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

from ..constants import Keys, is_aux_tensor, layer_of, lrq_bits, parse_replica_param_name
from ..gguf_hparams import numpy_shape, open_reader
from ..gguf_write import GGUFStreamWriter, WriterError, tensor_nbytes
from ..lrq_file import LRQFileError, LRQModelFile
from ..quant import QuantError, check_activation_params, n_groups
from .arch import ConvertError

F16 = int(gguf.GGMLQuantizationType.F16)
F32 = int(gguf.GGMLQuantizationType.F32)
# storage type of each replica parameter (docs/FORMAT.md, "Per-replica parameters")
PARAM_TYPE = {"scale_mult": F16, "grid_offset": F16, "gain": F32, "bias": F32, "act": F32}


def _check_param(f: LRQModelFile, name: str, value: np.ndarray) -> np.ndarray:
    parsed = parse_replica_param_name(name)
    if parsed is None:
        raise ConvertError(f"{name}: not a replica parameter name (<weight>.lrq_r<k>.<param>)")
    weight, replica, param = parsed
    if not f.has_tensor(weight) or not f.is_lrq(weight):
        raise ConvertError(f"{name}: {weight} is not an LRQ weight of {f.path}")
    layer = layer_of(weight)
    if replica not in {e.replica for e in f.schedule if e.layer == layer}:
        raise ConvertError(f"{name}: the schedule of {f.path} never runs replica {replica} of layer {layer}")
    n_out, n_in = f.tensor_info(weight).shape
    if param in ("scale_mult", "grid_offset"):
        shapes = [(n_out, n_groups(n_in, f.group_size)), (n_out, 1), (1, 1)]
    elif param in ("gain", "bias"):
        shapes = [(n_out,)]
    else:
        shapes = [(2,)]
    value = np.asarray(value)
    if value.shape not in shapes:
        raise ConvertError(f"{name}: shape {list(value.shape)}, expected "
                           + " or ".join(str(list(s)) for s in shapes))
    if not np.isfinite(value).all():
        raise ConvertError(f"{name}: contains NaN or infinite values")
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

    # lrq.bpw.lrq counts every replica's parameters: recompute it for the new tensor set
    lrq_bits_total = n_lrq = 0
    for name in order:
        shape, type_id = info(name)
        if lrq_bits(type_id) is not None:
            n_lrq += int(np.prod(shape))
        if lrq_bits(type_id) is not None or is_aux_tensor(name):
            lrq_bits_total += 8 * tensor_nbytes(shape, type_id)

    try:
        with GGUFStreamWriter(out, f.kv["general.architecture"]) as w:
            for key, field in reader.fields.items():
                if key.startswith("GGUF.") or key in ("general.architecture", Keys.BPW_LRQ):
                    continue
                w.copy_field(field)
            w.add_float32(Keys.BPW_LRQ, lrq_bits_total / n_lrq)
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
