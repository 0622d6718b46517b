"""State: pickle, deepcopy, save/load, state_dict and load_state_dict (atomic), repr, resets, mode switches."""
import copy
import json
import os
import pickle
import re

import numpy as np
import pytest

import cbn
from cbn._config import FORMAT_VERSION
from cbn._load import LAYER_CLASSES
from cbn.distributed import _as_class
from cbn.modules import _BatchNorm

from bn_helpers import RefLayer, full_snapshot, snapshot, trained_layer

LAYERS = [
    (cbn.BatchNorm1d, (7, 5)),
    (cbn.BatchNorm1d, (4, 5, 9)),
    (cbn.BatchNorm2d, (4, 5, 6, 3)),
    (cbn.BatchNorm3d, (3, 5, 2, 3, 4)),
]
LAYER_IDS = ["1d-NC", "1d-NCL", "2d", "3d"]
HYPER = ("num_features", "eps", "momentum", "affine", "track_running_stats", "dtype", "training")


def configured(cls, shape, *, momentum, dtype, affine=True, track=True, training=True, seed=0):
    layer = trained_layer(cls, shape[1], shape, dtype=dtype, seed=seed, steps=3, eps=1e-3, momentum=momentum,
                          affine=affine, track_running_stats=track)
    return layer.train(training)


def assert_same_layer(a, b, x):
    assert type(a) is type(b)
    for h in HYPER:
        va, vb = getattr(a, h), getattr(b, h)
        assert va == vb and type(va) is type(vb), h
    assert snapshot(a) == snapshot(b)
    for key in ("weight", "bias", "running_mean", "running_var"):
        va, vb = getattr(a, key), getattr(b, key)
        assert (va is None) == (vb is None)
        if va is not None:
            assert va is not vb, f"{key} must not be shared"
            assert vb.flags.writeable and vb.flags.c_contiguous
    ya, yb = a(x), b(x)
    np.testing.assert_array_equal(ya, yb)
    assert ya.dtype == yb.dtype
    assert snapshot(a) == snapshot(b)
    dy = np.linspace(-1, 1, x.size).reshape(x.shape).astype(x.dtype)
    np.testing.assert_array_equal(a.backward(dy), b.backward(dy))


def roundtrip_cases():
    for (cls, shape), lid in zip(LAYERS, LAYER_IDS):
        for momentum in (0.1, None):
            for dtype in (np.float32, np.float64):
                for training in (True, False):
                    yield pytest.param(cls, shape, momentum, dtype, training,
                                       id=f"{lid}-m{momentum}-{np.dtype(dtype).name}-{'train' if training else 'eval'}")


def _pickle(layer, tmp_path):
    return pickle.loads(pickle.dumps(layer))


def _deepcopy(layer, tmp_path):
    return copy.deepcopy(layer)


def _saveload(layer, tmp_path):
    path = tmp_path / "layer.cbn"
    layer.save(path)
    assert path.exists()
    return cbn.load(path)


def _saveload_str(layer, tmp_path):
    path = str(tmp_path / "layer.npz")
    layer.save(path)
    return cbn.load(path)


@pytest.mark.parametrize("how", [_pickle, _deepcopy, _saveload, _saveload_str],
                         ids=["pickle", "deepcopy", "save-load", "save-load-str"])
@pytest.mark.parametrize("cls,shape,momentum,dtype,training", list(roundtrip_cases()))
def test_roundtrip(how, cls, shape, momentum, dtype, training, tmp_path):
    layer = configured(cls, shape, momentum=momentum, dtype=dtype, training=training)
    assert layer.num_batches_tracked == 3
    before = snapshot(layer)
    other = how(layer, tmp_path)
    assert snapshot(layer) == before
    x = (np.random.default_rng(1).standard_normal(shape) * 2 + 1).astype(dtype)
    assert_same_layer(layer, other, x)


@pytest.mark.parametrize("how", [_pickle, _deepcopy, _saveload], ids=["pickle", "deepcopy", "save-load"])
@pytest.mark.parametrize("affine,track", [(False, True), (True, False), (False, False)])
def test_roundtrip_without_affine_or_stats(how, affine, track, tmp_path):
    shape = (4, 3, 5, 5)
    layer = configured(cbn.BatchNorm2d, shape, momentum=0.3, dtype=np.float64, affine=affine, track=track,
                       training=False)
    other = how(layer, tmp_path)
    x = np.random.default_rng(2).standard_normal(shape)
    assert_same_layer(layer, other, x)


