"""Property tests: random shapes (N = 0, C = 1, size-1 and prime sizes), float16/32/64, C and Fortran order,
strided, negative-stride, broadcast and read-only views, large offsets, tiny spreads and NaN/Inf, against the
float64 reference; invariance to a*x + b, batch permutation, channel independence, output moments. The number of
examples per test comes from the hypothesis profile (conftest.py: HYPOTHESIS_PROFILE=dev, ci or long).

Tolerances are error bounds, not fudge factors (see bn_helpers): float32 results may carry a few float32 ulps of
the magnitudes that were combined (|gamma*x_hat|, |beta|, |y| for the forward; |gamma*invstd*dy| and the
x_hat*dgamma/m, dbeta/m terms for dx); everything computed in double may carry ~eps64*max|x| in x - mean,
amplified by invstd. Nothing scales with the offset itself, so an implementation that loses the offset's digits
(E[x^2] - E[x]^2, or x*alpha + beta with alpha, beta rounded to float32) fails.
"""
import numpy as np
import pytest
from hypothesis import assume, given, note
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import cbn
from cbn import reference as R

from bn_helpers import (
    EPS64,
    FORCED_LAYOUTS,
    assert_per_channel,
    backward_tolerance,
    forced_layout,
    forward_tolerance,
    layer_class,
)

DTYPES = [np.float16, np.float32, np.float64]
WIDTH = {np.float16: 16, np.float32: 32, np.float64: 64}
SIZES = st.one_of(st.integers(1, 9), st.sampled_from([1, 11, 13, 17, 31, 1031]))  # 1031: long rows, prime


def _floats(dtype, lo, hi):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=WIDTH[dtype])


def _layer_dtype(dtype):
    """The layer computes float16 input in float32."""
    return np.float32 if dtype == np.float16 else dtype


@st.composite
def _shapes(draw, min_n=1):
    N = draw(st.integers(min_n, 6))
    C = draw(st.sampled_from([1, 2, 3, 4, 5, 7]))
    spatial = tuple(draw(st.lists(SIZES, min_size=0, max_size=2)))
    if N * C * np.prod(spatial) > 40000:  # keep examples small: one long row at most
        spatial = spatial[:1]
    return (N, C) + spatial


def _view(draw, a, steps):
    """a[steps] in a drawn memory layout: as is, Fortran order, read-only, or broadcast along one axis."""
    a = a[tuple(slice(None, None, k) for k in steps)]
    kind = draw(st.sampled_from(["as-is", "fortran", "read-only", "broadcast"]))
    if kind == "fortran":
        a = np.asfortranarray(a)
    elif kind == "read-only":
        a = a.view()
        a.flags.writeable = False
    elif kind == "broadcast":
        axis = draw(st.sampled_from([0] + list(range(2, a.ndim))))
        a = np.broadcast_to(a.take([0], axis=axis) if a.shape[axis] else a, a.shape)
    return a, kind


@st.composite
def bn_inputs(draw, min_n=1):
    shape = draw(_shapes(min_n))
    N, C = shape[:2]
    dtype = draw(st.sampled_from(DTYPES))
    steps = tuple(draw(st.sampled_from([1, 1, 2, -1, -2])) for _ in shape)
    base_shape = tuple(n * abs(k) for n, k in zip(shape, steps))
    # hypothesis-chosen unit values (often mostly one repeated value: near-constant channels) plus, half the time,
    # Gaussian noise from a drawn seed
    unit = draw(hnp.arrays(np.float64, base_shape, elements=_floats(np.float64, -1, 1)))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    if draw(st.booleans()):
        unit = unit + rng.standard_normal(base_shape)
    offset = draw(st.one_of(st.sampled_from([0.0, 1.0, -3.0, 100.0, 1e4, -1e4]), _floats(np.float64, -1e4, 1e4)))
    spread = draw(st.one_of(st.sampled_from([1e-3, 1e-2, 1.0, 10.0]), _floats(np.float64, 1e-3, 10)))
    x, layout = _view(draw, (offset + spread * unit).astype(dtype), steps)
    dy = draw(hnp.arrays(dtype, base_shape, elements=_floats(dtype, -1, 1)))
    if draw(st.booleans()):
        dy = dy + rng.standard_normal(base_shape).astype(dtype)
    dy, _ = _view(draw, dy, steps)
    weight = draw(hnp.arrays(dtype, (C,), elements=_floats(dtype, -2, 2)))
    bias = draw(hnp.arrays(dtype, (C,), elements=_floats(dtype, -2, 2)))
    note(f"shape={shape} dtype={np.dtype(dtype).name} steps={steps} layout={layout} offset={offset!r} "
         f"spread={spread!r}")
    return x, dy, weight, bias


