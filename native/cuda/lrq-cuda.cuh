// lrq: the CUDA kernels of GGML_OP_LRQ_MUL_MAT (host interface and arithmetic: lrq-cuda.h).
//
// Compiled two ways: by nvcc (native/cuda/lrq-cuda.cu, which has the launchers) and by g++ with
// LRQ_CUDA_SHIM defined, through tests/cuda/shim/lrq-cuda-shim.h, which emulates a thread block
// with one std::thread per CUDA thread (tests/test_cuda_emulation.py runs these kernel bodies on the
// CPU against lrq_mul_mat_ref and the CPU fast path).  So: only the CUDA that the shim emulates --
// threadIdx / blockIdx, __syncthreads, __shfl_xor_sync over full warps, __dp4a, __fdiv_rn, dynamic
// shared memory through LRQ_CU_SHMEM, lrq_cu_h2f for fp16 loads.  The decoding of codes, the zero point,
// the group of a block and the (ad, off) factors are lrq-dequant.h's, the same functions as
// native/lrq/ref.c and metal/lrq.metal.
#pragma once

#include "lrq-cuda.h"
#include "lrq-dequant.h"

#include <math.h>
#include <stdint.h>

#if defined(LRQ_CUDA_SHIM)
// the shim defines __global__ / __device__ / __forceinline__, threadIdx, __syncthreads, ...,
// lrq_cu_h2f and lrq_cuda_shim::shmem()
#define LRQ_CU_SHMEM(T, name) T * name = (T *) lrq_cuda_shim::shmem()
#else
#include <cuda_fp16.h>
static __device__ __forceinline__ float lrq_cu_h2f(uint16_t h) { return __half2float(__ushort_as_half(h)); }
#define LRQ_CU_SHMEM(T, name)                                 \
    extern __shared__ __align__(16) char lrq_cu_shmem_raw[]; \
    T * name = (T *) lrq_cu_shmem_raw
#endif

#define LRQ_CU_FULL_MASK 0xffffffffu

static __device__ __forceinline__ float lrq_cu_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(LRQ_CU_FULL_MASK, v, o);
    return v;
}

static __device__ __forceinline__ int lrq_cu_warp_sum_i(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(LRQ_CU_FULL_MASK, v, o);
    return v;
}

static __device__ __forceinline__ float lrq_cu_warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(LRQ_CU_FULL_MASK, v, o));
    return v;
}

// Codes 8 * quarter .. 8 * quarter + 7 of a block as two words of four int8 (codes < 16: the
// signed bytes of __dp4a read them unchanged).
template <int BITS>
static __device__ __forceinline__ void lrq_cu_codes8(const uint8_t * blk, int quarter, int & w0, int & w1) {
    w0 = 0;
    w1 = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        w0 |= lrq_dq_code(blk, BITS, 8 * quarter + j) << (8 * j);
        w1 |= lrq_dq_code(blk, BITS, 8 * quarter + 4 + j) << (8 * j);
    }
}

// (ad, off) of row `row`, group G for replica r (absent parameters take their defaults).
static __device__ __forceinline__ void lrq_cu_factors(const lrq_cuda_args & a, const lrq_cuda_replica & r, int row,
                                                      int G, float d, float m, float z, float & ad, float & off) {
    const float alpha = r.alpha ? lrq_cu_h2f(r.alpha[row * r.alpha_rs + G * r.alpha_gs]) : 1.0f;
    const float beta  = r.beta ? lrq_cu_h2f(r.beta[row * r.beta_rs + G * r.beta_gs]) : 0.0f;
    (void) a;
    ad  = lrq_dq_ad(d, alpha);
    off = lrq_dq_off(ad, beta, z, m);
}

