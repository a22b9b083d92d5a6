/* tw_linear.c's kernels with 256-bit registers, for CPUs with AVX2 but not AVX-512 (most
   laptops): the same packed weights and the same arithmetic (int16 activations per block of
   32, Q4_1 / Q8_0 codes widened to int16, vpmaddwd, the minimum added in the kernel); a tile
   of 16 columns is two registers of 8. */
#include <immintrin.h>

#include "tw_avx2.h"
#include "tw_linear.h"


/* 8 floats -> 8 int16 (round to nearest even, saturating), in order. */
TW_AVX2 static inline __m128i to_int16(__m256 v) {
    const __m256i i = _mm256_cvtps_epi32(v);
    return _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
}

TW_AVX2 void tw_quantize_rows_avx2(const float *x, int64_t rows, int64_t k, int16_t *xq, float *sx, float *sumx) {
    const int64_t kb = k / TW_BLOCK;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t b = 0; b < kb; b++) {
            const float *xb = x + r * k + b * TW_BLOCK;
            __m256 v[4], amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
            for (int i = 0; i < 4; i++) {
                v[i] = _mm256_loadu_ps(xb + 8 * i);
                amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
                sum = _mm256_add_ps(sum, v[i]);
            }
            const float m = hmax8(amax);
            const __m256 inv = _mm256_set1_ps(m > 0.0f ? 32767.0f / m : 0.0f);
            int16_t *qb = xq + (r * kb + b) * TW_BLOCK;
            for (int i = 0; i < 4; i++) _mm_storeu_si128((__m128i *)(qb + 8 * i), to_int16(_mm256_mul_ps(v[i], inv)));
            sx[r * kb + b] = m / 32767.0f;
            sumx[r * kb + b] = hsum8(sum);
        }
    }
}

#define TW_ROW_CHUNK 16

/* One block of 16 columns x 32 k: wv[2p] / wv[2p+1] hold columns 0-7 / 8-15's codes of
   k = 2p and 2p+1 as int16 pairs. */
TW_AVX2 static inline void unpack_block(int bits, const uint8_t *wb, __m256i wv[32]) {
    if (bits == 4) {
        const __m256i low = _mm256_set1_epi8(0x0F);
        for (int j = 0; j < 8; j++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(wb + 32 * j));
            const __m256i lo = _mm256_and_si256(raw, low), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
            wv[4 * j] = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(lo));
            wv[4 * j + 1] = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(lo, 1));
            wv[4 * j + 2] = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(hi));
            wv[4 * j + 3] = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(hi, 1));
        }
    } else {
        for (int p = 0; p < 16; p++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(wb + 32 * p));
            wv[2 * p] = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(raw));
            wv[2 * p + 1] = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(raw, 1));
        }
    }
}

TW_AVX2 void tw_linear_tiles_avx2(int bits, const uint8_t *w, const float *d, const float *mins, const int16_t *xq,
                                  const float *sx, const float *sumx, int64_t rows, int64_t k, int64_t n, float *y,
                                  int64_t t0, int64_t t1) {
    const int64_t kb = k / TW_BLOCK;
    const int64_t block_bytes = bits == 4 ? 256 : 512;
    __m256 acc[TW_ROW_CHUNK][2];
    for (int64_t r0 = 0; r0 < rows; r0 += TW_ROW_CHUNK) {
        const int64_t rn = rows - r0 < TW_ROW_CHUNK ? rows - r0 : TW_ROW_CHUNK;
        for (int64_t t = t0; t < t1; t++) {
            for (int64_t r = 0; r < rn; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
            for (int64_t b = 0; b < kb; b++) {
                __m256i wv[32];
                unpack_block(bits, w + (t * kb + b) * block_bytes, wv);
                const float *db = d + (t * kb + b) * TW_TILE;
                const __m256 d0 = _mm256_loadu_ps(db), d1 = _mm256_loadu_ps(db + 8);
                const float *mb = mins != NULL ? mins + (t * kb + b) * TW_TILE : NULL;
                for (int64_t r = 0; r < rn; r++) {
                    const int32_t *xp = (const int32_t *)(xq + ((r0 + r) * kb + b) * TW_BLOCK);
                    __m256i dot0 = _mm256_setzero_si256(), dot1 = _mm256_setzero_si256();
                    for (int p = 0; p < 16; p++) {
                        const __m256i xv = _mm256_set1_epi32(xp[p]);
                        dot0 = _mm256_add_epi32(dot0, _mm256_madd_epi16(wv[2 * p], xv));
                        dot1 = _mm256_add_epi32(dot1, _mm256_madd_epi16(wv[2 * p + 1], xv));
                    }
                    const __m256 s = _mm256_set1_ps(sx[(r0 + r) * kb + b]);
                    acc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot0), _mm256_mul_ps(d0, s), acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot1), _mm256_mul_ps(d1, s), acc[r][1]);
                    if (mb != NULL) {
                        const __m256 sum = _mm256_set1_ps(sumx[(r0 + r) * kb + b]);
                        acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(mb), sum, acc[r][0]);
                        acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(mb + 8), sum, acc[r][1]);
                    }
                }
            }
            const int64_t c0 = t * TW_TILE;
            const int64_t cn = n - c0 < TW_TILE ? n - c0 : TW_TILE;
            for (int64_t r = 0; r < rn; r++) {
                float out[TW_TILE];
                _mm256_storeu_ps(out, acc[r][0]);
                _mm256_storeu_ps(out + 8, acc[r][1]);
                for (int64_t c = 0; c < cn; c++) y[(r0 + r) * n + c0 + c] = out[c];
            }
        }
    }
}
