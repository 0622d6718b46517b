# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The benchmark's rooflines (``cbn.bench`` only, not used by the layers): a copy, the floor of the forward and eval,
and an add, the floor of the backward, with the kernels' threading (BLOCK-value chunks over a static ``prange``,
serial below PARALLEL_MIN values). Built at the baseline level with the kernels' OpenMP flags.
"""
from cython.parallel cimport prange

ctypedef fused floating:
    float
    double

# The kernels' block size and parallel threshold (cbn/_kernels.pyx), so that the floor is threaded alike.
cdef Py_ssize_t BLOCK = 1 << 15
cdef Py_ssize_t PARALLEL_MIN = 1 << 16


cdef inline int _threads(Py_ssize_t n, Py_ssize_t nchunk, int n_threads) noexcept nogil:
    """Threads for n values in nchunk chunks: 1 below PARALLEL_MIN, else at most one per chunk."""
    return 1 if n < PARALLEL_MIN else <int>min(<Py_ssize_t>n_threads, nchunk)


def copy(const floating[::1] a,           # IN (n,)
         floating[::1] out,               # OUT (n,)
         int n_threads):
    """Roofline of the forward: out = a, in BLOCK-value chunks."""
    cdef Py_ssize_t t, i, n = a.shape[0], nchunk = (n + BLOCK - 1) // BLOCK
    cdef int nt = _threads(n, nchunk, n_threads)
    for t in prange(nchunk, schedule='static', num_threads=nt, use_threads_if=nt > 1, nogil=True):
        for i in range(t * BLOCK, min(n, (t + 1) * BLOCK)):
            out[i] = a[i]


def add(const floating[::1] a, const floating[::1] b,   # IN (n,) each
        floating[::1] out,                               # OUT (n,)
        int n_threads):
    """Roofline of the backward: out = a + b, chunked like copy."""
    cdef Py_ssize_t t, i, n = a.shape[0], nchunk = (n + BLOCK - 1) // BLOCK
    cdef int nt = _threads(n, nchunk, n_threads)
    for t in prange(nchunk, schedule='static', num_threads=nt, use_threads_if=nt > 1, nogil=True):
        for i in range(t * BLOCK, min(n, (t + 1) * BLOCK)):
            out[i] = a[i] + b[i]