// ---- activations ----------------------------------------------------------------------------------
//
// Block t (LRQ_CUDA_Q_THREADS threads) quantizes token t: max |x| over the row when act_r is on
// (lim = clip * amax, k-bit step s = lim / (2^(k-1) - 1)), then warp w takes the blocks of 32
// w, w + 8, ..., lane j element j.  2 <= k <= 8: the spec's levels rint(clamp(x) / s) are the int8
// values and s the scale of every block (act_r exactly); else int8 per block with scale amax/127.
// The steps are lrq_quantize_act_q8's (native/q8.c), in the same precision -- clip and k-bit
// levels in double, the int8 rounding in float -- so a GPU and a CPU run of a model quantize an
// activation to the same int8 value (tests/test_cuda_emulation.py: no value differs).  The double
// arithmetic is a few operations per activation, next to nothing against the mat-mul.
// Shared memory: LRQ_CUDA_Q_THREADS / 32 floats.
__global__ void lrq_cuda_quantize_act_kernel(const float * x, int64_t x_stride, const float * act, int n_in,
                                             int8_t * qs, float * dx, float * sx) {
    LRQ_CU_SHMEM(float, red);
    const int     t    = blockIdx.x;
    const int     tid  = threadIdx.x;
    const int     lane = tid % 32, warp = tid / 32;
    const int     nw   = LRQ_CUDA_Q_THREADS / 32;
    const int     nb   = n_in / LRQ_DQ_QK;
    const float * xr   = x + (int64_t) t * x_stride;

    const bool on = act && !(act[0] == 1.0f && act[1] == 0.0f);
    double     lim = INFINITY, s = 0.0;
    int        k   = 0;
    if (on) {
        float amax = 0.0f;
        for (int i = tid; i < n_in; i += LRQ_CUDA_Q_THREADS) amax = fmaxf(amax, fabsf(xr[i]));
        amax = lrq_cu_warp_max(amax);
        if (lane == 0) red[warp] = amax;
        __syncthreads();
        amax = red[0];
        for (int w = 1; w < nw; ++w) amax = fmaxf(amax, red[w]);
        k   = (int) act[1];
        lim = (double) act[0] * (double) amax;
        s   = k > 0 ? lim / (double) ((1 << (k - 1)) - 1) : 0.0;
    }
    for (int b = warp; b < nb; b += nw) {
        double v = (double) xr[b * LRQ_DQ_QK + lane];
        v        = fmin(fmax(v, -lim), lim);
        float q, d;
        if (k >= 2 && k <= 8) {
            q = s == 0.0 ? 0.0f : (float) rint(v / s);
            d = (float) s;
        } else {
            if (k > 0) v = s == 0.0 ? 0.0 : rint(v / s) * s;   // act_bits 9..16
            const float xa = (float) v;
            const float am = lrq_cu_warp_max(fabsf(xa));
            // correctly rounded divisions also under ggml-cuda's -use_fast_math: the int8 values
            // and scales stay the CPU's
            d              = __fdiv_rn(am, 127.0f);
            const float id = am > 0.0f ? __fdiv_rn(127.0f, am) : 0.0f;
            q              = fminf(fmaxf(rintf(xa * id), -127.0f), 127.0f);
        }
        qs[(int64_t) t * n_in + b * LRQ_DQ_QK + lane] = (int8_t) q;
        const int isum = lrq_cu_warp_sum_i((int) q);
        if (lane == 0) {
            dx[(int64_t) t * nb + b] = d;
            sx[(int64_t) t * nb + b] = d * (float) isum;
        }
    }
}

