"""Functional batch norm: the only place that validates and converts input, allocates outputs and calls kernels.

Semantics follow ``torch.nn.functional.batch_norm``. Inputs are (N, C, *) arrays; the kernels see them as
C-contiguous (N, C, S) arrays of the compute dtype (float32 or float64), copied only when that is needed.
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
        The input as a C-contiguous (N, C, S) array of the compute dtype (a view of the caller's array when no
        conversion was needed: modifying that array before the backward changes the gradient).
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
    """

    x: np.ndarray
    mean: np.ndarray
    invstd: np.ndarray
    weight: Optional[np.ndarray]
    use_batch_stats: bool
    shape: tuple
    dtype: np.dtype


def _float_array(a, name):
    """Return ``a`` if it is a floating ndarray, else raise TypeError naming what it is."""
    if type(a) is np.ndarray and a.dtype.kind == "f":  # the common case, checked first
        return a
    if not isinstance(a, np.ndarray) or isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{name} must be a numpy.ndarray of floating dtype, got {type(a).__name__}")
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must have a floating dtype (float16, float32 or float64), got {a.dtype}")
    return a if type(a) is np.ndarray else a.view(np.ndarray)


def _input_array(x):
    """Validate an (N, C, *) input: a floating ndarray of at least 2 dimensions."""
    x = _float_array(x, "input")
    if x.ndim < 2:
        raise ValueError(f"input must have at least 2 dimensions (N, C, *), got {x.ndim}")
    return x


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


