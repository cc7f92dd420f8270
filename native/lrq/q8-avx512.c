// lrq kernels: the AVX-512 VNNI mat-mul of the fast path for LRQ2 (the 2-bit layout of the
// decode-speed target) and the two-level 2-bit layout (the same codes), compiled with -mavx512f
// -mavx512bw -mavx512vl -mavx512dq -mavx512vnni as a source property and only called after a
// run-time CPU check (q8.c); other layouts stay on AVX2.
//
// The AVX2 kernel works row by row: per 32 weights of one row it unpacks, dots, sums the 8 int32
// partials' floats and applies dx, and none of that is shared between rows, so at one token it is
// bound by vector operations (measured: bench/kernels.py --cpu-time, docs/kernel_speed.md).  Here
// the 16 rows of a row block sit in the 16 int32 lanes: vpdpbusd multiplies 4 codes of every row
// by the same 4 activations (a broadcast), each block's integer dot ends in its row's lane without
// a horizontal sum, and the conversion and float work per block is one operation for 16 rows.  The
// codes are brought into that layout in registers: 64 bytes (8 blocks) of each of the 16 rows, a
// 16 x 16 transpose of 32-bit words, so that word j of every row sits in one vector; the
// transposed codes serve up to 4 tokens, of one replica or of several (the members of a parallel
// group share the codes: lrq_mul_mat_q8_multi).
//
// Numerics as lrq_mul_mat_q8_generic (q8.c): each block's integer dot q . xq is exact (vpdpbusd
// sums u8 x s8 products in int32 without saturation: |dot| <= 32 * 3 * 127), dx_b multiplies it in
// float32, only the float summation order differs.
// Two-level weights take the same code path (rows16_tl): each sub-block's 4-bit scale index
// multiplies its integer dot (vpmaddwd, exact in int32), the super-block's factor applies in float
// once per super-block.
#include "lrq-impl.h"

#ifdef LRQ_HAVE_AVX512_KERNEL

#include <immintrin.h>
#include <stdlib.h>

#define LRQ_INLINE static inline __attribute__((always_inline))

// 16 consecutive fp16 parameters (n <= 16 of them) with an element stride (0 = broadcast) as floats.
LRQ_INLINE __m512 load16_h(const uint16_t * p, int64_t stride, int n) {
    if (stride == 1 && n == 16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *) p));
    if (stride == 0) return _mm512_set1_ps(_cvtsh_ss(p[0]));
    float f[16] = {0};
    for (int k = 0; k < n; ++k) f[k] = _cvtsh_ss(p[k * stride]);
    return _mm512_loadu_ps(f);
}

// Per-group factors of row o: ad = alpha * d, off = ad * (beta - z) + m, 16 groups per step.
// ad / off: room for ng rounded up to 16.
LRQ_INLINE void row_factors(const lrq_weight * w, const lrq_replica * r, int64_t o, int64_t ng, float z,
                            float * ad, float * off) {
    for (int64_t G = 0; G < ng; G += 16) {
        const int n = (int) (ng - G < 16 ? ng - G : 16);
        __m512    d = load16_h(w->d + o * w->d_row_stride + G, 1, n);
        if (r && r->alpha) {
            d = _mm512_mul_ps(d, load16_h(r->alpha + o * r->alpha_row_stride + G * r->alpha_group_stride,
                                          r->alpha_group_stride, n));
        }
        __m512 lv = _mm512_set1_ps(-z);
        if (r && r->beta) {
            lv = _mm512_add_ps(lv, load16_h(r->beta + o * r->beta_row_stride + G * r->beta_group_stride,
                                            r->beta_group_stride, n));
        }
        __m512 c = _mm512_mul_ps(d, lv);
        if (w->m) c = _mm512_add_ps(c, load16_h(w->m + o * w->m_row_stride + G, 1, n));
        _mm512_storeu_ps(ad + G, d);
        _mm512_storeu_ps(off + G, c);
    }
}

// T[j] lane r = 32-bit word j of T[r] (in place).
LRQ_INLINE void transpose16(__m512i * T) {
    __m512i t[16], u[16];
    for (int q = 0; q < 4; ++q) {
        const __m512i r0 = T[4 * q], r1 = T[4 * q + 1], r2 = T[4 * q + 2], r3 = T[4 * q + 3];
        t[0] = _mm512_unpacklo_epi32(r0, r1);
        t[1] = _mm512_unpackhi_epi32(r0, r1);
        t[2] = _mm512_unpacklo_epi32(r2, r3);
        t[3] = _mm512_unpackhi_epi32(r2, r3);
        u[4 * q]     = _mm512_unpacklo_epi64(t[0], t[2]);   // 128-bit lane L: word 4L + 0 of rows 4q..4q+3
        u[4 * q + 1] = _mm512_unpackhi_epi64(t[0], t[2]);
        u[4 * q + 2] = _mm512_unpacklo_epi64(t[1], t[3]);
        u[4 * q + 3] = _mm512_unpackhi_epi64(t[1], t[3]);
    }
    for (int k = 0; k < 4; ++k) {   // 4 x 4 transpose of 128-bit lanes among u[k], u[4+k], u[8+k], u[12+k]
        const __m512i v0 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0x44), v1 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0xEE);
        const __m512i v2 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0x44);
        const __m512i v3 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0xEE);
        T[k]      = _mm512_shuffle_i32x4(v0, v2, 0x88);   // word 0 * 4 + k of rows 0..15
        T[4 + k]  = _mm512_shuffle_i32x4(v0, v2, 0xDD);
        T[8 + k]  = _mm512_shuffle_i32x4(v1, v3, 0x88);
        T[12 + k] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
    }
}

