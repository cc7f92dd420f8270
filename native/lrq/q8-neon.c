// lrq kernels: the NEON mat-mul of the fast path for aarch64 (NEON is part of the base ISA there,
// so no run-time check and no special compile flags; compiles to nothing on other targets).
// The 32-weight block dots use vdotq_s32 when the compiler targets the dot-product extension
// (__ARM_FEATURE_DOTPROD, e.g. -march=armv8.2-a+dotprod), else widening vmull_s8 + vpadalq_s16.
// Numerics as lrq_mul_mat_q8_generic (q8.c): the integer dot of each block is exact, only the
// float summation order differs.  Structure as q8-avx2.c (row factors once per row, NT tokens
// per decode of a block).
#include "lrq-impl.h"

#ifdef LRQ_HAVE_NEON_KERNEL

#include <arm_neon.h>
#include <stdlib.h>

#define LRQ_INLINE static inline __attribute__((always_inline))

// 32 codes of one block as two vectors of 16 unsigned bytes: lo = weights 0..15, hi = 16..31
// (planar layout, FORMAT.md 4).
typedef struct { uint8x16_t lo, hi; } q32;

LRQ_INLINE q32 unpack1(const uint8_t * p) {
    // weight 4l + k is bit l of byte k: the 4 bytes repeated, byte j shifted right by j / 4
    uint32_t v;
    memcpy(&v, p, 4);
    const uint8x16_t rep    = vreinterpretq_u8_u32(vdupq_n_u32(v));
    static const int8_t sl[16] = {0, 0, 0, 0, -1, -1, -1, -1, -2, -2, -2, -2, -3, -3, -3, -3};
    static const int8_t sh[16] = {-4, -4, -4, -4, -5, -5, -5, -5, -6, -6, -6, -6, -7, -7, -7, -7};
    const uint8x16_t one = vdupq_n_u8(1);
    q32              q;
    q.lo = vandq_u8(vshlq_u8(rep, vld1q_s8(sl)), one);
    q.hi = vandq_u8(vshlq_u8(rep, vld1q_s8(sh)), one);
    return q;
}

LRQ_INLINE q32 unpack2(const uint8_t * p) {
    // weight 8l + k is bits 2l..2l+1 of byte k
    const uint8x8_t v     = vld1_u8(p);
    const uint8x8_t three = vdup_n_u8(3);
    q32             q;
    q.lo = vcombine_u8(vand_u8(v, three), vand_u8(vshr_n_u8(v, 2), three));
    q.hi = vcombine_u8(vand_u8(vshr_n_u8(v, 4), three), vshr_n_u8(v, 6));
    return q;
}

LRQ_INLINE q32 unpack4(const uint8_t * p) {
    // weights 0..15 are the low nibbles of the 16 bytes, 16..31 the high nibbles (q4_0 layout)
    const uint8x16_t v = vld1q_u8(p);
    q32              q;
    q.lo = vandq_u8(v, vdupq_n_u8(15));
    q.hi = vshrq_n_u8(v, 4);
    return q;
}

LRQ_INLINE q32 unpack_block(const uint8_t * p, int bits) {
    switch (bits) {
        case 1:  return unpack1(p);
        case 2:  return unpack2(p);
        case 3: {
            q32       q  = unpack2(p);
            const q32 h  = unpack1(p + 8);
            q.lo         = vorrq_u8(q.lo, vshlq_n_u8(h.lo, 2));
            q.hi         = vorrq_u8(q.hi, vshlq_n_u8(h.hi, 2));
            return q;
        }
        default: return unpack4(p);
    }
}

// 4 int32 partial sums of q . xq (codes <= 15 read as int8, xq int8) as float.  The products
// (|.| <= 15 * 127) and their sums are exact in int16 / int32.
LRQ_INLINE float32x4_t dot_block(q32 q, const int8_t * xq) {
    const int8x16_t xl = vld1q_s8(xq), xh = vld1q_s8(xq + 16);
    const int8x16_t ql = vreinterpretq_s8_u8(q.lo), qh = vreinterpretq_s8_u8(q.hi);
#ifdef __ARM_FEATURE_DOTPROD
    int32x4_t s = vdotq_s32(vdupq_n_s32(0), ql, xl);
    s           = vdotq_s32(s, qh, xh);
#else
    int32x4_t s = vpaddlq_s16(vmull_s8(vget_low_s8(ql), vget_low_s8(xl)));
    s           = vpadalq_s16(s, vmull_high_s8(ql, xl));
    s           = vpadalq_s16(s, vmull_s8(vget_low_s8(qh), vget_low_s8(xh)));
    s           = vpadalq_s16(s, vmull_high_s8(qh, xh));
#endif
    return vcvtq_f32_s32(s);
}

