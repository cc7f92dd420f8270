// GGML_OP_LRQ_MUL_MAT on the GPU devices of a build, against the CPU backend and the C reference,
// and the decode bandwidth of the op against the device's own copy bandwidth (bench/cuda.sh).
//
//   cuda_op_check BIN_DIR [--require-gpu] [--bandwidth] [--quick]
//
// Checks (one line per device and case): every LRQ type x mode x group size, 1, 3, 8 and 40 tokens
// (mat-vec, masked columns, 8 columns, tiled kernel), n_in 1536 / n_out 200 (partial tiles), replica
// parameters per group, gain, bias and an activation clip (every fourth case 8-bit activations);
// and fused parallel-replica runs (3 replicas x 1 token, 2 x 4 tokens: nodes over the same codes,
// next to each other in the graph, as ggml-cuda fuses them; each with its own x and parameters).
//   nmse_cpu  vs the CPU backend's int8 fast path (the same int8 activations: only float
//             summation order and fused multiply-adds differ)      <= LRQ_CUDA_CPU_NMSE_TOL
//   nmse_ref  vs lrq_mul_mat_ref (FORMAT.md 6 in float64)          <= LRQ_CUDA_REF_NMSE_TOL
// The CPU device runs the same cases (nmse_cpu = 0 by construction): on a machine without a GPU
// this checks the tool and the CPU backend (bench/cuda.sh --dry-run).
//
// --bandwidth: per GPU device, a device-to-device copy of 1 GiB (ggml_backend_tensor_copy, i.e.
// cudaMemcpyAsync) and a decode of 64 distinct 8192 x 8192 LRQ weights per graph (one token; the
// codes, 1 GiB for LRQ2, do not fit in L2), for LRQ2/LRQ4 asym g=64; prints GB/s of weight bytes
// read against the copy's traffic (read + write), the physical limit.
// Exit 1 if a supported case is outside its bound, or (--require-gpu) if no GPU ran the op.
#include "ggml.h"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "lrq-ggml.h"
#include "lrq-kernels.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

// Same int8 activations on both sides (the quantize kernel is bit-exact with the CPU's in the
// emulation, tests/test_cuda_emulation.py; its divisions are __fdiv_rn under -use_fast_math):
// what remains is float summation order and FMA contraction, ~1e-13 in the emulation.  A flipped
// int8 activation costs ~1e-6 .. 1e-5, a wrong code ~1e-4: both far outside 1e-8.
static const double LRQ_CUDA_CPU_NMSE_TOL = 1e-8;
// The int8 rounding of the activations against the float64 spec: measured <= 4e-4 in the
// emulation over all kinds of replicas; 4-bit activations everywhere would be ~1e-2.
static const double LRQ_CUDA_REF_NMSE_TOL = 2e-3;

struct problem {
    int n_in, n_out, n_tok, bits, mode, g, n_groups, n_rep;
    std::vector<uint8_t>  codes;
    std::vector<uint16_t> d, m;
    struct rep {
        std::vector<uint16_t> alpha, beta;
        std::vector<float>    gain, bias, act, x;
    };
    std::vector<rep> reps;
};