LRQ_INLINE __m512i bcast4(const int8_t * p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

// The fp16 d and m of groups G0..G0+15 (fewer at the row's end: the count is returned) of rows
// o0..o0+nr-1, row rr's 16 d and 16 m as one vector of 32-bit words (d pairs, then m pairs; m 0
// without m), transposed: T[j] lane rr = (d, d) of groups G0 + 2j, 2j + 1 (j < 8), (m, m) at 8 + j.
LRQ_INLINE int load_dm16(const lrq_weight * w, int64_t o0, int nr, int64_t ng, int64_t G0, __m512i * T) {
    const int       n  = (int) (ng - G0 < 16 ? ng - G0 : 16);
    const __mmask16 mk = (__mmask16) ((1u << n) - 1u);
    for (int rr = 0; rr < 16; ++rr) {
        const __mmask16 mr = rr < nr ? mk : 0;
        const __m256i   dv = _mm256_maskz_loadu_epi16(mr, w->d + (o0 + rr) * w->d_row_stride + G0);
        const __m256i   mv = w->m ? _mm256_maskz_loadu_epi16(mr, w->m + (o0 + rr) * w->m_row_stride + G0)
                                  : _mm256_setzero_si256();
        T[rr] = _mm512_inserti64x4(_mm512_castsi256_si512(dv), mv, 1);
    }
    transpose16(T);
    return n;
}

// The factors of rows o0..o0+15 in the lane layout: adT[G * 16 + rr], offT[G * 16 + rr] (ad, off
// of row o0 + rr, group G; room for 16 * ng rounded up to 16).  Without alpha / beta (replica 0),
// or with them per channel / per tensor (a replica's usual grid offset: one value per lane),
// straight from the fp16 d and m, 16 groups at a time: row rr's 16 d and 16 m as one vector of
// 32-bit words (d pairs, then m pairs), transposed, converted.  With alpha or beta per group:
// row_factors per row into rows (room for 16 rows of ng rounded up to 16), then the same transpose
// of the floats.
static void factors16(const lrq_weight * w, const lrq_replica * r, int64_t o0, int nr, int64_t ng, float z,
                      float * rows, float * adT, float * offT) {
    const int64_t ngp = (ng + 15) / 16 * 16;
    __m512i       T[16];
    // alpha / beta per group: row by row (row_factors), then the transpose of the floats
    if (r && ((r->alpha && r->alpha_group_stride) || (r->beta && r->beta_group_stride))) {
        for (int rr = 0; rr < 16; ++rr) {
            if (rr < nr) {
                row_factors(w, r, o0 + rr, ng, z, rows + rr * 2 * ngp, rows + rr * 2 * ngp + ngp);
            } else {
                memset(rows + rr * 2 * ngp, 0, (size_t) (2 * ngp) * sizeof(float));
            }
        }
        for (int64_t G0 = 0; G0 < ng; G0 += 16) {
            for (int k = 0; k < 2; ++k) {
                float * dst = k ? offT : adT;
                for (int rr = 0; rr < 16; ++rr) T[rr] = _mm512_loadu_si512(rows + rr * 2 * ngp + k * ngp + G0);
                transpose16(T);
                for (int j = 0; j < 16; ++j) _mm512_storeu_si512(dst + (G0 + j) * 16, T[j]);
            }
        }
        return;
    }
    // none, or per channel / per tensor: one value per row, i.e. per lane, for every group; the
    // operations of row_factors in its order (ad = d alpha; off = ad (-z + beta) + m)
    const int    has_a = r && r->alpha, has_b = r && r->beta;
    const __m512 av    = has_a ? load16_h(r->alpha + o0 * r->alpha_row_stride, r->alpha_row_stride, nr) : _mm512_set1_ps(1.0f);
    const __m512 lv    = has_b ? _mm512_add_ps(_mm512_set1_ps(-z),
                                               load16_h(r->beta + o0 * r->beta_row_stride, r->beta_row_stride, nr))
                               : _mm512_set1_ps(-z);
    for (int64_t G0 = 0; G0 < ng; G0 += 16) {
        const int n = load_dm16(w, o0, nr, ng, G0, T);   // T[j] lane rr: (d, d) of groups G0 + 2j, 2j + 1 (j < 8), (m, m) of 2(j - 8), +1
        for (int j = 0; 2 * j < n; ++j) {
            for (int h = 0; h < 2; ++h) {
                const __m512i dw = h ? _mm512_srli_epi32(T[j], 16) : T[j];
                const __m512i mw = h ? _mm512_srli_epi32(T[8 + j], 16) : T[8 + j];
                __m512        d  = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dw));
                const __m512  m  = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(mw));
                if (has_a) d = _mm512_mul_ps(d, av);
                _mm512_storeu_ps(adT + (G0 + 2 * j + h) * 16, d);
                // m = 0 without m
                _mm512_storeu_ps(offT + (G0 + 2 * j + h) * 16, _mm512_add_ps(_mm512_mul_ps(d, lv), m));
            }
        }
    }
}

