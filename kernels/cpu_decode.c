/* Decode-step kernels for CPU tensors: label scores, top-k token selection and sparse attention.
 *
 * The torch references (label_scores.py, selection.py) express these as several whole-tensor
 * passes (unpacking nibbles to a float copy of the labels, 64-bit ranking keys, masked fills, a full
 * topk, a gathered copy of the selected K/V rows). On a CPU each pass streams megabytes through memory;
 * here each row is scored and selected with a few passes over cache-resident data, and attends its
 * selected rows where they lie. Semantics are the
 * references' exactly (see their docstrings); only the order of the selected slots differs.
 *
 * Built at first use by native.py (cc -O3 -march=native -fopenmp, linked to the OpenMP runtime torch
 * has loaded) and called through ctypes, which releases the GIL; each entry point splits its rows
 * over `num_threads` threads (below).
 */

#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <string.h>

#define ABI_VERSION 2

/* Tokens scored per tile (their dot products stay in L1). */
#define TILE 128
/* Tokens per work item, so one long row still spreads over every thread. */
#define CHUNK 4096

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

/* ------------------------------------------------------------------------------------------------
 * Identity and limits, read by native.py before any kernel runs: the build key (passed as
 * -DDOUBLESPARSE_BUILD_KEY) proves the loaded file is the library built for this machine and these
 * flags, not another one under its name; the limits are the sizes of the fixed buffers below, so
 * Python never repeats them by hand. */
#ifndef DOUBLESPARSE_BUILD_KEY
#define DOUBLESPARSE_BUILD_KEY "unkeyed"
#endif
#define MAX_GROUP_HEADS 64     /* query heads per selection head in sparse attention (`top`) */
#define MAX_ACCUMULATOR 16384  /* G * d floats of outputs per item (`acc`) */
#define MAX_HEAD_DIM 1024      /* one widened K/V row (`row`) */
#define MAX_SELECT_TOKENS 4294967295LL /* selection keeps positions as uint32 */

typedef struct {
    int64_t struct_size; /* sizeof this struct: the reader checks it reads what was written */
    int64_t abi_version;
    int64_t max_group_heads;
    int64_t max_group_accumulator;
    int64_t max_head_dim;
    int64_t max_select_tokens;
    int64_t half_conversion; /* 0: _Float16, 1: F16C, 2: software */
    int64_t openmp;          /* the _OPENMP version the library was built with, 0 without OpenMP */
} doublesparse_info_t;

int doublesparse_abi_version(void) { return ABI_VERSION; }

const char *doublesparse_build_key(void) { return DOUBLESPARSE_BUILD_KEY; }

void doublesparse_info(doublesparse_info_t *info) {
    info->struct_size = (int64_t)sizeof *info;
    info->abi_version = ABI_VERSION;
    info->max_group_heads = MAX_GROUP_HEADS;
    info->max_group_accumulator = MAX_ACCUMULATOR;
    info->max_head_dim = MAX_HEAD_DIM;
    info->max_select_tokens = MAX_SELECT_TOKENS;
    info->half_conversion = HALF_CONVERSION;
#ifdef _OPENMP
    info->openmp = _OPENMP;
#else
    info->openmp = 0;
#endif
}

/* Widens n halves the way the kernels do (for tests of the conversion paths). */
void doublesparse_halves_to_floats(const uint16_t *halves, float *out, int64_t n) {
    const half_t *typed = (const half_t *)halves;
    for (int64_t i = 0; i < n; i++) out[i] = HALF_TO_FLOAT(typed[i]);
}

/* ------------------------------------------------------------------------------------------------
 * Threads: items [0, n) split into contiguous ranges, one per thread. OpenMP, because torch's CPU
 * ops run on OpenMP too: native.py links this library to the very runtime file torch has loaded, so
 * both share one thread pool. Threads of a separate pool would compete with torch's workers, which keep spinning
 * for a while after each torch op (measured: no gain from a second pthread on 2 cores). */

