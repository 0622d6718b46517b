"""Synchronised batch norm for data-parallel training over MPI (mpi4py): statistics of the global batch.

Every rank of a communicator holds a shard of the batch (any size, zero included). Training forward: each rank
computes its per-channel (count, mean, M2) in float64, one Allgather collects them and every rank merges them with
Chan's formula in rank order, so all ranks get bitwise the same statistics and running statistics. Backward: one
Allgather of the per-channel (sum dy, sum dy*(x - mean)), added in rank order. Eval needs no communication.
The layers are composed of :mod:`cbn.functional`'s primitives, as torch's SyncBatchNorm is of its own: forward
``statistics`` -> Allgather -> ``merge_statistics`` -> ``normalize`` -> ``update_running_stats`` (the update that
BatchNorm's kernel does, bitwise); backward ``gradient_sums`` -> Allgather -> ``gradient_input``. Arguments are
checked once, with :mod:`cbn._validate`, before the first collective.
mpi4py is imported only when a synchronised layer is made (``pip install cbn[mpi]``).
"""
from __future__ import annotations

import inspect
import threading
import types
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

import numpy as np
import numpy.typing as npt

from . import _validate as V
from . import functional as F
from ._config import NAMES, SETTABLE, Config, docstring, signature
from ._typing import BoolArray, FloatArray
from ._walk import swap_layers
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm

if TYPE_CHECKING:
    from mpi4py.MPI import Intracomm

T = TypeVar("T")
L = TypeVar("L", bound=_BatchNorm)


def _mpi() -> types.ModuleType:
    """The mpi4py.MPI module, or an ImportError that says how to install it."""
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as e:
        raise ImportError(f"cbn's SyncBatchNorm needs mpi4py and an MPI library: pip install cbn[mpi] "
                          f"(and an MPI such as Open MPI); importing mpi4py.MPI failed: {e}") from e
    return MPI


def _check_comm(comm: Intracomm | None) -> Intracomm:
    """``comm`` if it is an mpi4py intracommunicator, COMM_WORLD if it is None; else TypeError."""
    MPI = _mpi()
    if comm is None:
        return cast("Intracomm", MPI.COMM_WORLD)
    if not isinstance(comm, MPI.Intracomm) or comm == MPI.COMM_NULL:
        raise TypeError(f"comm must be an mpi4py.MPI.Intracomm (e.g. MPI.COMM_WORLD), got {comm!r}")
    return cast("Intracomm", comm)  # (mypy reads the lazily imported module as a types.ModuleType)


def _gather(comm: Intracomm, row: npt.ArrayLike) -> FloatArray:
    """Every rank's float64 row (all of the same length), stacked in rank order: one Allgather."""
    row = np.ascontiguousarray(row, dtype=np.float64)
    rows = np.empty((comm.Get_size(), row.size))
    comm.Allgather(row, rows)
    return rows


def _raise_if_rejected(ok: FloatArray, error: Exception | None, what: str) -> None:
    """Raise on every rank when any rank rejected its input: its own error there, RuntimeError elsewhere."""
    if error is not None:
        raise error
    bad = np.flatnonzero(ok == 0)
    if bad.size:
        raise RuntimeError(f"SyncBatchNorm {what} abandoned on every rank: rank(s) {bad.tolist()} rejected "
                           f"their input (see the error raised there); no state changed")


