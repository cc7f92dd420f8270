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
from ..constants import (LOWRANK_MAX_RANK, LOWRANK_PARAMS, LOWRANK_VERSION, LRQ_REPLICA_PARAMS,
                         STOCK_REPLICA_PARAMS, Keys, is_block_linear, layer_of,
                         parse_replica_param_name, replica_param_name)
from ..gguf_hparams import numpy_shape, open_reader
from ..gguf_write import GGUFStreamWriter, WriterError, tensor_nbytes
from ..lrq_file import LRQFileError, LRQModelFile
from ..quant import QuantError, check_activation_params, n_groups
from .arch import ConvertError

F16 = int(gguf.GGMLQuantizationType.F16)
F32 = int(gguf.GGMLQuantizationType.F32)
# storage type of each replica parameter (docs/FORMAT.md, "Per-replica parameters")
PARAM_TYPE = {"scale_mult": F16, "grid_offset": F16, "gain": F32, "bias": F32, "act": F32, "clip": F32,
              "lr_u": F16, "lr_v": F16}
Q8_0 = int(gguf.GGMLQuantizationType.Q8_0)
Q8_0_BLOCK = 32
# storage of the low-rank factors (FORMAT.md 6.2): F16, or Q8_0 for each factor whose rows (rank
# for lr_u, n_in for lr_v) are whole Q8_0 blocks (the others stay F16)
LOWRANK_TYPES = ("F16", "Q8_0")


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
    if param in LOWRANK_PARAMS:
        value = np.asarray(value)
        if value.ndim != 2 or value.shape[0 if param == "lr_u" else 1] != (n_out if param == "lr_u" else n_in):
            want = f"[{n_out}, rank]" if param == "lr_u" else f"[rank, {n_in}]"
            raise ConvertError(f"{name}: shape {list(value.shape)}, expected {want}")
        rank = value.shape[1 if param == "lr_u" else 0]
        if not 1 <= rank <= min(n_out, n_in, LOWRANK_MAX_RANK):
            raise ConvertError(f"{name}: rank {rank} is outside 1..{min(n_out, n_in, LOWRANK_MAX_RANK)}")
        if not np.isfinite(value).all():
            raise ConvertError(f"{name}: contains NaN or infinite values")
        return value.astype(np.float32)
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


def _lowrank_storage(new: dict[str, np.ndarray], lowrank_type: str) -> dict[str, int]:
    """{name: ggml type} of the low-rank factors among ``new``, whose float32 values are replaced
    by their stored bytes (Q8_0) in place."""
    if lowrank_type not in LOWRANK_TYPES:
        raise ConvertError(f"low-rank factor type must be one of {', '.join(LOWRANK_TYPES)}, got {lowrank_type!r}")
    types = {}
    for name, v in new.items():
        if parse_replica_param_name(name)[2] not in LOWRANK_PARAMS:
            continue
        if lowrank_type == "Q8_0" and v.shape[1] % Q8_0_BLOCK == 0:
            new[name] = gguf.quants.quantize(v, gguf.GGMLQuantizationType.Q8_0)
            types[name] = Q8_0
        else:
            new[name] = v.astype(np.float16)
            types[name] = F16
    return types


def _check_lowrank_pairs(f: LRQModelFile, old: dict, new: dict) -> None:
    """Both factors of a replica's low-rank correction, of one rank, in the written file."""
    def rank(name):
        if name in new:
            return new[name]["shape"]
        return None if name not in old else tuple(reversed(old[name].shape.tolist()))
    seen = set()
    for name in list(new) + list(old):
        p = parse_replica_param_name(name)
        if p is None or p[2] not in LOWRANK_PARAMS or (p[0], p[1]) in seen:
            continue
        seen.add((p[0], p[1]))
        u, v = (replica_param_name(p[0], p[1], q) for q in LOWRANK_PARAMS)
        su, sv = rank(u), rank(v)
        if su is None or sv is None:
            raise ConvertError(f"{u if su is None else v}: missing; a low-rank correction needs both "
                               f"lr_u and lr_v")
        if su[1] != sv[0]:
            raise ConvertError(f"{u} has rank {su[1]}, {v} rank {sv[0]}: they must agree")


def set_replica_params(src: str | Path, out: str | Path, params: Mapping[str, np.ndarray],
                       lowrank_type: str = "F16") -> Path:
    """Write ``src`` to ``out`` with the replica parameter tensors of ``params`` set.

    Low-rank factors (``lr_u`` / ``lr_v``) are given as float arrays and stored as
    ``lowrank_type`` (LOWRANK_TYPES); a file that holds any is written as format version
    LOWRANK_VERSION (or its own version, when newer)."""
    src, out = Path(src), Path(out)
    try:
        f = LRQModelFile(src)
    except LRQFileError as e:
        raise ConvertError(str(e)) from None
    new = {name: _check_param(f, name, v) for name, v in params.items()}
    reader = open_reader(src)
    old = {t.name: t for t in reader.tensors}
    _check_lowrank_pairs(f, old, {n: {"shape": v.shape} for n, v in new.items()})
    types = {name: PARAM_TYPE[parse_replica_param_name(name)[2]] for name in new}
    shapes = {name: v.shape for name, v in new.items()}
    types.update(_lowrank_storage(new, lowrank_type))
    order = list(old) + sorted(n for n in new if n not in old)
    has_lowrank = any((p := parse_replica_param_name(n)) is not None and p[2] in LOWRANK_PARAMS for n in order)
    version = max(f.version, LOWRANK_VERSION) if has_lowrank else f.version

    def info(name):
        if name in new:
            return shapes[name], types[name]
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
                if key == Keys.FORMAT_VERSION:
                    w.add_uint32(key, version)
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