static problem make_problem(int n_in, int n_out, int n_tok, int bits, int mode, int g, int n_rep, bool act8, uint32_t seed) {
    std::mt19937                    rng(seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    problem                         p{};
    p.n_in = n_in, p.n_out = n_out, p.n_tok = n_tok, p.bits = bits, p.mode = mode, p.g = g, p.n_rep = n_rep;
    p.n_groups      = (n_in + g - 1) / g;
    const size_t rb = lrq_row_bytes(n_in, bits);
    p.codes.resize(rb * n_out);
    p.d.resize((size_t) n_out * p.n_groups);
    p.m.resize((size_t) n_out * p.n_groups);
    std::vector<float> w(n_in);
    for (int o = 0; o < n_out; ++o) {
        for (auto & v : w) v = 0.02f * nd(rng) + (mode == 0 ? 0.005f : 0.0f);
        lrq_quantize_row_ref(w.data(), n_in, bits, (lrq_mode) mode, g, LRQ_SCALE_MINMAX, p.codes.data() + o * rb,
                             p.d.data() + (size_t) o * p.n_groups, mode == 0 ? p.m.data() + (size_t) o * p.n_groups : nullptr);
    }
    for (int r = 0; r < n_rep; ++r) {
        problem::rep q;
        q.alpha.resize(p.d.size());
        q.beta.resize(p.d.size());
        for (auto & v : q.alpha) v = lrq_fp32_to_fp16(1.0f + 0.1f * nd(rng));
        for (auto & v : q.beta) v = lrq_fp32_to_fp16(0.25f * nd(rng));
        q.gain.resize(n_out);
        q.bias.resize(n_out);
        for (auto & v : q.gain) v = 1.0f + 0.2f * nd(rng);
        for (auto & v : q.bias) v = 0.05f * nd(rng);
        q.act = { r % 2 ? 0.875f : 0.75f, act8 ? 8.0f : 0.0f };
        q.x.resize((size_t) n_tok * n_in);
        for (size_t i = 0; i < q.x.size(); ++i) q.x[i] = nd(rng) * (i % 61 == 7 ? 8.0f : 1.0f);
        p.reps.push_back(std::move(q));
    }
    return p;
}

static std::vector<float> reference(const problem & p, int r) {
    const problem::rep & q = p.reps[(size_t) r];
    lrq_weight           w{};
    w.codes = p.codes.data(), w.codes_row_bytes = lrq_row_bytes(p.n_in, p.bits), w.n_in = p.n_in, w.n_out = p.n_out;
    w.bits = p.bits, w.mode = (lrq_mode) p.mode, w.group_size = p.g;
    w.d = p.d.data(), w.d_row_stride = p.n_groups;
    w.m = p.mode == 0 ? p.m.data() : nullptr, w.m_row_stride = p.n_groups;
    lrq_replica rr;
    lrq_replica_init(&rr);
    rr.alpha = q.alpha.data(), rr.alpha_row_stride = p.n_groups, rr.alpha_group_stride = 1;
    rr.beta = q.beta.data(), rr.beta_row_stride = p.n_groups, rr.beta_group_stride = 1;
    rr.gain = q.gain.data(), rr.bias = q.bias.data(), rr.act_clip = q.act[0], rr.act_bits = (int) q.act[1];
    std::vector<float> y((size_t) p.n_tok * p.n_out);
    lrq_mul_mat_ref(&w, &rr, q.x.data(), p.n_in, p.n_tok, y.data(), p.n_out, 0, p.n_out);
    return y;
}

// Runs the n_rep ops (one graph, adjacent nodes over shared codes) on `dev`; false if declined.
static bool run_on(ggml_backend_dev_t dev, const problem & p, std::vector<std::vector<float>> & ys) {
    ggml_init_params ip  = { (4 + 10 * (size_t) p.n_rep) * ggml_tensor_overhead() + ggml_graph_overhead(), nullptr, true };
    ggml_context *   ctx = ggml_init(ip);
    ggml_tensor *    tw  = ggml_new_tensor_2d(ctx, (ggml_type) (GGML_TYPE_LRQ1 + p.bits - 1), p.n_in, p.n_out);
    ggml_tensor *    td  = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, p.n_groups, p.n_out);
    ggml_tensor *    tm  = p.mode == 0 ? ggml_new_tensor_2d(ctx, GGML_TYPE_F16, p.n_groups, p.n_out) : nullptr;
    struct rt {
        ggml_tensor *x, *a, *b, *g, *c, *k, *out;
    };
    std::vector<rt> t((size_t) p.n_rep);
    for (auto & e : t) {
        e.x   = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, p.n_in, p.n_tok);
        e.a   = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, p.n_groups, p.n_out);
        e.b   = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, p.n_groups, p.n_out);
        e.g   = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, p.n_out);
        e.c   = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, p.n_out);
        e.k   = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, 2);
        e.out = ggml_lrq_mul_mat(ctx, tw, e.x, td, tm, e.a, e.b, e.g, e.c, e.k, p.g, (lrq_mode) p.mode);
    }
    ggml_backend_t backend = ggml_backend_dev_init(dev, nullptr);
    bool           ok      = backend != nullptr;
    for (auto & e : t) ok = ok && ggml_backend_supports_op(backend, e.out);
    if (ok) {
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, backend);
        ggml_backend_tensor_set(tw, p.codes.data(), 0, ggml_nbytes(tw));
        ggml_backend_tensor_set(td, p.d.data(), 0, ggml_nbytes(td));
        if (tm) ggml_backend_tensor_set(tm, p.m.data(), 0, ggml_nbytes(tm));
        ggml_cgraph * gf = ggml_new_graph(ctx);
        for (size_t r = 0; r < t.size(); ++r) {
            const problem::rep & q = p.reps[r];
            ggml_backend_tensor_set(t[r].x, q.x.data(), 0, ggml_nbytes(t[r].x));
            ggml_backend_tensor_set(t[r].a, q.alpha.data(), 0, ggml_nbytes(t[r].a));
            ggml_backend_tensor_set(t[r].b, q.beta.data(), 0, ggml_nbytes(t[r].b));
            ggml_backend_tensor_set(t[r].g, q.gain.data(), 0, ggml_nbytes(t[r].g));
            ggml_backend_tensor_set(t[r].c, q.bias.data(), 0, ggml_nbytes(t[r].c));
            ggml_backend_tensor_set(t[r].k, q.act.data(), 0, ggml_nbytes(t[r].k));
            ggml_build_forward_expand(gf, t[r].out);
        }
        ok = ggml_backend_graph_compute(backend, gf) == GGML_STATUS_SUCCESS;
        ys.assign(t.size(), std::vector<float>((size_t) p.n_tok * p.n_out));
        for (size_t r = 0; r < t.size(); ++r) ggml_backend_tensor_get(t[r].out, ys[r].data(), 0, ggml_nbytes(t[r].out));
        ggml_backend_buffer_free(buf);
    }
    if (backend) ggml_backend_free(backend);
    ggml_free(ctx);
    return ok;
}