class _SyncBatchNorm(_BatchNorm):
    """Common implementation of SyncBatchNorm1d/2d/3d (a BatchNorm whose training statistics span ``comm``)."""

    comm: Intracomm
    _global_count: int | None

    # comm=None, keyword only: in the signature below (the docs read it; a keyword parameter here would not match it
    # for autodoc, and a type checker cannot add one to the parameters that the other layers take from Config)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        comm = kwargs.pop("comm", None)
        self._setup(self._configured(*args, **kwargs), comm)

    __init__.__signature__ = signature(  # type: ignore[attr-defined]
        inspect.Parameter("comm", inspect.Parameter.KEYWORD_ONLY, default=None))

    @classmethod
    def _validated(cls, config: Config) -> Config:
        """BatchNorm's checks, and no ghost batches: SyncBatchNorm normalises with the statistics of the whole
        global batch."""
        config = super()._validated(config)
        if config.virtual_batch_size is not None:
            raise ValueError(f"SyncBatchNorm takes no virtual_batch_size (its statistics are those of the batch of "
                             f"all ranks): expected None, got {config.virtual_batch_size!r}")
        return config

    def _setup(self, config: Config, comm: Intracomm | None = None) -> None:
        super()._setup(config)
        self.comm = _check_comm(comm)
        self._global_count = None  # values per channel (counted) on all ranks in the last synchronised forward

    def forward(self, x: FloatArray, *, out: FloatArray | None = None, residual: FloatArray | None = None,
                mask: BoolArray | None = None) -> FloatArray:
        """Normalise this rank's shard ``x``, in training with the statistics of all ranks' shards together.

        Then add ``residual`` and apply the activation, as BatchNorm does. With ``mask``, the statistics are those
        of the True positions of all ranks' masks (a shard's mask may have none). A collective operation in training
        mode: every rank of ``comm`` must call it (its shard may be empty). The running statistics are updated
        identically on every rank. Eval uses the running statistics (or, with ``track_running_stats=False``, this
        shard's statistics, as torch does) and communicates nothing.

        Parameters
        ----------
        x : ndarray
            This rank's shard of the batch, as :meth:`BatchNorm2d.forward` takes it.
        out, residual, mask : ndarray, optional
            As :meth:`BatchNorm2d.forward`.

        Returns
        -------
        ndarray
            The normalised shard.

        Raises
        ------
        ValueError, TypeError
            On a rank whose input (or ``out``) is bad; the other ranks raise RuntimeError. ValueError on every
            rank when the ranks' channel counts differ or all shards together hold a single value per channel.
        """
        with self._lock:
            if not self.training:
                self._global_count = None
                return super().forward(x, out=out, residual=residual, mask=mask)
            return self._sync_forward(x, out, residual, mask)

    def _sync_forward(self, x: FloatArray, out: FloatArray | None, residual: FloatArray | None,
                      mask: BoolArray | None) -> FloatArray:
        comm, c = self.comm, self._cfg
        C = c.num_features
        error, local, masked = None, np.zeros(2 * C + 1), False
        try:  # everything that can be rejected is checked before the first collective, so no rank waits forever
            inp = self._input(x)
            z = V.residual(residual, inp)
            out = V.out_array(out, "out", inp.x.shape, inp.out_dtype, inp.order,
                              {"input": inp.x, "weight": self.weight, "bias": self.bias,
                               "running_mean": self.running_mean, "running_var": self.running_var, "residual": z})
            weight = V.channel_param(self.weight, "weight", C, c.dtype)
            bias = V.channel_param(self.bias, "bias", C, c.dtype)
            mask = V.mask(mask, inp)
            valid = None if mask is None else F.positions(mask, inp)
            count, mean, M2 = F.statistics(inp, valid)
            masked = valid is not None and inp.x.size > 0
            local = np.concatenate(([count], mean, M2))
        except Exception as e:  # raised below, after the other ranks have heard of it
            error = e
        header = _gather(comm, [C, error is None, masked])
        _raise_if_rejected(header[:, 1], error, "forward")
        if np.any(header[:, 0] != C):
            raise ValueError(f"every rank must have the same number of channels, expected {C} (rank "
                             f"{comm.Get_rank()}), got {header[:, 0].astype(np.int64).tolist()} on ranks 0, 1, ...")
        rows = _gather(comm, local)
        n, mean, M2 = F.merge_statistics(rows[:, 0], rows[:, 1:C + 1], rows[:, C + 1:])  # in rank order
        V.count_per_channel(n, "1 over all ranks")
        if np.any(header[:, 2]):
            V.valid_count(n, " over all ranks")
        var = M2 / n if n else np.full(C, np.nan)
        # Normalised with the global batch statistics: the backward differentiates through them.
        relu, clipping = c.activation == "relu", V.renorm(c.renorm, c.renorm_clipping, None)
        if clipping is None:
            y, saved = F.normalize(inp, mean, var, weight, bias, c.eps, out, relu, z, valid)
        else:
            y, saved = F.renormalize(inp, mean, var, self.running_mean, self.running_var,  # type: ignore[arg-type]
                                     weight, bias, c.eps, clipping, out, relu, z, valid)  # (renorm: tracked)
        if self._population is not None:  # inside precise_stats: the global batch's statistics are recorded
            self._population.add(n, mean, M2)
        elif c.track_running_stats:
            self.num_batches_tracked += 1
            F.update_running_stats(self.running_mean, self.running_var, n, mean, M2,  # type: ignore[arg-type]
                                   self._factor(self.num_batches_tracked), c.nan_guard)
        self._saved, self._global_count = saved, int(n)
        return y

    __call__ = forward

    def backward(self, dy: FloatArray, out: FloatArray | None = None) -> FloatArray:
        """Gradient of the last forward's input; a collective operation after a training forward.

        dx = g*(dy - sum(dy)/M - xhat*sum(dy*xhat)/M) with the sums over all ranks (M values per channel; after a
        forward with masks, as :func:`cbn.functional.batch_norm_backward` says, M the positions counted),
        computed by the kernels as BatchNorm's backward is. ``grad_weight`` = sum(dy*xhat) and ``grad_bias`` =
        sum(dy) over this rank's shard, as in torch's SyncBatchNorm: all-reduce them with the other parameters'
        gradients (their sum over the ranks is the gradient of the whole batch).

        Parameters
        ----------
        dy : ndarray
            Gradient of the loss with respect to the last forward's output (this rank's shard).
        out : ndarray, optional
            Preallocated dx, as :meth:`BatchNorm2d.backward` takes it.

        Returns
        -------
        ndarray
            The gradient dx with respect to the last forward's input.
        """
        with self._lock:
            if self._global_count is None:
                return super().backward(dy, out)
            return self._sync_backward(dy, out)

    def _sync_backward(self, dy: FloatArray, out: FloatArray | None) -> FloatArray:
        saved = cast(V.BatchNormSaved, self._saved)  # a training forward's (SyncBatchNorm has no ghost batches)
        C = saved.x.shape[1]
        error, local = None, np.zeros(2 * C + 1)
        try:
            dy = V.grad_output(dy, saved)
            out = V.grad_out(out, dy, saved)
            sums, dweight, dbias = F.gradient_sums(dy, saved)
            local = np.concatenate(([1.0], sums.ravel()))
        except Exception as e:  # raised below, after the other ranks have heard of it
            error = e
        rows = _gather(self.comm, local)
        _raise_if_rejected(rows[:, 0], error, "backward")
        total = rows[0, 1:].copy()
        for row in rows[1:]:  # rank order: the same bits on every rank
            total += row[1:]
        # dx = (dy - sum(dy)/M)*g - (x - mean)*B with the global sums
        dx, _, _, *dresidual = F.gradient_input(dy, saved, out, total.reshape(2, C), self._global_count)
        return self._set_grads(dx, dweight, dbias, *dresidual)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["comm"] = None  # communicators cannot be pickled: an unpickled layer uses COMM_WORLD
        state["_global_count"] = None
        return state

    def __setstate__(self, state: Mapping[str, Any]) -> None:
        super().__setstate__(state)
        self.comm = _check_comm(self.comm)


