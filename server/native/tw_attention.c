/* Attention for tokenwire's native graph: grouped-query attention with rotary embedding
   (half rotation, as GroupQueryAttention's rotary_interleaved=0) over a KV cache kept in
   fp16, one buffer per layer shared by past and present and written in place.

   Why: at long context a decode step is dominated by reading the cache; fp16 halves its
   bytes against onnxruntime's fp32 CPU attention (whose own fp16 path is slower than fp32).
   An int8 cache (a scale per position and head) was measured too: it lowered top-1 agreement
   with fp32 from 99.95% to 98.4% over the 2,048-token text for a speed-up within this
   machine's noise, so fp16 it is. Scores, softmax and the weighted sum are fp32.

   Work is split into tasks of (row, KV head, block of query rows, chunk of keys): the query
   heads of a group read each key/value tile while it is in L1, 16 keys are scored at once
   (one horizontal reduction per 16 keys), and softmax is computed online (running max and
   sum). Decoding splits a row's keys into chunks so that a single sequence uses every
   thread; the chunks' partial states are merged in tw_attention_finish. A query at position
   p attends to positions 0..p, or with a sliding window W to max(0, p - W + 1)..p (tiles wholly
   outside the window are never read: a task's keys start at its first query's window, rounded
   down to a tile); an optional softcap bounds the scores (c * tanh(s / c), gemma2's
   attn_logit_softcapping) before the softmax. Each result depends only on its own row (a row's
   key chunks start where its own window does), so a sequence decodes the same alone or in a
   batch. This file is the AVX-512 version; tw_attention_avx2.c
   is the same with 256-bit registers. */
#include "tw_attention.h"
#include "tw_isa.h"

#include <immintrin.h>
#include <math.h>
#include <string.h>

#define TW_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")))

/* e^x for x <= 0: 2^n * e^r with |r| <= ln2/2, degree-6 polynomial (relative error ~2e-7). */
TW_TARGET static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.3981999507e-3f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* cap * tanh(x / cap), as (1 - e^-2|y|) / (1 + e^-2|y|) with y = x / cap and x's sign: e^-2|y| <= 1
   keeps exp512 in its range, and the absolute error (~cap * 2e-7) is that of rounding the score. */
TW_TARGET static inline __m512 softcap512(__m512 x, float cap) {
    const __m512 c = _mm512_set1_ps(cap), one = _mm512_set1_ps(1.0f);
    const __m512 y = _mm512_div_ps(x, c);
    const __m512 e = exp512(_mm512_mul_ps(_mm512_abs_ps(y), _mm512_set1_ps(-2.0f)));
    const __m512 t = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
    const __m512i sign = _mm512_and_si512(_mm512_castps_si512(y), _mm512_set1_epi32((int)0x80000000u));
    return _mm512_mul_ps(_mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t), sign)), c);
}

