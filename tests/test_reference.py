"""cbn layers against the float64 reference (cbn.reference) with torch's layer semantics reproduced in the test."""
import numpy as np
import pytest

import cbn
from cbn import functional as F
from cbn import reference as R

from bn_helpers import FORCED_LAYOUTS, RefLayer, assert_rel, forced_layout, max_err

# float64: ~1e-10 relative to the largest reference value; float32: 2e-6 absolute on unit-scale outputs
# (|y| <~ 6), running statistics ~1e-6 relative, gradients 1e-5 relative to max|ref|.
TOL = {
    np.float64: dict(y_abs=None, y_rel=1e-10, stat=1e-10, grad=1e-10),
    np.float32: dict(y_abs=2e-6, y_rel=None, stat=1e-6, grad=1e-5),
}


def check_output(y, y_ref, dtype, what):
    assert y.dtype == np.dtype(dtype), f"{what}: dtype {y.dtype}"
    assert y.shape == y_ref.shape
    tol = TOL[dtype]
    if tol["y_abs"] is not None:
        assert np.max(np.abs(y_ref)) < 8, "test data must be unit scale for the absolute float32 bound"
        err = max_err(y, y_ref)
        assert err <= tol["y_abs"], f"{what}: max |y - y_ref| = {err:.3e} > {tol['y_abs']:.1e}"
    else:
        assert_rel(y, y_ref, tol["y_rel"], what)


def check_state(layer, ref, dtype, what):
    assert layer.num_batches_tracked == ref.num_batches_tracked, what
    if ref.running_mean is None:
        assert layer.running_mean is None and layer.running_var is None
        return
    assert layer.running_mean.dtype == np.dtype(dtype) and layer.running_var.dtype == np.dtype(dtype)
    assert_rel(layer.running_mean, ref.running_mean, TOL[dtype]["stat"], what + " running_mean", floor=1.0)
    assert_rel(layer.running_var, ref.running_var, TOL[dtype]["stat"], what + " running_var", floor=1.0)


def check_backward(layer, ref, dy, dtype, what):
    dx = layer.backward(dy)
    dx_ref, dw_ref, db_ref = ref.backward(dy)
    assert dx.dtype == np.dtype(dtype) and dx.shape == dy.shape
    g = TOL[dtype]["grad"]
    assert_rel(dx, dx_ref, g, what + " dx")
    if layer.affine:
        assert layer.grad_weight.dtype == np.dtype(dtype) and layer.grad_weight.shape == (layer.num_features,)
        assert_rel(layer.grad_weight, dw_ref, g, what + " grad_weight")
        assert_rel(layer.grad_bias, db_ref, g, what + " grad_bias")
    else:
        assert layer.grad_weight is None and layer.grad_bias is None


def make_pair(cls, C, dtype, affine, track, momentum, rng):
    layer = cls(C, momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype)
    w = b = None
    if affine:
        layer.weight[...] = rng.uniform(0.5, 1.2, C)
        layer.bias[...] = rng.uniform(-0.5, 0.5, C)
        w, b = layer.weight.astype(np.float64), layer.bias.astype(np.float64)
    ref = RefLayer(C, momentum=momentum, affine=affine, track_running_stats=track, weight=w, bias=b)
    return layer, ref


def run_steps(layer, ref, shapes, dtype, rng, *, training, do_backward=True, what="", sample=None):
    """Forward (and backward) steps against the reference; ``sample(shape)`` draws the unit-scale data."""
    for step, shape in enumerate(shapes):
        base = rng.standard_normal(shape) if sample is None else sample(shape)
        x = (base * rng.uniform(0.5, 2.0) + rng.uniform(-1, 1)).astype(dtype)
        x_copy = x.copy()
        y = layer(x)
        y_ref = ref.forward(x)
        tag = f"{what} {'train' if training else 'eval'} step {step}"
        check_output(y, y_ref, dtype, tag)
        check_state(layer, ref, dtype, tag)
        if do_backward:
            dy = rng.standard_normal(shape).astype(dtype)
            check_backward(layer, ref, dy, dtype, tag)
        np.testing.assert_array_equal(x, x_copy)


