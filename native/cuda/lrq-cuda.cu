// lrq: launchers of the CUDA kernels of GGML_OP_LRQ_MUL_MAT (lrq-cuda.h; kernels in lrq-cuda.cuh).
// Built into ggml-cuda by lrq's CMakeLists.txt when GGML_CUDA is on; `make test` compiles this file
// with the pip nvcc for sm_80 and sm_90 (tests/test_cuda_compile.py), with or without a GPU.
#include "lrq-cuda.cuh"

#include <cuda_runtime.h>

namespace {

template <int BITS, int NC>
cudaError_t launch_mv_rep(const lrq_cuda_args & a, dim3 grid, dim3 block, cudaStream_t st) {
    switch (a.n_rep) {
        case 1: lrq_cuda_mul_mv_kernel<BITS, NC, 1><<<grid, block, 0, st>>>(a); break;
        case 2: lrq_cuda_mul_mv_kernel<BITS, NC, 2><<<grid, block, 0, st>>>(a); break;
        case 3: lrq_cuda_mul_mv_kernel<BITS, NC, 3><<<grid, block, 0, st>>>(a); break;
        default: lrq_cuda_mul_mv_kernel<BITS, NC, 4><<<grid, block, 0, st>>>(a); break;
    }
    return cudaGetLastError();
}

template <int BITS>
cudaError_t launch_bits(const lrq_cuda_args & a, cudaStream_t st) {
    if (a.n_tok <= LRQ_CUDA_MV_MAX_TOK) {
        // the smallest column count that covers the tokens in one launch
        const int   nc    = a.n_tok <= 1 ? 1 : a.n_tok <= 2 ? 2 : a.n_tok <= 4 ? 4 : 8;
        const dim3  grid((a.n_out + LRQ_CUDA_MV_WARPS - 1) / LRQ_CUDA_MV_WARPS, (a.n_tok + nc - 1) / nc);
        const dim3  block(32, LRQ_CUDA_MV_WARPS);
        switch (nc) {
            case 1: return launch_mv_rep<BITS, 1>(a, grid, block, st);
            case 2: return launch_mv_rep<BITS, 2>(a, grid, block, st);
            case 4: return launch_mv_rep<BITS, 4>(a, grid, block, st);
            default: return launch_mv_rep<BITS, 8>(a, grid, block, st);
        }
    }
    const dim3 grid((a.n_out + LRQ_CUDA_MM_NR - 1) / LRQ_CUDA_MM_NR, (a.n_tok + LRQ_CUDA_MM_NT - 1) / LRQ_CUDA_MM_NT);
    for (int r = 0; r < a.n_rep; ++r) {   // codes read once per replica: the tile is compute-bound
        lrq_cuda_mul_mm_kernel<BITS><<<grid, LRQ_CUDA_MM_THREADS, LRQ_CUDA_MM_SHMEM, st>>>(a, r);
        const cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess) return e;
    }
    return cudaSuccess;
}

}  // namespace

extern "C" int lrq_cuda_quantize_act(const float * x, int64_t x_stride, int64_t n_tok, int64_t n_in, const float * act,
                                     void * buf, void * stream) {
    if (!x || !buf || n_in <= 0 || n_in % LRQ_DQ_QK || x_stride < n_in || n_tok < 0) return -1;
    if (n_tok == 0) return 0;
    int8_t * qs;
    float *  dx;
    float *  sx;
    lrq_cuda_act_layout(buf, n_tok, n_in, &qs, &dx, &sx);
    lrq_cuda_quantize_act_kernel<<<(unsigned) n_tok, LRQ_CUDA_Q_THREADS, (LRQ_CUDA_Q_THREADS / 32) * sizeof(float),
                                   (cudaStream_t) stream>>>(x, x_stride, act, (int) n_in, qs, dx, sx);
    return (int) cudaGetLastError();
}

extern "C" int lrq_cuda_mul_mat_q8(const lrq_cuda_args * a, void * stream) {
    if (lrq_cuda_check(a)) return -1;
    if (a->n_tok == 0) return 0;
    cudaStream_t st = (cudaStream_t) stream;
    switch (a->bits) {
        case 1: return (int) launch_bits<1>(*a, st);
        case 2: return (int) launch_bits<2>(*a, st);
        case 3: return (int) launch_bits<3>(*a, st);
        default: return (int) launch_bits<4>(*a, st);
    }
}
