"""Constants of the LRQ GGUF format v4 (docs/FORMAT.md is the specification).

Everything a reader or writer of an LRQ GGUF needs to agree on lives here: the format version,
every ``lrq.*`` key, the ggml type ids of the code tensors, the supported base architectures and
the names of the per-weight auxiliary tensors.  Pure data: importing this module does no work.
"""

from __future__ import annotations

import re
from enum import IntEnum

# Must equal LRQ_FORMAT_VERSION(_MIN) in native/include/lrq-format.h (tests/test_convert.py checks
# it).  Writers write FORMAT_VERSION; readers accept FORMAT_VERSION_MIN..FORMAT_VERSION and refuse
# any other value.  v1: LRQ-typed codes and their replicas.  v2: also stock-typed (any ggml type)
# block linears whose replicas carry gain / bias / clip; every v1 file is a valid v2 file.
# v3: per-replica low-rank corrections (lr_u, lr_v) of any replicable linear; every v2 file is
# a valid v3 file.  v4: the two-level 2-bit layout (a `.lrq_sub` tensor of 4-bit sub-block scale and
# min indices beside LRQ2 codes; docs/two_level.md) and expert-level replication of
# mixture-of-experts layers (lrq.moe.*, lrq_x tensors; docs/moe.md); every v3 file is a valid v4 file.
FORMAT_VERSION = 4
FORMAT_VERSION_MIN = 1
# the first version that may hold each kind of content (readers refuse it in an older file)
STOCK_REPLICAS_VERSION = 2
LOWRANK_VERSION = 3
MOE_EXPERTS_VERSION = 4
TWO_LEVEL_VERSION = 4

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "qwen2moe", "qwen3moe")
# the mixture-of-experts bases (docs/moe.md): stacked experts ffn_*_exps, router ffn_gate_inp
MOE_ARCHS = ("qwen2moe", "qwen3moe")
ARCH_PREFIX = "lrq-"        # general.architecture = "lrq-" + base: stock llama.cpp refuses it


def lrq_arch(base: str) -> str:
    return ARCH_PREFIX + base


def base_arch(arch: str) -> str:
    """``lrq-llama`` -> ``llama``; a plain name is returned unchanged."""
    return arch[len(ARCH_PREFIX):] if arch.startswith(ARCH_PREFIX) else arch