def _out_array(out, name, shape, dt, inputs):
    """Validate ``out`` (shape, dtype, contiguous, writeable, no overlap with inputs unless they are None) or
    allocate it."""
    if out is None:
        return np.empty(shape, dtype=dt)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != shape or out.dtype != dt:
        raise ValueError(f"{name} must have shape {shape} and dtype {dt}, got shape {out.shape} and dtype {out.dtype}")
    if not _writeable_contiguous(out):
        raise ValueError(f"{name} must be a writeable, aligned, C-contiguous array, got {_flags(out)}")
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
               out=None, dtype=None, return_saved=False, nan_guard=False):
    """Batch normalisation over the channel axis 1 of an (N, C, *) array.

    y = weight*(x - mean)/sqrt(var + eps) + bias, per channel, with the batch's mean and biased variance when
    ``training`` (and, if given, the running statistics updated in place:
    r = (1 - momentum)*r + momentum*batch_stat, with the unbiased variance), else the running statistics.

    Parameters
    ----------
    x : ndarray
        Input of shape (N, C, *), any floating dtype, layout and strides. Never modified.
    running_mean, running_var : ndarray or None
        (C,) running statistics. Updated in place when ``training`` (then they must be contiguous, writeable and
        of the compute dtype); required when not ``training``.
    weight, bias : ndarray or None
        (C,) gamma and beta; None means 1 and 0.
    training : bool
        Normalise with batch statistics (True) or with the running statistics (False).
    momentum : float
        Factor of the running-statistic update, in [0, 1].
    eps : float
        Added to the variance, finite and >= 0.
    out : ndarray, optional
        Preallocated output: shape of x, the output dtype, C-contiguous, not overlapping any input.
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
        Output of the compute dtype (float16 for float16 input), shape of x.
    saved : BatchNormSaved
        Only with ``return_saved``.
    """
    x = _input_array(x)
    _check_scalars(momentum, eps)
    shape = x.shape
    N, C = shape[0], shape[1]
    S = math.prod(shape[2:])
    dt = _compute_dtype(x.dtype, dtype)
    out_dt = _output_dtype(x.dtype, dt)
    training = bool(training)
    if training and N * S == 1:
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
    y = _out_array(out, "out", shape, out_dt, None if disjoint else {
        "input": x, "running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias})

    x3 = _contiguous(x, dt).reshape(N, C, S)
    new_mean, new_var = (running_mean, running_var) if update else (None, None)
    if update and nan_guard:  # the kernel updates copies; only the finite channels are committed below
        new_mean, new_var = running_mean.copy(), running_var.copy()
    if training:
        stats = np.empty(2 * C)
    mean, invstd = stats[:C], stats[C:]
    if x3.size:
        y1 = y.view(np.ndarray).reshape(-1) if out_dt == dt else np.empty(x3.size, dtype=dt)
        _kernels.forward(x3.reshape(-1), y1, N, C, new_mean, new_var, weight, bias, stats, training, update,
                         float(momentum), float(eps), thread_cap())
        if update and nan_guard:
            finite = np.isfinite(new_mean) & np.isfinite(new_var)
            np.copyto(running_mean, new_mean, where=finite)
            np.copyto(running_var, new_var, where=finite)
        if out_dt != dt:
            with np.errstate(all="ignore"):  # float16 overflow gives inf, like torch, and never raises late
                y[...] = y1.reshape(shape)
    elif training:
        mean.fill(np.nan)
        invstd.fill(np.nan)
    else:
        np.divide(1.0, np.sqrt(invstd + eps), out=invstd)
    if not return_saved:
        return y
    return y, BatchNormSaved(x3, mean, invstd, weight, training, shape, out_dt)


def batch_norm_stats(x, *, dtype=None):
    """Per-channel statistics of an (N, C, *) batch, in float64: what data-parallel ranks combine.

    Parameters
    ----------
    x : ndarray
        Input of shape (N, C, *), any floating dtype, layout and strides.
    dtype : {None, float32, float64}
        Compute dtype, as :func:`batch_norm`.

    Returns
    -------
    count : int
        Values per channel, N*prod(shape[2:]).
    mean, M2 : ndarray
        (C,) mean and sum of squared deviations from it (the biased variance is M2/count); NaN when count is 0,
        and M2 = 0 when count is 1.
    """
    x = _input_array(x)
    N, C, S = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    count = N * S
    x3 = _contiguous(x, _compute_dtype(x.dtype, dtype)).reshape(N, C, S)
    stats = np.full(2 * C, np.nan)
    mean, M2 = stats[:C], stats[C:]
    if count == 1:
        mean[...], M2[...] = x3[0, :, 0], 0.0
    elif count and C:
        _kernels.forward(x3.reshape(-1), None, N, C, None, None, None, None, stats, True, False, 0.0, 0.0,
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
        bad = "x", "an aligned C-contiguous (N, C, S) float32 or float64 array", show(x3)
    elif not (isinstance(saved.shape, tuple) and len(saved.shape) >= 2 and saved.shape[:2] == x3.shape[:2]
              and math.prod(saved.shape) == x3.size):
        bad = "shape", f"the forward input's shape (N, C, ...) of {x3.size} values with N, C = {x3.shape[:2]}", \
            repr(saved.shape)
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
        _kernels.backward(x3.reshape(-1), _contiguous(dy, x3.dtype).reshape(-1), None, N, C, saved.mean,
                          saved.invstd, saved.weight, grads, saved.use_batch_stats, sums, 0.0, thread_cap())
    return sums, dweight, dbias


def batch_norm_backward(dy, saved, *, out=None, grad_sums=None, count=None):
    """Gradients of :func:`batch_norm` with respect to its input, weight and bias.

    Training (batch statistics): dx = g*(dy - sum(dy)/m - xhat*sum(dy*xhat)/m) with g = weight*invstd,
    xhat = (x - mean)*invstd, m = N*S values per channel. Eval: dx = g*dy. Always dweight = sum(dy*xhat),
    dbias = sum(dy).

    Parameters
    ----------
    dy : ndarray
        Gradient of the loss with respect to the forward's output; same shape as the forward's input.
    saved : BatchNormSaved
        From ``batch_norm(..., return_saved=True)``.
    out : ndarray, optional
        Preallocated dx: shape of dy, dtype ``saved.dtype``, C-contiguous, not overlapping dy or saved.x.
    grad_sums : ndarray, optional
        (2, C) float64 sums of :func:`batch_norm_grad_sums` over a larger batch of which this one is a part
        (data-parallel training, where the forward used that batch's statistics); they replace this batch's sums,
        and ``count`` its m.
    count : int, optional
        Values per channel of the batch that ``grad_sums`` covers; required with ``grad_sums``.

    Returns
    -------
    dx : ndarray
        Shape of the forward's input, dtype ``saved.dtype``.
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
    dx = _out_array(out, "out", saved.shape, saved.dtype, {"grad_output": dy, "the saved input": x3,
                                                           "saved.weight": saved.weight, "saved.mean": saved.mean,
                                                           "saved.invstd": saved.invstd})
    grads = np.zeros(2 * C, dtype=dt)
    dweight, dbias = grads[:C], grads[C:]
    if x3.size:
        dy1 = _contiguous(dy, dt).reshape(-1)
        dx1 = dx.view(np.ndarray).reshape(-1) if saved.dtype == dt else np.empty(x3.size, dtype=dt)
        _kernels.backward(x3.reshape(-1), dy1, dx1, N, C, saved.mean, saved.invstd, saved.weight, grads,
                          saved.use_batch_stats, grad_sums, float(count or 0), thread_cap())
        if saved.dtype != dt:
            with np.errstate(all="ignore"):
                dx[...] = dx1.reshape(saved.shape)
    return dx, dweight, dbias
