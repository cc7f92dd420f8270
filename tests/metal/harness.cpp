// Runs the real Metal kernels of metal/lrq.metal on the CPU (through tests/metal/shim) and compares
// each with the C reference lrq_mul_mat_ref (native/lrq/ref.c: float64 dequantization of FORMAT.md
// 6 and float64 sums), case by case.  One line per case on stdout:
//
//   case kernel=mv_c4 bits=2 mode=asym g=64 n_in=352 n_out=37 n_tok=3 rep=group nmse=1.2e-14 ok_guard=1
//
// tests/test_metal.py builds this file (the shader source is LRQ_METAL_SOURCE, so that the test can
// also build a deliberately broken copy) and checks every nmse against its bound.
//
// Usage: harness [--quick | --no-big] [--concurrent N]
//   --quick        a few cases per kernel (the ThreadSanitizer build)
//   --no-big       without the model-sized cases (the broken-kernel controls)
//   --concurrent   threadgroups in flight at once (default 2)
#include <metal_stdlib>

#ifndef LRQ_METAL_SOURCE
#define LRQ_METAL_SOURCE "lrq.metal"
#endif
#include LRQ_METAL_SOURCE

#undef kernel
#undef device
#undef threadgroup
#undef thread
#undef constant

#include "lrq-kernels.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace {

const char * mode_name(int mode) { return mode == 0 ? "asym" : mode == 1 ? "sym" : "ternary"; }

// replica settings the cases cycle through (FORMAT.md 5/6: every parameter optional, alpha/beta
// per group, per row ([n_out, 1]) or per tensor ([1, 1]))
enum rep_kind { REP_NONE, REP_GROUP, REP_ROW, REP_TENSOR_CLIP, REP_ACT4, REP_ACT8_GROUP, REP_COUNT };
const char * rep_name(int r) {
    static const char * n[] = { "none", "group", "row", "tensor_clip", "act4", "act8_group" };
    return n[r];
}

struct kconf {
    const char * name;
    int          nc;      // 1, 2, 4, 8: mul_mv columns; 0: mul_mm
    int          n_tok;
    int          n_out;
};

// n_tok 1: decode; 2, 3, 8: few columns (3 runs the 4-column kernel with a masked column); 11: two
// column blocks; 40: mul_mm with a partial token tile; 100 rows: two row tiles, the second partial.
// 37 rows is not a multiple of the 4 rows per simdgroup nor of the 8 per threadgroup.
const kconf KCONFS[] = {
    { "mv_c1", 1, 1, 37 },  { "mv_c2", 2, 2, 37 },  { "mv_c4", 4, 3, 37 },   { "mv_c8", 8, 8, 37 },
    { "mv_c8", 8, 11, 37 }, { "mm", 0, 40, 37 },    { "mm", 0, 40, 100 },
};

struct problem {
    int n_in, n_out, n_tok, bits, mode, g, n_groups;
    size_t                row_bytes, nb01, nb11;
    std::vector<uint8_t>  codes;
    std::vector<uint16_t> d, m, alpha, beta;
    std::vector<float>    gain, bias, act, x;
    int                   alpha_rs = 0, alpha_gs = 0, beta_rs = 0, beta_gs = 0;
    bool                  has_min = false, has_alpha = false, has_beta = false, has_gain = false, has_bias = false,
                          has_act = false;
};

