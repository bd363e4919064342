/* arcee_fusion's default semantics (arcee_fusion.py's torch ops, op for op; loaded by ckernel.py).

   The KL of each softmax row (`last` elements) in float64, its exp and log detmath.py's (fixed
   sequences of IEEE operations, spelled out here in the same order: the same bits as the torch
   path, on any machine). Then the importance |θ₁ − θ₀|·KL, float64 rounded to float32, for the
   radix histograms and the merge, computed where it is used instead of stored. Every op is the same
   IEEE operation, in the same order, as the torch path: the tests check the bytes. θ₀ is `a`, θ₁ is `b`. */

#include "ckernel.h"

#define EPS 1e-8 /* arcee_fusion.EPS */

/* detmath.py's constants */
#define SHIFTER 0x1.8p52
#define INV_LN2 0x1.71547652b82fep+0
#define LN2_HI 0x1.62e42ffp-1
#define LN2_LO -0x1.718432a1b0e26p-35
#define EXP_LIMIT 1100.0
#define SQRT2 0x1.6a09e667f3bcdp+0

INLINE uint64_t bits64(double x) { uint64_t u; memcpy(&u, &x, 8); return u; }
INLINE double from_bits64(uint64_t u) { double x; memcpy(&x, &u, 8); return x; }

/* 2^k of integer-valued k, |k| <= 1022: k's bits read off k + SHIFTER's mantissa */
INLINE double pow2(double k) { return from_bits64((bits64(k + SHIFTER) - bits64(SHIFTER) + 1023) << 52); }

/* detmath.exp: e^x = 2^k · (1 + (r + r²·P(r))), P's terms 1/2! … 1/13! by Estrin's tree */
INLINE double det_exp(double x) {
    double c = x < -EXP_LIMIT ? -EXP_LIMIT : x;
    c = c > EXP_LIMIT ? EXP_LIMIT : c;
    double k = (c * INV_LN2 + SHIFTER) - SHIFTER;
    double r = (c - k * LN2_HI) - k * LN2_LO;
    double r2 = r * r, r4 = r2 * r2, r8 = r4 * r4;
    double a0 = 1.0 / 2 + 1.0 / 6 * r, a1 = 1.0 / 24 + 1.0 / 120 * r, a2 = 1.0 / 720 + 1.0 / 5040 * r;
    double a3 = 1.0 / 40320 + 1.0 / 362880 * r, a4 = 1.0 / 3628800 + 1.0 / 39916800 * r;
    double a5 = 1.0 / 479001600 + 1.0 / 6227020800.0 * r;
    double p = ((a0 + a1 * r2) + (a2 + a3 * r2) * r4) + (a4 + a5 * r2) * r8;
    double e = 1.0 + (r + r2 * p);
    double k1 = (k * 0.5 + SHIFTER) - SHIFTER;
    double out = (e * pow2(k1)) * pow2(k - k1);
    return x != x ? x : out;
}

/* detmath.log's value for a positive normal x, from its bits u (of x·2^54 where `scaled`):
   k·ln 2 + f − (f²/2 − s·(f²/2 + R)), x = 2^k·(1 + f), s = f/(2 + f), R = z·Q(z), z = s², Q's terms
   2/3 … 2/21 by Estrin's tree (64-bit flags and integers: one lane width, so the loops vectorize) */
INLINE double log_normal(uint64_t u, uint64_t scaled) {
    double m = from_bits64((u & 0xFFFFFFFFFFFFFull) | 0x3FF0000000000000ull); /* in [1, 2) */
    uint64_t big = m > SQRT2;
    m = big ? m * 0.5 : m;
    /* k exactly: the biased exponent (+ 54 unless scaled) in 2^52's mantissa, less 2^52 and the bias */
    uint64_t biased = ((u >> 52) & 0x7FF) + big + (scaled ? 0 : 54);
    double k = from_bits64(bits64(0x1p52) + biased) - (0x1p52 + 1077.0);
    double f = m - 1.0, s = f / (2.0 + f), z = s * s, hfsq = 0.5 * f * f;
    double z2 = z * z, z4 = z2 * z2, z8 = z4 * z4;
    double a0 = 2.0 / 3 + 2.0 / 5 * z, a1 = 2.0 / 7 + 2.0 / 9 * z, a2 = 2.0 / 11 + 2.0 / 13 * z;
    double a3 = 2.0 / 15 + 2.0 / 17 * z, a4 = 2.0 / 19 + 2.0 / 21 * z;
    double r = z * (((a0 + a1 * z2) + (a2 + a3 * z2) * z4) + a4 * z8);
    return k * LN2_HI + (f - (hfsq - (s * (hfsq + r) + k * LN2_LO)));
}

/* detmath.log: a subnormal scaled by 2^54 first; log 0 = −inf, log of a negative NaN, NaN kept */
INLINE double det_log(double x) {
    uint64_t tiny = x < 0x1p-1022;
    double out = log_normal(bits64(tiny ? x * 0x1p54 : x), tiny);
    out = x == INFINITY ? x : out;
    out = x == 0.0 ? -INFINITY : out;
    out = x < 0.0 ? NAN : out;
    return x != x ? x : out;
}

