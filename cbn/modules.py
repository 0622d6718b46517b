"""Batch-norm layer objects with the API and semantics of torch.nn.BatchNorm{1,2,3}d, on NumPy arrays."""
import json
import os
import threading
from collections.abc import Mapping

import numpy as np

from . import _validate as V
from . import functional as F

FORMAT = "cbn.batchnorm"
FORMAT_VERSION = 4  # 2: the channel axis; 3: the fused activation; 4: virtual_batch_size and renorm (earlier
# files load with axis 1, no activation, no virtual batches, no renorm)


class _BatchNorm:
    """Common implementation of BatchNorm1d/2d/3d; subclasses set ``_ndims`` (accepted input ranks).

    Each call that reads or changes the layer's state (forward, backward, state_dict, load_state_dict, the resets)
    holds the layer's lock, so one layer may be called from several threads: the calls run one after another.
    """

    _ndims = ()

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 dtype=np.float32, nan_guard=False, axis=1, activation=None, *, virtual_batch_size=None, renorm=False,
                 renorm_clipping=None):
        num_features = V.integer(num_features, "num_features", 1)
        V.channel_axis(axis, max(self._ndims))
        self.activation = V.activation(activation)
        self.virtual_batch_size = V.virtual_batch_size(virtual_batch_size)
        if self.virtual_batch_size is not None and axis == 0:
            raise ValueError("virtual_batch_size splits the batch axis 0, which must not be the channel axis: "
                             "expected axis other than 0, got axis 0")
        clipping = V.renorm(renorm, renorm_clipping, self.virtual_batch_size)
        if clipping is not None and not track_running_stats:
            raise ValueError("renorm needs running statistics: expected track_running_stats=True with renorm=True, "
                             f"got track_running_stats={track_running_stats!r}")
        self.renorm = bool(renorm)
        self.renorm_clipping = None if renorm_clipping is None else dict(zip(("rmax", "dmax"), clipping))
        V.scalars(0.0 if momentum is None else momentum, eps)
        dtype = V.compute_dtype(dtype)
        self.num_features = num_features
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.dtype = dtype
        self.nan_guard = bool(nan_guard)
        self.axis = int(axis)
        self.training = True
        C = self.num_features
        self.weight = np.ones(C, dtype) if self.affine else None
        self.bias = np.zeros(C, dtype) if self.affine else None
        self.running_mean = np.zeros(C, dtype) if self.track_running_stats else None
        self.running_var = np.ones(C, dtype) if self.track_running_stats else None
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
    def train(self, mode=True):
        """Set training mode (batch statistics) or eval mode; return self."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Set eval mode (running statistics); return self."""
        return self.train(False)

    # -- computation ------------------------------------------------------------------------------------------
    def forward(self, x, out=None, residual=None, mask=None):
        """Normalise ``x`` over its channel axis ``axis`` (then add ``residual`` and apply the layer's activation, in
        the same pass); in training with running stats, update them.

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
            if (plan is not None and out is None and residual is None and mask is None and plan.fits(x)
                    and self._planned(x)):
                return self._planned_forward(plan, x)
            inp = self._input(x)
            mask = V.mask(mask, inp)
            record = self.training and self._population is not None  # precise_stats: record, do not update
            count = self.num_batches_tracked
            factor = 0.0
            if self.training and self.track_running_stats and not record:
                count += 1
                factor = self._factor(count)
            use_batch_stats = self.training or self.running_mean is None
            track = not self.training or self.track_running_stats
            y, saved = F.forward(inp, self.running_mean if track else None, self.running_var if track else None,
                                 self.weight, self.bias, use_batch_stats, factor, self.eps, out, self.nan_guard,
                                 self.activation, residual, self.virtual_batch_size if self.training else None,
                                 self.renorm, self.renorm_clipping, update_stats=not record,
                                 mask=mask)
            if record:
                self._population.add(*F.statistics(inp, None if mask is None else F.positions(mask, inp)))
            self.num_batches_tracked = count
            self._saved = saved
            self._plan = V.plan(inp)
            return y

    __call__ = forward

    def _planned(self, x):
        """True when a call on ``x`` (which fits the plan of an earlier call) is a plain batch norm (no ghost
        batches, renorm, nan_guard or precise_stats recording in training) that cannot write into x's memory."""
        if not self.training:
            return True
        if self.virtual_batch_size is not None or self.renorm or self.nan_guard or self._population is not None:
            return False
        return x.base is None or not self.track_running_stats or not (
            np.may_share_memory(x, self.running_mean) or np.may_share_memory(x, self.running_var))

    def _planned_forward(self, plan, x):
        """:meth:`forward` of an input that fits ``plan`` (a plain call: :meth:`_planned`)."""
        C = self.num_features
        stats = np.empty(2 * C)
        relu = F._RELU if self.activation == "relu" else 0
        if self.training or self.running_mean is None:
            if self.training and plan.acb[0] * plan.acb[2] == 1:
                V.count_per_channel(1, f"input size {plan.shape}")
            update = self.training and self.track_running_stats
            count = self.num_batches_tracked + update
            channels = (self.running_mean, self.running_var) if update else (None, None)
            y, self._saved = F._normalize(plan, x, stats, channels + (self.weight, self.bias),
                                          F._BATCH | relu | (F._UPDATE if update else 0),
                                          self._factor(count) if update else 0.0, self.eps)
            self.num_batches_tracked = count
            return y
        stats[:C], stats[C:] = self.running_mean, self.running_var
        y, self._saved = F._normalize(plan, x, stats, (None, None, self.weight, self.bias), relu, 0.0, self.eps)
        return y

    def _input(self, x):
        """``x`` checked as an input of an accepted rank with ``num_features`` channels at ``axis`` (an
        :class:`cbn._validate.Input` in the layer dtype), or raise."""
        return V.input_array(x, self.axis, self.dtype, self._ndims, self.num_features)

    def _factor(self, count):
        """The running-statistic factor of the count-th tracked batch: ``momentum``, or 1/count when momentum is
        None (the cumulative average)."""
        return 1.0 / count if self.momentum is None else self.momentum

    def _set_grads(self, dx, dweight, dbias, dresidual=None):
        """Keep a backward's gradients of weight and bias (None when not affine) and of the residual; return dx."""
        self.grad_weight = dweight if self.affine else None
        self.grad_bias = dbias if self.affine else None
        self.grad_residual = dresidual
        return dx

    def backward(self, dy, out=None):
        """Gradient of the last forward's input; also sets ``grad_weight`` and ``grad_bias`` (None if not affine), and
        ``grad_residual`` (None when the forward had no residual).

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
            dx, the gradient with respect to the last forward's input.
        """
        with self._lock:
            saved = self._saved
            if saved is None:
                raise RuntimeError("backward called before forward: there is no saved input to differentiate")
            plan = self._plan
            # A saved forward made with the layer's plan (it holds the plan's own order tuple) is consistent: dy
            # needs the checks of grad_output only.
            if (out is None and type(saved) is F.BatchNormSaved and plan is not None and saved.order is plan.order
                    and type(dy) is np.ndarray and dy.dtype.kind == "f" and dy.shape == plan.shape):
                return self._set_grads(*F.gradient_input(dy, saved, None, None, None, plan))
            return self._set_grads(*F.batch_norm_backward(dy, saved, out=out))

    # -- state ------------------------------------------------------------------------------------------------
    def reset_running_stats(self):
        """Running mean 0, running variance 1, num_batches_tracked 0."""
        with self._lock:
            if self.track_running_stats:
                self.running_mean.fill(0)
                self.running_var.fill(1)
                self.num_batches_tracked = 0

    def reset_parameters(self):
        """Reset the running statistics, weight to 1 and bias to 0."""
        with self._lock:
            self.reset_running_stats()
            if self.affine:
                self.weight.fill(1)
                self.bias.fill(0)

    def _state_keys(self):
        keys = ["weight", "bias"] if self.affine else []
        return keys + (["running_mean", "running_var", "num_batches_tracked"] if self.track_running_stats else [])

    def state_dict(self):
        """Return a dict of copies, with torch's keys: weight, bias, running_mean, running_var, num_batches_tracked."""
        with self._lock:
            return {key: np.array(getattr(self, key), dtype=np.int64) if key == "num_batches_tracked"
                    else getattr(self, key).copy() for key in self._state_keys()}

    def load_state_dict(self, state, strict=True):
        """Load parameters and statistics (e.g. ``{k: v.numpy() for k, v in torch_bn.state_dict().items()}``).

        All entries are checked before any is assigned: on any error the layer is unchanged.

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
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping of names to arrays, got {type(state).__name__}")
        keys = self._state_keys()
        missing = [k for k in keys if k not in state]
        unexpected = [k for k in state if k not in keys]
        if strict and (missing or unexpected):
            raise KeyError(f"state_dict mismatch: missing keys {missing}, unexpected keys {unexpected}")
        new = {}
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
            if value.shape != (self.num_features,):
                raise ValueError(f"{key} must have shape ({self.num_features},), got {value.shape}")
            cast = V.representable(value, self.dtype, key)
            bad = np.flatnonzero(~np.isfinite(cast))
            if key.startswith("running") and bad.size:
                raise ValueError(f"{key} must be finite, got {cast[bad[0]]} at index {bad[0]}")
            value = cast
            if key == "running_var" and np.any(value < 0):
                raise ValueError(f"running_var must be >= 0, got min {value.min()}")
            new[key] = value
        with self._lock:
            for key, value in new.items():
                setattr(self, key, value)

    def __getstate__(self):
        with self._lock:
            state = self.__dict__.copy()
        state["_saved"] = None  # the last forward's input is not part of the layer's state
        state["_plan"] = None
        state["_population"] = None  # nor what a precise_stats block records
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__dict__.setdefault("nan_guard", False)  # pickles of cbn 0.1.0 have no nan_guard
        self.__dict__.setdefault("axis", 1)  # nor an axis
        self.__dict__.setdefault("activation", None)  # pickles before cbn 0.2 have no activation
        self.__dict__.setdefault("grad_residual", None)
        self.__dict__.setdefault("virtual_batch_size", None)  # nor before cbn 0.3 ghost batches
        self.__dict__.setdefault("renorm", False)  # nor batch renormalization
        self.__dict__.setdefault("renorm_clipping", None)
        self.__dict__.setdefault("_population", None)
        self.__dict__.setdefault("_plan", None)
        self._lock = threading.RLock()

    def extra_repr(self):
        """Hyperparameters as torch 2.13 prints them (plus the dtype when it is not float32, nan_guard if on, the
        axis if not 1, the activation, the virtual batch size and batch renormalization if any)."""
        s = (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
             f"bias={self.affine}, track_running_stats={self.track_running_stats}")
        s = s if self.dtype == np.float32 else s + f", dtype={self.dtype}"
        s = s + ", nan_guard=True" if self.nan_guard else s
        s = s if self.axis == 1 else s + f", axis={self.axis}"
        s = s if self.activation is None else s + f", activation={self.activation!r}"
        s = s if self.virtual_batch_size is None else s + f", virtual_batch_size={self.virtual_batch_size}"
        s = s + ", renorm=True" if self.renorm else s
        return s if self.renorm_clipping is None else s + f", renorm_clipping={self.renorm_clipping}"

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"

    # -- files ------------------------------------------------------------------------------------------------
    def _config(self):
        """The hyperparameters that ``save`` writes (JSON values) and :meth:`_from_config` reads back."""
        return {"num_features": self.num_features, "eps": self.eps, "momentum": self.momentum, "affine": self.affine,
                "track_running_stats": self.track_running_stats, "dtype": self.dtype.name,
                "nan_guard": self.nan_guard, "axis": self.axis, "activation": self.activation,
                "virtual_batch_size": self.virtual_batch_size, "renorm": self.renorm,
                "renorm_clipping": self.renorm_clipping}

    @classmethod
    def _from_config(cls, config):
        """A new layer with the hyperparameters of a file's config (version-1 files have no nan_guard and no axis,
        versions 1 and 2 no activation, versions 1 to 3 no virtual batch size and no renorm)."""
        return cls(config["num_features"], config["eps"], config["momentum"], config["affine"],
                   config["track_running_stats"], config["dtype"], config.get("nan_guard", False),
                   config.get("axis", 1), config.get("activation"),
                   virtual_batch_size=config.get("virtual_batch_size"), renorm=config.get("renorm", False),
                   renorm_clipping=config.get("renorm_clipping"))

    def save(self, path):
        """Save hyperparameters, mode, parameters and statistics to an .npz file (no pickle inside), atomically.

        Parameters
        ----------
        path : str or os.PathLike
            File to write (written as given, no suffix added).
        """
        config = {"format": FORMAT, "version": FORMAT_VERSION, "class": type(self).__name__,
                  "training": self.training, **self._config()}
        arrays = dict(self.state_dict(), __config__=np.array(json.dumps(config)))
        path = os.fspath(path)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)  # atomic: the file is either the old one or the complete new one
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


class BatchNorm1d(_BatchNorm):
    """Batch norm over (N, C) or (N, C, L) input; see :class:`BatchNorm2d`."""

    _ndims = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch norm over (N, C, H, W) input, like torch.nn.BatchNorm2d.

    Parameters
    ----------
    num_features : int
        C, the number of channels.
    eps : float
        Added to the variance (finite, >= 0).
    momentum : float or None
        Running-statistic factor in [0, 1]; None means the cumulative average over all batches seen.
    affine : bool
        Learn weight (gamma) and bias (beta).
    track_running_stats : bool
        Keep running statistics for eval; without them batch statistics are used in both modes.
    dtype : {float32, float64}
        Dtype of the parameters, statistics and computation.
    nan_guard : bool
        In training, leave the running statistics of a channel unchanged when its batch statistics are not finite
        (NaN or Inf in its values); see :func:`cbn.functional.batch_norm`. The counter still counts the batch.
    axis : int
        The channel axis: 1 (NCHW, and channels-last arrays viewed as NCHW, as torch takes them) or -1 (NHWC, as
        Keras takes it), any axis in [-4, 4). The layer still takes 4-D input only.
    activation : {None, "relu"}
        Fused activation, y = max(0, BN(x) [+ residual]) in the same pass as the normalisation; the backward takes
        the ReLU's mask from the saved output.
    virtual_batch_size : int, optional
        Ghost batches (keyword only): in training, axis 0 is split into groups of this many samples (the last may be
        smaller), each normalised with its own statistics; the running statistics are updated once per call with
        the average over groups of the groups' means and unbiased variances; see
        :func:`cbn.functional.batch_norm`. Eval is unchanged. The channel axis must not be 0.
    renorm : bool
        Batch renormalization (Ioffe 2017; keyword only, needs ``track_running_stats``, not with
        ``virtual_batch_size``): in training y = weight*((x - mean_B)/sigma_B*r + d) + bias with
        r = clip(sigma_B/sigma, 1/rmax, rmax) and d = clip((mean_B - running_mean)/sigma, -dmax, dmax),
        sigma = sqrt(running_var + eps), r and d constants for the gradient; see :func:`cbn.functional.batch_norm`.
    renorm_clipping : dict, optional
        {"rmax": >= 1, "dmax": >= 0} (keyword only; a missing key or None: no clipping, as Keras).
    """

    _ndims = (4,)


