// lrq kernels: fp16 conversion, checks, planar packing, the reference quantizer, the reference
// dequantization and the reference mat-mul (docs/FORMAT.md; lrq.quant is the executable spec).
//
// This file MUST be compiled with -ffp-contract=off (CMakeLists.txt sets it as a source
// property): the quantizer is byte-exact with numpy only if every float32 multiply and add is
// rounded separately, as numpy does, instead of being fused into an FMA.
#include "lrq-impl.h"
#include "lrq-dequant.h"   // code layout and zero point, shared with metal/lrq.metal

#include <math.h>
#include <stdlib.h>
#include <string.h>

const char * lrq_status_str(int status) {
    switch (status) {
        case LRQ_OK:             return "ok";
        case LRQ_ERR_BITS:       return "bits must be 1..4 (ternary: 2)";
        case LRQ_ERR_MODE:       return "unknown mode";
        case LRQ_ERR_GROUP_SIZE: return "group size must be 32, 64, 128 or 256";
        case LRQ_ERR_N_IN:       return "n_in must be a positive multiple of 32";
        case LRQ_ERR_ARG:        return "invalid argument";
        case LRQ_ERR_NOMEM:      return "out of memory";
        case LRQ_ERR_TWO_LEVEL:  return "the two-level layout needs LRQ2 codes in mode asym and sub-blocks of 16 or 32";
        default:                 return "unknown status";
    }
}

void lrq_replica_init(lrq_replica * r) {
    memset(r, 0, sizeof *r);
    r->act_clip = 1.0f;
    r->act_bits = 0;
}

// ---- fp16 ---------------------------------------------------------------------------------------

// Round to nearest even, as numpy's npy_floatbits_to_halfbits: overflow (>= 65520) -> inf,
// values below 2^-14 -> subnormals, at most 2^-25 -> signed zero (2^-25 itself is a tie -> 0).
uint16_t lrq_fp32_to_fp16(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    const uint16_t sign = (uint16_t) ((x >> 16) & 0x8000u);
    const uint32_t a    = x & 0x7fffffffu;
    if (a >= 0x7f800000u) {                         // inf, NaN (quiet, top payload bits kept)
        return (uint16_t) (sign | (a == 0x7f800000u ? 0x7c00u : (0x7e00u | ((a >> 13) & 0x3ffu))));
    }
    if (a >= 0x477ff000u) {                         // >= 65520: rounds past the largest finite half
        return (uint16_t) (sign | 0x7c00u);
    }
    if (a >= 0x38800000u) {                         // normal half (>= 2^-14): round the low 13 bits
        const uint32_t r = a + 0x0fffu + ((a >> 13) & 1u);
        return (uint16_t) (sign | ((r >> 13) - (112u << 10)));
    }
    if (a <= 0x33000000u) {                         // <= 2^-25: zero (the tie at 2^-25 goes to even 0)
        return sign;
    }
    // subnormal half: value = mant * 2^(e - 150), unit 2^-24 -> mant >> (126 - e), 14..24
    const uint32_t e     = a >> 23;
    const uint32_t mant  = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - e;
    uint32_t       r     = mant >> shift;
    const uint32_t rem   = mant & ((1u << shift) - 1u);
    const uint32_t half  = 1u << (shift - 1u);
    if (rem > half || (rem == half && (r & 1u))) {
        ++r;                                        // may carry into the smallest normal: correct
    }
    return (uint16_t) (sign | r);
}

float lrq_fp16_to_fp32(uint16_t h) { return lrq_h2f(h); }

// ---- sizes and checks ------------------------------------------------------------------------------

size_t lrq_row_bytes(int64_t n_in, int bits) { return (size_t) (n_in / LRQ_QK) * 4u * (size_t) bits; }

int64_t lrq_n_groups(int64_t n_in, int group_size) { return (n_in + group_size - 1) / group_size; }

int lrq_max_code(int bits, lrq_mode mode) { return mode == LRQ_MODE_TERNARY ? 2 : (1 << bits) - 1; }

float lrq_zero_point(int bits, lrq_mode mode) { return lrq_dq_zero_point(bits, (int) mode); }   // exact: 0.5 .. 7.5 (sym)

