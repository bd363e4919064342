/* The fast CPU kernel: kernels.py's float32 arithmetic, op for op, in C (loaded by ckernel.py).

   The numpy kernel makes one pass over a chunk per operation (dozens for a TIES merge); here every
   CHUNK-element step goes through the whole merge while it sits in L1 cache, the DARE hash computed
   per element instead of stored; in the usual cases (a fine-tune's τ, mergekit's TIES over 2-3
   models) each element goes through the steps in one loop, its value in a register (dare_ties
   1.12-1.46x a loop per step on a 2-vCPU VM, benchmarks/kernel_ab.py). Built once at install (setup.py), called through ctypes, which
   releases the GIL: the compute threads run it in parallel.

   Bits: every step is the same IEEE float32 operation, in the same order, as kernels.merge_chunk.
   Compiled with -ffp-contract=off (no fused multiply-add) and never -ffast-math (no reassociation,
   NaN and -0 kept); -fno-trapping-math only lets the vectorizer compute both sides of a select
   (no exception flag is read). The tests check both kernels give identical bytes. Inputs are read
   in place from the mapped files.

   DELLA ranks |τ| within rows: its steps hold whole rows, each row's ranks come from counting its
   keys (τ of bf16 weights) or a stable radix sort of |τ|'s bits (ties lower index first, as the
   numpy kernel's and torch's sorts). */

#include "ckernel.h"

enum { COPY, SUM, TIES, AVERAGE };        /* what the kernel does with a chunk */
enum { MERGE_SUM, MERGE_MEAN, MERGE_MAX }; /* TIES' merge_func */

typedef struct { /* one fine-tune: its input and sparsification (ckernel.py's _Model) */
    Source src;
    float weight;
    int32_t given;        /* src holds τ itself (a LoRA's rows), not θ */
    uint64_t keep_below;  /* DARE: keep where hash < keep_below (0 .. 2^32) */
    uint32_t key0, key1;  /* DARE: the mask key's low and high halves */
    float scale, density; /* DARE's rescale: times scale, or / density when divide */
    int32_t divide, trimmed, outlier;
    float trim_value, out_value;
    int64_t trim_tie, out_tie; /* last flat index kept (trim) or dropped (outlier) at the value */
    const uint32_t *della_last; /* DELLA: per rank, the largest hash kept, floor(p·2³²) − 1; NULL: no MagPrune */
    const float *della_p;       /* DELLA: per rank, p in float32; NULL: kept elements not divided */
} Model;

typedef struct { /* one merge, hist or tie call (ckernel.py's _Merge) */
    Source base, out;
    const Model *models;
    int64_t n, start; /* models; the flat index of element 0 */
    int32_t mode, dare, band, weighted_sign, sign_count, zero_majority, merge_func, mean_count, normalize, positive;
    float lam, norm, majority;
    int64_t della_row; /* DELLA: elements per ranked row (<= 65536), or 0 */
} Merge;

typedef struct { /* DELLA's per-row scratch: (|τ| bits, index) pairs and a second array to sort into; per element, its rank's last and p */
    uint64_t *pairs, *spare;
    uint32_t *last;
    float *p;
    uint32_t *who; /* counted_ranks: the element at a rank of its low-bit runs, | LOW; 0 elsewhere between rows */
} Ranks;

INLINE uint32_t fmix32(uint32_t x) { /* MurmurHash3's finalizer (mask.py) */
    x ^= x >> 16;
    x *= 0x85EBCA6Bu;
    x ^= x >> 13;
    x *= 0xC2B2AE35u;
    return x ^ (x >> 16);
}

/* hash32 of flat index (hi0·2³² + lo0) + j: its two 32-bit halves, the high one + 1 past a wrap (mask.py) */
INLINE uint32_t hash_at(uint32_t key0, uint32_t key1, uint32_t lo0, uint32_t hi0, int j) {
    uint32_t lo = lo0 + (uint32_t)j, hi = hi0 + (lo < lo0);
    return fmix32(fmix32(lo ^ key0) ^ hi ^ key1);
}

INLINE float sign(float x) { /* np.sign: NaN stays NaN, ±0 -> +0 */
    return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : (x == 0.0f ? 0.0f : x));
}

/* keeps |d| > value and the ties at it up to flat index last_tie (kernels._trim_chunk); drop removes them instead */
INLINE void trim(float *restrict d, int m, int64_t idx0, float value, int64_t last_tie, int drop) {
    /* idx0 + j <= last_tie as j <= ties, in 32-bit lanes */
    int ties = last_tie - idx0 < 0 ? -1 : (last_tie - idx0 >= m ? m : (int)(last_tie - idx0));
    float kept = drop ? 0.0f : 1.0f, dropped = drop ? 1.0f : 0.0f;
    for (int j = 0; j < m; j++) {
        float a = fabsf(d[j]);
        d[j] = d[j] * (a > value || (a == value && j <= ties) ? kept : dropped); /* a product, not a select: NaN stays NaN */
    }
}

