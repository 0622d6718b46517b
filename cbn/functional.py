"""Functional batch norm: validates and converts input (through :mod:`cbn._validate`), allocates outputs and calls
the kernels.

Semantics follow ``torch.nn.functional.batch_norm``, with the channel axis free (``axis``, default 1). The kernels
see an input as its memory: a C-contiguous (A, C, B) array of the compute dtype (float32 or float64), A and B the
products of the sizes before and after the channel axis in memory order. That is a view, with no copy, of any
array whose memory is dense in some axis order (C-contiguous with any channel axis, channels-last NHWC memory viewed
as NCHW, Fortran order); other arrays are copied once, in C order. Outputs have the memory layout of what the
kernels see.

Two tiers. The ``batch_norm*`` functions check every argument (with :mod:`cbn._validate`) and call the second
tier: :func:`forward` (which takes a checked input and mask and checks the rest: the layers check their input
themselves, with their ranks and channel count), and :func:`positions`, :func:`normalize`, :func:`renormalize`,
:func:`statistics`, :func:`merge_statistics`, :func:`update_running_stats`, :func:`running_update`,
:func:`gradient_sums` and :func:`gradient_input`, which take checked arguments (an :class:`cbn._validate.Input`,
arrays as the checks returned them) and check nothing. The layers and SyncBatchNorm
check with :mod:`cbn._validate` and call the second tier, so that each argument is checked once per call. The
second tier is not part of the public API.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, cast, overload

import numpy as np
import numpy.typing as npt

from . import _validate as V
from ._dispatch import kernels as _kernels
from ._threads import thread_cap
from ._typing import BoolArray, FloatArray, Positions, Shape
from ._validate import BatchNormSaved, GhostSaved

# The kernels' flags as plain ints (enum arithmetic would cost more than the call).
_BATCH, _UPDATE, _RELU = (int(f) for f in (_kernels.ForwardFlag.FWD_BATCH, _kernels.ForwardFlag.FWD_UPDATE,
                                           _kernels.ForwardFlag.FWD_RELU))
_BWD_BATCH, _BWD_RELU = int(_kernels.BackwardFlag.BWD_BATCH), int(_kernels.BackwardFlag.BWD_RELU)

__all__ = ["BatchNormSaved", "GhostSaved", "batch_norm", "batch_norm_backward", "batch_norm_elemt",
           "batch_norm_grad_sums", "batch_norm_stats"]


def _memory(a: FloatArray, order: Shape, axis: int, dt: np.dtype[Any]) -> FloatArray:
    """``a`` transposed to ``order`` as an aligned C-contiguous (A, C, B) array of dtype dt, C = a.shape[axis]:
    a view when a's memory is dense in that order, else a copy."""
    mem = V.contiguous(a if order == tuple(range(a.ndim)) else a.transpose(order), dt)
    k = order.index(axis)
    return mem.reshape(math.prod(mem.shape[:k]), a.shape[axis], math.prod(mem.shape[k + 1:]))


def _empty(shape: Shape, order: Shape, dt: np.dtype[Any]) -> FloatArray:
    """An uninitialised array of ``shape`` whose memory holds its axes in ``order`` (C-contiguous when
    transposed to it)."""
    if order == tuple(range(len(shape))):
        return np.empty(shape, dtype=dt)
    return np.empty([shape[d] for d in order], dtype=dt).transpose(sorted(range(len(order)), key=order.__getitem__))


def _target(plan: V.Plan, out: FloatArray | None) -> tuple[FloatArray, FloatArray, bool]:
    """An output laid out as the plan's input (``out`` when given) and the kernels' array for it: its own memory
    when it can be, else a temporary whose values :func:`_copy_result` copies into it (then the third value is
    True)."""
    dt = plan.dtype
    if out is None and plan.out_dtype == dt:
        mem = np.empty(plan.mem_shape, dt)
        return (mem if plan.back is None else mem.transpose(plan.back)), mem, False
    if out is not None and plan.direct and out.dtype is dt and out.strides == plan.strides:  # (checked shape)
        return out, (out if plan.back is None else out.transpose(plan.order)), False
    out = _empty(plan.shape, plan.order, plan.out_dtype) if out is None else out
    flat, direct = _kernel_output(out, plan.order, dt)
    return out, flat, not direct


def _kernel_input(plan: V.Plan, a: FloatArray) -> FloatArray:
    """An array of the plan's shape as the kernels read it: itself when it fits a direct plan, else its
    (A, C, B) memory (:func:`_memory`)."""
    return a if plan.direct and plan.fits(a) else _memory(a, plan.order, plan.axis, plan.dtype)


def _kernel_output(out: FloatArray, order: Shape, dt: np.dtype[Any]) -> tuple[FloatArray, bool]:
    """The flat array the kernel writes for ``out`` and whether it is out's own memory (when out is laid out in
    ``order`` with dtype dt); else a temporary, to be copied into out with :func:`_copy_result`."""
    if out.dtype == dt:
        mem = out if out.flags.c_contiguous and order == tuple(range(out.ndim)) else out.transpose(order)
        if mem.flags.c_contiguous:
            return mem.view(np.ndarray).reshape(-1), True
    return np.empty(out.size, dtype=dt), False


# The result's type follows return_saved, the saved forward's virtual_batch_size.
@overload
def batch_norm(x: FloatArray, running_mean: FloatArray | None, running_var: FloatArray | None,
               weight: FloatArray | None = ..., bias: FloatArray | None = ..., training: bool = ...,
               momentum: float = ..., eps: float = ..., *, axis: int = ..., out: FloatArray | None = ...,
               dtype: npt.DTypeLike | None = ..., return_saved: Literal[False] = ..., nan_guard: bool = ...,
               activation: Literal["relu"] | None = ..., residual: FloatArray | None = ...,
               virtual_batch_size: int | None = ..., renorm: bool = ...,
               renorm_clipping: Mapping[str, float] | None = ..., mask: BoolArray | None = ...
               ) -> FloatArray: ...
