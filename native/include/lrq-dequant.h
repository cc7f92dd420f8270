// lrq: the dequantization arithmetic of the LRQ types (docs/FORMAT.md sections 3, 4 and 6), in one
// source compiled four ways: as C (native/lrq/ref.c, the reference), as C++, as Metal Shading
// Language (metal/lrq.metal; tests/metal compiles the same file with g++ through a shim) and as CUDA
// (native/cuda/lrq-cuda.cuh).  What a
// kernel and the reference must agree on bit for bit lives here, so that they cannot drift:
//
//   - where code j of a 32-weight block sits in its 4*b bytes (planar packing, FORMAT.md 4),
//   - the zero point z of level(q) = q - z (FORMAT.md 3),
//   - the group of a block (groups are whole blocks; the last group of a row may be shorter),
//   - the affine form of a replica's weight, W_r = gain * (ad * q + off) with
//         ad = alpha * d,   off = ad * (beta - z) + m          (FORMAT.md 6)
//     which the kernels apply once per group (the reference evaluates FORMAT.md 6 literally in
//     double and uses only the first three).
//
// Modes are plain ints (0 asym, 1 sym, 2 ternary = lrq_mode) so that MSL needs no C enum.
// Pointers to codes carry LRQ_DQ_DEVICE: Metal's `device` address space, nothing in C / C++.
#pragma once

#if defined(__METAL_VERSION__)
#define LRQ_DQ_DEVICE device
#define LRQ_DQ_FN     inline
#elif defined(__CUDACC__)
// nvcc (native/cuda/lrq-cuda.cuh): callable from the kernels and from host code
#include <stdint.h>
#define LRQ_DQ_DEVICE
#define LRQ_DQ_FN     static inline __host__ __device__
#else
#include <stdint.h>
#define LRQ_DQ_DEVICE
#define LRQ_DQ_FN     static inline
#endif

#define LRQ_DQ_QK 32   // weights per code block (LRQ_QK)

#define LRQ_DQ_MODE_ASYM    0
#define LRQ_DQ_MODE_SYM     1
#define LRQ_DQ_MODE_TERNARY 2

// Bytes of one block of 32 codes of b bits.
LRQ_DQ_FN int lrq_dq_block_bytes(int bits) { return 4 * bits; }

// Code j (0..31) of the block at blk.  b in {1, 2, 4}: byte j % (4b), shift b * (j / (4b));
// b = 3: the low two bits as a 2-bit block (8 bytes), then the high bit as a 1-bit block (4 bytes).
LRQ_DQ_FN int lrq_dq_code(LRQ_DQ_DEVICE const uint8_t * blk, int bits, int j) {
    if (bits == 3) {
        return ((blk[j % 8] >> (2 * (j / 8))) & 3) | (((blk[8 + j % 4] >> (j / 4)) & 1) << 2);
    }
    const int nb = 4 * bits;
    return (blk[j % nb] >> (bits * (j / nb))) & ((1 << bits) - 1);
}

// z of level(q) = q - z: 0 (asym), (2^b - 1) / 2 (sym, exact), 1 (ternary).
LRQ_DQ_FN float lrq_dq_zero_point(int bits, int mode) {
    return mode == LRQ_DQ_MODE_SYM ? (float) ((1 << bits) - 1) / 2.0f : mode == LRQ_DQ_MODE_TERNARY ? 1.0f : 0.0f;
}

// Group of block ib (blocks never straddle groups: g is a multiple of 32).
LRQ_DQ_FN int lrq_dq_group(int ib, int group_size) { return ib * LRQ_DQ_QK / group_size; }

// Per-(row, group) factors of W_r / gain = ad * q + off (float, in this order).
LRQ_DQ_FN float lrq_dq_ad(float d, float alpha) { return d * alpha; }
LRQ_DQ_FN float lrq_dq_off(float ad, float beta, float z, float m) { return ad * (beta - z) + m; }
