/* GGUF block-quantized weights for the BlockLinear / BlockGather ops (see tw_blocks.c).

   The packed layout is server/build/gguf_pack.py's: output columns in tiles of 16, per (tile,
   32 along K) the codes in int16-pair order (4-bit nibbles, Q8_0's bytes, bit planes for the
   fifth / sixth bits), per (tile, file block) the scales and minimums at the file's precision. */
#ifndef TW_BLOCKS_H
#define TW_BLOCKS_H
#include <stdint.h>

/* GGML type ids (gguf.GGMLQuantizationType). */
enum {
    TW_F32 = 0, TW_F16 = 1, TW_Q4_0 = 2, TW_Q4_1 = 3, TW_Q5_0 = 6, TW_Q5_1 = 7, TW_Q8_0 = 8,
    TW_Q4_K = 12, TW_Q5_K = 13, TW_Q6_K = 14, TW_BF16 = 30,
};

typedef struct {
    int64_t block;      /* weights per file block along K (1 for the float types) */
    int64_t code_bytes; /* per (tile, 32 along K); float types: per (tile, 1 along K) */
    int64_t meta_bytes; /* per (tile, file block) */
    int is_float;       /* F32 / F16 / BF16: computed in fp32 from x itself, no int16 rounding */
} TwBlockFormat;

/* The layout of a GGML type; 0 when the type is not supported (must match gguf_pack._FORMATS).
   Inline so that the kernels, specialised per type, see constants. */
static inline int tw_block_format(int qtype, TwBlockFormat *f) {
    switch (qtype) {
    case TW_F32: *f = (TwBlockFormat){1, 64, 0, 1}; return 1;
    case TW_F16: *f = (TwBlockFormat){1, 32, 0, 1}; return 1;
    case TW_BF16: *f = (TwBlockFormat){1, 32, 0, 1}; return 1;
    case TW_Q8_0: *f = (TwBlockFormat){32, 512, 32, 0}; return 1;
    case TW_Q4_0: *f = (TwBlockFormat){32, 256, 32, 0}; return 1;
    case TW_Q4_1: *f = (TwBlockFormat){32, 256, 64, 0}; return 1;
    case TW_Q5_0: *f = (TwBlockFormat){32, 320, 32, 0}; return 1;
    case TW_Q5_1: *f = (TwBlockFormat){32, 320, 64, 0}; return 1;
    case TW_Q4_K: *f = (TwBlockFormat){256, 256, 320, 0}; return 1;
    case TW_Q5_K: *f = (TwBlockFormat){256, 320, 320, 0}; return 1;
    case TW_Q6_K: *f = (TwBlockFormat){256, 384, 288, 0}; return 1;
    default: return 0;
    }
}

/* The symmetric types' code offset (w = d * (q - offset)): the kernels take offset * sum(xq) off
   the integer dot product of the stored codes, which is the same exact integer. */
static inline int tw_block_offset(int qtype) {
    return qtype == TW_Q4_0 ? 8 : qtype == TW_Q5_0 ? 16 : qtype == TW_Q6_K ? 32 : 0;
}

/* Whether the type has a minimum per block (w = d * q + m, added with the exact sum of x). */
static inline int tw_block_has_min(int qtype) {
    return qtype == TW_Q4_1 || qtype == TW_Q5_1 || qtype == TW_Q4_K || qtype == TW_Q5_K;
}

/* The packed sizes in bytes of a [K, N] weight (K a multiple of the block). */
int64_t tw_block_code_size(const TwBlockFormat *f, int64_t k, int64_t n);
int64_t tw_block_meta_size(const TwBlockFormat *f, int64_t k, int64_t n);

/* Row `row` of the GGUF tensor (output column `row`), K floats, dequantized exactly as
   gguf.quants.dequantize does it (same float32 operations in the same order). */
void tw_block_row(int qtype, const uint8_t *codes, const uint8_t *meta, int64_t k, int64_t row, float *out);

/* y[rows, n] (row stride n) for column tiles [t0, t1). Quantized types read xq / sx / sumx
   (tw_quantize_rows of x) and, for the types with an offset, xsum16; float types read x itself. */
typedef struct {
    int qtype;
    const uint8_t *codes, *meta;
    const float *x;
    const int16_t *xq;
    const float *sx, *sumx;
    const int32_t *xsum16; /* per row, per 16 along K: the exact sum of xq */
    int64_t rows, k, n;
    float *y;
} TwBlockLinear;

/* sums[i] = xq[16 i] + ... + xq[16 i + 15] for rows * k / 16 groups (exact integers). */
void tw_block_xsums(const int16_t *xq, int64_t rows, int64_t k, int32_t *sums);

void tw_block_tiles(const TwBlockLinear *job, int64_t t0, int64_t t1);
void tw_block_tiles_avx512(const TwBlockLinear *job, int64_t t0, int64_t t1);
void tw_block_tiles_avx2(const TwBlockLinear *job, int64_t t0, int64_t t1);
#endif
