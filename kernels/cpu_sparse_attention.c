/* Sparse attention of one-row decode queries: for each (b, s, l), the G query heads of selection
 * head s attend the valid selected slots of their KV head. Each selected K row is read once and
 * dotted with all G queries; after the softmax each V row is read once and added to all G outputs.
 * No gathered copy of the rows is made: they are read in place, the next ones prefetched. */

#include "cpu_decode.h"

/* Random rows defeat the hardware prefetcher: every cache line of a row is asked for some rows
 * ahead, into L2 (locality 2). Far ahead keeps more misses in flight than one core's L1 fill buffers
 * allow. Chosen by timing the fused step over 8 layers' caches in turn (DRAM, huge pages, 2 threads,
 * 32K, 1/16, batch 4) against 8 rows into L1, 64 and 96 rows into L2 and 48 rows into L3; the end-to-end
 * effect is in `bench decode` (docs/benchmarks.md). */
#define PREFETCH_AHEAD 48

static inline void prefetch_row(const uint8_t *row, int64_t bytes) {
    for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(row + offset, 0, 2);
}

static inline void load_row(int kind, const uint8_t *base, int64_t n, float *row) {
    if (kind == ROWS_F32) {
        memcpy(row, base, (size_t)n * sizeof(float));
    } else if (kind == ROWS_F16) {
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

void ds_attend_slots(const kv_rows *kv, const float *q0, int64_t q_stride, int64_t group, const int64_t *index,
                     const uint8_t *keep, int64_t keep_stride, int64_t K, float *weights, float *out,
                     int64_t out_stride) {
    const int64_t d = kv->head_dim, row_bytes = kv->row_bytes;
    const int64_t elem = kv->kind == ROWS_F32 ? 4 : 2;
    float acc[MAX_ACCUMULATOR];
    float row[MAX_HEAD_DIM];
    float top[MAX_GROUP_HEADS];
    for (int64_t g = 0; g < group; g++) top[g] = -INFINITY;
    int64_t kept = 0;
    for (int64_t k = 0; k < K; k++) {
        if (keep != NULL && !keep[k * keep_stride]) continue;
        if (k + PREFETCH_AHEAD < K) prefetch_row(kv->keys + index[k + PREFETCH_AHEAD] * row_bytes, d * elem);
        const float *key;
        if (kv->kind == ROWS_F32) key = (const float *)(kv->keys + index[k] * row_bytes);
        else { load_row(kv->kind, kv->keys + index[k] * row_bytes, d, row); key = row; }
        for (int64_t g = 0; g < group; g++) {
            const float logit = kv->scaling * dot_row(q0 + g * q_stride, key, d);
            weights[g * K + kept] = logit;
            top[g] = logit > top[g] ? logit : top[g];
        }
        kept++;
    }
    for (int64_t g = 0; g < group; g++) {
        float total = 0.0f;
        for (int64_t k = 0; k < kept; k++) total += weights[g * K + k] = expf(weights[g * K + k] - top[g]);
        const float inverse = total > 0.0f ? 1.0f / total : 0.0f;
        for (int64_t k = 0; k < kept; k++) weights[g * K + k] *= inverse;
    }
    memset(acc, 0, (size_t)(group * d) * sizeof(float));
    int64_t slot = 0;
    for (int64_t k = 0; k < K; k++) {
        if (keep != NULL && !keep[k * keep_stride]) continue;
        if (k + PREFETCH_AHEAD < K) prefetch_row(kv->values + index[k + PREFETCH_AHEAD] * row_bytes, d * elem);
        const float *value;
        if (kv->kind == ROWS_F32) value = (const float *)(kv->values + index[k] * row_bytes);
        else { load_row(kv->kind, kv->values + index[k] * row_bytes, d, row); value = row; }
        for (int64_t g = 0; g < group; g++) {
            const float w = weights[g * K + slot];
            float *sum = acc + g * d;
            for (int64_t j = 0; j < d; j++) sum[j] += w * value[j];
        }
        slot++;
    }
    for (int64_t g = 0; g < group; g++) memcpy(out + g * out_stride, acc + g * d, (size_t)d * sizeof(float));
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
    int64_t q_heads, kv_heads, select_heads, rows, slots, head_dim;
    int kind;
    float scaling;
} attend_args;

static void attend_range(void *p, int64_t begin, int64_t end, int thread) {
    (void)thread;
    const attend_args *a = (const attend_args *)p;
    const int64_t d = a->head_dim, K = a->slots;
    const int64_t per_select = a->q_heads / a->select_heads;
    const int64_t per_kv = a->select_heads / a->kv_heads;
    const int64_t elem = a->kind == ROWS_F32 ? 4 : 2;
    for (int64_t item = begin; item < end; item++) { /* (b, s, l) */
        const int64_t l = item % a->rows;
        const int64_t s = (item / a->rows) % a->select_heads;
        const int64_t b = item / (a->rows * a->select_heads);
        const int64_t kv_offset = (b * a->stride_b + (s / per_kv) * a->stride_h) * elem;
        const kv_rows kv = {a->keys + kv_offset, a->values + kv_offset, a->stride_t * elem, d, a->kind, a->scaling};
        const uint8_t *keep = a->slot_valid + b * a->valid_stride_b + s * a->valid_stride_s + l * a->valid_stride_l;
        const int64_t first_head = (b * a->q_heads + s * per_select) * a->rows + l;
        ds_attend_slots(&kv, a->q + first_head * d, a->rows * d, per_select, a->indices + item * K, keep,
                        a->valid_stride_k, K, a->weights + item * per_select * K, a->out + first_head * d,
                        a->rows * d);
    }
}

void doublesparse_sparse_attention(
    const float *q, const uint8_t *keys, const uint8_t *values, int64_t stride_b, int64_t stride_h, int64_t stride_t,
    const int64_t *indices, const uint8_t *slot_valid, int64_t valid_stride_b, int64_t valid_stride_s,
    int64_t valid_stride_l, int64_t valid_stride_k, float *weights, float *out, int64_t batch, int64_t q_heads,
    int64_t kv_heads, int64_t select_heads, int64_t rows, int64_t slots, int64_t head_dim, int kind, float scaling,
    int num_threads) {
    attend_args a = {q, keys, values, stride_b, stride_h, stride_t, indices, slot_valid, valid_stride_b,
                     valid_stride_s, valid_stride_l, valid_stride_k, weights, out, q_heads, kv_heads,
                     select_heads, rows, slots, head_dim, kind, scaling};
    ds_parallel_for(attend_range, &a, batch * select_heads * rows, num_threads);
}

/* The read pattern of sparse attention without its arithmetic: rows[i] of `base` (row_bytes each,
 * row_stride apart) read in order with the kernel's prefetching, the rows split over the threads.
 * `bench decode` times it over a buffer larger than the caches to give the rate at which this machine
 * reads rows at random positions: the ceiling of Double Sparsity's K/V reads, beside the streaming
 * bandwidth that the byte floor assumes. Returns the xor of the rows' 8-byte words (so nothing is
 * optimised away; the tests check it). */
typedef struct {
    const uint8_t *base;
    int64_t row_bytes, row_stride;
    const int64_t *rows;
    uint64_t checksum;
} read_rows_args;

static void read_rows_range(void *p, int64_t begin, int64_t end, int thread) {
    (void)thread;
    read_rows_args *a = (read_rows_args *)p;
    const int64_t words = a->row_bytes / 8;
    uint64_t sum = 0;
    for (int64_t i = begin; i < end; i++) {
        if (i + PREFETCH_AHEAD < end) prefetch_row(a->base + a->rows[i + PREFETCH_AHEAD] * a->row_stride, a->row_bytes);
        const uint8_t *row = a->base + a->rows[i] * a->row_stride;
        for (int64_t j = 0; j < words; j++) {
            uint64_t word;
            memcpy(&word, row + 8 * j, sizeof word);
            sum ^= word;
        }
    }
    __atomic_fetch_xor(&a->checksum, sum, __ATOMIC_RELAXED);
}

uint64_t doublesparse_read_rows(const uint8_t *base, int64_t row_bytes, int64_t row_stride, const int64_t *rows,
                                int64_t n, int num_threads) {
    read_rows_args a = {base, row_bytes, row_stride, rows, 0};
    ds_parallel_for(read_rows_range, &a, n, num_threads);
    return a.checksum;
}