class BatchNorm3d(_BatchNorm):
    """Batch norm over (N, C, D, H, W) input; see :class:`BatchNorm2d`."""

    _ndims = (5,)


def load(path):
    """Load a layer written by ``save``; reads with ``allow_pickle=False``.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    BatchNorm1d/2d/3d, SyncBatchNorm1d/2d/3d (on COMM_WORLD) or FrozenBatchNorm1d/2d/3d
    """
    with np.load(os.fspath(path), allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    config = json.loads(str(arrays.pop("__config__", "null")))
    if not isinstance(config, dict) or config.get("format") != FORMAT or config.get("version") not in range(
            1, FORMAT_VERSION + 1):
        got = (config.get("format"), config.get("version")) if isinstance(config, dict) else config
        raise ValueError(f"not a cbn layer file of a known version (format {FORMAT!r}, version 1 to "
                         f"{FORMAT_VERSION}), got {got!r}")
    for key in ("training", "nan_guard"):  # nan_guard is absent from files of cbn 0.1.0: off, and axis: 1
        if not isinstance(config.get(key, False), bool):
            raise ValueError(f"config {key!r} must be true or false, got {config.get(key)!r}")
    classes = _layer_classes()
    if config["class"] not in classes:
        raise ValueError(f"unknown layer class {config['class']!r}, expected one of {sorted(classes)}")
    layer = classes[config["class"]]._from_config(config)
    layer.load_state_dict(arrays)
    return layer.train(config["training"])


def _layer_classes():
    """The classes :func:`load` rebuilds, by name (cbn.distributed and cbn.frozen, which build on this module,
    imported here)."""
    from . import distributed, frozen
    return {cls.__name__: cls for cls in (BatchNorm1d, BatchNorm2d, BatchNorm3d, distributed.SyncBatchNorm1d,
                                          distributed.SyncBatchNorm2d, distributed.SyncBatchNorm3d,
                                          frozen.FrozenBatchNorm1d, frozen.FrozenBatchNorm2d,
                                          frozen.FrozenBatchNorm3d)}