def test_copies_are_independent():
    layer = configured(cbn.BatchNorm2d, (4, 3, 5, 5), momentum=0.1, dtype=np.float32)
    for other in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        before = snapshot(layer)
        other(np.ones((2, 3, 4, 4), np.float32) * np.arange(32, dtype=np.float32).reshape(2, 1, 4, 4))
        other.weight[...] = 7
        assert snapshot(layer) == before


@pytest.mark.parametrize("how", [lambda layer: pickle.loads(pickle.dumps(layer)), copy.deepcopy],
                         ids=["pickle", "deepcopy"])
def test_copy_after_forward_needs_its_own_forward_before_backward(how):
    """The last forward's input is not part of a layer's state: a copy made after a forward has nothing to
    differentiate until it runs a forward itself; then its backward is the original's."""
    layer = configured(cbn.BatchNorm2d, (4, 3, 5, 5), momentum=0.1, dtype=np.float32)
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)
    dy = np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    layer(x)
    clone = how(layer)
    before = full_snapshot(clone)
    with pytest.raises(RuntimeError, match="backward called before forward"):
        clone.backward(dy)
    assert full_snapshot(clone) == before  # the failed call changed nothing
    clone(x)
    np.testing.assert_array_equal(clone.backward(dy), layer.backward(dy))
    np.testing.assert_array_equal(clone.grad_weight, layer.grad_weight)
    np.testing.assert_array_equal(clone.grad_bias, layer.grad_bias)


# -- state_dict --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("affine,track,keys", [
    (True, True, ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]),
    (False, True, ["running_mean", "running_var", "num_batches_tracked"]),
    (True, False, ["weight", "bias"]),
    (False, False, []),
])
def test_state_dict_keys(affine, track, keys):
    layer = cbn.BatchNorm2d(4, affine=affine, track_running_stats=track)
    sd = layer.state_dict()
    assert list(sd) == keys
    if track:
        c = sd["num_batches_tracked"]
        assert isinstance(c, np.ndarray) and c.shape == () and c.dtype == np.int64 and int(c) == 0


def test_state_dict_is_a_copy():
    layer = configured(cbn.BatchNorm2d, (4, 3, 5, 5), momentum=0.1, dtype=np.float32)
    before = snapshot(layer)
    sd = layer.state_dict()
    for k, v in sd.items():
        v[...] = 0 if k != "running_var" else 5
    assert snapshot(layer) == before


def test_load_state_dict_copies_and_converts():
    src = configured(cbn.BatchNorm2d, (4, 3, 5, 5), momentum=0.1, dtype=np.float64)
    sd = src.state_dict()
    # read-only, strided, float64 source arrays into a float32 layer
    loaded = {}
    for k, v in sd.items():
        if v.ndim:
            w = np.zeros(2 * v.size)
            w[::2] = v
            v = w[::2]
            v.flags.writeable = False
        loaded[k] = v
    layer = cbn.BatchNorm2d(3, dtype=np.float32)
    layer.load_state_dict(loaded)
    assert layer.num_batches_tracked == 3 and isinstance(layer.num_batches_tracked, int)
    for k in ("weight", "bias", "running_mean", "running_var"):
        a = getattr(layer, k)
        assert a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable
        np.testing.assert_array_equal(a, sd[k].astype(np.float32))
    before = snapshot(layer)
    w[...] = 123.0  # the layer must not alias the source arrays
    assert snapshot(layer) == before
    # and the layer can still train (running stats are updated in place)
    layer(np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32))
    assert layer.num_batches_tracked == 4