/* x[j] times 1 where the hash of flat index at + j is <= last[j], else times 0 (DELLA's mask) */
INLINE void keep_upto(float *restrict x, const uint32_t *restrict last, int m, uint32_t key0, uint32_t key1, int64_t at) {
    uint32_t lo0 = (uint32_t)at, hi0 = (uint32_t)((uint64_t)at >> 32);
    for (int j = 0; j < m; j++) /* times 1.0f or +0.0f, its bits masked: a select here stays a branch, unvectorized */
        x[j] = x[j] * from_bits(0x3F800000u & -(uint32_t)(hash_at(key0, key1, lo0, hi0, j) <= last[j]));
}

/* One stable counting-sort pass of a row's (|τ| bits, index) pairs on their 8-bit digit k (of the
   bits), given its counts: into dst, or (dst NULL: the last pass) each element's rank's last hash
   kept and p into rk. The front half is placed forward from each digit's first slot and the back
   half backward from its last: two independent chains of counter updates, where one would wait on
   itself at a digit most elements share (an exponent's). */
INLINE void radix_pass(const uint64_t *restrict src, uint64_t *restrict dst, int cols, int k, const uint32_t *count,
                       const Model *md, Ranks *rk) {
    uint32_t first[256], end[256], sum = 0;
    for (int v = 0; v < 256; v++) {
        first[v] = sum;
        sum += count[v];
        end[v] = sum;
    }
    const uint8_t *digit = (const uint8_t *)src + 4 + k; /* pair j's digit at digit[8 j] (little-endian) */
    const uint32_t *last_k = md->della_last;
    const float *p_k = md->della_p;
    uint32_t *restrict last = rk->last;
    float *restrict prob = rk->p;
    for (int i = 0, j = cols - 1; i <= j; i++, j--) {
        uint64_t x = src[i], y = src[j];
        uint32_t a = first[digit[8 * i]]++, b = i < j ? --end[digit[8 * j]] : a; /* the middle one once */
        if (dst) {
            dst[a] = x, dst[b] = y;
        } else { /* a and b are ranks */
            last[(uint32_t)x] = last_k[a], last[(uint32_t)y] = last_k[b];
            if (p_k) prob[(uint32_t)x] = p_k[a], prob[(uint32_t)y] = p_k[b];
        }
    }
}

/* A row's ranks by an LSD radix sort of its (|τ| bits, index) pairs, 8 bits a pass, which is stable,
   so ties keep index order; only the digits that differ within the row are sorted on, and the last
   pass writes each element's threshold and p instead of the pair. */
INLINE void radix_ranks(const float *restrict row, int cols, const Model *md, Ranks *rk) {
    uint64_t *pairs = rk->pairs, *spare = rk->spare;
    uint32_t v0 = to_bits(row[0]) & 0x7FFFFFFFu, differ = 0;
    uint32_t count[2][4][256] = {{{0}}}; /* every digit's counts, even and odd elements apart: a digit most share would chain one counter's updates */
    for (int j = 0; j < cols; j++) {
        uint32_t v = to_bits(row[j]) & 0x7FFFFFFFu; /* |τ|: non-negative floats order as their bits, NaN last */
        pairs[j] = (uint64_t)v << 32 | (uint32_t)j;
        differ |= v ^ v0;
        uint32_t(*at)[256] = count[j & 1];
        at[0][v & 255]++, at[1][v >> 8 & 255]++, at[2][v >> 16 & 255]++, at[3][v >> 24]++;
    }
    int digits[4], passes = 0;
    for (int k = 0; k < 4; k++)
        if (differ >> 8 * k & 255) digits[passes++] = k;
    if (passes == 0) { /* every |τ| equal: ranks in index order */
        memcpy(rk->last, md->della_last, cols * sizeof(uint32_t));
        if (md->della_p) memcpy(rk->p, md->della_p, cols * sizeof(float));
    }
    for (int q = 0; q < passes; q++) {
        int k = digits[q];
        for (int v = 0; v < 256; v++) count[0][k][v] += count[1][k][v];
        radix_pass(pairs, q < passes - 1 ? spare : NULL, cols, k, count[0][k], md, rk);
        uint64_t *t = pairs;
        pairs = spare, spare = t;
    }
}

#define LOW 0x80000000u /* counted_ranks: who[a] holds an element with low bits */
#define KEY_SPAN 4096 /* a row's nonzero |τ| whose top 16 bits span fewer values: ranked by counting */

/* counted_ranks' slot of |τ| bits v: 0 for the zeros, key t (the top 16 bits) at t - first + 1 */
INLINE uint32_t key_slot(uint32_t v, uint32_t first) { return ((v >> 16) - first + 1) & -(uint32_t)(v != 0); }

/* element j has rank a: its last hash kept and p (from the model's tables per rank) */
INLINE void give_rank(uint32_t *restrict kept, float *restrict prob, const uint32_t *restrict last_k,
                      const float *restrict p_k, uint32_t j, uint32_t a) {
    kept[j] = last_k[a];
    if (p_k) prob[j] = p_k[a];
}

/* x[i] = the sum of x[0, i), four at a time: a chain of one add per four, where a running sum would
   wait on each (a row's keys may span more slots than it has elements) */
