/* Row reductions of cbn's kernels, in plain C so that compilers vectorise them: L independent double lanes, each
 * accumulated in index order and folded in a fixed pairwise order, so a result depends on the row alone, never on
 * the thread count. Rows shorter than CBN_LONG_ROW use 8 lanes (a cheap fold), longer rows 32 (more independent
 * work per step). Built with -ffp-contract=off, the instruction set does not change the result either: with GCC on
 * x86-64 Linux each function is cloned for AVX2 and AVX-512 and picked at load time (target_clones). */
#ifndef CBN_REDUCE_H
#define CBN_REDUCE_H
#include <stddef.h>

#if defined(_MSC_VER)
#define CBN_RESTRICT __restrict
#else
#define CBN_RESTRICT __restrict__
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CBN_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define CBN_CLONES
#endif

#define CBN_LONG_ROW 128

/* Fold L lanes pairwise: a[l] += a[l + h] for h = L/2, L/4, ..., 1; return a[0]. */
#define CBN_FOLD(a, L)                                                                                \
    for (h = (L) / 2; h > 0; h /= 2)                                                                  \
        for (l = 0; l < h; l++) a[l] += a[l + h];

/* s[0] += sum(x - k), s[1] += sum((x - k)^2) over n values, in double, with L lanes. */
#define CBN_DEFINE_ROW_MOMENTS(NAME, T, L)                                                            \
CBN_CLONES static void NAME(const T *CBN_RESTRICT x, ptrdiff_t n, double k, double *CBN_RESTRICT s) { \
    double a[L] = {0}, q[L] = {0};                                                                    \
    ptrdiff_t i, l, h, nv = n / (L) * (L);                                                            \
    for (i = 0; i < nv; i += (L))                                                                     \
        for (l = 0; l < (L); l++) { double v = (double)x[i + l] - k; a[l] += v; q[l] += v * v; }      \
    for (l = 0; l < n - nv; l++) { double v = (double)x[nv + l] - k; a[l] += v; q[l] += v * v; }     \
    CBN_FOLD(a, L)                                                                                    \
    CBN_FOLD(q, L)                                                                                    \
    s[0] += a[0];                                                                                     \
    s[1] += q[0];                                                                                     \
}

/* s[0] += sum(dy), s[1] += sum(dy * (x - mu)) over n values, in double (centred before multiplying), L lanes. */
#define CBN_DEFINE_ROW_GRAD_SUMS(NAME, T, L)                                                          \
CBN_CLONES static void NAME(const T *CBN_RESTRICT x, const T *CBN_RESTRICT dy, ptrdiff_t n, double mu, \
                            double *CBN_RESTRICT s) {                                                 \
    double a[L] = {0}, q[L] = {0};                                                                    \
    ptrdiff_t i, l, h, nv = n / (L) * (L);                                                            \
    for (i = 0; i < nv; i += (L))                                                                     \
        for (l = 0; l < (L); l++) {                                                                   \
            double g = (double)dy[i + l]; a[l] += g; q[l] += g * ((double)x[i + l] - mu);             \
        }                                                                                             \
    for (l = 0; l < n - nv; l++) {                                                                    \
        double g = (double)dy[nv + l]; a[l] += g; q[l] += g * ((double)x[nv + l] - mu);               \
    }                                                                                                 \
    CBN_FOLD(a, L)                                                                                    \
    CBN_FOLD(q, L)                                                                                    \
    s[0] += a[0];                                                                                     \
    s[1] += q[0];                                                                                     \
}

#define CBN_DEFINE_TYPE(SUFFIX, T)                                                                    \
CBN_DEFINE_ROW_MOMENTS(cbn_row_moments_short_##SUFFIX, T, 8)                                          \
CBN_DEFINE_ROW_MOMENTS(cbn_row_moments_long_##SUFFIX, T, 32)                                          \
CBN_DEFINE_ROW_GRAD_SUMS(cbn_row_grad_sums_short_##SUFFIX, T, 8)                                      \
CBN_DEFINE_ROW_GRAD_SUMS(cbn_row_grad_sums_long_##SUFFIX, T, 32)                                      \
static inline void cbn_row_moments_##SUFFIX(const T *x, ptrdiff_t n, double k, double *s) {          \
    if (n < CBN_LONG_ROW) cbn_row_moments_short_##SUFFIX(x, n, k, s);                                 \
    else cbn_row_moments_long_##SUFFIX(x, n, k, s);                                                   \
}                                                                                                     \
static inline void cbn_row_grad_sums_##SUFFIX(const T *x, const T *dy, ptrdiff_t n, double mu,        \
                                              double *s) {                                            \
    if (n < CBN_LONG_ROW) cbn_row_grad_sums_short_##SUFFIX(x, dy, n, mu, s);                          \
    else cbn_row_grad_sums_long_##SUFFIX(x, dy, n, mu, s);                                            \
}

CBN_DEFINE_TYPE(f, float)
CBN_DEFINE_TYPE(d, double)

#endif
