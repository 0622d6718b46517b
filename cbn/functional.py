"""Functional batch norm: the only place that validates and converts input, allocates outputs and calls kernels.

Semantics follow ``torch.nn.functional.batch_norm``, with the channel axis free (``axis``, default 1). The kernels
see an input as its memory: a C-contiguous (A, C, B) array of the compute dtype (float32 or float64), A and B the
products of the sizes before and after the channel axis in memory order. That is a view, with no copy, of any
array whose memory is dense in some axis order (C-contiguous with any channel axis, channels-last NHWC memory viewed
as NCHW, Fortran order); other arrays are copied once, in C order. Outputs have the memory layout of what the
kernels see.
"""
import math
import numbers
from typing import NamedTuple, Optional

import numpy as np

from ._dispatch import kernels as _kernels
from ._threads import thread_cap

_COMPUTE = (np.dtype(np.float32), np.dtype(np.float64))


class BatchNormSaved(NamedTuple):
    """What a forward keeps for its backward.

    Attributes
    ----------
    x : ndarray
        The input's memory as a C-contiguous (A, C, B) array of the compute dtype (a view of the caller's array when
        no conversion was needed: modifying that array before the backward changes the gradient).
    mean, invstd : ndarray
        (C,) float64 mean and 1/sqrt(var + eps) the forward used.
    weight : ndarray or None
        (C,) gamma in the compute dtype.
    use_batch_stats : bool
        True when the forward normalised with batch statistics.
    shape : tuple
        Shape of the forward's input.
    dtype : numpy.dtype
        dtype of the forward's output, and of dx.
    axis : int
        The channel axis of ``shape`` (>= 0).
    order : tuple or None
        The axes of ``shape`` in memory order (None: C order): ``x`` is the input transposed to ``order``, as an
        (A, C, B) array.
    """

    x: np.ndarray
    mean: np.ndarray
    invstd: np.ndarray
    weight: Optional[np.ndarray]
    use_batch_stats: bool
    shape: tuple
    dtype: np.dtype
    axis: int = 1
    order: Optional[tuple] = None


def _float_array(a, name):
    """Return ``a`` if it is a floating ndarray, else raise TypeError naming what it is."""
    if type(a) is np.ndarray and a.dtype.kind == "f":  # the common case, checked first
        return a
    if not isinstance(a, np.ndarray) or isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{name} must be a numpy.ndarray of floating dtype, got {type(a).__name__}")
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must have a floating dtype (float16, float32 or float64), got {a.dtype}")
    return a if type(a) is np.ndarray else a.view(np.ndarray)


def _input_array(x, axis):
    """Validate an input of at least 2 dimensions (a floating ndarray) and its channel axis; return x and the axis
    as an index >= 0."""
    x = _float_array(x, "input")
    if x.ndim < 2:
        raise ValueError(f"input must have at least 2 dimensions (N, C, *), got {x.ndim}")
    return x, channel_axis(axis, x.ndim)


def channel_axis(axis, ndim):
    """``axis`` as an index in [0, ndim): an integer in [-ndim, ndim), else TypeError or ValueError."""
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an integer, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis must be in [{-ndim}, {ndim}) for {ndim}-D input, got {axis}")
    return int(axis) % ndim


def _memory_order(a):
    """The order of the axes in ``a``'s memory when it is dense (a transposed C-contiguous array: axes from the
    largest stride to the smallest), else C order (the order of the copy the kernels get)."""
    c_order = tuple(range(a.ndim))
    if a.flags.c_contiguous:
        return c_order
    order = tuple(sorted(c_order, key=lambda d: -a.strides[d]))
    return order if a.transpose(order).flags.c_contiguous else c_order


def _memory(a, order, axis, dt):
    """``a`` transposed to ``order`` as an aligned C-contiguous (A, C, B) array of dtype dt, C = a.shape[axis]:
    a view when a's memory is dense in that order, else a copy."""
    mem = _contiguous(a.transpose(order), dt)
    k = order.index(axis)
    return mem.reshape(math.prod(mem.shape[:k]), a.shape[axis], math.prod(mem.shape[k + 1:]))


