// lrq: ggml tensors -> lrq_cuda_args (lrq-cuda-ggml.h).  Built into ggml-cuda by lrq's
// CMakeLists.txt when GGML_CUDA is on.  The layout rules are the op's (native/lrq/lrq-ggml.c):
//   codes [n_in, n_out] rows nb[1] bytes apart; x F32 [n_in, T...] rows equally strided;
//   d, m F16 [n_groups, n_out]; alpha, beta F16 [n_groups | 1, n_out | 1] (1 = broadcast);
//   gain, bias F32 [n_out]; act F32 [2] read by the kernel; y F32 [n_out, T...] contiguous.
#include "lrq-cuda-ggml.h"

#include "lrq-cuda.h"
#include "lrq-ggml.h"

#include <string.h>

bool ggml_lrq_mul_mat_cuda_supported(const struct ggml_tensor * op) {
    return op->op == GGML_OP_LRQ_MUL_MAT && lrq_op_types_supported(op) && !lrq_op_two_level(op);   // v4 two-level: CPU only
}

// op_params without ggml-impl.h (private to ggml's own sources)
static int32_t lrq_op_param(const struct ggml_tensor * op, int i) { return ((const int32_t *) op->op_params)[i]; }

static int64_t lrq_tokens(const struct ggml_tensor * x) { return x->ne[1] * x->ne[2] * x->ne[3]; }

size_t ggml_lrq_mul_mat_cuda_work_size(const struct ggml_tensor * node) {
    const struct ggml_tensor * x = node->src[LRQ_SRC_X];
    return lrq_cuda_act_size(lrq_tokens(x), x->ne[0]);
}

int ggml_lrq_mul_mat_cuda_fusable(struct ggml_tensor * const * nodes, int n) {
    return ggml_lrq_mul_mat_run(nodes, n, LRQ_CUDA_MAX_REP);
}

// alpha / beta [n_groups | 1, n_out | 1] -> (row stride, group stride), 0 = broadcast
static void lrq_grid_strides(const struct ggml_tensor * t, int32_t * rs, int32_t * gs) {
    *rs = t && t->ne[1] > 1 ? (int32_t) t->ne[0] : 0;
    *gs = t && t->ne[0] > 1 ? 1 : 0;
}

int ggml_lrq_mul_mat_cuda(struct ggml_tensor * const * nodes, int n, void * work, size_t work_size, void * stream,
                          const char ** why) {
    static const char * none = "";
    if (why) *why = none;
    if (n < 1 || n > LRQ_CUDA_MAX_REP) {
        if (why) *why = "more replicas than one call serves";
        return -1;
    }
    const struct ggml_tensor * n0 = nodes[0];
    const struct ggml_tensor * tw = n0->src[LRQ_SRC_CODES];
    const struct ggml_tensor * tm = n0->src[LRQ_SRC_MIN];
    const int                  g  = lrq_op_param(n0, LRQ_OP_PARAM_GROUP_SIZE);

    lrq_cuda_args a;
    memset(&a, 0, sizeof a);
    a.codes      = (const uint8_t *) tw->data;
    a.nb01       = tw->nb[1];
    a.d          = (const uint16_t *) n0->src[LRQ_SRC_SCALE]->data;
    a.m          = tm ? (const uint16_t *) tm->data : NULL;
    a.n_in       = (int32_t) tw->ne[0];
    a.n_out      = (int32_t) tw->ne[1];
    a.n_tok      = (int32_t) lrq_tokens(n0->src[LRQ_SRC_X]);
    a.group_size = g;
    a.n_groups   = (int32_t) ((tw->ne[0] + g - 1) / g);
    a.mode       = lrq_op_param(n0, LRQ_OP_PARAM_MODE);
    a.bits       = lrq_type_bits(tw->type);
    a.n_rep      = n;
    if (tw->ne[1] > INT32_MAX || lrq_tokens(n0->src[LRQ_SRC_X]) > INT32_MAX) {
        if (why) *why = "more rows or tokens than the kernels index";
        return -1;
    }
    for (int r = 0; r < n; ++r) {
        const struct ggml_tensor * node = nodes[r];
        const struct ggml_tensor * tx   = node->src[LRQ_SRC_X];
        const struct ggml_tensor * ta   = node->src[LRQ_SRC_ALPHA];
        const struct ggml_tensor * tb   = node->src[LRQ_SRC_BETA];
        const struct ggml_tensor * tk   = node->src[LRQ_SRC_ACT];
        lrq_cuda_replica *         p    = &a.rep[r];
        void *                     buf  = (char *) work + (size_t) r * work_size;
        int8_t *                   qs;
        float *                    dx;
        float *                    sx;
        lrq_cuda_act_layout(buf, a.n_tok, a.n_in, &qs, &dx, &sx);
        const int rc = lrq_cuda_quantize_act((const float *) tx->data, (int64_t) (tx->nb[1] / sizeof(float)), a.n_tok,
                                             a.n_in, tk ? (const float *) tk->data : NULL, buf, stream);
        if (rc) {
            if (why && rc < 0) *why = "activations do not fit the quantize kernel";
            return rc;
        }
        p->qs    = qs;
        p->dx    = dx;
        p->sx    = sx;
        p->alpha = ta ? (const uint16_t *) ta->data : NULL;
        p->beta  = tb ? (const uint16_t *) tb->data : NULL;
        lrq_grid_strides(ta, &p->alpha_rs, &p->alpha_gs);
        lrq_grid_strides(tb, &p->beta_rs, &p->beta_gs);
        p->gain = node->src[LRQ_SRC_GAIN] ? (const float *) node->src[LRQ_SRC_GAIN]->data : NULL;
        p->bias = node->src[LRQ_SRC_BIAS] ? (const float *) node->src[LRQ_SRC_BIAS]->data : NULL;
        p->dst  = (float *) node->data;
    }
    const char * bad = lrq_cuda_check(&a);
    if (bad) {
        if (why) *why = bad;
        return -1;
    }
    return lrq_cuda_mul_mat_q8(&a, stream);
}
