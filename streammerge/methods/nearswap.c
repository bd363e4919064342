/* NearSwap (nearswap.py's default semantics, op for op in float32; loaded by ckernel.py).

   torch evaluates `t / x` for a Python float t as reciprocal(x) · t: two roundings, reproduced here;
   its clamps keep NaN. The tests check the bytes. */

#include "ckernel.h"

INLINE float clamp_low(float x, float low) { return x < low ? low : x; } /* torch.clamp: NaN stays NaN */

/* out[0:n] = w·θ₁ + (1 − w)·θ₀ + 0, w = clamp(t / clamp(|θ₁ − θ₀|, floor), 0, 1) */
MULTIVERSION int nearswap_merge(const Source *base, const Source *model, float t, float floor, int64_t n, float *out) {
    float a[CHUNK], b[CHUNK];
    for (int64_t c = 0; c < n; c += CHUNK) {
        int m = (int)(n - c < CHUNK ? n - c : CHUNK);
        load(base, c, m, a);
        load(model, c, m, b);
        for (int j = 0; j < m; j++) {
            float w = (1.0f / clamp_low(fabsf(a[j] - b[j]), floor)) * t;
            w = clamp_low(w, 0.0f);
            w = w > 1.0f ? 1.0f : w;
            out[c + j] = (w * b[j] + (1.0f - w) * a[j]) + 0.0f;
        }
    }
    return 0;
}
