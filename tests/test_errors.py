"""Bad input: exception type, a message naming expected and actual values, and the layer's state unchanged.

Also the special values: NaN/Inf confined to their channel, empty batches, constant channels, inputs never modified.
"""
import re

import numpy as np
import pytest

import cbn
from bn_helpers import snapshot, trained_layer

SHAPE = (4, 3, 5, 5)


@pytest.fixture
def layer():
    """A BatchNorm2d(3) with non-default weight, bias, running stats and counter, after a forward (saved input)."""
    bn = trained_layer(cbn.BatchNorm2d, 3, SHAPE, seed=4)
    bn(np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32))
    return bn


@pytest.fixture
def x():
    return np.random.default_rng(6).standard_normal(SHAPE).astype(np.float32)


def raises_unchanged(layer, exc, match, fn, *args, **kwargs):
    before = snapshot(layer)
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)
    assert snapshot(layer) == before, "layer state changed by a failed call"


# -- rank and channels ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,bad_shape,match", [
    (cbn.BatchNorm1d, (4,), r"2D or 3D.*got 1D"),
    (cbn.BatchNorm1d, (4, 3, 2, 2), r"2D or 3D.*got 4D"),
    (cbn.BatchNorm2d, (4, 3, 5), r"4D.*got 3D"),
    (cbn.BatchNorm2d, (4, 3, 2, 2, 2), r"4D.*got 5D"),
    (cbn.BatchNorm3d, (4, 3, 5, 5), r"5D.*got 4D"),
    (cbn.BatchNorm3d, (2, 3, 2, 2, 2, 2), r"5D.*got 6D"),
])
@pytest.mark.parametrize("training", [True, False])
def test_wrong_ndim(cls, bad_shape, match, training):
    bn = trained_layer(cls, 3, {cbn.BatchNorm1d: (4, 3, 2), cbn.BatchNorm2d: SHAPE,
                                cbn.BatchNorm3d: (2, 3, 2, 2, 2)}[cls]).train(training)
    raises_unchanged(bn, ValueError, match, bn, np.ones(bad_shape, np.float32))


@pytest.mark.parametrize("training", [True, False])
def test_wrong_channel_count(layer, training):
    layer.train(training)
    raises_unchanged(layer, ValueError, r"\b3\b.*\b4\b", layer, np.ones((4, 4, 5, 5), np.float32))
    raises_unchanged(layer, ValueError, r"\b3\b.*\b1\b", layer, np.ones((4, 1, 5, 5), np.float32))


@pytest.mark.parametrize("cls,shape", [(cbn.BatchNorm1d, (1, 3)), (cbn.BatchNorm1d, (1, 3, 1)),
                                       (cbn.BatchNorm2d, (1, 3, 1, 1)), (cbn.BatchNorm3d, (1, 3, 1, 1, 1))])
