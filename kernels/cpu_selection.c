/* Selection: for each row (b, h, l), the row's budget k of tokens: the forced ones (current,
 * recent, sinks; see selection.py) and then the highest scores, ties to the higher position.
 * Slots [0, k) hold the selection (forced first); slots [k, K) repeat slot 0 (they are invalid). */

#include "cpu_decode.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && !defined(DOUBLESPARSE_NO_SIMD)
#include <immintrin.h>
#define SIMD_SELECT 1
#else
#define SIMD_SELECT 0
#endif

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

/* The radix select proper, over `candidates` (keys, positions ascending) whose level-0 histogram is
 * `hist` (summed into hist[0]): the `need` largest keys go to out[taken, taken + need), those above
 * the threshold's 11-bit bin first (in position order), then those above the threshold within the bin,
 * then keys equal to it, newest first. Returns the new `taken`. */
static int64_t radix_take(uint32_t (*hist)[TOP_BINS], uint32_t *keys, uint32_t *positions, int64_t candidates,
                          int64_t need, int64_t *out, int64_t taken) {
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
    return taken;
}

/* The `rank`-th largest (from 1) of n keys, reordering them (quickselect). */
static uint32_t kth_largest(uint32_t *keys, int64_t n, int64_t rank) {
    int64_t low = 0, high = n - 1, k = rank - 1;
    while (low < high) {
        const uint32_t a = keys[low], b = keys[(low + high) / 2], c = keys[high];
        const uint32_t pivot = a > b ? (b > c ? b : (a > c ? c : a)) : (a > c ? a : (b > c ? c : b));
        int64_t i = low, j = high;
        while (i <= j) {
            while (keys[i] > pivot) i++;
            while (keys[j] < pivot) j--;
            if (i <= j) {
                const uint32_t swap = keys[i];
                keys[i++] = keys[j];
                keys[j--] = swap;
            }
        }
        if (k <= j) high = j;
        else if (k >= i) low = i;
        else return keys[k];
    }
    return keys[k];
}

/* Tokens [0, T) that are valid, not forced (`forced`: n_forced ascending positions) and whose key is at
 * least `floor_key`, in position order, into keys/positions, with their level-0 histogram; returns how
 * many. (The full candidate pass is this with floor_key 0.) */
static int64_t gather_candidates(const float *scores, const uint8_t *valid, int64_t vt, int64_t T, uint32_t floor_key,
                                 const int64_t *forced, int64_t n_forced, uint32_t (*hist)[TOP_BINS], uint32_t *keys,
                                 uint32_t *positions) {
    int64_t n = 0, f = 0;
#if SIMD_SELECT
    if (vt == 1) {
        const __m512i sign = _mm512_set1_epi32((int)0x80000000u), floor = _mm512_set1_epi32((int)floor_key);
        const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        for (int64_t t = 0; t < T; t += 16) {
            const int64_t left = T - t;
            const __mmask16 in = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
            const __m512i bits = _mm512_castps_si512(_mm512_maskz_loadu_ps(in, scores + t));
            const __m512i key = _mm512_xor_si512(bits, _mm512_or_si512(_mm512_srai_epi32(bits, 31), sign));
            const __m128i flags = _mm_maskz_loadu_epi8(in, valid + t);
            const __mmask16 take = _mm512_mask_cmpge_epu32_mask(_mm_test_epi8_mask(flags, flags) & in, key, floor);
            _mm512_mask_compressstoreu_epi32(keys + n, take, key);
            _mm512_mask_compressstoreu_epi32(positions + n, take, _mm512_add_epi32(lanes, _mm512_set1_epi32((int)t)));
            n += __builtin_popcount((unsigned)take);
        }
    } else
#endif
    {
        for (int64_t t = 0; t < T; t++) {
            if (!valid[t * vt]) continue;
            const uint32_t key = order_key(scores[t]);
            if (key < floor_key) continue;
            keys[n] = key;
            positions[n++] = (uint32_t)t;
        }
    }
    /* Forced tokens leave the candidates (both lists ascend); the histogram counts those that stay. */
    int64_t kept = 0;
    for (int64_t i = 0; i < n; i++) {
        while (f < n_forced && forced[f] < (int64_t)positions[i]) f++;
        if (f < n_forced && forced[f] == (int64_t)positions[i]) continue;
        const uint32_t key = keys[i];
        hist[kept & (SUB_HISTOGRAMS - 1)][key >> (32 - TOP_BITS)]++;
        keys[kept] = key;
        positions[kept++] = positions[i];
    }
    return kept;
}