problem make_problem(int n_in, int n_out, int n_tok, int bits, int mode, int g, int rep, uint32_t seed) {
    std::mt19937                    rng(seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    std::uniform_real_distribution<float> ud(-0.5f, 0.5f);
    problem p;
    p.n_in = n_in, p.n_out = n_out, p.n_tok = n_tok, p.bits = bits, p.mode = mode, p.g = g;
    p.n_groups  = (n_in + g - 1) / g;
    p.row_bytes = lrq_row_bytes(n_in, bits);
    p.nb01      = p.row_bytes + 4 * bits;   // a padded row: the kernel must use nb01, not the width
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
    p.has_min = mode == 0;

    // activations: Gaussian with a few outlier channels; rows padded with NaN (never read)
    p.nb11 = (size_t) (n_in + 32) * sizeof(float);
    p.x.assign((size_t) n_tok * (n_in + 32), std::nanf(""));
    for (int t = 0; t < n_tok; ++t) {
        for (int i = 0; i < n_in; ++i) p.x[(size_t) t * (n_in + 32) + i] = nd(rng) * (i % 61 == 7 ? 8.0f : 1.0f);
    }

    auto fill_grid = [&](std::vector<uint16_t> & v, int rows, int groups, bool is_alpha) {
        v.resize((size_t) rows * groups);
        for (auto & e : v) e = lrq_fp32_to_fp16(is_alpha ? 1.0f + 0.1f * nd(rng) : ud(rng));
    };
    auto grid = [&](int rows, int groups) {
        p.has_alpha = p.has_beta = true;
        fill_grid(p.alpha, rows, groups, true);
        fill_grid(p.beta, rows, groups, false);
        p.alpha_rs = p.beta_rs = rows > 1 ? groups : 0;
        p.alpha_gs = p.beta_gs = groups > 1 ? 1 : 0;
    };
    auto gain_bias = [&]() {
        p.has_gain = p.has_bias = true;
        p.gain.resize(n_out);
        p.bias.resize(n_out);
        for (auto & e : p.gain) e = 1.0f + 0.2f * nd(rng);
        for (auto & e : p.bias) e = 0.05f * nd(rng);
    };
    switch (rep) {
        case REP_NONE: break;
        case REP_GROUP: grid(n_out, p.n_groups); gain_bias(); break;
        case REP_ROW: grid(n_out, 1); gain_bias(); break;
        case REP_TENSOR_CLIP: grid(1, 1); p.has_act = true; p.act = { 0.75f, 0.0f }; break;
        case REP_ACT4: gain_bias(); p.has_act = true; p.act = { 0.9f, 4.0f }; break;
        case REP_ACT8_GROUP: grid(n_out, p.n_groups); p.has_act = true; p.act = { 0.875f, 8.0f }; break;
    }
    return p;
}

std::vector<float> reference(const problem & p) {
    lrq_weight w{};
    w.codes = p.codes.data(), w.codes_row_bytes = p.nb01, w.n_in = p.n_in, w.n_out = p.n_out, w.bits = p.bits;
    w.mode = (lrq_mode) p.mode, w.group_size = p.g;
    w.d = p.d.data(), w.d_row_stride = p.n_groups;
    w.m = p.has_min ? p.m.data() : nullptr, w.m_row_stride = p.n_groups;
    lrq_replica r;
    lrq_replica_init(&r);
    if (p.has_alpha) r.alpha = p.alpha.data(), r.alpha_row_stride = p.alpha_rs, r.alpha_group_stride = p.alpha_gs;
    if (p.has_beta) r.beta = p.beta.data(), r.beta_row_stride = p.beta_rs, r.beta_group_stride = p.beta_gs;
    if (p.has_gain) r.gain = p.gain.data();
    if (p.has_bias) r.bias = p.bias.data();
    if (p.has_act) r.act_clip = p.act[0], r.act_bits = (int) p.act[1];
    std::vector<float> y((size_t) p.n_tok * p.n_out);
    const int rc = lrq_mul_mat_ref(&w, &r, p.x.data(), p.n_in + 32, p.n_tok, y.data(), p.n_out, 0, p.n_out);
    if (rc) {
        std::fprintf(stderr, "reference: %s\n", lrq_status_str(rc));
        std::exit(2);
    }
    return y;
}

lrq_metal_kargs kargs_of(const problem & p) {
    lrq_metal_kargs a{};
    a.nb01 = p.nb01, a.nb11 = p.nb11, a.n_in = p.n_in, a.n_out = p.n_out, a.n_tok = p.n_tok;
    a.n_groups = p.n_groups, a.group_size = p.g, a.mode = p.mode;
    a.flags = (p.has_min ? LRQ_METAL_HAS_MIN : 0) | (p.has_alpha ? LRQ_METAL_HAS_ALPHA : 0) |
              (p.has_beta ? LRQ_METAL_HAS_BETA : 0) | (p.has_gain ? LRQ_METAL_HAS_GAIN : 0) |
              (p.has_bias ? LRQ_METAL_HAS_BIAS : 0) | (p.has_act ? LRQ_METAL_HAS_ACT : 0);
    a.alpha_rs = p.alpha_rs, a.alpha_gs = p.alpha_gs, a.beta_rs = p.beta_rs, a.beta_gs = p.beta_gs;
    return a;
}

// absent sources are NULL: a kernel that reads one it was told is absent crashes the harness
#define LRQ_BUFS(p)                                                                                            \
    (const char *) (p).codes.data(), (const char *) (p).x.data(), (const half *) (p).d.data(),               \
        (p).has_min ? (const half *) (p).m.data() : nullptr, (p).has_alpha ? (const half *) (p).alpha.data() : nullptr, \
        (p).has_beta ? (const half *) (p).beta.data() : nullptr, (p).has_gain ? (p).gain.data() : nullptr,     \
        (p).has_bias ? (p).bias.data() : nullptr, (p).has_act ? (p).act.data() : nullptr

template <int BITS, short NC>
void run_mv(const problem & p, float * dst, int concurrent) {
    const lrq_metal_kargs a    = kargs_of(p);
    const int             rows = LRQ_METAL_MV_NSG * LRQ_METAL_MV_NR0;
    const uint3           grid = { (uint) ((p.n_out + rows - 1) / rows), (uint) ((p.n_tok + NC - 1) / NC), 1 };
    lrq_shim::dispatch(grid, 32 * LRQ_METAL_MV_NSG, 0, concurrent,
                       [&](uint3 tgpig, ushort, ushort tiisg, ushort sgitg, char *) {
                           kernel_lrq_mul_mv<BITS, NC>(a, LRQ_BUFS(p), dst, tgpig, tiisg, sgitg);
                       });
}

template <int BITS>
void run_mm(const problem & p, float * dst, int concurrent) {
    const lrq_metal_kargs a    = kargs_of(p);
    const uint3           grid = { (uint) ((p.n_tok + LRQ_METAL_MM_NT - 1) / LRQ_METAL_MM_NT),
                                   (uint) ((p.n_out + LRQ_METAL_MM_NR - 1) / LRQ_METAL_MM_NR), 1 };
    lrq_shim::dispatch(grid, 32 * LRQ_METAL_MM_NSG, LRQ_METAL_MM_SHMEM, concurrent,
                       [&](uint3 tgpig, ushort tiitg, ushort, ushort sgitg, char * shmem) {
                           kernel_lrq_mul_mm<BITS>(a, LRQ_BUFS(p), dst, shmem, tgpig, tiitg, sgitg);
                       });
}

template <int BITS>
void run_bits(const problem & p, int nc, float * dst, int concurrent) {
    switch (nc) {
        case 0: run_mm<BITS>(p, dst, concurrent); break;
        case 1: run_mv<BITS, 1>(p, dst, concurrent); break;
        case 2: run_mv<BITS, 2>(p, dst, concurrent); break;
        case 4: run_mv<BITS, 4>(p, dst, concurrent); break;
        default: run_mv<BITS, 8>(p, dst, concurrent); break;
    }
}

void run_kernel(const problem & p, int nc, float * dst, int concurrent) {
    switch (p.bits) {
        case 1: run_bits<1>(p, nc, dst, concurrent); break;
        case 2: run_bits<2>(p, nc, dst, concurrent); break;
        case 3: run_bits<3>(p, nc, dst, concurrent); break;
        default: run_bits<4>(p, nc, dst, concurrent); break;
    }
}

// One case: make the problem, run the reference and the kernel, print the comparison.
void run_case(const kconf & kc, int n_in, int bits, int mode, int g, int rep, uint32_t seed, int concurrent) {
    const int GUARD = 64;   // floats after the output that no kernel may touch
    const problem p = make_problem(n_in, kc.n_out, kc.n_tok, bits, mode, g, rep, seed);
    const std::vector<float> ref = reference(p);
    std::vector<float>       y((size_t) p.n_tok * p.n_out + GUARD, std::nanf(""));
    run_kernel(p, kc.nc, y.data(), concurrent);
    double err = 0.0, pow = 0.0;
    for (size_t i = 0; i < ref.size(); ++i) {
        const double e = (double) y[i] - (double) ref[i];
        err += e * e;
        pow += (double) ref[i] * ref[i];
    }
    bool guard_ok = true;
    for (int i = 0; i < GUARD; ++i) guard_ok = guard_ok && std::isnan(y[ref.size() + i]);
    std::printf("case kernel=%s bits=%d mode=%s g=%d n_in=%d n_out=%d n_tok=%d rep=%s nmse=%.3e power=%.3e ok_guard=%d\n",
                kc.name, p.bits, mode_name(p.mode), g, n_in, p.n_out, p.n_tok, rep_name(rep), pow > 0 ? err / pow : NAN,
                pow, guard_ok ? 1 : 0);
    std::fflush(stdout);
}

}  // namespace