INLINE void exclusive_sums(uint32_t *restrict x, uint32_t n) {
    uint32_t sum = 0, i = 0;
    for (; i + 4 <= n; i += 4) {
        uint32_t c0 = x[i], c1 = x[i + 1], c2 = x[i + 2], c3 = x[i + 3], s01 = c0 + c1;
        x[i] = sum, x[i + 1] = sum + c0, x[i + 2] = sum + s01, x[i + 3] = sum + s01 + c2;
        sum += s01 + c2 + c3;
    }
    for (; i < n; i++) {
        uint32_t c = x[i];
        x[i] = sum;
        sum += c;
    }
}

/* A row's ranks by counting the top 16 bits of |τ| (exact zeros first), where its nonzero values'
   top bits span fewer than KEY_SPAN values (τ of bf16 weights: some hundreds to a few thousand).
   One pass counts the keys; one gives each element whose low 16 bits are zero, in index order
   (stable), its key's next rank and that rank's last hash kept and p. The others (a few per row: τ
   across exponents) follow, in index order, each after its key's zero-low elements, inserted among
   the key's others by their whole |τ|. The same ranks as radix_ranks; 0 where it does not apply or
   the low bits are too many (float32 τ). */
INLINE int counted_ranks(const float *restrict row, int cols, const Model *md, Ranks *rk, uint32_t *restrict at) {
    uint32_t first = 0xFFFFu, last = 0;
    for (int j = 0; j < cols; j++) { /* selects, not branches: it vectorizes */
        uint32_t v = to_bits(row[j]) & 0x7FFFFFFFu, t = v >> 16, key = v ? t : 0xFFFFu;
        first = key < first ? key : first;
        last = t > last ? t : last;
    }
    if (first <= last && last - first >= KEY_SPAN - 1) return 0;
    uint32_t slots = first <= last ? last - first + 2 : 1;
    memset(at, 0, slots * sizeof(uint32_t));
    uint32_t *restrict lows = (uint32_t *)rk->spare, *restrict who = rk->who; /* spare: room for lows and pos */
    int nlow = 0;
    for (int j = 0; j < cols; j++) {
        uint32_t v = to_bits(row[j]) & 0x7FFFFFFFu;
        at[key_slot(v, first)]++;
        lows[nlow] = (uint32_t)j; /* kept where v has low bits */
        nlow += (v & 0xFFFFu) != 0;
    }
    if (nlow > cols / 8) return 0;
    exclusive_sums(at, slots); /* at[s]: slot s's first rank */
    const uint32_t *restrict last_k = md->della_last;
    const float *restrict p_k = md->della_p;
    uint32_t *restrict kept = rk->last;
    float *restrict prob = rk->p;
    for (int j = 0; j < cols; j++) { /* an element with low bits takes a rank for now, not its key's slot */
        uint32_t v = to_bits(row[j]) & 0x7FFFFFFFu, *slot = at + key_slot(v, first), a = *slot;
        *slot = a + ((v & 0xFFFFu) == 0);
        give_rank(kept, prob, last_k, p_k, (uint32_t)j, a);
    }
    /* at[s]: past slot s's zero-low elements. The others there, in index order, then each inserted
       among its key's others (in who[], marked LOW) by |τ| */
    uint32_t *restrict pos = lows + cols;
    for (int i = 0; i < nlow; i++) {
        uint32_t j = lows[i];
        pos[i] = at[key_slot(to_bits(row[j]) & 0x7FFFFFFFu, first)]++;
        who[pos[i]] = j | LOW;
    }
    int64_t moves = 0;
    for (int i = 0; i < nlow && moves <= cols; i++) {
        uint32_t j = lows[i], v = to_bits(row[j]) & 0x7FFFFFFFu, a = pos[i];
        for (; a > 0 && who[a - 1] & LOW && (to_bits(row[who[a - 1] & ~LOW]) & 0x7FFFFFFFu) > v; a--) {
            who[a] = who[a - 1];
            give_rank(kept, prob, last_k, p_k, who[a] & ~LOW, a);
        }
        moves += pos[i] - a;
        who[a] = j | LOW;
        give_rank(kept, prob, last_k, p_k, j, a);
    }
    for (int i = 0; i < nlow; i++) who[pos[i]] = 0; /* the next row's runs start unmarked */
    return moves <= cols; /* else long runs of low bits: radix_ranks */
}

/* DELLA's MagPrune of the whole rows in d[0, m) (kernels._magprune_chunk): an element's rank k by |τ|
   in its row gives its mask threshold and p; kept where its hash < the threshold, then ÷ p. */
INLINE void magprune(const Merge *p, const Model *md, int64_t idx0, int m, float *restrict d, Ranks *rk) {
    int cols = (int)p->della_row;
    uint32_t at[KEY_SPAN + 1];
    for (int r = 0; r < m; r += cols) {
        float *row = d + r;
        if (!counted_ranks(row, cols, md, rk, at))
            radix_ranks(row, cols, md, rk);
        keep_upto(row, rk->last, cols, md->key0, md->key1, idx0 + r);
        if (md->della_p)
            for (int j = 0; j < cols; j++) row[j] = row[j] / rk->p[j];
    }
}

