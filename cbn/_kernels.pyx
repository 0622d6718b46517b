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

cdef extern from "_reduce.h" nogil:
    void cbn_row_moments_f(const float *x, Py_ssize_t n, double k, double *s)
    void cbn_row_moments_d(const double *x, Py_ssize_t n, double k, double *s)
    void cbn_row_grad_sums_f(const float *x, const float *dy, Py_ssize_t n, double mu, double *s)
    void cbn_row_grad_sums_d(const double *x, const double *dy, Py_ssize_t n, double mu, double *s)

ctypedef fused floating:
    float
    double

# Elements per block (fixed: the determinism contract depends on it never varying with the thread count).
cdef Py_ssize_t BLOCK = 16384
# Rows shorter than this are processed in memory order (groups of whole images); longer rows channel by channel.
cdef Py_ssize_t SHORT_ROW = 1024
# Scratch budget, in doubles, for the partial sums of short-row layouts (exceeded only to keep 2 blocks).
cdef Py_ssize_t PART_DOUBLES = 1 << 19
# Below this many elements a kernel runs serially: starting threads costs more than the work.
cdef Py_ssize_t PARALLEL_MIN = 65536


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


cdef struct Tiles:
    # Tiling of a plane of nrows rows of S values into tiles of about BLOCK values:
    # tile k covers rows [(k // ncol)*rows, +rows) and columns [(k % ncol)*width, +width).
    Py_ssize_t nrows
    Py_ssize_t rows
    Py_ssize_t ncol
    Py_ssize_t width
    Py_ssize_t count


cdef struct Span:
    # Rows r0 + j*rstep (j < nrows) of the (N*C, S) row matrix, columns [i0, i1).
    Py_ssize_t r0
    Py_ssize_t nrows
    Py_ssize_t rstep
    Py_ssize_t i0
    Py_ssize_t i1


cdef struct Layout:
    # Statistics blocks. by_image: block k = images [k*rows, +rows), all channels, in memory order; its partial
    # sums are part[2*(k*C + c)]. Otherwise block k = tile k % tiles.count of channel k // tiles.count's (N, S)
    # plane; its partial sums are part[2*k].
    bint by_image
    Py_ssize_t rows
    Tiles tiles
    Py_ssize_t nblocks


