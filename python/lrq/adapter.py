"""lrq adapters (docs/FORMAT.md section 11): a schedule and replica parameters for an unchanged base.

An adapter is a small GGUF (``general.architecture = lrq-adapter``) holding only replica tensors
and a schedule, bound at load time to a base GGUF — a stock llama.cpp file of any type or an LRQ
file — whose modified weights it identifies by name, type, shape and a CRC-32 of sampled data.

    >>> a = AdapterFile("smol.adapter.gguf")                       # doctest: +SKIP (rule AD1)
    >>> m = bind("smol.IQ2_XS.gguf", "smol.adapter.gguf")          # doctest: +SKIP (AD2-AD5)
    >>> m.schedule, m.weight("blk.0.attn_q.weight", 1)             # doctest: +SKIP
    >>> write_adapter("smol.IQ2_XS.gguf", plan, {"blk.0.attn_q.lrq_r0.gain": (g, F32)}, "a.gguf")
    >>> split_lrq_file("smol.lrq.gguf", "smol.adapter.gguf", "smol.base.gguf")  # doctest: +SKIP

``BoundModelFile`` is the Python view of base + adapter (or base + layer map) as one model: the
interface of ``lrq.lrq_file.LRQModelFile`` (the reference executor, lrq-calibrate, lrq-inspect),
a stock base seen as a format-v3 LRQ file with stock-typed weights.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any, Mapping

import gguf
import numpy as np

from . import atomic
from .bpw_count import count_bpw
from .constants import (ADAPTER_ARCH, ADAPTER_HASH_CHUNK, ADAPTER_HASH_CHUNKS, ADAPTER_HASH_WHOLE_MAX,
                        ADAPTER_VERSION, ADAPTER_VERSION_MIN, ARCH_PREFIX, FORMAT_VERSION,
                        FORMAT_VERSION_MIN, LOWRANK_PARAMS, LOWRANK_VERSION, SUPPORTED_ARCHS, Keys,
                        base_arch, is_block_linear, lrq_arch, parse_replica_param_name)
from .gguf_hparams import GGUFFileError, check_tokens_unique, numpy_shape, open_reader, read_kv
from .gguf_write import GGUFStreamWriter, check_output_path
from .lrq_file import LRQFileError, LRQModelFile
from .plan import Plan, PlanError, layer_map

SCHEDULE_KEYS = (Keys.SCHEDULE_LAYER, Keys.SCHEDULE_REPLICA, Keys.SCHEDULE_GROUP, Keys.SCHEDULE_WEIGHT)
REQUIRED_ADAPTER_KEYS = (Keys.ADAPTER_VERSION, Keys.FORMAT_VERSION, *SCHEDULE_KEYS, Keys.ADAPTER_BASE_ARCH,
                         Keys.ADAPTER_BASE_BLOCK_COUNT, Keys.ADAPTER_BASE_TENSORS, Keys.ADAPTER_BASE_TYPES,
                         Keys.ADAPTER_BASE_SHAPES, Keys.ADAPTER_BASE_CRC32)


class AdapterError(LRQFileError):
    """An adapter is invalid or does not bind to a base; the message names the adapter, the base
    and the first difference (with the rule id of FORMAT.md section 11)."""


# ---- the content hash --------------------------------------------------------------------------

def sample_crc32(buf) -> int:
    """CRC-32 (zlib) of the sample of a tensor's data bytes (FORMAT.md 11, "Content hash"): all of
    them up to ADAPTER_HASH_WHOLE_MAX bytes, else ADAPTER_HASH_CHUNKS chunks of ADAPTER_HASH_CHUNK
    bytes starting at floor(k * (nbytes - chunk) / (chunks - 1)).  ``buf``: the bytes as stored
    (bytes, a memoryview, or a numpy array / memmap, read as its raw bytes)."""
    if isinstance(buf, np.ndarray):
        a = np.ascontiguousarray(buf).reshape(-1).view(np.uint8)
    else:
        a = np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8)
    n = int(a.size)
    if n <= ADAPTER_HASH_WHOLE_MAX:
        return zlib.crc32(a.tobytes()) & 0xFFFFFFFF
    crc = 0
    for k in range(ADAPTER_HASH_CHUNKS):
        start = k * (n - ADAPTER_HASH_CHUNK) // (ADAPTER_HASH_CHUNKS - 1)
        crc = zlib.crc32(a[start:start + ADAPTER_HASH_CHUNK].tobytes(), crc)
    return crc & 0xFFFFFFFF


def _raw(reader: gguf.GGUFReader, t) -> np.ndarray:
    """A tensor's data bytes as stored in the file (a memmap view: nothing is read until hashed)."""
    off = int(t.data_offset)
    return reader.data[off:off + int(t.n_bytes)]