/* delta's steps up to the trim in one pass over the chunk, each element through them in a register:
   θ read as bf16 from s, else from d (loaded there); less θ₀ unless given (τ itself); DARE's mask and
   its kept τ divided by the density or times its scale (x·1 is x); the trim. bf16, dare, divided and
   trimmed are constants at each call, so each combination is a loop of its own. */
INLINE void delta_steps(const Model *md, const uint16_t *restrict s, int m, int64_t idx0, const float *restrict b,
                        float *d, const int bf16, const int dare, const int divided, const int trimmed) {
    uint32_t last = (uint32_t)(md->keep_below - 1), lo0 = (uint32_t)idx0, hi0 = (uint32_t)((uint64_t)idx0 >> 32);
    uint32_t key0 = md->key0, key1 = md->key1;
    float on = md->keep_below == 0 ? 0.0f : 1.0f, density = md->density, scale = md->scale, value = md->trim_value;
    int given = md->given;
    int64_t tie = md->trim_tie - idx0;
    int ties = tie < 0 ? -1 : (tie >= m ? m : (int)tie);
    for (int j = 0; j < m; j++) {
        float x = bf16 ? from_bits((uint32_t)s[j] << 16) : d[j];
        x = given ? x : x - b[j];
        if (dare) { /* keep where hash < keep_below, i.e. hash <= last (uint32 lanes), none when keep_below is 0 */
            x = x * (hash_at(key0, key1, lo0, hi0, j) <= last ? on : 0.0f);
            x = divided ? x / density : x * scale;
        }
        if (trimmed) {
            float a = fabsf(x);
            x = x * (a > value || (a == value && j <= ties) ? 1.0f : 0.0f);
        }
        d[j] = x;
    }
}

INLINE void delta_in_one_pass(const Merge *p, const Model *md, const uint16_t *s, int m, int64_t idx0,
                              const float *restrict b, float *d, const int bf16, int trimmed) {
    if (!p->dare)
        trimmed ? delta_steps(md, s, m, idx0, b, d, bf16, 0, 0, 1) : delta_steps(md, s, m, idx0, b, d, bf16, 0, 0, 0);
    else if (md->divide)
        trimmed ? delta_steps(md, s, m, idx0, b, d, bf16, 1, 1, 1) : delta_steps(md, s, m, idx0, b, d, bf16, 1, 1, 0);
    else
        trimmed ? delta_steps(md, s, m, idx0, b, d, bf16, 1, 0, 1) : delta_steps(md, s, m, idx0, b, d, bf16, 1, 0, 0);
}

/* model md's τ (DARE or DELLA's MagPrune, then the trims) into d for elements [c, c+m), θ₀ already in
   b (kernels.deltas_chunk); MagPrune needs rk and whole rows, only merge_range passes them */
INLINE void delta(const Merge *p, const Model *md, int64_t c, int m, const float *restrict b, float *restrict d, Ranks *rk) {
    int64_t idx0 = p->start + c;
    int ranked = md->della_last && rk; /* MagPrune ranks whole rows, between the mask and the trims */
    if (md->src.kind == BF16) {
        delta_in_one_pass(p, md, (const uint16_t *)md->src.data + c, m, idx0, b, d, 1, md->trimmed && !ranked);
    } else {
        load(&md->src, c, m, d);
        delta_in_one_pass(p, md, NULL, m, idx0, b, d, 0, md->trimmed && !ranked);
    }
    if (ranked) {
        magprune(p, md, idx0, m, d, rk);
        if (md->trimmed) trim(d, m, idx0, md->trim_value, md->trim_tie, 0);
    }
    if (md->outlier) trim(d, m, idx0, md->out_value, md->out_tie, 1);
    if (p->band && (md->trimmed || md->outlier) && md->scale != 1.0f)
        for (int j = 0; j < m; j++) d[j] = d[j] * md->scale;
}

/* merge_into's TIES steps as mergekit takes them (the sign elected on the weighted τ's sum, a zero
   score positive; the agreeing weighted τ's summed, divided by their weights' sum when mean) for n
   models (n and mean constants at each call): one element at a time through all of them. The
   general loops' options as selects in one such loop kept GCC from vectorizing it (8x slower). */
INLINE void ties_weighted(const Merge *p, const float *restrict d, int step, int m, float *restrict acc, const int n,
                          const int mean) {
    float w[3] = {0};
    for (int i = 0; i < n; i++) w[i] = p->models[i].weight;
    for (int j = 0; j < m; j++) {
        float score = 0.0f, sum = 0.0f, div = 0.0f;
        for (int i = 0; i < n; i++) score = score + d[i * step + j] * w[i];
        float side = score >= 0.0f ? 1.0f : -1.0f;
        for (int i = 0; i < n; i++) {
            float wd = d[i * step + j] * w[i], agree = wd * side > 0.0f ? 1.0f : 0.0f;
            sum = sum + wd * agree;
            if (mean) div = div + agree * w[i];
        }
        acc[j] = mean ? sum / (div == 0.0f ? 1.0f : div) : sum;
    }
}

