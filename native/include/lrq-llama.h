// lrq: LRQ files in llama.cpp's libllama (implemented in native/lrq/lrq-llama.cpp, compiled into
// the llama target by lrq's CMakeLists.txt).  The patch 0003-llama-lrq-arch-virtual-layers calls
// these functions from the loader, the model and the graph; the logic lives here.
//
// Virtual layers: every tensor of the file is created once, for its base layer.  After
// load_arch_tensors the model's layers[] gets one entry per execution of the schedule, each a copy
// of its base layer's llama_layer (so the weight pointers are ALIASED, not copied), and the
// per-layer hparams arrays and n_layer_all are expanded the same way.  From then on the KV cache
// (one slot per execution), the graph (il = execution) and every per-layer lookup see n_exec layers.
#pragma once

#include "ggml.h"

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

struct gguf_context;
struct ggml_context;
struct ggml_tensor;
struct llama_model_base;
struct llama_model_loader;

// "lrq-llama" -> "llama" (also qwen2, qwen3); nullptr for any other name, so that e.g.
// "lrq-mamba" stays an unknown architecture.
const char * lrq_base_arch_name(const char * name);

// At the end of the loader's constructor (metadata and tensor index read).  Refuses (throws
// std::runtime_error naming the file) an LRQ file whose lrq.format_version is absent or outside
// LRQ_FORMAT_VERSION_MIN..LRQ_FORMAT_VERSION, or whose lrq.base_architecture disagrees with the
// name (when the architecture starts with "lrq-" or the key lrq.format_version exists), and a
// vocabulary with a repeated token (any GGUF).  Then reads the load options --lrq-layers and
// --lrq-adapter (string kv-overrides LRQ_OPT_*, lrq-args.h) and, for an adapter, checks its
// binding to this base (FORMAT.md section 11, rules AD1-AD4) and adds its file and its tensors
// to the loader's index, so that llama.cpp places and loads them like the base's own.
void lrq_loader_init(llama_model_loader & ml, const std::string & fname);

// A layer map (FORMAT.md 7.1) -> the base layer of each execution.  Throws std::runtime_error
// naming the map and n_layer when it is invalid.
std::vector<uint32_t> lrq_parse_layer_map(const std::string & map, uint32_t n_layer);

// The linears of a block that may hold LRQ codes (FORMAT.md section 5).
enum lrq_slot {
    LRQ_SLOT_Q, LRQ_SLOT_K, LRQ_SLOT_V, LRQ_SLOT_O, LRQ_SLOT_GATE, LRQ_SLOT_UP, LRQ_SLOT_DOWN,
    LRQ_SLOT_COUNT,
};

// One replicable linear as one execution runs it: shared weight (LRQ codes with their base grid,
// or a stock-typed weight), this replica's parameters (nullptr = the format's default).
struct lrq_linear {
    ggml_tensor * codes = nullptr;   // the aliased weight (lookup key in build_lrq_mm)
    bool          stock = false;     // a stock-typed weight (format v2): mul_mat, then gain / bias
    float         clip  = INFINITY;  // stock weights: clamp(x, -clip, clip) before the matmul
    ggml_tensor * scale = nullptr;
    ggml_tensor * min   = nullptr;
    ggml_tensor * sub   = nullptr;   // format v4: the two-level layout's sub-block indices (I8)
    ggml_tensor * alpha = nullptr;
    ggml_tensor * beta  = nullptr;
    ggml_tensor * gain  = nullptr;
    ggml_tensor * bias  = nullptr;
    ggml_tensor * act   = nullptr;
    ggml_tensor * lr_u  = nullptr;   // format v3: y += U (V x), x before any clip (FORMAT.md 6.2)
    ggml_tensor * lr_v  = nullptr;
};

struct lrq_exec {
    uint32_t layer   = 0;      // base layer
    uint32_t replica = 0;
    uint32_t group   = 0;      // parallel-group id
    float    weight  = 1.0f;   // weight in its group
    uint32_t n_group = 1;      // members of its group
    bool     first   = true;   // first / last member of its group
    bool     last    = true;
    std::vector<lrq_linear> lin;
};