static double nmse(const std::vector<float> & y, const std::vector<float> & ref) {
    double err = 0, pow = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
        err += ((double) y[i] - ref[i]) * ((double) y[i] - ref[i]);
        pow += (double) ref[i] * ref[i];
    }
    return pow > 0 ? err / pow : NAN;
}

using clk = std::chrono::steady_clock;

// GB/s of a 1 GiB device-to-device copy (traffic: read + write) and of LRQ decode (weight bytes).
static void bandwidth(ggml_backend_dev_t dev) {
    ggml_backend_t backend = ggml_backend_dev_init(dev, nullptr);
    if (!backend) return;
    {
        const int64_t    n  = (int64_t) 1 << 28;   // floats: 1 GiB
        ggml_init_params ip = { 4 * ggml_tensor_overhead(), nullptr, true };
        ggml_context *   ctx = ggml_init(ip);
        ggml_tensor *    a   = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n);
        ggml_tensor *    b   = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, n);
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, backend);
        if (buf) {
            ggml_backend_buffer_clear(buf, 0);
            ggml_backend_tensor_copy(a, b);
            ggml_backend_synchronize(backend);
            const int  reps = 20;
            const auto t0   = clk::now();
            for (int i = 0; i < reps; ++i) ggml_backend_tensor_copy(i % 2 ? b : a, i % 2 ? a : b);
            ggml_backend_synchronize(backend);
            const double s = std::chrono::duration<double>(clk::now() - t0).count();
            std::printf("bandwidth device=%s memcpy_d2d bytes=%lld copy_gbs=%.1f traffic_gbs=%.1f\n", ggml_backend_dev_name(dev),
                        (long long) ggml_nbytes(a), reps * ggml_nbytes(a) / s / 1e9, 2.0 * reps * ggml_nbytes(a) / s / 1e9);
            ggml_backend_buffer_free(buf);
        }
        ggml_free(ctx);
    }
    for (int bits : { 2, 4 }) {
        const int n_in = 8192, n_out = 8192, g = 64, n_mat = 64, ng = n_in / g;
        ggml_init_params ip  = { (size_t) (8 * n_mat + 8) * ggml_tensor_overhead() + ggml_graph_overhead(), nullptr, true };
        ggml_context *   ctx = ggml_init(ip);
        ggml_tensor *    x   = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_in, 1);
        ggml_cgraph *    gf  = ggml_new_graph(ctx);
        size_t           wbytes = 0;
        for (int i = 0; i < n_mat; ++i) {
            ggml_tensor * tw = ggml_new_tensor_2d(ctx, (ggml_type) (GGML_TYPE_LRQ1 + bits - 1), n_in, n_out);
            ggml_tensor * td = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, ng, n_out);
            ggml_tensor * tm = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, ng, n_out);
            wbytes += ggml_nbytes(tw) + ggml_nbytes(td) + ggml_nbytes(tm);
            ggml_build_forward_expand(gf, ggml_lrq_mul_mat(ctx, tw, x, td, tm, nullptr, nullptr, nullptr, nullptr, nullptr, g, LRQ_MODE_ASYM));
        }
        if (!ggml_backend_supports_op(backend, ggml_graph_node(gf, 0))) {
            ggml_free(ctx);
            continue;
        }
        ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, backend);
        if (buf) {
            ggml_backend_buffer_clear(buf, 0x11);   // codes 1, scales 2^-... : finite values, timing only
            ggml_backend_graph_compute(backend, gf);
            const int  reps = 10;
            const auto t0   = clk::now();
            for (int i = 0; i < reps; ++i) ggml_backend_graph_compute(backend, gf);
            const double s = std::chrono::duration<double>(clk::now() - t0).count();
            std::printf("bandwidth device=%s lrq_decode bits=%d g=%d n_in=%d n_out=%d matrices=%d weight_bytes=%zu us_per_matrix=%.2f gbs=%.1f\n",
                        ggml_backend_dev_name(dev), bits, g, n_in, n_out, n_mat, wbytes, 1e6 * s / reps / n_mat,
                        reps * (double) wbytes / s / 1e9);
            ggml_backend_buffer_free(buf);
        }
        ggml_free(ctx);
    }
    ggml_backend_free(backend);
}

