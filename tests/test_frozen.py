"""fold, FrozenBatchNorm1d/2d/3d and freeze: against their formulas, PyTorch (skipped when torch is not installed,
failed when CBN_EXPECT_TORCH=1) and torchvision's state_dict keys; state, threads and bad input."""
import copy
import json
import os
import pickle
import re

import numpy as np
import pytest

import cbn
from cbn.distributed import _as_class

from bn_helpers import full_snapshot, snapshot, trained_layer

if os.environ.get("CBN_EXPECT_TORCH") == "1":
    import torch  # CI installed it: a missing torch is a failure, not a skip
else:
    try:
        import torch
    except ImportError:
        torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")

FROZEN = {cbn.BatchNorm1d: cbn.FrozenBatchNorm1d, cbn.BatchNorm2d: cbn.FrozenBatchNorm2d,
          cbn.BatchNorm3d: cbn.FrozenBatchNorm3d}
SHAPES = {cbn.FrozenBatchNorm1d: (7, 5, 9), cbn.FrozenBatchNorm2d: (4, 5, 6, 3),
          cbn.FrozenBatchNorm3d: (3, 5, 2, 3, 4)}
TORCHVISION_KEYS = ["weight", "bias", "running_mean", "running_var"]  # torchvision's FrozenBatchNorm2d buffers


def bn_with_state(cls=cbn.BatchNorm2d, C=5, dtype=np.float32, affine=True, seed=0, shape=None):
    """A trained ``cls`` layer in eval mode with non-trivial weight, bias and running statistics."""
    layer = trained_layer(cls, C, shape or (8, C) + (3,) * (max(cls._ndims) - 2), dtype=dtype, seed=seed,
                          steps=3, eps=1e-3, momentum=0.5, affine=affine)
    return layer.eval()


def frozen_with_state(cls=cbn.FrozenBatchNorm2d, dtype=np.float32, seed=0, **kw):
    C = SHAPES[cls][1]
    rng = np.random.default_rng(seed)
    layer = cls(C, eps=1e-3, dtype=dtype, **kw)
    layer.load_state_dict({"weight": rng.uniform(-2, 2, C), "bias": rng.uniform(-1, 1, C),
                           "running_mean": rng.uniform(-3, 3, C) + 20, "running_var": rng.uniform(0.1, 4, C)})
    return layer


def scale_shift(layer):
    """The float64 scale = weight/sqrt(running_var + eps) and shift = bias - running_mean*scale."""
    scale = layer.weight.astype(np.float64) / np.sqrt(layer.running_var.astype(np.float64) + layer.eps)
    return scale, layer.bias.astype(np.float64) - layer.running_mean.astype(np.float64) * scale


def per_channel(v, ndim, axis=1):
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def rel_err(actual, desired):
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    return float(np.max(np.abs(actual - desired)) / np.max(np.abs(desired)))


# -- fold ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("wshape", [(5, 3, 3, 3), (5, 4), (5, 2, 1, 3, 2), (5,)], ids=["conv2d", "linear", "conv3d",
                                                                                        "1-D"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fold_is_the_float64_formula(dtype, wshape, affine, with_bias):
    bn = bn_with_state(dtype=dtype, affine=affine)
    rng = np.random.default_rng(1)
    w = rng.standard_normal(wshape).astype(dtype)
    b = rng.standard_normal(5).astype(dtype) if with_bias else None
    before = snapshot(bn), w.copy(), None if b is None else b.copy()
    fw, fb = cbn.fold(bn, w, b)
    gamma = bn.weight.astype(np.float64) if affine else 1.0
    beta = bn.bias.astype(np.float64) if affine else 0.0
    s = gamma / np.sqrt(bn.running_var.astype(np.float64) + bn.eps)
    want_w = w.astype(np.float64) * s.reshape((5,) + (1,) * (w.ndim - 1))
    want_b = ((b.astype(np.float64) if with_bias else 0.0) - bn.running_mean.astype(np.float64)) * s + beta
    assert fw.dtype == fb.dtype == np.dtype(dtype) and fw.shape == wshape and fb.shape == (5,)
    np.testing.assert_array_equal(fw, want_w.astype(dtype))
    np.testing.assert_array_equal(fb, want_b.astype(dtype))
    assert snapshot(bn) == before[0] and np.array_equal(w, before[1])  # nothing modified
    assert b is None or np.array_equal(b, before[2])