LRQ_STATIC_ASSERT(LRQ_ROW_BLOCK == 16, "rows16 takes a whole row block in the 16 lanes");

#define LRQ_MAX_NT 4   // slots (tokens x replicas) per pass of rows16 over a row block's codes

// The codes of blocks b0..b0+7 (fewer at the row's end: the count is returned) of rows
// base + rr * rb, rr < nr (lanes past nr read nothing), transposed: T[2 bb + h] lane rr = word h of
// block b0 + bb of row rr.  first: the call's first row block, whose own codes are fetched two
// steps ahead (the later ones were fetched by the row block before them).
LRQ_INLINE int load_chunk16(const uint8_t * base, size_t rb, int nr, int64_t nb, int64_t b0, int first,
                            __m512i * T) {
    if (first && b0 + 16 < nb) {
        for (int rr = 0; rr < nr; ++rr) _mm_prefetch((const char *) (base + rr * rb + (b0 + 16) * 8), _MM_HINT_T0);
    }
    const int       nblk = (int) (nb - b0 < 8 ? nb - b0 : 8);
    const __mmask16 mask = (__mmask16) ((1u << (2 * nblk)) - 1u);   // 2 words per block
    for (int rr = 0; rr < 16; ++rr) T[rr] = _mm512_maskz_loadu_epi32(rr < nr ? mask : 0, base + rr * rb + b0 * 8);
    transpose16(T);
    return nblk;
}

// The integer dots of a block's first and last 16 weights (q from unpack_block16) with its
// activations xb, 4 broadcast activations per vpdpbusd; exact in int32, so the sum of the two is
// the block's dot in any order.
LRQ_INLINE void dot_halves16(const __m512i * q, const int8_t * xb, __m512i * lo, __m512i * hi) {
    __m512i i0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[0], bcast4(xb + 0));
    __m512i i1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[4], bcast4(xb + 16));
    for (int k = 1; k < 4; ++k) {
        i0 = _mm512_dpbusd_epi32(i0, q[k], bcast4(xb + 4 * k));
        i1 = _mm512_dpbusd_epi32(i1, q[4 + k], bcast4(xb + 16 + 4 * k));
    }
    *lo = i0;
    *hi = i1;
}

// One pass of rows16 over a row block's codes serves up to LRQ_MAX_NT slots: each slot is one
// token of one replica (a parallel group's members read the same codes: lrq_mul_mat_q8_multi),
// with that token's int8 activations, the replica's factors (factors16) and output parameters,
// and the token's output row.
typedef struct {
    const int8_t *      xq;     // [n_in]
    const float *       dx;     // [n_in / 32]
    const float *       sx;     // [n_groups]
    const float *       adT;    // factors16 of the slot's replica
    const float *       offT;
    const lrq_replica * r;      // gain, bias
    float *             y;      // the token's outputs, indexed by o - row0
} slot16;

// y[o0 + rr - row0] = gain * (acc0 + acc1) + bias for the nr rows of the lanes, one slot.
LRQ_INLINE void store_slot16(const slot16 * s, int64_t row0, int64_t o0, int nr, __m512 acc0, __m512 acc1) {
    const __mmask16 mr   = (__mmask16) ((1u << nr) - 1u);
    const __m512    gain = (s->r && s->r->gain) ? _mm512_maskz_loadu_ps(mr, s->r->gain + o0) : _mm512_set1_ps(1.0f);
    const __m512    bias = (s->r && s->r->bias) ? _mm512_maskz_loadu_ps(mr, s->r->bias + o0) : _mm512_setzero_ps();
    _mm512_mask_storeu_ps(s->y + (o0 - row0), mr, _mm512_fmadd_ps(gain, _mm512_add_ps(acc0, acc1), bias));
}

// store_slot16 for NT tokens of one replica from t0 (the two-level kernel's passes).
LRQ_INLINE void store_rows16(const lrq_replica * r, float * y, int64_t y_stride, int64_t row0, int64_t o0, int nr,
                             int64_t t0, const __m512 * acc0, const __m512 * acc1, const int NT) {
    for (int tt = 0; tt < NT; ++tt) {
        const slot16 s = {.r = r, .y = y + (t0 + tt) * y_stride};
        store_slot16(&s, row0, o0, nr, acc0[tt], acc1[tt]);
    }
}

// The 2-bit codes of block bb of a chunk from load_chunk16 as bytes: q[k] holds weights 4k..4k+3
// of each lane's row (word h of a block row holds bytes 4h..4h+3; bits 2l..2l+1 of byte k are
// weight 8l + k).
LRQ_INLINE void unpack_block16(const __m512i * T, int bb, __m512i * q) {
    const __m512i m3 = _mm512_set1_epi8(3), z0 = T[2 * bb], z1 = T[2 * bb + 1];
    for (int l = 0; l < 4; ++l) {
        q[2 * l]     = _mm512_and_si512(_mm512_srli_epi32(z0, 2 * l), m3);
        q[2 * l + 1] = _mm512_and_si512(_mm512_srli_epi32(z1, 2 * l), m3);
    }
}

