// lrq: the ggml op GGML_OP_LRQ_MUL_MAT (graph constructor in native/lrq/lrq-ggml.c, compiled into
// ggml-base; CPU forward in native/lrq/lrq-cpu.c, compiled into ggml-cpu).  The patched ggml.h
// only declares the enum values, so that this API can change without rebuilding all of ggml.
#pragma once

#include "ggml.h"
#include "lrq-kernels.h"   // lrq_mode

#ifdef __cplusplus
extern "C" {
#endif

// Sources of GGML_OP_LRQ_MUL_MAT (ggml order: ne0 first).  NULL = the format's default.
enum lrq_op_src {
    LRQ_SRC_CODES = 0,   // W codes, LRQ1..4, [n_in, n_out], rows contiguous
    LRQ_SRC_X     = 1,   // x F32 [n_in, T, (ne2, ne3)], nb0 = 4, rows equally strided
    LRQ_SRC_SCALE = 2,   // d F16 [n_groups, n_out]
    LRQ_SRC_MIN   = 3,   // m F16 [n_groups, n_out] (asym only) | NULL
    LRQ_SRC_ALPHA = 4,   // scale_mult F16 [n_groups | 1, n_out | 1] | NULL (1)
    LRQ_SRC_BETA  = 5,   // grid_offset F16, same shapes | NULL (0)
    LRQ_SRC_GAIN  = 6,   // gamma F32 [n_out] | NULL (1)
    LRQ_SRC_BIAS  = 7,   // bias F32 [n_out] | NULL (0)
    LRQ_SRC_ACT   = 8,   // (clip c, act bits k) F32 [2] | NULL ((1, 0)); read at compute time
    LRQ_SRC_COUNT = 9,   // the sources of the single-level layout (Metal / CUDA bind these)
    // Format v4, the two-level layout: I8 [n_in / B, n_out] sub-block indices (sc | mn << 4), B 16
    // or 32; with it SCALE / MIN hold the super-block d / dmin.  Outside LRQ_SRC_COUNT: only the CPU
    // backend has kernels for it (lrq_op_two_level), every other backend declines such a node.
    LRQ_SRC_SUB   = 9,
};

// op_params (int32): [0] group size g, [1] mode (lrq_mode).
#define LRQ_OP_PARAM_GROUP_SIZE 0
#define LRQ_OP_PARAM_MODE       1

// Bits of the codes of an LRQ type (1..4), 0 for any other type.
static inline int lrq_type_bits(enum ggml_type t) {
    return GGML_TYPE_IS_LRQ(t) ? (int) t - (int) GGML_TYPE_LRQ1 + 1 : 0;
}

// ggml_lrq_mul_mat with the two-level layout's sub-block indices `sub` (NULL: ggml_lrq_mul_mat).
GGML_API struct ggml_tensor * ggml_lrq_mul_mat_two_level(
        struct ggml_context * ctx,
        struct ggml_tensor  * w,
        struct ggml_tensor  * x,
        struct ggml_tensor  * scale,
        struct ggml_tensor  * min,
        struct ggml_tensor  * sub,
        struct ggml_tensor  * alpha,
        struct ggml_tensor  * beta,
        struct ggml_tensor  * gain,
        struct ggml_tensor  * bias,
        struct ggml_tensor  * act,
        int                   group_size,
        lrq_mode              mode);

// y = act_r(x) . W_r^T + bias: result F32 [n_out, x->ne1, x->ne2, x->ne3] (FORMAT.md section 6).
// Asserts on shapes and types (the loader validates files before building a graph).
GGML_API struct ggml_tensor * ggml_lrq_mul_mat(
        struct ggml_context * ctx,
        struct ggml_tensor  * w,
        struct ggml_tensor  * x,
        struct ggml_tensor  * scale,
        struct ggml_tensor  * min,
        struct ggml_tensor  * alpha,
        struct ggml_tensor  * beta,
        struct ggml_tensor  * gain,
        struct ggml_tensor  * bias,
        struct ggml_tensor  * act,
        int                   group_size,
        lrq_mode              mode);

// Shape/type check of a GGML_OP_LRQ_MUL_MAT node without asserting (NULL = valid, else a
// static message): used by ggml_lrq_mul_mat and by the CPU backend's supports_op.
GGML_API const char * ggml_lrq_mul_mat_check(const struct ggml_tensor * op);

// Two GGML_OP_LRQ_MUL_MAT nodes that one pass over the codes can compute together (the members of
// a parallel group): same codes, base grid (d, m, two-level sub-block indices) and op parameters,
// inputs of one shape, b not reading a.  The one definition of "shares codes": the lockstep order
// (native/lrq/lrq-graph.cpp) puts such nodes side by side, and the CUDA backend fuses them
// (native/cuda/lrq-cuda-ggml.c).
GGML_API bool ggml_lrq_mul_mat_shares_codes(const struct ggml_tensor * a, const struct ggml_tensor * b);

// How many of nodes[0..n) (at most max_run) one pass over the codes computes together: nodes[0]
// and the nodes after it, each marked for compute, sharing its codes and reading no earlier node
// of the run.  0 when nodes[0] is not an LRQ_MUL_MAT node.  The CPU backend (lrq-cpu.c) and the
// CUDA backend (native/cuda/lrq-cuda-ggml.c) fuse such runs.
GGML_API int ggml_lrq_mul_mat_run(struct ggml_tensor * const * nodes, int n, int max_run);

// The loader marks the meta tensors a two-level weight's op reads (codes, d / dmin, replica
// parameters) with this value in op_params[LRQ_PROBE_TWO_LEVEL_PARAM] (unused in a meta tensor):
// lrq_make_supports_test_op then probes a two-level node, so that only a backend that runs the
// layout (the CPU) holds them.
#define LRQ_PROBE_TWO_LEVEL_PARAM 15
#define LRQ_PROBE_TWO_LEVEL_MAGIC 0x4C525132

// A GGML_OP_LRQ_MUL_MAT node for buffer-type probing (llama's loader asks each device whether it
// supports the op that reads a weight): `t` (an LRQ code tensor or one of its parameter tensors,
// matched by type and shape) is placed in a matching source slot, the rest are dummy tensors
// without data; a two-level node when t is I8 (sub-block indices) or marked as above.  ctx must be a
// no_alloc context with room for 5 tensors.
GGML_API struct ggml_tensor * lrq_make_supports_test_op(struct ggml_context * ctx, struct ggml_tensor * t);

// The kernel GGML_OP_LRQ_MUL_MAT runs on this CPU: lrq_kernels_simd() ("avx2" | "neon" | "generic").
// Defined in lrq-cpu.c, so only inside a CPU backend, whose feature list shows it as LRQ_KERNELS
// (patches/0005; llama.cpp prints it in its system_info line).
const char * ggml_lrq_mul_mat_cpu_kernels(void);

// The source and result types the LRQ op takes (types only: llama's loader probes buffer types
// with dummy shapes; shapes are asserted when the node is built).  Every backend's supports_op
// (CPU, CUDA) asks this one function, so they cannot accept different nodes.
static inline bool lrq_op_types_supported(const struct ggml_tensor * op) {
    const struct ggml_tensor * const * s = (const struct ggml_tensor * const *) op->src;
    if (op->type != GGML_TYPE_F32 || !s[LRQ_SRC_CODES] || !s[LRQ_SRC_X] || !s[LRQ_SRC_SCALE]) return false;
    if (!GGML_TYPE_IS_LRQ(s[LRQ_SRC_CODES]->type) || s[LRQ_SRC_X]->type != GGML_TYPE_F32 ||
        s[LRQ_SRC_SCALE]->type != GGML_TYPE_F16) {
        return false;
    }
    for (int i = LRQ_SRC_MIN; i <= LRQ_SRC_BETA; ++i) {
        if (s[i] && s[i]->type != GGML_TYPE_F16) return false;
    }
    for (int i = LRQ_SRC_GAIN; i <= LRQ_SRC_ACT; ++i) {
        if (s[i] && s[i]->type != GGML_TYPE_F32) return false;
    }
    if (s[LRQ_SRC_SUB] && s[LRQ_SRC_SUB]->type != GGML_TYPE_I8) return false;
    return true;
}

// A node of the two-level layout (format v4): only the CPU backend runs it; CUDA and Metal ask
// this to decline it (their kernels read the single-level sources only).
static inline bool lrq_op_two_level(const struct ggml_tensor * op) {
    return op->src[LRQ_SRC_SUB] != NULL;
}

#ifdef __cplusplus
}
#endif
