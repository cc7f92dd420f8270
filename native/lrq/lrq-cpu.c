// lrq: CPU forward of GGML_OP_LRQ_MUL_MAT (compiled into every ggml-cpu variant by lrq's
// CMakeLists.txt; the prototypes are in the patched ggml-cpu/ops.h).  The arithmetic is
// lrq_kernels' int8-activation fast path (lrq_quantize_act_q8 + lrq_mul_mat_q8,
// native/include/lrq-kernels.h); this file only maps ggml tensors onto its descriptors and splits
// the work among ggml's threads.
//
//   op shape: W [n_in, n_out] (codes), x F32 [n_in, T] (T = ne1*ne2*ne3 rows, equally strided)
//             -> y F32 [n_out, T];  y[t, o] = sum_i W_r[o, i] * act_r(x[t, :])[i] + bias[o]
//
// Threading, the pattern of ggml's own mul_mat:
//   1. every thread quantizes its share of the T tokens into the shared work buffer (the
//      activations are quantized once per op, not once per row block);
//   2. barrier;
//   3. (row block x token block) chunks are taken dynamically from the threadpool's counter.
// Every thread executes the same barriers (with OpenMP ggml_barrier is `omp barrier`), so there is
// no early return before the barrier.
//
// Parallel groups: the lockstep order (lrq-graph.cpp) puts the members' nodes over the same codes
// side by side, and ggml-cpu's graph loop (patches/0014) hands such a run (ggml_lrq_mul_mat_run)
// to one call of ggml_compute_forward_lrq_mul_mat_run: every member's activations are quantized
// in phase 1, and each chunk of phase 2 computes all members (lrq_mul_mat_q8_multi: one pass over
// the codes on the AVX-512 kernel), bit for bit what the members give one node at a time.
#include "lrq-ggml.h"
#include "lrq-kernels.h"

#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "ggml-cpu-impl.h"
#include "ops.h"

#include <stdint.h>
#include <stdlib.h>

// Row chunk: a multiple of the kernel's 16-row block, small enough that a 576-row projection
// still gives 9 chunks to balance 2..8 threads at decode (T = 1).  Token chunk: a multiple of the
// kernel's 4-token block; 16 row-blocks x 32 tokens keep a chunk's codes and activations in L2.
#define LRQ_CPU_ROW_CHUNK 64
#define LRQ_CPU_TOK_CHUNK 32

