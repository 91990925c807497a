/* What the native CPU decode kernels share: half-precision widening, the library's fixed buffer sizes,
 * the thread splits, and the per-row primitives that the entry points (one .c file per op, like the
 * Python kernel modules) and the fused decode step are made of.
 *
 * Every source file of the library is listed in native.py (SOURCES): the build key hashes them all. */

#ifndef DOUBLESPARSE_CPU_DECODE_H
#define DOUBLESPARSE_CPU_DECODE_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#define ABI_VERSION 4

/* Tokens scored per tile (their dot products stay in L1). */
#define TILE 128
/* Tokens per work item of the separate score kernel, so one long row still spreads over every thread. */
#define CHUNK 4096

/* Sizes of the fixed (stack) buffers, reported to Python by doublesparse_info. */
#define MAX_GROUP_HEADS 64     /* query heads per selection head in sparse attention (`top`) */
#define MAX_ACCUMULATOR 16384  /* G * d floats of outputs per item (`acc`) */
#define MAX_HEAD_DIM 1024      /* one widened K/V row (`row`) */
#define MAX_SELECT_TOKENS 4294967295LL /* selection keeps positions as uint32 */
/* Code lanes (r / 2) up to which 4-bit scores use byte tables (beyond, the tables leave L1). */
#define MAX_TABLE_LANES 32

/* ------------------------------------------------------------------------------------------------
 * Half precision (label scales and offsets, fp16 K/V rows). Compilers that have _Float16 (GCC >= 12
 * on x86, most ARM and clang targets: they define __FLT16_MAX__) convert it natively; older ones
 * read the same bits as uint16_t and widen them with F16C where the target has it, else in
 * software. Every path widens exactly, so the results are the same bit for bit (tested by forcing
 * each one with the -D macros below). */
#if defined(__FLT16_MAX__) && !defined(DOUBLESPARSE_NO_FLOAT16)
typedef _Float16 half_t;
#define HALF_TO_FLOAT(h) ((float)(h))
#define HALF_CONVERSION 0
#elif defined(__F16C__) && !defined(DOUBLESPARSE_NO_F16C)
#include <immintrin.h>
typedef uint16_t half_t;
#define HALF_TO_FLOAT(h) _cvtsh_ss(h)
#define HALF_CONVERSION 1
#else
typedef uint16_t half_t;
#define HALF_TO_FLOAT(h) half_bits_to_float(h)
#define HALF_CONVERSION 2
#endif