def _ne01(t) -> tuple[int, int]:
    """(ne0, ne1) of a reader tensor (a 1-D tensor has ne1 = 1)."""
    ne = [int(x) for x in t.shape.tolist()] + [1]
    return ne[0], ne[1]


# ---- the adapter file on its own (rule AD1) ----------------------------------------------------

class AdapterFile:
    """An opened adapter, checked on its own (rule AD1): ``plan`` (its schedule, parsed but checked
    against a base only by ``bind``), the binding arrays and its replica tensors."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._reader = open_reader(self.path)
        except GGUFFileError as e:
            raise AdapterError(f"adapter {e} (rule AD1)") from None
        self.kv: dict[str, Any] = read_kv(self._reader)
        self.tensors = {t.name: t for t in self._reader.tensors}
        arch = self.kv.get("general.architecture")
        if arch != ADAPTER_ARCH:
            raise self._err(f"general.architecture = {arch!r}, expected '{ADAPTER_ARCH}': not an lrq "
                            f"adapter")
        # K1: one table of key types for models and adapters (LRQModelFile's check reads only
        # ._reader and ._err)
        LRQModelFile._check_key_types(self)
        for key in REQUIRED_ADAPTER_KEYS:
            if self.kv.get(key) is None:
                raise self._err(f"key {key} is missing")
        v = int(self.kv[Keys.ADAPTER_VERSION])
        if not ADAPTER_VERSION_MIN <= v <= ADAPTER_VERSION:
            raise self._err(f"{Keys.ADAPTER_VERSION} = {v}: adapter version {v} is not supported (this lrq "
                            f"reads versions {ADAPTER_VERSION_MIN}..{ADAPTER_VERSION})")
        self.version = v
        fv = int(self.kv[Keys.FORMAT_VERSION])
        if not FORMAT_VERSION_MIN <= fv <= FORMAT_VERSION:
            raise self._err(f"{Keys.FORMAT_VERSION} = {fv}: LRQ format version {fv} is not supported "
                            f"(this lrq reads versions {FORMAT_VERSION_MIN}..{FORMAT_VERSION})")
        self.format_version = fv
        for name in self.tensors:
            p = parse_replica_param_name(name)
            if p is None or not is_block_linear(p[0]):
                raise self._err(f"tensor {name} is not a replica tensor (blk.N.<linear>.lrq_r<r>.<param>); "
                                f"an adapter holds only those")
            if p[2] in LOWRANK_PARAMS and fv < LOWRANK_VERSION:
                raise self._err(f"tensor {name}: low-rank corrections need format version "
                                f"{LOWRANK_VERSION}, {Keys.FORMAT_VERSION} says {fv}")
        try:
            self.plan = Plan.from_gguf_arrays({k: self.kv[k] for k in SCHEDULE_KEYS},
                                              f"adapter {self.path}: schedule")
        except PlanError as e:
            raise AdapterError(str(e)) from None
        self.base_arch: str = str(self.kv[Keys.ADAPTER_BASE_ARCH])
        self.base_block_count = int(self.kv[Keys.ADAPTER_BASE_BLOCK_COUNT])
        self.base_tensors: list[str] = list(self.kv[Keys.ADAPTER_BASE_TENSORS])
        self.base_types: list[int] = [int(x) for x in self.kv[Keys.ADAPTER_BASE_TYPES]]
        self.base_shapes: list[int] = [int(x) for x in self.kv[Keys.ADAPTER_BASE_SHAPES]]
        self.base_crc32: list[int] = [int(x) for x in self.kv[Keys.ADAPTER_BASE_CRC32]]
        self.base_file: str | None = self.kv.get(Keys.ADAPTER_BASE_FILE)
        self.base_type: str | None = self.kv.get(Keys.ADAPTER_BASE_TYPE)

    def _err(self, msg: str) -> AdapterError:
        return AdapterError(f"adapter {self.path}: {msg} (rule AD1)")

    @property
    def modified_weights(self) -> list[str]:
        """The weights its replica tensors modify, sorted."""
        return sorted({parse_replica_param_name(n)[0] for n in self.tensors})

    @property
    def nbytes(self) -> int:
        return self.path.stat().st_size

    def summary(self) -> dict:
        """What lrq-inspect shows of an adapter (JSON-able)."""
        from .gguf_types import type_name
        ts = [{"name": n, "type": type_name(t.tensor_type),
               "shape": list(numpy_shape(t)), "bytes": int(t.n_bytes)} for n, t in self.tensors.items()]
        return {
            "file": str(self.path), "adapter_version": self.version, "format_version": self.format_version,
            "base": {"architecture": self.base_arch, "block_count": self.base_block_count,
                     "file": self.base_file, "type": self.base_type},
            "modified_tensors": len(self.base_tensors),
            "schedule": [{"layer": e.layer, "replica": e.replica, "group": e.group, "weight": e.weight}
                         for e in self.plan.executions],
            "schedule_summary": self.plan.describe(),
            "replica_tensors": ts,
            "replica_tensor_bytes": sum(t["bytes"] for t in ts),
            "file_bytes": self.nbytes,
            "lrq_metadata": {k: v for k, v in self.kv.items() if k.startswith("lrq.")
                             and not k.startswith("lrq.schedule.")},
        }


# ---- base + adapter (or base + layer map) as one model -----------------------------------------

def _is_lrq_kv(kv: dict) -> bool:
    arch = kv.get("general.architecture")
    return Keys.FORMAT_VERSION in kv or (isinstance(arch, str) and arch.startswith(ARCH_PREFIX))


class BoundModelFile(LRQModelFile):
    """A base GGUF with an adapter's schedule and replica tensors, or with a layer map's schedule
    (FORMAT.md 7.1, 11), checked as one LRQ file (rules AD2-AD5 / section 10).  A stock base is
    seen as a format-v3 LRQ file with stock-typed weights; ``path`` is the base's."""

    def __init__(self, base: str | os.PathLike, adapter: str | os.PathLike | AdapterFile | None = None,
                 layers: str | Plan | None = None):
        self.path = Path(base)
        if adapter is not None and layers is not None:
            raise AdapterError(f"{self.path}: a layer map and an adapter are not combined (an adapter's "
                               f"parameters were fitted for its own schedule); give one of them")
        self.adapter = (adapter if isinstance(adapter, AdapterFile) or adapter is None
                        else AdapterFile(adapter))
        label = layers.source if isinstance(layers, Plan) else layers
        self._where = (f"adapter {self.adapter.path} on base {self.path}" if self.adapter is not None
                       else f"{self.path} with layer map '{label}'" if layers is not None else str(self.path))
        try:
            self._reader = open_reader(self.path)
            base_kv = read_kv(self._reader)
            check_tokens_unique(base_kv.get("tokenizer.ggml.tokens"), str(self.path))
            self.base_is_lrq = _is_lrq_kv(base_kv)
            if self.base_is_lrq:
                lrq = LRQModelFile(self.path)        # the base is valid on its own
                arch, base_version = lrq.arch, lrq.version
                lrq.close()
        except GGUFFileError as e:       # the message names the base; say what it was the base of
            if self.adapter is None and layers is None:
                raise
            raise AdapterError(f"{self._where}: the base is not valid: {e}") from None
        if not self.base_is_lrq:
            arch, base_version = base_kv.get("general.architecture"), None
            if arch not in SUPPORTED_ARCHS:
                raise self._err(f"general.architecture = {arch!r} of the base is not supported "
                                f"(supported: {', '.join(SUPPORTED_ARCHS)})")
        self.base_architecture = str(base_kv.get("general.architecture"))
        n_layer = base_kv.get(f"{arch}.block_count")
        if not isinstance(n_layer, (int, np.integer)) or isinstance(n_layer, bool):
            raise self._err(f"key {arch}.block_count of the base is missing or not an integer")
        base_tensors = {t.name: t for t in self._reader.tensors}
        kv = dict(base_kv)
        kv["general.architecture"] = lrq_arch(arch)
        kv[Keys.BASE_ARCH] = arch
        if self.adapter is not None:
            self._check_binding(base_tensors, int(n_layer))
            plan = self.adapter.plan
            version = max(base_version or 0, self.adapter.format_version)
        else:
            if isinstance(layers, str):
                try:
                    plan = layer_map(layers, int(n_layer))
                except PlanError as e:
                    raise AdapterError(f"{self.path}: {e}") from None
            elif isinstance(layers, Plan):
                plan = layers
            else:
                plan = Plan.from_gguf_arrays({k: base_kv.get(k) for k in SCHEDULE_KEYS}) if self.base_is_lrq \
                    else layer_map(f"0..{int(n_layer) - 1}", int(n_layer))
            version = base_version if base_version is not None else FORMAT_VERSION
        kv[Keys.FORMAT_VERSION] = version
        kv.update(plan.to_gguf_arrays())
        self.kv = kv
        self._t = dict(base_tensors)
        if self.adapter is not None:
            self._t.update(self.adapter.tensors)
        # the checks of LRQModelFile.__init__, on the combined keys and tensors (AD5)
        self._check_keys()
        from .gguf_hparams import hparams
        self.hparams_dict = hparams(self.kv, self.arch, {n: numpy_shape(t) for n, t in self._t.items()},
                                    str(self.path))
        self.plan = self._read_schedule()
        self.schedule = list(self.plan.executions)
        self.expert_entries = self._read_expert_entries()     # the base's (format v4, docs/moe.md)
        self._check_tensors()

    def _err(self, msg: str) -> AdapterError:
        rule = " (rule AD5)" if self.adapter is not None and "(rule" not in msg else ""
        return AdapterError(f"{self._where}: {msg}{rule}")

    def _check_key_types(self) -> None:
        """K1 holds for the base (checked when it was opened) and the adapter (AD1)."""

    def _read_schedule(self) -> Plan:
        try:
            return Plan.from_gguf_arrays({k: self.kv.get(k) for k in SCHEDULE_KEYS}, "schedule").validate(
                self.hparams_dict["n_layer"], f"schedule ({Keys.SCHEDULE_LAYER}...)")
        except PlanError as e:
            raise self._err(str(e)) from None

    def _check_binding(self, base: dict, n_layer: int) -> None:
        """Rules AD2 (architecture, layer count, the binding arrays), AD3 (each listed weight's
        type, shape and sampled CRC-32) and AD4 (no name clash), in this order."""
        a = self.adapter

        def err(rule: str, msg: str) -> AdapterError:
            return AdapterError(f"{self._where}: {msg} (rule {rule})")

        if a.base_arch != self.base_architecture:
            raise err("AD2", f"{Keys.ADAPTER_BASE_ARCH} = '{a.base_arch}' but the base is "
                             f"'{self.base_architecture}'")
        if a.base_block_count != n_layer:
            raise err("AD2", f"{Keys.ADAPTER_BASE_BLOCK_COUNT} = {a.base_block_count} but the base has "
                             f"{n_layer} layers")
        n = len(a.base_tensors)
        for key, got, want in ((Keys.ADAPTER_BASE_TYPES, len(a.base_types), n),
                               (Keys.ADAPTER_BASE_SHAPES, len(a.base_shapes), 2 * n),
                               (Keys.ADAPTER_BASE_CRC32, len(a.base_crc32), n)):
            if got != want:
                raise err("AD2", f"key {key} has {got} entries, expected {want} for the {n} tensors of "
                                 f"{Keys.ADAPTER_BASE_TENSORS}")
        if a.base_tensors != sorted(set(a.base_tensors)):
            raise err("AD2", f"key {Keys.ADAPTER_BASE_TENSORS} must be sorted and name each weight once")
        modified = a.modified_weights
        if a.base_tensors != modified:
            extra = sorted(set(a.base_tensors) - set(modified))
            missing = sorted(set(modified) - set(a.base_tensors))
            what = (f"replica tensors modify {missing[0]}, which {Keys.ADAPTER_BASE_TENSORS} does not list"
                    if missing else f"{Keys.ADAPTER_BASE_TENSORS} lists {extra[0]}, which no replica tensor "
                                    f"of the adapter modifies")
            raise err("AD2", what)
        for i, name in enumerate(a.base_tensors):
            t = base.get(name)
            if t is None:
                raise err("AD3", f"the base has no tensor {name}")
            if int(t.tensor_type) != a.base_types[i]:
                from .gguf_types import type_name
                raise err("AD3", f"tensor {name} of the base has type {type_name(t.tensor_type)}, the adapter "
                                 f"was made for {type_name(a.base_types[i])}")
            shape = _ne01(t)
            want = (a.base_shapes[2 * i], a.base_shapes[2 * i + 1])
            if shape != want or len(t.shape) > 2:
                raise err("AD3", f"tensor {name} of the base has shape (ne0, ne1) = {shape}, the adapter was "
                                 f"made for {want}")
            crc = sample_crc32(_raw(self._reader, t))
            if crc != a.base_crc32[i]:
                raise err("AD3", f"tensor {name} of the base has CRC-32 {crc:08x}, the adapter was made for "
                                 f"{a.base_crc32[i]:08x}: a different quantization or model")
        for name in a.tensors:
            if name in base:
                raise err("AD4", f"tensor {name} of the adapter is also a tensor of the base")

    def close(self) -> None:
        super().close()
        self.adapter = None


