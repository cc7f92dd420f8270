// A CPU emulation of the CUDA that native/cuda/lrq-cuda.cuh uses, so that g++ compiles the real
// kernel bodies and tests/cuda/harness.cpp runs them over a simulated grid:
//
//   - __global__ / __device__ / __host__ are empty, __forceinline__ is inline;
//   - a thread block is a set of cooperative fibers (ucontext), one per CUDA thread, run one after
//     another on one OS thread: a fiber runs until it reaches a barrier, then the next one runs.
//     __syncthreads is a barrier over the block, __shfl_xor_sync exchanges values through a per-warp
//     slot array between two barriers over the warp (all 32 lanes must call it, as the full mask
//     promises).  A barrier that can never complete (some thread returned or took another path)
//     ends the program with exit code 3 and a message, instead of hanging;
//   - a kernel that reads shared memory another thread has not yet written -- a missing
//     __syncthreads -- reads the NaN bytes the shared memory is filled with before each block
//     (fiber 0 runs first and alone up to its first barrier), so its result is NaN;
//   - __dp4a is the signed 4 x int8 dot product of the PTX instruction, __fdiv_rn IEEE division;
//     lrq_cu_h2f reads fp16 bits as _Float16 (IEEE binary16, the bits of CUDA's __half).
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#define LRQ_CUDA_SHIM 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace lrq_cuda_shim {

constexpr size_t STACK_BYTES = 64 * 1024;

struct fiber {
    ucontext_t        ctx;
    std::vector<char> stack;
    int               state = 0;   // 0 runnable, 1 waiting at a barrier, 2 finished
    dim3              tid;
    int               warp = 0, lane = 0;
};

struct barrier {
    int      n = 0, count = 0;
    unsigned gen = 0;
};

struct block {
    std::vector<fiber>         f;
    std::vector<barrier>       bars;    // 0: the block, 1 + w: warp w
    std::vector<uint64_t>      slots;   // 32 per warp (__shfl_xor_sync)
    std::vector<unsigned char> shmem;
    ucontext_t                 sched;
    int                        cur = 0;
    dim3                       bid;
    std::function<void()>      fn;
};

inline block * g_block = nullptr;   // the block being run (one OS thread)

inline fiber & me() { return g_block->f[(size_t) g_block->cur]; }
inline char *  shmem() { return (char *) g_block->shmem.data(); }

inline void arrive(int bi) {
    block &   b   = *g_block;
    barrier & bar = b.bars[(size_t) bi];
    if (++bar.count == bar.n) {   // the last one releases the others and goes on
        bar.count = 0;
        ++bar.gen;
        for (size_t i = 0; i < b.f.size(); ++i) {
            fiber & f = b.f[i];
            const bool member = bi == 0 || f.warp == bi - 1;
            if (f.state == 1 && member) f.state = 0;
        }
        return;
    }
    fiber & f = me();
    f.state   = 1;
    swapcontext(&f.ctx, &b.sched);
}

template <class T> T shfl_xor(T v, int mask) {
    static_assert(sizeof(T) <= sizeof(uint64_t));
    fiber &    f = me();
    uint64_t * s = g_block->slots.data() + 32 * f.warp;
    std::memcpy(&s[f.lane], &v, sizeof v);
    arrive(1 + f.warp);
    T r;
    std::memcpy(&r, &s[(f.lane ^ mask) & 31], sizeof r);
    arrive(1 + f.warp);   // nobody overwrites a slot before all have read
    return r;
}

inline void entry() {
    g_block->fn();
    me().state = 2;   // then uc_link: back to the scheduler
}

// Runs fn() for every block of `grid` with blk.x * blk.y * blk.z threads (a multiple of 32; warps
// are consecutive linear thread indices, x fastest, as on the GPU).
template <class F> void launch(dim3 grid, dim3 blk, size_t shmem_bytes, F fn) {
    const long total     = (long) grid.x * grid.y * grid.z;
    const int  n_threads = (int) (blk.x * blk.y * blk.z);
    block      b;
    b.f.resize((size_t) n_threads);
    b.bars.resize(1 + (size_t) n_threads / 32);
    b.bars[0].n = n_threads;
    for (size_t w = 1; w < b.bars.size(); ++w) b.bars[w].n = 32;
    b.slots.assign((size_t) n_threads, 0);
    b.shmem.assign(shmem_bytes ? shmem_bytes : 1, 0xff);
    b.fn = fn;
    for (int t = 0; t < n_threads; ++t) {
        fiber & f = b.f[(size_t) t];
        f.stack.resize(STACK_BYTES);
        f.tid  = dim3(t % blk.x, t / blk.x % blk.y, t / blk.x / blk.y);
        f.warp = t / 32;
        f.lane = t % 32;
    }
    block * saved = g_block;
    g_block       = &b;
    for (long i = 0; i < total; ++i) {
        b.bid = dim3((unsigned) (i % grid.x), (unsigned) (i / grid.x % grid.y), (unsigned) (i / grid.x / grid.y));
        std::memset(b.shmem.data(), 0xff, b.shmem.size());   // NaN floats
        for (auto & bar : b.bars) bar.count = 0;
        for (auto & f : b.f) {
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp   = f.stack.data();
            f.ctx.uc_stack.ss_size = f.stack.size();
            f.ctx.uc_link          = &b.sched;
            makecontext(&f.ctx, entry, 0);
            f.state = 0;
        }
        for (;;) {
            bool ran = false, all_done = true;
            for (size_t t = 0; t < b.f.size(); ++t) {
                if (b.f[t].state == 0) {
                    b.cur = (int) t;
                    swapcontext(&b.sched, &b.f[t].ctx);
                    ran = true;
                }
                all_done = all_done && b.f[t].state == 2;
            }
            if (all_done) break;
            if (!ran) {
                std::fprintf(stderr, "lrq-cuda-shim: deadlock in block (%u, %u, %u): a barrier not every thread reaches\n",
                             b.bid.x, b.bid.y, b.bid.z);
                std::exit(3);
            }
        }
    }
    g_block = saved;
}

}  // namespace lrq_cuda_shim

#define threadIdx (lrq_cuda_shim::me().tid)
#define blockIdx  (lrq_cuda_shim::g_block->bid)

inline void __syncthreads() { lrq_cuda_shim::arrive(0); }

template <class T> T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
    (void) mask;
    return lrq_cuda_shim::shfl_xor(v, lane_mask);
}

inline int __dp4a(int a, int b, int c) {
    for (int j = 0; j < 4; ++j) c += (int) (int8_t) (a >> (8 * j)) * (int) (int8_t) (b >> (8 * j));
    return c;
}

inline float __fdiv_rn(float a, float b) { return a / b; }   // IEEE division, round to nearest

inline float lrq_cu_h2f(uint16_t h) {
    _Float16 f;
    std::memcpy(&f, &h, sizeof f);
    return (float) f;
}
