// lrq: graph constructor of GGML_OP_LRQ_MUL_MAT (compiled into ggml-base by lrq's CMakeLists.txt).
// The op computes, for replica parameters (alpha, beta, gain, bias, act) over shared codes,
//   y[t, o] = sum_i W_r[o, i] * act_r(x[t, :])[i] + bias[o]          (docs/FORMAT.md section 6)
//   W_r[o, i] = gain[o] * (alpha[o, G] * d[o, G] * (level(q[o, i]) + beta[o, G]) + m[o, G])
// Shapes (ggml order): W [n_in, n_out], x [n_in, T, ne2, ne3] -> y F32 [n_out, T, ne2, ne3].
#include "lrq-ggml.h"

#include "ggml-impl.h"   // ggml_set_op_params (ggml/src is a private include dir of ggml-base)

#include <math.h>
#include <stddef.h>
#include <string.h>

static int lrq_is_vec_f32(const struct ggml_tensor * t, int64_t n) {
    return t->type == GGML_TYPE_F32 && t->ne[0] == n && ggml_nelements(t) == n && ggml_is_contiguous(t);
}

// alpha / beta: F16 [n_groups | 1, n_out | 1], contiguous (the kernel reads them through strides
// derived from ne, so a broadcast dimension is just a zero stride)
static int lrq_is_grid_param(const struct ggml_tensor * t, int64_t n_groups, int64_t n_out) {
    return t->type == GGML_TYPE_F16 && ggml_is_contiguous(t) && t->ne[2] == 1 && t->ne[3] == 1 &&
           (t->ne[0] == n_groups || t->ne[0] == 1) && (t->ne[1] == n_out || t->ne[1] == 1);
}

bool ggml_lrq_mul_mat_shares_codes(const struct ggml_tensor * a, const struct ggml_tensor * b) {
    if (a->op != GGML_OP_LRQ_MUL_MAT || b->op != GGML_OP_LRQ_MUL_MAT) {
        return false;
    }
    if (b->src[LRQ_SRC_CODES] != a->src[LRQ_SRC_CODES] || b->src[LRQ_SRC_SCALE] != a->src[LRQ_SRC_SCALE] ||
        b->src[LRQ_SRC_MIN] != a->src[LRQ_SRC_MIN] || b->src[LRQ_SRC_SUB] != a->src[LRQ_SRC_SUB] ||
        memcmp(b->op_params, a->op_params, 2 * sizeof(int32_t)) != 0) {
        return false;
    }
    if (!ggml_are_same_shape(b->src[LRQ_SRC_X], a->src[LRQ_SRC_X])) {
        return false;
    }
    for (int s = 0; s < GGML_MAX_SRC; ++s) {
        if (b->src[s] == a) {
            return false;
        }
    }
    return true;
}

int ggml_lrq_mul_mat_run(struct ggml_tensor * const * nodes, int n, int max_run) {
    if (n < 1 || nodes[0]->op != GGML_OP_LRQ_MUL_MAT) return 0;
    int k = 1;
    for (; k < n && k < max_run; ++k) {
        const struct ggml_tensor * b = nodes[k];
        if (!(b->flags & GGML_TENSOR_FLAG_COMPUTE) || !ggml_lrq_mul_mat_shares_codes(nodes[0], b)) break;
        bool reads_run = false;   // b must not read any earlier member of the run, not only the first
        for (int j = 1; j < k; ++j) {
            for (int s = 0; s < GGML_MAX_SRC; ++s) reads_run = reads_run || b->src[s] == nodes[j];
        }
        if (reads_run) break;
    }
    return k;
}

