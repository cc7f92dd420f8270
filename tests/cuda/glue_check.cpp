// ggml-cuda's side of GGML_OP_LRQ_MUL_MAT (native/cuda/lrq-cuda-ggml.c) on the CPU: real ggml nodes
// (ggml_lrq_mul_mat, tensors in host memory) go through ggml_lrq_mul_mat_cuda as patches/0009 calls
// it, with the two launchers of lrq-cuda.h replaced by the CPU emulation of the same kernels
// (tests/cuda/shim; the dispatch mirrors native/cuda/lrq-cuda.cu).  Checked against the CPU fast
// path (lrq_quantize_act_q8 + lrq_mul_mat_q8_generic) on the same tensors:
//   - every LRQ type x mode, g 32 and 128, 1, 5 and 40 tokens; activation rows padded (a view),
//     scale_mult per row [1, n_out] and grid_offset per group [n_groups, 1] (both broadcast
//     directions of the strides), gain, bias, an 8-bit activation in every other case;
//   - a fused run of three nodes over the same codes (own activations and parameters each);
//   - which runs ggml_lrq_mul_mat_cuda_fusable accepts (same codes, adjacent, independent) and which
//     ops ggml_lrq_mul_mat_cuda_supported takes (the loader's probe ops; a wrong type is refused).
// One line per case, "case ... nmse=..", and "fusable ..." / "supported ..." lines with ok=0|1.
#include "lrq-cuda-shim.h"

#include "lrq-cuda.cuh"
#include "lrq-cuda-ggml.h"
#include "lrq-ggml.h"
#include "lrq-kernels.h"

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

// ---- the launchers of lrq-cuda.h, on the emulation ----------------------------------------------

template <int BITS, int NC> static void mv(const lrq_cuda_args & a) {
    const dim3 grid((a.n_out + LRQ_CUDA_MV_WARPS - 1) / LRQ_CUDA_MV_WARPS, (a.n_tok + NC - 1) / NC), block(32, LRQ_CUDA_MV_WARPS);
    switch (a.n_rep) {
        case 1: lrq_cuda_shim::launch(grid, block, 0, [&] { lrq_cuda_mul_mv_kernel<BITS, NC, 1>(a); }); break;
        case 2: lrq_cuda_shim::launch(grid, block, 0, [&] { lrq_cuda_mul_mv_kernel<BITS, NC, 2>(a); }); break;
        case 3: lrq_cuda_shim::launch(grid, block, 0, [&] { lrq_cuda_mul_mv_kernel<BITS, NC, 3>(a); }); break;
        default: lrq_cuda_shim::launch(grid, block, 0, [&] { lrq_cuda_mul_mv_kernel<BITS, NC, 4>(a); }); break;
    }
}

template <int BITS> static void bits(const lrq_cuda_args & a) {
    if (a.n_tok <= LRQ_CUDA_MV_MAX_TOK) {
        const int nc = a.n_tok <= 1 ? 1 : a.n_tok <= 2 ? 2 : a.n_tok <= 4 ? 4 : 8;
        switch (nc) {
            case 1: mv<BITS, 1>(a); break;
            case 2: mv<BITS, 2>(a); break;
            case 4: mv<BITS, 4>(a); break;
            default: mv<BITS, 8>(a); break;
        }
        return;
    }
    const dim3 grid((a.n_out + LRQ_CUDA_MM_NR - 1) / LRQ_CUDA_MM_NR, (a.n_tok + LRQ_CUDA_MM_NT - 1) / LRQ_CUDA_MM_NT);
    for (int r = 0; r < a.n_rep; ++r) {
        lrq_cuda_shim::launch(grid, dim3(LRQ_CUDA_MM_THREADS), LRQ_CUDA_MM_SHMEM, [&] { lrq_cuda_mul_mm_kernel<BITS>(a, r); });
    }
}

extern "C" int lrq_cuda_quantize_act(const float * x, int64_t x_stride, int64_t n_tok, int64_t n_in, const float * act,
                                     void * buf, void * stream) {
    (void) stream;
    if (!x || !buf || n_in <= 0 || n_in % LRQ_DQ_QK || x_stride < n_in || n_tok < 0) return -1;
    int8_t * qs;
    float *  dx;
    float *  sx;
    lrq_cuda_act_layout(buf, n_tok, n_in, &qs, &dx, &sx);
    lrq_cuda_shim::launch(dim3((unsigned) n_tok), dim3(LRQ_CUDA_Q_THREADS), (LRQ_CUDA_Q_THREADS / 32) * sizeof(float),
                          [&] { lrq_cuda_quantize_act_kernel(x, x_stride, act, (int) n_in, qs, dx, sx); });
    return 0;
}