def _c64(a):
    """``a`` as a C-contiguous float64 array: the reference's NumPy sums are pairwise (accurate to a few eps) only
    along contiguous rows; on Fortran-order or broadcast layouts they add naively and lose more than the error
    model allows the reference."""
    return np.ascontiguousarray(a, dtype=np.float64)


def _as3(a):
    a = _c64(a)
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


def _check_forward_backward(bn, x, dy, y, w64, b64, ref_y, saved, use_batch_stats, what):
    """y (and the backward of dy) within the error bounds of the reference; float16 output is bounded with float16's
    epsilon, the gradients of the parameters (computed in the layer dtype) with the layer dtype's."""
    dtype, ldt = x.dtype.type, bn.dtype.type
    x3 = _as3(x)
    ref = R.batch_norm_backward(_c64(dy), saved)
    # float16 output beyond float16's range is inf (like torch): not what this check is about
    assume(max(np.max(np.abs(ref_y), initial=0), np.max(np.abs(ref[0]), initial=0)) < np.finfo(dtype).max / 2)
    tol_y = forward_tolerance(x3, saved.mean, saved.invstd, w64, b64, _as3(ref_y), dtype)
    assert y.dtype == np.dtype(dtype) and y.shape == x.shape
    assert_per_channel(y, ref_y, tol_y, what + " y")
    dx = bn.backward(dy)
    tol_dx = backward_tolerance(x3, _as3(dy), saved.mean, saved.invstd, w64, use_batch_stats, ref, dtype)[0]
    _, tol_dw, tol_db = backward_tolerance(x3, _as3(dy), saved.mean, saved.invstd, w64, use_batch_stats, ref, ldt)
    assert dx.dtype == np.dtype(dtype) and dx.shape == x.shape
    assert_per_channel(dx, ref[0], tol_dx, what + " dx")
    if bn.affine:
        assert bn.grad_weight.dtype == np.dtype(ldt)
        assert_per_channel(bn.grad_weight, ref[1], tol_dw, what + " grad_weight")
        assert_per_channel(bn.grad_bias, ref[2], tol_db, what + " grad_bias")
    return tol_y, tol_dx


def _layer(x, weight=None, bias=None, **kw):
    """A layer for x (float16 input: a float32 layer) with the given weight and bias."""
    bn = layer_class(x.ndim)(x.shape[1], dtype=_layer_dtype(x.dtype.type), **kw)
    if bn.affine and weight is not None:
        bn.weight[...] = weight
        bn.bias[...] = bias
    return bn


@given(data=bn_inputs(min_n=0), momentum=st.sampled_from([0.1, None, 0.5, 1.0, 0.0]), affine=st.booleans(),
       track=st.booleans(), layout=st.sampled_from(FORCED_LAYOUTS))
def test_train_then_eval_against_reference(data, momentum, affine, track, layout):
    """Every layout of the kernels (forced on small inputs, 2 threads) against the reference."""
    with forced_layout(layout):
        _train_then_eval_against_reference(data, momentum, affine, track)