// ---- mat-vec: decode, up to 8 tokens, up to LRQ_CUDA_MAX_REP replicas -----------------------------
//
// Block (32, LRQ_CUDA_MV_WARPS): warp y computes row blockIdx.x * LRQ_CUDA_MV_WARPS + y for tokens
// blockIdx.y * NC .. + NC - 1 and the R replicas of the call.  Lane l takes quarter l % 4 of the
// blocks l / 4, l / 4 + 8, ...: eight consecutive blocks per step, so a warp reads 8 * 4 * BITS
// contiguous bytes of codes.  Each quarter's codes are decoded once and used for NC x R dot
// products.  No shared memory; a warp past the last row returns whole.
template <int BITS, int NC, int R>
__global__ void lrq_cuda_mul_mv_kernel(const lrq_cuda_args a) {
    const int row  = blockIdx.x * LRQ_CUDA_MV_WARPS + threadIdx.y;
    const int lane = threadIdx.x;
    if (row >= a.n_out) return;
    const int      t0 = blockIdx.y * NC;
    const int      nb = a.n_in / LRQ_DQ_QK;
    const int      il = lane % 4;
    const float    z  = lrq_dq_zero_point(BITS, a.mode);
    const uint8_t * codes = a.codes + (uint64_t) row * a.nb01;

    float acc[R][NC];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int c = 0; c < NC; ++c) acc[r][c] = 0.0f;

    for (int ib = lane / 4; ib < nb; ib += 8) {
        int w0, w1;
        lrq_cu_codes8<BITS>(codes + ib * lrq_dq_block_bytes(BITS), il, w0, w1);
        const int   G  = lrq_dq_group(ib, a.group_size);
        const int   pg = row * a.n_groups + G;
        const float d  = lrq_cu_h2f(a.d[pg]);
        const float m  = a.m ? lrq_cu_h2f(a.m[pg]) : 0.0f;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const lrq_cuda_replica & rp = a.rep[r];
            float ad, off;
            lrq_cu_factors(a, rp, row, G, d, m, z, ad, off);
#pragma unroll
            for (int c = 0; c < NC; ++c) {
                // columns past the last token repeat it: computed, never stored
                const int64_t t    = t0 + c < a.n_tok ? t0 + c : a.n_tok - 1;
                const int   * xq   = (const int *) (rp.qs + t * a.n_in + ib * LRQ_DQ_QK + 8 * il);
                const int     sumi = __dp4a(w1, xq[1], __dp4a(w0, xq[0], 0));
                const int64_t tb   = t * nb + ib;
                acc[r][c] += ad * (rp.dx[tb] * (float) sumi) + (il == 0 ? off * rp.sx[tb] : 0.0f);
            }
        }
    }

#pragma unroll
    for (int r = 0; r < R; ++r) {
        const lrq_cuda_replica & rp   = a.rep[r];
        const float              gain = rp.gain ? rp.gain[row] : 1.0f;
        const float              bias = rp.bias ? rp.bias[row] : 0.0f;
#pragma unroll
        for (int c = 0; c < NC; ++c) {
            const float tot = lrq_cu_warp_sum(acc[r][c]);
            if (lane == 0 && t0 + c < a.n_tok) rp.dst[(int64_t) (t0 + c) * a.n_out + row] = gain * tot + bias;
        }
    }
}

// ---- tiled mat-mat: prompt processing ---------------------------------------------------------------
//
// Block of LRQ_CUDA_MM_THREADS threads, tile rows blockIdx.x * 64 .., tokens blockIdx.y * 32 ..,
// replica `rep` of the call.  Per 32-weight block column, in shared memory:
//   wq  [64][9] int   the tile's codes, 8 words of 4 int8 per row (+1: no bank conflicts)
//   fac [64][2] float (ad, off) of each row's group
//   xq  [32][9] int   the activations of the 32 tokens, same layout
//   xd, xs [32]       dx and sx of each token's block
// Loads: thread -> (row, quarter) of the codes, (token, word) of the activations.  Compute: thread
// -> token tid % 32 and rows 8 * (tid / 32) .. + 7 (a warp reads one code row: a broadcast).
#define LRQ_CUDA_MM_SHMEM ((LRQ_CUDA_MM_NR * 9 + LRQ_CUDA_MM_NR * 2 + LRQ_CUDA_MM_NT * 9 + 2 * LRQ_CUDA_MM_NT) * 4)

