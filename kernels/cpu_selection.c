/* Selection: for each row (b, h, l), the row's budget k of tokens: the forced ones (current,
 * recent, sinks; see selection.py) and then the highest scores, ties to the higher position.
 * Slots [0, k) hold the selection (forced first); slots [k, K) repeat slot 0 (they are invalid). */

#include "cpu_decode.h"

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

void ds_select_row(const float *scores, const uint8_t *valid, int64_t vt, int64_t T, int64_t budget, int64_t K,
                   int64_t sink_tokens, int64_t recent_tokens, int64_t *out, uint32_t *keys, uint32_t *positions) {
    if (budget > K) budget = K;
    if (budget < 0) budget = 0;

    int64_t num_valid = 0;
    if (vt == 1) {
        for (int64_t t = 0; t < T; t++) num_valid += valid[t] != 0;
    } else {
        for (int64_t t = 0; t < T; t++) num_valid += valid[t * vt] != 0;
    }
    const int64_t recent = recent_tokens > 1 ? recent_tokens : 1;
    const int64_t recent_kept = budget < recent ? budget : recent;
    int64_t sink_kept = budget - recent_kept;
    if (sink_kept > sink_tokens) sink_kept = sink_tokens;
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

typedef struct {
    const float *scores;      /* [B, H, L, T], contiguous */
    const uint8_t *valid;     /* bool [B, L, T] with strides below (the batch stride may be 0) */
    int64_t valid_stride_b, valid_stride_l, valid_stride_t;
    const int64_t *budgets;   /* [B, L], contiguous */
    int64_t *out;             /* [B, H, L, K], contiguous */
    uint32_t *workspace;      /* 2 * T per thread */
    int64_t heads, rows, tokens, max_budget, sink_tokens, recent_tokens;
} select_args;

static void select_range(void *p, int64_t begin, int64_t end, int thread) {
    const select_args *a = (const select_args *)p;
    const int64_t T = a->tokens;
    uint32_t *keys = a->workspace + (int64_t)thread * 2 * T;
    for (int64_t row = begin; row < end; row++) {
        const int64_t l = row % a->rows, b = row / (a->rows * a->heads);
        const uint8_t *valid = a->valid + b * a->valid_stride_b + l * a->valid_stride_l;
        ds_select_row(a->scores + row * T, valid, a->valid_stride_t, T, a->budgets[b * a->rows + l], a->max_budget,
                      a->sink_tokens, a->recent_tokens, a->out + row * a->max_budget, keys, keys + T);
    }
}

void doublesparse_select_tokens(
    const float *scores, const uint8_t *valid, int64_t valid_stride_b, int64_t valid_stride_l, int64_t valid_stride_t,
    const int64_t *budgets, int64_t *out, uint32_t *workspace, int64_t batch, int64_t heads, int64_t rows,
    int64_t tokens, int64_t max_budget, int64_t sink_tokens, int64_t recent_tokens, int num_threads) {
    select_args a = {scores, valid, valid_stride_b, valid_stride_l, valid_stride_t, budgets, out, workspace,
                     heads, rows, tokens, max_budget, sink_tokens, recent_tokens};
    ds_parallel_for(select_range, &a, batch * heads * rows, num_threads);
}
