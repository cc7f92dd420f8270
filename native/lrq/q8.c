// lrq kernels: the fast path's activation quantization, its portable mat-mul and the dispatch.
//
//   y[t, o] = gamma[o] * sum_G [ ad[o,G] * sum_{b in G} dx[t,b] * (q_b . xq[t,b])  +  off[o,G] * Sx[t,G] ] + bias[o]
//   ad = alpha * d,  off = ad * (beta - z) + m,  Sx[t,G] = sum_{b in G} dx[t,b] * sum(xq[t,b])
//
// which is sum_i W_r[o,i] * x~[t,i] with x~ = dx * xq, regrouped so that the per-weight work is
// an integer product of a code and an int8 activation (the hot loop) and everything that depends
// on the replica is applied once per group.
#include "lrq-impl.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

// ---- activations ----------------------------------------------------------------------------------

static size_t align_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

size_t lrq_act_q8_size(int64_t n_tok, int64_t n_in, int group_size) {
    const size_t nb = (size_t) (n_in / LRQ_QK), ng = (size_t) lrq_n_groups(n_in, group_size);
    return align_up((size_t) n_tok * nb * sizeof(float), 32) + align_up((size_t) n_tok * ng * sizeof(float), 32) +
           (size_t) n_tok * (size_t) n_in;
}

void lrq_act_q8_init(lrq_act_q8 * a, void * buf, int64_t n_tok, int64_t n_in, int group_size) {
    const size_t nb = (size_t) (n_in / LRQ_QK), ng = (size_t) lrq_n_groups(n_in, group_size);
    char *       p  = (char *) buf;
    a->n_tok      = n_tok;
    a->n_in       = n_in;
    a->group_size = group_size;
    a->dx         = (float *) p;
    p += align_up((size_t) n_tok * nb * sizeof(float), 32);
    a->sx = (float *) p;
    p += align_up((size_t) n_tok * ng * sizeof(float), 32);
    a->qs = (int8_t *) p;
}

static int cpu_has_avx2(void);

// One token: act_r (in double, as the reference), then int8 per block of 32.
static void quantize_act_token(const float * x, int64_t n_in, int64_t group_size, float clip, int bits,
                               int8_t * qs, float * dx, float * sx) {
    const int64_t nb = n_in / LRQ_QK;
#ifdef LRQ_HAVE_AVX2_KERNEL
    // Without clip and act_bits act_r is the identity: the AVX2 code gives the same bytes and
    // scales (at prompts this step cost a sixth of the LRQ2 mat-mul's time in scalar code).
    if (clip == 1.0f && bits == 0 && nb <= 1024 && cpu_has_avx2()) {
        int32_t isum[2 * 1024];
        lrq_quantize_blocks_avx2(x, nb, qs, dx, isum);
        for (int64_t G = 0, i0 = 0; i0 < n_in; ++G, i0 += group_size) {   // Sx as below, same order
            const int64_t i1  = i0 + group_size < n_in ? i0 + group_size : n_in;
            float         acc = 0.0f;
            if (group_size == 16) {
                acc += dx[i0 / LRQ_QK] * (float) isum[i0 / 16];
            } else {
                for (int64_t b = i0 / LRQ_QK; b * LRQ_QK < i1; ++b) acc += dx[b] * (float) (isum[2 * b] + isum[2 * b + 1]);
            }
            sx[G] = acc;
        }
        return;
    }
#endif
    double        lim = INFINITY, s = 0.0;
    if (!(clip == 1.0f && bits == 0)) {
        double amax = 0.0;
        for (int64_t i = 0; i < n_in; ++i) {
            const double v = fabs((double) x[i]);
            if (v > amax) amax = v;
        }
        lim = (double) clip * amax;
        if (bits) s = lim / (double) ((1 << (bits - 1)) - 1);
    }
    if (bits >= 2 && bits <= 8) {
        // The spec's k-bit levels rint(xc / s) are integers in [-(2^(k-1)-1), 2^(k-1)-1] within
        // int8: use them as they are, with the per-token step as every block's scale.
        for (int64_t i = 0; i < n_in; ++i) {
            double xc = (double) x[i];
            if (xc < -lim) xc = -lim;
            if (xc > lim) xc = lim;
            qs[i] = s == 0.0 ? 0 : (int8_t) nearbyint(xc / s);
        }
        for (int64_t b = 0; b < nb; ++b) dx[b] = (float) s;
    } else {
        for (int64_t b = 0; b < nb; ++b) {
            float xa[LRQ_QK];
            float amax = 0.0f;
            for (int j = 0; j < LRQ_QK; ++j) {
                double v = (double) x[b * LRQ_QK + j];
                if (v < -lim) v = -lim;
                if (v > lim) v = lim;
                if (bits) v = s == 0.0 ? 0.0 : nearbyint(v / s) * s;   // act_bits 9..16
                xa[j] = (float) v;
                if (fabsf(xa[j]) > amax) amax = fabsf(xa[j]);
            }
            const float d  = amax / 127.0f;
            const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
            for (int j = 0; j < LRQ_QK; ++j) {
                float v = nearbyintf(xa[j] * id);            // |v| <= 127 (127.00001 rounds to 127)
                if (v > 127.0f) v = 127.0f;
                if (v < -127.0f) v = -127.0f;
                qs[b * LRQ_QK + j] = (int8_t) v;
            }
            dx[b] = d;
        }
    }
    // Sx_G of the int8 activations (not of x): the offset terms then see exactly the x~ that the
    // code dots see, so the fast path is W_r . x~ up to float summation order.  A group may be
    // half a block (16: the two-level layout's sub-blocks); larger groups are whole blocks.
    for (int64_t G = 0, i0 = 0; i0 < n_in; ++G, i0 += group_size) {
        const int64_t i1  = i0 + group_size < n_in ? i0 + group_size : n_in;
        float         acc = 0.0f;
        for (int64_t b = i0 / LRQ_QK; b * LRQ_QK < i1; ++b) {
            const int64_t j0 = b * LRQ_QK > i0 ? b * LRQ_QK : i0, j1 = (b + 1) * LRQ_QK < i1 ? (b + 1) * LRQ_QK : i1;
            int32_t       isum = 0;
            for (int64_t j = j0; j < j1; ++j) isum += qs[j];
            acc += dx[b] * (float) isum;
        }
        sx[G] = acc;
    }
}

