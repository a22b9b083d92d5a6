/* The int8 KV cache format (kv_format "int8") and its writer: ~0.6x the bytes of fp16 to read.

   A cache buffer keeps rows of R = head_dim + head_dim / 4 bytes, one per position, in the same
   [rows or pages, kv_heads, capacity, R] shape as the fp16 layout has [.., head_dim] halves.
   Codes are uint8 with a minimum and a scale (asymmetric: x = min + scale * code), so a channel
   whose values sit away from zero keeps all 256 levels.

   Values: row = codes [head_dim], then an fp16 scale and an fp16 minimum, then zeros: one pair
   per position and head (the tokens' values have no outlier channels to speak of).

   Keys: positions come in blocks of TW_KV_BLOCK = 16 (starting at multiples of 16: a page holds
   whole blocks). Row = codes; the block's 16 row tails (head_dim / 4 bytes each, 4 head_dim in
   all) hold, in order, the fp16 scales of the head_dim channels and then their fp16 minimums.
   Keys' outliers live in channels (as KIVI found), so a scale per channel over a few positions
   keeps small channels precise where a scale per position and head (tried first: 98.4% top-1
   agreement with fp32 against fp16's 99.9%) rounded them away.

   Keys are written in position order, one at a time (decode and prefill alike, so a cache's
   bytes depend only on its keys, not on how the prompt was chunked): the block's first key sets
   each channel's range to its value; a later key outside a channel's range widens it, and the
   block's earlier codes of that channel are re-rounded to the new range. Scalar C on purpose:
   the bytes are the same on every instruction set, and this is 16 x head_dim work at most per key. */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "tw_attention.h"

#define TW_F16C __attribute__((target("f16c")))

TW_F16C static float half_to_float(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, sizeof h);
    return _cvtsh_ss(h);
}

TW_F16C static void float_to_half(float x, uint8_t *p) {
    const uint16_t h = _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT);
    memcpy(p, &h, sizeof h);
}

TW_F16C static float round_half(float x) { return _cvtsh_ss(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT)); }

static uint8_t code_of(float x, float min, float scale) {
    if (scale == 0.0f) return 0;
    float q = rintf((x - min) / scale);
    q = q > 255.0f ? 255.0f : q < 0.0f ? 0.0f : q;
    return (uint8_t)q;
}

/* Byte offsets of channel c's scale and minimum in a key block (its 16 row tails, in order). */
static inline int64_t key_tail_at(int64_t byte, int64_t d, int64_t row_bytes) {
    const int64_t per_row = d / 4;
    return (byte / per_row) * row_bytes + d + byte % per_row;
}

/* The block's 16 row tails in order (head_dim / 8 halves each), as floats: scale[c] = out[c],
   min[c] = out[head_dim + c]. Eight halves at a time: this runs once per block read. */
__attribute__((target("avx,f16c"))) void tw_kv8_key_scales(const uint8_t *blk, int64_t d, int64_t row_bytes,
                                                          float *out) {
    const int64_t per_row = d / 8;
    for (int64_t r = 0; r < TW_KV_BLOCK; r++) {
        const uint8_t *tail = blk + r * row_bytes + d;
        float *o = out + r * per_row;
        int64_t i = 0;
        for (; i + 8 <= per_row; i += 8) _mm256_storeu_ps(o + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(tail + 2 * i))));
        for (; i < per_row; i++) o[i] = half_to_float(tail + 2 * i);
    }
}

/* Key x (head_dim floats) into position j of the block starting at blk. */
static void put_key(uint8_t *blk, int64_t j, const float *x, int64_t d, int64_t rb) {
    if (j == 0) memset(blk, 0, (size_t)(TW_KV_BLOCK * rb)); /* a page may hold another sequence's keys */
    for (int64_t c = 0; c < d; c++) {
        uint8_t *at_scale = blk + key_tail_at(2 * c, d, rb), *at_min = blk + key_tail_at(2 * d + 2 * c, d, rb);
        float scale = half_to_float(at_scale), min = half_to_float(at_min);
        if (j == 0) {
            min = round_half(x[c]);
            scale = 0.0f;
        } else if (x[c] < min || x[c] > min + 255.0f * scale) {
            const float lo = x[c] < min ? round_half(x[c]) : min, hi = x[c] > min + 255.0f * scale ? x[c] : min + 255.0f * scale;
            const float raised = round_half((hi - lo) / 255.0f);
            for (int64_t r = 0; r < j; r++) {
                uint8_t *q = blk + r * rb + c;
                *q = code_of(min + scale * (float)*q, lo, raised);
            }
            min = lo;
            scale = raised;
        }
        float_to_half(scale, at_scale);
        float_to_half(min, at_min);
        blk[j * rb + c] = code_of(x[c], min, scale);
    }
}

static void put_value(uint8_t *row, const float *x, int64_t d, int64_t rb) {
    float lo = x[0], hi = x[0];
    for (int64_t c = 1; c < d; c++) {
        lo = x[c] < lo ? x[c] : lo;
        hi = x[c] > hi ? x[c] : hi;
    }
    const float min = round_half(lo), scale = round_half((hi - min) / 255.0f);
    memset(row, 0, (size_t)rb);
    for (int64_t c = 0; c < d; c++) row[c] = code_of(x[c], min, scale);
    float_to_half(scale, row + d);
    float_to_half(min, row + d + 2);
}
void tw_kv8_store_row(const TwAttention *a, int64_t b, int64_t s) {
    const int64_t d = a->head_dim, h = a->heads, g = a->kv_heads;
    const int64_t pos = a->seqlens[b] + 1 - a->seq + s;
    float rotated[TW_MAX_HEAD_DIM];
    for (int64_t head = 0; head < h; head++) {
        tw_rotate_head(a, b, s, head, rotated);
        float *q = a->q + ((b * a->seq + s) * h + head) * d;
        for (int64_t i = 0; i < d; i++) q[i] = rotated[i] * a->scale;
    }
    for (int64_t kv = 0; kv < g; kv++) tw_rotate_head(a, b, s, h + kv, a->k_rot + ((b * a->seq + s) * g + kv) * d);
    const float *row = a->qkv + (b * a->seq + s) * (h + 2 * g) * d;
    for (int64_t kv = 0; kv < g; kv++)
        put_value(a->value8 + tw_kv8_offset(a, b, kv, pos), row + (h + g + kv) * d, d, a->row_bytes);
}

void tw_kv8_store_keys(const TwAttention *a, int64_t b, int64_t kv) {
    const int64_t d = a->head_dim, first = a->seqlens[b] + 1 - a->seq;
    for (int64_t s = 0; s < a->seq; s++) {
        const int64_t pos = first + s, j = pos % TW_KV_BLOCK;
        put_key(a->key8 + tw_kv8_offset(a, b, kv, pos - j), j, a->k_rot + ((b * a->seq + s) * a->kv_heads + kv) * d, d,
                a->row_bytes);
    }
}