/* det_log of a ratio p/q of arcee_kl's, in [1e-8/(1 + 1e-8), (1 + 1e-8)/1e-8] or a NaN: the same
   bits, without the selects for values it never takes */
INLINE double ratio_log(double x) {
    double out = log_normal(bits64(x), 0);
    return x != x ? x : out;
}

/* detmath.exp and detmath.log over n float64s (the tests compare their bits) */
MULTIVERSION void det_exp_array(const double *x, int64_t n, double *out) {
    for (int64_t j = 0; j < n; j++) out[j] = det_exp(x[j]);
}

MULTIVERSION void det_log_array(const double *x, int64_t n, double *out) {
    for (int64_t j = 0; j < n; j++) out[j] = det_log(x[j]);
}

/* x = the float64 of the row src[c : c+last]; returns its largest element (torch's max: a NaN wins) */
INLINE double row_max(const Source *s, int64_t c, int64_t last, double *restrict x, float *restrict f32) {
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
    return m;
}

/* KL(softmax θ₁ + ε ‖ softmax θ₀ + ε) of the softmax row at element c: Σ p·log(p/q) by the tree,
   clamped at 0 (a NaN stays); p = e·(1/Σe) + ε, e = exp(θ₁ − max θ₁), q likewise of θ₀, the sums by
   base.row_sums' tree. work: 3·last float64s and CHUNK float32s */
INLINE double row_kl(const Source *a, const Source *b, int64_t c, int64_t last, double *work) {
    double *x = work, *y = x + last, *w = y + last;
    float *f32 = (float *)(w + last);
    double mx = row_max(b, c, last, x, f32), my = row_max(a, c, last, y, f32);
    for (int64_t j = 0; j < last; j++) x[j] = det_exp(x[j] - mx);
    for (int64_t j = 0; j < last; j++) y[j] = det_exp(y[j] - my);
    double rx = 1.0 / tree_sum_of(x, w, last), ry = 1.0 / tree_sum_of(y, w, last);
    for (int64_t j = 0; j < last; j++) {
        double p = x[j] * rx + EPS;
        w[j] = p * ratio_log(p / (y[j] * ry + EPS));
    }
    double s = tree_sum(w, last);
    return s < 0.0 ? 0.0 : s;
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
   bin (n < 2^32), left zeroed. work (the first histogram only; else NULL): kl[r] = row r's KL is
   computed there first (row_kl), so that a block's first pass reads it once, each row still in cache
   when it is counted. Returns how many bins it filled; -1 out of memory; -2 when an importance has
   its sign bit set (a NaN: torch's bincount refuses the negative int32). */
MULTIVERSION int64_t arcee_hist(const Source *a, const Source *b, double *kl, int64_t last, int64_t n,
                                const int64_t *highs, int64_t nhigh, uint32_t *counts, int64_t *bins, int64_t *filled,
                                double *work) {
    float *buf = malloc(3 * CHUNK * sizeof(float) + (CHUNK + 8) * sizeof(uint32_t));
    if (!buf) return -1;
    float *fa = buf, *fb = fa + CHUNK, *imp = fb + CHUNK;
    uint32_t *slot = (uint32_t *)(imp + CHUNK), neg = 0, none = (uint32_t)(nhigh * 65536);
    uint32_t top[3] = {0x10000u, 0x10000u, 0x10000u}; /* (no top is 0x10000) */
    for (int64_t i = 0; i < nhigh; i++) top[i] = (uint32_t)highs[i];
    int64_t nb = 0;
    for (int64_t c = 0; c < n && nhigh == 0;) {
        int m = step(c, n, last);
        if (work && c % last == 0) kl[c / last] = row_kl(a, b, c, last, work);
        importance(a, b, kl[c / last], c, m, fa, fb, imp);
        for (int j = 0; j < m; j++) { /* the bins, in a loop that vectorizes */
            uint32_t v = to_bits(imp[j]);
            neg |= v;
            slot[j] = ((v >> 15) & ~1u) | ((v & 0xFFFFu) != 0);
        }
        for (int j = 0; j < m; j++)
            if (counts[slot[j]]++ == 0) bins[nb++] = slot[j];
        c += m;
    }
    for (int64_t c = 0; c < n && nhigh > 0;) {
        int m = step(c, n, last);
        importance(a, b, kl[c / last], c, m, fa, fb, imp);
        for (int j = 0; j < m; j++) { /* selects: it vectorizes */
            uint32_t v = to_bits(imp[j]), t = v >> 16, low = v & 0xFFFFu;
            uint32_t s = t == top[2] ? 131072 + low : none;
            s = t == top[1] ? 65536 + low : s;
            slot[j] = t == top[0] ? low : s;
        }
        for (int j = m; j < m + 8; j++) slot[j] = none;
        for (int j = 0; j < m; j += 8) { /* few elements are in those bins: most groups of 8 have none */
            uint32_t any = 0;
            for (int t = 0; t < 8; t++) any |= slot[j + t] ^ none;
            if (any)
                for (int t = j; t < j + 8; t++)
                    if (slot[t] != none && counts[slot[t]]++ == 0) bins[nb++] = slot[t];
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