@pytest.mark.parametrize("momentum", [0.1, None, 0.0, 1.0])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_batchnorm2d_matches_reference(mode, dtype, affine, track, momentum):
    rng = np.random.default_rng(1234)
    C = 5
    layer, ref = make_pair(cbn.BatchNorm2d, C, dtype, affine, track, momentum, rng)
    train_shapes = [(6, C, 7, 9), (4, C, 5, 11), (8, C, 3, 6)]
    run_steps(layer, ref, train_shapes, dtype, rng, training=True, do_backward=(mode == "train"), what="2d")
    if mode == "eval":
        assert layer.eval() is layer
        ref.training = False
        counter = layer.num_batches_tracked
        stats = None if not track else (layer.running_mean.copy(), layer.running_var.copy())
        run_steps(layer, ref, [(5, C, 6, 7), (2, C, 4, 4), (1, C, 1, 1) if track else (3, C, 2, 1)], dtype, rng,
                  training=False, what="2d")
        assert layer.num_batches_tracked == counter
        if track:
            np.testing.assert_array_equal(layer.running_mean, stats[0])
            np.testing.assert_array_equal(layer.running_var, stats[1])


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,shapes", [
    (cbn.BatchNorm1d, [(16, 6), (9, 6), (32, 6)]),
    (cbn.BatchNorm1d, [(4, 6, 13), (7, 6, 5), (2, 6, 30), (300, 6, 3), (9, 6, 2)]),
    (cbn.BatchNorm3d, [(3, 6, 4, 5, 6), (2, 6, 3, 3, 7), (5, 6, 2, 4, 3)]),
], ids=["1d-NC", "1d-NCL", "3d"])
@pytest.mark.parametrize("affine", [True, False])
def test_other_classes_match_reference(cls, shapes, dtype, momentum, affine):
    rng = np.random.default_rng(99)
    C = 6
    layer, ref = make_pair(cls, C, dtype, affine, True, momentum, rng)
    run_steps(layer, ref, shapes, dtype, rng, training=True, what=cls.__name__)
    layer.eval()
    ref.training = False
    run_steps(layer, ref, shapes[:2], dtype, rng, training=False, what=cls.__name__)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,shape", [
    (cbn.BatchNorm2d, (2, 32, 256, 256)),   # tasks of whole channels (groups of 2)
    (cbn.BatchNorm2d, (32, 512, 14, 14)),   # tasks of whole channels in cache (groups of 10)
    (cbn.BatchNorm2d, (64, 512, 8, 8)),     # many channels, short rows
    (cbn.BatchNorm1d, (2048, 1024)),        # S = 1, many channels
    (cbn.BatchNorm1d, (4096, 1024)),        # S = 1, 4M values: outputs through non-temporal stores
    (cbn.BatchNorm1d, (65536, 64)),         # the same, 16 rows of 64 channels at a time
], ids=["2d-channel-groups", "2d-cached-channel-groups", "2d-short-rows", "1d-NC", "1d-NC-streamed",
        "1d-narrow-streamed"])
def test_large_tensors_match_reference(cls, shape, dtype):
    """Millions of values: tasks of whole channels (>= 4M values, and in cache), and many blocks of many channels;
    from 4M values on, outputs go out through non-temporal stores (uniform data, as millions of normal samples
    reach |y| >= 8, beyond the absolute float32 bound's premise)."""
    rng = np.random.default_rng(7)

    def sample(shape):
        return rng.uniform(-1.7, 1.7, shape)

    layer, ref = make_pair(cls, shape[1], dtype, True, True, 0.1, rng)
    run_steps(layer, ref, [shape], dtype, rng, training=True, what="large", sample=sample)
    layer.eval()
    ref.training = False
    run_steps(layer, ref, [shape], dtype, rng, training=False, what="large", sample=sample)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("C", [1, 513, 1300])
def test_wide_2d_input_matches_reference(C, dtype):
    """(N, C) input with more channels than one pass of the channel-vectorised kernel, serial and parallel."""
    rng = np.random.default_rng(C)
    layer, ref = make_pair(cbn.BatchNorm1d, C, dtype, True, True, 0.1, rng)
    run_steps(layer, ref, [(7, C), (160, C)], dtype, rng, training=True, what="wide")
    layer.eval()
    ref.training = False
    run_steps(layer, ref, [(5, C), (160, C)], dtype, rng, training=False, what="wide")


@pytest.mark.parametrize("offset", [1e4, -3e4])
def test_float32_offset_training_is_exact(offset):
    """Data far from zero: float32 output within 2e-6 of the float64 result on the same float32 input."""
    rng = np.random.default_rng(7)
    x = (offset + rng.standard_normal((16, 8, 32, 32))).astype(np.float32)
    layer = cbn.BatchNorm2d(8)
    y = layer(x)
    rm, rv = np.zeros(8), np.ones(8)
    y_ref = R.batch_norm(x, rm, rv, training=True, momentum=0.1)
    err = max_err(y, y_ref)
    print(f"\nfloat32 offset {offset:g} training: max |y - y_ref| = {err:.3e}")
    assert y.dtype == np.float32
    assert err <= 2e-6, f"max |y - y_ref| = {err:.3e}"
    assert_rel(layer.running_mean, rm, 1e-6, "running_mean")
    assert_rel(layer.running_var, rv, 1e-6, "running_var", floor=1.0)
    # backward stays accurate too
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx = layer.backward(dy)
    _, saved = R.batch_norm(x, None, None, training=True, return_saved=True)
    dx_ref, dw_ref, db_ref = R.batch_norm_backward(dy, saved)
    assert_rel(dx, dx_ref, 1e-5, "dx")
    assert_rel(layer.grad_weight, dw_ref, 1e-5, "grad_weight")
    assert_rel(layer.grad_bias, db_ref, 1e-5, "grad_bias")


