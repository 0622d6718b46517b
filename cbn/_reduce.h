/* The inner loops of cbn's kernels, in plain C so that compilers vectorise them.
 *
 * A span is a set of rows of the (N*C, S) row matrix (see cbn_span); cbn_span_f / cbn_span_d apply one operation
 * to every row of a span, row by row, or, when S == 1, vectorised over the channels of each run.
 *
 * Exactness and determinism: reductions accumulate in double over L independent lanes, each in index order, folded
 * in a fixed pairwise order; S == 1 sums run image by image, one accumulator per channel. A result therefore
 * depends on the span alone, never on the thread count. Elementwise operations compute in double and round once,
 * except the float32 backward's rows (CBN_GRAD with S > 1), computed in float (GT) with the means of x and dy each
 * split into two floats, hi + lo, centred as (x - hi) - lo before scaling: half the vector work, an error of a few
 * float ulps of the terms in dx. S == 1 computes CBN_GRAD in double.
 * Built with -ffp-contract=off (no fused multiply-add), the instruction set does not change a result either: with
 * GCC on x86-64 Linux cbn_span_* are cloned for AVX2 and AVX-512 and picked at load time (target_clones). */
#ifndef CBN_REDUCE_H
#define CBN_REDUCE_H
#include <stddef.h>

#if defined(_MSC_VER)
#define CBN_RESTRICT __restrict
#define CBN_INLINE static __forceinline
#else
#define CBN_RESTRICT __restrict__
#define CBN_INLINE static inline __attribute__((always_inline))
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CBN_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define CBN_CLONES
#endif

/* Rows of the span: nruns runs of run consecutive rows, run j starting at row r0 + j*rstep (rstep a multiple of C
 * when nruns > 1), columns [i0, i1); row r belongs to channel r % C. */
typedef struct {
    ptrdiff_t r0, nruns, rstep, run, i0, i1;
} cbn_span;

/* The operations. p holds per-channel coefficients as consecutive (C,) arrays p[0..3]; sums go to acc[c*cs] and
 * acc[c*cs + off] (cs = 1: one pair of (C,) arrays, off = C; cs = 0: one pair for the whole span, off = 1).
 *   CBN_MOMENTS:   s0 += sum(x - p0),   s1 += sum((x - p0)^2)          (p0: a value of the channel)
 *   CBN_AFFINE:    out = (x - p0)*p1 + p2                             (y = gamma*invstd*(x - mean) + beta)
 *   CBN_GRAD_SUMS: s0 += sum(dy),       s1 += sum(dy*(x - p0))         (centred before multiplying)
 *   CBN_GRAD:      out = (dy - p3)*p1 - (x - p0)*p2                    (dx of the training backward) */
enum { CBN_MOMENTS = 0, CBN_AFFINE = 1, CBN_GRAD_SUMS = 2, CBN_GRAD = 3 };

/* Rows shorter than this reduce over 8 lanes (a cheap fold), longer ones over 32 (more independent work). */
#define CBN_LONG_ROW 128
/* Channels per pass of the S == 1 sums, so that their accumulators stay in L1. */
#define CBN_COL_CHUNK 512

#define CBN_FOLD(a, L)                                                                                \
    for (h = (L) / 2; h > 0; h /= 2)                                                                  \
        for (l = 0; l < h; l++) a[l] += a[l + h];

/* Row reduction over L lanes: *s0 += sum(a_), *s1 += sum(b_) for the per-element terms that TERMS computes
 * from index e. A function of its own (cloned): inlined into a larger loop, GCC no longer vectorises the lanes. */
#define CBN_ROW_SUMS(NAME, T, L, TERMS)                                                               \
CBN_CLONES static void NAME(const T *CBN_RESTRICT x, const T *CBN_RESTRICT dy, ptrdiff_t n, double k, \
                     double *CBN_RESTRICT s0, double *CBN_RESTRICT s1) {                              \
    double a[L] = {0}, q[L] = {0};                                                                    \
    ptrdiff_t i, l, h, nv = n / (L) * (L);                                                            \
    (void)dy;                                                                                         \
    for (i = 0; i < nv; i += (L))                                                                     \
        for (l = 0; l < (L); l++) { ptrdiff_t e = i + l; double a_, b_; TERMS; a[l] += a_; q[l] += b_; } \
    for (l = 0; l < n - nv; l++) { ptrdiff_t e = nv + l; double a_, b_; TERMS; a[l] += a_; q[l] += b_; } \
    CBN_FOLD(a, L)                                                                                    \
    CBN_FOLD(q, L)                                                                                    \
    *s0 += a[0];                                                                                      \
    *s1 += q[0];                                                                                      \
}