_ABOUT = ("Its training statistics (batch renormalization's too) are those of the batch of all ranks of the "
          "communicator ``comm``, identical on every rank. " + SETTABLE)
_OWN = {"virtual_batch_size": """None
    Only None: the statistics are always those of the batch of all ranks.""",
        "comm": """mpi4py.MPI.Intracomm, optional
    The ranks that share the batch (keyword only); default ``MPI.COMM_WORLD``. Pickling keeps everything but the
    communicator: an unpickled or loaded layer uses COMM_WORLD (set ``layer.comm`` to change it)."""}


class SyncBatchNorm1d(_SyncBatchNorm, BatchNorm1d):
    __doc__ = docstring(":class:`BatchNorm1d` whose training statistics are those of the batch of all MPI ranks.",
                        _ABOUT, 3, NAMES + ("comm",), **_OWN)


class SyncBatchNorm2d(_SyncBatchNorm, BatchNorm2d):
    __doc__ = docstring(":class:`BatchNorm2d` whose training statistics are those of the batch of all MPI ranks.",
                        _ABOUT, 4, NAMES + ("comm",), **_OWN)


class SyncBatchNorm3d(_SyncBatchNorm, BatchNorm3d):
    __doc__ = docstring(":class:`BatchNorm3d` whose training statistics are those of the batch of all MPI ranks.",
                        _ABOUT, 5, NAMES + ("comm",), **_OWN)