def test_fold_returns_weights_dtype():
    bn = bn_with_state(dtype=np.float64)
    fw, fb = cbn.fold(bn, np.ones((5, 2), np.float16), np.ones(5, np.float64))
    assert fw.dtype == fb.dtype == np.float16


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fold_of_frozen_sync_and_any_mode_is_the_same(mode):
    """fold reads only the eval transform: a frozen copy, a SyncBatchNorm with the same state (made without MPI;
    fold reads only its state) and either mode fold identically."""
    bn = bn_with_state().train(mode == "train")
    w, b = np.random.default_rng(2).standard_normal((5, 3, 2, 2)).astype(np.float32), np.ones(5, np.float32)
    want = cbn.fold(bn, w, b)
    sync = _as_class(bn, cbn.SyncBatchNorm2d, comm=None, _global_count=None)
    for other in (cbn.freeze(bn), sync):
        for a, c in zip(cbn.fold(other, w, b), want):
            np.testing.assert_array_equal(a, c)


def test_fold_refuses_a_layer_with_an_activation():
    """The folded layer computes BN(layer(x)); a fused ReLU would be lost, so fold says to keep it after the folded
    layer (and folds the same layer without it)."""
    bn = bn_with_state()
    w = np.random.default_rng(3).standard_normal((5, 3)).astype(np.float32)
    want = cbn.fold(bn, w)
    bn.activation = "relu"
    before = full_snapshot(bn)
    with pytest.raises(ValueError, match=r"cannot fold .*activation='relu'.* keep the activation after the folded "
                                         r"layer"):
        cbn.fold(bn, w)
    assert full_snapshot(bn) == before
    bn.activation = None
    for a, b in zip(cbn.fold(bn, w), want):
        np.testing.assert_array_equal(a, b)


def _torch_bn_eval(y, bn):
    """torch.nn.functional.batch_norm in eval mode with ``bn``'s state, in y's dtype (channels on axis 1)."""
    def t(a):
        return None if a is None else torch.from_numpy(a).to(y.dtype)
    return torch.nn.functional.batch_norm(y, t(bn.running_mean), t(bn.running_var), t(bn.weight), t(bn.bias),
                                          training=False, eps=bn.eps)


FOLD_CASES = [
    ("conv2d", cbn.BatchNorm2d, (6, 3, 3, 3), (4, 3, 9, 9)),
    ("linear", cbn.BatchNorm1d, (6, 10), (32, 10)),
    ("conv3d", cbn.BatchNorm3d, (6, 2, 3, 3, 3), (2, 2, 6, 7, 5)),
    ("conv1d", cbn.BatchNorm1d, (6, 4, 3), (4, 4, 20)),
]
# The folded float32 layer and the unfolded float32 pair both sit at float32 noise from the float64 truth (rounded
# folded weights, float32 accumulation in torch's conv), relative to the largest output: measured at most 4.1e-7
# folded and 2.9e-7 unfolded in float32, 7.8e-16 folded in float64 (20 seeds of these cases).
FOLD_TOL = {np.float32: 2e-6, np.float64: 1e-14}


def _torch_layer(kind, x, w, b):
    fn = {"conv2d": torch.nn.functional.conv2d, "linear": torch.nn.functional.linear,
          "conv3d": torch.nn.functional.conv3d, "conv1d": torch.nn.functional.conv1d}[kind]
    return fn(torch.from_numpy(x), torch.from_numpy(w), None if b is None else torch.from_numpy(b))


@needs_torch
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine,with_bias", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("kind,cls,wshape,xshape", FOLD_CASES, ids=[c[0] for c in FOLD_CASES])
def test_fold_against_torch(kind, cls, wshape, xshape, dtype, affine, with_bias):
    """layer(x, folded weight, folded bias) == bn_eval(layer(x, weight, bias)) in torch; both against the same
    expression in float64."""
    rng = np.random.default_rng(3)
    bn = bn_with_state(cls, C=6, dtype=dtype, affine=affine, seed=4)
    # statistics of the size a conv output has: means far from 0, variances from 0.01 to 100
    bn.running_mean[...] = rng.uniform(-5, 5, 6) + 10
    bn.running_var[...] = 10.0 ** rng.uniform(-2, 2, 6)
    w = rng.standard_normal(wshape).astype(dtype)
    b = rng.standard_normal(6).astype(dtype) if with_bias else None
    x = rng.standard_normal(xshape).astype(dtype)
    fw, fb = cbn.fold(bn, w, b)
    with torch.no_grad():
        folded = _torch_layer(kind, x, fw, fb).numpy()
        unfolded = _torch_bn_eval(_torch_layer(kind, x, w, b), bn).numpy()
        truth = _torch_bn_eval(_torch_layer(kind, x.astype(np.float64), w.astype(np.float64),
                                            None if b is None else b.astype(np.float64)), bn).numpy()
    assert folded.dtype == np.dtype(dtype)
    assert rel_err(folded, truth) <= FOLD_TOL[dtype]
    assert rel_err(unfolded, truth) <= FOLD_TOL[dtype]


