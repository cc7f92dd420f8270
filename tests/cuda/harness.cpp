// Runs the real CUDA kernels of native/cuda/lrq-cuda.cuh on the CPU (through tests/cuda/shim) and
// compares them, case by case, with the C library (native/include/lrq-kernels.h):
//
//   case kernel=mv_c4 bits=2 mode=asym g=64 n_in=352 n_out=37 n_tok=3 n_rep=1 rep=group
//        q_mis=0 dx_err=0 sx_err=1e-8 nmse_q8=1e-15 nmse_ref=3e-5 power=0.4 ok_guard=1
//
//   q_mis, dx_err, sx_err  quantize kernel vs lrq_quantize_act_q8 (int8 values that differ; largest
//                          relative difference of the block scales / block sums)
//   nmse_q8                mat-mul kernel fed the CPU's int8 activations vs lrq_mul_mat_q8_generic
//                          (the same integer dots: only the float summation order differs)
//   nmse_ref               quantize + mat-mul kernels vs lrq_mul_mat_ref (FORMAT.md 6 in float64):
//                          the int8 rounding of the activations
//   ok_guard               no kernel wrote past the output
// n_rep > 1 is the fused parallel-replica path: replicas share codes, d and m, each has its own
// activations, parameters and output; every replica's output is checked and the worst is printed.
//
// Usage: harness [--quick]
#include "lrq-cuda-shim.h"

#ifndef LRQ_CUDA_SOURCE
#define LRQ_CUDA_SOURCE "lrq-cuda.cuh"
#endif
#include LRQ_CUDA_SOURCE

#include "lrq-kernels.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>

