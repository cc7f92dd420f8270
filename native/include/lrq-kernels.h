// lrq: CPU kernels of the LRQ format v1 (docs/FORMAT.md) in plain C.
//
//   - block layouts of the code tensors (ggml types LRQ1..LRQ4),
//   - portable fp16 <-> fp32 (round to nearest even, bit-exact with numpy's astype(float16)),
//   - the reference quantizer, byte-exact with lrq.quant.quantize(..., rounding="nearest", noise=0),
//   - planar pack / unpack, reference dequantization of a replica,
//   - y = act_r(x) . W_r^T + bias: a reference (double accumulation) and a fast path
//     (8-bit activations per block of 32, integer dot products; AVX2 when the CPU has it, NEON on aarch64).
//
// Conventions: a weight W[n_out, n_in] is stored row by row (ggml ne0 = n_in, ne1 = n_out);
// fp16 values are uint16_t bit patterns; strides are in elements unless named *_bytes.
// Functions that can fail return an lrq_status (0 = LRQ_OK); kernels never print or abort.
// The header is C11 and C++ compatible; the library has no Python dependency.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#define LRQ_STATIC_ASSERT(cond, msg) static_assert(cond, msg)
#else
#define LRQ_STATIC_ASSERT(cond, msg) _Static_assert(cond, msg)
#endif

#define LRQ_QK 32              // weights per code block (= ggml's QK; n_in must be a multiple)
#define LRQ_MAX_GROUP 256      // largest group size of the format

// ---- code blocks: 32 weights, 4*b bytes, no parameters (they are separate tensors) ----------
// b in {1, 2, 4}: weight j (0..31) is in byte j % (4b) at bit shift b * (j / (4b)).

// LRQ1: 1.0 bpw. weight j: byte j % 4, bit j / 4.
typedef struct { uint8_t qs[4]; } lrq_block1;
// LRQ2: 2.0 bpw (also ternary codes 0..2). weight j: byte j % 8, shift 2 * (j / 8).
typedef struct { uint8_t qs[8]; } lrq_block2;
// LRQ3: 3.0 bpw. low two bits of the 32 codes as an lrq_block2, then the high bit as an lrq_block1.
typedef struct { uint8_t ql[8]; uint8_t qh[4]; } lrq_block3;
// LRQ4: 4.0 bpw. weight j: byte j % 16, shift 4 * (j / 16) (the layout of ggml q4_0's nibbles).
typedef struct { uint8_t qs[16]; } lrq_block4;

LRQ_STATIC_ASSERT(sizeof(lrq_block1) == 4,  "lrq_block1 must be 4 bytes (1.0 bpw)");
LRQ_STATIC_ASSERT(sizeof(lrq_block2) == 8,  "lrq_block2 must be 8 bytes (2.0 bpw)");
LRQ_STATIC_ASSERT(sizeof(lrq_block3) == 12, "lrq_block3 must be 12 bytes (3.0 bpw)");
LRQ_STATIC_ASSERT(sizeof(lrq_block4) == 16, "lrq_block4 must be 16 bytes (4.0 bpw)");

typedef enum {
    LRQ_MODE_ASYM    = 0,   // level(q) = q,            w = d * q + m
    LRQ_MODE_SYM     = 1,   // level(q) = q - (2^b-1)/2, w = d * level
    LRQ_MODE_TERNARY = 2,   // level(q) = q - 1 in {-1, 0, 1}, stored with b = 2
} lrq_mode;

typedef enum {
    LRQ_SCALE_MINMAX = 0,   // parameters from the group's range (ternary: mean |w|)
    LRQ_SCALE_MSE    = 1,   // best of the shrunk ranges of FORMAT.md 3.2
} lrq_scale_search;

typedef enum {
    LRQ_OK              = 0,
    LRQ_ERR_BITS        = 1,   // bits not in 1..4, or ternary with bits != 2
    LRQ_ERR_MODE        = 2,
    LRQ_ERR_GROUP_SIZE  = 3,   // not in {32, 64, 128, 256}
    LRQ_ERR_N_IN        = 4,   // n_in <= 0 or not a multiple of 32
    LRQ_ERR_ARG         = 5,   // NULL pointer, bad row range, bad activation parameters
    LRQ_ERR_NOMEM       = 6,
    LRQ_ERR_TWO_LEVEL   = 7,   // two-level layout: not LRQ2 asym, or sub-block size not 16 / 32
} lrq_status;