# -- frozen layers -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls", list(SHAPES))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_frozen_forward_backward_formula(cls, dtype, mode):
    layer = frozen_with_state(cls, dtype).train(mode == "train")
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(SHAPES[cls]) * 3 + 20).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    before = snapshot(layer)
    scale, shift = scale_shift(layer)
    y = layer(x)
    want = x.astype(np.float64) * per_channel(scale, x.ndim) + per_channel(shift, x.ndim)
    tol = 1e-6 if dtype == np.float32 else 1e-14  # the float32 contract: within 1e-6 of the float64 result
    assert y.dtype == np.dtype(dtype) and rel_err(y, want) <= tol
    dx = layer.backward(dy)
    assert dx.dtype == np.dtype(dtype) and rel_err(dx, dy.astype(np.float64) * per_channel(scale, x.ndim)) <= tol
    assert layer.grad_weight is None and layer.grad_bias is None
    assert snapshot(layer) == before and layer.num_batches_tracked == 0
    other = frozen_with_state(cls, dtype).train(mode != "train")
    np.testing.assert_array_equal(other(x), y)  # the mode changes nothing
    np.testing.assert_array_equal(other.backward(dy), dx)


def test_frozen_equals_bn_eval_bitwise_any_layout():
    """A frozen layer is an eval-mode batch norm: the same bits, for NCHW, channels-last memory, axis=-1 and out=."""
    bn = bn_with_state(cbn.BatchNorm2d, C=6, shape=(8, 6, 3, 3))
    frozen = cbn.freeze(bn)
    x = np.random.default_rng(6).standard_normal((4, 6, 5, 7)).astype(np.float32)
    for arr in (x, np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)):
        y = frozen(arr)
        np.testing.assert_array_equal(y, bn(arr))
        assert y.strides == bn(arr).strides
        out = np.empty_like(arr)
        assert frozen(arr, out=out) is out
        np.testing.assert_array_equal(out, y)
    nhwc_bn = cbn.BatchNorm2d(6, axis=-1)
    nhwc_bn.load_state_dict(bn.state_dict())
    nhwc = cbn.freeze(nhwc_bn.eval())
    assert nhwc.axis == -1
    xl = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(nhwc(xl), nhwc_bn(xl))


