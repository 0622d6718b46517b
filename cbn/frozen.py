"""Batch norm for inference and fine-tuning: folding into the layer before it, frozen layers, freezing a model.

A batch norm in eval mode is a per-channel affine map, y = x*s + (beta - running_mean*s) with
s = gamma/sqrt(running_var + eps). :func:`fold` moves it into the weight and bias of the convolution or linear layer
that feeds it; :class:`FrozenBatchNorm2d` (torchvision's ``FrozenBatchNorm2d``) applies it with fixed parameters
and statistics in any mode; :func:`freeze` swaps every batch norm of a model for the frozen layer.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypeAlias, TypeVar, overload

import numpy as np
import numpy.typing as npt

from . import _validate as V
from . import functional as F
from ._config import DEFAULTS, NAMES, SINCE, Config, docstring
from ._typing import BoolArray, FloatArray
from ._walk import swap_layers
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm

T = TypeVar("T")

_FIXED = {"momentum": 0.0}  # a frozen layer's settings that are neither its constructor's nor the defaults


def _check_running_stats(bn: _BatchNorm, what: str) -> None:
    """Raise ValueError when ``bn`` keeps no running statistics (``what`` names the operation that needs them)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"cannot {what} {bn!r}: it has no running statistics (track_running_stats=False), expected "
                         f"running_mean and running_var arrays, got {type(bn.running_mean).__name__} and "
                         f"{type(bn.running_var).__name__}")


def fold(bn: Layer, weight: FloatArray, bias: FloatArray | None = None) -> tuple[FloatArray, FloatArray]:
    """Fold a batch norm's inference transform into the convolution or linear layer that feeds it.

    With s = gamma/sqrt(running_var + eps) per channel (gamma 1 and beta 0 when ``bn`` is not affine)::

        weight' = weight*s           (s along axis 0 of weight, the output channels)
        bias'   = (bias - running_mean)*s + beta

    so that ``layer(x, weight', bias')`` equals ``bn(layer(x, weight, bias))`` in eval mode, for a convolution
    ((O, I, kh, kw), (O, I, k), (O, I, kd, kh, kw)) or a linear layer ((O, I)). Computed in float64, returned in
    ``weight``'s dtype. ``bn`` and the arrays passed are not modified. A layer with an activation is refused:
    the folded layer would compute BN(layer(x)) without it.

    Parameters
    ----------
    bn : BatchNorm1d/2d/3d, SyncBatchNorm1d/2d/3d or FrozenBatchNorm1d/2d/3d
        A layer with running statistics; its mode does not matter (the eval transform is folded).
    weight : ndarray
        Floating weight of at least 1 dimension with ``bn.num_features`` output channels on axis 0.
    bias : ndarray, optional
        (O,) floating bias; None counts as 0.

    Returns
    -------
    weight : ndarray
        The folded weight: shape and dtype of ``weight``, C-contiguous.
    bias : ndarray
        The folded bias: (O,), ``weight``'s dtype.

    Raises
    ------
    TypeError
        ``bn`` is not a cbn batch-norm layer, or ``weight``/``bias`` is not a floating ndarray.
    ValueError
        ``bn`` has no running statistics or has an activation, the shapes do not match its channel count, or a
        folded value overflows ``weight``'s dtype.
    """
    if not isinstance(bn, _BatchNorm):
        raise TypeError(f"bn must be a cbn batch-norm layer (BatchNorm1d/2d/3d, SyncBatchNorm1d/2d/3d, "
                        f"FrozenBatchNorm1d/2d/3d), got {type(bn).__name__}")
    weight = V.float_array(weight, "weight")
    bias = None if bias is None else V.float_array(bias, "bias")
    with bn._lock:  # one consistent set of parameters and statistics
        _check_running_stats(bn, "fold")
        if bn.activation is not None:
            raise ValueError(f"cannot fold {bn!r}: the folded layer computes BN(layer(x)) without the activation "
                             f"{bn.activation!r}; expected a layer without activation, got activation="
                             f"{bn.activation!r}: fold a copy with activation=None and keep the activation after the "
                             f"folded layer")
        C = bn.num_features
        if weight.ndim < 1 or weight.shape[0] != C:
            raise ValueError(f"weight must have {C} output channels (bn.num_features) on axis 0, got shape "
                             f"{weight.shape}")
        if bias is not None and bias.shape != (C,):
            raise ValueError(f"bias must have shape ({C},) (bn.num_features), got {bias.shape}")
        gamma = np.ones(C) if bn.weight is None else bn.weight.astype(np.float64)
        beta = np.zeros(C) if bn.bias is None else bn.bias.astype(np.float64)
        mean, var, eps = (bn.running_mean.astype(np.float64),  # type: ignore[union-attr]  # (checked above)
                          bn.running_var.astype(np.float64), bn.eps)  # type: ignore[union-attr]
    s = gamma / np.sqrt(var + eps)
    folded_weight = weight.astype(np.float64) * s.reshape((C,) + (1,) * (weight.ndim - 1))
    folded_bias = ((0.0 if bias is None else bias.astype(np.float64)) - mean) * s + beta
    return (V.representable(folded_weight, weight.dtype, "folded weight", " (the dtype of weight)"),
            V.representable(folded_bias, weight.dtype, "folded bias", " (the dtype of weight)"))