def _empty(shape, order, dt):
    """An uninitialised array of ``shape`` whose memory holds its axes in ``order`` (C-contiguous when
    transposed to it)."""
    if order == tuple(range(len(shape))):
        return np.empty(shape, dtype=dt)
    return np.empty([shape[d] for d in order], dtype=dt).transpose(sorted(range(len(order)), key=order.__getitem__))


def _kernel_output(out, order, dt):
    """The flat array the kernel writes: out's own memory when it is laid out in ``order`` with dtype dt, else
    None (the kernel writes a temporary that is copied into out)."""
    if out.dtype == dt and out.transpose(order).flags.c_contiguous:
        return out.transpose(order).view(np.ndarray).reshape(-1)
    return None


def _compute_dtype(x_dtype, dtype):
    """The dtype kernels run in: ``dtype`` if given, else x's (float16 -> float32, wider floats -> float64)."""
    if dtype is not None:
        dtype = np.dtype(dtype)
        if dtype not in _COMPUTE:
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        return dtype
    if x_dtype.itemsize <= 4:
        return _COMPUTE[0]
    return _COMPUTE[1]


def _output_dtype(x_dtype, dt):
    """dtype of the output for input of x_dtype computed in dt: float16 stays float16, otherwise dt."""
    return np.dtype(np.float16) if x_dtype.itemsize == 2 else dt


def _channel_array(a, name, C):
    """Validate that ``a`` is a floating ndarray of shape (C,) and return it."""
    a = _float_array(a, name)
    if a.shape != (C,):
        raise ValueError(f"{name} must have shape ({C},) to match the input's {C} channels, got {a.shape}")
    return a


def _channel_param(a, name, C, dt):
    """Validate an optional (C,) parameter and return it as a contiguous array of dtype dt."""
    return None if a is None else _contiguous(_channel_array(a, name, C), dt)


def _running_stat(a, name, C, dt):
    """Validate a running statistic that the kernel updates in place: (C,), dtype dt, contiguous, writeable."""
    a = _channel_array(a, name, C)
    if a.dtype != dt:
        raise TypeError(f"{name} must have the compute dtype {dt} to be updated in place, got {a.dtype}")
    if not _writeable_contiguous(a):
        raise ValueError(f"{name} must be a writeable, aligned, contiguous array to be updated in place, got "
                         f"{_flags(a)}")
    return a


def _out_array(out, name, shape, dt, order, inputs):
    """Validate ``out`` (shape, dtype, writeable, aligned, C-contiguous or laid out in ``order``, no overlap with
    inputs unless they are None) or allocate it in ``order``."""
    if out is None:
        return _empty(shape, order, dt)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != shape or out.dtype != dt:
        raise ValueError(f"{name} must have shape {shape} and dtype {dt}, got shape {out.shape} and dtype {out.dtype}")
    if not (out.flags.writeable and out.flags.aligned):
        raise ValueError(f"{name} must be a writeable, aligned array, got {_flags(out)}")
    if not (out.flags.c_contiguous or out.transpose(order).flags.c_contiguous):
        raise ValueError(f"{name} must be C-contiguous or laid out as the input (axes in memory order {order}), "
                         f"got strides {out.strides}")
    if inputs is not None:
        _check_no_overlap(name, out, inputs)
    return out


def _writeable_contiguous(a):
    """True when ``a`` is C-contiguous, writeable and aligned."""
    flags = a.flags
    return flags.c_contiguous and flags.writeable and flags.aligned


def _flags(a):
    """The memory flags that the kernels need, as the error messages show them."""
    return f"writeable={a.flags.writeable}, aligned={a.flags.aligned}, C-contiguous={a.flags.c_contiguous}"


