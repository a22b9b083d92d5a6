/* Grouped-query attention over an fp16 or int8 KV cache (see tw_attention.c, tw_kv8.c). */
#ifndef TW_ATTENTION_H
#define TW_ATTENTION_H
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define TW_QUERY_BLOCK 32  /* query rows per prefill task */
#define TW_KEY_CHUNK 256   /* keys per decode task (a row's keys are split over tasks) */
#define TW_KEY_TILE 16     /* keys scored together (a page holds a multiple of them) */
#define TW_MAX_HEAD_DIM 256 /* a multiple of 16 up to this (gemma3: 256) */
#define TW_MAX_GROUP 8      /* query heads per KV head */
#define TW_KV_BLOCK 16     /* int8 cache: positions that share a key's per-channel scales */

/* The cache's format (the op's kv_format attribute). */
enum { TW_KV_FP16 = 0, TW_KV_INT8 = 1 };

typedef struct {
    int64_t batch, seq, heads, kv_heads, head_dim, capacity, max_pos;
    float scale;
    int64_t window;         /* sliding_window: a query at p sees keys max(0, p - window + 1)..p; 0 = all */
    float softcap;          /* scores = softcap * tanh(scores / softcap) before softmax; 0 = none */
    const float *qkv;       /* [batch, seq, (heads + 2 kv_heads) * head_dim] */
    int kv_format;          /* TW_KV_FP16 (key, value) or TW_KV_INT8 (key8, value8) */
    uint16_t *key, *value;  /* fp16 [batch, kv_heads, capacity, head_dim], updated in place; paged:
                               [pages, kv_heads, capacity = page size, head_dim] */
    uint8_t *key8, *value8; /* int8 format: the same shapes with rows of row_bytes bytes (tw_kv8.c) */
    int64_t row_bytes;      /* int8 format: head_dim + head_dim / 4 */
    float *k_rot;           /* int8 format, scratch [batch, seq, kv_heads, head_dim]: rotated new keys */
    const int32_t *pages;   /* NULL (dense), or [batch, pages_per_row]: row b's position p lives in
                               page pages[b * pages_per_row + p / capacity] at p % capacity */
    int64_t pages_per_row;
    const int32_t *seqlens; /* [batch]: valid positions after this call, minus one */
    const float *cos, *sin; /* [max_pos, head_dim / 2] */
    float *out;             /* [batch, seq, heads * head_dim] */
    float *q;               /* scratch [batch, seq, heads, head_dim]: rotated, scaled queries */
    float *partial;         /* scratch: per task, per (query row, head): max, sum, head_dim accumulators */
    int64_t query_blocks, key_chunks, partial_stride;
} TwAttention;

/* What one task covers: row b, KV head kv, query rows [s0, s1), keys [j_begin, j_end), and
   its partial state (reset by tw_task_begin). */
typedef struct {
    int64_t b, kv, s0, s1, first, j_begin, j_end;
    float *state;
} TwTask;

/* Where position pos of row b, KV head kv starts in the key (or value) buffer, in halves.
   Positions [16 i, 16 i + 16) are contiguous in both layouts (a page holds a multiple of 16). */
static inline int64_t tw_kv_offset(const TwAttention *a, int64_t b, int64_t kv, int64_t pos) {
    if (a->pages == NULL) return ((b * a->kv_heads + kv) * a->capacity + pos) * a->head_dim;
    const int64_t page = a->pages[b * a->pages_per_row + pos / a->capacity];
    return ((page * a->kv_heads + kv) * a->capacity + pos % a->capacity) * a->head_dim;
}

/* Where position pos of row b, KV head kv starts in an int8 cache, in bytes (tw_kv8.c's rows). */
static inline int64_t tw_kv8_offset(const TwAttention *a, int64_t b, int64_t kv, int64_t pos) {
    if (a->pages == NULL) return ((b * a->kv_heads + kv) * a->capacity + pos) * a->row_bytes;
    const int64_t page = a->pages[b * a->pages_per_row + pos / a->capacity];
    return ((page * a->kv_heads + kv) * a->capacity + pos % a->capacity) * a->row_bytes;
}