_SYNC: dict[type[_BatchNorm], type[_SyncBatchNorm]] = {
    BatchNorm1d: SyncBatchNorm1d, BatchNorm2d: SyncBatchNorm2d, BatchNorm3d: SyncBatchNorm3d}
_PLAIN: dict[type[_BatchNorm], type[_BatchNorm]] = {sync: plain for plain, sync in _SYNC.items()}
_SYNC_ONLY = ("comm", "_global_count")


def _as_class(layer: _BatchNorm, cls: type[L], **extra: Any) -> L:
    """A ``cls`` layer with the attributes of ``layer`` (arrays shared, not copied), its own lock and no saved
    forward."""
    new = cls.__new__(cls)
    new.__dict__.update({k: v for k, v in vars(layer).items() if k not in _SYNC_ONLY}, _saved=None,
                        _population=None, _lock=threading.RLock(), **extra)
    return new


def _check_convertible(layer: _BatchNorm) -> _BatchNorm:
    """``layer``, once checked that its SyncBatchNorm can have its settings (raise if not)."""
    if type(layer) in _SYNC:
        _SYNC[type(layer)]._validated(layer._cfg)
    return layer


def convert_sync_batchnorm(model: T, comm: Intracomm | None = None) -> T:
    """Replace every cbn BatchNorm1d/2d/3d in ``model`` by a SyncBatchNorm1d/2d/3d with the same state.

    Like torch's ``SyncBatchNorm.convert_sync_batchnorm``: the new layers share the old ones' arrays (weight,
    bias, running statistics) and keep every setting, the mode and the counter.

    Parameters
    ----------
    model : layer, list, tuple, dict or object
        A layer, or a container or object whose items or attributes hold layers (searched recursively; lists,
        dicts and attributes are updated in place, tuples rebuilt).
    comm : mpi4py.MPI.Intracomm, optional
        Communicator of the new layers; default COMM_WORLD.

    Returns
    -------
    layer, list, tuple, dict or object
        The converted model (a new layer when ``model`` is a layer).

    Raises
    ------
    ValueError
        A layer has a ``virtual_batch_size`` (SyncBatchNorm takes none); nothing is converted.
    """
    comm = _check_comm(comm)
    swap_layers(model, _check_convertible)  # every layer checked first
    return cast(T, swap_layers(model, lambda layer: _as_class(layer, _SYNC[type(layer)], comm=comm,
                                                              _global_count=None)
                               if type(layer) in _SYNC else layer))


@overload
def revert_sync_batchnorm(model: SyncBatchNorm1d) -> BatchNorm1d: ...
@overload
def revert_sync_batchnorm(model: SyncBatchNorm2d) -> BatchNorm2d: ...
@overload
def revert_sync_batchnorm(model: SyncBatchNorm3d) -> BatchNorm3d: ...
@overload
def revert_sync_batchnorm(model: T) -> T: ...
def revert_sync_batchnorm(model: Any) -> Any:
    """Inverse of :func:`convert_sync_batchnorm`: SyncBatchNorm1d/2d/3d back to BatchNorm1d/2d/3d, state kept.

    Parameters
    ----------
    model : layer, list, tuple, dict or object
        Searched as :func:`convert_sync_batchnorm` searches it.

    Returns
    -------
    layer, list, tuple, dict or object
        The reverted model (a new layer when ``model`` is a SyncBatchNorm layer).
    """
    return swap_layers(model, lambda layer: _as_class(layer, _PLAIN[type(layer)])
                       if type(layer) in _PLAIN else layer)
