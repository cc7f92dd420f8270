// lrq kernels: the AVX2 + FMA + F16C mat-mul of the fast path (compiled with -mavx2 -mfma -mf16c
// as a source property; only called after a run-time CPU check, so the rest of the library and
// of the build stays portable).  Numerics as lrq_mul_mat_q8_generic (q8.c): the integer dot of
// each 32-weight block is exact, only the float summation order differs.
#include "lrq-impl.h"

#ifdef LRQ_HAVE_AVX2_KERNEL

#include <immintrin.h>
#include <math.h>
#include <stdlib.h>

#define LRQ_INLINE static inline __attribute__((always_inline))

// 32 codes of one block -> 32 unsigned bytes, position j = weight j (planar layout, FORMAT.md 4).
LRQ_INLINE __m256i unpack1(const uint8_t * p) {
    // weight 4l + k is bit l of byte k: broadcast the 4 bytes, shift 32-bit lane l right by l
    uint32_t v;
    memcpy(&v, p, 4);
    const __m256i s = _mm256_srlv_epi32(_mm256_set1_epi32((int) v), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_and_si256(s, _mm256_set1_epi8(1));
}

LRQ_INLINE __m256i unpack2(const uint8_t * p) {
    // weight 8l + k is bits 2l..2l+1 of byte k: broadcast the 8 bytes, shift 64-bit lane l by 2l
    uint64_t v;
    memcpy(&v, p, 8);
    const __m256i s = _mm256_srlv_epi64(_mm256_set1_epi64x((long long) v), _mm256_setr_epi64x(0, 2, 4, 6));
    return _mm256_and_si256(s, _mm256_set1_epi8(3));
}

LRQ_INLINE __m256i unpack4(const uint8_t * p) {
    // weights 0..15 are the low nibbles of the 16 bytes, 16..31 the high nibbles (q4_0 layout)
    const __m128i v  = _mm_loadu_si128((const __m128i *) p);
    const __m256i vv = _mm256_inserti128_si256(_mm256_castsi128_si256(v), _mm_srli_epi16(v, 4), 1);
    return _mm256_and_si256(vv, _mm256_set1_epi8(15));
}

LRQ_INLINE __m256i unpack_block(const uint8_t * p, int bits) {
    switch (bits) {
        case 1:  return unpack1(p);
        case 2:  return unpack2(p);
        case 3:  return _mm256_or_si256(unpack2(p), _mm256_slli_epi16(unpack1(p + 8), 2));   // 0/1 bytes: no carry
        default: return unpack4(p);
    }
}

// 8 int32 partial sums of q . xq (q unsigned <= 15, xq signed int8: maddubs cannot saturate,
// 2 * 15 * 127 < 32767), as float.
LRQ_INLINE __m256 dot_block(__m256i q, const int8_t * xq) {
    const __m256i x   = _mm256_loadu_si256((const __m256i *) xq);
    const __m256i p16 = _mm256_maddubs_epi16(q, x);
    const __m256i p32 = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
    return _mm256_cvtepi32_ps(p32);
}

LRQ_INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s        = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s        = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// 8 consecutive fp16 parameters (n <= 8 of them) with an element stride (0 = broadcast) as floats.
LRQ_INLINE __m256 load8_h(const uint16_t * p, int64_t stride, int n) {
    if (stride == 1 && n == 8) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) p));
    if (stride == 0) return _mm256_set1_ps(_cvtsh_ss(p[0]));
    float f[8] = {0};
    for (int k = 0; k < n; ++k) f[k] = _cvtsh_ss(p[k * stride]);
    return _mm256_loadu_ps(f);
}

// Per-group factors of row o, 8 groups per step: ad = alpha * d, off = ad * (beta - z) + m.
// (Done per row rather than per group inside the dot loop: scalar fp16 conversions per group
// cost as much as the 32-weight block dots of g = 64.)
LRQ_INLINE void row_factors(const lrq_weight * w, const lrq_replica * r, int64_t o, int64_t ng, float z,
                            float * ad, float * off) {
    for (int64_t G = 0; G < ng; G += 8) {
        const int n = (int) (ng - G < 8 ? ng - G : 8);
        __m256    d = load8_h(w->d + o * w->d_row_stride + G, 1, n);
        if (r && r->alpha) {
            d = _mm256_mul_ps(d, load8_h(r->alpha + o * r->alpha_row_stride + G * r->alpha_group_stride,
                                         r->alpha_group_stride, n));
        }
        __m256 lv = _mm256_set1_ps(-z);
        if (r && r->beta) {
            lv = _mm256_add_ps(lv, load8_h(r->beta + o * r->beta_row_stride + G * r->beta_group_stride,
                                           r->beta_group_stride, n));
        }
        __m256 c = _mm256_mul_ps(d, lv);
        if (w->m) c = _mm256_add_ps(c, load8_h(w->m + o * w->m_row_stride + G, 1, n));
        _mm256_storeu_ps(ad + G, d);       // ad / off have room for ng rounded up to 8
        _mm256_storeu_ps(off + G, c);
    }
}

