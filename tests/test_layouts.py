"""Any strides that the kernels cannot take as they are (non-dense, negative, read-only, byte-swapped), and any
floating dtype, give the results of the contiguous copy; out= works. Dense layouts (channels-last, Fortran order)
are used without a copy: tests/test_axis.py."""
import numpy as np
import pytest

import cbn

from bn_helpers import placed


def _noncontig(a):
    big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    big[..., 1::2] = a
    v = big[..., 1::2]
    assert not v.flags.c_contiguous
    return v


def _channel_strided(a):
    # channels not adjacent: a view picking every other channel of a wider array
    big = np.zeros((a.shape[0], 2 * a.shape[1]) + a.shape[2:], a.dtype)
    big[:, ::2] = a
    return big[:, ::2]


def _negative(a):
    flip = tuple(slice(None, None, -1) for _ in range(a.ndim))
    v = a[flip].copy()[flip]
    assert all(s < 0 for s in v.strides if s)
    return v


def _readonly(a):
    v = a.copy()
    v.flags.writeable = False
    return v


def _byteswapped(a):
    v = a.astype(a.dtype.newbyteorder())
    assert not v.dtype.isnative
    return v


LAYOUTS = {
    "noncontig": _noncontig,
    "channel-strided": _channel_strided,
    "negative-stride": _negative,
    "readonly": _readonly,
    "byteswapped": _byteswapped,
}

CASES = [
    (cbn.BatchNorm1d, (9, 3)),
    (cbn.BatchNorm1d, (5, 3, 7)),
    (cbn.BatchNorm2d, (4, 3, 6, 5)),
    (cbn.BatchNorm3d, (3, 3, 4, 2, 5)),
    (cbn.BatchNorm2d, (2, 3, 160, 160)),  # large enough to run in parallel
]
CASE_IDS = ["1d-NC", "1d-NCL", "2d", "3d", "2d-big"]


def run(cls, x, dy, dtype, training, momentum=0.1):
    """forward, backward (and for training the updated stats) of a fresh layer with fixed parameters."""
    C = x.shape[1]
    bn = cls(C, dtype=dtype, momentum=momentum)
    bn.weight[...] = np.linspace(0.5, 1.5, C)
    bn.bias[...] = np.linspace(-0.3, 0.4, C)
    bn.running_mean[...] = np.linspace(-1, 1, C)
    bn.running_var[...] = np.linspace(0.5, 2, C)
    bn.train(training)
    y = bn(x)
    dx = bn.backward(dy)
    y2 = bn(x)  # second step: stats updated from the first
    return {"y": y, "dx": dx, "gw": bn.grad_weight, "gb": bn.grad_bias, "y2": y2,
            "rm": bn.running_mean, "rv": bn.running_var, "n": np.array(bn.num_batches_tracked)}