def test_load_state_dict_writes_into_the_layer_arrays():
    """As torch's load_state_dict copies into its tensors: whatever holds the layer's arrays (an optimiser's
    parameter list, the SyncBatchNorm that convert_sync_batchnorm made to share them) sees the loaded state."""
    layer = configured(cbn.BatchNorm2d, (4, 3, 5, 5), momentum=0.1, dtype=np.float32)
    params = [layer.weight, layer.bias]
    sync = _as_class(layer, cbn.SyncBatchNorm2d, comm=None, _global_count=None)  # shares the arrays
    held = {key: getattr(layer, key) for key in ("weight", "bias", "running_mean", "running_var")}
    state = configured(cbn.BatchNorm2d, (4, 3, 5, 5), momentum=0.1, dtype=np.float64, seed=5).state_dict()
    layer.load_state_dict(state)
    for key, array in held.items():
        assert getattr(layer, key) is array and getattr(sync, key) is array
        np.testing.assert_array_equal(array, state[key].astype(np.float32))
    assert params[0] is layer.weight and params[1] is layer.bias
    layer.reset_parameters()
    assert all(getattr(layer, key) is array for key, array in held.items())


def test_load_state_dict_negative_strides_then_train():
    layer = cbn.BatchNorm2d(3)
    sd = layer.state_dict()
    for k in ("weight", "bias", "running_mean", "running_var"):
        sd[k] = np.array([1.0, 2.0, 3.0], np.float32)[::-1]
    layer.load_state_dict(sd)
    for k in ("weight", "bias", "running_mean", "running_var"):
        a = getattr(layer, k)
        assert a.flags.c_contiguous and a.flags.writeable
        np.testing.assert_array_equal(a, [3.0, 2.0, 1.0])
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)
    layer(x)
    np.testing.assert_allclose(layer.running_mean, 0.9 * np.array([3.0, 2.0, 1.0]) + 0.1 * x.mean(axis=(0, 2, 3)),
                               rtol=1e-6)


def test_load_state_dict_counter_forms():
    layer = cbn.BatchNorm2d(2)
    sd = layer.state_dict()
    for value, expect in ((np.array(5), 5), (np.array([6], np.int32), 6), (7, 7), (np.uint8(8), 8)):
        sd["num_batches_tracked"] = value
        layer.load_state_dict(sd)
        assert layer.num_batches_tracked == expect


def test_nonstrict_subset():
    layer = configured(cbn.BatchNorm2d, (4, 3, 5, 5), momentum=0.1, dtype=np.float32)
    before = snapshot(layer)
    new_mean = np.array([1.5, -2.0, 0.25], np.float32)
    layer.load_state_dict({"running_mean": new_mean, "something_else": np.zeros(3)}, strict=False)
    np.testing.assert_array_equal(layer.running_mean, new_mean)
    after = snapshot(layer)
    for k in ("weight", "bias", "running_var", "num_batches_tracked"):
        assert after[k] == before[k], k
    # a layer without running stats ignores them non-strictly
    plain = cbn.BatchNorm2d(3, track_running_stats=False)
    full = configured(cbn.BatchNorm2d, (4, 3, 5, 5), momentum=0.1, dtype=np.float32).state_dict()
    plain.load_state_dict(full, strict=False)
    np.testing.assert_array_equal(plain.weight, full["weight"])
    assert plain.running_mean is None


