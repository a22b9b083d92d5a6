/* BlockLinear: y = x @ W with W a GGUF tensor's own blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K,
   Q5_K, Q6_K, and F32 / F16 / BF16), laid out by server/build/gguf_pack.py. AVX-512 VNNI version;
   tw_blocks_avx2.c computes the same with 256-bit registers.

   The arithmetic is tw_linear.c's: activations rounded to int16 per block of 32 (sx = max|x| /
   32767, with the exact block sum sumx), the codes widened to int16 in the pair order of
   vpdpwssd, 16 output columns at a time so that a block's scales are one vector:

     y[r, c] = sum_b  s[c, b] * sx[r, b] * sum_i q[c, b, i] * xq[r, b, i]  +  m[c, b] * sumx[r, b]

   where the block scale s is the file's d (Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1) or d * sc (K-quants:
   an fp16 times a 6- or 8-bit integer, exact in fp32) and m is Q4_1 / Q5_1's minimum or the
   K-quants' -dmin * m (exact too). A code is completed in bytes (nibble | its fifth / sixth bits,
   tw_blocks_bits.h) and widened once; the symmetric types' offset (8, 16, 32) comes off the
   integer dot product as offset * the activations' exact sum (xsum16), the same integer. Q6_K's 32-block holds two sub-blocks of 16 with their own scales: two dot products.
   The integer dot products are exact, so the only roundings are x's to int16 and the fp32
   accumulation. A tile-block is unpacked once and used for every row of a chunk, and every row
   is computed alike whatever the number of rows (a sequence gives the same bits alone or in a
   batch). Float types multiply x itself (fp32 FMA, k in order) with the converted weights. */
#include "tw_blocks.h"
#include "tw_blocks_bits.h"
#include "tw_linear.h"

#include <immintrin.h>
#include <string.h>

#define TW_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni,avx512vl,avx512dq,fma,f16c")))
#define TW_INLINE TW_TARGET static inline __attribute__((always_inline))
#define TW_ROW_CHUNK 32

TW_INLINE __m512 half16_avx512(const uint8_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }

TW_INLINE __m512 bytes16_avx512(const uint8_t *p, int is_signed) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p);
    return _mm512_cvtepi32_ps(is_signed ? _mm512_cvtepi8_epi32(v) : _mm512_cvtepu8_epi32(v));
}

/* One tile-block (16 columns x 32 k) as 16 registers of int16 pairs: the stored codes, completed
   in bytes (nibble | high bits shifted into place) and widened once. */
TW_INLINE void unpack_avx512(const int qt, const uint8_t *cb, __m512i wv[16]) {
    if (qt == TW_Q8_0) {
        for (int p = 0; p < 16; p++) wv[p] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(cb + 32 * p)));
        return;
    }
    const __m256i low = _mm256_set1_epi8(0x0F);
#pragma GCC unroll 8
    for (int j = 0; j < 8; j++) {
        const __m256i raw = _mm256_loadu_si256((const __m256i *)(cb + 32 * j));
        const __m256i lo = _mm256_and_si256(raw, low), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low);
        wv[2 * j] = _mm512_cvtepu8_epi16(_mm256_or_si256(lo, tw_block_high_bits(qt, cb, 2 * j)));
        wv[2 * j + 1] = _mm512_cvtepu8_epi16(_mm256_or_si256(hi, tw_block_high_bits(qt, cb, 2 * j + 1)));
    }
}

/* sum over pairs [p0, p1) of wv[p] . x's pair p, in two chains (integers: exact in any order), less
   `minus` (the symmetric types' offset times the sum of those activations). */
TW_INLINE __m512 dot_avx512(const __m512i wv[16], const int32_t *xp, int p0, int p1, int32_t minus) {
    __m512i a = _mm512_setzero_si512(), b = _mm512_setzero_si512();
    for (int p = p0; p < p1; p += 2) {
        a = _mm512_dpwssd_epi32(a, wv[p], _mm512_set1_epi32(xp[p]));
        b = _mm512_dpwssd_epi32(b, wv[p + 1], _mm512_set1_epi32(xp[p + 1]));
    }
    return _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_add_epi32(a, b), _mm512_set1_epi32(minus)));
}

