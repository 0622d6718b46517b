# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled batch-norm kernels (NCHW viewed as (N, C, S), S = product of the spatial sizes).

The entry points take caller-validated, aligned, C-contiguous ndarrays of one compute dtype (float32 or float64;
statistics float64) or None where allowed, and read only their data pointers: no buffer acquisition or type dispatch
per call. They write into caller-allocated outputs, run without the GIL and raise only MemoryError when the small
scratch cannot be allocated. Arguments are marked IN, OUT or INOUT.

Determinism: the values are cut into fixed blocks (see Layout) that depend on the shape (N, C, S) only, never on
the thread count, and every statistics or gradient call of one shape uses the same blocks. Each block's partial
sums are kept and merged in block order, so any number of threads produces bitwise the same result; threads only
change which block is computed where.
"""
cimport numpy as cnp
from cython.parallel import prange
from libc.math cimport sqrt
from libc.stdint cimport uintptr_t
from libc.stdlib cimport calloc, free

cdef extern from "Python.h":
    int PyTraceMalloc_Track(unsigned int domain, uintptr_t ptr, size_t size)
    int PyTraceMalloc_Untrack(unsigned int domain, uintptr_t ptr)

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
    ctypedef struct cbn_span:
        # Runs j < nruns of run consecutive rows from row r0 + j*rstep of the (N*C, S) matrix, columns [i0, i1).
        Py_ssize_t r0, nruns, rstep, run, i0, i1
    enum:
        CBN_MOMENTS, CBN_AFFINE, CBN_GRAD_SUMS, CBN_GRAD
    void cbn_span_f(int op, const float *x, const float *dy, float *out, cbn_span s, Py_ssize_t S, Py_ssize_t C,
                    const double *p, double *acc, Py_ssize_t cs, Py_ssize_t off)
    void cbn_span_d(int op, const double *x, const double *dy, double *out, cbn_span s, Py_ssize_t S,
                    Py_ssize_t C, const double *p, double *acc, Py_ssize_t cs, Py_ssize_t off)
    void cbn_copy_f(const float *a, float *out, Py_ssize_t n)
    void cbn_copy_d(const double *a, double *out, Py_ssize_t n)
    void cbn_add_f(const float *a, const float *b, float *out, Py_ssize_t n)
    void cbn_add_d(const double *a, const double *b, double *out, Py_ssize_t n)

ctypedef fused floating:
    float
    double

cnp.import_array()


cdef unsigned int TRACE_DOMAIN = 0x63626e  # tracemalloc domain of the kernels' scratch ("cbn")


cdef double *_scratch(Py_ssize_t n) noexcept:
    """n zeroed doubles of scratch, visible to tracemalloc; NULL if allocation fails. Release with _release."""
    cdef double *p = <double *>calloc(n, sizeof(double))
    if p != NULL:
        PyTraceMalloc_Track(TRACE_DOMAIN, <uintptr_t>p, n * sizeof(double))
    return p


cdef void _release(double *p) noexcept:
    PyTraceMalloc_Untrack(TRACE_DOMAIN, <uintptr_t>p)
    free(p)


cdef inline void *_data(object a) noexcept:
    """Data pointer of a validated ndarray, NULL for None."""
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray>a)

# Elements per block (fixed: the determinism contract depends on it never varying with the thread count).
cdef Py_ssize_t BLOCK = 16384
# Rows shorter than this (or than 8*SHORT_ROW, given >= 32 images) are processed in memory order (groups of whole
# images); longer rows channel by channel.
cdef Py_ssize_t SHORT_ROW = 1024
# Rows shorter than this, in memory order, run as one row of C*S "channels" per image (see Plan.expand): a call
# per row of a few values would cost more than the row.
cdef Py_ssize_t SMALL_S = 8
# Scratch budget, in doubles, for the partial sums of short-row layouts (exceeded only to keep 2 blocks).
cdef Py_ssize_t PART_DOUBLES = 1 << 16
# Tasks of whole channels (statistics, finish and output of a group of channels in one task, so that the second
# sweep reads the last-level cache, not memory): for tensors of at least FUSE_MIN elements (beyond that cache, where
# two sweeps in memory order would read memory twice) with at least FUSE_CHANNELS channels. A group holds as many
# channels as fit in FUSE_GROUP elements, but no more than C/FUSE_CHANNELS (enough tasks for the threads), and its
# runs (one per image) are at least SHORT_ROW long. Measured here: groups of one channel with runs of a few KB were
# slower than two sweeps in memory order; runs of 25-100 KB are faster.
cdef Py_ssize_t FUSE_MIN = 1 << 22
cdef Py_ssize_t FUSE_CHANNELS = 16
cdef Py_ssize_t FUSE_GROUP = 1 << 20
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


cdef inline void _span(int op, const floating *x, const floating *dy, floating *out, cbn_span s, Py_ssize_t S,
                       Py_ssize_t C, const double *p, double *acc, Py_ssize_t cs, Py_ssize_t off) noexcept nogil:
    """Apply op to every row of span s (the operations are defined in _reduce.h)."""
    if floating is float:
        cbn_span_f(op, x, dy, out, s, S, C, p, acc, cs, off)
    else:
        cbn_span_d(op, x, dy, out, s, S, C, p, acc, cs, off)


cdef struct Tiles:
    # Tiling of a plane of nrows rows of S values into tiles of about BLOCK values:
    # tile k covers rows [(k // ncol)*rows, +rows) and columns [(k % ncol)*width, +width).
    Py_ssize_t nrows
    Py_ssize_t rows
    Py_ssize_t ncol
    Py_ssize_t width
    Py_ssize_t count


cdef enum Kind:
    BY_IMAGE  # block k = images [k*rows, +rows), all channels; sums part[2*C*k + c], part[2*C*k + C + c]
    TILES     # block k = tile k % tiles.count of channel k // tiles.count's (N, S) plane; sums part[2*k], +1
    CHANNELS  # block k = channels [k*rows, +rows) of all images, sums part[c], part[C + c]: statistics, finish
              # and output of those channels in one task


cdef struct Layout:
    Kind kind
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


cdef inline cbn_span _tile_span(Tiles t, Py_ssize_t k, Py_ssize_t S, Py_ssize_t first,
                                Py_ssize_t step) noexcept nogil:
    """Span of tile k, where plane row n is matrix row first + n*step (step 1: one run of consecutive rows)."""
    cdef cbn_span s
    cdef Py_ssize_t n0 = (k // t.ncol) * t.rows, rows = min(t.nrows - n0, t.rows)
    s.r0 = first + n0 * step
    s.nruns = 1 if step == 1 else rows
    s.rstep = step
    s.run = rows if step == 1 else 1
    s.i0 = (k % t.ncol) * t.width
    s.i1 = min(S, s.i0 + t.width)
    return s


cdef Layout _layout(Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, bint fuse) noexcept nogil:
    """Blocks of an (N, C, S) tensor (they depend on the shape only); CHANNELS only when fuse is set."""
    cdef Layout L
    cdef Py_ssize_t cap
    L.tiles = _tiles(N, S)
    L.nblocks = C
    L.rows = max(1, min(FUSE_GROUP // (N * S), C // FUSE_CHANNELS))
    if fuse and L.rows * S >= SHORT_ROW and N * S <= FUSE_GROUP and N * C * S >= FUSE_MIN and C >= FUSE_CHANNELS:
        L.kind = CHANNELS
        L.nblocks = (C + L.rows - 1) // L.rows
    elif (S < SHORT_ROW and (N >= 8 or S < SMALL_S)) or (S < 8 * SHORT_ROW and N >= 32):  # memory order
        L.kind = BY_IMAGE
        # Few enough blocks that their partial sums (2*C doubles each) stay small: at most 64, and about
        # PART_DOUBLES doubles in all for huge C.
        cap = max(2, min(64, PART_DOUBLES // (2 * C)))
        L.rows = max(max(1, BLOCK // (C * S)), (N + cap - 1) // cap)
        L.nblocks = (N + L.rows - 1) // L.rows
    else:
        L.kind = TILES
        L.nblocks = C * L.tiles.count
    return L


cdef inline cbn_span _block_span(Layout L, Py_ssize_t k, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S) noexcept nogil:
    cdef cbn_span s
    if L.kind == TILES:
        return _tile_span(L.tiles, k % L.tiles.count, S, k // L.tiles.count, C)
    s.rstep = C
    s.i0 = 0
    s.i1 = S
    if L.kind == CHANNELS:
        s.r0 = k * L.rows
        s.nruns = N
        s.run = min(C - s.r0, L.rows)
    else:
        s.r0 = k * L.rows * C
        s.nruns = min(N - k * L.rows, L.rows)
        s.run = C
    return s


cdef inline double *_block_part(Layout L, double *part, Py_ssize_t k, Py_ssize_t C) noexcept nogil:
    """Where block k's partial sums start."""
    if L.kind == CHANNELS:
        return part
    return part + 2 * k * (C if L.kind == BY_IMAGE else 1)