int lrq_check_params(int64_t n_in, int bits, lrq_mode mode, int group_size) {
    if (mode != LRQ_MODE_ASYM && mode != LRQ_MODE_SYM && mode != LRQ_MODE_TERNARY) return LRQ_ERR_MODE;
    if (bits < 1 || bits > 4 || (mode == LRQ_MODE_TERNARY && bits != 2)) return LRQ_ERR_BITS;
    if (group_size != 32 && group_size != 64 && group_size != 128 && group_size != 256) return LRQ_ERR_GROUP_SIZE;
    if (n_in <= 0 || n_in % LRQ_QK) return LRQ_ERR_N_IN;
    return LRQ_OK;
}

int64_t lrq_factor_groups(const lrq_weight * w) {
    return w->sub ? w->n_in / w->sub_size : lrq_n_groups(w->n_in, w->group_size);
}

int lrq_act_group_size(const lrq_weight * w) { return w->sub ? w->sub_size : w->group_size; }

int lrq_check_weight(const lrq_weight * w, const lrq_replica * r, int64_t row0, int64_t row1) {
    if (!w) return LRQ_ERR_ARG;
    const int rc = lrq_check_params(w->n_in, w->bits, w->mode, w->group_size);
    if (rc) return rc;
    const int64_t ng = lrq_n_groups(w->n_in, w->group_size);
    if (w->n_out < 0 || !w->codes || !w->d) return LRQ_ERR_ARG;
    if (w->codes_row_bytes < lrq_row_bytes(w->n_in, w->bits) || w->d_row_stride < ng) return LRQ_ERR_ARG;
    if ((w->mode == LRQ_MODE_ASYM) != (w->m != NULL)) return LRQ_ERR_ARG;   // m exactly for asym
    if (w->m && w->m_row_stride < ng) return LRQ_ERR_ARG;
    if (row0 < 0 || row0 > row1 || row1 > w->n_out) return LRQ_ERR_ARG;
    if (w->sub) {
        if (w->bits != 2 || w->mode != LRQ_MODE_ASYM || (w->sub_size != 16 && w->sub_size != 32)) return LRQ_ERR_TWO_LEVEL;
        if (w->sub_row_stride < w->n_in / w->sub_size) return LRQ_ERR_ARG;
    }
    if (r) {
        if (!(r->act_clip > 0.0f && r->act_clip <= 1.0f)) return LRQ_ERR_ARG;
        if (r->act_bits != 0 && (r->act_bits < 2 || r->act_bits > 16)) return LRQ_ERR_ARG;
        if (r->alpha && (r->alpha_row_stride < 0 || r->alpha_group_stride < 0)) return LRQ_ERR_ARG;
        if (r->beta && (r->beta_row_stride < 0 || r->beta_group_stride < 0)) return LRQ_ERR_ARG;
    }
    return LRQ_OK;
}

// ---- packing ------------------------------------------------------------------------------------

// b in {1, 2, 4}: weight j -> byte j % (4b), shift b * (j / (4b)).
static void pack_simple(const uint8_t * q, int bits, uint8_t * p) {
    const int     nb   = 4 * bits;
    const uint8_t mask = (uint8_t) ((1u << bits) - 1u);
    memset(p, 0, (size_t) nb);
    for (int j = 0; j < LRQ_QK; ++j) p[j % nb] |= (uint8_t) ((q[j] & mask) << (bits * (j / nb)));
}

static void pack_block(const uint8_t * q, int bits, uint8_t * p) {
    if (bits != 3) {
        pack_simple(q, bits, p);
        return;
    }
    uint8_t lo[LRQ_QK], hi[LRQ_QK];          // 3 bits: 2-bit plane (8 B) then 1-bit plane (4 B)
    for (int j = 0; j < LRQ_QK; ++j) {
        lo[j] = q[j] & 3u;
        hi[j] = (q[j] >> 2) & 1u;
    }
    pack_simple(lo, 2, p);
    pack_simple(hi, 1, p + 8);
}

void lrq_pack_row(const uint8_t * q, int64_t n_in, int bits, uint8_t * packed) {
    for (int64_t b = 0; b < n_in / LRQ_QK; ++b) pack_block(q + b * LRQ_QK, bits, packed + b * 4 * bits);
}

void lrq_unpack_row(const uint8_t * packed, int64_t n_in, int bits, uint8_t * q) {
    for (int64_t b = 0; b < n_in / LRQ_QK; ++b) lrq_unpack_block(packed + b * 4 * bits, bits, q + b * LRQ_QK);
}