/* merges elements [lo, hi) of the flat inputs into out, element c at out's c - out0 (kernels.merge_chunk's
   steps, per element); 0, or -1 out of memory */
INLINE int merge_into(const Merge *p, int64_t lo, int64_t hi, const Source *out, int64_t out0) {
    int64_t n = p->n, cols = p->della_row;
    /* DELLA: a step holds whole rows, as many as fit in CHUNK, or one longer row; lo and hi fall on rows */
    int step = cols == 0 ? CHUNK : cols <= CHUNK ? CHUNK / (int)cols * (int)cols : (int)cols;
    float *buf = malloc((6 + n) * step * sizeof(float));
    Ranks rk = {0};
    if (cols) {
        rk.pairs = calloc(cols, 2 * sizeof(uint64_t) + 2 * sizeof(uint32_t) + sizeof(float));
        if (rk.pairs)
            rk.spare = rk.pairs + cols, rk.last = (uint32_t *)(rk.spare + cols), rk.p = (float *)(rk.last + cols),
            rk.who = (uint32_t *)(rk.p + cols);
    }
    if (!buf || (cols && !rk.pairs)) {
        free(buf);
        free(rk.pairs);
        return -1;
    }
    float *b = buf, *acc = b + step, *score = acc + step, *gamma = score + step, *side = gamma + step,
          *div = side + step, *d = div + step; /* d: model i's τ at d + i*step */
    for (int64_t c = lo; c < hi; c += step) {
        int m = hi - c < step ? (int)(hi - c) : step;
        if (p->mode == COPY) {
            load(&p->base, c, m, b);
            store(b, out, c - out0, m);
            continue;
        }
        if (p->mode == AVERAGE) { /* θ_i themselves, no base */
            for (int64_t i = 0; i < n; i++) load(&p->models[i].src, c, m, d + i * step);
        } else {
            load(&p->base, c, m, b);
            for (int64_t i = 0; i < n; i++) delta(p, &p->models[i], c, m, b, d + i * step, &rk);
        }
        if (p->mode == TIES && p->weighted_sign && !p->sign_count && !p->zero_majority && p->merge_func != MERGE_MAX &&
            (p->merge_func == MERGE_SUM || !p->mean_count) && n >= 2 && n <= 3) { /* mergekit's: in registers */
            int mean = p->merge_func == MERGE_MEAN;
            if (n == 2) mean ? ties_weighted(p, d, step, m, acc, 2, 1) : ties_weighted(p, d, step, m, acc, 2, 0);
            else mean ? ties_weighted(p, d, step, m, acc, 3, 1) : ties_weighted(p, d, step, m, acc, 3, 0);
        } else if (p->mode == TIES) {
            for (int j = 0; j < m; j++) score[j] = 0.0f;
            for (int64_t i = 0; i < n; i++) { /* the sign election */
                const float *di = d + i * step;
                float wi = p->models[i].weight;
                for (int j = 0; j < m; j++) {
                    float v = p->weighted_sign ? di[j] * wi : di[j];
                    score[j] = score[j] + (p->sign_count ? sign(v) : v);
                }
            }
            if (p->zero_majority) { /* the elected sign; a zero score takes the majority sign */
                for (int j = 0; j < m; j++) {
                    float g = sign(score[j]);
                    g = g == 0.0f ? p->majority : g;
                    gamma[j] = g;
                    side[j] = g > 0.0f ? 1.0f : -1.0f;
                }
            } else {
                for (int j = 0; j < m; j++) gamma[j] = side[j] = score[j] >= 0.0f ? 1.0f : -1.0f;
            }
            for (int j = 0; j < m; j++) acc[j] = div[j] = 0.0f;
            for (int64_t i = 0; i < n; i++) { /* the agreeing τ's, summed or their largest |τ| */
                const float *di = d + i * step;
                float wi = p->models[i].weight;
                for (int j = 0; j < m; j++) {
                    float w = di[j] * wi;
                    float agree = (p->weighted_sign ? w : di[j]) * side[j] > 0.0f ? 1.0f : 0.0f;
                    if (p->merge_func == MERGE_MAX) {
                        float x = fabsf(di[j]) * agree;
                        /* np.maximum: the first when it is >= or NaN, else the second */
                        acc[j] = i == 0 || !(acc[j] >= x || acc[j] != acc[j]) ? x : acc[j];
                    } else {
                        acc[j] = acc[j] + w * agree;
                        if (p->merge_func == MERGE_MEAN) /* only the mean divides */
                            div[j] = div[j] + (p->mean_count ? agree : agree * wi);
                    }
                }
            }
            for (int j = 0; j < m; j++) {
                if (p->merge_func == MERGE_MAX)
                    acc[j] = acc[j] * gamma[j];
                else if (p->merge_func == MERGE_MEAN)
                    acc[j] = acc[j] / (div[j] == 0.0f ? 1.0f : div[j]);
            }
        } else { /* SUM, AVERAGE: the weighted sum */
            for (int j = 0; j < m; j++) acc[j] = 0.0f;
            for (int64_t i = 0; i < n; i++) {
                const float *di = d + i * step;
                float wi = p->models[i].weight;
                for (int j = 0; j < m; j++) acc[j] = acc[j] + di[j] * wi;
            }
            if (p->normalize)
                for (int j = 0; j < m; j++) acc[j] = acc[j] / p->norm;
        }
        for (int j = 0; j < m; j++) {
            float x = p->lam != 1.0f ? acc[j] * p->lam : acc[j];
            x = p->mode == AVERAGE ? x : b[j] + x;
            acc[j] = p->positive ? x + 0.0f : x; /* −0 + 0 = +0 */
        }
        store(acc, out, c - out0, m);
    }
    free(buf);
    free(rk.pairs);
    return 0;
}