int lrq_quantize_act_q8(const float * x, int64_t x_stride, float act_clip, int act_bits, lrq_act_q8 * a) {
    if (!a || (a->n_tok > 0 && !x) || x_stride < a->n_in) return LRQ_ERR_ARG;
    if (!(act_clip > 0.0f && act_clip <= 1.0f) || (act_bits != 0 && (act_bits < 2 || act_bits > 16))) return LRQ_ERR_ARG;
    if (a->n_in <= 0 || a->n_in % LRQ_QK) return LRQ_ERR_N_IN;
    if (a->group_size != 16 && a->group_size % LRQ_QK) return LRQ_ERR_GROUP_SIZE;
    const int64_t nb = a->n_in / LRQ_QK, ng = lrq_n_groups(a->n_in, a->group_size);
    for (int64_t t = 0; t < a->n_tok; ++t) {
        quantize_act_token(x + t * x_stride, a->n_in, a->group_size, act_clip, act_bits, a->qs + t * a->n_in,
                           a->dx + t * nb, a->sx + t * ng);
    }
    return LRQ_OK;
}

// ---- portable mat-mul ------------------------------------------------------------------------------

static int check_q8(const lrq_weight * w, const lrq_replica * r, const lrq_act_q8 * a, float * y, int64_t y_stride,
                    int64_t row0, int64_t row1) {
    const int rc = lrq_check_weight(w, r, row0, row1);
    if (rc) return rc;
    if (!a || a->n_in != w->n_in || a->group_size != lrq_act_group_size(w) || a->n_tok < 0) return LRQ_ERR_ARG;
    if (a->n_tok > 0 && row1 > row0 && (!y || y_stride < row1 - row0)) return LRQ_ERR_ARG;
    return LRQ_OK;
}

