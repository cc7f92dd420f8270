// lrq: GGML_OP_LRQ_MUL_MAT on ggml-cuda (native/cuda/lrq-cuda-ggml.c; the calls in ggml-cuda.cu are
// patches/0008).  Plain C with no CUDA headers: the mapping of ggml tensors onto the kernels'
// arguments is compiled and tested on machines without CUDA (tests/test_cuda_emulation.py).
#pragma once

#include "ggml.h"

#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

// supports_op of ggml-cuda for GGML_OP_LRQ_MUL_MAT: the source and result types the kernels take
// (every LRQ type, mode and group size; F16 scale / min / scale_mult / grid_offset; F32
// activations, gain, bias, act).  Types only, as the CPU backend's answer: llama's loader probes
// with dummy shapes (lrq_make_supports_test_op), and shapes were checked when the node was built.
bool ggml_lrq_mul_mat_cuda_supported(const struct ggml_tensor * op);

// Bytes of device memory one node needs for its quantized activations.
size_t ggml_lrq_mul_mat_cuda_work_size(const struct ggml_tensor * node);

// How many of the n nodes starting at nodes[0] run as one fused parallel-replica call (1 when
// nodes[0] is fused with none; at most LRQ_CUDA_MAX_REP): consecutive LRQ_MUL_MAT nodes with the
// same codes, scale, min and op parameters, activations of the same shape, and none reading the
// result of an earlier one of the run (consecutive nodes: then none depends on another).
int ggml_lrq_mul_mat_cuda_fusable(struct ggml_tensor * const * nodes, int n);

// Runs nodes[0..n) (n == 1, or a run ggml_lrq_mul_mat_cuda_fusable accepted) on `stream` (a
// cudaStream_t); work: n * work_size device bytes, work_size = ggml_lrq_mul_mat_cuda_work_size.
// Returns 0, a cudaError_t value, or -1 when the node does not fit the kernels (with *why set).
int ggml_lrq_mul_mat_cuda(struct ggml_tensor * const * nodes, int n, void * work, size_t work_size, void * stream,
                          const char ** why);

#ifdef __cplusplus
}
#endif
