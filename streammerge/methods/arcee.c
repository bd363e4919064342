/* arcee_fusion's default semantics (arcee_fusion.py's torch ops, op for op; loaded by ckernel.py).

   The KL of each softmax row (`last` elements) in float64, but for its exp and log: those stay
   torch's (C's libm and torch's vectorized exp/log may differ in the last bit), so the row takes
   three calls, torch exponentiating between the first two and taking the log between the last two.
   Then the importance |θ₁ − θ₀|·KL, float64 rounded to float32, for the radix histograms and the
   merge, computed where it is used instead of stored. Every op is the same IEEE operation, in the
   same order, as the torch path: the tests check the bytes. θ₀ is `a`, θ₁ is `b`. */

#include "ckernel.h"

#define EPS 1e-8 /* arcee_fusion.EPS */

/* x = the float64 of the row src[c : c+last] less its largest element (torch's max: a NaN wins) */
INLINE void shifted_row(const Source *s, int64_t c, int64_t last, double *restrict x, float *restrict f32) {
    /* the largest as the largest of the bits read as int32, a negative's flipped (the float order,
       −0 below +0: a zero's sign is lost in x − max's exp); in integers the loop vectorizes */
    int32_t top = INT32_MIN;
    uint32_t nan = 0;
    for (int64_t j = 0; j < last; j += CHUNK) {
        int m = last - j < CHUNK ? (int)(last - j) : CHUNK;
        load(s, c + j, m, f32);
        for (int t = 0; t < m; t++) {
            uint32_t u = to_bits(f32[t]);
            int32_t v = (int32_t)(u ^ ((uint32_t)((int32_t)u >> 31) >> 1));
            top = v > top ? v : top;
            nan |= (u & 0x7FFFFFFFu) > 0x7F800000u;
            x[j + t] = (double)f32[t];
        }
    }
    double m = from_bits((uint32_t)top ^ ((uint32_t)(top >> 31) >> 1));
    for (int64_t j = 0; j < last && nan; j++)
        if (x[j] != x[j]) { /* the row's NaN, its sign and payload: they travel to the importance, */
            m = x[j];        /* whose sign bit torch's bincount refuses */
            break;
        }
    for (int64_t j = 0; j < last; j++) x[j] = x[j] - m;
}

/* Step 1 of `rows` rows: x = θ₁ − max θ₁ and y = θ₀ − max θ₀ per row. 0, or -1 out of memory */
MULTIVERSION int arcee_shift(const Source *a, const Source *b, int64_t last, int64_t rows, double *x, double *y) {
    float *f32 = malloc(CHUNK * sizeof(float));
    if (!f32) return -1;
    for (int64_t r = 0; r < rows; r++) {
        shifted_row(b, r * last, last, x + r * last, f32);
        shifted_row(a, r * last, last, y + r * last, f32);
    }
    free(f32);
    return 0;
}

/* Step 2, after x = exp(x), y = exp(y): p = x / Σx + ε into x, p / q into y (q = y / Σy + ε), the
   sums by base.row_sums' tree. 0, or -1 out of memory */
MULTIVERSION int arcee_ratio(int64_t last, int64_t rows, double *x, double *y) {
    double *work = malloc(sizeof(double) * (size_t)(last ? last : 1));
    if (!work) return -1;
    for (int64_t r = 0; r < rows; r++) {
        double *p = x + r * last, *q = y + r * last;
        memcpy(work, p, sizeof(double) * (size_t)last);
        double s = tree_sum(work, last);
        for (int64_t j = 0; j < last; j++) p[j] = p[j] / s + EPS;
        memcpy(work, q, sizeof(double) * (size_t)last);
        s = tree_sum(work, last);
        for (int64_t j = 0; j < last; j++) q[j] = p[j] / (q[j] / s + EPS);
    }
    free(work);
    return 0;
}

/* Step 3, after y = log(y): kl[r] = Σ p·log(p/q) over row r by the tree (in y's buffer), clamped at 0
   (a NaN stays) */
MULTIVERSION void arcee_kl(int64_t last, int64_t rows, const double *x, double *y, double *kl) {
    for (int64_t r = 0; r < rows; r++) {
        const double *p = x + r * last;
        double *w = y + r * last;
        for (int64_t j = 0; j < last; j++) w[j] = p[j] * w[j];
        double s = tree_sum(w, last);
        kl[r] = s < 0.0 ? 0.0 : s;
    }
}