@overload
def batch_norm(x: FloatArray, running_mean: FloatArray | None, running_var: FloatArray | None,
               weight: FloatArray | None = ..., bias: FloatArray | None = ..., training: bool = ...,
               momentum: float = ..., eps: float = ..., *, axis: int = ..., out: FloatArray | None = ...,
               dtype: npt.DTypeLike | None = ..., return_saved: Literal[True], nan_guard: bool = ...,
               activation: Literal["relu"] | None = ..., residual: FloatArray | None = ...,
               virtual_batch_size: None = ..., renorm: bool = ...,
               renorm_clipping: Mapping[str, float] | None = ..., mask: BoolArray | None = ...
               ) -> tuple[FloatArray, BatchNormSaved]: ...
@overload
def batch_norm(x: FloatArray, running_mean: FloatArray | None, running_var: FloatArray | None,
               weight: FloatArray | None = ..., bias: FloatArray | None = ..., training: bool = ...,
               momentum: float = ..., eps: float = ..., *, axis: int = ..., out: FloatArray | None = ...,
               dtype: npt.DTypeLike | None = ..., return_saved: Literal[True], nan_guard: bool = ...,
               activation: Literal["relu"] | None = ..., residual: FloatArray | None = ...,
               virtual_batch_size: int | None = ..., renorm: bool = ...,
               renorm_clipping: Mapping[str, float] | None = ..., mask: BoolArray | None = ...
               ) -> tuple[FloatArray, BatchNormSaved | GhostSaved]: ...
@overload
def batch_norm(x: FloatArray, running_mean: FloatArray | None, running_var: FloatArray | None,
               weight: FloatArray | None = ..., bias: FloatArray | None = ..., training: bool = ...,
               momentum: float = ..., eps: float = ..., *, axis: int = ..., out: FloatArray | None = ...,
               dtype: npt.DTypeLike | None = ..., return_saved: bool = ..., nan_guard: bool = ...,
               activation: Literal["relu"] | None = ..., residual: FloatArray | None = ...,
               virtual_batch_size: int | None = ..., renorm: bool = ...,
               renorm_clipping: Mapping[str, float] | None = ..., mask: BoolArray | None = ...
               ) -> FloatArray | tuple[FloatArray, BatchNormSaved | GhostSaved]: ...
def batch_norm(x: FloatArray, running_mean: FloatArray | None, running_var: FloatArray | None,
               weight: FloatArray | None = None, bias: FloatArray | None = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, *, axis: int = 1, out: FloatArray | None = None,
               dtype: npt.DTypeLike | None = None, return_saved: bool = False, nan_guard: bool = False,
               activation: Literal["relu"] | None = None, residual: FloatArray | None = None,
               virtual_batch_size: int | None = None, renorm: bool = False,
               renorm_clipping: Mapping[str, float] | None = None, mask: BoolArray | None = None
               ) -> FloatArray | tuple[FloatArray, BatchNormSaved | GhostSaved]:
    """Batch normalisation over the channel axis ``axis`` (default 1: ``(N, C, *)`` input).

    With an optional fused residual add and ReLU, ghost batches, batch renormalization or masked statistics:
    y = act(weight*(x - mean)/sqrt(var + eps) + bias + residual), per channel, with the batch's mean and biased
    variance (over all positions of the other axes) when ``training`` (and, if given, the running statistics updated
    in place: r = (1 - momentum)*r + momentum*batch_stat, with the unbiased variance), else the running statistics;
    act = max(0, .) with ``activation="relu"``, else the identity; all in one pass (float64 in double, float32 in
    float32 with the mean split in two floats: the documentation's exactness page).

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
    activation : {None, "relu"}
        Fused activation: y = max(0, ...) in the same pass. Its backward takes the mask from the output (which the
        saved forward keeps, as a view of y when y has the compute dtype: modifying y before the backward changes
        the gradient).
    residual : ndarray, optional
        Added to the normalised value before the activation (the tail of a ResNet block): an array of x's shape,
        any floating dtype and layout (converted to the compute dtype and x's layout when needed).
    virtual_batch_size : int, optional
        Ghost batches (in training): axis 0 (not the channel axis) is split into consecutive groups of this many
        samples, the last one possibly smaller, each with more than one value per channel; group g is normalised
        with its own mean and variance, and the running statistics are updated once, with the average over the G
        groups of their means and unbiased variances: r = (1 - momentum)*r + momentum*sum_g(stat_g)/G. The
        backward is the exact gradient (the groups are independent; dweight and dbias summed over them). Ignored
        when not ``training``; a batch of at most this many samples is one group, the plain batch norm.
    renorm : bool
        Batch renormalization (Ioffe 2017, Algorithm 1) in training; needs ``running_mean`` and ``running_var``.
        With sigma = sqrt(running_var + eps) and mu = running_mean before this step's update, sigma_B =
        sqrt(var_B + eps): r = clip(sigma_B/sigma, 1/rmax, rmax), d = clip((mean_B - mu)/sigma, -dmax, dmax),
        y = act(weight*((x - mean_B)/sigma_B*r + d) + bias + residual), r and d constants for the gradient; then
        the running statistics update as usual. Not with ``virtual_batch_size``.
    renorm_clipping : dict, optional
        {"rmax": rmax >= 1, "dmax": dmax >= 0}, a missing key meaning no bound; None: no clipping (Keras' default;
        the paper ends its schedule at rmax=3, dmax=5). Only with ``renorm``.
    mask : ndarray, optional
        Masked statistics (in training): a bool array of x's shape without the channel axis (e.g. (N, L) for
        (N, C, L) input), or one that broadcasts to it. The batch statistics (and the running statistics, unbiased
        with the count n of True positions, n > 1) use only the positions where it is True; every position is
        normalised with them, and the backward is the exact gradient of that. The masked-out values may be
        anything, NaN included, for the statistics; the backward's sums run over every position (as autograd's),
        so its gradients are finite where they are. Ignored when not ``training``; with ``virtual_batch_size``,
        each group uses its part.

    Returns
    -------
    y : ndarray
        Output of the compute dtype (float16 for float16 input), shape and memory layout of x (unless ``out``).
    saved : BatchNormSaved or GhostSaved
        Only with ``return_saved`` (a GhostSaved after a forward of several virtual batches).
    """
    plain = (dtype is None and nan_guard is False and activation is None and residual is None
             and virtual_batch_size is None and renorm is False and renorm_clipping is None and mask is None)
    plan = _known_plan(x, axis) if plain else None
    result: tuple[FloatArray, BatchNormSaved | GhostSaved] | None
    result = None if plan is None else _plain(plan, x, running_mean, running_var, weight, bias, training, momentum,
                                              eps, out)
    if result is None:
        inp = V.input_array(x, axis, dtype)
        result = forward(inp, running_mean, running_var, weight, bias, training, momentum, eps, out, nan_guard,
                         activation, residual, virtual_batch_size, renorm, renorm_clipping, mask=V.mask(mask, inp))
        if plain and type(x) is np.ndarray and type(axis) is int:
            _remember(x, axis, V.plan(inp))
    return result if return_saved else result[0]