typedef void (*range_fn)(void *args, int64_t begin, int64_t end, int thread);

static void parallel_for(range_fn fn, void *args, int64_t n, int num_threads) {
    if (num_threads > n) num_threads = (int)n;
    if (num_threads <= 1) {
        if (n > 0) fn(args, 0, n, 0);
        return;
    }
#ifdef _OPENMP
#pragma omp parallel num_threads(num_threads)
    {
        const int64_t i = omp_get_thread_num(), k = omp_get_num_threads();
        fn(args, n * i / k, n * (i + 1) / k, (int)i);
    }
#else
    fn(args, 0, n, 0);
#endif
}

/* ------------------------------------------------------------------------------------------------
 * Label scores of 4-bit labels. score[b, s, l, t] = max over the query heads h of selection head s of
 *   scaling * (scale[b, g, t] * (q[b, h, l] . code[b, g, t]) + offset[b, g, t] * sum(q[b, h, l]))
 * with g = h / (H_q / H_label). (8- and 16-bit labels need no unpacking: torch scores them with one
 * matmul, faster than a loop here.) */

typedef struct {
    const float *q;           /* [B, H_q, L, r], contiguous */
    const uint8_t *codes;     /* [B, H_label, T, r / 2] packed nibbles, last dim contiguous */
    int64_t code_stride_b, code_stride_h, code_stride_t;
    const half_t *scale;      /* [B, H_label, T] (strides below; t contiguous) */
    const half_t *offset;
    int64_t stat_stride_b, stat_stride_h;
    float *out;               /* [B, H_select, L, T], contiguous */
    int64_t batch, q_heads, label_heads, select_heads, rows, tokens, channels;
    float scaling;
} score_args;

static inline float bf16_to_float(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return value;
}

/* Byte tables: for code lane j, table[j][v] = the lane's share of q . code when its byte is v
 * (both nibbles). A token's dot product is then `width` independent table loads, where unpacking
 * nibbles to floats would cost more than the arithmetic it feeds. */
#define MAX_TABLE_LANES 32

static void build_tables(const float *q, int64_t width, float *table) {
    for (int64_t j = 0; j < width; j++) {
        const float even = q[2 * j], odd = q[2 * j + 1];
        for (int v = 0; v < 256; v++) table[j * 256 + v] = even * (float)(v & 0x0F) + odd * (float)(v >> 4);
    }
}

/* q . code for `n` tokens from `codes` (token stride `st` bytes) into dot[]. Lanes outer, tokens
 * inner: every token accumulates independently, so the adds do not wait on each other. */
static void dot_tokens(const score_args *a, const float *q, const float *table, const uint8_t *codes, int64_t n, float *dot) {
    const int64_t width = a->channels / 2, st = a->code_stride_t;
    for (int64_t t = 0; t < n; t++) dot[t] = 0.0f;
    if (table != NULL) {
        for (int64_t j = 0; j < width; j++) {
            const float *lane = table + j * 256;
            for (int64_t t = 0; t < n; t++) dot[t] += lane[codes[t * st + j]];
        }
    } else { /* too many lanes for the tables to stay in cache */
        for (int64_t j = 0; j < width; j++)
            for (int64_t t = 0; t < n; t++)
                dot[t] += q[2 * j] * (float)(codes[t * st + j] & 0x0F) + q[2 * j + 1] * (float)(codes[t * st + j] >> 4);
    }
}