const char * ggml_lrq_mul_mat_check(const struct ggml_tensor * op) {
    const struct ggml_tensor * w = op->src[LRQ_SRC_CODES];
    const struct ggml_tensor * x = op->src[LRQ_SRC_X];
    const struct ggml_tensor * d = op->src[LRQ_SRC_SCALE];
    if (op->op != GGML_OP_LRQ_MUL_MAT) return "not an LRQ_MUL_MAT node";
    if (!w || !x || !d) return "codes, activations and scale are required";
    if (!GGML_TYPE_IS_LRQ(w->type)) return "codes must have an LRQ type";
    if (w->ne[2] != 1 || w->ne[3] != 1 || w->nb[0] != ggml_type_size(w->type) ||
        w->nb[1] < ggml_row_size(w->type, w->ne[0])) {
        return "codes must be a 2-D, row-major tensor";
    }
    const int     g      = ggml_get_op_params_i32(op, LRQ_OP_PARAM_GROUP_SIZE);
    const int     mode   = ggml_get_op_params_i32(op, LRQ_OP_PARAM_MODE);
    const int64_t n_in   = w->ne[0];
    const int64_t n_out  = w->ne[1];
    if (g != 32 && g != 64 && g != 128 && g != 256) return "group size must be 32, 64, 128 or 256";
    if (mode != LRQ_MODE_ASYM && mode != LRQ_MODE_SYM && mode != LRQ_MODE_TERNARY) return "unknown mode";
    if (mode == LRQ_MODE_TERNARY && w->type != GGML_TYPE_LRQ2) return "ternary codes must be LRQ2";
    const int64_t n_groups = (n_in + g - 1) / g;
    if (x->type != GGML_TYPE_F32 || x->ne[0] != n_in || x->nb[0] != sizeof(float) ||
        x->nb[2] != x->nb[1] * x->ne[1] || x->nb[3] != x->nb[2] * x->ne[2]) {
        return "activations must be F32 [n_in, ...] with equally strided rows";
    }
    if (d->type != GGML_TYPE_F16 || d->ne[0] != n_groups || d->ne[1] != n_out || ggml_nelements(d) != n_groups * n_out ||
        !ggml_is_contiguous(d)) {
        return "scale must be F16 [n_groups, n_out]";
    }
    const struct ggml_tensor * m = op->src[LRQ_SRC_MIN];
    if ((mode == LRQ_MODE_ASYM) != (m != NULL)) return "min is required for asym and absent otherwise";
    if (m && (m->type != GGML_TYPE_F16 || !ggml_are_same_shape(m, d) || !ggml_is_contiguous(m))) {
        return "min must be F16 [n_groups, n_out]";
    }
    for (int s = LRQ_SRC_ALPHA; s <= LRQ_SRC_BETA; ++s) {
        if (op->src[s] && !lrq_is_grid_param(op->src[s], n_groups, n_out)) {
            return "scale_mult / grid_offset must be F16 [n_groups|1, n_out|1]";
        }
    }
    for (int s = LRQ_SRC_GAIN; s <= LRQ_SRC_BIAS; ++s) {
        if (op->src[s] && !lrq_is_vec_f32(op->src[s], n_out)) return "gain / bias must be F32 [n_out]";
    }
    if (op->src[LRQ_SRC_ACT] && !lrq_is_vec_f32(op->src[LRQ_SRC_ACT], 2)) return "act must be F32 [2]";
    const struct ggml_tensor * sub = op->src[LRQ_SRC_SUB];
    if (sub) {   // the two-level layout (format v4): sub-blocks of 16 or 32 weights
        if (w->type != GGML_TYPE_LRQ2 || mode != LRQ_MODE_ASYM) return "the two-level layout needs LRQ2 codes, mode asym";
        if (sub->type != GGML_TYPE_I8 || sub->ne[1] != n_out || sub->ne[2] != 1 || sub->ne[3] != 1 ||
            !ggml_is_contiguous(sub) || (sub->ne[0] * 16 != n_in && sub->ne[0] * 32 != n_in)) {
            return "sub-block indices must be I8 [n_in / 16 or n_in / 32, n_out]";
        }
    }
    if (op->type != GGML_TYPE_F32 || op->ne[0] != n_out || op->ne[1] != x->ne[1] || op->ne[2] != x->ne[2] ||
        op->ne[3] != x->ne[3] || !ggml_is_contiguous(op)) {
        return "result must be F32 [n_out, ...], contiguous";
    }
    return NULL;
}

