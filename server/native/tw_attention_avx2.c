/* tw_attention.c's kernels with 256-bit registers, for CPUs with AVX2 but not AVX-512: the
   same tasks, fp16 cache (F16C) and online softmax, 8 keys scored together. */
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "tw_attention.h"
#include "tw_avx2.h"

#define TILE8 8

/* e^x for x <= 0: 2^n * e^r, |r| <= ln2/2, degree-6 polynomial; 2^n built in the exponent bits. */
TW_AVX2 static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.3981999507e-3f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(pow2));
}

/* cap * tanh(x / cap), as tw_attention.c's softcap512. */
TW_AVX2 static inline __m256 softcap256(__m256 x, float cap) {
    const __m256 c = _mm256_set1_ps(cap), one = _mm256_set1_ps(1.0f), sign_bit = _mm256_set1_ps(-0.0f);
    const __m256 y = _mm256_div_ps(x, c);
    const __m256 e = exp256(_mm256_mul_ps(_mm256_andnot_ps(sign_bit, y), _mm256_set1_ps(-2.0f)));
    const __m256 t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
    return _mm256_mul_ps(_mm256_or_ps(t, _mm256_and_ps(sign_bit, y)), c);
}

/* Lanes lo <= i < hi of eight (i = 0..7), as a blend mask. */
TW_AVX2 static inline __m256 lanes_between(int64_t lo, int64_t hi) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i below_hi = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)hi), lanes);
    const __m256i below_lo = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)lo), lanes);
    return _mm256_castsi256_ps(_mm256_andnot_si256(below_lo, below_hi));
}

/* Eight vectors -> one vector of their sums (lane i = sum of v[i]). */
TW_AVX2 static inline __m256 sum8(const __m256 *v) {
    const __m256 a = _mm256_hadd_ps(v[0], v[1]), b = _mm256_hadd_ps(v[2], v[3]);
    const __m256 c = _mm256_hadd_ps(v[4], v[5]), e = _mm256_hadd_ps(v[6], v[7]);
    const __m256 ab = _mm256_hadd_ps(a, b), ce = _mm256_hadd_ps(c, e);
    /* ab = [s0 s1 s2 s3 | s0' s1' s2' s3'] per 128-bit half (low/high halves of each vector) */
    return _mm256_add_ps(_mm256_permute2f128_ps(ab, ce, 0x20), _mm256_permute2f128_ps(ab, ce, 0x31));
}

TW_AVX2 static inline __m256 load_half8(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

TW_AVX2 void tw_store_half_avx2(const float *x, int64_t d, uint16_t *row) {
    for (int64_t i = 0; i < d; i += 8)
        _mm_storeu_si128((__m128i *)(row + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
}

/* The body, inlined per head size (chunks = head_dim / 8), as tw_attention.c's task_avx512. */
TW_AVX2 static inline __attribute__((always_inline)) void task_avx2_chunks(const TwAttention *a, int64_t task,
                                                                           const int64_t chunks) {
    const int64_t d = a->head_dim, group = a->heads / a->kv_heads;
    TwTask t;
    tw_task_begin(a, task, &t);
    const int64_t b = t.b, kv = t.kv, s0 = t.s0, s1 = t.s1, first = t.first, j_begin = t.j_begin, j_end = t.j_end;
    float *state = t.state;
    const int64_t slot = d + 2;
    const float cap = a->softcap;
    float weights[TILE8];
    for (int64_t j0 = j_begin; j0 < j_end; j0 += TILE8) {
        const int64_t n = j_end - j0 < TILE8 ? j_end - j0 : TILE8;
        const uint16_t *keys = a->key + tw_kv_offset(a, b, kv, j0), *values = a->value + tw_kv_offset(a, b, kv, j0);
        for (int64_t s = s0; s < s1; s++) {
            int64_t lo, hi; /* the tile's keys j0 + lo .. j0 + hi - 1 are visible */
            tw_tile_span(a, first + s, j0, n, &lo, &hi);
            if (hi <= lo) continue;
            const __m256 keep = lanes_between(lo, hi);
            for (int64_t hg = 0; hg < group; hg++) {
                const float *qp = a->q + ((b * a->seq + s) * a->heads + kv * group + hg) * d;
                __m256 dots[TILE8];
                if (n == TILE8) { /* channels outer, keys inner: 8 independent sums (see tw_attention.c) */
                    for (int64_t k = 0; k < TILE8; k++) dots[k] = _mm256_mul_ps(_mm256_loadu_ps(qp), load_half8(keys + k * d));
                    for (int64_t c = 1; c < chunks; c++) {
                        const __m256 qc = _mm256_loadu_ps(qp + 8 * c);
                        for (int64_t k = 0; k < TILE8; k++)
                            dots[k] = _mm256_fmadd_ps(qc, load_half8(keys + k * d + 8 * c), dots[k]);
                    }
                } else {
                    for (int64_t k = 0; k < TILE8; k++) {
                        if (k >= n) {
                            dots[k] = _mm256_setzero_ps();
                            continue;
                        }
                        const uint16_t *kr = keys + k * d;
                        __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(qp), load_half8(kr));
                        for (int64_t c = 1; c < chunks; c++)
                            acc = _mm256_fmadd_ps(_mm256_loadu_ps(qp + 8 * c), load_half8(kr + 8 * c), acc);
                        dots[k] = acc;
                    }
                }
                __m256 scores = sum8(dots);
                if (cap > 0.0f) scores = softcap256(scores, cap);
                scores = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), scores, keep);
                float *st = state + ((s - s0) * group + hg) * slot;
                const float tile_max = hmax8(scores);
                const float new_max = tile_max > st[0] ? tile_max : st[0];
                const float correction = expf(st[0] - new_max);
                const __m256 p = _mm256_and_ps(keep, exp256(_mm256_sub_ps(scores, _mm256_set1_ps(new_max))));
                st[0] = new_max;
                st[1] = st[1] * correction + hsum8(p);
                _mm256_storeu_ps(weights, p);
                float *acc = st + 2;
                const __m256 corr = _mm256_set1_ps(correction);
                /* 64 channels at a time: 8 accumulators stay in registers (16 ymm in all), where
                   head_dim 256's 32 would be stored back for every key */
                for (int64_t c0 = 0; c0 < chunks; c0 += 8) {
                    const int64_t width = chunks - c0 < 8 ? chunks - c0 : 8;
                    __m256 out[8];
                    for (int64_t c = 0; c < width; c++) out[c] = _mm256_mul_ps(_mm256_loadu_ps(acc + 8 * (c0 + c)), corr);
                    for (int64_t k = lo; k < hi; k++) {
                        const __m256 w = _mm256_set1_ps(weights[k]);
                        const uint16_t *vr = values + k * d + 8 * c0;
                        for (int64_t c = 0; c < width; c++) out[c] = _mm256_fmadd_ps(w, load_half8(vr + 8 * c), out[c]);
                    }
                    for (int64_t c = 0; c < width; c++) _mm256_storeu_ps(acc + 8 * (c0 + c), out[c]);
                }
            }
        }
    }
}