class Keys:
    """Every GGUF key the LRQ format adds, all under ``lrq.``.

    Required in every LRQ file: FORMAT_VERSION, BASE_ARCH and the four SCHEDULE_* arrays;
    QUANT_MODE and GROUP_SIZE in every file that has LRQ-typed codes.  The others record how the
    file was made (provenance) or a derived figure.
    """

    FORMAT_VERSION = "lrq.format_version"          # uint32, = constants.FORMAT_VERSION
    BASE_ARCH = "lrq.base_architecture"            # string, llama | qwen2 | qwen3

    # how the codes were made; mode and group size are needed to dequantize
    QUANT_MODE = "lrq.quant.mode"                  # string, asym | sym | ternary
    GROUP_SIZE = "lrq.quant.group_size"            # uint32, 32 | 64 | 128 | 256
    BITS = "lrq.quant.bits"                        # uint32, nominal bits (each tensor's type rules)
    SCALE_SEARCH = "lrq.quant.scale_search"        # string, minmax | mse
    ROUNDING = "lrq.quant.rounding"                # string, nearest | stochastic
    NOISE = "lrq.quant.noise"                      # float32, std of the pre-rounding noise (codes)
    SEED = "lrq.quant.seed"                        # uint32

    # replica initialisation used by the converter (provenance)
    INIT_SCALE_DELTA = "lrq.init.scale_delta"      # float32
    INIT_GRID_OFFSET = "lrq.init.grid_offset"      # float32

    # the execution schedule (docs/FORMAT.md, "Schedule")
    SCHEDULE_LAYER = "lrq.schedule.layer"          # uint32[n_exec]
    SCHEDULE_REPLICA = "lrq.schedule.replica"      # uint32[n_exec]
    SCHEDULE_GROUP = "lrq.schedule.group"          # uint32[n_exec]
    SCHEDULE_WEIGHT = "lrq.schedule.weight"        # float32[n_exec]

    # a stock-typed base (format v2): how llama-quantize made the shared weights (provenance)
    BASE_TYPE = "lrq.base.type"                    # string, e.g. IQ2_XS (the llama-quantize type)
    BASE_IMATRIX = "lrq.base.imatrix"              # string, file name of the importance matrix

    PLAN = "lrq.plan"                              # string, the --plan the converter was given
    KEEP = "lrq.keep"                              # string, the --keep regex (absent when none)
    BPW_LRQ = "lrq.bpw.lrq"                        # float32, see docs/FORMAT.md "bpw accounting"
    BPW_LINEARS = "lrq.bpw.linears"                # float32, block linears of any type + replicas
    SOURCE = "lrq.source"                          # string, file name of the converted source
    CONVERTER = "lrq.converter"                    # string, "lrq <version>"

    # an adapter (docs/FORMAT.md section 11): what it is and the base it binds to
    ADAPTER_VERSION = "lrq.adapter.version"                  # uint32, = constants.ADAPTER_VERSION
    ADAPTER_BASE_ARCH = "lrq.adapter.base.architecture"      # string, the base's general.architecture
    ADAPTER_BASE_BLOCK_COUNT = "lrq.adapter.base.block_count"  # uint32, the base's layer count
    ADAPTER_BASE_TENSORS = "lrq.adapter.base.tensors"        # string[n], modified base weights, sorted
    ADAPTER_BASE_TYPES = "lrq.adapter.base.types"            # uint32[n], their ggml type ids
    ADAPTER_BASE_SHAPES = "lrq.adapter.base.shapes"          # uint32[2n], (ne0, ne1) pairs
    ADAPTER_BASE_CRC32 = "lrq.adapter.base.crc32"            # uint32[n], CRC-32 of sampled data
    ADAPTER_BASE_FILE = "lrq.adapter.base.file"              # string, base file name (provenance)
    ADAPTER_BASE_TYPE = "lrq.adapter.base.type"              # string, e.g. IQ2_XS (provenance)

    # expert-level replication of MoE layers (format v4, docs/moe.md): m entries, all six or none
    MOE_LAYER = "lrq.moe.layer"                    # uint32[m], base layer of each entry
    MOE_REPLICA = "lrq.moe.replica"                # uint32[m], expert-replica index >= 1 (lrq_x{r})
    MOE_EXPERTS = "lrq.moe.experts"                # uint32[sum count], each entry's sorted experts
    MOE_COUNT = "lrq.moe.count"                    # uint32[m], experts each entry lists
    MOE_MODE = "lrq.moe.mode"                      # uint32[m], MOE_PARALLEL | MOE_SERIAL
    MOE_WEIGHT = "lrq.moe.weight"                  # float32[m], the entry's weight a_r

    @classmethod
    def all(cls) -> dict[str, str]:
        """{attribute name: key} of every key."""
        return {k: v for k, v in vars(cls).items() if k.isupper() and isinstance(v, str)}


REQUIRED_KEYS = (Keys.FORMAT_VERSION, Keys.BASE_ARCH,
                 Keys.SCHEDULE_LAYER, Keys.SCHEDULE_REPLICA, Keys.SCHEDULE_GROUP,
                 Keys.SCHEDULE_WEIGHT)
# required when the file has LRQ-typed codes (they are needed to dequantize them)
REQUIRED_WITH_LRQ_CODES = (Keys.QUANT_MODE, Keys.GROUP_SIZE)


# The GGUF value type of every lrq.* key (docs/FORMAT.md sections 2 and 10, rule K1): a key of
# this table that is present has exactly this type ("array:<element type>" for an array),
# whether or not the reader uses its value; lrq.* keys not listed are ignored.  The C++ copy is
# LRQ_KEY_SPECS in native/include/lrq-keys.h; tests/test_bad_files.py checks the two agree.
KEY_TYPES: dict[str, str] = {
    Keys.FORMAT_VERSION: "uint32",
    Keys.BASE_ARCH: "string",
    Keys.QUANT_MODE: "string",
    Keys.GROUP_SIZE: "uint32",
    Keys.BITS: "uint32",
    Keys.SCALE_SEARCH: "string",
    Keys.ROUNDING: "string",
    Keys.NOISE: "float32",
    Keys.SEED: "uint32",
    Keys.INIT_SCALE_DELTA: "float32",
    Keys.INIT_GRID_OFFSET: "float32",
    Keys.SCHEDULE_LAYER: "array:uint32",
    Keys.SCHEDULE_REPLICA: "array:uint32",
    Keys.SCHEDULE_GROUP: "array:uint32",
    Keys.SCHEDULE_WEIGHT: "array:float32",
    Keys.BASE_TYPE: "string",
    Keys.BASE_IMATRIX: "string",
    Keys.PLAN: "string",
    Keys.KEEP: "string",
    Keys.BPW_LRQ: "float32",
    Keys.BPW_LINEARS: "float32",
    Keys.SOURCE: "string",
    Keys.CONVERTER: "string",
    Keys.ADAPTER_VERSION: "uint32",
    Keys.ADAPTER_BASE_ARCH: "string",
    Keys.ADAPTER_BASE_BLOCK_COUNT: "uint32",
    Keys.ADAPTER_BASE_TENSORS: "array:string",
    Keys.ADAPTER_BASE_TYPES: "array:uint32",
    Keys.ADAPTER_BASE_SHAPES: "array:uint32",
    Keys.ADAPTER_BASE_CRC32: "array:uint32",
    Keys.ADAPTER_BASE_FILE: "string",
    Keys.ADAPTER_BASE_TYPE: "string",
    Keys.MOE_LAYER: "array:uint32",
    Keys.MOE_REPLICA: "array:uint32",
    Keys.MOE_EXPERTS: "array:uint32",
    Keys.MOE_COUNT: "array:uint32",
    Keys.MOE_MODE: "array:uint32",
    Keys.MOE_WEIGHT: "array:float32",
}
# the lrq.moe.* arrays in the order the readers check them (rule X1: all or none)
MOE_KEYS = (Keys.MOE_LAYER, Keys.MOE_REPLICA, Keys.MOE_EXPERTS, Keys.MOE_COUNT, Keys.MOE_MODE,
            Keys.MOE_WEIGHT)