extern "C" int lrq_cuda_mul_mat_q8(const lrq_cuda_args * a, void * stream) {
    (void) stream;
    if (lrq_cuda_check(a)) return -1;
    switch (a->bits) {
        case 1: bits<1>(*a); break;
        case 2: bits<2>(*a); break;
        case 3: bits<3>(*a); break;
        default: bits<4>(*a); break;
    }
    return 0;
}

// ---- cases ----------------------------------------------------------------------------------------

namespace {

std::mt19937 rng(7);

void fill_f32(ggml_tensor * t, float mean, float sd) {
    std::normal_distribution<float> nd(mean, sd);
    float * p = (float *) t->data;
    for (int64_t i = 0; i < ggml_nelements(t); ++i) p[i] = nd(rng);
}

void fill_f16(ggml_tensor * t, float mean, float sd) {
    std::normal_distribution<float> nd(mean, sd);
    uint16_t * p = (uint16_t *) t->data;
    for (int64_t i = 0; i < ggml_nelements(t); ++i) p[i] = lrq_fp32_to_fp16(nd(rng));
}

struct weights {
    ggml_tensor *codes, *d, *m;
    int bits, mode, g;
};

weights make_weights(ggml_context * ctx, int n_in, int n_out, int bits, int mode, int g) {
    weights w{};
    const int ng = (n_in + g - 1) / g;
    w.bits = bits, w.mode = mode, w.g = g;
    w.codes = ggml_new_tensor_2d(ctx, (ggml_type) (GGML_TYPE_LRQ1 + bits - 1), n_in, n_out);
    w.d     = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, ng, n_out);
    w.m     = mode == 0 ? ggml_new_tensor_2d(ctx, GGML_TYPE_F16, ng, n_out) : nullptr;
    std::normal_distribution<float> nd(0.0f, 0.02f);
    std::vector<float> row(n_in);
    for (int o = 0; o < n_out; ++o) {
        for (auto & v : row) v = nd(rng) + (mode == 0 ? 0.005f : 0.0f);
        lrq_quantize_row_ref(row.data(), n_in, bits, (lrq_mode) mode, g, LRQ_SCALE_MINMAX, (uint8_t *) w.codes->data + o * w.codes->nb[1],
                             (uint16_t *) w.d->data + (size_t) o * ng, w.m ? (uint16_t *) w.m->data + (size_t) o * ng : nullptr);
    }
    return w;
}

// A node over w: x a view with padded rows, alpha [1, n_out], beta [n_groups, 1], gain, bias, act.
ggml_tensor * make_node(ggml_context * ctx, const weights & w, int n_tok, bool act8) {
    const int64_t n_in = w.codes->ne[0], n_out = w.codes->ne[1], ng = w.d->ne[0];
    ggml_tensor * xp = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_in + 32, n_tok);
    fill_f32(xp, 0.0f, 1.0f);
    ggml_tensor * x = ggml_view_2d(ctx, xp, n_in, n_tok, xp->nb[1], 0);
    ggml_tensor * a = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, 1, n_out);
    ggml_tensor * b = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, ng, 1);
    ggml_tensor * g = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n_out);
    ggml_tensor * c = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n_out);
    ggml_tensor * k = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, 2);
    fill_f16(a, 1.0f, 0.1f);
    fill_f16(b, 0.0f, 0.25f);
    fill_f32(g, 1.0f, 0.2f);
    fill_f32(c, 0.0f, 0.05f);
    ((float *) k->data)[0] = 0.875f;
    ((float *) k->data)[1] = act8 ? 8.0f : 0.0f;
    ggml_tensor * y = ggml_lrq_mul_mat(ctx, w.codes, x, w.d, w.m, a, b, g, c, k, w.g, (lrq_mode) w.mode);
    y->flags |= GGML_TENSOR_FLAG_COMPUTE;
    return y;
}