/* The importance of elements [c, c+m), one softmax row's (KL k): θ₀ into fa, θ₁ into fb */
INLINE void importance(const Source *a, const Source *b, double k, int64_t c, int m, float *restrict fa,
                       float *restrict fb, float *restrict imp) {
    load(a, c, m, fa);
    load(b, c, m, fb);
    for (int j = 0; j < m; j++) imp[j] = (float)((double)fabsf(fb[j] - fa[j]) * k);
}

/* the next step from element c: at most CHUNK elements, within one softmax row */
INLINE int step(int64_t c, int64_t n, int64_t last) {
    int64_t m = last - c % last;
    if (m > n - c) m = n - c;
    return m < CHUNK ? (int)m : CHUNK;
}

/* The importance's radix histogram over elements [0, n) (kl[r]: softmax row r's KL), as the bins it
   fills and their counts, into bins[] and filled[] (room for every bin). nhigh == 0: bin 2·top + (low
   != 0) of the bits' top and low 16 (ops.radix_hist_high); else bin i·65536 + low of the elements
   whose top is highs[i] (ops.radix_hist_low, for each i < nhigh <= 3). counts: a zeroed counter per
   bin (n < 2^32), left zeroed. Returns how many bins it filled; -1 out of memory; -2 when an
   importance has its sign bit set (a NaN: torch's bincount refuses the negative int32). */
MULTIVERSION int64_t arcee_hist(const Source *a, const Source *b, const double *kl, int64_t last, int64_t n,
                                const int64_t *highs, int64_t nhigh, uint32_t *counts, int64_t *bins, int64_t *filled) {
    float *buf = malloc(3 * CHUNK * sizeof(float) + CHUNK * sizeof(uint32_t));
    if (!buf) return -1;
    float *fa = buf, *fb = fa + CHUNK, *imp = fb + CHUNK;
    uint32_t *slot = (uint32_t *)(imp + CHUNK), neg = 0, none = (uint32_t)(nhigh * 65536);
    uint32_t top[3] = {0x10000u, 0x10000u, 0x10000u}; /* (no top is 0x10000) */
    for (int64_t i = 0; i < nhigh; i++) top[i] = (uint32_t)highs[i];
    int64_t nb = 0;
    for (int64_t c = 0; c < n;) {
        int m = step(c, n, last);
        importance(a, b, kl[c / last], c, m, fa, fb, imp);
        if (nhigh == 0) {
            for (int j = 0; j < m; j++) { /* the bins, in a loop that vectorizes */
                uint32_t v = to_bits(imp[j]);
                neg |= v;
                slot[j] = ((v >> 15) & ~1u) | ((v & 0xFFFFu) != 0);
            }
            for (int j = 0; j < m; j++)
                if (counts[slot[j]]++ == 0) bins[nb++] = slot[j];
        } else {
            for (int j = 0; j < m; j++) { /* selects: it vectorizes */
                uint32_t v = to_bits(imp[j]), t = v >> 16, low = v & 0xFFFFu;
                uint32_t s = t == top[2] ? 131072 + low : none;
                s = t == top[1] ? 65536 + low : s;
                slot[j] = t == top[0] ? low : s;
            }
            int hits = 0;
            for (int j = 0; j < m; j++) { /* few elements are in those bins: gathered without branches */
                slot[hits] = slot[j];
                hits += slot[j] != none;
            }
            for (int j = 0; j < hits; j++)
                if (counts[slot[j]]++ == 0) bins[nb++] = slot[j];
        }
        c += m;
    }
    for (int64_t k = 0; k < nb; k++) {
        filled[k] = counts[bins[k]];
        counts[bins[k]] = 0;
    }
    free(buf);
    return neg >> 31 ? -2 : nb;
}

/* out = θ₁ where the importance (widened) >= threshold, else θ₀, over elements [0, n), float32 */
MULTIVERSION int arcee_merge(const Source *a, const Source *b, const double *kl, int64_t last, int64_t n,
                             double threshold, float *out) {
    float *buf = malloc(3 * CHUNK * sizeof(float));
    if (!buf) return -1;
    float *fa = buf, *fb = fa + CHUNK, *imp = fb + CHUNK;
    for (int64_t c = 0; c < n;) {
        int m = step(c, n, last);
        importance(a, b, kl[c / last], c, m, fa, fb, imp);
        for (int j = 0; j < m; j++) out[c + j] = (double)imp[j] >= threshold ? fb[j] : fa[j];
        c += m;
    }
    free(buf);
    return 0;
}
