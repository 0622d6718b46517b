"""Batch-norm layer objects with the API and semantics of torch.nn.BatchNorm{1,2,3}d, on NumPy arrays."""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, Self

import numpy as np
import numpy.typing as npt

from . import _validate as V
from . import functional as F
from ._config import FORMAT, FORMAT_VERSION, NAMES, SETTABLE, SINCE, Config, constructor, docstring
from ._typing import BoolArray, FloatArray

_TORCH_SETTINGS = ("num_features", "eps", "momentum", "affine", "track_running_stats")  # as torch's repr shows them
_ARRAY_SETTINGS = ("num_features", "affine", "track_running_stats", "dtype")  # they shape the layer's arrays


class _BatchNorm:
    """Common implementation of BatchNorm1d/2d/3d; subclasses set ``_ndims`` (accepted input ranks).

    The settings are one :class:`cbn._config.Config` record, ``_cfg``, checked when it is set; the layer's
    attributes of the same names read it, and those that do not shape the arrays also set it (checked). The arrays
    (weight, bias, running statistics) stay the same objects for the layer's lifetime: loading and the resets write
    into them. Each call that reads or changes the layer's state (forward, backward, state_dict, load_state_dict,
    the resets, a setting) holds the layer's lock, so one layer may be called from several threads: the calls run
    one after another.
    """

    _ndims: tuple[int, ...] = ()
    _SINCE = SINCE  # the file-format version from which this class's files hold each setting

    # The state (_setup makes it).
    training: bool
    weight: FloatArray | None
    bias: FloatArray | None
    running_mean: FloatArray | None
    running_var: FloatArray | None
    num_batches_tracked: int
    grad_weight: FloatArray | None
    grad_bias: FloatArray | None
    grad_residual: FloatArray | None
    _cfg: Config
    _saved: V.BatchNormSaved | V.GhostSaved | None
    _plan: V.Plan | None
    _population: Any  # a cbn.precise._Population (precise.py imports this module) or None
    _lock: threading.RLock

    # The settings, Config's fields: attributes (the _Setting descriptors below the class) of the types that
    # Config's checks give them; those that shape the arrays are read only.
    eps: float
    momentum: float | None
    nan_guard: bool
    axis: int
    activation: Literal["relu"] | None
    virtual_batch_size: int | None
    renorm: bool
    renorm_clipping: dict[str, float] | None
    if TYPE_CHECKING:
        @property
        def num_features(self) -> int: ...
        @property
        def affine(self) -> bool: ...
        @property
        def track_running_stats(self) -> bool: ...
        @property
        def dtype(self) -> np.dtype[Any]: ...

    @constructor(Config)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._setup(self._configured(*args, **kwargs))

    @classmethod
    def _configured(cls, *args: Any, **kwargs: Any) -> Config:
        """The checked Config of a layer of this class made with these constructor arguments."""
        return cls._validated(Config(*args, **kwargs))

    @classmethod
    def _validated(cls, config: Config) -> Config:
        """``config`` when a layer of this class can have it (its channel axis fits the ranks; with ghost batches,
        the channel axis is not axis 0 for every rank), else raise."""
        V.channel_axis(config.axis, max(cls._ndims))
        if config.virtual_batch_size is not None and all(config.axis % n == 0 for n in cls._ndims):
            where = "" if config.axis == 0 else f", axis 0 of {max(cls._ndims)}-D input"
            raise ValueError("virtual_batch_size splits the batch axis 0, which must not be the channel axis: "
                             f"expected axis other than 0, got axis {config.axis}{where}")
        return config

    @classmethod
    def _settings(cls) -> tuple[str, ...]:
        """The Config fields that this class's constructor takes (and its files hold)."""
        return tuple(name for name in inspect.signature(cls.__init__).parameters if name in NAMES)

    @classmethod
    def _from_config(cls, config: Config) -> Self:
        """A new layer of this class with the checked settings ``config``."""
        layer = cls.__new__(cls)
        layer._setup(config)
        return layer

    def _setup(self, config: Config) -> None:
        """The state of a new layer with the checked settings ``config``: training mode, arrays as torch makes
        them."""
        self._cfg = config
        C, dtype = config.num_features, config.dtype
        self.training = True
        self.weight = np.ones(C, dtype) if config.affine else None
        self.bias = np.zeros(C, dtype) if config.affine else None
        self.running_mean = np.zeros(C, dtype) if config.track_running_stats else None
        self.running_var = np.ones(C, dtype) if config.track_running_stats else None
        self.num_batches_tracked = 0
        self.grad_weight = None
        self.grad_bias = None
        self.grad_residual = None
        self._saved = None
        self._plan = None  # the Plan of the last forward's input (a repeated call with an input that fits it skips
        # the input checks)
        self._population = None  # inside cbn.precise_stats: the exact statistics of the batches seen
        self._lock = threading.RLock()

    # -- mode -------------------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> Self:
        """Set training mode (batch statistics) or eval mode.

        Parameters
        ----------
        mode : bool
            True for training mode, False for eval mode.

        Returns
        -------
        layer
            The layer itself.
        """
        self.training = bool(mode)
        return self

    def eval(self) -> Self:
        """Set eval mode (running statistics).

        Returns
        -------
        layer
            The layer itself.
        """
        return self.train(False)

    # -- computation ------------------------------------------------------------------------------------------
    def forward(self, x: FloatArray, *, out: FloatArray | None = None, residual: FloatArray | None = None,
                mask: BoolArray | None = None) -> FloatArray:
        """Normalise ``x`` over its channel axis ``axis``, then add ``residual`` and apply the layer's activation.

        All in one pass; in training with running statistics, they are updated. Every layer class has this
        signature; the arguments after ``x`` are keywords only (``out`` and ``residual`` are both arrays of x's
        shape: passed by position, one could silently stand for the other).

        Parameters
        ----------
        x : ndarray
            Input of one of the accepted ranks, any floating dtype (converted to the layer dtype; float16 is
            computed in float32 and returned as float16), any layout (the output has x's memory layout).
        out : ndarray, optional
            Preallocated output (shape of x, output dtype, C-contiguous or with x's memory layout).
        residual : ndarray, optional
            Added before the activation: y = act(BN(x) + residual), an array of x's shape (the tail of a ResNet
            block); its gradient is ``grad_residual`` after the backward.
        mask : ndarray, optional
            Masked statistics: a bool array of x's shape without the channel axis (or one that broadcasts to it);
            the batch statistics use only its True positions (more than one), and every position is normalised
            with them (see :func:`cbn.functional.batch_norm`). No effect when the running statistics are used.

        Returns
        -------
        ndarray
            The normalised output.
        """
        with self._lock:
            plan = self._plan
            if (plan is not None and residual is None and mask is None and plan.fits(x) and self._planned(x)
                    and (out is None or plan.fits_out(out, x))):
                return self._planned_forward(plan, x, out)
            c = self._cfg
            inp = self._input(x)
            mask = V.mask(mask, inp)
            record = self.training and self._population is not None  # precise_stats: record, do not update
            count = self.num_batches_tracked
            factor = 0.0
            if self.training and c.track_running_stats and not record:
                count += 1
                factor = self._factor(count)
            use_batch_stats = self.training or self.running_mean is None
            track = not self.training or c.track_running_stats
            y, saved = F.forward(inp, self.running_mean if track else None, self.running_var if track else None,
                                 self.weight, self.bias, use_batch_stats, factor, c.eps, out, c.nan_guard,
                                 c.activation, residual, c.virtual_batch_size if self.training else None,
                                 c.renorm, c.renorm_clipping, update_stats=not record,
                                 mask=mask)
            if record:
                self._population.add(*F.statistics(inp, None if mask is None else F.positions(mask, inp)))
            self.num_batches_tracked = count
            self._saved = saved
            self._plan = V.plan(inp)
            return y

    __call__ = forward

    def _planned(self, x: FloatArray) -> bool:
        """True when a call on ``x`` (which fits the plan of an earlier call) is a plain batch norm (no ghost
        batches, renorm, nan_guard or precise_stats recording in training) that cannot write into x's memory."""
        if not self.training:
            return True
        c = self._cfg
        if c.virtual_batch_size is not None or c.renorm or c.nan_guard or self._population is not None:
            return False
        return x.base is None or not c.track_running_stats or not (
            np.may_share_memory(x, self.running_mean) or np.may_share_memory(x, self.running_var))

    def _planned_forward(self, plan: V.Plan, x: FloatArray, out: FloatArray | None) -> FloatArray:
        """:meth:`forward` of an input that fits ``plan`` (a plain call: :meth:`_planned`) into ``out`` (None, or
        one that fits the plan: :meth:`cbn._validate.Plan.fits_out`)."""
        c = self._cfg
        relu = F._RELU if c.activation == "relu" else 0
        if self.training or self.running_mean is None:
            if self.training and plan.acb[0] * plan.acb[2] == 1:
                V.count_per_channel(1, f"input size {plan.shape}")
            update = self.training and c.track_running_stats
            count = self.num_batches_tracked + update
            channels = (self.running_mean, self.running_var) if update else (None, None)
            y, self._saved = F._planned(plan, x, channels + (self.weight, self.bias),
                                        F._BATCH | relu | (F._UPDATE if update else 0),
                                        self._factor(count) if update else 0.0, c.eps, out)
            self.num_batches_tracked = count
            return y
        y, self._saved = F._planned(plan, x, (self.running_mean, self.running_var, self.weight, self.bias), relu, 0.0,
                                    c.eps, out)
        return y

    def _input(self, x: object) -> V.Input:
        """``x`` checked as an input of an accepted rank with ``num_features`` channels at ``axis`` (an
        :class:`cbn._validate.Input` in the layer dtype), or raise."""
        c = self._cfg
        return V.input_array(x, c.axis, c.dtype, self._ndims, c.num_features)

    def _factor(self, count: int) -> float:
        """The running-statistic factor of the count-th tracked batch: ``momentum``, or 1/count when momentum is
        None (the cumulative average)."""
        momentum = self._cfg.momentum
        return 1.0 / count if momentum is None else momentum

    def _set_grads(self, dx: FloatArray, dweight: FloatArray, dbias: FloatArray,
                   dresidual: FloatArray | None = None) -> FloatArray:
        """Keep a backward's gradients of weight and bias (None when not affine) and of the residual; return dx."""
        self.grad_weight = dweight if self._cfg.affine else None
        self.grad_bias = dbias if self._cfg.affine else None
        self.grad_residual = dresidual
        return dx

    def backward(self, dy: FloatArray, out: FloatArray | None = None) -> FloatArray:
        """Gradient of the last forward's input.

        Also sets ``grad_weight`` and ``grad_bias`` (None if not affine), and ``grad_residual`` (None when the forward
        had no residual).

        Parameters
        ----------
        dy : ndarray
            Gradient of the loss with respect to the last forward's output.
        out : ndarray, optional
            Preallocated dx (shape of dy, the forward's output dtype, C-contiguous or with the input's memory
            layout).

        Returns
        -------
        ndarray
            The gradient dx with respect to the last forward's input.
        """
        with self._lock:
            saved = self._saved
            if saved is None:
                raise RuntimeError("backward called before forward: there is no saved input to differentiate")
            plan = self._plan
            # A saved forward made with the layer's plan (it holds the plan's own order tuple) is consistent: dy
            # needs the checks of grad_output only.
            if (type(saved) is F.BatchNormSaved and plan is not None and saved.order is plan.order
                    and type(dy) is np.ndarray and dy.dtype.kind == "f" and dy.shape == plan.shape
                    and (out is None or plan.fits_out(out, dy, saved.x, saved.y))):
                return self._set_grads(*F.gradient_input(dy, saved, out, None, None, plan))
            return self._set_grads(*F.batch_norm_backward(dy, saved, out=out))

    # -- state ------------------------------------------------------------------------------------------------
    def reset_running_stats(self) -> None:
        """Running mean 0, running variance 1, num_batches_tracked 0."""
        with self._lock:
            if self.running_mean is not None and self.running_var is not None:  # track_running_stats
                self.running_mean.fill(0)
                self.running_var.fill(1)
                self.num_batches_tracked = 0

    def reset_parameters(self) -> None:
        """Reset the running statistics, weight to 1 and bias to 0."""
        with self._lock:
            self.reset_running_stats()
            if self.weight is not None and self.bias is not None:  # affine
                self.weight.fill(1)
                self.bias.fill(0)

    @classmethod
    def _state_keys(cls, config: Config) -> list[str]:
        """The state_dict keys of a layer of this class with the settings ``config``."""
        keys = ["weight", "bias"] if config.affine else []
        return keys + (["running_mean", "running_var", "num_batches_tracked"] if config.track_running_stats else [])

    def state_dict(self) -> dict[str, npt.NDArray[Any]]:
        """Return copies of the parameters and statistics, with torch's keys.

        Returns
        -------
        dict
            {"weight", "bias" (when affine), "running_mean", "running_var", "num_batches_tracked" (when tracking
            running statistics): the arrays, the counter as a 0-d int64 array}.
        """
        with self._lock:
            return {key: np.array(getattr(self, key), dtype=np.int64) if key == "num_batches_tracked"
                    else getattr(self, key).copy() for key in self._state_keys(self._cfg)}

    def load_state_dict(self, state: Mapping[str, npt.ArrayLike], strict: bool = True) -> None:
        """Load parameters and statistics (e.g. ``{k: v.numpy() for k, v in torch_bn.state_dict().items()}``).

        As torch, the values are written into the layer's arrays: whatever holds them (an optimiser, layers that
        share them after :func:`cbn.convert_sync_batchnorm`) sees the loaded state. All entries are checked before
        any is written: on any error the layer is unchanged.

        Parameters
        ----------
        state : mapping of str to array_like
            The entries of :meth:`state_dict`, with torch's keys.
        strict : bool
            Refuse a missing or an unexpected key (else load the keys that are there).

        Raises
        ------
        KeyError
            ``strict`` and a key is missing or unexpected.
        ValueError
            A shape is wrong, a value overflows the layer dtype, a running statistic is not finite, a variance is
            negative, or the counter is not a non-negative integer.
        TypeError
            ``state`` is not a mapping, or a value cannot be read as a real array.
        """
        new = self._checked_state(self._cfg, state, strict)
        with self._lock:
            self._assign(new)

    @classmethod
    def _checked_state(cls, config: Config, state: object, strict: bool) -> dict[str, Any]:
        """The entries of ``state`` that a layer of this class with the settings ``config`` loads, checked and
        converted (arrays to the layer dtype, the counter to an int); raise as :meth:`load_state_dict` says."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping of names to arrays, got {type(state).__name__}")
        keys = cls._state_keys(config)
        missing = [k for k in keys if k not in state]
        unexpected = [k for k in state if k not in keys]
        if strict and (missing or unexpected):
            raise KeyError(f"state_dict mismatch: missing keys {missing}, unexpected keys {unexpected}")
        C = config.num_features
        new: dict[str, Any] = {}
        for key in keys:
            if key not in state:
                continue
            value = np.asarray(state[key])
            if value.dtype.kind not in "fiu":
                raise TypeError(f"{key} must be a real numeric array, got dtype {value.dtype}")
            if key == "num_batches_tracked":
                if value.shape not in ((), (1,)) or value.dtype.kind not in "iu" or int(value.reshape(())) < 0:
                    raise ValueError(f"num_batches_tracked must be a non-negative integer, got {value!r}")
                new[key] = int(value.reshape(()))
                continue
            if value.shape != (C,):
                raise ValueError(f"{key} must have shape ({C},), got {value.shape}")
            cast = V.representable(value, config.dtype, key)
            bad = np.flatnonzero(~np.isfinite(cast))
            if key.startswith("running") and bad.size:
                raise ValueError(f"{key} must be finite, got {cast[bad[0]]} at index {bad[0]}")
            value = cast
            if key == "running_var" and np.any(value < 0):
                raise ValueError(f"running_var must be >= 0, got min {value.min()}")
            new[key] = value
        return new

    def _assign(self, state: Mapping[str, Any]) -> None:
        """Write the checked entries ``state`` into the layer: the arrays in place, the counter by value."""
        for key, value in state.items():
            if key == "num_batches_tracked":
                self.num_batches_tracked = value
            else:
                np.copyto(getattr(self, key), value)

    def __getstate__(self) -> dict[str, Any]:
        """The layer's attributes with the settings as attributes of their names (as cbn has always pickled
        them), less the lock, the saved forward and what a precise_stats block records."""
        with self._lock:
            state = self.__dict__.copy()
        cfg = state.pop("_cfg")
        state.update({name: getattr(cfg, name) for name in NAMES}, _saved=None, _plan=None, _population=None)
        del state["_lock"]
        return state

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        """Restore a pickle of any cbn so far (the settings that an earlier one lacked take their defaults)."""
        state = dict(state)
        self._cfg = self._validated(Config(**{name: state.pop(name) for name in NAMES if name in state}))
        self.__dict__.update(state, _lock=threading.RLock())
        self.__dict__.setdefault("grad_residual", None)
        self.__dict__.setdefault("_population", None)
        self.__dict__.setdefault("_plan", None)

    def extra_repr(self) -> str:
        """The settings as torch 2.13 prints them, then those of cbn's own that differ from their defaults.

        Returns
        -------
        str
            What ``repr`` shows between the parentheses.
        """
        c = self._cfg
        return (f"{c.num_features}, eps={c.eps}, momentum={c.momentum}, affine={c.affine}, bias={c.affine}, "
                f"track_running_stats={c.track_running_stats}"
                + c.shown(name for name in self._settings() if name not in _TORCH_SETTINGS))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    # -- files ------------------------------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        """The settings that ``save`` writes (JSON values): those of this class's constructor."""
        return self._cfg.to_json(self._settings())

    def save(self, path: str | os.PathLike[str]) -> None:
        """Save hyperparameters, mode, parameters and statistics to an .npz file (no pickle inside), atomically.

        Parameters
        ----------
        path : str or os.PathLike
            File to write (written as given, no suffix added).
        """
        config = {"format": FORMAT, "version": FORMAT_VERSION, "class": type(self).__name__,
                  "training": self.training, **self._config()}
        arrays: dict[str, Any] = dict(self.state_dict(), __config__=np.array(json.dumps(config)))
        path = os.fspath(path)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)  # atomic: the file is either the old one or the complete new one
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