def _bad_state_cases():
    C = 3
    def good():
        return configured(cbn.BatchNorm2d, (4, C, 5, 5), momentum=0.1, dtype=np.float64, seed=9).state_dict()

    def mod(**changes):
        sd = good()
        for k, v in changes.items():
            if v is KeyError:
                del sd[k]
            else:
                sd[k] = v
        return sd

    return [
        ("weight-shape", mod(weight=np.ones(C + 1)), True, ValueError, r"weight must have shape \(3,\)",
         r"got \(4,\)"),
        ("running_var-shape", mod(running_var=np.ones((C, 1))), True, ValueError, r"running_var.*\(3,\)",
         r"got \(3, 1\)"),
        ("running_mean-scalar", mod(running_mean=np.float64(1.0)), True, ValueError, r"running_mean.*\(3,\)",
         r"got \(\)"),
        ("missing-strict", mod(running_var=KeyError), True, KeyError, r"state_dict mismatch",
         r"missing keys \['running_var'\]"),
        ("unexpected-strict", mod(extra=np.zeros(C)), True, KeyError, r"state_dict mismatch",
         r"unexpected keys \['extra'\]"),
        ("mean-nan", mod(running_mean=np.array([0.0, np.nan, 1.0])), True, ValueError, r"running_mean must be finite",
         r"got nan at index 1"),
        ("var-inf", mod(running_var=np.array([1.0, np.inf, 1.0])), True, ValueError, r"running_var must be finite",
         r"got inf at index 1"),
        ("var-overflows-float32", mod(running_var=np.array([1.0, 1.0, 1e300])), True, ValueError,
         r"running_var must be representable in float32", r"got 1e\+300 at index 2"),
        ("weight-overflows-float32", mod(weight=np.array([-1e39, 1.0, 1.0])), True, ValueError,
         r"weight must be representable in float32", r"got -1e\+39 at index 0"),
        ("var-negative", mod(running_var=np.array([1.0, -0.5, 1.0])), True, ValueError, r"running_var must be >= 0",
         r"got min -0\.5"),
        ("counter-negative", mod(num_batches_tracked=np.array(-1)), True, ValueError,
         r"num_batches_tracked must be a non-negative integer", r"got array\(-1\)"),
        ("counter-float", mod(num_batches_tracked=np.array(2.5)), True, ValueError,
         r"num_batches_tracked must be a non-negative integer", r"got array\(2\.5\)"),
        ("counter-vector", mod(num_batches_tracked=np.array([1, 2])), True, ValueError,
         r"num_batches_tracked must be a non-negative integer", r"got array\(\[1, 2\]\)"),
        ("complex", mod(bias=np.ones(C, complex)), True, TypeError, r"bias must be a real numeric array",
         r"got dtype complex128"),
        ("strings", mod(weight=np.array(["1", "2", "3"])), True, TypeError, r"weight must be a real numeric array",
         r"got dtype <U1"),
        ("none", mod(running_mean=None), True, TypeError, r"running_mean must be a real numeric array",
         r"got dtype object"),
        ("bool", mod(weight=np.ones(C, bool)), True, TypeError, r"weight must be a real numeric array",
         r"got dtype bool"),
        # non-strict: the bad entry still aborts the whole load
        ("nonstrict-var-negative", mod(running_var=np.array([1.0, 1.0, -1.0]), weight=KeyError), False, ValueError,
         r"running_var must be >= 0", r"got min -1"),
        ("nonstrict-shape-last", mod(running_var=np.ones(C + 2)), False, ValueError, r"running_var.*\(3,\)",
         r"got \(5,\)"),
    ]


@pytest.mark.parametrize("name,state,strict,exc,expected,actual", _bad_state_cases(),
                         ids=[c[0] for c in _bad_state_cases()])
def test_load_state_dict_is_atomic(name, state, strict, exc, expected, actual):
    layer = configured(cbn.BatchNorm2d, (4, 3, 5, 5), momentum=0.1, dtype=np.float32, seed=1)
    layer(np.ones((2, 3, 2, 2), np.float32) * np.arange(3, dtype=np.float32)[:, None, None])
    before = full_snapshot(layer)
    # all good entries differ from the layer's, so a partial load would show
    assert state.get("running_mean") is None or not np.array_equal(state["running_mean"], layer.running_mean)
    with pytest.raises(exc) as info:
        layer.load_state_dict(state, strict=strict)
    msg = str(info.value)
    assert re.search(expected, msg), f"message {msg!r} does not name the expected value ({expected})"
    assert re.search(actual, msg), f"message {msg!r} does not name the actual value ({actual})"
    assert full_snapshot(layer) == before


@pytest.mark.parametrize("state", [[("weight", np.ones(3))], None, np.ones(3)], ids=["list", "None", "array"])
def test_load_state_dict_needs_a_mapping(state):
    layer = configured(cbn.BatchNorm2d, (4, 3, 5, 5), momentum=0.1, dtype=np.float32)
    before = full_snapshot(layer)
    with pytest.raises(TypeError, match=r"state must be a mapping of names to arrays, got "
                       + type(state).__name__):
        layer.load_state_dict(state)
    assert full_snapshot(layer) == before


