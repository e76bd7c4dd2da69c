"""Small native (C) kernels for the compiled encoder and k-means on the CPU, where one pass per
row that stays in L1 beats what a compiled graph or a torch reduction does in whole-chunk passes.

- :func:`nearest_thresholds`: each row's ``rank``-th smallest signed distance, for ``y`` and
  ``-y`` (the nearest-fraction code). Neither ``torch.kthvalue`` (a sort-like pass per row) nor
  a compiled graph does this per-row order statistic at the GEMM's pace: inductor turns the
  bisection of :func:`featlearn.activations.bracket_thresholds` into one pass over the whole
  chunk per halving. Here each row is loaded once and its two selections run side by side in
  counting loops the C compiler vectorizes: a first bracket around the previous row's answer
  (neighbouring patches rank their centroids alike), then interpolation and halving steps,
  until the answer is the smallest or the largest entry left in the bracket. The result is the
  order statistic itself, bit for bit (the signed distances are formed with
  :func:`featlearn.activations._signed`'s own operations and roundings).
- :func:`triangle_pool`: the triangle activation summed over a grid of cells, row by row: each
  row's ``z = sqrt(max(D, 0))`` is computed once into an L1 buffer, its mean taken, and
  ``max(0, mean - z)`` added to the row's cell, where the compiled graph reads the chunk twice
  and takes every square root twice. The same numbers up to float32 summation order.
- :func:`row_argmin`: ``torch.min(D, 1)`` for k-means' float32 distances, whose indexed minimum
  torch runs as a scalar loop on the CPU.
- :func:`refine_argmin`: the k-means assignment from bfloat16 products, settled in float32 for
  the few centres their rounding leaves in contention (``precision="bfloat16"``).

The C source below is compiled once per machine with the system's C compiler (the one inductor
needs anyway), into featlearn's own cache folder, and loaded with :mod:`ctypes`, which releases
the GIL during a call, so the encoder's worker threads run their kernels at the same time.
Without a compiler, or on any failure, :func:`available` is False and the callers keep their
compiled graphs (one warning line).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sysconfig
import tempfile
import threading
from pathlib import Path

import torch

from ._logging import logger

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

int featlearn_refine_argmin(const uint16_t *S, int64_t stride, const float *X, int64_t xstride,
                            int d, const float *C, const float *cc, const float *cn, int64_t n,
                            int k, float delta, float *values, int64_t *labels) {
    enum { SCAN = 4 * LANES };  /* columns per candidate test */
    int kv = k - k % LANES, kp = (k + SCAN - 1) / SCAN * SCAN;
    float *low = (float *)malloc(sizeof(float) * (size_t)kp);
    if (!low) return -1;
    for (int j = k; j < kp; j++) low[j] = INFINITY;  /* never a candidate */
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
            vfloat a = c - (s + s);
            e = e * r + c * (1.0f / 1048576.0f);
            vfloat hi = a + e, lo = a - e;
            memcpy(low + j, &lo, sizeof lo);
            vint lt = hi < up;
            up = (vfloat)(((vint)hi & lt) | ((vint)up & ~lt));
        }
        float upper = INFINITY;
        for (int l = 0; l < LANES; l++) upper = up[l] < upper ? up[l] : upper;
        for (int j = kv; j < k; j++) {
            float s = bf16_to_float(row[j]);
            float a = cc[j] - (s + s);
            float e = cn[j] * r + cc[j] * (1.0f / 1048576.0f);
            float hi = a + e;
            low[j] = a - e;
            upper = hi < upper ? hi : upper;
        }
        /* the candidates, in column order (the first wins a tie) */
        float best = INFINITY;
        int bi = -1;
        for (int j = 0; j < kp; j += SCAN) {
            int hit = 0;
            for (int l = 0; l < SCAN; l++) hit += low[j + l] <= upper;
            for (int l = 0; hit && l < SCAN; l++) {
                if (!(low[j + l] <= upper)) continue;
                hit--;
                float p = dot(x, C + (int64_t)(j + l) * d, d);
                float v = cc[j + l] - (p + p);
                if (bi < 0 || v < best) { best = v; bi = j + l; }
            }
        }
        values[i] = best;
        labels[i] = bi;
    }
    free(low);
    return 0;
}

/* D: the squared distances of n_images * Ph * Pw rows (image-major, then map rows, then map
   columns), K each (bfloat16 or float32), `stride` elements apart. Adds, for every row, its
   triangle activation max(0, mean_k z_k - z_k), z = sqrt(max(D, 0)), to out[image][cell] (out:
   n_images x n_cells x K, zeroed by the caller), the cell of map position (ph, pw) being
   row_cell[ph] * n_col_cells + col_cell[pw]. Returns 0, or -1 when out of memory. */
int featlearn_triangle_pool(const void *D, int64_t stride, int bf16, int64_t n_images, int Ph,
                            int Pw, int K, const int *row_cell, const int *col_cell,
                            int n_col_cells, int n_cells, float *out) {
    int Kp = (K + LANES - 1) / LANES * LANES;
    float *z = (float *)malloc(sizeof(float) * (size_t)Kp);
    if (!z) return -1;
    for (int k = K; k < Kp; k++) z[k] = 0.0f;  /* adds nothing to the sum */
    for (int64_t img = 0; img < n_images; img++) {
        float *o = out + img * (int64_t)n_cells * K;
        for (int ph = 0; ph < Ph; ph++)
            for (int pw = 0; pw < Pw; pw++) {
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
                float *cell = o + (int64_t)(row_cell[ph] * n_col_cells + col_cell[pw]) * K;
                for (int k = 0; k < K; k++) {
                    float v = mean - z[k];
                    cell[k] += v > 0.0f ? v : 0.0f;
                }
            }
    }
    free(z);
    return 0;
}

/* The nearest-fraction code pooled over a grid: S holds the products y.c of n_images * Ph * Pw
   rows (laid out as for featlearn_triangle_pool), K each; t their two thresholds (t[2r] for y,
   t[2r+1] for -y). Adds 1 to out[image][cell][k] where cc_k - 2 s_k < t[2r], and to
   out[image][cell][K + k] where cc_k + 2 s_k < t[2r+1] (out: n_images x n_cells x 2K, zeroed by
   the caller): the comparisons of featlearn.activations.nearest_fraction_blocks, roundings
   included, and counts, which float32 sums exactly. */
void featlearn_nearest_pool(const void *S, int64_t stride, int bf16, const float *cc,
                            const float *t, int64_t n_images, int Ph, int Pw, int K,
                            const int *row_cell, const int *col_cell, int n_col_cells,
                            int n_cells, float *out) {
    for (int64_t img = 0; img < n_images; img++) {
        float *o = out + img * (int64_t)n_cells * 2 * K;
        for (int ph = 0; ph < Ph; ph++)
            for (int pw = 0; pw < Pw; pw++) {
                int64_t r = (img * Ph + ph) * Pw + pw;
                float t0 = t[2 * r], t1 = t[2 * r + 1];
                float *near = o + (int64_t)(row_cell[ph] * n_col_cells + col_cell[pw]) * 2 * K;
                float *far = near + K;
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
            }
    }
}

/* One mini-batch k-means update (scikit-learn's per-centre rate 1 / count), with the roundings
   of the torch ops it replaces: the n rows of X (`stride` apart, d each; times w[i] in float32
   when w is not NULL) summed per label in row order into sums (k x d float32), their (weighted)
   counts in float64 into bcounts; then new_counts = counts + bcounts and each centre
   out = C + (sums - (float)bcounts * C) / rate, rate = (float)new_count where it is >= 1 (> 0
   with weights), else 1. Returns how many new counts are 0, or -1 (nothing written) when a
   label is outside 0..k-1. */
int64_t featlearn_minibatch_update(const float *X, int64_t stride, int64_t n, int d,
                                   const int64_t *labels, const float *w, const float *C,
                                   int64_t k, const double *counts, float *sums,
                                   double *bcounts, double *new_counts, float *out) {
    for (int64_t i = 0; i < n; i++)
        if (labels[i] < 0 || labels[i] >= k) return -1;
    memset(sums, 0, sizeof(float) * (size_t)(k * d));
    memset(bcounts, 0, sizeof(double) * (size_t)k);
    for (int64_t i = 0; i < n; i++) {
        int64_t l = labels[i];
        const float *x = X + i * stride;
        float *s = sums + l * d;
        if (w) {
            float wi = w[i];
            for (int t = 0; t < d; t++) s[t] += x[t] * wi;
            bcounts[l] += (double)wi;
        } else {
            for (int t = 0; t < d; t++) s[t] += x[t];
            bcounts[l] += 1.0;
        }
    }
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
"""

