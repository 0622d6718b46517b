"""Fused ReLU and residual add: y = act(BN(x) + z) in one pass, and its backward from the saved output, against
the float64 reference (every kernel layout), PyTorch autograd of the same expression, and across thread counts."""
import os
import pickle

import numpy as np
import pytest

import cbn
from cbn import functional as F
from cbn import reference as R

from bn_helpers import FORCED_LAYOUTS, forced_layout, layer_class

# (128, 3, 5, 4): short rows in blocks of 16 images or more (a sum lane per column)
SHAPES = [(6, 3, 5, 4), (32, 8), (4, 5, 33), (3, 4, 2, 3, 5), (2, 16, 40, 40), (128, 3, 5, 4)]
OPTIONS = [(None, False), ("relu", False), (None, True), ("relu", True)]


def _data(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    return x, rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype)


def _bound(dtype):
    """float32 results are the float64 math rounded once: a few float32 ulps of the output's magnitude."""
    return 4 * np.finfo(dtype).eps if dtype == np.float32 else 1e-13


def _close(got, want, dtype, what):
    scale = max(float(np.max(np.abs(want))), 1e-30)
    err = float(np.max(np.abs(np.asarray(got, np.float64) - want))) / scale
    assert err <= _bound(dtype), f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("layout", FORCED_LAYOUTS, ids=str)