template <int BITS>
__global__ void lrq_cuda_mul_mm_kernel(const lrq_cuda_args a, int rep) {
    constexpr int NR = LRQ_CUDA_MM_NR, NT = LRQ_CUDA_MM_NT;
    constexpr int RPT = NR * NT / LRQ_CUDA_MM_THREADS;   // rows per thread: 8
    LRQ_CU_SHMEM(int, wq);
    float * fac = (float *) (wq + NR * 9);
    int   * xq  = (int *) (fac + NR * 2);
    float * xd  = (float *) (xq + NT * 9);
    float * xs  = xd + NT;

    const lrq_cuda_replica & rp = a.rep[rep];
    const int   tid = threadIdx.x;
    const int   r0  = blockIdx.x * NR, t0 = blockIdx.y * NT;
    const int   nb  = a.n_in / LRQ_DQ_QK;
    const float z   = lrq_dq_zero_point(BITS, a.mode);

    const int  lr = tid / 4, lq = tid % 4;     // code loader: row, quarter
    const int  lrow = r0 + lr;
    const bool rok  = lrow < a.n_out;
    const int  lt = tid / 8, lw = tid % 8;     // activation loader: token, word
    const int  ltok = t0 + lt;
    const bool tok_ok = ltok < a.n_tok;
    const int  ct = tid % 32, cr = (tid / 32) * RPT;   // compute: token, first row

    float acc[RPT];
#pragma unroll
    for (int i = 0; i < RPT; ++i) acc[i] = 0.0f;

    for (int ib = 0; ib < nb; ++ib) {
        int w0 = 0, w1 = 0;
        if (rok) {
            lrq_cu_codes8<BITS>(a.codes + (uint64_t) lrow * a.nb01 + ib * lrq_dq_block_bytes(BITS), lq, w0, w1);
            if (lq == 0) {
                const int pg = lrow * a.n_groups + lrq_dq_group(ib, a.group_size);
                float     ad, off;
                lrq_cu_factors(a, rp, lrow, lrq_dq_group(ib, a.group_size), lrq_cu_h2f(a.d[pg]),
                               a.m ? lrq_cu_h2f(a.m[pg]) : 0.0f, z, ad, off);
                fac[2 * lr]     = ad;
                fac[2 * lr + 1] = off;
            }
        } else if (lq == 0) {
            fac[2 * lr]     = 0.0f;
            fac[2 * lr + 1] = 0.0f;
        }
        wq[lr * 9 + 2 * lq]     = w0;
        wq[lr * 9 + 2 * lq + 1] = w1;
        xq[lt * 9 + lw] = tok_ok ? ((const int *) (rp.qs + (int64_t) ltok * a.n_in + ib * LRQ_DQ_QK))[lw] : 0;
        if (tid < NT) {
            const bool ok = t0 + tid < a.n_tok;
            xd[tid] = ok ? rp.dx[(int64_t) (t0 + tid) * nb + ib] : 0.0f;
            xs[tid] = ok ? rp.sx[(int64_t) (t0 + tid) * nb + ib] : 0.0f;
        }
        __syncthreads();

        const float dxt = xd[ct], sxt = xs[ct];
#pragma unroll
        for (int i = 0; i < RPT; ++i) {
            const int * wr   = wq + (cr + i) * 9;
            const int * xr   = xq + ct * 9;
            int         sumi = 0;
#pragma unroll
            for (int w = 0; w < 8; ++w) sumi = __dp4a(wr[w], xr[w], sumi);
            acc[i] += fac[2 * (cr + i)] * (dxt * (float) sumi) + fac[2 * (cr + i) + 1] * sxt;
        }
        __syncthreads();
    }

    const int tok = t0 + ct;
    if (tok < a.n_tok) {
#pragma unroll
        for (int i = 0; i < RPT; ++i) {
            const int row = r0 + cr + i;
            if (row < a.n_out) {
                const float gain = rp.gain ? rp.gain[row] : 1.0f;
                const float bias = rp.bias ? rp.bias[row] : 0.0f;
                rp.dst[(int64_t) tok * a.n_out + row] = gain * acc[i] + bias;
            }
        }
    }
}