// Part c of n of the cache lines of [p, p + bytes): software prefetch into L2 (hint T1).
LRQ_INLINE void prefetch_part(const void * p, size_t bytes, int64_t c, int64_t n) {
    const char * s = (const char *) p;
    for (size_t off = (size_t) c * bytes / (size_t) n / 64 * 64; off < (size_t) (c + 1) * bytes / (size_t) n; off += 64) {
        _mm_prefetch(s + off, _MM_HINT_T1);
    }
}

// Rows o0..o0+nr-1 (nr <= 16) for NT slots.  Lanes past nr compute zeros and are not stored;
// every row takes the same lane arithmetic wherever the row range starts or ends, so a split of
// the rows (ggml's threads) gives the same bits, and a slot's arithmetic does not depend on the
// other slots of its pass (a replica computed with others gives the bits it gives alone).
// nr_next: rows of the next row block of the call (0: none).  In a model's decode the codes come
// from memory, and the 16 row streams read 64 bytes at a time are more than the hardware
// prefetchers follow, so the loop fetches the next row block's codes, d and m (each contiguous)
// a part per 8-block step ahead of use; the first row block of a call fetches its own codes two
// steps ahead.
//   y[o - row0] = gain[o] * (sum_G ad_G sum_{b in G} dx_b (q_b . xq_b) + sum_G off_G Sx_G) + bias[o]
// The NT slots share each transpose and unpack of the codes (NT a constant after inlining).  A slot
// whose activations are an earlier slot's (own[tt] < tt: the same buffers, i.e. members of a
// parallel group that read one input, lrq_act_q8_share) also shares its integer dots and their
// per-group float sums; only its factors apply on their own (adT, offT, gain, bias).
LRQ_INLINE void rows16(const lrq_weight * w, const slot16 * s, const int * own, int64_t row0, int64_t o0, int nr,
                       int nr_next, const int NT, const int SHARE) {
    const int64_t   n_in = w->n_in, nb = n_in / LRQ_QK, ng = lrq_n_groups(n_in, w->group_size);
    const int64_t   bpg  = w->group_size / LRQ_QK;
    const size_t    rb   = w->codes_row_bytes;
    const uint8_t * base = w->codes + (size_t) o0 * rb;
    __m512          acc0[LRQ_MAX_NT], acc1[LRQ_MAX_NT], gs[LRQ_MAX_NT];
    for (int tt = 0; tt < NT; ++tt) {
        acc0[tt] = _mm512_setzero_ps();
        acc1[tt] = _mm512_setzero_ps();
        gs[tt]   = _mm512_setzero_ps();
        for (int64_t G = 0; G < ng; ++G) {
            acc1[tt] = _mm512_fmadd_ps(_mm512_loadu_ps(s[tt].offT + G * 16), _mm512_set1_ps(s[tt].sx[G]), acc1[tt]);
        }
    }
    const int64_t nchunk = (nb + 7) / 8;
    for (int64_t b0 = 0; b0 < nb; b0 += 8) {
        const int64_t c = b0 / 8;
        if (nr_next) {
            prefetch_part(base + 16 * rb, (size_t) nr_next * rb, c, nchunk);
            prefetch_part(w->d + (o0 + 16) * w->d_row_stride, (size_t) nr_next * (size_t) w->d_row_stride * 2, c, nchunk);
            if (w->m) {
                prefetch_part(w->m + (o0 + 16) * w->m_row_stride, (size_t) nr_next * (size_t) w->m_row_stride * 2, c,
                              nchunk);
            }
        }
        __m512i   T[16];
        const int nblk = load_chunk16(base, rb, nr, nb, b0, o0 == row0, T);
        for (int bb = 0; bb < nblk; ++bb) {
            const int64_t b = b0 + bb;
            __m512i q[8];
            unpack_block16(T, bb, q);
            for (int tt = 0; tt < NT; ++tt) {
                if (SHARE && own[tt] != tt) continue;   // the activations of an earlier slot: its sums serve
                __m512i i0, i1;
                dot_halves16(q, s[tt].xq + b * LRQ_QK, &i0, &i1);
                gs[tt] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(i0, i1)), _mm512_set1_ps(s[tt].dx[b]), gs[tt]);
            }
            if ((b + 1) % bpg == 0 || b + 1 == nb) {   // a group's last block
                for (int tt = 0; tt < NT; ++tt) {
                    // constant indices only (NT unrolled): gs stays in registers
                    __m512 g = gs[tt];
                    for (int k = 0; SHARE && k < tt; ++k) g = own[tt] == k ? gs[k] : g;
                    acc0[tt] = _mm512_fmadd_ps(g, _mm512_loadu_ps(s[tt].adT + (b / bpg) * 16), acc0[tt]);
                }
                for (int tt = 0; tt < NT; ++tt) gs[tt] = _mm512_setzero_ps();
            }
        }
    }
    for (int tt = 0; tt < NT; ++tt) store_slot16(&s[tt], row0, o0, nr, acc0[tt], acc1[tt]);
}