#define CBN_MOMENT_TERMS a_ = (double)x[e] - k; b_ = a_ * a_
#define CBN_GRAD_TERMS a_ = (double)dy[e]; b_ = a_ * ((double)x[e] - k)

#define CBN_DEFINE_SPAN(SFX, T, GT)                                                                   \
CBN_ROW_SUMS(cbn_moments8_##SFX, T, 8, CBN_MOMENT_TERMS)                                              \
CBN_ROW_SUMS(cbn_moments32_##SFX, T, 32, CBN_MOMENT_TERMS)                                            \
CBN_ROW_SUMS(cbn_grad_sums8_##SFX, T, 8, CBN_GRAD_TERMS)                                              \
CBN_ROW_SUMS(cbn_grad_sums32_##SFX, T, 32, CBN_GRAD_TERMS)                                            \
                                                                                                      \
/* One row of n values of channel coefficients (k, a, b, d) = (p0, p1, p2, p3)[c]. */                 \
CBN_INLINE void cbn_row_##SFX(int op, const T *CBN_RESTRICT x, const T *CBN_RESTRICT dy,              \
                              T *CBN_RESTRICT out, ptrdiff_t n, double k, double a, double b, double d, \
                              double *s0, double *s1) {                                               \
    ptrdiff_t i;                                                                                      \
    if (op == CBN_MOMENTS) {                                                                          \
        if (n < CBN_LONG_ROW) cbn_moments8_##SFX(x, dy, n, k, s0, s1);                                \
        else cbn_moments32_##SFX(x, dy, n, k, s0, s1);                                                \
    } else if (op == CBN_GRAD_SUMS) {                                                                 \
        if (n < CBN_LONG_ROW) cbn_grad_sums8_##SFX(x, dy, n, k, s0, s1);                              \
        else cbn_grad_sums32_##SFX(x, dy, n, k, s0, s1);                                              \
    } else if (op == CBN_AFFINE) {                                                                    \
        for (i = 0; i < n; i++) out[i] = (T)(((double)x[i] - k) * a + b);                             \
    } else {                                                                                          \
        const GT hi = (GT)k, lo = (GT)(k - (double)hi), dhi = (GT)d, dlo = (GT)(d - (double)dhi);      \
        const GT ga = (GT)a, gb = (GT)b;                                                              \
        for (i = 0; i < n; i++)                                                                       \
            out[i] = (T)((((GT)dy[i] - dhi) - dlo) * ga - (((GT)x[i] - hi) - lo) * gb);               \
    }                                                                                                 \
}                                                                                                     \
                                                                                                      \
/* S == 1: nimg runs of w channels, run i at x + i*ld, coefficient arrays p[0..3] at stride pstride: the \
 * operation vectorised over channels; sums accumulate image by image, one accumulator per channel. */ \
CBN_INLINE void cbn_cols_##SFX(int op, const T *CBN_RESTRICT x, const T *CBN_RESTRICT dy,             \
                               T *CBN_RESTRICT out, ptrdiff_t nimg, ptrdiff_t ld, ptrdiff_t w,        \
                               const double *CBN_RESTRICT p, ptrdiff_t pstride,                       \
                               double *CBN_RESTRICT s0, double *CBN_RESTRICT s1) {                    \
    const double *k = p, *a = p + pstride, *b = p + 2 * pstride, *d = p + 3 * pstride;                \
    ptrdiff_t i, c, c0, c1;                                                                           \
    if (op == CBN_AFFINE) {                                                                           \
        for (i = 0; i < nimg; i++) {                                                                  \
            const T *xi = x + i * ld;                                                                 \
            T *oi = out + i * ld;                                                                     \
            for (c = 0; c < w; c++) oi[c] = (T)(((double)xi[c] - k[c]) * a[c] + b[c]);                \
        }                                                                                             \
    } else if (op == CBN_GRAD) {                                                                      \
        for (i = 0; i < nimg; i++) {                                                                  \
            const T *xi = x + i * ld, *gi = dy + i * ld;                                              \
            T *oi = out + i * ld;                                                                     \
            for (c = 0; c < w; c++)                                                                   \
                oi[c] = (T)(((double)gi[c] - d[c]) * a[c] - ((double)xi[c] - k[c]) * b[c]);           \
        }                                                                                             \
    } else {                                                                                          \
        for (c0 = 0; c0 < w; c0 += CBN_COL_CHUNK) {                                                   \
            c1 = c0 + CBN_COL_CHUNK < w ? c0 + CBN_COL_CHUNK : w;                                     \
            for (i = 0; i < nimg; i++) {                                                              \
                const T *xi = x + i * ld, *gi;                                                        \
                if (op == CBN_MOMENTS)                                                                \
                    for (c = c0; c < c1; c++) {                                                       \
                        double v = (double)xi[c] - k[c]; s0[c] += v; s1[c] += v * v;                  \
                    }                                                                                 \
                else                                                                                  \
                    for (gi = dy + i * ld, c = c0; c < c1; c++) {                                     \
                        double g = (double)gi[c]; s0[c] += g; s1[c] += g * ((double)xi[c] - k[c]);    \
                    }                                                                                 \
            }                                                                                         \
        }                                                                                             \
    }                                                                                                 \
}                                                                                                     \
                                                                                                      \
/* Apply op to every row of span s of the (N*C, S) matrices x, dy, out (see the operations above). */ \
CBN_CLONES static void cbn_span_##SFX(int op, const T *x, const T *dy, T *out, cbn_span s, ptrdiff_t S, \
                                      ptrdiff_t C, const double *p, double *acc, ptrdiff_t cs,        \
                                      ptrdiff_t off) {                                                \
    ptrdiff_t j, q, r, c, c0 = s.r0 % C;                                                              \
    if (S == 1 && c0 + s.run <= C && (acc == NULL || cs == 1)) {                                      \
        double *s0 = acc ? acc + c0 : acc;                                                            \
        cbn_cols_##SFX(op, x + s.r0, dy ? dy + s.r0 : dy, out ? out + s.r0 : out, s.nruns, s.rstep,   \
                       s.run, p + c0, C, s0, s0 ? s0 + off : s0);                                     \
        return;                                                                                       \
    }                                                                                                 \
    for (j = 0; j < s.nruns; j++) {                                                                   \
        for (q = 0, c = c0; q < s.run; q++) {                                                         \
            double *s0 = acc ? acc + c * cs : acc;                                                    \
            r = (s.r0 + j * s.rstep + q) * S + s.i0;                                                  \
            cbn_row_##SFX(op, x + r, dy ? dy + r : dy, out ? out + r : out, s.i1 - s.i0, p[c],        \
                          p[C + c], p[2 * C + c], p[3 * C + c], s0, s0 ? s0 + off : s0);              \
            if (++c == C) c = 0;                                                                      \
        }                                                                                             \
    }                                                                                                 \
}