struct ggml_tensor * ggml_lrq_mul_mat(struct ggml_context * ctx, struct ggml_tensor * w, struct ggml_tensor * x,
                                      struct ggml_tensor * scale, struct ggml_tensor * min, struct ggml_tensor * alpha,
                                      struct ggml_tensor * beta, struct ggml_tensor * gain, struct ggml_tensor * bias,
                                      struct ggml_tensor * act, int group_size, lrq_mode mode) {
    return ggml_lrq_mul_mat_two_level(ctx, w, x, scale, min, NULL, alpha, beta, gain, bias, act, group_size, mode);
}

struct ggml_tensor * ggml_lrq_mul_mat_two_level(struct ggml_context * ctx, struct ggml_tensor * w,
                                                struct ggml_tensor * x, struct ggml_tensor * scale,
                                                struct ggml_tensor * min, struct ggml_tensor * sub,
                                                struct ggml_tensor * alpha, struct ggml_tensor * beta,
                                                struct ggml_tensor * gain, struct ggml_tensor * bias,
                                                struct ggml_tensor * act, int group_size, lrq_mode mode) {
    GGML_ASSERT(w && x && GGML_TYPE_IS_LRQ(w->type));
    const int64_t ne[4] = { w->ne[1], x->ne[1], x->ne[2], x->ne[3] };
    struct ggml_tensor * result = ggml_new_tensor(ctx, GGML_TYPE_F32, 4, ne);

    const int32_t params[2] = { group_size, (int32_t) mode };
    ggml_set_op_params(result, params, sizeof(params));

    result->op = GGML_OP_LRQ_MUL_MAT;
    result->src[LRQ_SRC_CODES] = w;
    result->src[LRQ_SRC_X]     = x;
    result->src[LRQ_SRC_SCALE] = scale;
    result->src[LRQ_SRC_MIN]   = min;
    result->src[LRQ_SRC_ALPHA] = alpha;
    result->src[LRQ_SRC_BETA]  = beta;
    result->src[LRQ_SRC_GAIN]  = gain;
    result->src[LRQ_SRC_BIAS]  = bias;
    result->src[LRQ_SRC_ACT]   = act;
    result->src[LRQ_SRC_SUB]   = sub;

    const char * err = ggml_lrq_mul_mat_check(result);
    if (err) {
        GGML_ABORT("ggml_lrq_mul_mat(%s): %s", w->name, err);
    }
    return result;
}

struct ggml_tensor * lrq_make_supports_test_op(struct ggml_context * ctx, struct ggml_tensor * t) {
    // Only slots 0..3 hold `t`: ggml-cpu's supports_op consults an extra buffer type (CPU_REPACK,
    // AMX) of src[0..3] only, and that answer (no) must be the one given for LRQ data.
    struct ggml_tensor * op = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 1, 1);
    op->op = GGML_OP_LRQ_MUL_MAT;
    const int32_t params[2] = { 32, LRQ_MODE_ASYM };
    ggml_set_op_params(op, params, sizeof(params));
    if (GGML_TYPE_IS_LRQ(t->type)) {
        op->src[LRQ_SRC_CODES] = t;
    } else {
        op->src[LRQ_SRC_CODES] = ggml_new_tensor_2d(ctx, GGML_TYPE_LRQ2, 32, 1);
    }
    if (t->type == GGML_TYPE_F32) {
        op->src[LRQ_SRC_X] = t;            // gain / bias / act: an F32 slot among the first four
    } else {
        op->src[LRQ_SRC_X] = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, op->src[LRQ_SRC_CODES]->ne[0], 1);
    }
    op->src[LRQ_SRC_SCALE] = t->type == GGML_TYPE_F16 ? t : ggml_new_tensor_2d(ctx, GGML_TYPE_F16, 1, 1);
    if (t->type == GGML_TYPE_I8) {
        // the two-level layout's sub-block indices: a two-level node, which only the CPU runs (its
        // supports_op refuses an extra buffer type such as CPU_REPACK for this slot itself: the
        // generic check looks at src[0..3] only)
        op->src[LRQ_SRC_SUB] = t;
    } else if (((const int32_t *) t->op_params)[LRQ_PROBE_TWO_LEVEL_PARAM] == LRQ_PROBE_TWO_LEVEL_MAGIC) {
        op->src[LRQ_SRC_SUB] = ggml_new_tensor_2d(ctx, GGML_TYPE_I8, 1, 1);   // the rest of a two-level weight
    }
    return op;
}