// One instance per slot count, without and with shared activations (SHARE = 0 compiles the
// checks out: one replica's tokens, or members with inputs of their own).
#define LRQ_ROWS16(name, NT, SHARE)                                                                             \
    static void name(const lrq_weight * w, const slot16 * s, const int * own, int64_t row0, int64_t o0, int nr,    \
                     int nr_next) {                                                                             \
        rows16(w, s, own, row0, o0, nr, nr_next, NT, SHARE);                                                    \
    }
LRQ_ROWS16(rows16_nt1, 1, 0)
LRQ_ROWS16(rows16_nt2, 2, 0)
LRQ_ROWS16(rows16_nt3, 3, 0)
LRQ_ROWS16(rows16_nt4, 4, 0)
LRQ_ROWS16(rows16_nt2_shared, 2, 1)
LRQ_ROWS16(rows16_nt3_shared, 3, 1)
LRQ_ROWS16(rows16_nt4_shared, 4, 1)
LRQ_STATIC_ASSERT(LRQ_MAX_NT == 4, "one rows16 instance per slot count 1..LRQ_MAX_NT");
typedef void (*rows16_fn)(const lrq_weight *, const slot16 *, const int *, int64_t, int64_t, int, int);
static const rows16_fn rows16_nt[2][LRQ_MAX_NT + 1] = {
    {NULL, rows16_nt1, rows16_nt2, rows16_nt3, rows16_nt4},
    {NULL, rows16_nt1, rows16_nt2_shared, rows16_nt3_shared, rows16_nt4_shared}};

// The two-level layout in the lane layout, rows o0..o0+15 (lanes past nr get zeros), as llama.cpp's
// Q2_K kernels apply its scales: the 4-bit scale index sc_k multiplies the block's integer dots and
// the super-block's d alpha applies once per super-block, so the float work per block is that of
// LRQ2 (rows16_tl); only the offsets need a float factor per sub-block.
//   dT[G * 16 + rr]  = (d alpha)_G of row o0 + rr, and beside it beta_G and dmin_G (sbT: room for
//                      3 * 16 * n_super floats)
//   scT[b * 16 + rr] = the sc of block b's sub-blocks as int16 multipliers of madd: B = 16 the
//                      first half's in the low 16 bits, the second half's in the high; B = 32 sc, 0
//   offT[k * 16 + rr] = ad_k beta_G - dmin_G mn_k, ad_k = (d alpha)_G sc_k: the float operations
//                      of lrq_two_level_row_factors, so the same values
// d and dmin come as factors16 takes d and m (16 super-blocks of fp16 per row in one vector,
// transposed), the sub-block bytes 64 at a time, transposed as 32-bit words (4 sub-blocks of every
// row in one vector): per row and sub-block the work would cost more than the code dots at one token.
static void factors16_tl(const lrq_weight * w, const lrq_replica * r, int64_t o0, int nr, float * sbT, int32_t * scT,
                         float * offT) {
    const int     B  = w->sub_size;
    const int64_t nk = w->n_in / B, ns = lrq_n_groups(w->n_in, w->group_size);
    const int     kps_sh = __builtin_ctz((unsigned) (w->group_size / B));   // powers of two: shifts, not divisions
    float *       dT = sbT, * bT = sbT + 16 * ns, * mT = sbT + 32 * ns;
    __m512i       T[16];
    for (int64_t G0 = 0; G0 < ns; G0 += 16) {
        const int n = load_dm16(w, o0, nr, ns, G0, T);   // T[j] lane rr: (d, d) of super-blocks G0 + 2j, 2j + 1 (j < 8), (dmin, dmin) at 8 + j
        for (int g = 0; g < n; ++g) {
            const __m512i dw = g % 2 ? _mm512_srli_epi32(T[g / 2], 16) : T[g / 2];
            const __m512i mw = g % 2 ? _mm512_srli_epi32(T[8 + g / 2], 16) : T[8 + g / 2];
            _mm512_storeu_ps(dT + (G0 + g) * 16, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dw)));
            _mm512_storeu_ps(mT + (G0 + g) * 16, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(mw)));
        }
    }
    const int has_beta = r && r->beta;
    memset(bT, 0, (size_t) (16 * ns) * sizeof(float));
    if (r && (r->alpha || r->beta)) {
        for (int rr = 0; rr < nr; ++rr) {
            const int64_t o = o0 + rr;
            for (int64_t G = 0; G < ns; ++G) {
                if (r->alpha) dT[G * 16 + rr] *= _cvtsh_ss(r->alpha[o * r->alpha_row_stride + G * r->alpha_group_stride]);
                if (r->beta) bT[G * 16 + rr] = _cvtsh_ss(r->beta[o * r->beta_row_stride + G * r->beta_group_stride]);
            }
        }
    }
    // pshufb control of sc: byte c of every 32-bit lane (of the nibble-masked bytes) to its low 16
    // bits and, with B = 16, byte c + 1 to its high 16 bits (0x80: zero; the lane's base offset
    // 4l within the 128-bit lane added to every byte keeps the high bit)
    const __m512i lane  = _mm512_set_epi32(0x0c0c0c0c, 0x08080808, 0x04040404, 0, 0x0c0c0c0c, 0x08080808, 0x04040404, 0,
                                           0x0c0c0c0c, 0x08080808, 0x04040404, 0, 0x0c0c0c0c, 0x08080808, 0x04040404, 0);
    const __m512i lo4b  = _mm512_set1_epi8(15);
    const __m512  nib   = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);   // vpermps: nibble
    for (int64_t K0 = 0; K0 < nk; K0 += 64) {
        const int       n  = (int) (nk - K0 < 64 ? nk - K0 : 64);
        const __mmask64 mk = n == 64 ? ~(__mmask64) 0 : (((__mmask64) 1 << n) - 1);   // bytes: no read past a row
        for (int rr = 0; rr < 16; ++rr) {
            T[rr] = _mm512_maskz_loadu_epi8(rr < nr ? mk : 0, w->sub + (o0 + rr) * w->sub_row_stride + K0);
        }
        transpose16(T);   // T[j] lane rr: sub-blocks K0 + 4j .. 4j + 3 of row o0 + rr, a byte each
        for (int j = 0; 4 * j < n; ++j) {
            const __m512i scb = _mm512_and_si512(T[j], lo4b);
            for (int i = 0; i < 4 && 4 * j + i < n; ++i) {
                const int64_t k = K0 + 4 * j + i, G = k >> kps_sh;
                if (B == 32 || i % 2 == 0) {   // k starts a block (K0 is a multiple of 4 blocks)
                    const int c = B == 16 ? i | 0x80 << 8 | (i + 1) << 16 | 0x80 << 24 : i | 0x808080 << 8;
                    _mm512_storeu_si512(scT + (B == 16 ? k / 2 : k) * 16,
                                        _mm512_shuffle_epi8(scb, _mm512_add_epi8(_mm512_set1_epi32(c), lane)));
                }
                // the float of a nibble by vpermps from the 16 values (indices: the low 4 bits of each
                // lane), as cvtdq2ps would give it, without masking it out
                const __m512 mn = _mm512_permutexvar_ps(_mm512_srli_epi32(T[j], 8 * i + 4), nib);
                const __m512 dm = _mm512_mul_ps(_mm512_loadu_ps(mT + G * 16), mn);
                if (!has_beta) {   // ad * 0 - dmin mn: the same value without ad (half the work of a sub-block)
                    _mm512_storeu_ps(offT + k * 16, _mm512_sub_ps(_mm512_setzero_ps(), dm));
                    continue;
                }
                const __m512 sc = _mm512_permutexvar_ps(_mm512_srli_epi32(T[j], 8 * i), nib);
                const __m512 ad = _mm512_mul_ps(_mm512_loadu_ps(dT + G * 16), sc);
                _mm512_storeu_ps(offT + k * 16, _mm512_sub_ps(_mm512_mul_ps(ad, _mm512_loadu_ps(bT + G * 16)), dm));
            }
        }
    }
}

