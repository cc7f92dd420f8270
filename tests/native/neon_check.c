// NEON fast path (lrq_mul_mat_q8, which dispatches to q8-neon.c on aarch64) against the portable C
// path (lrq_mul_mat_q8_generic), for every bits x group size x mode x tokens x replica shape, and
// for the two-level layout (sub-blocks of 16 / 32 x super-block size x tokens x replica shape).
// Built and run under qemu-user by tests/test_neon.py:
//   aarch64-linux-gnu-gcc -O2 -march=... -Inative/include tests/native/neon_check.c
//       native/lrq/{ref,q8,q8-neon}.c -lm
// Prints "simd=<lrq_kernels_simd()> dotprod=<0|1>", one PASS/FAIL line per case and a summary;
// exits 0 only when every case passed.
//
// Bound: both paths compute the same exact integer block dots; only float32 sums differ in order,
// so the NMSE between them is ~1e-14.  NMSE <= 1e-10 (SIMD_NMSE_TOL of tests/test_kernels.py,
// the AVX2-vs-generic bound) and max |diff| / max |y| <= 1e-5 fail on any real error (a wrong
// code, scale or offset term is orders of magnitude larger).
#include "lrq-kernels.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NMSE_TOL   1e-10
#define MAXREL_TOL 1e-5

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t rng_u64(void) {   // splitmix64
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z          = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z          = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double rng_unif(void) { return ((double) (rng_u64() >> 11) + 0.5) / 9007199254740992.0; }   // (0, 1)

static double rng_normal(void) { return sqrt(-2.0 * log(rng_unif())) * cos(6.283185307179586 * rng_unif()); }

enum { REP_NONE, REP_GROUP, REP_CHANNEL, REP_TENSOR, N_REP };
static const char * rep_name[N_REP] = {"none", "per-group", "per-channel", "per-tensor"};

typedef struct {
    float clip;
    int   bits;
} act_setting;
static const act_setting acts[] = {{1.0f, 0}, {0.75f, 0}, {0.875f, 8}, {1.0f, 4}, {1.0f, 12}};

// Runs one case; returns 1 when it passed.
// sub_size 16 or 32: the two-level layout (format v4; bits 2, asym), 0: the single-level one.
static int run_case(int64_t n_in, int64_t n_out, int bits, lrq_mode mode, int group, int n_tok, int rep_kind,
                    act_setting act, const char * tag, int sub_size) {
    const int64_t ng = lrq_n_groups(n_in, group);
    const size_t  rb = lrq_row_bytes(n_in, bits);
    float *       w  = malloc(sizeof(float) * (size_t) n_in);
    uint8_t *     codes = malloc(rb * (size_t) n_out);
    uint16_t *    d  = malloc(sizeof(uint16_t) * (size_t) (n_out * ng));
    uint16_t *    m  = malloc(sizeof(uint16_t) * (size_t) (n_out * ng));
    const int64_t nk = sub_size ? n_in / sub_size : 0;
    uint8_t *     sub = malloc((size_t) (n_out * (nk ? nk : 1)));
    for (int64_t o = 0; o < n_out; ++o) {
        for (int64_t i = 0; i < n_in; ++i) w[i] = (float) (0.02 * rng_normal() + (mode == LRQ_MODE_ASYM ? 0.003 : 0.0));
        const int rc = sub_size ? lrq_quantize_row_two_level_ref(w, n_in, group, sub_size, NULL, codes + o * rb,
                                                                 d + o * ng, m + o * ng, sub + o * nk)
                                : lrq_quantize_row_ref(w, n_in, bits, mode, group, LRQ_SCALE_MINMAX, codes + o * rb,
                                                       d + o * ng, mode == LRQ_MODE_ASYM ? m + o * ng : NULL);
        if (rc) {
            printf("FAIL %s: quantize: %s\n", tag, lrq_status_str(rc));
            return 0;
        }
    }
    lrq_weight W = {codes, rb, n_in, n_out, bits, mode, group, d, ng, mode == LRQ_MODE_ASYM ? m : NULL, ng,
                    sub_size ? sub : NULL, nk, sub_size};

    // replica parameters: alpha around 1, beta a fraction of a code, gain, bias, activation settings
    uint16_t *  alpha = malloc(sizeof(uint16_t) * (size_t) (n_out * ng));
    uint16_t *  beta  = malloc(sizeof(uint16_t) * (size_t) (n_out * ng));
    float *     gain  = malloc(sizeof(float) * (size_t) n_out);
    float *     bias  = malloc(sizeof(float) * (size_t) n_out);
    for (int64_t k = 0; k < n_out * ng; ++k) {
        alpha[k] = lrq_fp32_to_fp16((float) (1.0 + 0.1 * rng_normal()));
        beta[k]  = lrq_fp32_to_fp16((float) (0.2 * rng_normal()));
    }
    for (int64_t o = 0; o < n_out; ++o) {
        gain[o] = (float) (1.0 + 0.05 * rng_normal());
        bias[o] = (float) (0.01 * rng_normal());
    }
    lrq_replica R;
    lrq_replica_init(&R);
    R.act_clip = act.clip;
    R.act_bits = act.bits;
    if (rep_kind != REP_NONE) {
        R.alpha = alpha;
        R.beta  = beta;
        R.gain  = gain;
        R.bias  = bias;
        if (rep_kind == REP_GROUP) {
            R.alpha_row_stride = R.beta_row_stride = ng;
            R.alpha_group_stride = R.beta_group_stride = 1;
        } else if (rep_kind == REP_CHANNEL) {
            R.alpha_row_stride = R.beta_row_stride = 1;
            R.alpha_group_stride = R.beta_group_stride = 0;
        } else {
            R.alpha_row_stride = R.beta_row_stride = 0;
            R.alpha_group_stride = R.beta_group_stride = 0;
        }
    }

    // activations with a few outlier channels (clipping matters), quantized once for both paths
    float * x = malloc(sizeof(float) * (size_t) (n_tok * n_in));
    for (int64_t i = 0; i < n_tok * n_in; ++i) x[i] = (float) (rng_normal() * (i % 17 == 0 ? 6.0 : 1.0));
    const int  agroup = lrq_act_group_size(&W);
    void *     abuf = malloc(lrq_act_q8_size(n_tok, n_in, agroup));
    lrq_act_q8 A;
    lrq_act_q8_init(&A, abuf, n_tok, n_in, agroup);
    int rc = lrq_quantize_act_q8(x, n_in, R.act_clip, R.act_bits, &A);

    float * yf = calloc((size_t) (n_tok * n_out), sizeof(float));
    float * yg = calloc((size_t) (n_tok * n_out), sizeof(float));
    float * yh = calloc((size_t) (n_tok * n_out), sizeof(float));
    const lrq_replica * rp = rep_kind == REP_NONE && act.clip == 1.0f && act.bits == 0 ? NULL : &R;
    if (!rc) rc = lrq_mul_mat_q8(&W, rp, &A, yf, n_out, 0, n_out);
    if (!rc) rc = lrq_mul_mat_q8_generic(&W, rp, &A, yg, n_out, 0, n_out);
    // rows split as ggml splits them over threads: the halves must be the whole, bit for bit
    const int64_t half = n_out / 2 + 1;
    if (!rc) rc = lrq_mul_mat_q8(&W, rp, &A, yh, n_out, 0, half);
    if (!rc) rc = lrq_mul_mat_q8(&W, rp, &A, yh + half, n_out, half, n_out);

    int pass = 0;
    if (rc) {
        printf("FAIL %s: status %s\n", tag, lrq_status_str(rc));
    } else {
        double se = 0.0, sr = 0.0, maxd = 0.0, maxy = 0.0;
        int    halves_equal = 1;
        for (int64_t k = 0; k < n_tok * n_out; ++k) {
            const double e = (double) yf[k] - (double) yg[k];
            se += e * e;
            sr += (double) yg[k] * (double) yg[k];
            if (fabs(e) > maxd || e != e) maxd = e != e ? INFINITY : fabs(e);
            if (fabs((double) yg[k]) > maxy) maxy = fabs((double) yg[k]);
            if (memcmp(&yf[k], &yh[k], sizeof(float))) halves_equal = 0;
        }
        const double nmse   = sr > 0.0 ? se / sr : (se > 0.0 ? INFINITY : 0.0);
        const double maxrel = maxy > 0.0 ? maxd / maxy : (maxd > 0.0 ? INFINITY : 0.0);
        pass = sr > 0.0 && nmse <= NMSE_TOL && maxrel <= MAXREL_TOL && halves_equal;
        printf("%s %s: max_rel_diff=%.3g nmse=%.3g%s\n", pass ? "PASS" : "FAIL", tag, maxrel, nmse,
               halves_equal ? "" : " (row halves differ from the whole)");
    }
    free(w); free(codes); free(d); free(m); free(sub); free(alpha); free(beta); free(gain); free(bias);
    free(x); free(abuf); free(yf); free(yg); free(yh);
    return pass;
}

int main(void) {
    static const struct { lrq_mode mode; int bits; const char * name; } mb[] = {
        {LRQ_MODE_ASYM, 1, "asym"}, {LRQ_MODE_ASYM, 2, "asym"}, {LRQ_MODE_ASYM, 3, "asym"}, {LRQ_MODE_ASYM, 4, "asym"},
        {LRQ_MODE_SYM, 1, "sym"},   {LRQ_MODE_SYM, 2, "sym"},   {LRQ_MODE_SYM, 3, "sym"},   {LRQ_MODE_SYM, 4, "sym"},
        {LRQ_MODE_TERNARY, 2, "ternary"},
    };
    static const int groups[] = {32, 64, 128, 256};
    static const int toks[]   = {1, 5};
    int dotprod = 0;
#ifdef __ARM_FEATURE_DOTPROD
    dotprod = 1;
#endif
    printf("simd=%s dotprod=%d\n", lrq_kernels_simd(), dotprod);

    // n_in = 416 = 13 blocks: a partial last group for g = 64, 128, 256; n_out = 37: not a
    // multiple of the 16-row block nor of the 4-float vector.
    const int64_t n_in = 416, n_out = 37;
    int           n_case = 0, n_pass = 0, k = 0;
    char          tag[200];
    for (size_t i = 0; i < sizeof mb / sizeof mb[0]; ++i) {
        for (size_t g = 0; g < sizeof groups / sizeof groups[0]; ++g) {
            for (size_t t = 0; t < sizeof toks / sizeof toks[0]; ++t) {
                for (int rk = 0; rk < N_REP; ++rk, ++k) {
                    const act_setting act = acts[k % (int) (sizeof acts / sizeof acts[0])];
                    snprintf(tag, sizeof tag, "bits=%d mode=%s group=%d n_tok=%d replica=%s act=(%g,%d)", mb[i].bits,
                             mb[i].name, groups[g], toks[t], rep_name[rk], act.clip, act.bits);
                    n_pass += run_case(n_in, n_out, mb[i].bits, mb[i].mode, groups[g], toks[t], rk, act, tag, 0);
                    ++n_case;
                }
            }
        }
    }
    // more than 1024 groups: the kernel's scratch for the row factors comes from the heap
    for (int b = 1; b <= 4; ++b) {
        snprintf(tag, sizeof tag, "bits=%d mode=sym group=32 n_tok=5 replica=per-group act=(1,0) n_in=33024 (heap scratch)", b);
        n_pass += run_case(33024, 5, b, LRQ_MODE_SYM, 32, 5, REP_GROUP, acts[0], tag, 0);
        ++n_case;
    }
    // the two-level layout (format v4): sub-blocks of 16 and 32 under every super-block size
    for (int sb = 16; sb <= 32; sb *= 2) {
        for (size_t g = 0; g < sizeof groups / sizeof groups[0]; ++g) {
            for (size_t t = 0; t < sizeof toks / sizeof toks[0]; ++t) {
                for (int rk = 0; rk < N_REP; ++rk, ++k) {
                    const act_setting act = acts[k % (int) (sizeof acts / sizeof acts[0])];
                    snprintf(tag, sizeof tag, "two-level sub=%d super=%d n_tok=%d replica=%s act=(%g,%d)", sb,
                             groups[g], toks[t], rep_name[rk], act.clip, act.bits);
                    n_pass += run_case(n_in, n_out, 2, LRQ_MODE_ASYM, groups[g], toks[t], rk, act, tag, sb);
                    ++n_case;
                }
            }
        }
    }
    snprintf(tag, sizeof tag, "two-level sub=16 super=256 n_tok=5 replica=per-group act=(1,0) n_in=33024 (heap scratch)");
    n_pass += run_case(33024, 5, 2, LRQ_MODE_ASYM, 256, 5, REP_GROUP, acts[0], tag, 16);
    ++n_case;
    printf("%d/%d cases passed\n", n_pass, n_case);
    return n_pass == n_case ? 0 : 1;
}