// t lives in one of the CPU backend's extra buffer types (CPU_REPACK, AMX, ...), whose data
// layout is their own.  ggml-cpu's supports_op asks those about src[0..3] only; the two-level
// layout's sub-block indices sit in src[LRQ_SRC_SUB], so the LRQ op asks for itself.
static bool lrq_in_extra_buffer(const struct ggml_tensor * t) {
    if (!t || !t->buffer) return false;
    ggml_backend_reg_t reg = ggml_backend_cpu_reg();
    ggml_backend_dev_get_extra_bufts_t fn =
        (ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_dev_get_extra_bufts");
    if (!fn || ggml_backend_reg_dev_count(reg) == 0) return false;
    const ggml_backend_buffer_type_t buft = ggml_backend_buffer_get_type(t->buffer);
    for (ggml_backend_buffer_type_t * b = fn(ggml_backend_reg_dev_get(reg, 0)); b && *b; ++b) {
        if (*b == buft) return true;
    }
    return false;
}

bool ggml_lrq_mul_mat_cpu_supported(const struct ggml_tensor * op) {
    return lrq_op_types_supported(op) && !lrq_in_extra_buffer(op->src[LRQ_SRC_SUB]);
}

// lrq-ggml.h; the same answer in every ggml-cpu variant, since lrq_kernels dispatch at run time.
const char * ggml_lrq_mul_mat_cpu_kernels(void) {
    return lrq_kernels_simd();
}

static int64_t lrq_op_tokens(const struct ggml_tensor * x) {
    return x->ne[1] * x->ne[2] * x->ne[3];
}

size_t ggml_lrq_mul_mat_work_size(const struct ggml_tensor * dst, int n_tasks) {
    const struct ggml_tensor * w = dst->src[LRQ_SRC_CODES];
    const struct ggml_tensor * x = dst->src[LRQ_SRC_X];
    (void) n_tasks;   // the buffer is shared: each token is quantized once, by one thread
    // + 64: room to align the start of the buffer (graph_plan adds a cache line per thread too)
    const struct ggml_tensor * sub = dst->src[LRQ_SRC_SUB];   // two-level: activations summed per sub-block
    const int gs = sub ? (int) (w->ne[0] / sub->ne[0]) : ggml_get_op_params_i32(dst, LRQ_OP_PARAM_GROUP_SIZE);
    return lrq_act_q8_size(lrq_op_tokens(x), w->ne[0], gs) + 64;
}

// alpha / beta [n_groups | 1, n_out | 1] -> strides of lrq_replica (0 = broadcast)
static void lrq_grid_strides(const struct ggml_tensor * t, int64_t * row_stride, int64_t * group_stride) {
    *row_stride   = t && t->ne[1] > 1 ? t->ne[0] : 0;
    *group_stride = t && t->ne[0] > 1 ? 1 : 0;
}

// Token sub-range [t0, t1) of activations quantized by lrq_act_q8_init for all tokens.
static lrq_act_q8 lrq_act_rows(const lrq_act_q8 * all, int64_t t0, int64_t t1) {
    const int64_t nb = all->n_in / LRQ_QK, ng = (all->n_in + all->group_size - 1) / all->group_size;
    lrq_act_q8 a = *all;
    a.n_tok = t1 - t0;
    a.qs    = all->qs + t0 * all->n_in;
    a.dx    = all->dx + t0 * nb;
    a.sx    = all->sx + t0 * ng;
    return a;
}

// The kernels' descriptors of an LRQ_MUL_MAT node: the shared weight and the node's replica.
static void lrq_node_args(const struct ggml_tensor * dst, lrq_weight * w, lrq_replica * r) {
    const struct ggml_tensor * tw = dst->src[LRQ_SRC_CODES];
    const struct ggml_tensor * td = dst->src[LRQ_SRC_SCALE];
    const struct ggml_tensor * tm = dst->src[LRQ_SRC_MIN];
    const struct ggml_tensor * ta = dst->src[LRQ_SRC_ALPHA];
    const struct ggml_tensor * tb = dst->src[LRQ_SRC_BETA];
    const struct ggml_tensor * tg = dst->src[LRQ_SRC_GAIN];
    const struct ggml_tensor * tc = dst->src[LRQ_SRC_BIAS];
    const struct ggml_tensor * tk = dst->src[LRQ_SRC_ACT];
    const struct ggml_tensor * ts = dst->src[LRQ_SRC_SUB];   // format v4 two-level layout | NULL

    const int     g        = ggml_get_op_params_i32(dst, LRQ_OP_PARAM_GROUP_SIZE);
    const int64_t n_groups = lrq_n_groups(tw->ne[0], g);
    *w = (lrq_weight) {
        .codes           = (const uint8_t *) tw->data,
        .codes_row_bytes = tw->nb[1],
        .n_in            = tw->ne[0],
        .n_out           = tw->ne[1],
        .bits            = lrq_type_bits(tw->type),
        .mode            = (lrq_mode) ggml_get_op_params_i32(dst, LRQ_OP_PARAM_MODE),
        .group_size      = g,
        .d               = (const uint16_t *) td->data,
        .d_row_stride    = n_groups,
        .m               = tm ? (const uint16_t *) tm->data : NULL,
        .m_row_stride    = n_groups,
        .sub             = ts ? (const uint8_t *) ts->data : NULL,
        .sub_row_stride  = ts ? ts->ne[0] : 0,
        .sub_size        = ts ? (int) (tw->ne[0] / ts->ne[0]) : 0,
    };
    lrq_replica_init(r);
    if (ta) {
        r->alpha = (const uint16_t *) ta->data;
        lrq_grid_strides(ta, &r->alpha_row_stride, &r->alpha_group_stride);
    }
    if (tb) {
        r->beta = (const uint16_t *) tb->data;
        lrq_grid_strides(tb, &r->beta_row_stride, &r->beta_group_stride);
    }
    r->gain = tg ? (const float *) tg->data : NULL;
    r->bias = tc ? (const float *) tc->data : NULL;
    if (tk) {   // read at compute time: the values live in the (host) weight buffer
        r->act_clip = ((const float *) tk->data)[0];
        r->act_bits = (int) ((const float *) tk->data)[1];
    }
}

// The members of a parallel group computed by one call (LRQ_NO_FUSE=1 in the environment: one
// node per call, the A/B of the fusion, read at every graph computation like LRQ_CPU_REF).  More
// would fit; a group has 2-4 members in practice.
#define LRQ_CPU_MAX_RUN 8

int ggml_lrq_mul_mat_cpu_run(struct ggml_tensor * const * nodes, int n) {
    const char * e = getenv("LRQ_NO_FUSE");
    const int    k = ggml_lrq_mul_mat_run(nodes, n, e && e[0] == '1' ? 1 : LRQ_CPU_MAX_RUN);
    return k > 0 ? k : 1;
}

// Sized for the longest run whatever LRQ_NO_FUSE says: the plan and the computation read it at
// different times.
size_t ggml_lrq_mul_mat_run_work_size(struct ggml_tensor * const * nodes, int n, int n_tasks) {
    const int k = ggml_lrq_mul_mat_run(nodes, n, LRQ_CPU_MAX_RUN);
    return (size_t) (k > 0 ? k : 1) * ggml_lrq_mul_mat_work_size(nodes[0], n_tasks);
}

void ggml_compute_forward_lrq_mul_mat_run(const struct ggml_compute_params * params, struct ggml_tensor * const * nodes,
                                          int n) {
    GGML_ASSERT(n >= 1 && n <= LRQ_CPU_MAX_RUN);
    const struct ggml_tensor * tx    = nodes[0]->src[LRQ_SRC_X];
    const int64_t              n_out = nodes[0]->src[LRQ_SRC_CODES]->ne[1];
    const int64_t              T     = lrq_op_tokens(tx);
    const size_t               act_bytes = ggml_lrq_mul_mat_work_size(nodes[0], params->nth);

    lrq_weight          w;
    lrq_replica         rs[LRQ_CPU_MAX_RUN];
    const lrq_replica * rp[LRQ_CPU_MAX_RUN];
    const float *       x[LRQ_CPU_MAX_RUN];
    int64_t             xs[LRQ_CPU_MAX_RUN];   // row strides (elements)
    float *             y[LRQ_CPU_MAX_RUN];
    lrq_act_q8          act[LRQ_CPU_MAX_RUN];
    for (int j = 0; j < n; ++j) {
        lrq_node_args(nodes[j], &w, &rs[j]);   // w is the same for every member (ggml_lrq_mul_mat_run)
        rp[j] = &rs[j];
        x[j]  = (const float *) nodes[j]->src[LRQ_SRC_X]->data;
        xs[j] = (int64_t) (nodes[j]->src[LRQ_SRC_X]->nb[1] / sizeof(float));
        y[j]  = (float *) nodes[j]->data;
        char * buf = (char *) params->wdata + (size_t) j * act_bytes;
        buf += (64 - ((uintptr_t) buf % 64)) % 64;
        lrq_act_q8_init(&act[j], buf, T, w.n_in, lrq_act_group_size(&w));
    }

    // LRQ_CPU_REF=1 in the environment: the spec's arithmetic (float activations, double sums)
    // instead of int8 activations, also when ggml is not in reference mode.  For tests: it
    // separates the graph (virtual layers, schedule, replica wiring) from the int8 rounding.
    const char * ref_env = getenv("LRQ_CPU_REF");
    const bool   use_ref = params->use_ref || (ref_env && ref_env[0] == '1');
    const int    ith = params->ith, nth = params->nth;

    // phase 1: activations, split among threads by token
    if (!use_ref) {
        const int64_t t0 = T * ith / nth, t1 = T * (ith + 1) / nth;
        for (int j = 0; j < n && t1 > t0; ++j) {
            lrq_act_q8 part = lrq_act_rows(&act[j], t0, t1);
            const int  rc   = lrq_quantize_act_q8(x[j] + t0 * xs[j], xs[j], rs[j].act_clip, rs[j].act_bits, &part);
            if (rc) GGML_ABORT("%s: %s", nodes[j]->name, lrq_status_str(rc));
        }
    }
    if (ith == 0) {
        ggml_threadpool_chunk_set(params->threadpool, nth);
    }
    ggml_barrier(params->threadpool);
    if (!use_ref && n > 1) {
        lrq_act_q8_share(act, n);   // members that read one input: their dots once (each thread alike)
    }

    // phase 2: (rows x tokens) chunks, taken dynamically; a chunk computes every member, so the
    // members read the chunk's codes once (the AVX-512 kernel) or while they are in L1 / L2
    const int64_t nc_r = (n_out + LRQ_CPU_ROW_CHUNK - 1) / LRQ_CPU_ROW_CHUNK;
    const int64_t nc_t = (T + LRQ_CPU_TOK_CHUNK - 1) / LRQ_CPU_TOK_CHUNK;
    const int64_t n_chunks = nc_r * nc_t;
    for (int64_t c = ith; c < n_chunks; c = ggml_threadpool_chunk_add(params->threadpool, 1)) {
        const int64_t o0 = (c % nc_r) * LRQ_CPU_ROW_CHUNK, t0 = (c / nc_r) * LRQ_CPU_TOK_CHUNK;
        const int64_t o1 = o0 + LRQ_CPU_ROW_CHUNK < n_out ? o0 + LRQ_CPU_ROW_CHUNK : n_out;
        const int64_t t1 = t0 + LRQ_CPU_TOK_CHUNK < T ? t0 + LRQ_CPU_TOK_CHUNK : T;
        int           rc = 0;
        if (use_ref) {   // the spec: float activations, double accumulation
            for (int j = 0; j < n && !rc; ++j) {
                rc = lrq_mul_mat_ref(&w, rp[j], x[j] + t0 * xs[j], xs[j], t1 - t0, y[j] + t0 * n_out + o0, n_out, o0, o1);
            }
        } else {
            lrq_act_q8 part[LRQ_CPU_MAX_RUN];
            float *    yc[LRQ_CPU_MAX_RUN];
            for (int j = 0; j < n; ++j) {
                part[j] = lrq_act_rows(&act[j], t0, t1);
                yc[j]   = y[j] + t0 * n_out + o0;
            }
            rc = lrq_mul_mat_q8_multi(&w, n, rp, part, yc, n_out, o0, o1);
        }
        if (rc) GGML_ABORT("%s: %s", nodes[0]->name, lrq_status_str(rc));
    }
}

void ggml_compute_forward_lrq_mul_mat(const struct ggml_compute_params * params, struct ggml_tensor * dst) {
    ggml_compute_forward_lrq_mul_mat_run(params, &dst, 1);
}