// sum_G off[G] * sx[G]
LRQ_INLINE float offset_dot(const float * off, const float * sx, int64_t ng) {
    __m256  acc = _mm256_setzero_ps();
    int64_t G   = 0;
    for (; G + 8 <= ng; G += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(off + G), _mm256_loadu_ps(sx + G), acc);
    float s = hsum(acc);
    for (; G < ng; ++G) s += off[G] * sx[G];
    return s;
}

// One row o, NT consecutive tokens from t0 (NT and BITS are constants after inlining, so the NT
// accumulators live in registers and the unpack is branch-free).  ad / off: scratch of
// ng rounded up to 8 floats each.
//   y[t0 + tt, o - row0] = gain[o] * sum_G (ad * sum_b dx_b (q_b . xq_b) + off * Sx_G) + bias[o]
LRQ_INLINE void row_tokens(const lrq_weight * w, const lrq_replica * r, const lrq_act_q8 * a, float * y,
                           int64_t y_stride, int64_t row0, int64_t o, int64_t t0, float * ad, float * off,
                           const int NT, const int BITS) {
    const int64_t   n_in = w->n_in, nb = n_in / LRQ_QK, ng = lrq_n_groups(n_in, w->group_size);
    const int       bpg  = w->group_size / LRQ_QK;
    const uint8_t * p    = w->codes + (size_t) o * w->codes_row_bytes;
    const int8_t *  xq[LRQ_TOK_BLOCK];
    const float *   dx[LRQ_TOK_BLOCK];
    __m256          acc[LRQ_TOK_BLOCK];
    row_factors(w, r, o, ng, lrq_zero_point(BITS, w->mode), ad, off);
    for (int tt = 0; tt < NT; ++tt) {
        xq[tt]  = a->qs + (t0 + tt) * n_in;
        dx[tt]  = a->dx + (t0 + tt) * nb;
        acc[tt] = _mm256_setzero_ps();
    }
    for (int64_t G = 0; G < ng; ++G) {
        __m256        gs[LRQ_TOK_BLOCK];
        const int64_t b1 = (G + 1) * bpg < nb ? (G + 1) * bpg : nb;
        for (int tt = 0; tt < NT; ++tt) gs[tt] = _mm256_setzero_ps();
        for (int64_t b = G * bpg; b < b1; ++b) {
            const __m256i q = unpack_block(p + b * 4 * BITS, BITS);   // decoded once for NT tokens
            for (int tt = 0; tt < NT; ++tt) {
                gs[tt] = _mm256_fmadd_ps(dot_block(q, xq[tt] + b * LRQ_QK), _mm256_broadcast_ss(dx[tt] + b), gs[tt]);
            }
        }
        const __m256 vad = _mm256_broadcast_ss(ad + G);
        for (int tt = 0; tt < NT; ++tt) acc[tt] = _mm256_fmadd_ps(gs[tt], vad, acc[tt]);
    }
    const float gain = (r && r->gain) ? r->gain[o] : 1.0f;
    const float bias = (r && r->bias) ? r->bias[o] : 0.0f;
    for (int tt = 0; tt < NT; ++tt) {
        const float offs = offset_dot(off, a->sx + (t0 + tt) * ng, ng);
        y[(t0 + tt) * y_stride + (o - row0)] = gain * (hsum(acc[tt]) + offs) + bias;
    }
}