/* merges elements [lo, hi) of the flat inputs into p->out; 0, or -1 out of memory */
MULTIVERSION int merge_range(const Merge *p, int64_t lo, int64_t hi) { return merge_into(p, lo, hi, &p->out, 0); }

/* Adds to hists[i] (`bins` counts each) the histogram of |τ_i|'s top 16 bits, split by whether the
   low 16 bits are zero (high[i] < 0, 2 * 65536 bins: 2·top + (low != 0)), or of the low 16 bits of
   the elements whose top bits are high[i] (65536 bins), over elements [lo, hi), for the models
   wanted (kernels.radix_hist). hi - lo <= 2^31: the uint32 counts do not overflow. 0, or -1 out of memory */
MULTIVERSION int hist_range(const Merge *p, int64_t lo, int64_t hi, const int64_t *high, const uint8_t *wanted,
                            int64_t bins, int64_t *hists) {
    int64_t n = p->n;
    float *buf = malloc((1 + n) * CHUNK * sizeof(float) + CHUNK * sizeof(uint32_t));
    /* four interleaved counters per bin: |τ| clusters in few bins, and one counter per bin would
       make every increment wait for the previous one; bin `bins` takes the elements outside `high` */
    int64_t stride = bins + 1;
    uint32_t *counts = calloc(n * 4 * stride, sizeof(uint32_t));
    if (!buf || !counts) {
        free(buf);
        free(counts);
        return -1;
    }
    float *b = buf, *d = buf + CHUNK;
    uint32_t *slot = (uint32_t *)(d + n * CHUNK); /* each element's counter, found in a loop that vectorizes */
    for (int64_t c = lo; c < hi; c += CHUNK) {
        int m = hi - c < CHUNK ? (int)(hi - c) : CHUNK;
        load(&p->base, c, m, b);
        for (int64_t i = 0; i < n; i++) {
            if (!wanted[i]) continue;
            float *di = d + i * CHUNK;
            uint32_t *h = counts + i * 4 * stride;
            delta(p, &p->models[i], c, m, b, di, NULL);
            if (high[i] < 0) {
                for (int j = 0; j < m; j++) {
                    uint32_t v = to_bits(di[j]) & 0x7FFFFFFFu; /* |τ| */
                    slot[j] = (j & 3) * (uint32_t)stride + (((v >> 15) & ~1u) | ((v & 0xFFFFu) != 0));
                }
            } else {
                uint32_t top = (uint32_t)high[i];
                for (int j = 0; j < m; j++) {
                    uint32_t v = to_bits(di[j]) & 0x7FFFFFFFu; /* |τ| */
                    slot[j] = (j & 3) * (uint32_t)stride + ((v >> 16) == top ? (v & 0xFFFFu) : (uint32_t)bins);
                }
            }
#pragma GCC unroll 4 /* measured: ~15% faster counting */
            for (int j = 0; j < m; j++) h[slot[j]]++;
        }
    }
    for (int64_t i = 0; i < n; i++)
        for (int64_t k = 0; k < 4 && wanted[i]; k++)
            for (int64_t v = 0; v < bins; v++) hists[i * bins + v] += counts[(i * 4 + k) * stride + v];
    free(buf);
    free(counts);
    return 0;
}

/* Scans model i's τ over [lo, hi) in flat order for the `needed`-th element with |τ| == value:
   its flat index, or -1, and in *seen how many such elements it saw (kernels.find_tie); -2 out of memory */
MULTIVERSION int64_t tie_range(const Merge *p, int64_t i, int64_t lo, int64_t hi, float value, int64_t needed, int64_t *seen) {
    float *b = malloc(2 * CHUNK * sizeof(float));
    if (!b) return -2;
    float *d = b + CHUNK;
    int64_t pos = -1, count = 0;
    for (int64_t c = lo; c < hi && pos < 0; c += CHUNK) {
        int m = hi - c < CHUNK ? (int)(hi - c) : CHUNK;
        load(&p->base, c, m, b);
        delta(p, &p->models[i], c, m, b, d, NULL);
        int ties = 0; /* counted in a loop that vectorizes; located only in the chunk that holds the needed one */
        for (int j = 0; j < m; j++) ties += fabsf(d[j]) == value;
        if (count + ties < needed) {
            count += ties;
            continue;
        }
        for (int j = 0; j < m && pos < 0; j++)
            if (fabsf(d[j]) == value && ++count == needed) pos = p->start + c + j;
    }
    free(b);
    *seen = count;
    return pos;
}