def bind(base_path: str | os.PathLike, adapter_path: str | os.PathLike) -> BoundModelFile:
    """Base + adapter, checked by rules AD1-AD5 (AdapterError names both and the difference)."""
    return BoundModelFile(base_path, adapter_path)


# ---- writing -----------------------------------------------------------------------------------

def _binding(reader: gguf.GGUFReader, weights: list[str], where: str) -> tuple[list[int], list[int], list[int]]:
    """(types, shapes, crc32) of ``weights`` in a base."""
    ts = {t.name: t for t in reader.tensors}
    types, shapes, crcs = [], [], []
    for name in weights:
        t = ts.get(name)
        if t is None:
            raise AdapterError(f"{where}: the replica tensors modify {name}, which the base does not have")
        types.append(int(t.tensor_type))
        shapes += list(_ne01(t))
        crcs.append(sample_crc32(_raw(reader, t)))
    return types, shapes, crcs


def _element_shape(arr: np.ndarray, ggml_type: int) -> tuple[int, ...]:
    """Numpy element shape of ``arr``: its shape for F32 / F16, else its bytes' element count."""
    if int(ggml_type) in (int(gguf.GGMLQuantizationType.F32), int(gguf.GGMLQuantizationType.F16)):
        return tuple(arr.shape)
    return tuple(gguf.quant_shape_from_byte_shape(arr.shape, gguf.GGMLQuantizationType(int(ggml_type))))