// lrq_two_level_row_factors with 8 sub-blocks per step (the scalar version's per-sub-block
// conversions cost as much as the code dots at one token): the same float operations, so the
// same factors.  ad / off: room for n_in / sub_size floats rounded up to 8.
LRQ_INLINE void row_factors_tl(const lrq_weight * w, const lrq_replica * r, int64_t o, float * ad, float * off) {
    const int64_t   nk  = w->n_in / w->sub_size, kps = w->group_size / w->sub_size;
    const uint8_t * sub = w->sub + o * w->sub_row_stride;
    const __m256i   lo4 = _mm256_set1_epi32(15);
    for (int64_t G = 0; G * kps < nk; ++G) {
        float d = _cvtsh_ss(w->d[o * w->d_row_stride + G]);
        if (r && r->alpha) d *= _cvtsh_ss(r->alpha[o * r->alpha_row_stride + G * r->alpha_group_stride]);
        const float beta = (r && r->beta) ? _cvtsh_ss(r->beta[o * r->beta_row_stride + G * r->beta_group_stride]) : 0.0f;
        const float dmin = _cvtsh_ss(w->m[o * w->m_row_stride + G]);
        const int64_t k1 = (G + 1) * kps < nk ? (G + 1) * kps : nk;
        int64_t       k  = G * kps;
        for (; k + 8 <= k1; k += 8) {
            uint64_t u8;
            memcpy(&u8, sub + k, 8);
            const __m256i u  = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long) u8));
            const __m256  sc = _mm256_cvtepi32_ps(_mm256_and_si256(u, lo4));
            const __m256  mn = _mm256_cvtepi32_ps(_mm256_srli_epi32(u, 4));
            const __m256  av = _mm256_mul_ps(_mm256_set1_ps(d), sc);
            _mm256_storeu_ps(ad + k, av);
            _mm256_storeu_ps(off + k, _mm256_sub_ps(_mm256_mul_ps(av, _mm256_set1_ps(beta)),
                                                    _mm256_mul_ps(_mm256_set1_ps(dmin), mn)));
        }
        for (; k < k1; ++k) {
            const float av = d * (float) (sub[k] & 15);
            ad[k]          = av;
            off[k]         = av * beta - dmin * (float) (sub[k] >> 4);
        }
    }
}

// 8 int32 sums of (q . xq) per 4 weights, weighted by the sub-block scale index: lanes 0-3 (the
// block's first 16 weights) by sc_lo, lanes 4-7 by sc_hi, as the int16 multipliers of madd
// (|q xq| pair sums <= 762, times 15 fits easily).  As float.
LRQ_INLINE __m256 dot_block_sc(__m256i q, const int8_t * xq, __m256i scv) {
    const __m256i x   = _mm256_loadu_si256((const __m256i *) xq);
    const __m256i p16 = _mm256_maddubs_epi16(q, x);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, scv));
}

// The two-level layout (LRQ2 codes; sub-blocks of 16 or 32), one row o, NT tokens from t0, as
// llama.cpp's Q2_K kernels do it: the 4-bit scale index multiplies the integer dots, so the float
// work per block is that of LRQ2 and the super-block's d (times alpha) applies once per super-block:
//   y = gain * (sum_G (alpha d)_G sum_{b in G} dx_b sum_k sc_k (q . xq)_k + sum_k off_k Sx_k) + bias
// ad / off: scratch of n_in / B floats rounded up to 8 (ad unused here).
LRQ_INLINE void row_tokens_tl(const lrq_weight * w, const lrq_replica * r, const lrq_act_q8 * a, float * y,
                              int64_t y_stride, int64_t row0, int64_t o, int64_t t0, float * ad, float * off,
                              const int NT) {
    const int64_t   n_in = w->n_in, nb = n_in / LRQ_QK, nk = n_in / w->sub_size;
    const int64_t   bps  = w->group_size / LRQ_QK, ns = (n_in + w->group_size - 1) / w->group_size;
    const int       kpb  = LRQ_QK / w->sub_size;
    const uint8_t * p    = w->codes + (size_t) o * w->codes_row_bytes;
    const uint8_t * sub  = w->sub + o * w->sub_row_stride;
    const int8_t *  xq[LRQ_TOK_BLOCK];
    const float *   dx[LRQ_TOK_BLOCK];
    __m256          acc[LRQ_TOK_BLOCK];
    row_factors_tl(w, r, o, ad, off);
    for (int tt = 0; tt < NT; ++tt) {
        xq[tt]  = a->qs + (t0 + tt) * n_in;
        dx[tt]  = a->dx + (t0 + tt) * nb;
        acc[tt] = _mm256_setzero_ps();
    }
    for (int64_t G = 0; G < ns; ++G) {
        __m256        gs[LRQ_TOK_BLOCK];
        const int64_t b1 = (G + 1) * bps < nb ? (G + 1) * bps : nb;
        for (int tt = 0; tt < NT; ++tt) gs[tt] = _mm256_setzero_ps();
        for (int64_t b = G * bps; b < b1; ++b) {
            const __m256i q   = unpack2(p + b * 8);   // decoded once for NT tokens
            const __m256i scv = _mm256_set_m128i(_mm_set1_epi16((short) (sub[b * kpb + kpb - 1] & 15)),
                                                 _mm_set1_epi16((short) (sub[b * kpb] & 15)));
            for (int tt = 0; tt < NT; ++tt) {
                gs[tt] = _mm256_fmadd_ps(dot_block_sc(q, xq[tt] + b * LRQ_QK, scv), _mm256_broadcast_ss(dx[tt] + b),
                                         gs[tt]);
            }
        }
        float d = _cvtsh_ss(w->d[o * w->d_row_stride + G]);
        if (r && r->alpha) d *= _cvtsh_ss(r->alpha[o * r->alpha_row_stride + G * r->alpha_group_stride]);
        const __m256 vd = _mm256_set1_ps(d);
        for (int tt = 0; tt < NT; ++tt) acc[tt] = _mm256_fmadd_ps(gs[tt], vd, acc[tt]);
    }
    const float gain = (r && r->gain) ? r->gain[o] : 1.0f;
    const float bias = (r && r->bias) ? r->bias[o] : 0.0f;
    for (int tt = 0; tt < NT; ++tt) {
        const float offs = offset_dot(off, a->sx + (t0 + tt) * nk, nk);
        y[(t0 + tt) * y_stride + (o - row0)] = gain * (hsum(acc[tt]) + offs) + bias;
    }
}