/* The first key position the query at position pos sees. Key j is visible iff j <= pos and
   pos - j < window: transformers' sliding-window mask (masking_utils.sliding_window_overlay,
   kv_idx > q_idx - sliding_window, used by gemma2/gemma3) and llama.cpp's LLAMA_SWA_TYPE_STANDARD
   (masked iff p1 - p0 >= n_swa) agree, so a window of W keeps W keys, the query's own included. */
static inline int64_t tw_first_visible(const TwAttention *a, int64_t pos) {
    const int64_t lo = a->window > 0 ? pos - a->window + 1 : 0;
    return lo > 0 ? lo : 0;
}

/* The keys of the tile [j0, j0 + n) that the query at position pos sees: [j0 + *lo, j0 + *hi),
   none when *hi <= *lo. */
static inline void tw_tile_span(const TwAttention *a, int64_t pos, int64_t j0, int64_t n, int64_t *lo, int64_t *hi) {
    const int64_t from = tw_first_visible(a, pos) - j0, to = pos + 1 - j0;
    *lo = from > 0 ? from : 0;
    *hi = to < n ? to : n;
}

void tw_task_begin(const TwAttention *a, int64_t task, TwTask *t);
/* Head `head` (a query head, or heads + kv for a key) of row (b, s), rotated, into out[head_dim]. */
void tw_rotate_head(const TwAttention *a, int64_t b, int64_t s, int64_t head, float *out);
/* Rotates and stores with the given fp16 row writer (the ISA-specific part of storing). */
void tw_attention_store_with(const TwAttention *a, int64_t b, int64_t s,
                             void (*store_half)(const float *x, int64_t d, uint16_t *row));

/* Plans the tasks (fills query_blocks, key_chunks, partial_stride); returns the partial floats needed. */
int64_t tw_attention_plan(TwAttention *a);
int64_t tw_attention_tasks(const TwAttention *a);
/* Rotates row (b, s)'s query and key, writes its key and value into the cache (fp16). */
void tw_attention_store(const TwAttention *a, int64_t b, int64_t s);
/* Attention of one (row, kv head, query block, key chunk) into its partial state. */
void tw_attention_task(const TwAttention *a, int64_t task);
/* Merges the key chunks' partial states of (row b, query s) into the output. */
void tw_attention_finish(const TwAttention *a, int64_t b, int64_t s);
/* The AVX2 versions behind tw_attention_store / tw_attention_task (see tw_isa.h). */
void tw_store_half_avx2(const float *x, int64_t d, uint16_t *row);
void tw_attention_task_avx2(const TwAttention *a, int64_t task);

/* ---- the int8 cache (tw_kv8.c) ---- */
/* Rotates row (b, s)'s query (into q) and keys (into k_rot); quantizes its values into the cache. */
void tw_kv8_store_row(const TwAttention *a, int64_t b, int64_t s);
/* Quantizes row b's new keys of KV head kv into the cache, in position order. */
void tw_kv8_store_keys(const TwAttention *a, int64_t b, int64_t kv);
/* The per-channel key scales (out[0, d)) and minimums (out[d, 2d)) of the key block at blk. */
void tw_kv8_key_scales(const uint8_t *blk, int64_t d, int64_t row_bytes, float *out);
/* A value row's scale and minimum (inline: 16 of them per block read). */
__attribute__((target("f16c"))) static inline void tw_kv8_value_scale(const uint8_t *row, int64_t d, float *scale,
                                                                      float *min) {
    uint16_t h[2];
    memcpy(h, row + d, sizeof h);
    *scale = _cvtsh_ss(h[0]);
    *min = _cvtsh_ss(h[1]);
}
void tw_attention_task8_avx2(const TwAttention *a, int64_t task);
#endif