static void score_range(void *p, int64_t begin, int64_t end, int thread) {
    (void)thread;
    const score_args *a = (const score_args *)p;
    const int64_t r = a->channels, T = a->tokens;
    const int64_t chunks = (T + CHUNK - 1) / CHUNK;
    const int64_t per_label = a->q_heads / a->label_heads;
    const int64_t per_select = a->q_heads / a->select_heads;
    const int use_tables = r / 2 <= MAX_TABLE_LANES;
    float tables[MAX_TABLE_LANES * 256];
    float dot[TILE], scale[TILE], offset[TILE];
    for (int64_t item = begin; item < end; item++) {
        const int64_t chunk = item % chunks;
        const int64_t row = item / chunks; /* (b, s, l) */
        const int64_t l = row % a->rows;
        const int64_t s = (row / a->rows) % a->select_heads;
        const int64_t b = row / (a->rows * a->select_heads);
        const int64_t t_end = chunk * CHUNK + CHUNK < T ? chunk * CHUNK + CHUNK : T;
        float *out = a->out + row * T;
        for (int64_t h = s * per_select; h < (s + 1) * per_select; h++) {
            const int64_t g = h / per_label;
            const float *q = a->q + ((b * a->q_heads + h) * a->rows + l) * r;
            float q_sum = 0.0f;
            for (int64_t c = 0; c < r; c++) q_sum += q[c];
            if (use_tables) build_tables(q, r / 2, tables);
            const uint8_t *codes = a->codes + b * a->code_stride_b + g * a->code_stride_h;
            const int64_t stats = b * a->stat_stride_b + g * a->stat_stride_h;
            for (int64_t t0 = chunk * CHUNK; t0 < t_end; t0 += TILE) {
                const int64_t n = t_end - t0 < TILE ? t_end - t0 : TILE;
                dot_tokens(a, q, use_tables ? tables : NULL, codes + t0 * a->code_stride_t, n, dot);
                /* Widened in a pass of their own: the arithmetic after it is then the same code whichever
                 * way halves widen (fused into it, a software widening changed how the compiler contracted
                 * the multiply-adds, and the scores by an ulp). */
                const half_t *scale_half = a->scale + stats + t0, *offset_half = a->offset + stats + t0;
                for (int64_t t = 0; t < n; t++) {
                    scale[t] = HALF_TO_FLOAT(scale_half[t]);
                    offset[t] = HALF_TO_FLOAT(offset_half[t]);
                }
                for (int64_t t = 0; t < n; t++) dot[t] = scale[t] * dot[t] + offset[t] * q_sum;
                float *best = out + t0;
                if (h == s * per_select) {
                    for (int64_t t = 0; t < n; t++) best[t] = dot[t] * a->scaling;
                } else {
                    for (int64_t t = 0; t < n; t++) {
                        const float v = dot[t] * a->scaling;
                        best[t] = v > best[t] ? v : best[t];
                    }
                }
            }
        }
    }
}

void doublesparse_label_scores(
    const float *q, const uint8_t *codes, int64_t code_stride_b, int64_t code_stride_h, int64_t code_stride_t,
    const half_t *scale, const half_t *offset, int64_t stat_stride_b, int64_t stat_stride_h, float *out,
    int64_t batch, int64_t q_heads, int64_t label_heads, int64_t select_heads, int64_t rows, int64_t tokens,
    int64_t channels, float scaling, int num_threads) {
    score_args a = {q, codes, code_stride_b, code_stride_h, code_stride_t, scale, offset, stat_stride_b, stat_stride_h,
                    out, batch, q_heads, label_heads, select_heads, rows, tokens, channels, scaling};
    const int64_t chunks = (tokens + CHUNK - 1) / CHUNK;
    parallel_for(score_range, &a, batch * select_heads * rows * chunks, num_threads);
}

/* ------------------------------------------------------------------------------------------------
 * Selection: for each row (b, h, l), the row's budget k of tokens: the forced ones (current,
 * recent, sinks; see selection.py) and then the highest scores, ties to the higher position.
 * Slots [0, k) hold the selection (forced first); slots [k, K) repeat slot 0 (they are invalid). */

typedef struct {
    const float *scores;      /* [B, H, L, T], contiguous */
    const uint8_t *valid;     /* bool [B, L, T] with strides below (the batch stride may be 0) */
    int64_t valid_stride_b, valid_stride_l, valid_stride_t;
    const int64_t *budgets;   /* [B, L], contiguous */
    int64_t *out;             /* [B, H, L, K], contiguous */
    uint32_t *workspace;      /* 2 * T per thread */
    int64_t batch, heads, rows, tokens, max_budget, sink_tokens, recent_tokens;
} select_args;

