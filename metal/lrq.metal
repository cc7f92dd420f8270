// lrq: Metal kernels of GGML_OP_LRQ_MUL_MAT (docs/FORMAT.md section 6), for Apple Silicon.
//
//   y[t, o] = gain[o] * sum_G [ ad[o,G] * sum_{i in G} q[o,i] xa[t,i] + off[o,G] * sum_{i in G} xa[t,i] ] + bias[o]
//   ad = alpha * d,  off = ad * (beta - z) + m          (native/include/lrq-dequant.h)
//   xa = act_r(x): clip to c * max|x_t|, optionally k-bit levels (per token)
//
// Three kernels, as ggml-metal's own mul_mat:
//   kernel_lrq_mul_mv_b{bits}_c{NC}: decode (NC = 1) and batches of 2..8 tokens (NC = 2, 4, 8): one
//       simdgroup per LRQ_METAL_MV_NR0 rows, each lane a quarter of a 32-weight block per step,
//       partial sums reduced with simd_sum; the codes of a block are decoded once for NC tokens;
//   kernel_lrq_mul_mm_b{bits}: prompt processing, a 64 x 32 output tile per threadgroup; each step
//       dequantizes one block column of the weight tile and one of the activations into threadgroup
//       memory (float: activations keep their precision) and multiplies 8x8 simdgroup matrices.
// Activations are float (no int8 re-quantization as on the CPU fast path), sums float.
//
// The same file is compiled by g++ through tests/metal/shim (tests/test_metal.py): keep to MSL
// that the shim emulates (scalars, uint3, simd_sum / simd_max, threadgroup_barrier, simdgroup
// float 8x8 matrices).  Its own headers are inlined by the host before compilation (patches/0007).
#include <metal_stdlib>
using namespace metal;

#include "lrq-dequant.h"
#include "lrq-kargs.h"

// (ad, off) of row `row`, group G (lrq-dequant.h); absent sources take their defaults.
inline void lrq_factors(constant lrq_metal_kargs & args, device const half * sd, device const half * sm,
                        device const half * salpha, device const half * sbeta, int row, int G, float z,
                        thread float & ad, thread float & off) {
    const int   pg    = row * args.n_groups + G;
    const float alpha = (args.flags & LRQ_METAL_HAS_ALPHA) ? (float) salpha[row * args.alpha_rs + G * args.alpha_gs] : 1.0f;
    const float beta  = (args.flags & LRQ_METAL_HAS_BETA)  ? (float) sbeta[row * args.beta_rs + G * args.beta_gs]   : 0.0f;
    const float m     = (args.flags & LRQ_METAL_HAS_MIN)   ? (float) sm[pg] : 0.0f;
    ad  = lrq_dq_ad((float) sd[pg], alpha);
    off = lrq_dq_off(ad, beta, z, m);
}

// act_r of one activation: clamp to [-lim, lim], then k-bit levels of step s (k > 0).
inline float lrq_act(float v, float lim, float s, int k) {
    v = clamp(v, -lim, lim);
    if (k > 0) {
        v = s == 0.0f ? 0.0f : rint(v / s) * s;
    }
    return v;
}

// The activation of a replica is the identity unless act = (c, k) is bound and not (1, 0).
inline bool lrq_act_on(constant lrq_metal_kargs & args, device const float * sact) {
    return (args.flags & LRQ_METAL_HAS_ACT) && !(sact[0] == 1.0f && sact[1] == 0.0f);
}

// (lim, s) of a token from its max |x| (FORMAT.md 6): lim = c * amax, s = lim / (2^(k-1) - 1).
inline void lrq_act_params(device const float * sact, float amax, thread float & lim, thread float & s) {
    const int k = (int) sact[1];
    lim = sact[0] * amax;
    s   = k > 0 ? lim / (float) ((1 << (k - 1)) - 1) : 0.0f;
}

// ---- mat-vec / few columns ------------------------------------------------------------------------