def _write(out: Path, arch_of_base: str, n_layer: int, plan: Plan, tensors: Mapping[str, tuple],
           binding: tuple[list[int], list[int], list[int]], weights: list[str],
           provenance: Mapping[str, str], validate) -> Path:
    types, shapes, crcs = binding
    if not tensors:
        # the binding arrays would be empty, which GGUF writers refuse; a schedule alone needs no
        # adapter: it is a layer map (--lrq-layers) when it has one serial step per execution
        raise AdapterError(f"adapter {out}: no replica tensors to write; an adapter modifies at least one "
                           f"weight (a schedule alone is a layer map, --lrq-layers)")
    out = check_output_path(out)
    with atomic.atomic_path(out) as tmp:
        with GGUFStreamWriter(tmp, ADAPTER_ARCH) as w:
            w.add_uint32(Keys.ADAPTER_VERSION, ADAPTER_VERSION)
            w.add_uint32(Keys.FORMAT_VERSION, FORMAT_VERSION)
            arrays = plan.to_gguf_arrays()
            for k in SCHEDULE_KEYS:
                w.add_array(k, arrays[k], gguf.GGUFValueType.FLOAT32 if k == Keys.SCHEDULE_WEIGHT
                            else gguf.GGUFValueType.UINT32)
            w.add_string(Keys.ADAPTER_BASE_ARCH, arch_of_base)
            w.add_uint32(Keys.ADAPTER_BASE_BLOCK_COUNT, n_layer)
            w.add_array(Keys.ADAPTER_BASE_TENSORS, weights, gguf.GGUFValueType.STRING)
            w.add_array(Keys.ADAPTER_BASE_TYPES, types, gguf.GGUFValueType.UINT32)
            w.add_array(Keys.ADAPTER_BASE_SHAPES, shapes, gguf.GGUFValueType.UINT32)
            w.add_array(Keys.ADAPTER_BASE_CRC32, crcs, gguf.GGUFValueType.UINT32)
            for k, v in provenance.items():
                if v is not None:
                    w.add_string(k, str(v))
            names = sorted(tensors)
            for name in names:
                arr, typ = tensors[name][0], tensors[name][1]
                w.add_tensor_info(name, _element_shape(np.asarray(arr), typ), int(typ))
            w.write_header()
            for name in names:
                w.write_tensor(name, np.asarray(tensors[name][0]))
            w.finish()
        validate(tmp)            # what was written binds to its base, or nothing is left behind
    return out


