# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled batch-norm kernels (NCHW viewed as (N, C, S), S = product of the spatial sizes).

Every kernel takes caller-validated, C-contiguous memoryviews, writes into caller-allocated outputs, runs without
the GIL and never raises. Arguments are marked IN, OUT or INOUT.

Determinism: each channel's N*S values are cut into fixed blocks whose size depends only on (N, S), never on the
thread count. Each block's partial result is kept and the partials are merged in block order, so any number of
threads produces bitwise the same result; threads only change which block is computed where.
"""
import numpy as np
from cython.parallel import prange
from libc.math cimport sqrt

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define CBN_OPENMP 1
    static int cbn_get_max_threads(void) { return omp_get_max_threads(); }
    static void cbn_set_num_threads(int n) { omp_set_num_threads(n); }
    #else
    #define CBN_OPENMP 0
    static int cbn_get_max_threads(void) { return 1; }
    static void cbn_set_num_threads(int n) { (void)n; }
    #endif
    #ifndef CBN_BUILD_INFO
    #define CBN_BUILD_INFO "unknown"
    #endif
    """
    const int CBN_OPENMP
    const char *CBN_BUILD_INFO
    int cbn_get_max_threads() noexcept nogil
    void cbn_set_num_threads(int n) noexcept nogil

ctypedef fused floating:
    float
    double

# Elements per statistics block (fixed: the determinism contract depends on it never varying with threads).
cdef Py_ssize_t BLOCK = 16384
# Below this many elements a kernel runs serially: starting threads costs more than the work.
cdef Py_ssize_t PARALLEL_MIN = 65536
# Accumulator lanes: independent partial sums the compiler can keep in vector registers.
DEF LANES = 8


def openmp_enabled():
    """Return True when the extension was compiled with OpenMP."""
    return bool(CBN_OPENMP)


def build_info():
    """Return the compiler and flags recorded at build time."""
    return CBN_BUILD_INFO.decode()


def get_num_threads():
    """Return the number of threads a parallel kernel uses (OpenMP's max threads)."""
    return cbn_get_max_threads()


def set_num_threads(int n):
    """Set the number of threads for parallel kernels of the calling thread (omp_set_num_threads)."""
    cbn_set_num_threads(n)


cdef inline int _threads(Py_ssize_t n_elements, Py_ssize_t n_tasks) noexcept nogil:
    """Threads for a kernel: 1 for tiny inputs, never more than there are tasks."""
    if n_elements < PARALLEL_MIN or n_tasks < 2:
        return 1
    return <int>min(<Py_ssize_t>cbn_get_max_threads(), n_tasks)


cdef struct Blocks:
    # Block k of a channel covers rows [n0, n1) and columns [i0, i1) of that channel's (N, S) plane:
    # rb = k // ncol, cb = k % ncol, n0 = rb*rows, i0 = cb*width.
    Py_ssize_t rows
    Py_ssize_t ncol
    Py_ssize_t width
    Py_ssize_t per_channel


