"""Batch norm for inference and fine-tuning: folding into the layer before it, frozen layers, freezing a model.

A batch norm in eval mode is a per-channel affine map, y = x*s + (beta - running_mean*s) with
s = gamma/sqrt(running_var + eps). :func:`fold` moves it into the weight and bias of the convolution or linear layer
that feeds it; :class:`FrozenBatchNorm2d` (torchvision's ``FrozenBatchNorm2d``) applies it with fixed parameters
and statistics in any mode; :func:`freeze` swaps every batch norm of a model for the frozen layer.
"""
from collections.abc import Mapping

import numpy as np

from . import _validate as V
from . import functional as F
from .distributed import _swap_layers
from .modules import _BatchNorm


def _check_running_stats(bn, what):
    """Raise ValueError when ``bn`` keeps no running statistics (``what`` names the operation that needs them)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"cannot {what} {bn!r}: it has no running statistics (track_running_stats=False), expected "
                         f"running_mean and running_var arrays, got {type(bn.running_mean).__name__} and "
                         f"{type(bn.running_var).__name__}")


def fold(bn, weight, bias=None):
    """Fold a batch norm's inference transform into the convolution or linear layer that feeds it.

    With s = gamma/sqrt(running_var + eps) per channel (gamma 1 and beta 0 when ``bn`` is not affine)::

        weight' = weight*s           (s along axis 0 of weight, the output channels)
        bias'   = (bias - running_mean)*s + beta

    so that ``layer(x, weight', bias')`` equals ``bn(layer(x, weight, bias))`` in eval mode, for a convolution
    ((O, I, kh, kw), (O, I, k), (O, I, kd, kh, kw)) or a linear layer ((O, I)). Computed in float64, returned in
    ``weight``'s dtype. ``bn`` and the arrays passed are not modified.

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
    weight, bias : ndarray
        The folded weight (shape of ``weight``, C-contiguous) and bias ((O,)), both of ``weight``'s dtype.

    Raises
    ------
    TypeError
        ``bn`` is not a cbn batch-norm layer, or ``weight``/``bias`` is not a floating ndarray.
    ValueError
        ``bn`` has no running statistics, the shapes do not match its channel count, or a folded value overflows
        ``weight``'s dtype.
    """
    if not isinstance(bn, _BatchNorm):
        raise TypeError(f"bn must be a cbn batch-norm layer (BatchNorm1d/2d/3d, SyncBatchNorm1d/2d/3d, "
                        f"FrozenBatchNorm1d/2d/3d), got {type(bn).__name__}")
    weight = V.float_array(weight, "weight")
    bias = None if bias is None else V.float_array(bias, "bias")
    with bn._lock:  # one consistent set of parameters and statistics
        _check_running_stats(bn, "fold")
        C = bn.num_features
        if weight.ndim < 1 or weight.shape[0] != C:
            raise ValueError(f"weight must have {C} output channels (bn.num_features) on axis 0, got shape "
                             f"{weight.shape}")
        if bias is not None and bias.shape != (C,):
            raise ValueError(f"bias must have shape ({C},) (bn.num_features), got {bias.shape}")
        gamma = np.ones(C) if bn.weight is None else bn.weight.astype(np.float64)
        beta = np.zeros(C) if bn.bias is None else bn.bias.astype(np.float64)
        mean, var, eps = bn.running_mean.astype(np.float64), bn.running_var.astype(np.float64), bn.eps
    s = gamma / np.sqrt(var + eps)
    folded_weight = weight.astype(np.float64) * s.reshape((C,) + (1,) * (weight.ndim - 1))
    folded_bias = ((0.0 if bias is None else bias.astype(np.float64)) - mean) * s + beta
    return (V.representable(folded_weight, weight.dtype, "folded weight", " (the dtype of weight)"),
            V.representable(folded_bias, weight.dtype, "folded bias", " (the dtype of weight)"))


class _FrozenBatchNorm(_BatchNorm):
    """Common implementation of FrozenBatchNorm1d/2d/3d: a batch norm that always normalises with its fixed
    running statistics and learns nothing (torchvision's ``FrozenBatchNorm2d``).

    The state, locking, input checks, pickling and files are :class:`cbn.modules._BatchNorm`'s, with the
    hyperparameters that describe a frozen layer fixed: ``affine`` and ``track_running_stats`` True, ``momentum``
    0.0 (the statistics never move), ``nan_guard`` False; ``num_batches_tracked`` stays 0 and is not in the
    state_dict.
    """

    def __init__(self, num_features, eps=1e-5, dtype=np.float32, axis=1):
        super().__init__(num_features, eps=eps, momentum=0.0, dtype=dtype, axis=axis)

    def forward(self, x, out=None, mask=None):
        """y = x*scale + shift per channel along ``axis``, in training and eval mode alike.

        scale = weight/sqrt(running_var + eps) and shift = bias - running_mean*scale, computed by the kernels
        as an eval-mode batch norm, weight*(x - running_mean)/sqrt(running_var + eps) + bias, with the mean
        subtracted in double (so float32 output is the float64 result rounded once).

        Parameters
        ----------
        x : ndarray
            Input of one of the accepted ranks, any floating dtype, any layout (the output has x's layout).
        out : ndarray, optional
            Preallocated output (shape of x, output dtype, C-contiguous or with x's memory layout).
        mask : ndarray, optional
            Checked as a BatchNorm's statistics mask and without effect (the statistics are fixed), so that a model
            that passes one runs after :func:`freeze`.

        Returns
        -------
        ndarray
            The output.
        """
        with self._lock:
            inp = self._input(x)
            V.mask(mask, inp)
            y, self._saved = F.forward(inp, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                                       self.eps, out, False)
            return y

    __call__ = forward

    def backward(self, dy, out=None):
        """dx = dy*scale, scale = weight/sqrt(running_var + eps); no parameter gradients (``grad_weight`` and
        ``grad_bias`` stay None).

        Parameters
        ----------
        dy : ndarray
            Gradient of the loss with respect to the last forward's output.
        out : ndarray, optional
            Preallocated dx (shape of dy, the forward's output dtype, C-contiguous or with the input's layout).

        Returns
        -------
        ndarray
            dx, the gradient with respect to the last forward's input.
        """
        with self._lock:
            dx = super().backward(dy, out)
            self.grad_weight = self.grad_bias = None
            return dx

    def _state_keys(self):
        return ["weight", "bias", "running_mean", "running_var"]

    def load_state_dict(self, state, strict=True):
        """Load weight, bias, running_mean and running_var, e.g. from a torchvision ``FrozenBatchNorm2d`` or a
        ``BatchNorm2d``: a ``num_batches_tracked`` entry is ignored (as torchvision drops it on load); the rest as
        :meth:`BatchNorm2d.load_state_dict` (checked before anything is assigned)."""
        if isinstance(state, Mapping):
            state = {key: value for key, value in state.items() if key != "num_batches_tracked"}
        super().load_state_dict(state, strict)

    def extra_repr(self):
        """``num_features, eps=...`` as torchvision prints it (plus the dtype when not float32 and the axis when
        not 1)."""
        s = f"{self.num_features}, eps={self.eps}"
        s = s if self.dtype == np.float32 else s + f", dtype={self.dtype}"
        return s if self.axis == 1 else s + f", axis={self.axis}"

    def _config(self):
        return {"num_features": self.num_features, "eps": self.eps, "dtype": self.dtype.name, "axis": self.axis}

    @classmethod
    def _from_config(cls, config):
        return cls(config["num_features"], config["eps"], config["dtype"], config["axis"])


class FrozenBatchNorm1d(_FrozenBatchNorm):
    """Frozen batch norm over (N, C) or (N, C, L) input; see :class:`FrozenBatchNorm2d`."""

    _ndims = (2, 3)


class FrozenBatchNorm2d(_FrozenBatchNorm):
    """Batch norm with fixed statistics and affine parameters over (N, C, H, W) input, like torchvision's
    ``FrozenBatchNorm2d``.

    y = x*scale + shift per channel, scale = weight/sqrt(running_var + eps), shift = bias - running_mean*scale,
    in every mode; the backward gives dx = dy*scale and no parameter gradients. ``weight``, ``bias``,
    ``running_mean`` and ``running_var`` are (C,) arrays (1, 0, 0, 1 when made; set them, load a state_dict, or
    use :func:`freeze`); the state_dict has torchvision's keys.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    eps : float
        Added to the variance (finite, >= 0).
    dtype : {float32, float64}
        Dtype of the parameters, statistics and computation.
    axis : int
        The channel axis, as in :class:`BatchNorm2d` (1: NCHW, -1: NHWC).
    """

    _ndims = (4,)


class FrozenBatchNorm3d(_FrozenBatchNorm):
    """Frozen batch norm over (N, C, D, H, W) input; see :class:`FrozenBatchNorm2d`."""

    _ndims = (5,)


_FROZEN = {cls._ndims: cls for cls in (FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d)}


def _check_freezable(layer):
    _check_running_stats(layer, "freeze")
    return layer


def _frozen(layer):
    """The frozen layer of ``layer``'s rank with copies of its parameters and statistics (a frozen layer itself)."""
    if isinstance(layer, _FrozenBatchNorm):
        return layer
    frozen = _FROZEN[layer._ndims](layer.num_features, layer.eps, layer.dtype, layer.axis)
    with layer._lock:
        for key in ("weight", "bias", "running_mean", "running_var"):
            if getattr(layer, key) is not None:  # not affine: weight 1, bias 0 as made
                np.copyto(getattr(frozen, key), getattr(layer, key))
        return frozen.train(layer.training)


def freeze(model):
    """Replace every batch norm in ``model`` by the frozen layer of its rank with its statistics and parameters.

    BatchNorm1d/2d/3d and SyncBatchNorm1d/2d/3d become FrozenBatchNorm1d/2d/3d with copies of their running
    statistics, weight and bias (1 and 0 when not affine), eps, dtype, axis and mode; frozen layers stay as they
    are. ``model`` is walked as :func:`cbn.convert_sync_batchnorm` walks it: a layer shared by several places is
    replaced by one frozen layer everywhere.

    Parameters
    ----------
    model : layer, list, tuple, dict or object
        A layer, or a container or object whose items or attributes hold layers (searched recursively; lists,
        dicts and attributes are updated in place, tuples rebuilt).

    Returns
    -------
    The frozen model (a new layer when ``model`` is a layer).

    Raises
    ------
    ValueError
        A layer has no running statistics (``track_running_stats=False``); every layer is checked before any is
        replaced, so the model is unchanged.
    """
    _swap_layers(model, _check_freezable, {})
    return _swap_layers(model, _frozen, {})
