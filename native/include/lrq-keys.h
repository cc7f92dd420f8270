// lrq: every lrq.* GGUF key of docs/FORMAT.md section 2 with its GGUF value type, for the C++
// loader (native/lrq/lrq-llama.cpp).  The Python copy is lrq.constants.KEY_TYPES; a test
// (tests/test_bad_files.py) reads this table and checks that the two are the same.
//
// Validity rule K1 (FORMAT.md section 10): a key of this table that is present has exactly this
// type (and, for an array, this element type), whether or not the reader uses its value; the
// loader checks the type before it reads any value, so a file can never reach one of gguf's
// type assertions.  lrq.* keys not in this table are ignored by both readers.
#pragma once

#include "gguf.h"

struct lrq_key_spec {
    const char *   key;
    enum gguf_type type;
    enum gguf_type arr_type;   // element type of an array; GGUF_TYPE_COUNT for a scalar
};

#define LRQ_KEY_FORMAT_VERSION   "lrq.format_version"
#define LRQ_KEY_BASE_ARCH        "lrq.base_architecture"
#define LRQ_KEY_QUANT_MODE       "lrq.quant.mode"
#define LRQ_KEY_GROUP_SIZE       "lrq.quant.group_size"
#define LRQ_KEY_SCHEDULE_LAYER   "lrq.schedule.layer"
#define LRQ_KEY_SCHEDULE_REPLICA "lrq.schedule.replica"
#define LRQ_KEY_SCHEDULE_GROUP   "lrq.schedule.group"
#define LRQ_KEY_SCHEDULE_WEIGHT  "lrq.schedule.weight"
// adapters (FORMAT.md section 11)
#define LRQ_KEY_ADAPTER_VERSION  "lrq.adapter.version"
#define LRQ_KEY_ADAPTER_ARCH     "lrq.adapter.base.architecture"
#define LRQ_KEY_ADAPTER_NLAYER   "lrq.adapter.base.block_count"
#define LRQ_KEY_ADAPTER_TENSORS  "lrq.adapter.base.tensors"
#define LRQ_KEY_ADAPTER_TYPES    "lrq.adapter.base.types"
#define LRQ_KEY_ADAPTER_SHAPES   "lrq.adapter.base.shapes"
#define LRQ_KEY_ADAPTER_CRC32    "lrq.adapter.base.crc32"
// expert-level replication of MoE layers (format v4, docs/moe.md): all six arrays or none (X1)
#define LRQ_KEY_MOE_LAYER        "lrq.moe.layer"
#define LRQ_KEY_MOE_REPLICA      "lrq.moe.replica"
#define LRQ_KEY_MOE_EXPERTS      "lrq.moe.experts"
#define LRQ_KEY_MOE_COUNT        "lrq.moe.count"
#define LRQ_KEY_MOE_MODE         "lrq.moe.mode"
#define LRQ_KEY_MOE_WEIGHT       "lrq.moe.weight"
#define LRQ_MOE_PARALLEL 0
#define LRQ_MOE_SERIAL   1
// parallel weights of one layer sum to at most 1 + this (rule X3; lrq.constants.MOE_WEIGHT_SUM_TOL)
#define LRQ_MOE_WEIGHT_SUM_TOL 1e-6
// Load options of the patched tools and the binding (--lrq-layers, --lrq-adapter), passed to the
// loader as string kv-overrides under these names.  They are never file keys.
#define LRQ_OPT_LAYERS           "lrq.load.layers"
#define LRQ_OPT_ADAPTER          "lrq.load.adapter"

// The longest schedule either reader takes: llama.cpp's LLAMA_MAX_LAYERS (its per-layer arrays
// have this size).  Replica indices are bounded by the same number (rule S2).
#define LRQ_MAX_EXECUTIONS 512
// A schedule of more than this many executions per base layer loads with a warning that states
// the KV cache it costs (rule S6): the cache grows with the executions, not with the weights.
#define LRQ_EXEC_WARN_FACTOR 4