class _FrozenBatchNorm(_BatchNorm):
    """Common implementation of FrozenBatchNorm1d/2d/3d: a batch norm that always normalises with its fixed
    running statistics and learns nothing (torchvision's ``FrozenBatchNorm2d``).

    The state, locking, input checks, pickling and files are :class:`cbn.modules._BatchNorm`'s. Its settings are
    its constructor's (those of an eval-mode batch norm); the others are fixed: ``affine`` and
    ``track_running_stats`` True, ``momentum`` 0.0 (the statistics never move), the training-only ones off.
    ``num_batches_tracked`` stays 0 and is not in the state_dict.
    """

    _SINCE = dict(SINCE, activation=5)  # frozen layers' files hold their activation from version 5 on

    def __init__(self, num_features: int, eps: float = DEFAULTS["eps"], dtype: npt.DTypeLike = DEFAULTS["dtype"],
                 axis: int = DEFAULTS["axis"], activation: Literal["relu"] | None = DEFAULTS["activation"]) -> None:
        self._setup(self._configured(num_features, eps, dtype=dtype, axis=axis, activation=activation))

    @classmethod
    def _configured(cls, *args: Any, **kwargs: Any) -> Config:
        return super()._configured(*args, **_FIXED, **kwargs)

    @classmethod
    def _validated(cls, config: Config) -> Config:
        """BatchNorm's checks, and the settings that are not the constructor's at their fixed values."""
        config = super()._validated(config)
        settings = cls._settings()
        for name in NAMES:
            fixed = _FIXED.get(name, DEFAULTS[name])
            if name not in settings and getattr(config, name) != fixed:
                raise ValueError(f"a {cls.__name__}'s {name} is fixed: expected {fixed!r}, got "
                                 f"{getattr(config, name)!r}")
        return config

    def forward(self, x: FloatArray, *, out: FloatArray | None = None, residual: FloatArray | None = None,
                mask: BoolArray | None = None) -> FloatArray:
        """Apply the fixed per-channel transform along ``axis``, in training and eval mode alike.

        y = act(x*scale + shift [+ residual]): scale = weight/sqrt(running_var + eps) and shift =
        bias - running_mean*scale, computed by the kernels as an eval-mode batch norm,
        weight*(x - running_mean)/sqrt(running_var + eps) + bias, the mean subtracted as two floats for float32
        (the precision of the batch norm's y); then the residual and the activation as :meth:`BatchNorm2d.forward`
        adds them.

        Parameters
        ----------
        x : ndarray
            Input of one of the accepted ranks, any floating dtype, any layout (the output has x's layout).
        out : ndarray, optional
            Preallocated output (shape of x, output dtype, C-contiguous or with x's memory layout).
        residual : ndarray, optional
            Added before the activation, as :meth:`BatchNorm2d.forward` adds it.
        mask : ndarray, optional
            Checked as a BatchNorm's statistics mask and without effect (the statistics are fixed), so that a model
            that passes one runs after :func:`freeze`.

        Returns
        -------
        ndarray
            The output.
        """
        with self._lock:
            c = self._cfg
            inp = self._input(x)
            V.mask(mask, inp)
            y, self._saved = F.forward(inp, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                                       c.eps, out, False, c.activation, residual)
            return y

    __call__ = forward

    def backward(self, dy: FloatArray, out: FloatArray | None = None) -> FloatArray:
        """Gradient of the last forward's input: dx = dy*scale (times the activation's mask).

        scale = weight/sqrt(running_var + eps); no parameter gradients (``grad_weight`` and ``grad_bias`` stay
        None); ``grad_residual`` as a BatchNorm's.

        Parameters
        ----------
        dy : ndarray
            Gradient of the loss with respect to the last forward's output.
        out : ndarray, optional
            Preallocated dx (shape of dy, the forward's output dtype, C-contiguous or with the input's layout).

        Returns
        -------
        ndarray
            The gradient dx with respect to the last forward's input.
        """
        with self._lock:
            dx = super().backward(dy, out)
            self.grad_weight = self.grad_bias = None
            return dx

    @classmethod
    def _state_keys(cls, config: Config) -> list[str]:
        return ["weight", "bias", "running_mean", "running_var"]

    def load_state_dict(self, state: Mapping[str, npt.ArrayLike], strict: bool = True) -> None:
        """Load weight, bias, running_mean and running_var, e.g. from torchvision's ``FrozenBatchNorm2d``.

        Or from a ``BatchNorm2d``: a ``num_batches_tracked`` entry is ignored (as torchvision drops it on load); the
        rest as :meth:`BatchNorm2d.load_state_dict` (checked before anything is written, written into the layer's
        arrays).

        Parameters
        ----------
        state : mapping of str to array_like
            The entries, with torchvision's keys.
        strict : bool
            Refuse a missing or an unexpected key (else load the keys that are there).
        """
        if isinstance(state, Mapping):
            state = {key: value for key, value in state.items() if key != "num_batches_tracked"}
        super().load_state_dict(state, strict)

    def extra_repr(self) -> str:
        """``num_features, eps=...`` as torchvision prints it, then the other settings unless at their defaults.

        Returns
        -------
        str
            What ``repr`` shows between the parentheses (dtype, axis and activation when not the defaults).
        """
        c = self._cfg
        return f"{c.num_features}, eps={c.eps}" + c.shown(self._settings()[2:])