def _owns_memory(a):
    """True when ``a`` is the sole owner of its buffer (then no other array object overlaps it)."""
    return a.base is None and a.flags.owndata


def _distinct_owners(*arrays):
    """True when the arrays (None skipped) are distinct ndarrays that each own their buffer: then none overlaps
    another, and the pairwise checks can be skipped."""
    ids = set()
    for a in arrays:
        if a is not None:
            if type(a) is not np.ndarray or not _owns_memory(a) or id(a) in ids:
                return False
            ids.add(id(a))
    return True


def _check_no_overlap(name, a, others):
    """Raise ValueError if ``a`` may share memory with one of ``others`` ({name: array or None})."""
    a_owns = _owns_memory(a)
    for other, b in others.items():
        if b is None or (a_owns and b is not a and type(b) is np.ndarray and _owns_memory(b)):
            continue
        if np.may_share_memory(a, b):
            raise ValueError(f"{name} must not share memory with another argument, got memory shared with {other}")


def _contiguous(a, dt):
    """``a`` as an aligned C-contiguous array of dtype dt (a copy only when needed)."""
    a = np.ascontiguousarray(a, dtype=dt)
    return a if a.flags.aligned else a.copy()


def _is_real(v):
    """True for a real number that is not a bool."""
    return type(v) is float or type(v) is int or (not isinstance(v, bool) and isinstance(v, numbers.Real))