// 4 consecutive fp16 parameters (n <= 4 of them) with an element stride (0 = broadcast) as floats.
LRQ_INLINE float32x4_t load4_h(const uint16_t * p, int64_t stride, int n) {
    if (stride == 1 && n == 4) return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)));
    if (stride == 0) return vdupq_n_f32(lrq_h2f(p[0]));
    float f[4] = {0};
    for (int k = 0; k < n; ++k) f[k] = lrq_h2f(p[k * stride]);
    return vld1q_f32(f);
}

// Per-group factors of row o, 4 groups per step: ad = alpha * d, off = ad * (beta - z) + m
// (separate multiply and add, as lrq_group_factors).
LRQ_INLINE void row_factors(const lrq_weight * w, const lrq_replica * r, int64_t o, int64_t ng, float z,
                            float * ad, float * off) {
    for (int64_t G = 0; G < ng; G += 4) {
        const int   n = (int) (ng - G < 4 ? ng - G : 4);
        float32x4_t d = load4_h(w->d + o * w->d_row_stride + G, 1, n);
        if (r && r->alpha) {
            d = vmulq_f32(d, load4_h(r->alpha + o * r->alpha_row_stride + G * r->alpha_group_stride,
                                     r->alpha_group_stride, n));
        }
        float32x4_t lv = vdupq_n_f32(-z);
        if (r && r->beta) {
            lv = vaddq_f32(lv, load4_h(r->beta + o * r->beta_row_stride + G * r->beta_group_stride,
                                       r->beta_group_stride, n));
        }
        float32x4_t c = vmulq_f32(d, lv);
        if (w->m) c = vaddq_f32(c, load4_h(w->m + o * w->m_row_stride + G, 1, n));
        vst1q_f32(ad + G, d);       // ad / off have room for ng rounded up to 4
        vst1q_f32(off + G, c);
    }
}

// sum_G off[G] * sx[G]
LRQ_INLINE float offset_dot(const float * off, const float * sx, int64_t ng) {
    float32x4_t acc = vdupq_n_f32(0.0f);
    int64_t     G   = 0;
    for (; G + 4 <= ng; G += 4) acc = vfmaq_f32(acc, vld1q_f32(off + G), vld1q_f32(sx + G));
    float s = vaddvq_f32(acc);
    for (; G < ng; ++G) s += off[G] * sx[G];
    return s;
}

// One row o, NT consecutive tokens from t0 (NT and BITS are constants after inlining).
//   y[t0 + tt, o - row0] = gain[o] * sum_G (ad * sum_b dx_b (q_b . xq_b) + off * Sx_G) + bias[o]
LRQ_INLINE void row_tokens(const lrq_weight * w, const lrq_replica * r, const lrq_act_q8 * a, float * y,
                           int64_t y_stride, int64_t row0, int64_t o, int64_t t0, float * ad, float * off,
                           const int NT, const int BITS) {
    const int64_t   n_in = w->n_in, nb = n_in / LRQ_QK, ng = lrq_n_groups(n_in, w->group_size);
    const int       bpg  = w->group_size / LRQ_QK;
    const uint8_t * p    = w->codes + (size_t) o * w->codes_row_bytes;
    const int8_t *  xq[LRQ_TOK_BLOCK];
    const float *   dx[LRQ_TOK_BLOCK];
    float32x4_t     acc[LRQ_TOK_BLOCK];
    row_factors(w, r, o, ng, lrq_zero_point(BITS, w->mode), ad, off);
    for (int tt = 0; tt < NT; ++tt) {
        xq[tt]  = a->qs + (t0 + tt) * n_in;
        dx[tt]  = a->dx + (t0 + tt) * nb;
        acc[tt] = vdupq_n_f32(0.0f);
    }
    for (int64_t G = 0; G < ng; ++G) {
        float32x4_t   gs[LRQ_TOK_BLOCK];
        const int64_t b1 = (G + 1) * bpg < nb ? (G + 1) * bpg : nb;
        for (int tt = 0; tt < NT; ++tt) gs[tt] = vdupq_n_f32(0.0f);
        for (int64_t b = G * bpg; b < b1; ++b) {
            const q32 q = unpack_block(p + b * 4 * BITS, BITS);   // decoded once for NT tokens
            for (int tt = 0; tt < NT; ++tt) gs[tt] = vfmaq_n_f32(gs[tt], dot_block(q, xq[tt] + b * LRQ_QK), dx[tt][b]);
        }
        for (int tt = 0; tt < NT; ++tt) acc[tt] = vfmaq_n_f32(acc[tt], gs[tt], ad[G]);
    }
    const float gain = (r && r->gain) ? r->gain[o] : 1.0f;
    const float bias = (r && r->bias) ? r->bias[o] : 0.0f;
    for (int tt = 0; tt < NT; ++tt) {
        const float offs = offset_dot(off, a->sx + (t0 + tt) * ng, ng);
        y[(t0 + tt) * y_stride + (o - row0)] = gain * (vaddvq_f32(acc[tt]) + offs) + bias;
    }
}