template <int BITS, short NC>
kernel void kernel_lrq_mul_mv(
        constant lrq_metal_kargs & args,
        device const char  * src0,      // codes [n_out rows of nb01 bytes]
        device const char  * src1,      // x F32 [n_tok rows of nb11 bytes]
        device const half  * sd,        // d [n_out, n_groups]
        device const half  * sm,        // m, asym
        device const half  * salpha,
        device const half  * sbeta,
        device const float * sgain,
        device const float * sbias,
        device const float * sact,
        device       float * dst,       // y F32 [n_tok, n_out]
        uint3  tgpig [[threadgroup_position_in_grid]],
        ushort tiisg [[thread_index_in_simdgroup]],
        ushort sgitg [[simdgroup_index_in_threadgroup]]) {
    const int   r0  = ((int) tgpig.x * LRQ_METAL_MV_NSG + sgitg) * LRQ_METAL_MV_NR0;   // first row
    const int   t0  = (int) tgpig.y * NC;                                               // first token
    const int   nb  = args.n_in / LRQ_DQ_QK;
    const int   bb  = lrq_dq_block_bytes(BITS);
    const float z   = lrq_dq_zero_point(BITS, args.mode);
    const bool  act = lrq_act_on(args, sact);
    const int   k   = act ? (int) sact[1] : 0;

    // columns past the last token repeat it: computed, never stored
    device const float * xr[NC];
    float lim[NC], stp[NC];
    for (short c = 0; c < NC; ++c) {
        xr[c]  = (device const float *) (src1 + (uint64_t) min(t0 + c, args.n_tok - 1) * args.nb11);
        lim[c] = 0.0f;
        stp[c] = 0.0f;
        if (act) {
            float amax = 0.0f;
            for (int i = tiisg; i < args.n_in; i += 32) {
                amax = max(amax, fabs(xr[c][i]));
            }
            lrq_act_params(sact, simd_max(amax), lim[c], stp[c]);
        }
    }

    float acc[LRQ_METAL_MV_NR0][NC];
    for (short r = 0; r < LRQ_METAL_MV_NR0; ++r) {
        for (short c = 0; c < NC; ++c) {
            acc[r][c] = 0.0f;
        }
    }

    const short il = tiisg % 4;   // weights 8 il .. 8 il + 7 of the block
    for (int ib = tiisg / 4; ib < nb; ib += 8) {
        const int G = lrq_dq_group(ib, args.group_size);
        float xs[NC][8], sx[NC];
        for (short c = 0; c < NC; ++c) {
            sx[c] = 0.0f;
            for (short j = 0; j < 8; ++j) {
                float v = xr[c][ib * LRQ_DQ_QK + il * 8 + j];
                if (act) {
                    v = lrq_act(v, lim[c], stp[c], k);
                }
                xs[c][j] = v;
                sx[c] += v;
            }
        }
        for (short r = 0; r < LRQ_METAL_MV_NR0; ++r) {
            const int row = r0 + r;
            if (row >= args.n_out) {
                break;   // the same for every lane of the simdgroup
            }
            device const uint8_t * blk = (device const uint8_t *) (src0 + (uint64_t) row * args.nb01) + ib * bb;
            float q[8];
            for (short j = 0; j < 8; ++j) {
                q[j] = (float) lrq_dq_code(blk, BITS, il * 8 + j);
            }
            float ad, off;
            lrq_factors(args, sd, sm, salpha, sbeta, row, G, z, ad, off);
            for (short c = 0; c < NC; ++c) {
                float sq = 0.0f;
                for (short j = 0; j < 8; ++j) {
                    sq += q[j] * xs[c][j];
                }
                acc[r][c] += ad * sq + off * sx[c];
            }
        }
    }

    for (short r = 0; r < LRQ_METAL_MV_NR0; ++r) {
        const int row = r0 + r;
        if (row >= args.n_out) {
            break;
        }
        const float gain = (args.flags & LRQ_METAL_HAS_GAIN) ? sgain[row] : 1.0f;
        const float bias = (args.flags & LRQ_METAL_HAS_BIAS) ? sbias[row] : 0.0f;
        for (short c = 0; c < NC; ++c) {
            const float tot = simd_sum(acc[r][c]);
            if (tiisg == 0 && t0 + c < args.n_tok) {
                dst[(uint64_t) (t0 + c) * args.n_out + row] = gain * tot + bias;
            }
        }
    }
}

typedef decltype(kernel_lrq_mul_mv<2, 1>) lrq_mul_mv_t;

