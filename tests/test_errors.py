"""Bad input: exception type, a message naming the expected and the actual value, and the layer's state (running
statistics, counter, parameters, mode, gradients and saved forward) byte-for-byte unchanged; one test per bad input.

Also the special values: NaN/Inf confined to their channel, empty batches, constant channels, inputs never modified.
"""
import pickle
import re

import numpy as np
import pytest

import cbn
from cbn import functional as F

from bn_helpers import full_snapshot, snapshot, trained_layer

SHAPE = (4, 3, 5, 5)


@pytest.fixture
def layer():
    """A BatchNorm2d(3) with non-default weight, bias, running stats and counter, after a forward and a backward
    (saved input, gradients)."""
    bn = trained_layer(cbn.BatchNorm2d, 3, SHAPE, seed=4)
    bn(np.random.default_rng(5).standard_normal(SHAPE).astype(np.float32))
    bn.backward(np.ones(SHAPE, np.float32))
    return bn


@pytest.fixture
def x():
    return np.random.default_rng(6).standard_normal(SHAPE).astype(np.float32)


def raises_unchanged(layer, exc, expected, actual, fn, *args, **kwargs):
    """fn(*args, **kwargs) raises exc with a message matching the regexes ``expected`` and ``actual``, and leaves
    the layer exactly as it was."""
    before = full_snapshot(layer)
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert re.search(expected, msg), f"message {msg!r} does not name the expected value ({expected})"
    assert re.search(actual, msg), f"message {msg!r} does not name the actual value ({actual})"
    assert full_snapshot(layer) == before, "layer state changed by a failed call"


def _masked(x):
    return np.ma.masked_array(x, mask=np.zeros(x.shape, bool))


def _strided(shape, dtype=np.float32):
    return np.empty(shape[:-1] + (2 * shape[-1],), dtype)[..., ::2]


def _read_only(a):
    a.flags.writeable = False
    return a


def _channels_last(shape, dtype=np.float32):
    """An (N, C, *) array whose memory is (N, *, C)."""
    return np.empty((shape[0],) + shape[2:] + (shape[1],), dtype).transpose(0, -1, *range(1, len(shape) - 1))


_OUT_LAYOUT = r"C-contiguous or laid out as the input \(axes in memory order \(0, 1, 2, 3\)\)"
_BIG = np.random.default_rng(0).standard_normal((8, 3, 5, 5)).astype(np.float32)