cdef inline Py_ssize_t _part_size(Layout L, Py_ssize_t C) noexcept nogil:
    """Doubles of partial sums: a pair per channel per block (BY_IMAGE), per block (TILES) or per channel."""
    if L.kind == CHANNELS:
        return 2 * C
    return 2 * L.nblocks * (C if L.kind == BY_IMAGE else 1)


cdef inline void _block_op(int op, const floating *x, const floating *dy, floating *out, Layout L, Tiles *T,
                           Py_ssize_t k, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, const double *p,
                           double *part) noexcept nogil:
    """op on block k of L (tile k of T when T is not NULL); sums (part not NULL) go to the block's partial sums."""
    if T != NULL:
        _span(op, x, dy, out, _tile_span(T[0], k, S, 0, 1), S, C, p, NULL, 0, 0)
    elif part != NULL:
        _span(op, x, dy, out, _block_span(L, k, N, C, S), S, C, p, _block_part(L, part, k, C),
              0 if L.kind == TILES else 1, 1 if L.kind == TILES else C)
    else:
        _span(op, x, dy, out, _block_span(L, k, N, C, S), S, C, p, NULL, 0, 0)


cdef void _blocks(int op, const floating *x, const floating *dy, floating *out, Layout L, Tiles *T, Py_ssize_t N,
                  Py_ssize_t C, Py_ssize_t S, const double *p, double *part, int nt) noexcept nogil:
    """op (see _block_op) on every block, in parallel with a static schedule (the same blocks go to the same
    threads in the sums and the elementwise pass, so each thread revisits what it has just read), or serially
    without entering a parallel region when nt is 1."""
    cdef Py_ssize_t k, n = T.count if T != NULL else L.nblocks
    if nt > 1:
        for k in prange(n, schedule='static', num_threads=nt):
            _block_op(op, x, dy, out, L, T, k, N, C, S, p, part)
    else:
        for k in range(n):
            _block_op(op, x, dy, out, L, T, k, N, C, S, p, part)