#: ``-ffp-contract=off``: no fused multiply-adds, so every rounding is the one torch makes.
#: ``-march=native`` first (the count loops vectorize to the CPU's widest registers), then without
#: it for a compiler that does not know the flag.
_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC"]
_TRIES = (["-march=native"], [])
_LOCK = threading.Lock()
_STATE: dict = {}


def _compiler():
    cc = os.environ.get("CC") or (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc) or shutil.which("cc") or shutil.which("gcc")


def _cache_dir() -> Path:
    """featlearn's own folder for compiled code, private to this user: under
    ``$FEATLEARN_CACHE_DIR``, else ``$XDG_CACHE_HOME/featlearn`` (``~/.cache/featlearn``)."""
    base = os.environ.get("FEATLEARN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "featlearn")
    path = Path(base) / "native"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise OSError(f"{path} is not private to this user; not loading code from it")
    return path


def _cpu_key() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags."""
    try:
        with open("/proc/cpuinfo") as fh:
            lines = [ln for ln in fh if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "".join(lines)


def _build():
    compiler = _compiler()
    if compiler is None:
        raise OSError("no C compiler found (set CC)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    folder = _cache_dir()
    error = ""
    for extra in _TRIES:
        flags = _FLAGS + extra
        key = hashlib.sha256("\0".join([_SOURCE, " ".join(flags), version, _cpu_key()])
                             .encode()).hexdigest()[:16]
        lib = folder / f"kernels-{key}.so"
        if not lib.exists():
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                src, out = Path(tmp) / "kernels.c", Path(tmp) / "kernels.so"
                src.write_text(_SOURCE)
                run = subprocess.run([compiler, *flags, str(src), "-o", str(out)],
                                     capture_output=True, text=True, timeout=300)
                if run.returncode != 0:
                    error = (run.stderr.strip().splitlines() or [""])[0]
                    continue
                os.replace(out, lib)  # atomic: another process sees the whole file or none
        dll = ctypes.CDLL(str(lib))
        P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        dll.featlearn_nearest_thresholds.argtypes = [P, I64, I, P, I64, I, I, P]
        dll.featlearn_triangle_pool.argtypes = [P, I64, I, I64, I, I, I, P, P, I, I, P]
        for fn in (dll.featlearn_nearest_thresholds, dll.featlearn_triangle_pool):
            fn.restype = ctypes.c_int
        dll.featlearn_nearest_pool.argtypes = [P, I64, I, P, P, I64, I, I, I, P, P, I, I, P]
        dll.featlearn_nearest_pool.restype = None
        dll.featlearn_standardize_rows.argtypes = [P, I64, I64, P, I64, P, P, I, P]
        dll.featlearn_standardize_rows.restype = None
        dll.featlearn_minibatch_update.argtypes = [P, I64, I64, I, P, P, P, I64, P, P, P, P, P]
        dll.featlearn_minibatch_update.restype = ctypes.c_int64
        dll.featlearn_row_argmin.argtypes = [P, I64, I64, I, P, P]
        dll.featlearn_row_argmin.restype = None
        F = ctypes.c_float
        dll.featlearn_refine_argmin.argtypes = [P, I64, P, I64, I, P, P, P, I64, I, F, P, P]
        dll.featlearn_refine_argmin.restype = ctypes.c_int
        return dll
    raise OSError(f"{compiler} failed: {error}")


def _library():
    if "lib" in _STATE:
        return _STATE["lib"]
    with _LOCK:
        if "lib" not in _STATE:
            try:
                _STATE["lib"] = _build()
            except Exception as exc:  # noqa: BLE001 - any failure means: keep the compiled graphs
                _STATE["lib"] = None
                logger.warning("could not build featlearn's native encoding kernels (%s: %s); "
                               "using the compiled graphs (same results, slower)",
                               type(exc).__name__, str(exc)[:200])
        return _STATE["lib"]


def available() -> bool:
    """Whether the native kernels are built (or can be) and loaded here; False after a warning."""
    return _library() is not None


def _loaded():
    lib = _library()
    if lib is None:
        raise RuntimeError("featlearn's native kernels are not available here (see the warning "
                           "logged when they failed to build)")
    return lib


def nearest_thresholds(S: torch.Tensor, col_sq: torch.Tensor, rank: int) -> torch.Tensor:
    """``(n, 2)`` thresholds: the ``rank``-th smallest of ``col_sq - 2 S`` and of
    ``col_sq + 2 S`` per row, as :func:`featlearn.activations.nearest_fraction_thresholds`
    gives them over the same columns. ``S`` is a CPU ``(n, m)`` float32 or bfloat16 tensor whose
    rows may be strided (a column block of the products); ``col_sq`` the ``m`` float32 norms."""
    n, m = S.shape
    if S.device.type != "cpu" or S.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"native thresholds need CPU float32 or bfloat16 products, got "
                         f"{S.dtype} on {S.device}")
    if not 1 <= rank <= m:
        raise ValueError(f"rank {rank} is outside 1..{m}")
    if S.stride(1) != 1:
        S = S.contiguous()
    cc = col_sq.detach().to(torch.float32).contiguous()
    if cc.shape != (m,):
        raise ValueError(f"col_sq has shape {tuple(cc.shape)}, expected ({m},)")
    out = torch.empty((n, 2), dtype=torch.float32)
    if n and _loaded().featlearn_nearest_thresholds(
            S.data_ptr(), S.stride(0), int(S.dtype == torch.bfloat16), cc.data_ptr(), n, m, rank,
            out.data_ptr()) != 0:
        raise MemoryError("native thresholds: out of memory")
    return out


@functools.lru_cache(maxsize=64)
def _cell_index(row_bounds, col_bounds):
    """Each map row's and map column's cell number (int32), for :func:`triangle_pool`."""
    return tuple(torch.tensor([i for i, (a, b) in enumerate(bounds) for _ in range(a, b)],
                              dtype=torch.int32) for bounds in (row_bounds, col_bounds))


def _grid(D, n_images, map_shape, row_bounds, col_bounds, pool_op, what):
    """The checks and cell indices shared by the pooling kernels: ``D`` (CPU float32 or
    bfloat16, unit column stride after this) with rows for ``n_images`` maps pooled by sum or
    mean over a grid that tiles the map. Returns ``(D, row_cell, col_cell, n_cells)``."""
    Ph, Pw = map_shape
    n = n_images * Ph * Pw
    if D.device.type != "cpu" or D.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"the native {what} needs CPU float32 or bfloat16 products, got "
                         f"{D.dtype} on {D.device}")
    if pool_op not in ("sum", "mean") or D.shape[0] < n:
        raise ValueError(f"the native {what} pools {n} rows by sum or mean, got "
                         f"{D.shape[0]} rows and {pool_op!r}")
    if D.stride(1) != 1:
        D = D.contiguous()
    for bounds, size in ((row_bounds, Ph), (col_bounds, Pw)):
        edges = [a for a, _ in bounds] + [bounds[-1][1]]
        if edges[0] != 0 or edges[-1] != size or [b for _, b in bounds] != edges[1:]:
            raise ValueError(f"the cells must tile the {Ph}x{Pw} map once (a grid, not windows)")
    row_cell, col_cell = _cell_index(row_bounds, col_bounds)
    return D, row_cell, col_cell, len(row_bounds) * len(col_bounds)


def _mean(out, row_bounds, col_bounds):
    """Sums over the cells -> means, in place."""
    sizes = torch.tensor([[1.0 / ((r1 - r0) * (c1 - c0)) for c0, c1 in col_bounds]
                          for r0, r1 in row_bounds], dtype=torch.float32)
    out *= sizes.view(1, -1, 1)
    return out


def triangle_pool(D: torch.Tensor, n_images: int, map_shape, row_bounds, col_bounds,
                  pool_op: str = "sum") -> torch.Tensor:
    """``(n_images, n_cells, K)``: the triangle activation of ``D`` (squared distances, CPU
    float32 or bfloat16, rows image-major as the encoder lays them out; at least
    ``n_images * rows * cols`` of them) pooled over the grid of ``row_bounds`` x
    ``col_bounds`` with ``"sum"`` or ``"mean"``: what :func:`featlearn.activations.
    activate_and_pool` gives for them, up to float32 summation order."""
    row_bounds, col_bounds = (tuple(map(tuple, b)) for b in (row_bounds, col_bounds))
    D, row_cell, col_cell, n_cells = _grid(D, n_images, map_shape, row_bounds, col_bounds,
                                           pool_op, "triangle")
    K = D.shape[1]
    out = torch.zeros((n_images, n_cells, K), dtype=torch.float32)
    if n_images and _loaded().featlearn_triangle_pool(
            D.data_ptr(), D.stride(0), int(D.dtype == torch.bfloat16), n_images, *map_shape, K,
            row_cell.data_ptr(), col_cell.data_ptr(), len(col_bounds), n_cells,
            out.data_ptr()) != 0:
        raise MemoryError("native triangle: out of memory")
    return _mean(out, row_bounds, col_bounds) if pool_op == "mean" else out


def nearest_pool(S: torch.Tensor, col_sq: torch.Tensor, thresholds: torch.Tensor, n_images: int,
                 map_shape, row_bounds, col_bounds, pool_op: str = "sum") -> torch.Tensor:
    """``(n_images, n_cells, 2K)``: the nearest-fraction code of the products ``S`` (CPU float32
    or bfloat16, rows laid out as for :func:`triangle_pool`) with the rows' ``(n, 2)``
    ``thresholds``, pooled over the grid: what :func:`featlearn.activations.activate_and_pool`
    gives for them (sums exactly; means up to the rounding of the division)."""
    row_bounds, col_bounds = (tuple(map(tuple, b)) for b in (row_bounds, col_bounds))
    S, row_cell, col_cell, n_cells = _grid(S, n_images, map_shape, row_bounds, col_bounds,
                                           pool_op, "nearest-fraction pooling")
    K = S.shape[1]
    cc = col_sq.detach().to(torch.float32).contiguous()
    t = thresholds.detach().to(torch.float32).contiguous()
    rows = n_images * map_shape[0] * map_shape[1]
    if cc.shape != (K,) or t.dim() != 2 or t.shape[1] != 2 or len(t) < rows:
        raise ValueError(f"col_sq of ({K},) and two thresholds per row expected, got "
                         f"{tuple(cc.shape)} and {tuple(t.shape)}")
    out = torch.zeros((n_images, n_cells, 2 * K), dtype=torch.float32)
    if n_images:
        _loaded().featlearn_nearest_pool(
            S.data_ptr(), S.stride(0), int(S.dtype == torch.bfloat16), cc.data_ptr(),
            t.data_ptr(), n_images, *map_shape, K, row_cell.data_ptr(), col_cell.data_ptr(),
            len(col_bounds), n_cells, out.data_ptr())
    return _mean(out, row_bounds, col_bounds) if pool_op == "mean" else out


def _check_assignment_out(values, labels, n):
    """What the assignment kernels write into: contiguous float32 values, int64 labels, n each."""
    if (values.shape != (n,) or labels.shape != (n,) or values.dtype != torch.float32
            or labels.dtype != torch.int64 or not values.is_contiguous()
            or not labels.is_contiguous()):
        raise ValueError("the native assignment writes into contiguous float32 values and int64 "
                         f"labels of {n} rows")


def row_argmin(D: torch.Tensor, values: torch.Tensor, labels: torch.Tensor) -> None:
    """``torch.min(D, 1, out=(values, labels))`` for a CPU float32 ``D`` without NaN (rows may
    be strided): the same minima and the same, first, columns, in one vectorized pass. The
    k-means assignment, where torch's indexed minimum is a scalar loop."""
    n, k = D.shape
    if D.device.type != "cpu" or D.dtype != torch.float32 or D.stride(1) != 1 or k < 1:
        raise ValueError(f"the native argmin needs a CPU float32 block with unit column "
                         f"stride, got {D.dtype} on {D.device}, strides {D.stride()}")
    _check_assignment_out(values, labels, n)
    if n:
        _loaded().featlearn_row_argmin(D.data_ptr(), D.stride(0), n, k, values.data_ptr(),
                                       labels.data_ptr())


#: The bound on ``|bf16 product - x.c| / (|x| |c|)`` that :func:`refine_argmin` allows for, over
#: twice the worst case of bfloat16 rounding (each factor, and the output: 3 units of 2**-8,
#: doubled in ``-2 x.c``, 0.0234) with the float32 sums' error: 2**-5.
REFINE_DELTA = 2.0 ** -5


def refine_argmin(S: torch.Tensor, X: torch.Tensor, C: torch.Tensor, c_sq: torch.Tensor,
                  c_norm: torch.Tensor, values: torch.Tensor, labels: torch.Tensor) -> None:
    """The nearest centre of each row of ``X`` from its bfloat16 products ``S = X C^T``
    (computed with float32 accumulation, as CPU GEMMs do): the few centres that the products'
    rounding bound leaves in contention get their float32 value ``c_sq - 2 x.c``, and the
    smallest, the first on a tie, is written into ``values`` and ``labels``. So the labels are
    those of the float32 distances (up to float32 rounding) at the bfloat16 GEMM's cost."""
    n, k = S.shape
    d = X.shape[1]
    if (S.device.type != "cpu" or S.dtype != torch.bfloat16 or S.stride(1) != 1
            or X.dtype != torch.float32 or X.stride(1) != 1 or X.shape[0] != n
            or C.shape != (k, d) or C.dtype != torch.float32 or not C.is_contiguous()):
        raise ValueError("the native refinement needs CPU bfloat16 products (n, k), float32 "
                         "rows (n, d) and contiguous float32 centres (k, d)")
    cc = c_sq.to(torch.float32).contiguous()
    cn = c_norm.to(torch.float32).contiguous()
    if cc.shape != (k,) or cn.shape != (k,):
        raise ValueError(f"centre norms of ({k},) expected")
    _check_assignment_out(values, labels, n)
    if n and _loaded().featlearn_refine_argmin(
            S.data_ptr(), S.stride(0), X.data_ptr(), X.stride(0), d, C.data_ptr(),
            cc.data_ptr(), cn.data_ptr(), n, k, REFINE_DELTA, values.data_ptr(),
            labels.data_ptr()) != 0:
        raise MemoryError("native refinement: out of memory")


def standardize_rows(X: torch.Tensor, idx: torch.Tensor, mean: torch.Tensor,
                     inv_scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """``((X[idx].float() - mean) * inv_scale).to(dtype)`` for a CPU float16 ``X`` (rows may be
    strided) in one pass: the same numbers (float32 arithmetic, bfloat16 rounded to nearest
    even from it). A classifier's mini-batch from stored float16 features."""
    if (X.device.type != "cpu" or X.dtype != torch.float16 or X.dim() != 2 or X.stride(1) != 1
            or dtype not in (torch.float32, torch.bfloat16)):
        raise ValueError(f"native standardization reads a CPU float16 matrix into float32 or "
                         f"bfloat16, got {X.dtype} on {X.device} into {dtype}")
    F = X.shape[1]
    idx = idx.to(torch.int64).contiguous()
    mean = mean.to(torch.float32).contiguous()
    inv_scale = inv_scale.to(torch.float32).contiguous()
    if mean.shape != (F,) or inv_scale.shape != (F,):
        raise ValueError(f"mean and inv_scale of ({F},) expected")
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(X)):
        raise IndexError(f"row index out of range for {len(X)} rows")
    out = torch.empty((len(idx), F), dtype=dtype)
    if len(idx):
        _loaded().featlearn_standardize_rows(
            X.data_ptr(), X.stride(0), F, idx.data_ptr(), len(idx), mean.data_ptr(),
            inv_scale.data_ptr(), int(dtype == torch.bfloat16), out.data_ptr())
    return out


def minibatch_update(X: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None,
                     C: torch.Tensor, counts: torch.Tensor):
    """One mini-batch k-means update of the CPU float32 centres ``C`` from the batch ``X``
    (rows may be strided) and its ``labels``: the per-centre sums (of ``X * weights`` with
    weights) in row order and the counts (float64) added to ``counts``, then
    ``C + (sums - batch_count * C) / rate`` with ``rate`` the new count (at least 1; 1 where a
    weighted count is 0): what the torch ops of ``index_add_``, ``bincount`` and that formula
    give, bit for bit. Returns ``(new_centres, new_counts, zero_counts)``."""
    n, d = X.shape
    k = C.shape[0]
    if (X.device.type != "cpu" or X.dtype != torch.float32 or X.stride(1) != 1
            or C.shape != (k, d) or C.dtype != torch.float32 or not C.is_contiguous()
            or counts.shape != (k,) or counts.dtype != torch.float64
            or not counts.is_contiguous() or labels.shape != (n,)
            or labels.dtype != torch.int64 or not labels.is_contiguous()):
        raise ValueError("the native mini-batch update needs CPU float32 rows (n, d), int64 "
                         "labels (n,), contiguous float32 centres (k, d) and float64 counts (k,)")
    if weights is not None:
        weights = weights.to(torch.float32).contiguous()
        if weights.shape != (n,):
            raise ValueError(f"weights of ({n},) expected, got {tuple(weights.shape)}")
    sums = torch.empty((k, d), dtype=torch.float32)
    scratch = torch.empty(2 * k, dtype=torch.float64)
    out = torch.empty_like(C)
    zeros = _loaded().featlearn_minibatch_update(
        X.data_ptr(), X.stride(0), n, d, labels.data_ptr(),
        None if weights is None else weights.data_ptr(), C.data_ptr(), k, counts.data_ptr(),
        sums.data_ptr(), scratch.data_ptr(), scratch[k:].data_ptr(), out.data_ptr())
    if zeros < 0:
        raise IndexError(f"a label is outside 0..{k - 1}")
    return out, scratch[k:], int(zeros)