MOE_PARALLEL, MOE_SERIAL = 0, 1
MOE_MODES = {"parallel": MOE_PARALLEL, "serial": MOE_SERIAL}
# the parallel weights of one layer sum to at most 1 (rule X3), up to float32 storage of e.g. 1/3
MOE_WEIGHT_SUM_TOL = 1e-6

# Adapters (docs/FORMAT.md section 11): general.architecture of an adapter file, its container
# version (LRQ_ADAPTER_VERSION in lrq-format.h) and the sample its content hash covers.
ADAPTER_ARCH = "lrq-adapter"
ADAPTER_VERSION = 1
ADAPTER_VERSION_MIN = 1
ADAPTER_HASH_WHOLE_MAX = 65536     # bytes: a tensor up to this size is hashed whole
ADAPTER_HASH_CHUNKS = 16           # else this many chunks ...
ADAPTER_HASH_CHUNK = 4096          # ... of this many bytes, evenly spaced

# The longest schedule (and the bound on replica indices) either reader takes: llama.cpp's
# LLAMA_MAX_LAYERS, the size of its per-layer arrays (LRQ_MAX_EXECUTIONS in lrq-keys.h).
MAX_EXECUTIONS = 512
# More executions per base layer than this load with a warning stating the KV cache they cost
# (rule S6; LRQ_EXEC_WARN_FACTOR in lrq-keys.h).
EXEC_WARN_FACTOR = 4


class LRQType(IntEnum):
    """ggml type ids of the LRQ code tensors (blocks of 32 weights, 4*b bytes).

    The first free ids after the last type of the pinned llama.cpp (GGML_TYPE_Q2_0 = 42; the
    gguf-py 0.19 on PyPI stops at Q1_0 = 41, so its maximum is not the right reference).  They
    are part of the file format: never reuse or renumber them, even if a type is retired.
    """

    LRQ1 = 43
    LRQ2 = 44
    LRQ3 = 45
    LRQ4 = 46


LRQ_BLOCK = 32                      # weights per code block (= ggml's QK)


def lrq_type(bits: int) -> LRQType:
    return LRQType(LRQType.LRQ1 + bits - 1)


def lrq_bits(type_id: int) -> int | None:
    """Bits of an LRQ type id, None for any other id."""
    return int(type_id) - LRQType.LRQ1 + 1 if LRQType.LRQ1 <= int(type_id) <= LRQType.LRQ4 else None


def lrq_block_bytes(bits: int) -> int:
    return 4 * bits


MODES = ("asym", "sym", "ternary")
GROUP_SIZES = (32, 64, 128, 256)
BITS_CHOICES = (1, 2, 3, 4)
TERNARY_BITS = 2                    # ternary codes 0, 1, 2 are stored as LRQ2
ACT_BITS_MAX = 16