// ---- reference quantizer ----------------------------------------------------------------------
// Mirrors lrq.quant._params / _ternary_mean_abs / _codes / _sq_error step by step.

// MSE scale search (lrq.quant.MSE_STEP / MSE_STEPS / MSE_STEPS_TERNARY).
#define LRQ_MSE_STEP          0.025
#define LRQ_MSE_STEPS         20
#define LRQ_MSE_STEPS_TERNARY 36

// fp16 (d, m) of one group x[n] with the range shrunk by s (float32 arithmetic).
static void group_params(const float * x, int n, int bits, lrq_mode mode, float s, uint16_t * d, uint16_t * m) {
    const float qm = (float) lrq_max_code(bits, mode);
    if (mode == LRQ_MODE_ASYM) {
        float mn = x[0], mx = x[0];
        for (int i = 1; i < n; ++i) {
            if (x[i] < mn) mn = x[i];
            if (x[i] > mx) mx = x[i];
        }
        const float lo = s * mn;
        const float hi = s * mx;
        *d = lrq_fp32_to_fp16((hi - lo) / qm);
        *m = lrq_fp32_to_fp16(lo);
        return;
    }
    float amax = 0.0f;
    for (int i = 0; i < n; ++i) {
        const float a = fabsf(x[i]);
        if (a > amax) amax = a;
    }
    *d = mode == LRQ_MODE_SYM ? lrq_fp32_to_fp16((2.0f * (s * amax)) / qm)
                              : lrq_fp32_to_fp16(s * amax);   // ternary range (mse search only)
    *m = 0;
}

// ternary minmax: d = fp16((float)(S / n)), S = sum |x| in float64, index order.
static uint16_t ternary_mean_abs(const float * x, int n) {
    double s = 0.0;
    for (int i = 0; i < n; ++i) s += (double) fabsf(x[i]);
    return lrq_fp32_to_fp16((float) (s / (double) n));
}

// Codes of one group from its fp16 parameters: true float32 divisions, round half to even.
static void group_codes(const float * x, int n, uint16_t d16, uint16_t m16, int bits, lrq_mode mode, uint8_t * q) {
    const float d = lrq_h2f(d16);
    if (d == 0.0f) {                           // d == 0 -> every code 0
        memset(q, 0, (size_t) n);
        return;
    }
    const float qm = (float) lrq_max_code(bits, mode);
    const float z  = lrq_zero_point(bits, mode);
    const float m  = mode == LRQ_MODE_ASYM ? lrq_h2f(m16) : 0.0f;
    for (int i = 0; i < n; ++i) {
        float t;
        if (mode == LRQ_MODE_ASYM) {
            t = (x[i] - m) / d;
        } else if (mode == LRQ_MODE_SYM) {
            t = x[i] / d + z;
        } else {
            t = x[i] / d;
        }
        float r = nearbyintf(t);
        if (mode == LRQ_MODE_TERNARY) r = r + 1.0f;   // q = rint(w / d) + 1
        if (!(r > 0.0f)) r = 0.0f;                    // also catches NaN (out-of-range input)
        if (r > qm) r = qm;
        q[i] = (uint8_t) r;
    }
}

// sum_i ((double)x - ((double)d * (q - z) + (double)m))^2, float64, index order.
static double group_sq_error(const float * x, int n, const uint8_t * q, uint16_t d16, uint16_t m16, int bits,
                             lrq_mode mode) {
    const double d     = (double) lrq_h2f(d16);
    const double m     = (double) lrq_h2f(m16);
    const double z     = (double) lrq_zero_point(bits, mode);
    const int    has_m = mode == LRQ_MODE_ASYM;
    double       err   = 0.0;
    for (int i = 0; i < n; ++i) {
        double deq = d * ((double) q[i] - z);
        if (has_m) deq = deq + m;
        const double e = (double) x[i] - deq;
        err += e * e;
    }
    return err;
}