def assert_identical(got, want):
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert got[k].shape == want[k].shape, k
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def data(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, dy


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,shape", CASES, ids=CASE_IDS)
def test_layout_invariance(cls, shape, dtype, training, layout):
    x, dy = data(shape, dtype)
    want = run(cls, x, dy, dtype, training)
    f = LAYOUTS[layout]
    xv, dyv = f(x), f(dy)
    np.testing.assert_array_equal(xv, x)
    got = run(cls, xv, dyv, dtype, training)
    assert_identical(got, want)
    # the layout variants of x and dy were not modified
    np.testing.assert_array_equal(xv, x)
    np.testing.assert_array_equal(dyv, dy)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_broadcast_input(dtype, training):
    rng = np.random.default_rng(3)
    small = (rng.standard_normal((1, 3, 4, 5)) + 1).astype(dtype)
    xb = np.broadcast_to(small, (6, 3, 4, 5))
    assert not xb.flags.writeable and xb.strides[0] == 0
    dyb = np.broadcast_to(rng.standard_normal((1, 3, 1, 5)).astype(dtype), (6, 3, 4, 5))
    want = run(cbn.BatchNorm2d, np.ascontiguousarray(xb), np.ascontiguousarray(dyb), dtype, training)
    got = run(cbn.BatchNorm2d, xb, dyb, dtype, training)
    assert_identical(got, want)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layer_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,shape", CASES, ids=CASE_IDS)
def test_float16_input(cls, shape, layer_dtype, training):
    x, dy = data(shape, np.float16)
    got = run(cls, x, dy, layer_dtype, training)
    ref = run(cls, x.astype(layer_dtype), dy.astype(layer_dtype), layer_dtype, training)
    for k in ("y", "dx", "y2"):
        assert got[k].dtype == np.float16, k
        np.testing.assert_array_equal(got[k], ref[k].astype(np.float16), err_msg=k)
    for k in ("gw", "gb", "rm", "rv", "n"):
        assert got[k].dtype == ref[k].dtype, k
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


@pytest.mark.parametrize("layout", ["noncontig", "negative-stride", "readonly"])
@pytest.mark.parametrize("training", [True, False])
def test_float16_layouts(training, layout):
    x, dy = data((4, 3, 6, 5), np.float16)
    want = run(cbn.BatchNorm2d, x, dy, np.float32, training)
    f = LAYOUTS[layout]
    got = run(cbn.BatchNorm2d, f(x), f(dy), np.float32, training)
    assert_identical(got, want)


@pytest.mark.parametrize("training", [True, False])
def test_float16_byteswapped(training):
    """A non-native float16 is still float16: native float16 output, same values as the native input."""
    x, dy = data((4, 3, 6, 5), np.float16)
    want = run(cbn.BatchNorm2d, x, dy, np.float32, training)
    got = run(cbn.BatchNorm2d, _byteswapped(x), _byteswapped(dy), np.float32, training)
    assert got["y"].dtype == np.float16 and got["dx"].dtype == np.float16
    assert_identical(got, want)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("cls,shape", CASES, ids=CASE_IDS)
def test_float64_input_to_float32_layer(cls, shape, training):
    x, dy = data(shape, np.float64)
    got = run(cls, x, dy, np.float32, training)
    want = run(cls, x.astype(np.float32), dy.astype(np.float32), np.float32, training)
    assert got["y"].dtype == np.float32 and got["dx"].dtype == np.float32
    assert_identical(got, want)


@pytest.mark.parametrize("training", [True, False])
def test_float32_input_to_float64_layer(training):
    x, dy = data((4, 3, 6, 5), np.float32)
    got = run(cbn.BatchNorm2d, x, dy, np.float64, training)
    want = run(cbn.BatchNorm2d, x.astype(np.float64), dy.astype(np.float64), np.float64, training)
    assert got["y"].dtype == np.float64
    assert_identical(got, want)


@pytest.mark.parametrize("in_dtype,layer_dtype,out_dtype", [
    (np.float32, np.float32, np.float32), (np.float64, np.float64, np.float64),
    (np.float64, np.float32, np.float32), (np.float16, np.float32, np.float16), (np.float16, np.float64, np.float16),
])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("cls,shape", CASES, ids=CASE_IDS)
def test_out_arguments(cls, shape, in_dtype, layer_dtype, out_dtype, training):
    x, dy = data(shape, in_dtype)
    want = run(cls, x, dy, layer_dtype, training)
    C = shape[1]
    bn = cls(C, dtype=layer_dtype)
    bn.weight[...] = np.linspace(0.5, 1.5, C)
    bn.bias[...] = np.linspace(-0.3, 0.4, C)
    bn.running_mean[...] = np.linspace(-1, 1, C)
    bn.running_var[...] = np.linspace(0.5, 2, C)
    bn.train(training)
    out = np.full(shape, np.nan, out_dtype)
    y = bn(x, out=out)
    assert y is out
    np.testing.assert_array_equal(out, want["y"])
    dx_out = np.full(shape, np.nan, out_dtype)
    dx = bn.backward(dy, out=dx_out)
    assert dx is dx_out
    np.testing.assert_array_equal(dx_out, want["dx"])
    np.testing.assert_array_equal(bn.grad_weight, want["gw"])
    np.testing.assert_array_equal(bn.grad_bias, want["gb"])


def test_functional_out_and_dtype():
    """The functional API: out=, dtype= and return_saved agree with the layer."""
    from cbn import functional as F
    x, dy = data((4, 3, 6, 5), np.float64)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    out = np.empty(x.shape, np.float32)
    y, saved = F.batch_norm(x, rm, rv, training=True, dtype=np.float32, out=out, return_saved=True)
    assert y is out
    bn = cbn.BatchNorm2d(3, affine=False)
    np.testing.assert_array_equal(y, bn(x))
    np.testing.assert_array_equal(rm, bn.running_mean)
    np.testing.assert_array_equal(rv, bn.running_var)
    dx_out = np.empty(x.shape, np.float32)
    dx, dw, db = F.batch_norm_backward(dy, saved, out=dx_out)
    assert dx is dx_out
    np.testing.assert_array_equal(dx, bn.backward(dy))


@pytest.mark.parametrize("dtype,shape", [(np.float32, (64, 1024)), (np.float32, (16, 2048)), (np.float32, (8, 4096)),
                                         (np.float32, (13, 1024)), (np.float64, (64, 1024)), (np.float64, (13, 1024)),
                                         (np.float32, (10000, 128)), (np.float32, (5000, 300))])
def test_dx_bits_do_not_depend_on_where_dx_lies(shape, dtype):
    # dy 16 bytes past x and dx 16 past dy modulo 4 KB (back-to-back allocations): with rows a multiple of 4 KB long,
    # the channel-minor dx passes that take four rows at a time (float32 from 32 values a channel, _dx_by_row; in
    # double below that and for float64 data, blocks wider than DOUBLE_RUN) then step one row at a time; the float32
    # passes' rows of 128 values or more taken one at a time (those, and the rows of arrays beyond the caches: the
    # last two shapes, whose buffer holds two whole rows, or pieces of one) go out through a buffer (COPY_CHUNK,
    # COPY_WIDTH); the same bits either way, plain, after a fused ReLU (gated dy) and after a fused ReLU with a
    # residual (masked dy, dz), in training and in eval (an affine pass on dy)
    keep = []
    rng = np.random.default_rng(7)
    x, dy, z = placed(shape, 0, keep, dtype), placed(shape, 16, keep, dtype), placed(shape, 0, keep, dtype)
    x[...] = rng.standard_normal(shape) * 3 + 1
    dy[...] = rng.standard_normal(shape)
    z[...] = rng.standard_normal(shape)
    for options, extra in (({}, {}), ({"activation": "relu"}, {}), ({"activation": "relu"}, {"residual": z})):
        bn = cbn.BatchNorm1d(shape[1], dtype=dtype, **options)
        bn(x, **extra)
        stalled, apart = placed(shape, 32, keep, dtype), placed(shape, 2048, keep, dtype)
        bn.backward(dy, out=stalled)
        dz = bn.grad_residual
        bn.backward(dy, out=apart)
        np.testing.assert_array_equal(stalled, apart)
        np.testing.assert_array_equal(stalled, bn.backward(dy))
        if extra:
            np.testing.assert_array_equal(dz, bn.grad_residual)
        bn.eval()
        bn(x, **extra)
        bn.backward(dy, out=stalled)
        bn.backward(dy, out=apart)
        np.testing.assert_array_equal(stalled, apart)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(64, 256), (37, 200), (24, 96), (16, 64), (2, 3, 100), (3, 4, 80), (2, 5, 64),
                                   (9, 1030), (8, 2048)])