/* An unsigned key whose order is the float order (NaN above +inf, as in the reference). */
static inline uint32_t order_key(float score) {
    uint32_t bits;
    memcpy(&bits, &score, sizeof bits);
    return bits & 0x80000000u ? ~bits : bits | 0x80000000u;
}

/* Radix select over the candidates' keys. Level 0 histograms the top 11 bits while the keys are
 * built; one more pass takes every candidate above the level-0 bin and gathers the bin's own
 * candidates (few) for levels 1 and 2. Four interleaved histograms: consecutive keys often share a
 * bin, and one histogram would make each increment wait for the previous one. */
#define TOP_BITS 11
#define TOP_BINS (1 << TOP_BITS)
#define SUB_HISTOGRAMS 4

/* The bin (from the top) where the `need`-th largest lies; *above receives the count above it. */
static uint32_t find_bin(const uint32_t *hist, uint32_t bins, int64_t need, int64_t *above) {
    int64_t count = 0;
    uint32_t bin = bins - 1;
    while (count + hist[bin] < need) count += hist[bin--];
    *above = count;
    return bin;
}

static void select_row(const select_args *a, int64_t row, uint32_t *keys, uint32_t *positions) {
    const int64_t T = a->tokens, K = a->max_budget;
    const int64_t l = row % a->rows;
    const int64_t b = row / (a->rows * a->heads);
    const float *scores = a->scores + row * T;
    const uint8_t *valid = a->valid + b * a->valid_stride_b + l * a->valid_stride_l;
    const int64_t vt = a->valid_stride_t;
    int64_t *out = a->out + row * K;
    int64_t budget = a->budgets[b * a->rows + l];
    if (budget > K) budget = K;
    if (budget < 0) budget = 0;

    int64_t num_valid = 0;
    if (vt == 1) {
        for (int64_t t = 0; t < T; t++) num_valid += valid[t] != 0;
    } else {
        for (int64_t t = 0; t < T; t++) num_valid += valid[t * vt] != 0;
    }
    const int64_t recent = a->recent_tokens > 1 ? a->recent_tokens : 1;
    const int64_t recent_kept = budget < recent ? budget : recent;
    int64_t sink_kept = budget - recent_kept;
    if (sink_kept > a->sink_tokens) sink_kept = a->sink_tokens;
    const int64_t first_recent = num_valid - recent_kept + 1; /* valid ranks from here on are recent */

    uint32_t hist[SUB_HISTOGRAMS][TOP_BINS];
    memset(hist, 0, sizeof hist);
    int64_t taken = 0, candidates = 0, rank = 0;
    for (int64_t t = 0; t < T; t++) {
        if (!valid[t * vt]) continue;
        rank++;
        if (rank <= sink_kept || rank >= first_recent) {
            if (taken < budget) out[taken++] = t;
            continue;
        }
        const uint32_t key = order_key(scores[t]);
        hist[candidates & (SUB_HISTOGRAMS - 1)][key >> (32 - TOP_BITS)]++;
        keys[candidates] = key;
        positions[candidates++] = (uint32_t)t;
    }
    int64_t need = budget - taken;
    if (need >= candidates) {
        for (int64_t i = 0; i < candidates && taken < budget; i++) out[taken++] = positions[i];
    } else if (need > 0) {
        for (int s = 1; s < SUB_HISTOGRAMS; s++)
            for (int bin = 0; bin < TOP_BINS; bin++) hist[0][bin] += hist[s][bin];
        int64_t above;
        const uint32_t top = find_bin(hist[0], TOP_BINS, need, &above);
        /* Everything above the bin is selected; the bin's candidates move to the front (in order). */
        int64_t in_bin = 0;
        for (int64_t i = 0; i < candidates; i++) {
            const uint32_t bin = keys[i] >> (32 - TOP_BITS);
            if (bin > top) {
                out[taken++] = positions[i];
            } else if (bin == top) {
                keys[in_bin] = keys[i];
                positions[in_bin++] = positions[i];
            }
        }
        need -= above;
        /* Levels 1 and 2 over the bin's candidates: 11 then 10 more bits give the exact threshold. */
        uint32_t prefix = top << (32 - TOP_BITS), mask = (uint32_t)(TOP_BINS - 1) << (32 - TOP_BITS);
        static const int shifts[2] = {10, 0}, widths[2] = {11, 10};
        for (int level = 0; level < 2; level++) {
            const int shift = shifts[level];
            const uint32_t bins = 1u << widths[level];
            memset(hist[0], 0, bins * sizeof hist[0][0]);
            for (int64_t i = 0; i < in_bin; i++)
                if ((keys[i] & mask) == prefix) hist[0][(keys[i] >> shift) & (bins - 1)]++;
            int64_t higher;
            const uint32_t bin = find_bin(hist[0], bins, need, &higher);
            need -= higher;
            prefix |= bin << shift;
            mask |= (bins - 1) << shift;
        }
        /* prefix is now the threshold key: take those above, then `need` equal ones, newest first. */
        for (int64_t i = 0; i < in_bin; i++)
            if (keys[i] > prefix) out[taken++] = positions[i];
        for (int64_t i = in_bin - 1; i >= 0 && need > 0; i--)
            if (keys[i] == prefix) {
                out[taken++] = positions[i];
                need--;
            }
    }
    const int64_t filler = taken > 0 ? out[0] : 0;
    for (int64_t i = taken; i < K; i++) out[i] = filler;
}

