#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__has_include)
#if __has_include(<pthread.h>)
#include <pthread.h>
#define FEATLEARN_THREADS 1
#endif
#endif

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#define LANES 16

/* The smallest entry >= v of e[0..mp): LANES running minima, so that the compiler vectorizes
   the loop without reassociating anything. */
static float min_from(const float *e, int mp, float v) {
    float acc[LANES];
    for (int l = 0; l < LANES; l++) acc[l] = INFINITY;
    for (int j = 0; j < mp; j += LANES)
        for (int l = 0; l < LANES; l++) {
            float x = e[j + l] >= v ? e[j + l] : INFINITY;
            acc[l] = x < acc[l] ? x : acc[l];
        }
    float r = acc[0];
    for (int l = 1; l < LANES; l++) r = acc[l] < r ? acc[l] : r;
    return r;
}

/* The largest entry below v (or at most v, `closed`) of e[0..mp), as min_from. */
static float max_below(const float *e, int mp, float v, int closed) {
    float acc[LANES];
    for (int l = 0; l < LANES; l++) acc[l] = -INFINITY;
    for (int j = 0; j < mp; j += LANES)
        for (int l = 0; l < LANES; l++) {
            float x = (closed ? e[j + l] <= v : e[j + l] < v) ? e[j + l] : -INFINITY;
            acc[l] = x > acc[l] ? x : acc[l];
        }
    float r = acc[0];
    for (int l = 1; l < LANES; l++) r = acc[l] > r ? acc[l] : r;
    return r;
}

/* One selection: the rank-th smallest of a row's entries lies in the bracket [lo, hi] (or
   [lo, hi) once `open`), with `below` entries under lo and `upto` under the bracket's top. */
typedef struct { float lo, hi; int below, upto, open, interp, done; } Bracket;

/* The smallest and largest of the m entries of each of two rows: LANES running extrema, so
   that the loop vectorizes without reassociating anything. */
static void min_max(const float *x, const float *y, int m, float *mn, float *mx) {
    float n0[LANES], x0[LANES], n1[LANES], x1[LANES];
    for (int l = 0; l < LANES; l++) { n0[l] = x0[l] = x[0]; n1[l] = x1[l] = y[0]; }
    for (int j = 0; j + LANES <= m; j += LANES)
        for (int l = 0; l < LANES; l++) {
            float a = x[j + l], c = y[j + l];
            n0[l] = a < n0[l] ? a : n0[l];
            x0[l] = a > x0[l] ? a : x0[l];
            n1[l] = c < n1[l] ? c : n1[l];
            x1[l] = c > x1[l] ? c : x1[l];
        }
    for (int j = m - m % LANES; j < m; j++) {
        n0[0] = x[j] < n0[0] ? x[j] : n0[0];
        x0[0] = x[j] > x0[0] ? x[j] : x0[0];
        n1[0] = y[j] < n1[0] ? y[j] : n1[0];
        x1[0] = y[j] > x1[0] ? y[j] : x1[0];
    }
    for (int l = 1; l < LANES; l++) {
        n0[0] = n0[l] < n0[0] ? n0[l] : n0[0];
        x0[0] = x0[l] > x0[0] ? x0[l] : x0[0];
        n1[0] = n1[l] < n1[0] ? n1[l] : n1[0];
        x1[0] = x1[l] > x1[0] ? x1[l] : x1[0];
    }
    mn[0] = n0[0]; mx[0] = x0[0]; mn[1] = n1[0]; mx[1] = x1[0];
}

/* The first bracket: the window [w0, w1) when it holds the rank (ca < rank <= cb entries below
   its ends), else the part of [min, max] on the rank's side of it. The window narrows after a
   hit and widens after a miss. */
static void start_from(Bracket *b, int tried, int hit, float w0, float w1, int ca, int cb,
                       float mn, float mx, int m, int rank, float *width) {
    b->interp = 1; b->done = 0;
    if (hit) {
        b->lo = w0; b->hi = w1; b->below = ca; b->upto = cb; b->open = 1;
        *width *= 0.75f;
        return;
    }
    b->lo = mn; b->hi = mx; b->below = 0; b->upto = m; b->open = 0;
    if (tried && cb < rank) { b->lo = w1; b->below = cb; }
    else if (tried) { b->hi = w0; b->upto = ca; b->open = 1; }
    float wide = (mx - mn) * (1.0f / 16.0f);
    *width = 2.0f * *width > wide ? 2.0f * *width : wide;
}

/* The next point to count below, or sets `done` when the answer is known without one: it is
   the smallest entry in the bracket, or the largest (one pass either way), or no float lies
   strictly inside the bracket (the entries left equal lo, or hi when the bracket is closed).
   Points alternate between interpolation (where the rank would lie were the entries evenly
   spread) and halving, so the bracket at least halves every two steps. */
static float next_point(Bracket *b, int rank) {
    int left = b->upto - b->below, r = rank - b->below;
    float mid = b->lo + (b->hi - b->lo) * 0.5f;
    if (b->interp) {
        float guess = b->lo + (b->hi - b->lo) * (((float)r - 0.5f) / (float)left);
        if (guess > b->lo && guess < b->hi) mid = guess;
    }
    if (r == 1 || r == left || !(mid > b->lo && mid < b->hi)) b->done = 1;
    return mid;
}

static void update(Bracket *b, int rank, float mid, int c) {
    int left = b->upto - b->below;
    if (c < rank) { b->lo = mid; b->below = c; }
    else { b->hi = mid; b->upto = c; b->open = 1; }
    b->interp = !b->interp || 2 * (b->upto - b->below) <= left;
}

static float finish(const Bracket *b, const float *e, int mp, int rank) {
    int left = b->upto - b->below, r = rank - b->below;
    if (r == 1) return min_from(e, mp, b->lo);
    if (r == left) return max_below(e, mp, b->hi, !b->open);
    if (b->open) return b->lo;
    int c = 0;
    for (int j = 0; j < mp; j++) c += e[j] < b->hi;
    return c >= rank ? b->lo : b->hi;
}

/* S: n rows of m entries (bfloat16 or float32), `stride` elements apart; cc: the m centroid
   norms. out[2i], out[2i+1]: the thresholds of row i for y and -y, the rank-th smallest of
   cc - (s + s) and cc + (s + s) (the two selections run side by side, one counting loop for
   both). Returns 0, or -1 when out of memory. */