// The two-level layout, portable: per sub-block k (B = 16 or 32 weights, half or all of a block)
//   y[t, o] = gamma[o] * sum_k [ ad_k * sum_{b} dx[t,b] * (q . xq)[t, k-part of b] + off_k * Sx[t,k] ] + bias[o]
static int mul_mat_q8_generic_two_level(const lrq_weight * w, const lrq_replica * r, const lrq_act_q8 * a,
                                        float * y, int64_t y_stride, int64_t row0, int64_t row1) {
    const int64_t n_in = w->n_in, nb = n_in / LRQ_QK, nk = lrq_factor_groups(w);
    const int     B    = w->sub_size, kpb = LRQ_QK / B;   // sub-blocks per block: 2 or 1
    float *       ad   = (float *) malloc((size_t) (2 * nk) * sizeof(float));
    if (!ad) return LRQ_ERR_NOMEM;
    float * off = ad + nk;
    for (int64_t o = row0; o < row1; ++o) {
        const uint8_t * p = w->codes + (size_t) o * w->codes_row_bytes;
        lrq_two_level_row_factors(w, r, o, ad, off);
        const float gain = (r && r->gain) ? r->gain[o] : 1.0f;
        const float bias = (r && r->bias) ? r->bias[o] : 0.0f;
        for (int64_t t = 0; t < a->n_tok; ++t) {
            const int8_t * xq  = a->qs + t * n_in;
            float          acc = 0.0f;
            for (int64_t b = 0; b < nb; ++b) {
                uint8_t q[LRQ_QK];
                lrq_unpack_block(p + b * 8, 2, q);
                for (int h = 0; h < kpb; ++h) {
                    int32_t isum = 0;
                    for (int j = h * B; j < (h + 1) * B; ++j) isum += (int32_t) q[j] * xq[b * LRQ_QK + j];
                    acc += ad[b * kpb + h] * (a->dx[t * nb + b] * (float) isum);
                }
            }
            float offs = 0.0f;
            for (int64_t k = 0; k < nk; ++k) offs += off[k] * a->sx[t * nk + k];
            y[t * y_stride + (o - row0)] = gain * (acc + offs) + bias;
        }
    }
    free(ad);
    return LRQ_OK;
}

// shape: y[t, o - row0] for t < a->n_tok, row0 <= o < row1 (see the file comment)
int lrq_mul_mat_q8_generic(const lrq_weight * w, const lrq_replica * r, const lrq_act_q8 * a,
                           float * y, int64_t y_stride, int64_t row0, int64_t row1) {
    const int rc = check_q8(w, r, a, y, y_stride, row0, row1);
    if (rc) return rc;
    if (w->sub) return mul_mat_q8_generic_two_level(w, r, a, y, y_stride, row0, row1);
    const int64_t n_in = w->n_in, nb = n_in / LRQ_QK, ng = lrq_n_groups(n_in, w->group_size);
    const int     bpg = w->group_size / LRQ_QK, bb = 4 * w->bits;
    const float   z   = lrq_zero_point(w->bits, w->mode);

    for (int64_t o0 = row0; o0 < row1; o0 += LRQ_ROW_BLOCK) {
        const int64_t o1 = o0 + LRQ_ROW_BLOCK < row1 ? o0 + LRQ_ROW_BLOCK : row1;
        for (int64_t t0 = 0; t0 < a->n_tok; t0 += LRQ_TOK_BLOCK) {
            const int nt = (int) (a->n_tok - t0 < LRQ_TOK_BLOCK ? a->n_tok - t0 : LRQ_TOK_BLOCK);
            for (int64_t o = o0; o < o1; ++o) {
                const uint8_t * p = w->codes + (size_t) o * w->codes_row_bytes;
                float           acc[LRQ_TOK_BLOCK] = {0};
                for (int64_t G = 0; G < ng; ++G) {
                    float ad, off;
                    lrq_group_factors(w, r, o, G, z, &ad, &off);
                    float gs[LRQ_TOK_BLOCK] = {0};                  // sum_b dx_b * (q_b . xq_b)
                    for (int64_t b = G * bpg; b < nb && b < (G + 1) * bpg; ++b) {
                        uint8_t q[LRQ_QK];
                        lrq_unpack_block(p + b * bb, w->bits, q);   // decoded once for nt tokens
                        for (int tt = 0; tt < nt; ++tt) {
                            const int8_t * xq   = a->qs + (t0 + tt) * n_in + b * LRQ_QK;
                            int32_t        isum = 0;
                            for (int j = 0; j < LRQ_QK; ++j) isum += (int32_t) q[j] * xq[j];
                            gs[tt] += a->dx[(t0 + tt) * nb + b] * (float) isum;
                        }
                    }
                    for (int tt = 0; tt < nt; ++tt) acc[tt] += ad * gs[tt] + off * a->sx[(t0 + tt) * ng + G];
                }
                const float gain = (r && r->gain) ? r->gain[o] : 1.0f;
                const float bias = (r && r->bias) ? r->bias[o] : 0.0f;
                for (int tt = 0; tt < nt; ++tt) y[(t0 + tt) * y_stride + (o - row0)] = gain * acc[tt] + bias;
            }
        }
    }
    return LRQ_OK;
}