CBN_DEFINE_SPAN(f, float, float)
CBN_DEFINE_SPAN(d, double, double)

/* The benchmark's rooflines, cloned like the kernels: out = a (forward) and out = a + b (backward), n values.
 * The copy stays a load/store loop like the kernels' (GCC would call memcpy, whose non-temporal stores for large
 * arrays measured slower here). */
#if defined(__GNUC__) && !defined(__clang__)
#define CBN_NO_MEMCPY __attribute__((optimize("no-tree-loop-distribute-patterns")))
#else
#define CBN_NO_MEMCPY
#endif
#define CBN_DEFINE_ROOFLINE(SFX, T)                                                                   \
CBN_CLONES CBN_NO_MEMCPY static void cbn_copy_##SFX(const T *CBN_RESTRICT a, T *CBN_RESTRICT out, ptrdiff_t n) { \
    ptrdiff_t i;                                                                                      \
    for (i = 0; i < n; i++) out[i] = a[i];                                                            \
}                                                                                                     \
CBN_CLONES static void cbn_add_##SFX(const T *CBN_RESTRICT a, const T *CBN_RESTRICT b, T *CBN_RESTRICT out, \
                                     ptrdiff_t n) {                                                   \
    ptrdiff_t i;                                                                                      \
    for (i = 0; i < n; i++) out[i] = a[i] + b[i];                                                     \
}

CBN_DEFINE_ROOFLINE(f, float)
CBN_DEFINE_ROOFLINE(d, double)

#endif