TW_INLINE void quant_tiles_avx512(const int qt, const TwBlockLinear *job, int64_t t0, int64_t t1) {
    TwBlockFormat f;
    tw_block_format(qt, &f);
    const int64_t k = job->k, n = job->n, kb = k / TW_BLOCK, nb = k / f.block, per = f.block / TW_BLOCK;
    const int has_min = tw_block_has_min(qt), offset = tw_block_offset(qt);
    __m512 acc[TW_ROW_CHUNK];
    for (int64_t r0 = 0; r0 < job->rows; r0 += TW_ROW_CHUNK) {
        const int64_t rn = job->rows - r0 < TW_ROW_CHUNK ? job->rows - r0 : TW_ROW_CHUNK;
        for (int64_t t = t0; t < t1; t++) {
            for (int64_t r = 0; r < rn; r++) acc[r] = _mm512_setzero_ps();
            for (int64_t b = 0; b < kb; b++) {
                __m512i wv[16];
                unpack_avx512(qt, job->codes + (t * kb + b) * f.code_bytes, wv);
                const uint8_t *mb = job->meta + (t * nb + b / per) * f.meta_bytes;
                const int j = (int)(b % per);
                __m512 s0 = half16_avx512(mb), s1 = s0, mn = _mm512_setzero_ps();
                if (qt == TW_Q4_1 || qt == TW_Q5_1) mn = half16_avx512(mb + 32);
                if (qt == TW_Q4_K || qt == TW_Q5_K) {
                    s0 = _mm512_mul_ps(s0, bytes16_avx512(mb + 64 + 16 * j, 0));
                    mn = _mm512_sub_ps(_mm512_setzero_ps(),
                                       _mm512_mul_ps(half16_avx512(mb + 32), bytes16_avx512(mb + 192 + 16 * j, 0)));
                }
                if (qt == TW_Q6_K) {
                    s1 = _mm512_mul_ps(s0, bytes16_avx512(mb + 32 + 16 * (2 * j + 1), 1));
                    s0 = _mm512_mul_ps(s0, bytes16_avx512(mb + 32 + 16 * (2 * j), 1));
                }
                for (int64_t r = 0; r < rn; r++) {
                    const int64_t xb = (r0 + r) * kb + b;
                    const int32_t *xp = (const int32_t *)(job->xq + xb * TW_BLOCK);
                    const __m512 sx = _mm512_set1_ps(job->sx[xb]);
                    const int32_t *sums = offset ? job->xsum16 + 2 * xb : NULL;
                    if (qt == TW_Q6_K) {
                        acc[r] = _mm512_fmadd_ps(dot_avx512(wv, xp, 0, 8, offset * sums[0]), _mm512_mul_ps(s0, sx), acc[r]);
                        acc[r] = _mm512_fmadd_ps(dot_avx512(wv, xp, 8, 16, offset * sums[1]), _mm512_mul_ps(s1, sx), acc[r]);
                    } else {
                        const int32_t minus = offset ? offset * (sums[0] + sums[1]) : 0;
                        acc[r] = _mm512_fmadd_ps(dot_avx512(wv, xp, 0, 16, minus), _mm512_mul_ps(s0, sx), acc[r]);
                    }
                    if (has_min) acc[r] = _mm512_fmadd_ps(mn, _mm512_set1_ps(job->sumx[xb]), acc[r]);
                }
            }
            const int64_t c0 = t * TW_TILE, cn = n - c0 < TW_TILE ? n - c0 : TW_TILE;
            const __mmask16 keep = (__mmask16)((1u << cn) - 1u);
            for (int64_t r = 0; r < rn; r++) _mm512_mask_storeu_ps(job->y + (r0 + r) * n + c0, keep, acc[r]);
        }
    }
}

/* 16 columns' weights at one k, as fp32. */
TW_INLINE __m512 float_codes_avx512(const int qt, const uint8_t *p) {
    if (qt == TW_F32) return _mm512_loadu_ps((const float *)p);
    const __m256i h = _mm256_loadu_si256((const __m256i *)p);
    if (qt == TW_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); /* BF16 */
}

TW_INLINE void float_tiles_avx512(const int qt, const TwBlockLinear *job, int64_t t0, int64_t t1) {
    TwBlockFormat f;
    tw_block_format(qt, &f);
    const int64_t k = job->k, n = job->n;
    __m512 acc[TW_ROW_CHUNK];
    for (int64_t r0 = 0; r0 < job->rows; r0 += TW_ROW_CHUNK) {
        const int64_t rn = job->rows - r0 < TW_ROW_CHUNK ? job->rows - r0 : TW_ROW_CHUNK;
        for (int64_t t = t0; t < t1; t++) {
            const uint8_t *wt = job->codes + t * k * f.code_bytes;
            for (int64_t r = 0; r < rn; r++) acc[r] = _mm512_setzero_ps();
            int64_t k0 = 0;
            for (; k0 + 16 <= k; k0 += 16) {
                __m512 w[16];
                for (int i = 0; i < 16; i++) w[i] = float_codes_avx512(qt, wt + (k0 + i) * f.code_bytes);
                for (int64_t r = 0; r < rn; r++) {
                    const float *xr = job->x + (r0 + r) * k + k0;
                    for (int i = 0; i < 16; i++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(xr[i]), w[i], acc[r]);
                }
            }
            for (; k0 < k; k0++) {
                const __m512 w = float_codes_avx512(qt, wt + k0 * f.code_bytes);
                for (int64_t r = 0; r < rn; r++)
                    acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(job->x[(r0 + r) * k + k0]), w, acc[r]);
            }
            const int64_t c0 = t * TW_TILE, cn = n - c0 < TW_TILE ? n - c0 : TW_TILE;
            const __mmask16 keep = (__mmask16)((1u << cn) - 1u);
            for (int64_t r = 0; r < rn; r++) _mm512_mask_storeu_ps(job->y + (r0 + r) * n + c0, keep, acc[r]);
        }
    }
}

/* Each type's kernel specialised (the type a constant in its copy). */
TW_TARGET void tw_block_tiles_avx512(const TwBlockLinear *job, int64_t t0, int64_t t1) {
    switch (job->qtype) {
    case TW_Q8_0: quant_tiles_avx512(TW_Q8_0, job, t0, t1); break;
    case TW_Q4_0: quant_tiles_avx512(TW_Q4_0, job, t0, t1); break;
    case TW_Q4_1: quant_tiles_avx512(TW_Q4_1, job, t0, t1); break;
    case TW_Q5_0: quant_tiles_avx512(TW_Q5_0, job, t0, t1); break;
    case TW_Q5_1: quant_tiles_avx512(TW_Q5_1, job, t0, t1); break;
    case TW_Q4_K: quant_tiles_avx512(TW_Q4_K, job, t0, t1); break;
    case TW_Q5_K: quant_tiles_avx512(TW_Q5_K, job, t0, t1); break;
    case TW_Q6_K: quant_tiles_avx512(TW_Q6_K, job, t0, t1); break;
    case TW_F32: float_tiles_avx512(TW_F32, job, t0, t1); break;
    case TW_F16: float_tiles_avx512(TW_F16, job, t0, t1); break;
    case TW_BF16: float_tiles_avx512(TW_BF16, job, t0, t1); break;
    default: break;
    }
}