cdef Blocks _blocks(Py_ssize_t N, Py_ssize_t S) noexcept nogil:
    """Fixed tiling of an (N, S) channel plane into blocks of about BLOCK elements."""
    cdef Blocks b
    if S >= BLOCK:
        b.rows = 1
        b.ncol = (S + BLOCK - 1) // BLOCK
        b.width = (S + b.ncol - 1) // b.ncol
    else:
        b.rows = max(1, BLOCK // S)
        b.ncol = 1
        b.width = S
    b.per_channel = ((N + b.rows - 1) // b.rows) * b.ncol
    return b


cdef inline void _bounds(Blocks b, Py_ssize_t k, Py_ssize_t N, Py_ssize_t S, Py_ssize_t *n0, Py_ssize_t *n1,
                         Py_ssize_t *i0, Py_ssize_t *i1) noexcept nogil:
    n0[0] = (k // b.ncol) * b.rows
    n1[0] = min(N, n0[0] + b.rows)
    i0[0] = (k % b.ncol) * b.width
    i1[0] = min(S, i0[0] + b.width)


cdef void _block_moments(const floating *x,   # IN  channel start, rows of S values, row stride cs
                         Py_ssize_t cs, Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t i0, Py_ssize_t i1,
                         double *out) noexcept nogil:  # OUT (count, mean, M2) of the block
    """Block moments from shifted sums, K = the block's first value.

    s1 = sum(x - K), s2 = sum((x - K)**2), mean = K + s1/n, M2 = s2 - s1**2/n. Because K is a value of the block,
    M2 >= (K - mean)**2 and s2 <= (n + 1)*M2, so the subtraction loses at most log2(n + 1) bits of a double.
    """
    cdef double K = x[n0 * cs + i0]
    cdef double a[LANES]
    cdef double q[LANES]
    cdef double v, s1 = 0.0, s2 = 0.0
    cdef Py_ssize_t n, i, l, iv = i0 + ((i1 - i0) // LANES) * LANES
    cdef const floating *row
    for l in range(LANES):
        a[l] = 0.0
        q[l] = 0.0
    for n in range(n0, n1):
        row = x + n * cs
        for i in range(i0, iv, LANES):
            for l in range(LANES):
                v = <double>row[i + l] - K
                a[l] += v
                q[l] += v * v
        for i in range(iv, i1):
            v = <double>row[i] - K
            s1 += v
            s2 += v * v
    for l in range(LANES):
        s1 += a[l]
        s2 += q[l]
    cdef double cnt = <double>((n1 - n0) * (i1 - i0))
    out[0] = cnt
    out[1] = K + s1 / cnt
    out[2] = s2 - s1 * s1 / cnt
    if out[2] < 0.0:
        out[2] = 0.0


cdef void _merge_moments(const double *part, Py_ssize_t nb, double *mean, double *m2) noexcept nogil:
    """Chan's parallel merge of nb (count, mean, M2) triples, in block order.

    d = mean_b - mean_a, n = n_a + n_b: mean = mean_a + d*n_b/n, M2 = M2_a + M2_b + d**2*n_a*n_b/n.
    """
    cdef double na = part[0], mu = part[1], M2 = part[2], nb_, d, n
    cdef Py_ssize_t k
    for k in range(1, nb):
        nb_ = part[3 * k]
        d = part[3 * k + 1] - mu
        n = na + nb_
        mu = mu + d * (nb_ / n)
        M2 = M2 + part[3 * k + 2] + d * d * (na * nb_ / n)
        na = n
    mean[0] = mu
    m2[0] = M2


cdef void _normalize_block(const floating *x, floating *y,   # IN x, OUT y: channel starts, row stride cs
                           Py_ssize_t cs, Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t i0, Py_ssize_t i1,
                           const double *coef) noexcept nogil:  # IN (hi, scale, shift)
    """y = (x - hi)*scale + shift in the data type.

    With mean = hi + lo (hi the mean rounded to the data type), scale = gamma*invstd, shift = beta - lo*scale:
    y = gamma*(x - mean)*invstd + beta. x - hi is exact for x near the mean, so float32 keeps the mean's double
    precision instead of rounding it first.
    """
    cdef floating hi = <floating>coef[0], scale = <floating>coef[1], shift = <floating>coef[2]
    cdef Py_ssize_t n, i
    cdef const floating *xr
    cdef floating *yr
    for n in range(n0, n1):
        xr = x + n * cs
        yr = y + n * cs
        for i in range(i0, i1):
            yr[i] = (xr[i] - hi) * scale + shift


cdef void _normalize_coef(const floating *like, double mean, double invstd, double gamma, double beta,
                          double *coef) noexcept nogil:  # OUT (hi, scale, shift)
    """hi = mean rounded to the data type of like, lo = mean - hi, scale = gamma*invstd, shift = beta - lo*scale."""
    cdef double hi = <double>(<floating>mean)
    coef[0] = hi
    coef[1] = gamma * invstd
    coef[2] = beta - (mean - hi) * coef[1]


cdef void _train_channel_stats(const floating *x, Py_ssize_t c, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                               Blocks b, const double *part,   # IN this channel's block moments
                               floating *running_mean, floating *running_var,   # INOUT (or NULL)
                               const floating *weight, const floating *bias,   # IN (or NULL)
                               double momentum, double eps,
                               double *mean, double *invstd, double *coef) noexcept nogil:  # OUT
    """Merge a channel's blocks: mean, var = M2/m, invstd = 1/sqrt(var + eps), the normalisation coefficients.

    Running statistics: r_mean = (1 - f)*r_mean + f*mean, r_var = (1 - f)*r_var + f*M2/(m - 1).
    """
    cdef double mu, M2, m = <double>(N * S)
    _merge_moments(part, b.per_channel, &mu, &M2)
    mean[c] = mu
    invstd[c] = 1.0 / sqrt(M2 / m + eps)
    if running_mean != NULL:
        running_mean[c] = <floating>((1.0 - momentum) * running_mean[c] + momentum * mu)
        running_var[c] = <floating>((1.0 - momentum) * running_var[c] + momentum * (M2 / (m - 1.0)))
    _normalize_coef(x, mu, invstd[c], weight[c] if weight != NULL else 1.0,
                    bias[c] if bias != NULL else 0.0, coef + 3 * c)


def forward(const floating[:, :, ::1] x,        # IN (N, C, S), N*S >= 1 (>= 2 when use_batch_stats)
            floating[:, :, ::1] y,              # OUT (N, C, S)
            floating[::1] running_mean,         # INOUT (C,) or None
            floating[::1] running_var,          # INOUT (C,) or None
            const floating[::1] weight,         # IN (C,) gamma or None (= 1)
            const floating[::1] bias,           # IN (C,) beta or None (= 0)
            double[::1] mean,                   # OUT (C,) batch mean, or IN (C,) running mean
            double[::1] invstd,                 # OUT (C,) batch 1/sqrt(var + eps), or IN (C,) the running one
            bint use_batch_stats, bint update_running, double momentum, double eps):
    """Batch-norm forward: y = gamma*(x - mean)*invstd + beta, per channel.

    use_batch_stats: mean and var (biased) of the batch, written to mean and invstd, and with update_running the
    running statistics are updated in place; otherwise mean and invstd come in from the running statistics.
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2], cs = C * S
    cdef Blocks b = _blocks(N, S)
    cdef Py_ssize_t nb = b.per_channel, c, k, t, n0, n1, i0, i1
    cdef double[::1] part = np.empty(3 * C * nb if use_batch_stats else 1)
    cdef double[::1] coef = np.empty(3 * C)
    cdef const floating *px = &x[0, 0, 0]
    cdef floating *py = &y[0, 0, 0]
    cdef floating *prm = NULL
    cdef floating *prv = NULL
    cdef const floating *pw = &weight[0] if weight is not None else NULL
    cdef const floating *pb = &bias[0] if bias is not None else NULL
    cdef int nt = _threads(N * cs, C * nb)
    cdef bint by_channel = nt == 1 or C >= 4 * nt
    if update_running:
        prm = &running_mean[0]
        prv = &running_var[0]
    if not use_batch_stats:
        for c in range(C):
            _normalize_coef(px, mean[c], invstd[c], pw[c] if pw != NULL else 1.0,
                            pb[c] if pb != NULL else 0.0, &coef[3 * c])
        for t in prange(C * nb, nogil=True, schedule='static', num_threads=nt, use_threads_if=nt > 1):
            c = t // nb
            _bounds(b, t % nb, N, S, &n0, &n1, &i0, &i1)
            _normalize_block(px + c * S, py + c * S, cs, n0, n1, i0, i1, &coef[3 * c])
    elif by_channel:
        # One task per channel: its blocks' moments, the merge, then normalisation while the channel is in cache.
        for c in prange(C, nogil=True, schedule='static', num_threads=nt, use_threads_if=nt > 1):
            for k in range(nb):
                _bounds(b, k, N, S, &n0, &n1, &i0, &i1)
                _block_moments(px + c * S, cs, n0, n1, i0, i1, &part[3 * (c * nb + k)])
            _train_channel_stats(px, c, N, C, S, b, &part[3 * c * nb], prm, prv, pw, pb, momentum, eps,
                                 &mean[0], &invstd[0], &coef[0])
            for k in range(nb):
                _bounds(b, k, N, S, &n0, &n1, &i0, &i1)
                _normalize_block(px + c * S, py + c * S, cs, n0, n1, i0, i1, &coef[3 * c])
    else:
        # Few channels: blocks in parallel, merge, then the same static block schedule normalises, so each
        # thread revisits the blocks it just read.
        with nogil:
            for t in prange(C * nb, schedule='static', num_threads=nt):
                c = t // nb
                _bounds(b, t % nb, N, S, &n0, &n1, &i0, &i1)
                _block_moments(px + c * S, cs, n0, n1, i0, i1, &part[3 * t])
            for c in range(C):
                _train_channel_stats(px, c, N, C, S, b, &part[3 * c * nb], prm, prv, pw, pb, momentum, eps,
                                     &mean[0], &invstd[0], &coef[0])
            for t in prange(C * nb, schedule='static', num_threads=nt):
                c = t // nb
                _bounds(b, t % nb, N, S, &n0, &n1, &i0, &i1)
                _normalize_block(px + c * S, py + c * S, cs, n0, n1, i0, i1, &coef[3 * c])


cdef void _block_grad_sums(const floating *x, const floating *dy,   # IN channel starts, row stride cs
                           Py_ssize_t cs, Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t i0, Py_ssize_t i1,
                           double mean, double *out) noexcept nogil:  # OUT (sum dy, sum dy*(x - mean))
    """Block sums in double: sum(dy) and sum(dy*(x - mean)), centred before multiplying."""
    cdef double a[LANES]
    cdef double q[LANES]
    cdef double g, sdy = 0.0, sdyx = 0.0
    cdef Py_ssize_t n, i, l, iv = i0 + ((i1 - i0) // LANES) * LANES
    cdef const floating *xr
    cdef const floating *gr
    for l in range(LANES):
        a[l] = 0.0
        q[l] = 0.0
    for n in range(n0, n1):
        xr = x + n * cs
        gr = dy + n * cs
        for i in range(i0, iv, LANES):
            for l in range(LANES):
                g = gr[i + l]
                a[l] += g
                q[l] += g * (<double>xr[i + l] - mean)
        for i in range(iv, i1):
            g = gr[i]
            sdy += g
            sdyx += g * (<double>xr[i] - mean)
    for l in range(LANES):
        sdy += a[l]
        sdyx += q[l]
    out[0] = sdy
    out[1] = sdyx


cdef void _grad_channel(const floating *like, Py_ssize_t c, double m, Py_ssize_t nb,
                        const double *part,                     # IN the channel's block sums
                        const double *mean, const double *invstd,   # IN (C,) statistics the forward used
                        const floating *weight,                 # IN (C,) gamma or NULL
                        bint use_batch_stats,
                        floating *dweight, floating *dbias,     # OUT (C,)
                        double *coef) noexcept nogil:           # OUT (hi, A, B, K) for this channel
    """dbeta = sum dy, dgamma = invstd*sum dy*(x - mean), and the coefficients of dx = dy*A - (x - hi)*B + K.

    Training, g = gamma*invstd: dx = g*(dy - dbeta/m - xhat*dgamma/m), so A = g, B = g*invstd*dgamma/m,
    K = B*lo - g*dbeta/m with mean = hi + lo. Eval: dx = g*dy (A = g, B = K = 0).
    """
    cdef double sdy = 0.0, sdyx = 0.0, g, B
    cdef Py_ssize_t k
    for k in range(nb):
        sdy += part[2 * k]
        sdyx += part[2 * k + 1]
    dbias[c] = <floating>sdy
    dweight[c] = <floating>(sdyx * invstd[c])
    g = (<double>weight[c] if weight != NULL else 1.0) * invstd[c]
    coef[0] = <double>(<floating>mean[c])
    coef[1] = g
    coef[2] = 0.0
    coef[3] = 0.0
    if use_batch_stats:
        B = g * invstd[c] * (sdyx * invstd[c]) / m
        coef[2] = B
        coef[3] = B * (mean[c] - coef[0]) - g * sdy / m


cdef void _grad_block(const floating *x, const floating *dy, floating *dx,   # IN, IN, OUT channel starts
                      Py_ssize_t cs, Py_ssize_t n0, Py_ssize_t n1, Py_ssize_t i0, Py_ssize_t i1,
                      const double *coef, bint use_batch_stats) noexcept nogil:  # IN (hi, A, B, K)
    """dx = dy*A - (x - hi)*B + K (training) or dx = dy*A (eval: dx does not depend on x)."""
    cdef floating hi = <floating>coef[0], A = <floating>coef[1], B = <floating>coef[2], K = <floating>coef[3]
    cdef Py_ssize_t n, i
    cdef const floating *xr
    cdef const floating *gr
    cdef floating *dr
    for n in range(n0, n1):
        xr = x + n * cs
        gr = dy + n * cs
        dr = dx + n * cs
        if use_batch_stats:
            for i in range(i0, i1):
                dr[i] = gr[i] * A - (xr[i] - hi) * B + K
        else:
            for i in range(i0, i1):
                dr[i] = gr[i] * A


def backward(const floating[:, :, ::1] x,       # IN (N, C, S) the forward's input, N*S >= 1
             const floating[:, :, ::1] dy,      # IN (N, C, S)
             floating[:, :, ::1] dx,            # OUT (N, C, S)
             const double[::1] mean,            # IN (C,) mean the forward used
             const double[::1] invstd,          # IN (C,) invstd the forward used
             const floating[::1] weight,        # IN (C,) gamma or None (= 1)
             floating[::1] dweight,             # OUT (C,) sum dy*xhat
             floating[::1] dbias,               # OUT (C,) sum dy
             bint use_batch_stats):
    """Batch-norm backward.

    Training: dx = gamma*invstd*(dy - sum(dy)/m - xhat*sum(dy*xhat)/m), xhat = (x - mean)*invstd.
    Eval (running statistics are constants): dx = gamma*invstd*dy. Both: dgamma = sum(dy*xhat), dbeta = sum(dy).
    """
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2], cs = C * S
    cdef Blocks b = _blocks(N, S)
    cdef Py_ssize_t nb = b.per_channel, c, k, t, n0, n1, i0, i1
    cdef double m = <double>(N * S)
    cdef double[::1] part = np.empty(2 * C * nb)
    cdef double[::1] coef = np.empty(4 * C)
    cdef const floating *px = &x[0, 0, 0]
    cdef const floating *pg = &dy[0, 0, 0]
    cdef floating *pd = &dx[0, 0, 0]
    cdef const floating *pw = &weight[0] if weight is not None else NULL
    cdef int nt = _threads(N * cs, C * nb)
    if nt == 1 or C >= 4 * nt:
        # One task per channel: block sums, their merge, then dx while the channel is in cache.
        for c in prange(C, nogil=True, schedule='static', num_threads=nt, use_threads_if=nt > 1):
            for k in range(nb):
                _bounds(b, k, N, S, &n0, &n1, &i0, &i1)
                _block_grad_sums(px + c * S, pg + c * S, cs, n0, n1, i0, i1, mean[c], &part[2 * (c * nb + k)])
            _grad_channel(px, c, m, nb, &part[2 * c * nb], &mean[0], &invstd[0], pw, use_batch_stats,
                          &dweight[0], &dbias[0], &coef[4 * c])
            for k in range(nb):
                _bounds(b, k, N, S, &n0, &n1, &i0, &i1)
                _grad_block(px + c * S, pg + c * S, pd + c * S, cs, n0, n1, i0, i1, &coef[4 * c], use_batch_stats)
    else:
        with nogil:
            for t in prange(C * nb, schedule='static', num_threads=nt):
                c = t // nb
                _bounds(b, t % nb, N, S, &n0, &n1, &i0, &i1)
                _block_grad_sums(px + c * S, pg + c * S, cs, n0, n1, i0, i1, mean[c], &part[2 * t])
            for c in range(C):
                _grad_channel(px, c, m, nb, &part[2 * c * nb], &mean[0], &invstd[0], pw, use_batch_stats,
                              &dweight[0], &dbias[0], &coef[4 * c])
            for t in prange(C * nb, schedule='static', num_threads=nt):
                c = t // nb
                _bounds(b, t % nb, N, S, &n0, &n1, &i0, &i1)
                _grad_block(px + c * S, pg + c * S, pd + c * S, cs, n0, n1, i0, i1, &coef[4 * c], use_batch_stats)


def copy(const floating[::1] src, floating[::1] dst):
    """Roofline reference for the benchmark: dst = src, with the kernels' threading policy."""
    cdef Py_ssize_t n = src.shape[0], nchunk = (n + BLOCK - 1) // BLOCK, t, i
    cdef int nt = _threads(n, nchunk)
    for t in prange(nchunk, nogil=True, schedule='static', num_threads=nt, use_threads_if=nt > 1):
        for i in range(t * BLOCK, min(n, (t + 1) * BLOCK)):
            dst[i] = src[i]


def add(const floating[::1] a, const floating[::1] b, floating[::1] out):
    """Roofline reference for the benchmark: out = a + b, with the kernels' threading policy."""
    cdef Py_ssize_t n = a.shape[0], nchunk = (n + BLOCK - 1) // BLOCK, t, i
    cdef int nt = _threads(n, nchunk)
    for t in prange(nchunk, nogil=True, schedule='static', num_threads=nt, use_threads_if=nt > 1):
        for i in range(t * BLOCK, min(n, (t + 1) * BLOCK)):
            out[i] = a[i] + b[i]