// int8 activations of nb blocks of 32 without clipping or act_bits: qs, dx and the integer sums of
// each half block (isum[2b], isum[2b + 1]), the same bytes and scales as quantize_act_token in
// q8.c (the same float operations: amax, amax / 127, 127 / amax, x * id rounded half to even by
// vroundps in the default rounding mode, clamped to +-127).  A block with a NaN or an infinity
// takes that scalar code itself (vcvtps2dq and a C cast disagree on NaN).
void lrq_quantize_blocks_avx2(const float * x, int64_t nb, int8_t * qs, float * dx, int32_t * isum) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < nb; ++b) {
        const float * xb = x + b * LRQ_QK;
        __m256        v[4];
        __m256        mx = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
        for (int k = 0; k < 4; ++k) {
            v[k]          = _mm256_loadu_ps(xb + 8 * k);
            const __m256 a = _mm256_andnot_ps(sign, v[k]);
            mx            = _mm256_max_ps(mx, a);
            bad           = _mm256_or_ps(bad, _mm256_cmp_ps(a, _mm256_set1_ps(3.4028234663852886e38f), _CMP_NLE_UQ));
        }
        int8_t * q = qs + b * LRQ_QK;
        if (!_mm256_testz_ps(bad, bad)) {   // inf or NaN: the scalar code of q8.c, verbatim
            float amax = 0.0f;
            for (int j = 0; j < LRQ_QK; ++j) {
                if (fabsf(xb[j]) > amax) amax = fabsf(xb[j]);
            }
            const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
            int32_t     s0 = 0, s1 = 0;
            for (int j = 0; j < LRQ_QK; ++j) {
                float r = nearbyintf(xb[j] * id);
                if (r > 127.0f) r = 127.0f;
                if (r < -127.0f) r = -127.0f;
                q[j] = (int8_t) r;
                *(j < 16 ? &s0 : &s1) += q[j];
            }
            dx[b]           = amax / 127.0f;
            isum[2 * b]     = s0;
            isum[2 * b + 1] = s1;
            continue;
        }
        __m128      m4   = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4               = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4               = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        const float id   = amax > 0.0f ? 127.0f / amax : 0.0f;
        const __m256 vid = _mm256_set1_ps(id), hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
        __m256i      i[4];
        for (int k = 0; k < 4; ++k) {
            __m256 r = _mm256_round_ps(_mm256_mul_ps(v[k], vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            r        = _mm256_max_ps(_mm256_min_ps(r, hi), lo);
            i[k]     = _mm256_cvtps_epi32(r);
        }
        // packs interleave the 128-bit lanes: 0..3 8..11 4..7 12..15 (16-bit), then per 32 bits
        const __m256i p16 = _mm256_packs_epi32(i[0], i[1]), p16b = _mm256_packs_epi32(i[2], i[3]);
        __m256i       p8  = _mm256_packs_epi16(p16, p16b);
        p8                = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *) q, p8);
        // sums of the signed bytes per 4, then per half block
        const __m256i s32 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), p8), _mm256_set1_epi16(1));
        __m128i       h0  = _mm256_castsi256_si128(s32), h1 = _mm256_extracti128_si256(s32, 1);
        h0                = _mm_hadd_epi32(h0, h1);
        h0                = _mm_hadd_epi32(h0, h0);
        dx[b]             = amax / 127.0f;
        isum[2 * b]       = _mm_cvtsi128_si32(h0);
        isum[2 * b + 1]   = _mm_extract_epi32(h0, 1);
    }
}

// shape: y[t, o - row0] = act_r(x)[t, :] . W_r[o, :] + bias[o], t < a->n_tok, row0 <= o < row1
// (arguments checked by lrq_mul_mat_q8)
LRQ_DEFINE_Q8_KERNEL(lrq_mul_mat_q8_avx2, 8)

#endif  // LRQ_HAVE_AVX2_KERNEL