// One expert-replication entry (format v4, docs/moe.md): replica `replica` of the MoE FFN of base
// layer `layer` for the listed experts, run in every execution of that layer after the stock
// experts, on the same routing.
struct lrq_moe_entry {
    uint32_t              layer   = 0;
    uint32_t              replica = 0;      // the lrq_x{r} of its tensors
    uint32_t              mode    = 0;      // LRQ_MOE_PARALLEL | LRQ_MOE_SERIAL
    float                 weight  = 0.0f;   // a_r
    std::vector<uint32_t> experts;          // sorted, unique
    std::vector<float>    coef;             // [n_expert]: a_r for a listed expert, else 0 (a graph input)
    std::vector<float>    map;              // [n_expert]: e for a listed expert, else -1: the replica's ids
                                            // (a graph input; -1 = no product, patch 0011)
    ggml_tensor *         gain[3] = { nullptr, nullptr, nullptr };   // gate, up, down: F32 [n_out, n_expert]
    ggml_tensor *         bias[3] = { nullptr, nullptr, nullptr };   // (ggml order); nullptr = default
};

struct lrq_model {
    std::string arch_name;     // "lrq-llama"
    uint32_t    version    = 0;   // lrq.format_version
    int         mode       = 0;   // lrq_mode
    int         group_size = 0;
    uint32_t    n_base     = 0;
    int         max_bits   = 0;   // widest LRQ code type; 0 = stock-typed base (no LRQ op)
    size_t      n_replica_tensors = 0;
    std::string layer_map;     // --lrq-layers ("" none)
    std::string adapter;       // --lrq-adapter file ("" none)
    std::vector<lrq_exec> exec;
    std::vector<lrq_moe_entry> moe;   // expert-replication entries (lrq.moe.*), in file order
};

// After load_arch_hparams: parse and validate the LRQ keys and the schedule (nullptr for a plain
// GGUF; throws std::runtime_error on invalid data).  Nothing is resized here.
// params: the model's load parameters (protected in llama_model, so the hook passes them).
std::shared_ptr<lrq_model> lrq_load_hparams(llama_model_base & m, llama_model_loader & ml,
                                           const struct llama_model_params & params);

// After load_arch_tensors (before done_getting_tensors): creates the group parameter and replica
// tensors, refuses orphans, virtualizes layers and hparams; returns the base layer of each
// execution (the caller expands its per-layer device list).  Throws on invalid data.
std::vector<uint32_t> lrq_load_tensors(llama_model_base & m, llama_model_loader & ml);

// The op that reads a tensor of an LRQ file, for the loader's buffer-type choice: the LRQ op for
// LRQ codes, their group parameters and their replicas' parameters; ggml_mul / ggml_add for the
// gain / bias of a stock-typed weight's replica (so they stay beside the weight on any backend);
// op unchanged for every other tensor.
enum ggml_op lrq_tensor_op(const llama_model_loader & ml, const ggml_tensor * t_meta, enum ggml_op op);

// "lrq-llama 135M LRQ2 g64 asym, 30 layers -> 60 executions"
std::string lrq_model_desc(const lrq_model & l, const std::string & stock_desc);

// Graph node budget: each execution costs a base layer's nodes again, plus the group combine.
uint32_t lrq_graph_max_nodes(const lrq_model & l, uint32_t stock);

// ---- lockstep order of parallel groups (native/lrq/lrq-graph.cpp) --------------------------------

struct ggml_cgraph;

// Where a graph builder stands in execution il (build_lrq_layer_inp, the start and the end of
// build_lrq_layer_out): records ggml_used_mem(ctx), so that each tensor of the graph can be told
// the execution that created it (a context lays its objects out in creation order).  Marks of
// execution 0's input start a new graph.
enum lrq_graph_mark_where { LRQ_MARK_INP = 0, LRQ_MARK_OUT_BEGIN = 1, LRQ_MARK_OUT_END = 2 };
void lrq_graph_mark(const ggml_context * ctx, int il, int where, size_t n_exec);

// Once the graph of a model with a schedule is built (llama_model::build_graph, patch 0013), before
// the scheduler splits and allocates it: reorders the nodes of each parallel group so that the
// members run each linear back to back (the k-th LRQ_MUL_MATs of all members adjacent), keeping
// every node after its sources and every access to in-place-written storage (KV cache) in order.
// Results are unchanged (the same ops on the same inputs).  Leaves the graph as built, with one
// warning in the log, when anything is unexpected; LRQ_NO_LOCKSTEP=1 in the environment turns it
// off (A/B).  Logs (INFO, when it changes) the number of adjacent same-codes LRQ pairs.
void lrq_graph_lockstep(const lrq_model & l, const ggml_context * ctx, ggml_cgraph * gf);

// Adjacent node pairs of gf for which ggml_lrq_mul_mat_shares_codes (lrq-ggml.h) holds.
int lrq_graph_shared_code_pairs(ggml_cgraph * gf);
