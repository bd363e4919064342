/* What every compiled kernel shares (ckernel.c: the task-vector merge; gram.c: Gram matrices and
   per-line combinations; sce.c: sce's passes; arcee.c: arcee_fusion; ram.c; nearswap.c): how an input is stored and read
   as float32, the multiversioning, and base.row_sums' tree. */

#ifndef STREAMMERGE_CKERNEL_H
#define STREAMMERGE_CKERNEL_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* With GCC, the exported loops are built for AVX2 too, and the loader picks that one where the CPU
   has it (function multi-versioning, an ifunc): not -march=native, since a merge built on one node
   often runs on another. About twice the plain x86-64 (SSE2) speed of the hash and the histograms.
   Not with clang: clang 14 exports the versions under other names than the function's. */
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__has_attribute) && !defined(__clang__)
#if __has_attribute(target_clones)
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#define INLINE static inline __attribute__((always_inline)) /* into each version: helpers built once would be SSE2 */
#endif
#endif
#ifndef MULTIVERSION
#define MULTIVERSION
#define INLINE static inline
#endif

#define CHUNK 2048 /* elements per inner step: a few rows of float32 or float64 scratch stay in L1 */

enum { BF16, F32, FP8 };                  /* storage kinds: bf16 as its bits, float32, FP8 rows */

typedef struct { /* one input or output array (ckernel.py's _Source) */
    int64_t kind;
    void *data;
    /* FP8 rows: element (row, col) is table[byte] * grid[(first + row) / br][col / bc] */
    const float *grid, *table;
    int64_t grid_cols, first, cols, br, bc;
} Source;


INLINE float from_bits(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }
INLINE uint32_t to_bits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }

/* float32 of src[c : c+m] into out, exactly */
INLINE void load(const Source *s, int64_t c, int m, float *restrict out) {
    if (s->kind == BF16) { /* bf16: its bits are the float32's high half */
        const uint16_t *p = (const uint16_t *)s->data + c;
        for (int j = 0; j < m; j++) out[j] = from_bits((uint32_t)p[j] << 16);
    } else if (s->kind == F32) {
        memcpy(out, (const float *)s->data + c, m * sizeof(float));
    } else { /* FP8: byte -> float32 by table, times its block's scale, a run sharing one scale at a time */
        const uint8_t *w = (const uint8_t *)s->data + c;
        int64_t row = c / s->cols, col = c % s->cols;
        for (int64_t j = 0; j < m;) {
            int64_t run = m - j;
            if (run > s->bc - col % s->bc) run = s->bc - col % s->bc; /* within a column block */
            if (run > s->cols - col) run = s->cols - col;             /* and a row */
            float sc = s->grid[(s->first + row) / s->br * s->grid_cols + col / s->bc];
            for (int64_t k = 0; k < run; k++) out[j + k] = s->table[w[j + k]] * sc; /* one rounding, as QuantRows.dequantize */
            j += run;
            col += run;
            if (col == s->cols) row++, col = 0;
        }
    }
}

/* float32 -> the output's storage; bf16 rounds to nearest even as torch does (NaN -> 0x7FC0) */
INLINE void store(const float *restrict x, const Source *s, int64_t c, int m) {
    if (s->kind == BF16) {
        uint16_t *p = (uint16_t *)s->data + c;
        for (int j = 0; j < m; j++) {
            uint32_t v = to_bits(x[j]);
            uint32_t r = (v + 0x7FFFu + ((v >> 16) & 1u)) >> 16;
            p[j] = x[j] != x[j] ? 0x7FC0 : (uint16_t)r;
        }
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

#endif