static void select_range(void *p, int64_t begin, int64_t end, int thread) {
    const select_args *a = (const select_args *)p;
    uint32_t *keys = a->workspace + (int64_t)thread * 2 * a->tokens;
    for (int64_t row = begin; row < end; row++) select_row(a, row, keys, keys + a->tokens);
}

void doublesparse_select_tokens(
    const float *scores, const uint8_t *valid, int64_t valid_stride_b, int64_t valid_stride_l, int64_t valid_stride_t,
    const int64_t *budgets, int64_t *out, uint32_t *workspace, int64_t batch, int64_t heads, int64_t rows,
    int64_t tokens, int64_t max_budget, int64_t sink_tokens, int64_t recent_tokens, int num_threads) {
    select_args a = {scores, valid, valid_stride_b, valid_stride_l, valid_stride_t, budgets, out, workspace,
                     batch, heads, rows, tokens, max_budget, sink_tokens, recent_tokens};
    parallel_for(select_range, &a, batch * heads * rows, num_threads);
}

/* ------------------------------------------------------------------------------------------------
 * Sparse attention of one-row decode queries: for each (b, s, l), the G query heads of selection
 * head s attend the valid selected slots of their KV head. Each selected K row is read once and
 * dotted with all G queries; after the softmax each V row is read once and added to all G outputs.
 * No gathered copy of the rows is made: they are read in place, the next ones prefetched. */

enum { ROWS_F32 = 32, ROWS_F16 = 16, ROWS_BF16 = 17 };
#define PREFETCH_AHEAD 8

/* Random rows defeat the hardware prefetcher: ask for every cache line of a row some rows ahead. */
static inline void prefetch_row(const uint8_t *row, int64_t bytes) {
    for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(row + offset);
}

typedef struct {
    const float *q;           /* [B, H_q, L, d], contiguous */
    const uint8_t *keys, *values; /* [B, H_kv, T, d] elements of `kind`, d contiguous */
    int64_t stride_b, stride_h, stride_t; /* in elements, shared by keys and values */
    const int64_t *indices;   /* [B, H_select, L, K], contiguous */
    const uint8_t *slot_valid; /* bool with strides below (broadcast dims have stride 0) */
    int64_t valid_stride_b, valid_stride_s, valid_stride_l, valid_stride_k;
    float *weights;           /* workspace [B, H_select, L, G, K] */
    float *out;               /* [B, H_q, L, d], contiguous */
    int64_t batch, q_heads, kv_heads, select_heads, rows, slots, head_dim;
    int kind;
    float scaling;
} attend_args;