def write_adapter(base_path: str | os.PathLike, plan: Plan, tensors: Mapping[str, tuple[np.ndarray, int]],
                  out: str | os.PathLike, *, base_type: str | None = None,
                  provenance: Mapping[str, str] | None = None) -> Path:
    """Write the adapter ``out`` of replica tensors {name: (array, ggml type)} (array: the values
    for F32 / F16, the stored bytes for a quantized type) and schedule ``plan`` for the base GGUF
    ``base_path``; the binding (modified weights, types, shapes, CRC-32) is computed from the
    base.  Written atomically and bound to the base (AD1-AD5) before it takes its final name."""
    base_path = Path(base_path)
    reader = open_reader(base_path)
    kv = read_kv(reader)
    arch = str(kv.get("general.architecture"))
    n_layer = kv.get(f"{base_arch(arch)}.block_count")
    if not isinstance(n_layer, (int, np.integer)):
        raise AdapterError(f"{base_path}: key {base_arch(arch)}.block_count is missing")
    for name in tensors:
        p = parse_replica_param_name(name)
        if p is None or not is_block_linear(p[0]):
            raise AdapterError(f"{out}: tensor {name} is not a replica tensor; an adapter holds only those")
    weights = sorted({parse_replica_param_name(n)[0] for n in tensors})
    binding = _binding(reader, weights, f"adapter {out} for base {base_path}")
    if base_type is None and not _is_lrq_kv(kv):
        ft = kv.get("general.file_type")
        if isinstance(ft, (int, np.integer)):
            try:
                base_type = gguf.LlamaFileType(int(ft)).name.removeprefix("MOSTLY_")
            except ValueError:
                base_type = None
    prov = {Keys.ADAPTER_BASE_FILE: base_path.name, Keys.ADAPTER_BASE_TYPE: base_type,
            **(provenance or {})}
    try:
        plan.validate(int(n_layer), f"adapter {out}: schedule for base {base_path}")
    except PlanError as e:
        raise AdapterError(str(e)) from None
    return _write(Path(out), arch, int(n_layer), plan, tensors, binding, weights, prov,
                  lambda tmp: BoundModelFile(base_path, tmp).close())