// The CPU fast path on the node's own tensors (strides written out independently of the glue).
std::vector<float> cpu(const ggml_tensor * y) {
    const ggml_tensor *tw = y->src[LRQ_SRC_CODES], *tx = y->src[LRQ_SRC_X], *td = y->src[LRQ_SRC_SCALE], *tm = y->src[LRQ_SRC_MIN];
    const ggml_tensor *ta = y->src[LRQ_SRC_ALPHA], *tb = y->src[LRQ_SRC_BETA], *tk = y->src[LRQ_SRC_ACT];
    const int     g = ((const int32_t *) y->op_params)[0], ng = (int) td->ne[0];
    const int64_t n_tok = tx->ne[1];
    lrq_weight w{};
    w.codes = (const uint8_t *) tw->data, w.codes_row_bytes = tw->nb[1], w.n_in = tw->ne[0], w.n_out = tw->ne[1];
    w.bits = lrq_type_bits(tw->type), w.mode = (lrq_mode) ((const int32_t *) y->op_params)[1], w.group_size = g;
    w.d = (const uint16_t *) td->data, w.d_row_stride = ng, w.m = tm ? (const uint16_t *) tm->data : nullptr, w.m_row_stride = ng;
    lrq_replica r;
    lrq_replica_init(&r);
    r.alpha = (const uint16_t *) ta->data, r.alpha_row_stride = 1, r.alpha_group_stride = 0;    // [1, n_out]
    r.beta = (const uint16_t *) tb->data, r.beta_row_stride = 0, r.beta_group_stride = 1;       // [n_groups, 1]
    r.gain = (const float *) y->src[LRQ_SRC_GAIN]->data, r.bias = (const float *) y->src[LRQ_SRC_BIAS]->data;
    r.act_clip = ((const float *) tk->data)[0], r.act_bits = (int) ((const float *) tk->data)[1];
    std::vector<unsigned char> buf(lrq_act_q8_size(n_tok, w.n_in, g) + 64);
    lrq_act_q8 a8;
    lrq_act_q8_init(&a8, buf.data(), n_tok, w.n_in, g);
    std::vector<float> out((size_t) n_tok * w.n_out);
    if (lrq_quantize_act_q8((const float *) tx->data, (int64_t) (tx->nb[1] / 4), r.act_clip, r.act_bits, &a8) ||
        lrq_mul_mat_q8_generic(&w, &r, &a8, out.data(), w.n_out, 0, w.n_out)) {
        std::fprintf(stderr, "cpu reference failed\n");
        std::exit(2);
    }
    return out;
}

double nmse(const float * y, const std::vector<float> & ref) {
    double e = 0, p = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
        e += ((double) y[i] - ref[i]) * ((double) y[i] - ref[i]);
        p += (double) ref[i] * ref[i];
    }
    return p > 0 ? e / p : NAN;
}

double run_glue(std::vector<ggml_tensor *> nodes) {
    std::vector<std::vector<float>> refs;
    for (auto * n : nodes) refs.push_back(cpu(n));
    const size_t ws = ggml_lrq_mul_mat_cuda_work_size(nodes[0]);
    std::vector<unsigned char> work(ws * nodes.size());
    for (auto * n : nodes) std::fill((float *) n->data, (float *) n->data + ggml_nelements(n), NAN);
    const char * why = "";
    const int    rc  = ggml_lrq_mul_mat_cuda(nodes.data(), (int) nodes.size(), work.data(), ws, nullptr, &why);
    if (rc) {
        std::printf("error rc=%d why=%s\n", rc, why);
        return INFINITY;
    }
    double worst = 0;
    for (size_t i = 0; i < nodes.size(); ++i) {
        const double e = nmse((const float *) nodes[i]->data, refs[i]);
        worst = std::isnan(e) || e > worst ? (std::isnan(e) ? INFINITY : e) : worst;
    }
    return worst;
}

}  // namespace