# -- files of older versions ---------------------------------------------------------------------------------------
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def _v1_expected():
    """What tests/data/batchnorm2d_v1.* hold: cbn 0.1.0 (format "cbn.batchnorm" version 1, no nan_guard) wrote
    them after this recipe, recomputed here with the float64 reference."""
    ref = RefLayer(3, eps=1e-3, momentum=0.25, weight=[0.5, 1.5, -2.0], bias=[0.25, -0.5, 1.0])
    x = np.arange(2 * 3 * 2 * 2, dtype=np.float64).reshape(2, 3, 2, 2) ** 1.5
    ref.forward(x)
    ref.forward(x[::-1] * 0.5)
    return ref


@pytest.mark.parametrize("how", ["npz", pytest.param("pickle", marks=pytest.mark.skipif(
    int(np.__version__.split(".")[0]) < 2,
    reason="the fixture pickle was written under NumPy 2, whose array pickles NumPy 1.x cannot read"))])
def test_version_1_files_still_load(how):
    """Checkpoints written by cbn 0.1.0 (format version 1, before nan_guard existed) load, train and save."""
    path = os.path.join(DATA, "batchnorm2d_v1." + ("npz" if how == "npz" else "pkl"))
    if how == "npz":
        with np.load(path, allow_pickle=False) as data:
            assert json.loads(str(data["__config__"]))["version"] == 1
        layer = cbn.load(path)
    else:
        with open(path, "rb") as f:
            layer = pickle.load(f)
    ref = _v1_expected()
    assert type(layer) is cbn.BatchNorm2d and layer.num_features == 3 and layer.dtype == np.float64
    assert (layer.eps, layer.momentum, layer.affine, layer.track_running_stats) == (1e-3, 0.25, True, True)
    assert layer.training is False and layer.nan_guard is False and layer.num_batches_tracked == 2
    np.testing.assert_array_equal(layer.weight, ref.weight)
    np.testing.assert_array_equal(layer.bias, ref.bias)
    np.testing.assert_allclose(layer.running_mean, ref.running_mean, rtol=1e-13)
    np.testing.assert_allclose(layer.running_var, ref.running_var, rtol=1e-13)
    x = np.linspace(-3, 3, 4 * 3 * 2 * 2).reshape(4, 3, 2, 2)
    y = layer.train()(x)
    layer.backward(np.ones_like(y))
    assert layer.num_batches_tracked == 3


# -- repr, resets, modes -------------------------------------------------------------------------------------------
def test_repr_like_torch():
    assert repr(cbn.BatchNorm2d(64)) == \
        "BatchNorm2d(64, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)"
    assert repr(cbn.BatchNorm1d(3, eps=1e-3, momentum=None, affine=False, track_running_stats=False)) == \
        "BatchNorm1d(3, eps=0.001, momentum=None, affine=False, bias=False, track_running_stats=False)"
    r = repr(cbn.BatchNorm3d(8, dtype=np.float64))
    assert r.startswith("BatchNorm3d(8, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True")
    assert "float64" in r


def test_reset_running_stats_and_parameters():
    layer = configured(cbn.BatchNorm2d, (4, 3, 5, 5), momentum=0.1, dtype=np.float32)
    w, b = layer.weight.copy(), layer.bias.copy()
    assert layer.num_batches_tracked == 3
    layer.reset_running_stats()
    np.testing.assert_array_equal(layer.running_mean, np.zeros(3, np.float32))
    np.testing.assert_array_equal(layer.running_var, np.ones(3, np.float32))
    assert layer.running_mean.dtype == np.float32 and layer.num_batches_tracked == 0
    np.testing.assert_array_equal(layer.weight, w)
    np.testing.assert_array_equal(layer.bias, b)
    layer(np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32))
    layer.reset_parameters()
    np.testing.assert_array_equal(layer.weight, np.ones(3))
    np.testing.assert_array_equal(layer.bias, np.zeros(3))
    np.testing.assert_array_equal(layer.running_mean, np.zeros(3))
    np.testing.assert_array_equal(layer.running_var, np.ones(3))
    assert layer.num_batches_tracked == 0
    # without affine / stats the resets are no-ops that do not fail
    plain = cbn.BatchNorm2d(3, affine=False, track_running_stats=False)
    plain.reset_running_stats()
    plain.reset_parameters()
    assert plain.weight is None and plain.running_mean is None


