// lrq: arguments of the LRQ Metal kernels (metal/lrq.metal), shared by the shader source and the
// host code that dispatches them (ggml-metal-ops.cpp, patches/0007) so that the two agree on the
// layout.  Plain scalars, 8-byte fields first: MSL and C lay the struct out the same way.
#pragma once

#if !defined(__METAL_VERSION__)
#include <stdint.h>
#endif

// flags: which optional sources are bound (an absent one takes the format's default)
#define LRQ_METAL_HAS_MIN   1   // m (asym)
#define LRQ_METAL_HAS_ALPHA 2   // scale_mult
#define LRQ_METAL_HAS_BETA  4   // grid_offset
#define LRQ_METAL_HAS_GAIN  8
#define LRQ_METAL_HAS_BIAS  16
#define LRQ_METAL_HAS_ACT   32  // (clip, bits), read by the kernel at run time

// mat-vec / few-column kernel: LRQ_METAL_MV_NSG simdgroups per threadgroup, LRQ_METAL_MV_NR0 rows
// per simdgroup, NC (1, 2, 4, 8: the kernel's template argument) tokens per threadgroup.
#define LRQ_METAL_MV_NSG 2
#define LRQ_METAL_MV_NR0 4
// tiled mat-mat kernel: 4 simdgroups (128 threads), a tile of 64 rows x 32 tokens, one 32-weight
// block per step; threadgroup memory in bytes.
#define LRQ_METAL_MM_NR    64
#define LRQ_METAL_MM_NT    32
#define LRQ_METAL_MM_NSG   4
#define LRQ_METAL_MM_SHMEM ((64 * 32 + 32 * 32 + 128 + 2 * 32) * 4)

typedef struct {
    uint64_t nb01;        // bytes per row of codes (>= n_in / 32 * 4 * bits)
    uint64_t nb11;        // bytes per token row of x
    int32_t  n_in;        // ne00 (multiple of 32)
    int32_t  n_out;       // ne01
    int32_t  n_tok;       // tokens: x->ne1 * ne2 * ne3 (rows equally strided)
    int32_t  n_groups;    // ceil(n_in / group_size): row stride of d and m
    int32_t  group_size;  // 32, 64, 128 or 256
    int32_t  mode;        // 0 asym, 1 sym, 2 ternary
    int32_t  flags;       // LRQ_METAL_HAS_*
    int32_t  alpha_rs;    // scale_mult element (o, G) at o * alpha_rs + G * alpha_gs (0 = broadcast)
    int32_t  alpha_gs;
    int32_t  beta_rs;     // grid_offset, the same
    int32_t  beta_gs;
    int32_t  pad;
} lrq_metal_kargs;