int main(int argc, char ** argv) {
    bool quick      = false;
    bool big        = true;
    int  concurrent = 2;
    for (int i = 1; i < argc; ++i) {
        if (!std::strcmp(argv[i], "--quick")) {
            quick = true;
        } else if (!std::strcmp(argv[i], "--no-big")) {
            big = false;
        } else if (!std::strcmp(argv[i], "--concurrent") && i + 1 < argc) {
            concurrent = std::atoi(argv[++i]);
        } else {
            std::fprintf(stderr, "usage: %s [--quick | --no-big] [--concurrent N]\n", argv[0]);
            return 2;
        }
    }
    // every bits x mode of FORMAT.md 3 (ternary: 2-bit storage) x every group size; n_in = 352 =
    // 11 blocks leaves a short last group for g = 64, 128, 256
    const int modes_bits[][2] = { { 0, 1 }, { 0, 2 }, { 0, 3 }, { 0, 4 }, { 1, 1 }, { 1, 2 },
                                  { 1, 3 }, { 1, 4 }, { 2, 2 } };
    const int groups[]        = { 32, 64, 128, 256 };
    const int n_in            = 352;
    int       combo           = 0;
    for (const auto & mb : modes_bits) {
        for (int g : groups) {
            const int nk = (int) (sizeof KCONFS / sizeof KCONFS[0]);
            for (int ki = 0; ki < nk; ++ki) {
                const int rep = (combo + ki) % REP_COUNT;
                if (quick && (combo % 9 != 0 || (ki != 0 && ki != 2 && ki != 5))) continue;
                run_case(KCONFS[ki], n_in, mb[1], mb[0], g, rep, 1000u * (uint32_t) combo + (uint32_t) ki, concurrent);
            }
            ++combo;
        }
    }
    // model-sized rows: 48 blocks (6 mat-vec steps per lane, 48 tile steps), 12 groups of 128,
    // 130 rows (3 row tiles, the last partial), 69 tokens (3 token tiles)
    if (!quick && big) {
        const kconf bigc[] = { { "mv_c1", 1, 1, 130 }, { "mm", 0, 69, 130 } };
        for (const auto & mb : modes_bits) {
            for (int ki = 0; ki < 2; ++ki) {
                const int rep = (combo + ki) % REP_COUNT;
                run_case(bigc[ki], 1536, mb[1], mb[0], 128, rep, 1000u * (uint32_t) combo + 7u + (uint32_t) ki, concurrent);
            }
            ++combo;
        }
    }
    return 0;
}