cdef Tiles _tiles(Py_ssize_t nrows, Py_ssize_t S) noexcept nogil:
    """Fixed tiling of an (nrows, S) plane: whole rows when S < BLOCK, else rows cut into equal column chunks."""
    cdef Tiles t
    t.nrows = nrows
    if S >= BLOCK:
        t.rows = 1
        t.ncol = (S + BLOCK - 1) // BLOCK
        t.width = (S + t.ncol - 1) // t.ncol
    else:
        t.rows = max(1, BLOCK // S)
        t.ncol = 1
        t.width = S
    t.count = ((nrows + t.rows - 1) // t.rows) * t.ncol
    return t


cdef inline Span _tile_span(Tiles t, Py_ssize_t k, Py_ssize_t S, Py_ssize_t first, Py_ssize_t step) noexcept nogil:
    """Span of tile k, where plane row n is matrix row first + n*step."""
    cdef Span s
    cdef Py_ssize_t n0 = (k // t.ncol) * t.rows
    s.r0 = first + n0 * step
    s.nrows = min(t.nrows - n0, t.rows)
    s.rstep = step
    s.i0 = (k % t.ncol) * t.width
    s.i1 = min(S, s.i0 + t.width)
    return s


cdef Layout _layout(Py_ssize_t N, Py_ssize_t C, Py_ssize_t S) noexcept nogil:
    """Statistics blocks of an (N, C, S) tensor (depends on the shape only)."""
    cdef Layout L
    cdef Py_ssize_t cap
    L.by_image = S < SHORT_ROW
    if L.by_image:
        # Few enough blocks that their partial sums (2*C doubles each) stay small: at most 64, and about
        # PART_DOUBLES doubles in all for huge C.
        cap = max(2, min(64, PART_DOUBLES // (2 * C)))
        L.rows = max(max(1, BLOCK // (C * S)), (N + cap - 1) // cap)
        L.nblocks = (N + L.rows - 1) // L.rows
    else:
        L.tiles = _tiles(N, S)
        L.nblocks = C * L.tiles.count
    return L


cdef inline Span _block_span(Layout L, Py_ssize_t k, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S) noexcept nogil:
    cdef Span s
    if L.by_image:
        s.r0 = k * L.rows * C
        s.nrows = min(N - k * L.rows, L.rows) * C
        s.rstep = 1
        s.i0 = 0
        s.i1 = S
        return s
    return _tile_span(L.tiles, k % L.tiles.count, S, k // L.tiles.count, C)


cdef inline double *_block_part(Layout L, double *part, Py_ssize_t k, Py_ssize_t C) noexcept nogil:
    """Where block k's partial sums start (per channel: part[2*c] when by_image, else one pair)."""
    return part + 2 * k * (C if L.by_image else 1)


cdef inline Py_ssize_t _part_size(Layout L, Py_ssize_t C) noexcept nogil:
    """Doubles of partial sums for all blocks: a pair per channel per block (by_image) or a pair per block."""
    return 2 * L.nblocks * (C if L.by_image else 1)


cdef void _merge(Layout L, const double *part, Py_ssize_t c, Py_ssize_t C, double *s) noexcept nogil:
    """s[0], s[1] = channel c's two partial sums added over its blocks in block order."""
    cdef Py_ssize_t k
    s[0] = 0.0
    s[1] = 0.0
    if L.by_image:
        for k in range(L.nblocks):
            s[0] += part[2 * (k * C + c)]
            s[1] += part[2 * (k * C + c) + 1]
    else:
        for k in range(c * L.tiles.count, (c + 1) * L.tiles.count):
            s[0] += part[2 * k]
            s[1] += part[2 * k + 1]


cdef void _span_moments(const floating *x, Span s, Py_ssize_t S, Py_ssize_t C,
                        const double *K,               # IN (C,) shift: a value of each channel
                        double *out, Py_ssize_t cstride) noexcept nogil:   # INOUT pairs at out[2*c*cstride]
    """out += (sum(x - K[c]), sum((x - K[c])**2)) over each row of the span, c the row's channel.

    With K a value of the channel, the channel's M2 = s2 - s1**2/m satisfies s2 <= (m + 1)*M2: the subtraction
    loses at most log2(m + 1) bits of a double, and nothing for data near K.
    """
    cdef Py_ssize_t j, r, c = s.r0 % C, dc = s.rstep % C
    for j in range(s.nrows):
        r = (s.r0 + j * s.rstep) * S + s.i0
        if floating is float:
            cbn_row_moments_f(x + r, s.i1 - s.i0, K[c], out + 2 * c * cstride)
        else:
            cbn_row_moments_d(x + r, s.i1 - s.i0, K[c], out + 2 * c * cstride)
        c += dc
        if c >= C:
            c -= C


cdef void _span_affine(const floating *x, floating *y, Span s, Py_ssize_t S, Py_ssize_t C,
                       const double *coef) noexcept nogil:   # IN (C, 3): mean, scale, beta
    """y = (x - mean)*scale + beta per row, scale = gamma*invstd, in double and rounded once to the data type."""
    cdef double mu, scale, beta
    cdef Py_ssize_t j, i, r, c = s.r0 % C, dc = s.rstep % C
    for j in range(s.nrows):
        r = (s.r0 + j * s.rstep) * S
        mu = coef[3 * c]
        scale = coef[3 * c + 1]
        beta = coef[3 * c + 2]
        for i in range(s.i0, s.i1):
            y[r + i] = <floating>((<double>x[r + i] - mu) * scale + beta)
        c += dc
        if c >= C:
            c -= C


cdef inline void _affine_coef(double mean, double invstd, double gamma, double beta,
                              double *coef) noexcept nogil:  # OUT (mean, scale, beta)
    coef[0] = mean
    coef[1] = gamma * invstd
    coef[2] = beta


cdef void _finish_stats(Layout L, const double *part, Py_ssize_t c, Py_ssize_t C,
                        double m, const double *K,
                        floating *running_mean, floating *running_var,   # INOUT (C,) or NULL
                        const floating *weight, const floating *bias,    # IN (C,) or NULL
                        double momentum, double eps,
                        double *mean, double *invstd, double *coef) noexcept nogil:  # OUT (C,), (C,), (C, 3)
    """Channel c: mean = K + s1/m, M2 = s2 - s1**2/m, var = M2/m, invstd = 1/sqrt(var + eps), coefficients.

    Running statistics: r_mean = (1 - f)*r_mean + f*mean, r_var = (1 - f)*r_var + f*M2/(m - 1).
    """
    cdef double s[2]
    cdef double M2
    _merge(L, part, c, C, s)
    M2 = s[1] - s[0] * s[0] / m
    if M2 < 0.0:
        M2 = 0.0
    mean[c] = K[c] + s[0] / m
    invstd[c] = 1.0 / sqrt(M2 / m + eps)
    if running_mean != NULL:
        running_mean[c] = <floating>((1.0 - momentum) * running_mean[c] + momentum * mean[c])
        running_var[c] = <floating>((1.0 - momentum) * running_var[c] + momentum * (M2 / (m - 1.0)))
    _affine_coef(mean[c], invstd[c], weight[c] if weight != NULL else 1.0, bias[c] if bias != NULL else 0.0,
                 coef + 3 * c)


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
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2], c, k, t
    cdef double m = <double>(N * S)
    cdef Layout L = _layout(N, C, S)
    cdef Tiles T = _tiles(N * C, S)
    cdef double[::1] part = np.zeros(_part_size(L, C) if use_batch_stats else 1)
    cdef double[::1] coef = np.empty(3 * C)
    cdef double[::1] K = np.empty(C)
    cdef const floating *px = &x[0, 0, 0]
    cdef floating *py = &y[0, 0, 0]
    cdef floating *prm = &running_mean[0] if update_running else NULL
    cdef floating *prv = &running_var[0] if update_running else NULL
    cdef const floating *pw = &weight[0] if weight is not None else NULL
    cdef const floating *pb = &bias[0] if bias is not None else NULL
    cdef int nt = _threads(N * C * S, T.count if not use_batch_stats else L.nblocks)
    with nogil:
        if not use_batch_stats:
            for c in range(C):
                _affine_coef(mean[c], invstd[c], pw[c] if pw != NULL else 1.0, pb[c] if pb != NULL else 0.0,
                             &coef[3 * c])
            for t in prange(T.count, schedule='static', num_threads=nt, use_threads_if=nt > 1):
                _span_affine(px, py, _tile_span(T, t, S, 0, 1), S, C, &coef[0])
        else:
            for c in range(C):
                K[c] = px[c * S]
            # Block sums in parallel, the statistics, then the same static block schedule normalises, so each
            # thread revisits the blocks it just read.
            for k in prange(L.nblocks, schedule='static', num_threads=nt, use_threads_if=nt > 1):
                _span_moments(px, _block_span(L, k, N, C, S), S, C, &K[0], _block_part(L, &part[0], k, C),
                              1 if L.by_image else 0)
            for c in range(C):
                _finish_stats(L, &part[0], c, C, m, &K[0], prm, prv, pw, pb, momentum, eps,
                              &mean[0], &invstd[0], &coef[0])
            for k in prange(L.nblocks, schedule='static', num_threads=nt, use_threads_if=nt > 1):
                _span_affine(px, py, _block_span(L, k, N, C, S), S, C, &coef[0])


cdef void _span_grad_sums(const floating *x, const floating *dy, Span s, Py_ssize_t S, Py_ssize_t C,
                          const double *mean,               # IN (C,)
                          double *out, Py_ssize_t cstride) noexcept nogil:  # INOUT pairs at out[2*c*cstride]
    """out += (sum(dy), sum(dy*(x - mean[c]))) over each row of the span, in double, centred before multiplying."""
    cdef Py_ssize_t j, r, c = s.r0 % C, dc = s.rstep % C
    for j in range(s.nrows):
        r = (s.r0 + j * s.rstep) * S + s.i0
        if floating is float:
            cbn_row_grad_sums_f(x + r, dy + r, s.i1 - s.i0, mean[c], out + 2 * c * cstride)
        else:
            cbn_row_grad_sums_d(x + r, dy + r, s.i1 - s.i0, mean[c], out + 2 * c * cstride)
        c += dc
        if c >= C:
            c -= C


cdef void _finish_grad(Layout L, const double *part, Py_ssize_t c, Py_ssize_t C, double m,
                       const double *mean, const double *invstd,   # IN (C,) statistics the forward used
                       const floating *weight,                     # IN (C,) gamma or NULL
                       bint use_batch_stats,
                       floating *dweight, floating *dbias,         # OUT (C,)
                       double *coef) noexcept nogil:               # OUT (C, 4): mean, A, B, K
    """dbeta = sum dy, dgamma = invstd*sum dy*(x - mean), and the coefficients of dx = dy*A - (x - mean)*B + K.

    Training, g = gamma*invstd: dx = g*(dy - dbeta/m - xhat*dgamma/m), so A = g, B = g*invstd*dgamma/m,
    K = -g*dbeta/m. Eval: dx = g*dy (A = g, B = K = 0).
    """
    cdef double s[2]
    cdef double g
    cdef double *cf = coef + 4 * c
    _merge(L, part, c, C, s)
    dbias[c] = <floating>s[0]
    dweight[c] = <floating>(s[1] * invstd[c])
    g = (<double>weight[c] if weight != NULL else 1.0) * invstd[c]
    cf[0] = mean[c]
    cf[1] = g
    cf[2] = 0.0
    cf[3] = 0.0
    if use_batch_stats:
        cf[2] = g * invstd[c] * (s[1] * invstd[c]) / m
        cf[3] = -g * s[0] / m


cdef void _span_grad(const floating *x, const floating *dy, floating *dx, Span s, Py_ssize_t S, Py_ssize_t C,
                     const double *coef, bint use_batch_stats) noexcept nogil:  # IN (C, 4): mean, A, B, K
    """dx = dy*A - (x - mean)*B + K (training) or dx = dy*A (eval: dx does not depend on x), in double."""
    cdef double mu, A, B, K
    cdef Py_ssize_t j, i, r, c = s.r0 % C, dc = s.rstep % C
    for j in range(s.nrows):
        r = (s.r0 + j * s.rstep) * S
        mu = coef[4 * c]
        A = coef[4 * c + 1]
        B = coef[4 * c + 2]
        K = coef[4 * c + 3]
        if use_batch_stats:
            for i in range(s.i0, s.i1):
                dx[r + i] = <floating>(<double>dy[r + i] * A - (<double>x[r + i] - mu) * B + K)
        else:
            for i in range(s.i0, s.i1):
                dx[r + i] = <floating>(<double>dy[r + i] * A)
        c += dc
        if c >= C:
            c -= C


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
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], S = x.shape[2], c, k
    cdef double m = <double>(N * S)
    cdef Layout L = _layout(N, C, S)
    cdef double[::1] part = np.zeros(_part_size(L, C))
    cdef double[::1] coef = np.empty(4 * C)
    cdef const floating *px = &x[0, 0, 0]
    cdef const floating *pg = &dy[0, 0, 0]
    cdef floating *pd = &dx[0, 0, 0]
    cdef const floating *pw = &weight[0] if weight is not None else NULL
    cdef int nt = _threads(N * C * S, L.nblocks)
    with nogil:
        # Block sums in parallel, their merge, then dx over the same static block schedule.
        for k in prange(L.nblocks, schedule='static', num_threads=nt, use_threads_if=nt > 1):
            _span_grad_sums(px, pg, _block_span(L, k, N, C, S), S, C, &mean[0], _block_part(L, &part[0], k, C),
                            1 if L.by_image else 0)
        for c in range(C):
            _finish_grad(L, &part[0], c, C, m, &mean[0], &invstd[0], pw, use_batch_stats,
                         &dweight[0], &dbias[0], &coef[0])
        for k in prange(L.nblocks, schedule='static', num_threads=nt, use_threads_if=nt > 1):
            _span_grad(px, pg, pd, _block_span(L, k, N, C, S), S, C, &coef[0], use_batch_stats)


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