@pytest.mark.parametrize("activation,with_residual", OPTIONS, ids=["plain", "relu", "add", "add-relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype, training, activation, with_residual, layout):
    x, z, dy = _data(shape, dtype)
    C = shape[1]
    rng = np.random.default_rng(1)
    w, b = rng.uniform(0.5, 1.5, C).astype(dtype), rng.uniform(-0.5, 0.5, C).astype(dtype)
    rm, rv = rng.standard_normal(C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype)
    residual = z if with_residual else None
    with forced_layout(layout):
        y, saved = F.batch_norm(x, rm.copy(), rv.copy(), w, b, training, activation=activation, residual=residual,
                                return_saved=True)
        grads = F.batch_norm_backward(dy, saved)
    y_ref, saved_ref = R.batch_norm(x.astype(np.float64), rm.astype(np.float64), rv.astype(np.float64),
                                    w.astype(np.float64), b.astype(np.float64), training, activation=activation,
                                    residual=None if residual is None else residual.astype(np.float64),
                                    return_saved=True)
    grads_ref = R.batch_norm_backward(dy.astype(np.float64), saved_ref)
    assert y.dtype == dtype and len(grads) == len(grads_ref) == (4 if with_residual else 3)
    _close(y, y_ref, dtype, "y")
    for name, g, g_ref in zip(("dx", "dweight", "dbias", "dresidual"), grads, grads_ref):
        _close(g, g_ref, dtype, name)
    if activation == "relu":
        assert np.all(y >= 0)


@pytest.mark.parametrize("activation,with_residual", OPTIONS[1:], ids=["relu", "add", "add-relu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_torch_autograd(dtype, activation, with_residual):
    """relu(batch_norm(x) + z) and its gradients (x, weight, bias, z) as torch's autograd gives them."""
    if os.environ.get("CBN_EXPECT_TORCH") == "1":
        import torch
    else:
        torch = pytest.importorskip("torch")
    shape = (8, 6, 7, 5)
    x, z, dy = _data(shape, dtype, seed=3)
    bn = cbn.BatchNorm2d(6, dtype=dtype, activation=activation)
    bn.weight[...] = np.linspace(0.5, 1.5, 6)
    bn.bias[...] = np.linspace(-0.4, 0.3, 6)
    y = bn(x, residual=z if with_residual else None)
    dx = bn.backward(dy)
    tx, tz = (torch.tensor(a, requires_grad=True) for a in (x, z))
    tw, tb = (torch.tensor(a, requires_grad=True) for a in (bn.weight, bn.bias))
    t = torch.nn.functional.batch_norm(tx, None, None, tw, tb, True, 0.1, bn.eps)
    t = t + tz if with_residual else t
    t = torch.relu(t) if activation == "relu" else t
    t.backward(torch.tensor(dy))
    tol = 2e-5 if dtype == np.float32 else 1e-11
    for name, got, want in (("y", y, t), ("dx", dx, tx.grad), ("dweight", bn.grad_weight, tw.grad),
                            ("dbias", bn.grad_bias, tb.grad)):
        want = want.detach().numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * max(1.0, float(np.max(np.abs(want)))),
                                   err_msg=name)
    if with_residual:
        np.testing.assert_allclose(bn.grad_residual, tz.grad.numpy(), rtol=0, atol=0, err_msg="dresidual")
    else:
        assert bn.grad_residual is None


@pytest.mark.parametrize("activation,with_residual", OPTIONS[1:], ids=["relu", "add", "add-relu"])
def test_bitwise_across_threads_and_layouts(activation, with_residual):
    """The same bits for 1, 2 and 3 threads, and float32 bits equal between NHWC memory and its NCHW copy."""
    shape = (4, 64, 20, 20)
    x, z, dy = _data(shape, np.float32, seed=5)
    old = cbn.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            cbn.set_num_threads(min(n, cbn.max_num_threads()))
            bn = cbn.BatchNorm2d(64, activation=activation)
            y = bn(x, residual=z if with_residual else None)
            results.append([y, bn.backward(dy), bn.grad_weight, bn.grad_bias, bn.running_var])
    finally:
        cbn.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.tobytes() == b.tobytes()
    nhwc = [np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2) for a in (x, z, dy)]
    bn = cbn.BatchNorm2d(64, activation=activation)
    y = bn(nhwc[0], residual=nhwc[1] if with_residual else None)
    assert y.strides == nhwc[0].strides
    np.testing.assert_array_equal(y, results[0][0])
    np.testing.assert_array_equal(bn.backward(nhwc[2]), results[0][1])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_out_and_no_input_size_copies(training):
    """out= works with both options; the saved forward keeps the output for the mask, not a copy of it."""
    x, z, dy = _data((4, 3, 6, 5), np.float32)
    bn = cbn.BatchNorm2d(3, activation="relu").train(training)
    out = np.empty_like(x)
    y = bn(x, out=out, residual=z)
    assert y is out and np.shares_memory(bn._saved.y, out)
    dx_out = np.empty_like(x)
    assert bn.backward(dy, out=dx_out) is dx_out
    ref = cbn.BatchNorm2d(3, activation="relu").train(training)
    np.testing.assert_array_equal(out, ref(x, residual=z))
    np.testing.assert_array_equal(dx_out, ref.backward(dy))
    np.testing.assert_array_equal(bn.grad_residual, ref.grad_residual)


def test_float16_keeps_the_mask_in_the_compute_dtype():
    """float16 input: the mask comes from the float32 output before it is rounded to float16."""
    x, z, dy = _data((5, 3, 4, 4), np.float16)
    bn = cbn.BatchNorm2d(3, activation="relu")
    y = bn(x, residual=z)
    assert y.dtype == np.float16 and bn._saved.y.dtype == np.float32
    ref = cbn.BatchNorm2d(3, activation="relu")
    np.testing.assert_array_equal(y, ref(x.astype(np.float32), residual=z.astype(np.float32)).astype(np.float16))
    np.testing.assert_array_equal(bn.backward(dy), ref.backward(dy.astype(np.float32)).astype(np.float16))


@pytest.mark.parametrize("cls", [cbn.BatchNorm1d, cbn.BatchNorm2d, cbn.BatchNorm3d])
def test_activation_in_state(cls, tmp_path):
    bn = cls(3, activation="relu")
    assert repr(bn).endswith(", activation='relu')") and "activation" not in repr(cls(3))
    assert pickle.loads(pickle.dumps(bn)).activation == "relu"
    bn.save(tmp_path / "bn.npz")
    assert cbn.load(tmp_path / "bn.npz").activation == "relu"


@pytest.mark.parametrize("call,exc,expected", [
    (lambda: cbn.BatchNorm2d(3, activation="gelu"), ValueError, r"activation must be None or 'relu', got 'gelu'"),
    (lambda: cbn.BatchNorm2d(3, activation=True), ValueError, r"activation must be None or 'relu', got True"),
    (lambda: F.batch_norm(np.ones((4, 3)), None, None, training=True, residual=np.ones((4, 2))), ValueError,
     r"residual must have shape \(4, 3\).*got \(4, 2\)"),
    (lambda: F.batch_norm(np.ones((4, 3)), None, None, training=True, residual=[1.0]), TypeError,
     r"residual must be a numpy\.ndarray"),
    (lambda: F.batch_norm(np.ones((4, 3)), None, None, training=True, activation="tanh"), ValueError,
     r"activation must be None or 'relu', got 'tanh'"),
])
def test_bad_options(call, exc, expected):
    with pytest.raises(exc, match=expected):
        call()


def test_bad_residual_leaves_the_layer_unchanged():
    from bn_helpers import full_snapshot
    bn = cbn.BatchNorm2d(3, activation="relu")
    x = np.ones((4, 3, 2, 2), np.float32)
    bn(x + np.arange(4, dtype=np.float32)[:, None, None, None])
    before = full_snapshot(bn)
    with pytest.raises(ValueError, match=r"residual must have shape \(4, 3, 2, 2\)"):
        bn(x, residual=np.ones((4, 3, 2, 1), np.float32))
    assert full_snapshot(bn) == before


def test_layer_class_helper_covers_ranks():
    for ndim in (2, 3, 4, 5):
        assert layer_class(ndim)(3, activation="relu").activation == "relu"