@pytest.mark.parametrize("offset", [1e4, -2.5e5])
def test_float32_offset_eval_is_exact(offset):
    """Eval with running statistics far from zero: exact against the reference given the same (float32) stats."""
    rng = np.random.default_rng(8)
    C = 4
    x = (offset + rng.standard_normal((8, C, 16, 16)) * np.array([1, 2, 0.5, 3])[:, None, None]).astype(np.float32)
    layer = cbn.BatchNorm2d(C).eval()
    layer.running_mean[...] = (offset + rng.standard_normal(C) * 0.3).astype(np.float32)
    layer.running_var[...] = np.array([1.0, 4.0, 0.25, 9.0], np.float32) * rng.uniform(0.8, 1.2, C)
    layer.weight[...] = rng.uniform(0.5, 1.0, C)
    layer.bias[...] = rng.uniform(-0.5, 0.5, C)
    y = layer(x)
    y_ref = R.batch_norm(x, layer.running_mean.astype(np.float64), layer.running_var.astype(np.float64),
                         layer.weight, layer.bias, training=False)
    err = max_err(y, y_ref)
    print(f"\nfloat32 offset {offset:g} eval: max |y - y_ref| = {err:.3e} (max |y| {np.max(np.abs(y_ref)):.2f})")
    assert err <= 2e-6


def test_float32_eval_with_float64_running_statistics_is_exact():
    """Float32 data, float64 running statistics far from zero (not float32 values): eval uses them as given, not
    rounded to float32 (that would move y by up to 5e-4/std here)."""
    rng = np.random.default_rng(9)
    x = (1e4 + rng.standard_normal((16, 8))).astype(np.float32)
    mean, var = 1e4 + rng.standard_normal(8) * 0.1 + 1e-4 / 3, rng.uniform(0.5, 2.0, 8)
    y = F.batch_norm(x, mean, var, training=False)
    y_ref = R.batch_norm(x, mean, var, training=False)
    assert max_err(y, y_ref) <= 1e-6 * np.max(np.abs(y_ref))


def test_float32_eval_invstd_is_the_double_one():
    """Float32 eval: the saved invstd (scale of y and of the eval backward) is within 3e-14 of the double
    1/sqrt(running_var + eps) over float32's range of variances, eps that takes var + eps below or beyond float32's
    normal numbers included, and 1/sqrt's own value at 0, inf, NaN and below 0."""
    rng = np.random.default_rng(5)
    var = np.concatenate((np.exp(rng.uniform(-100, 88, 4096)), [0.0, np.inf, np.nan, -1.0, 1e-45, 3e38]))
    for eps in (1e-5, 0.0, 1e-50, 1e-44, 1e39):
        layer = cbn.BatchNorm1d(var.size, eps=eps).eval()
        layer.running_var[...] = var
        layer(np.ones((2, var.size), np.float32))
        with np.errstate(divide="ignore", invalid="ignore"):
            want = 1.0 / np.sqrt(layer.running_var.astype(np.float64) + eps)
        got = layer._saved.invstd
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        finite = np.isfinite(want) & (want > 0)
        np.testing.assert_array_equal(got[~finite & ~np.isnan(want)], want[~finite & ~np.isnan(want)])
        assert np.max(np.abs(got[finite] - want[finite]) / want[finite]) <= 3e-14


