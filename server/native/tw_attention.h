/* Grouped-query attention over an fp16 KV cache (see tw_attention.c). */
#ifndef TW_ATTENTION_H
#define TW_ATTENTION_H
#include <stdint.h>

#define TW_QUERY_BLOCK 32  /* query rows per prefill task */
#define TW_KEY_CHUNK 256   /* keys per decode task (a row's keys are split over tasks) */
#define TW_KEY_TILE 16     /* keys scored together */
#define TW_MAX_HEAD_DIM 128
#define TW_MAX_GROUP 8      /* query heads per KV head */

typedef struct {
    int64_t batch, seq, heads, kv_heads, head_dim, capacity, max_pos;
    float scale;
    const float *qkv;       /* [batch, seq, (heads + 2 kv_heads) * head_dim] */
    uint16_t *key, *value;  /* fp16 [batch, kv_heads, capacity, head_dim], updated in place */
    const int32_t *seqlens; /* [batch]: valid positions after this call, minus one */
    const float *cos, *sin; /* [max_pos, head_dim / 2] */
    float *out;             /* [batch, seq, heads * head_dim] */
    float *q;               /* scratch [batch, seq, heads, head_dim]: rotated, scaled queries */
    float *partial;         /* scratch: per task, per (query row, head): max, sum, head_dim accumulators */
    int64_t query_blocks, key_chunks, partial_stride;
} TwAttention;

/* Plans the tasks (fills query_blocks, key_chunks, partial_stride); returns the partial floats needed. */
int64_t tw_attention_plan(TwAttention *a);
int64_t tw_attention_tasks(const TwAttention *a);
/* Rotates row (b, s)'s query and key, writes its key and value into the cache (fp16). */
void tw_attention_store(const TwAttention *a, int64_t b, int64_t s);
/* Attention of one (row, kv head, query block, key chunk) into its partial state. */
void tw_attention_task(const TwAttention *a, int64_t task);
/* Merges the key chunks' partial states of (row b, query s) into the output. */
void tw_attention_finish(const TwAttention *a, int64_t b, int64_t s);
#endif
