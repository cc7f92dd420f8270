// lrq: the one format version shared by the C++ side (the patched llama.cpp, the binding) and
// Python (lrq.constants.FORMAT_VERSION; a test checks that the two agree).
// A GGUF written by lrq stores it under the key "lrq.format_version".  Readers accept
// LRQ_FORMAT_VERSION_MIN..LRQ_FORMAT_VERSION and refuse any other value by name.
//   1: LRQ-typed codes with per-group parameters and replicas, the schedule.
//   2: adds stock-typed (any ggml type) block linears with per-replica gain / bias / clip.  A v1
//      file is a valid v2 file, so v1 files still load; a v1 file may not carry v2 tensors.
//   3: adds per-replica low-rank corrections y += U (V x) (lr_u, lr_v; F16 or Q8_0) of any
//      replicable linear.  A v2 file is a valid v3 file; an older file may not carry them.
//   4: adds expert-level replication of mixture-of-experts layers (lrq.moe.*, per-expert gain /
//      bias tensors lrq_x{r}; docs/moe.md) and the two-level 2-bit layout (<w>.lrq_sub, I8
//      [n_out, n_in / B], B 16 or 32: 4-bit sub-block scale and min indices beside LRQ2 codes,
//      whose lrq_scale / lrq_min then hold the super-block d and dmin; docs/two_level.md).  A v3
//      file is a valid v4 file; an older file may carry neither.
#pragma once

#define LRQ_FORMAT_VERSION 4
#define LRQ_FORMAT_VERSION_MIN 1
#define LRQ_LOWRANK_VERSION 3
#define LRQ_TWO_LEVEL_VERSION 4   // the two-level 2-bit layout (<w>.lrq_sub beside LRQ2 codes)
#define LRQ_LOWRANK_MAX_RANK 64
#define LRQ_MOE_EXPERTS_VERSION 4

// Adapters (FORMAT.md section 11; lrq.constants.ADAPTER_*): a GGUF of architecture "lrq-adapter"
// holding a schedule and replica tensors, bound to its base by the shapes, types and sampled
// CRC-32 of the weights it modifies.  Its own container version, independent of the above.
#define LRQ_ADAPTER_ARCH "lrq-adapter"
#define LRQ_ADAPTER_VERSION 1
#define LRQ_ADAPTER_VERSION_MIN 1
#define LRQ_ADAPTER_HASH_WHOLE_MAX 65536
#define LRQ_ADAPTER_HASH_CHUNKS 16
#define LRQ_ADAPTER_HASH_CHUNK 4096

#define LRQ_STR_(x) #x
#define LRQ_STR(x) LRQ_STR_(x)
#define LRQ_FORMAT_VERSION_STR LRQ_STR(LRQ_FORMAT_VERSION)