def test_defaults():
    layer = cbn.BatchNorm2d(3)
    assert layer.training is True and layer.dtype == np.float32
    assert layer.eps == 1e-5 and layer.momentum == 0.1 and layer.affine and layer.track_running_stats
    np.testing.assert_array_equal(layer.weight, np.ones(3))
    np.testing.assert_array_equal(layer.bias, np.zeros(3))
    np.testing.assert_array_equal(layer.running_mean, np.zeros(3))
    np.testing.assert_array_equal(layer.running_var, np.ones(3))
    assert layer.num_batches_tracked == 0
    for a in (layer.weight, layer.bias, layer.running_mean, layer.running_var):
        assert a.dtype == np.float32


def test_train_eval_return_self():
    layer = cbn.BatchNorm1d(2)
    assert layer.eval() is layer and layer.training is False
    assert layer.train() is layer and layer.training is True
    assert layer.train(False) is layer and layer.training is False
    assert layer.train(True) is layer and layer.training is True


def test_load_rejects_foreign_file(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, weight=np.ones(3))
    with pytest.raises((KeyError, ValueError)):
        cbn.load(path)


def _write(path, config, **arrays):
    np.savez(path, __config__=np.array(json.dumps(config)), **arrays)


_V1 = {"format": "cbn.batchnorm", "version": 1, "class": "BatchNorm2d", "num_features": 3, "eps": 1e-5,
       "momentum": 0.1, "affine": True, "track_running_stats": True, "dtype": "float32", "training": True}


@pytest.mark.parametrize("config,exc,expected,actual", [
    (dict(_V1, version=FORMAT_VERSION + 1), ValueError,
     rf"known version \(format 'cbn\.batchnorm', version 1 to {FORMAT_VERSION}\)",
     rf"got \('cbn\.batchnorm', {FORMAT_VERSION + 1}\)"),
    (dict(_V1, format="other"), ValueError, r"format 'cbn\.batchnorm'", r"got \('other', 1\)"),
    (None, ValueError, r"known version", r"got None"),
    (dict(_V1, training="yes"), ValueError, r"'training' must be true or false", r"got 'yes'"),
    (dict(_V1, nan_guard=1), ValueError, r"'nan_guard' must be true or false", r"got 1"),
    (dict(_V1, **{"class": "Conv2d"}), ValueError,
     r"one of \['BatchNorm1d', 'BatchNorm2d', 'BatchNorm3d', 'FrozenBatchNorm1d', 'FrozenBatchNorm2d', "
     r"'FrozenBatchNorm3d', 'SyncBatchNorm1d'",
     r"unknown layer class 'Conv2d'"),
    (dict(_V1, version=2, axis=4), ValueError, r"axis must be in \[-4, 4\) for 4-D input", r"got 4\b"),
    (dict(_V1, version=2, axis="last"), ValueError, r"axis must be an integer", r"got 'last'"),
    (dict(_V1, version=3, activation="gelu"), ValueError, r"activation must be None or 'relu'", r"got 'gelu'"),
    (dict(_V1, version=4, virtual_batch_size=0), ValueError, r"virtual_batch_size must be an integer >= 1",
     r"got 0\b"),
    (dict(_V1, version=4, axis=0, virtual_batch_size=8), ValueError, r"expected axis other than 0", r"got axis 0"),
], ids=["future-version", "foreign-format", "no-config", "training-str", "nan_guard-int", "unknown-class", "axis-4",
        "axis-str", "activation-gelu", "virtual-batch-size-0", "virtual-batch-size-axis-0"])
def test_load_rejects_bad_files(tmp_path, config, exc, expected, actual):
    path = tmp_path / "bad.npz"
    state = cbn.BatchNorm2d(3).state_dict()
    if config is None:
        np.savez(path, **state)
    else:
        _write(path, config, **state)
    with pytest.raises(exc) as info:
        cbn.load(path)
    assert re.search(expected, str(info.value)) and re.search(actual, str(info.value)), str(info.value)