const char * lrq_status_str(int status);

// ---- descriptors ---------------------------------------------------------------------------

// One quantized weight W[n_out, n_in] (the base grid: codes, d and m).
typedef struct {
    const uint8_t  * codes;          // planar blocks, row o at codes + o * codes_row_bytes
    size_t           codes_row_bytes; // >= lrq_row_bytes(n_in, bits)
    int64_t          n_in;
    int64_t          n_out;
    int              bits;           // 1..4 (ternary: 2)
    lrq_mode         mode;
    int              group_size;     // 32, 64, 128 or 256; the last group of a row may be shorter
    const uint16_t * d;              // fp16 scale [n_out, n_groups], element (o, G) at d[o * d_row_stride + G]
    int64_t          d_row_stride;
    const uint16_t * m;              // fp16 min, asym only (NULL otherwise); element (o, G) at m[o * m_row_stride + G]
    int64_t          m_row_stride;
    // The two-level 2-bit layout (format v4; NULL = the single-level layout above): LRQ2 codes,
    // mode asym, groups of group_size are super-blocks whose d holds the super-scale and m the
    // super-min dmin (>= 0 as the quantizer writes it), and byte k of row o, sub[o * sub_row_stride + k],
    // holds the 4-bit scale index sc (low nibble) and min index mn (high nibble) of sub-block k
    // (sub_size = 16 or 32 weights): w = d * sc * q - dmin * mn.
    const uint8_t  * sub;
    int64_t          sub_row_stride;
    int              sub_size;
} lrq_weight;

// The parameters of one replica. [n_out, n_groups], [n_out, 1] and [1, 1] broadcasting of alpha
// and beta is just strides: element (o, G) is at p[o * row_stride + G * group_stride], 0 = broadcast.
// A NULL pointer (or a NULL lrq_replica *) takes the default.
typedef struct {
    const uint16_t * alpha;          // fp16 scale_mult, default 1
    int64_t          alpha_row_stride;
    int64_t          alpha_group_stride;
    const uint16_t * beta;           // fp16 grid_offset in code units, default 0
    int64_t          beta_row_stride;
    int64_t          beta_group_stride;
    const float    * gain;           // gamma [n_out], default 1 (applied after the dot product)
    const float    * bias;           // [n_out], default 0
    float            act_clip;       // c in (0, 1]; 1 = no clipping
    int              act_bits;       // 0 = off, or 2..16
} lrq_replica;

// A replica with every parameter at its default (replica 0 without tensors).
void lrq_replica_init(lrq_replica * r);

// ---- helpers ---------------------------------------------------------------------------------

uint16_t lrq_fp32_to_fp16(float f);     // round to nearest even; overflow -> inf; NaN stays NaN
float    lrq_fp16_to_fp32(uint16_t h);  // exact

size_t  lrq_row_bytes(int64_t n_in, int bits);         // n_in / 32 * 4 * bits
int64_t lrq_n_groups(int64_t n_in, int group_size);    // ceil(n_in / group_size)
int     lrq_max_code(int bits, lrq_mode mode);         // 2 for ternary, else 2^bits - 1
float   lrq_zero_point(int bits, lrq_mode mode);       // z of level(q) = q - z

// Checks bits / mode / group size / n_in (and that ternary uses 2 bits).
int lrq_check_params(int64_t n_in, int bits, lrq_mode mode, int group_size);
// lrq_check_params plus the pointers, strides and row range [row0, row1) of a mat-mul.
int lrq_check_weight(const lrq_weight * w, const lrq_replica * r, int64_t row0, int64_t row1);

// Planar packing of one row: codes q[n_in] (each < 2^bits) <-> lrq_row_bytes(n_in, bits) bytes.
void lrq_pack_row(const uint8_t * q, int64_t n_in, int bits, uint8_t * packed);
void lrq_unpack_row(const uint8_t * packed, int64_t n_in, int bits, uint8_t * q);

// ---- reference kernels -------------------------------------------------------------------------

// Quantize one row w[n_in] into packed codes (lrq_row_bytes), d[n_groups] and, asym only,
// m[n_groups] (may be NULL otherwise).  Byte-exact with
// lrq.quant.quantize(w, bits, group_size, mode, scale_search=..., rounding="nearest", noise=0):
// float32 steps without fused multiply-adds, round half to even, float64 index-order sums.
// Weights must be finite (and within the fp16 range for the parameters to be).
int lrq_quantize_row_ref(const float * w, int64_t n_in, int bits, lrq_mode mode, int group_size,
                         lrq_scale_search search, uint8_t * codes, uint16_t * d, uint16_t * m);

