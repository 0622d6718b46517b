"""Exact population statistics ("precise BN"): ``with cbn.precise_stats(model): ...``."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TypeVar

import numpy as np

from . import functional as F
from ._typing import FloatArray
from ._walk import swap_layers
from .frozen import _FrozenBatchNorm
from .modules import _BatchNorm

T = TypeVar("T")


class _Population:
    """The exact per-channel count, mean and M2 of the training batches a layer saw, merged in float64."""

    count: float  # a float after a SyncBatchNorm's batches (their count is merged in float64)
    mean: FloatArray
    M2: FloatArray
    batches: int

    def __init__(self, C: int) -> None:
        self.count, self.mean, self.M2, self.batches = 0, np.zeros(C), np.zeros(C), 0

    def add(self, count: float, mean: FloatArray, M2: FloatArray) -> None:
        """Merge one batch's statistics (those of :func:`cbn.functional.statistics`) with Chan's formula."""
        self.count, self.mean, self.M2 = F.merge_statistics((self.count, count), (self.mean, mean), (self.M2, M2))
        self.batches += 1

    def commit(self, layer: _BatchNorm) -> None:
        """Set the layer's running mean and variance to the population's mean and unbiased variance (with
        ``nan_guard``, only the channels where both are finite) and its counter to the number of batches; a layer
        that saw no batch keeps its state, one that saw only empty batches its statistics."""
        if not self.batches:
            return
        layer.num_batches_tracked = self.batches
        if self.count < 2:
            return
        dt = layer.running_mean.dtype  # type: ignore[union-attr]  # (a layer with running statistics)
        with np.errstate(all="ignore"):
            mean, var = self.mean.astype(dt), (self.M2 / (self.count - 1.0)).astype(dt)
        F.commit_running_stats(layer.running_mean, layer.running_var,  # type: ignore[arg-type]
                               mean, var, layer.nan_guard)


@contextlib.contextmanager
def precise_stats(model: T) -> Iterator[T]:
    """Set the running statistics of the layers in ``model`` to the exact statistics of the batches of the block.

    Each BatchNorm layer's running statistics become the exact statistics of the training batches it sees inside
    the block (PyTorch's ``swa_utils.update_bn`` averages batch statistics instead). Inside the block, each layer
    with running statistics that runs in training mode records the per-channel count n, mean and
    M2 = sum((x - mean)**2) of every batch (a SyncBatchNorm: of the batch of all ranks), merged in float64 with
    Chan's formula (delta = mean_b - mean_a, n = n_a + n_b: mean = mean_a + delta*n_b/n,
    M2 = M2_a + M2_b + delta**2*n_a*n_b/n), and leaves its running statistics and counter alone; its outputs and
    backward are the normal training ones. On a normal exit::

        running_mean = mean,  running_var = M2/(n - 1),  num_batches_tracked = batches seen

    (each rounded once to the layer dtype; with ``nan_guard``, channels whose statistics are not finite keep theirs).
    A layer that saw no training batch is unchanged. When the block raises, every layer keeps the state it had
    before the block. On every exit the layers go back to their normal behaviour.

    Parameters
    ----------
    model : layer, list, tuple, dict or object
        Searched as :func:`cbn.convert_sync_batchnorm` searches it (items and attributes, recursively); the
        frozen layers and the layers without running statistics are left out.

    Yields
    ------
    layer, list, tuple, dict or object
        ``model`` itself.

    Raises
    ------
    RuntimeError
        A layer of ``model`` is already inside a ``precise_stats`` block (nothing is changed).

    Examples
    --------
    >>> model = [cbn.BatchNorm1d(8), cbn.BatchNorm1d(8)]
    >>> loader = [np.random.default_rng(n).normal(size=(16, 8)) for n in range(3)]
    >>> with cbn.precise_stats(model):
    ...     for x in loader:
    ...         y = model[1].forward(model[0].forward(x))   # training mode
    >>> model[0].num_batches_tracked
    3
    """
    found: list[_BatchNorm] = []
    swap_layers(model, lambda layer: found.append(layer) or layer)  # type: ignore[func-returns-value]
    layers = [layer for layer in found if layer.track_running_stats and not isinstance(layer, _FrozenBatchNorm)]
    busy = [layer for layer in layers if layer._population is not None]
    if busy:
        raise RuntimeError(f"precise_stats blocks cannot nest on a layer: expected layers outside any precise_stats "
                           f"block, got {busy[0]!r} already inside one")
    for layer in layers:
        with layer._lock:
            layer._population = _Population(layer.num_features)
    done = False
    try:
        yield model
        done = True
    finally:
        for layer in layers:
            with layer._lock:
                population, layer._population = layer._population, None
                if done:
                    population.commit(layer)