class _Setting:
    """The layer attribute of one Config field: reads the layer's setting; sets it (the new record checked as at
    construction) unless it shapes the layer's arrays."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.__doc__ = f"The layer's {name} setting (see :class:`BatchNorm2d`)."

    def __get__(self, layer: _BatchNorm | None, owner: type | None = None) -> object:
        if layer is None:
            return self
        value = getattr(layer._cfg, self.name)
        return dict(value) if isinstance(value, dict) else value  # a copy of renorm_clipping: the record is fixed

    def __set__(self, layer: _BatchNorm, value: Any) -> None:
        if self.name in _ARRAY_SETTINGS:
            raise AttributeError(f"{self.name} is fixed when a layer is made (it shapes the layer's arrays): "
                                 f"make a new layer and load this one's state_dict")
        with layer._lock:
            layer._cfg = layer._validated(dataclasses.replace(layer._cfg, **{self.name: value}))


for _name in NAMES:
    setattr(_BatchNorm, _name, _Setting(_name))


class BatchNorm1d(_BatchNorm):
    __doc__ = docstring("Batch norm over (N, C) or (N, C, L) input, like torch.nn.BatchNorm1d.", SETTABLE, 3, NAMES)
    _ndims = (2, 3)


class BatchNorm2d(_BatchNorm):
    __doc__ = docstring("Batch norm over (N, C, H, W) input, like torch.nn.BatchNorm2d.", SETTABLE, 4, NAMES)
    _ndims = (4,)


class BatchNorm3d(_BatchNorm):
    __doc__ = docstring("Batch norm over (N, C, D, H, W) input, like torch.nn.BatchNorm3d.", SETTABLE, 5, NAMES)
    _ndims = (5,)