def _copy_header(reader, w: GGUFStreamWriter, skip) -> None:
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or skip(key):
            continue
        w.copy_field(field)


def split_lrq_file(lrq_path: str | os.PathLike, adapter_out: str | os.PathLike,
                   base_out: str | os.PathLike | None = None) -> tuple[Path, Path | None]:
    """Turn a converted LRQ file into base + adapter.

    Block linears all stock-typed (made by ``lrq-convert --base TYPE``): the base is a plain stock
    GGUF (general.architecture = the base architecture, no lrq.* key, no lrq_r* tensor, every
    other tensor byte for byte) and the adapter holds the schedule and replica tensors.  With LRQ
    codes: the base is the LRQ file without replica tensors, one execution per layer.  Without
    ``base_out`` only the adapter is written, bound to the base that would have been written (the
    same bytes: e.g. the llama-quantize output the LRQ file wrapped)."""
    lrq_path = Path(lrq_path)
    f = LRQModelFile(lrq_path)
    reader = open_reader(lrq_path)
    kv = read_kv(reader)
    has_codes = bool(f.lrq_weights())
    n_layer = f.hparams_dict["n_layer"]
    keep = [t for t in reader.tensors if parse_replica_param_name(t.name) is None]
    replica = {t.name: (np.asarray(_raw(reader, t)).reshape(_byte_shape(t)) if _quantized(t)
                        else np.asarray(t.data), int(t.tensor_type)) for t in reader.tensors
               if parse_replica_param_name(t.name) is not None}
    if not replica:
        raise AdapterError(f"{lrq_path}: has no replica tensors, so there is no adapter to split off "
                           f"(its schedule alone is a layer map, --lrq-layers)")
    base_arch_name = f.kv["general.architecture"] if has_codes else f.arch
    none = layer_map(f"0..{n_layer - 1}", n_layer)
    written_base = None
    if base_out is not None:
        written_base = check_output_path(base_out)
        with GGUFStreamWriter(written_base, base_arch_name) as w:
            if has_codes:
                arrays = none.to_gguf_arrays()

                def skip(k):
                    return k in (Keys.BPW_LRQ, Keys.BPW_LINEARS, Keys.PLAN) or k.startswith("lrq.schedule.")
                _copy_header(reader, w, skip)
                for k in SCHEDULE_KEYS:
                    w.add_array(k, arrays[k], gguf.GGUFValueType.FLOAT32 if k == Keys.SCHEDULE_WEIGHT
                                else gguf.GGUFValueType.UINT32)
                bpw = count_bpw((t.name, numpy_shape(t), int(t.tensor_type), int(t.n_bytes)) for t in keep)
                if bpw["n_lrq_weights"]:
                    w.add_float32(Keys.BPW_LRQ, bpw["lrq"])
                if f.version >= 2 and bpw["n_linear_weights"]:
                    w.add_float32(Keys.BPW_LINEARS, bpw["linears"])
            else:
                _copy_header(reader, w, lambda k: k.startswith("lrq."))
            for t in keep:
                w.add_tensor_info(t.name, numpy_shape(t), int(t.tensor_type))
            w.write_header()
            for t in keep:
                w.write_tensor(t.name, np.asarray(_raw(reader, t)))
            w.finish()
    weights = sorted({parse_replica_param_name(n)[0] for n in replica})
    out = Path(adapter_out)
    binding = _binding(reader, weights, f"adapter {out} for base {base_out or lrq_path}")
    prov = {Keys.ADAPTER_BASE_FILE: Path(base_out).name if base_out is not None else None,
            Keys.ADAPTER_BASE_TYPE: kv.get(Keys.BASE_TYPE), Keys.SOURCE: kv.get(Keys.SOURCE),
            Keys.PLAN: kv.get(Keys.PLAN)}
    validate = ((lambda tmp: BoundModelFile(written_base, tmp).close()) if written_base is not None
                else (lambda tmp: AdapterFile(tmp)))
    _write(out, base_arch_name, n_layer, f.plan, replica, binding, weights, prov, validate)
    f.close()
    return out, written_base


def _quantized(t) -> bool:
    return int(t.tensor_type) not in (int(gguf.GGMLQuantizationType.F32), int(gguf.GGMLQuantizationType.F16))


def _byte_shape(t) -> tuple[int, ...]:
    """Byte shape (rows, row bytes) of a quantized tensor, as gguf.quants.quantize returns it."""
    shape = numpy_shape(t)
    return tuple(gguf.quant_shape_to_byte_shape(shape, gguf.GGMLQuantizationType(int(t.tensor_type))))


__all__ = ["AdapterError", "AdapterFile", "BoundModelFile", "bind", "sample_crc32", "write_adapter",
           "split_lrq_file"]
