"""Argument checks of cbn's functional API, layers and SyncBatchNorm: each check written once, each argument checked
once per call.

The public functions of :mod:`cbn.functional` and the layers check their arguments here and pass on what these
checks return (an :class:`Input`, arrays as they were or converted); the computations of :mod:`cbn.functional` then
trust them. Every check raises a TypeError or ValueError that names the expected and the actual value, before any
state changes.
"""
from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Mapping
from typing import Any, NamedTuple, TypeGuard, cast

import numpy as np
import numpy.typing as npt

from ._typing import FloatArray, Shape

COMPUTE = (np.dtype(np.float32), np.dtype(np.float64))  # the dtypes the kernels compute in


class BatchNormSaved(NamedTuple):
    """What a forward keeps for its backward (public name: ``cbn.functional.BatchNormSaved``).

    Its fields, by name or in this order:

    Parameters
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
        The dtype of the forward's output, and of dx.
    axis : int
        The channel axis of ``shape`` (>= 0).
    order : tuple or None
        The axes of ``shape`` in memory order (None: C order): ``x`` is the input transposed to ``order``, as an
        (A, C, B) array.
    y : ndarray or None
        After a forward with ReLU: its output in the compute dtype, laid out as ``x`` (a view of the returned output
        when that has the compute dtype and the input's layout; the backward's mask when there is no ``gate``).
    residual : bool
        True when the forward added a residual (the backward then returns its gradient too).
    renorm : ndarray or None
        After a batch-renormalization forward: (2, C) float64, the r and d it used (then ``weight`` is weight*r and
        ``invstd`` the batch's 1/sigma_B: the backward is the batch-statistics one, and dweight = r*sum(dy*xhat) +
        d*sum(dy)).
    valid : ndarray or None
        After a forward with batch statistics over a mask: (A*B,) intp, 1 at the positions (the (A, B) of ``x``)
        the statistics counted, else 0 (the backward's correction applies there only).
    gate : ndarray or None
        After a forward with ReLU and no residual: (2, C) float64, the scale and shift of its affine map (y =
        max(0, (x - mean)*scale + shift)), from which the backward recomputes where the ReLU let a value through
        (it then reads ``x``, not ``y``; without ``gate`` it reads ``y``).
    """

    x: FloatArray
    mean: FloatArray
    invstd: FloatArray
    weight: FloatArray | None
    use_batch_stats: bool
    shape: Shape
    dtype: np.dtype[Any]
    axis: int = 1
    order: Shape | None = None
    y: FloatArray | None = None
    residual: bool = False
    renorm: FloatArray | None = None
    valid: npt.NDArray[np.intp] | None = None
    gate: FloatArray | None = None


class GhostSaved(NamedTuple):
    """What a ghost-batch forward (``virtual_batch_size``) keeps for its backward.

    Public name: ``cbn.functional.GhostSaved``. The groups along axis 0, each normalised on its own; its fields, by
    name or in this order:

    Parameters
    ----------
    bounds : tuple of (int, int)
        (start, stop) of each group along axis 0, consecutive from 0 to shape[0].
    parts : tuple of BatchNormSaved
        The saved forward of each group (its input a view of the caller's array when no conversion was needed).
    shape : tuple
        Shape of the forward's input.
    dtype : numpy.dtype
        The dtype of the forward's output, and of dx.
    order : tuple
        The axes of ``shape`` in memory order of the forward's input (the layout of dx).
    residual : bool
        True when the forward added a residual.
    """

    bounds: tuple[tuple[int, int], ...]
    parts: tuple[BatchNormSaved, ...]
    shape: Shape
    dtype: np.dtype[Any]
    order: Shape
    residual: bool = False


