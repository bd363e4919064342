/* sce's passes under the default semantics (sce.py's torch ops, op for op; loaded by ckernel.py):
   the variance's radix histograms and ties per row, Σ τ̂² per row, and the merge, over one slice.

   Each input is read as float32 exactly; τ_t = x_t − θ₀, the variance, the vote and the merge are
   the same IEEE float32 operations in the same order as sce.py's torch path (the sums float64, by
   base.row_sums' tree): the tests check the bytes. */

#include "ckernel.h"

typedef struct { /* one call's inputs and selection (ckernel.py's _Sce) */
    const Source *xs;
    int64_t n;
    Source base;
    int32_t select; /* 0: τ̂ = τ everywhere (select_topk >= 1) */
    float value;    /* else keep var > value, and var == value at flat index <= last_tie (ops.trim_keep) */
    int64_t last_tie, start; /* start: the flat index of element 0 */
} Sce;

/* τ_t of elements [c, c+m) into tau + t·CHUNK (sce._task_vectors); b: θ₀'s */
INLINE void task_vectors(const Sce *p, int64_t c, int m, float *restrict b, float *restrict tau) {
    load(&p->base, c, m, b);
    for (int64_t t = 0; t < p->n; t++) {
        float *x = tau + t * CHUNK;
        load(&p->xs[t], c, m, x);
        for (int j = 0; j < m; j++) x[j] = x[j] - b[j];
    }
}

/* sce._variance: the mean, then the mean square deviation, model by model; /n a division as torch's */
INLINE void variance(const float *restrict tau, int64_t n, int m, float *restrict mean, float *restrict var) {
    float nf = (float)n;
    for (int j = 0; j < m; j++) mean[j] = tau[j];
    for (int64_t t = 1; t < n; t++)
        for (int j = 0; j < m; j++) mean[j] = mean[j] + tau[t * CHUNK + j];
    for (int j = 0; j < m; j++) mean[j] = mean[j] / nf;
    for (int j = 0; j < m; j++) var[j] = (tau[j] - mean[j]) * (tau[j] - mean[j]);
    for (int64_t t = 1; t < n; t++)
        for (int j = 0; j < m; j++) {
            float d = tau[t * CHUNK + j] - mean[j];
            var[j] = var[j] + d * d;
        }
    for (int j = 0; j < m; j++) var[j] = var[j] / nf;
}

/* τ̂ (sce._selected): τ where the variance is kept, else +0 (a select: NaN dropped too) */
INLINE void selected(const Sce *p, int64_t c, int m, float *restrict tau, float *restrict mean, float *restrict var) {
    if (!p->select) return;
    variance(tau, p->n, m, mean, var);
    int64_t last = p->last_tie - (p->start + c); /* the ties kept are those at j <= ties, in 32-bit lanes */
    int ties = last < 0 ? -1 : (last >= m ? m : (int)last);
    float value = p->value;
    for (int j = 0; j < m; j++) var[j] = var[j] > value || (var[j] == value && j <= ties) ? 1.0f : 0.0f;
    for (int64_t t = 0; t < p->n; t++)
        for (int j = 0; j < m; j++) tau[t * CHUNK + j] = var[j] != 0.0f ? tau[t * CHUNK + j] : 0.0f;
}

static float *scratch(int64_t n) { return malloc(sizeof(float) * (size_t)(4 + n) * CHUNK); }

/* Adds to hist the variance's radix histogram over elements [0, count): with high < 0 its top 16
   bits, each bin split by whether the low 16 bits are zero (2·65536 bins, ops.radix_hist_high);
   else the low 16 bits of the elements whose top bits are high (65536 bins, ops.radix_hist_low).
   The sign bit is dropped: the variance is never −0, and torch's bincount fails on a negative NaN.
   0, or -1 out of memory */
MULTIVERSION int sce_hist(const Sce *p, int64_t count, int64_t high, int64_t *hist) {
    float *buf = scratch(p->n);
    if (!buf) return -1;
    float *b = buf, *mean = b + CHUNK, *var = mean + CHUNK, *tau = var + 2 * CHUNK;
    uint32_t *bin = (uint32_t *)(var + CHUNK);
    for (int64_t c = 0; c < count; c += CHUNK) {
        int m = count - c < CHUNK ? (int)(count - c) : CHUNK;
        task_vectors(p, c, m, b, tau);
        variance(tau, p->n, m, mean, var);
        if (high < 0) {
            for (int j = 0; j < m; j++) {
                uint32_t v = to_bits(var[j]) & 0x7FFFFFFFu;
                bin[j] = ((v >> 16) << 1) | ((v & 0xFFFFu) != 0);
            }
            for (int j = 0; j < m; j++) hist[bin[j]]++;
        } else {
            for (int j = 0; j < m; j++) {
                uint32_t v = to_bits(var[j]) & 0x7FFFFFFFu;
                bin[j] = (v >> 16) == (uint32_t)high ? (v & 0xFFFFu) : 65536u; /* 65536: outside */
            }
            for (int j = 0; j < m; j++)
                if (bin[j] < 65536u) hist[bin[j]]++;
        }
    }
    free(buf);
    return 0;
}