int featlearn_nearest_thresholds(const void *S, int64_t stride, int bf16, const float *cc,
                                 int64_t n, int m, int rank, float *out) {
    int mp = (m + LANES - 1) / LANES * LANES;
    float *buf = (float *)malloc(sizeof(float) * 2 * (size_t)mp);
    if (!buf) return -1;
    float *near = buf, *far = buf + mp;
    for (int j = m; j < mp; j++) near[j] = far[j] = INFINITY;  /* never below a point */
    float prev[2] = {0.0f, 0.0f}, width[2] = {0.0f, 0.0f};
    for (int64_t i = 0; i < n; i++) {
        if (bf16) {
            const uint16_t *row = (const uint16_t *)S + i * stride;
            for (int j = 0; j < m; j++) {
                float d = bf16_to_float(row[j]);
                float twice = d + d;
                near[j] = cc[j] - twice;
                far[j] = cc[j] + twice;
            }
        } else {
            const float *row = (const float *)S + i * stride;
            for (int j = 0; j < m; j++) {
                float twice = row[j] + row[j];
                near[j] = cc[j] - twice;
                far[j] = cc[j] + twice;
            }
        }
        /* A window around the previous row's answer (neighbouring patches rank alike): when
           it holds the rank, the bracket starts there and needs no min/max pass. */
        int ca0 = 0, cb0 = 0, ca1 = 0, cb1 = 0;
        float a0 = prev[0] - width[0], b0 = prev[0] + width[0];
        float a1 = prev[1] - width[1], b1 = prev[1] + width[1];
        if (i > 0)
            for (int j = 0; j < mp; j++) {
                ca0 += near[j] < a0; cb0 += near[j] < b0;
                ca1 += far[j] < a1; cb1 += far[j] < b1;
            }
        int hit0 = i > 0 && ca0 < rank && rank <= cb0, hit1 = i > 0 && ca1 < rank && rank <= cb1;
        float mn[2] = {0.0f, 0.0f}, mx[2] = {0.0f, 0.0f};
        if (!hit0 || !hit1) min_max(near, far, m, mn, mx);
        Bracket a, b;
        start_from(&a, i > 0, hit0, a0, b0, ca0, cb0, mn[0], mx[0], m, rank, &width[0]);
        start_from(&b, i > 0, hit1, a1, b1, ca1, cb1, mn[1], mx[1], m, rank, &width[1]);
        float pa = next_point(&a, rank), pb = next_point(&b, rank);
        while (!a.done || !b.done) {
            /* a finished selection counts below -inf (nothing) until the other one ends */
            float va = a.done ? -INFINITY : pa, vb = b.done ? -INFINITY : pb;
            int ca = 0, cb = 0;
            for (int j = 0; j < mp; j++) {
                ca += near[j] < va;
                cb += far[j] < vb;
            }
            if (!a.done) { update(&a, rank, pa, ca); pa = next_point(&a, rank); }
            if (!b.done) { update(&b, rank, pb, cb); pb = next_point(&b, rank); }
        }
        out[2 * i] = prev[0] = finish(&a, near, mp, rank);
        out[2 * i + 1] = prev[1] = finish(&b, far, mp, rank);
    }
    free(buf);
    return 0;
}

/* Each row's smallest entry and the first column holding it, as torch.min(D, 1) gives them
   for rows without NaN: D holds n rows of k float32 entries, `stride` elements apart. One pass
   with LANES running minima and their columns (GCC/clang vector types, so the compare and the
   two selects are vector instructions; the compiler does not turn the ?: of a float minimum
   with an index into them by itself), then the lanes are merged, the first column winning a
   tie. */
typedef float vfloat __attribute__((vector_size(LANES * 4)));
typedef int32_t vint __attribute__((vector_size(LANES * 4)));
typedef uint16_t vhalf __attribute__((vector_size(LANES * 2)));

void featlearn_row_argmin(const float *D, int64_t stride, int64_t n, int k, float *values,
                          int64_t *labels) {
    vint step, lane0;
    for (int l = 0; l < LANES; l++) { step[l] = LANES; lane0[l] = l; }
    for (int64_t i = 0; i < n; i++) {
        const float *row = D + i * stride;
        vfloat v;
        vint at = lane0, ix = lane0;
        for (int l = 0; l < LANES; l++) v[l] = INFINITY;
        int j = 0;
        for (; j + LANES <= k; j += LANES) {
            vfloat x;
            memcpy(&x, row + j, sizeof x);
            vint lt = x < v;
            v = (vfloat)(((vint)x & lt) | ((vint)v & ~lt));
            ix = (at & lt) | (ix & ~lt);
            at += step;
        }
        float best = INFINITY;
        int bi = 0;
        for (int l = 0; l < LANES; l++)
            if (v[l] < best || (v[l] == best && ix[l] < bi)) { best = v[l]; bi = ix[l]; }
        for (; j < k; j++)
            if (row[j] < best) { best = row[j]; bi = j; }
        values[i] = best;
        labels[i] = bi;
    }
}

/* The k-means assignment from bfloat16 products, made exact: S holds n rows of k bfloat16
   products x.c_j (`stride` elements apart), X the n float32 rows x (`xstride` apart, d each),
   C the k float32 centres (d each, contiguous), cc their squared norms and cn their norms.
   With a = cc - 2 S, |a_j - (cc_j - 2 x.c_j)| <= delta |x| |c_j| (the caller's rounding
   bound), so every centre that can be the nearest has a_j - e_j <= min(a + e), e_j = delta
   |x| |c_j|: those few candidates get their float32 value cc_j - 2 x.c_j, and the smallest
   (the first on a tie) is the row's label and value. */