# The plans of the inputs of earlier plain batch_norm calls (no optional feature, the default dtype), by the input's
# signature: a repeated call whose input fits one skips the input checks (_plain).
_PLANS: dict[tuple[Any, ...], V.Plan] = {}
_MAX_PLANS = 256


def _known_plan(x: object, axis: object) -> V.Plan | None:
    """The plan of an earlier plain call whose input had x's signature (dtype, shape, strides; axis), when x fits
    it (an aligned ndarray, not a subclass); else None."""
    if type(x) is not np.ndarray or type(axis) is not int:
        return None
    plan = _PLANS.get((x.dtype, x.shape, x.strides, axis))
    return plan if plan is not None and plan.fits(x) else None


def _remember(x: FloatArray, axis: int, plan: V.Plan) -> None:
    """Keep the plan of a plain call's input for the next calls with its signature (at most _MAX_PLANS, the
    oldest dropped all at once)."""
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[(x.dtype, x.shape, x.strides, axis)] = plan


def _plain(plan: V.Plan, x: FloatArray, running_mean: object, running_var: object, weight: object, bias: object,
           training: bool, momentum: float, eps: float, out: object) -> tuple[FloatArray, BatchNormSaved] | None:
    """:func:`batch_norm` without optional features of an input that fits ``plan``: (y, saved), or None when a
    per-channel array is not one the kernels take as it is, or ``out`` (None, or an array) not one they write as it
    is (then the full checks run, and raise where an argument is wrong). Running statistics updated in place and
    ``out`` must not overlap another argument (raised here, as there)."""
    C, dt = plan.acb[1], plan.dtype
    if not ((weight is None or V.fits_channel(weight, C, dt)) and (bias is None or V.fits_channel(bias, C, dt))):
        return None
    if out is not None and not plan.writes(out):
        return None
    batch = bool(training)
    update = batch and (running_mean is not None or running_var is not None)
    if (update or not batch) and not (V.fits_channel(running_mean, C, dt, update)
                                      and V.fits_channel(running_var, C, dt, update)):
        return None
    V.scalars(momentum, eps)
    if batch and plan.acb[0] * plan.acb[2] == 1:
        V.count_per_channel(1, f"input size {plan.shape}")
    channels = cast(tuple[FloatArray | None, ...], (running_mean, running_var, weight, bias))
    if update and not V.distinct_owners(x, *channels):
        V.stats_apart(x, *channels)  # type: ignore[arg-type]  # (arrays: fits_channel)
    if out is not None and not V.distinct_owners(x, *channels, out):
        V.no_overlap("out", out, dict(zip(("input", "running_mean", "running_var", "weight", "bias"), (x, *channels))))
    if update:
        return _planned(plan, x, channels, _BATCH | _UPDATE, momentum, eps, out)
    return _planned(plan, x, (None, None, weight, bias) if batch else channels,  # type: ignore[arg-type]
                    _BATCH if batch else 0, 0.0, eps, out)


def _planned(plan: V.Plan, x: FloatArray, channels: tuple[FloatArray | None, ...], flags: int, momentum: float,
             eps: float, out: FloatArray | None = None) -> tuple[FloatArray, BatchNormSaved]:
    """The forward of an input that fits ``plan`` on checked arguments (``channels``: running_mean, running_var,
    weight, bias, None where absent): with the _BATCH flag the batch statistics (the running ones updated with
    _UPDATE), else the running statistics. Returns (y, saved)."""
    return _normalize(plan, x, np.empty(2 * plan.acb[1]), channels, flags, momentum, eps, out)


