"""The channel axis and the memory layout: every axis of 2-D to 5-D input against the float64 reference, dense
layouts (channels-last, Fortran, any axis order) used without a copy, outputs in the input's layout, and the same
bits for any thread count. PyTorch's channels_last BatchNorm is matched in test_torch.py."""
import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import cbn
from cbn import functional as F
from cbn import reference as R

from bn_helpers import (
    FORCED_LAYOUTS,
    assert_per_channel,
    assert_rel,
    backward_tolerance,
    forced_layout,
    forward_tolerance,
    layer_class,
)

SHAPES = {2: (7, 3), 3: (4, 3, 5), 4: (3, 4, 5, 3), 5: (2, 3, 4, 2, 3)}
CASES = [(ndim, axis) for ndim in SHAPES for axis in range(-ndim, ndim)]


def _dense(a, order):
    """``a``'s values in memory that holds its axes in ``order`` (a transposed C-contiguous array)."""
    return np.ascontiguousarray(a.transpose(order)).transpose(np.argsort(order))


def _channel_last_order(ndim, axis):
    """The axis order that puts the channel axis last in memory (NHWC for axis 1 of 4-D input)."""
    return tuple(d for d in range(ndim) if d != axis) + (axis,)


def _data(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return ((rng.standard_normal(shape) * 2 + 3).astype(dtype), rng.standard_normal(shape).astype(dtype))


def _layer(ndim, C, axis, dtype, training):
    bn = layer_class(ndim)(C, dtype=dtype, axis=axis)
    bn.weight[...] = np.linspace(0.5, 1.5, C)
    bn.bias[...] = np.linspace(-0.3, 0.4, C)
    bn.running_mean[...] = np.linspace(-1, 1, C)
    bn.running_var[...] = np.linspace(0.5, 2, C)
    return bn.train(training)


def _acb(a, axis):
    """``a`` as the logical (A, C, B) float64 array of channel axis ``axis``."""
    a = np.asarray(a, np.float64)
    return a.reshape(int(np.prod(a.shape[:axis])), a.shape[axis], -1)


@pytest.mark.parametrize("layout", ["C", "channels-last", "fortran"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ndim,axis", CASES, ids=[f"{n}d-axis{a}" for n, a in CASES])
def test_every_axis_matches_reference(ndim, axis, dtype, training, layout):
    """Forward, backward and running statistics at every axis, within the error bounds of the reference; outputs
    keep the input's memory layout."""
    shape = SHAPES[ndim]
    ax = axis % ndim
    C = shape[ax]
    x, dy = _data(shape, dtype)
    order = {"C": tuple(range(ndim)), "channels-last": _channel_last_order(ndim, ax),
             "fortran": tuple(reversed(range(ndim)))}[layout]
    xv, dyv = _dense(x, order), _dense(dy, order)
    bn = _layer(ndim, C, axis, dtype, training)
    rm, rv = bn.running_mean.astype(np.float64), bn.running_var.astype(np.float64)
    y = bn(xv)
    dx = bn.backward(dyv)
    y_ref, saved = R.batch_norm(x.astype(np.float64), rm, rv, bn.weight.astype(np.float64),
                                bn.bias.astype(np.float64), training, 0.1, bn.eps, axis=axis, return_saved=True)
    dx_ref, dw_ref, db_ref = R.batch_norm_backward(dy.astype(np.float64), saved)
    w64, b64 = bn.weight.astype(np.float64), bn.bias.astype(np.float64)
    assert y.shape == x.shape and y.dtype == dtype and y.strides == xv.strides
    assert dx.shape == x.shape and dx.dtype == dtype and dx.strides == xv.strides
    assert_per_channel(_acb(y, ax), _acb(y_ref, ax), forward_tolerance(saved.x, saved.mean, saved.invstd, w64, b64,
                                                                      _acb(y_ref, ax), dtype), "y")
    tol_dx, tol_dw, tol_db = backward_tolerance(saved.x, _acb(dy, ax), saved.mean, saved.invstd, w64, training,
                                                (dx_ref, dw_ref, db_ref), dtype)
    assert_per_channel(_acb(dx, ax), _acb(dx_ref, ax), tol_dx, "dx")
    assert_per_channel(bn.grad_weight, dw_ref, tol_dw, "grad_weight")
    assert_per_channel(bn.grad_bias, db_ref, tol_db, "grad_bias")
    eps = np.finfo(dtype).eps
    assert_rel(bn.running_mean, rm, 4 * eps, "running_mean", floor=1.0)
    assert_rel(bn.running_var, rv, 4 * eps, "running_var", floor=1.0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
def test_axis_is_moveaxis(ndim, training):
    """axis=a gives the results of moving axis a to 1 (float32: the same bits, each result is the float64 math
    rounded once; the sums run in another order, which moves double's last bits only)."""
    shape = SHAPES[ndim]
    for axis in range(ndim):
        x, dy = _data(shape, np.float32, seed=axis)
        C = shape[axis]
        a = _layer(ndim, C, axis, np.float32, training)
        b = _layer(ndim, C, 1, np.float32, training)
        ya, yb = a(x), b(np.moveaxis(x, axis, 1))
        np.testing.assert_array_equal(ya, np.moveaxis(yb, 1, axis))
        np.testing.assert_array_equal(a.backward(dy), np.moveaxis(b.backward(np.moveaxis(dy, axis, 1)), 1, axis))
        for key in ("grad_weight", "grad_bias", "running_mean", "running_var"):
            np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (2, 16, 8, 8, 3), (6, 5, 7)], ids=["NHWC", "NDHWC", "NLC"])
def test_channels_last_view_is_not_copied(shape, training):
    """An (N, C, *) view of channels-last memory is normalised in place of a copy: the saved input is the
    caller's memory, and the output and dx are channels-last too."""
    x, dy = _data(shape, np.float32)
    order = _channel_last_order(len(shape), 1)
    xv, dyv = _dense(x, order), _dense(dy, order)
    bn = layer_class(len(shape))(shape[1]).train(training)
    y = bn(xv)
    assert np.shares_memory(bn._saved.x, xv) and bn._saved.order == order
    assert y.strides == xv.strides and y.transpose(order).flags.c_contiguous
    dx = bn.backward(dyv)
    assert dx.strides == xv.strides
    ref = layer_class(len(shape))(shape[1]).train(training)
    np.testing.assert_array_equal(y, ref(x))  # float32: the same bits as the NCHW copy (see test_axis_is_moveaxis)
    np.testing.assert_array_equal(dx, ref.backward(dy))


@pytest.mark.parametrize("axis", [1, -1])
def test_no_input_size_allocation(axis):
    """Channels-last views and C-contiguous arrays at any axis: nothing of input size is allocated beyond the
    output (forward) and dx (backward)."""
    shape = (8, 32, 16, 16)
    x, dy = _data(shape, np.float32)
    if axis == 1:
        x, dy = _dense(x, (0, 2, 3, 1)), _dense(dy, (0, 2, 3, 1))
    else:
        x, dy = np.moveaxis(x, 1, -1).copy(), np.moveaxis(dy, 1, -1).copy()
    bn = cbn.BatchNorm2d(32, axis=axis)
    bn(x), bn.backward(dy)  # warm up (lazy imports, caches)
    for step in (lambda: bn(x), lambda: bn.backward(dy)):
        tracemalloc.start()
        result = step()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < x.nbytes + x.nbytes // 8, f"peak {peak} bytes for an output of {result.nbytes}"


@pytest.mark.parametrize("layout", FORCED_LAYOUTS[1:] + [None], ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_channels_last_bitwise_across_threads(dtype, layout):
    """A channels-last input gives the same bits for 1, 2 and 3 threads (and in every forced kernel layout)."""
    x, dy = _data((4, 256, 10, 10), dtype)
    xv, dyv = _dense(x, (0, 2, 3, 1)), _dense(dy, (0, 2, 3, 1))
    old = cbn.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            cbn.set_num_threads(min(n, cbn.max_num_threads()))
            with forced_layout(layout):
                bn = cbn.BatchNorm2d(256, dtype=dtype)
                results.append([bn(xv), bn.backward(dyv), bn.grad_weight, bn.grad_bias, bn.running_mean,
                                bn.running_var])
    finally:
        cbn.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("out_layout", ["input", "C"])
@pytest.mark.parametrize("dtype,out_dtype", [(np.float32, np.float32), (np.float16, np.float16)])
def test_out_in_either_layout(out_layout, dtype, out_dtype):
    """out= may have the input's layout or be C-contiguous (channels-last input, forward and backward)."""
    shape = (4, 3, 5, 6)
    x, dy = _data(shape, dtype)
    order = (0, 2, 3, 1)
    xv, dyv = _dense(x, order), _dense(dy, order)
    want = cbn.BatchNorm2d(3)
    y_want, dx_want = want(xv), None
    dx_want = want.backward(dyv)
    make = (lambda: _dense(np.full(shape, np.nan, out_dtype), order)) if out_layout == "input" else \
        (lambda: np.full(shape, np.nan, out_dtype))
    bn = cbn.BatchNorm2d(3)
    out, dx_out = make(), make()
    assert bn(xv, out=out) is out and bn.backward(dyv, out=dx_out) is dx_out
    np.testing.assert_array_equal(out, y_want)
    np.testing.assert_array_equal(dx_out, dx_want)


def test_dy_in_another_layout():
    """dy need not have the input's layout (it is copied to it)."""
    x, dy = _data((4, 3, 5, 6), np.float32)
    xv = _dense(x, (0, 2, 3, 1))
    a, b = cbn.BatchNorm2d(3), cbn.BatchNorm2d(3)
    a(xv), b(xv)
    np.testing.assert_array_equal(a.backward(dy), b.backward(_dense(dy, (0, 2, 3, 1))))


def test_functional_axis():
    """batch_norm_stats and the two-step backward (batch_norm_grad_sums + grad_sums) take the axis too."""
    x, dy = _data((5, 4, 6, 3), np.float64)
    count, mean, M2 = F.batch_norm_stats(x, axis=-1)
    assert count == 5 * 4 * 6
    np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2)), rtol=1e-14)
    np.testing.assert_allclose(M2, ((x - x.mean(axis=(0, 1, 2))) ** 2).sum(axis=(0, 1, 2)), rtol=1e-12)
    y, saved = F.batch_norm(x, None, None, training=True, axis=-1, return_saved=True)
    sums, dw, db = F.batch_norm_grad_sums(dy, saved)
    dx, dw2, db2 = F.batch_norm_backward(dy, saved, grad_sums=sums, count=count)
    np.testing.assert_array_equal(dx, F.batch_norm_backward(dy, saved)[0])
    np.testing.assert_array_equal(dw, dw2)


@pytest.mark.parametrize("cls", [cbn.BatchNorm1d, cbn.BatchNorm2d, cbn.BatchNorm3d])
def test_axis_in_state(cls, tmp_path):
    """axis is configuration: repr, pickle, save/load; files of format version 1 load as axis 1."""
    bn = cls(3, axis=-1)
    assert repr(bn).endswith(", axis=-1)") and "axis" not in repr(cls(3))
    assert pickle.loads(pickle.dumps(bn)).axis == -1
    bn.save(tmp_path / "bn.npz")
    assert cbn.load(tmp_path / "bn.npz").axis == -1
    assert cbn.load(Path(__file__).parent / "data" / "batchnorm2d_v1.npz").axis == 1
    old = cls(3).__getstate__()
    del old["axis"]
    restored = cls.__new__(cls)
    restored.__setstate__(old)
    assert restored.axis == 1