static inline void load_row(const attend_args *a, const uint8_t *base, int64_t n, float *row) {
    if (a->kind == ROWS_F32) {
        memcpy(row, base, (size_t)n * sizeof(float));
    } else if (a->kind == ROWS_F16) {
        const half_t *half = (const half_t *)base;
        for (int64_t j = 0; j < n; j++) row[j] = HALF_TO_FLOAT(half[j]);
    } else {
        const uint16_t *bf = (const uint16_t *)base;
        for (int64_t j = 0; j < n; j++) row[j] = bf16_to_float(bf[j]);
    }
}

static inline float dot_row(const float *q, const float *k, int64_t d) {
    /* 32 running sums: several vector registers, so consecutive multiply-adds do not wait on each
     * other (one accumulator made the dot products latency-bound: 4x slower at 4 query heads). */
    float part[32] = {0};
    int64_t j = 0;
    for (; j + 32 <= d; j += 32)
        for (int u = 0; u < 32; u++) part[u] += q[j + u] * k[j + u];
    for (int width = 16; width >= 1; width /= 2)
        for (int u = 0; u < width; u++) part[u] += part[u + width];
    float total = part[0];
    for (; j < d; j++) total += q[j] * k[j];
    return total;
}

static void attend_range(void *p, int64_t begin, int64_t end, int thread) {
    (void)thread;
    const attend_args *a = (const attend_args *)p;
    const int64_t d = a->head_dim, K = a->slots;
    const int64_t per_select = a->q_heads / a->select_heads;
    const int64_t per_kv = a->select_heads / a->kv_heads;
    const int64_t elem = a->kind == ROWS_F32 ? 4 : 2;
    float acc[MAX_ACCUMULATOR];
    float row[MAX_HEAD_DIM];
    for (int64_t item = begin; item < end; item++) { /* (b, s, l) */
        const int64_t l = item % a->rows;
        const int64_t s = (item / a->rows) % a->select_heads;
        const int64_t b = item / (a->rows * a->select_heads);
        const int64_t kv = s / per_kv;
        const int64_t *index = a->indices + item * K;
        const uint8_t *keep = a->slot_valid + b * a->valid_stride_b + s * a->valid_stride_s + l * a->valid_stride_l;
        const uint8_t *keys = a->keys + (b * a->stride_b + kv * a->stride_h) * elem;
        const uint8_t *values = a->values + (b * a->stride_b + kv * a->stride_h) * elem;
        const int64_t row_bytes = a->stride_t * elem;
        float *weights = a->weights + item * per_select * K;
        const float *q0 = a->q + ((b * a->q_heads + s * per_select) * a->rows + l) * d;
        const int64_t q_head_stride = a->rows * d;

        float top[MAX_GROUP_HEADS];
        for (int64_t g = 0; g < per_select; g++) top[g] = -INFINITY;
        int64_t kept = 0;
        for (int64_t k = 0; k < K; k++) {
            if (!keep[k * a->valid_stride_k]) continue;
            if (k + PREFETCH_AHEAD < K) prefetch_row(keys + index[k + PREFETCH_AHEAD] * row_bytes, d * elem);
            const float *key;
            if (a->kind == ROWS_F32) key = (const float *)(keys + index[k] * row_bytes);
            else { load_row(a, keys + index[k] * row_bytes, d, row); key = row; }
            for (int64_t g = 0; g < per_select; g++) {
                const float logit = a->scaling * dot_row(q0 + g * q_head_stride, key, d);
                weights[g * K + kept] = logit;
                top[g] = logit > top[g] ? logit : top[g];
            }
            kept++;
        }
        for (int64_t g = 0; g < per_select; g++) {
            float total = 0.0f;
            for (int64_t k = 0; k < kept; k++) total += weights[g * K + k] = expf(weights[g * K + k] - top[g]);
            const float inverse = total > 0.0f ? 1.0f / total : 0.0f;
            for (int64_t k = 0; k < kept; k++) weights[g * K + k] *= inverse;
        }
        memset(acc, 0, (size_t)(per_select * d) * sizeof(float));
        int64_t slot = 0;
        for (int64_t k = 0; k < K; k++) {
            if (!keep[k * a->valid_stride_k]) continue;
            if (k + PREFETCH_AHEAD < K) prefetch_row(values + index[k + PREFETCH_AHEAD] * row_bytes, d * elem);
            const float *value;
            if (a->kind == ROWS_F32) value = (const float *)(values + index[k] * row_bytes);
            else { load_row(a, values + index[k] * row_bytes, d, row); value = row; }
            for (int64_t g = 0; g < per_select; g++) {
                const float w = weights[g * K + slot];
                float *out = acc + g * d;
                for (int64_t j = 0; j < d; j++) out[j] += w * value[j];
            }
            slot++;
        }
        for (int64_t g = 0; g < per_select; g++)
            memcpy(a->out + ((b * a->q_heads + s * per_select + g) * a->rows + l) * d, acc + g * d, (size_t)d * sizeof(float));
    }
}