static const struct lrq_key_spec LRQ_KEY_SPECS[] = {
    { LRQ_KEY_FORMAT_VERSION,   GGUF_TYPE_UINT32,  GGUF_TYPE_COUNT },
    { LRQ_KEY_BASE_ARCH,        GGUF_TYPE_STRING,  GGUF_TYPE_COUNT },
    { LRQ_KEY_QUANT_MODE,       GGUF_TYPE_STRING,  GGUF_TYPE_COUNT },
    { LRQ_KEY_GROUP_SIZE,       GGUF_TYPE_UINT32,  GGUF_TYPE_COUNT },
    { "lrq.quant.bits",         GGUF_TYPE_UINT32,  GGUF_TYPE_COUNT },
    { "lrq.quant.scale_search", GGUF_TYPE_STRING,  GGUF_TYPE_COUNT },
    { "lrq.quant.rounding",     GGUF_TYPE_STRING,  GGUF_TYPE_COUNT },
    { "lrq.quant.noise",        GGUF_TYPE_FLOAT32, GGUF_TYPE_COUNT },
    { "lrq.quant.seed",         GGUF_TYPE_UINT32,  GGUF_TYPE_COUNT },
    { "lrq.init.scale_delta",   GGUF_TYPE_FLOAT32, GGUF_TYPE_COUNT },
    { "lrq.init.grid_offset",   GGUF_TYPE_FLOAT32, GGUF_TYPE_COUNT },
    { LRQ_KEY_SCHEDULE_LAYER,   GGUF_TYPE_ARRAY,   GGUF_TYPE_UINT32 },
    { LRQ_KEY_SCHEDULE_REPLICA, GGUF_TYPE_ARRAY,   GGUF_TYPE_UINT32 },
    { LRQ_KEY_SCHEDULE_GROUP,   GGUF_TYPE_ARRAY,   GGUF_TYPE_UINT32 },
    { LRQ_KEY_SCHEDULE_WEIGHT,  GGUF_TYPE_ARRAY,   GGUF_TYPE_FLOAT32 },
    { "lrq.base.type",          GGUF_TYPE_STRING,  GGUF_TYPE_COUNT },
    { "lrq.base.imatrix",       GGUF_TYPE_STRING,  GGUF_TYPE_COUNT },
    { "lrq.plan",               GGUF_TYPE_STRING,  GGUF_TYPE_COUNT },
    { "lrq.keep",               GGUF_TYPE_STRING,  GGUF_TYPE_COUNT },
    { "lrq.bpw.lrq",            GGUF_TYPE_FLOAT32, GGUF_TYPE_COUNT },
    { "lrq.bpw.linears",        GGUF_TYPE_FLOAT32, GGUF_TYPE_COUNT },
    { "lrq.source",             GGUF_TYPE_STRING,  GGUF_TYPE_COUNT },
    { "lrq.converter",          GGUF_TYPE_STRING,  GGUF_TYPE_COUNT },
    { LRQ_KEY_ADAPTER_VERSION,  GGUF_TYPE_UINT32,  GGUF_TYPE_COUNT },
    { LRQ_KEY_ADAPTER_ARCH,     GGUF_TYPE_STRING,  GGUF_TYPE_COUNT },
    { LRQ_KEY_ADAPTER_NLAYER,   GGUF_TYPE_UINT32,  GGUF_TYPE_COUNT },
    { LRQ_KEY_ADAPTER_TENSORS,  GGUF_TYPE_ARRAY,   GGUF_TYPE_STRING },
    { LRQ_KEY_ADAPTER_TYPES,    GGUF_TYPE_ARRAY,   GGUF_TYPE_UINT32 },
    { LRQ_KEY_ADAPTER_SHAPES,   GGUF_TYPE_ARRAY,   GGUF_TYPE_UINT32 },
    { LRQ_KEY_ADAPTER_CRC32,    GGUF_TYPE_ARRAY,   GGUF_TYPE_UINT32 },
    { "lrq.adapter.base.file",  GGUF_TYPE_STRING,  GGUF_TYPE_COUNT },
    { "lrq.adapter.base.type",  GGUF_TYPE_STRING,  GGUF_TYPE_COUNT },
    { LRQ_KEY_MOE_LAYER,        GGUF_TYPE_ARRAY,   GGUF_TYPE_UINT32 },
    { LRQ_KEY_MOE_REPLICA,      GGUF_TYPE_ARRAY,   GGUF_TYPE_UINT32 },
    { LRQ_KEY_MOE_EXPERTS,      GGUF_TYPE_ARRAY,   GGUF_TYPE_UINT32 },
    { LRQ_KEY_MOE_COUNT,        GGUF_TYPE_ARRAY,   GGUF_TYPE_UINT32 },
    { LRQ_KEY_MOE_MODE,         GGUF_TYPE_ARRAY,   GGUF_TYPE_UINT32 },
    { LRQ_KEY_MOE_WEIGHT,       GGUF_TYPE_ARRAY,   GGUF_TYPE_FLOAT32 },
};