def _current(cls="BatchNorm2d", **changes):
    """A config of the current format version for a ``cls`` layer of 3 channels, with ``changes`` (KeyError drops
    the key), and the layer's state_dict."""
    layer = LAYER_CLASSES[cls](3)
    config = {"format": "cbn.batchnorm", "version": FORMAT_VERSION, "class": cls, "training": True,
              **layer._config()}
    config.update(changes)
    return {k: v for k, v in config.items() if v is not KeyError}, layer.state_dict()


@pytest.mark.parametrize("config,arrays,expected", [
    (_current(eps=KeyError), {}, r"config key 'eps' is missing"),
    (_current(**{"class": KeyError}), {}, r"config 'class' names an unknown layer class None"),
    (_current(training=KeyError), {}, r"config key 'training' is missing"),
    (_current(activation=KeyError), {}, r"config key 'activation' is missing"),
    (_current(momentum_max=0.5), {}, r"unexpected config key 'momentum_max'"),
    (_current("FrozenBatchNorm2d", momentum=0.1), {}, r"unexpected config key 'momentum'"),
    (_current("SyncBatchNorm2d", virtual_batch_size=2), {}, r"SyncBatchNorm takes no virtual_batch_size"),
    (_current(affine="yes"), {}, r"config 'affine' must be true or false, got 'yes'"),
    (_current(renorm=1), {}, r"config 'renorm' must be true or false, got 1"),
    (_current(dtype=5), {}, r"config 'dtype' must be a dtype name such as 'float32', got 5"),
    (_current(dtype="int8"), {}, r"dtype must be float32 or float64, got int8"),
    (_current(momentum="0.1"), {}, r"momentum must be a number in \[0, 1\], got '0\.1'"),
    (_current(num_features=3.0), {}, r"num_features must be an integer >= 1, got 3\.0"),
    (_current(version=True), {}, r"known version .* got \('cbn\.batchnorm', True\)"),
    (_current(), {"running_var": KeyError}, r"missing keys \['running_var'\]"),
    (_current(), {"extra": np.ones(3)}, r"unexpected keys \['extra'\]"),
    (_current(), {"bias": np.ones(3, complex)}, r"bias must be a real numeric array, got dtype complex128"),
    (_current(), {"weight": np.ones(4, np.float32)}, r"weight must have shape \(3,\), got \(4,\)"),
    (_current(), {"__config__": np.array("{not json")}, r"__config__ must be JSON text"),
], ids=["no-eps", "no-class", "no-training", "no-activation", "extra-key", "frozen-momentum", "sync-ghost",
        "affine-str", "renorm-int", "dtype-int", "dtype-int8", "momentum-str", "num_features-float", "version-bool",
        "no-running_var", "extra-array", "complex-array", "weight-shape", "config-not-json"])
def test_load_rejects_malformed_files(tmp_path, monkeypatch, config, arrays, expected):
    """Every malformed file is a ValueError naming the key, and no layer is set up (its arrays, an MPI
    communicator for a SyncBatchNorm) before the whole file is checked."""
    config, state = config
    state = dict(state, __config__=np.array(json.dumps(config)))
    for key, value in arrays.items():
        if value is KeyError:
            del state[key]
        else:
            state[key] = value
    np.savez(tmp_path / "bad.npz", **state)
    made, setup = [], _BatchNorm._setup
    monkeypatch.setattr(_BatchNorm, "_setup", lambda layer, config: made.append(layer) or setup(layer, config))
    with pytest.raises(ValueError, match=expected):
        cbn.load(tmp_path / "bad.npz")
    assert made == []


@pytest.mark.parametrize("content", [b"not an archive", b"PK\x03\x04 truncated", "npy"], ids=["text", "zip", "npy"])
def test_load_rejects_files_that_are_no_npz(tmp_path, content):
    path = tmp_path / "bad.npz"
    if content == "npy":
        np.save(path.with_suffix(".npy"), np.ones(3))
        path = path.with_suffix(".npy")
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"cannot load {path}"):
        cbn.load(path)


def test_load_knows_every_layer_class():
    """load() rebuilds every public layer class from a fixed table, whatever was imported before (no registry)."""
    public = {name for name in cbn.__all__ if name.endswith(("BatchNorm1d", "BatchNorm2d", "BatchNorm3d"))}
    assert {name: cls.__name__ for name, cls in LAYER_CLASSES.items()} == {n: n for n in public}