/* ties[l] = how many elements of line l (`width` elements each) have var == value; 0, or -1 */
MULTIVERSION int sce_ties(const Sce *p, float value, int64_t width, int64_t lines, int64_t *ties) {
    float *buf = scratch(p->n);
    if (!buf) return -1;
    float *b = buf, *mean = b + CHUNK, *var = mean + CHUNK, *tau = var + 2 * CHUNK;
    for (int64_t l = 0; l < lines; l++) {
        int64_t count = 0;
        for (int64_t j0 = 0; j0 < width; j0 += CHUNK) {
            int m = width - j0 < CHUNK ? (int)(width - j0) : CHUNK;
            task_vectors(p, l * width + j0, m, b, tau);
            variance(tau, p->n, m, mean, var);
            int equal = 0;
            for (int j = 0; j < m; j++) equal += var[j] == value;
            count += equal;
        }
        ties[l] = count;
    }
    free(buf);
    return 0;
}

/* sums[t·lines + l] = Σ τ̂_t² over line l: float32 squares widened, summed by base.row_sums' tree;
   0, or -1 out of memory */
MULTIVERSION int sce_sums(const Sce *p, int64_t width, int64_t lines, double *sums) {
    int64_t n = p->n;
    float *buf = scratch(n);
    double *sq = malloc(sizeof(double) * (size_t)n * (size_t)(width ? width : 1));
    if (!buf || !sq) {
        free(buf);
        free(sq);
        return -1;
    }
    float *b = buf, *mean = b + CHUNK, *var = mean + CHUNK, *tau = var + 2 * CHUNK;
    for (int64_t l = 0; l < lines; l++) {
        for (int64_t j0 = 0; j0 < width; j0 += CHUNK) {
            int m = width - j0 < CHUNK ? (int)(width - j0) : CHUNK;
            task_vectors(p, l * width + j0, m, b, tau);
            selected(p, l * width + j0, m, tau, mean, var);
            for (int64_t t = 0; t < n; t++) {
                const float *x = tau + t * CHUNK;
                double *s = sq + t * width + j0;
                for (int j = 0; j < m; j++) s[j] = (double)(x[j] * x[j]);
            }
        }
        for (int64_t t = 0; t < n; t++) sums[t * lines + l] = tree_sum(sq + t * width, width);
    }
    free(buf);
    free(sq);
    return 0;
}

/* sce's merge of elements [0, count) into out (float32): the vote γ = sign of Σ τ̂_t, each model's
   weight where its τ̂ agrees, θ₀ + Σ w a τ̂ / max(Σ w a, 1e-6) (+ 0: −0 → +0); 0, or -1 */
MULTIVERSION int sce_merge(const Sce *p, const float *weights, float floor, int64_t count, float *out) {
    int64_t n = p->n;
    float *buf = scratch(n);
    if (!buf) return -1;
    float *b = buf, *score = b + CHUNK, *num = score + CHUNK, *den = num + CHUNK, *tau = den + CHUNK;
    for (int64_t c = 0; c < count; c += CHUNK) {
        int m = count - c < CHUNK ? (int)(count - c) : CHUNK;
        task_vectors(p, c, m, b, tau);
        selected(p, c, m, tau, num, den);
        for (int j = 0; j < m; j++) score[j] = tau[j];
        for (int64_t t = 1; t < n; t++)
            for (int j = 0; j < m; j++) score[j] = score[j] + tau[t * CHUNK + j];
        for (int j = 0; j < m; j++) num[j] = den[j] = 0.0f;
        for (int64_t t = 0; t < n; t++) {
            const float *x = tau + t * CHUNK;
            float w = weights[t];
            for (int j = 0; j < m; j++) {
                float agree = (score[j] >= 0.0f ? x[j] > 0.0f : x[j] < 0.0f) ? 1.0f : 0.0f;
                float ew = agree * w; /* a product, as torch's: a NaN weight stays NaN where a_t = 0 */
                num[j] = num[j] + x[j] * ew;
                den[j] = den[j] + ew;
            }
        }
        for (int j = 0; j < m; j++) {
            float d = den[j] < floor ? floor : den[j]; /* clamp: NaN stays NaN */
            out[c + j] = (b[j] + num[j] / d) + 0.0f;
        }
    }
    free(buf);
    return 0;
}