class Input(NamedTuple):
    """A checked input: what :func:`input_array` returns and the computations take.

    Attributes
    ----------
    x : ndarray
        The caller's array (an ndarray view of a subclass), floating, of at least 2 dimensions.
    axis : int
        The channel axis, in [0, x.ndim).
    order : tuple
        x's axes in memory order when its memory is dense, else C order (the order of the copy the kernels get).
    dtype : numpy.dtype
        The compute dtype (float32 or float64).
    out_dtype : numpy.dtype
        The output's dtype: float16 for float16 input, else the compute dtype.
    """

    x: FloatArray
    axis: int
    order: Shape
    dtype: np.dtype[Any]
    out_dtype: np.dtype[Any]


class Plan(NamedTuple):
    """What the checks work out from an input's signature (shape, strides, dtype, channel axis and compute dtype):
    the kernels' view of its memory. A repeated call whose input :meth:`fits` it reuses it without the checks.

    Attributes
    ----------
    shape, strides, in_dtype
        The input's signature.
    axis, order, dtype, out_dtype
        As :class:`Input`.
    acb : tuple
        (A, C, B): the kernels' view of the memory, A and B the products of the sizes before and after the channel
        axis in memory order.
    mem_shape : tuple
        The shape in memory order (of an output laid out as the input).
    back : tuple or None
        The transpose from memory order back to the input's axes (None: C order).
    direct : bool
        The input's memory is the kernels' array as it is (dense, aligned, the compute dtype): no copy.
    rows : int
        Values per channel and sample: the product of the sizes but the channel axis's and the first other axis's
        (the same for every memory layout of the array, and for the array with its channel axis moved).
    """

    shape: Shape
    strides: Shape | None
    in_dtype: np.dtype[Any] | None
    axis: int
    order: Shape
    dtype: np.dtype[Any]
    out_dtype: np.dtype[Any]
    acb: tuple[int, int, int]
    mem_shape: Shape
    back: Shape | None
    direct: bool
    rows: int

    def fits(self, x: FloatArray) -> bool:
        """True when ``x`` is an aligned ndarray of this plan's shape, strides and dtype (the dtype object itself:
        an equal dtype of another object, a rare thing, makes a call take the checks)."""
        return (type(x) is np.ndarray and x.dtype is self.in_dtype and x.shape == self.shape
                and x.strides == self.strides and x.flags.aligned)

    def writes(self, out: object) -> TypeGuard[FloatArray]:
        """True when ``out`` is an output the kernels write as it is (of a direct plan): an aligned, writeable
        ndarray of this plan's shape and strides in the compute dtype (the dtype object itself)."""
        return (self.direct and type(out) is np.ndarray and out.dtype is self.dtype and out.shape == self.shape
                and out.strides == self.strides and out.flags.writeable and out.flags.aligned)

    def fits_out(self, out: object, *inputs: FloatArray | None) -> bool:
        """True when the kernels write ``out`` as it is (:meth:`writes`) and it owns its memory (so it overlaps no
        other array that owns its own) and shares none with ``inputs`` (None skipped)."""
        return (self.writes(out) and out.base is None
                and not any(a is not None and np.may_share_memory(out, a) for a in inputs))


def plan(inp: Input) -> Plan:
    """The :class:`Plan` of a checked :class:`Input`."""
    x, order = inp.x, inp.order
    c_order = order == tuple(range(x.ndim))
    direct = (x.dtype == inp.dtype and x.flags.aligned
              and (x.flags.c_contiguous if c_order else x.transpose(order).flags.c_contiguous))
    return _plan(x.shape, x.strides, x.dtype, inp.axis, order, inp.dtype, inp.out_dtype, direct)


def saved_plan(saved: BatchNormSaved) -> Plan:
    """The :class:`Plan` of a saved forward's input (which no array fits: its strides are not known)."""
    return _plan(saved.shape, None, None, saved.axis, saved_order(saved), saved.x.dtype, np.dtype(saved.dtype), False)