static inline float half_bits_to_float(uint16_t half) {
    const uint32_t sign = (uint32_t)(half & 0x8000u) << 16;
    uint32_t exponent = (half >> 10) & 0x1Fu, mantissa = half & 0x3FFu, bits;
    if (exponent == 0x1F) { /* inf, or NaN made quiet as the hardware conversions make it */
        bits = sign | 0x7F800000u | (mantissa << 13) | (mantissa ? 0x00400000u : 0u);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else { /* subnormal: shift its leading one up to the implicit bit */
        exponent = 113;
        while (!(mantissa & 0x400u)) {
            mantissa <<= 1;
            exponent--;
        }
        bits = sign | (exponent << 23) | ((mantissa & 0x3FFu) << 13);
    }
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline float bf16_to_float(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return value;
}

/* K/V row element kinds (native_ops.ROW_KINDS). */
enum { ROWS_F32 = 32, ROWS_F16 = 16, ROWS_BF16 = 17 };

/* ------------------------------------------------------------------------------------------------
 * Threads (cpu_decode.c). OpenMP, because torch's CPU ops run on OpenMP too: native.py links the
 * library to the very runtime file torch has loaded, so both share one thread pool. */

typedef void (*range_fn)(void *args, int64_t begin, int64_t end, int thread);

/* Items [0, n) split into contiguous ranges, one per thread. */
void ds_parallel_for(range_fn fn, void *args, int64_t n, int num_threads);
/* Items [0, n) handed out one at a time to whichever thread is free (fn gets begin, begin + 1): a
 * thread that the system deschedules for a while delays only its own item, not a fixed share. */
void ds_parallel_items(range_fn fn, void *args, int64_t n, int num_threads);

/* ------------------------------------------------------------------------------------------------
 * Label scores of 4-bit labels (cpu_label_scores.c). */

typedef struct {
    const uint8_t *codes;     /* [B, H_label, T, r / 2] packed nibbles, last dim contiguous */
    int64_t code_stride_b, code_stride_h, code_stride_t;
    const half_t *scale;      /* [B, H_label, T] (strides below; t contiguous) */
    const half_t *offset;
    int64_t stat_stride_b, stat_stride_h;
    int64_t channels;         /* r */
    float scaling;
} label_rows;

/* One query head's label channels q[r] against tokens [t_begin, t_end) of label head (b, g):
 * best[t] = score when `first`, else max(best[t], score). `tables`: MAX_TABLE_LANES * 256 floats. */
void ds_score_tokens(const label_rows *labels, const float *q, int64_t b, int64_t g, int64_t t_begin, int64_t t_end,
                     int first, float *tables, float *best);

/* ------------------------------------------------------------------------------------------------
 * Selection of one row (cpu_selection.c): the row's `budget` tokens (forced ones first, then the
 * highest scores, ties to the higher position) into out[0, budget), slot 0 repeated in out[budget, K).
 * keys and positions: T uint32 each. */
void ds_select_row(const float *scores, const uint8_t *valid, int64_t valid_stride, int64_t tokens, int64_t budget,
                   int64_t max_budget, int64_t sink_tokens, int64_t recent_tokens, int64_t *out, uint32_t *keys,
                   uint32_t *positions);

/* ------------------------------------------------------------------------------------------------
 * Sparse attention of one (b, selection head, row) item (cpu_sparse_attention.c): its G query heads
 * q[g] = q + g * q_stride (fp32, d each) attend the slots of `index` whose `keep` byte is set
 * (keep == NULL: slots [0, slots) all count) in one KV head's rows; out[g] = out + g * out_stride. */
typedef struct {
    const uint8_t *keys, *values; /* one KV head's rows: row t at t * row_bytes, elements of `kind` */
    int64_t row_bytes, head_dim;
    int kind;
    float scaling;
} kv_rows;

void ds_attend_slots(const kv_rows *kv, const float *q, int64_t q_stride, int64_t group, const int64_t *index,
                     const uint8_t *keep, int64_t keep_stride, int64_t slots, float *weights, float *out,
                     int64_t out_stride);

/* ------------------------------------------------------------------------------------------------
 * The library's entry points (native.py declares them to ctypes, native_ops.py calls them). */

void doublesparse_label_scores(
    const float *q, const uint8_t *codes, int64_t code_stride_b, int64_t code_stride_h, int64_t code_stride_t,
    const half_t *scale, const half_t *offset, int64_t stat_stride_b, int64_t stat_stride_h, float *out,
    int64_t batch, int64_t q_heads, int64_t label_heads, int64_t select_heads, int64_t rows, int64_t tokens,
    int64_t channels, float scaling, int num_threads);
void doublesparse_select_tokens(
    const float *scores, const uint8_t *valid, int64_t valid_stride_b, int64_t valid_stride_l, int64_t valid_stride_t,
    const int64_t *budgets, int64_t *out, uint32_t *workspace, int64_t batch, int64_t heads, int64_t rows,
    int64_t tokens, int64_t max_budget, int64_t sink_tokens, int64_t recent_tokens, int num_threads);
void doublesparse_sparse_attention(
    const float *q, const uint8_t *keys, const uint8_t *values, int64_t stride_b, int64_t stride_h, int64_t stride_t,
    const int64_t *indices, const uint8_t *slot_valid, int64_t valid_stride_b, int64_t valid_stride_s,
    int64_t valid_stride_l, int64_t valid_stride_k, float *weights, float *out, int64_t batch, int64_t q_heads,
    int64_t kv_heads, int64_t select_heads, int64_t rows, int64_t slots, int64_t head_dim, int kind, float scaling,
    int num_threads);
uint64_t doublesparse_read_rows(const uint8_t *base, int64_t row_bytes, int64_t row_stride, const int64_t *rows,
                                int64_t n, int num_threads);
int64_t doublesparse_fused_workspace_bytes(int64_t tokens, int64_t max_budget, int64_t group);
int doublesparse_fused_decode(
    const float *q, const int64_t *channels, const uint8_t *codes, int64_t code_stride_b, int64_t code_stride_h,
    int64_t code_stride_t, const half_t *scale, const half_t *offset, int64_t stat_stride_b, int64_t stat_stride_h,
    const uint8_t *keys, const uint8_t *values, int64_t kv_stride_b, int64_t kv_stride_h, int64_t kv_stride_t,
    const uint8_t *valid, int64_t valid_stride_b, int64_t valid_stride_l, int64_t valid_stride_t,
    const int64_t *budgets, float *out, int64_t out_stride_b, int64_t out_stride_h, int64_t out_stride_l,
    int64_t *indices, uint8_t *workspace, int64_t batch, int64_t q_heads, int64_t label_heads, int64_t kv_heads,
    int64_t select_heads, int64_t rows, int64_t tokens, int64_t num_channels, int64_t max_budget, int64_t head_dim,
    int64_t sink_tokens, int64_t recent_tokens, int kind, float scaling, int num_threads);

#endif
