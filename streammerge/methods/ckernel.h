/* What every compiled kernel shares (ckernel.c: the task-vector merge; gram.c: Gram matrices and
   per-line combinations; sce.c: sce's passes; arcee.c: arcee_fusion; ram.c; nearswap.c): how an input is stored and read
   as float32, the multiversioning, and base.row_sums' tree. */

#ifndef STREAMMERGE_CKERNEL_H
#define STREAMMERGE_CKERNEL_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* With GCC, the exported loops are built for AVX2 and AVX-512 too, and the loader picks the best the CPU
   has (function multi-versioning, an ifunc): not -march=native, since a merge built on one node
   often runs on another. About twice the plain x86-64 (SSE2) speed of the hash and the histograms.
   Not with clang: clang 14 exports the versions under other names than the function's. */
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__has_attribute) && !defined(__clang__)
#if __has_attribute(target_clones) && __GNUC__ >= 11 /* AVX-512 (x86-64-v4) too: the FP8 quantizer 1.4x its AVX2 speed */
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#elif __has_attribute(target_clones)
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#endif
#ifdef MULTIVERSION
#define INLINE static inline __attribute__((always_inline)) /* into each version: helpers built once would be SSE2 */
#endif
#endif
#ifndef MULTIVERSION
#define MULTIVERSION
#define INLINE static inline
#endif

#define SUB 65536 /* elements per sub-block of bracket_range's counts of hot values: a tie is then found in one */
#define CHUNK 256 /* elements per inner step: merge_range's 6 + n float32 scratch arrays stay in L1 (2048 spilled: 1.3-1.6x slower) */

enum { BF16, F32, FP8 };                  /* storage kinds: bf16 as its bits, float32, FP8 rows */

typedef struct { /* one input or output array (ckernel.py's _Source) */
    int64_t kind;
    void *data;
    /* FP8 rows: element (row, col) is table[byte] * grid[(first + row) / br][col / bc]; table NULL: e4m3fn, decoded from its bits */
    const float *grid, *table;
    int64_t grid_cols, first, cols, br, bc;
} Source;


INLINE float from_bits(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }
INLINE uint32_t to_bits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }

/* float8_e4m3fn -> float32 from its bits, torch's values and NaN bits (c10's fp8e4m3fn_to_fp32_value):
   a select, not a table lookup, so it vectorizes */
INLINE float e4m3(uint8_t u) {
    uint32_t a = u & 0x7Fu;
    uint32_t normal = (a << 20) + 0x3C000000u; /* the exponent rebiased from 7 to 127, 3 mantissa bits */
    uint32_t sub = to_bits((float)(a & 7u) * 0.001953125f); /* exponent 0: m·2^-9 */
    uint32_t bits = a == 0x7Fu ? 0x7FF00000u : (a >= 8u ? normal : sub);
    return from_bits(bits | (uint32_t)(u & 0x80u) << 24);
}

/* float32 of src[c : c+m] into out, exactly */
INLINE void load(const Source *s, int64_t c, int m, float *restrict out) {
    if (s->kind == BF16) { /* bf16: its bits are the float32's high half */
        const uint16_t *p = (const uint16_t *)s->data + c;
        for (int j = 0; j < m; j++) out[j] = from_bits((uint32_t)p[j] << 16);
    } else if (s->kind == F32) {
        memcpy(out, (const float *)s->data + c, m * sizeof(float));
    } else { /* FP8: byte -> float32 (e4m3fn by its bits, else by table), times its block's scale, a run sharing one scale at a time */
        const uint8_t *w = (const uint8_t *)s->data + c;
        int64_t row = c / s->cols, col = c % s->cols;
        for (int64_t j = 0; j < m;) {
            int64_t run = m - j;
            if (run > s->bc - col % s->bc) run = s->bc - col % s->bc; /* within a column block */
            if (run > s->cols - col) run = s->cols - col;             /* and a row */
            float sc = s->grid[(s->first + row) / s->br * s->grid_cols + col / s->bc];
            if (s->table) /* one rounding, as QuantRows.dequantize */
                for (int64_t k = 0; k < run; k++) out[j + k] = s->table[w[j + k]] * sc;
            else
                for (int64_t k = 0; k < run; k++) out[j + k] = e4m3(w[j + k]) * sc;
            j += run;
            col += run;
            if (col == s->cols) row++, col = 0;
        }
    }
}

/* float32 -> bf16, to nearest even as torch does (NaN -> 0x7FC0) */
INLINE uint16_t to_bf16(float x) {
    uint32_t v = to_bits(x);
    return x != x ? 0x7FC0 : (uint16_t)((v + 0x7FFFu + ((v >> 16) & 1u)) >> 16);
}

/* float32 -> the output's storage */
INLINE void store(const float *restrict x, const Source *s, int64_t c, int m) {
    if (s->kind == BF16) {
        uint16_t *p = (uint16_t *)s->data + c;
        for (int j = 0; j < m; j++) p[j] = to_bf16(x[j]);
    } else {
        memcpy((float *)s->data + c, x, m * sizeof(float));
    }
}

/* base.row_sums_: the first half plus the last half, again and again, until one element is left */
INLINE double tree_sum(double *restrict w, int64_t cols) {
    if (cols == 0) return 0.0;
    while (cols > 1) {
        int64_t half = cols / 2, from = cols - half;
        for (int64_t j = 0; j < half; j++) w[j] += w[from + j];
        cols -= half;
    }
    return w[0];
}

/* tree_sum of x, its first halving from x into w (x is kept) */
INLINE double tree_sum_of(const double *restrict x, double *restrict w, int64_t cols) {
    if (cols < 2) return cols ? x[0] : 0.0;
    int64_t half = cols / 2, from = cols - half;
    for (int64_t j = 0; j < half; j++) w[j] = x[j] + x[from + j];
    if (from > half) w[half] = x[half]; /* an odd length's middle element */
    return tree_sum(w, from);
}

#endif