template [[host_name("kernel_lrq_mul_mv_b1_c1")]] kernel lrq_mul_mv_t kernel_lrq_mul_mv<1, 1>;
template [[host_name("kernel_lrq_mul_mv_b1_c2")]] kernel lrq_mul_mv_t kernel_lrq_mul_mv<1, 2>;
template [[host_name("kernel_lrq_mul_mv_b1_c4")]] kernel lrq_mul_mv_t kernel_lrq_mul_mv<1, 4>;
template [[host_name("kernel_lrq_mul_mv_b1_c8")]] kernel lrq_mul_mv_t kernel_lrq_mul_mv<1, 8>;
template [[host_name("kernel_lrq_mul_mv_b2_c1")]] kernel lrq_mul_mv_t kernel_lrq_mul_mv<2, 1>;
template [[host_name("kernel_lrq_mul_mv_b2_c2")]] kernel lrq_mul_mv_t kernel_lrq_mul_mv<2, 2>;
template [[host_name("kernel_lrq_mul_mv_b2_c4")]] kernel lrq_mul_mv_t kernel_lrq_mul_mv<2, 4>;
template [[host_name("kernel_lrq_mul_mv_b2_c8")]] kernel lrq_mul_mv_t kernel_lrq_mul_mv<2, 8>;
template [[host_name("kernel_lrq_mul_mv_b3_c1")]] kernel lrq_mul_mv_t kernel_lrq_mul_mv<3, 1>;
template [[host_name("kernel_lrq_mul_mv_b3_c2")]] kernel lrq_mul_mv_t kernel_lrq_mul_mv<3, 2>;
template [[host_name("kernel_lrq_mul_mv_b3_c4")]] kernel lrq_mul_mv_t kernel_lrq_mul_mv<3, 4>;
template [[host_name("kernel_lrq_mul_mv_b3_c8")]] kernel lrq_mul_mv_t kernel_lrq_mul_mv<3, 8>;
template [[host_name("kernel_lrq_mul_mv_b4_c1")]] kernel lrq_mul_mv_t kernel_lrq_mul_mv<4, 1>;
template [[host_name("kernel_lrq_mul_mv_b4_c2")]] kernel lrq_mul_mv_t kernel_lrq_mul_mv<4, 2>;
template [[host_name("kernel_lrq_mul_mv_b4_c4")]] kernel lrq_mul_mv_t kernel_lrq_mul_mv<4, 4>;
template [[host_name("kernel_lrq_mul_mv_b4_c8")]] kernel lrq_mul_mv_t kernel_lrq_mul_mv<4, 8>;

// ---- tiled mat-mat --------------------------------------------------------------------------------
//
// Threadgroup memory (LRQ_METAL_MM_SHMEM bytes, floats):
//   sa [64 rows][32 weights]   the weight tile of one block column (W_r / gain); at the end the
//                              64 x 32 result tile [rows][tokens]
//   sb [32 weights][32 tokens] the activation tile, act_r applied
//   sp [128] partial maxima of |x|, then [32][2] (lim, s) per token