int lrq_quantize_row_ref(const float * w, int64_t n_in, int bits, lrq_mode mode, int group_size,
                         lrq_scale_search search, uint8_t * codes, uint16_t * d, uint16_t * m) {
    const int rc = lrq_check_params(n_in, bits, mode, group_size);
    if (rc) return rc;
    if (!w || !codes || !d || (mode == LRQ_MODE_ASYM && !m)) return LRQ_ERR_ARG;
    if (search != LRQ_SCALE_MINMAX && search != LRQ_SCALE_MSE) return LRQ_ERR_ARG;

    uint8_t q[LRQ_MAX_GROUP], qc[LRQ_MAX_GROUP];
    for (int64_t G = 0, start = 0; start < n_in; ++G, start += group_size) {
        const float * x  = w + start;
        const int     n  = (int) (n_in - start < group_size ? n_in - start : group_size);   // partial last group
        uint16_t      d16 = 0, m16 = 0;
        if (search == LRQ_SCALE_MINMAX) {
            if (mode == LRQ_MODE_TERNARY) {
                d16 = ternary_mean_abs(x, n);
            } else {
                group_params(x, n, bits, mode, 1.0f, &d16, &m16);
            }
            group_codes(x, n, d16, m16, bits, mode, q);
        } else {
            const int steps = mode == LRQ_MODE_TERNARY ? LRQ_MSE_STEPS_TERNARY : LRQ_MSE_STEPS;
            double    best  = 0.0;
            for (int k = 0; k < steps; ++k) {
                const float s = (float) (1.0 - LRQ_MSE_STEP * k);   // as mse_shrink_factors
                uint16_t    dc, mc;
                group_params(x, n, bits, mode, s, &dc, &mc);
                group_codes(x, n, dc, mc, bits, mode, qc);
                const double err = group_sq_error(x, n, qc, dc, mc, bits, mode);
                if (k == 0 || err < best) {                         // strict: ties keep the smaller k
                    best = err;
                    d16  = dc;
                    m16  = mc;
                    memcpy(q, qc, (size_t) n);
                }
            }
        }
        d[G] = d16;
        if (mode == LRQ_MODE_ASYM) m[G] = m16;
        for (int b = 0; b < n / LRQ_QK; ++b) {                      // groups are whole blocks
            pack_block(q + b * LRQ_QK, bits, codes + (start / LRQ_QK + b) * 4 * bits);
        }
    }
    return LRQ_OK;
}

// ---- the two-level reference quantizer ---------------------------------------------------------
// A step-by-step port of lrq.quant_two_level (_make_qkx3, _make_qp, _quantize_supers), itself a
// port of ggml's quantize_row_q2_K_impl: float32 arithmetic, each sum accumulated in index order.

#define TL_CODE_MAX   3.0f
#define TL_INDEX_MAX  15.0f
#define TL_QKX3_RMIN  (-0.9f)
#define TL_QKX3_RDELTA 0.05f
#define TL_QKX3_NSTEP 36
#define TL_QP_TRIES   5
#define TL_MAX_SUBS   (LRQ_MAX_GROUP / 16)

// make_qkx3_quants(n, 3, x, w, L, &the_min, ...): returns the scale, *the_min (>= 0), codes L.
static float tl_make_qkx3(const float * x, const float * w, int n, float * the_min, float * L) {
    float mn = x[0], mx = x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < mn) mn = x[i];
        if (x[i] > mx) mx = x[i];
    }
    if (mn > 0.0f) mn = 0.0f;
    float sum_w = 0.0f, sum_x = 0.0f;
    for (int i = 0; i < n; ++i) {
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (!(mx > mn)) {                    // flat sub-block: every code 0, scale 0
        for (int i = 0; i < n; ++i) L[i] = 0.0f;
        *the_min = -mn;
        return 0.0f;
    }
    float iscale = TL_CODE_MAX / (mx - mn);
    float scale  = 1.0f / iscale;
    float best   = 0.0f;
    for (int i = 0; i < n; ++i) {
        float l = nearbyintf(iscale * (x[i] - mn));
        l       = l < 0.0f ? 0.0f : (l > TL_CODE_MAX ? TL_CODE_MAX : l);
        L[i]    = l;
        const float diff = scale * l + mn - x[i];
        best += w[i] * (diff * diff);
    }
    float La[LRQ_MAX_GROUP];
    for (int k = 0; k <= TL_QKX3_NSTEP; ++k) {
        const float isc = (TL_QKX3_RMIN + TL_QKX3_RDELTA * (float) k + TL_CODE_MAX) / (mx - mn);
        float sum_l = 0.0f, sum_l2 = 0.0f, sum_xl = 0.0f;
        for (int i = 0; i < n; ++i) {
            float l = nearbyintf(isc * (x[i] - mn));
            l       = l < 0.0f ? 0.0f : (l > TL_CODE_MAX ? TL_CODE_MAX : l);
            La[i]   = l;
            const float wl = w[i] * l;
            sum_l += wl;
            sum_l2 += wl * l;
            sum_xl += wl * x[i];
        }
        const float D = sum_w * sum_l2 - sum_l * sum_l;
        if (!(D > 0.0f)) continue;
        float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
        float this_min   = (sum_l2 * sum_x - sum_l * sum_xl) / D;
        if (this_min > 0.0f) {
            this_min   = 0.0f;
            this_scale = sum_xl / (sum_l2 > 0.0f ? sum_l2 : 1.0f);
        }
        float mad = 0.0f;
        for (int i = 0; i < n; ++i) {
            const float diff = this_scale * La[i] + this_min - x[i];
            mad += w[i] * (diff * diff);
        }
        if (mad < best) {                // as in ggml, the new min moves every later candidate's range
            memcpy(L, La, (size_t) n * sizeof(float));
            best  = mad;
            scale = this_scale;
            mn    = this_min;
        }
    }
    *the_min = -mn;
    return scale;
}

