"""Read an LRQ GGUF (docs/FORMAT.md) — validated on open, dequantized on demand.

    >>> f = LRQModelFile("model.lrq.gguf")                   # doctest: +SKIP
    >>> f.arch, f.hparams.n_layer, len(f.schedule)
    >>> W, rp = f.weight("blk.5.attn_q.weight", replica=1)   # float64 [n_out, n_in], gain folded in
    >>> y = W @ quantize_activations(x, rp.act_clip, rp.act_bits) + (rp.bias if rp.bias is not None else 0)

Opening checks, each failure naming the file and the key or tensor: the format version (outside
FORMAT_VERSION_MIN..FORMAT_VERSION is refused), the architecture, the quantization keys,
the schedule (against the model's layer count and the replica tensors), and the type and shape
of every LRQ tensor and its parameter tensors; a truncated file is reported as such.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .constants import (ARCH_PREFIX, EXEC_WARN_FACTOR, EXPERT_PARAMS, EXPERT_PROJS, FORMAT_VERSION,
                        FORMAT_VERSION_MIN, GROUP_SIZES, KEY_TYPES, LOWRANK_MAX_RANK, LOWRANK_PARAMS,
                        LOWRANK_VERSION, MOE_EXPERTS_VERSION, MOE_KEYS, expert_param_name,
                        parse_expert_param_name,
                        LRQ_REPLICA_PARAMS, MODES, STOCK_REPLICA_PARAMS, SUB_SUFFIX, SUPPORTED_ARCHS,
                        TERNARY_BITS, TWO_LEVEL_SUB_SIZES, TWO_LEVEL_VERSION, Keys, is_block_linear,
                        layer_of, lrq_bits, min_name, parse_replica_param_name, replica_param_name,
                        scale_name, sub_name)
from .gguf_hparams import (GGUFFileError, check_tokens_unique, dequantize_rows, dequantize_tensor, hparams,
                           numpy_shape, open_reader, read_kv)
from .bpw_count import count_bpw
from .gguf_types import type_name
from .plan import (Execution, ExpertEntry, Plan, PlanError, check_expert_entries,
                   expert_entries_from_gguf_arrays)
from .quant import QuantizedTensor, ReplicaParams, dequantize, n_groups, row_bytes, check_activation_params, QuantError

F16 = gguf.GGMLQuantizationType.F16
F32 = gguf.GGMLQuantizationType.F32
I8 = gguf.GGMLQuantizationType.I8
Q8_0 = gguf.GGMLQuantizationType.Q8_0
Q8_0_BLOCK = 32          # ggml's Q8_0 rows are whole blocks of 32 elements


class LRQFileError(GGUFFileError):
    """An LRQ GGUF is invalid: wrong version, missing key, bad tensor, bad schedule."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_id: int
    type_name: str
    shape: tuple[int, ...]     # numpy order: [n_out, n_in] for a weight
    nbytes: int
    lrq_bits: int | None       # 1..4 for an LRQ code tensor, else None


def read_format_version(path: str | os.PathLike) -> int | None:
    """lrq.format_version of a GGUF, None for a plain GGUF (cheap header check helper)."""
    v = read_kv(open_reader(path)).get(Keys.FORMAT_VERSION)
    return None if v is None else int(v)