def test_y_bits_do_not_depend_on_where_y_lies(shape, dtype):
    # the in-cache affine pass of runs longer than 64 values (channel-minor: a block's columns, float32 and the
    # double passes four rows at a time; channel-major: each row) takes the values before y's first vector boundary
    # on their own (ALIGNED_RUN), and a double pass over rows a multiple of 4 KB long steps one row at a time where
    # y lies less than 128 bytes past x modulo 4 KB (_stalls): y at
    # every offset within a cache line gets the same bits, for every affine op (training forward plain, with a fused
    # ReLU, with a residual, with both; eval; the eval backward, an affine pass on dy)
    keep = []
    rng = np.random.default_rng(8)
    x, z, dy = (placed(shape, 0, keep, dtype) for _ in range(3))
    x[...] = rng.standard_normal(shape) * 3 + 20
    z[...] = rng.standard_normal(shape)
    dy[...] = rng.standard_normal(shape)
    step = np.dtype(dtype).itemsize
    for options, extra in (({}, {}), ({"activation": "relu"}, {}), ({}, {"residual": z}),
                           ({"activation": "relu"}, {"residual": z})):
        results = []
        for offset in range(0, 64, step):
            bn = cbn.BatchNorm1d(shape[1], dtype=dtype, **options)
            y, y_eval, dx_eval = (placed(shape, offset, keep, dtype) for _ in range(3))
            bn(x, out=y, **extra)
            bn.eval()
            bn(x, out=y_eval, **extra)
            bn.backward(dy, out=dx_eval)
            results.append((y, y_eval, dx_eval))
        for outputs in results[1:]:
            for a, b in zip(outputs, results[0]):
                np.testing.assert_array_equal(a, b)