namespace {

const char * mode_name(int mode) { return mode == 0 ? "asym" : mode == 1 ? "sym" : "ternary"; }

enum rep_kind { REP_NONE, REP_GROUP, REP_ROW, REP_TENSOR_CLIP, REP_ACT4, REP_ACT8_GROUP, REP_ACT12, REP_COUNT };
const char * rep_name(int r) {
    static const char * n[] = { "none", "group", "row", "tensor_clip", "act4", "act8_group", "act12" };
    return n[r];
}

struct kconf {
    const char * name;
    int          nc;      // mul_mv columns (1, 2, 4, 8); 0: mul_mm
    int          n_tok;
    int          n_out;
    int          n_rep;
};

// 37 rows: a multiple of neither the 4 rows of a mul_mv block nor the 64 of a mul_mm tile; 3 tokens
// run the 4-column kernel with a masked column; 40 tokens a full and a partial token tile; 100
// rows two row tiles, the second partial.  fused_*: several replicas in one mul_mv launch.
const kconf KCONFS[] = {
    { "mv_c1", 1, 1, 37, 1 },  { "mv_c2", 2, 2, 37, 1 },   { "mv_c4", 4, 3, 37, 1 },
    { "mv_c8", 8, 8, 37, 1 },  { "mm", 0, 40, 37, 1 },     { "mm", 0, 40, 100, 1 },
    { "fused_c1", 1, 1, 37, 3 }, { "fused_c4", 4, 4, 37, 2 },
};

struct replica {
    std::vector<uint16_t> alpha, beta;
    std::vector<float>    gain, bias, act, x;
    int                   alpha_rs = 0, alpha_gs = 0, beta_rs = 0, beta_gs = 0, kind = 0;
    bool                  has_alpha = false, has_beta = false, has_gain = false, has_bias = false, has_act = false;
};

struct problem {
    int n_in, n_out, n_tok, bits, mode, g, n_groups, nb;
    size_t                row_bytes, nb01, xs;   // xs: floats per token row of x (padded)
    std::vector<uint8_t>  codes;
    std::vector<uint16_t> d, m;
    std::vector<replica>  reps;
};

problem make_problem(int n_in, int n_out, int n_tok, int bits, int mode, int g, int n_rep, int rep0, uint32_t seed) {
    std::mt19937                          rng(seed);
    std::normal_distribution<float>       nd(0.0f, 1.0f);
    std::uniform_real_distribution<float> ud(-0.5f, 0.5f);
    problem p;
    p.n_in = n_in, p.n_out = n_out, p.n_tok = n_tok, p.bits = bits, p.mode = mode, p.g = g;
    p.n_groups  = (n_in + g - 1) / g;
    p.nb        = n_in / 32;
    p.row_bytes = lrq_row_bytes(n_in, bits);
    p.nb01      = p.row_bytes + 4 * bits;   // a padded row: the kernels must use nb01
    p.codes.assign(p.nb01 * n_out, 0xa5);
    p.d.assign((size_t) n_out * p.n_groups, 0);
    p.m.assign((size_t) n_out * p.n_groups, 0);
    std::vector<float> w(n_in);
    for (int o = 0; o < n_out; ++o) {
        const float row_scale = 0.02f * (1.0f + 0.5f * std::fabs(nd(rng)));
        for (int i = 0; i < n_in; ++i) w[i] = row_scale * nd(rng) + (mode == 0 ? 0.01f : 0.0f);
        const int rc = lrq_quantize_row_ref(w.data(), n_in, bits, (lrq_mode) mode, g, LRQ_SCALE_MINMAX,
                                            p.codes.data() + (size_t) o * p.nb01, p.d.data() + (size_t) o * p.n_groups,
                                            mode == 0 ? p.m.data() + (size_t) o * p.n_groups : nullptr);
        if (rc) {
            std::fprintf(stderr, "quantize: %s\n", lrq_status_str(rc));
            std::exit(2);
        }
    }
    p.xs = (size_t) n_in + 32;
    for (int r = 0; r < n_rep; ++r) {
        replica q;
        q.kind = (rep0 + r) % REP_COUNT;
        // activations: Gaussian with outlier channels; rows padded with NaN (never read)
        q.x.assign((size_t) n_tok * p.xs, std::nanf(""));
        for (int t = 0; t < n_tok; ++t) {
            for (int i = 0; i < n_in; ++i) q.x[(size_t) t * p.xs + i] = nd(rng) * (i % 61 == 7 ? 8.0f : 1.0f);
        }
        auto fill = [&](std::vector<uint16_t> & v, int rows, int groups, bool is_alpha) {
            v.resize((size_t) rows * groups);
            for (auto & e : v) e = lrq_fp32_to_fp16(is_alpha ? 1.0f + 0.1f * nd(rng) : ud(rng));
        };
        auto grid = [&](int rows, int groups) {
            q.has_alpha = q.has_beta = true;
            fill(q.alpha, rows, groups, true);
            fill(q.beta, rows, groups, false);
            q.alpha_rs = q.beta_rs = rows > 1 ? groups : 0;
            q.alpha_gs = q.beta_gs = groups > 1 ? 1 : 0;
        };
        auto gain_bias = [&]() {
            q.has_gain = q.has_bias = true;
            q.gain.resize(n_out);
            q.bias.resize(n_out);
            for (auto & e : q.gain) e = 1.0f + 0.2f * nd(rng);
            for (auto & e : q.bias) e = 0.05f * nd(rng);
        };
        switch (q.kind) {
            case REP_NONE: break;
            case REP_GROUP: grid(n_out, p.n_groups); gain_bias(); break;
            case REP_ROW: grid(n_out, 1); gain_bias(); break;
            case REP_TENSOR_CLIP: grid(1, 1); q.has_act = true; q.act = { 0.75f, 0.0f }; break;
            case REP_ACT4: gain_bias(); q.has_act = true; q.act = { 0.9f, 4.0f }; break;
            case REP_ACT8_GROUP: grid(n_out, p.n_groups); q.has_act = true; q.act = { 0.875f, 8.0f }; break;
            case REP_ACT12: gain_bias(); q.has_act = true; q.act = { 1.0f, 12.0f }; break;
        }
        p.reps.push_back(std::move(q));
    }
    return p;
}

lrq_weight weight_of(const problem & p) {
    lrq_weight w{};
    w.codes = p.codes.data(), w.codes_row_bytes = p.nb01, w.n_in = p.n_in, w.n_out = p.n_out, w.bits = p.bits;
    w.mode = (lrq_mode) p.mode, w.group_size = p.g;
    w.d = p.d.data(), w.d_row_stride = p.n_groups;
    w.m = p.mode == 0 ? p.m.data() : nullptr, w.m_row_stride = p.n_groups;
    return w;
}

lrq_replica replica_of(const replica & q) {
    lrq_replica r;
    lrq_replica_init(&r);
    if (q.has_alpha) r.alpha = q.alpha.data(), r.alpha_row_stride = q.alpha_rs, r.alpha_group_stride = q.alpha_gs;
    if (q.has_beta) r.beta = q.beta.data(), r.beta_row_stride = q.beta_rs, r.beta_group_stride = q.beta_gs;
    if (q.has_gain) r.gain = q.gain.data();
    if (q.has_bias) r.bias = q.bias.data();
    if (q.has_act) r.act_clip = q.act[0], r.act_bits = (int) q.act[1];
    return r;
}

void die(const char * what, int rc) {
    std::fprintf(stderr, "%s: %s\n", what, lrq_status_str(rc));
    std::exit(2);
}

// Activations of one replica in the kernels' layout (lrq_cuda_act_layout).
struct acts {
    std::vector<unsigned char> buf;
    int8_t *                   qs = nullptr;
    float *                    dx = nullptr;
    float *                    sx = nullptr;
    acts(int64_t n_tok, int64_t n_in) : buf(lrq_cuda_act_size(n_tok, n_in), 0xff) {
        lrq_cuda_act_layout(buf.data(), n_tok, n_in, &qs, &dx, &sx);
    }
};

void run_quantize(const problem & p, const replica & q, acts & a) {
    const float * act = q.has_act ? q.act.data() : nullptr;
    lrq_cuda_shim::launch(dim3((unsigned) p.n_tok), dim3(LRQ_CUDA_Q_THREADS), (LRQ_CUDA_Q_THREADS / 32) * sizeof(float), [&] {
                              lrq_cuda_quantize_act_kernel(q.x.data(), (int64_t) p.xs, act, p.n_in, a.qs, a.dx, a.sx);
                          });
}

// The launcher's choice (native/cuda/lrq-cuda.cu, launch_bits): mul_mv with NC columns, or mul_mm
// once per replica.
template <int BITS, int NC> void run_mv_nc(const lrq_cuda_args & a) {
    const dim3 grid((a.n_out + LRQ_CUDA_MV_WARPS - 1) / LRQ_CUDA_MV_WARPS, (a.n_tok + NC - 1) / NC);
    const dim3 block(32, LRQ_CUDA_MV_WARPS);
    switch (a.n_rep) {
        case 1: lrq_cuda_shim::launch(grid, block, 0, [&] { lrq_cuda_mul_mv_kernel<BITS, NC, 1>(a); }); break;
        case 2: lrq_cuda_shim::launch(grid, block, 0, [&] { lrq_cuda_mul_mv_kernel<BITS, NC, 2>(a); }); break;
        case 3: lrq_cuda_shim::launch(grid, block, 0, [&] { lrq_cuda_mul_mv_kernel<BITS, NC, 3>(a); }); break;
        default: lrq_cuda_shim::launch(grid, block, 0, [&] { lrq_cuda_mul_mv_kernel<BITS, NC, 4>(a); }); break;
    }
}

template <int BITS> void run_bits(const lrq_cuda_args & a, int nc) {
    switch (nc) {
        case 0: {
            const dim3 grid((a.n_out + LRQ_CUDA_MM_NR - 1) / LRQ_CUDA_MM_NR, (a.n_tok + LRQ_CUDA_MM_NT - 1) / LRQ_CUDA_MM_NT);
            for (int r = 0; r < a.n_rep; ++r) {
                lrq_cuda_shim::launch(grid, dim3(LRQ_CUDA_MM_THREADS), LRQ_CUDA_MM_SHMEM,
                                      [&] { lrq_cuda_mul_mm_kernel<BITS>(a, r); });
            }
            break;
        }
        case 1: run_mv_nc<BITS, 1>(a); break;
        case 2: run_mv_nc<BITS, 2>(a); break;
        case 4: run_mv_nc<BITS, 4>(a); break;
        default: run_mv_nc<BITS, 8>(a); break;
    }
}

void run_mul(const lrq_cuda_args & a, int nc) {
    const char * err = lrq_cuda_check(&a);
    if (err) {
        std::fprintf(stderr, "lrq_cuda_check: %s\n", err);
        std::exit(2);
    }
    switch (a.bits) {
        case 1: run_bits<1>(a, nc); break;
        case 2: run_bits<2>(a, nc); break;
        case 3: run_bits<3>(a, nc); break;
        default: run_bits<4>(a, nc); break;
    }
}

lrq_cuda_args args_of(const problem & p, const std::vector<acts *> & in, std::vector<std::vector<float>> & out) {
    lrq_cuda_args a{};
    a.codes = p.codes.data(), a.nb01 = p.nb01, a.d = p.d.data(), a.m = p.mode == 0 ? p.m.data() : nullptr;
    a.n_in = p.n_in, a.n_out = p.n_out, a.n_tok = p.n_tok, a.n_groups = p.n_groups, a.group_size = p.g;
    a.mode = p.mode, a.bits = p.bits, a.n_rep = (int) p.reps.size();
    for (size_t r = 0; r < p.reps.size(); ++r) {
        const replica &    q = p.reps[r];
        lrq_cuda_replica & c = a.rep[r];
        c.qs = in[r]->qs, c.dx = in[r]->dx, c.sx = in[r]->sx;
        c.alpha = q.has_alpha ? q.alpha.data() : nullptr, c.alpha_rs = q.alpha_rs, c.alpha_gs = q.alpha_gs;
        c.beta = q.has_beta ? q.beta.data() : nullptr, c.beta_rs = q.beta_rs, c.beta_gs = q.beta_gs;
        c.gain = q.has_gain ? q.gain.data() : nullptr;
        c.bias = q.has_bias ? q.bias.data() : nullptr;
        c.dst  = out[r].data();
    }
    return a;
}

double nmse(const std::vector<float> & y, const std::vector<float> & ref, double * power) {
    double err = 0.0, pow = 0.0;
    for (size_t i = 0; i < ref.size(); ++i) {
        const double e = (double) y[i] - (double) ref[i];
        err += e * e;
        pow += (double) ref[i] * ref[i];
    }
    if (power) *power = pow;
    return pow > 0 ? err / pow : NAN;
}

}  // namespace

