/* Row reductions of cbn's kernels, in plain C so that compilers vectorise them: CBN_LANES independent double
 * lanes, each accumulated in index order and combined in a fixed order, so a result depends on the row alone, never
 * on the thread count. Built with -ffp-contract=off, the instruction set does not change the result either: with
 * GCC on x86-64 Linux each function is cloned for AVX2 and AVX-512 and picked at load time (target_clones). */
#ifndef CBN_REDUCE_H
#define CBN_REDUCE_H
#include <stddef.h>

#if defined(_MSC_VER)
#define CBN_RESTRICT __restrict
#else
#define CBN_RESTRICT __restrict__
#endif

#define CBN_LANES 32

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CBN_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define CBN_CLONES
#endif

/* Sum of the lanes as a fixed pairwise tree (vectorisable, short dependency chain). */
static inline double cbn_fold(double *a) {
    ptrdiff_t h, l;
    for (h = CBN_LANES / 2; h > 0; h /= 2)
        for (l = 0; l < h; l++) a[l] += a[l + h];
    return a[0];
}

/* s[0] += sum(x - k), s[1] += sum((x - k)^2) over n values, in double. */
#define CBN_DEFINE_ROW_MOMENTS(NAME, T)                                                              \
CBN_CLONES static void NAME(const T *CBN_RESTRICT x, ptrdiff_t n, double k, double *CBN_RESTRICT s) {         \
    double a[CBN_LANES] = {0}, q[CBN_LANES] = {0};                                                  \
    ptrdiff_t i, l, nv = n / CBN_LANES * CBN_LANES;                                                 \
    for (i = 0; i < nv; i += CBN_LANES)                                                             \
        for (l = 0; l < CBN_LANES; l++) { double v = (double)x[i + l] - k; a[l] += v; q[l] += v * v; } \
    for (l = 0; l < n - nv; l++) { double v = (double)x[nv + l] - k; a[l] += v; q[l] += v * v; }   \
    s[0] += cbn_fold(a);                                                                            \
    s[1] += cbn_fold(q);                                                                            \
}

/* s[0] += sum(dy), s[1] += sum(dy * (x - mu)) over n values, in double (centred before multiplying). */
#define CBN_DEFINE_ROW_GRAD_SUMS(NAME, T)                                                            \
CBN_CLONES static void NAME(const T *CBN_RESTRICT x, const T *CBN_RESTRICT dy, ptrdiff_t n, double mu,        \
                 double *CBN_RESTRICT s) {                                                          \
    double a[CBN_LANES] = {0}, q[CBN_LANES] = {0};                                                  \
    ptrdiff_t i, l, nv = n / CBN_LANES * CBN_LANES;                                                 \
    for (i = 0; i < nv; i += CBN_LANES)                                                             \
        for (l = 0; l < CBN_LANES; l++) {                                                           \
            double g = (double)dy[i + l]; a[l] += g; q[l] += g * ((double)x[i + l] - mu);           \
        }                                                                                           \
    for (l = 0; l < n - nv; l++) {                                                                  \
        double g = (double)dy[nv + l]; a[l] += g; q[l] += g * ((double)x[nv + l] - mu);             \
    }                                                                                               \
    s[0] += cbn_fold(a);                                                                            \
    s[1] += cbn_fold(q);                                                                            \
}

CBN_DEFINE_ROW_MOMENTS(cbn_row_moments_f, float)
CBN_DEFINE_ROW_MOMENTS(cbn_row_moments_d, double)
CBN_DEFINE_ROW_GRAD_SUMS(cbn_row_grad_sums_f, float)
CBN_DEFINE_ROW_GRAD_SUMS(cbn_row_grad_sums_d, double)

#endif
