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

TW_AVX2 void tw_attention_task_avx2(const TwAttention *a, int64_t task) {
    const int64_t d = a->head_dim, chunks = d / 8, group = a->heads / a->kv_heads;
    TwTask t;
    tw_task_begin(a, task, &t);
    const int64_t b = t.b, kv = t.kv, s0 = t.s0, s1 = t.s1, first = t.first, j_begin = t.j_begin, j_end = t.j_end;
    float *state = t.state;
    const int64_t slot = d + 2;
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    float weights[TILE8];
    for (int64_t j0 = j_begin; j0 < j_end; j0 += TILE8) {
        const int64_t n = j_end - j0 < TILE8 ? j_end - j0 : TILE8;
        const uint16_t *keys = a->key + tw_kv_offset(a, b, kv, j0), *values = a->value + tw_kv_offset(a, b, kv, j0);
        for (int64_t s = s0; s < s1; s++) {
            const int64_t pos = first + s;
            const int64_t visible = pos + 1 - j0 < n ? pos + 1 - j0 : n;
            if (visible <= 0) continue;
            const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)visible), lanes));
            for (int64_t hg = 0; hg < group; hg++) {
                const float *qp = a->q + ((b * a->seq + s) * a->heads + kv * group + hg) * d;
                __m256 q[TW_MAX_HEAD_DIM / 8], dots[TILE8];
                for (int64_t c = 0; c < chunks; c++) q[c] = _mm256_loadu_ps(qp + 8 * c);
                for (int64_t k = 0; k < TILE8; k++) {
                    if (k >= n) {
                        dots[k] = _mm256_setzero_ps();
                        continue;
                    }
                    const uint16_t *kr = keys + k * d;
                    __m256 acc = _mm256_mul_ps(q[0], load_half8(kr));
                    for (int64_t c = 1; c < chunks; c++) acc = _mm256_fmadd_ps(q[c], load_half8(kr + 8 * c), acc);
                    dots[k] = acc;
                }
                const __m256 scores = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), sum8(dots), keep);
                float *st = state + ((s - s0) * group + hg) * slot;
                const float tile_max = hmax8(scores);
                const float new_max = tile_max > st[0] ? tile_max : st[0];
                const float correction = expf(st[0] - new_max);
                const __m256 p = _mm256_and_ps(keep, exp256(_mm256_sub_ps(scores, _mm256_set1_ps(new_max))));
                st[0] = new_max;
                st[1] = st[1] * correction + hsum8(p);
                _mm256_storeu_ps(weights, p);
                float *acc = st + 2;
                __m256 out[TW_MAX_HEAD_DIM / 8];
                const __m256 corr = _mm256_set1_ps(correction);
                for (int64_t c = 0; c < chunks; c++) out[c] = _mm256_mul_ps(_mm256_loadu_ps(acc + 8 * c), corr);
                for (int64_t k = 0; k < visible; k++) {
                    const __m256 w = _mm256_set1_ps(weights[k]);
                    const uint16_t *vr = values + k * d;
                    for (int64_t c = 0; c < chunks; c++) out[c] = _mm256_fmadd_ps(w, load_half8(vr + 8 * c), out[c]);
                }
                for (int64_t c = 0; c < chunks; c++) _mm256_storeu_ps(acc + 8 * c, out[c]);
            }
        }
    }
}