def test_one_value_per_channel_in_training(cls, shape):
    bn = trained_layer(cls, 3, (2,) + shape[1:])
    raises_unchanged(bn, ValueError, r"^Expected more than 1 value per channel when training, got input size .*"
                     + re.escape(str(list(shape))[1:-1]), bn, np.ones(shape, np.float32))
    # eval with running stats accepts it
    y = bn.eval()(np.ones(shape, np.float32))
    assert y.shape == shape and np.all(np.isfinite(y))
    # batch statistics in eval (no running stats) cannot, like torch
    plain = cls(3, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        plain(np.ones(shape, np.float32))


# -- constructor -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [cbn.BatchNorm1d, cbn.BatchNorm2d, cbn.BatchNorm3d])
@pytest.mark.parametrize("value", [0, -1])
def test_num_features_below_one(cls, value):
    with pytest.raises(ValueError, match=rf"num_features.*>= 1.*got {value}\b"):
        cls(value)


@pytest.mark.parametrize("value", [2.5, 3.0, "3", None, True])
def test_num_features_not_int(value):
    with pytest.raises((ValueError, TypeError), match=rf"num_features.*integer.*{re.escape(repr(value))}"):
        cbn.BatchNorm2d(value)


def test_num_features_numpy_int_accepted():
    bn = cbn.BatchNorm2d(np.int64(3))
    assert bn.num_features == 3 and type(bn.num_features) is int


@pytest.mark.parametrize("eps,shown", [(-1e-5, "-1e-05"), (float("nan"), "nan"), (float("inf"), "inf"),
                                       (-float("inf"), "-inf")])
def test_bad_eps(eps, shown):
    with pytest.raises(ValueError, match=rf"eps.*finite.*>= 0.*got {re.escape(shown)}"):
        cbn.BatchNorm2d(3, eps=eps)


def test_eps_zero_allowed():
    assert cbn.BatchNorm2d(3, eps=0.0).eps == 0.0


@pytest.mark.parametrize("momentum,shown", [(-0.1, "-0.1"), (1.5, "1.5"), (float("nan"), "nan"), (2, "2")])
def test_bad_momentum(momentum, shown):
    with pytest.raises(ValueError, match=rf"momentum.*\[0, 1\].*got {re.escape(shown)}"):
        cbn.BatchNorm2d(3, momentum=momentum)


@pytest.mark.parametrize("momentum", [None, 0.0, 1.0, 0, 1, 0.5])
def test_momentum_allowed(momentum):
    bn = cbn.BatchNorm2d(3, momentum=momentum)
    assert bn.momentum == momentum


@pytest.mark.parametrize("dtype", [np.float16, np.int32, np.complex128])
def test_bad_layer_dtype(dtype):
    with pytest.raises(TypeError, match=rf"float32 or float64.*{np.dtype(dtype).name}"):
        cbn.BatchNorm2d(3, dtype=dtype)


# -- input dtypes ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.bool_, np.complex64, np.complex128, object])
@pytest.mark.parametrize("training", [True, False])
def test_non_floating_input(layer, dtype, training):
    layer.train(training)
    x = np.ones(SHAPE).astype(dtype)
    raises_unchanged(layer, TypeError, rf"floating.*got {np.dtype(dtype).name}", layer, x)


@pytest.mark.parametrize("training", [True, False])
def test_list_input(layer, x, training):
    layer.train(training)
    raises_unchanged(layer, TypeError, r"numpy\.ndarray.*got list", layer, x.tolist())


def test_scalar_input(layer):
    raises_unchanged(layer, TypeError, r"numpy\.ndarray.*got float", layer, 1.0)


# -- backward ------------------------------------------------------------------------------------------------------
def test_backward_before_forward():
    bn = cbn.BatchNorm2d(3)
    with pytest.raises(RuntimeError, match="before forward"):
        bn.backward(np.ones(SHAPE, np.float32))
    assert bn.grad_weight is None and bn.grad_bias is None


def test_backward_wrong_shape(layer):
    layer.grad_weight = gw = np.full(3, 42.0, np.float32)
    bad = (4, 3, 5, 6)
    raises_unchanged(layer, ValueError, re.escape(str(SHAPE)) + ".*" + re.escape(str(bad)), layer.backward,
                     np.ones(bad, np.float32))
    assert layer.grad_weight is gw


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.complex64])
def test_backward_bad_dtype(layer, dtype):
    raises_unchanged(layer, TypeError, rf"floating.*{np.dtype(dtype).name}", layer.backward, np.ones(SHAPE, dtype))


def test_backward_list(layer):
    raises_unchanged(layer, TypeError, r"numpy\.ndarray.*list", layer.backward, np.ones(SHAPE).tolist())


# -- out= ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("training", [True, False])
def test_out_wrong_shape(layer, x, training):
    layer.train(training)
    out = np.empty((4, 3, 5, 4), np.float32)
    raises_unchanged(layer, ValueError, re.escape(str(SHAPE)) + r".*" + re.escape(str(out.shape)), layer, x,
                     out=out)


