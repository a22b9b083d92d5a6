/* The packed GGUF blocks' sizes, one row dequantized exactly (BlockGather), and the choice of
   the BlockLinear kernel by instruction set. Plain C: no instruction beyond x86-64's baseline, so
   the float operations are exactly gguf.quants.dequantize's (float32, no fused multiply-add). */
#include "tw_blocks.h"
#include "tw_isa.h"
#include "tw_linear.h"

#include <string.h>

int64_t tw_block_code_size(const TwBlockFormat *f, int64_t k, int64_t n) {
    const int64_t tiles = (n + TW_TILE - 1) / TW_TILE;
    return tiles * (f->is_float ? k : k / TW_BLOCK) * f->code_bytes;
}

int64_t tw_block_meta_size(const TwBlockFormat *f, int64_t k, int64_t n) {
    const int64_t tiles = (n + TW_TILE - 1) / TW_TILE;
    return tiles * (k / f->block) * f->meta_bytes;
}

/* IEEE half -> float, exactly (subnormals, infinities and NaNs included). */
static float half_to_float(const uint8_t *p) {
    const uint32_t h = (uint32_t)p[0] | (uint32_t)p[1] << 8;
    const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
    float out;
    if (exp == 0) {
        out = (float)mant * (1.0f / 16777216.0f); /* mant * 2^-24: exact */
        if (sign) out = -out;
        return out;
    }
    const uint32_t bits = sign | (exp == 31 ? 0x7F800000u | mant << 13 : (exp + 112) << 23 | mant << 13);
    memcpy(&out, &bits, sizeof out);
    return out;
}

/* Column c's code at k = i of a tile-block (native_pack.pack_codes4: byte 2c + (i & 1) of group
   i / 4, low nibble for i % 4 < 2). */
static int nibble(const uint8_t *cb, int c, int i) {
    const uint8_t byte = cb[32 * (i / 4) + 2 * c + (i & 1)];
    return i % 4 < 2 ? byte & 0x0F : byte >> 4;
}

/* Column c's bits above the nibble at k = i, width 1 (Q5) or 2 (Q6_K): gguf_pack._high_plane's
   slot u = 2 (i / 4) + (i % 4) / 2 at byte 2c + (i & 1) of group u / (8 / width). */
static int high_bits(const uint8_t *cb, int c, int i, int width) {
    const int u = 2 * (i / 4) + (i % 4) / 2, per = 8 / width;
    return (cb[256 + 32 * (u / per) + 2 * c + (i & 1)] >> (u % per * width)) & ((1 << width) - 1);
}

static float float_code(int qtype, const uint8_t *p) {
    if (qtype == TW_F32) {
        float v;
        memcpy(&v, p, sizeof v);
        return v;
    }
    if (qtype == TW_F16) return half_to_float(p);
    const uint32_t bits = ((uint32_t)p[0] | (uint32_t)p[1] << 8) << 16; /* BF16 */
    float v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

void tw_block_row(int qtype, const uint8_t *codes, const uint8_t *meta, int64_t k, int64_t row, float *out) {
    TwBlockFormat f;
    if (!tw_block_format(qtype, &f)) return;
    const int64_t t = row / TW_TILE;
    const int c = (int)(row % TW_TILE);
    if (f.is_float) {
        const int64_t elem = f.code_bytes / TW_TILE;
        const uint8_t *wt = codes + t * k * f.code_bytes;
        for (int64_t i = 0; i < k; i++) out[i] = float_code(qtype, wt + i * f.code_bytes + c * elem);
        return;
    }
    const int64_t kb = k / TW_BLOCK, nb = k / f.block, per = f.block / TW_BLOCK;
    for (int64_t b = 0; b < kb; b++) {
        const uint8_t *cb = codes + (t * kb + b) * f.code_bytes;
        const uint8_t *mb = meta + (t * nb + b / per) * f.meta_bytes;
        const int j = (int)(b % per);
        float *o = out + b * TW_BLOCK;
        const float d = half_to_float(mb + 2 * c);
        for (int i = 0; i < TW_BLOCK; i++) {
            if (qtype == TW_Q8_0) {
                o[i] = (float)(int8_t)cb[32 * (i / 2) + 2 * c + (i & 1)] * d;
                continue;
            }
            int q = nibble(cb, c, i);
            if (qtype == TW_Q5_0 || qtype == TW_Q5_1 || qtype == TW_Q5_K) q |= high_bits(cb, c, i, 1) << 4;
            if (qtype == TW_Q6_K) q |= high_bits(cb, c, i, 2) << 4;
            switch (qtype) {
            case TW_Q4_1:
            case TW_Q5_1: {
                const float dq = d * (float)q;
                o[i] = dq + half_to_float(mb + 32 + 2 * c);
                break;
            }
            case TW_Q4_K:
            case TW_Q5_K: {
                const float ds = d * (float)mb[64 + 16 * j + c];
                const float dm = half_to_float(mb + 32 + 2 * c) * (float)mb[192 + 16 * j + c];
                const float dq = ds * (float)q;
                o[i] = dq - dm;
                break;
            }
            case TW_Q6_K: {
                const float ds = d * (float)(int8_t)mb[32 + 16 * (2 * j + i / 16) + c];
                o[i] = ds * (float)(q - 32);
                break;
            }
            default: /* Q4_0, Q5_0 */
                o[i] = d * (float)(q - tw_block_offset(qtype));
            }
        }
    }
}

void tw_block_xsums(const int16_t *xq, int64_t rows, int64_t k, int32_t *sums) {
    for (int64_t i = 0; i < rows * k / 16; i++) {
        int32_t s = 0;
        for (int j = 0; j < 16; j++) s += xq[16 * i + j];
        sums[i] = s;
    }
}

void tw_block_tiles(const TwBlockLinear *job, int64_t t0, int64_t t1) {
    if (tw_isa() == TW_ISA_AVX512)
        tw_block_tiles_avx512(job, t0, t1);
    else
        tw_block_tiles_avx2(job, t0, t1);
}
