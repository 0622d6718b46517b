"""Pure-NumPy float64 batch norm: the test oracle and the benchmark baseline.

Same signatures as :mod:`cbn.functional` (``out`` and ``dtype`` are not offered); every computation is done in
float64 with NumPy's pairwise sums, straight from the formulas.
"""
from __future__ import annotations

import math
from typing import Literal, NamedTuple, overload

import numpy as np

from ._typing import FloatArray, Shape


class Saved(NamedTuple):
    """What the reference forward keeps for its backward (all float64).

    Its fields, by name or in this order:

    Parameters
    ----------
    x : ndarray
        The input as an (A, C, B) array, A and B the products of the sizes before and after the channel axis.
    mean, invstd : ndarray
        (C,) mean and 1/sqrt(var + eps) the forward used.
    weight : ndarray or None
        (C,) gamma, or None when the forward had none.
    use_batch_stats : bool
        True when the forward normalised with batch statistics.
    shape : tuple
        Shape of the forward's input.
    y : ndarray or None
        The output, when the forward had a ReLU (its mask).
    residual : bool
        True when the forward added a residual.
    """

    x: FloatArray
    mean: FloatArray
    invstd: FloatArray
    weight: FloatArray | None
    use_batch_stats: bool
    shape: Shape
    y: FloatArray | None = None
    residual: bool = False


# The result's type follows return_saved.
@overload
def batch_norm(x: FloatArray, running_mean: FloatArray | None, running_var: FloatArray | None,
               weight: FloatArray | None = ..., bias: FloatArray | None = ..., training: bool = ...,
               momentum: float = ..., eps: float = ..., *, axis: int = ..., activation: Literal["relu"] | None = ...,
               residual: FloatArray | None = ..., return_saved: Literal[False] = ...) -> FloatArray: ...
@overload
def batch_norm(x: FloatArray, running_mean: FloatArray | None, running_var: FloatArray | None,
               weight: FloatArray | None = ..., bias: FloatArray | None = ..., training: bool = ...,
               momentum: float = ..., eps: float = ..., *, axis: int = ..., activation: Literal["relu"] | None = ...,
               residual: FloatArray | None = ..., return_saved: Literal[True]) -> tuple[FloatArray, Saved]: ...
@overload
def batch_norm(x: FloatArray, running_mean: FloatArray | None, running_var: FloatArray | None,
               weight: FloatArray | None = ..., bias: FloatArray | None = ..., training: bool = ...,
               momentum: float = ..., eps: float = ..., *, axis: int = ..., activation: Literal["relu"] | None = ...,
               residual: FloatArray | None = ..., return_saved: bool = ...
               ) -> FloatArray | tuple[FloatArray, Saved]: ...
def batch_norm(x: FloatArray, running_mean: FloatArray | None, running_var: FloatArray | None,
               weight: FloatArray | None = None, bias: FloatArray | None = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5, *, axis: int = 1, activation: Literal["relu"] | None = None,
               residual: FloatArray | None = None, return_saved: bool = False) -> FloatArray | tuple[FloatArray, Saved]:
    """Float64 reference of :func:`cbn.functional.batch_norm`: y = act(BN(x) + residual).

    The running statistics, when given in training, are updated in place.

    Parameters
    ----------
    x : ndarray
        Input of at least 2 dimensions.
    running_mean, running_var : ndarray or None
        (C,) running statistics.
    weight, bias : ndarray or None
        (C,) gamma and beta; None means 1 and 0.
    training : bool
        Normalise with batch statistics (True) or with the running statistics (False).
    momentum : float
        Factor of the running-statistic update.
    eps : float
        Added to the variance.
    axis : int
        The channel axis.
    activation : {None, "relu"}
        Activation after the residual.
    residual : ndarray, optional
        Added before the activation.
    return_saved : bool
        Also return the :class:`Saved` that :func:`batch_norm_backward` needs.

    Returns
    -------
    y : ndarray
        Float64 output of x's shape.
    saved : Saved
        Only with ``return_saved``.
    """
    shape = x.shape
    axis %= x.ndim
    C = shape[axis]
    x3 = np.asarray(x, dtype=np.float64).reshape(math.prod(shape[:axis]), C, math.prod(shape[axis + 1:]))
    if training:
        m = x3.shape[0] * x3.shape[2]
        mean = x3.mean(axis=(0, 2))
        var = ((x3 - mean[:, None]) ** 2).mean(axis=(0, 2))
        if running_mean is not None and m > 0:
            running_mean[...] = (1 - momentum) * running_mean.astype(np.float64) + momentum * mean
            running_var[...] = (  # type: ignore[index]  # (given with running_mean)
                (1 - momentum) * running_var.astype(np.float64)  # type: ignore[union-attr]
                + momentum * var * m / (m - 1))
    else:
        mean = np.asarray(running_mean, dtype=np.float64)
        var = np.asarray(running_var, dtype=np.float64)
    invstd = 1.0 / np.sqrt(var + eps)
    w = np.ones(C) if weight is None else np.asarray(weight, dtype=np.float64)
    b = np.zeros(C) if bias is None else np.asarray(bias, dtype=np.float64)
    y: FloatArray = ((x3 - mean[:, None]) * (invstd * w)[:, None] + b[:, None]).reshape(shape)
    if residual is not None:
        y = y + np.asarray(residual, dtype=np.float64)
    if activation == "relu":
        y = np.maximum(y, 0.0)
    if not return_saved:
        return y
    return y, Saved(x3, mean, invstd, None if weight is None else w, bool(training), shape,
                    y if activation == "relu" else None, residual is not None)


def batch_norm_backward(dy: FloatArray, saved: Saved) -> tuple[FloatArray, ...]:
    """Float64 reference of :func:`cbn.functional.batch_norm_backward`.

    Parameters
    ----------
    dy : ndarray
        Gradient of the loss with respect to the forward's output.
    saved : Saved
        From ``batch_norm(..., return_saved=True)``.

    Returns
    -------
    dx, dweight, dbias : ndarray
        Float64 gradients of the input, weight and bias.
    dresidual : ndarray
        Only after a forward with a residual: dy (masked by the ReLU's output > 0 after a forward with ReLU).
    """
    x3 = saved.x.astype(np.float64)
    N, C, S = x3.shape
    dy = np.asarray(dy, dtype=np.float64)
    if saved.y is not None:
        dy = np.where(saved.y > 0, dy, 0.0)
    dy3 = dy.reshape(N, C, S)
    w = np.ones(C) if saved.weight is None else saved.weight.astype(np.float64)
    xhat = (x3 - saved.mean[:, None]) * saved.invstd[:, None]
    dbias = dy3.sum(axis=(0, 2))
    dweight = (dy3 * xhat).sum(axis=(0, 2))
    g = (w * saved.invstd)[:, None]
    if saved.use_batch_stats:
        m = N * S
        dx = g * (dy3 - dbias[:, None] / m - xhat * dweight[:, None] / m)
    else:
        dx = g * dy3
    return (dx.reshape(saved.shape), dweight, dbias) + ((dy,) if saved.residual else ())
