// lrq kernels: helpers shared by the .c files of native/lrq (not a public header).
#pragma once

#include "lrq-kernels.h"

#include <string.h>

// fp16 bits -> float, exact (also used in hot loops of the generic path, hence inline).
static inline float lrq_h2f(uint16_t h) {
    const uint32_t sign = (uint32_t) (h & 0x8000u) << 16;
    const uint32_t exp  = (h >> 10) & 0x1fu;
    uint32_t       mant = h & 0x3ffu;
    uint32_t       bits;
    if (exp == 0x1fu) {                     // inf / NaN (payload kept, as numpy does)
        bits = sign | 0x7f800000u | (mant << 13);
    } else if (exp != 0) {                  // normal: rebias 15 -> 127
        bits = sign | ((exp + 112u) << 23) | (mant << 13);
    } else if (mant == 0) {                 // signed zero
        bits = sign;
    } else {                                // subnormal: mant * 2^-24, normalise
        uint32_t e = 113;                   // exponent of 2^-14, decremented while shifting
        while (!(mant & 0x400u)) {
            mant <<= 1;
            --e;
        }
        bits = sign | (e << 23) | ((mant & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

// Unpack one block of 32 codes (4*bits bytes) into q[32] (planar layout of FORMAT.md 4).
static inline void lrq_unpack_block(const uint8_t * p, int bits, uint8_t * q) {
    switch (bits) {
        case 1:
            for (int j = 0; j < 32; ++j) q[j] = (p[j % 4] >> (j / 4)) & 1;
            break;
        case 2:
            for (int j = 0; j < 32; ++j) q[j] = (p[j % 8] >> (2 * (j / 8))) & 3;
            break;
        case 3:
            for (int j = 0; j < 32; ++j) {
                q[j] = (uint8_t) (((p[j % 8] >> (2 * (j / 8))) & 3) | (((p[8 + j % 4] >> (j / 4)) & 1) << 2));
            }
            break;
        default:   // 4
            for (int j = 0; j < 32; ++j) q[j] = (p[j % 16] >> (4 * (j / 16))) & 15;
            break;
    }
}

// Per-(row, group) factors of the fast path: ad = alpha * d, off = ad * (beta - z) + m.
static inline void lrq_group_factors(const lrq_weight * w, const lrq_replica * r, int64_t o, int64_t G,
                                     float z, float * ad, float * off) {
    float d = lrq_h2f(w->d[o * w->d_row_stride + G]);
    if (r && r->alpha) d *= lrq_h2f(r->alpha[o * r->alpha_row_stride + G * r->alpha_group_stride]);
    float lv = -z;
    if (r && r->beta) lv += lrq_h2f(r->beta[o * r->beta_row_stride + G * r->beta_group_stride]);
    float c = d * lv;
    if (w->m) c += lrq_h2f(w->m[o * w->m_row_stride + G]);
    *ad  = d;
    *off = c;
}

// Per-sub-block factors of row o of a two-level weight (every kernel uses these, so they agree):
//   ad_k = (d_G alpha_G) sc_k,   off_k = ad_k beta_G - dmin_G mn_k    (G the super-block of k)
// ad / off: room for n_in / sub_size floats.
static inline void lrq_two_level_row_factors(const lrq_weight * w, const lrq_replica * r, int64_t o, float * ad,
                                             float * off) {
    const int64_t   nk  = w->n_in / w->sub_size, kps = w->group_size / w->sub_size;
    const uint8_t * sub = w->sub + o * w->sub_row_stride;
    for (int64_t G = 0; G * kps < nk; ++G) {
        float d = lrq_h2f(w->d[o * w->d_row_stride + G]);
        if (r && r->alpha) d *= lrq_h2f(r->alpha[o * r->alpha_row_stride + G * r->alpha_group_stride]);
        const float beta = (r && r->beta) ? lrq_h2f(r->beta[o * r->beta_row_stride + G * r->beta_group_stride]) : 0.0f;
        const float dmin = lrq_h2f(w->m[o * w->m_row_stride + G]);
        for (int64_t k = G * kps; k < nk && k < (G + 1) * kps; ++k) {
            const float a = d * (float) (sub[k] & 15);
            ad[k]         = a;
            off[k]        = a * beta - dmin * (float) (sub[k] >> 4);
        }
    }
}

// The AVX2 kernel (q8-avx2.c); only compiled for x86-64 with a GCC-compatible compiler
// (-DLRQ_NO_AVX2 builds the portable code alone, e.g. to test it).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(LRQ_NO_AVX2)
#define LRQ_HAVE_AVX2_KERNEL 1
int lrq_mul_mat_q8_avx2(const lrq_weight * w, const lrq_replica * r, const lrq_act_q8 * a,
                        float * y, int64_t y_stride, int64_t row0, int64_t row1);
// int8 activations (no clip, no act_bits) of nb blocks: qs, dx and half-block sums isum[2 nb].
void lrq_quantize_blocks_avx2(const float * x, int64_t nb, int8_t * qs, float * dx, int32_t * isum);
#endif

// The AVX-512 VNNI kernel for LRQ2 and two-level weights (q8-avx512.c), selected at run time by q8.c.
// Only where the build compiles that file with its flags and says so (CMake defines
// LRQ_WITH_AVX512 for lrq_kernels): builds that list the sources themselves keep AVX2.
#if defined(LRQ_HAVE_AVX2_KERNEL) && defined(LRQ_WITH_AVX512)
#define LRQ_HAVE_AVX512_KERNEL 1
int lrq_mul_mat_q8_avx512(const lrq_weight * w, const lrq_replica * r, const lrq_act_q8 * a,
                          float * y, int64_t y_stride, int64_t row0, int64_t row1);
int lrq_mul_mat_q8_avx512_multi(const lrq_weight * w, int n, const lrq_replica * const * r, const lrq_act_q8 * a,
                                float * const * y, int64_t y_stride, int64_t row0, int64_t row1);
#endif

// The NEON kernel (q8-neon.c); aarch64 only, where NEON is baseline (no run-time check).
// -DLRQ_NO_NEON builds the portable code alone.
#if defined(__ARM_NEON) && defined(__aarch64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(LRQ_NO_NEON)
#define LRQ_HAVE_NEON_KERNEL 1
int lrq_mul_mat_q8_neon(const lrq_weight * w, const lrq_replica * r, const lrq_act_q8 * a,
                        float * y, int64_t y_stride, int64_t row0, int64_t row1);
#endif

// Row / token blocking of the fast path: 16 rows of codes stay in L1/L2 while every token block
// passes over them; 4 tokens share one decode of each 32-weight block (4 accumulators).
#define LRQ_ROW_BLOCK 16
#define LRQ_TOK_BLOCK 4

// The row-block x token-block loop and the entry point shared by the SIMD kernels: each kernel
// file defines its own row_tokens(w, r, a, y, y_stride, row0, o, t0, ad, off, NT, BITS), then
// LRQ_DEFINE_Q8_KERNEL(name, PAD) (PAD: its vector width in floats, for the scratch buffers).
#define LRQ_DEFINE_ROWS(BITS)                                                                          \
    static void rows_b##BITS(const lrq_weight * w, const lrq_replica * r, const lrq_act_q8 * a, float * y, \
                             int64_t y_stride, int64_t row0, int64_t row1, float * ad, float * off) {  \
        for (int64_t o0 = row0; o0 < row1; o0 += LRQ_ROW_BLOCK) {                                      \
            const int64_t o1 = o0 + LRQ_ROW_BLOCK < row1 ? o0 + LRQ_ROW_BLOCK : row1;                  \
            int64_t       t0 = 0;                                                                      \
            for (; t0 + LRQ_TOK_BLOCK <= a->n_tok; t0 += LRQ_TOK_BLOCK) {                              \
                for (int64_t o = o0; o < o1; ++o) {                                                    \
                    row_tokens(w, r, a, y, y_stride, row0, o, t0, ad, off, LRQ_TOK_BLOCK, BITS);       \
                }                                                                                      \
            }                                                                                          \
            for (; t0 < a->n_tok; ++t0) {                                                              \
                for (int64_t o = o0; o < o1; ++o) row_tokens(w, r, a, y, y_stride, row0, o, t0, ad, off, 1, BITS); \
            }                                                                                          \
        }                                                                                              \
    }

// Two-level rows: each kernel file also defines row_tokens_tl(w, r, a, y, y_stride, row0, o, t0, ad, off, NT).
#define LRQ_DEFINE_ROWS_TL()                                                                           \
    static void rows_tl(const lrq_weight * w, const lrq_replica * r, const lrq_act_q8 * a, float * y,   \
                        int64_t y_stride, int64_t row0, int64_t row1, float * ad, float * off) {       \
        for (int64_t o0 = row0; o0 < row1; o0 += LRQ_ROW_BLOCK) {                                      \
            const int64_t o1 = o0 + LRQ_ROW_BLOCK < row1 ? o0 + LRQ_ROW_BLOCK : row1;                  \
            int64_t       t0 = 0;                                                                      \
            for (; t0 + LRQ_TOK_BLOCK <= a->n_tok; t0 += LRQ_TOK_BLOCK) {                              \
                for (int64_t o = o0; o < o1; ++o) {                                                    \
                    row_tokens_tl(w, r, a, y, y_stride, row0, o, t0, ad, off, LRQ_TOK_BLOCK);          \
                }                                                                                      \
            }                                                                                          \
            for (; t0 < a->n_tok; ++t0) {                                                              \
                for (int64_t o = o0; o < o1; ++o) row_tokens_tl(w, r, a, y, y_stride, row0, o, t0, ad, off, 1); \
            }                                                                                          \
        }                                                                                              \
    }

#define LRQ_DEFINE_Q8_KERNEL(NAME, PAD)                                                               \
    LRQ_DEFINE_ROWS_TL()                                                                               \
    LRQ_DEFINE_ROWS(1)                                                                                 \
    LRQ_DEFINE_ROWS(2)                                                                                 \
    LRQ_DEFINE_ROWS(3)                                                                                 \
    LRQ_DEFINE_ROWS(4)                                                                                 \
    int NAME(const lrq_weight * w, const lrq_replica * r, const lrq_act_q8 * a, float * y,             \
             int64_t y_stride, int64_t row0, int64_t row1) {                                           \
        const int64_t ngp = (lrq_factor_groups(w) + (PAD) - 1) / (PAD) * (PAD);                         \
        float         stack_buf[2 * 1024]; /* up to 1024 groups (n_in 32768 at g = 32) without malloc */ \
        float *       buf = ngp <= 1024 ? stack_buf : (float *) malloc((size_t) (2 * ngp) * sizeof(float)); \
        if (!buf) return LRQ_ERR_NOMEM;                                                                \
        float * ad = buf, * off = buf + ngp;                                                           \
        if (w->sub) {                                                                                  \
            rows_tl(w, r, a, y, y_stride, row0, row1, ad, off);                                        \
            if (buf != stack_buf) free(buf);                                                           \
            return LRQ_OK;                                                                             \
        }                                                                                              \
        switch (w->bits) {                                                                             \
            case 1:  rows_b1(w, r, a, y, y_stride, row0, row1, ad, off); break;                        \
            case 2:  rows_b2(w, r, a, y, y_stride, row0, row1, ad, off); break;                        \
            case 3:  rows_b3(w, r, a, y, y_stride, row0, row1, ad, off); break;                        \
            default: rows_b4(w, r, a, y, y_stride, row0, row1, ad, off); break;                        \
        }                                                                                              \
        if (buf != stack_buf) free(buf);                                                               \
        return LRQ_OK;                                                                                 \
    }

