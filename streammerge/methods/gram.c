/* Gram matrices and per-line combinations of a few inputs, in float64 (gram.py's torch ops, op for
   op; loaded by ckernel.py). model_stock, nuslerp, multislerp, karcher and slerp use them.

   A line is `width` consecutive elements (a row of a matrix, or a row of the row blocks for a whole
   tensor). Each input x_i is read as float32, widened to float64 exactly, less the base's element
   when `minus` is given (a task vector, one float64 subtraction). Every product and sum is the same
   IEEE float64 operation, in the same order, as gram.py's torch path: the tests check the bytes. */

#include "ckernel.h"

/* the float64 of x[c : c+m] into out, less minus[0 : m] (the base, widened once) when given;
   f32 is scratch of CHUNK floats */
INLINE void load_wide(const Source *x, const double *minus, int64_t c, int64_t m, double *restrict out, float *restrict f32) {
    for (int64_t j = 0; j < m; j += CHUNK) {
        int step = (int)(m - j < CHUNK ? m - j : CHUNK);
        load(x, c + j, step, f32);
        if (minus)
            for (int t = 0; t < step; t++) out[j + t] = (double)f32[t] - minus[j + t];
        else
            for (int t = 0; t < step; t++) out[j + t] = (double)f32[t];
    }
}

INLINE int same(const Source *a, const Source *b) { return a && b && a->kind == b->kind && a->data == b->data; }

/* Lines [0, lines) of the k inputs (each starting at element 0 of its Source): out[p * lines + l]
   is Σ x_i x_j over line l for the p-th pair i <= j (pairs in the order (0,0), (0,1), ..., (1,1), ...).
   Returns -1 when its scratch cannot be allocated. */
MULTIVERSION int gram_lines(const Source *xs, int64_t k, const Source *minus, int64_t width, int64_t lines, double *out) {
    double *x = malloc(sizeof(double) * (size_t)(k + 1) * (size_t)(width ? width : 1));
    float *f32 = malloc(sizeof(float) * CHUNK);
    if (!x || !f32) {
        free(x);
        free(f32);
        return -1;
    }
    double *work = x + k * width; /* first the base's line, widened once, then the products */
    for (int64_t l = 0; l < lines; l++) {
        if (minus) load_wide(minus, NULL, l * width, width, work, f32);
        for (int64_t i = 0; i < k; i++) load_wide(&xs[i], minus ? work : NULL, l * width, width, x + i * width, f32);
        int64_t p = 0;
        for (int64_t i = 0; i < k; i++)
            for (int64_t j = i; j < k; j++, p++) {
                const double *a = x + i * width, *b = x + j * width;
                for (int64_t t = 0; t < width; t++) work[t] = a[t] * b[t];
                out[p * lines + l] = tree_sum(work, width);
            }
    }
    free(x);
    free(f32);
    return 0;
}

/* out = add + Σ_i coef_i · x_i (+ 0.0: −0 → +0) over lines [0, lines), rounded once to float32.
   coefs[i * lines + l] is input i's coefficient on line l, or coefs[i] on every line unless per_line;
   add (or NULL: 0) is read as float32, widened. */
MULTIVERSION int combine_lines(const Source *xs, int64_t k, const Source *minus, const double *coefs, int32_t per_line,
                               const Source *add, int64_t width, int64_t lines, float *out) {
    double *acc = malloc(sizeof(double) * 3 * CHUNK);
    float *f32 = malloc(sizeof(float) * CHUNK);
    if (!acc || !f32) {
        free(acc);
        free(f32);
        return -1;
    }
    double *x = acc + CHUNK, *base = x + CHUNK; /* base: minus, widened once per step */
    for (int64_t l = 0; l < lines; l++)
        for (int64_t j = 0; j < width; j += CHUNK) {
            int64_t c = l * width + j, m = width - j < CHUNK ? width - j : CHUNK;
            if (minus) load_wide(minus, NULL, c, m, base, f32);
            if (same(add, minus)) /* θ₀ + Σ c_i (θ_i − θ₀): θ₀ read once */
                memcpy(acc, base, sizeof(double) * (size_t)m);
            else if (add)
                load_wide(add, NULL, c, m, acc, f32);
            else
                for (int64_t t = 0; t < m; t++) acc[t] = 0.0;
            for (int64_t i = 0; i < k; i++) {
                double w = per_line ? coefs[i * lines + l] : coefs[i];
                load_wide(&xs[i], minus ? base : NULL, c, m, x, f32);
                for (int64_t t = 0; t < m; t++) acc[t] += x[t] * w;
            }
            for (int64_t t = 0; t < m; t++) out[c + t] = (float)(acc[t] + 0.0);
        }
    free(acc);
    free(f32);
    return 0;
}