def _train_then_eval_against_reference(data, momentum, affine, track):
    x, dy, weight, bias = data
    dtype = x.dtype.type
    ldt = _layer_dtype(dtype)
    N, C = x.shape[:2]
    m = x.size // C
    bn = _layer(x, weight, bias, momentum=momentum, affine=affine, track_running_stats=track)
    w64 = b64 = None
    if affine:
        w64, b64 = bn.weight.astype(np.float64), bn.bias.astype(np.float64)
    x_copy, dy_copy = x.copy(), dy.copy()

    if m == 0:
        # empty batch: empty output, running statistics unchanged, the counter counts it (like torch)
        y = bn(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert bn.backward(dy).shape == x.shape
        assert bn.num_batches_tracked == (1 if track else 0)
        if track:
            assert bn.running_mean.tobytes() == np.zeros(C, ldt).tobytes()
            assert bn.running_var.tobytes() == np.ones(C, ldt).tobytes()
        return
    if m > 1:
        rm_ref, rv_ref = np.zeros(C), np.ones(C)
        tol_rm, tol_rv = np.zeros(C), np.zeros(C)
        for step, xs in enumerate((x, (x * 0.5).astype(dtype)[::-1])):
            f = (1.0 / (step + 1) if momentum is None else momentum) if track else 0.0
            y = bn(xs)
            y_ref, saved = R.batch_norm(_c64(xs), rm_ref if track else None,
                                        rv_ref if track else None, w64, b64, True, f, bn.eps, return_saved=True)
            _check_forward_backward(bn, xs, dy, y, w64, b64, y_ref, saved, True, f"train step {step}")
            if track:
                x3 = _as3(xs)
                t_rm, t_rv = _stat_tolerance(x3, saved.mean, 1 / saved.invstd ** 2 - bn.eps, m, f, rm_ref, rv_ref,
                                             ldt)
                tol_rm = (1 - f) * tol_rm + t_rm
                tol_rv = (1 - f) * tol_rv + t_rv
                assert bn.num_batches_tracked == step + 1
                assert bn.running_mean.dtype == np.dtype(ldt)
                assert_per_channel(bn.running_mean, rm_ref, tol_rm, f"running_mean step {step}")
                assert_per_channel(bn.running_var, rv_ref, tol_rv, f"running_var step {step}")
            else:
                assert bn.running_mean is None and bn.num_batches_tracked == 0
    elif track:
        # one value per channel: training is impossible; eval with running stats near the data
        bn.running_mean[...] = (x.reshape(C) + np.linspace(-1, 1, C) * np.max(np.abs(x)) * 1e-3).astype(ldt)
        bn.running_var[...] = np.linspace(0.5, 2, C)

    bn.eval()
    if track:
        rm, rv = bn.running_mean.astype(np.float64), bn.running_var.astype(np.float64)
        y = bn(x)
        y_ref, saved = R.batch_norm(_c64(x), rm, rv, w64, b64, False, 0.0, bn.eps,
                                    return_saved=True)
        _check_forward_backward(bn, x, dy, y, w64, b64, y_ref, saved, False, "eval")
        np.testing.assert_array_equal(bn.running_mean, rm.astype(ldt))
    elif m > 1:
        y = bn(x)
        y_ref, saved = R.batch_norm(_c64(x), None, None, w64, b64, True, 0.0, bn.eps,
                                    return_saved=True)
        _check_forward_backward(bn, x, dy, y, w64, b64, y_ref, saved, True, "eval, batch stats")
    assert x.tobytes() == x_copy.tobytes() and dy.tobytes() == dy_copy.tobytes()


@given(data=bn_inputs(min_n=0), training=st.booleans())
def test_strided_equals_contiguous(data, training):
    """Any strides and layouts give bitwise the results of a contiguous copy of the same memory order: an array
    that is dense in some axis order (Fortran order) is used as it is, any other is copied in C order."""
    x, dy, weight, bias = data
    if training and x.size // x.shape[1] == 1:
        training = False
    out = []
    for xs, dys in ((x, dy), (_kernel_copy(x), _kernel_copy(dy))):
        bn = _layer(x, weight, bias).train(training)
        bn.running_mean[...] = np.linspace(-1, 1, x.shape[1])
        out.append([bn(xs), bn.backward(dys), bn.grad_weight, bn.grad_bias, bn.running_mean, bn.running_var])
    for a, b in zip(*out):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _kernel_copy(a):
    """A fresh copy of ``a`` in the memory order the kernels use for it: its own when it is dense (then a copy in
    NumPy's "K" order has its strides), else C order."""
    k = a.copy(order="K")
    return k if k.strides == a.strides else a.copy(order="C")  # a copy even when NumPy calls ``a`` C-contiguous


@given(data=bn_inputs(min_n=2), perm_seed=st.integers(0, 2 ** 32 - 1))
def test_permuting_the_batch_permutes_the_output(data, perm_seed):
    """cbn(x[p]) == cbn(x)[p] within the two error bounds (summation order may differ); the same for dx,
    the parameter gradients and the running statistics."""
    x, dy, weight, bias = data
    perm = np.random.default_rng(perm_seed).permutation(x.shape[0])
    if np.array_equal(perm, np.arange(x.shape[0])):
        perm = perm[::-1]
    a, b = _layer(x, weight, bias), _layer(x, weight, bias)
    w64, b64 = a.weight.astype(np.float64), a.bias.astype(np.float64)
    C, m = x.shape[1], x.size // x.shape[1]
    out = []
    for bn, xs, dys in ((a, x, dy), (b, x[perm], dy[perm])):  # each within the bounds of the reference
        rm, rv = np.zeros(C), np.ones(C)
        y = bn(xs)
        y_ref, saved = R.batch_norm(_c64(xs), rm, rv, w64, b64, True, bn.momentum, bn.eps, return_saved=True)
        tol_y, tol_dx = _check_forward_backward(bn, xs, dys, y, w64, b64, y_ref, saved, True, "y")
        t_rm, t_rv = _stat_tolerance(_as3(xs), saved.mean, 1 / saved.invstd ** 2 - bn.eps, m, bn.momentum, rm, rv,
                                     a.dtype.type)
        out.append((y, bn.backward(dys), tol_y, tol_dx, t_rm, t_rv))
    (ya, dxa, tol_y, tol_dx, t_rm, t_rv), (yb, dxb) = out[0], out[1][:2]
    # and the two agree: the permuted batch gives the permuted results
    assert_per_channel(yb, ya[perm], 2 * tol_y, "y of the permuted batch")
    assert_per_channel(dxb, dxa[perm], 2 * tol_dx, "dx of the permuted batch")
    assert_per_channel(b.running_mean, a.running_mean, 2 * t_rm, "running_mean")
    assert_per_channel(b.running_var, a.running_var, 2 * t_rv, "running_var")


@st.composite
def exact_affine_inputs(draw):
    """x on a coarse binary grid and z = a*x + b with a = 2**k > 0, both exact in every dtype (11 significant bits,
    no overflow, no subnormals), every channel with at least two distinct values."""
    shape = draw(_shapes(min_n=2))
    dtype = draw(st.sampled_from(DTYPES))
    xi = draw(hnp.arrays(np.int64, shape, elements=st.integers(-2 ** 9, 2 ** 9)))
    xi = xi.reshape(shape[0], shape[1], -1)
    flat = xi.transpose(1, 0, 2).reshape(shape[1], -1)
    const = np.all(flat == flat[:, :1], axis=1)
    xi[-1, const, -1] += 1
    xi = xi.reshape(shape)
    e, k = draw(st.integers(-6, 3)), draw(st.integers(-2, 2))
    bi = draw(st.integers(-2 ** 9, 2 ** 9))
    x = (xi * 2.0 ** e).astype(dtype)
    z = (((xi * 2.0 ** e) * 2.0 ** k) + bi * 2.0 ** (e + k)).astype(dtype)
    assert np.array_equal(z.astype(np.float64), x.astype(np.float64) * 2.0 ** k + bi * 2.0 ** (e + k))
    note(f"shape={shape} dtype={np.dtype(dtype).name} a=2**{k} b={bi}*2**{e + k}")
    return x, z, 2.0 ** k


@given(data=exact_affine_inputs(), seed=st.integers(0, 2 ** 32 - 1))
def test_training_output_invariant_to_positive_affine_input_map(data, seed):
    """Without affine and with eps = 0, y(a*x + b) == y(x) and a*dx(a*x + b) == dx(x) for a > 0, within the sum of
    the two error bounds."""
    x, z, a = data
    dy = np.random.default_rng(seed).standard_normal(x.shape).astype(x.dtype)
    results = []
    for xs in (x, z):
        bn = _layer(xs, affine=False, eps=0.0)
        y = bn(xs)
        y_ref, saved = R.batch_norm(_c64(xs), None, None, None, None, True, 0.0, 0.0, return_saved=True)
        results.append((y, bn.backward(dy)) + _check_forward_backward(bn, xs, dy, y, None, None, y_ref, saved, True,
                                                                        "y"))
    (yx, dxx, tyx, tdx), (yz, dxz, tyz, tdz) = results
    assert_per_channel(yz, yx, tyx + tyz, "y(a*x + b) vs y(x)")
    assert_per_channel(dxz.astype(np.float64) * a, dxx, tdx + a * tdz, "a*dx(a*x + b) vs dx(x)")


@given(data=bn_inputs(min_n=1))
def test_training_output_has_mean_beta_and_std_gamma(data):
    """Per channel, the training output has mean beta and std |gamma|*sd/sqrt(sd**2 + eps) (sd: the batch's biased
    standard deviation), within the per-element error bound."""
    x, _, weight, bias = data
    C = x.shape[1]
    assume(x.size // C > 1)
    bn = _layer(x, weight, bias)
    y = bn(x)
    x3 = _as3(x)
    y_ref, saved = R.batch_norm(x3, None, None, bn.weight.astype(np.float64), bn.bias.astype(np.float64), True, 0.0,
                                bn.eps, return_saved=True)
    tol = forward_tolerance(x3, saved.mean, saved.invstd, bn.weight.astype(np.float64), bn.bias.astype(np.float64),
                            y_ref, x.dtype.type)
    dev = x3 - x3.mean(axis=(0, 2), keepdims=True)
    s = np.max(np.abs(dev), axis=(0, 2), keepdims=True)
    s[s == 0] = 1
    sd = np.sqrt(np.mean((dev / s) ** 2, axis=(0, 2))) * s[0, :, 0]  # scaled: squares of tiny x would underflow
    y3 = _as3(y)
    scale = np.max(np.abs(y3), axis=(0, 2))
    scale[scale == 0] = 1
    rounding = 1e-13 * scale  # of the float64 mean and std below (scaled: squares of tiny y would underflow)
    gamma, beta = bn.weight.astype(np.float64), bn.bias.astype(np.float64)
    assert_per_channel(y3.mean(axis=(0, 2)), beta, tol + rounding, "mean of y")
    # the ratio first: |gamma|*sd can fall below the normal range (gamma = 2.2e-308) and lose digits there
    assert_per_channel((y3 / scale[:, None]).std(axis=(0, 2)) * scale, np.abs(gamma) * (sd / np.sqrt(sd ** 2 + bn.eps)),
                       tol + rounding, "std of y")


_GARBAGE = ["nan", "inf", "-inf", "inf and -inf", "huge", "other data"]


@given(data=bn_inputs(min_n=1), poisoned=st.lists(st.integers(0, 6), min_size=1, unique=True),
       garbage=st.sampled_from(_GARBAGE), seed=st.integers(0, 2 ** 32 - 1))
def test_channels_are_independent(data, poisoned, garbage, seed):
    """Whatever the poisoned channels hold (NaN, Inf, huge values, other data), every other channel's output,
    gradients and running statistics are what the reference gives for that channel alone; with nan_guard the
    poisoned channels whose statistics are not finite keep their running statistics."""
    x, dy, weight, bias = data
    N, C = x.shape[:2]
    assume(x.size // C > 1)
    poisoned = sorted(c for c in poisoned if c < C)
    clean = [c for c in range(C) if c not in poisoned]
    assume(poisoned)
    original = x
    x = _kernel_copy(x)  # writeable, same dtype, and the memory order the kernels use for the original
    rng = np.random.default_rng(seed)
    big = float(np.finfo(x.dtype).max) / 4
    for c in poisoned:
        chan = x[:, c]  # a view: writes go to x
        spots = [np.unravel_index(i % chan.size, chan.shape) for i in rng.integers(0, chan.size) + np.arange(2)]
        if garbage == "nan":
            chan[spots[0]] = np.nan
        elif garbage == "inf":
            chan[spots[0]] = np.inf
        elif garbage == "-inf":
            chan[spots[0]] = -np.inf
        elif garbage == "inf and -inf":
            chan[spots[0]], chan[spots[1]] = np.inf, -np.inf
        elif garbage == "huge":
            chan[...] = rng.uniform(-big, big, chan.shape)
        else:
            chan[...] = rng.standard_normal(chan.shape) * 1e3
    layers = {guard: _layer(x, weight, bias, nan_guard=guard) for guard in (False, True)}
    before = {guard: (bn.running_mean.copy(), bn.running_var.copy()) for guard, bn in layers.items()}
    ys = {}
    with np.errstate(all="ignore"):
        for guard, bn in layers.items():
            ys[guard] = (bn(x), bn.backward(dy), bn.grad_weight, bn.grad_bias)
    # clean channels: bitwise what they are without the poison ...
    unpoisoned = _layer(original, weight, bias)
    y0, dx0 = unpoisoned(original), unpoisoned.backward(dy)
    for guard, (y, dx, gw, gb) in ys.items():
        assert y[:, clean].tobytes() == y0[:, clean].tobytes() and dx[:, clean].tobytes() == dx0[:, clean].tobytes()
        assert gw[clean].tobytes() == unpoisoned.grad_weight[clean].tobytes()
        assert layers[guard].running_var[clean].tobytes() == unpoisoned.running_var[clean].tobytes()
    # ... and what the reference gives for them alone
    if clean:
        sub = np.ascontiguousarray(x[:, clean])
        w64, b64 = weight[clean].astype(np.float64), bias[clean].astype(np.float64)
        rm_ref, rv_ref = np.zeros(len(clean)), np.ones(len(clean))
        y_ref, saved = R.batch_norm(_c64(sub), rm_ref, rv_ref, w64, b64, True, 0.1, 1e-5,
                                    return_saved=True)
        ref = R.batch_norm_backward(_c64(dy[:, clean]), saved)
        x3, dy3 = _as3(sub), _as3(dy[:, clean])
        tol_y = forward_tolerance(x3, saved.mean, saved.invstd, w64, b64, _as3(y_ref), x.dtype.type)
        tol_dx = backward_tolerance(x3, dy3, saved.mean, saved.invstd, w64, True, ref, x.dtype.type)[0]
        ldt = _layer_dtype(x.dtype.type)
        _, tol_dw, tol_db = backward_tolerance(x3, dy3, saved.mean, saved.invstd, w64, True, ref, ldt)
        m = x.size // C
        t_rm, t_rv = _stat_tolerance(x3, saved.mean, 1 / saved.invstd ** 2 - 1e-5, m, 0.1, rm_ref, rv_ref, ldt)
        for guard, (y, dx, gw, gb) in ys.items():
            what = f"nan_guard={guard} clean channel"
            assert_per_channel(y[:, clean], y_ref, tol_y, what + " y")
            assert_per_channel(dx[:, clean], ref[0], tol_dx, what + " dx")
            assert_per_channel(gw[clean], ref[1], tol_dw, what + " grad_weight")
            assert_per_channel(gb[clean], ref[2], tol_db, what + " grad_bias")
            bn = layers[guard]
            assert_per_channel(bn.running_mean[clean], rm_ref, t_rm, what + " running_mean")
            assert_per_channel(bn.running_var[clean], rv_ref, t_rv, what + " running_var")
    # the guard: clean channels bitwise as without it; poisoned channels keep their statistics unless the
    # unguarded update is finite, in which case they take exactly that update
    plain, guarded = layers[False], layers[True]
    assert guarded.num_batches_tracked == plain.num_batches_tracked == 1
    finite = np.isfinite(plain.running_mean) & np.isfinite(plain.running_var)
    for key, old in zip(("running_mean", "running_var"), before[True]):
        g, p = getattr(guarded, key), getattr(plain, key)
        assert np.all(np.isfinite(g)), f"nan_guard let a non-finite {key} through"
        assert g[finite].tobytes() == p[finite].tobytes()
        assert g[~finite].tobytes() == old[~finite].tobytes()
    if garbage != "other data" and garbage != "huge":
        assert not np.all(finite[poisoned]), "a NaN/Inf in a channel must reach its unguarded statistics"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tolerance_model_rejects_float32_shortcut(dtype):
    """Self-check of the error model: the torch-style float32 shortcut y = x*alpha + beta with alpha, beta rounded
    to float32 is outside the float32 bound on data far from zero, and cbn is inside it."""
    rng = np.random.default_rng(0)
    x = (1e4 + rng.standard_normal((8, 2, 16))).astype(np.float32)
    y_ref, saved = R.batch_norm(_c64(x), None, None, training=True, return_saved=True)
    alpha = saved.invstd.astype(np.float32)
    beta = (-saved.mean * saved.invstd).astype(np.float32)
    shortcut = x * alpha[:, None] + beta[:, None]
    tol = forward_tolerance(x.astype(np.float64), saved.mean, saved.invstd, None, None, y_ref, np.float32)
    with pytest.raises(AssertionError):
        assert_per_channel(shortcut, y_ref, tol, "shortcut")
    assert_per_channel(cbn.BatchNorm1d(2, dtype=np.float32)(x), y_ref, tol, "cbn")
