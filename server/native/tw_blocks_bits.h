/* The bits above the nibble of Q5_0 / Q5_1 / Q5_K (one) and Q6_K (two), shared by tw_blocks.c
   and tw_blocks_avx2.c: gguf_pack._high_plane lines each byte of high bits up with the nibble
   bytes it completes, so a code is formed in bytes (nibble | high bits) before it is widened. */
#ifndef TW_BLOCKS_BITS_H
#define TW_BLOCKS_BITS_H
#include <immintrin.h>
#include <stdint.h>

#include "tw_avx2.h"
#include "tw_blocks.h"

/* Slot u's high bits in place (bit 4, or bits 4-5) as the 32 bytes of nibble group u / 2 (its
   low nibbles for even u, high for odd); zero for the 4-bit types. u is a constant where the
   caller's loops are unrolled, so the shifts are immediates. */
TW_AVX2 static inline __attribute__((always_inline)) __m256i tw_block_high_bits(int qt, const uint8_t *cb, int u) {
    const int six = qt == TW_Q6_K;
    if (!six && qt != TW_Q5_0 && qt != TW_Q5_1 && qt != TW_Q5_K) return _mm256_setzero_si256();
    const __m256i plane = _mm256_loadu_si256((const __m256i *)(cb + 256 + 32 * (six ? u / 4 : u / 8)));
    const int shift = six ? 4 - 2 * (u % 4) : 4 - u % 8;
    const __m256i v = shift > 0 ? _mm256_slli_epi16(plane, shift) : shift < 0 ? _mm256_srli_epi16(plane, -shift) : plane;
    return _mm256_and_si256(v, _mm256_set1_epi8(six ? 0x30 : 0x10));
}
#endif
