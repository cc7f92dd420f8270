// GGML_OP_LRQ_MUL_MAT on every ggml backend device of a build, against the C reference
// (lrq_mul_mat_ref, native/lrq/ref.c), test-backend-ops style: for each LRQ type x mode x group
// size and 1, 3, 8 and 40 tokens (the mat-vec, few-column and mat-mat kernels on Metal), with
// per-group replica parameters and an activation clip, build the op on the device, run it, compare.
//
//   backend_check BIN_DIR [--require-gpu]
//
// BIN_DIR holds the ggml backend modules (lrq-info --json: bin_dir).  One line per device and case;
// exit 1 if a supported case is outside its bound, or (--require-gpu) if no GPU device supports
// the op (a Metal build whose LRQ library did not compile declines it: the CPU then runs it).
// The CPU backend runs with LRQ_CPU_REF=1 (the reference arithmetic; its int8 fast path is
// checked by tests/test_runtime_op.py).  Used by .github/workflows/metal.yml; here it checks the
// CPU backend and itself (tests/test_metal.py).
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "lrq-ggml.h"
#include "lrq-kernels.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

// Float32 kernels against the float64 reference: measured ~1e-13 in the CPU emulation of the
// Metal kernels (tests/test_metal.py).  1e-8 leaves room for Metal's fast-math division and
// fused multiply-adds; a wrong code, group or parameter is ~1e-4 or more.
static const double NMSE_TOL = 1e-8;

struct problem {
    int n_in, n_out, n_tok, bits, mode, g, n_groups;
    std::vector<uint8_t>  codes;
    std::vector<uint16_t> d, m, alpha, beta;
    std::vector<float>    gain, bias, act, x;
};

static problem make_problem(int n_in, int n_out, int n_tok, int bits, int mode, int g, uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    problem p{};
    p.n_in = n_in, p.n_out = n_out, p.n_tok = n_tok, p.bits = bits, p.mode = mode, p.g = g;
    p.n_groups = (n_in + g - 1) / g;
    const size_t rb = lrq_row_bytes(n_in, bits);
    p.codes.resize(rb * n_out);
    p.d.resize((size_t) n_out * p.n_groups);
    p.m.resize((size_t) n_out * p.n_groups);
    std::vector<float> w(n_in);
    for (int o = 0; o < n_out; ++o) {
        for (auto & v : w) v = 0.02f * nd(rng);
        lrq_quantize_row_ref(w.data(), n_in, bits, (lrq_mode) mode, g, LRQ_SCALE_MINMAX, p.codes.data() + o * rb,
                             p.d.data() + (size_t) o * p.n_groups, mode == 0 ? p.m.data() + (size_t) o * p.n_groups : nullptr);
    }
    p.alpha.resize(p.d.size());
    p.beta.resize(p.d.size());
    for (auto & v : p.alpha) v = lrq_fp32_to_fp16(1.0f + 0.1f * nd(rng));
    for (auto & v : p.beta) v = lrq_fp32_to_fp16(0.25f * nd(rng));
    p.gain.resize(n_out);
    p.bias.resize(n_out);
    for (auto & v : p.gain) v = 1.0f + 0.2f * nd(rng);
    for (auto & v : p.bias) v = 0.05f * nd(rng);
    p.act = { 0.75f, 0.0f };
    p.x.resize((size_t) n_tok * n_in);
    for (auto & v : p.x) v = nd(rng);
    return p;
}

static std::vector<float> reference(const problem & p) {
    lrq_weight w{};
    w.codes = p.codes.data(), w.codes_row_bytes = lrq_row_bytes(p.n_in, p.bits), w.n_in = p.n_in, w.n_out = p.n_out;
    w.bits = p.bits, w.mode = (lrq_mode) p.mode, w.group_size = p.g;
    w.d = p.d.data(), w.d_row_stride = p.n_groups;
    w.m = p.mode == 0 ? p.m.data() : nullptr, w.m_row_stride = p.n_groups;
    lrq_replica r;
    lrq_replica_init(&r);
    r.alpha = p.alpha.data(), r.alpha_row_stride = p.n_groups, r.alpha_group_stride = 1;
    r.beta = p.beta.data(), r.beta_row_stride = p.n_groups, r.beta_group_stride = 1;
    r.gain = p.gain.data(), r.bias = p.bias.data(), r.act_clip = p.act[0], r.act_bits = (int) p.act[1];
    std::vector<float> y((size_t) p.n_tok * p.n_out);
    lrq_mul_mat_ref(&w, &r, p.x.data(), p.n_in, p.n_tok, y.data(), p.n_out, 0, p.n_out);
    return y;
}