cdef void _merge(Layout L, double *part, Py_ssize_t C) noexcept nogil:
    """Add every channel's partial sums over its blocks in block order, into its first block's pair (in place,
    memory order: for BY_IMAGE the blocks' (2, C) arrays are added one after another)."""
    cdef Py_ssize_t k, j, c, T = L.tiles.count
    if L.kind == BY_IMAGE:
        for k in range(1, L.nblocks):
            for j in range(2 * C):
                part[j] += part[2 * C * k + j]
    elif L.kind == TILES:
        for c in range(C):
            for k in range(c * T + 1, (c + 1) * T):
                part[2 * c * T] += part[2 * k]
                part[2 * c * T + 1] += part[2 * k + 1]


cdef inline void _channel_sums(Layout L, const double *part, Py_ssize_t c, Py_ssize_t C,
                               double *s) noexcept nogil:
    """s[0], s[1] = channel c's two sums after _merge."""
    if L.kind == TILES:
        s[0] = part[2 * c * L.tiles.count]
        s[1] = part[2 * c * L.tiles.count + 1]
    else:
        s[0] = part[c]
        s[1] = part[C + c]


cdef struct Plan:
    # The blocks and scratch of one kernel call.
    Layout L           # blocks of the (N, C, S) tensor
    bint expand        # BY_IMAGE with 1 < S < SMALL_S: sums and elementwise passes run on the (N, C*S, 1) view,
                       # one column per (channel, s), and per-channel sums are the columns' sums added in s order
    Layout E           # blocks of that view
    double *coef       # (4, C) coefficients of the operations (see _reduce.h)
    double *part       # partial sums of L's blocks
    double *coef_e     # (4, C*S) coefficients of the view's columns
    double *part_e     # partial sums of E's blocks
    int nt             # threads


