/* Label scores of 4-bit labels. score[b, s, l, t] = max over the query heads h of selection head s of
 *   scaling * (scale[b, g, t] * (q[b, h, l] . code[b, g, t]) + offset[b, g, t] * sum(q[b, h, l]))
 * with g = h / (H_q / H_label). (8- and 16-bit labels need no unpacking: torch scores them with one
 * matmul, faster than a loop here.)
 *
 * The arithmetic, exactly (every operation rounded to fp32, none fused into a multiply-add: the pragma
 * below turns contraction off in this file, so every build and both paths round alike):
 *   lane_j = q[2j] * low nibble + q[2j+1] * high nibble of code byte j,
 *   dot = (...((lane_0 + lane_1) + lane_2) ... + lane_{r/2-1}),
 *   score = ((scale * dot) + (offset * sum(q))) * scaling, sum(q) added channel by channel.
 * The torch reference rounds the same steps after the dot product; its dot product (a matmul) sums in
 * another order, so the two agree exactly where the dot products are exact (integer-valued problems,
 * as the tests use) and to fp32 rounding otherwise.
 *
 * Two paths compute it: byte tables (any r) and, for r = 16 with AVX-512, sixteen tokens at a time
 * with in-register lookups (vpermps over the 16 values of each nibble). They give the same bits. */

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "cpu_decode.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(DOUBLESPARSE_NO_SIMD)
#include <immintrin.h>
#define SIMD_SCORES 1
#else
#define SIMD_SCORES 0
#endif

/* Byte tables: for code lane j, table[j][v] = the lane's share of q . code when its byte is v
 * (both nibbles). A token's dot product is then `width` independent table loads, where unpacking
 * nibbles to floats would cost more than the arithmetic it feeds. */
static void build_tables(const float *q, int64_t width, float *table) {
    for (int64_t j = 0; j < width; j++) {
        const float even = q[2 * j], odd = q[2 * j + 1];
        for (int v = 0; v < 256; v++) {
            const float low = even * (float)(v & 0x0F), high = odd * (float)(v >> 4);
            table[j * 256 + v] = low + high;
        }
    }
}

#if SIMD_SCORES
/* r = 16 (8 code bytes per token, contiguous): tokens [t_begin, t_end) sixteen at a time. Each code
 * byte's nibbles index 16-entry tables of q[c] * v held in registers; the low dwords of the 16 tokens'
 * codes (bytes 0-3) and their high dwords (bytes 4-7) are gathered into one register each first. */
static void score_tokens_r16(const float *q, float q_sum, float scaling, const uint8_t *codes, const half_t *scale,
                             const half_t *offset, int64_t t_begin, int64_t t_end, int first, float *best) {
    __m512 even[8], odd[8];
    const __m512 values = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int j = 0; j < 8; j++) {
        even[j] = _mm512_mul_ps(_mm512_set1_ps(q[2 * j]), values);
        odd[j] = _mm512_mul_ps(_mm512_set1_ps(q[2 * j + 1]), values);
    }
    const __m512i low_dwords = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i high_dwords = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    const __m512 sums = _mm512_set1_ps(q_sum), scalings = _mm512_set1_ps(scaling);
    for (int64_t t = t_begin; t < t_end; t += 16) {
        const int64_t n = t_end - t < 16 ? t_end - t : 16;
        const __mmask16 keep = (__mmask16)((1u << n) - 1u);
        const __mmask8 first_eight = (__mmask8)(n >= 8 ? 0xFF : (1u << n) - 1u);
        const __mmask8 last_eight = (__mmask8)(n <= 8 ? 0 : (1u << (n - 8)) - 1u);
        const __m512i a = _mm512_maskz_loadu_epi64(first_eight, codes + t * 8);
        const __m512i b = _mm512_maskz_loadu_epi64(last_eight, codes + t * 8 + 64);
        const __m512i words[2] = {_mm512_permutex2var_epi32(a, low_dwords, b),
                                  _mm512_permutex2var_epi32(a, high_dwords, b)};
        __m512 dot = _mm512_setzero_ps();
        for (int j = 0; j < 8; j++) {
            const __m512i byte = _mm512_srli_epi32(words[j / 4], 8 * (j % 4)); /* vpermps reads 4 index bits */
            const __m512 low = _mm512_permutexvar_ps(byte, even[j]);
            const __m512 high = _mm512_permutexvar_ps(_mm512_srli_epi32(byte, 4), odd[j]);
            dot = _mm512_add_ps(dot, _mm512_add_ps(low, high));
        }
        const __m512 widened_scale = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(keep, scale + t));
        const __m512 widened_offset = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(keep, offset + t));
        const __m512 score = _mm512_mul_ps(
            _mm512_add_ps(_mm512_mul_ps(widened_scale, dot), _mm512_mul_ps(widened_offset, sums)), scalings);
        if (first) {
            _mm512_mask_storeu_ps(best + t, keep, score);
        } else {
            const __m512 old = _mm512_maskz_loadu_ps(keep, best + t);
            const __mmask16 higher = _mm512_cmp_ps_mask(score, old, _CMP_GT_OQ);
            _mm512_mask_storeu_ps(best + t, keep, _mm512_mask_mov_ps(old, higher, score));
        }
    }
}
#endif

