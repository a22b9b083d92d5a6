/* tw_blocks.c's kernels with 256-bit registers, for CPUs with AVX2 but not AVX-512: the same
   packed blocks and the same arithmetic (int16 activations per block of 32, codes widened to
   int16, vpmaddwd, offsets off the integer dot products, scales d * sc and minimums in fp32);
   a tile of 16 columns is two registers of 8. */
#include <immintrin.h>
#include <string.h>

#include "tw_avx2.h"
#include "tw_blocks.h"
#include "tw_blocks_bits.h"
#include "tw_linear.h"

#define TW_INLINE TW_AVX2 static inline __attribute__((always_inline))
#define TW_ROW_CHUNK 16

/* 16 values as two registers of 8 floats. */
typedef struct {
    __m256 lo, hi;
} Vec16;

TW_INLINE Vec16 half16(const uint8_t *p) {
    return (Vec16){_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)),
                   _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16)))};
}

TW_INLINE Vec16 bytes16(const uint8_t *p, int is_signed) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p), h = _mm_srli_si128(v, 8);
    return is_signed ? (Vec16){_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(h))}
                     : (Vec16){_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(h))};
}

TW_INLINE Vec16 mul16(Vec16 a, Vec16 b) { return (Vec16){_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }

/* One tile-block: wv[2p] / wv[2p + 1] hold columns 0-7 / 8-15's codes of k = 2p, 2p + 1, the
   stored codes completed in bytes (nibble | high bits) and widened once. */
TW_INLINE void unpack(const int qt, const uint8_t *cb, __m256i wv[32]) {
    if (qt == TW_Q8_0) {
        for (int p = 0; p < 16; p++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(cb + 32 * p));
            wv[2 * p] = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(raw));
            wv[2 * p + 1] = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(raw, 1));
        }
        return;
    }
    const __m256i low = _mm256_set1_epi8(0x0F);
#pragma GCC unroll 8
    for (int j = 0; j < 8; j++) {
        const __m256i raw = _mm256_loadu_si256((const __m256i *)(cb + 32 * j));
        const __m256i q[2] = {_mm256_or_si256(_mm256_and_si256(raw, low), tw_block_high_bits(qt, cb, 2 * j)),
                              _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(raw, 4), low),
                                              tw_block_high_bits(qt, cb, 2 * j + 1))};
        for (int h = 0; h < 2; h++) {
            wv[4 * j + 2 * h] = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(q[h]));
            wv[4 * j + 2 * h + 1] = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(q[h], 1));
        }
    }
}

/* sum over pairs [p0, p1) of wv's pair p . x's pair p for both halves of the tile, less `minus`
   (the symmetric types' offset times the sum of those activations). */
TW_INLINE void dot(const __m256i wv[32], const int32_t *xp, int p0, int p1, int32_t minus, __m256 out[2]) {
    __m256i d0 = _mm256_setzero_si256(), d1 = _mm256_setzero_si256();
    for (int p = p0; p < p1; p++) {
        const __m256i xv = _mm256_set1_epi32(xp[p]);
        d0 = _mm256_add_epi32(d0, _mm256_madd_epi16(wv[2 * p], xv));
        d1 = _mm256_add_epi32(d1, _mm256_madd_epi16(wv[2 * p + 1], xv));
    }
    const __m256i m = _mm256_set1_epi32(minus);
    out[0] = _mm256_cvtepi32_ps(_mm256_sub_epi32(d0, m));
    out[1] = _mm256_cvtepi32_ps(_mm256_sub_epi32(d1, m));
}

TW_INLINE void fma16(const __m256 dots[2], Vec16 s, __m256 sx, __m256 acc[2]) {
    acc[0] = _mm256_fmadd_ps(dots[0], _mm256_mul_ps(s.lo, sx), acc[0]);
    acc[1] = _mm256_fmadd_ps(dots[1], _mm256_mul_ps(s.hi, sx), acc[1]);
}