/* Sixteen vectors -> one vector of their sums (lane i = sum of v[i]). */
TW_TARGET static inline __m512 sum16(const __m512 *v) {
    __m512 s[8], u[4], w[2];
    for (int i = 0; i < 8; i++)
        s[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        u[i] = _mm512_add_ps(_mm512_shuffle_ps(s[2 * i], s[2 * i + 1], 0x44), _mm512_shuffle_ps(s[2 * i], s[2 * i + 1], 0xEE));
    for (int i = 0; i < 2; i++)
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
}

/* Where the keys of row b's query rows s0.. start: the window of query s0, rounded down to a tile
   (tiles wholly before it are never read; 0 without a window). */
static int64_t keys_from(const TwAttention *a, int64_t b, int64_t s0) {
    const int64_t lo = tw_first_visible(a, a->seqlens[b] + 1 - a->seq + s0);
    return lo - lo % TW_KEY_TILE;
}

int64_t tw_attention_plan(TwAttention *a) {
    int64_t longest = 0; /* the most keys a row's queries read, from its first tile read */
    for (int64_t b = 0; b < a->batch; b++) {
        const int64_t span = a->seqlens[b] + 1 - keys_from(a, b, 0);
        longest = span > longest ? span : longest;
    }
    a->query_blocks = (a->seq + TW_QUERY_BLOCK - 1) / TW_QUERY_BLOCK;
    a->key_chunks = a->seq == 1 ? (longest + TW_KEY_CHUNK - 1) / TW_KEY_CHUNK : 1;
    if (a->key_chunks < 1) a->key_chunks = 1;
    const int64_t rows = a->seq < TW_QUERY_BLOCK ? a->seq : TW_QUERY_BLOCK;
    a->partial_stride = rows * (a->heads / a->kv_heads) * (a->head_dim + 2);
    return tw_attention_tasks(a) * a->partial_stride;
}

int64_t tw_attention_tasks(const TwAttention *a) {
    return a->batch * a->kv_heads * a->query_blocks * a->key_chunks;
}

TW_TARGET static void store_half_avx512(const float *x, int64_t d, uint16_t *row) {
    for (int64_t i = 0; i < d; i += 16)
        _mm256_storeu_si256((__m256i *)(row + i), _mm512_cvtps_ph(_mm512_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
}

void tw_rotate_head(const TwAttention *a, int64_t b, int64_t s, int64_t head, float *out) {
    const int64_t d = a->head_dim, half = d / 2;
    const int64_t pos = a->seqlens[b] + 1 - a->seq + s;
    const float *x = a->qkv + ((b * a->seq + s) * (a->heads + 2 * a->kv_heads) + head) * d;
    const float *cs = a->cos + pos * half, *sn = a->sin + pos * half;
    for (int64_t i = 0; i < half; i++) {
        out[i] = x[i] * cs[i] - x[i + half] * sn[i];
        out[i + half] = x[i + half] * cs[i] + x[i] * sn[i];
    }
}

void tw_attention_store_with(const TwAttention *a, int64_t b, int64_t s,
                             void (*store_half)(const float *x, int64_t d, uint16_t *row)) {
    const int64_t d = a->head_dim, h = a->heads, g = a->kv_heads;
    const int64_t pos = a->seqlens[b] + 1 - a->seq + s;
    const float *row = a->qkv + (b * a->seq + s) * (h + 2 * g) * d;
    float rotated[TW_MAX_HEAD_DIM];
    for (int64_t head = 0; head < h + g; head++) {
        tw_rotate_head(a, b, s, head, rotated);
        if (head < h) {
            float *q = a->q + ((b * a->seq + s) * h + head) * d;
            for (int64_t i = 0; i < d; i++) q[i] = rotated[i] * a->scale;
        } else {
            store_half(rotated, d, a->key + tw_kv_offset(a, b, head - h, pos));
        }
    }
    for (int64_t kv = 0; kv < g; kv++) store_half(row + (h + g + kv) * d, d, a->value + tw_kv_offset(a, b, kv, pos));
}

TW_TARGET static inline __m512 load_half(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

/* The body, inlined per head size (chunks = head_dim / 16) so that the common sizes' query and
   accumulator vectors are sized and unrolled at compile time (a loop over 256-wide buffers cost
   head_dim 64 ~10%). */
TW_TARGET static inline __attribute__((always_inline)) void task_avx512_chunks(const TwAttention *a, int64_t task,
                                                                               const int64_t chunks) {
    const int64_t d = a->head_dim, group = a->heads / a->kv_heads;
    TwTask t;
    tw_task_begin(a, task, &t);
    const int64_t b = t.b, kv = t.kv, s0 = t.s0, s1 = t.s1, first = t.first, j_begin = t.j_begin, j_end = t.j_end;
    float *state = t.state;
    const int64_t slot = d + 2;
    const float cap = a->softcap;
    if (j_begin >= j_end) return;
    float weights[TW_KEY_TILE];
    for (int64_t j0 = j_begin; j0 < j_end; j0 += TW_KEY_TILE) {
        const int64_t n = j_end - j0 < TW_KEY_TILE ? j_end - j0 : TW_KEY_TILE;
        const uint16_t *keys = a->key + tw_kv_offset(a, b, kv, j0), *values = a->value + tw_kv_offset(a, b, kv, j0);
        /* Keys and values are converted from fp16 where they are used: a converted copy of the
           tile costs more in stores than converting again for each head of the group. */
        for (int64_t s = s0; s < s1; s++) {
            int64_t lo, hi; /* the tile's keys j0 + lo .. j0 + hi - 1 are visible */
            tw_tile_span(a, first + s, j0, n, &lo, &hi);
            if (hi <= lo) continue;
            const __mmask16 mask = (__mmask16)(((1u << hi) - 1u) & ~((1u << lo) - 1u));
            for (int64_t hg = 0; hg < group; hg++) {
                const int64_t at = (s - s0) * group + hg;
                const float *qp = a->q + ((b * a->seq + s) * a->heads + kv * group + hg) * d;
                __m512 dots[TW_KEY_TILE];
                if (n == TW_KEY_TILE) {
                    /* channels outer, keys inner: 16 independent sums (one per key) where a key at a
                       time is one chain of head_dim / 16 dependent FMAs; each key's sum runs in the
                       same order either way */
                    for (int64_t k = 0; k < TW_KEY_TILE; k++) dots[k] = _mm512_mul_ps(_mm512_loadu_ps(qp), load_half(keys + k * d));
                    for (int64_t c = 1; c < chunks; c++) {
                        const __m512 qc = _mm512_loadu_ps(qp + 16 * c);
                        for (int64_t k = 0; k < TW_KEY_TILE; k++)
                            dots[k] = _mm512_fmadd_ps(qc, load_half(keys + k * d + 16 * c), dots[k]);
                    }
                } else {
                    for (int64_t k = 0; k < TW_KEY_TILE; k++) {
                        if (k >= n) { /* past the chunk: masked below, and maybe past the buffer */
                            dots[k] = _mm512_setzero_ps();
                            continue;
                        }
                        const uint16_t *kr = keys + k * d;
                        __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qp), load_half(kr));
                        for (int64_t c = 1; c < chunks; c++)
                            acc = _mm512_fmadd_ps(_mm512_loadu_ps(qp + 16 * c), load_half(kr + 16 * c), acc);
                        dots[k] = acc;
                    }
                }
                __m512 scores = sum16(dots);
                if (cap > 0.0f) scores = softcap512(scores, cap);
                scores = _mm512_mask_blend_ps(mask, _mm512_set1_ps(-INFINITY), scores);
                float *st = state + at * slot;
                const float tile_max = _mm512_reduce_max_ps(scores);
                const float new_max = tile_max > st[0] ? tile_max : st[0];
                const float correction = expf(st[0] - new_max);  /* 0 on the first visible tile */
                const __m512 p = _mm512_maskz_mov_ps(mask, exp512(_mm512_sub_ps(scores, _mm512_set1_ps(new_max))));
                st[0] = new_max;
                st[1] = st[1] * correction + _mm512_reduce_add_ps(p);
                _mm512_storeu_ps(weights, p);
                float *acc = st + 2;
                __m512 out[TW_MAX_HEAD_DIM / 16];
                const __m512 corr = _mm512_set1_ps(correction);
                for (int64_t c = 0; c < chunks; c++) out[c] = _mm512_mul_ps(_mm512_loadu_ps(acc + 16 * c), corr);
                for (int64_t k = lo; k < hi; k++) {
                    const __m512 w = _mm512_set1_ps(weights[k]);
                    const uint16_t *vr = values + k * d;
                    for (int64_t c = 0; c < chunks; c++) out[c] = _mm512_fmadd_ps(w, load_half(vr + 16 * c), out[c]);
                }
                for (int64_t c = 0; c < chunks; c++) _mm512_storeu_ps(acc + 16 * c, out[c]);
            }
        }
    }
}

TW_TARGET static void task_avx512(const TwAttention *a, int64_t task) {
    switch (a->head_dim) {
    case 64: task_avx512_chunks(a, task, 4); break;
    case 128: task_avx512_chunks(a, task, 8); break;
    case 256: task_avx512_chunks(a, task, 16); break;
    default: task_avx512_chunks(a, task, a->head_dim / 16); break;
    }
}

TW_TARGET static inline __m512 load_u8(const uint8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

/* task_avx512 over the int8 cache (tw_kv8.c): keys a block of 16 at a time, the block's channel
   scales folded into each query head (q * scale, once a block) and its minimums into one dot
   product a head (q . min, where every key's score starts); values' per-position scales go into
   the softmax weights and their minimums into one sum added to every channel. Each code vector is
   converted once and used by every query head of the group, so the work per byte read stays
   below fp16's. */
/* The body, inlined per group size so that the heads' accumulators stay in registers. */
TW_TARGET static inline __attribute__((always_inline)) void task8_avx512_group(const TwAttention *a, int64_t task,
                                                                       const int64_t group) {
    const int64_t d = a->head_dim, chunks = d / 16, rb = a->row_bytes;
    TwTask t;
    tw_task_begin(a, task, &t);
    const int64_t b = t.b, kv = t.kv, s0 = t.s0, s1 = t.s1, first = t.first, j_begin = t.j_begin, j_end = t.j_end;
    const int64_t slot = d + 2;
    const float cap = a->softcap;
    if (j_begin >= j_end) return;
    float tails[2 * TW_MAX_HEAD_DIM], vs[TW_KV_BLOCK], vm[TW_KV_BLOCK], qs[TW_MAX_GROUP][TW_MAX_HEAD_DIM];
    float weights[TW_MAX_GROUP][TW_KV_BLOCK], corr[TW_MAX_GROUP], base[TW_MAX_GROUP], shift[TW_MAX_GROUP];
    __m512 dots[TW_MAX_GROUP][TW_KV_BLOCK];
    for (int64_t j0 = j_begin; j0 < j_end; j0 += TW_KV_BLOCK) {
        const int64_t n = j_end - j0 < TW_KV_BLOCK ? j_end - j0 : TW_KV_BLOCK;
        const uint8_t *keys = a->key8 + tw_kv8_offset(a, b, kv, j0), *values = a->value8 + tw_kv8_offset(a, b, kv, j0);
        tw_kv8_key_scales(keys, d, rb, tails);
        const float *ks = tails, *km = tails + d;
        for (int64_t k = 0; k < TW_KV_BLOCK; k++) {
            vs[k] = vm[k] = 0.0f;
            if (k < n) tw_kv8_value_scale(values + k * rb, d, &vs[k], &vm[k]);
        }
        for (int64_t s = s0; s < s1; s++) {
            int64_t lo, hi; /* the block's keys j0 + lo .. j0 + hi - 1 are visible */
            tw_tile_span(a, first + s, j0, n, &lo, &hi);
            if (hi <= lo) continue;
            const __mmask16 mask = (__mmask16)(((1u << hi) - 1u) & ~((1u << lo) - 1u));
            for (int64_t hg = 0; hg < group; hg++) {
                const float *qp = a->q + ((b * a->seq + s) * a->heads + kv * group + hg) * d;
                __m512 at_min = _mm512_setzero_ps();
                for (int64_t c = 0; c < chunks; c++) {
                    const __m512 q = _mm512_loadu_ps(qp + 16 * c);
                    _mm512_storeu_ps(qs[hg] + 16 * c, _mm512_mul_ps(q, _mm512_loadu_ps(ks + 16 * c)));
                    at_min = _mm512_fmadd_ps(q, _mm512_loadu_ps(km + 16 * c), at_min);
                }
                base[hg] = _mm512_reduce_add_ps(at_min);
            }
            for (int64_t k = 0; k < TW_KV_BLOCK; k++) {
                __m512 acc[TW_MAX_GROUP];
                for (int64_t hg = 0; hg < group; hg++) acc[hg] = _mm512_setzero_ps();
                if (k < hi) { /* keys before lo: scored, then masked */
                    const uint8_t *kr = keys + k * rb;
                    for (int64_t c = 0; c < chunks; c++) {
                        const __m512 kf = load_u8(kr + 16 * c);
                        for (int64_t hg = 0; hg < group; hg++)
                            acc[hg] = _mm512_fmadd_ps(_mm512_loadu_ps(qs[hg] + 16 * c), kf, acc[hg]);
                    }
                }
                for (int64_t hg = 0; hg < group; hg++) dots[hg][k] = acc[hg];
            }
            for (int64_t hg = 0; hg < group; hg++) {
                __m512 scores = _mm512_add_ps(sum16(dots[hg]), _mm512_set1_ps(base[hg]));
                if (cap > 0.0f) scores = softcap512(scores, cap);
                scores = _mm512_mask_blend_ps(mask, _mm512_set1_ps(-INFINITY), scores);
                float *st = t.state + ((s - s0) * group + hg) * slot;
                const float tile_max = _mm512_reduce_max_ps(scores);
                const float new_max = tile_max > st[0] ? tile_max : st[0];
                corr[hg] = expf(st[0] - new_max);
                const __m512 p = _mm512_maskz_mov_ps(mask, exp512(_mm512_sub_ps(scores, _mm512_set1_ps(new_max))));
                st[0] = new_max;
                st[1] = st[1] * corr[hg] + _mm512_reduce_add_ps(p);
                shift[hg] = _mm512_reduce_add_ps(_mm512_mul_ps(p, _mm512_loadu_ps(vm)));
                _mm512_storeu_ps(weights[hg], _mm512_mul_ps(p, _mm512_loadu_ps(vs)));
            }
            for (int64_t c = 0; c < chunks; c++) {
                /* even and odd keys in two sums: two FMA chains a head, not one 16 long */
                __m512 out[TW_MAX_GROUP], odd[TW_MAX_GROUP];
                for (int64_t hg = 0; hg < group; hg++) {
                    const float *acc = t.state + ((s - s0) * group + hg) * slot + 2 + 16 * c;
                    out[hg] = _mm512_fmadd_ps(_mm512_loadu_ps(acc), _mm512_set1_ps(corr[hg]), _mm512_set1_ps(shift[hg]));
                    odd[hg] = _mm512_setzero_ps();
                }
                int64_t k = lo;
                for (; k + 1 < hi; k += 2) {
                    const __m512 v0 = load_u8(values + k * rb + 16 * c), v1 = load_u8(values + (k + 1) * rb + 16 * c);
                    for (int64_t hg = 0; hg < group; hg++) {
                        out[hg] = _mm512_fmadd_ps(_mm512_set1_ps(weights[hg][k]), v0, out[hg]);
                        odd[hg] = _mm512_fmadd_ps(_mm512_set1_ps(weights[hg][k + 1]), v1, odd[hg]);
                    }
                }
                if (k < hi) {
                    const __m512 v0 = load_u8(values + k * rb + 16 * c);
                    for (int64_t hg = 0; hg < group; hg++)
                        out[hg] = _mm512_fmadd_ps(_mm512_set1_ps(weights[hg][k]), v0, out[hg]);
                }
                for (int64_t hg = 0; hg < group; hg++)
                    _mm512_storeu_ps(t.state + ((s - s0) * group + hg) * slot + 2 + 16 * c, _mm512_add_ps(out[hg], odd[hg]));
            }
        }
    }
}

TW_TARGET static void task8_avx512(const TwAttention *a, int64_t task) {
    switch (a->heads / a->kv_heads) {
    case 1: task8_avx512_group(a, task, 1); break;
    case 2: task8_avx512_group(a, task, 2); break;
    case 3: task8_avx512_group(a, task, 3); break;
    case 4: task8_avx512_group(a, task, 4); break;
    case 5: task8_avx512_group(a, task, 5); break;
    case 6: task8_avx512_group(a, task, 6); break;
    case 7: task8_avx512_group(a, task, 7); break;
    default: task8_avx512_group(a, task, 8); break; /* the op allows 1 to 8 */
    }
}

void tw_task_begin(const TwAttention *a, int64_t task, TwTask *t) {
    const int64_t d = a->head_dim, group = a->heads / a->kv_heads;
    const int64_t kc = task % a->key_chunks, qb = task / a->key_chunks % a->query_blocks;
    t->kv = task / (a->key_chunks * a->query_blocks) % a->kv_heads;
    t->b = task / (a->key_chunks * a->query_blocks * a->kv_heads);
    const int64_t total = (int64_t)a->seqlens[t->b] + 1;
    t->first = total - a->seq;
    t->s0 = qb * TW_QUERY_BLOCK;
    t->s1 = t->s0 + TW_QUERY_BLOCK < a->seq ? t->s0 + TW_QUERY_BLOCK : a->seq;
    t->j_begin = keys_from(a, t->b, t->s0) + (a->key_chunks > 1 ? kc * TW_KEY_CHUNK : 0);
    t->j_end = a->key_chunks > 1 ? t->j_begin + TW_KEY_CHUNK : total;
    if (t->j_end > t->first + t->s1) t->j_end = t->first + t->s1; /* the block's last query sees keys < first + s1 */
    t->state = a->partial + task * a->partial_stride; /* per (query, head): max, sum, acc[d] */
    const int64_t slot = d + 2;
    for (int64_t i = 0; i < (t->s1 - t->s0) * group; i++) {
        t->state[i * slot] = -INFINITY;
        t->state[i * slot + 1] = 0.0f;
        memset(t->state + i * slot + 2, 0, sizeof(float) * (size_t)d);
    }
}

void tw_attention_store(const TwAttention *a, int64_t b, int64_t s) {
    tw_attention_store_with(a, b, s, tw_isa() == TW_ISA_AVX512 ? store_half_avx512 : tw_store_half_avx2);
}

void tw_attention_task(const TwAttention *a, int64_t task) {
    const int avx512 = tw_isa() == TW_ISA_AVX512;
    if (a->kv_format == TW_KV_INT8)
        avx512 ? task8_avx512(a, task) : tw_attention_task8_avx2(a, task);
    else
        avx512 ? task_avx512(a, task) : tw_attention_task_avx2(a, task);
}

/* Plain C on purpose: it runs on AVX2 machines too (compiled for AVX-512 it crashed them). */
void tw_attention_finish(const TwAttention *a, int64_t b, int64_t s) {
    const int64_t d = a->head_dim, group = a->heads / a->kv_heads, slot = d + 2;
    const int64_t qb = s / TW_QUERY_BLOCK, row = s % TW_QUERY_BLOCK;
    for (int64_t head = 0; head < a->heads; head++) {
        const int64_t kv = head / group, hg = head % group;
        const int64_t task0 = ((b * a->kv_heads + kv) * a->query_blocks + qb) * a->key_chunks;
        float best = -INFINITY;
        for (int64_t kc = 0; kc < a->key_chunks; kc++) {
            const float m = a->partial[(task0 + kc) * a->partial_stride + (row * group + hg) * slot];
            best = m > best ? m : best;
        }
        float total = 0.0f;
        float acc[TW_MAX_HEAD_DIM] = {0};
        for (int64_t kc = 0; kc < a->key_chunks; kc++) {
            const float *st = a->partial + (task0 + kc) * a->partial_stride + (row * group + hg) * slot;
            if (st[1] == 0.0f) continue; /* a chunk past this row's keys */
            const float w = expf(st[0] - best);
            total += w * st[1];
            for (int64_t i = 0; i < d; i++) acc[i] += w * st[2 + i];
        }
        float *out = a->out + ((b * a->seq + s) * a->heads + head) * d;
        for (int64_t i = 0; i < d; i++) out[i] = acc[i] / total;
    }
}