// ---- dispatch ---------------------------------------------------------------------------------------

static int cpu_has_avx2(void) {
#ifdef LRQ_HAVE_AVX2_KERNEL
    static int cached = -1;       // benign race: every thread computes the same value
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    }
    return cached;
#else
    return 0;
#endif
}

#ifdef LRQ_HAVE_AVX512_KERNEL
// LRQ_NO_AVX512=1 in the environment keeps lrq_mul_mat_q8 on the AVX2 kernel: the A/B of the two
// in a model (bench/kernels.py compares them per call through lrq_mul_mat_q8_impl).
static int cpu_has_avx512(void) {
    static int cached = -1;       // benign race, as above
    if (cached < 0) {
        __builtin_cpu_init();     // (the avx512 flags are only set when the OS saves the zmm state)
        cached = cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                 __builtin_cpu_supports("avx512vnni");
    }
    return cached;
}

static int use_avx512_env(void) {
    static int cached = -1;
    if (cached < 0) {
        const char * e = getenv("LRQ_NO_AVX512");
        cached         = !(e && e[0] == '1');
    }
    return cached;
}

// The AVX-512 kernel covers the 2-bit codes: LRQ2, the layout of the decode-speed target, and the
// two-level layout (the same codes with per-sub-block factors).
static int use_avx512(const lrq_weight * w) { return w->bits == 2 && cpu_has_avx512() && use_avx512_env(); }
#endif

const char * lrq_kernels_simd(void) {
#ifdef LRQ_HAVE_NEON_KERNEL
    return "neon";
#endif
#ifdef LRQ_HAVE_AVX512_KERNEL
    if (cpu_has_avx512() && use_avx512_env()) return "avx512+avx2";
#endif
    return cpu_has_avx2() ? "avx2" : "generic";
}

int lrq_mul_mat_q8(const lrq_weight * w, const lrq_replica * r, const lrq_act_q8 * a,
                   float * y, int64_t y_stride, int64_t row0, int64_t row1) {
#ifdef LRQ_HAVE_AVX512_KERNEL
    if (w && use_avx512(w)) {
        const int rc = check_q8(w, r, a, y, y_stride, row0, row1);
        if (rc) return rc;
        return lrq_mul_mat_q8_avx512(w, r, a, y, y_stride, row0, row1);
    }
#endif
#ifdef LRQ_HAVE_AVX2_KERNEL
    if (cpu_has_avx2()) {
        const int rc = check_q8(w, r, a, y, y_stride, row0, row1);
        if (rc) return rc;
        return lrq_mul_mat_q8_avx2(w, r, a, y, y_stride, row0, row1);
    }
#endif
#ifdef LRQ_HAVE_NEON_KERNEL
    {   // NEON is baseline on aarch64: no run-time check
        const int rc = check_q8(w, r, a, y, y_stride, row0, row1);
        if (rc) return rc;
        return lrq_mul_mat_q8_neon(w, r, a, y, y_stride, row0, row1);
    }
#endif
    return lrq_mul_mat_q8_generic(w, r, a, y, y_stride, row0, row1);
}

int lrq_act_q8_share(lrq_act_q8 * a, int n) {
    int shared = 0;
    for (int j = 1; j < n; ++j) {
        const size_t nq = (size_t) (a[j].n_tok * a[j].n_in), nb = (size_t) (a[j].n_tok * (a[j].n_in / LRQ_QK));
        const size_t ng = (size_t) (a[j].n_tok * lrq_n_groups(a[j].n_in, a[j].group_size));
        for (int k = 0; k < j; ++k) {
            if (a[k].qs == a[j].qs) break;   // j already shares
            if (a[k].n_tok == a[j].n_tok && a[k].n_in == a[j].n_in && a[k].group_size == a[j].group_size &&
                !memcmp(a[k].qs, a[j].qs, nq) && !memcmp(a[k].dx, a[j].dx, nb * sizeof(float)) &&
                !memcmp(a[k].sx, a[j].sx, ng * sizeof(float))) {
                a[j] = a[k];
                ++shared;
                break;
            }
        }
    }
    return shared;
}