_ABOUT = ("y = x*scale + shift per channel, scale = weight/sqrt(running_var + eps), shift = bias - running_mean*scale, "
          "in every mode; the backward gives dx = dy*scale and no parameter gradients. ``weight``, ``bias``, "
          "``running_mean`` and ``running_var`` are (C,) arrays (1, 0, 0, 1 when made; set them, load a state_dict, "
          "or use :func:`freeze`); the state_dict has torchvision's keys.")
_ACTIVATION = """{None, "relu"}
    Fused activation: y = max(0, x*scale + shift [+ residual])."""


class FrozenBatchNorm1d(_FrozenBatchNorm):
    __doc__ = docstring("Batch norm with fixed statistics and affine parameters over (N, C) or (N, C, L) input.",
                        _ABOUT, 3, _FrozenBatchNorm._settings(), activation=_ACTIVATION)
    _ndims = (2, 3)


class FrozenBatchNorm2d(_FrozenBatchNorm):
    __doc__ = docstring("Batch norm with fixed statistics and affine parameters over (N, C, H, W) input, like "
                        "torchvision's ``FrozenBatchNorm2d``.", _ABOUT, 4,
                        _FrozenBatchNorm._settings(), activation=_ACTIVATION)
    _ndims = (4,)


class FrozenBatchNorm3d(_FrozenBatchNorm):
    __doc__ = docstring("Batch norm with fixed statistics and affine parameters over (N, C, D, H, W) input.",
                        _ABOUT, 5, _FrozenBatchNorm._settings(), activation=_ACTIVATION)
    _ndims = (5,)


# A cbn layer of any class (SyncBatchNorm1d/2d/3d are BatchNorm1d/2d/3d).
Layer: TypeAlias = (BatchNorm1d | BatchNorm2d | BatchNorm3d | FrozenBatchNorm1d | FrozenBatchNorm2d
                    | FrozenBatchNorm3d)
_FROZEN: dict[tuple[int, ...], type[_FrozenBatchNorm]] = {
    cls._ndims: cls for cls in (FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d)}


def _check_freezable(layer: _BatchNorm) -> _BatchNorm:
    _check_running_stats(layer, "freeze")
    return layer


def _frozen(layer: _BatchNorm) -> _BatchNorm:
    """The frozen layer of ``layer``'s rank with its settings that apply and copies of its parameters and statistics
    (a frozen layer itself)."""
    if isinstance(layer, _FrozenBatchNorm):
        return layer
    cls = _FROZEN[layer._ndims]
    frozen = cls(**{name: getattr(layer._cfg, name) for name in cls._settings()})
    with layer._lock:
        for key in ("weight", "bias", "running_mean", "running_var"):
            if getattr(layer, key) is not None:  # not affine: weight 1, bias 0 as made
                np.copyto(getattr(frozen, key), getattr(layer, key))
        return frozen.train(layer.training)


@overload
def freeze(model: BatchNorm1d) -> FrozenBatchNorm1d: ...
@overload
def freeze(model: BatchNorm2d) -> FrozenBatchNorm2d: ...
@overload
def freeze(model: BatchNorm3d) -> FrozenBatchNorm3d: ...
@overload
def freeze(model: T) -> T: ...
def freeze(model: Any) -> Any:
    """Replace every batch norm in ``model`` by the frozen layer of its rank with its statistics and parameters.

    BatchNorm1d/2d/3d and SyncBatchNorm1d/2d/3d become FrozenBatchNorm1d/2d/3d with copies of their running
    statistics, weight and bias (1 and 0 when not affine), their mode and the settings of an eval-mode batch norm:
    eps, dtype, axis and activation. The training-only settings (momentum, nan_guard, virtual_batch_size, renorm)
    change nothing in eval mode and have no place in a frozen layer. Frozen layers stay as they are. ``model`` is
    walked as :func:`cbn.convert_sync_batchnorm` walks it: a layer shared by several places is replaced by one
    frozen layer everywhere.

    Parameters
    ----------
    model : layer, list, tuple, dict or object
        A layer, or a container or object whose items or attributes hold layers (searched recursively; lists,
        dicts and attributes are updated in place, tuples rebuilt).

    Returns
    -------
    layer, list, tuple, dict or object
        The frozen model (a new layer when ``model`` is a layer).

    Raises
    ------
    ValueError
        A layer has no running statistics (``track_running_stats=False``); every layer is checked before any is
        replaced, so the model is unchanged.
    """
    swap_layers(model, _check_freezable)
    return swap_layers(model, _frozen)