def _finite_diff(f, a, h):
    g = np.zeros_like(a)
    it = np.nditer(a, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = a[i]
        a[i] = old + h
        fp = f()
        a[i] = old - h
        fm = f()
        a[i] = old
        g[i] = (fp - fm) / (2 * h)
    return g


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_backward_finite_differences(mode):
    """Central differences of loss = sum(y * G) in float64 against the analytic backward."""
    rng = np.random.default_rng(3)
    shape = (3, 2, 3, 4)
    x = rng.standard_normal(shape) * 1.5 + 0.3
    G = rng.standard_normal(shape)
    if mode == "train":
        layer = cbn.BatchNorm2d(2, track_running_stats=False, dtype=np.float64)
    else:
        layer = cbn.BatchNorm2d(2, dtype=np.float64).eval()
        layer.running_mean[...] = [0.2, -0.4]
        layer.running_var[...] = [1.7, 0.6]
    layer.weight[...] = [1.3, -0.7]
    layer.bias[...] = [0.1, 0.5]

    def loss():
        return float(np.sum(layer(x) * G))

    layer(x)
    dx = layer.backward(G)
    dw, db = layer.grad_weight.copy(), layer.grad_bias.copy()
    h = 1e-6
    num_dx = _finite_diff(loss, x, h)
    num_dw = _finite_diff(loss, layer.weight, h)
    num_db = _finite_diff(loss, layer.bias, h)
    for name, a, n in (("dx", dx, num_dx), ("dweight", dw, num_dw), ("dbias", db, num_db)):
        err = max_err(a, n)
        scale = max(np.max(np.abs(n)), 1.0)
        assert err <= 1e-7 * scale, f"{mode} {name}: max |analytic - numeric| = {err:.3e}"


@pytest.mark.parametrize("layout", FORCED_LAYOUTS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(6, 5, 7), (64, 3, 40, 40), (2, 32, 256, 256)])
def test_backward_from_grad_sums(shape, dtype, layout):
    """batch_norm_grad_sums + batch_norm_backward(grad_sums=, count=) equal the one-call backward, in every
    layout of the kernels."""
    with forced_layout(layout):
        _backward_from_grad_sums(shape, dtype)


def _backward_from_grad_sums(shape, dtype):
    rng = np.random.default_rng(3)
    C = shape[1]
    x = rng.uniform(-2, 2, shape).astype(dtype)
    dy = rng.uniform(-1, 1, shape).astype(dtype)
    w = rng.uniform(0.5, 1.5, C).astype(dtype)
    _, saved = F.batch_norm(x, None, None, w, None, True, return_saved=True)
    dx, dw, db = F.batch_norm_backward(dy, saved)
    sums, dw2, db2 = F.batch_norm_grad_sums(dy, saved)
    dx2, dw3, db3 = F.batch_norm_backward(dy, saved, grad_sums=sums, count=x.size // C)
    _, ref_saved = R.batch_norm(x, None, None, w, None, True, return_saved=True)
    ref_dx, ref_dw, ref_db = R.batch_norm_backward(dy, ref_saved)
    g = TOL[dtype]["grad"]
    # the same blocks in both calls: bitwise the same results
    np.testing.assert_array_equal(dx2, dx)
    np.testing.assert_array_equal(dw2, dw)
    np.testing.assert_array_equal(db3, db)
    for got in (dx, dx2):
        assert_rel(got, ref_dx, g, "dx")
    for got in (dw, dw2, dw3):
        assert_rel(got, ref_dw, g, "dweight")
    for got in (db, db2, db3):
        assert_rel(got, ref_db, g, "dbias")
    np.testing.assert_allclose(sums[0], ref_db, rtol=1e-10, atol=1e-10 * np.abs(ref_db).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(0, 3, 4), (4, 0, 5, 5), (1, 3), (1, 3, 1, 1), (5, 3), (6, 3, 7, 9),
                                   (2, 32, 256, 256)])
def test_batch_norm_stats(shape, dtype):
    rng = np.random.default_rng(5)
    x = (rng.uniform(-1, 1, shape) + 1e3).astype(dtype)
    count, mean, M2 = F.batch_norm_stats(x)
    axes = (0,) + tuple(range(2, x.ndim))
    assert count == shape[0] * int(np.prod(shape[2:]))
    assert mean.shape == M2.shape == (shape[1],)
    if count == 0 or shape[1] == 0:
        assert np.isnan(mean).all() and np.isnan(M2).all()
        return
    x64 = x.astype(np.float64)
    ref_mean = x64.mean(axis=axes)
    ref_M2 = ((x64 - ref_mean.reshape((1, -1) + (1,) * (x.ndim - 2))) ** 2).sum(axis=axes)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-14)
    np.testing.assert_allclose(M2, ref_M2, rtol=1e-10, atol=1e-10 * count)


@pytest.mark.parametrize("layout", FORCED_LAYOUTS)
@pytest.mark.parametrize("shape", [(6, 5, 7), (64, 3, 40, 40), (2, 32, 256, 256), (300, 40)])
def test_batch_norm_stats_match_the_forward_bitwise(shape, layout):
    """The statistics-only call sums in the same blocks as the training forward (SyncBatchNorm relies on it), in
    every layout of the kernels."""
    x = np.random.default_rng(4).standard_normal(shape).astype(np.float32)
    with forced_layout(layout):
        count, mean, M2 = F.batch_norm_stats(x)
        _, saved = F.batch_norm(x, None, None, training=True, eps=1e-5, return_saved=True)
    np.testing.assert_array_equal(mean, saved.mean)
    np.testing.assert_array_equal(1.0 / np.sqrt(M2 / count + 1e-5), saved.invstd)