def _as_ggml_2d(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A numpy shape as ggml sees a matrix: the C++ loader has only ne[0..3], so a 1-D [n] is
    [1, n] and leading 1s beyond two axes vanish.  Anything else keeps its length (refused)."""
    shape = tuple(shape)
    while len(shape) > 2 and shape[0] == 1:
        shape = shape[1:]
    return (1,) + shape if len(shape) == 1 else shape


class LRQModelFile:
    """An opened, validated LRQ GGUF (the interface of lrq.model_file.open_model)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._reader = open_reader(self.path)
        self.kv: dict[str, Any] = read_kv(self._reader)
        check_tokens_unique(self.kv.get("tokenizer.ggml.tokens"), str(self.path))
        self._t = {t.name: t for t in self._reader.tensors}
        self._check_keys()
        shapes = {n: numpy_shape(t) for n, t in self._t.items()}
        # plain dict of the base hyper-parameters (validation, lrq-inspect); .hparams is the
        # executors' view (lrq.model_file.HParams), built lazily by the base-model reader
        self.hparams_dict: dict[str, Any] = hparams(self.kv, self.arch, shapes, str(self.path))
        self.plan = self._read_schedule()
        self.schedule: list[Execution] = list(self.plan.executions)
        self.expert_entries: tuple[ExpertEntry, ...] = self._read_expert_entries()
        self._check_tensors()

    # ---- validation -------------------------------------------------------------------------
    def _err(self, msg: str) -> LRQFileError:
        return LRQFileError(f"{self.path}: {msg}")

    def _check_key_types(self) -> None:
        """Rule K1: every lrq.* key of constants.KEY_TYPES that is present has its type there."""
        for key, want in KEY_TYPES.items():
            field = self._reader.fields.get(key)
            if field is None:
                continue
            types = [t.name.lower() for t in field.types]
            got = types[0] if len(types) == 1 else "array:" + ":".join(types[1:])
            if got != want:
                def desc(t: str) -> str:
                    return "an array of " + t[len("array:"):] if t.startswith("array:") else t
                raise self._err(f"key {key} must be {desc(want)}, got {desc(got)}")

    def _check_keys(self) -> None:
        v = self.kv.get(Keys.FORMAT_VERSION)
        if v is None:
            raise self._err(f"key {Keys.FORMAT_VERSION} is missing: not an LRQ file")
        self._check_key_types()
        if not FORMAT_VERSION_MIN <= int(v) <= FORMAT_VERSION:
            raise self._err(f"LRQ format version {int(v)} is not supported (this lrq reads versions "
                            f"{FORMAT_VERSION_MIN}..{FORMAT_VERSION})")
        self.version = int(v)
        base = self.kv.get(Keys.BASE_ARCH)
        if base is None:
            raise self._err(f"key {Keys.BASE_ARCH} is missing")
        if base not in SUPPORTED_ARCHS:
            raise self._err(f"{Keys.BASE_ARCH} = '{base}' is not supported (supported: "
                            f"{', '.join(SUPPORTED_ARCHS)})")
        arch = self.kv.get("general.architecture")
        if arch != ARCH_PREFIX + base:
            raise self._err(f"general.architecture = '{arch}' does not match {Keys.BASE_ARCH} = "
                            f"'{base}' (expected '{ARCH_PREFIX + base}')")
        self.arch: str = base
        has_codes = any(lrq_bits(t.tensor_type) is not None for t in self._t.values())
        if not has_codes and self.version < 2:
            raise self._err(f"a format version {self.version} file must hold LRQ-typed codes "
                            f"(stock-typed bases need version 2)")
        # mode and group size describe the LRQ-typed codes: required exactly when there are some
        self.mode: str | None = None
        self.group_size: int | None = None
        mode, g = self.kv.get(Keys.QUANT_MODE), self.kv.get(Keys.GROUP_SIZE)
        if has_codes or mode is not None:
            if mode not in MODES:
                raise self._err(f"key {Keys.QUANT_MODE} = {mode!r} is not one of {', '.join(MODES)}")
            self.mode = mode
        if has_codes or g is not None:
            if g not in GROUP_SIZES:
                raise self._err(f"key {Keys.GROUP_SIZE} = {g!r} is not one of {GROUP_SIZES}")
            self.group_size = int(g)

    def _read_schedule(self) -> Plan:
        keys = (Keys.SCHEDULE_LAYER, Keys.SCHEDULE_REPLICA, Keys.SCHEDULE_GROUP, Keys.SCHEDULE_WEIGHT)
        try:
            plan = Plan.from_gguf_arrays({k: self.kv.get(k) for k in keys}, f"{self.path}: schedule")
            return plan.validate(self.hparams_dict["n_layer"], f"{self.path}: schedule ({Keys.SCHEDULE_LAYER}...)")
        except PlanError as e:
            raise LRQFileError(str(e)) from None

    def _read_expert_entries(self) -> tuple[ExpertEntry, ...]:
        """Rules X1-X3 (docs/moe.md): the lrq.moe.* arrays, in the order of lrq_load_hparams."""
        arrays = {k: self.kv.get(k) for k in MOE_KEYS}
        present = next((k for k in MOE_KEYS if arrays[k] is not None), None)
        if present is None:
            return ()
        if self.version < MOE_EXPERTS_VERSION:
            raise self._err(f"key {present}: expert replication needs format version {MOE_EXPERTS_VERSION}, "
                            f"the file says {self.version} (rule X1)")
        n_layer = self.hparams_dict["n_layer"]
        n_expert = int(self.kv.get(f"{self.arch}.expert_count") or 0)
        try:
            entries = expert_entries_from_gguf_arrays(arrays, str(self.path))
            check_expert_entries(entries, n_layer, n_expert, str(self.path))
        except PlanError as e:
            raise LRQFileError(str(e)) from None
        for i, e in enumerate(entries):
            missing = [f"blk.{e.layer}.{n}.weight" for n in ("ffn_gate_inp",) + EXPERT_PROJS
                       if f"blk.{e.layer}.{n}.weight" not in self._t]
            if missing:
                raise self._err(f"key {Keys.MOE_LAYER}: entry {i} names layer {e.layer}, which is not a "
                                f"mixture-of-experts layer ({missing[0]} is missing; rule X1)")
        return entries

    def _check_expert_tensor(self, name: str, parsed: tuple[int, str, int, str]) -> None:
        """Rule X4: a per-expert gain / bias of an entry, F32 [n_expert, n_out], finite, and the
        defaults (gain 1, bias 0) in the rows of experts the entry does not list."""
        layer, proj, r, param = parsed
        entry = next((e for e in self.expert_entries if (e.layer, e.replica) == (layer, r)), None)
        if proj not in EXPERT_PROJS or param not in EXPERT_PARAMS or entry is None:
            raise self._err(f"tensor {name} belongs to no expert entry ({Keys.MOE_LAYER} / "
                            f"{Keys.MOE_REPLICA} list no replica {r} of layer {layer}, or the name is not "
                            f"blk.L.ffn_{{gate,up,down}}_exps.lrq_x<r>.{{gain,bias}}; rule X4)")
        n_expert, n_out = numpy_shape(self._t[f"blk.{layer}.{proj}.weight"])[:2]
        self._check_shape(name, F32, [(n_expert, n_out)])
        self._check_finite(name)
        rows = np.asarray(self._t[name].data, dtype=np.float32).reshape(n_expert, n_out)
        default = 1.0 if param == "gain" else 0.0
        listed = set(entry.experts)
        for x in range(n_expert):
            if x not in listed and not np.all(rows[x] == default):
                raise self._err(f"tensor {name}: row {x} (an expert the entry does not list) must hold the "
                                f"default {param} {default:g} (rule X4)")

    def expert_params(self, layer: int, proj: str, replica: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(gain, bias) float64 [n_expert, n_out] of expert replica ``replica`` of ``proj`` in
        ``layer``; None for an absent tensor (the default: gain 1, bias 0)."""
        def get(param):
            t = self._t.get(expert_param_name(layer, proj, replica, param))
            return None if t is None else np.asarray(t.data, dtype=np.float64).reshape(numpy_shape(t))
        return get("gain"), get("bias")

    def _check_shape(self, name: str, want_type, shapes: list[tuple[int, ...]]) -> None:
        t = self._t[name]
        if int(t.tensor_type) != int(want_type):
            raise self._err(f"tensor {name} has type {type_name(t.tensor_type)}, expected "
                            f"{type_name(want_type)}")
        if numpy_shape(t) not in shapes:
            raise self._err(f"tensor {name} has shape {list(numpy_shape(t))}, expected "
                            + " or ".join(str(list(s)) for s in shapes))

    def _check_tensors(self) -> None:
        lrq = [n for n, t in self._t.items() if lrq_bits(t.tensor_type) is not None]
        for name in lrq:
            t = self._t[name]
            bits = lrq_bits(t.tensor_type)
            if self.mode == "ternary" and bits != TERNARY_BITS:
                raise self._err(f"tensor {name}: ternary codes must be LRQ{TERNARY_BITS}, got LRQ{bits}")
            shape = numpy_shape(t)
            if not is_block_linear(name):
                raise self._err(f"tensor {name} has type {type_name(t.tensor_type)} but is not a block "
                                f"linear (q, k, v, o, gate, up, down) (rule T1)")
            if len(shape) != 2:
                raise self._err(f"tensor {name}: LRQ weights are 2-D, got shape {list(shape)}")
            n_out, n_in = shape
            ng = n_groups(n_in, self.group_size)
            for aux, wanted in ((scale_name(name), True), (min_name(name), self.mode == "asym")):
                if wanted and aux not in self._t:
                    raise self._err(f"tensor {aux} (parameters of {name}) is missing")
                if not wanted and aux in self._t:
                    raise self._err(f"tensor {aux} must not exist in mode {self.mode}")
                if wanted:
                    self._check_shape(aux, F16, [(n_out, ng)])
                    self._check_finite(aux)
            if sub_name(name) in self._t:
                self._check_two_level(name, bits, n_out, n_in)
        layers_of_replicas = {}
        for e in self.schedule:
            layers_of_replicas.setdefault(e.layer, set()).add(e.replica)
        lowrank: dict[tuple[str, int], dict[str, str]] = {}     # (weight, replica) -> {param: name}
        for name in self._t:
            if name.endswith(".lrq_scale") or name.endswith(".lrq_min") or name.endswith(SUB_SUFFIX):
                w = name.rsplit(".", 1)[0] + ".weight"
                if w not in self._t or lrq_bits(self._t[w].tensor_type) is None:
                    raise self._err(f"tensor {name} belongs to no LRQ weight ({w} is missing or not LRQ)")
                continue
            xparsed = parse_expert_param_name(name)
            if xparsed is not None:
                self._check_expert_tensor(name, xparsed)
                continue
            parsed = parse_replica_param_name(name)
            if parsed is None:
                continue
            w, r, param = parsed
            if w not in self._t or not self.is_replicable(w):
                v1 = " (format version 1 has no stock-typed replicas)" if self.version < 2 else ""
                raise self._err(f"tensor {name} belongs to no LRQ weight ({w} is missing or not "
                                f"LRQ){v1}")
            allowed = LRQ_REPLICA_PARAMS if self.is_lrq(w) else STOCK_REPLICA_PARAMS
            if param in LOWRANK_PARAMS and self.version < LOWRANK_VERSION:
                raise self._err(f"tensor {name}: low-rank corrections need format version "
                                f"{LOWRANK_VERSION}, the file says {self.version} (rule T3)")
            if param not in allowed:
                kind = "LRQ-typed" if self.is_lrq(w) else f"stock-typed ({self.tensor_type(w)})"
                raise self._err(f"tensor {name}: a replica of {kind} weight {w} takes "
                                f"{', '.join(allowed)}, not {param}")
            layer = layer_of(w)
            if layer is None or r not in layers_of_replicas.get(layer, set()):
                raise self._err(f"tensor {name} is for replica {r} of layer {layer}, which the "
                                f"schedule never runs")
            n_out, n_in = numpy_shape(self._t[w])
            if param in LOWRANK_PARAMS:
                lowrank.setdefault((w, r), {})[param] = name
                continue
            if param in ("scale_mult", "grid_offset"):
                self._check_shape(name, F16, [(n_out, n_groups(n_in, self.group_size)), (n_out, 1), (1, 1)])
                self._check_finite(name)
            elif param in ("gain", "bias"):
                self._check_shape(name, F32, [(n_out,)])
                self._check_finite(name)
            elif param == "clip":
                self._check_shape(name, F32, [(1,)])
                c = float(self._t[name].data[0])
                if not c > 0:
                    raise self._err(f"tensor {name}: the clip bound must be > 0, got {c}")
            else:
                self._check_shape(name, F32, [(2,)])
                c, k = (float(x) for x in self._t[name].data)
                try:
                    if not np.isfinite(k) or k != int(k):     # int(nan) would raise ValueError
                        raise QuantError(f"activation bits {k} is not an integer")
                    check_activation_params(c, int(k))
                except QuantError as e:
                    raise self._err(f"tensor {name}: {e}") from None

        for (w, r), names in lowrank.items():
            self._check_lowrank(w, r, names)

    def _check_two_level(self, name: str, bits: int, n_out: int, n_in: int) -> None:
        """Rule T7: <w>.lrq_sub (format v4, the two-level layout) only beside LRQ2 codes of an asym
        file of version >= 4, I8 [n_out, n_in / B] with B one of TWO_LEVEL_SUB_SIZES (any byte is
        a valid pair of 4-bit indices)."""
        sub = sub_name(name)
        if self.version < TWO_LEVEL_VERSION:
            raise self._err(f"tensor {sub}: the two-level layout needs format version {TWO_LEVEL_VERSION}, "
                            f"the file says {self.version} (rule T7)")
        if bits != 2 or self.mode != "asym":
            raise self._err(f"tensor {sub}: the two-level layout needs LRQ2 codes in mode asym, "
                            f"{name} is LRQ{bits} in mode {self.mode} (rule T7)")
        t = self._t[sub]
        shapes = [(n_out, n_in // b) for b in TWO_LEVEL_SUB_SIZES]
        if int(t.tensor_type) != int(I8) or _as_ggml_2d(numpy_shape(t)) not in shapes:
            raise self._err(f"tensor {sub} has type {type_name(t.tensor_type)} shape "
                            f"{list(numpy_shape(t))}, expected I8 "
                            + " or ".join(str(list(s)) for s in shapes) + " (rule T7)")

    def is_two_level(self, name: str) -> bool:
        """An LRQ weight in the two-level layout (it has a <w>.lrq_sub tensor; format v4)."""
        return lrq_bits(self._get(name).tensor_type) is not None and sub_name(name) in self._t

    def two_level(self, name: str):
        """lrq.quant_two_level.TwoLevelTensor of a two-level weight (super-block = group size)."""
        from .quant_two_level import from_file
        t = self._get(name)
        n_out, n_in = numpy_shape(t)
        sub = np.asarray(self._t[sub_name(name)].data).reshape(n_out, -1)
        return from_file(np.asarray(t.data, np.uint8).reshape(n_out, -1),
                         np.asarray(self._t[scale_name(name)].data, np.float16),
                         np.asarray(self._t[min_name(name)].data, np.float16), sub, n_in, self.group_size)

    def _check_lowrank(self, w: str, r: int, names: dict[str, str]) -> None:
        """Rules T4 / T5 for the low-rank factors of replica r of weight w (FORMAT.md 6.2)."""
        for p in LOWRANK_PARAMS:
            if p not in names:
                have = names[next(iter(names))]
                raise self._err(f"tensor {have} has no partner {replica_param_name(w, r, p)}: a "
                                f"low-rank correction needs both lr_u and lr_v (rule T4)")
        n_out, n_in = numpy_shape(self._t[w])
        u, v = self._t[names["lr_u"]], self._t[names["lr_v"]]
        su, sv = _as_ggml_2d(numpy_shape(u)), _as_ggml_2d(numpy_shape(v))
        if len(su) != 2 or su[0] != n_out:
            raise self._err(f"tensor {names['lr_u']} has shape {list(su)}, expected [{n_out}, rank] "
                            f"(rule T4)")
        if len(sv) != 2 or sv[1] != n_in:
            raise self._err(f"tensor {names['lr_v']} has shape {list(sv)}, expected [rank, {n_in}] "
                            f"(rule T4)")
        rank = su[1]
        if sv[0] != rank:
            raise self._err(f"tensor {names['lr_v']} has rank {sv[0]}, {names['lr_u']} rank {rank}: "
                            f"they must agree (rule T4)")
        if not 1 <= rank <= min(n_out, n_in, LOWRANK_MAX_RANK):
            raise self._err(f"tensor {names['lr_u']}: rank {rank} is outside 1..{min(n_out, n_in, LOWRANK_MAX_RANK)} "
                            f"(at most min(n_out, n_in, {LOWRANK_MAX_RANK}); rule T4)")
        for name, t, row in ((names["lr_u"], u, rank), (names["lr_v"], v, n_in)):
            if int(t.tensor_type) not in (int(F16), int(Q8_0)):
                raise self._err(f"tensor {name} has type {type_name(t.tensor_type)}, expected F16 or "
                                f"Q8_0 (rule T4)")
            if int(t.tensor_type) == int(Q8_0) and row % Q8_0_BLOCK:
                raise self._err(f"tensor {name}: Q8_0 needs rows of a multiple of {Q8_0_BLOCK} "
                                f"elements, its rows have {row} (rule T4)")
            self._check_finite(name)

    def _check_finite(self, name: str) -> None:
        """Rule T5: group and replica parameters hold finite values only (a NaN would not crash
        anything, but it silently turns every logit into NaN)."""
        t = self._t[name]
        a = (dequantize_tensor(t) if int(t.tensor_type) == int(Q8_0) else np.asarray(t.data)).reshape(-1)
        bad = np.flatnonzero(~np.isfinite(a.astype(np.float32)))
        if bad.size:
            raise self._err(f"tensor {name}: element {int(bad[0])} is not finite (rule T5)")

    @property
    def warnings(self) -> list[str]:
        """Rule S6: what the loaders warn about but accept (a schedule whose KV cache, one per
        execution, is more than EXEC_WARN_FACTOR times the base model's)."""
        n_exec, n_layer = len(self.schedule), self.hparams_dict["n_layer"]
        if n_exec <= EXEC_WARN_FACTOR * n_layer:
            return []
        hp = self.hparams_dict
        per_tok = 2.0 * hp["n_head_kv"] * (hp["head_dim"] + hp["head_dim_v"])    # F16 K and V bytes
        return [f"{self.path}: the schedule runs {n_exec} executions of {n_layer} base layers "
                f"({n_exec / n_layer:.1f}x): each has its own KV cache, "
                f"{n_exec * per_tok * 1024 / 2**20:.1f} MiB per 1024 tokens of context at F16 "
                f"(the base model: {n_layer * per_tok * 1024 / 2**20:.1f} MiB)"]

    # ---- metadata ---------------------------------------------------------------------------
    @property
    def format_version(self) -> int:
        return int(self.kv[Keys.FORMAT_VERSION])

    @property
    def tensor_names(self) -> list[str]:
        return list(self._t)

    def has_tensor(self, name: str) -> bool:
        return name in self._t

    def tensor_type(self, name: str) -> str:
        return type_name(self._get(name).tensor_type)

    # ---- the base model's view (hyper-parameters, tokenizer), shared with plain GGUFs ---------
    @cached_property
    def _base(self):
        """lrq.model_file.ModelFile over this file with the base architecture: hyper-parameters
        and tokenizer facts are read exactly as for a plain GGUF (its tensor() is not used)."""
        from .model_file import ModelFile
        return ModelFile(self.path, dict(self.kv, **{"general.architecture": self.arch}))

    @property
    def hparams(self):
        """lrq.model_file.HParams (attribute and dict-style access)."""
        return self._base.hparams

    @property
    def meta(self) -> dict[str, Any]:
        return self.kv

    @property
    def vocab(self):
        return self._base.vocab

    @property
    def tokens(self) -> list[str]:
        return self._base.tokens

    @property
    def bos_id(self) -> int | None:
        return self._base.bos_id

    @property
    def add_bos(self) -> bool:
        return self._base.add_bos

    def tensor_info(self, name: str) -> TensorInfo:
        t = self._get(name)
        return TensorInfo(name, int(t.tensor_type), type_name(t.tensor_type), numpy_shape(t),
                          int(t.n_bytes), lrq_bits(t.tensor_type))

    def lrq_weights(self) -> list[str]:
        return [n for n, t in self._t.items() if lrq_bits(t.tensor_type) is not None]

    def is_lrq(self, name: str) -> bool:
        return lrq_bits(self._get(name).tensor_type) is not None

    def is_replicable(self, name: str) -> bool:
        """May carry replica tensors: LRQ codes, or (format v2) a 2-D block linear of any type."""
        t = self._get(name)
        return lrq_bits(t.tensor_type) is not None or (
            self.version >= 2 and is_block_linear(name) and len(numpy_shape(t)) == 2)

    def replicable_weights(self) -> list[str]:
        return [n for n in self._t if self.is_replicable(n)]

    def _get(self, name: str):
        try:
            return self._t[name]
        except KeyError:
            raise LRQFileError(f"{self.path}: no tensor named {name}") from None

    def bpw(self) -> dict[str, float]:
        """lrq / linears / file bits per weight and the counts behind them (lrq.bpw_count)."""
        return count_bpw((n, numpy_shape(t), int(t.tensor_type), int(t.n_bytes)) for n, t in self._t.items())

    # ---- data -------------------------------------------------------------------------------
    def quantized(self, name: str) -> QuantizedTensor:
        """The codes and base parameters of an LRQ weight."""
        t = self._get(name)
        bits = lrq_bits(t.tensor_type)
        if bits is None:
            raise LRQFileError(f"{self.path}: tensor {name} is {type_name(t.tensor_type)}, not an LRQ type")
        if sub_name(name) in self._t:
            raise LRQFileError(f"{self.path}: tensor {name} is in the two-level layout ({sub_name(name)}); "
                               f"this tool handles single-level LRQ weights only")
        n_out, n_in = numpy_shape(t)
        codes = np.asarray(t.data, dtype=np.uint8).reshape(n_out, row_bytes(n_in, bits))
        scale = np.asarray(self._t[scale_name(name)].data, dtype=np.float16)
        mn = self._t.get(min_name(name))
        return QuantizedTensor(codes, scale, None if mn is None else np.asarray(mn.data, np.float16),
                               bits, self.group_size, self.mode, n_in)

    def replica_params(self, name: str, replica: int) -> ReplicaParams:
        """Parameters of ``replica`` of a replicable weight (defaults for absent tensors; low-rank
        factors dequantized to float64)."""
        def get(param):
            t = self._t.get(replica_param_name(name, replica, param))
            return None if t is None else dequantize_tensor(t)
        act, clip, lr_u, lr_v = get("act"), get("clip"), get("lr_u"), get("lr_v")
        if lr_u is not None:        # validated as a pair on open; a 1-D factor is rank 1
            n_out, n_in = numpy_shape(self._get(name))
            lr_u, lr_v = lr_u.reshape(n_out, -1), lr_v.reshape(-1, n_in)
        return ReplicaParams(scale_mult=get("scale_mult"), grid_offset=get("grid_offset"),
                             gain=get("gain"), bias=get("bias"),
                             act_clip=1.0 if act is None else float(act[0]),
                             act_bits=0 if act is None else int(act[1]),
                             clip=float("inf") if clip is None else float(clip[0]),
                             lr_u=lr_u, lr_v=lr_v)

    def tensor(self, name: str) -> np.ndarray:
        """float64 array in numpy shape.  An LRQ weight gives its replica-0 base weight
        d * level(q) + m (no replica tensors applied); other tensors are dequantized by gguf-py."""
        t = self._get(name)
        if lrq_bits(t.tensor_type) is not None:
            if self.is_two_level(name):
                from .quant_two_level import dequantize_replica
                return dequantize_replica(self.two_level(name))
            return dequantize(self.quantized(name))
        return dequantize_tensor(t)

    def rows(self, name: str, ids: np.ndarray) -> np.ndarray:
        """float64 rows ``ids`` (numpy's first axis) of a stock-typed 2-D tensor, e.g. the token
        embeddings of some tokens, dequantizing only those rows."""
        t = self._get(name)
        if lrq_bits(t.tensor_type) is not None or len(numpy_shape(t)) != 2:
            raise LRQFileError(f"{self.path}: rows() needs a stock-typed 2-D tensor, not {name}")
        return dequantize_rows(t, ids)

    def weight(self, name: str, replica: int = 0) -> tuple[np.ndarray, ReplicaParams]:
        """(W_r float64 [n_out, n_in], ReplicaParams) of replica ``replica``.

        W_r = gain * (scale_mult * d * (level(q) + grid_offset) + m): the gain is FOLDED IN
        (params.gain_folded is True; do not apply params.gain again).  The caller applies
        params.act_clip / act_bits to the input and adds params.bias and, when the replica has
        one, the low-rank term params.lr_u @ (params.lr_v @ x) of the unclipped input x to the
        output (FORMAT.md 6.2).  A stock-typed
        block linear of a v2 file (section 6.1) is dequantized by gguf-py and scaled by its
        replica's gain (params.clip bounds the input); any other tensor is returned as is with
        default params, whatever the replica.
        """
        t = self._get(name)
        if lrq_bits(t.tensor_type) is None:
            if not self.is_replicable(name):
                return dequantize_tensor(t), ReplicaParams()
            w = dequantize_tensor(t)
            rp = self.replica_params(name, replica)
            if rp.gain is not None:
                w = w * rp.gain.reshape(-1, 1)
            rp.gain_folded = True
            return w, rp
        rp = self.replica_params(name, replica)
        if self.is_two_level(name):
            from .quant_two_level import dequantize_replica
            w = dequantize_replica(self.two_level(name), rp)
        else:
            w = dequantize(self.quantized(name), rp)
        rp.gain_folded = True
        return w, rp

    def close(self) -> None:
        # np.memmap closes when the reader is garbage collected; drop our references
        self._t = {}
        self._reader = None
        self.__dict__.pop("_base", None)

    def __enter__(self) -> "LRQModelFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
