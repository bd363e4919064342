/* RAM and RAM+ (ram.py's default semantics, op for op in float32; loaded by ckernel.py).

   τ_t = θ_t − θ₀ counts where |τ_t| > ε (ε rounded to float32, as torch compares a float32 tensor
   with a Python float); c = how many models count at a position. Every operation is the float32
   one torch performs, in ram.py's order: the tests check the bytes. */

#include "ckernel.h"

/* τ of every model over elements [c, c+m) into tv (k rows of CHUNK), and c per element into count */
INLINE void task_vectors(const Source *models, int64_t k, const Source *base, float eps, int64_t c, int m,
                         float *restrict b, float *restrict tv, int32_t *restrict count) {
    load(base, c, m, b);
    for (int j = 0; j < m; j++) count[j] = 0;
    for (int64_t t = 0; t < k; t++) {
        float *d = tv + t * CHUNK;
        load(&models[t], c, m, d);
        for (int j = 0; j < m; j++) {
            d[j] -= b[j];
            count[j] += fabsf(d[j]) > eps;
        }
    }
}

static int scratch(int64_t k, float **b, float **tv, int32_t **count) {
    *b = malloc(sizeof(float) * CHUNK * (size_t)(k + 1));
    *count = malloc(sizeof(int32_t) * CHUNK);
    *tv = *b ? *b + CHUNK : NULL;
    if (*b && *count) return 0;
    free(*b);
    free(*count);
    return -1;
}

/* out[0:n] = θ₀ + Σ_t (τ_t · scale_t where c = 1, else τ_t / c, over counted τ_t) + 0;
   scales NULL: ram (no scaling) */
MULTIVERSION int ram_merge(const Source *models, int64_t k, const Source *base, float eps, const float *scales,
                           int64_t n, float *out) {
    float *b, *tv;
    int32_t *count;
    if (scratch(k, &b, &tv, &count)) return -1;
    for (int64_t c = 0; c < n; c += CHUNK) {
        int m = (int)(n - c < CHUNK ? n - c : CHUNK);
        task_vectors(models, k, base, eps, c, m, b, tv, count);
        float *o = out + c;
        for (int j = 0; j < m; j++) o[j] = 0.0f;
        for (int64_t t = 0; t < k; t++) {
            const float *d = tv + t * CHUNK;
            float s = scales ? scales[t] : 1.0f; /* (× 1 changes no bits: ram.py skips it) */
            for (int j = 0; j < m; j++) {
                float divisor = (float)(count[j] > 1 ? count[j] : 1);
                float part = count[j] == 1 ? d[j] * s : d[j] / divisor;
                o[j] += fabsf(d[j]) > eps ? part : 0.0f;
            }
        }
        for (int j = 0; j < m; j++) o[j] = (b[j] + o[j]) + 0.0f;
    }
    free(b);
    free(count);
    return 0;
}

/* RAM+'s counts over elements [0, n): counts[t] positions where model t counts with others
   (shared), counts[k + t] where it counts alone (unique) */
MULTIVERSION int ram_counts(const Source *models, int64_t k, const Source *base, float eps, int64_t n, int64_t *counts) {
    float *b, *tv;
    int32_t *count;
    if (scratch(k, &b, &tv, &count)) return -1;
    for (int64_t t = 0; t < 2 * k; t++) counts[t] = 0;
    for (int64_t c = 0; c < n; c += CHUNK) {
        int m = (int)(n - c < CHUNK ? n - c : CHUNK);
        task_vectors(models, k, base, eps, c, m, b, tv, count);
        for (int64_t t = 0; t < k; t++) {
            const float *d = tv + t * CHUNK;
            int64_t shared = 0, unique = 0;
            for (int j = 0; j < m; j++) {
                int counted = fabsf(d[j]) > eps;
                shared += counted & (count[j] > 1);
                unique += counted & (count[j] == 1);
            }
            counts[t] += shared;
            counts[k + t] += unique;
        }
    }
    free(b);
    free(count);
    return 0;
}