def test_batch_norm_stats_keep_nan_and_inf():
    x = np.random.default_rng(4).standard_normal((4, 3, 5))
    x[1, 1, 2] = np.nan
    x[2, 2, 3] = np.inf
    _, mean, M2 = F.batch_norm_stats(x)
    assert np.isfinite(mean[0]) and np.isfinite(M2[0])
    assert np.isnan(mean[1]) and np.isnan(M2[1]) and not np.isfinite(M2[2])


@pytest.mark.parametrize("layout", FORCED_LAYOUTS)
@pytest.mark.parametrize("shape", [(8, 3, 64, 64), (64, 16), (4096, 24), (32, 64, 7, 7), (16, 5, 3), (3, 5, 1000)])
@pytest.mark.parametrize("dy_kind", ["far from zero", "y: the terms of dx cancel"])
def test_float32_within_1e6_of_float64_far_from_zero(shape, layout, dy_kind):
    """The exactness contract, in every layout: float32 y and dx within 1e-6 of the float64 result, relative to the
    largest magnitude of that output, for x with mean 1e4 and std 1, and dy with mean 100 or dy = y (plus a little
    noise: the gradient of |y|^2/2, where dy - mean(dy) and xhat*dgamma/m almost cancel)."""
    rng = np.random.default_rng(11)
    C = shape[1]
    x = (rng.standard_normal(shape) + 1e4).astype(np.float32)
    w, b = rng.uniform(0.5, 1.5, C).astype(np.float32), rng.uniform(-1, 1, C).astype(np.float32)
    with forced_layout(layout):
        y, saved = F.batch_norm(x, None, None, w, b, True, return_saved=True)
        if dy_kind == "far from zero":
            dy = (rng.standard_normal(shape) + 100).astype(np.float32)
        else:
            dy = (y + 1e-3 * rng.standard_normal(shape)).astype(np.float32)
        dx = F.batch_norm_backward(dy, saved)[0]
    y_ref, ref_saved = R.batch_norm(x.astype(np.float64), None, None, w.astype(np.float64), b.astype(np.float64),
                                    True, return_saved=True)
    dx_ref = R.batch_norm_backward(dy.astype(np.float64), ref_saved)[0]
    assert np.max(np.abs(y - y_ref)) <= 1e-6 * np.max(np.abs(y_ref))
    assert np.max(np.abs(dx - dx_ref)) <= 1e-6 * np.max(np.abs(dx_ref))


@pytest.mark.parametrize("layout", FORCED_LAYOUTS)
@pytest.mark.parametrize("shape", [(512, 24), (16, 6, 9, 9), (3, 4, 2000), (64, 1024), (3, 1024, 64), (256, 64),
                                   (4, 128, 8, 8), (16, 6, 5, 5), (9, 3000)])
@pytest.mark.parametrize("slope", [0.0, 0.3, 0.6, 1.0, 2.0, 10.0, 1e3])
@pytest.mark.parametrize("fused", [None, "relu", "add+relu"])
def test_float32_dx_within_1e6_as_its_terms_cancel(shape, layout, slope, fused):
    """dy = slope*y + noise: as the slope grows, dx's two terms (dy - mean(dy) and xhat*dgamma/m) cancel more
    (from none to about 1000 times dx's largest value); every case keeps the contract (1e-6 of the float64 result,
    relative to its largest magnitude), in every layout, plain, with a fused ReLU and with a residual and ReLU (its
    dresidual exact). With rows of 1 or 32 or more values dx runs in float32 where its check allows and falls back to
    double per channel where it does not; rows of 2 to 31 values run in double: both sides of that limit. (9, 3000)
    runs in double (channels of 9 values), in its own layout four rows at a time in runs of 512 columns, in two
    column blocks of 1500 (the second starting mid-row); the forced layouts take it row by row."""
    rng = np.random.default_rng(12)
    C = shape[1]
    x = (rng.standard_normal(shape) * 3 + 50).astype(np.float32)
    w = rng.uniform(0.5, 1.5, C).astype(np.float32)
    z = rng.standard_normal(shape).astype(np.float32) if fused == "add+relu" else None
    activation = None if fused is None else "relu"
    y, saved = F.batch_norm(x, None, None, w, None, True, activation=activation, residual=z, return_saved=True)
    dy = (slope * y + rng.standard_normal(shape)).astype(np.float32)
    with forced_layout(layout):
        grads = F.batch_norm_backward(dy, saved)
    _, ref_saved = R.batch_norm(x.astype(np.float64), None, None, w.astype(np.float64), None, True,
                                activation=activation, residual=None if z is None else z.astype(np.float64),
                                return_saved=True)
    ref = R.batch_norm_backward(dy.astype(np.float64), ref_saved)
    assert np.max(np.abs(grads[0] - ref[0])) <= 1e-6 * np.max(np.abs(ref[0]))
    if z is not None:
        np.testing.assert_array_equal(grads[3], ref[3])