@pytest.mark.parametrize("training", [True, False])
def test_out_wrong_dtype(layer, x, training):
    layer.train(training)
    raises_unchanged(layer, ValueError, r"float32.*float64", layer, x, out=np.empty(SHAPE, np.float64))


def test_out_not_contiguous(layer, x):
    out = np.empty((4, 3, 5, 10), np.float32)[..., ::2]
    raises_unchanged(layer, ValueError, r"contiguous", layer, x, out=out)
    raises_unchanged(layer, ValueError, r"contiguous", layer, x, out=np.asfortranarray(np.empty(SHAPE, np.float32)))


def test_out_read_only(layer, x):
    out = np.empty(SHAPE, np.float32)
    out.flags.writeable = False
    raises_unchanged(layer, ValueError, r"writeable", layer, x, out=out)


def test_out_overlaps_input(layer, x):
    x_copy = x.copy()
    raises_unchanged(layer, ValueError, r"share memory", layer, x, out=x)
    np.testing.assert_array_equal(x, x_copy)
    big = np.random.default_rng(0).standard_normal((8, 3, 5, 5)).astype(np.float32)
    raises_unchanged(layer, ValueError, r"share memory", layer, big[:4], out=big[2:6])  # partial overlap


def test_out_not_array(layer, x):
    raises_unchanged(layer, TypeError, r"numpy\.ndarray.*list", layer, x, out=[0.0] * x.size)


def test_backward_out_errors(layer, x):
    layer(x)
    dy = np.ones(SHAPE, np.float32)
    raises_unchanged(layer, ValueError, re.escape(str(SHAPE)) + ".*" + re.escape(str((4, 3, 5, 4))),
                     layer.backward, dy, out=np.empty((4, 3, 5, 4), np.float32))
    raises_unchanged(layer, ValueError, r"float32.*float64", layer.backward, dy, out=np.empty(SHAPE, np.float64))
    raises_unchanged(layer, ValueError, r"contiguous", layer.backward, dy,
                     out=np.empty((4, 3, 5, 10), np.float32)[..., ::2])
    raises_unchanged(layer, ValueError, r"share memory", layer.backward, dy, out=dy)
    raises_unchanged(layer, ValueError, r"share memory", layer.backward, dy, out=x)