template <int BITS>
kernel void kernel_lrq_mul_mm(
        constant lrq_metal_kargs & args,
        device const char  * src0,
        device const char  * src1,
        device const half  * sd,
        device const half  * sm,
        device const half  * salpha,
        device const half  * sbeta,
        device const float * sgain,
        device const float * sbias,
        device const float * sact,
        device       float * dst,
        threadgroup  char  * shmem [[threadgroup(0)]],
        uint3  tgpig [[threadgroup_position_in_grid]],
        ushort tiitg [[thread_index_in_threadgroup]],
        ushort sgitg [[simdgroup_index_in_threadgroup]]) {
    constexpr int NR = LRQ_METAL_MM_NR, NT = LRQ_METAL_MM_NT, NK = LRQ_DQ_QK;
    threadgroup float * sa = (threadgroup float *) shmem;
    threadgroup float * sb = sa + NR * NK;
    threadgroup float * sp = sb + NK * NT;

    const int   r0  = (int) tgpig.y * NR;
    const int   t0  = (int) tgpig.x * NT;
    const int   nb  = args.n_in / LRQ_DQ_QK;
    const int   bb  = lrq_dq_block_bytes(BITS);
    const float z   = lrq_dq_zero_point(BITS, args.mode);
    const bool  act = lrq_act_on(args, sact);
    const int   k   = act ? (int) sact[1] : 0;

    // loaders: thread -> (row, half block) of the weight tile, (token, quarter block) of the activations
    const int  ar   = tiitg / 2, ah = tiitg % 2;
    const int  bt   = tiitg / 4, bp = tiitg % 4;
    const int  arow = r0 + ar;
    const bool aok  = arow < args.n_out;
    const int  btok = t0 + bt;
    const bool bok  = btok < args.n_tok;
    device const float * xrow = (device const float *) (src1 + (uint64_t) min(btok, args.n_tok - 1) * args.nb11);

    float lim = 0.0f, stp = 0.0f;
    if (act) {   // max |x| of each of the 32 tokens: 4 threads per token, then one
        float amax = 0.0f;
        for (int i = bp; i < args.n_in; i += 4) {
            amax = max(amax, fabs(xrow[i]));
        }
        sp[tiitg] = amax;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (tiitg < NT) {
            const float a = max(max(sp[4 * tiitg], sp[4 * tiitg + 1]), max(sp[4 * tiitg + 2], sp[4 * tiitg + 3]));
            float l, s;
            lrq_act_params(sact, a, l, s);
            sp[128 + 2 * tiitg]     = l;
            sp[128 + 2 * tiitg + 1] = s;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        lim = sp[128 + 2 * bt];
        stp = sp[128 + 2 * bt + 1];
    }

    simdgroup_float8x8 mc[8];
    for (short i = 0; i < 8; ++i) {
        mc[i] = make_filled_simdgroup_matrix<float, 8>(0.0f);
    }

    for (int ib = 0; ib < nb; ++ib) {
        if (aok) {
            device const uint8_t * blk = (device const uint8_t *) (src0 + (uint64_t) arow * args.nb01) + ib * bb;
            float ad, off;
            lrq_factors(args, sd, sm, salpha, sbeta, arow, lrq_dq_group(ib, args.group_size), z, ad, off);
            for (short j = 0; j < 16; ++j) {
                sa[ar * NK + ah * 16 + j] = ad * (float) lrq_dq_code(blk, BITS, ah * 16 + j) + off;
            }
        } else {
            for (short j = 0; j < 16; ++j) {
                sa[ar * NK + ah * 16 + j] = 0.0f;
            }
        }
        for (short j = 0; j < 8; ++j) {
            float v = 0.0f;
            if (bok) {
                v = xrow[ib * NK + bp * 8 + j];
                if (act) {
                    v = lrq_act(v, lim, stp, k);
                }
            }
            sb[(bp * 8 + j) * NT + bt] = v;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);

        // simdgroup sgitg: rows 16 sgitg .. 16 sgitg + 15, all 32 tokens
        for (short kk = 0; kk < NK; kk += 8) {
            simdgroup_float8x8 ma[2], mb[4];
            for (short i = 0; i < 2; ++i) {
                simdgroup_load(ma[i], sa + (16 * sgitg + 8 * i) * NK + kk, NK);
            }
            for (short j = 0; j < 4; ++j) {
                simdgroup_load(mb[j], sb + kk * NT + 8 * j, NT);
            }
            for (short i = 0; i < 2; ++i) {
                for (short j = 0; j < 4; ++j) {
                    simdgroup_multiply_accumulate(mc[4 * i + j], ma[i], mb[j], mc[4 * i + j]);
                }
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }

    // result tile [rows][tokens] into sa (every simdgroup is past its last read of sa)
    for (short i = 0; i < 2; ++i) {
        for (short j = 0; j < 4; ++j) {
            simdgroup_store(mc[4 * i + j], sa + (16 * sgitg + 8 * i) * NT + 8 * j, NT);
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    for (int e = tiitg; e < NR * NT; e += 32 * LRQ_METAL_MM_NSG) {
        const int rr = e % NR, tt = e / NR;
        const int row = r0 + rr, tok = t0 + tt;
        if (row < args.n_out && tok < args.n_tok) {
            const float gain = (args.flags & LRQ_METAL_HAS_GAIN) ? sgain[row] : 1.0f;
            const float bias = (args.flags & LRQ_METAL_HAS_BIAS) ? sbias[row] : 0.0f;
            dst[(uint64_t) tok * args.n_out + row] = gain * sa[rr * NT + tt] + bias;
        }
    }
}

typedef decltype(kernel_lrq_mul_mm<2>) lrq_mul_mm_t;

template [[host_name("kernel_lrq_mul_mm_b1")]] kernel lrq_mul_mm_t kernel_lrq_mul_mm<1>;
template [[host_name("kernel_lrq_mul_mm_b2")]] kernel lrq_mul_mm_t kernel_lrq_mul_mm<2>;
template [[host_name("kernel_lrq_mul_mm_b3")]] kernel lrq_mul_mm_t kernel_lrq_mul_mm<3>;
template [[host_name("kernel_lrq_mul_mm_b4")]] kernel lrq_mul_mm_t kernel_lrq_mul_mm<4>;