def _other_memory(a):
    """a's values in the other memory layout of its channels (axis 1): channels-last for (N, C, *) input, Fortran
    order (each channel contiguous) for (N, C)."""
    if a.ndim == 2:
        return np.asfortranarray(a)
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("shape", [(4, 1024, 8, 8), (4, 64, 8, 8), (4, 16, 8, 8)])
def test_float32_dx_channels_fall_back_alone(shape, activation):
    """The float32 dx pass (rows of 64 values here; with a fused ReLU too)
    decides per channel: a channel whose dx needs double (its terms cancel, or it holds NaN) or that holds huge
    values changes no other channel's bits, and the bits are those of the same tensor in channels-last memory and at
    either thread count."""
    rng = np.random.default_rng(13)
    # multiples of 1/64: every sum is exact, so the statistics are the same bits in both memory layouts (whose sums
    # run in other orders and round differently otherwise)
    x = (np.round(rng.standard_normal(shape) * 64) / 64).astype(np.float32)
    y, saved = F.batch_norm(x, None, None, None, None, True, activation=activation, return_saved=True)
    dy = rng.standard_normal(shape).astype(np.float32)
    dx = F.batch_norm_backward(dy, saved)[0]
    dy2 = dy.copy()
    dy2[:, 3] = 1e3 * y[:, 3] + dy[:, 3]  # cancels: double
    dy2[0, 7, 1, 1] = np.nan
    dy2[:, 9] *= 1e30
    dx2 = F.batch_norm_backward(dy2, saved)[0]
    clean = [c for c in range(shape[1]) if c not in (3, 7, 9)]
    assert dx2[:, clean].tobytes() == dx[:, clean].tobytes()
    _, saved_l = F.batch_norm(_other_memory(x), None, None, None, None, True, activation=activation,
                              return_saved=True)
    np.testing.assert_array_equal(F.batch_norm_backward(_other_memory(dy2), saved_l)[0], dx2)
    threads = cbn.get_num_threads()
    try:
        cbn.set_num_threads(1)
        np.testing.assert_array_equal(F.batch_norm_backward(dy2, saved)[0], dx2)
    finally:
        cbn.set_num_threads(threads)
    _, ref_saved = R.batch_norm(x.astype(np.float64), None, None, None, None, True, activation=activation,
                                return_saved=True)
    ref = R.batch_norm_backward(dy.astype(np.float64), ref_saved)[0]
    assert np.max(np.abs(dx - ref)) <= 1e-6 * np.max(np.abs(ref))
    assert np.mean(dx != ref.astype(np.float32)) > 0.1  # float32 arithmetic ran (double rounds the result once)


def test_float32_dx_within_1e6_with_a_mean_near_float32s_subnormals():
    """Data of two neighbouring float32 values near 1e-33 (the mean's low float part is a subnormal, which float32
    rounds with an absolute, not relative, error) and dy correlated with xhat: the float32 dx pass's check counts
    that rounding, so dx keeps the contract."""
    rng = np.random.default_rng(0)
    m, C = 1001, 1024
    a = np.float32(1e-33)
    x = np.where(rng.random((m, C)) < 0.5, a, np.nextafter(a, np.float32(1))).astype(np.float32)
    w = np.full(C, 1.4e-45, np.float32)
    _, saved = F.batch_norm(x, None, None, w, None, True, eps=0.0, return_saved=True)
    dy = ((x - saved.mean) * saved.invstd + rng.standard_normal((m, C))).astype(np.float32)
    dx = F.batch_norm_backward(dy, saved)[0]
    _, ref_saved = R.batch_norm(x.astype(np.float64), None, None, w.astype(np.float64), None, True, eps=0.0,
                                return_saved=True)
    ref = R.batch_norm_backward(dy.astype(np.float64), ref_saved)[0]
    assert np.max(np.abs(dx - ref)) <= 1e-6 * np.max(np.abs(ref))


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("shape", [(4, 1024, 8, 8), (4, 1024, 4, 4), (64, 1024), (4, 64, 8, 8), (64, 64)])
def test_float32_dx_same_bits_with_the_channel_axis_first(shape, activation):
    """Whether dx runs in float32 is decided by the array's rows (values per channel and sample), which do not
    change when its channel axis moves: the same bits with the channel axis first."""
    rng = np.random.default_rng(14)
    x, dy = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    _, saved = F.batch_norm(x, None, None, None, None, True, activation=activation, return_saved=True)
    x0, dy0 = np.ascontiguousarray(np.moveaxis(x, 1, 0)), np.ascontiguousarray(np.moveaxis(dy, 1, 0))
    _, saved_0 = F.batch_norm(x0, None, None, None, None, True, axis=0, activation=activation, return_saved=True)
    np.testing.assert_array_equal(np.moveaxis(F.batch_norm_backward(dy0, saved_0)[0], 0, 1),
                                  F.batch_norm_backward(dy, saved)[0])