// 4 int32 partial sums of 16 codes . 16 int8 activations (half a block).
LRQ_INLINE int32x4_t dot_half(uint8x16_t q, const int8_t * xq) {
    const int8x16_t x  = vld1q_s8(xq);
    const int8x16_t qs = vreinterpretq_s8_u8(q);
#ifdef __ARM_FEATURE_DOTPROD
    return vdotq_s32(vdupq_n_s32(0), qs, x);
#else
    const int32x4_t s = vpaddlq_s16(vmull_s8(vget_low_s8(qs), vget_low_s8(x)));
    return vpadalq_s16(s, vmull_high_s8(qs, x));
#endif
}

// The two-level layout (LRQ2 codes; sub-blocks of 16 or 32), one row o, NT tokens from t0, as
// q8-avx2.c does it: the 4-bit scale index multiplies the integer dots of the block's halves,
// the super-block's d (times alpha) applies once per super-block:
//   y = gain * (sum_G (alpha d)_G sum_{b in G} dx_b (sc_lo (q . xq)_{0..15} + sc_hi (q . xq)_{16..31})
//               + sum_k off_k Sx_k) + bias
// (sc_lo == sc_hi for 32-weight sub-blocks).  ad / off: scratch of n_in / B floats (ad unused).
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
    float32x4_t     acc[LRQ_TOK_BLOCK];
    lrq_two_level_row_factors(w, r, o, ad, off);
    for (int tt = 0; tt < NT; ++tt) {
        xq[tt]  = a->qs + (t0 + tt) * n_in;
        dx[tt]  = a->dx + (t0 + tt) * nb;
        acc[tt] = vdupq_n_f32(0.0f);
    }
    for (int64_t G = 0; G < ns; ++G) {
        float32x4_t   gs[LRQ_TOK_BLOCK];
        const int64_t b1 = (G + 1) * bps < nb ? (G + 1) * bps : nb;
        for (int tt = 0; tt < NT; ++tt) gs[tt] = vdupq_n_f32(0.0f);
        for (int64_t b = G * bps; b < b1; ++b) {
            const q32     q  = unpack2(p + b * 8);   // decoded once for NT tokens
            const int32_t lo = sub[b * kpb] & 15, hi = sub[b * kpb + kpb - 1] & 15;
            for (int tt = 0; tt < NT; ++tt) {
                const int32x4_t s = vmlaq_n_s32(vmulq_n_s32(dot_half(q.lo, xq[tt] + b * LRQ_QK), lo),
                                                dot_half(q.hi, xq[tt] + b * LRQ_QK + 16), hi);
                gs[tt] = vfmaq_n_f32(gs[tt], vcvtq_f32_s32(s), dx[tt][b]);
            }
        }
        float d = lrq_h2f(w->d[o * w->d_row_stride + G]);
        if (r && r->alpha) d *= lrq_h2f(r->alpha[o * r->alpha_row_stride + G * r->alpha_group_stride]);
        for (int tt = 0; tt < NT; ++tt) acc[tt] = vfmaq_n_f32(acc[tt], gs[tt], d);
    }
    const float gain = (r && r->gain) ? r->gain[o] : 1.0f;
    const float bias = (r && r->bias) ? r->bias[o] : 0.0f;
    for (int tt = 0; tt < NT; ++tt) {
        const float offs = offset_dot(off, a->sx + (t0 + tt) * nk, nk);
        y[(t0 + tt) * y_stride + (o - row0)] = gain * (vaddvq_f32(acc[tt]) + offs) + bias;
    }
}

// shape: y[t, o - row0] = act_r(x)[t, :] . W_r[o, :] + bias[o], t < a->n_tok, row0 <= o < row1
// (arguments checked by lrq_mul_mat_q8)
LRQ_DEFINE_Q8_KERNEL(lrq_mul_mat_q8_neon, 4)

#endif  // LRQ_HAVE_NEON_KERNEL
