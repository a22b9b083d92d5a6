/* Q4_1 / Q8_0 linear kernels: y = x @ W with W in llama.cpp's block formats, exact weights.

   Why our own kernel: onnxruntime's MatMulNBits cannot hold Q4_1's float minimum in its
   uint8 zero point, so the lossless graph needs a correction (two more ops per linear), and
   its fp32-activation path is slow at one row. Here activations are rounded per block of 32
   to int16 (relative error ~3e-5, against int8's ~4e-3 that costs the quality gate), the
   4-bit codes are widened to int16 and multiplied with AVX-512 VNNI (vpdpwssd), 16 output
   columns at a time so that each block's scales and minimums are one vector:

     y[r, c] = sum_b  d[c,b] * sx[r,b] * sum_i q[c,b,i] * xq[r,b,i]  +  m[c,b] * sum_i x[r,b,i]

   Every row is computed the same way whatever the number of rows, so a sequence decodes to
   the same tokens alone or in a batch. This file is the AVX-512 version; tw_linear_avx2.c
   computes the same thing with 256-bit registers (vpmaddwd) for CPUs without AVX-512. */
#include "tw_linear.h"
#include "tw_isa.h"

#include <immintrin.h>

#define TW_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni,avx512vl")))

TW_TARGET void tw_quantize_rows_avx512(const float *x, int64_t rows, int64_t k, int16_t *xq, float *sx, float *sumx) {
    const int64_t kb = k / TW_BLOCK;
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t b = 0; b < kb; b++) {
            const float *xb = x + r * k + b * TW_BLOCK;
            const __m512 lo = _mm512_loadu_ps(xb), hi = _mm512_loadu_ps(xb + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
            const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 32767.0f / amax : 0.0f);
            int16_t *qb = xq + (r * kb + b) * TW_BLOCK;
            /* round to nearest even, saturating to int16 */
            _mm256_storeu_si256((__m256i *)qb, _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(lo, inv))));
            _mm256_storeu_si256((__m256i *)(qb + 16),
                                _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(hi, inv))));
            sx[r * kb + b] = amax / 32767.0f;
            sumx[r * kb + b] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
        }
    }
}

/* Rows are processed in chunks so the unpacked block (16 registers) is reused across rows
   while the per-row accumulators stay in L1. */
#define TW_ROW_CHUNK 32

/* One block of 16 columns x 32 k as 16 registers of int16 pairs: wv[p] holds, for every
   column, the codes of k = 2p and 2p+1 (see native_pack.pack_codes4 / pack_codes8). */
TW_TARGET static inline void unpack_block(int bits, const uint8_t *wb, __m512i wv[16]) {
    if (bits == 4) {
        const __m256i low = _mm256_set1_epi8(0x0F);
        for (int j = 0; j < 8; j++) {
            __m256i raw = _mm256_loadu_si256((const __m256i *)(wb + 32 * j));
            wv[2 * j] = _mm512_cvtepu8_epi16(_mm256_and_si256(raw, low));
            wv[2 * j + 1] = _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(raw, 4), low));
        }
    } else {
        for (int p = 0; p < 16; p++) wv[p] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(wb + 32 * p)));
    }
}

TW_TARGET static void tiles_avx512(int bits, const uint8_t *w, const float *d, const float *mins, const int16_t *xq,
                            const float *sx, const float *sumx, int64_t rows, int64_t k, int64_t n, float *y,
                            int64_t t0, int64_t t1) {
    const int64_t kb = k / TW_BLOCK;
    const int64_t block_bytes = bits == 4 ? 256 : 512;
    __m512 acc[TW_ROW_CHUNK];
    for (int64_t r0 = 0; r0 < rows; r0 += TW_ROW_CHUNK) {
        const int64_t rn = rows - r0 < TW_ROW_CHUNK ? rows - r0 : TW_ROW_CHUNK;
        for (int64_t t = t0; t < t1; t++) {
            for (int64_t r = 0; r < rn; r++) acc[r] = _mm512_setzero_ps();
            for (int64_t b = 0; b < kb; b++) {
                __m512i wv[16];
                unpack_block(bits, w + (t * kb + b) * block_bytes, wv);
                const __m512 dv = _mm512_loadu_ps(d + (t * kb + b) * TW_TILE);
                const __m512 mv = mins != NULL ? _mm512_loadu_ps(mins + (t * kb + b) * TW_TILE) : _mm512_setzero_ps();
                for (int64_t r = 0; r < rn; r++) {
                    const int32_t *xp = (const int32_t *)(xq + ((r0 + r) * kb + b) * TW_BLOCK);
                    __m512i dot = _mm512_setzero_si512();
                    for (int p = 0; p < 16; p++) dot = _mm512_dpwssd_epi32(dot, wv[p], _mm512_set1_epi32(xp[p]));
                    const float s = sx[(r0 + r) * kb + b];
                    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dv, _mm512_set1_ps(s)), acc[r]);
                    if (mins != NULL) acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(sumx[(r0 + r) * kb + b]), acc[r]);
                }
            }
            const int64_t c0 = t * TW_TILE;
            const int64_t cn = n - c0 < TW_TILE ? n - c0 : TW_TILE;
            const __mmask16 keep = (__mmask16)((1u << cn) - 1u);
            for (int64_t r = 0; r < rn; r++) _mm512_mask_storeu_ps(y + (r0 + r) * n + c0, keep, acc[r]);
        }
    }
}

void tw_linear_tiles_avx512(int bits, const uint8_t *w, const float *d, const float *mins,
                            const int16_t *xq, const float *sx, const float *sumx,
                            int64_t rows, int64_t k, int64_t n, float *y, int64_t t0, int64_t t1) {
    tiles_avx512(bits, w, d, mins, xq, sx, sumx, rows, k, n, y, t0, t1);
}

void tw_quantize_rows(const float *x, int64_t rows, int64_t k, int16_t *xq, float *sx, float *sumx) {
    if (tw_isa() == TW_ISA_AVX512)
        tw_quantize_rows_avx512(x, rows, k, xq, sx, sumx);
    else
        tw_quantize_rows_avx2(x, rows, k, xq, sx, sumx);
}

void tw_linear_tiles(int bits, const uint8_t *w, const float *d, const float *mins,
                     const int16_t *xq, const float *sx, const float *sumx,
                     int64_t rows, int64_t k, int64_t n, float *y, int64_t t0, int64_t t1) {
    if (tw_isa() == TW_ISA_AVX512)
        tw_linear_tiles_avx512(bits, w, d, mins, xq, sx, sumx, rows, k, n, y, t0, t1);
    else
        tw_linear_tiles_avx2(bits, w, d, mins, xq, sx, sumx, rows, k, n, y, t0, t1);
}
