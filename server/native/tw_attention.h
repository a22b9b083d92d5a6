/* Grouped-query attention over an fp16 KV cache (see tw_attention.c). */
#ifndef TW_ATTENTION_H
#define TW_ATTENTION_H
#include <stddef.h>
#include <stdint.h>

#define TW_QUERY_BLOCK 32  /* query rows per prefill task */
#define TW_KEY_CHUNK 256   /* keys per decode task (a row's keys are split over tasks) */
#define TW_KEY_TILE 16     /* keys scored together (a page holds a multiple of them) */
#define TW_MAX_HEAD_DIM 128
#define TW_MAX_GROUP 8      /* query heads per KV head */

typedef struct {
    int64_t batch, seq, heads, kv_heads, head_dim, capacity, max_pos;
    float scale;
    const float *qkv;       /* [batch, seq, (heads + 2 kv_heads) * head_dim] */
    uint16_t *key, *value;  /* fp16 [batch, kv_heads, capacity, head_dim], updated in place; paged:
                               [pages, kv_heads, capacity = page size, head_dim] */
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

void tw_task_begin(const TwAttention *a, int64_t task, TwTask *t);
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
#endif