# ---- tensor names ---------------------------------------------------------------------------
# For a weight "blk.5.attn_q.weight" the stem is "blk.5.attn_q".
SCALE_SUFFIX = ".lrq_scale"          # F16 [n_out, n_groups]: d
MIN_SUFFIX = ".lrq_min"              # F16 [n_out, n_groups]: m (asym only)
# format v4, the two-level layout: I8 [n_out, n_in / B], B in TWO_LEVEL_SUB_SIZES, byte = sc | mn << 4
# (lrq_scale / lrq_min then hold the super-block d and dmin, super-block = the group size)
SUB_SUFFIX = ".lrq_sub"
TWO_LEVEL_SUB_SIZES = (16, 32)
REPLICA_PARAMS = ("scale_mult", "grid_offset", "gain", "bias", "act", "clip", "lr_u", "lr_v")
# format v3: the low-rank correction y += U (V x) of a replica (docs/FORMAT.md section 6.2):
# lr_u [n_out, rank], lr_v [rank, n_in], F16 or Q8_0, both or neither
LOWRANK_PARAMS = ("lr_u", "lr_v")
LOWRANK_MAX_RANK = 64
# which parameters a replica of each kind of weight takes (docs/FORMAT.md sections 5, 6)
LRQ_REPLICA_PARAMS = ("scale_mult", "grid_offset", "gain", "bias", "act") + LOWRANK_PARAMS
STOCK_REPLICA_PARAMS = ("gain", "bias", "clip") + LOWRANK_PARAMS   # v2: outside the matmul, any backend
# the block linears a replica parameterises (LRQ codes by default; any type in format v2)
BLOCK_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")

# expert replicas (format v4): blk.L.ffn_{gate,up,down}_exps.lrq_x{r}.{gain,bias}, F32 numpy
# [n_expert, n_out]; no clip (a per-expert input bound has no single ggml op; docs/moe.md)
EXPERT_PROJS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
EXPERT_PARAMS = ("gain", "bias")
_EXPERT_REPLICA_RE = re.compile(r"^blk\.(?P<layer>\d+)\.(?P<proj>[a-z_]+)\.lrq_x(?P<replica>\d+)\.(?P<param>[a-z_]+)$")


def expert_param_name(layer: int, proj: str, replica: int, param: str) -> str:
    """2, ``ffn_up_exps``, 1, ``gain`` -> ``blk.2.ffn_up_exps.lrq_x1.gain``."""
    return f"blk.{layer}.{proj}.lrq_x{replica}.{param}"


def parse_expert_param_name(name: str) -> tuple[int, str, int, str] | None:
    """(layer, proj, replica, param) of any ``blk.L.<x>.lrq_x{r}.<p>`` name (proj and param
    unchecked: the readers refuse unknown ones by name), else None."""
    m = _EXPERT_REPLICA_RE.match(name)
    if not m:
        return None
    return int(m.group("layer")), m.group("proj"), int(m.group("replica")), m.group("param")


_REPLICA_RE = re.compile(r"^(?P<stem>.+)\.lrq_r(?P<replica>\d+)\.(?P<param>" + "|".join(REPLICA_PARAMS) + r")$")
_LAYER_RE = re.compile(r"^blk\.(\d+)\.")
_BLOCK_LINEAR_RE = re.compile(r"^blk\.\d+\.(" + "|".join(BLOCK_LINEARS) + r")\.weight$")


def is_block_linear(name: str) -> bool:
    """``blk.N.{attn_q,...,ffn_down}.weight``: a weight a replica may parameterise."""
    return _BLOCK_LINEAR_RE.match(name) is not None


def weight_stem(weight_name: str) -> str:
    """``blk.5.attn_q.weight`` -> ``blk.5.attn_q``."""
    return weight_name[:-len(".weight")] if weight_name.endswith(".weight") else weight_name


def scale_name(weight_name: str) -> str:
    return weight_stem(weight_name) + SCALE_SUFFIX


def min_name(weight_name: str) -> str:
    return weight_stem(weight_name) + MIN_SUFFIX


def sub_name(weight_name: str) -> str:
    return weight_stem(weight_name) + SUB_SUFFIX


def replica_param_name(weight_name: str, replica: int, param: str) -> str:
    """``blk.5.attn_q.weight``, 1, ``scale_mult`` -> ``blk.5.attn_q.lrq_r1.scale_mult``."""
    if param not in REPLICA_PARAMS:
        raise ValueError(f"unknown replica parameter '{param}'; known: {', '.join(REPLICA_PARAMS)}")
    if replica < 0:
        raise ValueError(f"replica index must be >= 0, got {replica}")
    return f"{weight_stem(weight_name)}.lrq_r{replica}.{param}"


def parse_replica_param_name(name: str) -> tuple[str, int, str] | None:
    """(weight name, replica, param) of a per-replica tensor name, else None."""
    m = _REPLICA_RE.match(name)
    if not m:
        return None
    return m.group("stem") + ".weight", int(m.group("replica")), m.group("param")


def is_aux_tensor(name: str) -> bool:
    """True for tensors that are parameters of an LRQ weight, not base model parameters."""
    return (name.endswith(SCALE_SUFFIX) or name.endswith(MIN_SUFFIX) or name.endswith(SUB_SUFFIX)
            or _REPLICA_RE.match(name) is not None or _EXPERT_REPLICA_RE.match(name) is not None)


def layer_of(name: str) -> int | None:
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None