def _check_scalars(momentum, eps):
    """eps must be finite and >= 0; momentum a number in [0, 1]."""
    if not (_is_real(eps) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not (_is_real(momentum) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")


def batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5, *,
               axis=1, out=None, dtype=None, return_saved=False, nan_guard=False):
    """Batch normalisation over the channel axis ``axis`` (default 1: (N, C, *) input).

    y = weight*(x - mean)/sqrt(var + eps) + bias, per channel, with the batch's mean and biased variance (over all
    positions of the other axes) when ``training`` (and, if given, the running statistics updated in place:
    r = (1 - momentum)*r + momentum*batch_stat, with the unbiased variance), else the running statistics.

    Parameters
    ----------
    x : ndarray
        Input of at least 2 dimensions, any floating dtype, layout and strides. Never modified.
    running_mean, running_var : ndarray or None
        (C,) running statistics, C = x.shape[axis]. Updated in place when ``training`` (then they must be
        contiguous, writeable and of the compute dtype); required when not ``training``.
    weight, bias : ndarray or None
        (C,) gamma and beta; None means 1 and 0.
    training : bool
        Normalise with batch statistics (True) or with the running statistics (False).
    momentum : float
        Factor of the running-statistic update, in [0, 1].
    eps : float
        Added to the variance, finite and >= 0.
    axis : int
        The channel axis, in [-x.ndim, x.ndim): 1 for NCHW (and for channels-last arrays viewed as NCHW), -1 for
        NHWC, (N, L, C) or (N, C).
    out : ndarray, optional
        Preallocated output: shape of x, the output dtype, writeable, C-contiguous or with x's memory layout, not
        overlapping any input.
    dtype : {None, float32, float64}
        Compute dtype; default float64 for float64 (and wider) input, float32 otherwise.
    return_saved : bool
        Also return the :class:`BatchNormSaved` that :func:`batch_norm_backward` needs.
    nan_guard : bool
        When updating running statistics, update only the channels whose new running mean and variance are both
        finite: a channel whose batch holds NaN or Inf (or whose statistics overflow the dtype) keeps its running
        statistics (its output is not guarded). Off by default (torch's behaviour: the statistics take the NaN).

    Returns
    -------
    y : ndarray
        Output of the compute dtype (float16 for float16 input), shape and memory layout of x (unless ``out``).
    saved : BatchNormSaved
        Only with ``return_saved``.
    """
    x, axis = _input_array(x, axis)
    _check_scalars(momentum, eps)
    shape = x.shape
    C = shape[axis]
    count = math.prod(shape) // C if C else 0
    dt = _compute_dtype(x.dtype, dtype)
    out_dt = _output_dtype(x.dtype, dt)
    training = bool(training)
    if training and count == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {shape}")
    update = training and (running_mean is not None or running_var is not None)
    disjoint = _distinct_owners(x, running_mean, running_var, weight, bias, out)
    if update:
        running_mean = _running_stat(running_mean, "running_mean", C, dt)
        running_var = _running_stat(running_var, "running_var", C, dt)
        if not disjoint:
            _check_no_overlap("running_mean", running_mean,
                              {"input": x, "running_var": running_var, "weight": weight, "bias": bias})
            _check_no_overlap("running_var", running_var, {"input": x, "weight": weight, "bias": bias})
    elif not training:
        if running_mean is None or running_var is None:
            raise ValueError(f"running_mean and running_var are required when training=False, got "
                             f"{type(running_mean).__name__} and {type(running_var).__name__}")
        # Float64 copies, (mean, var) in one array: the kernel turns the variance into invstd in place; both are
        # saved for the backward.
        stats = np.empty(2 * C)
        stats[:C] = _channel_array(running_mean, "running_mean", C)
        stats[C:] = _channel_array(running_var, "running_var", C)
    weight = _channel_param(weight, "weight", C, dt)
    bias = _channel_param(bias, "bias", C, dt)
    order = _memory_order(x)
    y = _out_array(out, "out", shape, out_dt, order, None if disjoint else {
        "input": x, "running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias})

    x3 = _memory(x, order, axis, dt)
    new_mean, new_var = (running_mean, running_var) if update else (None, None)
    if update and nan_guard:  # the kernel updates copies; only the finite channels are committed below
        new_mean, new_var = running_mean.copy(), running_var.copy()
    if training:
        stats = np.empty(2 * C)
    mean, invstd = stats[:C], stats[C:]
    if x3.size:
        y1 = _kernel_output(y, order, dt)
        direct = y1 is not None
        if not direct:
            y1 = np.empty(x3.size, dtype=dt)
        _kernels.forward(x3.reshape(-1), y1, x3.shape[0], C, new_mean, new_var, weight, bias, stats, training,
                         update, float(momentum), float(eps), thread_cap())
        if update and nan_guard:
            finite = np.isfinite(new_mean) & np.isfinite(new_var)
            np.copyto(running_mean, new_mean, where=finite)
            np.copyto(running_var, new_var, where=finite)
        if not direct:
            _copy_result(y, y1, order)
    elif training:
        mean.fill(np.nan)
        invstd.fill(np.nan)
    else:
        np.divide(1.0, np.sqrt(invstd + eps), out=invstd)
    if not return_saved:
        return y
    return y, BatchNormSaved(x3, mean, invstd, weight, training, shape, out_dt, axis, order)


def _copy_result(out, flat, order):
    """Copy a kernel's flat result (``out``'s values with its axes in ``order``) into ``out``, converting the dtype:
    float16 overflow gives inf (as in torch), and never raises late."""
    mem = out.transpose(order)
    with np.errstate(all="ignore"):
        mem[...] = flat.reshape(mem.shape)


def batch_norm_stats(x, *, axis=1, dtype=None):
    """Per-channel statistics of a batch, in float64: what data-parallel ranks combine.

    Parameters
    ----------
    x : ndarray
        Input of at least 2 dimensions, any floating dtype, layout and strides.
    axis : int
        The channel axis, as :func:`batch_norm`.
    dtype : {None, float32, float64}
        Compute dtype, as :func:`batch_norm`.

    Returns
    -------
    count : int
        Values per channel, x.size // x.shape[axis].
    mean, M2 : ndarray
        (C,) mean and sum of squared deviations from it (the biased variance is M2/count); NaN when count is 0,
        and M2 = 0 when count is 1.
    """
    x, axis = _input_array(x, axis)
    C = x.shape[axis]
    x3 = _memory(x, _memory_order(x), axis, _compute_dtype(x.dtype, dtype))
    count = x3.shape[0] * x3.shape[2]
    stats = np.full(2 * C, np.nan)
    mean, M2 = stats[:C], stats[C:]
    if count == 1:
        mean[...], M2[...] = x3[0, :, 0], 0.0
    elif count and C:
        _kernels.forward(x3.reshape(-1), None, x3.shape[0], C, None, None, None, None, stats, True, False, 0.0, 0.0,
                         thread_cap())
    return count, mean, M2


def _check_saved(saved):
    """Check that ``saved`` is a consistent BatchNormSaved as batch_norm made it (it may have been edited)."""
    if not isinstance(saved, BatchNormSaved):
        raise TypeError(f"saved must be the BatchNormSaved of a forward, got {type(saved).__name__}")
    x3 = saved.x

    def arr_ok(a, ndim, dtypes):
        return (isinstance(a, np.ndarray) and a.ndim == ndim and a.dtype in dtypes and a.flags.c_contiguous
                and a.flags.aligned)

    def show(a):
        return f"{a.dtype} array of shape {a.shape} ({_flags(a)})" if isinstance(a, np.ndarray) else type(a).__name__

    if not arr_ok(x3, 3, _COMPUTE):
        bad = "x", "an aligned C-contiguous (A, C, B) float32 or float64 array", show(x3)
    elif not _layout_matches(saved.shape, saved.axis, _saved_order(saved), x3.shape):
        bad = ("shape, axis and order", f"a shape, channel axis and memory order of which saved.x {x3.shape} is "
               f"the (A, C, B) memory", repr((saved.shape, saved.axis, saved.order)))
    elif not (isinstance(saved.dtype, (np.dtype, type)) and np.dtype(saved.dtype) in (x3.dtype, np.float16)):
        bad = "dtype", f"{x3.dtype} or float16", repr(saved.dtype)
    else:
        C = x3.shape[1]
        bad = next(((key, f"an aligned C-contiguous {np.dtype(dt)} array of shape ({C},)", show(a))
                    for key, a, dt in (("mean", saved.mean, np.float64), ("invstd", saved.invstd, np.float64),
                                       ("weight", saved.weight, x3.dtype))
                    if not (key == "weight" and a is None) and not (arr_ok(a, 1, (dt,)) and a.shape == (C,))), None)
    if bad is not None:
        raise ValueError(f"saved is not a consistent BatchNormSaved from batch_norm(..., return_saved=True): "
                         f"saved.{bad[0]} must be {bad[1]}, got {bad[2]}")


def _saved_order(saved):
    """The memory order of a saved forward's input (None stands for C order)."""
    return tuple(range(len(saved.shape))) if saved.order is None and isinstance(saved.shape, tuple) else saved.order


def _layout_matches(shape, axis, order, acb):
    """True when ``acb`` is the (A, C, B) shape of memory holding an array of ``shape`` with its axes in ``order``
    and its channels at ``axis``."""
    if not (isinstance(shape, tuple) and len(shape) >= 2 and isinstance(order, tuple)
            and sorted(order) == list(range(len(shape))) and type(axis) is int and 0 <= axis < len(shape)):
        return False
    k = order.index(axis)
    sizes = [shape[d] for d in order]
    return acb == (math.prod(sizes[:k]), shape[axis], math.prod(sizes[k + 1:]))


def _grad_output(dy, saved):
    """Validate ``saved`` and ``dy`` (a floating array of the forward input's shape) and return dy."""
    _check_saved(saved)
    dy = _float_array(dy, "grad_output")
    if dy.shape != saved.shape:
        raise ValueError(f"grad_output must have the forward input's shape {saved.shape}, got {dy.shape}")
    return dy


def batch_norm_grad_sums(dy, saved):
    """Per-channel sums that a training backward combines: what data-parallel ranks add up.

    Parameters
    ----------
    dy, saved
        As :func:`batch_norm_backward`.

    Returns
    -------
    sums : ndarray
        (2, C) float64: sum(dy) and sum(dy*(x - mean)) per channel, over this batch.
    dweight, dbias : ndarray
        (C,) this batch's gradients of weight and bias, in the compute dtype.
    """
    dy = _grad_output(dy, saved)
    x3 = saved.x
    N, C, S = x3.shape
    sums = np.zeros((2, C))
    grads = np.zeros(2 * C, dtype=x3.dtype)
    dweight, dbias = grads[:C], grads[C:]
    if x3.size:
        _kernels.backward(x3.reshape(-1), _memory(dy, _saved_order(saved), saved.axis, x3.dtype).reshape(-1), None,
                          N, C, saved.mean, saved.invstd, saved.weight, grads, saved.use_batch_stats, sums, 0.0,
                          thread_cap())
    return sums, dweight, dbias


def batch_norm_backward(dy, saved, *, out=None, grad_sums=None, count=None):
    """Gradients of :func:`batch_norm` with respect to its input, weight and bias.

    Training (batch statistics): dx = g*(dy - sum(dy)/m - xhat*sum(dy*xhat)/m) with g = weight*invstd,
    xhat = (x - mean)*invstd, m values per channel. Eval: dx = g*dy. Always dweight = sum(dy*xhat),
    dbias = sum(dy).

    Parameters
    ----------
    dy : ndarray
        Gradient of the loss with respect to the forward's output; same shape as the forward's input (any layout;
        no copy when it has the input's).
    saved : BatchNormSaved
        From ``batch_norm(..., return_saved=True)``.
    out : ndarray, optional
        Preallocated dx: shape of dy, dtype ``saved.dtype``, writeable, C-contiguous or with the forward input's
        memory layout, not overlapping dy or saved.x.
    grad_sums : ndarray, optional
        (2, C) float64 sums of :func:`batch_norm_grad_sums` over a larger batch of which this one is a part
        (data-parallel training, where the forward used that batch's statistics); they replace this batch's sums,
        and ``count`` its m.
    count : int, optional
        Values per channel of the batch that ``grad_sums`` covers; required with ``grad_sums``.

    Returns
    -------
    dx : ndarray
        Shape and memory layout of the forward's input (unless ``out``), dtype ``saved.dtype``.
    dweight, dbias : ndarray
        (C,) in the compute dtype (computed whether or not the forward had a weight), from the sums used.
    """
    dy = _grad_output(dy, saved)
    x3 = saved.x
    N, C, S = x3.shape
    dt = x3.dtype
    if grad_sums is not None or count is not None:
        grad_sums = _float_array(grad_sums, "grad_sums")
        if grad_sums.shape != (2, C):
            raise ValueError(f"grad_sums must have shape (2, {C}), got {grad_sums.shape}")
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < max(1, N * S):
            raise ValueError(f"count must be an integer >= {max(1, N * S)} (the values per channel here) with "
                             f"grad_sums, got {count!r}")
        grad_sums = _contiguous(grad_sums, np.float64)
    order = _saved_order(saved)
    dx = _out_array(out, "out", saved.shape, saved.dtype, order, {
        "grad_output": dy, "the saved input": x3, "saved.weight": saved.weight, "saved.mean": saved.mean,
        "saved.invstd": saved.invstd})
    grads = np.zeros(2 * C, dtype=dt)
    dweight, dbias = grads[:C], grads[C:]
    if x3.size:
        dx1 = _kernel_output(dx, order, dt)
        direct = dx1 is not None
        if not direct:
            dx1 = np.empty(x3.size, dtype=dt)
        _kernels.backward(x3.reshape(-1), _memory(dy, order, saved.axis, dt).reshape(-1), dx1, N, C, saved.mean,
                          saved.invstd, saved.weight, grads, saved.use_batch_stats, grad_sums, float(count or 0),
                          thread_cap())
        if not direct:
            _copy_result(dx, dx1, order)
    return dx, dweight, dbias