def test_frozen_deterministic_across_threads():
    old = cbn.get_num_threads()
    layer = frozen_with_state()
    rng = np.random.default_rng(7)
    x = rng.standard_normal((16, 5, 64, 64)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    results = []
    try:
        for n in (1, 2, 3):
            cbn.set_num_threads(n)
            results.append((layer(x), layer.backward(dy)))
    finally:
        cbn.set_num_threads(old)
    for y, dx in results[1:]:
        assert y.tobytes() == results[0][0].tobytes() and dx.tobytes() == results[0][1].tobytes()


def test_frozen_defaults_and_repr():
    layer = cbn.FrozenBatchNorm2d(64)
    assert repr(layer) == "FrozenBatchNorm2d(64, eps=1e-05)"  # torchvision's repr
    assert repr(cbn.FrozenBatchNorm1d(3, eps=1e-3, dtype=np.float64, axis=-1)) == \
        "FrozenBatchNorm1d(3, eps=0.001, dtype=float64, axis=-1)"
    assert layer.dtype == np.float32 and layer.eps == 1e-5 and layer.axis == 1 and layer.training
    for key, value in zip(TORCHVISION_KEYS, (1, 0, 0, 1)):
        a = getattr(layer, key)
        assert a.dtype == np.float32 and a.shape == (64,) and np.all(a == value)
    assert not isinstance(layer, cbn.BatchNorm2d)  # as torchvision's is no torch.nn.BatchNorm2d
    trained = frozen_with_state()
    trained.reset_parameters()  # the resets of the other layers: weight 1, bias 0, running mean 0, variance 1
    assert snapshot(trained) == snapshot(cbn.FrozenBatchNorm2d(5)) and trained.num_batches_tracked == 0


def test_frozen_state_dict_torchvision_keys():
    """The state_dict of torchvision's FrozenBatchNorm2d (its four buffers; num_batches_tracked, as a BatchNorm2d
    checkpoint has it, is dropped on load as torchvision's _load_from_state_dict drops it)."""
    layer = frozen_with_state(dtype=np.float64)
    state = layer.state_dict()
    assert list(state) == TORCHVISION_KEYS
    assert all(state[k] is not getattr(layer, k) for k in state)  # copies
    bn = bn_with_state(dtype=np.float64)
    bn_state = bn.state_dict()
    assert "num_batches_tracked" in bn_state
    keys = list(bn_state)
    layer.load_state_dict(bn_state)
    assert list(bn_state) == keys  # the caller's dict is not edited
    for key in TORCHVISION_KEYS:
        np.testing.assert_array_equal(getattr(layer, key), bn_state[key])
    assert layer.num_batches_tracked == 0
    with pytest.raises(KeyError, match=r"missing keys \['running_var'\], unexpected keys \['scale'\]"):
        layer.load_state_dict({"weight": state["weight"], "bias": state["bias"],
                               "running_mean": state["running_mean"], "scale": state["running_var"]})


# -- freeze --------------------------------------------------------------------------------------------------------
def test_freeze_nested_containers_keeps_sharing():
    class Net:
        pass

    net = Net()
    shared = bn_with_state(cbn.BatchNorm2d, C=4, shape=(6, 4, 2, 2))
    plain = cbn.BatchNorm1d(2, affine=False)
    already = frozen_with_state(cbn.FrozenBatchNorm3d)
    sync = _as_class(bn_with_state(cbn.BatchNorm2d, C=3, seed=9, shape=(6, 3, 2, 2)), cbn.SyncBatchNorm2d,
                     comm=None, _global_count=None)
    blocks = [shared, {"bn": plain, "again": shared}, (already, 7, sync)]
    net.blocks, net.head, net.me = blocks, shared, net
    state, weight = shared.state_dict(), shared.weight
    assert cbn.freeze(net) is net
    head = net.head
    assert type(head) is cbn.FrozenBatchNorm2d and net.blocks is blocks and net.me is net
    assert blocks[0] is head and blocks[1]["again"] is head  # shared layers stay shared
    assert type(blocks[1]["bn"]) is cbn.FrozenBatchNorm1d and blocks[2][0] is already
    assert type(blocks[2][2]) is cbn.FrozenBatchNorm2d and blocks[2][1] == 7
    for key in TORCHVISION_KEYS:
        np.testing.assert_array_equal(getattr(head, key), state[key])
    assert head.weight is not weight and head.training is False  # copies, the mode kept
    assert (head.eps, head.dtype, head.axis) == (shared.eps, shared.dtype, shared.axis)
    np.testing.assert_array_equal(blocks[1]["bn"].weight, np.ones(2, np.float32))  # not affine: gamma 1, beta 0
    np.testing.assert_array_equal(blocks[1]["bn"].bias, np.zeros(2, np.float32))
    x = np.random.default_rng(8).standard_normal((3, 4, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(head(x), shared(x))  # the original, still in eval mode, is unchanged
    head.running_mean[...] = 0
    assert all(np.array_equal(v, state[k]) for k, v in shared.state_dict().items())
    frozen = cbn.freeze(shared)
    assert type(frozen) is cbn.FrozenBatchNorm2d and frozen is not shared


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_freeze_keeps_the_fused_relu_and_takes_a_residual(mode):
    """A frozen BatchNorm2d(activation="relu") is the original's eval forward, ReLU and residual included, and
    its backward; bn(x, residual=z) runs the same after freeze."""
    bn = bn_with_state(cbn.BatchNorm2d, C=3, shape=(6, 3, 4, 4))
    bn.activation = "relu"
    frozen = cbn.freeze(bn.train(mode == "train"))
    assert frozen.activation == "relu" and repr(frozen) == "FrozenBatchNorm2d(3, eps=0.001, activation='relu')"
    rng = np.random.default_rng(12)
    x, z, dy = (rng.standard_normal((2, 3, 4, 4)).astype(np.float32) * 3 for _ in range(3))
    bn.eval()
    for residual in (None, z):
        y = frozen(x, residual=residual)
        assert y.min() == 0.0
        np.testing.assert_array_equal(y, bn(x, residual=residual))
        np.testing.assert_array_equal(frozen.backward(dy), bn.backward(dy))
        if residual is not None:
            np.testing.assert_array_equal(frozen.grad_residual, bn.grad_residual)


def test_freeze_without_running_stats_changes_nothing():
    good = bn_with_state()
    bad = cbn.BatchNorm2d(5, track_running_stats=False)
    model = {"a": good, "b": [bad], "c": (good,)}
    before = {"a": model["a"], "b": model["b"], "b0": model["b"][0], "c": model["c"]}
    with pytest.raises(ValueError, match=re.escape(f"cannot freeze {bad!r}: it has no running statistics")
                       + r".*expected running_mean and running_var arrays, got NoneType and NoneType"):
        cbn.freeze(model)
    assert model["a"] is before["a"] and model["b"] is before["b"] and model["b"][0] is before["b0"]
    assert model["c"] is before["c"]


# -- pickle, copies, files -----------------------------------------------------------------------------------------
def _saveload(layer, tmp_path):
    path = tmp_path / "frozen.npz"
    layer.save(path)
    with np.load(path, allow_pickle=False) as data:
        assert sorted(data.files) == sorted(TORCHVISION_KEYS + ["__config__"])
        config = json.loads(str(data["__config__"]))
    assert config == {"format": "cbn.batchnorm", "version": cbn.modules.FORMAT_VERSION, "class": type(layer).__name__,
                      "training": layer.training, "num_features": layer.num_features, "eps": layer.eps,
                      "dtype": layer.dtype.name, "axis": layer.axis, "activation": layer.activation}
    return cbn.load(path)


@pytest.mark.parametrize("how", [lambda layer, _: pickle.loads(pickle.dumps(layer)),
                                 lambda layer, _: copy.deepcopy(layer), _saveload],
                         ids=["pickle", "deepcopy", "save-load"])
@pytest.mark.parametrize("cls", list(SHAPES))
@pytest.mark.parametrize("dtype,axis,training", [(np.float32, 1, True), (np.float64, -1, False)])
def test_frozen_roundtrip(how, cls, dtype, axis, training, tmp_path):
    layer = frozen_with_state(cls, dtype, axis=axis).train(training)
    x = np.random.default_rng(10).standard_normal(SHAPES[cls]).astype(dtype)
    x = np.moveaxis(x, 1, -1) if axis == -1 else x
    layer(x)
    before = snapshot(layer)
    other = how(layer, tmp_path)
    assert snapshot(layer) == before and snapshot(other) == before
    assert type(other) is cls and repr(other) == repr(layer) and other.training is training
    assert other.weight is not layer.weight
    with pytest.raises(RuntimeError, match="backward called before forward"):
        other.backward(x)
    np.testing.assert_array_equal(other(x), layer(x))
    np.testing.assert_array_equal(other.backward(x), layer.backward(x))


def test_earlier_files_still_load_beside_frozen_ones(tmp_path):
    """A version-1 file (tests/data) loads as before; a frozen layer made from it saves and loads."""
    bn = cbn.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "batchnorm2d_v1.npz"))
    assert type(bn) is cbn.BatchNorm2d
    frozen = _saveload(cbn.freeze(bn), tmp_path)
    x = np.linspace(-3, 3, 4 * 3 * 2 * 2).reshape(4, 3, 2, 2)
    np.testing.assert_array_equal(frozen(x), bn.eval()(x))


@pytest.mark.parametrize("version", [3, 4, cbn.modules.FORMAT_VERSION])
def test_frozen_files_without_activation(version, tmp_path):
    """Frozen layers' files of versions 3 and 4 hold no activation and load without one; from version 5 on the key
    is required."""
    layer = frozen_with_state()
    config = {"format": "cbn.batchnorm", "version": version, "class": "FrozenBatchNorm2d", "training": True,
              "num_features": 5, "eps": 1e-3, "dtype": "float32", "axis": 1}
    np.savez(tmp_path / "f.npz", __config__=np.array(json.dumps(config)), **layer.state_dict())
    if version < 5:
        loaded = cbn.load(tmp_path / "f.npz")
        assert loaded.activation is None and snapshot(loaded) == snapshot(layer)
    else:
        with pytest.raises(ValueError, match=r"config key 'activation' is missing: a version-5 FrozenBatchNorm2d"):
            cbn.load(tmp_path / "f.npz")


# -- bad input -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,exc,pattern", [
    (dict(weight=np.ones((4, 3), np.float32)), ValueError,
     r"weight must have 5 output channels \(bn\.num_features\) on axis 0, got shape \(4, 3\)"),
    (dict(weight=np.float32(1.0)), TypeError, r"weight must be a numpy\.ndarray of floating dtype, got float32"),
    (dict(weight=np.ones((), np.float32)), ValueError, r"5 output channels .* got shape \(\)"),
    (dict(weight=np.ones((5, 3), np.int64)), TypeError, r"weight must have a floating dtype .* got int64"),
    (dict(weight=np.ones((5, 3), np.float32), bias=np.ones(4, np.float32)), ValueError,
     r"bias must have shape \(5,\) \(bn\.num_features\), got \(4,\)"),
    (dict(weight=np.ones((5, 3), np.float32), bias=[0.0] * 5), TypeError,
     r"bias must be a numpy\.ndarray of floating dtype, got list"),
    (dict(weight=np.full((5, 3), 6e4, np.float16)), ValueError,
     r"folded weight must be representable in float16 \(the dtype of weight\), got [0-9.e+]+ at flat index 0"),
], ids=["channels", "scalar", "0-D", "int", "bias-shape", "bias-list", "float16-overflow"])
def test_fold_bad_input(args, exc, pattern):
    bn = bn_with_state()
    bn.running_var[...] = 1e-4  # s up to 100: 6e4*s overflows float16
    before = full_snapshot(bn)
    with pytest.raises(exc, match=pattern):
        cbn.fold(bn, **args)
    assert full_snapshot(bn) == before