/* Tokens sampled (every SAMPLE_STRIDE-th valid one) to place a floor under the threshold key; a build
 * with -DDOUBLESPARSE_SELECT_FULL_PASS keeps every candidate (the tests compare the two). */
#define SAMPLE_STRIDE 16
#ifdef DOUBLESPARSE_SELECT_FULL_PASS
#define SAMPLED_FLOOR 0
#else
#define SAMPLED_FLOOR 1
#endif

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

    /* The forced tokens, in position order: the first sink_kept valid ones and the last recent_kept
     * (their ranks may overlap in a short row). They are the first slots of the selection. */
    int64_t taken = 0, seen = 0, t = 0;
    for (; t < T && seen < sink_kept; t++)
        if (valid[t * vt]) {
            out[taken++] = t;
            seen++;
        }
    int64_t first_recent = T; /* the position of the first recent token */
    for (int64_t back = T - 1, counted = 0; back >= 0 && counted < recent_kept; back--)
        if (valid[back * vt]) {
            first_recent = back;
            counted++;
        }
    if (first_recent < t) first_recent = t; /* those before t are sinks already */
    for (int64_t r = first_recent; r < T; r++)
        if (valid[r * vt] && taken < budget) out[taken++] = r;
    const int64_t forced_count = taken;

    int64_t need = budget - taken;
    const int64_t open = num_valid - forced_count;
    if (need >= open) { /* every other valid token fits */
        for (int64_t u = 0, f = 0; u < T && taken < budget; u++) {
            if (!valid[u * vt]) continue;
            while (f < forced_count && out[f] < u) f++; /* the forced slots ascend */
            if (f < forced_count && out[f] == u) continue;
            out[taken++] = u;
        }
    } else if (need > 0) {
        uint32_t hist[SUB_HISTOGRAMS][TOP_BINS];
        memset(hist, 0, sizeof hist);
        /* A floor under the threshold from a sample, so the candidate pass keeps ~1.3x the tokens it
         * needs instead of all of them; the exact selection then runs over those. Where the floor turns
         * out too high (too few candidates: an unlucky sample, heavy ties), the full pass runs instead.
         * Both give the same slots in the same order (see radix_take). */
        uint32_t floor_key = 0;
        int64_t samples = 0;
        if (SAMPLED_FLOOR && open >= 8 * SAMPLE_STRIDE) {
            for (int64_t u = 0; u < T; u += SAMPLE_STRIDE)
                if (valid[u * vt]) keys[samples++] = order_key(scores[u]);
            const double expected = (double)samples * (double)need / (double)open;
            int64_t rank = (int64_t)(1.3 * expected + 3.0 * sqrt(expected) + 2.0);
            if (samples > 0 && rank < samples) floor_key = kth_largest(keys, samples, rank);
        }
        int64_t candidates = gather_candidates(scores, valid, vt, T, floor_key, out, forced_count, hist, keys,
                                               positions);
        if (candidates < need && floor_key > 0) {
            memset(hist, 0, sizeof hist);
            candidates = gather_candidates(scores, valid, vt, T, 0, out, forced_count, hist, keys, positions);
        }
        taken = radix_take(hist, keys, positions, candidates, need, out, taken);
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