static float dot(const float *x, const float *c, int d) {
    float acc[LANES] = {0.0f};
    int t = 0;
    for (; t + LANES <= d; t += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += x[t + l] * c[t + l];
    for (; t < d; t++) acc[0] += x[t] * c[t];
    float s = 0.0f;
    for (int l = 0; l < LANES; l++) s += acc[l];
    return s;
}

/* A vector of centres' bounds a - e into low, and a + e folded into the running minima up. */
static inline void keep_bounds(vfloat a, vfloat e, float *low, vfloat *up) {
    vfloat hi = a + e, lo = a - e;
    memcpy(low, &lo, sizeof lo);
    vint lt = hi < *up;
    *up = (vfloat)(((vint)hi & lt) | ((vint)*up & ~lt));
}

/* The same for one centre (a tail past the whole vectors); returns the new minimum. */
static inline float keep_bound(float a, float e, float *low, float upper) {
    float hi = a + e;
    *low = a - e;
    return hi < upper ? hi : upper;
}

/* The float32 nearest of the centres with low[j] <= upper (low padded with +inf to kp, a
   multiple of SCAN): cc_j - 2 x.c_j for each, the smallest, the first on a tie. */
enum { SCAN = 4 * LANES };  /* columns per candidate test */

/* Candidate j against the best so far (*bi < 0: none yet): its float32 value cc_j - 2 x.c_j,
   kept if smaller (candidates come in column order, so the first wins a tie). */
static inline void consider(int j, const float *x, const float *C, const float *cc, int d,
                            float *best, int *bi) {
    float p = dot(x, C + (int64_t)j * d, d);
    float v = cc[j] - (p + p);
    if (*bi < 0 || v < *best) { *best = v; *bi = j; }
}

static int settle(const float *low, int kp, float upper, const float *x, const float *C,
                  const float *cc, int d, float *value) {
    float best = INFINITY;
    int bi = -1;
    for (int j = 0; j < kp; j += SCAN) {
        int hit = 0;
        for (int l = 0; l < SCAN; l++) hit += low[j + l] <= upper;
        for (int l = 0; hit && l < SCAN; l++) {
            if (!(low[j + l] <= upper)) continue;
            hit--;
            consider(j + l, x, C, cc, d, &best, &bi);
        }
    }
    *value = best;
    return bi;
}

/* A row buffer for `low`: k floats padded with +inf to whole SCAN blocks (never candidates). */
static float *low_buffer(int k, int *kp) {
    *kp = (k + SCAN - 1) / SCAN * SCAN;
    float *low = (float *)malloc(sizeof(float) * (size_t)*kp);
    if (low)
        for (int j = k; j < *kp; j++) low[j] = INFINITY;
    return low;
}

int featlearn_refine_argmin(const uint16_t *S, int64_t stride, const float *X, int64_t xstride,
                            int d, const float *C, const float *cc, const float *cn, int64_t n,
                            int k, float delta, float *values, int64_t *labels) {
    int kv = k - k % LANES, kp;
    float *low = low_buffer(k, &kp);
    if (!low) return -1;
    for (int64_t i = 0; i < n; i++) {
        const uint16_t *row = S + i * stride;
        const float *x = X + i * xstride;
        float r = delta * sqrtf(dot(x, x, d));
        /* a_j - e_j into low, and the smallest a_j + e_j: each column once */
        vfloat up;
        for (int l = 0; l < LANES; l++) up[l] = INFINITY;
        for (int j = 0; j < kv; j += LANES) {
            vhalf h;
            vfloat c, e;
            memcpy(&h, row + j, sizeof h);
            memcpy(&c, cc + j, sizeof c);
            memcpy(&e, cn + j, sizeof e);
            vfloat s = (vfloat)(__builtin_convertvector(h, vint) << 16);
            keep_bounds(c - (s + s), e * r + c * (1.0f / 1048576.0f), low + j, &up);
        }
        float upper = INFINITY;
        for (int l = 0; l < LANES; l++) upper = up[l] < upper ? up[l] : upper;
        for (int j = kv; j < k; j++) {
            float s = bf16_to_float(row[j]);
            upper = keep_bound(cc[j] - (s + s), cn[j] * r + cc[j] * (1.0f / 1048576.0f),
                               low + j, upper);
        }
        labels[i] = settle(low, kp, upper, x, C, cc, d, values + i);
    }
    free(low);
    return 0;
}

/* Rows quantized to 8-bit integers, one scale per row: q = round(x * (127 / max|x|)) (to
   nearest even), so |q| <= 127 and scale = max|x| / 127; with upper bounds on the norms of
   the residual x - scale q and of scale q, which bound the products' error in
   featlearn_refine_argmin_int8. The norms are summed in units of the scale (no square
   underflows), the residual's with a margin for the rounding of x * (127 / max|x|); a row
   under 2^-100 is all residual (q = 0, scale 0, |x| <= max|x| sqrt(d)). */
typedef int8_t vbyte __attribute__((vector_size(LANES)));

/* The sum and the largest of a vector's lanes: by halving where the compiler has
   __builtin_shufflevector (a few shuffles, where 16 serial steps are most of a short row's
   quantization), else lane by lane. */
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
typedef float vhalf8 __attribute__((vector_size(32)));
typedef float vquarter __attribute__((vector_size(16)));
typedef int32_t vquarteri __attribute__((vector_size(16)));
typedef int32_t vhalf8i __attribute__((vector_size(32)));
static inline float lanes_sum(vfloat v) {
    vhalf8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)
               + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    vquarter b = __builtin_shufflevector(a, a, 0, 1, 2, 3)
                 + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    b += __builtin_shufflevector(b, b, 2, 3, 0, 1);
    b += __builtin_shufflevector(b, b, 1, 0, 3, 2);
    return b[0];
}
static inline float lanes_max(vfloat v) {
    vhalf8 x = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
    vhalf8 y = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    vhalf8i gt = y > x;
    x = (vhalf8)(((vhalf8i)y & gt) | ((vhalf8i)x & ~gt));
    vquarter p = __builtin_shufflevector(x, x, 0, 1, 2, 3);
    vquarter r = __builtin_shufflevector(x, x, 4, 5, 6, 7);
    for (int step = 0; step < 3; step++) {
        vquarteri g = r > p;
        p = (vquarter)(((vquarteri)r & g) | ((vquarteri)p & ~g));
        r = step == 0 ? __builtin_shufflevector(p, p, 2, 3, 0, 1)
                      : __builtin_shufflevector(p, p, 1, 0, 3, 2);
    }
    return p[0];
}
#else
static inline float lanes_sum(vfloat v) {
    float s = 0.0f;
    for (int l = 0; l < LANES; l++) s += v[l];
    return s;
}
static inline float lanes_max(vfloat v) {
    float m = v[0];
    for (int l = 1; l < LANES; l++) m = v[l] > m ? v[l] : m;
    return m;
}
#endif

/* Two rows of featlearn_quantize_rows at once (x[0], x[1] into q[0], q[1], d bytes each, and
   their scales and norm bounds): each row is a short chain of dependent steps (a running
   maximum, a division, running sums), so two side by side keep the core busy. A single row
   passes the same row twice. */
static void quantize_pair(const float *const x[2], int d, int8_t *const q[2], float scale[2],
                          float resid[2], float qnorm[2]) {
    const float big = 12582912.0f;  /* (y + 1.5 2^23) - 1.5 2^23: y to nearest even, |y| < 2^22 */
    int nv = (d + LANES - 1) / LANES, tail = d - (nv - 1) * LANES;
    vint absmask;
    vfloat top, zero = {0.0f};
    for (int l = 0; l < LANES; l++) { absmask[l] = 0x7fffffff; top[l] = 127.0f; }
    /* the rows as whole vectors, the last one padded with zeros (which change nothing) */
    vfloat last[2] = {zero, zero}, mx[2] = {zero, zero};
    for (int p = 0; p < 2; p++)
        for (int l = 0; l < tail; l++) last[p][l] = x[p][(nv - 1) * LANES + l];
    for (int t = 0; t < nv; t++)
        for (int p = 0; p < 2; p++) {
            vfloat xv = last[p];
            if (t < nv - 1) memcpy(&xv, x[p] + t * LANES, sizeof xv);
            vfloat a = (vfloat)((vint)xv & absmask);
            vint gt = a > mx[p];
            mx[p] = (vfloat)(((vint)a & gt) | ((vint)mx[p] & ~gt));
        }
    float inv[2], s[2];
    for (int p = 0; p < 2; p++) {
        float m = lanes_max(mx[p]);
        /* a row under 2^-100 is all residual: q = 0, scale 0, |x| <= max|x| sqrt(d) */
        inv[p] = m >= 0x1p-100f ? 127.0f / m : 0.0f;
        s[p] = m >= 0x1p-100f ? m / 127.0f : 0.0f;
        resid[p] = m * sqrtf((float)d) * (1.0f + 0x1p-20f);
    }
    vfloat uu[2] = {zero, zero}, vv[2] = {zero, zero};
    for (int t = 0; t < nv; t++)
        for (int p = 0; p < 2; p++) {
            vfloat xv = last[p];
            if (t < nv - 1) memcpy(&xv, x[p] + t * LANES, sizeof xv);
            vfloat y = xv * inv[p];
            vfloat v = (y + big) - big;
            v = (vfloat)(((vint)top & (v > top)) | ((vint)v & ~(v > top)));
            v = (vfloat)(((vint)-top & (v < -top)) | ((vint)v & ~(v < -top)));
            vfloat u = y - v;
            uu[p] += u * u;
            vv[p] += v * v;
            vbyte bytes = __builtin_convertvector(__builtin_convertvector(v, vint), vbyte);
            if (t < nv - 1)
                memcpy(q[p] + t * LANES, &bytes, sizeof bytes);
            else
                for (int l = 0; l < tail; l++) q[p][t * LANES + l] = bytes[l];
        }
    for (int p = 0; p < 2; p++) {
        scale[p] = s[p];
        if (s[p] == 0.0f) {  /* all residual (resid set above) */
            qnorm[p] = 0.0f;
            continue;
        }
        /* s y_t is x_t within 2^-22 |x_t| (inv s within 2^-23 of 1, y_t rounded once), so
           |x_t - s v_t| <= s |y_t - v_t| + 2^-22 m, and 2^-22 m = 127 2^-22 s < 2^-14 s */
        resid[p] = s[p] * (sqrtf(lanes_sum(uu[p])) + sqrtf((float)d) * 0x1p-14f);
        qnorm[p] = s[p] * sqrtf(lanes_sum(vv[p]));
    }
}