@functools.lru_cache(maxsize=256)  # a repeated call's plan (its arguments are the input's signature)
def _plan(shape: Shape, strides: Shape | None, in_dtype: np.dtype[Any] | None, axis: int, order: Shape,
          dtype: np.dtype[Any], out_dtype: np.dtype[Any], direct: bool) -> Plan:
    k = order.index(axis)
    mem_shape = tuple(shape[d] for d in order)
    back = None if order == tuple(range(len(shape))) else tuple(sorted(range(len(shape)), key=order.__getitem__))
    acb = (math.prod(mem_shape[:k]), shape[axis], math.prod(mem_shape[k + 1:]))
    sample = 1 if axis == 0 else 0  # the first axis that is not the channel's
    rows = math.prod(size for d, size in enumerate(shape) if d not in (sample, axis))
    return Plan(shape, strides, in_dtype, axis, order, dtype, out_dtype, acb, mem_shape, back, direct, rows)


def is_integer(v: object) -> TypeGuard[int]:
    """True for an integer that is not a bool."""
    return type(v) is int or (not isinstance(v, bool) and isinstance(v, numbers.Integral))


def integer(value: object, name: str, minimum: int, why: str = "") -> int:
    """``value`` as an int when it is an integer >= ``minimum``, else ValueError (``why`` follows the bound)."""
    if not is_integer(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{why}, got {value!r}")
    return int(value)


def compute_dtype(dtype: npt.DTypeLike) -> np.dtype[Any]:
    """``dtype`` as a numpy.dtype when it is float32 or float64, else TypeError."""
    dtype = np.dtype(dtype)
    if dtype not in COMPUTE:
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


def _is_real(v: object) -> TypeGuard[float]:
    """True for a real number that is not a bool."""
    return type(v) is float or type(v) is int or (not isinstance(v, bool) and isinstance(v, numbers.Real))


def scalars(momentum: float, eps: float) -> None:
    """eps must be finite and >= 0; momentum a number in [0, 1]."""
    if not (_is_real(eps) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if not (_is_real(momentum) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")


def count_per_channel(count: float, got: str) -> None:
    """A training batch needs more than 1 value per channel (``got`` says what the caller had)."""
    if count == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {got}")


def float_array(a: object, name: str) -> FloatArray:
    """Return ``a`` if it is a floating ndarray (a subclass as an ndarray view), else raise TypeError naming what it
    is."""
    if type(a) is np.ndarray and a.dtype.kind == "f":  # the common case, checked first
        return a
    if not isinstance(a, np.ndarray) or isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{name} must be a numpy.ndarray of floating dtype, got {type(a).__name__}")
    if a.dtype.kind != "f":
        raise TypeError(f"{name} must have a floating dtype (float16, float32 or float64), got {a.dtype}")
    return a if type(a) is np.ndarray else a.view(np.ndarray)


def channel_axis(axis: object, ndim: int) -> int:
    """``axis`` as an index in [0, ndim): an integer in [-ndim, ndim), else TypeError or ValueError."""
    if not is_integer(axis):
        raise TypeError(f"axis must be an integer, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis must be in [{-ndim}, {ndim}) for {ndim}-D input, got {axis}")
    return int(axis) % ndim


def memory_order(a: FloatArray) -> Shape:
    """The order of the axes in ``a``'s memory when it is dense (a transposed C-contiguous array: axes from the
    largest stride to the smallest), else C order (the order of the copy the kernels get)."""
    c_order = tuple(range(a.ndim))
    if a.flags.c_contiguous:
        return c_order
    order = tuple(sorted(c_order, key=lambda d: -a.strides[d]))
    return order if a.transpose(order).flags.c_contiguous else c_order


def input_array(x: object, axis: int, dtype: npt.DTypeLike | None = None, ranks: tuple[int, ...] | None = None,
                channels: int | None = None) -> Input:
    """Check an input and its channel axis; return it as an :class:`Input`.

    Parameters
    ----------
    x : ndarray
        A floating array of at least 2 dimensions (of one of ``ranks`` when given).
    axis : int
        Its channel axis, in [-x.ndim, x.ndim).
    dtype : {None, float32, float64}
        The compute dtype; None: float64 for float64 (and wider) input, float32 otherwise.
    ranks : tuple of int, optional
        The numbers of dimensions a layer accepts.
    channels : int, optional
        The number of channels a layer has: x.shape[axis] must be it.
    """
    x = float_array(x, "input")
    if ranks is None and x.ndim < 2:
        raise ValueError(f"input must have at least 2 dimensions (N, C, *), got {x.ndim}")
    if ranks is not None and x.ndim not in ranks:
        want = " or ".join(f"{d}D" for d in ranks)
        raise ValueError(f"expected {want} input, got {x.ndim}D input")
    k = channel_axis(axis, x.ndim)
    if channels is not None and x.shape[k] != channels:
        raise ValueError(f"expected input with {channels} channels at axis {axis}, got {x.shape[k]}")
    if dtype is not None:
        dt = compute_dtype(dtype)
    else:
        dt = COMPUTE[0] if x.dtype.itemsize <= 4 else COMPUTE[1]
    return Input(x, k, memory_order(x), dt, np.dtype(np.float16) if x.dtype.itemsize == 2 else dt)


def activation(value: str | None) -> str | None:
    """Check a fused activation: None or "relu"."""
    if not (value is None or (isinstance(value, str) and value == "relu")):
        raise ValueError(f"activation must be None or 'relu', got {value!r}")
    return value


def virtual_batch_size(value: int | None) -> int | None:
    """Check a ghost-batch size: None or an integer >= 1."""
    return None if value is None else integer(value, "virtual_batch_size", 1)


def virtual_batches(size: int | None, inp: Input, training: bool) -> tuple[tuple[int, int], ...] | None:
    """The (start, stop) groups of a ghost-batch forward along axis 0, or None when the call has one group (no
    ``size``, not ``training``, an empty batch or one of at most ``size`` samples). Raise when ``size`` is given and
    axis 0 is the channel axis, or when a group would have a single value per channel."""
    if size is None:
        return None
    if inp.axis == 0:
        raise ValueError(f"virtual_batch_size splits the batch axis 0, which must not be the channel axis: expected "
                         f"a channel axis other than 0 for {inp.x.ndim}-D input, got axis 0")
    N = inp.x.shape[0]
    if not training or N <= size or inp.x.size == 0:
        return None
    last = N - size * ((N - 1) // size)
    per_sample = inp.x.size // (N * inp.x.shape[inp.axis])
    count_per_channel(last * per_sample, f"{last * per_sample} in the last virtual batch ({last} of {N} samples, "
                                         f"virtual_batch_size={size})")
    return tuple((start, min(start + size, N)) for start in range(0, N, size))


def renorm(enabled: bool, clipping: Mapping[str, float] | None,
           virtual_batch_size: int | None) -> tuple[float, float] | None:
    """Check the batch-renormalization options: ``enabled`` a bool, ``clipping`` None (no clipping, as Keras) or a
    dict with keys among "rmax" (>= 1) and "dmax" (>= 0), a missing one infinite, given only with ``enabled``, and no
    virtual batches with it. Return None when off, else (rmax, dmax) as floats."""
    if enabled is False and clipping is None:  # the default, checked first
        return None
    if not isinstance(enabled, (bool, np.bool_)):
        raise TypeError(f"renorm must be True or False, got {enabled!r}")
    if clipping is not None and not isinstance(clipping, Mapping):
        raise TypeError(f"renorm_clipping must be None or a dict with keys 'rmax' and 'dmax', got "
                        f"{type(clipping).__name__}")
    clipping = {} if clipping is None else clipping
    unknown = [key for key in clipping if key not in ("rmax", "dmax")]
    if unknown:
        raise ValueError(f"renorm_clipping keys must be among 'rmax' and 'dmax', got {unknown[0]!r}")
    rmax, dmax = clipping.get("rmax", math.inf), clipping.get("dmax", math.inf)
    if not (_is_real(rmax) and rmax >= 1):
        raise ValueError(f"renorm_clipping['rmax'] must be a number >= 1, got {rmax!r}")
    if not (_is_real(dmax) and dmax >= 0):
        raise ValueError(f"renorm_clipping['dmax'] must be a number >= 0, got {dmax!r}")
    if not enabled:
        if clipping:
            raise ValueError(f"renorm_clipping applies only with renorm=True: expected None with renorm=False, got "
                             f"{dict(clipping)!r}")
        return None
    if virtual_batch_size is not None:
        raise ValueError(f"renorm does not combine with ghost batches: expected virtual_batch_size=None with "
                         f"renorm=True, got {virtual_batch_size!r}")
    return float(rmax), float(dmax)


def residual(z: object, inp: Input) -> FloatArray | None:
    """Check a residual added before the activation: None, or a floating ndarray of the input's shape."""
    if z is None:
        return None
    z = float_array(z, "residual")
    if z.shape != inp.x.shape:
        raise ValueError(f"residual must have shape {inp.x.shape} (the input's), got {z.shape}")
    return z


def mask(m: npt.NDArray[np.bool_] | None, inp: Input) -> npt.NDArray[np.bool_] | None:
    """Check a statistics mask: None, or a bool ndarray that broadcasts to the input's shape without its channel
    axis; return it broadcast to that shape (a view), or None."""
    if m is None:
        return None
    if not isinstance(m, np.ndarray) or m.dtype != np.bool_:
        got = f"dtype {m.dtype}" if isinstance(m, np.ndarray) else type(m).__name__
        raise TypeError(f"mask must be a numpy.ndarray of dtype bool, got {got}")
    shape = inp.x.shape[:inp.axis] + inp.x.shape[inp.axis + 1:]
    if m.shape == shape:
        return m
    try:
        return np.broadcast_to(m, shape)
    except ValueError:
        raise ValueError(f"mask must have shape {shape} (the input's without its channel axis {inp.axis}) or "
                         f"broadcast to it, got {m.shape}") from None


def valid_count(n: float | np.integer[Any], got: str) -> None:
    """A training batch with a mask needs more than 1 valid position (``got`` says where)."""
    if n < 2:
        raise ValueError(f"Expected more than 1 valid value per channel when training with a mask, got {n}{got}")


def representable(a: npt.NDArray[Any], dtype: npt.DTypeLike, name: str, note: str = "") -> FloatArray:
    """``a`` cast to ``dtype``; ValueError naming the first finite value that the cast overflows (``note`` follows
    the dtype in the message)."""
    with np.errstate(all="ignore"):
        cast = a.astype(dtype)
    lost = np.flatnonzero(np.isfinite(a) & ~np.isfinite(cast))
    if lost.size:
        where = "index" if a.ndim == 1 else "flat index"
        raise ValueError(f"{name} must be representable in {np.dtype(dtype)}{note}, got {a.flat[lost[0]]} at {where} "
                         f"{lost[0]}")
    return cast


def channel_array(a: object, name: str, C: int) -> FloatArray:
    """Check that ``a`` is a floating ndarray of shape (C,) and return it."""
    a = float_array(a, name)
    if a.shape != (C,):
        raise ValueError(f"{name} must have shape ({C},) to match the input's {C} channels, got {a.shape}")
    return a


def channel_param(a: object, name: str, C: int, dt: npt.DTypeLike) -> FloatArray | None:
    """Check an optional (C,) parameter and return it as a contiguous array of dtype dt (or None)."""
    return None if a is None else contiguous(channel_array(a, name, C), dt)


def contiguous(a: npt.ArrayLike, dt: npt.DTypeLike) -> FloatArray:
    """``a`` as an aligned C-contiguous array of dtype dt (a copy only when needed)."""
    a = np.ascontiguousarray(a, dtype=dt)
    return a if a.flags.aligned else a.copy()


def flags(a: npt.NDArray[Any]) -> str:
    """The memory flags that the kernels need, as the error messages show them."""
    return f"writeable={a.flags.writeable}, aligned={a.flags.aligned}, C-contiguous={a.flags.c_contiguous}"


def running_stat(a: object, name: str, C: int, dt: np.dtype[Any]) -> FloatArray:
    """Check a running statistic that is updated in place: (C,), dtype dt, contiguous, writeable."""
    a = channel_array(a, name, C)
    if a.dtype != dt:
        raise TypeError(f"{name} must have the compute dtype {dt} to be updated in place, got {a.dtype}")
    f = a.flags
    if not (f.c_contiguous and f.writeable and f.aligned):
        raise ValueError(f"{name} must be a writeable, aligned, contiguous array to be updated in place, got "
                         f"{flags(a)}")
    return a


def out_array(out: object, name: str, shape: Shape, dt: np.dtype[Any], order: Shape,
              inputs: Mapping[str, npt.NDArray[Any] | None] | None) -> FloatArray | None:
    """Check ``out`` (None, or shape, dtype, writeable, aligned, C-contiguous or laid out in ``order``, no overlap
    with ``inputs`` unless that is None) and return it."""
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(out).__name__}")
    if out.shape != shape or out.dtype != dt:
        raise ValueError(f"{name} must have shape {shape} and dtype {dt}, got shape {out.shape} and dtype {out.dtype}")
    if not (out.flags.writeable and out.flags.aligned):
        raise ValueError(f"{name} must be a writeable, aligned array, got {flags(out)}")
    if not (out.flags.c_contiguous or out.transpose(order).flags.c_contiguous):
        raise ValueError(f"{name} must be C-contiguous or laid out as the input (axes in memory order {order}), "
                         f"got strides {out.strides}")
    if inputs is not None:
        no_overlap(name, out, inputs)
    return out


def _owns_memory(a: npt.NDArray[Any]) -> bool:
    """True when ``a`` is the sole owner of its buffer (then no other array object overlaps it)."""
    return a.base is None and a.flags.owndata


def distinct_owners(*arrays: object) -> bool:
    """True when the arrays (None skipped) are distinct ndarrays that each own their buffer: then none overlaps
    another, and the pairwise checks can be skipped."""
    ids = set()
    for a in arrays:
        if a is not None:
            if type(a) is not np.ndarray or not _owns_memory(a) or id(a) in ids:
                return False
            ids.add(id(a))
    return True


def stats_apart(x: FloatArray, running_mean: FloatArray, running_var: FloatArray, weight: FloatArray | None,
                bias: FloatArray | None) -> None:
    """Raise ValueError if a running statistic, updated in place, may share memory with another argument."""
    no_overlap("running_mean", running_mean, {"input": x, "running_var": running_var, "weight": weight, "bias": bias})
    no_overlap("running_var", running_var, {"input": x, "weight": weight, "bias": bias})


def fits_channel(a: object, C: int, dt: np.dtype[Any], writeable: bool = False) -> bool:
    """True when ``a`` is an aligned C-contiguous (C,) ndarray of dtype ``dt`` (the dtype object itself), and
    writeable when asked: a per-channel array the kernels take as it is."""
    if type(a) is not np.ndarray or a.dtype is not dt or a.shape != (C,):
        return False
    f = a.flags
    return f.c_contiguous and f.aligned and (f.writeable or not writeable)


def no_overlap(name: str, a: npt.NDArray[Any], others: Mapping[str, npt.NDArray[Any] | None]) -> None:
    """Raise ValueError if ``a`` may share memory with one of ``others`` ({name: array or None})."""
    a_owns = _owns_memory(a)
    for other, b in others.items():
        if b is None or (a_owns and b is not a and type(b) is np.ndarray and _owns_memory(b)):
            continue
        if np.may_share_memory(a, b):
            raise ValueError(f"{name} must not share memory with another argument, got memory shared with {other}")


def saved_order(saved: BatchNormSaved | GhostSaved) -> Shape:
    """The memory order of a saved forward's input (None stands for C order)."""
    return tuple(range(len(saved.shape))) if saved.order is None and isinstance(saved.shape, tuple) else saved.order


def _layout_matches(shape: Shape, axis: int, order: Shape, acb: Shape) -> bool:
    """True when ``acb`` is the (A, C, B) shape of memory holding an array of ``shape`` with its axes in ``order``
    and its channels at ``axis``."""
    if not (isinstance(shape, tuple) and len(shape) >= 2 and isinstance(order, tuple)
            and sorted(order) == list(range(len(shape))) and type(axis) is int and 0 <= axis < len(shape)):
        return False
    k = order.index(axis)
    sizes = [shape[d] for d in order]
    return acb == (math.prod(sizes[:k]), shape[axis], math.prod(sizes[k + 1:]))


def _arr_ok(a: object, ndim: int, dtypes: tuple[object, ...]) -> TypeGuard[npt.NDArray[Any]]:
    """True for an aligned C-contiguous ndarray of ``ndim`` dimensions and one of ``dtypes`` (:func:`_saved`)."""
    return (isinstance(a, np.ndarray) and a.ndim == ndim and a.dtype in dtypes and (f := a.flags).c_contiguous
            and f.aligned)


def _show(a: object) -> str:
    """What an argument of :func:`_saved` is, for its error message."""
    return f"{a.dtype} array of shape {a.shape} ({flags(a)})" if isinstance(a, np.ndarray) else type(a).__name__


def _saved(saved: object) -> None:
    """Check that ``saved`` is a consistent BatchNormSaved as a forward made it (it may have been edited)."""
    if not isinstance(saved, BatchNormSaved):
        raise TypeError(f"saved must be the BatchNormSaved of a forward, got {type(saved).__name__}")
    x3 = saved.x
    if not _arr_ok(x3, 3, COMPUTE):
        bad: tuple[str, str, str] | None = "x", "an aligned C-contiguous (A, C, B) float32 or float64 array", _show(x3)
    elif not _layout_matches(saved.shape, saved.axis, saved_order(saved), x3.shape):
        bad = ("shape, axis and order", f"a shape, channel axis and memory order of which saved.x {x3.shape} is "
               f"the (A, C, B) memory", repr((saved.shape, saved.axis, saved.order)))
    elif not (isinstance(saved.dtype, (np.dtype, type)) and np.dtype(saved.dtype) in (x3.dtype, np.float16)):
        bad = "dtype", f"{x3.dtype} or float16", repr(saved.dtype)
    else:
        C = x3.shape[1]
        bad = next(((key, f"an aligned C-contiguous {np.dtype(dt)} array of shape ({C},)", _show(a))
                    for key, a, dt in (("mean", saved.mean, np.float64), ("invstd", saved.invstd, np.float64),
                                       ("weight", saved.weight, x3.dtype))
                    if not (key == "weight" and a is None) and not (_arr_ok(a, 1, (dt,)) and a.shape == (C,))), None)
        if bad is None and saved.y is not None and not (_arr_ok(saved.y, 3, (x3.dtype,)) and saved.y.shape == x3.shape):
            bad = "y", f"None or an aligned C-contiguous {x3.dtype} array of shape {x3.shape}", _show(saved.y)
        if bad is None and saved.renorm is not None and not (_arr_ok(saved.renorm, 2, (np.dtype(np.float64),))
                                                             and saved.renorm.shape == (2, C)):
            bad = "renorm", f"None or an aligned C-contiguous float64 array of shape (2, {C})", _show(saved.renorm)
        positions = (x3.shape[0] * x3.shape[2],)
        if bad is None and saved.valid is not None and not (_arr_ok(saved.valid, 1, (np.dtype(np.intp),))
                                                            and saved.valid.shape == positions):
            bad = "valid", f"None or an aligned C-contiguous intp array of shape {positions}", _show(saved.valid)
        if bad is None and saved.gate is not None and (saved.residual or not (
                _arr_ok(saved.gate, 2, (np.dtype(np.float64),)) and saved.gate.shape == (2, C))):
            bad = ("gate", f"None, or without a residual an aligned C-contiguous float64 array of shape (2, {C})",
                   _show(saved.gate))
    if bad is not None:
        raise ValueError(f"saved is not a consistent BatchNormSaved from batch_norm(..., return_saved=True): "
                         f"saved.{bad[0]} must be {bad[1]}, got {bad[2]}")


def _ghost_saved(saved: GhostSaved) -> None:
    """Check that ``saved`` is a consistent GhostSaved (consecutive groups covering axis 0, each a consistent
    BatchNormSaved of its part of the input)."""
    ok = (isinstance(saved.bounds, tuple) and isinstance(saved.parts, tuple) and isinstance(saved.shape, tuple)
          and len(saved.bounds) == len(saved.parts) > 0 and len(saved.shape) >= 2)
    stop = 0
    for bound, part in zip(saved.bounds, saved.parts) if ok else ():
        _saved(part)
        ok = ok and (isinstance(bound, tuple) and len(bound) == 2 and bound[0] == stop and bound[1] > stop
                     and part.shape == (bound[1] - stop,) + saved.shape[1:] and np.dtype(part.dtype) == saved.dtype)
        stop = bound[1] if ok else stop
    if not (ok and stop == saved.shape[0]):
        raise ValueError(f"saved is not a consistent GhostSaved from batch_norm(..., virtual_batch_size=...): "
                         f"expected consecutive groups covering the {saved.shape!r} input, got bounds "
                         f"{saved.bounds!r}")


def grad_output(dy: object, saved: BatchNormSaved | GhostSaved, ghost: bool = True) -> FloatArray:
    """Check ``saved`` (a BatchNormSaved, or with ``ghost`` a GhostSaved too) and ``dy`` (a floating array of the
    forward input's shape); return dy."""
    _ghost_saved(saved) if ghost and isinstance(saved, GhostSaved) else _saved(saved)
    dy = float_array(dy, "grad_output")
    if dy.shape != saved.shape:
        raise ValueError(f"grad_output must have the forward input's shape {saved.shape}, got {dy.shape}")
    return dy


def grad_out(out: object, dy: FloatArray, saved: BatchNormSaved | GhostSaved) -> FloatArray | None:
    """Check the ``out`` of a backward (as :func:`out_array`, not overlapping dy or what ``saved`` holds)."""
    out = out_array(out, "out", saved.shape, saved.dtype, saved_order(saved), {"grad_output": dy})
    parts = saved.parts if isinstance(saved, GhostSaved) else (saved,)
    for part in parts if out is not None else ():
        no_overlap("out", cast(FloatArray, out), {"the saved input": part.x, "saved.weight": part.weight,
                                                  "saved.mean": part.mean, "saved.invstd": part.invstd,
                                                  "the saved output": part.y})
    return out


def no_grad_sums(sums: object, count: object) -> None:
    """A ghost-batch backward takes no sums of a larger batch (its groups are normalised on their own)."""
    if sums is not None or count is not None:
        raise ValueError(f"grad_sums and count must be None after a forward with virtual batches (each group is "
                         f"differentiated on its own), got grad_sums {type(sums).__name__} and count {count!r}")


def grad_sums(sums: object, count: object, C: int, m: int) -> tuple[FloatArray, int] | tuple[None, None]:
    """Check the (2, C) sums and the count of a larger batch of which m values per channel are here; return the
    sums as contiguous float64 and the count (None, None when neither is given)."""
    if sums is None and count is None:
        return None, None
    sums = float_array(sums, "grad_sums")
    if sums.shape != (2, C):
        raise ValueError(f"grad_sums must have shape (2, {C}), got {sums.shape}")
    count = integer(count, "count", max(1, m), " (the values per channel here) with grad_sums")
    return contiguous(sums, np.float64), count
