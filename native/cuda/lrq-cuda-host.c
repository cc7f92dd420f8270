// lrq: host-side logic of the CUDA kernels that needs no GPU (lrq-cuda.h): the activation buffer's
// layout and the argument check.  Plain C, so that the CPU tests link it as it is built into
// ggml-cuda (tests/test_cuda_emulation.py).
#include "lrq-cuda.h"

#include "lrq-dequant.h"

static size_t lrq_cuda_align(size_t n) { return (n + 255) / 256 * 256; }

size_t lrq_cuda_act_size(int64_t n_tok, int64_t n_in) {
    const size_t nb = (size_t) (n_in / LRQ_DQ_QK);
    return lrq_cuda_align((size_t) (n_tok * n_in)) + 2 * lrq_cuda_align((size_t) n_tok * nb * sizeof(float));
}

void lrq_cuda_act_layout(void * buf, int64_t n_tok, int64_t n_in, int8_t ** qs, float ** dx, float ** sx) {
    const size_t nb = (size_t) (n_in / LRQ_DQ_QK);
    char *       p  = (char *) buf;
    *qs = (int8_t *) p;
    p += lrq_cuda_align((size_t) (n_tok * n_in));
    *dx = (float *) p;
    p += lrq_cuda_align((size_t) n_tok * nb * sizeof(float));
    *sx = (float *) p;
}

const char * lrq_cuda_check(const lrq_cuda_args * a) {
    if (!a) return "no arguments";
    if (a->bits < 1 || a->bits > 4) return "bits must be 1..4";
    if (a->mode != LRQ_DQ_MODE_ASYM && a->mode != LRQ_DQ_MODE_SYM && a->mode != LRQ_DQ_MODE_TERNARY) return "unknown mode";
    if (a->mode == LRQ_DQ_MODE_TERNARY && a->bits != 2) return "ternary codes must be 2-bit";
    if (a->group_size != 32 && a->group_size != 64 && a->group_size != 128 && a->group_size != 256) {
        return "group size must be 32, 64, 128 or 256";
    }
    if (a->n_in <= 0 || a->n_in % LRQ_DQ_QK) return "n_in must be a positive multiple of 32";
    if (a->n_groups != (a->n_in + a->group_size - 1) / a->group_size) return "n_groups must be ceil(n_in / group_size)";
    if (a->n_out <= 0 || a->n_tok < 0) return "n_out must be positive and n_tok not negative";
    if (a->nb01 < (uint64_t) (a->n_in / LRQ_DQ_QK) * (uint64_t) lrq_dq_block_bytes(a->bits)) return "nb01 is shorter than a row of codes";
    if (a->n_rep < 1 || a->n_rep > LRQ_CUDA_MAX_REP) return "n_rep must be 1..LRQ_CUDA_MAX_REP";
    if (!a->codes || !a->d) return "codes and d are required";
    if ((a->mode == LRQ_DQ_MODE_ASYM) != (a->m != 0)) return "m is required for asym and absent otherwise";
    for (int r = 0; r < a->n_rep; ++r) {
        const lrq_cuda_replica * p = &a->rep[r];
        if (!p->qs || !p->dx || !p->sx || !p->dst) return "a replica lacks its activations or output";
        if (p->alpha_rs < 0 || p->alpha_gs < 0 || p->beta_rs < 0 || p->beta_gs < 0) return "negative parameter stride";
    }
    return 0;
}
