# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled batch-norm kernels: typed memoryviews, fused float/double, OpenMP ``prange``.

The caller passes an (N, C, S) tensor (S = product of the sizes after the channel axis) as a C-contiguous
(N, W) array, W = C*S: row n is image n, channel c occupies columns [c*S, (c+1)*S). A call goes through one
``Layout`` of that matrix, one of two kinds:

- channel-major (rows of S >= SHORT_ROW values): block k is a group of channels x a range of images x a piece of
  the rows, in memory order; a row is summed over LANES fixed lanes (value e in lane e % LANES), short rows down the
  block's images with a lane per column.
- channel-minor ((N, C) input, S == 1, and short rows): block k is a range of rows x a range of at most COL_BLOCK
  columns; sums run down the columns, one accumulator pair per column, vectorised across columns; column j belongs
  to channel (j // S) % C. An (N*S, C, 1) view of channels-last memory is this case as it is. Narrow rows are
  folded: k consecutive rows (k dividing N) are taken as one row of k*C*S columns, so that the loops across
  columns have enough of them.

Every operation (statistics, normalisation, gradient sums, dx, and the statistics-only and two-step calls of
SyncBatchNorm) is the same three steps over the blocks: partial sums of each block (``_block_sums``), their merge in
block order (``_merge``), then the elementwise pass over the same blocks (``_block_apply``). Blocks whose
channels are whole (``Layout.fused``) do all three in one task, so a channel leaves memory once; so do the
backward's channel-minor blocks when each holds all the rows of its columns (``_whole_columns``).

Masked statistics: position weights (one word per position of the (N, C, S) tensor without its channel axis)
restrict the moment sums to the counted positions, and the dx pass applies the batch-statistics correction there
only; a row's weights are read as a contiguous array (channel-minor folded rows gather theirs into a stack buffer).

Determinism: the blocks depend on (N, C, S) only, never on the thread count; partial sums are merged in block order,
fixed lanes are folded in a fixed order, and the build has no FMA contraction: any thread count and any
instruction-set level gives the same bits. Arguments are marked IN, OUT or INOUT; outputs are caller-allocated,
and nothing here allocates more than the small scratch of partial sums and coefficients.
"""
cimport numpy as cnp
from cython.parallel cimport prange
from libc.float cimport FLT_MAX, FLT_MIN
from libc.math cimport INFINITY, fabs, sqrt, sqrtf
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

import numpy as np

cnp.import_array()

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define CBN_OPENMP 1
    static int cbn_max_threads(void) { return omp_get_max_threads(); }
    #else
    #define CBN_OPENMP 0
    static int cbn_max_threads(void) { return 1; }
    #endif
    #ifndef CBN_BUILD_INFO
    #define CBN_BUILD_INFO "unknown"
    #endif
    typedef union { float f; unsigned int u; } cbn_float_bits;
    static inline unsigned int cbn_magnitude(float v) { cbn_float_bits b; b.f = v; return b.u & 0x7fffffffu; }
    static inline float cbn_float_of(unsigned int u) { cbn_float_bits b; b.u = u; return b.f; }
    static inline float cbn_keep_float(float v, int keep) {
        cbn_float_bits b; b.f = v; b.u &= 0u - (unsigned int)(keep != 0); return b.f; }
    static inline unsigned short cbn_peak_up(unsigned int m) {
        return (unsigned short)(((m < 0x7f800000u ? m : 0x7f800000u) + 0x7fffu) >> 15); }
    static inline unsigned short cbn_peak_down(unsigned int m) { return (unsigned short)(m >> 15); }
    static inline float cbn_peak_value(unsigned short p) { return cbn_float_of((unsigned int)p << 15); }
    #if defined(__SSE2__) || (defined(_M_X64) && !defined(_M_ARM64EC))
    #include <immintrin.h>
    #define CBN_STREAM_STORES 1
    #if defined(__AVX512F__)
    #define CBN_VECTOR_BYTES 64
    #define cbn_stream_ps(p, s) _mm512_stream_ps(p, _mm512_loadu_ps(s))
    #define cbn_stream_pd(p, s) _mm512_stream_pd(p, _mm512_loadu_pd(s))
    #elif defined(__AVX__)
    #define CBN_VECTOR_BYTES 32
    #define cbn_stream_ps(p, s) _mm256_stream_ps(p, _mm256_loadu_ps(s))
    #define cbn_stream_pd(p, s) _mm256_stream_pd(p, _mm256_loadu_pd(s))
    #else
    #define CBN_VECTOR_BYTES 16
    #define cbn_stream_ps(p, s) _mm_stream_ps(p, _mm_loadu_ps(s))
    #define cbn_stream_pd(p, s) _mm_stream_pd(p, _mm_loadu_pd(s))
    #endif
    #define CBN_STREAM_BODY(stream)                                                                     \
        Py_ssize_t i = 0, step = CBN_VECTOR_BYTES / (Py_ssize_t)sizeof(*dst);                           \
        for (; i < n && (size_t)(dst + i) % CBN_VECTOR_BYTES; i++) dst[i] = src[i];                    \
        for (; i + step <= n; i += step) stream(dst + i, src + i);                                      \
        for (; i < n; i++) dst[i] = src[i];
    static inline void cbn_stream_fence(void) { _mm_sfence(); }
    #else
    #define CBN_STREAM_STORES 0
    #define CBN_VECTOR_BYTES 16
    #define CBN_STREAM_BODY(stream) memcpy(dst, src, (size_t)n * sizeof(*dst));
    static inline void cbn_stream_fence(void) {}
    #endif
    #if defined(__GNUC__) || defined(__clang__)
    static inline void cbn_prefetch(const void *p) { __builtin_prefetch(p, 0, 3); }
    #elif defined(_M_X64) && !defined(_M_ARM64EC)
    static inline void cbn_prefetch(const void *p) { _mm_prefetch((const char *)p, _MM_HINT_T0); }
    #else
    static inline void cbn_prefetch(const void *p) { (void)p; }
    #endif
    /* The sums of a channel-major row cut into nrows rows of CBN_LANES values (_row_lanes) at x (and dy), added
       into its lanes s[0:16] and s[16:32] as _column_sums adds them: u = x - k, w = u (the moments:
       cbn_row_moments_T) or dy (the gradient sums: cbn_row_grads_T), four rows a step, s[j] += (w0 + w1) +
       (w2 + w3), s[16 + j] += (w0*u0 + w1*u1) + (w2*u2 + w3*u3), then the remaining rows one at a time; each step
       prefetches the lines `step` values ahead, `jump` values further where that passes the rows' end. The lanes
       stay in registers, in GCC's and clang's vector types of 4 lanes (in _column_sums they are memory, loaded
       and stored every step): long-row backwards in cache took 0.90-0.93x the time of ca8cce3's, beyond the caches
       1.02-1.04x (where _column_sums in the same build took 1.02-1.06x this one's; EPYC, Zen 3). With AVX only
       (CBN_LANES_IN_REGISTERS): in SSE2's 16 registers of 2 doubles they spilled (the baseline level's training
       forwards and backwards 1.03-1.07x the time of _column_sums'). */
    #define CBN_LANES 16
    #if (defined(__GNUC__) || defined(__clang__)) && defined(__AVX__)
    #define CBN_LANES_IN_REGISTERS 1
    typedef double cbn_d4 __attribute__((vector_size(32)));
    typedef double cbn_d4_at __attribute__((vector_size(32), aligned(8), may_alias));  /* 4 doubles anywhere */
    static inline cbn_d4 cbn_lane4_float(const float *p) { return (cbn_d4)_mm256_cvtps_pd(_mm_loadu_ps(p)); }
    static inline cbn_d4 cbn_lane4_double(const double *p) { return *(const cbn_d4_at *)p; }
    #define CBN_ROW_SUMS(NAME, T, GRAD)                                                                     \
    static inline void NAME##_##T(const T *x, const T *dy, Py_ssize_t nrows, double k, double *s,            \
                                  Py_ssize_t step, Py_ssize_t jump) {                                        \
        cbn_d4 s0[4], s1[4], u0, u1, u2, u3, w0, w1, w2, w3, a, b, K = {k, k, k, k};                         \
        Py_ssize_t r, l, q, t, o, end = nrows * CBN_LANES, ahead = 4 * CBN_LANES * (Py_ssize_t)sizeof(T) / 64;\
        memcpy(s0, s, sizeof s0);                                                                            \
        memcpy(s1, s + CBN_LANES, sizeof s1);                                                                \
        for (r = 0; r + 4 <= nrows; r += 4) {                                                                \
            t = r * CBN_LANES + step;                                                                        \
            if (t >= end) t += jump;                                                                         \
            for (q = 0; q < ahead; q++) {                                                                    \
                cbn_prefetch((const char *)(x + t) + q * 64);                                                \
                if (GRAD) cbn_prefetch((const char *)(dy + t) + q * 64);                                     \
            }                                                                                                \
            for (l = 0; l < 4; l++) {                                                                        \
                o = r * CBN_LANES + 4 * l;                                                                   \
                u0 = cbn_lane4_##T(x + o) - K;                                                               \
                u1 = cbn_lane4_##T(x + o + CBN_LANES) - K;                                                   \
                w0 = GRAD ? cbn_lane4_##T(dy + o) : u0;                                                      \
                w1 = GRAD ? cbn_lane4_##T(dy + o + CBN_LANES) : u1;                                          \
                a = w0 + w1;                                                                                 \
                b = w0 * u0 + w1 * u1;                                                                       \
                u2 = cbn_lane4_##T(x + o + 2 * CBN_LANES) - K;                                               \
                u3 = cbn_lane4_##T(x + o + 3 * CBN_LANES) - K;                                               \
                w2 = GRAD ? cbn_lane4_##T(dy + o + 2 * CBN_LANES) : u2;                                      \
                w3 = GRAD ? cbn_lane4_##T(dy + o + 3 * CBN_LANES) : u3;                                      \
                s0[l] += a + (w2 + w3);                                                                      \
                s1[l] += b + (w2 * u2 + w3 * u3);                                                            \
            }                                                                                                \
        }                                                                                                    \
        for (; r < nrows; r++)                                                                               \
            for (l = 0; l < 4; l++) {                                                                        \
                o = r * CBN_LANES + 4 * l;                                                                   \
                u0 = cbn_lane4_##T(x + o) - K;                                                               \
                w0 = GRAD ? cbn_lane4_##T(dy + o) : u0;                                                      \
                s0[l] += w0;                                                                                 \
                s1[l] += w0 * u0;                                                                            \
            }                                                                                                \
        memcpy(s, s0, sizeof s0);                                                                            \
        memcpy(s + CBN_LANES, s1, sizeof s1);                                                                \
    }
    #else  /* never called: _row_lanes runs _column_sums */
    #define CBN_LANES_IN_REGISTERS 0
    #define CBN_ROW_SUMS(NAME, T, GRAD)                                                                     \
    static inline void NAME##_##T(const T *x, const T *dy, Py_ssize_t nrows, double k, double *s,            \
                                  Py_ssize_t step, Py_ssize_t jump) {}
    #endif
    CBN_ROW_SUMS(cbn_row_moments, float, 0)
    CBN_ROW_SUMS(cbn_row_moments, double, 0)
    CBN_ROW_SUMS(cbn_row_grads, float, 1)
    CBN_ROW_SUMS(cbn_row_grads, double, 1)
    /* whether cpuid's vendor string is "AuthenticAMD" (EBX, EDX, ECX): read with the instruction itself, as
       __builtin_cpu_is needs a runtime symbol (__cpu_model) that Apple's toolchain lacks */
    #define CBN_AUTHENTIC_AMD(b, c, d) ((b) == 0x68747541u && (d) == 0x69746e65u && (c) == 0x444d4163u)
    #if defined(_MSC_VER) && (defined(_M_X64) || defined(_M_IX86)) && !defined(_M_ARM64EC)
    #include <intrin.h>
    static int cbn_cpu_is_amd(void) {
        int r[4]; __cpuid(r, 0); return CBN_AUTHENTIC_AMD((unsigned)r[1], (unsigned)r[2], (unsigned)r[3]); }
    #elif (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
    #include <cpuid.h>
    static int cbn_cpu_is_amd(void) {
        unsigned a, b, c, d; return __get_cpuid(0, &a, &b, &c, &d) && CBN_AUTHENTIC_AMD(b, c, d); }
    #else
    static int cbn_cpu_is_amd(void) { return 0; }
    #endif
    static inline void cbn_stream_float(float *dst, const float *src, Py_ssize_t n) { CBN_STREAM_BODY(cbn_stream_ps) }
    static inline void cbn_stream_double(double *dst, const double *src, Py_ssize_t n) {
        CBN_STREAM_BODY(cbn_stream_pd) }
    """
    const int CBN_OPENMP
    const char *CBN_BUILD_INFO
    int cbn_max_threads() noexcept nogil
    # |v| as an unsigned integer in the order of the magnitudes (NaN above inf), and back
    unsigned int cbn_magnitude(float v) noexcept nogil
    float cbn_float_of(unsigned int u) noexcept nogil
    float cbn_keep_float(float v, int keep) noexcept nogil
    # a magnitude (as cbn_magnitude gives it, below 2**31) kept to 16 bits (a peak: _grad_check): its exponent and
    # top 8 bits of mantissa, rounded up (NaN: inf) or down; and the float32 value of such a peak
    unsigned short cbn_peak_up(unsigned int m) noexcept nogil
    unsigned short cbn_peak_down(unsigned int m) noexcept nogil
    float cbn_peak_value(unsigned short p) noexcept nogil
    # dst[0:n] = src[0:n] with non-temporal stores (the aligned part; x86-64 only, elsewhere a memcpy), and the
    # fence that orders them before later stores (once a pass is done)
    const bint CBN_STREAM_STORES
    const int CBN_VECTOR_BYTES  # bytes of the widest vectors of the instruction set compiled for (16 elsewhere)
    void cbn_stream_float(float *dst, const float *src, Py_ssize_t n) noexcept nogil
    void cbn_stream_double(double *dst, const double *src, Py_ssize_t n) noexcept nogil
    void cbn_stream_fence() noexcept nogil
    # a hint to load the cache line at p (any address: it never faults)
    void cbn_prefetch(const void *p) noexcept nogil
    # _row_lanes' sums of Moments and GradSums with the lanes in registers, where CBN_LANES_IN_REGISTERS (dy is not
    # read by the moments)
    const bint CBN_LANES_IN_REGISTERS
    enum: CBN_LANES
    void cbn_row_moments_float(const float *x, const float *dy, Py_ssize_t nrows, double k, double *s,
                               Py_ssize_t step, Py_ssize_t jump) noexcept nogil
    void cbn_row_moments_double(const double *x, const double *dy, Py_ssize_t nrows, double k, double *s,
                                Py_ssize_t step, Py_ssize_t jump) noexcept nogil
    void cbn_row_grads_float(const float *x, const float *dy, Py_ssize_t nrows, double k, double *s,
                             Py_ssize_t step, Py_ssize_t jump) noexcept nogil
    void cbn_row_grads_double(const double *x, const double *dy, Py_ssize_t nrows, double k, double *s,
                              Py_ssize_t step, Py_ssize_t jump) noexcept nogil
    # whether the CPU running this is AMD's (x86 only; elsewhere 0)
    int cbn_cpu_is_amd() noexcept nogil
    # pointers to memory that no other pointer of the function reaches (GCC then vectorises without alias checks)
    ctypedef unsigned short *peak_row "unsigned short *__restrict__"
    ctypedef float *float_row "float *__restrict__"
    ctypedef const float *const_float_row "const float *__restrict__"
    ctypedef double *double_row "double *__restrict__"

ctypedef fused floating:
    float
    double

ctypedef fused floating_row:  # a floating pointer that no other pointer of the function writes through (restrict)
    float_row
    double_row

ctypedef fused coef_t:  # a coefficient row: double (coef, cc) or a float32 pass's own (_single_coefs)
    float
    double

# The operations, as types of a fused argument: each kernel is specialised for its operation at compile time.
# a = x (dy for the eval backward, which scales dy, except AffineGated), d = dy, e = the extra input: the residual z
# of a forward, the saved output y of a forward with ReLU and a residual in a backward; masked(d) = d where e > 0,
# else 0. gated(d) = d where the forward's ReLU let its value through, recomputed from a = x (see _gate), else 0.
cdef struct Moments:         # sums of u = x - K: s0 += u, s1 += u*u
    char tag
cdef struct GradSums:        # s0 += dy, s1 += dy*(x - K)
    char tag
cdef struct GradSumsMasked:  # s0 += masked(dy), s1 += masked(dy)*(x - K)
    char tag
cdef struct GradSumsGated:   # s0 += gated(dy), s1 += gated(dy)*(x - K)
    char tag
cdef struct Affine:          # out = (a - c0)*c1 + c2
    char tag
cdef struct AffineRelu:      # out = max(0, (a - c0)*c1 + c2)
    char tag
cdef struct AffineAdd:       # out = (a - c0)*c1 + c2 + e
    char tag
cdef struct AffineAddRelu:   # out = max(0, (a - c0)*c1 + c2 + e)
    char tag
cdef struct AffineGated:     # out = (gated(d) - c0)*c1 + c2
    char tag
cdef struct AffineMaskedDz:  # out = (masked(a) - c0)*c1 + c2, and dz = masked(a)
    char tag
cdef struct Grad:            # out = (d - c3)*c1 - (a - c0)*c2
    char tag
cdef struct GradGated:       # out = (gated(d) - c3)*c1 - (a - c0)*c2
    char tag
cdef struct GradMaskedDz:    # out = (masked(d) - c3)*c1 - (a - c0)*c2, and dz = masked(d)
    char tag
cdef struct GradSingle:      # Grad in float32, with the peaks of its check (see _grad_check)
    char tag
cdef struct GradGatedSingle:  # GradGated in float32, likewise
    char tag
# With position weights v (1 where a position counts in the statistics, else 0; see Positions):
cdef struct MomentsValid:    # Moments over the positions with v = 1
    char tag
cdef struct GradValid:       # out = (d - c3)*c1 - (a - c0)*c2 where v = 1, else d*c1
    char tag
cdef struct GradGatedValid:     # GradValid of gated(d)
    char tag
cdef struct GradMaskedDzValid:  # GradValid of masked(d), and dz = masked(d)
    char tag

ctypedef fused SumOp:
    Moments
    MomentsValid
    GradSums
    GradSumsMasked
    GradSumsGated

ctypedef fused ApplyOp:
    Affine
    AffineRelu
    AffineAdd
    AffineAddRelu
    AffineGated
    AffineMaskedDz
    Grad
    GradGated
    GradMaskedDz
    GradValid
    GradGatedValid
    GradMaskedDzValid
    GradSingle
    GradGatedSingle

# DxSingle: the dx passes in float32, GradSingle and GradGatedSingle (_dx_single).
ctypedef fused SingleOp:  # the passes in float32 (_single): the affine ones and DxSingle
    Affine
    AffineRelu
    AffineAdd
    AffineAddRelu
    GradSingle
    GradGatedSingle

ctypedef fused DxDouble:  # the double passes a float32 dx pass falls back to, per channel
    Grad
    GradGated

ctypedef fused AnyOp:  # every op (_dy)
    GradSumsGated
    AffineGated
    GradGated
    GradGatedValid
    GradSums
    GradSumsMasked
    Moments
    MomentsValid
    Affine
    AffineRelu
    AffineAdd
    AffineAddRelu
    AffineMaskedDz
    Grad
    GradMaskedDz
    GradValid
    GradMaskedDzValid
    GradSingle
    GradGatedSingle

# The elementwise passes by number (a call picks one at run time; each block runs its compiled specialisation).
cpdef enum Pass:
    AFFINE = 0
    AFFINE_RELU = 1
    AFFINE_ADD = 2
    AFFINE_ADD_RELU = 3
    AFFINE_GATED = 4
    AFFINE_MASKED_DZ = 5
    GRAD = 6
    GRAD_GATED = 7
    GRAD_MASKED_DZ = 8
    GRAD_VALID = 9
    GRAD_GATED_VALID = 10
    GRAD_MASKED_DZ_VALID = 11
    GRAD_SINGLE = 12
    GRAD_GATED_SINGLE = 13  # GRAD_SINGLE and up: the float32 dx passes (_checked)


# Position weights of masked statistics. Position p = n*S + s of the (N, C, S) tensor (the input without its
# channel axis) counts where valid[p] is 1 (else 0). The values of a channel-major row are at consecutive positions;
# column j of a channel-minor folded row (k rows of C*S values) is at (j // (C*S))*S + j % S of the row's k*S
# positions: j // C when S == 1 (runs of C columns), else the table col.
cdef struct Positions:
    const Py_ssize_t *valid      # (N*S,), or NULL: every position counts
    Py_ssize_t run               # channel-minor with S == 1: C; else 0
    const Py_ssize_t *col        # channel-minor with S > 1: the position of each column; else NULL


cdef inline double _relu(double v) noexcept nogil:
    """max(0, v) with NaN kept (as torch's relu)."""
    return 0.0 if v < 0.0 else v


cdef inline floating _dy(AnyOp op, floating a, floating d, floating e, const floating *h, Py_ssize_t hs,
                         Py_ssize_t j) noexcept nogil:
    """The dy an op reads at input a, in the data's type (selected before any conversion to double): for the
    Gated ops gated(d), d where the forward's ReLU let a through (h[j] <= a <= h[hs + j], the interval of the
    inputs it passed: _gate_coef), else 0; for the masked ones masked(d) = d where e > 0, else 0 (a NaN e: 0, as
    torch); else d."""
    if (AnyOp is GradSumsGated or AnyOp is AffineGated or AnyOp is GradGated or AnyOp is GradGatedValid
            or AnyOp is GradGatedSingle):
        return _keep(d, (a >= h[j]) & (a <= h[hs + j]))
    elif AnyOp is GradSumsMasked or AnyOp is GradMaskedDz or AnyOp is GradMaskedDzValid:
        return _keep(d, e > 0)
    return d


cdef inline floating _keep(floating d, bint keep) noexcept nogil:
    """d where keep, else +0 (a NaN d too). Float32 by masking its bits, so that the mask stays float32 where the
    value is converted to double after (a select there took a mask widened to double, two per vector)."""
    cdef floating zero = 0.0
    if floating is float:
        return cbn_keep_float(d, keep)
    return d if keep else zero


cdef inline double _value(ApplyOp op, double a, double d, double e, double c0, double c1, double c2, double c3,
                          Py_ssize_t v) noexcept nogil:
    """One value of an elementwise pass, in double (see the ApplyOp structs; d: the dy the op reads, _dy, so
    gated or masked already; v: the position's weight)."""
    if ApplyOp is Affine:
        return (a - c0) * c1 + c2
    elif ApplyOp is AffineRelu:
        return _relu((a - c0) * c1 + c2)
    elif ApplyOp is AffineAdd:
        return (a - c0) * c1 + c2 + e
    elif ApplyOp is AffineAddRelu:
        return _relu((a - c0) * c1 + c2 + e)
    elif ApplyOp is AffineGated:
        return (d - c0) * c1 + c2
    elif ApplyOp is AffineMaskedDz:
        return (_keep(a, e > 0) - c0) * c1 + c2
    elif _weighted(op):
        return (d - c3) * c1 - (a - c0) * c2 if v else d * c1
    else:  # Grad, GradGated, GradMaskedDz (GradSingle, GradGatedSingle in double: never selected, float32 only)
        return (d - c3) * c1 - (a - c0) * c2


# The unit roundoff of float32 (half its machine epsilon): 2**-24.
cdef double U32 = 5.9604644775390625e-08

cdef enum:
    COL_CHUNK = 512       # columns per pass of the column sums (minor from memory: _sum_chunk): accumulators in L1
    # values of padding after each float32 coefficient row and peaks row: rows W apart with W a multiple of 1024
    # would share their L1 sets (10 streams, 8 ways)
    SKEW = 16
    LANES = CBN_LANES     # fixed lanes of a channel-major row sum (16)
    # The affine passes in cache take the values before the output's first vector boundary (CBN_VECTOR_BYTES) on
    # their own where a run holds more than ALIGNED_RUN of them (_block_apply, _aligned_from): the columns of a
    # channel-minor block taken four rows at a time (float32 affine passes, double passes), from its first row on
    # (rows a whole number of vectors wide keep the alignment), and each channel-major row, so that no vector store
    # straddles two cache lines (with AVX-512 and y 16 bytes past a line, as NumPy allocates arrays three times in
    # four: the (256, 512) eval took 1.9x the time, the (1, 64, 56, 56) one 1.15x).
    # Shorter runs lose more to the split than they gain.
    ALIGNED_RUN = 64

# Rows shorter than this go channel-minor (given MIN_IMAGES images): a row of a few values would cost more than it
# holds. Longer rows go channel-major.
cdef Py_ssize_t SHORT_ROW = 16
cdef Py_ssize_t MIN_IMAGES = 4
# Blocks of short rows (summed down their images, _block_sums) take up to this many images, as long as there are
# MIN_BLOCKS blocks per channel.
cdef Py_ssize_t SHORT_IMAGES = 16
cdef Py_ssize_t MIN_BLOCKS = 8
# Values per block (about 128 KB of float32: a block stays in L2 between its sums and its elementwise pass).
cdef Py_ssize_t BLOCK = 1 << 15
# Channel-major blocks of whole channels (sums, statistics and output in one task, so that a channel leaves memory once)
# for tensors beyond the caches (FUSE_MIN values) whose channel holds at most FUSE_PLANE values, with at least MIN_TASKS
# channels: a group holds about FUSE_GROUP values but at most C // MIN_TASKS channels (tasks for all threads), and its
# run in each image (group*S contiguous values) must be at least FUSE_RUN long (the backward's FUSE_GRAD_ROW_RUN), or
# the jumps between images defeat the prefetchers (the backward, which reads a group twice, in groups with runs of 3136
# to 4000 values against blocks in memory order at 1 / 2 threads: (64, 64, 56, 56) 0.88x / 0.84x the time,
# (64, 128, 28, 28) 0.91x / 0.90x, (64, 256, 400) 0.98x / 0.96x; the training forwards of (64, 64, 56, 56) 0.93x / 0.89x
# but of (64, 256, 400) 1.08x / 1.03x: kept at FUSE_RUN). Tensors in cache (PARALLEL_MIN to FUSE_MIN values, of
# MIN_IMAGES images or more) take them too, in groups of about FUSE_CACHED values (so that a group's x and dy stay in L2
# between its sums and its output, where the passes over the whole tensor read it twice from L3): the float32 training
# forward of rows shorter than FUSE_SHORT_ROW with runs of FUSE_CACHED_RUN values or more (blocks in memory order sum
# those channel by channel, a few images at a time: (64, 256, 7, 7) at 1.4x the time of groups; float64's ran as fast as
# groups or faster, (16, 128, 12, 12) 0.73-0.87x), the other forwards with runs of FUSE_ROW_RUN or more (shorter runs
# made them slower at 2 threads: runs of 768 to 1296 of rows of 256 or 324 values 1.03-1.3x the time of blocks in memory
# order); the backward (two arrays kept) of rows shorter than FUSE_SHORT_ROW with runs of FUSE_GRAD_RUN or more, of
# longer rows with runs of FUSE_GRAD_ROW_RUN or more. A group's runs lie an image apart, each on pages the prefetchers
# meet cold, and the backward reads them twice (sums, then dx), where blocks in memory order read whole images: float32
# backwards in memory order took 0.73x / 0.78x the time of groups at 1 / 2 threads with runs of 1024 ((64, 16, 32, 32)),
# 0.74x / 0.79x with runs of 512 ((128, 32, 16, 16)), 0.83x / 0.84x with 2048 ((32, 32, 32, 32)), but 1.01x / 0.99x with
# 3136 ((32, 16, 56, 56)), 1.00x / 1.03x with 4096 ((16, 64, 32, 32)) and 1.04x / 1.01x with 8192 ((8, 64, 64, 64))
# (float64: 0.81-0.88x at 1 thread, 0.86-0.95x at 2, with runs of 512 to 2048); short rows in memory order run channel
# by channel or down fewer images ((32, 2048, 7, 7) 1.26x / 1.47x, (16, 256, 14, 14) 1.03x / 1.09x; EPYC, Zen 3).
# Otherwise blocks follow memory order: all channels of MIN_IMAGES or more images, or of one image cut into pieces of
# about BLOCK values (rows of COL_CHUNK values or more).
cdef Py_ssize_t FUSE_MIN = 1 << 22
cdef Py_ssize_t FUSE_PLANE = 1 << 20
cdef Py_ssize_t FUSE_GROUP = 1 << 18
cdef Py_ssize_t FUSE_RUN = 1 << 12
cdef Py_ssize_t FUSE_CACHED = 1 << 16
cdef Py_ssize_t FUSE_CACHED_RUN = 768
cdef Py_ssize_t FUSE_SHORT_ROW = 256
cdef Py_ssize_t FUSE_GRAD_RUN = 512
cdef Py_ssize_t FUSE_GRAD_ROW_RUN = 3072
cdef Py_ssize_t FUSE_ROW_RUN = 1536
cdef Py_ssize_t MIN_TASKS = 16
# Channel-minor blocks are at most COL_BLOCK columns wide (wide matrices get blocks side by side, so that they
# run in parallel whatever the number of rows). The budget in doubles of the blocks' partial sums (the sums
# themselves: each block's slot holds them in whole cache lines and a line more, _slot), and the most blocks of rows
# a call is cut into.
cdef Py_ssize_t COL_BLOCK = 2048
cdef Py_ssize_t PART_BUDGET = 1 << 14
cdef Py_ssize_t MAX_BLOCKS = 64
# A backward's channel-minor blocks (G == 1, in cache: CACHED_VALUES) hold all the rows of FUSE_CACHED // N columns
# where those are at least FUSE_WIDTH (at most COL_BLOCK) and make two blocks or more: each block's sums,
# coefficients and dx then run in one task (_whole_columns), its x and dy kept in L2 between them. Against blocks of
# fewer rows, in one process: (128, 2048) 0.80x the time (1 thread) and 0.92x (2), (64, 4096) 0.80-0.86x and 0.85x,
# (64, 2048) 0.82x, (128, 4096) 0.87x and 0.87x, (32, 4096) 0.97-1.05x and 0.73x, (128, 1024) 0.95x and 0.90x.
# Narrower blocks ran slower: 256 columns of (256, 4096) 1.13x the time, 128 of (512, 1024) 1.55x.
cdef Py_ssize_t FUSE_WIDTH = 512
# Channel-minor rows narrower than this are folded (k rows as one, k the largest divisor of N with k*W <= FOLD_WIDTH).
cdef Py_ssize_t FOLD_WIDTH = 64
# Below this many values a call runs serially: starting threads costs more than the work.
cdef Py_ssize_t PARALLEL_MIN = 1 << 16
# A float32 training backward (plain, or after a fused ReLU without residual) computes dx in float32 (DxSingle,
# each channel checked and recomputed in double where its bound fails) unless the input's rows (values per channel
# and sample) number 2 to SHORT_DX - 1, or its channels fewer than SHORT_DX values: channel-major rows that short
# spend more on folding each row's peaks than float32 saves, and channels that small more on their checks. Both
# memory layouts of an array must give the same bits, so its shape decides, not the layout.
cdef Py_ssize_t SHORT_DX = 32
# Channel-minor arrays beyond CACHED_VALUES values come from memory (_from_memory): their passes go along whole
# rows of a block, in memory order. A block's rows cut into pieces (the sums' COL_CHUNK columns, the affine pass's
# SINGLE_RUN) are short runs of memory far apart, which the prefetchers follow worse; the float32 passes take
# their rows one at a time (four rows at a time read four places of a run), the dx pass where they hold at most
# SINGLE_RUN values (wider rows' five coefficient rows outgrow L1). In cache, the pieces keep the accumulators and
# coefficient rows in L1, and four rows at a time load each column's coefficients (and peaks) once for them. A
# forward's passes (the moment sums, the affine pass) take whole rows from CACHED_FORWARD values on: arrays of 1 to 4
# MB, beyond L2, ran faster along whole rows in the forward (0.6-0.97x the time, Intel Xeon) but not in the backward.
# On AMD's CPUs (AMD_CPU, from the vendor at import) the float32 affine pass keeps four rows at a time up to
# CACHED_VALUES: along whole rows, the eval of (256, 4096) took 1.23-1.40x the time there,
# channels-last (64, 16, 32, 32) 1.47x, (2048, 256) 1.32x (EPYC, Zen 3; (512, 1024) 0.93-0.95x). Beyond that (and
# short of the non-temporal stores) it takes a block's rows in one call, where Intel's Xeon ran a call per row faster
# ((16384, 64): one call 1.02-1.06x the time); a call per row took 1.04-1.26x the time of one call on AMD's
# (channels-last (256, 128, 8, 8) eval 1.10-1.19x, (8, 3, 224, 224) 1.17-1.26x). The bits are the same either way.
cdef Py_ssize_t CACHED_VALUES = 1 << 20
cdef Py_ssize_t CACHED_FORWARD = 1 << 18
cdef bint AMD_CPU = cbn_cpu_is_amd()
# Nor do four rows at a time suit rows a multiple of 4 KB long when dx lies less than STALL_BYTES past both x and dy
# modulo 4 KB (as back-to-back allocations place arrays): the loads of the next steps then share the low 12 address
# bits of the stores of this one in all four rows, and the CPU holds them behind those stores (4K aliasing); one row
# at a time has one such pair. (512, 1024) backward: 590-800 us four rows at a time there, 490-540 one at a time,
# 390-490 four at a time elsewhere.
cdef size_t STALL_BYTES = 128
# A float32 affine pass runs down a channel-minor block's rows four at a time in runs of at most SINGLE_RUN columns
# (in cache), so that the run's four float32 coefficient rows (16 KB) stay in L1 beside the rows of data (at 2048
# columns they did not).
cdef Py_ssize_t SINGLE_RUN = 1024
# Likewise the double passes of blocks wider than DOUBLE_RUN columns, in runs of DOUBLE_RUN (four double coefficient
# rows of 16 KB), which row by row read their coefficients from L2 (float32 backwards of fewer than 32 values a
# channel: (16, 16384) 0.91x the time, (8, 4096) 0.88x, (16, 1024) 0.93x); narrower blocks keep them in L1 row by
# row, and ran no faster four rows at a time (the float64 (256, 512) eval 1.08x slower).
cdef Py_ssize_t DOUBLE_RUN = 512
# The elementwise passes of a tensor of STREAM_MIN values or more (beyond the caches) write their output (y or dx;
# not dz) with non-temporal stores on x86-64 (Layout.stream): computed STREAM_CHUNK values at a time into a buffer in
# L1, then stored past the caches, so that the output's cache lines are not first read from memory (a plain store
# reads its line: three streams of memory traffic for a copy, two for this). A pass over a tensor that size writes it
# to memory anyway. The passes that do: every channel-major one (_streamed_row), and the float32 passes of
# channel-minor rows taken one at a time (_single_columns); the channel-minor passes in double (_apply_columns) and
# the rows taken four at a time store plainly. On AMD's CPUs (AMD_CPU) the channel-major passes store plainly too
# (their Layout.stream is 0), and so does the channel-minor backward unless dx would stall behind dy (COPY_CHUNK):
# there a non-temporal pass took 1.4-4.5x its time into one output in four, by where the output lies in physical
# memory (EPYC, Zen 3), and plain stores were faster on the mean over 8 outputs (NCHW evals 0.69-0.94x the time at
# 1 thread, backwards 0.80-0.99x, the (32, 512, 28, 28) training forward 1.04x; the float32 channel-minor dx pass,
# one output each, 0.65-0.93x, but 1.09-1.15x with dx 16-64 bytes past dy). The channel-minor forwards kept them
# (plain ones took 0.76-1.15x their time on that mean, mostly more) until their float32 affine pass took four rows a
# step from the block's quarters, stored plainly (QUARTER_ROWS): against rows one at a time streamed, over 8
# outputs, the evals of (65536, 256), (16384, 256), channels-last (32, 64, 56, 56), (256, 128, 8, 8) and
# (32, 256, 56, 56) and NLC (64, 256, 400) took 0.58-0.92x the time at 1 thread, and at 2 threads 0.56-1.04x below
# QUARTERS_MAX values (about the L3 cache in float32) but 1.05-1.12x from there on ((65536, 256), channels-last
# (32, 512, 28, 28) and (32, 256, 56, 56): two threads' plain stores read their lines first from a memory they
# already share to the full). So on AMD's CPUs a channel-minor forward stores plainly unless it runs on more than
# one thread over QUARTERS_MAX values or more; rows that would stall (_stalls) then go one at a time, stored plainly
# too ((4096, 1024) eval at 1 thread with y 16, 64 and 128 bytes past x modulo 4 KB: 0.78x, 0.64x and 0.82x the
# time of the streamed rows). The passes with a residual keep the streamed rows where the block's quarters start at
# the same offset modulo 4 KB (_quarters_alias: their 12 runs of x, the residual and y then share L1 sets): the fused
# add+ReLU forwards of (4096, 1024), (16384, 256), (65536, 256), channels-last (32, 512, 28, 28) and (32, 256, 56,
# 56) took 0.71-0.95x the time of the quartered rows at 1 thread, 0.74-1.04x at 2 (NLC (64, 256, 400), whose
# quarters alias too: 1.01x at 1 thread, 0.85-1.10x at 2 in six runs). Not measured beyond 2 threads.
cdef Py_ssize_t STREAM_MIN = FUSE_MIN
cdef Py_ssize_t QUARTERS_MAX = 1 << 23
# A channel-minor dx pass whose dx lies less than STALL_BYTES past dy modulo 4 KB (as back-to-back allocations place
# arrays) takes the rows it takes one at a time through that buffer too, COPY_CHUNK values at a time, copied out with
# plain stores (Layout.nontemporal False): stored straight, each store shares the low 12 address bits of the loads
# of dy a few values on, and the CPU holds those loads behind it (4K aliasing). The buffer lies just past out modulo
# 4 KB (_placed), where neither its stores nor the copy's loads meet that. Channels-last (32, 2048, 7, 7) backward:
# 1.2-1.4x the time of a dx elsewhere stored straight, 1.02-1.12x through chunks of 256 values, 1.1-1.2x through
# chunks of 1024 (copied out in bursts that wait for their lines); (256, 128, 8, 8) 0.90-0.92x the time stored
# straight. Rows narrower than COPY_WIDTH values stay as they are: they did not stall, and through the buffer
# (8, 3, 224, 224) channels-last (rows of 48 values) took 1.11-1.14x the time. So do channel-major rows (through
# the buffer, the (32, 2048, 7, 7) backward's rows of 49 values took 1.35x the time), and the rows a block takes
# four at a time ((64, 16, 32, 32) channels-last one at a time through the buffer: 1.05x the time).
# The sums of a channel-major row (a run of the row's channel, or of a group of whole channels, in one image) load
# the lines PREFETCH_BYTES ahead of where they read (cbn_prefetch): the hardware prefetchers stop at each 4 KB page
# and start slowly on the next, and the run's sums then wait for memory (tensors beyond the caches: 0.8-0.9x the
# time of their training forward and backward). In cache, a prefetch that passes the run's end goes as far into the
# block's next run instead (_next_run; the rows summed one at a time, _row_sums): a block of whole channels reads
# runs an image apart, and the lines right after a run are another block's; a run shorter than PREFETCH_BYTES there
# prefetches one run ahead (PREFETCH_BYTES ahead would skip the next run's start). Beyond the caches the lines right
# after the run served better ((32, 256, 56, 56) backward: 1.06x the time with the next run's).
cdef Py_ssize_t PREFETCH_BYTES = 4096
cdef Py_ssize_t CACHE_LINE = 64  # bytes of a cache line (the prefetch's step, the unit of _slot)
cdef enum:
    STREAM_CHUNK = 1024
    COPY_CHUNK = 256
    COPY_WIDTH = 128

# Test-only switch (force_layout): 0 chooses by shape; 1 channel-major, 2 channel-minor, with blocks of about
# _forced_block values and threads even for tiny inputs; _forced_stream: the passes that take non-temporal stores
# beyond the caches take them, in chunks of at most _forced_block values.
cdef int _forced_kind = 0
cdef Py_ssize_t _forced_block = 0
cdef bint _forced_stream = False


def openmp_enabled():
    """Return True when the extension was compiled with OpenMP."""
    return bool(CBN_OPENMP)


def build_info():
    """Return the compiler and flags recorded at build time."""
    return CBN_BUILD_INFO.decode()


def omp_max_threads():
    """Return the OpenMP runtime's thread count for the calling thread (OMP_NUM_THREADS, threadpoolctl)."""
    return cbn_max_threads()


def num_threads(int cap):
    """Return the threads a call from this thread may use: the OpenMP runtime's count, at most cap (0: no cap)."""
    return _runtime_threads(cap)


cdef inline int _runtime_threads(int cap) noexcept nogil:
    cdef int n = cbn_max_threads()
    return n if cap <= 0 else min(n, cap)


def force_layout(kind=None, Py_ssize_t block=64, bint stream=False):
    """Test-only: run every call with the given layout kind ("major" or "minor"; None: by shape), blocks of about
    ``block`` values, and the caller's thread count even for tiny inputs; with ``stream``, the passes that take
    non-temporal stores beyond the caches (STREAM_MIN) take them, in chunks of at most ``block`` values."""
    global _forced_kind, _forced_block, _forced_stream
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if stream and kind is None:
        raise ValueError("stream needs a forced layout kind ('major' or 'minor'), got None")
    _forced_kind = {None: 0, "major": 1, "minor": 2}[kind]
    _forced_block = block
    _forced_stream = stream


def vendor_rules(amd=None):
    """Test-only: take the rules of AMD's CPUs (True) or of the others (False) whatever the CPU, or the CPU's own
    (None; see AMD_CPU); returns whether AMD's are taken."""
    global AMD_CPU
    AMD_CPU = cbn_cpu_is_amd() if amd is None else amd
    return AMD_CPU


def layout(Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, int sums=MOMENT_SUMS, Py_ssize_t item=4):
    """Test-only: the blocks (``Layout`` as a dict) an (N, C, S) tensor of ``item``-byte values runs its calls over
    (sums: what the call sums, 0 nothing (an elementwise pass), 1 the moments of a training forward, 2 the gradient
    sums of a backward)."""
    return _layout(N, C, S, sums, item)


cdef enum RowOrder:  # the rows a pass down the rows of a matrix takes at each step (_column_sums, _single_columns)
    ADJACENT_ROWS = 0  # four adjacent rows
    ONE_ROW = 1        # one row, in memory order
    QUARTER_ROWS = 2   # four rows, one from each quarter of the block's rows


cdef inline Py_ssize_t _apart(RowOrder rows, Py_ssize_t nrows, Py_ssize_t ld) noexcept nogil:
    """Values from a step's row to its next in a pass over nrows rows ld values apart (four rows a step)."""
    return nrows // 4 * ld if rows == QUARTER_ROWS else ld


cdef inline Py_ssize_t _advance(RowOrder rows, Py_ssize_t ld) noexcept nogil:
    """Values from a step's first row to the next step's (four rows a step, rows ld values apart)."""
    return ld if rows == QUARTER_ROWS else 4 * ld


cdef enum Sums:  # what a call sums (_layout)
    NO_SUMS = 0
    MOMENT_SUMS = 1
    GRADIENT_SUMS = 2


cdef struct Layout:
    bint minor            # channel-minor (else channel-major)
    # rows (of the folded matrix, for minor), channels, values of a channel in a row of the input, row width
    Py_ssize_t N, C, S, W
    Py_ssize_t count      # values per channel in the whole tensor
    Py_ssize_t G          # coefficient columns per channel: k*S (minor, k rows folded into one), 1 (major)
    Py_ssize_t nblocks
    Py_ssize_t part       # doubles of partial sums per block: 2*W (minor), 2*group (major)
    bint fused            # major with whole channels per block: sums, finish and output in one task
    # channel-major: block k = channels [g*group, +group) x images [(r // ncol)*nimg, +nimg) x columns
    # [(r % ncol)*width, +width) of each row, r = k // ngroups, g = k % ngroups (memory order); a channel's
    # partial sums are those of its group's per_channel blocks. ncol and width serve channel-minor blocks too.
    Py_ssize_t group, ngroups, nimg, ncol, width, per_channel
    # channel-minor: block k = rows [(k // ncol)*rows, +rows) x columns [(k % ncol)*width, +width)
    Py_ssize_t rows
    Py_ssize_t stream     # values per chunk of output computed into a buffer first (STREAM_MIN, COPY_CHUNK), 0: none
    bint nontemporal      # the buffer goes out with non-temporal stores (else a copy: COPY_CHUNK)


cdef inline Py_ssize_t _cdiv(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return (a + b - 1) // b


cdef Layout _layout(Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, int sums, Py_ssize_t item) noexcept nogil:
    """The blocks of the kernels' (N, C, S) view of a tensor of ``item``-byte values: a function of that shape and
    the item size (and the test-only switch) alone. Without sums
    (an elementwise pass only) blocks follow memory order plainly: no blocks of whole channels, and no minimum of
    images per block (it only serves sums: partial-sum budget, short rows summed down the images)."""
    cdef Layout L
    cdef Py_ssize_t block = _forced_block if _forced_kind else BLOCK
    cdef Py_ssize_t cap, k, cols, whole
    L.N, L.C, L.S, L.W, L.count = N, C, S, C * S, N * S
    L.group = L.ngroups = L.nimg = L.per_channel = L.rows = 0
    L.minor = (S == 1 or (S < SHORT_ROW and N >= MIN_IMAGES)) if _forced_kind == 0 else _forced_kind == 2
    if _forced_kind:
        L.stream = min(block, STREAM_CHUNK) if _forced_stream else 0
    else:
        L.stream = STREAM_CHUNK if CBN_STREAM_STORES and N * C * S >= STREAM_MIN and (L.minor or not AMD_CPU) else 0
    L.nontemporal = L.stream != 0
    if L.minor:
        k = max(1, FOLD_WIDTH // L.W)
        while N % k:
            k -= 1
        L.N, L.W, L.G = N // k, k * L.W, k * S
        L.ncol = _cdiv(L.W, min(COL_BLOCK, block) if _forced_kind else COL_BLOCK)
        L.width = _cdiv(L.W, L.ncol)
        cap = max(1, min(MAX_BLOCKS, PART_BUDGET // (2 * L.W)))
        L.rows = max(max(1, block // L.W), _cdiv(L.N, cap))
        cols = FUSE_CACHED // L.N  # a backward's blocks of whole columns (FUSE_WIDTH)
        if (sums == GRADIENT_SUMS and not _forced_kind and L.G == 1 and cols >= FUSE_WIDTH and L.W >= 2 * cols
                and L.N * L.W <= CACHED_VALUES):
            L.ncol = _cdiv(L.W, min(cols, COL_BLOCK))
            L.width = _cdiv(L.W, L.ncol)
            L.rows = L.N
        L.nblocks = _cdiv(L.N, L.rows) * L.ncol
        L.part = _slot(2 * L.width)
        L.fused = False
        return L
    L.G = 1
    L.ncol, L.width = 1, S
    whole = _whole_channels(N, C, S, sums, item) if sums else 0
    if _forced_kind == 1:  # groups of 2 channels, images and row pieces of about block values
        L.group = 2
        L.ncol = _cdiv(S, block)
        L.width = _cdiv(S, L.ncol)
        L.nimg = max(1, block // S)
    elif whole:
        L.group = whole
        L.nimg = N
    elif L.W <= block:  # whole images
        L.group = C
        L.nimg = max(block // L.W, _cdiv(N, MAX_BLOCKS), MIN_IMAGES) if sums else block // L.W
        if sums and S < COL_CHUNK:  # short rows are summed down the images: more of them per block
            L.nimg = max(L.nimg, min(SHORT_IMAGES, _cdiv(N, MIN_BLOCKS)))
    else:  # runs of about block values: groups of whole rows (at most C // MIN_TASKS), or pieces of a row
        L.group = max(1, min(block // S, C // MIN_TASKS))
        L.ncol = _cdiv(S, block)
        L.width = _cdiv(S, L.ncol)
        L.nimg = min(N, max(_cdiv(2 * N * C * L.ncol, PART_BUDGET), MIN_IMAGES)) if sums else 1
    L.per_channel = _cdiv(N, L.nimg) * L.ncol
    L.fused = L.per_channel == 1
    L.ngroups = _cdiv(C, L.group)
    L.nblocks = L.ngroups * L.per_channel
    L.part = _slot(2 * L.group)
    return L


cdef inline Py_ssize_t _slot(Py_ssize_t n) noexcept nogil:
    """Doubles of a block's slot of partial sums that holds n: n rounded up to whole cache lines, and a line more,
    so that no two blocks' slots share a line wherever the scratch starts (the threads update their blocks' slots as
    they go, and a line two of them update moves between their cores at each update)."""
    return (_cdiv(n, CACHE_LINE // sizeof(double)) + 1) * (CACHE_LINE // sizeof(double))


cdef inline bint _in_cache(Py_ssize_t values) noexcept nogil:
    """Whether a channel-major tensor of this many values counts as in cache (below FUSE_MIN): its groups of whole
    channels follow FUSE_CACHED, and its row sums' prefetch follows the block (_next_run)."""
    return values < FUSE_MIN


cdef inline Py_ssize_t _whole_channels(Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, int sums,
                                       Py_ssize_t item) noexcept nogil:
    """Channels per block where the calls with ``sums`` (_layout) over an (N, C, S) channel-major tensor of
    ``item``-byte values take blocks of whole channels, else 0 (FUSE_MIN)."""
    cdef bint cached = _in_cache(N * C * S)
    cdef Py_ssize_t group = max(1, min((FUSE_CACHED if cached else FUSE_GROUP) // (N * S), C // MIN_TASKS))
    cdef Py_ssize_t run
    if cached and (N * C * S < PARALLEL_MIN or N < MIN_IMAGES):
        return 0
    if sums == GRADIENT_SUMS:
        run = FUSE_GRAD_RUN if cached and S < FUSE_SHORT_ROW else FUSE_GRAD_ROW_RUN
    elif cached:
        run = FUSE_CACHED_RUN if S < FUSE_SHORT_ROW and item == 4 else FUSE_ROW_RUN
    else:
        run = FUSE_RUN
    return group if N * S <= FUSE_PLANE and C >= MIN_TASKS and group * S >= run else 0


cdef inline int _threads(Layout L, int cap) noexcept nogil:
    """Threads for a call (cap: see num_threads): 1 for tiny inputs (unless a layout is forced), never more than
    there are blocks."""
    cdef int n = _runtime_threads(cap)
    if L.nblocks < 2 or n < 2 or (L.N * L.W < PARALLEL_MIN and not _forced_kind):
        return 1
    return <int>min(<Py_ssize_t>n, L.nblocks)


cdef inline Py_ssize_t _parallel_blocks(Layout L, int nt) noexcept nogil:
    """Blocks run in a parallel region: all of them, or none when the call runs on one thread (then a plain loop
    runs them and no OpenMP region is entered)."""
    return L.nblocks if nt > 1 else 0


cdef inline void _major_block(Layout L, Py_ssize_t k, Py_ssize_t *c0, Py_ssize_t *c1, Py_ssize_t *n0,
                              Py_ssize_t *n1, Py_ssize_t *i0, Py_ssize_t *i1) noexcept nogil:
    """Channels [c0, c1), images [n0, n1) and row columns [i0, i1) of channel-major block k."""
    cdef Py_ssize_t g = k % L.ngroups, r = k // L.ngroups
    c0[0] = g * L.group
    c1[0] = min(L.C, c0[0] + L.group)
    n0[0] = (r // L.ncol) * L.nimg
    n1[0] = min(L.N, n0[0] + L.nimg)
    i0[0] = (r % L.ncol) * L.width
    i1[0] = min(L.S, i0[0] + L.width)


cdef inline void _minor_block(Layout L, Py_ssize_t k, Py_ssize_t *n0, Py_ssize_t *n1, Py_ssize_t *j0,
                              Py_ssize_t *j1) noexcept nogil:
    """Rows [n0, n1) and columns [j0, j1) of channel-minor block k."""
    n0[0] = (k // L.ncol) * L.rows
    n1[0] = min(L.N, n0[0] + L.rows)
    j0[0] = (k % L.ncol) * L.width
    j1[0] = min(L.W, j0[0] + L.width)


# -- the inner loops ------------------------------------------------------------------------------------------------

cdef void _column_sums(SumOp op, const floating *x, const floating *dy, const floating *e,
                       Py_ssize_t base, Py_ssize_t ld, Py_ssize_t nrows, Py_ssize_t width, const double *shift,
                       double *s0, double *s1, Positions P, Py_ssize_t p, Py_ssize_t pld,
                       Py_ssize_t j0, const floating *h, Py_ssize_t hs, Py_ssize_t jump) noexcept nogil:
    """Sums down the columns of the (nrows, width) matrix at x[base + r*ld + j]: s0[j] += sum(w), s1[j] += sum(w*u),
    u = x - shift[j], w = u (Moments; MomentsValid: u where the weight of column j0 + j of the row at position
    p + r*pld is 1, else 0, and u = 0 there too), dy (GradSums), masked(dy) (GradSumsMasked) or gated(dy)
    (GradSumsGated, column j's gate interval at h[j], h[hs + j]: _dy); four rows per step, added pairwise, but the
    gradient sums of whole rows (ld == width) of more than LANES and at most SINGLE_RUN values go one row at a time (in
    memory order: four rows at a time read from four places of the run, which the prefetchers follow worse; wider rows'
    two rows of accumulators outgrow L1, as the dx pass's coefficients do: _dx_by_row), and the moments of whole rows of
    more than LANES values take a step's four rows from the four quarters of the first 4*(nrows//4) rows (rows r, r + q,
    r + 2q, r + 3q, q = nrows // 4: four runs of memory read in order), the rest one at a time. Vectorised across
    columns: each column is one lane. A row of LANES lanes (_row_lanes) prefetches PREFETCH_BYTES ahead of its steps in
    the order its block reads: past the matrix's end, ``jump`` values further on (where the block's next run starts; 0:
    right after this one), and where the jump is not 0, at most one run ahead."""
    cdef RowOrder rows = ADJACENT_ROWS
    cdef Py_ssize_t r, j, i, r4, gap, advance
    if not (SumOp is Moments or SumOp is MomentsValid) and ld == width and LANES < width <= SINGLE_RUN:
        rows = ONE_ROW
    elif SumOp is Moments and ld == width and width > LANES:
        rows = QUARTER_ROWS
    r4 = 0 if rows == ONE_ROW else nrows // 4 * 4
    gap, advance = _apart(rows, nrows, ld), _advance(rows, ld)
    cdef double u0, u1, u2, u3, w0, w1, w2, w3
    cdef Py_ssize_t buf[4 * COL_CHUNK]
    cdef const Py_ssize_t *v0 = NULL
    cdef const Py_ssize_t *v1 = NULL
    cdef const Py_ssize_t *v2 = NULL
    cdef const Py_ssize_t *v3 = NULL
    cdef Py_ssize_t q, t, ahead = 4 * LANES * sizeof(floating) // CACHE_LINE if ld == width == LANES else 0
    cdef Py_ssize_t step = _prefetch_step(sizeof(floating), nrows * ld, jump)
    for r in range(0, r4, 4):
        i = base + r // 4 * advance
        t = i + step
        if t >= base + nrows * ld:
            t += jump
        for q in range(ahead):  # the lines PREFETCH_BYTES ahead of the step's rows
            cbn_prefetch(<const char *>(x + t) + q * CACHE_LINE)
            if not (SumOp is Moments or SumOp is MomentsValid):
                cbn_prefetch(<const char *>(dy + t) + q * CACHE_LINE)
            if SumOp is GradSumsMasked:
                cbn_prefetch(<const char *>(e + t) + q * CACHE_LINE)
        if SumOp is MomentsValid:
            v0 = _row_weights(P, p + r * pld, j0, j0 + width, buf)
            v1 = _row_weights(P, p + (r + 1) * pld, j0, j0 + width, &buf[COL_CHUNK])
            v2 = _row_weights(P, p + (r + 2) * pld, j0, j0 + width, &buf[2 * COL_CHUNK])
            v3 = _row_weights(P, p + (r + 3) * pld, j0, j0 + width, &buf[3 * COL_CHUNK])
        for j in range(width):
            u0 = _weight(op, <double>x[i + j] - shift[j], v0, j)
            u1 = _weight(op, <double>x[i + gap + j] - shift[j], v1, j)
            u2 = _weight(op, <double>x[i + 2 * gap + j] - shift[j], v2, j)
            u3 = _weight(op, <double>x[i + 3 * gap + j] - shift[j], v3, j)
            w0 = _grad_weight(op, u0, _dy(op, x[i + j], dy[i + j], e[i + j], h, hs, j))
            w1 = _grad_weight(op, u1, _dy(op, x[i + gap + j], dy[i + gap + j], e[i + gap + j], h, hs, j))
            w2 = _grad_weight(op, u2, _dy(op, x[i + 2 * gap + j], dy[i + 2 * gap + j], e[i + 2 * gap + j], h, hs, j))
            w3 = _grad_weight(op, u3, _dy(op, x[i + 3 * gap + j], dy[i + 3 * gap + j], e[i + 3 * gap + j], h, hs, j))
            s0[j] += (w0 + w1) + (w2 + w3)
            s1[j] += (w0 * u0 + w1 * u1) + (w2 * u2 + w3 * u3)
    for r in range(r4, nrows):
        i = base + r * ld
        if SumOp is MomentsValid:
            v0 = _row_weights(P, p + r * pld, j0, j0 + width, buf)
        for j in range(width):
            u0 = _weight(op, <double>x[i + j] - shift[j], v0, j)
            w0 = _grad_weight(op, u0, _dy(op, x[i + j], dy[i + j], e[i + j], h, hs, j))
            s0[j] += w0
            s1[j] += w0 * u0


cdef inline Py_ssize_t _prefetch_step(size_t item, Py_ssize_t run, Py_ssize_t jump) noexcept nogil:
    """Values ahead of where they read that the sums of a run of ``run`` values of ``item`` bytes prefetch:
    PREFETCH_BYTES, but at most one run where the block's next run lies elsewhere (``jump`` values past this one's
    end, not 0)."""
    cdef Py_ssize_t step = PREFETCH_BYTES // <Py_ssize_t>item
    return min(step, run) if jump else step


cdef inline double _weight(SumOp op, double u, const Py_ssize_t *v, Py_ssize_t j) noexcept nogil:
    """u, or for MomentsValid u where the weight v[j] is 1, else 0 (v is read only there: NULL for the others)."""
    if SumOp is MomentsValid:
        return u if v[j] else 0.0
    else:
        return u


cdef inline double _grad_weight(SumOp op, double u, double d) noexcept nogil:
    """The w of a sum (see _column_sums) from u (as _weight gives it) and d (as _dy gives it)."""
    if SumOp is Moments or SumOp is MomentsValid:
        return u
    else:
        return d


cdef inline const Py_ssize_t *_row_weights(Positions P, Py_ssize_t p, Py_ssize_t j0, Py_ssize_t j1,
                                           Py_ssize_t *buf) noexcept nogil:
    """The weights of columns [j0, j1) of the row whose positions start at p, as a contiguous array: of a
    channel-major row, valid[p + j0:] itself; of a channel-minor folded row, gathered into buf (see Positions)."""
    cdef Py_ssize_t j, t, end, w
    if P.col != NULL:
        for j in range(j0, j1):
            buf[j - j0] = P.valid[p + P.col[j]]
    elif P.run:
        j = j0
        while j < j1:
            end = min(j1, (j // P.run + 1) * P.run)
            w = P.valid[p + j // P.run]
            for t in range(j - j0, end - j0):
                buf[t] = w
            j = end
    else:
        return P.valid + p + j0
    return buf


cdef inline bint _single(ApplyOp op, floating *out) noexcept nogil:
    """True for the passes computed in float32 on float32 data (see _value_single; out only selects the type)."""
    if floating is float:
        return _affine(op) or _dx_single(op)
    return False


cdef inline bint _affine(ApplyOp op) noexcept nogil:
    """The affine forward ops, y = (x - c0)*c1 + c2 (then the residual, the ReLU): Affine, AffineRelu, AffineAdd,
    AffineAddRelu."""
    return ApplyOp is Affine or ApplyOp is AffineRelu or ApplyOp is AffineAdd or ApplyOp is AffineAddRelu


cdef inline bint _weighted(ApplyOp op) noexcept nogil:
    """The ops that read position weights (after a masked forward): GradValid, GradGatedValid, GradMaskedDzValid."""
    return ApplyOp is GradValid or ApplyOp is GradGatedValid or ApplyOp is GradMaskedDzValid


cdef inline bint _single_pass(Pass kind, const floating *x) noexcept nogil:
    """_single by pass number: the forward passes (AFFINE to AFFINE_ADD_RELU) and the float32 dx passes (_checked)
    on float32 data (x only selects the type)."""
    if floating is float:
        return kind <= AFFINE_ADD_RELU or _checked(kind)
    return False


cdef inline bint _dx_single(ApplyOp op) noexcept nogil:
    """The DxSingle ops (which keep peaks: _block_apply)."""
    return ApplyOp is GradSingle or ApplyOp is GradGatedSingle


cdef inline bint _checked(Pass kind) noexcept nogil:
    """The float32 dx passes (DxSingle), whose channels are checked and recomputed in double where their bound fails
    (_grad_redo)."""
    return kind >= GRAD_SINGLE


cdef inline float _value_single(ApplyOp op, float a, float hi, float lo, float c1, float c2,
                                float e) noexcept nogil:
    """Affine (and AffineRelu, AffineAdd, AffineAddRelu) in float32: ((a - hi) - lo)*c1 + c2 (+ e), with c0 = hi +
    lo split so that the centring keeps c0's double precision (a - hi is exact for a near hi); four roundings, each
    within half a float32 ulp of the largest magnitude the output holds, and one more for the residual e."""
    cdef float v = ((a - hi) - lo) * c1 + c2
    if ApplyOp is AffineAdd or ApplyOp is AffineAddRelu:
        v = v + e
    if ApplyOp is AffineRelu or ApplyOp is AffineAddRelu:
        return 0.0 if v < 0.0 else v
    return v


cdef struct GradPair:  # a GradSingle value: out = t1 - t2, and t1 + t2 for its check
    float out, terms


cdef struct Peaks:     # of a GradSingle row: the largest |t1 + t2| and |out| (cbn_magnitude), 0 for other passes
    unsigned int terms, out


cdef inline GradPair _grad_single(float a, float d, float hi, float lo, float c1, float c2,
                                  float c3) noexcept nogil:
    """Grad in float32: t1 = (d - c3)*c1, t2 = ((a - hi) - lo)*c2, out = t1 - t2, c0 = hi + lo split as in
    _value_single; within 3u|t1| + 4u|t2| + u|out| (u = 2**-24) plus the slack of the coefficients' rounding
    (_grad_slack) of the exact value (_grad_check)."""
    cdef float t1 = (d - c3) * c1, t2 = ((a - hi) - lo) * c2
    cdef GradPair r
    r.out, r.terms = t1 - t2, t1 + t2
    return r


cdef inline unsigned int _peak(unsigned int p, float v) noexcept nogil:
    """The larger of p and |v| (as cbn_magnitude)."""
    cdef unsigned int m = cbn_magnitude(v)
    return m if m > p else p


cdef inline unsigned int _largest(float a, float b, float c, float d) noexcept nogil:
    """The largest of |a|, |b|, |c|, |d| (as cbn_magnitude)."""
    return _peak(_peak(_peak(cbn_magnitude(a), b), c), d)


cdef inline Py_ssize_t _outs_at(Py_ssize_t width) noexcept nogil:
    """Where the |out| peaks of a channel-minor block of width columns start in its slot (after the |t1 + t2|
    ones; 16 bits each, and the slot holds 8*width of them): SKEW beyond them where there is room."""
    return width + SKEW if width >= SKEW else width


cdef inline void _split(double v, float *hi, float *lo) noexcept nogil:
    """v as the float32 pair the float32 passes subtract from x one after the other: hi = float32(v),
    lo = float32(v - hi)."""
    cdef float h = <float>v
    hi[0] = h
    lo[0] = <float>(v - <double>h)


cdef inline void _narrow(Py_ssize_t W, Py_ssize_t j0, Py_ssize_t j1, const double *coef,
                         float *single) noexcept nogil:
    """The float32 coefficient rows of a channel-minor dx pass (_grad_single) from coef's four rows of W columns
    (_coefficients), at columns [j0, j1): hi, lo, c1, c2, c3 of each column, rows W + SKEW apart (a forward pass has
    the first four from _single_coefs)."""
    cdef Py_ssize_t j, r, F = W + SKEW
    for j in range(j0, j1):
        _split(coef[j], &single[j], &single[F + j])
    for r in range(1, 4):
        for j in range(j0, j1):
            single[(r + 1) * F + j] = <float>coef[r * W + j]


cdef Peaks _apply_row(ApplyOp op, const floating *x, const floating *dy, const floating *e,
                      floating *out, floating *dz, Py_ssize_t i0, Py_ssize_t i1, const double *cf, Py_ssize_t W,
                      const Py_ssize_t *v, const floating *gc) noexcept nogil:
    """Values [i0, i1) of one channel, whose coefficients are cf[r*W] (r = 0..3; its gate interval gc[0], gc[W]): out =
    _value(op, x, dy, e) in double, rounded once (and dz, for the Dz ops); value i with the position weight
    v[i - i0] (read by the Valid ops only). The _single passes in float32; returns a DxSingle pass's peaks."""
    cdef Py_ssize_t i
    cdef float hi, lo
    cdef double c0 = cf[0], c1 = cf[W], c2 = cf[2 * W], c3 = cf[3 * W]
    cdef floating h[2]
    cdef floating d
    cdef Peaks peaks
    cdef GradPair g
    peaks.terms = peaks.out = 0
    h[0] = h[1] = 0
    if ApplyOp is AffineGated or ApplyOp is GradGated or ApplyOp is GradGatedValid or ApplyOp is GradGatedSingle:
        h[0], h[1] = gc[0], gc[W]
    if _single(op, out):
        _split(c0, &hi, &lo)
        for i in range(i0, i1):
            if (ApplyOp is GradSingle or ApplyOp is GradGatedSingle) and floating is float:
                g = _grad_single(x[i], _dy(op, x[i], dy[i], x[i], h, 1, 0), hi, lo, <float>c1, <float>c2,
                                 <float>c3)
                out[i] = g.out
                peaks.terms, peaks.out = _peak(peaks.terms, g.terms), _peak(peaks.out, g.out)
            else:
                out[i] = _value_single(op, x[i], hi, lo, <float>c1, <float>c2, e[i])
        return peaks
    for i in range(i0, i1):
        d = _dy(op, x[i], dy[i], e[i], h, 1, 0)
        out[i] = <floating>_value(op, x[i], d, e[i], c0, c1, c2, c3, _position(op, v, i - i0))
        if ApplyOp is AffineMaskedDz:
            dz[i] = _keep(x[i], e[i] > 0)
        elif ApplyOp is GradMaskedDz or ApplyOp is GradMaskedDzValid:
            dz[i] = d
    return peaks


cdef Peaks _streamed_row(ApplyOp op, const floating *x, const floating *dy, const floating *e, floating *out,
                         floating *dz, Py_ssize_t i0, Py_ssize_t i1, const double *cf, Py_ssize_t W,
                         const Py_ssize_t *v, const floating *gc, Py_ssize_t stream) noexcept nogil:
    """_apply_row of a channel-major row's values [i0, i1), stream values (Layout.stream) at a time into a buffer
    that goes out with non-temporal stores (its peaks are the largest of its chunks')."""
    cdef floating buf[STREAM_CHUNK]
    cdef Py_ssize_t t, a, b
    cdef Peaks peaks, chunk
    peaks.terms = peaks.out = 0
    for t in range(_cdiv(i1 - i0, stream)):
        a, b = i0 + t * stream, min(i1, i0 + (t + 1) * stream)
        chunk = _apply_row(op, x + a, dy + a, e + a if e != NULL else NULL, buf, dz + a if dz != NULL else NULL, 0,
                           b - a, cf, W, v + (a - i0) if v != NULL else NULL, gc)
        _stream(out + a, buf, b - a)
        peaks.terms, peaks.out = max(peaks.terms, chunk.terms), max(peaks.out, chunk.out)
    return peaks


cdef inline void _stream(floating *dst, const floating *src, Py_ssize_t n) noexcept nogil:
    """dst[0:n] = src[0:n] with non-temporal stores (cbn_stream_float, cbn_stream_double)."""
    if floating is float:
        cbn_stream_float(dst, src, n)
    else:
        cbn_stream_double(dst, src, n)


cdef inline float *_placed(float *space, const float *out) noexcept nogil:
    """Where a copied buffer for out starts in ``space`` (COPY_CHUNK values and 4 KB more): STALL_BYTES past out
    modulo 4 KB, so that neither its copy into out nor its stores meet the loads of nearby inputs (see COPY_CHUNK).
    (The non-temporal buffers stay where the compiler puts them: placed so too, the (32, 256, 56, 56) training
    forward took 1.08x the time.)"""
    return space + ((<size_t>out + STALL_BYTES - <size_t>space) % 4096) // sizeof(float)


cdef void _apply_columns(ApplyOp op, const floating *x, const floating *dy, const floating *e,
                         floating *out, floating *dz, Py_ssize_t base, Py_ssize_t j0, Py_ssize_t j1,
                         Py_ssize_t W, const double *coef, Positions P, Py_ssize_t p) noexcept nogil:
    """Columns [j0, j1) of the row at x[base:] whose positions start at p, each column j with its own coefficients
    coef[r*W + j], r = 0..3 (its gate interval, r = 4, 5): as _apply_row, in double, COL_CHUNK columns at a time
    (the _single passes, computed in float32, go through _single_columns)."""
    cdef Py_ssize_t j, q, a, b
    cdef Py_ssize_t buf[COL_CHUNK]
    cdef const Py_ssize_t *v = NULL
    cdef const floating *g = _gate(coef, W, x)
    for q in range(_cdiv(j1 - j0, COL_CHUNK)):
        a, b = j0 + q * COL_CHUNK, min(j1, j0 + (q + 1) * COL_CHUNK)
        if _weighted(op):
            if _uniform(P, a, b) and P.valid[p + a // P.run]:
                _apply_counted(op, x, dy, e, out, dz, base, a, b, W, coef)
                continue
            v = _row_weights(P, p, a, b, buf)
        for j in range(a, b):
            out[base + j] = <floating>_applied(op, x, dy, e, base + j, j, g, W, coef[j], coef[W + j],
                                               coef[2 * W + j], coef[3 * W + j], _position(op, v, j - a))
            _dz_at(op, x, dy, e, dz, base + j, j, g, W)


cdef void _apply_fours(ApplyOp op, floating_row x, floating_row dy, floating_row e, floating_row out,
                       floating_row dz, Py_ssize_t base, Py_ssize_t nrows, Py_ssize_t j0, Py_ssize_t j1, Py_ssize_t W,
                       const double *coef) noexcept nogil:
    """Columns [j0, j1) of the rows [0, nrows) at x[base:] (row r at base + r*W; nrows a multiple of 4) of a pass
    without position weights: as _apply_columns, four rows per step, each column's coefficients loaded once for
    them, and the step's four values stored after its loads (see STALL_BYTES). Only out and dz are written: restrict
    pointers, so that GCC vectorises the step without alias checks (x, dy and e may be one array, and dz out where
    the op writes no dz)."""
    cdef Py_ssize_t r, j, q
    cdef double c0, c1, c2, c3, v0, v1, v2, v3
    g = _gate(coef, W, x)
    for r in range(0, nrows, 4):
        for j in range(j0, j1):
            c0, c1, c2, c3 = coef[j], coef[W + j], coef[2 * W + j], coef[3 * W + j]
            q = base + r * W + j
            v0 = _applied(op, x, dy, e, q, j, g, W, c0, c1, c2, c3, 1)
            v1 = _applied(op, x, dy, e, q + W, j, g, W, c0, c1, c2, c3, 1)
            v2 = _applied(op, x, dy, e, q + 2 * W, j, g, W, c0, c1, c2, c3, 1)
            v3 = _applied(op, x, dy, e, q + 3 * W, j, g, W, c0, c1, c2, c3, 1)
            out[q], out[q + W], out[q + 2 * W], out[q + 3 * W] = v0, v1, v2, v3
            _dz_at(op, x, dy, e, dz, q, j, g, W)
            _dz_at(op, x, dy, e, dz, q + W, j, g, W)
            _dz_at(op, x, dy, e, dz, q + 2 * W, j, g, W)
            _dz_at(op, x, dy, e, dz, q + 3 * W, j, g, W)


cdef inline double _applied(ApplyOp op, const floating *x, const floating *dy, const floating *e, Py_ssize_t i,
                            Py_ssize_t j, const floating *g, Py_ssize_t W, double c0, double c1, double c2, double c3,
                            Py_ssize_t v) noexcept nogil:
    """_value of a double pass at value i (column j, gate interval g[j], g[W + j]; position weight v)."""
    return _value(op, x[i], _dy(op, x[i], dy[i], e[i], g, W, j), e[i], c0, c1, c2, c3, v)


cdef inline void _dz_at(ApplyOp op, const floating *x, const floating *dy, const floating *e, floating *dz,
                        Py_ssize_t i, Py_ssize_t j, const floating *g, Py_ssize_t W) noexcept nogil:
    """dz[i] of the Dz passes: masked(x) (AffineMaskedDz) or the dy the pass read (GradMaskedDz*); else nothing.
    Read after out[i] is stored: out overlaps none of x, dy and e (the Python layer checks it: no_overlap)."""
    if ApplyOp is AffineMaskedDz:
        dz[i] = _keep(x[i], e[i] > 0)
    elif ApplyOp is GradMaskedDz or ApplyOp is GradMaskedDzValid:
        dz[i] = _dy(op, x[i], dy[i], e[i], g, W, j)


cdef void _single_columns(SingleOp op, const_float_row x, const_float_row dy, const_float_row e, float_row out,
                          Py_ssize_t base, Py_ssize_t W, Py_ssize_t nrows, Py_ssize_t j0, Py_ssize_t j1,
                          const_float_row f, Py_ssize_t F, peak_row peaks, Py_ssize_t gap, const_float_row g,
                          RowOrder rows, Py_ssize_t stream, bint nontemporal) noexcept nogil:
    """A float32 pass over columns [j0, j1) of the nrows rows at x[base:] (row r at base + r*W), column j's float32
    coefficients at f[r*F + j] (hi, lo, c1, c2, c3: the rows of _narrow; c3 a dx pass's only) and gate interval at
    g[j], g[W + j] (GradGatedSingle): out = _value_single (the affine ops, residual e) or t1 - t2 of _grad_single
    (DxSingle), four rows per step (each column's coefficients and peaks loaded once for them: ADJACENT_ROWS, or
    QUARTER_ROWS rows r, r + q, r + 2q, r + 3q of the first 4q, q = nrows // 4, then the rest one at a time), or ONE_ROW
    one row at a time (in memory order: see _column_sums and _dx_by_row); a DxSingle pass raises each column's peaks to
    its values': |t1 + t2| in peaks[j - j0] (rounded up to 16 bits: cbn_peak_up), |out| in peaks[gap + j - j0] (rounded
    down: cbn_peak_down). A peak of 16 bits is half the stores of a full one; rounding is monotone, so the peak is the
    same whichever rows it is taken over, in whatever order. With ``stream`` (Layout.stream), the rows taken one at a
    time go out through a buffer of stream values and non-temporal stores, or (not nontemporal) a copy of a buffer
    placed by _placed: pieces of stream columns, or as many whole rows (contiguous in memory) as the buffer holds."""
    cdef Py_ssize_t r, j, i, q, q1, q2, q3, t, a, b, r4 = 0 if rows == ONE_ROW else nrows // 4 * 4
    cdef Py_ssize_t apart = _apart(rows, nrows, W), advance = _advance(rows, W)
    cdef Py_ssize_t pieces = _cdiv(j1 - j0, stream) if stream else 0, filled = 0
    cdef bint whole = j0 == 0 and j1 == W
    cdef float streamed[STREAM_CHUNK]
    cdef float space[COPY_CHUNK + 1024]
    cdef float *buf = &streamed[0] if nontemporal else _placed(space, <const float *>out)
    cdef const float *er
    cdef unsigned short *terms = NULL
    cdef unsigned short *outs = NULL
    cdef float hi, lo, c1, c2, c3
    cdef GradPair g0, g1, g2, g3
    if SingleOp is GradSingle or SingleOp is GradGatedSingle:  # (the affine ops keep no peaks: peaks is NULL)
        terms, outs = peaks - j0, peaks + gap - j0
    for r in range(0, r4, 4):
        i = base + r // 4 * advance
        for j in range(j0, j1):
            hi, lo, c1, c2, c3 = f[j], f[F + j], f[2 * F + j], f[3 * F + j], f[4 * F + j]
            q = i + j
            q1, q2, q3 = q + apart, q + 2 * apart, q + 3 * apart
            if SingleOp is GradSingle or SingleOp is GradGatedSingle:
                g0 = _grad_single(x[q], _dy(op, x[q], dy[q], x[q], g, W, j), hi, lo, c1, c2, c3)
                g1 = _grad_single(x[q1], _dy(op, x[q1], dy[q1], x[q1], g, W, j), hi, lo, c1, c2, c3)
                g2 = _grad_single(x[q2], _dy(op, x[q2], dy[q2], x[q2], g, W, j), hi, lo, c1, c2, c3)
                g3 = _grad_single(x[q3], _dy(op, x[q3], dy[q3], x[q3], g, W, j), hi, lo, c1, c2, c3)
                out[q], out[q1], out[q2], out[q3] = g0.out, g1.out, g2.out, g3.out
                terms[j] = max(terms[j], cbn_peak_up(_largest(g0.terms, g1.terms, g2.terms, g3.terms)))
                outs[j] = max(outs[j], cbn_peak_down(_largest(g0.out, g1.out, g2.out, g3.out)))
            else:
                out[q] = _value_single(op, x[q], hi, lo, c1, c2, e[q])
                out[q1] = _value_single(op, x[q1], hi, lo, c1, c2, e[q1])
                out[q2] = _value_single(op, x[q2], hi, lo, c1, c2, e[q2])
                out[q3] = _value_single(op, x[q3], hi, lo, c1, c2, e[q3])
    for r in range(r4, nrows):
        i = base + r * W
        er = e + i if e != NULL else NULL  # (no residual: NULL)
        if not stream:
            _single_piece(op, x + i, dy + i, er, out + i + j0, j0, j1, f, F, terms, outs, g, W)
            continue
        for t in range(pieces):
            a, b = j0 + t * stream, min(j1, j0 + (t + 1) * stream)
            _single_piece(op, x + i, dy + i, er, buf + filled, a, b, f, F, terms, outs, g, W)
            filled += b - a
            if not whole or filled + W > stream or r == nrows - 1:
                if nontemporal:
                    cbn_stream_float(out + i + b - filled, buf, filled)
                else:
                    memcpy(out + i + b - filled, buf, filled * sizeof(float))
                filled = 0


cdef inline void _single_piece(SingleOp op, const_float_row x, const_float_row dy, const_float_row e, float_row dst,
                               Py_ssize_t a, Py_ssize_t b, const_float_row f, Py_ssize_t F, peak_row terms,
                               peak_row outs, const_float_row g, Py_ssize_t W) noexcept nogil:
    """Columns [a, b) of one row of _single_columns (at x, dy, e) into dst[0:b - a], raising the peaks of a DxSingle
    pass."""
    cdef Py_ssize_t j
    cdef GradPair g0
    for j in range(a, b):
        if SingleOp is GradSingle or SingleOp is GradGatedSingle:
            g0 = _grad_single(x[j], _dy(op, x[j], dy[j], x[j], g, W, j), f[j], f[F + j], f[2 * F + j], f[3 * F + j],
                              f[4 * F + j])
            dst[j - a] = g0.out
            terms[j] = max(terms[j], cbn_peak_up(cbn_magnitude(g0.terms)))
            outs[j] = max(outs[j], cbn_peak_down(cbn_magnitude(g0.out)))
        else:
            dst[j - a] = _value_single(op, x[j], f[j], f[F + j], f[2 * F + j], f[3 * F + j], e[j])


cdef inline Py_ssize_t _aligned_from(const floating *row, Py_ssize_t i0, Py_ssize_t i1) noexcept nogil:
    """Where the run [i0, i1) of a row of out (at row) takes up at a vector boundary (see ALIGNED_RUN): the affine
    passes in cache take a run of more than ALIGNED_RUN values before it on their own; i0 for shorter runs."""
    return min(i1, i0 + _to_vector(row + i0, sizeof(floating))) if i1 - i0 > ALIGNED_RUN else i0


cdef inline Py_ssize_t _to_vector(const void *p, size_t item) noexcept nogil:
    """Items of ``item`` bytes from p to the next multiple of CBN_VECTOR_BYTES (0 when p is one)."""
    return <Py_ssize_t>(((CBN_VECTOR_BYTES - <size_t>p % CBN_VECTOR_BYTES) % CBN_VECTOR_BYTES) // item)


cdef inline bint _dx_by_row(Layout L, Py_ssize_t width, const float *x, const float *dy,
                            const float *out) noexcept nogil:
    """Whether the float32 dx pass over a channel-minor block of ``width`` columns takes its rows one at a time
    (_single_columns): whole rows of at most SINGLE_RUN values beyond the caches (_from_memory), or rows a multiple
    of 4 KB long with dx less than STALL_BYTES past both x and dy modulo 4 KB, where four at a time would stall."""
    return ((width == L.W and LANES < L.W <= SINGLE_RUN and _from_memory(L, CACHED_VALUES))
            or _stalls(L, x, dy, out))


cdef inline bint _stalls(Layout L, const floating *x, const floating *dy, const floating *out) noexcept nogil:
    """Whether a channel-minor pass taking four rows at a time would stall on 4K aliasing: rows a multiple of 4 KB
    long, with out less than STALL_BYTES past both x and dy modulo 4 KB."""
    return (L.W * sizeof(floating)) % 4096 == 0 and _past(x, out) and _past(dy, out)


cdef inline bint _quarters_alias(Layout L, size_t item) noexcept nogil:
    """Whether the four quarters of a channel-minor block of L.rows rows start at the same offset modulo 4 KB."""
    return (_apart(QUARTER_ROWS, L.rows, L.W) * <Py_ssize_t>item) % 4096 == 0


cdef inline bint _past(const floating *a, const floating *out) noexcept nogil:
    """Whether out lies less than STALL_BYTES past a modulo 4 KB (and is not a)."""
    cdef size_t d = (<size_t>out - <size_t>a) % 4096
    return 0 < d < STALL_BYTES


cdef inline bint _from_memory(Layout L, Py_ssize_t cached) noexcept nogil:
    """Whether a channel-minor array is beyond the caches for a pass that takes arrays of up to ``cached`` values
    as in cache (CACHED_VALUES; a forward's moment sums CACHED_FORWARD, its float32 affine pass CACHED_FORWARD, or
    CACHED_VALUES on AMD's CPUs: AMD_CPU): the pass then goes along whole rows."""
    return L.N * L.W > cached


cdef void _apply_counted(ApplyOp op, const floating *x, const floating *dy, const floating *e,
                         floating *out, floating *dz, Py_ssize_t base, Py_ssize_t j0, Py_ssize_t j1,
                         Py_ssize_t W, const double *coef) noexcept nogil:
    """_apply_columns of a Valid pass over columns that all count: the pass without position weights."""
    cdef Grad grad
    cdef GradGated grad_gated
    cdef GradMaskedDz grad_masked_dz
    if ApplyOp is GradValid:
        _apply_columns(grad, x, dy, e, out, dz, base, j0, j1, W, coef, _every(), 0)
    elif ApplyOp is GradGatedValid:
        _apply_columns(grad_gated, x, dy, e, out, dz, base, j0, j1, W, coef, _every(), 0)
    elif ApplyOp is GradMaskedDzValid:
        _apply_columns(grad_masked_dz, x, dy, e, out, dz, base, j0, j1, W, coef, _every(), 0)


cdef inline Py_ssize_t _position(ApplyOp op, const Py_ssize_t *v, Py_ssize_t j) noexcept nogil:
    """The weight v[j] for the passes that read position weights (v is NULL for the others)."""
    if _weighted(op):
        return v[j]
    else:
        return 1


# -- the three steps over blocks ----------------------------------------------------------------------------------

cdef void _block_sums(SumOp op, Layout L, Py_ssize_t k, const floating *x, const floating *dy,
                      const floating *e, const double *coef, double *part, Positions P) noexcept nogil:
    """Partial sums of block k into part[k*L.part, +L.part), shifted by coef[0] (MomentsValid: weighted by P;
    GradSumsGated: gated by the interval rows of _gate).

    Minor: _minor_sums. Major: (s0, s1) of each channel of the block's group: row by row in memory order
    (_row_sums), or, for rows shorter than COL_CHUNK in blocks of MIN_IMAGES images or more, down the block's
    images: with SHORT_IMAGES images or more, a lane per column (the lanes' setup and fold cost about three rows),
    the whole rows of up to COL_CHUNK // S channels side by side (each image's rows of them one run of memory: one
    channel at a time, its rows W apart in both x and dy, thrashed L1 sets); with fewer, channel by channel, each
    row into one set of LANES lanes (_row_lanes). The lanes are folded pairwise (_fold) once per channel."""
    cdef double s[2 * COL_CHUNK]
    cdef double shift[COL_CHUNK]
    cdef floating gate[2 * COL_CHUNK]
    cdef const floating *h = _gate(coef, L.C, x)
    cdef Py_ssize_t c0, c1, n0, n1, i0, i1, c, j, n, q, w, g, off = k * L.part, hs = L.C
    if L.minor:
        _minor_sums(op, L, k, x, dy, e, coef, part, P)
        return
    _major_block(L, k, &c0, &c1, &n0, &n1, &i0, &i1)
    for j in range(L.part):
        part[off + j] = 0.0
    if i1 - i0 >= COL_CHUNK or n1 - n0 < MIN_IMAGES:
        for n in range(n0, n1):  # (in cache, the prefetch follows the block: see PREFETCH_BYTES)
            for c in range(c0, c1):
                _row_sums(op, x, dy, e, n * L.W + c * L.S + i0, i1 - i0, coef[c], &part[off + 2 * (c - c0)], P,
                          n * L.S + i0, h + c, hs, _next_run(L, c, c0, c1, i1 - i0))
        return
    if n1 - n0 >= SHORT_IMAGES:  # short rows down the block's images, a lane per column: the whole rows of
        w = i1 - i0                # up to COL_CHUNK // S channels side by side (one run of memory per image)
        g = max(1, COL_CHUNK // w) if w == L.S else 1
        if SumOp is MomentsValid:  # (its weights are of positions: one channel's columns at a time)
            g = 1
        c = c0
        while c < c1:
            q = min(g, c1 - c)
            for j in range(q):
                _lanes(op, coef[c + j], h + c + j, hs, &s[j * w], &shift[j * w], &gate[j * w], w, COL_CHUNK)
            _column_sums(op, x, dy, e, n0 * L.W + c * L.S + i0, L.W, n1 - n0, q * w, shift, s, &s[COL_CHUNK], P,
                         n0 * L.S + i0, L.S, 0, gate, COL_CHUNK, 0)
            for j in range(q):
                _add_folded(&s[j * w], w, COL_CHUNK, &part[off + 2 * (c + j - c0)])
            c += q
        return
    for c in range(c0, c1):  # fewer images: channel by channel, each row into LANES lanes
        _lanes(op, coef[c], h + c, hs, s, shift, gate, LANES, LANES)
        for n in range(n0, n1):
            _row_lanes(op, x, dy, e, n * L.W + c * L.S + i0, i1 - i0, shift, s, P, n * L.S + i0, gate, 0)
        _add_folded(s, LANES, LANES, &part[off + 2 * (c - c0)])


cdef inline Py_ssize_t _next_run(Layout L, Py_ssize_t c, Py_ssize_t c0, Py_ssize_t c1,
                                 Py_ssize_t width) noexcept nogil:
    """Values from the end of channel c's run of ``width`` values in a channel-major block of channels [c0, c1) to
    the start of the block's next run (channel c + 1's in the same image, or channel c0's in the next image) in
    cache; beyond the caches 0 (the values right after the run)."""
    if not _in_cache(L.N * L.W):
        return 0
    return L.S - width + (L.W - (c1 - c0) * L.S if c + 1 == c1 else 0)


cdef void _minor_sums(SumOp op, Layout L, Py_ssize_t k, const floating *x, const floating *dy,
                      const floating *e, const double *coef, double *part, Positions P) noexcept nogil:
    """_block_sums of channel-minor block k: s0 of each of its columns, then s1 of each, accumulated in its slot of
    part, _sum_chunk columns at a time down its rows (shift: coef's first row)."""
    cdef const floating *h = _gate(coef, L.C * L.G, x)
    cdef Py_ssize_t n0, n1, i0, i1, q, a, b, w = _sum_chunk(op, L)
    cdef double *s
    _minor_block(L, k, &n0, &n1, &i0, &i1)
    for q in range(_cdiv(i1 - i0, w)):
        a, b = i0 + q * w, min(i1, i0 + (q + 1) * w)
        s = part + k * L.part + a - i0
        _zero_lanes(s, b - a, L.width)
        if SumOp is MomentsValid and _uniform(P, a, b):
            _counted_rows(L, x, n0, n1, a, b, coef + a, s, L.width, P)
        else:
            _column_sums(op, x, dy, e, n0 * L.W + a, L.W, n1 - n0, b - a, coef + a, s, s + L.width, P, n0 * L.G,
                         L.G, a, h + a, L.C * L.G, 0)


cdef inline Py_ssize_t _sum_chunk(SumOp op, Layout L) noexcept nogil:
    """Columns per pass of a channel-minor block's sums: COL_CHUNK, or the block's width for arrays from memory
    (_from_memory; the masked moments keep COL_CHUNK: where their runs of counted rows start depends on it)."""
    cdef Py_ssize_t cached = CACHED_FORWARD if SumOp is Moments else CACHED_VALUES
    return L.width if _from_memory(L, cached) and not (SumOp is MomentsValid) else COL_CHUNK


cdef inline bint _uniform(Positions P, Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    """True when columns [a, b) of a channel-minor folded row are at one position (in one run of C columns)."""
    return P.run != 0 and a // P.run == (b - 1) // P.run


cdef void _counted_rows(Layout L, const floating *x, Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t a, Py_ssize_t b,
                        const double *shift, double *s, Py_ssize_t stride, Positions P) noexcept nogil:
    """MomentsValid sums of columns [a, b) (at one position of each row: _uniform) of rows [n0, n1) into s and
    s[stride:]: the plain Moments sums of each run of counted rows, the others skipped."""
    cdef Moments moments
    cdef Py_ssize_t n = n0, start
    while n < n1:
        while n < n1 and not P.valid[n * L.G + a // P.run]:
            n += 1
        start = n
        while n < n1 and P.valid[n * L.G + a // P.run]:
            n += 1
        if n > start:
            _column_sums(moments, x, x, x, start * L.W + a, L.W, n - start, b - a, shift, s, &s[stride], P, 0,
                         0, 0, NULL, 0, 0)


cdef void _row_sums(SumOp op, const floating *x, const floating *dy, const floating *e,
                    Py_ssize_t base, Py_ssize_t n, double k, double *pair, Positions P, Py_ssize_t p,
                    const floating *hc, Py_ssize_t hs, Py_ssize_t jump) noexcept nogil:
    """pair[0] += sum(w), pair[1] += sum(w*u) over the n values at x[base:] of one channel (at positions p, p + 1,
    ...; u = x - k, w as in _column_sums, the channel's gate coefficients at hc[r*hs]): value i in lane i % LANES
    (_row_lanes), the lanes folded pairwise; the block's next run starts ``jump`` values past this one's end."""
    cdef double s[2 * LANES]
    cdef double shift[LANES]
    cdef floating gate[2 * LANES]
    _lanes(op, k, hc, hs, s, shift, gate, LANES, LANES)
    _row_lanes(op, x, dy, e, base, n, shift, s, P, p, gate, jump)
    _add_folded(s, LANES, LANES, pair)


cdef inline void _lanes(SumOp op, double k, const floating *hc, Py_ssize_t hs, double *s, double *shift,
                        floating *gate, Py_ssize_t n, Py_ssize_t stride) noexcept nogil:
    """n lanes of a channel's sums (_row_sums, _block_sums), shift k, gate coefficients at hc[r*hs]: the sums
    s[:n] = s[stride:stride + n] = 0, shift[:n] = k, gate[r*stride:r*stride + n] = hc[r*hs] (GradSumsGated)."""
    cdef Py_ssize_t q, r
    for q in range(n):
        shift[q] = k
    _zero_lanes(s, n, stride)
    if SumOp is GradSumsGated:
        for r in range(2):
            for q in range(n):
                gate[r * stride + q] = hc[r * hs]


cdef inline void _add_folded(double *s, Py_ssize_t n, Py_ssize_t stride, double *pair) noexcept nogil:
    """pair[0] += the sum of s[:n], pair[1] += the sum of s[stride:stride + n], each folded pairwise (_fold)."""
    _fold(s, n)
    _fold(&s[stride], n)
    pair[0] += s[0]
    pair[1] += s[stride]


cdef inline void _row_lanes(SumOp op, const floating *x, const floating *dy, const floating *e,
                            Py_ssize_t base, Py_ssize_t n, const double *shift, double *s, Positions P,
                            Py_ssize_t p, const floating *gate, Py_ssize_t jump) noexcept nogil:
    """The sums of the n values at x[base:] (positions p, p + 1, ...) added into the lanes of _lanes: value i in lane
    i % LANES (the row cut into rows of LANES values, down which _column_sums runs, prefetching as the block reads:
    its next run starts ``jump`` values past this one's end); the moments and the plain gradient sums keep the lanes
    in registers where CBN_LANES_IN_REGISTERS (cbn_row_moments, cbn_row_grads)."""
    cdef Py_ssize_t nsub = n // LANES, further = jump + n - nsub * LANES
    cdef Py_ssize_t step = _prefetch_step(sizeof(floating), nsub * LANES, further)
    if (SumOp is Moments or SumOp is GradSums) and CBN_LANES_IN_REGISTERS:
        if SumOp is Moments and floating is float:
            cbn_row_moments_float(x + base, dy, nsub, shift[0], s, step, further)
        elif SumOp is Moments:
            cbn_row_moments_double(x + base, dy, nsub, shift[0], s, step, further)
        elif floating is float:
            cbn_row_grads_float(x + base, dy + base, nsub, shift[0], s, step, further)
        else:
            cbn_row_grads_double(x + base, dy + base, nsub, shift[0], s, step, further)
    else:
        _column_sums(op, x, dy, e, base, LANES, nsub, LANES, shift, s, &s[LANES], P, p, LANES, 0, gate, LANES,
                     further)
    if n > nsub * LANES:
        _column_sums(op, x, dy, e, base + nsub * LANES, 0, 1, n - nsub * LANES, shift, s, &s[LANES], P,
                     p + nsub * LANES, 0, 0, gate, LANES, 0)


cdef inline void _fold(double *s, Py_ssize_t n) noexcept nogil:
    """s[0] = the sum of s[:n] (n >= 1), in a fixed pairwise order (in place): while more than one is left, the
    first n // 2 take the last n // 2 (log2 n vectorised steps, not n dependent adds)."""
    cdef Py_ssize_t q, h
    cdef const double *top
    while n > 1:
        h = n // 2
        top = s + n - h
        for q in range(h):
            s[q] += top[q]
        n -= h


cdef inline void _zero_lanes(double *s, Py_ssize_t n, Py_ssize_t stride) noexcept nogil:
    """s[:n] = s[stride:stride + n] = 0 (the two sums' lanes)."""
    cdef Py_ssize_t j
    for j in range(n):
        s[j] = 0.0
        s[stride + j] = 0.0


cdef void _block_apply(ApplyOp op, Layout L, Py_ssize_t k, const floating *x, const floating *dy,
                       const floating *e, floating *out, floating *dz, const double *coef,
                       Positions P) noexcept nogil:
    """The elementwise pass over block k (the Valid passes with the weights of P). A DxSingle pass writes the peaks of
    each of the block's columns (minor: the |t1 + t2| of its columns, then their |out|, kept to 16 bits as
    _single_columns does) or channels (major: of its group of channels, likewise, in full 32 bits: _grad_redo
    rounds them as it gathers them) over the block's rows to the block's slot of partial sums (_block_peaks)."""
    cdef Py_ssize_t c0, c1, n0, n1, i0, i1, c, n, a, b
    cdef Peaks peaks
    cdef const Py_ssize_t *v
    cdef unsigned short *slot = _block_peaks(L, coef, k) if _dx_single(op) else NULL
    cdef unsigned int *wide = <unsigned int *>slot  # major: the peaks in full (rounded as gathered: _grad_redo)
    if L.minor:
        _minor_block(L, k, &n0, &n1, &i0, &i1)
        if (ApplyOp is GradSingle or ApplyOp is GradGatedSingle) and floating is float:
            for c in range(_outs_at(i1 - i0) + i1 - i0):
                slot[c] = 0
            _single_columns(op, x, dy, x, out, n0 * L.W, L.W, n1 - n0, i0, i1, _float_rows(coef, L.W), L.W + SKEW,
                            slot, _outs_at(i1 - i0), _gate(coef, L.W, x),
                            ONE_ROW if _dx_by_row(L, i1 - i0, x, dy, out) else ADJACENT_ROWS, L.stream, L.nontemporal)
        elif ((ApplyOp is Affine or ApplyOp is AffineRelu or ApplyOp is AffineAdd or ApplyOp is AffineAddRelu)
              and floating is float):  # (_affine spelt out: _single_columns takes SingleOp, known at compile time)
            # in cache, runs of SINGLE_RUN columns down the block (ALIGNED_RUN), unless four rows at a time would
            # stall (_stalls): then as from memory
            if not _from_memory(L, CACHED_VALUES if AMD_CPU else CACHED_FORWARD) and not _stalls(L, x, x, out):
                b = _aligned_from(out + n0 * L.W, i0, i1)
                if b > i0:
                    _single_columns(op, x, x, e, out, n0 * L.W, L.W, n1 - n0, i0, b, _float_rows(coef, L.W),
                                    L.W + SKEW, NULL, 0, NULL, ADJACENT_ROWS, L.stream, L.nontemporal)
                for c in range(_cdiv(i1 - b, SINGLE_RUN)):
                    a = b + c * SINGLE_RUN
                    _single_columns(op, x, x, e, out, n0 * L.W, L.W, n1 - n0, a, min(i1, a + SINGLE_RUN),
                                    _float_rows(coef, L.W), L.W + SKEW, NULL, 0, NULL, ADJACENT_ROWS, L.stream,
                                    L.nontemporal)
            elif AMD_CPU and not L.stream and not _stalls(L, x, x, out):  # arrays from memory on AMD's CPUs: four
                # rows a step from the block's quarters (four runs of memory read in order), stored plainly
                _single_columns(op, x, x, e, out, n0 * L.W, L.W, n1 - n0, i0, i1, _float_rows(coef, L.W),
                                L.W + SKEW, NULL, 0, NULL, QUARTER_ROWS, 0, False)
            elif L.stream or AMD_CPU:  # arrays from memory (or rows that would stall): whole rows one at a time,
                # in memory order, in one call (streamed, whole rows gather in the stream buffer); not streamed, a
                # call per row on CPUs other than AMD's (AMD_CPU)
                _single_columns(op, x, x, e, out, n0 * L.W, L.W, n1 - n0, i0, i1, _float_rows(coef, L.W),
                                L.W + SKEW, NULL, 0, NULL, ONE_ROW, L.stream, L.nontemporal)
            else:
                for n in range(n0, n1):
                    _single_columns(op, x, x, e, out, n * L.W, L.W, 1, i0, i1, _float_rows(coef, L.W),
                                    L.W + SKEW, NULL, 0, NULL, ONE_ROW, 0, False)
        else:  # the double passes: row by row in memory order, but four rows at a time in runs of DOUBLE_RUN
            # columns where the block's coefficient rows outgrow L1 (in cache; not those with position weights)
            n = n0
            if (not _weighted(op) and i1 - i0 > DOUBLE_RUN and not _from_memory(L, CACHED_VALUES)
                    and not _stalls(L, x, dy, out)):
                n = n0 + (n1 - n0) // 4 * 4
                b = _aligned_from(out + n0 * L.W, i0, i1)
                if b > i0:
                    _apply_fours(op, <floating *>x, <floating *>dy, <floating *>e, out, dz, n0 * L.W, n - n0, i0, b,
                                 L.W, coef)
                for c in range(_cdiv(i1 - b, DOUBLE_RUN)):
                    a = b + c * DOUBLE_RUN
                    _apply_fours(op, <floating *>x, <floating *>dy, <floating *>e, out, dz, n0 * L.W, n - n0, a,
                                 min(i1, a + DOUBLE_RUN), L.W, coef)
            for n in range(n, n1):
                _apply_columns(op, x, dy, e, out, dz, n * L.W, i0, i1, L.W, coef, P, n * L.G)
        return
    _major_block(L, k, &c0, &c1, &n0, &n1, &i0, &i1)
    if _affine(op) and not L.stream and i1 - i0 > ALIGNED_RUN:  # each row: before out's vector boundary, the rest
        for n in range(n0, n1):
            for c in range(c0, c1):
                a = n * L.W + c * L.S
                b = a + _aligned_from(out + a, i0, i1)
                _apply_row(op, x, dy, e, out, dz, a + i0, b, coef + c, L.C, NULL, _gate(coef, L.C, x) + c)
                _apply_row(op, x, dy, e, out, dz, b, a + i1, coef + c, L.C, NULL, _gate(coef, L.C, x) + c)
        return
    if _dx_single(op):
        for c in range(2 * L.group):
            wide[c] = 0
    for n in range(n0, n1):
        for c in range(c0, c1):
            a = n * L.W + c * L.S
            v = P.valid + n * L.S + i0 if P.valid != NULL else NULL
            if L.stream:
                peaks = _streamed_row(op, x, dy, e, out, dz, a + i0, a + i1, coef + c, L.C, v,
                                      _gate(coef, L.C, x) + c, L.stream)
            else:
                peaks = _apply_row(op, x, dy, e, out, dz, a + i0, a + i1, coef + c, L.C, v, _gate(coef, L.C, x) + c)
            if _dx_single(op):
                wide[c - c0] = max(wide[c - c0], peaks.terms)
                wide[L.group + c - c0] = max(wide[L.group + c - c0], peaks.out)


cdef void _apply_pass(Pass kind, Layout L, Py_ssize_t k, const floating *x, const floating *dy,
                      const floating *e, floating *out, floating *dz, const double *coef,
                      Positions P) noexcept nogil:
    """The elementwise pass ``kind`` over block k (its compiled specialisation)."""
    cdef Affine affine
    cdef AffineRelu affine_relu
    cdef AffineAdd affine_add
    cdef AffineAddRelu affine_add_relu
    cdef AffineGated affine_gated
    cdef AffineMaskedDz affine_masked_dz
    cdef Grad grad
    cdef GradGated grad_gated
    cdef GradMaskedDz grad_masked_dz
    cdef GradValid grad_valid
    cdef GradGatedValid grad_gated_valid
    cdef GradMaskedDzValid grad_masked_dz_valid
    cdef GradSingle grad_single
    cdef GradGatedSingle grad_gated_single
    if kind == AFFINE:
        _block_apply(affine, L, k, x, dy, e, out, dz, coef, P)
    elif kind == AFFINE_RELU:
        _block_apply(affine_relu, L, k, x, dy, e, out, dz, coef, P)
    elif kind == AFFINE_ADD:
        _block_apply(affine_add, L, k, x, dy, e, out, dz, coef, P)
    elif kind == AFFINE_ADD_RELU:
        _block_apply(affine_add_relu, L, k, x, dy, e, out, dz, coef, P)
    elif kind == AFFINE_GATED:
        _block_apply(affine_gated, L, k, x, dy, e, out, dz, coef, P)
    elif kind == AFFINE_MASKED_DZ:
        _block_apply(affine_masked_dz, L, k, x, dy, e, out, dz, coef, P)
    elif kind == GRAD:
        _block_apply(grad, L, k, x, dy, e, out, dz, coef, P)
    elif kind == GRAD_GATED:
        _block_apply(grad_gated, L, k, x, dy, e, out, dz, coef, P)
    elif kind == GRAD_MASKED_DZ:
        _block_apply(grad_masked_dz, L, k, x, dy, e, out, dz, coef, P)
    elif kind == GRAD_VALID:
        _block_apply(grad_valid, L, k, x, dy, e, out, dz, coef, P)
    elif kind == GRAD_GATED_VALID:
        _block_apply(grad_gated_valid, L, k, x, dy, e, out, dz, coef, P)
    elif kind == GRAD_SINGLE:
        _block_apply(grad_single, L, k, x, dy, e, out, dz, coef, P)
    elif kind == GRAD_GATED_SINGLE:
        _block_apply(grad_gated_single, L, k, x, dy, e, out, dz, coef, P)
    else:
        _block_apply(grad_masked_dz_valid, L, k, x, dy, e, out, dz, coef, P)
    if L.nontemporal:
        cbn_stream_fence()


cdef void _grad_sums(Pass kind, Layout L, Py_ssize_t k, const floating *x, const floating *dy,
                     const floating *e, const double *coef, double *part) noexcept nogil:
    """The gradient sums of block k for the dx pass ``kind``: of dy, masked(dy) or gated(dy)."""
    cdef GradSums gradsums
    cdef GradSumsMasked gradsums_masked
    cdef GradSumsGated gradsums_gated
    cdef Positions every = _every()
    if kind == AFFINE_GATED or kind == GRAD_GATED or kind == GRAD_GATED_VALID or kind == GRAD_GATED_SINGLE:
        _block_sums(gradsums_gated, L, k, x, dy, e, coef, part, every)
    elif kind == AFFINE_MASKED_DZ or kind == GRAD_MASKED_DZ or kind == GRAD_MASKED_DZ_VALID:
        _block_sums(gradsums_masked, L, k, x, dy, e, coef, part, every)
    else:
        _block_sums(gradsums, L, k, x, dy, e, coef, part, every)


# -- per-channel work -----------------------------------------------------------------------------------------------
# The coefficients of the elementwise passes are four rows of C*G columns (coef[row*C*G + j]: column j as the data
# passes read it; a forward pass reads the first three, c3 is left unwritten there, and a channel-minor float32
# forward pass none: its float32 rows come from _single_coefs); the per-channel steps write them compactly, rows of
# C (cc[row*C + c]), and _expand spreads those over the columns. With G == 1 the two are one array.

cdef inline Py_ssize_t _terms(Layout L) noexcept nogil:
    """Partial sums per channel: minor, a column per row block and coefficient column; major, its group's blocks."""
    return (L.nblocks // L.ncol) * L.G if L.minor else L.per_channel


cdef double *_merge(Layout L, const double *part, double *tree) noexcept nogil:
    """Every channel's two sums over its blocks' partial sums, added pairwise in a fixed tree over them in block
    order (columns in order within a block, for minor), so the rounding error grows with log2 of their number.
    The partial sums are gathered into tree (_terms(L) rows of 2C: s0 of each channel, then s1) and the tree runs
    over whole rows; returns tree, whose first row then holds the sums."""
    cdef Py_ssize_t C = L.C, w = 2 * L.C, n = _terms(L), t, g, c, cc, r, s, q, j, jj, rb, b, i, run
    if L.minor:
        # tree row rb*G + r*S + s: value s of each channel c in folded row r of row block rb, the partial sums of
        # column j = r*C*S + c*S + s: S columns apart in the blocks, gathered in runs that end where a block does
        for rb in range(L.nblocks // L.ncol):
            for r in range(L.G // L.S):
                for s in range(L.S):
                    t = (rb * L.G + r * L.S + s) * w
                    c = 0
                    while c < C:
                        j = r * C * L.S + c * L.S + s
                        q, jj = j // L.width, j % L.width
                        run = min(C - c, _cdiv(L.width - jj, L.S))
                        b = (rb * L.ncol + q) * L.part + jj
                        for i in range(run):
                            tree[t + c + i] = part[b + i * L.S]
                            tree[t + C + c + i] = part[b + L.width + i * L.S]
                        c += run
    else:
        for t in range(n):
            for g in range(L.ngroups):
                b = (t * L.ngroups + g) * L.part
                for cc in range(min(L.group, C - g * L.group)):
                    tree[t * w + g * L.group + cc] = part[b + 2 * cc]
                    tree[t * w + C + g * L.group + cc] = part[b + 2 * cc + 1]
    _pairwise(tree, n, w)
    return tree


cdef void _pairwise(double *rows, Py_ssize_t n, Py_ssize_t w) noexcept nogil:
    """rows[0:w] = the sum of the n rows of w values, the two halves added recursively (in place)."""
    cdef Py_ssize_t i, h = n // 2
    if n == 1:
        return
    _pairwise(rows, h, w)
    _pairwise(rows + h * w, n - h, w)
    for i in range(w):
        rows[i] += rows[h * w + i]


cdef void _expand(Layout L, const double *cc, floating *coef, Py_ssize_t nrows) noexcept nogil:
    """coef rows [0, nrows) from the compact cc, in coef's type: each channel's value at column c, then in each of
    its G columns (_spread). Nothing to do when cc is coef."""
    cdef Py_ssize_t row, c, W = L.C * L.G
    if <const void *>cc == <void *>coef:
        return
    for row in range(nrows):
        for c in range(L.C):
            coef[row * W + c] = <floating>cc[row * L.C + c]
    _spread(L, coef, W, nrows)


# -- forward ------------------------------------------------------------------------------------------------------

cdef void _finish_stats(Py_ssize_t c0, Py_ssize_t c1,
                        const double *s1, const double *s2, Py_ssize_t stride,  # IN sums of channel c at (c-c0)*stride
                        double m, bint stats_only, bint update,
                        floating *running_mean, floating *running_var,  # INOUT (C,), when update
                        double momentum, double eps,
                        double *mean, double *invstd,                    # OUT (C,)
                        const double *shift) noexcept nogil:             # IN (C,) K
    """Channels [c0, c1), each from s1 = sum(x - K), s2 = sum((x - K)**2) over its m values, K (shift[c]) a value
    of it: mean = K + s1/m, M2 = s2 - s1**2/m (>= 0; loses at most log2(m + 1) bits, nothing for data near K),
    invstd = 1/sqrt(M2/m + eps) (stats_only: M2 in invstd's place, and nothing else). NaN stays NaN.
    Running statistics: r_mean = (1 - f)*r_mean + f*mean, r_var = (1 - f)*r_var + f*M2/(m - 1). A loop per step,
    each vectorised across channels."""
    cdef Py_ssize_t c, i
    cdef double M2
    for c in range(c0, c1):  # M2 in invstd's place
        i = (c - c0) * stride
        M2 = s2[i] - s1[i] * s1[i] / m
        mean[c] = shift[c] + s1[i] / m
        invstd[c] = 0.0 if M2 < 0.0 else M2
    if stats_only:
        return
    if update:
        for c in range(c0, c1):
            running_mean[c] = <floating>((1.0 - momentum) * running_mean[c] + momentum * mean[c])
            running_var[c] = <floating>((1.0 - momentum) * running_var[c] + momentum * (invstd[c] / (m - 1.0)))
    for c in range(c0, c1):
        invstd[c] = 1.0 / sqrt(invstd[c] / m + eps)


cdef void _affine_coefs(Py_ssize_t C, Py_ssize_t c0, Py_ssize_t c1, const double *mean, const double *invstd,
                        const floating *weight, const floating *bias, double *cc) noexcept nogil:
    """cc of channels [c0, c1) = (mean, gamma*invstd, beta) (gamma = 1, beta = 0 where weight, bias are NULL)."""
    cdef Py_ssize_t c
    _gamma_times(c0, c1, weight, invstd, cc + C)
    for c in range(c0, c1):
        cc[c] = mean[c]
    _beta(c0, c1, bias, cc + 2 * C)


cdef void _gamma_times(Py_ssize_t c0, Py_ssize_t c1, const floating *weight, const double *v,
                       coef_t *out) noexcept nogil:
    """out[c] = gamma*v[c] for the channels [c0, c1) (gamma = 1 where weight is NULL), rounded once to out's type:
    a loop of its own for each case, without a select in it, so that both vectorise."""
    cdef Py_ssize_t c
    if weight == NULL:
        for c in range(c0, c1):
            out[c] = <coef_t>v[c]
    else:
        for c in range(c0, c1):
            out[c] = <coef_t>(<double>weight[c] * v[c])


cdef void _beta(Py_ssize_t c0, Py_ssize_t c1, const floating *bias, coef_t *out) noexcept nogil:
    """out[c] = beta for the channels [c0, c1) (0 where bias is NULL)."""
    cdef Py_ssize_t c
    if bias == NULL:
        for c in range(c0, c1):
            out[c] = 0.0
    else:
        for c in range(c0, c1):
            out[c] = <coef_t>bias[c]


cdef inline void *_data(object a):
    """The data pointer of an ndarray (the callers pass aligned C-contiguous arrays of the right dtype), or NULL
    for None."""
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray>a)


cdef enum:
    SMALL_WORK = 1024     # doubles of scratch a call keeps on its stack (beyond: a _Scratch)


cdef class _Scratch:
    """The doubles a call works in (coefficients, partial sums, their merge) when they are more than SMALL_WORK:
    malloc'd, freed with the object."""
    cdef double *p

    def __cinit__(self, Py_ssize_t n):
        self.p = <double *>malloc(max(1, n) * sizeof(double))
        if self.p == NULL:
            raise MemoryError(f"cannot allocate the kernel's scratch of {n} doubles")

    def __dealloc__(self):
        free(self.p)


# A call's scratch (doubles): coef (4*C*G), the gate rows of a backward after a ReLU (_gate: room for 2*C*G), the
# float32 rows (_single_coefs, _narrow: 5 of C*G + SKEW floats, _single_rows), cc (4*C, when G > 1), the sums (2*C)
# and, for calls that sum (and every backward), the partial sums and their merge tree; a DxSingle pass then writes
# its peaks over the partial sums (_block_peaks) and its channels' checks over the tree (_grad_redo).

cdef inline Py_ssize_t _single_rows(Layout L) noexcept nogil:
    """Doubles of scratch that the float32 rows take (_single_coefs, _narrow)."""
    return (5 * (L.C * L.G + SKEW) + 1) // 2


cdef inline Py_ssize_t _sums_at(Layout L) noexcept nogil:
    """Where the (2, C) sums of a call are in its scratch."""
    return 6 * L.C * L.G + _single_rows(L) + (4 * L.C if L.G > 1 else 0)


cdef inline Py_ssize_t _work_size(Layout L, bint sums) noexcept nogil:
    """Doubles of scratch a call needs."""
    return _sums_at(L) + 2 * L.C + (L.nblocks * L.part + _terms(L) * 2 * L.C if sums else 0)


cdef inline double *_compact(Layout L, double *work) noexcept nogil:
    """Where the per-channel steps write their coefficients: cc, or coef itself when G == 1."""
    return work + 6 * L.C * L.G + _single_rows(L) if L.G > 1 else work


cdef inline floating *_gate(const double *coef, Py_ssize_t W, const floating *x) noexcept nogil:
    """The two gate rows of W columns after coef's four rows (_gate_coef: room for 2*W doubles), in the data's type:
    the ends of each column's interval are values of that type, so the gated passes compare x with them exactly in
    it (x only selects the type)."""
    return <floating *>(coef + 4 * W)


cdef inline float *_float_rows(const double *coef, Py_ssize_t W) noexcept nogil:
    """Where the float32 rows start (_single_coefs, _narrow): after coef's four rows and the two gate rows, of W
    columns each."""
    return <float *>(coef + 6 * W)


cdef inline double *_parts(Layout L, const double *work) noexcept nogil:
    """The partial sums of the blocks (L.part doubles each), then their merge tree."""
    return <double *>work + _sums_at(L) + 2 * L.C


cdef inline unsigned short *_block_peaks(Layout L, const double *work, Py_ssize_t k) noexcept nogil:
    """Block k's peaks of a DxSingle pass (_block_apply), in its slot of partial sums (used by then)."""
    return <unsigned short *>(_parts(L, work) + k * L.part)


cdef void _gate_coef(Layout L, const double *mean, const double *gate, double *cc, double *coef,
                     const floating *x) noexcept nogil:
    """The gate rows of a backward after a forward with ReLU, from the forward's mean and gate (its (scale, shift)
    per channel): per channel the interval [lo, hi] of the inputs whose output the ReLU let through, computed
    into cc and spread over the columns (_expand). The forward's AffineRelu pass computes the pre-activation of
    input a as v(a) = ((a - h0) - h1)*h2 + h3 in the floating type of x (float32: h0 + h1 the float split of the
    mean, as _single_coefs, h2 and h3 the rounded scale and shift; float64: (mean, 0, scale, shift)). Each step rounds
    monotonically, so the inputs with v > 0 are an interval of the floating values (an end of it infinite when
    v(+inf) or v(-inf) > 0; else around h0 if v(h0) > 0; else empty: [inf, -inf]), and its ends, found by
    _edge, make the gate the forward's own test, to the bit, for every input (NaN: outside)."""
    cdef Py_ssize_t c, C = L.C
    cdef floating h0, h1, h2, h3, top = <floating>INFINITY
    cdef double root
    cdef bint up, down
    cdef long long start, bottom = _key(-top), upper = _key(top)
    for c in range(C):
        h0 = <floating>mean[c]
        h1 = <floating>(mean[c] - <double>h0) if floating is float else 0.0
        h2, h3 = <floating>gate[c], <floating>gate[C + c]
        root = <double>h0 + <double>h1 - <double>h3 / <double>h2  # where v is 0 in real arithmetic
        start = _key(<floating>(root if root == root else 0.0))
        up, down = _passes(top, h0, h1, h2, h3), _passes(-top, h0, h1, h2, h3)
        if up and not down:  # [lo, inf]
            cc[c], cc[C + c] = _value_of(_edge(_inside(start, upper, h0, h1, h2, h3), bottom, h0, h1, h2, h3), h0), top
        elif down and not up:  # [-inf, hi]
            cc[c], cc[C + c] = -top, _value_of(_edge(_inside(start, bottom, h0, h1, h2, h3), upper, h0, h1, h2, h3), h0)
        elif _passes(h0, h0, h1, h2, h3):
            start = _key(h0)
            cc[c] = _value_of(_edge(start, bottom, h0, h1, h2, h3), h0)
            cc[C + c] = _value_of(_edge(start, upper, h0, h1, h2, h3), h0)
        else:
            cc[c], cc[C + c] = top, -top
    _expand(L, cc, _gate(coef, L.C * L.G, x), 2)


cdef inline bint _passes(floating a, floating h0, floating h1, floating h2, floating h3) noexcept nogil:
    """The forward's ReLU lets input a through: v(a) > 0 (_gate_coef)."""
    return ((a - h0) - h1) * h2 + h3 > 0


cdef inline unsigned long long _distance(long long a, long long b) noexcept nogil:
    """|b - a| of two keys (exact: it is below 2**64)."""
    return <unsigned long long>b - <unsigned long long>a if b >= a else <unsigned long long>a - <unsigned long long>b


cdef inline long long _moved(long long k, long long towards, unsigned long long n) noexcept nogil:
    """The key n steps from k towards key ``towards`` (n at most their distance)."""
    return <long long>(<unsigned long long>k + n) if towards > k else <long long>(<unsigned long long>k - n)


cdef long long _inside(long long k, long long end, floating h0, floating h1, floating h2,
                       floating h3) noexcept nogil:
    """A key whose value passes (_passes), from k towards end (whose value passes): k itself, else the first of
    steps doubling in length from k, or end."""
    cdef unsigned long long step = 1
    while not _passes(_value_of(k, h0), h0, h1, h2, h3):
        if _distance(k, end) <= step:
            return end
        k = _moved(k, end, step)
        step *= 2
    return k


cdef long long _edge(long long k, long long end, floating h0, floating h1, floating h2,
                     floating h3) noexcept nogil:
    """The last key from k (whose value passes) towards end whose value passes, the test monotone between them:
    steps doubling in length from k until one fails (or end passes), then halving between the last key that
    passed and the first that failed."""
    cdef unsigned long long step = 1
    cdef long long good = k, bad, mid
    while good != end:
        bad = _moved(good, end, step) if _distance(good, end) > step else end
        if not _passes(_value_of(bad, h0), h0, h1, h2, h3):
            while _distance(good, bad) > 1:
                mid = _moved(good, bad, _distance(good, bad) // 2)
                if _passes(_value_of(mid, h0), h0, h1, h2, h3):
                    good = mid
                else:
                    bad = mid
            return good
        good = bad
        step *= 2
    return end


cdef inline long long _key(floating a) noexcept nogil:
    """An integer in the order of the floating values (not NaN): -0 and 0 alike, neighbours one apart (the bits of
    |a|, negated for a < 0)."""
    cdef int b32
    cdef long long b64
    if a == 0:
        return 0
    cdef floating m = -a if a < 0 else a
    if floating is float:
        memcpy(&b32, &m, sizeof(float))
        b64 = b32
    else:
        memcpy(&b64, &m, sizeof(double))
    return -b64 if a < 0 else b64


cdef inline floating _value_of(long long k, floating like) noexcept nogil:
    """The floating value of key k (_key; like only selects the type)."""
    cdef int b32
    cdef long long b64 = -k if k < 0 else k
    cdef floating m
    if floating is float:
        b32 = <int>b64
        memcpy(&m, &b32, sizeof(float))
    else:
        memcpy(&m, &b64, sizeof(double))
    return -m if k < 0 else m


cdef inline double *_totals(Layout L, double *work) noexcept nogil:
    """The (2, C) sums of a call."""
    return work + _sums_at(L)


cdef inline void _coefficients(Layout L, const double *cc, double *coef, bint single) noexcept nogil:
    """A dx pass's four coef rows from the compact cc (_expand), and their float32 rows when a channel-minor dx
    pass runs in float32 (the channel-major ones narrow a row's coefficients themselves)."""
    _expand(L, cc, coef, 4)
    if single and L.minor:
        _narrow(L.C * L.G, 0, L.C * L.G, coef, _float_rows(coef, L.C * L.G))


cpdef enum ForwardFlag:
    FWD_BATCH = 1    # normalise with the batch's statistics (else with given ones)
    FWD_UPDATE = 2   # update the running statistics
    FWD_RELU = 4     # fused ReLU


def forward(cnp.ndarray x,                # IN the (N, C, S) input's memory (any shape: its data is read)
            y,                            # OUT (N*C*S,), or None: statistics only (FWD_BATCH)
            z,                            # IN (N*C*S,) the residual added to the normalised value, or None
            Py_ssize_t N, Py_ssize_t C,
            tuple channels,               # (running_mean, running_var, weight, bias): INOUT, INOUT, IN, IN; None
                                          # where absent (the running ones are read with FWD_UPDATE, and without
                                          # FWD_BATCH when given)
            cnp.ndarray stats,            # OUT (2C,) mean, invstd; IN mean, var without FWD_BATCH and running
                                          # statistics in channels
            int flags, double momentum, double eps, int thread_cap,
            valid=None,                   # IN (N*S,) intp: 1 where a position counts in the statistics, else 0; or None
            double count=0.0,             # with valid: the number of positions it marks (> 0)
            gate=None):                   # OUT (2C,) float64 or None: y's scale and shift (FWD_RELU, no z)
    """Batch-norm forward: y = act(gamma*(x - mean)*invstd + beta + z) per channel, invstd = 1/sqrt(var + eps),
    act = max(0, .) with FWD_RELU (else the identity), z = 0 when None; float64 in double, float32 in float32 from
    the double coefficients (_value_single). Arrays are aligned, C-contiguous and of x's dtype (stats float64), as
    the caller checked.

    FWD_BATCH: mean and var (biased) of the batch, written to stats as (mean, invstd); with FWD_UPDATE the running
    statistics are updated in place. Otherwise the given statistics' mean and invstd (_given_stats): the running
    ones of channels when it has them, else stats comes in as (mean, var). With y None: the batch mean and, in
    invstd's place, M2 = sum((x - mean)**2), nothing else.
    With valid, the batch statistics are those of the count positions it marks (every position is normalised).
    With gate: each channel's gamma*invstd, then beta, for the backward to recompute the ReLU's gate (_gate_coef).
    """
    cdef double *mean = <double *>cnp.PyArray_DATA(stats)
    if cnp.PyArray_SIZE(x) == 0:  # no values: a given statistics' (mean, invstd) only (a batch's: the caller's NaN)
        if flags & FWD_BATCH:
            return
        if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT:
            _given_stats[float](C, <float *>_data(channels[0]), <float *>_data(channels[1]), eps, mean, mean + C)
        else:
            _given_stats[double](C, <double *>_data(channels[0]), <double *>_data(channels[1]), eps, mean, mean + C)
        return
    cdef bint batch = flags & FWD_BATCH
    cdef Py_ssize_t S = cnp.PyArray_SIZE(x) // (N * C)
    cdef Layout L = _layout(N, C, S, MOMENT_SUMS if batch else NO_SUMS, cnp.PyArray_ITEMSIZE(x))
    cdef double small[SMALL_WORK]
    cdef _Scratch big = _Scratch(_work_size(L, batch)) if _work_size(L, batch) > SMALL_WORK else None
    cdef double *work = &small[0] if big is None else big.p
    cdef Pass kind = <Pass>(AFFINE + ((flags & FWD_RELU) != 0) + 2 * (z is not None))
    cdef object cols = _columns(L, valid)
    cdef Positions P = _positions(L, valid, cols)
    cdef Py_ssize_t first = 0  # offset of the shift K of channel 0: its value at the first counted position
    if valid is not None:
        first = np.argmax(valid)
        first = (first // S) * C * S + first % S
    cdef void *a = cnp.PyArray_DATA(x)
    if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT:
        _forward[float](L, <float *>a, <float *>_data(y), <float *>(a if z is None else _data(z)), kind,
                        <float *>_data(channels[0]), <float *>_data(channels[1]), <float *>_data(channels[2]),
                        <float *>_data(channels[3]), mean, mean + C, batch, (flags & FWD_UPDATE) != 0, momentum,
                        eps, work, _threads(L, thread_cap), P, first, count if valid is not None else L.count)
    else:
        _forward[double](L, <double *>a, <double *>_data(y), <double *>(a if z is None else _data(z)), kind,
                         <double *>_data(channels[0]), <double *>_data(channels[1]), <double *>_data(channels[2]),
                         <double *>_data(channels[3]), mean, mean + C, batch, (flags & FWD_UPDATE) != 0, momentum,
                         eps, work, _threads(L, thread_cap), P, first, count if valid is not None else L.count)
    if gate is not None:
        _pass_gate(L, cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT, work, <double *>_data(gate))


cdef void _pass_gate(Layout L, bint single, double *work, double *gate) noexcept nogil:
    """The (scale, shift) of each channel that a forward pass used, for the gate of its backward (_gate_coef): rows
    1 and 2 of the compact coefficients, or a channel-minor float32 pass's own (_single_coefs), widened."""
    cdef Py_ssize_t c, F = L.W + SKEW
    cdef const float *rows
    if not (single and L.minor):
        memcpy(gate, _compact(L, work) + L.C, 2 * L.C * sizeof(double))
        return
    rows = _float_rows(work, L.W)
    for c in range(L.C):
        gate[c] = rows[2 * F + c * L.S]
        gate[L.C + c] = rows[3 * F + c * L.S]


cdef object _columns(Layout L, valid):
    """The col table of Positions (see there): an (L.W,) intp array for weights of a channel-minor layout with
    S > 1, else None."""
    cdef Py_ssize_t[::1] col
    cdef Py_ssize_t j
    if valid is None or not L.minor or L.S == 1:
        return None
    table = np.empty(L.W, dtype=np.intp)
    col = table
    for j in range(L.W):
        col[j] = (j // (L.C * L.S)) * L.S + j % L.S
    return table


cdef Positions _positions(Layout L, valid, cols) noexcept:
    """The Positions of the weights ``valid`` (None: every position counts) with the table ``cols`` of
    :func:`_columns` (the caller keeps both alive)."""
    cdef Positions P = _every()
    if valid is not None:
        P.valid = <const Py_ssize_t *>_data(valid)
        P.run = L.C if L.minor and L.S == 1 else 0
    P.col = <const Py_ssize_t *>_data(cols)
    return P


cdef inline Positions _every() noexcept nogil:
    """Positions without weights: every position counts."""
    cdef Positions P
    P.valid = NULL
    P.run = 0
    P.col = NULL
    return P


cdef void _forward(Layout L, const floating *x, floating *y, const floating *z, Pass kind,
                   floating *running_mean, floating *running_var, const floating *weight,
                   const floating *bias, double *mean, double *invstd, bint batch, bint update,
                   double momentum, double eps, double *work, int nt, Positions P,
                   Py_ssize_t first, double m) noexcept:
    cdef Py_ssize_t c, k
    cdef bint stats_only = y == NULL
    cdef double *coef = work
    cdef double *cc = _compact(L, work)
    cdef double *part = _parts(L, work)
    cdef double *s
    cdef bint single = _single_pass(kind, x)
    if (L.minor and AMD_CPU and (nt == 1 or L.N * L.W < QUARTERS_MAX)
            and not ((kind == AFFINE_ADD or kind == AFFINE_ADD_RELU) and _quarters_alias(L, sizeof(floating)))):
        L.stream, L.nontemporal = 0, False  # (QUARTERS_MAX)
    with nogil:
        if not batch:
            _given_stats(L.C, running_mean, running_var, eps, mean, invstd)
            _forward_coefs(L, single, mean, invstd, weight, bias, cc, coef)
            for k in prange(_parallel_blocks(L, nt), schedule='static', num_threads=nt):
                _apply_pass(kind, L, k, x, x, z, y, y, coef, P)
            for k in range(L.nblocks - _parallel_blocks(L, nt)):
                _apply_pass(kind, L, k, x, x, z, y, y, coef, P)
            return
        for c in range(L.C):  # the shift K of the sums: a (counted) value of each channel
            cc[c] = <double>x[first + c * L.S]
        _expand(L, cc, coef, 1)
        if L.fused:
            for k in prange(_parallel_blocks(L, nt), schedule='static', num_threads=nt):
                _fused_forward(L, k, x, y, z, kind, stats_only, update, running_mean, running_var, weight, bias,
                               momentum, eps, mean, invstd, coef, part, P, m)
            for k in range(L.nblocks - _parallel_blocks(L, nt)):
                _fused_forward(L, k, x, y, z, kind, stats_only, update, running_mean, running_var, weight, bias,
                               momentum, eps, mean, invstd, coef, part, P, m)
            return
        for k in prange(_parallel_blocks(L, nt), schedule='static', num_threads=nt):
            _moments(L, k, x, coef, part, P)
        for k in range(L.nblocks - _parallel_blocks(L, nt)):
            _moments(L, k, x, coef, part, P)
        s = _merge(L, part, part + L.nblocks * L.part)
        _finish_stats(0, L.C, s, s + L.C, 1, m, stats_only, update, running_mean, running_var, momentum, eps, mean,
                      invstd, cc)
        if not stats_only:
            _forward_coefs(L, single, mean, invstd, weight, bias, cc, coef)
            for k in prange(_parallel_blocks(L, nt), schedule='static', num_threads=nt):
                _apply_pass(kind, L, k, x, x, z, y, y, coef, P)
            for k in range(L.nblocks - _parallel_blocks(L, nt)):
                _apply_pass(kind, L, k, x, x, z, y, y, coef, P)


cdef void _forward_coefs(Layout L, bint single, const double *mean, const double *invstd, const floating *weight,
                         const floating *bias, double *cc, double *coef) noexcept nogil:
    """The coefficient rows of a forward pass, (mean, gamma*invstd, beta) per channel: coef's (_affine_coefs into
    cc, _expand), or for a channel-minor float32 pass straight its float32 rows (_single_coefs)."""
    if single and L.minor:
        _single_coefs(L, mean, invstd, weight, bias, _float_rows(coef, L.W))
    else:
        _affine_coefs(L.C, 0, L.C, mean, invstd, weight, bias, cc)
        _expand(L, cc, coef, 3)


cdef void _single_coefs(Layout L, const double *mean, const double *invstd, const floating *weight,
                        const floating *bias, float *rows) noexcept nogil:
    """A channel-minor float32 forward pass's rows (hi and lo of the mean, gamma*invstd and beta rounded once, rows
    W + SKEW apart, as _narrow makes a dx pass's from coef's), from the statistics without coef: a loop a row over
    the channels, then each value spread over its G columns (_spread)."""
    cdef Py_ssize_t c, F = L.W + SKEW
    for c in range(L.C):
        _split(mean[c], &rows[c], &rows[F + c])
    _gamma_times(0, L.C, weight, invstd, rows + 2 * F)
    _beta(0, L.C, bias, rows + 3 * F)
    _spread(L, rows, F, 4)


cdef void _spread(Layout L, floating *rows, Py_ssize_t F, Py_ssize_t nrows) noexcept nogil:
    """Each channel's value in rows [0, nrows) (F apart), at column c, into its G columns (minor: value s of
    channel c in folded row r is column r*C*S + c*S + s; major: column c): in place, from the last channel down,
    then fold 0 copied over the others."""
    cdef Py_ssize_t row, c, s, r, S = L.S if L.minor else 1
    cdef floating *p
    for row in range(nrows):
        p = rows + row * F
        if S > 1:
            for c in range(L.C - 1, -1, -1):
                for s in range(S - 1, -1, -1):
                    p[c * S + s] = p[c]
        for r in range(1, L.G // S):
            memcpy(p + r * L.C * S, p, L.C * S * sizeof(floating))


cdef inline bint _normal_float(double v) noexcept nogil:
    """v is a positive float32 normal number or between two of them (False for NaN)."""
    return (v >= FLT_MIN) & (v <= FLT_MAX)


cdef void _given_stats(Py_ssize_t C, const floating *running_mean, const floating *running_var, double eps,
                       double *mean, double *invstd) noexcept nogil:
    """mean and invstd = 1/sqrt(v), v = var + eps, of the statistics a call is given: the running ones when
    running_mean and running_var are not NULL, else the float64 (mean, var) in (mean, invstd). Float32 running
    statistics: r = 1/sqrt(v) in float32, refined by a Newton step in double, r + r*(1/2 - v*r*r/2) (within about
    1e-14 of 1/sqrt(v), at a fraction of a double division and square root), where v is a float32 normal number;
    elsewhere (0, subnormal, beyond float32, inf, NaN, negative) 1/sqrt(v) in double, in a loop of its own that
    runs only for a call that has such a channel."""
    cdef Py_ssize_t c
    cdef double v, r
    cdef bint outside = False
    if running_mean == NULL:
        for c in range(C):
            invstd[c] = 1.0 / sqrt(invstd[c] + eps)
    elif floating is float:
        for c in range(C):
            mean[c] = running_mean[c]
            v = running_var[c] + eps
            r = <float>1.0 / sqrtf(<float>v)
            invstd[c] = r + r * (0.5 - 0.5 * (v * r) * r)
            outside = outside | (not _normal_float(v))
        for c in range(C if outside else 0):
            v = running_var[c] + eps
            if not _normal_float(v):
                invstd[c] = 1.0 / sqrt(v)
    else:
        for c in range(C):
            mean[c] = running_mean[c]
            invstd[c] = 1.0 / sqrt(running_var[c] + eps)


cdef void _moments(Layout L, Py_ssize_t k, const floating *x, const double *coef, double *part,
                   Positions P) noexcept nogil:
    """The moment sums of block k, over the positions of P when it has weights."""
    cdef Moments moments
    cdef MomentsValid moments_valid
    if P.valid != NULL:
        _block_sums(moments_valid, L, k, x, x, x, coef, part, P)
    else:
        _block_sums(moments, L, k, x, x, x, coef, part, P)


cdef void _fused_forward(Layout L, Py_ssize_t k, const floating *x, floating *y, const floating *z,
                         Pass kind, bint stats_only, bint update, floating *running_mean,
                         floating *running_var, const floating *weight, const floating *bias,
                         double momentum, double eps, double *mean, double *invstd, double *coef,
                         double *part, Positions P, double m) noexcept nogil:
    """Block k of whole channels (major, G == 1: coef is compact): sums, statistics and output in one task."""
    cdef Py_ssize_t c0 = (k % L.ngroups) * L.group
    cdef Py_ssize_t c1 = min(L.C, c0 + L.group)
    _moments(L, k, x, coef, part, P)
    _finish_stats(c0, c1, part + k * L.part, part + k * L.part + 1, 2, m, stats_only, update, running_mean,
                  running_var, momentum, eps, mean, invstd, coef)
    if not stats_only:
        _affine_coefs(L.C, c0, c1, mean, invstd, weight, bias, coef)
        _apply_pass(kind, L, k, x, x, z, y, y, coef, P)


# -- backward -----------------------------------------------------------------------------------------------------

cdef void _finish_grad(Py_ssize_t C, Py_ssize_t c0, Py_ssize_t c1,
                       const double *s0, const double *s1,        # IN (C,) sums of channel c at c - c0
                       double m, bint batch,
                       const double *invstd,                      # IN (C,) the forward's
                       const floating *weight,                    # IN (C,) gamma, or NULL
                       floating *dweight, floating *dbias,        # OUT (C,)
                       double *cc) noexcept nogil:                # IN/OUT (4, C): row 0 the mean on entry
    """Channels [c0, c1), each from s0 = sum(dy), s1 = sum(dy*(x - mean)) over m values: dbeta = s0, dgamma =
    invstd*s1, and the coefficients of dx. Training, g = gamma*invstd: dx = g*(dy - dbeta/m - xhat*dgamma/m)
    = (dy - dbeta/m)*g - (x - mean)*(g*invstd*dgamma/m): Grad with coef = (mean, g, g*invstd*dgamma/m, dbeta/m),
    both differences taken before scaling (row 0 is the sums' shift already: kept). Eval: dx = g*dy, Affine on dy
    with coef = (0, g, 0, 0). Vectorised across channels."""
    cdef Py_ssize_t c
    _gamma_times(c0, c1, weight, invstd, cc + C)  # g
    for c in range(c0, c1):
        dbias[c] = <floating>s0[c - c0]
        dweight[c] = <floating>(s1[c - c0] * invstd[c])
    if not batch:
        for c in range(c0, c1):
            cc[c] = cc[2 * C + c] = cc[3 * C + c] = 0.0
        return
    for c in range(c0, c1):
        cc[2 * C + c] = cc[C + c] * invstd[c] * (s1[c - c0] * invstd[c]) / m
    for c in range(c0, c1):
        cc[3 * C + c] = s0[c - c0] / m


cpdef enum BackwardFlag:
    BWD_BATCH = 1    # the forward normalised with batch statistics
    BWD_RELU = 2     # the forward had a fused ReLU: dy is gated by it (gate given) or masked by its output e


def backward(cnp.ndarray x,               # IN the forward's (N, C, S) input's memory (any shape)
             cnp.ndarray dy,              # IN (N*C*S,)
             dx,                          # OUT (N*C*S,), or None: sums only
             dz,                          # OUT (N*C*S,) masked dy (the residual's gradient): with e, else None
             Py_ssize_t N, Py_ssize_t C,
             tuple saved,                 # IN (mean, invstd, weight): (C,) float64 statistics the forward used,
                                          # gamma (C,) or None (= 1)
             cnp.ndarray grads,           # OUT (2C,) dweight = sum(dy*xhat), then dbias = sum(dy)
             sums,                        # (2, C) C-contiguous float64: OUT when dx is None, else IN or None
             int flags, double count, int thread_cap,
             e=None,                      # IN (N*C*S,) the output of a forward with ReLU (BWD_RELU), or None
             valid=None,                  # IN (N*S,) intp position weights of a masked forward, or None
             gate=None,                   # IN (2C,) the gate a forward with ReLU wrote (BWD_RELU without e)
             Py_ssize_t rows=1):          # values per channel and sample in any layout (Plan.rows)
    """Batch-norm backward. Arrays are aligned, C-contiguous and of x's dtype (the statistics float64), as the
    caller checked.

    Training: dx = gamma*invstd*(dy - sum(dy)/m - xhat*sum(dy*xhat)/m), xhat = (x - mean)*invstd. Eval (running
    statistics are constants): dx = gamma*invstd*dy. Both: dgamma = sum(dy*xhat), dbeta = sum(dy). dx is computed
    in double and rounded once, except the training dx of float32 data (plain, or gated: after a ReLU without a
    residual) with rows (a property of the array, not its layout: see SHORT_DX) of 1 or at least SHORT_DX values,
    and at least SHORT_DX values a channel: in float32, each channel checked and recomputed in double where its
    error bound fails (_grad_check).
    Data-parallel use: with dx None, this tensor's sums (sum dy, sum dy*(x - mean)) go to sums; given sums (and
    their count m) of a larger batch, dx uses them instead of this tensor's own.
    After a forward with ReLU, dy stands for gated(dy) in all of the above: dy where the forward's ReLU let the
    value through, else 0; recomputed from x and the gate (the forward's scale and shift: _gate_coef), or, given
    e (the forward's output; then dz is given too), masked(dy) = dy where e > 0, the same values, and dz receives
    them.
    After a training forward with position weights v (valid; m = count, the positions they mark), the exact
    gradient of that forward: dx = gamma*invstd*(dy - v*(sum(dy)/m + xhat*sum(dy*xhat)/m)), the sums over every
    position.
    """
    if cnp.PyArray_SIZE(x) == 0:  # nothing to compute (the caller never sends an empty tensor)
        return
    cdef bint batch = flags & BWD_BATCH, relu = (flags & BWD_RELU) != 0
    cdef Layout L = _layout(N, C, cnp.PyArray_SIZE(x) // (N * C), GRADIENT_SUMS, cnp.PyArray_ITEMSIZE(x))
    cdef bint given = sums is not None and dx is not None
    cdef double small[SMALL_WORK]
    cdef _Scratch big = _Scratch(_work_size(L, True)) if _work_size(L, True) > SMALL_WORK else None
    cdef double *work = &small[0] if big is None else big.p
    cdef double *totals = _totals(L, work) if sums is None else <double *>_data(sums)  # given sums are only read
    cdef double m = count if given or valid is not None else <double>L.count
    cdef Pass kind = GRAD if batch else AFFINE
    if relu and e is None:
        kind = GRAD_GATED if batch else AFFINE_GATED
    elif relu:
        kind = GRAD_MASKED_DZ if batch else AFFINE_MASKED_DZ
    if not batch:
        valid = None
    elif valid is not None:
        kind = <Pass>(kind + GRAD_VALID - GRAD)
    if ((kind == GRAD or kind == GRAD_GATED) and dx is not None and cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT
            and not 1 < rows < SHORT_DX and L.count >= SHORT_DX):
        kind = <Pass>(kind - GRAD + GRAD_SINGLE)
    cdef object cols = _columns(L, valid)
    cdef Positions P = _positions(L, valid, cols)
    cdef void *a = cnp.PyArray_DATA(x)
    cdef const double *mean = <const double *>_data(saved[0])
    cdef const double *invstd = <const double *>_data(saved[1])
    cdef void *g = cnp.PyArray_DATA(grads)
    cdef const double *forward_gate = <const double *>_data(gate) if relu and e is None else NULL
    if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT:
        _backward[float](L, <float *>a, <float *>cnp.PyArray_DATA(dy), <float *>(a if e is None else _data(e)),
                         <float *>_data(dx), <float *>_data(dz), kind, mean, invstd, <float *>_data(saved[2]),
                         <float *>g, <float *>g + C, batch, given, totals, m, work, _threads(L, thread_cap),
                         forward_gate, P)
    else:
        _backward[double](L, <double *>a, <double *>cnp.PyArray_DATA(dy), <double *>(a if e is None else _data(e)),
                          <double *>_data(dx), <double *>_data(dz), kind, mean, invstd, <double *>_data(saved[2]),
                          <double *>g, <double *>g + C, batch, given, totals, m, work, _threads(L, thread_cap),
                          forward_gate, P)


cdef void _backward(Layout L, const floating *x, const floating *dy, const floating *e,
                    floating *dx, floating *dz, Pass kind, const double *mean,
                    const double *invstd, const floating *weight, floating *dweight,
                    floating *dbias, bint batch, bint given, double *sums, double m, double *work,
                    int nt, const double *gate, Positions P) noexcept:
    cdef Py_ssize_t c, k
    cdef bint sums_only = dx == NULL
    cdef double *coef = work
    cdef double *cc = _compact(L, work)
    cdef double *part = _parts(L, work)
    cdef double *tree = part + L.nblocks * L.part  # the sums' merge tree, then a DxSingle pass's checks (_grad_redo)
    cdef double *s
    cdef bint single = _checked(kind)
    cdef bint aliased = L.minor and L.W >= COPY_WIDTH and not sums_only and _past(dy, dx)
    if aliased and not L.stream:  # (COPY_CHUNK)
        L.stream, L.nontemporal = COPY_CHUNK, False
    elif L.minor and AMD_CPU and not aliased:  # (STREAM_MIN)
        L.stream, L.nontemporal = 0, False
    with nogil:
        if gate != NULL:
            _gate_coef(L, mean, gate, cc, coef, x)
        for c in range(L.C):  # the shift of the sums: the mean the forward used
            cc[c] = mean[c]
        _expand(L, cc, coef, 1)
        if (L.fused or _whole_columns(L)) and not given:
            for k in prange(_parallel_blocks(L, nt), schedule='static', num_threads=nt):
                _fused_backward(L, k, x, dy, e, dx, dz, kind, sums_only, invstd, weight, dweight,
                                dbias, batch, sums, m, coef, part, P)
            for k in range(L.nblocks - _parallel_blocks(L, nt)):
                _fused_backward(L, k, x, dy, e, dx, dz, kind, sums_only, invstd, weight, dweight,
                                dbias, batch, sums, m, coef, part, P)
        else:
            if not given:
                for k in prange(_parallel_blocks(L, nt), schedule='static', num_threads=nt):
                    _grad_sums(kind, L, k, x, dy, e, coef, part)
                for k in range(L.nblocks - _parallel_blocks(L, nt)):
                    _grad_sums(kind, L, k, x, dy, e, coef, part)
                s = _merge(L, part, tree)
                if sums_only:
                    memcpy(sums, s, 2 * L.C * sizeof(double))
            else:
                s = sums
            _finish_grad(L.C, 0, L.C, s, s + L.C, m, batch, invstd, weight, dweight, dbias, cc)
            if not sums_only:
                _coefficients(L, cc, coef, _single_pass(kind, x))
                _dx_pass(kind, L, x, dy, e, dx, dz, batch, coef, P, nt)
        if single and _grad_redo(L, work, cc, <unsigned int *>tree):
            for k in prange(_parallel_blocks(L, nt), schedule='static', num_threads=nt):
                _redo(kind, L, k, x, dy, dx, coef, <unsigned int *>tree)
            for k in range(L.nblocks - _parallel_blocks(L, nt)):
                _redo(kind, L, k, x, dy, dx, coef, <unsigned int *>tree)


cdef void _dx_pass(Pass kind, Layout L, const floating *x, const floating *dy, const floating *e,
                   floating *dx, floating *dz, bint batch, const double *coef, Positions P,
                   int nt) noexcept nogil:
    """dx over every block (_grad_apply), on nt threads."""
    cdef Py_ssize_t k
    for k in prange(_parallel_blocks(L, nt), schedule='static', num_threads=nt):
        _grad_apply(kind, L, k, x, dy, e, dx, dz, batch, coef, P)
    for k in range(L.nblocks - _parallel_blocks(L, nt)):
        _grad_apply(kind, L, k, x, dy, e, dx, dz, batch, coef, P)


cdef inline void _grad_apply(Pass kind, Layout L, Py_ssize_t k, const floating *x, const floating *dy,
                             const floating *e, floating *dx, floating *dz, bint batch,
                             const double *coef, Positions P) noexcept nogil:
    """dx over block k: a Grad pass (training) or an Affine pass on dy (eval; AffineGated reads x for its gate)."""
    if batch or kind == AFFINE_GATED:
        _apply_pass(kind, L, k, x, dy, e, dx, dz, coef, P)
    else:
        _apply_pass(kind, L, k, dy, dy, e, dx, dz, coef, P)


cdef inline bint _whole_columns(Layout L) noexcept nogil:
    """Whether a channel-minor layout's blocks hold all the rows of their columns, a channel each (G == 1): a
    backward then takes each block's sums, coefficients and dx in one task (_fused_backward), while the block's
    data is in cache."""
    return L.minor and L.G == 1 and L.rows >= L.N


cdef void _fused_backward(Layout L, Py_ssize_t k, const floating *x, const floating *dy,
                          const floating *e, floating *dx, floating *dz, Pass kind, bint sums_only,
                          const double *invstd,
                          const floating *weight, floating *dweight, floating *dbias, bint batch,
                          double *sums, double m, double *coef, double *part,
                          Positions P) noexcept nogil:
    """Block k of whole channels (major, L.fused; or minor, _whole_columns; G == 1: coef is compact): gradient
    sums, coefficients and dx in one task."""
    cdef Py_ssize_t c, c0, c1, n0, n1, s = k * L.part, t = 2, u = 1  # channel c's sums: part[s + t*(c - c0)], +u
    if L.minor:
        _minor_block(L, k, &n0, &n1, &c0, &c1)
        t, u = 1, L.width
    else:
        c0 = (k % L.ngroups) * L.group
        c1 = min(L.C, c0 + L.group)
    _grad_sums(kind, L, k, x, dy, e, coef, part)
    for c in range(c0, c1):
        sums[c], sums[L.C + c] = part[s + t * (c - c0)], part[s + t * (c - c0) + u]
    _finish_grad(L.C, c0, c1, sums + c0, sums + L.C + c0, m, batch, invstd, weight, dweight, dbias, coef)
    if not sums_only:
        if L.minor and _single_pass(kind, x):
            _narrow(L.C, c0, c1, coef, _float_rows(coef, L.C))
        _grad_apply(kind, L, k, x, dy, e, dx, dz, batch, coef, P)


cdef inline bint _normal32(double v) noexcept nogil:
    """v is 0 or a float32 normal number a few binades away from float32's limits (about 2**-120 to 2**120;
    False for NaN and inf)."""
    return (v == 0.0) | ((fabs(v) >= 7.5e-37) & (fabs(v) <= 1.3e36))


cdef inline double _grad_slack(Py_ssize_t C, Py_ssize_t c, const double *cc) noexcept nogil:
    """The part of channel c's GradSingle error bound that does not scale with its terms (_grad_check):
    |c1|*e(c3) + |c2|*(u*|lo| + e(lo)), e(v) = |v - float32(v)| the rounding error of v (exact, subnormals
    included), lo = c0 - float32(c0) the low part of the mean's float split (x - hi in float32 rounds by at most
    u*(|x - c0| + |lo|)), u = 2**-24; or -1 when c0, c1, c2 or c3 in cc (compact, C channels) is outside float32's
    normal range (branch-free, so that the loop over the channels vectorises)."""
    cdef double c0 = cc[c], c1 = cc[C + c], c2 = cc[2 * C + c], c3 = cc[3 * C + c]
    cdef double lo = c0 - <double><float>c0
    cdef double slack = (fabs(c1) * fabs(c3 - <double><float>c3)
                         + fabs(c2) * (U32 * fabs(lo) + fabs(lo - <double><float>lo)))
    return slack if _normal32(c0) & _normal32(c1) & _normal32(c2) & _normal32(c3) else -1.0


cdef inline bint _grad_check(double T, double D, double slack) noexcept nogil:
    """True when a channel's GradSingle values kept the float32 contract: each within 1e-6*max|dx| of the exact dx
    (False for slack -1: a coefficient outside float32's normal range). A value's error is at most 3u|t1| +
    4u|t2| + u|out| + slack (_grad_single) <= 4u(|t1| + |t2|) + u|out| + slack, and |t1| + |t2| = max(|t1 + t2|,
    |t1 - t2|): with T at least the channel's largest |t1 + t2| and its largest |out| at least D and below
    top = D*(1 + 2**-8) (the peaks, rounded up and down to 8 bits of mantissa), every error is below E =
    4.1u*max(T, top) + u*top + 1.1*slack (the 0.1s cover the roundings of t1 + t2 and out themselves). max|dx| >=
    D - E, so E <= 0.99e-6*D suffices; D >= 1e-30 keeps subnormals out of it. NaN or inf peaks fail."""
    cdef double top = D * 1.00390625
    return ((slack >= 0.0) & (1e-30 <= D) & (D < INFINITY)
            & (4.1 * U32 * (T if T > top else top) + U32 * top + 1.1 * slack <= 0.99e-6 * D))


cdef inline void _raise_peaks(peak_row to, const unsigned short *peaks, Py_ssize_t n,
                              Py_ssize_t stride) noexcept nogil:
    """to[i] = max(to[i], peaks[i*stride]) for i < n."""
    cdef Py_ssize_t i
    for i in range(n):
        to[i] = max(to[i], peaks[i * stride])


cdef bint _grad_redo(Layout L, const double *work, const double *cc, unsigned int *redo) noexcept nogil:
    """Each channel's check of a DxSingle pass from its blocks' peaks (_block_apply): redo[c] = 1 where channel c
    failed _grad_check (its dx is then recomputed in double: _redo_block), else 0; True when any failed. redo has
    room for 4*C values (the merge tree), minor for 2*C + 2*W (W >= C): after the C flags, the channels' peaks
    (|t1 + t2|, then |out|; 16 bits each); from 2*C on, minor, each column's peaks over the blocks (likewise) before
    they are gathered by channel, then the channels' slacks (C doubles)."""
    cdef Py_ssize_t k, c, c0, c1, n0, n1, i0, i1, j, _r, _s
    cdef unsigned short *terms = <unsigned short *>(redo + L.C)
    cdef unsigned short *outs = terms + L.C
    cdef unsigned short *col = <unsigned short *>(redo + 2 * L.C)
    cdef double *slack = <double *>col  # once the columns are gathered
    cdef const unsigned short *slot
    cdef const unsigned int *wide
    cdef bint any = False
    for c in range(2 * L.C):
        terms[c] = 0
    if L.minor:
        for j in range(2 * L.W):
            col[j] = 0
        for k in range(L.nblocks):
            slot = _block_peaks(L, work, k)
            _minor_block(L, k, &n0, &n1, &i0, &i1)
            _raise_peaks(col + i0, slot, i1 - i0, 1)
            _raise_peaks(col + L.W + i0, slot + _outs_at(i1 - i0), i1 - i0, 1)
        for _r in range(L.G // L.S):  # column _r*C*S + c*S + _s: value _s of channel c in folded row _r
            for _s in range(L.S):
                j = _r * L.C * L.S + _s
                _raise_peaks(terms, col + j, L.C, L.S)
                _raise_peaks(outs, col + L.W + j, L.C, L.S)
    else:
        for k in range(L.nblocks):
            slot = _block_peaks(L, work, k)
            _major_block(L, k, &c0, &c1, &n0, &n1, &i0, &i1)
            wide = <const unsigned int *>slot
            for c in range(c1 - c0):
                terms[c0 + c] = max(terms[c0 + c], cbn_peak_up(wide[c]))
                outs[c0 + c] = max(outs[c0 + c], cbn_peak_down(wide[L.group + c]))
    for c in range(L.C):
        slack[c] = _grad_slack(L.C, c, cc)
    for c in range(L.C):
        redo[c] = not _grad_check(cbn_peak_value(terms[c]), cbn_peak_value(outs[c]), slack[c])
    for c in range(L.C):
        any = any | redo[c]
    return any


cdef inline (Py_ssize_t, Py_ssize_t) _next_column(Layout L, Py_ssize_t c, Py_ssize_t s) noexcept nogil:
    """Channel and value (c, s) of the channel-minor column after the one of channel c, value s."""
    s += 1
    if s < L.S:
        return c, s
    return (c + 1 if c + 1 < L.C else 0), 0


cdef inline void _redo(Pass kind, Layout L, Py_ssize_t k, const floating *x, const floating *dy, floating *dx,
                       const double *coef, const unsigned int *redo) noexcept nogil:
    """_redo_block of the float32 dx pass ``kind`` (_checked) with its double pass: Grad, or GradGated."""
    cdef Grad grad
    cdef GradGated grad_gated
    if kind == GRAD_GATED_SINGLE:
        _redo_block(grad_gated, L, k, x, dy, dx, coef, redo)
    else:
        _redo_block(grad, L, k, x, dy, dx, coef, redo)


cdef void _redo_block(DxDouble op, Layout L, Py_ssize_t k, const floating *x, const floating *dy, floating *dx,
                      const double *coef, const unsigned int *redo) noexcept nogil:
    """The double pass op over block k's values of the channels with redo[c] (_grad_redo): minor, the runs of such
    channels' columns (found once: the block's rows share its columns), each down the block's rows; major, their
    rows."""
    cdef Py_ssize_t c, c0, c1, n0, n1, i0, i1, n, j, s, start
    if L.minor:
        _minor_block(L, k, &n0, &n1, &i0, &i1)
        c, s, j = (i0 // L.S) % L.C, i0 % L.S, i0
        while j < i1:
            start = j
            while j < i1 and redo[c]:
                c, s = _next_column(L, c, s)
                j += 1
            if j > start:
                for n in range(n0, n1):
                    _apply_columns(op, x, dy, x, dx, NULL, n * L.W, start, j, L.W, coef, _every(), 0)
            while j < i1 and not redo[c]:
                c, s = _next_column(L, c, s)
                j += 1
        return
    _major_block(L, k, &c0, &c1, &n0, &n1, &i0, &i1)
    for n in range(n0, n1):
        for c in range(c0, c1):
            if redo[c]:
                _apply_row(op, x, dy, x, dx, NULL, n * L.W + c * L.S + i0, n * L.W + c * L.S + i1, coef + c,
                           L.C, NULL, _gate(coef, L.C, x) + c)