/* One row of featlearn_quantize_rows: q (d bytes), and its scale and norm bounds. */
static void quantize_row(const float *x, int d, int8_t *q, float *scale, float *resid,
                         float *qnorm) {
    int8_t *spare = (int8_t *)__builtin_alloca((size_t)d);
    const float *xs[2] = {x, x};
    int8_t *qs[2] = {q, spare};
    float sc[2], r[2], n[2];
    quantize_pair(xs, d, qs, sc, r, n);
    *scale = sc[0];
    *resid = r[0];
    *qnorm = n[0];
}

void featlearn_quantize_rows(const float *X, int64_t xstride, int64_t n, int d, int8_t *Q,
                             int64_t qstride, float *scale, float *resid, float *qnorm) {
    int64_t i = 0;
    for (; i + 1 < n; i += 2) {
        const float *xs[2] = {X + i * xstride, X + (i + 1) * xstride};
        int8_t *qs[2] = {Q + i * qstride, Q + (i + 1) * qstride};
        quantize_pair(xs, d, qs, scale + i, resid + i, qnorm + i);
    }
    if (i < n) quantize_row(X + i * xstride, d, Q + i * qstride, scale + i, resid + i, qnorm + i);
}

/* The k-means assignment from exact integer products, as featlearn_refine_argmin: S holds n
   rows of k int32 products P_j = q.q_j of rows and centres quantized by
   featlearn_quantize_rows (row i: scale sx, residual norm rx, quantized norm xq; centre j:
   scale sc_j as sc2_j = 2 sc_j, residual norm rc_j). x.c_j - sx sc_j P_j is (x - sx q).c_j +
   sx q.(c_j - sc_j q_j), at most rx |c_j| + xq rc_j; so a_j = cc_j - sx sc2_j P_j is within
   e_j = 2 (rx |c_j| + xq rc_j) of cc_j - 2 x.c_j, plus a margin (cc_j + 2 |x| |c_j|) (d / 16
   + 20) 2^-23 for float32 rounding: of a_j (three roundings) and of the value it is compared
   with, whose dot sums d / 16 terms per lane and then the 16 lanes. */
int featlearn_refine_argmin_int8(const int32_t *S, int64_t stride, const float *X,
                                 int64_t xstride, int d, const float *C, const float *cc,
                                 const float *cn, const float *sc2, const float *rc,
                                 const float *sx, const float *rx, const float *xq, int64_t n,
                                 int k, float *values, int64_t *labels) {
    const float margin = (float)(d / 16 + 20) * (1.0f / 8388608.0f);
    const float grow = 1.0f + 1.0f / 1024.0f;
    int kv = k - k % LANES, kp;
    float *low = low_buffer(k, &kp);
    if (!low) return -1;
    for (int64_t i = 0; i < n; i++) {
        const int32_t *row = S + i * stride;
        const float *x = X + i * xstride;
        float s = sx[i], xn = sqrtf(dot(x, x, d));
        float A = 2.0f * rx[i] * grow + 2.0f * xn * margin, B = 2.0f * xq[i] * grow;
        vfloat up;
        for (int l = 0; l < LANES; l++) up[l] = INFINITY;
        for (int j = 0; j < kv; j += LANES) {
            vint p;
            vfloat c, nrm, f, r;
            memcpy(&p, row + j, sizeof p);
            memcpy(&c, cc + j, sizeof c);
            memcpy(&nrm, cn + j, sizeof nrm);
            memcpy(&f, sc2 + j, sizeof f);
            memcpy(&r, rc + j, sizeof r);
            keep_bounds(c - s * (f * __builtin_convertvector(p, vfloat)),
                        nrm * A + r * B + c * margin, low + j, &up);
        }
        float upper = INFINITY;
        for (int l = 0; l < LANES; l++) upper = up[l] < upper ? up[l] : upper;
        for (int j = kv; j < k; j++)
            upper = keep_bound(cc[j] - s * (sc2[j] * (float)row[j]),
                               cn[j] * A + rc[j] * B + cc[j] * margin, low + j, upper);
        labels[i] = settle(low, kp, upper, x, C, cc, d, values + i);
    }
    free(low);
    return 0;
}

/* A pass of featlearn_assign_int8 over rows in blocks taken from a shared counter, by the
   caller and by threads of featlearn_assign_int8_start; `next` past `n` when every block was
   taken. */
enum { ASSIGN_BLOCK = 48 };  /* rows per block taken: 8 of the fused kernel's row tiles */

typedef struct {
    const float *X; int64_t xstride, n; int d; const uint8_t *Cp; int kpad;
    const float *C, *cc, *cn, *sc2, *rc; float *values; int64_t *labels;
    int64_t next;  /* the first row of the next block to take */
    int count;     /* threads started */
#ifdef FEATLEARN_THREADS
    pthread_t threads[];
#endif
} assign_pass;

static void *assign_blocks(void *arg);
int featlearn_int8_fused(void);

/* The pass's outcome once every thread has stopped: 0 when every row was assigned, -2 without
   the kernel, -1 when no thread could have buffers for some blocks (out of memory). */
static int assign_status(const assign_pass *p) {
    return !featlearn_int8_fused() ? -2 : p->next < p->n ? -1 : 0;
}

int featlearn_assign_int8(const float *X, int64_t xstride, int64_t n, int d, const uint8_t *Cp,
                          int kpad, const float *C, const float *cc, const float *cn,
                          const float *sc2, const float *rc, float *values, int64_t *labels) {
    assign_pass p = {X, xstride, n, d, Cp, kpad, C, cc, cn, sc2, rc, values, labels, 0, 0};
    assign_blocks(&p);
    return assign_status(&p);
}