int lrq_mul_mat_q8_multi(const lrq_weight * w, int n, const lrq_replica * const * r, const lrq_act_q8 * a,
                         float * const * y, int64_t y_stride, int64_t row0, int64_t row1) {
    if (n < 1 || !r || !a || !y) return LRQ_ERR_ARG;
    for (int j = 0; j < n; ++j) {
        const int rc = check_q8(w, r[j], &a[j], y[j], y_stride, row0, row1);
        if (rc) return rc;
    }
#ifdef LRQ_HAVE_AVX512_KERNEL
    if (use_avx512(w)) return lrq_mul_mat_q8_avx512_multi(w, n, r, a, y, y_stride, row0, row1);
#endif
    for (int j = 0; j < n; ++j) {
        const int rc = lrq_mul_mat_q8(w, r[j], &a[j], y[j], y_stride, row0, row1);
        if (rc) return rc;
    }
    return LRQ_OK;
}

#ifdef LRQ_HAVE_AVX2_KERNEL
static int mul_mat_q8_avx2_checked(const lrq_weight * w, const lrq_replica * r, const lrq_act_q8 * a, float * y,
                                   int64_t y_stride, int64_t row0, int64_t row1) {
    const int rc = check_q8(w, r, a, y, y_stride, row0, row1);
    return rc ? rc : lrq_mul_mat_q8_avx2(w, r, a, y, y_stride, row0, row1);
}
#endif
#ifdef LRQ_HAVE_AVX512_KERNEL
static int mul_mat_q8_avx512_checked(const lrq_weight * w, const lrq_replica * r, const lrq_act_q8 * a, float * y,
                                     int64_t y_stride, int64_t row0, int64_t row1) {
    const int rc = check_q8(w, r, a, y, y_stride, row0, row1);
    if (rc) return rc;
    if (w->bits != 2) return LRQ_ERR_ARG;
    return lrq_mul_mat_q8_avx512(w, r, a, y, y_stride, row0, row1);
}
#endif

lrq_mul_mat_q8_fn lrq_mul_mat_q8_impl(const char * name) {
    if (!name) return NULL;
    if (!strcmp(name, "generic")) return lrq_mul_mat_q8_generic;
#ifdef LRQ_HAVE_AVX2_KERNEL
    if (!strcmp(name, "avx2")) return cpu_has_avx2() ? mul_mat_q8_avx2_checked : NULL;
#endif
#ifdef LRQ_HAVE_AVX512_KERNEL
    if (!strcmp(name, "avx512")) return cpu_has_avx512() ? mul_mat_q8_avx512_checked : NULL;
#endif
    return NULL;
}

int lrq_mul_mat(const lrq_weight * w, const lrq_replica * r,
                const float * x, int64_t x_stride, int64_t n_tok,
                float * y, int64_t y_stride, int64_t row0, int64_t row1) {
    int rc = lrq_check_weight(w, r, row0, row1);
    if (rc) return rc;
    if (n_tok < 0 || (n_tok > 0 && (!x || !y || x_stride < w->n_in || y_stride < row1 - row0))) return LRQ_ERR_ARG;
    if (n_tok == 0 || row0 == row1) return LRQ_OK;
    const int gs = lrq_act_group_size(w);
    void * buf = malloc(lrq_act_q8_size(n_tok, w->n_in, gs));
    if (!buf) return LRQ_ERR_NOMEM;
    lrq_act_q8 a;
    lrq_act_q8_init(&a, buf, n_tok, w->n_in, gs);
    rc = lrq_quantize_act_q8(x, x_stride, r ? r->act_clip : 1.0f, r ? r->act_bits : 0, &a);
    if (!rc) rc = lrq_mul_mat_q8(w, r, &a, y, y_stride, row0, row1);
    free(buf);
    return rc;
}