# -- special values ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_finite_stays_in_its_channel(bad, dtype):
    rng = np.random.default_rng(10)
    x = (rng.standard_normal((6, 3, 5, 4)) + 2).astype(dtype)
    x[2, 1, 3, 1] = bad
    dy = rng.standard_normal(x.shape).astype(dtype)
    full = trained_layer(cbn.BatchNorm2d, 3, (6, 3, 5, 4), dtype=dtype, seed=3)
    part = cbn.BatchNorm2d(2, dtype=dtype)
    part.load_state_dict({k: (v[[0, 2]] if np.ndim(v) else v) for k, v in full.state_dict().items()})
    good = [0, 2]
    for step in range(2):
        y, y2 = full(x), part(x[:, good])
        dx, dx2 = full.backward(dy), part.backward(dy[:, good])
        assert np.all(np.isfinite(y[:, good])) and np.all(np.isfinite(dx[:, good]))
        np.testing.assert_allclose(y[:, good], y2, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(dx[:, good], dx2, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(full.grad_weight[good], part.grad_weight, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(full.grad_bias[good], part.grad_bias, rtol=1e-6, atol=1e-6)
        assert not np.all(np.isfinite(y[:, 1])), "the non-finite value must propagate in its own channel"
        for stat, stat2 in ((full.running_mean, part.running_mean), (full.running_var, part.running_var)):
            assert np.all(np.isfinite(stat[good]))
            np.testing.assert_allclose(stat[good], stat2, rtol=1e-6)
    # eval with the poisoned running stats: the other channels stay finite and equal
    full.eval()
    part.eval()
    xe = (rng.standard_normal((6, 3, 5, 4))).astype(dtype)
    ye, ye2 = full(xe), part(xe[:, good])
    assert np.all(np.isfinite(ye[:, good]))
    np.testing.assert_allclose(ye[:, good], ye2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("cls,shape", [(cbn.BatchNorm1d, (0, 3)), (cbn.BatchNorm1d, (0, 3, 7)),
                                       (cbn.BatchNorm2d, (0, 3, 4, 4)), (cbn.BatchNorm3d, (0, 3, 2, 2, 2))])
def test_empty_batch(cls, shape, momentum):
    # Like torch 2.13: an empty training batch counts as a batch (num_batches_tracked += 1) but leaves the running
    # statistics unchanged; in eval nothing changes.
    bn = trained_layer(cls, 3, (4,) + shape[1:], momentum=momentum)
    before = snapshot(bn)
    for training, counted in ((False, 0), (True, 1)):
        bn.train(training)
        x = np.empty(shape, np.float32)
        y = bn(x)
        assert y.shape == shape and y.dtype == np.float32
        assert snapshot(bn) == dict(before, num_batches_tracked=before["num_batches_tracked"] + counted)
        dx = bn.backward(np.empty(shape, np.float32))
        assert dx.shape == shape
        assert snapshot(bn) == dict(before, num_batches_tracked=before["num_batches_tracked"] + counted)


@pytest.mark.parametrize("value", [3.7, -1e4 + 0.1, 0.0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_constant_channel_gives_beta(value, dtype):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 3, 4, 4)).astype(dtype)
    x[:, 1] = value
    bn = cbn.BatchNorm2d(3, dtype=dtype)
    bn.weight[...] = [1.5, 2.0, 0.7]
    bn.bias[...] = [0.1, -0.3, 0.2]
    y = bn(x)
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y[:, 1], np.asarray(-0.3, dtype), rtol=0, atol=1e-6)
    dx = bn.backward(rng.standard_normal(x.shape).astype(dtype))
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(bn.grad_weight))
    np.testing.assert_allclose(bn.running_mean[1], 0.1 * np.asarray(value, dtype), rtol=1e-6)
    np.testing.assert_allclose(bn.running_var[1], 0.9, rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("training", [True, False])
def test_input_never_modified(dtype, training):
    rng = np.random.default_rng(1)
    bn = trained_layer(cbn.BatchNorm2d, 3, SHAPE).train(training)
    x = (rng.standard_normal(SHAPE) * 3 + 1).astype(dtype)
    dy = rng.standard_normal(SHAPE).astype(dtype)
    xc, dyc = x.copy(), dy.copy()
    w, b = bn.weight.copy(), bn.bias.copy()
    bn(x)
    bn.backward(dy)
    bn(x, out=np.empty(SHAPE, dtype if dtype == np.float16 else np.float32))
    bn.backward(dy, out=np.empty(SHAPE, dtype if dtype == np.float16 else np.float32))
    assert x.tobytes() == xc.tobytes() and dy.tobytes() == dyc.tobytes()
    np.testing.assert_array_equal(bn.weight, w)
    np.testing.assert_array_equal(bn.bias, b)


@pytest.mark.parametrize("grad_sums,count,match", [
    (np.zeros((2, 4)), 10, r"grad_sums must have shape \(2, 3\), got \(2, 4\)"),
    (np.zeros((2, 3)), None, r"count must be an integer >= 20 \(the values per channel here\) with grad_sums, "
                             r"got None"),
    (np.zeros((2, 3)), 0, r"count must be an integer >= 20 .* got 0"),
    (np.zeros((2, 3)), 19, r"count must be an integer >= 20 .* got 19"),
    (np.zeros((2, 3)), 20.5, r"count must be an integer >= 20 .* got 20.5"),
    (None, 10, "grad_sums must be a numpy.ndarray of floating dtype, got NoneType"),
])
def test_backward_grad_sums_rejects(grad_sums, count, match):
    x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
    _, saved = cbn.functional.batch_norm(x, None, None, training=True, return_saved=True)
    with pytest.raises((TypeError, ValueError), match=match):
        cbn.functional.batch_norm_backward(np.ones_like(x), saved, grad_sums=grad_sums, count=count)