void doublesparse_sparse_attention(
    const float *q, const uint8_t *keys, const uint8_t *values, int64_t stride_b, int64_t stride_h, int64_t stride_t,
    const int64_t *indices, const uint8_t *slot_valid, int64_t valid_stride_b, int64_t valid_stride_s,
    int64_t valid_stride_l, int64_t valid_stride_k, float *weights, float *out, int64_t batch, int64_t q_heads,
    int64_t kv_heads, int64_t select_heads, int64_t rows, int64_t slots, int64_t head_dim, int kind, float scaling,
    int num_threads) {
    attend_args a = {q, keys, values, stride_b, stride_h, stride_t, indices, slot_valid, valid_stride_b,
                     valid_stride_s, valid_stride_l, valid_stride_k, weights, out, batch, q_heads, kv_heads,
                     select_heads, rows, slots, head_dim, kind, scaling};
    parallel_for(attend_range, &a, batch * select_heads * rows, num_threads);
}

/* ------------------------------------------------------------------------------------------------
 * Self test: every entry point once on a tiny problem whose results are exact in fp32, over two
 * threads. native.py runs it in a child process right after a build, so a library that the compiler
 * targeted at instructions this CPU lacks dies there (SIGILL), never in the process that loads it.
 * Returns 0, or a bit per failed check. */