// make_qp_quants(n, 15, x, L, qw) on x >= 0: returns the scale, indices L.
static float tl_make_qp(const float * x, const float * qw, int n, float * L) {
    float mx = 0.0f;
    for (int i = 0; i < n; ++i) {
        if (x[i] > mx) mx = x[i];
    }
    if (mx < 1e-15f) {
        for (int i = 0; i < n; ++i) L[i] = 0.0f;
        return 0.0f;
    }
    float iscale = TL_INDEX_MAX / mx;
    float best   = 0.0f;
    {
        const float scale = 1.0f / iscale;
        for (int i = 0; i < n; ++i) {
            const float l    = nearbyintf(iscale * x[i]);
            const float diff = x[i] - scale * l;
            best += (qw[i] * diff) * diff;
        }
    }
    for (int k = -4; k <= 4; ++k) {
        if (k == 0) continue;
        const float isc = (0.1f * (float) k + TL_INDEX_MAX) / mx;
        const float sc  = 1.0f / isc;
        float       mse = 0.0f;
        for (int i = 0; i < n; ++i) {
            float l = nearbyintf(isc * x[i]);
            if (l > TL_INDEX_MAX) l = TL_INDEX_MAX;
            const float diff = x[i] - sc * l;
            mse += (qw[i] * diff) * diff;
        }
        if (mse < best) {
            best   = mse;
            iscale = isc;
        }
    }
    float sumlx = 0.0f, suml2 = 0.0f;
    for (int i = 0; i < n; ++i) {
        float l = nearbyintf(iscale * x[i]);
        if (l > TL_INDEX_MAX) l = TL_INDEX_MAX;
        L[i] = l;
        sumlx += (qw[i] * x[i]) * l;
        suml2 += (qw[i] * l) * l;
    }
    for (int it = 0; it < TL_QP_TRIES; ++it) {
        int changed = 0;
        for (int i = 0; i < n; ++i) {
            const float w = qw[i], xi = x[i], li = L[i];
            float slx = sumlx - (w * xi) * li;
            float sl2 = suml2 - (w * li) * li;
            if (!(slx > 0.0f && sl2 > 0.0f)) continue;
            float new_l = nearbyintf((xi * sl2) / slx);
            if (new_l > TL_INDEX_MAX) new_l = TL_INDEX_MAX;
            if (new_l == li) continue;
            slx = slx + (w * xi) * new_l;
            sl2 = sl2 + (w * new_l) * new_l;
            if ((slx * slx) * suml2 > (sumlx * sumlx) * sl2) {
                L[i]    = new_l;
                sumlx   = slx;
                suml2   = sl2;
                changed = 1;
            }
        }
        if (!changed) break;
    }
    return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// One super-block x[n] (n a multiple of sub), importance imp[n] -> codes q[n], d, dmin, sub bytes.
static void tl_quantize_super(const float * x, const float * imp, int n, int sub, uint8_t * q, uint16_t * d16,
                              uint16_t * dmin16, uint8_t * subs) {
    const int ns = n / sub;
    float     sumx2 = 0.0f;
    for (int i = 0; i < n; ++i) sumx2 += x[i] * x[i];
    const float sigma2 = sumx2 / (float) n;
    float weight[LRQ_MAX_GROUP], L[LRQ_MAX_GROUP];
    float scales[TL_MAX_SUBS], mins[TL_MAX_SUBS], sw[TL_MAX_SUBS], Ls[TL_MAX_SUBS], Lm[TL_MAX_SUBS];
    for (int i = 0; i < n; ++i) weight[i] = (imp ? imp[i] : 1.0f) * sqrtf(sigma2 + x[i] * x[i]);
    for (int k = 0; k < ns; ++k) {
        float s = 0.0f;
        for (int i = 0; i < sub; ++i) s += weight[k * sub + i];
        sw[k]     = s;
        scales[k] = tl_make_qkx3(x + k * sub, weight + k * sub, sub, &mins[k], L + k * sub);
        if (!(scales[k] >= 0.0f)) scales[k] = 0.0f;          // never a wrapped index (module doc)
    }
    const float dm = tl_make_qp(scales, sw, ns, Ls);
    const float mm = tl_make_qp(mins, sw, ns, Lm);
    *d16    = lrq_fp32_to_fp16(dm);
    *dmin16 = lrq_fp32_to_fp16(mm);
    const float df = lrq_h2f(*d16), mf = lrq_h2f(*dmin16);
    for (int k = 0; k < ns; ++k) {
        const float d_sub = df * Ls[k], m_sub = mf * Lm[k];
        subs[k] = (uint8_t) ((int) Ls[k] | ((int) Lm[k] << 4));
        for (int i = 0; i < sub; ++i) {
            float l = L[k * sub + i];
            if (d_sub != 0.0f) {                                 // d_sub == 0: ggml keeps the search's codes
                l = nearbyintf((x[k * sub + i] + m_sub) / d_sub);
                l = l > 0.0f ? (l > TL_CODE_MAX ? TL_CODE_MAX : l) : 0.0f;
            }
            q[k * sub + i] = (uint8_t) l;
        }
    }
}

int lrq_quantize_row_two_level_ref(const float * w, int64_t n_in, int super_size, int sub_size,
                                   const float * importance, uint8_t * codes, uint16_t * d, uint16_t * dmin,
                                   uint8_t * sub) {
    const int rc = lrq_check_params(n_in, 2, LRQ_MODE_ASYM, super_size);
    if (rc) return rc;
    if (sub_size != 16 && sub_size != 32) return LRQ_ERR_TWO_LEVEL;
    if (!w || !codes || !d || !dmin || !sub) return LRQ_ERR_ARG;
    uint8_t q[LRQ_MAX_GROUP];
    for (int64_t G = 0, start = 0; start < n_in; ++G, start += super_size) {
        const int n = (int) (n_in - start < super_size ? n_in - start : super_size);   // shorter last super-block
        tl_quantize_super(w + start, importance ? importance + start : NULL, n, sub_size, q, d + G, dmin + G,
                          sub + start / sub_size);
        for (int b = 0; b < n / LRQ_QK; ++b) pack_block(q + b * LRQ_QK, 2, codes + (start / LRQ_QK + b) * 8);
    }
    return LRQ_OK;
}

// ---- reference dequantization ---------------------------------------------------------------------

// W_r[row, 32 b .. 32 b + 31] in double, in lrq.quant.dequantize_codes' order:
//   w = d * (level + beta) (or d * level); w = alpha * w; w = w + m; w = gain * w.
// Two-level layout: d = d_G * sc_k and m = -(dmin_G * mn_k) of the sub-block (both exact in double),
// in lrq.quant_two_level.dequantize_replica's order.
static void dequantize_block_f64(const lrq_weight * w, const lrq_replica * r, int64_t row, int64_t b, double * out) {
    const uint8_t *  p     = w->codes + (size_t) row * w->codes_row_bytes + b * 4 * w->bits;
    const double     z     = (double) lrq_zero_point(w->bits, w->mode);
    const uint16_t * alpha = r ? r->alpha : NULL;
    const uint16_t * beta  = r ? r->beta : NULL;
    for (int j = 0; j < LRQ_QK; ++j) {
        const int64_t G     = (b * LRQ_QK + j) / w->group_size;
        const double  level = (double) lrq_dq_code(p, w->bits, j) - z;   // the kernels' code layout
        double        d     = (double) lrq_h2f(w->d[row * w->d_row_stride + G]);
        double        m     = 0.0;
        if (w->sub) {
            const uint8_t u = w->sub[row * w->sub_row_stride + (b * LRQ_QK + j) / w->sub_size];
            d = d * (double) (u & 15);
            m = -((double) lrq_h2f(w->m[row * w->m_row_stride + G]) * (double) (u >> 4));
        } else if (w->m) {
            m = (double) lrq_h2f(w->m[row * w->m_row_stride + G]);
        }
        double        v;
        if (beta) {
            v = d * (level + (double) lrq_h2f(beta[row * r->beta_row_stride + G * r->beta_group_stride]));
        } else {
            v = d * level;
        }
        if (alpha) v = (double) lrq_h2f(alpha[row * r->alpha_row_stride + G * r->alpha_group_stride]) * v;
        if (w->m) v = v + m;
        if (r && r->gain) v = (double) r->gain[row] * v;
        out[j] = v;
    }
}

// One rounding to float per weight: equals float32(lrq.quant.dequantize) element for element.
void lrq_dequantize_row_ref(const lrq_weight * w, const lrq_replica * r, int64_t row, float * out) {
    double tmp[LRQ_QK];
    for (int64_t b = 0; b < w->n_in / LRQ_QK; ++b) {
        dequantize_block_f64(w, r, row, b, tmp);
        for (int j = 0; j < LRQ_QK; ++j) out[b * LRQ_QK + j] = (float) tmp[j];
    }
}

// ---- reference mat-mul -----------------------------------------------------------------------------

// act_r of one token in double, as lrq.quant.quantize_activations.
static void act_ref(const float * x, int64_t n, float clip, int bits, double * xa) {
    if (clip == 1.0f && bits == 0) {
        for (int64_t i = 0; i < n; ++i) xa[i] = (double) x[i];
        return;
    }
    double amax = 0.0;
    for (int64_t i = 0; i < n; ++i) {
        const double a = fabs((double) x[i]);
        if (a > amax) amax = a;
    }
    const double lim = (double) clip * amax;
    const double s   = bits ? lim / (double) ((1 << (bits - 1)) - 1) : 0.0;
    for (int64_t i = 0; i < n; ++i) {
        double xc = (double) x[i];
        if (xc < -lim) xc = -lim;
        if (xc > lim) xc = lim;
        if (bits == 0) {
            xa[i] = xc;
        } else {
            xa[i] = s == 0.0 ? 0.0 : nearbyint(xc / s) * s;
        }
    }
}

// y[n_tok, row1 - row0] = act_r(x[n_tok, n_in]) . W_r[row0:row1, n_in]^T + bias, all in double.
int lrq_mul_mat_ref(const lrq_weight * w, const lrq_replica * r,
                    const float * x, int64_t x_stride, int64_t n_tok,
                    float * y, int64_t y_stride, int64_t row0, int64_t row1) {
    const int rc = lrq_check_weight(w, r, row0, row1);
    if (rc) return rc;
    if (n_tok < 0 || (n_tok > 0 && (!x || !y || x_stride < w->n_in || y_stride < row1 - row0))) return LRQ_ERR_ARG;
    if (n_tok == 0 || row0 == row1) return LRQ_OK;

    const int64_t n_in = w->n_in;
    double *      xa   = (double *) malloc((size_t) (n_tok * n_in) * sizeof(double));
    double *      wr   = (double *) malloc((size_t) n_in * sizeof(double));
    if (!xa || !wr) {
        free(xa);
        free(wr);
        return LRQ_ERR_NOMEM;
    }
    const float clip = r ? r->act_clip : 1.0f;
    const int   bits = r ? r->act_bits : 0;
    for (int64_t t = 0; t < n_tok; ++t) act_ref(x + t * x_stride, n_in, clip, bits, xa + t * n_in);

    for (int64_t o = row0; o < row1; ++o) {
        for (int64_t b = 0; b < n_in / LRQ_QK; ++b) {   // each row decoded once for all tokens
            dequantize_block_f64(w, r, o, b, wr + b * LRQ_QK);
        }
        const double bias = (r && r->bias) ? (double) r->bias[o] : 0.0;
        for (int64_t t = 0; t < n_tok; ++t) {
            const double * xt  = xa + t * n_in;
            double         acc = 0.0;
            for (int64_t i = 0; i < n_in; ++i) acc += wr[i] * xt[i];
            y[t * y_stride + (o - row0)] = (float) (acc + bias);
        }
    }
    free(xa);
    free(wr);
    return LRQ_OK;
}
