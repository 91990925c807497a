/* The fused decode step: label scores, selection and sparse attention of one (b, selection head, row)
 * item in one pass, one item per thread at a time. Its arithmetic is the three kernels' own (the same
 * primitives, in the same order), so its output equals theirs bit for bit; what changes is where the
 * data lives. The row's scores (4 T bytes) and selection stay in the thread's workspace, in its own
 * cache, instead of being written out as a [B, H, L, T] tensor and read back by the next kernel, and
 * the step is one parallel region instead of three. Items are handed out one at a time: on a machine
 * whose cores are shared, a thread that is descheduled holds up its one item, not a third of the work.
 *
 * It also reads the query's label channels itself (no gathered copy) and writes the output at the
 * caller's strides, so the attention function's [B, L, H_q, d] layout needs no transposed copy. */

#include "cpu_decode.h"

typedef struct {
    label_rows labels;
    const int64_t *channels;        /* [H_label, r], contiguous */
    const float *q;                 /* [B, H_q, L, d], contiguous */
    const uint8_t *keys, *values;   /* [B, H_kv, T, d] elements of `kind`, d contiguous */
    int64_t kv_stride_b, kv_stride_h, kv_stride_t; /* in elements, shared by keys and values */
    const uint8_t *valid;           /* bool [B, L, T] with strides below (the batch stride may be 0) */
    int64_t valid_stride_b, valid_stride_l, valid_stride_t;
    const int64_t *budgets;         /* [B, L], contiguous */
    float *out;                     /* [B, H_q, L, d] at the strides below (in elements) */
    int64_t out_stride_b, out_stride_h, out_stride_l;
    int64_t *indices;               /* [B, H_select, L, K], contiguous, or NULL */
    uint8_t *workspace;             /* `workspace_bytes` per thread (doublesparse_fused_workspace_bytes) */
    int64_t workspace_bytes;
    int64_t q_heads, label_heads, kv_heads, select_heads, rows, tokens, max_budget, head_dim;
    int64_t sink_tokens, recent_tokens;
    int kind;
    float scaling;
} fused_args;

static int64_t round_up(int64_t bytes) { return (bytes + 63) / 64 * 64; }

/* Bytes of one thread's workspace: scores, selection keys and positions (T each), then the row's
 * selected indices (K int64) and softmax weights (G x K floats). */
int64_t doublesparse_fused_workspace_bytes(int64_t tokens, int64_t max_budget, int64_t group) {
    return round_up(12 * tokens) + round_up(8 * max_budget) + round_up(4 * group * max_budget);
}

static void fused_item(void *p, int64_t item, int64_t end, int thread) {
    (void)end;
    const fused_args *a = (const fused_args *)p;
    const int64_t T = a->tokens, K = a->max_budget, d = a->head_dim, r = a->labels.channels;
    const int64_t per_select = a->q_heads / a->select_heads;
    const int64_t per_label = a->q_heads / a->label_heads;
    const int64_t per_kv = a->select_heads / a->kv_heads;
    const int64_t l = item % a->rows;
    const int64_t s = (item / a->rows) % a->select_heads;
    const int64_t b = item / (a->rows * a->select_heads);

    uint8_t *work = a->workspace + (int64_t)thread * a->workspace_bytes;
    float *scores = (float *)work;
    uint32_t *keys = (uint32_t *)(scores + T), *positions = keys + T;
    int64_t *index = (int64_t *)(work + round_up(12 * T));
    float *weights = (float *)(work + round_up(12 * T) + round_up(8 * K));
    float tables[MAX_TABLE_LANES * 256];
    float q_label[MAX_HEAD_DIM];

    const int64_t first_head = (b * a->q_heads + s * per_select) * a->rows + l;
    for (int64_t h = s * per_select; h < (s + 1) * per_select; h++) {
        const int64_t g = h / per_label;
        const float *q = a->q + ((b * a->q_heads + h) * a->rows + l) * d;
        for (int64_t c = 0; c < r; c++) q_label[c] = q[a->channels[g * r + c]];
        ds_score_tokens(&a->labels, q_label, b, g, 0, T, h == s * per_select, tables, scores);
    }
    int64_t budget = a->budgets[b * a->rows + l];
    const uint8_t *valid = a->valid + b * a->valid_stride_b + l * a->valid_stride_l;
    ds_select_row(scores, valid, a->valid_stride_t, T, budget, K, a->sink_tokens, a->recent_tokens, index, keys,
                  positions);
    if (a->indices != NULL) memcpy(a->indices + item * K, index, (size_t)K * sizeof(int64_t));
    budget = budget < 0 ? 0 : budget > K ? K : budget; /* the slots that hold the selection */

    const int64_t elem = a->kind == ROWS_F32 ? 4 : 2;
    const int64_t kv_offset = (b * a->kv_stride_b + (s / per_kv) * a->kv_stride_h) * elem;
    const kv_rows kv = {a->keys + kv_offset, a->values + kv_offset, a->kv_stride_t * elem, d, a->kind, a->scaling};
    float *out = a->out + b * a->out_stride_b + s * per_select * a->out_stride_h + l * a->out_stride_l;
    ds_attend_slots(&kv, a->q + first_head * d, a->rows * d, per_select, index, NULL, 0, budget, weights, out,
                    a->out_stride_h);
}

/* Returns 0, or 1 (having done nothing) where a label channel lies outside [0, head_dim): the channels
 * index the query rows, so one out of range would read outside them. */
int doublesparse_fused_decode(
    const float *q, const int64_t *channels, const uint8_t *codes, int64_t code_stride_b, int64_t code_stride_h,
    int64_t code_stride_t, const half_t *scale, const half_t *offset, int64_t stat_stride_b, int64_t stat_stride_h,
    const uint8_t *keys, const uint8_t *values, int64_t kv_stride_b, int64_t kv_stride_h, int64_t kv_stride_t,
    const uint8_t *valid, int64_t valid_stride_b, int64_t valid_stride_l, int64_t valid_stride_t,
    const int64_t *budgets, float *out, int64_t out_stride_b, int64_t out_stride_h, int64_t out_stride_l,
    int64_t *indices, uint8_t *workspace, int64_t batch, int64_t q_heads, int64_t label_heads, int64_t kv_heads,
    int64_t select_heads, int64_t rows, int64_t tokens, int64_t num_channels, int64_t max_budget, int64_t head_dim,
    int64_t sink_tokens, int64_t recent_tokens, int kind, float scaling, int num_threads) {
    for (int64_t i = 0; i < label_heads * num_channels; i++)
        if (channels[i] < 0 || channels[i] >= head_dim) return 1;
    const int64_t group = q_heads / select_heads;
    fused_args a = {{codes, code_stride_b, code_stride_h, code_stride_t, scale, offset, stat_stride_b, stat_stride_h,
                     num_channels, scaling},
                    channels, q, keys, values, kv_stride_b, kv_stride_h, kv_stride_t,
                    valid, valid_stride_b, valid_stride_l, valid_stride_t, budgets,
                    out, out_stride_b, out_stride_h, out_stride_l, indices,
                    workspace, doublesparse_fused_workspace_bytes(tokens, max_budget, group),
                    q_heads, label_heads, kv_heads, select_heads, rows, tokens, max_budget, head_dim,
                    sink_tokens, recent_tokens, kind, scaling};
    ds_parallel_items(fused_item, &a, batch * select_heads * rows, num_threads);
    return 0;
}
