"""Conversions keep the layer: for random settings and state of every layer class, every chain of conversions and
round trips (freeze, convert_sync_batchnorm, revert_sync_batchnorm, pickle, deepcopy, save/load, state_dict into a
fresh layer) gives a layer with the original's settings, mode and state whose forward and backward equal the
original's bitwise (after freeze: the original's eval mode), or raises the documented error. A setting added to the
configuration record (cbn._config.Config) fails test_the_property_test_draws_every_setting until ``_settings`` below
draws it.

Also: one forward signature for every class, and SyncBatchNorm's eval forward under its lock.
"""
import copy
import inspect
import pickle
import threading

import numpy as np
import pytest
from hypothesis import find, given, note
from hypothesis import strategies as st

import cbn
from cbn._config import NAMES
from cbn.distributed import _as_class

try:  # SyncBatchNorm layers need mpi4py and an MPI library (one rank here)
    from mpi4py import MPI  # noqa: F401
    HAVE_MPI = True
except (ImportError, RuntimeError):
    HAVE_MPI = False

CLASSES = {"plain": {2: cbn.BatchNorm1d, 3: cbn.BatchNorm1d, 4: cbn.BatchNorm2d, 5: cbn.BatchNorm3d},
           "sync": {2: cbn.SyncBatchNorm1d, 3: cbn.SyncBatchNorm1d, 4: cbn.SyncBatchNorm2d, 5: cbn.SyncBatchNorm3d},
           "frozen": {2: cbn.FrozenBatchNorm1d, 3: cbn.FrozenBatchNorm1d, 4: cbn.FrozenBatchNorm2d,
                      5: cbn.FrozenBatchNorm3d}}
EVERY_CLASS = sorted({cls for by_rank in CLASSES.values() for cls in by_rank.values()}, key=lambda c: c.__name__)
STEPS = ["freeze", "revert", "pickle", "deepcopy", "save-load", "state_dict"] + (["convert"] if HAVE_MPI else [])
N = 6  # samples: ghost batches of 2 or 3 divide it


@st.composite
def _settings(draw, kind, ndim):
    """Constructor settings of a ``kind`` layer taking ``ndim``-D input: every field of the record that applies."""
    axis = draw(st.integers(-ndim, ndim - 1))
    settings = dict(eps=draw(st.sampled_from([0.0, 1e-5, 0.25])), dtype=draw(st.sampled_from([np.float32, np.float64])),
                    axis=axis, activation=draw(st.sampled_from([None, "relu"])))
    if kind == "frozen":
        return settings
    settings.update(momentum=draw(st.sampled_from([None, 0.0, 0.1, 1.0])), affine=draw(st.booleans()),
                    track_running_stats=draw(st.booleans()), nan_guard=draw(st.booleans()))
    ghost = kind == "plain" and axis % ndim != 0 and draw(st.booleans())
    if ghost:
        settings["virtual_batch_size"] = draw(st.sampled_from([2, 3]))
    elif settings["track_running_stats"] and draw(st.booleans()):
        settings.update(renorm=True, renorm_clipping=draw(st.sampled_from([None, {}, {"rmax": 1.5},
                                                                           {"rmax": 2, "dmax": 0.5}])))
    return settings


@st.composite
def _cases(draw):
    kind = draw(st.sampled_from(["plain", "frozen"] + (["sync"] if HAVE_MPI else [])))
    ndim = draw(st.integers(2, 5))
    settings = draw(_settings(kind, ndim))
    shape = [N] + [draw(st.integers(2, 3)) for _ in range(ndim - 1)]
    shape[settings["axis"] % ndim] = C = draw(st.integers(1, 4))
    chain = draw(st.lists(st.sampled_from(STEPS), min_size=1, max_size=3))
    extras = draw(st.sampled_from(["none", "residual", "mask", "both"]))
    return CLASSES[kind][ndim], C, settings, tuple(shape), draw(st.booleans()), chain, extras, draw(st.integers(0, 99))


def _make(cls, C, settings, training, seed):
    """A ``cls`` layer with these settings, mode and a state drawn from ``seed`` (written into its arrays)."""
    layer = cls(C, **settings).train(training)
    rng = np.random.default_rng(seed)
    for key, lo, hi in (("weight", -2, 2), ("bias", -1, 1), ("running_mean", -1, 1), ("running_var", 0.1, 3)):
        if getattr(layer, key) is not None:
            getattr(layer, key)[...] = rng.uniform(lo, hi, C)
    layer.num_batches_tracked = int(rng.integers(0, 5)) if "num_batches_tracked" in layer.state_dict() else 0
    return layer


def _fresh(layer):
    """A new layer of ``layer``'s class made from its public settings, then its state_dict and mode."""
    params = inspect.signature(type(layer)).parameters
    fresh = type(layer)(**{name: getattr(layer, name) for name in params if name != "comm"})
    fresh.load_state_dict(layer.state_dict())
    return fresh.train(layer.training)


def _step(layer, step, folder):
    """``layer`` after one conversion or round trip."""
    if step == "freeze":
        return cbn.freeze(layer)
    if step == "convert":
        return cbn.convert_sync_batchnorm(layer)
    if step == "revert":
        return cbn.revert_sync_batchnorm(layer)
    if step == "pickle":
        return pickle.loads(pickle.dumps(layer))
    if step == "deepcopy":
        return copy.deepcopy(layer)
    if step == "save-load":
        layer.save(folder / "layer.npz")
        return cbn.load(folder / "layer.npz")
    return _fresh(layer)


