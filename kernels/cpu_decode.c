/* Decode-step kernels for CPU tensors: label scores, top-k token selection and sparse attention, and
 * the three fused into one decode step. This file holds the library's identity and limits, its thread
 * splits and its self test; each op has its own file (cpu_label_scores.c, cpu_selection.c,
 * cpu_sparse_attention.c, cpu_fused_decode.c) built from the primitives that cpu_decode.h declares.
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

#include "cpu_decode.h"
#ifdef _OPENMP
#include <omp.h>
#endif

/* ------------------------------------------------------------------------------------------------
 * Identity and limits, read by native.py before any kernel runs: the build key (passed as
 * -DDOUBLESPARSE_BUILD_KEY) proves the loaded file is the library built for this machine and these
 * flags, not another one under its name; the limits are the sizes of the fixed buffers (cpu_decode.h),
 * so Python never repeats them by hand. */
#ifndef DOUBLESPARSE_BUILD_KEY
#define DOUBLESPARSE_BUILD_KEY "unkeyed"
#endif

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
 * Threads. Threads of a separate pool would compete with torch's workers, which keep spinning for a
 * while after each torch op (measured: no gain from a second pthread on 2 cores). */

void ds_parallel_for(range_fn fn, void *args, int64_t n, int num_threads) {
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

void ds_parallel_items(range_fn fn, void *args, int64_t n, int num_threads) {
    if (num_threads > n) num_threads = (int)n;
    if (num_threads <= 1) {
        for (int64_t i = 0; i < n; i++) fn(args, i, i + 1, 0);
        return;
    }
#ifdef _OPENMP
    int64_t next = 0; /* an atomic counter, not `schedule(dynamic)`: no OpenMP entry points beyond GOMP_parallel */
#pragma omp parallel num_threads(num_threads)
    {
        const int thread = omp_get_thread_num();
        for (int64_t i = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED); i < n;
             i = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED))
            fn(args, i, i + 1, thread);
    }
#else
    for (int64_t i = 0; i < n; i++) fn(args, i, i + 1, 0);
#endif
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
    /* Fused decode step: 2 query heads, 2 label/KV/selection heads, 4 tokens, d = 4, r = 2 (one code
     * byte). Head 0 scores the low nibbles {5, 1, 9, 3}, head 1 the high ones {1, 8, 2, 0}; budget 2
     * with the newest token forced keeps {2, 3} and {1, 3}. Keys are zero, so each output is the mean of
     * its two value rows, written at [B, L, H, d] strides. */
    {
        const float fq[2][4] = {{1, 0, 0, 0}, {0, 1, 0, 0}};
        const int64_t channels[2][2] = {{0, 1}, {0, 1}};
        const uint8_t fcodes[2][4] = {{0x05, 0x01, 0x09, 0x03}, {0x10, 0x80, 0x20, 0x00}};
        half_t fscale[2][4], foffset[2][4];
        const uint16_t one = 0x3C00, zero = 0;
        for (int i = 0; i < 8; i++) {
            memcpy(&fscale[0][0] + i, &one, sizeof one);
            memcpy(&foffset[0][0] + i, &zero, sizeof zero);
        }
        const float fkeys[2][4][4] = {{{0}}};
        const float fvalues[2][4][4] = {{{9, 9, 9, 9}, {9, 9, 9, 9}, {2, 4, 6, 8}, {0, 2, 0, 2}},
                                        {{9, 9, 9, 9}, {4, 4, 4, 4}, {9, 9, 9, 9}, {2, 0, 2, 0}}};
        const float expected[2][4] = {{1, 3, 3, 5}, {3, 2, 3, 2}};
        const uint8_t fvalid[4] = {1, 1, 1, 1};
        const int64_t fbudgets[1] = {2};
        int64_t fpicked[2][2];
        float fout[2][4];
        static uint8_t work[2 * 1024] __attribute__((aligned(64)));
        if (2 * doublesparse_fused_workspace_bytes(4, 2, 1) > (int64_t)sizeof work) failures |= 32;
        else {
            failures |= doublesparse_fused_decode(&fq[0][0], &channels[0][0], &fcodes[0][0], 8, 4, 1, &fscale[0][0],
                                      &foffset[0][0], 8, 4, (const uint8_t *)fkeys, (const uint8_t *)fvalues, 32, 16,
                                      4, fvalid, 0, 0, 1, fbudgets, &fout[0][0], 8, 4, 8, &fpicked[0][0], work, 1,
                                      2, 2, 2, 2, 1, 4, 2, 2, 4, 0, 1, ROWS_F32, 1.0f, 2) ? 256 : 0;
            const int64_t sets[2][2] = {{2, 3}, {1, 3}};
            for (int h = 0; h < 2; h++) {
                const int64_t low = fpicked[h][0] < fpicked[h][1] ? fpicked[h][0] : fpicked[h][1];
                const int64_t high = fpicked[h][0] < fpicked[h][1] ? fpicked[h][1] : fpicked[h][0];
                if (low != sets[h][0] || high != sets[h][1]) failures |= 64;
                for (int j = 0; j < 4; j++)
                    if (fout[h][j] != expected[h][j]) failures |= 128;
            }
        }
    }
    return failures;
}