TW_INLINE void store16(const __m256 acc[2], float *y, int64_t cn) {
    float out[TW_TILE];
    _mm256_storeu_ps(out, acc[0]);
    _mm256_storeu_ps(out + 8, acc[1]);
    for (int64_t c = 0; c < cn; c++) y[c] = out[c];
}

TW_INLINE void quant_tiles(const int qt, const TwBlockLinear *job, int64_t t0, int64_t t1) {
    TwBlockFormat f;
    tw_block_format(qt, &f);
    const int64_t k = job->k, n = job->n, kb = k / TW_BLOCK, nb = k / f.block, per = f.block / TW_BLOCK;
    const int has_min = tw_block_has_min(qt), offset = tw_block_offset(qt);
    __m256 acc[TW_ROW_CHUNK][2];
    for (int64_t r0 = 0; r0 < job->rows; r0 += TW_ROW_CHUNK) {
        const int64_t rn = job->rows - r0 < TW_ROW_CHUNK ? job->rows - r0 : TW_ROW_CHUNK;
        for (int64_t t = t0; t < t1; t++) {
            for (int64_t r = 0; r < rn; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
            for (int64_t b = 0; b < kb; b++) {
                __m256i wv[32];
                unpack(qt, job->codes + (t * kb + b) * f.code_bytes, wv);
                const uint8_t *mb = job->meta + (t * nb + b / per) * f.meta_bytes;
                const int j = (int)(b % per);
                Vec16 s0 = half16(mb), s1 = s0, mn = {_mm256_setzero_ps(), _mm256_setzero_ps()};
                if (qt == TW_Q4_1 || qt == TW_Q5_1) mn = half16(mb + 32);
                if (qt == TW_Q4_K || qt == TW_Q5_K) {
                    s0 = mul16(s0, bytes16(mb + 64 + 16 * j, 0));
                    const Vec16 m = mul16(half16(mb + 32), bytes16(mb + 192 + 16 * j, 0));
                    mn = (Vec16){_mm256_sub_ps(_mm256_setzero_ps(), m.lo), _mm256_sub_ps(_mm256_setzero_ps(), m.hi)};
                }
                if (qt == TW_Q6_K) {
                    s1 = mul16(s0, bytes16(mb + 32 + 16 * (2 * j + 1), 1));
                    s0 = mul16(s0, bytes16(mb + 32 + 16 * (2 * j), 1));
                }
                for (int64_t r = 0; r < rn; r++) {
                    const int64_t xb = (r0 + r) * kb + b;
                    const int32_t *xp = (const int32_t *)(job->xq + xb * TW_BLOCK);
                    const __m256 sx = _mm256_set1_ps(job->sx[xb]);
                    const int32_t *sums = offset ? job->xsum16 + 2 * xb : NULL;
                    __m256 dots[2];
                    if (qt == TW_Q6_K) {
                        dot(wv, xp, 0, 8, offset * sums[0], dots);
                        fma16(dots, s0, sx, acc[r]);
                        dot(wv, xp, 8, 16, offset * sums[1], dots);
                        fma16(dots, s1, sx, acc[r]);
                    } else {
                        dot(wv, xp, 0, 16, offset ? offset * (sums[0] + sums[1]) : 0, dots);
                        fma16(dots, s0, sx, acc[r]);
                    }
                    if (has_min) {
                        const __m256 sum = _mm256_set1_ps(job->sumx[xb]);
                        acc[r][0] = _mm256_fmadd_ps(mn.lo, sum, acc[r][0]);
                        acc[r][1] = _mm256_fmadd_ps(mn.hi, sum, acc[r][1]);
                    }
                }
            }
            const int64_t c0 = t * TW_TILE, cn = n - c0 < TW_TILE ? n - c0 : TW_TILE;
            for (int64_t r = 0; r < rn; r++) store16(acc[r], job->y + (r0 + r) * n + c0, cn);
        }
    }
}

/* 8 columns' weights at one k, as fp32. */
TW_INLINE __m256 float_codes(const int qt, const uint8_t *p) {
    if (qt == TW_F32) return _mm256_loadu_ps((const float *)p);
    const __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (qt == TW_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); /* BF16 */
}

TW_INLINE void float_tiles(const int qt, const TwBlockLinear *job, int64_t t0, int64_t t1) {
    TwBlockFormat f;
    tw_block_format(qt, &f);
    const int64_t k = job->k, n = job->n, half = f.code_bytes / 2;
    __m256 acc[TW_ROW_CHUNK][2];
    for (int64_t r0 = 0; r0 < job->rows; r0 += TW_ROW_CHUNK) {
        const int64_t rn = job->rows - r0 < TW_ROW_CHUNK ? job->rows - r0 : TW_ROW_CHUNK;
        for (int64_t t = t0; t < t1; t++) {
            const uint8_t *wt = job->codes + t * k * f.code_bytes;
            for (int64_t r = 0; r < rn; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
            int64_t k0 = 0;
            for (; k0 + 8 <= k; k0 += 8) {
                __m256 w[8][2];
                for (int i = 0; i < 8; i++) {
                    w[i][0] = float_codes(qt, wt + (k0 + i) * f.code_bytes);
                    w[i][1] = float_codes(qt, wt + (k0 + i) * f.code_bytes + half);
                }
                for (int64_t r = 0; r < rn; r++) {
                    const float *xr = job->x + (r0 + r) * k + k0;
                    for (int i = 0; i < 8; i++) {
                        const __m256 xv = _mm256_set1_ps(xr[i]);
                        acc[r][0] = _mm256_fmadd_ps(xv, w[i][0], acc[r][0]);
                        acc[r][1] = _mm256_fmadd_ps(xv, w[i][1], acc[r][1]);
                    }
                }
            }
            for (; k0 < k; k0++) {
                const __m256 w0 = float_codes(qt, wt + k0 * f.code_bytes);
                const __m256 w1 = float_codes(qt, wt + k0 * f.code_bytes + half);
                for (int64_t r = 0; r < rn; r++) {
                    const __m256 xv = _mm256_set1_ps(job->x[(r0 + r) * k + k0]);
                    acc[r][0] = _mm256_fmadd_ps(xv, w0, acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(xv, w1, acc[r][1]);
                }
            }
            const int64_t c0 = t * TW_TILE, cn = n - c0 < TW_TILE ? n - c0 : TW_TILE;
            for (int64_t r = 0; r < rn; r++) store16(acc[r], job->y + (r0 + r) * n + c0, cn);
        }
    }
}

TW_AVX2 void tw_block_tiles_avx2(const TwBlockLinear *job, int64_t t0, int64_t t1) {
    switch (job->qtype) {
    case TW_Q8_0: quant_tiles(TW_Q8_0, job, t0, t1); break;
    case TW_Q4_0: quant_tiles(TW_Q4_0, job, t0, t1); break;
    case TW_Q4_1: quant_tiles(TW_Q4_1, job, t0, t1); break;
    case TW_Q5_0: quant_tiles(TW_Q5_0, job, t0, t1); break;
    case TW_Q5_1: quant_tiles(TW_Q5_1, job, t0, t1); break;
    case TW_Q4_K: quant_tiles(TW_Q4_K, job, t0, t1); break;
    case TW_Q5_K: quant_tiles(TW_Q5_K, job, t0, t1); break;
    case TW_Q6_K: quant_tiles(TW_Q6_K, job, t0, t1); break;
    case TW_F32: float_tiles(TW_F32, job, t0, t1); break;
    case TW_F16: float_tiles(TW_F16, job, t0, t1); break;
    case TW_BF16: float_tiles(TW_BF16, job, t0, t1); break;
    default: break;
    }
}