/* The int8 assignment in one pass per row block, for CPUs with AVX512-VNNI: rows quantized
   as featlearn_quantize_rows, their products with the centres packed by
   featlearn_pack_centres_int8 summed by VPDPBUSD in registers, the bound of
   featlearn_refine_argmin_int8 applied to them there, and the few candidates settled in
   float32: the same labels and values, with no products written out (and one call per range of
   rows, where the unfused path needs three per chunk). Compiled only where the compiler targets
   AVX512-VNNI (-march=native); elsewhere featlearn_int8_fused() is 0 and the unfused path runs. */
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
#include <immintrin.h>

int featlearn_int8_fused(void) { return 1; }

/* Centres for featlearn_assign_int8: quantized (featlearn_quantize_rows) into blocks of 16
   centres, each dim group of 4 as 64 bytes (16 centres x 4 dims) of q + 128 (VPDPBUSD's
   unsigned operand); kpad centres (a multiple of 64), the padding q = 0 with cc = +inf and cn =
   sc2 = rc = 0 (never a candidate: its low bound is NaN). Writes Cp, and the kpad-long cc, cn
   (from the caller's c_sq, c_norm), sc2 = 2 scale and rc = residual norm. */
int featlearn_pack_centres_int8(const float *C, int k, int d, const float *c_sq,
                                const float *c_norm, int kpad, uint8_t *Cp, float *cc,
                                float *cn, float *sc2, float *rc) {
    int G = (d + 3) / 4;
    int8_t *q = (int8_t *)calloc((size_t)(8 * G), 1);  /* two centres' bytes, zero-padded */
    if (!q) return -1;
    for (int j0 = 0; j0 < kpad; j0 += 2) {  /* kpad is even: centres two at a time */
        float s[2] = {0.0f, 0.0f}, r[2] = {0.0f, 0.0f}, qn[2];
        memset(q, 0, (size_t)(8 * G));
        if (j0 < k) {
            const float *xs[2] = {C + (int64_t)j0 * d, C + (int64_t)(j0 + 1 < k ? j0 + 1 : j0) * d};
            int8_t *qs[2] = {q, q + 4 * G};
            quantize_pair(xs, d, qs, s, r, qn);
        }
        for (int h = 0; h < 2; h++) {
            int j = j0 + h;
            if (j >= k) {  /* padding: q = 0 (its bytes above are the zeros of the buffer) */
                memset(q + 4 * G * h, 0, (size_t)(4 * G));
                s[h] = r[h] = 0.0f;
            }
            uint8_t *blk = Cp + (int64_t)(j / 16) * G * 64 + (j % 16) * 4;
            for (int g = 0; g < G; g++) {  /* + 128 on each byte: its top bit flipped */
                uint32_t w;
                memcpy(&w, q + 4 * G * h + 4 * g, 4);
                w ^= 0x80808080u;
                memcpy(blk + g * 64, &w, 4);
            }
            cc[j] = j < k ? c_sq[j] : INFINITY;
            cn[j] = j < k ? c_norm[j] : 0.0f;
            sc2[j] = s[h] + s[h];
            rc[j] = r[h];
        }
    }
    free(q);
    return 0;
}

enum { MAXC = 16 };  /* candidates kept per row; a row with more is settled by settle() */

/* The columns j with low[j] <= upper (kp of them, a multiple of 64), in order, into cand (up
   to MAXC); returns how many there are. */
static int collect(const float *low, int kp, float upper, int *cand) {
    __m512 u = _mm512_set1_ps(upper);
    int m = 0;
    for (int j = 0; j < kp; j += 64) {
        __mmask16 k0 = _mm512_cmp_ps_mask(_mm512_loadu_ps(low + j), u, _CMP_LE_OQ);
        __mmask16 k1 = _mm512_cmp_ps_mask(_mm512_loadu_ps(low + j + 16), u, _CMP_LE_OQ);
        __mmask16 k2 = _mm512_cmp_ps_mask(_mm512_loadu_ps(low + j + 32), u, _CMP_LE_OQ);
        __mmask16 k3 = _mm512_cmp_ps_mask(_mm512_loadu_ps(low + j + 48), u, _CMP_LE_OQ);
        uint64_t bits = (uint64_t)k0 | (uint64_t)k1 << 16 | (uint64_t)k2 << 32
                        | (uint64_t)k3 << 48;
        while (bits) {
            if (m < MAXC) cand[m] = j + __builtin_ctzll(bits);
            m++;
            bits &= bits - 1;
        }
    }
    return m;
}

enum { RB = 6 };  /* rows per register tile (with 2 blocks of 16 centres: 12 accumulators) */

/* The pass's rows [a, a + n) in register tiles, with this thread's buffers: low (kpad * RB
   floats) and Q (RB * 4 ceil(d / 4) bytes, zeroed: the padding past d stays 0). */