/* q . code for `n` tokens from `codes` (token stride `st` bytes) into dot[]. Lanes outer, tokens
 * inner: every token accumulates independently, so the adds do not wait on each other. */
static void dot_tokens(int64_t width, int64_t st, const float *q, const float *table, const uint8_t *codes, int64_t n,
                       float *dot) {
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

void ds_score_tokens(const label_rows *a, const float *q, int64_t b, int64_t g, int64_t t_begin, int64_t t_end,
                     int first, float *tables, float *best) {
    const int64_t r = a->channels, width = r / 2;
    const int use_tables = width <= MAX_TABLE_LANES;
    float dot[TILE], scale[TILE], offset[TILE];
    float q_sum = 0.0f;
    for (int64_t c = 0; c < r; c++) q_sum += q[c];
    const uint8_t *codes = a->codes + b * a->code_stride_b + g * a->code_stride_h;
    const int64_t stats = b * a->stat_stride_b + g * a->stat_stride_h;
#if SIMD_SCORES
    if (width == 8 && a->code_stride_t == 8) {
        score_tokens_r16(q, q_sum, a->scaling, codes, a->scale + stats, a->offset + stats, t_begin, t_end, first, best);
        return;
    }
#endif
    if (use_tables) build_tables(q, width, tables);
    for (int64_t t0 = t_begin; t0 < t_end; t0 += TILE) {
        const int64_t n = t_end - t0 < TILE ? t_end - t0 : TILE;
        dot_tokens(width, a->code_stride_t, q, use_tables ? tables : NULL, codes + t0 * a->code_stride_t, n, dot);
        /* Widened in a pass of their own, which keeps the arithmetic loop below simple to vectorize. */
        const half_t *scale_half = a->scale + stats + t0, *offset_half = a->offset + stats + t0;
        for (int64_t t = 0; t < n; t++) {
            scale[t] = HALF_TO_FLOAT(scale_half[t]);
            offset[t] = HALF_TO_FLOAT(offset_half[t]);
        }
        for (int64_t t = 0; t < n; t++) {
            const float scaled = scale[t] * dot[t], shifted = offset[t] * q_sum;
            dot[t] = scaled + shifted;
        }
        float *out = best + t0;
        if (first) {
            for (int64_t t = 0; t < n; t++) out[t] = dot[t] * a->scaling;
        } else {
            for (int64_t t = 0; t < n; t++) {
                const float v = dot[t] * a->scaling;
                out[t] = v > out[t] ? v : out[t];
            }
        }
    }
}

typedef struct {
    label_rows labels;
    const float *q;           /* [B, H_q, L, r], contiguous */
    float *out;               /* [B, H_select, L, T], contiguous */
    int64_t q_heads, label_heads, select_heads, rows, tokens;
} score_args;

static void score_range(void *p, int64_t begin, int64_t end, int thread) {
    (void)thread;
    const score_args *a = (const score_args *)p;
    const int64_t r = a->labels.channels, T = a->tokens;
    const int64_t chunks = (T + CHUNK - 1) / CHUNK;
    const int64_t per_label = a->q_heads / a->label_heads;
    const int64_t per_select = a->q_heads / a->select_heads;
    float tables[MAX_TABLE_LANES * 256];
    for (int64_t item = begin; item < end; item++) {
        const int64_t chunk = item % chunks;
        const int64_t row = item / chunks; /* (b, s, l) */
        const int64_t l = row % a->rows;
        const int64_t s = (row / a->rows) % a->select_heads;
        const int64_t b = row / (a->rows * a->select_heads);
        const int64_t t_end = chunk * CHUNK + CHUNK < T ? chunk * CHUNK + CHUNK : T;
        for (int64_t h = s * per_select; h < (s + 1) * per_select; h++) {
            const float *q = a->q + ((b * a->q_heads + h) * a->rows + l) * r;
            ds_score_tokens(&a->labels, q, b, h / per_label, chunk * CHUNK, t_end, h == s * per_select, tables,
                            a->out + row * T);
        }
    }
}

void doublesparse_label_scores(
    const float *q, const uint8_t *codes, int64_t code_stride_b, int64_t code_stride_h, int64_t code_stride_t,
    const half_t *scale, const half_t *offset, int64_t stat_stride_b, int64_t stat_stride_h, float *out,
    int64_t batch, int64_t q_heads, int64_t label_heads, int64_t select_heads, int64_t rows, int64_t tokens,
    int64_t channels, float scaling, int num_threads) {
    score_args a = {{codes, code_stride_b, code_stride_h, code_stride_t, scale, offset, stat_stride_b, stat_stride_h,
                     channels, scaling},
                    q, out, q_heads, label_heads, select_heads, rows, tokens};
    const int64_t chunks = (tokens + CHUNK - 1) / CHUNK;
    ds_parallel_for(score_range, &a, batch * select_heads * rows * chunks, num_threads);
}
