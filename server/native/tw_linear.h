/* Q4_1 / Q8_0 linear kernels for tokenwire's decode graph (see tw_linear.c). */
#ifndef TW_LINEAR_H
#define TW_LINEAR_H
#include <stdint.h>

#define TW_BLOCK 32   /* weights per block along K (llama.cpp's Q4_1 / Q8_0 block) */
#define TW_TILE 16    /* output columns computed together (one 512-bit register of int32) */
#define TW_CHUNKS 8   /* column chunks per call, spread over the intra-op threads */

/* Per row and block of 32: int16 codes of x (scale sx = max|x| / 32767) and the exact sum. */
void tw_quantize_rows(const float *x, int64_t rows, int64_t k, int16_t *xq, float *sx, float *sumx);

/* y[rows, n] (row stride n) for column tiles [t0, t1) of a packed weight.
   bits 4: w holds [tiles][k/32][8][32] bytes, d and mins [tiles][k/32][16].
   bits 8: w holds [tiles][k/32][16][32] int8, d [tiles][k/32][16], mins as for bits 4 or NULL. */
void tw_linear_tiles(int bits, const uint8_t *w, const float *d, const float *mins,
                     const int16_t *xq, const float *sx, const float *sumx,
                     int64_t rows, int64_t k, int64_t n, float *y, int64_t t0, int64_t t1);

/* The per-ISA versions behind the two functions above (see tw_isa.h). */
void tw_quantize_rows_avx512(const float *x, int64_t rows, int64_t k, int16_t *xq, float *sx, float *sumx);
void tw_quantize_rows_avx2(const float *x, int64_t rows, int64_t k, int16_t *xq, float *sx, float *sumx);
void tw_linear_tiles_avx512(int bits, const uint8_t *w, const float *d, const float *mins, const int16_t *xq,
                            const float *sx, const float *sumx, int64_t rows, int64_t k, int64_t n, float *y,
                            int64_t t0, int64_t t1);
void tw_linear_tiles_avx2(int bits, const uint8_t *w, const float *d, const float *mins, const int16_t *xq,
                          const float *sx, const float *sumx, int64_t rows, int64_t k, int64_t n, float *y,
                          int64_t t0, int64_t t1);
#endif