static void assign_tiles(const assign_pass *p, int64_t a, int64_t n, float *low, int8_t *Q) {
    const float *X = p->X + a * p->xstride, *C = p->C, *cc = p->cc, *cn = p->cn;
    const float *sc2 = p->sc2, *rc = p->rc;
    const uint8_t *Cp = p->Cp;
    float *values = p->values + a;
    int64_t *labels = p->labels + a, xstride = p->xstride;
    int d = p->d, kpad = p->kpad, G = (d + 3) / 4, dp = 4 * G;
    const float margin = (float)(d / 16 + 20) * (1.0f / 8388608.0f);
    const float grow = 1.0f + 1.0f / 1024.0f;
    for (int64_t i0 = 0; i0 < n; i0 += RB) {
        int rr = n - i0 < RB ? (int)(n - i0) : RB;
        float A[RB], B[RB], sx[RB], rx[RB], xq[RB];
        int32_t corr[RB];
        for (int r = 0; r < RB; r += 2) {  /* RB is even: rows two at a time */
            /* a short last block repeats its first row */
            const float *xs[2] = {X + (i0 + (r < rr ? r : 0)) * xstride,
                                  X + (i0 + (r + 1 < rr ? r + 1 : 0)) * xstride};
            int8_t *qs[2] = {Q + r * dp, Q + (r + 1) * dp};
            quantize_pair(xs, d, qs, sx + r, rx + r, xq + r);
        }
        for (int r = 0; r < RB; r++) {
            const float *x = X + (i0 + (r < rr ? r : 0)) * xstride;
            A[r] = 2.0f * rx[r] * grow + 2.0f * sqrtf(dot(x, x, d)) * margin;
            B[r] = 2.0f * xq[r] * grow;
            int sum = 0;
            for (int c = 0; c < d; c++) sum += Q[r * dp + c];
            corr[r] = 128 * sum;  /* the unsigned operand's offset: sum (q_c + 128) q_x */
        }
        __m512 up[RB];
        for (int r = 0; r < RB; r++) up[r] = _mm512_set1_ps(INFINITY);
        for (int jb = 0; jb < kpad / 16; jb += 2) {
            __m512i acc[RB][2];
            /* from -corr: the sums come out as sum q_c q_x, the unsigned offset taken off */
            for (int r = 0; r < RB; r++) acc[r][0] = acc[r][1] = _mm512_set1_epi32(-corr[r]);
            const uint8_t *c0 = Cp + (int64_t)jb * G * 64, *c1 = c0 + (int64_t)G * 64;
            for (int g = 0; g < G; g++) {
                __m512i b0 = _mm512_loadu_si512(c0 + g * 64);
                __m512i b1 = _mm512_loadu_si512(c1 + g * 64);
                for (int r = 0; r < RB; r++) {
                    int32_t w;
                    memcpy(&w, Q + r * dp + 4 * g, 4);
                    __m512i xv = _mm512_set1_epi32(w);
                    acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], b0, xv);
                    acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], b1, xv);
                }
            }
            for (int h = 0; h < 2; h++) {
                int j = (jb + h) * 16;
                __m512 vc = _mm512_loadu_ps(cc + j), vn = _mm512_loadu_ps(cn + j);
                __m512 vf = _mm512_loadu_ps(sc2 + j), vr = _mm512_loadu_ps(rc + j);
                __m512 cm = _mm512_mul_ps(vc, _mm512_set1_ps(margin));
                for (int r = 0; r < RB; r++) {
                    /* fused multiply-adds: fewer roundings than the bound's margin allows for,
                       and the vector ops that the products share their ports with */
                    __m512 f = _mm512_mul_ps(vf, _mm512_cvtepi32_ps(acc[r][h]));
                    __m512 a = _mm512_fnmadd_ps(_mm512_set1_ps(sx[r]), f, vc);
                    __m512 e = _mm512_fmadd_ps(vn, _mm512_set1_ps(A[r]),
                                               _mm512_fmadd_ps(vr, _mm512_set1_ps(B[r]), cm));
                    up[r] = _mm512_min_ps(up[r], _mm512_add_ps(a, e));
                    _mm512_storeu_ps(low + (int64_t)r * kpad + j, _mm512_sub_ps(a, e));
                }
            }
        }
        /* candidates of all the tile's rows first, their centres' rows prefetched, then
           settled: the misses on C overlap instead of one row's after another's */
        int cand[RB][MAXC], nc[RB];
        float upper[RB];
        for (int r = 0; r < rr; r++) {
            upper[r] = _mm512_reduce_min_ps(up[r]);
            nc[r] = collect(low + (int64_t)r * kpad, kpad, upper[r], cand[r]);
            for (int t = 0; t < nc[r] && t < MAXC; t++) {
                const char *p = (const char *)(C + (int64_t)cand[r][t] * d);
                for (int o = 0; o < d * 4; o += 64) __builtin_prefetch(p + o);
            }
        }
        for (int r = 0; r < rr; r++) {
            const float *x = X + (i0 + r) * xstride;
            if (nc[r] > MAXC) {
                labels[i0 + r] = settle(low + (int64_t)r * kpad, kpad, upper[r], x, C, cc, d,
                                        values + i0 + r);
                continue;
            }
            float best = INFINITY;
            int bi = -1;
            for (int t = 0; t < nc[r]; t++) consider(cand[r][t], x, C, cc, d, &best, &bi);
            values[i0 + r] = best;
            labels[i0 + r] = bi;
        }
    }
}

/* A thread of the pass: its buffers once, then blocks of rows until none is left (a thread
   whose buffers cannot be had takes none, and leaves them to the others). */
static void *assign_blocks(void *arg) {
    assign_pass *p = (assign_pass *)arg;
    float *low = (float *)malloc(sizeof(float) * (size_t)p->kpad * RB);
    int8_t *Q = (int8_t *)calloc((size_t)RB * 4 * ((p->d + 3) / 4), 1);
    for (;;) {
        if (!low || !Q) break;
        int64_t a = __atomic_fetch_add(&p->next, ASSIGN_BLOCK, __ATOMIC_RELAXED);
        if (a >= p->n) break;
        assign_tiles(p, a, p->n - a < ASSIGN_BLOCK ? p->n - a : ASSIGN_BLOCK, low, Q);
    }
    free(low);
    free(Q);
    return NULL;
}
#else
int featlearn_int8_fused(void) { return 0; }

int featlearn_pack_centres_int8(const float *C, int k, int d, const float *c_sq,
                                const float *c_norm, int kpad, uint8_t *Cp, float *cc,
                                float *cn, float *sc2, float *rc) {
    (void)C; (void)k; (void)d; (void)c_sq; (void)c_norm; (void)kpad; (void)Cp; (void)cc;
    (void)cn; (void)sc2; (void)rc;
    return -2;
}

static void *assign_blocks(void *arg) {  /* no kernel here: no block taken */
    (void)arg;
    return NULL;
}
#endif

/* How many cells map position (ph, pw) belongs to: row cells
   row_idx[row_ptr[ph]..row_ptr[ph+1]) times column cells col_idx[col_ptr[pw]..col_ptr[pw+1]],
   cell = row cell * n_col_cells + column cell (target_cells lists them). A grid gives every
   position one cell; overlapping windows up to a few, a map edge past the last window none. */
static inline int position_cells(int ph, int pw, const int *row_ptr, const int *col_ptr) {
    return (row_ptr[ph + 1] - row_ptr[ph]) * (col_ptr[pw + 1] - col_ptr[pw]);
}

/* Cells per batch of targets that the pooling kernels update from one row's values in
   registers (a position in more windows, e.g. 5x5 windows at stride 1, takes several). */
enum { MAX_TARGETS = 64 };

/* The start of every cell of position (ph, pw) in o (cells of `width` floats), from the
   `skip`-th on, at most MAX_TARGETS of them, in row-major cell order; returns how many. */
static int target_cells(int ph, int pw, const int *row_ptr, const int *row_idx,
                        const int *col_ptr, const int *col_idx, int n_col_cells,
                        int64_t width, float *o, int skip, float **cells) {
    int nt = 0, seen = 0;
    for (int a = row_ptr[ph]; a < row_ptr[ph + 1]; a++)
        for (int b = col_ptr[pw]; b < col_ptr[pw + 1]; b++, seen++)
            if (seen >= skip && nt < MAX_TARGETS)
                cells[nt++] = o + (int64_t)(row_idx[a] * n_col_cells + col_idx[b]) * width;
    return nt;
}

/* D: the squared distances of n_images * Ph * Pw rows (image-major, then map rows, then map
   columns), K each (bfloat16 or float32), `stride` elements apart. Adds, for every row, its
   triangle activation max(0, mean_k z_k - z_k), z = sqrt(max(D, 0)), to each of its cells
   (position_cells) in out (n_images x n_cells x K, zeroed by the caller). Returns 0, or -1
   when out of memory. */