# (id, call(layer, x, dy), exception, expected (regex), actual (regex)); each runs in training and in eval mode.
LAYER_BAD = [
    ("input-list", lambda bn, x, dy: bn(x.tolist()), TypeError, r"numpy\.ndarray", r"got list"),
    ("input-scalar", lambda bn, x, dy: bn(1.0), TypeError, r"numpy\.ndarray", r"got float"),
    ("input-none", lambda bn, x, dy: bn(None), TypeError, r"numpy\.ndarray", r"got NoneType"),
    ("input-masked", lambda bn, x, dy: bn(_masked(x)), TypeError, r"numpy\.ndarray", r"got MaskedArray"),
] + [
    (f"input-{np.dtype(dt).name}", lambda bn, x, dy, dt=dt: bn(np.ones(SHAPE).astype(dt)), TypeError,
     r"floating dtype \(float16, float32 or float64\)", "got " + re.escape(str(np.dtype(dt))))
    for dt in (np.int64, np.int32, np.uint8, np.bool_, np.complex64, np.complex128, object, "U1", "datetime64[s]")
] + [
    ("input-0d", lambda bn, x, dy: bn(np.float32(1.0)), TypeError, r"numpy\.ndarray", r"got float32"),
    ("input-1d", lambda bn, x, dy: bn(np.ones(4, np.float32)), ValueError, r"expected 4D", r"got 1D"),
    ("input-3d", lambda bn, x, dy: bn(np.ones((4, 3, 5), np.float32)), ValueError, r"expected 4D", r"got 3D"),
    ("input-5d", lambda bn, x, dy: bn(np.ones((4, 3, 2, 2, 2), np.float32)), ValueError, r"expected 4D", r"got 5D"),
    ("channels-4", lambda bn, x, dy: bn(np.ones((4, 4, 5, 5), np.float32)), ValueError, r"with 3 channels",
     r"got 4\b"),
    ("channels-1", lambda bn, x, dy: bn(np.ones((4, 1, 5, 5), np.float32)), ValueError, r"with 3 channels",
     r"got 1\b"),
    ("channels-0", lambda bn, x, dy: bn(np.ones((4, 0, 5, 5), np.float32)), ValueError, r"with 3 channels",
     r"got 0\b"),
    ("out-list", lambda bn, x, dy: bn(x, out=[0.0] * x.size), TypeError, r"out must be a numpy\.ndarray",
     r"got list"),
    ("out-shape", lambda bn, x, dy: bn(x, out=np.empty((4, 3, 5, 4), np.float32)), ValueError,
     re.escape(f"shape {SHAPE}"), re.escape("got shape (4, 3, 5, 4)")),
    ("out-dtype", lambda bn, x, dy: bn(x, out=np.empty(SHAPE, np.float64)), ValueError, r"dtype float32",
     r"dtype float64"),
    ("out-strided", lambda bn, x, dy: bn(x, out=_strided(SHAPE)), ValueError, _OUT_LAYOUT, r"got strides \(600, "),
    ("out-fortran", lambda bn, x, dy: bn(x, out=np.asfortranarray(np.empty(SHAPE, np.float32))), ValueError,
     _OUT_LAYOUT, r"got strides \(4, 16, 48, 240\)"),
    ("out-channels-last", lambda bn, x, dy: bn(x, out=_channels_last(SHAPE)), ValueError, _OUT_LAYOUT,
     r"got strides \(300, 4, 60, 12\)"),
    ("out-read-only", lambda bn, x, dy: bn(x, out=_read_only(np.empty(SHAPE, np.float32))), ValueError,
     r"writeable", r"writeable=False"),
    ("out-is-input", lambda bn, x, dy: bn(x, out=x), ValueError, r"out must not share memory", r"with input"),
    ("out-overlaps-input", lambda bn, x, dy: bn(_BIG[:4], out=_BIG[2:6]), ValueError,
     r"out must not share memory", r"with input"),
    ("grad-list", lambda bn, x, dy: bn.backward(dy.tolist()), TypeError, r"numpy\.ndarray", r"got list"),
    ("grad-int32", lambda bn, x, dy: bn.backward(dy.astype(np.int32)), TypeError, r"floating dtype",
     r"got int32"),
    ("grad-bool", lambda bn, x, dy: bn.backward(dy > 0), TypeError, r"floating dtype", r"got bool"),
    ("grad-complex", lambda bn, x, dy: bn.backward(dy.astype(np.complex64)), TypeError, r"floating dtype",
     r"got complex64"),
    ("grad-shape", lambda bn, x, dy: bn.backward(np.ones((4, 3, 5, 6), np.float32)), ValueError,
     re.escape(f"shape {SHAPE}"), re.escape("got (4, 3, 5, 6)")),
    ("grad-3d", lambda bn, x, dy: bn.backward(np.ones((4, 3, 25), np.float32)), ValueError,
     re.escape(f"shape {SHAPE}"), re.escape("got (4, 3, 25)")),
    ("grad-out-shape", lambda bn, x, dy: bn.backward(dy, out=np.empty((4, 3, 5, 4), np.float32)), ValueError,
     re.escape(f"shape {SHAPE}"), re.escape("got shape (4, 3, 5, 4)")),
    ("grad-out-dtype", lambda bn, x, dy: bn.backward(dy, out=np.empty(SHAPE, np.float64)), ValueError,
     r"dtype float32", r"dtype float64"),
    ("grad-out-strided", lambda bn, x, dy: bn.backward(dy, out=_strided(SHAPE)), ValueError, _OUT_LAYOUT,
     r"got strides \(600, "),
    ("grad-out-channels-last", lambda bn, x, dy: bn.backward(dy, out=_channels_last(SHAPE)), ValueError, _OUT_LAYOUT,
     r"got strides \(300, 4, 60, 12\)"),
    ("residual-shape", lambda bn, x, dy: bn(x, residual=np.ones((4, 3, 5), np.float32)), ValueError,
     re.escape(f"residual must have shape {SHAPE}"), re.escape("got (4, 3, 5)")),
    ("residual-list", lambda bn, x, dy: bn(x, residual=x.tolist()), TypeError, r"residual must be a numpy\.ndarray",
     r"got list"),
    ("grad-out-read-only", lambda bn, x, dy: bn.backward(dy, out=_read_only(np.empty(SHAPE, np.float32))),
     ValueError, r"writeable", r"writeable=False"),
    ("grad-out-is-grad", lambda bn, x, dy: bn.backward(dy, out=dy), ValueError, r"out must not share memory",
     r"with grad_output"),
    ("grad-out-is-saved-input", lambda bn, x, dy: bn.backward(dy, out=bn._saved.x.reshape(SHAPE)), ValueError,
     r"out must not share memory", r"with the saved input"),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,call,exc,expected,actual", LAYER_BAD, ids=[c[0] for c in LAYER_BAD])
def test_bad_input(layer, x, name, call, exc, expected, actual, training):
    layer.train(training)
    if name.startswith("grad"):  # the backward of a forward in this mode
        layer(x)
        layer.backward(np.ones(SHAPE, np.float32))
    dy = np.random.default_rng(7).standard_normal(SHAPE).astype(np.float32)
    raises_unchanged(layer, exc, expected, actual, call, layer, x, dy)


@pytest.mark.parametrize("cls,bad_shape,expected,actual", [
    (cbn.BatchNorm1d, (4,), r"expected 2D or 3D", r"got 1D"),
    (cbn.BatchNorm1d, (4, 3, 2, 2), r"expected 2D or 3D", r"got 4D"),
    (cbn.BatchNorm3d, (4, 3, 5, 5), r"expected 5D", r"got 4D"),
    (cbn.BatchNorm3d, (2, 3, 2, 2, 2, 2), r"expected 5D", r"got 6D"),
])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_wrong_ndim_1d_3d(cls, bad_shape, expected, actual, training):
    good = {cbn.BatchNorm1d: (4, 3, 2), cbn.BatchNorm3d: (2, 3, 2, 2, 2)}[cls]
    bn = trained_layer(cls, 3, good).train(training)
    raises_unchanged(bn, ValueError, expected, actual, bn, np.ones(bad_shape, np.float32))


def test_backward_before_forward(layer):
    fresh = cbn.BatchNorm2d(3)
    fresh.load_state_dict(layer.state_dict())
    raises_unchanged(fresh, RuntimeError, r"forward", r"before forward", fresh.backward, np.ones(SHAPE, np.float32))
    assert fresh.grad_weight is None and fresh.grad_bias is None


@pytest.mark.parametrize("cls,shape", [(cbn.BatchNorm1d, (1, 3)), (cbn.BatchNorm1d, (1, 3, 1)),
                                       (cbn.BatchNorm2d, (1, 3, 1, 1)), (cbn.BatchNorm3d, (1, 3, 1, 1, 1))])
def test_one_value_per_channel_in_training(cls, shape):
    bn = trained_layer(cls, 3, (2,) + shape[1:])
    raises_unchanged(bn, ValueError, r"^Expected more than 1 value per channel when training",
                     r"got input size .*" + re.escape(str(list(shape))[1:-1]), bn, np.ones(shape, np.float32))
    # eval with running stats accepts it
    y = bn.eval()(np.ones(shape, np.float32))
    assert y.shape == shape and np.all(np.isfinite(y))
    # batch statistics in eval (no running stats) cannot, like torch
    plain = cls(3, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        plain(np.ones(shape, np.float32))


# -- functional -------------------------------------------------------------------------------------------------------
@pytest.fixture
def args():
    """Good arguments of cbn.functional.batch_norm (training) and a BatchNormSaved for batch_norm_backward."""
    rng = np.random.default_rng(8)
    a = dict(x=rng.standard_normal(SHAPE).astype(np.float32), running_mean=rng.standard_normal(3).astype(np.float32),
             running_var=rng.uniform(0.5, 2, 3).astype(np.float32), weight=rng.uniform(0.5, 2, 3).astype(np.float32),
             bias=rng.standard_normal(3).astype(np.float32), training=True)
    _, a["saved"] = F.batch_norm(a["x"], None, None, a["weight"], a["bias"], True, return_saved=True)
    a["dy"] = rng.standard_normal(SHAPE).astype(np.float32)
    return a


def _forward(a, **changes):
    kw = {k: v for k, v in a.items() if k not in ("saved", "dy")}
    kw.update(changes)
    return F.batch_norm(**kw)


def _backward(a, **changes):
    kw = dict(saved=a["saved"], dy=a["dy"])
    kw.update(changes)
    return F.batch_norm_backward(kw.pop("dy"), **kw)


def _as_bytes(value):
    if isinstance(value, np.ndarray):
        return value.dtype.str, value.shape, value.tobytes()
    if isinstance(value, tuple):
        return tuple(_as_bytes(v) for v in value)
    return value


FUNCTIONAL_BAD = [
    ("input-1d", lambda a: _forward(a, x=np.ones(4, np.float32)), ValueError, r"at least 2 dimensions", r"got 1\b"),
    ("input-0d", lambda a: _forward(a, x=np.array(1.0)), ValueError, r"at least 2 dimensions", r"got 0\b"),
    ("axis-4", lambda a: _forward(a, axis=4), ValueError, r"axis must be in \[-4, 4\) for 4-D input", r"got 4\b"),
    ("axis--5", lambda a: _forward(a, axis=-5), ValueError, r"axis must be in \[-4, 4\)", r"got -5\b"),
    ("axis-float", lambda a: _forward(a, axis=1.0), TypeError, r"axis must be an integer", r"got 1\.0"),
    ("axis-None", lambda a: _forward(a, axis=None), TypeError, r"axis must be an integer", r"got None"),
    ("axis-bool", lambda a: _forward(a, axis=True), TypeError, r"axis must be an integer", r"got True"),
    ("axis-channels", lambda a: _forward(a, axis=-1), ValueError,
     r"running_mean must have shape \(5,\) to match the input's 5 channels", r"got \(3,\)"),
    ("out-channels-last", lambda a: _forward(a, out=_channels_last(SHAPE)), ValueError, _OUT_LAYOUT,
     r"got strides \(300, 4, 60, 12\)"),
    ("stats-axis-4", lambda a: F.batch_norm_stats(a["x"], axis=4), ValueError, r"axis must be in \[-4, 4\)",
     r"got 4\b"),
    ("activation-sigmoid", lambda a: _forward(a, activation="sigmoid"), ValueError,
     r"activation must be None or 'relu'", r"got 'sigmoid'"),
    ("residual-shape", lambda a: _forward(a, residual=np.ones((4, 3, 5, 4), np.float32)), ValueError,
     re.escape(f"residual must have shape {SHAPE}"), re.escape("got (4, 3, 5, 4)")),
    ("residual-int", lambda a: _forward(a, residual=np.ones(SHAPE, np.int32)), TypeError,
     r"residual must have a floating dtype", r"got int32"),
    ("out-is-residual", lambda a: (lambda z: _forward(a, residual=z, out=z))(np.ones(SHAPE, np.float32)),
     ValueError, r"out must not share memory", r"with residual"),
    ("dtype-float16", lambda a: _forward(a, dtype=np.float16), TypeError, r"float32 or float64", r"got float16"),
    ("dtype-int32", lambda a: _forward(a, dtype=np.int32), TypeError, r"float32 or float64", r"got int32"),
    ("eps-negative", lambda a: _forward(a, eps=-1e-3), ValueError, r"eps must be a finite number >= 0",
     r"got -0\.001"),
    ("eps-nan", lambda a: _forward(a, eps=float("nan")), ValueError, r"eps must be a finite", r"got nan"),
    ("eps-str", lambda a: _forward(a, eps="1e-5"), ValueError, r"eps must be a finite", r"got '1e-5'"),
    ("momentum-1.5", lambda a: _forward(a, momentum=1.5), ValueError, r"momentum must be a number in \[0, 1\]",
     r"got 1\.5"),
    ("momentum-None", lambda a: _forward(a, momentum=None), ValueError, r"momentum must be a number", r"got None"),
    ("momentum-bool", lambda a: _forward(a, momentum=True), ValueError, r"momentum must be a number", r"got True"),
    ("one-value-per-channel", lambda a: _forward(a, x=np.ones((1, 3), np.float32)), ValueError,
     r"more than 1 value per channel", r"got input size \(1, 3\)"),
    ("running_mean-shape", lambda a: _forward(a, running_mean=np.zeros(4, np.float32)), ValueError,
     r"running_mean must have shape \(3,\)", r"got \(4,\)"),
    ("running_var-2d", lambda a: _forward(a, running_var=np.ones((3, 1), np.float32)), ValueError,
     r"running_var must have shape \(3,\)", r"got \(3, 1\)"),
    ("running_mean-list", lambda a: _forward(a, running_mean=[0.0] * 3), TypeError, r"numpy\.ndarray",
     r"got list"),
    ("running_mean-int", lambda a: _forward(a, running_mean=np.zeros(3, np.int64)), TypeError, r"floating dtype",
     r"got int64"),
    ("running_mean-float64-in-float32", lambda a: _forward(a, running_mean=np.zeros(3)), TypeError,
     r"compute dtype float32", r"got float64"),
    ("running_var-read-only", lambda a: _forward(a, running_var=_read_only(np.ones(3, np.float32))), ValueError,
     r"writeable, aligned, contiguous", r"writeable=False"),
    ("running_var-strided", lambda a: _forward(a, running_var=np.ones(6, np.float32)[::2]), ValueError,
     r"writeable, aligned, contiguous", r"C-contiguous=False"),
    ("running_mean-is-running_var", lambda a: _forward(a, running_var=a["running_mean"]), ValueError,
     r"running_mean must not share memory", r"with running_var"),
    ("running_mean-in-input", lambda a: _forward(a, running_mean=a["x"].reshape(-1)[:3]), ValueError,
     r"running_mean must not share memory", r"with input"),
    ("running_var-is-weight", lambda a: _forward(a, running_var=a["weight"]), ValueError,
     r"running_var must not share memory", r"with weight"),
    ("out-is-running_mean", lambda a: (lambda buf: _forward(a, x=a["x"][:2, :, 0, 0].copy(), running_mean=buf[:3],
                                                            out=buf.reshape(2, 3)))(np.zeros(6, np.float32)),
     ValueError, r"out must not share memory", r"with running_mean"),
    ("eval-without-running-stats", lambda a: _forward(a, training=False, running_var=None), ValueError,
     r"required when training=False", r"got ndarray and NoneType"),
    ("weight-shape", lambda a: _forward(a, weight=np.ones(4, np.float32)), ValueError,
     r"weight must have shape \(3,\)", r"got \(4,\)"),
    ("bias-int", lambda a: _forward(a, bias=np.zeros(3, np.int64)), TypeError, r"bias must have a floating dtype",
     r"got int64"),
    ("weight-tuple", lambda a: _forward(a, weight=(1.0, 1.0, 1.0)), TypeError, r"weight must be a numpy\.ndarray",
     r"got tuple"),
    ("saved-tuple", lambda a: _backward(a, saved=tuple(a["saved"])), TypeError, r"BatchNormSaved",
     r"got tuple"),
    ("saved-mean-float32", lambda a: _backward(a, saved=a["saved"]._replace(mean=a["saved"].mean.astype(np.float32))),
     ValueError, r"saved\.mean must be an aligned C-contiguous float64 array of shape \(3,\)",
     r"got float32 array of shape \(3,\)"),
    ("saved-invstd-short", lambda a: _backward(a, saved=a["saved"]._replace(invstd=a["saved"].invstd[:2].copy())),
     ValueError, r"saved\.invstd must be .* of shape \(3,\)", r"got float64 array of shape \(2,\)"),
    ("saved-weight-float64", lambda a: _backward(a, saved=a["saved"]._replace(weight=np.ones(3))), ValueError,
     r"saved\.weight must be .*float32", r"got float64 array"),
    ("saved-x-strided", lambda a: _backward(a, saved=a["saved"]._replace(x=_strided((4, 3, 25)))), ValueError,
     r"saved\.x must be an aligned C-contiguous", r"C-contiguous=False"),
    ("saved-shape", lambda a: _backward(a, saved=a["saved"]._replace(shape=(4, 3, 5))), ValueError,
     r"saved\.shape, axis and order must be .* of which saved\.x \(4, 3, 25\) is the \(A, C, B\) memory",
     r"got \(\(4, 3, 5\), 1, \(0, 1, 2, 3\)\)"),
    ("saved-axis", lambda a: _backward(a, saved=a["saved"]._replace(axis=3)), ValueError,
     r"saved\.shape, axis and order must be", r"got \(\(4, 3, 5, 5\), 3, \(0, 1, 2, 3\)\)"),
    ("saved-order", lambda a: _backward(a, saved=a["saved"]._replace(order=(0, 2, 3, 1))), ValueError,
     r"saved\.shape, axis and order must be", r"got \(\(4, 3, 5, 5\), 1, \(0, 2, 3, 1\)\)"),
    ("saved-order-not-axes", lambda a: _backward(a, saved=a["saved"]._replace(order=(0, 1, 2, 2))), ValueError,
     r"saved\.shape, axis and order must be", r"got \(\(4, 3, 5, 5\), 1, \(0, 1, 2, 2\)\)"),
    ("saved-dtype", lambda a: _backward(a, saved=a["saved"]._replace(dtype=np.dtype(np.int32))), ValueError,
     r"saved\.dtype must be float32 or float16", r"got dtype\('int32'\)"),
    ("grad-shape", lambda a: _backward(a, dy=a["dy"][:2]), ValueError, re.escape(f"shape {SHAPE}"),
     re.escape("got (2, 3, 5, 5)")),
    ("grad-out-is-saved-input", lambda a: _backward(a, out=a["saved"].x.reshape(SHAPE)), ValueError,
     r"out must not share memory", r"with the saved input"),
]


@pytest.mark.parametrize("name,call,exc,expected,actual", FUNCTIONAL_BAD, ids=[c[0] for c in FUNCTIONAL_BAD])
def test_bad_functional_input(args, name, call, exc, expected, actual):
    """cbn.functional raises before any kernel runs: no argument (running statistics included) is modified."""
    before = {k: _as_bytes(v) for k, v in args.items()}
    with pytest.raises(exc) as info:
        call(args)
    msg = str(info.value)
    assert re.search(expected, msg), f"message {msg!r} does not name the expected value ({expected})"
    assert re.search(actual, msg), f"message {msg!r} does not name the actual value ({actual})"
    assert {k: _as_bytes(v) for k, v in args.items()} == before, "an argument was modified by a failed call"


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


@pytest.mark.parametrize("cls,axis,exc,expected", [
    (cbn.BatchNorm2d, 4, ValueError, r"axis must be in \[-4, 4\) for 4-D input, got 4\b"),
    (cbn.BatchNorm2d, -5, ValueError, r"axis must be in \[-4, 4\) for 4-D input, got -5\b"),
    (cbn.BatchNorm1d, 3, ValueError, r"axis must be in \[-3, 3\) for 3-D input, got 3\b"),
    (cbn.BatchNorm3d, 1.5, TypeError, r"axis must be an integer, got 1\.5"),
    (cbn.BatchNorm2d, "-1", TypeError, r"axis must be an integer, got '-1'"),
    (cbn.BatchNorm2d, None, TypeError, r"axis must be an integer, got None"),
])
def test_bad_axis(cls, axis, exc, expected):
    with pytest.raises(exc, match=expected):
        cls(3, axis=axis)


@pytest.mark.parametrize("shape,expected,actual", [
    ((4, 5, 5), r"expected 4D", r"got 3D"),
    ((4, 3, 5, 5), r"expected input with 3 channels at axis -1", r"got 5\b"),
])
def test_channels_last_layer_bad_input(shape, expected, actual):
    """A layer with axis=-1 checks the channel count at its axis; BatchNorm1d's axis 2 rejects 2-D input."""
    bn = trained_layer(cbn.BatchNorm2d, 3, (4, 5, 5, 3), seed=4, axis=-1)
    raises_unchanged(bn, ValueError, expected, actual, bn, np.ones(shape, np.float32))
    bn1 = cbn.BatchNorm1d(3, axis=2)
    raises_unchanged(bn1, ValueError, r"axis must be in \[-2, 2\) for 2-D input", r"got 2\b", bn1,
                     np.ones((4, 3), np.float32))


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


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_guard_keeps_running_stats_of_poisoned_channels(bad, momentum, dtype):
    rng = np.random.default_rng(11)
    guarded = trained_layer(cbn.BatchNorm2d, 3, SHAPE, dtype=dtype, seed=2, momentum=momentum, nan_guard=True)
    plain = trained_layer(cbn.BatchNorm2d, 3, SHAPE, dtype=dtype, seed=2, momentum=momentum)
    assert snapshot(guarded) == snapshot(plain)  # the guard changes nothing on finite data
    assert "nan_guard=True" in repr(guarded) and "nan_guard" not in repr(plain)
    for step in range(3):
        x = rng.standard_normal(SHAPE).astype(dtype)
        x[1, 1, 2, 3] = bad
        before = snapshot(guarded)
        y, yp = guarded(x), plain(x)
        assert y.tobytes() == yp.tobytes(), "the guard must not change the output"
        assert guarded.num_batches_tracked == plain.num_batches_tracked == before["num_batches_tracked"] + 1
        for key in ("running_mean", "running_var"):
            g, p = getattr(guarded, key), getattr(plain, key)
            assert np.all(np.isfinite(g)) and not np.isfinite(p[1])
            assert g[[0, 2]].tobytes() == p[[0, 2]].tobytes()
            assert g[1].tobytes() == np.frombuffer(before[key][2], dtype)[1].tobytes(), f"{key}[1] was updated"
    # the functional form, and the guard survives pickle and save/load
    rm, rv = np.zeros(3, dtype), np.ones(3, dtype)
    F.batch_norm(x, rm, rv, training=True, nan_guard=True)
    assert np.all(np.isfinite(rm)) and rm[1] == 0 and rv[1] == 1 and rm[0] != 0
    assert pickle.loads(pickle.dumps(guarded)).nan_guard is True


def test_nan_guard_survives_save_and_load(tmp_path):
    layer = cbn.BatchNorm1d(2, nan_guard=True)
    layer.save(tmp_path / "g.npz")
    assert cbn.load(tmp_path / "g.npz").nan_guard is True
    cbn.BatchNorm1d(2).save(tmp_path / "p.npz")
    assert cbn.load(tmp_path / "p.npz").nan_guard is False


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