// The two-level layout: quantize one row w[n_in] into LRQ2 codes (lrq_row_bytes(n_in, 2)),
// d[n_super] and dmin[n_super] (fp16, n_super = ceil(n_in / super_size)) and sub[n_in / sub_size]
// (sc | mn << 4).  importance[n_in] (E[x^2] per input channel, >= 0) or NULL (uniform).
// super_size in {32, 64, 128, 256} (the last super-block of a row may be shorter), sub_size 16 or
// 32.  Byte-exact with lrq.quant_two_level.quantize (its port of ggml's quantize_row_q2_K_impl:
// float32 steps without fused multiply-adds, float32 sums in index order).
int lrq_quantize_row_two_level_ref(const float * w, int64_t n_in, int super_size, int sub_size,
                                   const float * importance, uint8_t * codes, uint16_t * d, uint16_t * dmin,
                                   uint8_t * sub);

// Groups whose factors the fast path applies: sub-blocks of a two-level weight, else groups.
int64_t lrq_factor_groups(const lrq_weight * w);
// The group size the activations of lrq_mul_mat_q8 are summed by (lrq_act_q8.group_size):
// sub_size for a two-level weight, else group_size.
int lrq_act_group_size(const lrq_weight * w);

// out[n_in] = W_r[row, :] = gamma[row] * (alpha * d * (level(q) + beta) + m), evaluated in double
// in lrq.quant.dequantize_codes' order and rounded once to float.  r may be NULL.
void lrq_dequantize_row_ref(const lrq_weight * w, const lrq_replica * r, int64_t row, float * out);

// y[t, o - row0] = sum_i W_r[o, i] * act_r(x[t, :])[i] + bias[o]   for t < n_tok, row0 <= o < row1
//   x: float [n_tok, n_in] with row stride x_stride; y: float [n_tok, row1 - row0], row stride y_stride.
// Activations per token as FORMAT.md section 6 (clip to c * max|x_t|, optional k-bit
// round-half-even), weights dequantized and products accumulated in double.  Slow; the spec.
int lrq_mul_mat_ref(const lrq_weight * w, const lrq_replica * r,
                    const float * x, int64_t x_stride, int64_t n_tok,
                    float * y, int64_t y_stride, int64_t row0, int64_t row1);

// ---- fast path: 8-bit activations -------------------------------------------------------------
//
// Per group G of row o (z the zero point, Sx_G = sum_{i in G} x~_i):
//   y[o] = gamma[o] * sum_G [ (alpha d)[o,G] * (sum_{i in G} q_i x~_i + (beta[o,G] - z) Sx_G) + m[o,G] Sx_G ] + bias[o]
// For a two-level weight the same sum runs over sub-blocks k of super-block G, with d sc_k for d
// and -dmin mn_k for m (alpha and beta per super-block).
// where x~ are the activations after act_r, re-quantized to int8 per block of 32 with a float
// scale (x~ = dx_b * xq, |xq| <= 127, round half even) -- the q8_0 scheme of ggml.  When
// 2 <= act_bits <= 8 the spec's own k-bit levels are integers in [-127, 127] and are used as the
// int8 values with the per-token step as scale, so act_r is then reproduced exactly.
// Difference to the reference: the int8 rounding of activations (act_bits 0 or > 8: a relative
// error of at most 1/254 of each block's max |x| per activation) and float32 accumulation.

// Activations of n_tok tokens quantized for lrq_mul_mat_q8 (views into one buffer).
typedef struct {
    int64_t  n_tok;
    int64_t  n_in;
    int      group_size;   // 16 (two-level, 16-weight sub-blocks), 32, 64, 128 or 256
    int8_t * qs;     // [n_tok, n_in]      int8 activations
    float  * dx;     // [n_tok, n_in / 32] scale of each block of 32
    float  * sx;     // [n_tok, n_groups]  Sx_G = sum over the group of dx_b * sum(qs of block b)
} lrq_act_q8;