int featlearn_triangle_pool(const void *D, int64_t stride, int bf16, int64_t n_images, int Ph,
                            int Pw, int K, const int *row_ptr, const int *row_idx,
                            const int *col_ptr, const int *col_idx, int n_col_cells,
                            int n_cells, float *out) {
    int Kp = (K + LANES - 1) / LANES * LANES;
    float *z = (float *)malloc(sizeof(float) * (size_t)Kp);
    if (!z) return -1;
    for (int k = K; k < Kp; k++) z[k] = 0.0f;  /* adds nothing to the sum */
    for (int64_t img = 0; img < n_images; img++) {
        float *o = out + img * (int64_t)n_cells * K;
        for (int ph = 0; ph < Ph; ph++)
            for (int pw = 0; pw < Pw; pw++) {
                int targets = position_cells(ph, pw, row_ptr, col_ptr);
                if (!targets) continue;
                int64_t r = (img * Ph + ph) * Pw + pw;
                if (bf16) {
                    const uint16_t *row = (const uint16_t *)D + r * stride;
                    for (int k = 0; k < K; k++) {
                        float d = bf16_to_float(row[k]);
                        z[k] = sqrtf(d > 0.0f ? d : 0.0f);
                    }
                } else {
                    const float *row = (const float *)D + r * stride;
                    for (int k = 0; k < K; k++) z[k] = sqrtf(row[k] > 0.0f ? row[k] : 0.0f);
                }
                float acc[LANES] = {0.0f};
                for (int k = 0; k < Kp; k += LANES)
                    for (int l = 0; l < LANES; l++) acc[l] += z[k + l];
                float s = 0.0f;
                for (int l = 0; l < LANES; l++) s += acc[l];
                float mean = s / (float)K;
                float *cells[MAX_TARGETS];
                if (targets == 1) {  /* a grid: straight into the cell */
                    target_cells(ph, pw, row_ptr, row_idx, col_ptr, col_idx, n_col_cells, K, o,
                                 0, cells);
                    float *cell = cells[0];
                    for (int k = 0; k < K; k++) {
                        float v = mean - z[k];
                        cell[k] += v > 0.0f ? v : 0.0f;
                    }
                } else {  /* windows: each vector of activations into every cell */
                    int kv = K - K % LANES;
                    vfloat m, zero = {0.0f};
                    for (int l = 0; l < LANES; l++) m[l] = mean;
                    for (int skip = 0; skip < targets; skip += MAX_TARGETS) {
                        int nt = target_cells(ph, pw, row_ptr, row_idx, col_ptr, col_idx,
                                              n_col_cells, K, o, skip, cells);
                        for (int j = 0; j < kv; j += LANES) {
                            vfloat zz, c;
                            memcpy(&zz, z + j, sizeof zz);
                            vfloat v = m - zz;
                            v = (vfloat)((vint)v & (v > zero));
                            for (int q = 0; q < nt; q++) {
                                memcpy(&c, cells[q] + j, sizeof c);
                                c += v;
                                memcpy(cells[q] + j, &c, sizeof c);
                            }
                        }
                        for (int k = kv; k < K; k++) {
                            float v = mean - z[k];
                            v = v > 0.0f ? v : 0.0f;
                            for (int q = 0; q < nt; q++) cells[q][k] += v;
                        }
                    }
                }
            }
    }
    free(z);
    return 0;
}

/* The nearest-fraction code pooled over cells: S holds the products y.c of n_images * Ph * Pw
   rows (laid out as for featlearn_triangle_pool), K each; t their two thresholds (t[2r] for y,
   t[2r+1] for -y). Adds 1 to out[image][cell][k] where cc_k - 2 s_k < t[2r], and to
   out[image][cell][K + k] where cc_k + 2 s_k < t[2r+1], for each cell of the row's position
   (out: n_images x n_cells x 2K, zeroed by the caller): the comparisons of
   featlearn.activations.nearest_fraction_blocks, roundings included, and counts, which float32
   sums exactly. Returns 0, or -1 when out of memory. */
int featlearn_nearest_pool(const void *S, int64_t stride, int bf16, const float *cc,
                           const float *t, int64_t n_images, int Ph, int Pw, int K,
                           const int *row_ptr, const int *row_idx, const int *col_ptr,
                           const int *col_idx, int n_col_cells, int n_cells, float *out) {
    int kv = K - K % LANES;
    vfloat one;
    for (int l = 0; l < LANES; l++) one[l] = 1.0f;
    for (int64_t img = 0; img < n_images; img++) {
        float *o = out + img * (int64_t)n_cells * 2 * K;
        for (int ph = 0; ph < Ph; ph++)
            for (int pw = 0; pw < Pw; pw++) {
                int targets = position_cells(ph, pw, row_ptr, col_ptr);
                if (!targets) continue;
                int64_t r = (img * Ph + ph) * Pw + pw;
                float t0 = t[2 * r], t1 = t[2 * r + 1];
                float *cells[MAX_TARGETS];
                if (targets == 1) {  /* a grid: straight into the cell */
                    target_cells(ph, pw, row_ptr, row_idx, col_ptr, col_idx, n_col_cells,
                                 2 * (int64_t)K, o, 0, cells);
                    float *near = cells[0], *far = near + K;
                    if (bf16) {
                        const uint16_t *row = (const uint16_t *)S + r * stride;
                        for (int k = 0; k < K; k++) {
                            float d = bf16_to_float(row[k]);
                            float twice = d + d;
                            near[k] += cc[k] - twice < t0 ? 1.0f : 0.0f;
                            far[k] += cc[k] + twice < t1 ? 1.0f : 0.0f;
                        }
                    } else {
                        const float *row = (const float *)S + r * stride;
                        for (int k = 0; k < K; k++) {
                            float twice = row[k] + row[k];
                            near[k] += cc[k] - twice < t0 ? 1.0f : 0.0f;
                            far[k] += cc[k] + twice < t1 ? 1.0f : 0.0f;
                        }
                    }
                    continue;
                }
                vfloat v0, v1;
                for (int l = 0; l < LANES; l++) { v0[l] = t0; v1[l] = t1; }
                /* windows: each vector of the code into every cell of the position */
                for (int skip = 0; skip < targets; skip += MAX_TARGETS) {
                    int nt = target_cells(ph, pw, row_ptr, row_idx, col_ptr, col_idx,
                                          n_col_cells, 2 * (int64_t)K, o, skip, cells);
                    for (int j = 0; j < kv; j += LANES) {
                        vfloat sv, c, a;
                        if (bf16) {
                            vhalf h;
                            memcpy(&h, (const uint16_t *)S + r * stride + j, sizeof h);
                            sv = (vfloat)(__builtin_convertvector(h, vint) << 16);
                        } else {
                            memcpy(&sv, (const float *)S + r * stride + j, sizeof sv);
                        }
                        memcpy(&c, cc + j, sizeof c);
                        vfloat twice = sv + sv;
                        vfloat near = (vfloat)((vint)one & (c - twice < v0));
                        vfloat far = (vfloat)((vint)one & (c + twice < v1));
                        for (int q = 0; q < nt; q++) {
                            memcpy(&a, cells[q] + j, sizeof a);
                            a += near;
                            memcpy(cells[q] + j, &a, sizeof a);
                            memcpy(&a, cells[q] + K + j, sizeof a);
                            a += far;
                            memcpy(cells[q] + K + j, &a, sizeof a);
                        }
                    }
                    for (int k = kv; k < K; k++) {
                        float d = bf16 ? bf16_to_float(((const uint16_t *)S)[r * stride + k])
                                       : ((const float *)S)[r * stride + k];
                        float twice = d + d;
                        float near = cc[k] - twice < t0 ? 1.0f : 0.0f;
                        float far = cc[k] + twice < t1 ? 1.0f : 0.0f;
                        for (int q = 0; q < nt; q++) {
                            cells[q][k] += near;
                            cells[q][K + k] += far;
                        }
                    }
                }
            }
    }
    return 0;
}

