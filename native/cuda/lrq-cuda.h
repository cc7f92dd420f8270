// lrq: CUDA kernels of GGML_OP_LRQ_MUL_MAT (docs/FORMAT.md section 6) -- the host interface.
//
// The arithmetic is the CPU fast path's (native/include/lrq-kernels.h, lrq_mul_mat_q8): activations
// re-quantized to int8 per block of 32 (k-bit activations of 2..8 bits kept exactly), integer dot
// products of codes and int8 activations (__dp4a, as ggml's mmvq / mmq), everything that depends on
// the replica applied once per (row, group):
//   y[t, o] = gain[o] * sum_b [ ad[o,G(b)] * dx[t,b] * (q_b . xq[t,b]) + off[o,G(b)] * sx[t,b] ] + bias[o]
//   ad = alpha * d,  off = ad * (beta - z) + m        (native/include/lrq-dequant.h, shared with ref.c)
// so a GPU and a CPU run of one model see the same rounded activations.
//
// Kernels (native/cuda/lrq-cuda.cuh):
//   quantize_act  one thread block per token: act_r (clip, k-bit levels), int8 per block of 32;
//   mul_mv        decode and batches of up to 8 tokens: one warp per row, each lane a quarter of a
//                 32-weight block per step (two __dp4a), warp-shuffle reduction; the codes of a
//                 block are decoded once for all tokens *and all replicas* of the call, so n_rep > 1
//                 is the fused parallel-replica path (the members of a parallel group share codes,
//                 d and m; each has its own activations, parameters and output);
//   mul_mm        prompt processing: a 64-row x 32-token tile per thread block, one 32-weight block
//                 column per step staged in shared memory as int8 codes + per-row (ad, off).
// This header is plain C (no CUDA headers): ggml-cuda's glue (patches/0008) and the tests include it.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define LRQ_CUDA_MAX_REP    4     // replicas one fused call can serve
#define LRQ_CUDA_MV_WARPS   4     // warps (= rows) per thread block of mul_mv
#define LRQ_CUDA_MV_MAX_TOK 8     // mul_mv serves 1..8 tokens; more go to mul_mm
#define LRQ_CUDA_MM_NR      64    // rows of a mul_mm tile
#define LRQ_CUDA_MM_NT      32    // tokens of a mul_mm tile
#define LRQ_CUDA_MM_THREADS 256
#define LRQ_CUDA_Q_THREADS  256   // threads of quantize_act (8 warps, one 32-block per warp per step)

// One replica's view of a call: its activations (already quantized), parameters and output.
typedef struct {
    const int8_t   * qs;       // [n_tok, n_in] int8 activations (lrq_cuda_act_layout)
    const float    * dx;       // [n_tok, n_in / 32] scale of each block of 32
    const float    * sx;       // [n_tok, n_in / 32] dx * sum(qs) of each block
    const uint16_t * alpha;    // fp16 scale_mult, NULL = 1; element (o, G) at o * alpha_rs + G * alpha_gs
    const uint16_t * beta;     // fp16 grid_offset, NULL = 0; strides as alpha (0 = broadcast)
    const float    * gain;     // [n_out], NULL = 1
    const float    * bias;     // [n_out], NULL = 0
    float          * dst;      // y F32, token t's row at dst + t * n_out
    int32_t          alpha_rs, alpha_gs, beta_rs, beta_gs;
} lrq_cuda_replica;

// Shared codes and base grid, and the replicas of the call (n_rep in 1..LRQ_CUDA_MAX_REP).
typedef struct {
    const uint8_t  * codes;       // planar blocks (FORMAT.md 4), row o at codes + o * nb01
    uint64_t         nb01;        // bytes per row (>= n_in / 32 * 4 * bits)
    const uint16_t * d;           // fp16 [n_out, n_groups]
    const uint16_t * m;           // fp16 [n_out, n_groups], asym only, else NULL
    int32_t          n_in;        // multiple of 32
    int32_t          n_out;
    int32_t          n_tok;
    int32_t          n_groups;    // ceil(n_in / group_size)
    int32_t          group_size;  // 32, 64, 128, 256
    int32_t          mode;        // 0 asym, 1 sym, 2 ternary
    int32_t          bits;        // 1..4
    int32_t          n_rep;
    lrq_cuda_replica rep[LRQ_CUDA_MAX_REP];
} lrq_cuda_args;

// Device buffer of quantized activations of n_tok tokens: qs at offset 0, dx and sx after it
// (each part 256-byte aligned).  lrq_cuda_act_size is the buffer's size in bytes.
size_t lrq_cuda_act_size(int64_t n_tok, int64_t n_in);
void   lrq_cuda_act_layout(void * buf, int64_t n_tok, int64_t n_in, int8_t ** qs, float ** dx, float ** sx);

// Checks what the kernels assume (bits, mode, group size, n_in, n_rep, pointers); NULL = fine,
// else a static message.  The launchers call it and return -1 without launching on a failure.
const char * lrq_cuda_check(const lrq_cuda_args * a);

// act_r and int8 quantization of x (F32, token t's row at x + t * x_stride floats) into buf
// (lrq_cuda_act_size bytes).  act: device float[2] = (clip, bits), or NULL (identity); read by the
// kernel, so the values may change between graph runs.  stream: a cudaStream_t.
// Returns 0, or a cudaError_t value (the launch's), or -1 for bad arguments.
int lrq_cuda_quantize_act(const float * x, int64_t x_stride, int64_t n_tok, int64_t n_in, const float * act,
                          void * buf, void * stream);

// y of every replica of a (activations quantized by lrq_cuda_quantize_act).  n_tok <= 8: mul_mv,
// all replicas in one launch; else mul_mm, one launch per replica.  Same returns.
int lrq_cuda_mul_mat_q8(const lrq_cuda_args * a, void * stream);

#ifdef __cplusplus
}
#endif