// Bytes of the buffer lrq_act_q8_init needs for n_tok tokens (ggml: the op's work size).
size_t lrq_act_q8_size(int64_t n_tok, int64_t n_in, int group_size);
// Lay out a (at least lrq_act_q8_size bytes, 4-byte aligned) buffer as an lrq_act_q8.
void lrq_act_q8_init(lrq_act_q8 * a, void * buf, int64_t n_tok, int64_t n_in, int group_size);
// Apply act_r (act_clip, act_bits) to x[n_tok, n_in] (row stride x_stride) and quantize to int8.
int lrq_quantize_act_q8(const float * x, int64_t x_stride, float act_clip, int act_bits, lrq_act_q8 * a);

// y[t, o - row0] for t < a->n_tok, row0 <= o < row1 from pre-quantized activations (ggml
// quantizes them once, then splits the rows over threads).  Blocked as (16 rows) x (4 tokens)
// so that each 32-weight block is decoded once per 4 tokens (the AVX-512 kernel runs fewer than
// 4 tokens with the 16 rows of a row block in its vector lanes).  Dispatches to AVX2 + FMA when the
// library was built for x86-64 and the CPU has them, to NEON when built for aarch64 (vdotq_s32
// if compiled with the dot-product extension), else to portable C with the same numerics
// (integer block dots are exact; only the float summation order differs).
int lrq_mul_mat_q8(const lrq_weight * w, const lrq_replica * r, const lrq_act_q8 * a,
                   float * y, int64_t y_stride, int64_t row0, int64_t row1);
// Members of a parallel group that read one input (the same activation values, clip and bits)
// quantize it to the same bytes: a[j] whose qs, dx and sx equal an earlier a[k]'s is made a view
// of a[k]'s buffers, which tells lrq_mul_mat_q8_multi to compute their integer dots once.
// Returns how many were made views.
int lrq_act_q8_share(lrq_act_q8 * a, int n);

// n replicas of one weight at once (the members of a parallel group: the same codes, d, m and
// sub-block indices, each with its own replica parameters, activations a[j] and output y[j]):
// y[j] gets exactly the bits lrq_mul_mat_q8(w, r[j], &a[j], y[j], ...) gives.  The AVX-512 kernel
// reads, transposes and unpacks each block of codes once for all of them (single-level LRQ2);
// elsewhere the replicas run one after the other over the rows.  r[j] may be NULL (replica 0).
int lrq_mul_mat_q8_multi(const lrq_weight * w, int n, const lrq_replica * const * r, const lrq_act_q8 * a,
                         float * const * y, int64_t y_stride, int64_t row0, int64_t row1);
// The portable implementation, whatever the CPU (for tests).
int lrq_mul_mat_q8_generic(const lrq_weight * w, const lrq_replica * r, const lrq_act_q8 * a,
                           float * y, int64_t y_stride, int64_t row0, int64_t row1);

// One implementation of lrq_mul_mat_q8 by name, with the same argument checks, for tests and
// benchmarks that compare them: "generic", "avx2" (x86-64), "avx512" (x86-64 with AVX-512 F / BW /
// VL / DQ / VNNI; LRQ2, single-level or two-level, only: other weights give LRQ_ERR_ARG).
// lrq_mul_mat_q8 uses "avx512" for LRQ2 (both layouts) where the CPU has it (unless LRQ_NO_AVX512=1 is in the
// environment: the A/B in a model), else "avx2", else "generic" (or NEON).
// NULL when the library lacks the implementation or this CPU cannot run it.
typedef int (*lrq_mul_mat_q8_fn)(const lrq_weight * w, const lrq_replica * r, const lrq_act_q8 * a,
                                 float * y, int64_t y_stride, int64_t row0, int64_t row1);
lrq_mul_mat_q8_fn lrq_mul_mat_q8_impl(const char * name);

// Same signature as lrq_mul_mat_ref: quantizes the activations into a temporary buffer and
// calls lrq_mul_mat_q8.
int lrq_mul_mat(const lrq_weight * w, const lrq_replica * r,
                const float * x, int64_t x_stride, int64_t n_tok,
                float * y, int64_t y_stride, int64_t row0, int64_t row1);

// "avx512+avx2" when lrq_mul_mat_q8 runs single-level LRQ2 on the AVX-512 VNNI kernel and every
// other layout on the AVX2 one (the CPU has both and LRQ_NO_AVX512 is not 1), "avx2" when it
// uses the AVX2 kernel for everything, "neon" on an aarch64 build, else "generic".  llama.cpp's
// system_info line shows it as LRQ_KERNELS (patches/0005), so a log names the kernel that ran.
const char * lrq_kernels_simd(void);

#ifdef __cplusplus
}
#endif