/* The n rows of X (`stride` apart, d each; times w[i] in float32 when w is not NULL) added per
   label in row order into sums (k x d float32), their (weighted) counts one by one in float64
   into counts: the roundings of torch's index_add_ and (from zero counts) bincount, at a
   fraction of their cost. Returns 0, or -1 (nothing written) when a label is outside 0..k-1. */
int featlearn_centre_sums(const float *X, int64_t stride, int64_t n, int d, const int64_t *labels,
                          const float *w, int64_t k, float *sums, double *counts) {
    for (int64_t i = 0; i < n; i++)
        if (labels[i] < 0 || labels[i] >= k) return -1;
    for (int64_t i = 0; i < n; i++) {
        int64_t l = labels[i];
        const float *x = X + i * stride;
        float *s = sums + l * d;
        if (w) {
            float wi = w[i];
            for (int t = 0; t < d; t++) s[t] += x[t] * wi;
            counts[l] += (double)wi;
        } else {
            for (int t = 0; t < d; t++) s[t] += x[t];
            counts[l] += 1.0;
        }
    }
    return 0;
}

/* One mini-batch k-means update (scikit-learn's per-centre rate 1 / count), with the roundings
   of the torch ops it replaces: the batch's sums and counts as featlearn_centre_sums (from zero,
   into sums and bcounts); then new_counts = counts + bcounts and each centre
   out = C + (sums - (float)bcounts * C) / rate, rate = (float)new_count where it is >= 1 (> 0
   with weights), else 1. Returns how many new counts are 0, or -1 (out and new_counts not
   written) when a label is outside 0..k-1. */
int64_t featlearn_minibatch_update(const float *X, int64_t stride, int64_t n, int d,
                                   const int64_t *labels, const float *w, const float *C,
                                   int64_t k, const double *counts, float *sums,
                                   double *bcounts, double *new_counts, float *out) {
    memset(sums, 0, sizeof(float) * (size_t)(k * d));
    memset(bcounts, 0, sizeof(double) * (size_t)k);
    if (featlearn_centre_sums(X, stride, n, d, labels, w, k, sums, bcounts) < 0) return -1;
    int64_t zeros = 0;
    for (int64_t j = 0; j < k; j++) {
        double c = counts[j] + bcounts[j];
        new_counts[j] = c;
        zeros += c == 0.0;
        float rate = (float)(w ? (c > 0.0 ? c : 1.0) : (c < 1.0 ? 1.0 : c));
        float b = (float)bcounts[j];
        const float *cj = C + j * d, *sj = sums + j * d;
        float *o = out + j * d;
        for (int t = 0; t < d; t++) {
            float step = (sj[t] - b * cj[t]) / rate;
            o[t] = cj[t] + step;
        }
    }
    return zeros;
}

/* float16 bits -> float: the exponent rebiased by one multiplication, which also scales
   subnormals right; infinities and NaNs kept. Integer and float operations only, so the loop
   vectorizes on any target (no _Float16 needed). */
static inline float half_to_float(uint16_t h) {
    uint32_t em = h & 0x7fffu, u = em << 13;
    float f;
    memcpy(&f, &u, sizeof f);
    f *= 5.192296858534828e+33f;  /* 2**112: float16's exponent bias to float32's */
    if (em >= 0x7c00u) f = em == 0x7c00u ? INFINITY : NAN;
    return h & 0x8000u ? -f : f;
}

/* float -> bfloat16 bits, to nearest with ties to even (NaN: 0x7fc0), as torch rounds. */
static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if (f != f) return 0x7fc0u;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* Rows idx[0..b) of the float16 matrix X (`stride` elements apart, F used) standardized,
   (x - mean) * inv with float32's roundings, into out (b x F): float32, or bfloat16 rounded
   from that float32 value (`bf16`). One pass where gather, decode, subtract, multiply and
   round are each a pass over the batch in torch. */
void featlearn_standardize_rows(const uint16_t *X, int64_t stride, int64_t F, const int64_t *idx,
                                int64_t b, const float *mean, const float *inv, int bf16,
                                void *out) {
    for (int64_t i = 0; i < b; i++) {
        const uint16_t *row = X + idx[i] * stride;
        if (bf16) {
            uint16_t *o = (uint16_t *)out + i * F;
            for (int64_t j = 0; j < F; j++)
                o[j] = float_to_bf16((half_to_float(row[j]) - mean[j]) * inv[j]);
        } else {
            float *o = (float *)out + i * F;
            for (int64_t j = 0; j < F; j++) o[j] = (half_to_float(row[j]) - mean[j]) * inv[j];
        }
    }
}

/* featlearn_assign_int8 over all n rows, in blocks that `threads` new threads and then the
   caller take in turn: a mini-batch step's rows in parallel with no hand-off through Python,
   balanced whatever else the caller does first (its `alongside` work) and however busy the
   machine leaves each core. Returns a handle for featlearn_assign_int8_join, which takes the
   caller's share of the blocks and waits for the threads; NULL when nothing could be started
   (out of memory, or no POSIX threads here): the caller then assigns the rows itself. */
void *featlearn_assign_int8_start(const float *X, int64_t xstride, int64_t n, int d,
                                  const uint8_t *Cp, int kpad, const float *C, const float *cc,
                                  const float *cn, const float *sc2, const float *rc,
                                  float *values, int64_t *labels, int threads) {
#ifdef FEATLEARN_THREADS
    if (threads < 1 || n < 1) return NULL;
    assign_pass *p = (assign_pass *)calloc(1, sizeof(assign_pass) +
                                           (size_t)threads * sizeof(pthread_t));
    if (!p) return NULL;
    *p = (assign_pass){X, xstride, n, d, Cp, kpad, C, cc, cn, sc2, rc, values, labels, 0, 0};
    while (p->count < threads &&
           pthread_create(&p->threads[p->count], NULL, assign_blocks, p) == 0)
        p->count++;  /* a thread that cannot start leaves its blocks to the others */
    return p;
#else
    (void)X; (void)xstride; (void)n; (void)d; (void)Cp; (void)kpad; (void)C; (void)cc;
    (void)cn; (void)sc2; (void)rc; (void)values; (void)labels; (void)threads;
    return NULL;
#endif
}

/* Takes the blocks still left, waits for featlearn_assign_int8_start's threads and frees the
   handle: featlearn_assign_int8's status for the whole pass. */
int featlearn_assign_int8_join(void *handle) {
    assign_pass *p = (assign_pass *)handle;
    assign_blocks(p);
#ifdef FEATLEARN_THREADS
    for (int t = 0; t < p->count; t++) pthread_join(p->threads[t], NULL);
#endif
    int status = assign_status(p);
    free(p);
    return status;
}