/* ---- bracket selection (ops.BracketSelect): the exact k-th largest |τ| of a block in usually one pass ---- */

typedef struct { /* one model's bracket of |τ| bit patterns (ckernel.py's _Bracket) */
    uint32_t lo, hi;     /* the patterns inside: lo <= v <= hi */
    uint32_t hot[2];     /* values counted apart, per sub-block (0xFFFFFFFF: none; |τ|'s bits never are) */
    int32_t shift, wanted, keep; /* keep: the values inside are kept (bracket_range) */
} Bracket;

/* |τ_i|'s bits at `count` runs of `m` (<= CHUNK) elements, run t from element at[t] and cut at the
   block's `size`, into out[(i·count + t)·m + j], for the models wanted: the sample that places each
   bracket, or a small block's every |τ|. 0, or -1 out of memory */
MULTIVERSION int tau_bits(const Merge *p, const int64_t *at, int64_t count, int m, int64_t size, const Bracket *br, uint32_t *out) {
    float *b = malloc(2 * CHUNK * sizeof(float));
    if (!b) return -1;
    float *d = b + CHUNK;
    for (int64_t t = 0; t < count; t++) {
        int mt = size - at[t] < m ? (int)(size - at[t]) : m;
        load(&p->base, at[t], mt, b);
        for (int64_t i = 0; i < p->n; i++) {
            if (!br[i].wanted) continue;
            delta(p, &p->models[i], at[t], mt, b, d, NULL);
            uint32_t *o = out + (i * count + t) * m;
            for (int j = 0; j < mt; j++) o[j] = to_bits(d[j]) & 0x7FFFFFFFu;
        }
    }
    free(b);
    return 0;
}

/* Over elements [lo, hi) of the block (lo a multiple of SUB, hi - lo < 2^31), per bracket q wanted
   (of model q mod n: a model may have several, e.g. breadcrumbs' two ranks): above[q] += how many
   |τ| lie above it; hists[q · bins + 2·key + (v's low `shift` bits != 0)] += the others inside it
   but its hot values, key = (v >> shift) − (lo >> shift); and hot[(2q + h)·subs + g] += how many
   equal hot value h in sub-block g (SUB elements from the block's element 0). A bracket that keeps
   its values (`keep`) also puts the first `cap` of those counted inside in kept[q·cap ...]
   (kept_count[q]: how many there were): a key of several patterns is then settled from them, not by
   another pass. Every element is
   compared in a loop that vectorizes, which flags those inside; only those are counted one by one,
   few when the bracket is narrow. 0, or -1 out of memory */
MULTIVERSION int bracket_range(const Merge *p, int64_t lo, int64_t hi, const Bracket *br, int64_t brackets, int64_t bins,
                               int64_t subs, int64_t *above, int64_t *hists, int64_t *hot, uint32_t *kept, int64_t cap,
                               int64_t *kept_count) {
    int64_t n = p->n;
    float *b = malloc(2 * CHUNK * sizeof(float));
    uint32_t *counts = calloc(brackets * bins, sizeof(uint32_t));
    if (!b || !counts) {
        free(b);
        free(counts);
        return -1;
    }
    float *d = b + CHUNK;
    for (int64_t c = lo; c < hi; c += CHUNK) {
        int m = hi - c < CHUNK ? (int)(hi - c) : CHUNK;
        load(&p->base, c, m, b);
        for (int64_t i = 0; i < n; i++) {
            int wanted = 0;
            for (int64_t q = i; q < brackets; q += n) wanted |= br[q].wanted;
            if (!wanted) continue;
            delta(p, &p->models[i], c, m, b, d, NULL);
            for (int64_t q = i; q < brackets; q += n) { /* each of model i's brackets */
                const Bracket *k = &br[q];
                if (!k->wanted) continue;
                uint32_t low = k->lo, high = k->hi, width = high - low, h0 = k->hot[0], h1 = k->hot[1];
                uint32_t base_key = low >> k->shift, low_bits = (1u << k->shift) - 1u, over = 0, hot0 = 0, hot1 = 0;
                uint8_t inside[CHUNK + 8];
                for (int j = 0; j < m; j++) { /* vectorizes: sums in vector lanes, flags as bytes */
                    uint32_t v = to_bits(d[j]) & 0x7FFFFFFFu;
                    over += v > high;
                    hot0 += v == h0, hot1 += v == h1;
                    inside[j] = (v - low <= width) & (v != h0) & (v != h1);
                }
                memset(inside + m, 0, 8);
                above[q] += over;
                hot[(2 * q) * subs + c / SUB] += hot0;
                hot[(2 * q + 1) * subs + c / SUB] += hot1;
                uint32_t *h = counts + q * bins, *keep = kept + q * cap;
                int64_t held = kept_count[q];
                for (int g = 0; g < m; g += 8) { /* eight flags a word: only the elements inside are visited */
                    uint64_t w;
                    memcpy(&w, inside + g, 8);
                    for (; w; w &= w - 1) {
                        uint32_t v = to_bits(d[g + (__builtin_ctzll(w) >> 3)]) & 0x7FFFFFFFu;
                        h[2 * ((v >> k->shift) - base_key) + ((v & low_bits) != 0)]++;
                        if (held < cap) keep[held] = v;
                        held += k->keep;
                    }
                }
                kept_count[q] = held;
            }
        }
    }
    for (int64_t v = 0; v < brackets * bins; v++) hists[v] += counts[v];
    free(b);
    free(counts);
    return 0;
}