def _documented_error(layer, step):
    """The error ``step`` raises on ``layer`` (a pattern of its message), or None."""
    frozen = isinstance(layer, (cbn.FrozenBatchNorm1d, cbn.FrozenBatchNorm2d, cbn.FrozenBatchNorm3d))
    if step == "freeze" and not frozen and not layer.track_running_stats:
        return "it has no running statistics"
    if step == "convert" and not frozen and layer.virtual_batch_size is not None:
        return "SyncBatchNorm takes no virtual_batch_size"
    return None


def _settings_of(layer, names):
    return {name: getattr(layer, name) for name in names}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("conversions")


@given(_cases())
def test_every_conversion_chain_keeps_the_layer(folder, case):
    cls, C, settings, shape, training, chain, extras, seed = case
    original = _make(cls, C, settings, training, seed)
    layer = _make(cls, C, settings, training, seed)
    frozen = cls in CLASSES["frozen"].values()
    for step in chain:
        error = _documented_error(layer, step)
        if error is not None:
            with pytest.raises(ValueError, match=error):
                _step(layer, step, folder)
            return
        layer = _step(layer, step, folder)
        frozen = frozen or step == "freeze"
    note(f"{original!r} -> {chain} -> {layer!r}")
    kept = type(layer)._settings() if frozen else NAMES
    assert _settings_of(layer, kept) == _settings_of(original, kept)
    assert layer.training == original.training
    if frozen:
        original.eval()  # a frozen layer computes the eval transform in either mode
    rng = np.random.default_rng(seed + 1000)
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(layer.dtype)
    dy = rng.standard_normal(shape).astype(layer.dtype)
    z = rng.standard_normal(shape).astype(layer.dtype) if extras in ("residual", "both") else None
    mask = None
    if extras in ("mask", "both"):
        mask = rng.random(np.delete(shape, settings["axis"] % len(shape))) < 0.6
        mask.reshape(mask.shape[0], -1)[:, 0] = True  # every sample (and so every ghost batch) has 2 or more
        mask.flat[:2] = True
    y = original(x, residual=z, mask=mask)
    assert layer(x, residual=z, mask=mask).tobytes() == y.tobytes()
    assert layer.backward(dy).tobytes() == original.backward(dy).tobytes()
    assert (layer.grad_residual is None) == (z is None)
    if z is not None:
        assert layer.grad_residual.tobytes() == original.grad_residual.tobytes()
    state, want = layer.state_dict(), original.state_dict()
    if not frozen:
        assert state.keys() == want.keys()
    assert all(state[k].tobytes() == v.tobytes() for k, v in want.items() if k in state)
    if not frozen:
        for name in ("grad_weight", "grad_bias"):
            a, b = getattr(layer, name), getattr(original, name)
            assert (a is None and b is None) or a.tobytes() == b.tobytes()


@pytest.mark.parametrize("name", NAMES[1:])
def test_the_property_test_draws_every_setting(name):
    """A field added to the record fails here until ``_settings`` draws it; then the property test carries it
    through every conversion."""
    find(st.sampled_from(["plain", "sync", "frozen"]).flatmap(lambda kind: _settings(kind, 4)), lambda s: name in s)


@pytest.mark.parametrize("cls", EVERY_CLASS, ids=lambda c: c.__name__)
def test_one_forward_signature(cls):
    """forward(x, *, out=None, residual=None, mask=None), annotated alike, for every class: the arrays after x are
    keywords, so ``bn(x, None, z)`` cannot pass z as a mask (or an output) after a conversion."""
    sig = inspect.signature(cls.forward)
    assert str(sig) == ("(self, x: 'FloatArray', *, out: 'FloatArray | None' = None, residual: 'FloatArray | None' = "
                        "None, mask: 'BoolArray | None' = None) -> 'FloatArray'")
    assert cls.__call__ is cls.forward
    rank = max(cls._ndims)
    sync = cls in CLASSES["sync"].values()  # made without MPI: the call fails on its arguments first
    layer = _as_class(CLASSES["plain"][rank](3), cls, comm=None, _global_count=None) if sync else cls(3)
    x = np.ones((4, 3) + (2,) * (rank - 2), np.float32)
    with pytest.raises(TypeError, match="positional argument"):
        layer(x, None, x)


def test_sync_eval_forward_holds_the_lock_before_it_writes():
    """SyncBatchNorm's eval forward forgets the last training forward's global count under the layer's lock, as
    every state change does (here, the lock records what the layer held when it was taken)."""
    layer = _as_class(cbn.BatchNorm2d(3).eval(), cbn.SyncBatchNorm2d, comm=None, _global_count=12)
    seen = []

    class Probe:
        lock = threading.RLock()

        def __enter__(self):
            seen.append(layer._global_count)
            return self.lock.__enter__()

        def __exit__(self, *exc):
            return self.lock.__exit__(*exc)

    layer._lock = Probe()
    layer(np.ones((2, 3, 2, 2), np.float32))
    assert seen[0] == 12 and layer._global_count is None