@pytest.mark.parametrize("shape,float32", [((2**14 + 1, 64), True), ((2**17 + 1, 8), True), ((1024, 3, 33), True),
                                           ((32, 1024), True), ((64, 8, 5, 5), False), ((31, 1024), False),
                                           ((16, 4096), False), ((128, 2048), True), ((64, 4096), True)])
def test_float32_dx_at_any_channel_count_and_size(shape, float32):
    """dx runs in float32 (checked per channel) at any channel count and size, arrays beyond the caches too (whose
    channel-minor rows go one at a time), unless the rows (values per channel and sample) hold 2 to 31 values or the
    channels fewer than 32 values: then in double, and dx differs from the float64 result rounded once only where
    double rounding lands on the other side. Either way within 1e-6, with the same bits in both memory layouts of
    the array."""
    rng = np.random.default_rng(15)
    x, dy = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    _, saved = F.batch_norm(x, None, None, None, None, True, return_saved=True)
    dx = F.batch_norm_backward(dy, saved)[0]
    _, saved_t = F.batch_norm(_other_memory(x), None, None, None, None, True, return_saved=True)
    np.testing.assert_array_equal(F.batch_norm_backward(_other_memory(dy), saved_t)[0], dx)
    _, ref_saved = R.batch_norm(x.astype(np.float64), None, None, None, None, True, return_saved=True)
    ref = R.batch_norm_backward(dy.astype(np.float64), ref_saved)[0]
    assert np.max(np.abs(dx - ref)) <= 1e-6 * np.max(np.abs(ref))
    differ = np.mean(dx != ref.astype(np.float32))
    assert differ > 0.1 if float32 else differ < 0.01


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1100, 1000), (600, 2048), (300, 4096)])
def test_channel_minor_beyond_the_caches(shape, dtype):
    """Channel-minor arrays beyond the caches go along whole rows (each block's sums in one chunk, the gradient
    sums of rows up to 1024 values one row at a time, the affine pass in one run): the training forward, eval and
    backward against the float64 reference, and the same bits on 1 and 2 threads."""
    rng = np.random.default_rng(16)
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 1.5, shape[1]).astype(dtype)
    rm, rv = np.zeros(shape[1]), np.ones(shape[1])
    old = cbn.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            cbn.set_num_threads(min(n, cbn.max_num_threads()))
            y, saved = F.batch_norm(x, None, None, w, None, True, return_saved=True)
            results.append((y, *F.batch_norm_backward(dy, saved), F.batch_norm(x, rm, rv, w, None, False)))
    finally:
        cbn.set_num_threads(old)
    for a, b in zip(*results):
        assert a.tobytes() == b.tobytes()
    y, dx, dw, db, y_eval = results[0]
    y_ref, ref_saved = R.batch_norm(x.astype(np.float64), None, None, w, None, True, return_saved=True)
    dx_ref, dw_ref, db_ref = R.batch_norm_backward(dy.astype(np.float64), ref_saved)
    check_output(y, y_ref, dtype, "y")
    assert_rel(y_eval, R.batch_norm(x.astype(np.float64), rm, rv, w, None, False), 1e-6 if dtype == np.float32
               else 1e-10, "eval y")
    g = TOL[dtype]["grad"]
    assert_rel(dx, dx_ref, g, "dx")
    assert_rel(dw, dw_ref, g, "dweight")
    assert_rel(db, db_ref, g, "dbias")