// rows16 for a two-level weight with sub-blocks of B (16 or 32, a constant after inlining), dT /
// scT / offT from factors16_tl: the same codes, loads, prefetches and lane arithmetic, with the
// super-block as the group and each block's dot weighted by its sub-blocks' sc in integers:
//   y[t, o - row0] = gain[o] * (sum_G (d alpha)_G sum_{b in G} dx_b sum_{k in b} sc_k (q . xq)_k
//                               + sum_k off_k Sx_k) + bias[o]
// With B = 16 the block's dot is kept as its two halves (weights 0-15, 16-31; |dot| <= 16 * 3 * 127
// fits int16), packed into the 16-bit halves of each lane for vpmaddwd with the (sc, sc) pair; with
// B = 32 the whole dot (<= 32 * 3 * 127) times sc, 0.  Exact in int32.  The next row block's
// sub-block bytes are fetched beside its codes, d and m.
LRQ_INLINE void rows16_tl(const lrq_weight * w, const lrq_replica * r, const lrq_act_q8 * a, float * y,
                          int64_t y_stride, int64_t row0, int64_t o0, int nr, int nr_next, int64_t t0,
                          const float * dT, const int32_t * scT, const float * offT, const int NT, const int B) {
    const int64_t   n_in = w->n_in, nb = n_in / LRQ_QK, nk = n_in / B;
    const int64_t   bps  = w->group_size / LRQ_QK;
    const int       sh   = __builtin_ctz((unsigned) bps);   // group sizes are powers of two: no division per block
    const size_t    rb   = w->codes_row_bytes;
    const uint8_t * base = w->codes + (size_t) o0 * rb;
    const int8_t *  xq[LRQ_MAX_NT];
    const float *   dx[LRQ_MAX_NT], * sx[LRQ_MAX_NT];
    __m512          acc0[LRQ_MAX_NT], acc1[LRQ_MAX_NT], gs[LRQ_MAX_NT];
    for (int tt = 0; tt < NT; ++tt) {
        xq[tt]   = a->qs + (t0 + tt) * n_in;
        dx[tt]   = a->dx + (t0 + tt) * nb;
        sx[tt]   = a->sx + (t0 + tt) * nk;   // per sub-block (lrq_act_group_size)
        acc0[tt] = _mm512_setzero_ps();
        acc1[tt] = _mm512_setzero_ps();
        gs[tt]   = _mm512_setzero_ps();
    }
    const int64_t nchunk = (nb + 7) / 8;
    for (int64_t b0 = 0; b0 < nb; b0 += 8) {
        const int64_t c = b0 / 8;
        if (nr_next) {
            prefetch_part(base + 16 * rb, (size_t) nr_next * rb, c, nchunk);
            prefetch_part(w->sub + (o0 + 16) * w->sub_row_stride, (size_t) nr_next * (size_t) w->sub_row_stride, c,
                          nchunk);
            prefetch_part(w->d + (o0 + 16) * w->d_row_stride, (size_t) nr_next * (size_t) w->d_row_stride * 2, c, nchunk);
            prefetch_part(w->m + (o0 + 16) * w->m_row_stride, (size_t) nr_next * (size_t) w->m_row_stride * 2, c, nchunk);
        }
        __m512i   T[16];
        const int nblk = load_chunk16(base, rb, nr, nb, b0, o0 == row0, T);
        for (int bb = 0; bb < nblk; ++bb) {
            const int64_t b = b0 + bb;
            __m512i q[8];   // q[0..3]: the block's first 16 weights, q[4..7] the last 16
            unpack_block16(T, bb, q);
            const __m512i sc   = _mm512_loadu_si512(scT + b * 16);
            const int     last = ((b + 1) & (bps - 1)) == 0 || b + 1 == nb;
            for (int tt = 0; tt < NT; ++tt) {
                __m512i i0, i1;   // weights 0-15, 16-31
                dot_halves16(q, xq[tt] + b * LRQ_QK, &i0, &i1);
                const __m512i v = B == 16 ? _mm512_mask_blend_epi16(0xAAAAAAAAu, i0, _mm512_slli_epi32(i1, 16))
                                          : _mm512_add_epi32(i0, i1);
                gs[tt] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_madd_epi16(v, sc)), _mm512_set1_ps(dx[tt][b]), gs[tt]);
                // the offsets of the block's sub-blocks here, not in a loop of their own before: a
                // chain of n_in / B dependent FMAs there is bound by their latency (measured: a
                // sixth of the time at one token, B = 16), here the block's other work hides it
                for (int h = 0; h < LRQ_QK / B; ++h) {
                    const int64_t k = b * (LRQ_QK / B) + h;
                    acc1[tt] = _mm512_fmadd_ps(_mm512_loadu_ps(offT + k * 16), _mm512_set1_ps(sx[tt][k]), acc1[tt]);
                }
                if (last) {
                    acc0[tt] = _mm512_fmadd_ps(gs[tt], _mm512_loadu_ps(dT + (b >> sh) * 16), acc0[tt]);
                    gs[tt]   = _mm512_setzero_ps();
                }
            }
        }
    }
    store_rows16(r, y, y_stride, row0, o0, nr, t0, acc0, acc1, NT);
}