def test_fold_needs_running_stats_and_a_layer():
    bn = cbn.BatchNorm2d(3, track_running_stats=False)
    with pytest.raises(ValueError, match=re.escape(f"cannot fold {bn!r}: it has no running statistics")
                       + r".*got NoneType and NoneType"):
        cbn.fold(bn, np.ones((3, 2), np.float32))
    with pytest.raises(TypeError, match=r"bn must be a cbn batch-norm layer .* got dict"):
        cbn.fold({"weight": np.ones(3)}, np.ones((3, 2), np.float32))


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(num_features=0), ValueError, r"num_features must be an integer >= 1, got 0"),
    (dict(num_features=2.5), ValueError, r"num_features must be an integer >= 1, got 2\.5"),
    (dict(num_features=3, eps=-1.0), ValueError, r"eps must be a finite number >= 0, got -1\.0"),
    (dict(num_features=3, eps=float("nan")), ValueError, r"eps must be a finite number >= 0, got nan"),
    (dict(num_features=3, dtype=np.float16), TypeError, r"dtype must be float32 or float64, got float16"),
    (dict(num_features=3, axis=4), ValueError, r"axis must be in \[-4, 4\) for 4-D input, got 4"),
    (dict(num_features=3, axis="last"), TypeError, r"axis must be an integer, got 'last'"),
    (dict(num_features=3, momentum=0.1), TypeError, r"unexpected keyword argument 'momentum'"),
], ids=["C0", "C-float", "eps-neg", "eps-nan", "float16", "axis-4", "axis-str", "momentum"])
def test_frozen_constructor_bad_input(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        cbn.FrozenBatchNorm2d(**kwargs)


def test_frozen_bad_calls_change_nothing():
    layer = frozen_with_state()
    x = np.random.default_rng(11).standard_normal((2, 5, 3, 3)).astype(np.float32)
    with pytest.raises(RuntimeError, match="backward called before forward"):
        layer.backward(x)
    layer(x)
    before = full_snapshot(layer)
    with pytest.raises(ValueError, match=r"expected input with 5 channels at axis 1, got 4"):
        layer(x[:, :4])
    with pytest.raises(ValueError, match=r"expected 4D input, got 3D input"):
        layer(x[0])
    bad_state = dict(layer.state_dict(), running_var=-np.ones(5))
    with pytest.raises(ValueError, match=r"running_var must be >= 0, got min -1\.0"):
        layer.load_state_dict(bad_state)
    with pytest.raises(TypeError, match=r"state must be a mapping of names to arrays, got list"):
        layer.load_state_dict([("weight", np.ones(5))])
    assert full_snapshot(layer) == before