// Runs the op on `dev`; returns false (and leaves y empty) when the device declines it.
static bool run_on(ggml_backend_dev_t dev, const problem & p, std::vector<float> & y) {
    ggml_init_params ip = { 16 * ggml_tensor_overhead() + ggml_graph_overhead(), nullptr, true };
    ggml_context * ctx = ggml_init(ip);
    ggml_tensor * tw = ggml_new_tensor_2d(ctx, (ggml_type) (GGML_TYPE_LRQ1 + p.bits - 1), p.n_in, p.n_out);
    ggml_tensor * tx = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, p.n_in, p.n_tok);
    ggml_tensor * td = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, p.n_groups, p.n_out);
    ggml_tensor * tm = p.mode == 0 ? ggml_new_tensor_2d(ctx, GGML_TYPE_F16, p.n_groups, p.n_out) : nullptr;
    ggml_tensor * ta = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, p.n_groups, p.n_out);
    ggml_tensor * tb = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, p.n_groups, p.n_out);
    ggml_tensor * tg = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, p.n_out);
    ggml_tensor * tc = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, p.n_out);
    ggml_tensor * tk = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, 2);
    ggml_tensor * out = ggml_lrq_mul_mat(ctx, tw, tx, td, tm, ta, tb, tg, tc, tk, p.g, (lrq_mode) p.mode);

    ggml_backend_t backend = ggml_backend_dev_init(dev, nullptr);
    bool ok = backend && ggml_backend_supports_op(backend, out);
    if (ok) {
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, backend);
        ggml_backend_tensor_set(tw, p.codes.data(), 0, ggml_nbytes(tw));
        ggml_backend_tensor_set(tx, p.x.data(), 0, ggml_nbytes(tx));
        ggml_backend_tensor_set(td, p.d.data(), 0, ggml_nbytes(td));
        if (tm) ggml_backend_tensor_set(tm, p.m.data(), 0, ggml_nbytes(tm));
        ggml_backend_tensor_set(ta, p.alpha.data(), 0, ggml_nbytes(ta));
        ggml_backend_tensor_set(tb, p.beta.data(), 0, ggml_nbytes(tb));
        ggml_backend_tensor_set(tg, p.gain.data(), 0, ggml_nbytes(tg));
        ggml_backend_tensor_set(tc, p.bias.data(), 0, ggml_nbytes(tc));
        ggml_backend_tensor_set(tk, p.act.data(), 0, ggml_nbytes(tk));
        ggml_cgraph * gf = ggml_new_graph(ctx);
        ggml_build_forward_expand(gf, out);
        ok = ggml_backend_graph_compute(backend, gf) == GGML_STATUS_SUCCESS;
        y.resize((size_t) p.n_tok * p.n_out);
        ggml_backend_tensor_get(out, y.data(), 0, ggml_nbytes(out));
        ggml_backend_buffer_free(buf);
    }
    if (backend) ggml_backend_free(backend);
    ggml_free(ctx);
    return ok;
}

int main(int argc, char ** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s BIN_DIR [--require-gpu]\n", argv[0]);
        return 2;
    }
    const bool require_gpu = argc > 2 && !std::strcmp(argv[2], "--require-gpu");
    setenv("LRQ_CPU_REF", "1", 1);
    ggml_backend_load_all_from_path(argv[1]);

    const int modes_bits[][2] = { { 0, 1 }, { 0, 2 }, { 0, 3 }, { 0, 4 }, { 1, 1 }, { 1, 2 }, { 1, 3 }, { 1, 4 }, { 2, 2 } };
    const int groups[] = { 32, 64, 128, 256 };
    const int toks[]   = { 1, 3, 8, 40 };
    int n_bad = 0, n_gpu_ok = 0, n_gpu = 0;
    for (size_t di = 0; di < ggml_backend_dev_count(); ++di) {
        ggml_backend_dev_t dev  = ggml_backend_dev_get(di);
        const auto         type = ggml_backend_dev_type(dev);
        if (type != GGML_BACKEND_DEVICE_TYPE_CPU && type != GGML_BACKEND_DEVICE_TYPE_GPU) continue;
        if (!std::strcmp(ggml_backend_dev_name(dev), "RPC")) continue;
        n_gpu += type == GGML_BACKEND_DEVICE_TYPE_GPU;
        uint32_t seed = 1;
        for (const auto & mb : modes_bits) {
            for (int g : groups) {
                for (int t : toks) {
                    const problem p = make_problem(352, 100, t, mb[1], mb[0], g, seed++);
                    const std::vector<float> ref = reference(p);
                    std::vector<float> y;
                    const bool supported = run_on(dev, p, y);
                    double err = 0, pow = 0;
                    for (size_t i = 0; supported && i < ref.size(); ++i) {
                        err += ((double) y[i] - ref[i]) * ((double) y[i] - ref[i]);
                        pow += (double) ref[i] * ref[i];
                    }
                    const double nmse = supported ? err / pow : NAN;
                    const bool   bad  = supported && !(nmse <= NMSE_TOL);
                    n_bad += bad;
                    n_gpu_ok += supported && type == GGML_BACKEND_DEVICE_TYPE_GPU;
                    std::printf("device=%s bits=%d mode=%d g=%d n_tok=%d supported=%d nmse=%.3e%s\n",
                                ggml_backend_dev_name(dev), p.bits, p.mode, g, t, supported ? 1 : 0, nmse, bad ? " FAIL" : "");
                }
            }
        }
    }
    std::printf("gpu devices: %d, gpu cases run: %d, failures: %d\n", n_gpu, n_gpu_ok, n_bad);
    if (require_gpu && n_gpu_ok == 0) {
        std::fprintf(stderr, "backend_check: no GPU device ran GGML_OP_LRQ_MUL_MAT\n");
        return 1;
    }
    return n_bad ? 1 : 0;
}