#define LRQ_ROWS16_TL(NAME, NT, B)                                                                                    \
    static void NAME(const lrq_weight * w, const lrq_replica * r, const lrq_act_q8 * a, float * y, int64_t y_stride, \
                     int64_t row0, int64_t o0, int nr, int nr_next, int64_t t0, const float * dT,                     \
                     const int32_t * scT, const float * offT) {                                                        \
        rows16_tl(w, r, a, y, y_stride, row0, o0, nr, nr_next, t0, dT, scT, offT, NT, B);                             \
    }
LRQ_ROWS16_TL(rows16_tl_nt1_b16, 1, 16)
LRQ_ROWS16_TL(rows16_tl_ntb_b16, LRQ_MAX_NT, 16)
LRQ_ROWS16_TL(rows16_tl_nt1_b32, 1, 32)
LRQ_ROWS16_TL(rows16_tl_ntb_b32, LRQ_MAX_NT, 32)

static int mul_mat_two_level(const lrq_weight * w, const lrq_replica * r, const lrq_act_q8 * a, float * y,
                             int64_t y_stride, int64_t row0, int64_t row1) {
    const int64_t nb = w->n_in / LRQ_QK, nk = w->n_in / w->sub_size, ns = lrq_n_groups(w->n_in, w->group_size);
    const size_t  need = (size_t) (16 * nb + 16 * nk + 3 * 16 * ns);   // scT, offT, factors16_tl's sbT
    float         stack_buf[4096];                                    // n_in up to 2048 at B = 16 without malloc
    float *       buf = need <= 4096 ? stack_buf : (float *) malloc(need * sizeof(float));
    if (!buf) return LRQ_ERR_NOMEM;
    int32_t * scT  = (int32_t *) buf;   // (float and int32_t: the same size and alignment)
    float *   offT = buf + 16 * nb, * sbT = offT + 16 * nk;
    const int b16  = w->sub_size == 16;
    for (int64_t o0 = row0; o0 < row1; o0 += LRQ_ROW_BLOCK) {
        const int64_t o1 = o0 + LRQ_ROW_BLOCK < row1 ? o0 + LRQ_ROW_BLOCK : row1;
        const int     nr = (int) (o1 - o0), nr_next = (int) (row1 - o1 < LRQ_ROW_BLOCK ? row1 - o1 : LRQ_ROW_BLOCK);
        factors16_tl(w, r, o0, nr, sbT, scT, offT);
        int64_t t0 = 0;   // as in lrq_mul_mat_q8_avx512
        for (; t0 + LRQ_MAX_NT <= a->n_tok; t0 += LRQ_MAX_NT) {
            (b16 ? rows16_tl_ntb_b16 : rows16_tl_ntb_b32)(w, r, a, y, y_stride, row0, o0, nr, t0 ? 0 : nr_next, t0,
                                                          sbT, scT, offT);
        }
        for (; t0 < a->n_tok; ++t0) {
            (b16 ? rows16_tl_nt1_b16 : rows16_tl_nt1_b32)(w, r, a, y, y_stride, row0, o0, nr, t0 ? 0 : nr_next, t0,
                                                          sbT, scT, offT);
        }
    }
    if (buf != stack_buf) free(buf);
    return LRQ_OK;
}