/* quant.quantize_rows: `rows` rows of x (bf16 or float32 storage, flat) as float8_e4m3fn bytes into
   dst and their per-128x128-block scales into scales (⌈rows/128⌉ × cols/128). dst may be x's own
   buffer: an element's byte is written after its own value and every earlier one are read, and a
   slab's bytes land on slabs already done. Every loop is branch-free, so it vectorizes. 0, or -1 out of memory */
MULTIVERSION int quantize_range(const Source *x, int64_t rows, int64_t cols, uint8_t *dst, float *scales) {
    int64_t blocks = cols / 128;
    float *y = malloc((cols + blocks) * sizeof(float));
    if (!y) return -1;
    uint32_t *amax = (uint32_t *)(y + cols); /* |x|'s bits: non-negative floats order as their bits, NaN above all (torch's amax: NaN wins) */
    for (int64_t r = 0; r < rows; r += 128) {
        int64_t h = rows - r < 128 ? rows - r : 128;
        for (int64_t k = 0; k < blocks; k++) amax[k] = 0;
        for (int64_t i = 0; i < h; i++) {
            load(x, (r + i) * cols, cols, y);
            for (int64_t k = 0; k < blocks; k++) {
                uint32_t a = amax[k];
                for (int j = 0; j < 128; j++) {
                    uint32_t v = to_bits(y[k * 128 + j]) & 0x7FFFFFFFu;
                    a = v > a ? v : a;
                }
                amax[k] = a;
            }
        }
        float *s = scales + r / 128 * blocks;
        for (int64_t k = 0; k < blocks; k++) {
            float a = from_bits(amax[k]);
            s[k] = a > 0.0f ? a / 448.0f : 1.0f; /* an all-zero (or NaN) block keeps 1 */
        }
        for (int64_t i = 0; i < h; i++) {
            int64_t c = (r + i) * cols;
            load(x, c, cols, y);
            for (int64_t k = 0; k < blocks; k++) {
                float sk = s[k];
                uint8_t *out = dst + c + k * 128;
                const float *yk = y + k * 128;
                for (int j = 0; j < 128; j++) { /* float32 -> e4m3fn, to nearest even (c10's fp8e4m3fn_from_fp32_value) */
                    float v = yk[j] / sk;
                    v = v > 448.0f ? 448.0f : (v < -448.0f ? -448.0f : v); /* NaN stays NaN */
                    uint32_t b = to_bits(v), a = b & 0x7FFFFFFFu;
                    /* below 2^-6 a subnormal step is 2^-9; else the mantissa rounds to 3 bits, the exponent rebiased from 127 to 7 */
                    float tiny = a < 0x3C800000u ? fabsf(v) * 512.0f : 0.0f;
                    uint32_t sub = (uint32_t)(int32_t)rintf(tiny), normal = ((a + 0x7FFFFu + ((a >> 20) & 1u)) >> 20) - 960u;
                    uint32_t q = a > 0x7F800000u ? 0x7Fu : (a < 0x3C800000u ? sub : normal);
                    out[j] = (uint8_t)(q | ((b >> 24) & 0x80u));
                }
            }
        }
    }
    free(y);
    return 0;
}

/* FP8 output: rows [r0, r1) of a block (r0 a multiple of 128) merged and quantized 128-row slab by
   slab: each slab merged into scratch of p->out's kind (the block's dtype: bf16 or float32), which
   stays in cache for quantize_range, then written as FP8 into dst and its scales into scales (both
   for the whole block, from its row 0). The same bytes as merge_range over the block then
   quantize_range, without the block's round trip through memory. 0, or -1 out of memory */
MULTIVERSION int merge_quantize_range(const Merge *p, int64_t r0, int64_t r1, int64_t cols, uint8_t *dst, float *scales) {
    Source slab = {p->out.kind, malloc(128 * cols * (p->out.kind == BF16 ? 2 : 4))};
    if (!slab.data) return -1;
    int rc = 0;
    for (int64_t r = r0; r < r1 && rc == 0; r += 128) {
        int64_t h = r1 - r < 128 ? r1 - r : 128;
        rc = merge_into(p, r * cols, (r + h) * cols, &slab, r * cols);
        if (rc == 0) rc = quantize_range(&slab, h, cols, dst + r * cols, scales + r / 128 * (cols / 128));
    }
    free(slab.data);
    return rc;
}