def forward(inp: V.Input, running_mean: FloatArray | None, running_var: FloatArray | None, weight: FloatArray | None,
            bias: FloatArray | None, training: bool, momentum: float, eps: float, out: FloatArray | None,
            nan_guard: bool, activation: Literal["relu"] | None = None, residual: FloatArray | None = None,
            virtual_batch_size: int | None = None, renorm: bool = False,
            renorm_clipping: Mapping[str, float] | None = None, update_stats: bool = True,
            mask: BoolArray | None = None) -> tuple[FloatArray, BatchNormSaved | GhostSaved]:
    """:func:`batch_norm` of a checked input ``inp`` (:func:`cbn._validate.input_array`) and a checked ``mask``
    (:func:`cbn._validate.mask`): checks the other arguments, then computes; returns (y, saved).
    ``update_stats=False``: the running statistics are read (by renorm) but not updated."""
    V.scalars(momentum, eps)
    relu = V.activation(activation) == "relu"
    z = V.residual(residual, inp)
    size = V.virtual_batch_size(virtual_batch_size)
    clipping = V.renorm(renorm, renorm_clipping, size)
    groups = V.virtual_batches(size, inp, training)
    x, axis, order, dt = inp.x, inp.axis, inp.order, inp.dtype
    shape = x.shape
    C = shape[axis]
    training = bool(training)
    if training:
        V.count_per_channel(math.prod(shape) // C if C else 0, f"input size {shape}")
    by_mask = training and mask is not None and x.size > 0
    valid = positions(mask, inp) if by_mask and groups is None else None  # type: ignore[arg-type]
    if valid is not None:
        V.valid_count(np.count_nonzero(valid), "")
    for start, stop in groups if by_mask and groups is not None else ():  # the mask's axis 0 is the batch's
        V.valid_count(np.count_nonzero(mask[start:stop]),  # type: ignore[index]
                      f" in the virtual batch of samples {start}:{stop}")
    renorming = training and clipping is not None and x.size > 0
    if renorming and (running_mean is None or running_var is None):
        raise ValueError(f"renorm needs the running statistics: expected running_mean and running_var arrays when "
                         f"training, got {type(running_mean).__name__} and {type(running_var).__name__}")
    update = training and (running_mean is not None or running_var is not None)
    disjoint = V.distinct_owners(x, running_mean, running_var, weight, bias, out, z)
    if update:
        running_mean = V.running_stat(running_mean, "running_mean", C, dt)
        running_var = V.running_stat(running_var, "running_var", C, dt)
        if not disjoint:
            V.stats_apart(x, running_mean, running_var, weight, bias)
    elif not training:
        if running_mean is None or running_var is None:
            raise ValueError(f"running_mean and running_var are required when training=False, got "
                             f"{type(running_mean).__name__} and {type(running_var).__name__}")
        running_mean = V.channel_array(running_mean, "running_mean", C)
        running_var = V.channel_array(running_var, "running_var", C)
    weight = V.channel_param(weight, "weight", C, dt)
    bias = V.channel_param(bias, "bias", C, dt)
    y = V.out_array(out, "out", shape, inp.out_dtype, order, None if disjoint else {
        "input": x, "running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias,
        "residual": z})
    update = update and update_stats
    saved: BatchNormSaved | GhostSaved
    # (mypy does not follow the flags: running_mean and running_var are arrays when update or renorming, clipping
    # is set when renorming)
    if groups is not None:
        y, saved, mean, var = _ghost_forward(inp, groups, weight, bias, eps, y, relu, z, mask if by_mask else None)
        if update:
            running_update(running_mean, running_var, mean, var, momentum, nan_guard)  # type: ignore[arg-type]
        return y, saved
    if renorming:
        count, mean, M2 = statistics(inp, valid)
        y, saved = renormalize(inp, mean, M2 / count, running_mean, running_var,  # type: ignore[arg-type]
                               weight, bias, eps, clipping, y, relu, z, valid)  # type: ignore[arg-type]
        if update:
            update_running_stats(running_mean, running_var,  # type: ignore[arg-type]
                                 count, mean, M2, momentum, nan_guard)
        return y, saved
    guard = update and nan_guard
    # nan_guard: the kernel updates copies; only the finite channels are committed (commit_running_stats)
    stats = np.empty(2 * C)
    new_mean, new_var = (running_mean, running_var) if update else (None, None)
    if guard:
        new_mean, new_var = running_mean.copy(), running_var.copy()  # type: ignore[union-attr]
    if not training:
        new_mean, new_var = _eval_statistics(running_mean, running_var, dt, stats)  # type: ignore[arg-type]
    y, saved = _normalize(V.plan(inp), x, stats, (new_mean, new_var, weight, bias),
                          training * _BATCH + update * _UPDATE + relu * _RELU, momentum, eps, y, z, valid)
    if guard and x.size:
        commit_running_stats(running_mean, running_var, new_mean, new_var, True)  # type: ignore[arg-type]
    return y, saved


def _eval_statistics(running_mean: FloatArray, running_var: FloatArray, dt: np.dtype[Any],
                     stats: FloatArray) -> tuple[FloatArray | None, FloatArray | None]:
    """The running statistics for the kernels' eval pass: as they are (contiguous) when of the compute dtype
    ``dt``; else (None, None), copied to float64 into ``stats`` as (mean, var), so that they are not rounded to
    ``dt``."""
    if running_mean.dtype == dt and running_var.dtype == dt:
        return V.contiguous(running_mean, dt), V.contiguous(running_var, dt)
    C = running_mean.shape[0]
    stats[:C], stats[C:] = running_mean, running_var
    return None, None


def _ghost_forward(inp: V.Input, groups: tuple[tuple[int, int], ...], weight: FloatArray | None,
                   bias: FloatArray | None, eps: float, y: FloatArray | None, relu: bool, z: FloatArray | None,
                   mask: BoolArray | None) -> tuple[FloatArray, GhostSaved, FloatArray, FloatArray]:
    """Each group x[start:stop] of ``groups`` normalised with its own statistics (over mask[start:stop] when
    ``mask`` is not None) into y[start:stop] (allocated when None): returns y, the GhostSaved, and the groups'
    average mean and average unbiased variance."""
    x = inp.x
    if y is None:
        y = _empty(x.shape, inp.order, inp.out_dtype)
    parts, means, variances = [], [], []
    for start, stop in groups:
        part = inp._replace(x=x[start:stop], order=V.memory_order(x[start:stop]))
        valid = None if mask is None else positions(mask[start:stop], part)
        count, mean, M2 = statistics(part, valid)
        parts.append(normalize(part, mean, M2 / count, weight, bias, eps, y[start:stop], relu,
                               None if z is None else z[start:stop], valid)[1])
        means.append(mean)
        variances.append(M2 / (count - 1))
    saved = GhostSaved(groups, tuple(parts), x.shape, inp.out_dtype, inp.order, z is not None)
    return y, saved, np.mean(means, axis=0), np.mean(variances, axis=0)


# The result's type follows return_saved.
@overload
def batch_norm_elemt(x: FloatArray, mean: FloatArray, var: FloatArray, weight: FloatArray | None = ...,
                     bias: FloatArray | None = ..., eps: float = ..., *, axis: int = ..., out: FloatArray | None = ...,
                     dtype: npt.DTypeLike | None = ..., return_saved: Literal[False] = ...,
                     activation: Literal["relu"] | None = ..., residual: FloatArray | None = ...,
                     mask: BoolArray | None = ...) -> FloatArray: ...
@overload
def batch_norm_elemt(x: FloatArray, mean: FloatArray, var: FloatArray, weight: FloatArray | None = ...,
                     bias: FloatArray | None = ..., eps: float = ..., *, axis: int = ..., out: FloatArray | None = ...,
                     dtype: npt.DTypeLike | None = ..., return_saved: Literal[True],
                     activation: Literal["relu"] | None = ..., residual: FloatArray | None = ...,
                     mask: BoolArray | None = ...) -> tuple[FloatArray, BatchNormSaved]: ...
@overload
def batch_norm_elemt(x: FloatArray, mean: FloatArray, var: FloatArray, weight: FloatArray | None = ...,
                     bias: FloatArray | None = ..., eps: float = ..., *, axis: int = ..., out: FloatArray | None = ...,
                     dtype: npt.DTypeLike | None = ..., return_saved: bool = ...,
                     activation: Literal["relu"] | None = ..., residual: FloatArray | None = ...,
                     mask: BoolArray | None = ...) -> FloatArray | tuple[FloatArray, BatchNormSaved]: ...
def batch_norm_elemt(x: FloatArray, mean: FloatArray, var: FloatArray, weight: FloatArray | None = None,
                     bias: FloatArray | None = None, eps: float = 1e-5, *, axis: int = 1, out: FloatArray | None = None,
                     dtype: npt.DTypeLike | None = None, return_saved: bool = False,
                     activation: Literal["relu"] | None = None, residual: FloatArray | None = None,
                     mask: BoolArray | None = None) -> FloatArray | tuple[FloatArray, BatchNormSaved]:
    """Normalise with given batch statistics, per channel.

    y = act(weight*(x - mean)/sqrt(var + eps) + bias + residual). The data-parallel step after
    :func:`batch_norm_stats` and a merge of the parts' statistics: they are those of a batch of which ``x`` is a
    part, and the saved forward differentiates through them (as batch statistics: pass the summed
    :func:`batch_norm_grad_sums` and the batch's count to :func:`batch_norm_backward`).

    Parameters
    ----------
    x : ndarray
        As :func:`batch_norm`.
    mean, var : ndarray
        (C,) mean and biased variance of the batch, any floating dtype (used in float64).
    weight, bias : ndarray or None
        As :func:`batch_norm`.
    eps : float
        As :func:`batch_norm`.
    axis : int
        As :func:`batch_norm`.
    out : ndarray, optional
        As :func:`batch_norm`.
    dtype : {None, float32, float64}
        As :func:`batch_norm`.
    return_saved : bool
        Also return the :class:`BatchNormSaved` that :func:`batch_norm_backward` needs.
    activation : {None, "relu"}
        As :func:`batch_norm`.
    residual : ndarray, optional
        As :func:`batch_norm`.
    mask : ndarray, optional
        The positions of x the statistics counted (as :func:`batch_norm`'s mask): the saved forward
        differentiates through them there only.

    Returns
    -------
    y : ndarray
        As :func:`batch_norm`.
    saved : BatchNormSaved
        Only with ``return_saved``.
    """
    V.scalars(0.0, eps)
    inp = V.input_array(x, axis, dtype)
    C = inp.x.shape[inp.axis]
    mean, var = V.channel_array(mean, "mean", C), V.channel_array(var, "var", C)
    weight = V.channel_param(weight, "weight", C, inp.dtype)
    bias = V.channel_param(bias, "bias", C, inp.dtype)
    relu = V.activation(activation) == "relu"
    z = V.residual(residual, inp)
    out = V.out_array(out, "out", inp.x.shape, inp.out_dtype, inp.order,
                      {"input": inp.x, "mean": mean, "var": var, "weight": weight, "bias": bias, "residual": z})
    mask = V.mask(mask, inp)
    y, saved = normalize(inp, mean, var, weight, bias, eps, out, relu, z,
                         None if mask is None or not return_saved else positions(mask, inp))
    return (y, saved) if return_saved else y


def positions(mask: BoolArray, inp: V.Input) -> Positions:
    """A checked mask (:func:`cbn._validate.mask`) as the kernels' position weights: (A*B,) intp (a word per
    position, which the kernels' vector loops read without conversions), 1 where True, the positions of the input's
    (A, C, B) memory in order."""
    rest = [d - (d > inp.axis) for d in inp.order if d != inp.axis]
    return np.ascontiguousarray(mask.transpose(rest), dtype=np.intp).reshape(-1)


def normalize(inp: V.Input, mean: FloatArray, var: FloatArray, weight: FloatArray | None, bias: FloatArray | None,
              eps: float, out: FloatArray | None, relu: bool = False, z: FloatArray | None = None,
              valid: Positions | None = None) -> tuple[FloatArray, BatchNormSaved]:
    """:func:`batch_norm_elemt` of checked arguments (``out`` checked or None, ``z`` the checked residual or None,
    ``valid`` the :func:`positions` the statistics counted or None); returns (y, saved)."""
    C = mean.shape[0]
    stats = np.empty(2 * C)
    stats[:C], stats[C:] = mean, var
    y, saved = _normalize(V.plan(inp), inp.x, stats, (None, None, weight, bias), relu * _RELU, 0.0, eps, out, z)
    return y, saved._replace(use_batch_stats=True, valid=valid)


def renormalize(inp: V.Input, mean: FloatArray, var: FloatArray, running_mean: FloatArray, running_var: FloatArray,
                weight: FloatArray | None, bias: FloatArray | None, eps: float, clipping: tuple[float, float],
                out: FloatArray | None, relu: bool = False, z: FloatArray | None = None,
                valid: Positions | None = None) -> tuple[FloatArray, BatchNormSaved]:
    """Batch renormalization of checked arguments with the batch's mean and biased variance ``var`` and the
    ``clipping`` (rmax, dmax); returns (y, saved) (the running statistics are not updated).

    r = clip(sigma_B/sigma, 1/rmax, rmax) and d = clip((mean - running_mean)/sigma, -dmax, dmax) with
    sigma_B = sqrt(var + eps), sigma = sqrt(running_var + eps); y = weight*((x - mean)/sigma_B*r + d) + bias is the
    normalisation with invstd r/sigma_B and bias weight*d + bias. With r and d constant its gradient is the
    batch-statistics one with weight*r for weight (invstd 1/sigma_B), and dweight = r*sum(dy*xhat) + d*sum(dy):
    the saved forward holds that weight, that invstd and (r, d).
    """
    rmax, dmax = clipping
    C = mean.shape[0]
    with np.errstate(all="ignore"):
        sigma_b = np.sqrt(var + eps)
        sigma = np.sqrt(running_var.astype(np.float64) + eps)
        r = np.clip(sigma_b / sigma, 1.0 / rmax, rmax)
        d = np.clip((mean - running_mean.astype(np.float64)) / sigma, -dmax, dmax)
        gamma = np.ones(C) if weight is None else weight.astype(np.float64)
        shift = gamma * d + (0.0 if bias is None else bias)
        invstd = 1.0 / sigma_b
        y, saved = normalize(inp, mean, (sigma_b / r) ** 2, weight, shift.astype(inp.dtype), 0.0, out, relu, z,
                             valid)
    return y, saved._replace(invstd=invstd, weight=(gamma * r).astype(inp.dtype), renorm=np.stack((r, d)))


def _renorm_grads(saved: BatchNormSaved, dweight: FloatArray, dbias: FloatArray) -> None:
    """After a renorm forward, turn the kernel's dweight = sum(dy*xhat) into the gradient of the weight,
    r*sum(dy*xhat) + d*sum(dy), in place."""
    if saved.renorm is not None:
        r, d = saved.renorm
        dweight[...] = r * dweight + d * dbias


def _normalize(plan: V.Plan, x: FloatArray, stats: FloatArray, channels: tuple[FloatArray | None, ...], flags: int,
               momentum: float, eps: float, y: FloatArray | None = None, z: FloatArray | None = None,
               valid: Positions | None = None) -> tuple[FloatArray, BatchNormSaved]:
    """The kernels' forward of an input ``x`` that fits ``plan``, on checked arguments: y (allocated when None)
    and the saved forward.

    ``stats``: (2C,) float64, filled with the batch's (mean, invstd) with the _BATCH flag (over the
    :func:`positions` ``valid`` when given), else with the given statistics' (mean, invstd): the running ones of
    ``channels`` when it has them, else ``stats`` comes in as (mean, var). ``channels``: (running_mean,
    running_var, weight, bias), None where absent (the running statistics are updated with the _UPDATE flag).
    ``flags``: the kernels' forward flags. ``z``: the residual or None."""
    A, C, B = acb = plan.acb
    dt = plan.dtype
    if plan.direct:
        x3 = (x if plan.back is None else x.transpose(plan.order)).reshape(acb)
    else:
        x3 = _memory(x, plan.order, plan.axis, dt)
    y, y1, copy = _target(plan, y)
    mean, invstd = stats[:C], stats[C:]
    gate = np.empty((2, C)) if flags & _RELU and z is None else None
    if x3.size or not flags & _BATCH:  # (empty: the given statistics' mean and invstd only)
        _kernels.forward(x3, y1, None if z is None else _kernel_input(plan, z), A, C, channels, stats, flags, momentum,
                         eps, thread_cap(), valid, _valid_count(valid), gate)
        if copy:
            _copy_result(y, y1, plan.order)
    else:
        stats.fill(np.nan)
    return y, BatchNormSaved._make((x3, mean, invstd, channels[2], bool(flags & _BATCH), plan.shape,
                                    plan.out_dtype, plan.axis, plan.order, y1.reshape(acb) if flags & _RELU else None,
                                    z is not None, None, valid, gate))


def _valid_count(valid: Positions | None) -> int:
    """The positions that :func:`positions` weights ``valid`` count (0 for None)."""
    return 0 if valid is None else int(np.count_nonzero(valid))


def _copy_result(out: FloatArray, flat: FloatArray, order: Shape) -> None:
    """Copy a kernel's flat result (``out``'s values with its axes in ``order``) into ``out``, converting the dtype:
    float16 overflow gives inf (as in torch), and never raises late."""
    mem = out.transpose(order)
    with np.errstate(all="ignore"):
        mem[...] = flat.reshape(mem.shape)


def batch_norm_stats(x: FloatArray, *, axis: int = 1, dtype: npt.DTypeLike | None = None,
                     mask: BoolArray | None = None) -> tuple[int, FloatArray, FloatArray]:
    """Per-channel statistics of a batch, in float64: what data-parallel ranks combine.

    Parameters
    ----------
    x : ndarray
        Input of at least 2 dimensions, any floating dtype, layout and strides.
    axis : int
        The channel axis, as :func:`batch_norm`.
    dtype : {None, float32, float64}
        Compute dtype, as :func:`batch_norm`.
    mask : ndarray, optional
        The positions to count, as :func:`batch_norm`'s mask.

    Returns
    -------
    count : int
        Values per channel, x.size // x.shape[axis] (with a mask: its True positions).
    mean, M2 : ndarray
        (C,) mean and sum of squared deviations from it (the biased variance is M2/count); NaN when count is 0,
        and M2 = 0 when count is 1.
    """
    inp = V.input_array(x, axis, dtype)
    mask = V.mask(mask, inp)
    return statistics(inp, None if mask is None else positions(mask, inp))


def statistics(inp: V.Input, valid: Positions | None = None) -> tuple[int, FloatArray, FloatArray]:
    """:func:`batch_norm_stats` of a checked input, over the :func:`positions` ``valid`` when given."""
    x, axis = inp.x, inp.axis
    C = x.shape[axis]
    x3 = _memory(x, inp.order, axis, inp.dtype)
    count = x3.shape[0] * x3.shape[2] if valid is None else _valid_count(valid)
    stats = np.full(2 * C, np.nan)
    mean, M2 = stats[:C], stats[C:]
    if count == 1 and valid is None:
        mean[...], M2[...] = x3[0, :, 0], 0.0
    elif count and C:
        _kernels.forward(x3, None, None, x3.shape[0], C, (None, None, None, None), stats,
                         _BATCH, 0.0, 0.0, thread_cap(), valid, count)
    return count, mean, M2


def merge_statistics(counts: Iterable[float] | FloatArray, means: Sequence[FloatArray] | FloatArray,
                     M2s: Iterable[FloatArray] | FloatArray) -> tuple[float, FloatArray, FloatArray]:
    """Chan's parallel merge of per-part statistics in part order: (count, mean, M2) of their union, in float64.

    delta = mean_b - mean_a, n = n_a + n_b: mean = mean_a + delta*n_b/n, M2 = M2_a + M2_b + delta**2*n_a*n_b/n.
    Parts with no values are skipped; with none at all the mean and M2 are 0.

    Parameters
    ----------
    counts : sequence of int
        Values per channel of each part (what :func:`batch_norm_stats` returns first).
    means, M2s : sequence of ndarray
        (C,) float64 mean and M2 of each part.

    Returns
    -------
    count : int
    mean, M2 : ndarray
        (C,) float64.
    """
    C = len(means[0])
    n: float = 0
    mean, M2 = np.zeros(C), np.zeros(C)
    for nb, mean_b, M2_b in zip(counts, means, M2s):
        if nb == 0:
            continue
        total = n + nb
        delta = mean_b - mean
        mean = mean + delta * (nb / total)
        M2 = M2 + M2_b + delta * delta * (n * nb / total)
        n = total
    return n, mean, M2


def update_running_stats(running_mean: FloatArray, running_var: FloatArray, count: float, mean: FloatArray,
                         M2: FloatArray, momentum: float, nan_guard: bool) -> None:
    """The running-statistic update from a batch's (count, mean, M2), as the kernels do it in a training forward:
    r = (1 - f)*r + f*stat in float64, the variance unbiased (M2/(count - 1)), each rounded once to the statistics'
    dtype; then committed (:func:`commit_running_stats`). Nothing changes when count is 0.

    Parameters
    ----------
    running_mean, running_var : ndarray
        (C,) running statistics, updated in place (checked: :func:`cbn._validate.running_stat`).
    count : int
        Values per channel of the batch (> 1, or 0).
    mean, M2 : ndarray
        (C,) float64 statistics of the batch.
    momentum : float
        The factor f, in [0, 1].
    nan_guard : bool
        As :func:`batch_norm`.
    """
    if count:
        running_update(running_mean, running_var, mean, M2 / (count - 1.0), momentum, nan_guard)


def running_update(running_mean: FloatArray, running_var: FloatArray, mean: FloatArray, var: FloatArray,
                   momentum: float, nan_guard: bool) -> None:
    """:func:`update_running_stats` from a (C,) float64 mean and unbiased variance: r = (1 - f)*r + f*stat in
    float64, each rounded once to the statistics' dtype, then committed (:func:`commit_running_stats`)."""
    dt = running_mean.dtype
    with np.errstate(all="ignore"):
        new_mean = ((1.0 - momentum) * running_mean.astype(np.float64) + momentum * mean).astype(dt)
        new_var = ((1.0 - momentum) * running_var.astype(np.float64) + momentum * var).astype(dt)
    commit_running_stats(running_mean, running_var, new_mean, new_var, nan_guard)


def commit_running_stats(running_mean: FloatArray, running_var: FloatArray, new_mean: FloatArray,
                         new_var: FloatArray, nan_guard: bool) -> None:
    """Write the new running statistics, with ``nan_guard`` only the channels whose new mean and variance are both
    finite (the others keep their statistics)."""
    keep = np.isfinite(new_mean) & np.isfinite(new_var) if nan_guard else True
    np.copyto(running_mean, new_mean, where=keep)
    np.copyto(running_var, new_var, where=keep)


def batch_norm_grad_sums(dy: FloatArray, saved: BatchNormSaved) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Per-channel sums that a training backward combines: what data-parallel ranks add up.

    Parameters
    ----------
    dy : ndarray
        As :func:`batch_norm_backward`.
    saved : BatchNormSaved
        As :func:`batch_norm_backward` (not after a ghost-batch forward).

    Returns
    -------
    sums : ndarray
        (2, C) float64: sum(dy) and sum(dy*(x - mean)) per channel, over this batch.
    dweight, dbias : ndarray
        (C,) this batch's gradients of weight and bias, in the compute dtype.
    """
    return gradient_sums(V.grad_output(dy, saved, ghost=False), saved)


def gradient_sums(dy: FloatArray, saved: BatchNormSaved) -> tuple[FloatArray, FloatArray, FloatArray]:
    """:func:`batch_norm_grad_sums` of checked arguments (:func:`cbn._validate.grad_output`)."""
    x3 = saved.x
    N, C, S = x3.shape
    sums = np.zeros((2, C))
    grads = np.zeros(2 * C, dtype=x3.dtype)
    dweight, dbias = grads[:C], grads[C:]
    if x3.size:
        _kernels.backward(x3, _kernel_input(V.saved_plan(saved), dy), None, None, N, C,
                          (saved.mean, saved.invstd, saved.weight), grads, sums, _backward_flags(saved), 0.0,
                          thread_cap(), _relu_output(saved), None, saved.gate)
    _renorm_grads(saved, dweight, dbias)
    return sums, dweight, dbias


def _backward_flags(saved: BatchNormSaved) -> int:
    """The kernel's backward flags of a saved forward."""
    return saved.use_batch_stats * _BWD_BATCH + (saved.y is not None or saved.gate is not None) * _BWD_RELU


def _relu_output(saved: BatchNormSaved) -> FloatArray | None:
    """The ReLU output the kernels' backward reads (their e): saved.y when there is no gate to recompute from."""
    return saved.y if saved.gate is None else None


def batch_norm_backward(dy: FloatArray, saved: BatchNormSaved | GhostSaved, *, out: FloatArray | None = None,
                        grad_sums: FloatArray | None = None, count: int | None = None) -> tuple[FloatArray, ...]:
    """Compute the gradients of :func:`batch_norm` with respect to its input, weight and bias (and residual).

    Training (batch statistics): dx = g*(dy - sum(dy)/m - xhat*sum(dy*xhat)/m) with g = weight*invstd,
    xhat = (x - mean)*invstd, m values per channel. Eval: dx = g*dy. Always dweight = sum(dy*xhat),
    dbias = sum(dy). After a forward with ReLU, dy stands for dy masked by the output (dy where y > 0, else 0) in
    all of these; after a forward with a residual, dresidual is that (masked) dy. After a renorm forward, g =
    weight*r/sigma_B, xhat = (x - mean_B)/sigma_B and dweight = r*sum(dy*xhat) + d*sum(dy) (r, d constant). After a
    ghost-batch forward (a GhostSaved), all of this per group, dweight and dbias summed over the groups. After a
    forward with a mask (m positions counted), dx = g*(dy - v*(sum(dy)/m + xhat*sum(dy*xhat)/m)), v = 1 at the
    counted positions, else 0, with the sums over every position.

    Parameters
    ----------
    dy : ndarray
        Gradient of the loss with respect to the forward's output; same shape as the forward's input (any layout;
        no copy when it has the input's).
    saved : BatchNormSaved or GhostSaved
        From ``batch_norm(..., return_saved=True)``.
    out : ndarray, optional
        Preallocated dx: shape of dy, dtype ``saved.dtype``, writeable, C-contiguous or with the forward input's
        memory layout, not overlapping dy or saved.x.
    grad_sums : ndarray, optional
        (2, C) float64 sums of :func:`batch_norm_grad_sums` over a larger batch of which this one is a part
        (data-parallel training, where the forward used that batch's statistics); they replace this batch's sums,
        and ``count`` its m. Not after a ghost-batch forward.
    count : int, optional
        Values per channel of the batch that ``grad_sums`` covers (after a forward with a mask: the positions it
        counted); required with ``grad_sums``.

    Returns
    -------
    dx : ndarray
        Shape and memory layout of the forward's input (unless ``out``), dtype ``saved.dtype``.
    dweight, dbias : ndarray
        (C,) in the compute dtype (computed whether or not the forward had a weight), from the sums used.
    dresidual : ndarray
        Only after a forward with a residual: its gradient, dy itself without ReLU, else masked dy (shape and
        layout of dx, dtype ``saved.dtype``).
    """
    dy = V.grad_output(dy, saved)
    if isinstance(saved, GhostSaved):
        V.no_grad_sums(grad_sums, count)
        return _ghost_gradient(dy, saved, V.grad_out(out, dy, saved))
    N, C, S = saved.x.shape
    grad_sums, count = V.grad_sums(grad_sums, count, C, N * S if saved.valid is None else _valid_count(saved.valid))
    return gradient_input(dy, saved, V.grad_out(out, dy, saved), grad_sums, count)


def _ghost_gradient(dy: FloatArray, saved: GhostSaved, out: FloatArray | None) -> tuple[FloatArray, ...]:
    """:func:`batch_norm_backward` of a ghost-batch forward (checked arguments): each group's gradient into its
    slice of dx (and of dresidual after a ReLU), dweight and dbias summed over the groups in float64."""
    dx = _empty(saved.shape, saved.order, saved.dtype) if out is None else out
    masked_dz = saved.residual and saved.parts[0].y is not None
    dz = _empty(saved.shape, saved.order, saved.dtype) if masked_dz else dy
    grads = np.zeros((2, saved.parts[0].x.shape[1]))
    for (start, stop), part in zip(saved.bounds, saved.parts):
        _, dweight, dbias, *dresidual = gradient_input(dy[start:stop], part, dx[start:stop], None, None)
        grads += dweight, dbias
        if masked_dz:
            dz[start:stop] = dresidual[0]
    dweight, dbias = grads.astype(saved.parts[0].x.dtype)
    return (dx, dweight, dbias) + ((dz,) if saved.residual else ())


def gradient_input(dy: FloatArray, saved: BatchNormSaved, out: FloatArray | None, grad_sums: FloatArray | None,
                   count: int | None, plan: V.Plan | None = None) -> tuple[FloatArray, ...]:
    """:func:`batch_norm_backward` of checked arguments (``out`` checked or None; grad_sums and count None or
    checked by :func:`cbn._validate.grad_sums`; ``plan`` the forward input's, else worked out from ``saved``)."""
    plan = V.saved_plan(saved) if plan is None else plan
    x3 = saved.x
    A, C, B = x3.shape
    e = _relu_output(saved)
    masked_dz = e is not None  # the kernel writes masked dy (dresidual, after a residual) beside dx
    dx, dx1, copy_dx = _target(plan, out)
    dz, dz1, copy_dz = _target(plan, None) if masked_dz else (dy, None, False)
    grads = np.zeros(2 * C, dtype=x3.dtype)
    dweight, dbias = grads[:C], grads[C:]
    if x3.size:
        _kernels.backward(x3, _kernel_input(plan, dy), dx1, dz1, A, C, (saved.mean, saved.invstd, saved.weight), grads,
                          grad_sums, _backward_flags(saved), float(count or _valid_count(saved.valid)), thread_cap(),
                          e, saved.valid, saved.gate, plan.rows)
        if copy_dx:
            _copy_result(dx, dx1, plan.order)
        if copy_dz:
            _copy_result(dz, dz1, plan.order)  # type: ignore[arg-type]  # dz1 is an array when copy_dz
    _renorm_grads(saved, dweight, dbias)
    return (dx, dweight, dbias) + ((dz,) if saved.residual else ())