// shape: y_j[t, o - row0] = act_rj(x_j)[t, :] . W_rj[o, :] + bias_j[o] for the n replicas j of a
// single-level LRQ2 weight, t < a[j].n_tok, row0 <= o < row1 (arguments checked by the caller,
// q8.c).  Per row block: each replica's factors, then passes of rows16 over the codes with up to
// LRQ_MAX_NT (replica, token) slots each, so the replicas share each load, transpose and unpack.
static int mul_mat_multi(const lrq_weight * w, int n, const lrq_replica * const * r, const lrq_act_q8 * a,
                         float * const * y, int64_t y_stride, int64_t row0, int64_t row1) {
    const int64_t n_in = w->n_in, nb = n_in / LRQ_QK, ng = lrq_n_groups(n_in, w->group_size);
    const int64_t ngp  = (ng + 15) / 16 * 16;
    const size_t  need = (size_t) (2 * 16 * ngp) * (size_t) (n + 1);   // adT, offT per replica; factors16's rows
    float         stack_buf[4096];                                      // n_in up to 4096 at g = 64, one replica
    float *       buf = need <= 4096 ? stack_buf : (float *) malloc(need * sizeof(float));
    if (!buf) return LRQ_ERR_NOMEM;
    float * rows = buf + (size_t) (2 * 16 * ngp) * (size_t) n;
    for (int64_t o0 = row0; o0 < row1; o0 += LRQ_ROW_BLOCK) {
        const int64_t o1 = o0 + LRQ_ROW_BLOCK < row1 ? o0 + LRQ_ROW_BLOCK : row1;
        int           nr_next = (int) (row1 - o1 < LRQ_ROW_BLOCK ? row1 - o1 : LRQ_ROW_BLOCK);
        const int     nr = (int) (o1 - o0);
        for (int j = 0; j < n; ++j) {
            float * adT = buf + (size_t) (2 * 16 * ngp) * (size_t) j;
            factors16(w, r[j], o0, nr, ng, lrq_zero_point(2, w->mode), rows, adT, adT + 16 * ngp);
        }
        slot16 s[LRQ_MAX_NT];
        int    own[LRQ_MAX_NT];   // the first slot of the pass with the same activations
        int    ns = 0, shared = 0;
        for (int j = 0; j < n; ++j) {
            const float * adT = buf + (size_t) (2 * 16 * ngp) * (size_t) j;
            for (int64_t t = 0; t < a[j].n_tok; ++t) {
                s[ns] = (slot16) {a[j].qs + t * n_in, a[j].dx + t * nb, a[j].sx + t * ng, adT, adT + 16 * ngp, r[j],
                                  y[j] + t * y_stride};
                own[ns] = ns;
                for (int k = 0; k < ns; ++k) {
                    if (s[k].xq == s[ns].xq && s[k].dx == s[ns].dx && s[k].sx == s[ns].sx) {
                        own[ns] = k;
                        shared  = 1;
                        break;
                    }
                }
                if (++ns == LRQ_MAX_NT) {   // the next row block is fetched during the first pass only
                    rows16_nt[shared][ns](w, s, own, row0, o0, nr, nr_next);
                    ns      = 0;
                    shared  = 0;
                    nr_next = 0;
                }
            }
        }
        if (ns) rows16_nt[shared][ns](w, s, own, row0, o0, nr, nr_next);
    }
    if (buf != stack_buf) free(buf);
    return LRQ_OK;
}

int lrq_mul_mat_q8_avx512_multi(const lrq_weight * w, int n, const lrq_replica * const * r, const lrq_act_q8 * a,
                                float * const * y, int64_t y_stride, int64_t row0, int64_t row1) {
    if (w->sub) {   // two-level: one replica at a time (its factors live per sub-block)
        for (int j = 0; j < n; ++j) {
            const int rc = mul_mat_two_level(w, r[j], &a[j], y[j], y_stride, row0, row1);
            if (rc) return rc;
        }
        return LRQ_OK;
    }
    return mul_mat_multi(w, n, r, a, y, y_stride, row0, row1);
}

// shape: y[t, o - row0] = act_r(x)[t, :] . W_r[o, :] + bias[o], t < a->n_tok, row0 <= o < row1
// for an LRQ2 or two-level weight (arguments checked by the caller, q8.c).
int lrq_mul_mat_q8_avx512(const lrq_weight * w, const lrq_replica * r, const lrq_act_q8 * a, float * y,
                          int64_t y_stride, int64_t row0, int64_t row1) {
    return lrq_mul_mat_q8_avx512_multi(w, 1, &r, a, &y, y_stride, row0, row1);
}

#endif  // LRQ_HAVE_AVX512_KERNEL