@pytest.mark.parametrize("layout", FORCED_LAYOUTS)
@pytest.mark.parametrize("std,eps", [(1e-20, 0.0), (1e22, 1e-5), (1e30, 1e-5)])
@pytest.mark.parametrize("shape", [(8, 2, 32), (2, 1024, 64)])
def test_float32_backward_at_extreme_scales(std, eps, layout, shape):
    """dx's coefficients (gamma*invstd and gamma*invstd**2*dgamma/m) can leave float32's range where dx does not:
    they stay in double, so float32 dx is finite and within 1e-6 of the float64 result."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(shape) * std).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    with forced_layout(layout):
        _, saved = F.batch_norm(x, None, None, None, None, True, eps=eps, return_saved=True)
        dx = F.batch_norm_backward(dy, saved)[0]
    _, ref_saved = R.batch_norm(x.astype(np.float64), None, None, None, None, True, eps=eps, return_saved=True)
    dx_ref = R.batch_norm_backward(dy.astype(np.float64), ref_saved)[0]
    assert np.isfinite(dx).all()
    assert np.max(np.abs(dx - dx_ref)) <= 1e-6 * np.max(np.abs(dx_ref))


def test_backward_takes_read_only_grad_sums():
    """Given grad_sums are only read: a read-only array works."""
    x = np.random.default_rng(6).standard_normal((4, 3, 5))
    _, saved = F.batch_norm(x, None, None, None, None, True, return_saved=True)
    sums = F.batch_norm_grad_sums(np.ones_like(x), saved)[0]
    sums.flags.writeable = False
    dx = F.batch_norm_backward(np.ones_like(x), saved, grad_sums=sums, count=20)[0]
    np.testing.assert_array_equal(dx, F.batch_norm_backward(np.ones_like(x), saved)[0])


@pytest.mark.parametrize("nan_guard", [False, True])
@pytest.mark.parametrize("momentum", [0.1, 1.0 / 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(6, 5, 7), (64, 3, 40, 40), (300, 40)])
def test_data_parallel_primitives_match_batch_norm_bitwise(shape, dtype, momentum, nan_guard):
    """What SyncBatchNorm composes gives batch_norm's bits on one part: batch_norm_stats -> merge_statistics ->
    batch_norm_elemt (y, and the backward through the saved forward), and update_running_stats (the kernel's update
    of the running statistics, nan_guard included)."""
    rng = np.random.default_rng(8)
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    x[1, 1] = np.nan  # channel 1 is not finite: nan_guard keeps its statistics
    dy = rng.standard_normal(shape).astype(dtype)
    C = shape[1]
    w, b = rng.uniform(0.5, 1.5, C).astype(dtype), rng.uniform(-1, 1, C).astype(dtype)
    rm, rv = rng.uniform(-1, 1, C).astype(dtype), rng.uniform(0.5, 2, C).astype(dtype)
    rm_kernel, rv_kernel = rm.copy(), rv.copy()
    y, saved = F.batch_norm(x, rm_kernel, rv_kernel, w, b, True, momentum, return_saved=True, nan_guard=nan_guard)
    count, mean, M2 = F.merge_statistics(*zip(F.batch_norm_stats(x)))
    F.update_running_stats(rm, rv, count, mean, M2, momentum, nan_guard)
    np.testing.assert_array_equal(rm, rm_kernel)
    np.testing.assert_array_equal(rv, rv_kernel)
    y2, saved2 = F.batch_norm_elemt(x, mean, M2 / count, w, b, return_saved=True)
    np.testing.assert_array_equal(y2, y)
    assert saved2.use_batch_stats
    for got, want in zip(F.batch_norm_backward(dy, saved2), F.batch_norm_backward(dy, saved)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_an_empty_input_normalises_with_the_bits_of_any_other(dtype):
    """An empty input saves the (mean, invstd) bits that a non-empty one does, given (mean, var) (batch_norm_elemt: a
    rank without samples in SyncBatchNorm) or running statistics (eval; float32's invstd takes a Newton step): the
    kernels compute both."""
    rng = np.random.default_rng(10)
    mean, var = rng.standard_normal(6), rng.uniform(0.5, 2, 6)
    rm, rv = mean.astype(dtype), var.astype(dtype)
    x = rng.standard_normal((2, 6, 3)).astype(dtype)
    saved = [F.batch_norm_elemt(v, mean, var, return_saved=True)[1] for v in (x[:0], x)]
    saved += [F.batch_norm(v, rm, rv, training=False, return_saved=True)[1] for v in (x[:0], x)]
    for empty, full in (saved[:2], saved[2:]):
        np.testing.assert_array_equal(empty.mean, full.mean)
        np.testing.assert_array_equal(empty.invstd, full.invstd)


def test_merge_statistics_of_parts_is_the_whole():
    """Chan's merge of parts (an empty one among them) gives the statistics of their union."""
    x = np.random.default_rng(9).standard_normal((12, 4, 5)) + 1e3
    parts = [F.batch_norm_stats(p) for p in (x[:5], x[5:5], x[5:])]
    count, mean, M2 = F.merge_statistics(*zip(*parts))
    whole = F.batch_norm_stats(x)
    assert count == whole[0] == 60
    np.testing.assert_allclose(mean, whole[1], rtol=1e-14)
    np.testing.assert_allclose(M2, whole[2], rtol=1e-10)


def test_batch_norm_elemt_checks_its_statistics():
    x = np.ones((4, 3, 5))
    with pytest.raises(ValueError, match=r"mean must have shape \(3,\).*got \(2,\)"):
        F.batch_norm_elemt(x, np.zeros(2), np.ones(3))
    with pytest.raises(TypeError, match=r"var must be a numpy\.ndarray.*got list"):
        F.batch_norm_elemt(x, np.zeros(3), [1.0, 1.0, 1.0])