int main() {
    const int modes_bits[][2] = { { 0, 1 }, { 0, 2 }, { 0, 3 }, { 0, 4 }, { 1, 1 }, { 1, 2 }, { 1, 3 }, { 1, 4 }, { 2, 2 } };
    int       seq = 0;
    for (const auto & mb : modes_bits) {
        for (int g : { 32, 128 }) {
            for (int t : { 1, 5, 40 }) {
                ggml_init_params ip  = { 8 << 20, nullptr, false };
                ggml_context *   ctx = ggml_init(ip);
                const weights    w   = make_weights(ctx, 352, 37, mb[1], mb[0], g);
                const bool       a8  = seq++ % 2;
                ggml_tensor *    y   = make_node(ctx, w, t, a8);
                std::printf("case kind=single bits=%d mode=%d g=%d n_tok=%d act_bits=%d nmse=%.3e\n", mb[1], mb[0], g, t,
                            a8 ? 8 : 0, run_glue({ y }));
                ggml_free(ctx);
            }
        }
    }
    // a fused run, and the runs the fusion takes or refuses
    ggml_init_params ip  = { 16 << 20, nullptr, false };
    ggml_context *   ctx = ggml_init(ip);
    const weights    w   = make_weights(ctx, 352, 37, 2, 0, 64);
    const weights    w2  = make_weights(ctx, 352, 37, 2, 0, 64);
    for (int t : { 1, 3, 40 }) {
        std::vector<ggml_tensor *> run = { make_node(ctx, w, t, false), make_node(ctx, w, t, true), make_node(ctx, w, t, false) };
        std::printf("fusable kind=three_same_codes n_tok=%d n=%d ok=%d\n", t, ggml_lrq_mul_mat_cuda_fusable(run.data(), 3),
                    ggml_lrq_mul_mat_cuda_fusable(run.data(), 3) == 3);
        std::printf("case kind=fused bits=2 mode=0 g=64 n_tok=%d act_bits=mixed nmse=%.3e\n", t, run_glue(run));
    }
    {
        std::vector<ggml_tensor *> other = { make_node(ctx, w, 1, false), make_node(ctx, w2, 1, false) };
        std::printf("fusable kind=other_codes n=%d ok=%d\n", ggml_lrq_mul_mat_cuda_fusable(other.data(), 2),
                    ggml_lrq_mul_mat_cuda_fusable(other.data(), 2) == 1);
        std::vector<ggml_tensor *> dep = { make_node(ctx, w, 1, false), make_node(ctx, w, 1, false) };
        dep[1]->src[LRQ_SRC_BIAS] = dep[0];   // the second reads the first's result
        std::printf("fusable kind=dependent n=%d ok=%d\n", ggml_lrq_mul_mat_cuda_fusable(dep.data(), 2),
                    ggml_lrq_mul_mat_cuda_fusable(dep.data(), 2) == 1);
        std::vector<ggml_tensor *> shape = { make_node(ctx, w, 1, false), make_node(ctx, w, 2, false) };
        std::printf("fusable kind=other_tokens n=%d ok=%d\n", ggml_lrq_mul_mat_cuda_fusable(shape.data(), 2),
                    ggml_lrq_mul_mat_cuda_fusable(shape.data(), 2) == 1);
        std::vector<ggml_tensor *> five;
        for (int i = 0; i < 5; ++i) five.push_back(make_node(ctx, w, 1, false));
        std::printf("fusable kind=five n=%d ok=%d\n", ggml_lrq_mul_mat_cuda_fusable(five.data(), 5),
                    ggml_lrq_mul_mat_cuda_fusable(five.data(), 5) == LRQ_CUDA_MAX_REP);
    }
    // supports_op: the loader's probe ops for every LRQ type and each parameter type, and refusals
    for (int b = 1; b <= 4; ++b) {
        ggml_tensor * t = ggml_new_tensor_2d(ctx, (ggml_type) (GGML_TYPE_LRQ1 + b - 1), 64, 2);
        std::printf("supported kind=probe_codes bits=%d ok=%d\n", b, ggml_lrq_mul_mat_cuda_supported(lrq_make_supports_test_op(ctx, t)) ? 1 : 0);
    }
    for (ggml_type ty : { GGML_TYPE_F16, GGML_TYPE_F32 }) {
        ggml_tensor * t = ggml_new_tensor_1d(ctx, ty, 64);
        std::printf("supported kind=probe_param type=%s ok=%d\n", ggml_type_name(ty), ggml_lrq_mul_mat_cuda_supported(lrq_make_supports_test_op(ctx, t)) ? 1 : 0);
    }
    {   // the two-level layout (format v4) is CPU only: its node, its I8 sub-block tensor and the
        // loader-marked tensors of a two-level weight are declined
        ggml_tensor * op = make_node(ctx, w, 1, false);
        op->src[LRQ_SRC_SUB] = ggml_new_tensor_2d(ctx, GGML_TYPE_I8, 352 / 16, 37);
        std::printf("supported kind=two_level_node ok=%d\n", ggml_lrq_mul_mat_cuda_supported(op) ? 0 : 1);
        ggml_tensor * sub = ggml_new_tensor_2d(ctx, GGML_TYPE_I8, 4, 2);
        std::printf("supported kind=probe_two_level_sub ok=%d\n", ggml_lrq_mul_mat_cuda_supported(lrq_make_supports_test_op(ctx, sub)) ? 0 : 1);
        ggml_tensor * codes = ggml_new_tensor_2d(ctx, GGML_TYPE_LRQ2, 64, 2);
        ((int32_t *) codes->op_params)[LRQ_PROBE_TWO_LEVEL_PARAM] = LRQ_PROBE_TWO_LEVEL_MAGIC;
        std::printf("supported kind=probe_two_level_codes ok=%d\n", ggml_lrq_mul_mat_cuda_supported(lrq_make_supports_test_op(ctx, codes)) ? 0 : 1);
    }
    {
        ggml_tensor * op = make_node(ctx, w, 1, false);
        op->src[LRQ_SRC_X] = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, 352, 1);
        std::printf("supported kind=f16_activations ok=%d\n", ggml_lrq_mul_mat_cuda_supported(op) ? 0 : 1);
        ggml_tensor * op2 = make_node(ctx, w, 1, false);
        op2->src[LRQ_SRC_GAIN] = ggml_new_tensor_1d(ctx, GGML_TYPE_F16, 37);
        std::printf("supported kind=f16_gain ok=%d\n", ggml_lrq_mul_mat_cuda_supported(op2) ? 0 : 1);
    }
    ggml_free(ctx);
    return 0;
}