int main(int argc, char ** argv) {
    bool quick = false;
    for (int i = 1; i < argc; ++i) {
        if (!std::strcmp(argv[i], "--quick")) {
            quick = true;
        } else {
            std::fprintf(stderr, "usage: %s [--quick]\n", argv[0]);
            return 2;
        }
    }
    // every bits x mode of FORMAT.md 3 (ternary: 2-bit storage) x every group size; n_in = 352 =
    // 11 blocks leaves a short last group for g = 64, 128, 256
    const int modes_bits[][2] = { { 0, 1 }, { 0, 2 }, { 0, 3 }, { 0, 4 }, { 1, 1 }, { 1, 2 }, { 1, 3 }, { 1, 4 }, { 2, 2 } };
    const int groups[]        = { 32, 64, 128, 256 };
    const int n_in            = 352;
    const int GUARD           = 64;   // floats after each output that no kernel may touch
    int       combo           = 0;
    for (const auto & mb : modes_bits) {
        for (int g : groups) {
            const int nk = (int) (sizeof KCONFS / sizeof KCONFS[0]);
            for (int ki = 0; ki < nk; ++ki) {
                const int rep0 = (combo + ki) % REP_COUNT;
                if (quick && (combo % 9 != 0 || (ki != 0 && ki != 4 && ki != 6))) continue;
                const kconf &  kc = KCONFS[ki];
                const problem  p  = make_problem(n_in, kc.n_out, kc.n_tok, mb[1], mb[0], g, kc.n_rep, rep0,
                                                 1000u * (uint32_t) combo + (uint32_t) ki);
                const lrq_weight w = weight_of(p);
                const size_t     ny = (size_t) p.n_tok * p.n_out;

                int    q_mis = 0;
                double dx_err = 0.0, sx_err = 0.0, worst_q8 = 0.0, worst_ref = 0.0, min_pow = INFINITY;
                bool   guard_ok = true;
                std::vector<acts> gpu_act, cpu_act;
                for (size_t r = 0; r < p.reps.size(); ++r) {
                    gpu_act.emplace_back(p.n_tok, p.n_in);
                    cpu_act.emplace_back(p.n_tok, p.n_in);
                }
                std::vector<std::vector<float>> refs, q8s;
                for (size_t r = 0; r < p.reps.size(); ++r) {
                    const replica &   q  = p.reps[r];
                    const lrq_replica rr = replica_of(q);
                    // the CPU: spec and fast path
                    std::vector<float> ref(ny), q8(ny);
                    int rc = lrq_mul_mat_ref(&w, &rr, q.x.data(), (int64_t) p.xs, p.n_tok, ref.data(), p.n_out, 0, p.n_out);
                    if (rc) die("lrq_mul_mat_ref", rc);
                    std::vector<unsigned char> abuf(lrq_act_q8_size(p.n_tok, p.n_in, p.g) + 64);
                    lrq_act_q8 a8;
                    lrq_act_q8_init(&a8, abuf.data(), p.n_tok, p.n_in, p.g);
                    rc = lrq_quantize_act_q8(q.x.data(), (int64_t) p.xs, rr.act_clip, rr.act_bits, &a8);
                    if (rc) die("lrq_quantize_act_q8", rc);
                    rc = lrq_mul_mat_q8_generic(&w, &rr, &a8, q8.data(), p.n_out, 0, p.n_out);
                    if (rc) die("lrq_mul_mat_q8_generic", rc);
                    refs.push_back(std::move(ref));
                    q8s.push_back(std::move(q8));
                    // the CPU's int8 activations in the kernels' layout (per-block sums from them)
                    acts & c = cpu_act[r];
                    std::memcpy(c.qs, a8.qs, (size_t) p.n_tok * p.n_in);
                    for (int64_t tb = 0; tb < (int64_t) p.n_tok * p.nb; ++tb) {
                        int s = 0;
                        for (int j = 0; j < 32; ++j) s += a8.qs[tb * 32 + j];
                        c.dx[tb] = a8.dx[tb];
                        c.sx[tb] = a8.dx[tb] * (float) s;
                    }
                    // the quantize kernel against it
                    run_quantize(p, q, gpu_act[r]);
                    for (int64_t i = 0; i < (int64_t) p.n_tok * p.n_in; ++i) q_mis += gpu_act[r].qs[i] != c.qs[i];
                    for (int64_t tb = 0; tb < (int64_t) p.n_tok * p.nb; ++tb) {
                        const double sc = std::max(1e-30, (double) std::fabs(c.dx[tb]));
                        dx_err = std::max(dx_err, std::fabs((double) gpu_act[r].dx[tb] - c.dx[tb]) / sc);
                        const double ss = std::max(1e-30, (double) c.dx[tb] * 32 * 127);
                        sx_err = std::max(sx_err, std::fabs((double) gpu_act[r].sx[tb] - c.sx[tb]) / ss);
                    }
                }
                // mat-mul on the CPU's activations (isolates the mat-mul kernel) and end to end
                for (int pass = 0; pass < 2; ++pass) {
                    std::vector<acts *> in;
                    for (size_t r = 0; r < p.reps.size(); ++r) in.push_back(pass == 0 ? &cpu_act[r] : &gpu_act[r]);
                    std::vector<std::vector<float>> out(p.reps.size(), std::vector<float>(ny + GUARD, std::nanf("")));
                    const lrq_cuda_args a = args_of(p, in, out);
                    run_mul(a, kc.nc);
                    for (size_t r = 0; r < p.reps.size(); ++r) {
                        for (int i = 0; i < GUARD; ++i) guard_ok = guard_ok && std::isnan(out[r][ny + i]);
                        out[r].resize(ny);
                        double pow = 0.0;
                        double e   = nmse(out[r], pass == 0 ? q8s[r] : refs[r], &pow);
                        if (std::isnan(e)) e = INFINITY;
                        if (pass == 0) worst_q8 = std::max(worst_q8, e);
                        else {
                            worst_ref = std::max(worst_ref, e);
                            min_pow   = std::min(min_pow, pow);
                        }
                    }
                }
                std::printf("case kernel=%s bits=%d mode=%s g=%d n_in=%d n_out=%d n_tok=%d n_rep=%d rep=%s "
                            "q_mis=%d dx_err=%.3e sx_err=%.3e nmse_q8=%.3e nmse_ref=%.3e power=%.3e ok_guard=%d\n",
                            kc.name, p.bits, mode_name(p.mode), g, n_in, p.n_out, p.n_tok, kc.n_rep, rep_name(rep0),
                            q_mis, dx_err, sx_err, worst_q8, worst_ref, min_pow, guard_ok ? 1 : 0);
                std::fflush(stdout);
            }
            ++combo;
        }
    }
    return 0;
}
