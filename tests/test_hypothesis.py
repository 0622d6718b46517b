"""Property tests: random shapes, strides, offsets and spreads against the float64 reference.

Tolerances are error bounds, not fudge factors (see bn_helpers): float32 results may carry a few float32 ulps of
the magnitudes that were combined (|gamma*x_hat|, |beta|, |y| for the forward; |gamma*invstd*dy| and the
x_hat*dgamma/m, dbeta/m terms for dx); everything computed in double may carry ~eps64*max|x| in x - mean,
amplified by invstd. Nothing scales with the offset itself, so an implementation that loses the offset's digits
(E[x^2] - E[x]^2, or x*alpha + beta with alpha, beta rounded to float32) fails.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cbn import reference as R
from bn_helpers import EPS64, assert_per_channel, backward_tolerance, forward_tolerance, layer_class

SETTINGS = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])


def _floats(dtype, lo, hi):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False,
                     width=32 if dtype == np.float32 else 64)


@st.composite
def bn_inputs(draw):
    N = draw(st.integers(1, 6))
    C = draw(st.integers(1, 5))
    spatial = tuple(draw(st.lists(st.integers(1, 9), min_size=0, max_size=2)))
    shape = (N, C) + spatial
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    steps = tuple(draw(st.sampled_from([1, 1, 2, -1, -2])) for _ in shape)
    base_shape = tuple(n * abs(k) for n, k in zip(shape, steps))
    view = tuple(slice(None, None, k) for k in steps)
    # hypothesis-chosen unit values (often mostly one repeated value: near-constant channels) plus, half the time,
    # Gaussian noise from a drawn seed
    unit = draw(hnp.arrays(np.float64, base_shape, elements=_floats(np.float64, -1, 1)))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    if draw(st.booleans()):
        unit = unit + rng.standard_normal(base_shape)
    offset = draw(st.one_of(st.sampled_from([0.0, 1.0, -3.0, 100.0, 1e4, -1e4]), _floats(np.float64, -1e4, 1e4)))
    spread = draw(st.one_of(st.sampled_from([1e-3, 1e-2, 1.0, 10.0]), _floats(np.float64, 1e-3, 10)))
    x = (offset + spread * unit).astype(dtype)[view]
    dy = draw(hnp.arrays(dtype, base_shape, elements=_floats(dtype, -1, 1)))
    if draw(st.booleans()):
        dy = dy + rng.standard_normal(base_shape).astype(dtype)
    dy = dy[view]
    weight = draw(hnp.arrays(dtype, (C,), elements=_floats(dtype, -2, 2)))
    bias = draw(hnp.arrays(dtype, (C,), elements=_floats(dtype, -2, 2)))
    note(f"shape={shape} dtype={np.dtype(dtype).name} steps={steps} offset={offset!r} spread={spread!r}")
    return x, dy, weight, bias


def _as3(a):
    a = np.asarray(a, np.float64)
    return a.reshape(a.shape[0], a.shape[1], -1)


def _stat_tolerance(x3, mean, var_biased, m, f, rm_ref, rv_ref, dtype):
    """Bound on one running-statistics update (in double, rounded to dtype)."""
    eps = np.finfo(dtype).eps
    xmax = np.max(np.abs(x3), axis=(0, 2))
    delta = 32 * EPS64 * xmax
    dev = np.max(np.abs(x3 - mean[:, None]), axis=(0, 2))
    var_err = 2 * delta * dev + m * EPS64 * var_biased
    tiny = 2 * float(np.finfo(dtype).smallest_subnormal)
    tol_rm = 2 * eps * np.abs(rm_ref) + f * delta + tiny
    tol_rv = 2 * eps * np.abs(rv_ref) + f * var_err * m / max(m - 1, 1) + tiny
    return tol_rm, tol_rv


def _check_forward_backward(bn, x, dy, y, w64, b64, ref_y, saved, use_batch_stats, dtype, what):
    x3 = _as3(x)
    tol_y = forward_tolerance(x3, saved.mean, saved.invstd, w64, b64, _as3(ref_y), dtype)
    assert y.dtype == np.dtype(dtype) and y.shape == x.shape
    assert_per_channel(y, ref_y, tol_y, what + " y")
    dx = bn.backward(dy)
    ref = R.batch_norm_backward(np.asarray(dy, np.float64), saved)
    tol_dx, tol_dw, tol_db = backward_tolerance(x3, _as3(dy), saved.mean, saved.invstd, w64, use_batch_stats, ref,
                                                dtype)
    assert dx.dtype == np.dtype(dtype) and dx.shape == x.shape
    assert_per_channel(dx, ref[0], tol_dx, what + " dx")
    if bn.affine:
        assert_per_channel(bn.grad_weight, ref[1], tol_dw, what + " grad_weight")
        assert_per_channel(bn.grad_bias, ref[2], tol_db, what + " grad_bias")


@SETTINGS
@given(data=bn_inputs(), momentum=st.sampled_from([0.1, None, 0.5, 1.0, 0.0]), affine=st.booleans(),
       track=st.booleans())
def test_train_then_eval_against_reference(data, momentum, affine, track):
    x, dy, weight, bias = data
    dtype = x.dtype.type
    N, C = x.shape[:2]
    m = x.size // C
    bn = layer_class(x.ndim)(C, momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype)
    w64 = b64 = None
    if affine:
        bn.weight[...] = weight
        bn.bias[...] = bias
        w64, b64 = weight.astype(np.float64), bias.astype(np.float64)
    x_copy, dy_copy = x.copy(), dy.copy()

    if m > 1:
        rm_ref, rv_ref = np.zeros(C), np.ones(C)
        tol_rm, tol_rv = np.zeros(C), np.zeros(C)
        for step, xs in enumerate((x, (x * 0.5).astype(dtype)[::-1])):
            f = (1.0 / (step + 1) if momentum is None else momentum) if track else 0.0
            y = bn(xs)
            y_ref, saved = R.batch_norm(np.asarray(xs, np.float64), rm_ref if track else None,
                                        rv_ref if track else None, w64, b64, True, f, bn.eps, return_saved=True)
            _check_forward_backward(bn, xs, dy, y, w64, b64, y_ref, saved, True, dtype, f"train step {step}")
            if track:
                x3 = _as3(xs)
                t_rm, t_rv = _stat_tolerance(x3, saved.mean, 1 / saved.invstd ** 2 - bn.eps, m, f, rm_ref, rv_ref,
                                             dtype)
                tol_rm = (1 - f) * tol_rm + t_rm
                tol_rv = (1 - f) * tol_rv + t_rv
                assert bn.num_batches_tracked == step + 1
                assert bn.running_mean.dtype == np.dtype(dtype)
                assert_per_channel(bn.running_mean, rm_ref, tol_rm, f"running_mean step {step}")
                assert_per_channel(bn.running_var, rv_ref, tol_rv, f"running_var step {step}")
            else:
                assert bn.running_mean is None and bn.num_batches_tracked == 0
    elif track:
        # one value per channel: training is impossible; eval with running stats near the data
        bn.running_mean[...] = (x.reshape(C) + np.linspace(-1, 1, C) * np.max(np.abs(x)) * 1e-3).astype(dtype)
        bn.running_var[...] = np.linspace(0.5, 2, C)

    bn.eval()
    if track:
        rm, rv = bn.running_mean.astype(np.float64), bn.running_var.astype(np.float64)
        y = bn(x)
        y_ref, saved = R.batch_norm(np.asarray(x, np.float64), rm, rv, w64, b64, False, 0.0, bn.eps,
                                    return_saved=True)
        _check_forward_backward(bn, x, dy, y, w64, b64, y_ref, saved, False, dtype, "eval")
        np.testing.assert_array_equal(bn.running_mean, rm.astype(dtype))
    elif m > 1:
        y = bn(x)
        y_ref, saved = R.batch_norm(np.asarray(x, np.float64), None, None, w64, b64, True, 0.0, bn.eps,
                                    return_saved=True)
        _check_forward_backward(bn, x, dy, y, w64, b64, y_ref, saved, True, dtype, "eval, batch stats")
    assert x.tobytes() == x_copy.tobytes() and dy.tobytes() == dy_copy.tobytes()


@SETTINGS
@given(data=bn_inputs(), training=st.booleans())
def test_strided_equals_contiguous(data, training):
    """Any strides give bitwise the results of the contiguous copy."""
    x, dy, weight, bias = data
    C = x.shape[1]
    if training and x.size // C == 1:
        training = False
    out = []
    for xs, dys in ((x, dy), (np.ascontiguousarray(x), np.ascontiguousarray(dy))):
        bn = layer_class(x.ndim)(C, dtype=x.dtype).train(training)
        bn.weight[...] = weight
        bn.bias[...] = bias
        bn.running_mean[...] = np.linspace(-1, 1, C)
        out.append([bn(xs), bn.backward(dys), bn.grad_weight, bn.grad_bias, bn.running_mean, bn.running_var])
    for a, b in zip(*out):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tolerance_model_rejects_float32_shortcut(dtype):
    """Self-check of the error model: the torch-style float32 shortcut y = x*alpha + beta with alpha, beta rounded
    to float32 is outside the float32 bound on data far from zero, and cbn is inside it."""
    import cbn
    rng = np.random.default_rng(0)
    x = (1e4 + rng.standard_normal((8, 2, 16))).astype(np.float32)
    y_ref, saved = R.batch_norm(x.astype(np.float64), None, None, training=True, return_saved=True)
    alpha = saved.invstd.astype(np.float32)
    beta = (-saved.mean * saved.invstd).astype(np.float32)
    shortcut = x * alpha[:, None] + beta[:, None]
    tol = forward_tolerance(x.astype(np.float64), saved.mean, saved.invstd, None, None, y_ref, np.float32)
    with pytest.raises(AssertionError):
        assert_per_channel(shortcut, y_ref, tol, "shortcut")
    assert_per_channel(cbn.BatchNorm1d(2, dtype=np.float32)(x), y_ref, tol, "cbn")