TW_AVX2 void tw_attention_task_avx2(const TwAttention *a, int64_t task) {
    switch (a->head_dim) {
    case 64: task_avx2_chunks(a, task, 8); break;
    case 128: task_avx2_chunks(a, task, 16); break;
    case 256: task_avx2_chunks(a, task, 32); break;
    default: task_avx2_chunks(a, task, a->head_dim / 8); break;
    }
}

TW_AVX2 static inline __m256 load_u8x8(const uint8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* The int8 cache (tw_kv8.c), as tw_attention.c's task8_avx512: a block of 16 keys at a time, its
   channel scales folded into the query heads (its minimums into one dot product a head), each
   code vector converted once for the whole group. */
/* The body, inlined per group size so that the heads' accumulators stay in registers. */
TW_AVX2 static inline __attribute__((always_inline)) void tw_attention_task8_avx2_group(const TwAttention *a, int64_t task,
                                                                       const int64_t group) {
    const int64_t d = a->head_dim, chunks = d / 8, rb = a->row_bytes;
    TwTask t;
    tw_task_begin(a, task, &t);
    const int64_t b = t.b, kv = t.kv, s0 = t.s0, s1 = t.s1, first = t.first, j_begin = t.j_begin, j_end = t.j_end;
    const int64_t slot = d + 2;
    const float cap = a->softcap;
    if (j_begin >= j_end) return;
    float tails[2 * TW_MAX_HEAD_DIM], vs[TW_KV_BLOCK], vm[TW_KV_BLOCK], qs[TW_MAX_GROUP][TW_MAX_HEAD_DIM];
    float weights[TW_MAX_GROUP][TW_KV_BLOCK], corr[TW_MAX_GROUP], base[TW_MAX_GROUP], shift[TW_MAX_GROUP];
    __m256 spread[TW_MAX_GROUP][TW_KV_BLOCK]; /* each weight in all lanes: AVX2's FMA has no broadcast operand */
    __m256 dots[TW_MAX_GROUP][TW_KV_BLOCK];
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
            /* lanes of keys 0-7 and 8-15 that this query sees */
            const __m256 keep0 = lanes_between(lo, hi), keep1 = lanes_between(lo - 8, hi - 8);
            for (int64_t hg = 0; hg < group; hg++) {
                const float *qp = a->q + ((b * a->seq + s) * a->heads + kv * group + hg) * d;
                __m256 at_min = _mm256_setzero_ps(); /* q . minimums: every key's score starts there */
                for (int64_t c = 0; c < chunks; c++) {
                    const __m256 q = _mm256_loadu_ps(qp + 8 * c);
                    _mm256_storeu_ps(qs[hg] + 8 * c, _mm256_mul_ps(q, _mm256_loadu_ps(ks + 8 * c)));
                    at_min = _mm256_fmadd_ps(q, _mm256_loadu_ps(km + 8 * c), at_min);
                }
                base[hg] = hsum8(at_min);
            }
            for (int64_t k = 0; k < TW_KV_BLOCK; k++) {
                __m256 acc[TW_MAX_GROUP];
                for (int64_t hg = 0; hg < group; hg++) acc[hg] = _mm256_setzero_ps();
                if (k < hi) { /* keys before lo: scored, then masked */
                    const uint8_t *kr = keys + k * rb;
                    for (int64_t c = 0; c < chunks; c++) {
                        const __m256 kf = load_u8x8(kr + 8 * c);
                        for (int64_t hg = 0; hg < group; hg++)
                            acc[hg] = _mm256_fmadd_ps(_mm256_loadu_ps(qs[hg] + 8 * c), kf, acc[hg]);
                    }
                }
                for (int64_t hg = 0; hg < group; hg++) dots[hg][k] = acc[hg];
            }
            for (int64_t hg = 0; hg < group; hg++) {
                const __m256 minus_inf = _mm256_set1_ps(-INFINITY);
                const __m256 at_min = _mm256_set1_ps(base[hg]);
                __m256 sc0 = _mm256_add_ps(sum8(dots[hg]), at_min), sc1 = _mm256_add_ps(sum8(dots[hg] + 8), at_min);
                if (cap > 0.0f) {
                    sc0 = softcap256(sc0, cap);
                    sc1 = softcap256(sc1, cap);
                }
                sc0 = _mm256_blendv_ps(minus_inf, sc0, keep0);
                sc1 = _mm256_blendv_ps(minus_inf, sc1, keep1);
                float *st = t.state + ((s - s0) * group + hg) * slot;
                const float tile_max = hmax8(_mm256_max_ps(sc0, sc1));
                const float new_max = tile_max > st[0] ? tile_max : st[0];
                corr[hg] = expf(st[0] - new_max);
                const __m256 m = _mm256_set1_ps(new_max);
                const __m256 p0 = _mm256_and_ps(keep0, exp256(_mm256_sub_ps(sc0, m)));
                const __m256 p1 = _mm256_and_ps(keep1, exp256(_mm256_sub_ps(sc1, m)));
                st[0] = new_max;
                st[1] = st[1] * corr[hg] + hsum8(_mm256_add_ps(p0, p1));
                /* sum of p * value minimum: added to every channel of the output */
                shift[hg] = hsum8(_mm256_fmadd_ps(p0, _mm256_loadu_ps(vm), _mm256_mul_ps(p1, _mm256_loadu_ps(vm + 8))));
                _mm256_storeu_ps(weights[hg], _mm256_mul_ps(p0, _mm256_loadu_ps(vs)));
                _mm256_storeu_ps(weights[hg] + 8, _mm256_mul_ps(p1, _mm256_loadu_ps(vs + 8)));
            }
            for (int64_t hg = 0; hg < group; hg++)
                for (int64_t k = lo; k < hi; k++) spread[hg][k] = _mm256_set1_ps(weights[hg][k]);
            for (int64_t c = 0; c < chunks; c++) {
                /* even and odd keys in two sums: two FMA chains a head, not one 16 long */
                __m256 out[TW_MAX_GROUP], odd[TW_MAX_GROUP];
                for (int64_t hg = 0; hg < group; hg++) {
                    const float *acc = t.state + ((s - s0) * group + hg) * slot + 2 + 8 * c;
                    out[hg] = _mm256_fmadd_ps(_mm256_loadu_ps(acc), _mm256_set1_ps(corr[hg]), _mm256_set1_ps(shift[hg]));
                    odd[hg] = _mm256_setzero_ps();
                }
                int64_t k = lo;
                for (; k + 1 < hi; k += 2) {
                    const __m256 v0 = load_u8x8(values + k * rb + 8 * c), v1 = load_u8x8(values + (k + 1) * rb + 8 * c);
                    for (int64_t hg = 0; hg < group; hg++) {
                        out[hg] = _mm256_fmadd_ps(spread[hg][k], v0, out[hg]);
                        odd[hg] = _mm256_fmadd_ps(spread[hg][k + 1], v1, odd[hg]);
                    }
                }
                if (k < hi) {
                    const __m256 v0 = load_u8x8(values + k * rb + 8 * c);
                    for (int64_t hg = 0; hg < group; hg++) out[hg] = _mm256_fmadd_ps(spread[hg][k], v0, out[hg]);
                }
                for (int64_t hg = 0; hg < group; hg++)
                    _mm256_storeu_ps(t.state + ((s - s0) * group + hg) * slot + 2 + 8 * c, _mm256_add_ps(out[hg], odd[hg]));
            }
        }
    }
}

TW_AVX2 void tw_attention_task8_avx2(const TwAttention *a, int64_t task) {
    switch (a->heads / a->kv_heads) {
    case 1: tw_attention_task8_avx2_group(a, task, 1); break;
    case 2: tw_attention_task8_avx2_group(a, task, 2); break;
    case 3: tw_attention_task8_avx2_group(a, task, 3); break;
    case 4: tw_attention_task8_avx2_group(a, task, 4); break;
    case 5: tw_attention_task8_avx2_group(a, task, 5); break;
    case 6: tw_attention_task8_avx2_group(a, task, 6); break;
    case 7: tw_attention_task8_avx2_group(a, task, 7); break;
    default: tw_attention_task8_avx2_group(a, task, 8); break; /* the op allows 1 to 8 */
    }
}