int main(int argc, char ** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s BIN_DIR [--require-gpu] [--bandwidth] [--quick]\n", argv[0]);
        return 2;
    }
    bool require_gpu = false, bw = false, quick = false;
    for (int i = 2; i < argc; ++i) {
        if (!std::strcmp(argv[i], "--require-gpu")) require_gpu = true;
        else if (!std::strcmp(argv[i], "--bandwidth")) bw = true;
        else if (!std::strcmp(argv[i], "--quick")) quick = true;
        else {
            std::fprintf(stderr, "cuda_op_check: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    unsetenv("LRQ_CPU_REF");   // the CPU backend's int8 fast path: the GPU's arithmetic
    ggml_backend_load_all_from_path(argv[1]);

    const int modes_bits[][2] = { { 0, 1 }, { 0, 2 }, { 0, 3 }, { 0, 4 }, { 1, 1 }, { 1, 2 }, { 1, 3 }, { 1, 4 }, { 2, 2 } };
    const int groups[]        = { 32, 64, 128, 256 };
    const int toks[][2]       = { { 1, 1 }, { 3, 1 }, { 8, 1 }, { 40, 1 }, { 1, 3 }, { 4, 2 } };   // (tokens, replicas)
    ggml_backend_dev_t cpu    = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (!cpu) {
        std::fprintf(stderr, "cuda_op_check: no CPU backend in %s\n", argv[1]);
        return 2;
    }
    int n_bad = 0, n_gpu_ok = 0, n_gpu = 0, n_cases = 0;
    uint32_t seed = 1;
    for (const auto & mb : modes_bits) {
        for (int g : groups) {
            for (const auto & tr : toks) {
                const bool act8 = seed % 4 == 0;
                const problem p = make_problem(1536, 200, tr[0], mb[1], mb[0], g, tr[1], act8, seed++);
                if (quick && seed % 5) continue;
                ++n_cases;
                std::vector<std::vector<float>> on_cpu;
                if (!run_on(cpu, p, on_cpu)) {
                    std::fprintf(stderr, "cuda_op_check: the CPU backend declines a case\n");
                    return 2;
                }
                for (size_t di = 0; di < ggml_backend_dev_count(); ++di) {
                    ggml_backend_dev_t dev  = ggml_backend_dev_get(di);
                    const auto         type = ggml_backend_dev_type(dev);
                    if (type != GGML_BACKEND_DEVICE_TYPE_CPU && type != GGML_BACKEND_DEVICE_TYPE_GPU) continue;
                    if (!std::strcmp(ggml_backend_dev_name(dev), "RPC")) continue;
                    if (n_cases == 1) n_gpu += type == GGML_BACKEND_DEVICE_TYPE_GPU;
                    std::vector<std::vector<float>> ys;
                    const bool supported = dev == cpu ? (ys = on_cpu, true) : run_on(dev, p, ys);
                    double worst_cpu = 0, worst_ref = 0;
                    for (int r = 0; supported && r < p.n_rep; ++r) {
                        const double ec = nmse(ys[(size_t) r], on_cpu[(size_t) r]);
                        const double er = nmse(ys[(size_t) r], reference(p, r));
                        worst_cpu = std::isnan(ec) || ec > worst_cpu ? (std::isnan(ec) ? INFINITY : ec) : worst_cpu;
                        worst_ref = std::isnan(er) || er > worst_ref ? (std::isnan(er) ? INFINITY : er) : worst_ref;
                    }
                    const bool bad = supported && !(worst_cpu <= LRQ_CUDA_CPU_NMSE_TOL && worst_ref <= LRQ_CUDA_REF_NMSE_TOL);
                    n_bad += bad;
                    n_gpu_ok += supported && type == GGML_BACKEND_DEVICE_TYPE_GPU;
                    std::printf("device=%s bits=%d mode=%d g=%d n_tok=%d n_rep=%d act_bits=%d supported=%d nmse_cpu=%.3e nmse_ref=%.3e%s\n",
                                ggml_backend_dev_name(dev), p.bits, p.mode, g, p.n_tok, p.n_rep, act8 ? 8 : 0, supported ? 1 : 0,
                                supported ? worst_cpu : NAN, supported ? worst_ref : NAN, bad ? " FAIL" : "");
                    std::fflush(stdout);
                }
            }
        }
    }
    std::printf("gpu devices: %d, gpu cases run: %d, failures: %d\n", n_gpu, n_gpu_ok, n_bad);
    if (bw) {
        for (size_t di = 0; di < ggml_backend_dev_count(); ++di) {
            ggml_backend_dev_t dev = ggml_backend_dev_get(di);
            if (ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_GPU) bandwidth(dev);
        }
    }
    if (require_gpu && n_gpu_ok == 0) {
        std::fprintf(stderr, "cuda_op_check: no GPU device ran GGML_OP_LRQ_MUL_MAT\n");
        return 1;
    }
    return n_bad ? 1 : 0;
}