int doublesparse_self_test(void) {
    int failures = 0;
    /* Label scores: 2 rows (query heads, one label head each), 3 tokens of 4 channels (2 bytes). */
    const float q[2][4] = {{1, 2, 3, 4}, {-1, 0, 2, 1}};
    const uint8_t codes[2][3][2] = {
        {{0x21, 0x43}, {0x00, 0xFF}, {0x5A, 0x0C}},
        {{0x10, 0x01}, {0x77, 0x20}, {0xF0, 0x0F}},
    };
    const uint16_t scale_bits[2][3] = {{0x3800, 0x3C00, 0x4000}, {0x3800, 0x3800, 0x3C00}}; /* 0.5, 1, 2 */
    const uint16_t offset_bits[2][3] = {{0xBC00, 0x0000, 0x3C00}, {0x4000, 0xBC00, 0x0000}}; /* -1, 0, 1, 2 */
    half_t scale[2][3], offset[2][3]; /* copied, not cast: the kernel reads them as half_t */
    memcpy(scale, scale_bits, sizeof scale);
    memcpy(offset, offset_bits, sizeof offset);
    float scores[2][3];
    doublesparse_label_scores(&q[0][0], &codes[0][0][0], 6, 6, 2, &scale[0][0], &offset[0][0], 3, 3, &scores[0][0],
                              1, 2, 2, 2, 1, 3, 4, 0.5f, 2);
    for (int h = 0; h < 2; h++)
        for (int t = 0; t < 3; t++) {
            float dot = 0.0f, q_sum = 0.0f;
            for (int c = 0; c < 4; c++) {
                const int code = c % 2 ? codes[h][t][c / 2] >> 4 : codes[h][t][c / 2] & 0x0F;
                dot += q[h][c] * (float)code;
                q_sum += q[h][c];
            }
            const float widened_scale = half_bits_to_float(scale_bits[h][t]);
            const float expected = 0.5f * (widened_scale * dot + half_bits_to_float(offset_bits[h][t]) * q_sum);
            if (scores[h][t] != expected) failures |= 1;
        }
    /* Selection: 2 rows of 6 tokens, budget 3 with the newest token forced: the two best others. */
    const float select_scores[2][6] = {{5, 1, 9, 3, 7, 0}, {-2, 8, 8, -1, 4, 6}};
    const uint8_t valid[6] = {1, 1, 1, 1, 1, 1};
    const int64_t budgets[2] = {3, 3};
    int64_t picked[2][4];
    uint32_t workspace[2 * 2 * 6];
    doublesparse_select_tokens(&select_scores[0][0], valid, 0, 0, 1, budgets, &picked[0][0], workspace,
                               1, 2, 1, 6, 4, 0, 1, 2);
    const int64_t expected_sets[2][3] = {{2, 4, 5}, {1, 2, 5}};
    for (int row = 0; row < 2; row++) {
        int found = 0;
        for (int i = 0; i < 3; i++)
            for (int j = 0; j < 3; j++) found += picked[row][i] == expected_sets[row][j];
        if (found != 3) failures |= 2;
    }
    /* Sparse attention, per row kind: 2 query heads, 2 KV heads, d = 4. One buffer serves as keys and
     * values, and each head's two selected keys tie, so each output is the mean of two value rows. */
    const float rows32[4][4] = {{1, 2, 3, 4}, {1, 2, 3, 4}, {2, 0, -2, 6}, {0, 4, 4, 0}};
    const float queries[2][4] = {{1, 0, 0, 0}, {0, 0, 1, 1}};
    const int64_t indices[2][2] = {{0, 1}, {0, 1}};
    const uint8_t keep[2] = {1, 1};
    const int kinds[3] = {ROWS_F32, ROWS_F16, ROWS_BF16};
    for (int k = 0; k < 3; k++) {
        uint16_t rows16[4][4];
        half_t rows_half[4][4];
        for (int i = 0; i < 16; i++) {
            const float value = (&rows32[0][0])[i];
            uint32_t bits;
            memcpy(&bits, &value, sizeof bits);
            /* exact in both: small integers. fp16 re-biases the exponent, bf16 keeps the top half. */
            const uint32_t sign = (bits >> 16) & 0x8000, exponent = ((bits >> 23) & 0xFF) - 112;
            const uint16_t half = value == 0.0f ? 0 : (uint16_t)(sign | (exponent << 10) | ((bits >> 13) & 0x3FF));
            (&rows16[0][0])[i] = kinds[k] == ROWS_BF16 ? (uint16_t)(bits >> 16) : half;
        }
        memcpy(rows_half, rows16, sizeof rows_half);
        const uint8_t *keys = (const uint8_t *)&rows32[0][0];
        if (kinds[k] == ROWS_F16) keys = (const uint8_t *)&rows_half[0][0];
        if (kinds[k] == ROWS_BF16) keys = (const uint8_t *)&rows16[0][0];
        float weights[2][2], out[2][4];
        doublesparse_sparse_attention(&queries[0][0], keys, keys, 0, 8, 4, &indices[0][0], keep, 0, 0, 0, 1,
                                      &weights[0][0], &out[0][0], 1, 2, 2, 2, 1, 2, 4, kinds[k], 1.0f, 2);
        for (int h = 0; h < 2; h++)
            for (int j = 0; j < 4; j++)
                if (out[h][j] != 0.5f * (rows32[2 * h][j] + rows32[2 * h + 1][j])) failures |= 4 << k;
    }
    return failures;
}