cdef int _plan(Plan *P, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, bint fuse, bint with_sums) noexcept:
    """Blocks and zeroed scratch for a call (with_sums: room for partial sums); -1 if allocation fails."""
    cdef Py_ssize_t n
    P.L = _layout(N, C, S, fuse)
    P.expand = P.L.kind == BY_IMAGE and 1 < S < SMALL_S
    n = 4 * C + (_part_size(P.L, C) if with_sums else 0)
    if P.expand:
        P.E = _layout(N, C * S, 1, False)
        n += 4 * C * S + (_part_size(P.E, C * S) if with_sums else 0)
    P.coef = _scratch(n)
    if P.coef == NULL:
        return -1
    P.part = P.coef + 4 * C
    P.coef_e = P.part + (_part_size(P.L, C) if with_sums else 0)
    P.part_e = P.coef_e + 4 * C * S
    P.nt = _threads(N * C * S, P.E.nblocks if P.expand else P.L.nblocks)
    return 0


cdef void _sums(int op, const floating *x, const floating *dy, Plan *P, Py_ssize_t N, Py_ssize_t C,
                Py_ssize_t S) noexcept nogil:
    """Every channel's sums of op (CBN_MOMENTS or CBN_GRAD_SUMS; shift P.coef[c]) over its blocks, merged in block
    order: afterwards _channel_sums(P.L, P.part, c, C) reads them."""
    cdef Py_ssize_t c, j, q, CS = C * S
    if not P.expand:
        _blocks(op, x, dy, <floating *>NULL, P.L, NULL, N, C, S, P.coef, P.part, P.nt)
        _merge(P.L, P.part, C)
        return
    for j in range(CS):
        P.coef_e[j] = P.coef[j // S]
    _blocks(op, x, dy, <floating *>NULL, P.E, NULL, N, CS, 1, P.coef_e, P.part_e, P.nt)
    _merge(P.E, P.part_e, CS)
    for c in range(C):  # into block 0's pairs, as _merge leaves BY_IMAGE sums
        P.part[c] = 0.0
        P.part[C + c] = 0.0
        for q in range(c * S, (c + 1) * S):
            P.part[c] += P.part_e[q]
            P.part[C + c] += P.part_e[CS + q]


cdef void _apply(int op, const floating *x, const floating *dy, floating *out, Plan *P, Py_ssize_t N,
                 Py_ssize_t C, Py_ssize_t S) noexcept nogil:
    """Elementwise op (CBN_AFFINE or CBN_GRAD) with coefficients P.coef over every block."""
    cdef Py_ssize_t a, j, CS = C * S
    if not P.expand:
        _blocks(op, x, dy, out, P.L, NULL, N, C, S, P.coef, NULL, P.nt)
        return
    for a in range(4):
        for j in range(CS):
            P.coef_e[a * CS + j] = P.coef[a * C + j // S]
    _blocks(op, x, dy, out, P.E, NULL, N, CS, 1, P.coef_e, NULL, P.nt)


cdef void _finish_stats(double s1, double s2, Py_ssize_t c, Py_ssize_t C, double m, bint stats_only,
                        floating *running_mean, floating *running_var,   # INOUT (C,) or NULL
                        const floating *weight, const floating *bias,    # IN (C,) or NULL
                        double momentum, double eps,
                        double *mean, double *invstd,                    # OUT (C,)
                        double *coef) noexcept nogil:                    # INOUT (4, C): IN shift K, OUT affine
    """Channel c: mean = K + s1/m, M2 = s2 - s1**2/m, var = M2/m, invstd = 1/sqrt(var + eps) (stats_only: M2 in
    invstd's place, and nothing else). NaN stays NaN.

    s1, s2 are the sums of x - K and (x - K)**2, K = coef[c] a value of the channel, so s2 <= (m + 1)*M2: the
    subtraction loses at most log2(m + 1) bits of a double, and nothing for data near K.
    Running statistics: r_mean = (1 - f)*r_mean + f*mean, r_var = (1 - f)*r_var + f*M2/(m - 1).
    Affine coefficients of y = (x - mean)*scale + beta: coef[c], coef[C + c], coef[2C + c] = mean, gamma*invstd, beta.
    """
    cdef double M2 = s2 - s1 * s1 / m
    if M2 < 0.0:
        M2 = 0.0
    mean[c] = coef[c] + s1 / m
    if stats_only:
        invstd[c] = M2
        return
    invstd[c] = 1.0 / sqrt(M2 / m + eps)
    if running_mean != NULL:
        running_mean[c] = <floating>((1.0 - momentum) * running_mean[c] + momentum * mean[c])
        running_var[c] = <floating>((1.0 - momentum) * running_var[c] + momentum * (M2 / (m - 1.0)))
    _affine_coef(mean[c], invstd[c], weight, bias, c, C, coef)


cdef inline void _affine_coef(double mean, double invstd, const floating *weight, const floating *bias,
                              Py_ssize_t c, Py_ssize_t C, double *coef) noexcept nogil:  # OUT (4, C)
    coef[c] = mean
    coef[C + c] = (<double>weight[c] if weight != NULL else 1.0) * invstd
    coef[2 * C + c] = <double>bias[c] if bias != NULL else 0.0


def forward(cnp.ndarray x,                    # IN (N, C, S), N*S >= 1 (>= 2 when use_batch_stats)
            y,                                # OUT (N, C, S), or None: statistics only (use_batch_stats only)
            running_mean, running_var,        # INOUT (C,) each, or None
            weight, bias,                     # IN (C,) gamma and beta, or None (= 1 and 0)
            cnp.ndarray mean,                 # OUT (C,) float64 batch mean, or IN (C,) running mean
            cnp.ndarray invstd,               # OUT (C,) float64 1/sqrt(var + eps) (IN: running var, when eval)
            bint use_batch_stats, bint update_running, double momentum, double eps):
    """Batch-norm forward: y = gamma*(x - mean)*invstd + beta, per channel.

    use_batch_stats: mean and var (biased) of the batch, written to mean and invstd, and with update_running the
    running statistics are updated in place. Otherwise mean and var come in as the running statistics, and var is
    replaced by invstd = 1/sqrt(var + eps). With y None (and use_batch_stats): the batch mean and, in invstd's
    place, M2 = sum((x - mean)**2) per channel, nothing else (for data-parallel statistics).
    """
    cdef cnp.npy_intp *shape = cnp.PyArray_DIMS(x)
    cdef int status
    if not update_running:
        running_mean = running_var = None
    if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT:
        status = _forward(<const float *>_data(x), <float *>_data(y), <float *>_data(running_mean),
                          <float *>_data(running_var), <const float *>_data(weight), <const float *>_data(bias),
                          <double *>_data(mean), <double *>_data(invstd), shape[0], shape[1], shape[2],
                          use_batch_stats, momentum, eps)
    else:
        status = _forward(<const double *>_data(x), <double *>_data(y), <double *>_data(running_mean),
                          <double *>_data(running_var), <const double *>_data(weight), <const double *>_data(bias),
                          <double *>_data(mean), <double *>_data(invstd), shape[0], shape[1], shape[2],
                          use_batch_stats, momentum, eps)
    if status:
        raise MemoryError()


cdef int _forward(const floating *px, floating *py, floating *prm, floating *prv,
                  const floating *pw, const floating *pb, double *mean, double *invstd,
                  Py_ssize_t N, Py_ssize_t C, Py_ssize_t S, bint use_batch_stats, double momentum,
                  double eps) noexcept:
    """forward on data pointers (prm, prv, pw, pb may be NULL); returns -1 if scratch allocation fails, else 0."""
    cdef Py_ssize_t c, k
    cdef double m = <double>(N * S)
    cdef bint stats_only = py == NULL
    cdef Plan P
    cdef Tiles T = _tiles(N * C, S)
    cdef cbn_span s
    cdef double sums[2]
    cdef int nt
    if (stats_only and not use_batch_stats) or N * C * S == 0:
        return 0
    if _plan(&P, N, C, S, use_batch_stats, use_batch_stats):
        return -1
    nt = P.nt
    with nogil:
        if not use_batch_stats:
            for c in range(C):
                invstd[c] = 1.0 / sqrt(invstd[c] + eps)
                _affine_coef(mean[c], invstd[c], pw, pb, c, C, P.coef)
            if P.L.kind == BY_IMAGE:
                _apply(CBN_AFFINE, px, <floating *>NULL, py, &P, N, C, S)
            else:  # memory-order tiles of whole rows
                _blocks(CBN_AFFINE, px, <floating *>NULL, py, P.L, &T, N, C, S, P.coef, NULL,
                        _threads(N * C * S, T.count))
        else:
            for c in range(C):  # the shift K of the sums: a value of each channel
                P.coef[c] = px[c * S]
            if P.L.kind == CHANNELS:
                for k in prange(P.L.nblocks, schedule='static', num_threads=nt, use_threads_if=nt > 1):
                    s = _block_span(P.L, k, N, C, S)
                    _span(CBN_MOMENTS, px, <floating *>NULL, <floating *>NULL, s, S, C, P.coef, P.part, 1, C)
                    for c in range(s.r0, s.r0 + s.run):
                        _finish_stats(P.part[c], P.part[C + c], c, C, m, stats_only, prm, prv, pw, pb, momentum,
                                      eps, mean, invstd, P.coef)
                    if not stats_only:
                        _span(CBN_AFFINE, px, <floating *>NULL, py, s, S, C, P.coef, NULL, 0, 0)
            else:
                _sums(CBN_MOMENTS, px, <floating *>NULL, &P, N, C, S)
                for c in range(C):
                    _channel_sums(P.L, P.part, c, C, sums)
                    _finish_stats(sums[0], sums[1], c, C, m, stats_only, prm, prv, pw, pb, momentum, eps, mean,
                                  invstd, P.coef)
                if not stats_only:
                    _apply(CBN_AFFINE, px, <floating *>NULL, py, &P, N, C, S)
    _release(P.coef)
    return 0


cdef void _finish_grad(double s0, double s1, Py_ssize_t c, Py_ssize_t C, double m,
                       const double *mean, const double *invstd,   # IN (C,) statistics the forward used
                       const floating *weight,                     # IN (C,) gamma or NULL
                       bint use_batch_stats,
                       floating *dweight, floating *dbias,         # OUT (C,)
                       double *coef) noexcept nogil:               # OUT (4, C)
    """From s0 = sum dy, s1 = sum dy*(x - mean) over m values of channel c: dbeta = s0, dgamma = invstd*s1, and
    the coefficients of dx.

    Training, g = gamma*invstd: dx = g*(dy - dbeta/m - xhat*dgamma/m) = (dy - dbeta/m)*A - (x - mean)*B with
    A = g, B = g*invstd*dgamma/m: coef[:, c] = (mean, A, B, dbeta/m) for CBN_GRAD (both differences are taken
    before scaling, which keeps dx exact when dy or x sit far from zero). Eval: dx = g*dy,
    coef[:, c] = (0, g, 0, 0) for CBN_AFFINE applied to dy.
    """
    cdef double g = (<double>weight[c] if weight != NULL else 1.0) * invstd[c]
    dbias[c] = <floating>s0
    dweight[c] = <floating>(s1 * invstd[c])
    coef[C + c] = g
    if use_batch_stats:
        coef[2 * C + c] = g * invstd[c] * (s1 * invstd[c]) / m
        coef[3 * C + c] = s0 / m
    else:
        coef[c] = 0.0
        coef[2 * C + c] = 0.0
        coef[3 * C + c] = 0.0


def backward(cnp.ndarray x,                   # IN (N, C, S) the forward's input, N*S >= 1
             cnp.ndarray dy,                  # IN (N, C, S)
             dx,                              # OUT (N, C, S), or None: sums only
             cnp.ndarray mean,                # IN (C,) float64 mean the forward used
             cnp.ndarray invstd,              # IN (C,) float64 invstd the forward used
             weight,                          # IN (C,) gamma or None (= 1)
             cnp.ndarray dweight,             # OUT (C,) sum dy*xhat
             cnp.ndarray dbias,               # OUT (C,) sum dy
             bint use_batch_stats,
             sums=None,                       # (2, C) float64: OUT when dx is None, else IN or None
             double count=0):                 # values per channel that IN sums cover
    """Batch-norm backward.

    Training: dx = gamma*invstd*(dy - sum(dy)/m - xhat*sum(dy*xhat)/m), xhat = (x - mean)*invstd.
    Eval (running statistics are constants): dx = gamma*invstd*dy. Both: dgamma = sum(dy*xhat), dbeta = sum(dy).
    Data-parallel use: with dx None, only the sums (sum dy, sum dy*(x - mean)) of this tensor go to sums; given
    sums (and their count m) of a larger batch, dx uses them instead of this tensor's own.
    """
    cdef cnp.npy_intp *shape = cnp.PyArray_DIMS(x)
    cdef int status
    if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT:
        status = _backward(<const float *>_data(x), <const float *>_data(dy), <float *>_data(dx),
                           <const double *>_data(mean), <const double *>_data(invstd), <const float *>_data(weight),
                           <float *>_data(dweight), <float *>_data(dbias), shape[0], shape[1], shape[2],
                           use_batch_stats, <double *>_data(sums), count)
    else:
        status = _backward(<const double *>_data(x), <const double *>_data(dy), <double *>_data(dx),
                           <const double *>_data(mean), <const double *>_data(invstd), <const double *>_data(weight),
                           <double *>_data(dweight), <double *>_data(dbias), shape[0], shape[1], shape[2],
                           use_batch_stats, <double *>_data(sums), count)
    if status:
        raise MemoryError()


cdef int _backward(const floating *px, const floating *pg, floating *pd, const double *mean, const double *invstd,
                   const floating *pw, floating *dweight, floating *dbias, Py_ssize_t N, Py_ssize_t C, Py_ssize_t S,
                   bint use_batch_stats, double *sums, double count) noexcept:
    """backward on data pointers (pw, sums may be NULL; pd NULL: sums only); returns -1 if scratch allocation
    fails, else 0."""
    cdef Py_ssize_t c, k
    cdef bint given = sums != NULL and pd != NULL
    cdef double m = count if given else <double>(N * S)
    cdef Plan P
    cdef cbn_span s
    cdef int op = CBN_GRAD if use_batch_stats else CBN_AFFINE    # eval: dx = (dy - 0)*g + 0
    cdef const floating *pa = px if use_batch_stats else pg
    cdef const floating *pb = pg if use_batch_stats else NULL
    cdef int nt
    if N * C * S == 0:
        return 0
    if _plan(&P, N, C, S, True, True):
        return -1
    nt = P.nt
    with nogil:
        for c in range(C):
            P.coef[c] = mean[c]
        if P.L.kind == CHANNELS:
            for k in prange(P.L.nblocks, schedule='static', num_threads=nt, use_threads_if=nt > 1):
                s = _block_span(P.L, k, N, C, S)
                if not given:
                    _span(CBN_GRAD_SUMS, px, pg, <floating *>NULL, s, S, C, P.coef, P.part, 1, C)
                for c in range(s.r0, s.r0 + s.run):
                    _grad_channel(P.L, P.part, sums, given, c, C, m, mean, invstd, pw, use_batch_stats, dweight,
                                  dbias, P.coef)
                if pd != NULL:
                    _span(op, pa, pb, pd, s, S, C, P.coef, NULL, 0, 0)
        else:
            # Block sums in parallel (unless given), their merge, then dx over the same static block schedule.
            if not given:
                _sums(CBN_GRAD_SUMS, px, pg, &P, N, C, S)
            for c in range(C):
                _grad_channel(P.L, P.part, sums, given, c, C, m, mean, invstd, pw, use_batch_stats, dweight, dbias,
                              P.coef)
            if pd != NULL:
                _apply(op, pa, pb, pd, &P, N, C, S)
    _release(P.coef)
    return 0


cdef inline void _grad_channel(Layout L, const double *part, double *sums, bint given, Py_ssize_t c, Py_ssize_t C,
                               double m, const double *mean, const double *invstd, const floating *weight,
                               bint use_batch_stats, floating *dweight, floating *dbias,
                               double *coef) noexcept nogil:
    """Channel c's sums (given ones, or its merged partial sums, then copied to sums when there), and _finish_grad."""
    cdef double local[2]
    if given:
        local[0] = sums[c]
        local[1] = sums[C + c]
    else:
        _channel_sums(L, part, c, C, local)
        if sums != NULL:
            sums[c] = local[0]
            sums[C + c] = local[1]
    _finish_grad(local[0], local[1], c, C, m, mean, invstd, weight, use_batch_stats, dweight, dbias, coef)


def copy(cnp.ndarray src, cnp.ndarray dst):
    """Roofline of the forward for the benchmark: dst = src (C-contiguous, one dtype and size)."""
    _roofline(src, None, dst)


def add(cnp.ndarray a, cnp.ndarray b, cnp.ndarray out):
    """Roofline of the backward for the benchmark: out = a + b (C-contiguous, one dtype and size)."""
    _roofline(a, b, out)


cdef void _roofline(cnp.ndarray a, b, cnp.ndarray out) noexcept:
    """out = a (b None) or a + b, in BLOCK-value chunks with the kernels' threading policy."""
    cdef Py_ssize_t n = cnp.PyArray_SIZE(a), nchunk = (n + BLOCK - 1) // BLOCK, t
    cdef int nt = _threads(n, nchunk)
    cdef bint single = cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT
    cdef void *pa = cnp.PyArray_DATA(a)
    cdef void *pb = _data(b)
    cdef void *po = cnp.PyArray_DATA(out)
    with nogil:
        if nt > 1:
            for t in prange(nchunk, schedule='static', num_threads=nt):
                _roofline_chunk(single, pa, pb, po, t * BLOCK, min(BLOCK, n - t * BLOCK))
        else:
            _roofline_chunk(single, pa, pb, po, 0, n)


cdef inline void _roofline_chunk(bint single, void *a, void *b, void *out, Py_ssize_t i0,
                                 Py_ssize_t n) noexcept nogil:
    if single and b == NULL:
        cbn_copy_f(<float *>a + i0, <float *>out + i0, n)
    elif single:
        cbn_add_f(<float *>a + i0, <float *>b + i0, <float *>out + i0, n)
    elif b == NULL:
        cbn_copy_d(<double *>a + i0, <double *>out + i0, n)
    else:
        cbn_add_d(<double *>a + i0, <double *>b + i0, <double *>out + i0, n)
