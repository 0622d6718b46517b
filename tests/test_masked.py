"""Masked statistics (``mask=``): against a float64 masked batch norm written here (statistics over the valid
positions, every position normalised), torch autograd for the gradients, broadcast masks, layouts, ghost batches,
batch renormalization, precise_stats, eval, NaN/Inf at masked-out positions, bad input and the same bits for any
thread count and kernel layout.

Bounds as in test_ghost.py and test_renorm.py: relative to the largest magnitude of the reference output, 1e-6 for
float32 and 1e-13 for float64 (docs/development/kernels.md, "The contract"). The worst relative error of each
quantity and dtype is printed at the end of the module (``pytest -s``).
"""
import pickle

import numpy as np
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

import cbn
from cbn import functional as F

from bn_helpers import FORCED_LAYOUTS, assert_rel, full_snapshot, layer_class, require_torch

BOUND = {np.float32: 1e-6, np.float64: 1e-13}
DTYPES = [np.float32, np.float64]
WORST = {}  # "dtype quantity" -> worst relative error seen in this module


@pytest.fixture(scope="module", autouse=True)
def _print_worst_errors():
    yield
    if WORST:
        print("\nworst relative errors against the references (test_masked.py):")
        for key in sorted(WORST):
            print(f"  {key:32s} {WORST[key]:.3e}")


def compare(what, got, want, dtype, bound=None, floor=0.0, terms=0.0):
    """|got - want| <= bound*max(max|want|, floor), or bound*max|want| + BOUND[float64]*terms where that is larger
    (bound: BOUND[dtype]); records the relative error in WORST. ``terms``: the magnitude of the terms of a sum
    taken in double, whose rounding error (eps64-sized against them, in any order of addition) is all that is
    left of a sum that cancels."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    bound = BOUND[dtype] if bound is None else bound
    if want.size:
        floor = max(floor, float(np.max(np.abs(want))) + BOUND[np.float64] / bound * terms)
        err = float(np.max(np.abs(got - want)) / max(floor, 1e-300))
        key = f"{np.dtype(dtype).name} {what.split(' ')[0]}"
        WORST[key] = max(WORST.get(key, 0.0), err)
    assert_rel(got, want, bound, what, floor=floor)


def same_layout(a, b):
    """a and b lie alike in memory (equal strides along every axis longer than 1)."""
    return a.shape == b.shape and all(sa == sb for n, sa, sb in zip(a.shape, a.strides, b.strides) if n > 1)


# -- the float64 reference ---------------------------------------------------------------------------------------

def full_mask(mask, shape, axis):
    """The mask broadcast to ``shape`` without its channel axis, as a 0/1 float64 array of ``shape``'s rank with
    a size-1 channel axis."""
    axis %= len(shape)
    rest = shape[:axis] + shape[axis + 1:]
    return np.expand_dims(np.broadcast_to(np.asarray(mask, bool), rest), axis).astype(np.float64)


def masked_reference(x, mask, weight=None, bias=None, dy=None, running=None, momentum=0.1, eps=1e-5, axis=1,
                     relu=False, residual=None):
    """Float64 masked batch norm: mean and biased variance per channel over the positions where the (broadcast)
    mask is True, y = act(weight*(x - mean)/sqrt(var + eps) + bias + residual) at every position, the exact
    gradient, the running statistics updated with M2/(n - 1). Masked-out values (NaN or Inf too) do not enter the
    statistics. Returns a dict: n, mean, var, M2, y, and with dy dx, dweight, dbias, dresidual, with running
    running_mean, running_var."""
    x = np.asarray(x, np.float64)
    axis %= x.ndim
    C = x.shape[axis]
    w = full_mask(mask, x.shape, axis)
    valid = w > 0
    axes = tuple(d for d in range(x.ndim) if d != axis)
    cshape = [1] * x.ndim
    cshape[axis] = C
    n = int(w.sum())
    weight = np.ones(C) if weight is None else np.asarray(weight, np.float64)
    bias = np.zeros(C) if bias is None else np.asarray(bias, np.float64)
    with np.errstate(all="ignore"):
        mean = np.where(valid, x, 0.0).sum(axis=axes) / n
        centred = x - mean.reshape(cshape)
        M2 = np.where(valid, centred, 0.0).__pow__(2).sum(axis=axes)
        var = M2 / n
        invstd = 1 / np.sqrt(var + eps)
        xhat = centred * invstd.reshape(cshape)
        y = weight.reshape(cshape) * xhat + bias.reshape(cshape)
        if residual is not None:
            y = y + np.asarray(residual, np.float64)
        if relu:
            y = np.maximum(y, 0.0)
    ref = dict(n=n, mean=mean, var=var, M2=M2, y=y)
    if running is not None:
        ref["running_mean"] = (1 - momentum) * np.asarray(running[0], np.float64) + momentum * mean
        ref["running_mean_terms"] = momentum * float(np.max(np.where(valid, np.abs(x), 0.0).sum(axis=axes) / n))
        ref["running_var"] = (1 - momentum) * np.asarray(running[1], np.float64) + momentum * M2 / (n - 1)
    if dy is not None:
        dy = np.asarray(dy, np.float64)
        if relu:
            dy = dy * (y > 0)
        sdy, sdyx = dy.sum(axis=axes), (dy * xhat).sum(axis=axes)
        g = (weight * invstd).reshape(cshape)
        ref["dx"] = g * (dy - w * (sdy / n).reshape(cshape) - w * xhat * (sdyx / n).reshape(cshape))
        ref["dweight"], ref["dbias"], ref["dresidual"] = sdyx, sdy, dy
        ref["dweight_terms"] = float(np.max(np.abs(dy * xhat).sum(axis=axes), initial=0.0))
        ref["dbias_terms"] = float(np.max(np.abs(dy).sum(axis=axes), initial=0.0))
        # dx = g*dy - (terms that cancel it at the valid positions; exactly with two valid values that are all):
        # errors are measured against max(|dx|, |g*dy|), the size of what was subtracted
        ref["dx_scale"] = float(np.max(np.abs(g * dy), initial=0.0))
    return ref


# -- data --------------------------------------------------------------------------------------------------------

def data(shape, axis, dtype, seed=0):
    """x with channels of different means and scales, dy, weight and bias (float64, exact in dtype)."""
    rng = np.random.default_rng(seed)
    axis %= len(shape)
    C = shape[axis]
    cshape = [1] * len(shape)
    cshape[axis] = C
    x = rng.standard_normal(shape) * rng.uniform(0.5, 3, C).reshape(cshape) + rng.uniform(-5, 5, C).reshape(cshape)
    weight = rng.uniform(0.5, 1.5, C).astype(dtype).astype(np.float64)
    bias = rng.uniform(-1, 1, C).astype(dtype).astype(np.float64)
    return x.astype(dtype), rng.standard_normal(shape).astype(dtype), weight, bias


def random_mask(shape, seed=1, p=0.6):
    """A bool mask with about a fraction p of True, at least two."""
    m = np.random.default_rng(seed).random(shape) < p
    if m.sum() < 2:
        m.flat[0] = m.flat[-1] = True
    assert m.sum() >= 2 or m.size < 2
    return m


def dense(a, order):
    """``a``'s values in memory that holds its axes in ``order`` (a transposed C-contiguous array)."""
    return np.ascontiguousarray(a.transpose(order)).transpose(np.argsort(order))


def arrange(a, layout, axis):
    """``a`` in memory layout ``layout``: "C", "channels-last" (the channel axis last in memory, same shape) or
    "fortran"."""
    if layout == "C":
        return a
    if layout == "fortran":
        return np.asfortranarray(a)
    axis %= a.ndim
    return dense(a, tuple(d for d in range(a.ndim) if d != axis) + (axis,))


def make_layer(ndim, C, dtype, weight, bias, axis=1, **kw):
    bn = layer_class(ndim)(C, dtype=dtype, axis=axis, **kw)
    if bn.affine:
        bn.weight[...], bn.bias[...] = weight, bias
    if bn.track_running_stats:
        bn.running_mean[...], bn.running_var[...] = 0.5, 2.0
    return bn


def check_step(bn, x, mask, dy, weight, bias, dtype, axis=1, layout="C", residual=None, what=""):
    """One training forward and backward of ``bn`` on x in ``layout`` with ``mask``, against the reference (from
    the layer's running statistics)."""
    relu = bn.activation == "relu"
    ref = masked_reference(x, mask, weight, bias, dy, (bn.running_mean.astype(np.float64),
                                                       bn.running_var.astype(np.float64)),
                           momentum=bn.momentum, axis=axis, relu=relu, residual=residual)
    xv, dyv = arrange(x, layout, axis), arrange(dy, layout, axis)
    y = bn(xv, mask=mask, residual=residual)
    dx = bn.backward(dyv)
    assert y.dtype == dx.dtype == dtype
    assert same_layout(y, xv) and same_layout(dx, xv), f"{what}: output layout"
    for name, got in (("y", y), ("dx", dx), ("dweight", bn.grad_weight), ("dbias", bn.grad_bias),
                      ("running_mean", bn.running_mean), ("running_var", bn.running_var)):
        compare(f"{name} {what}", got, ref[name], dtype, floor=ref["dx_scale"] if name == "dx" else 0.0,
                terms=ref.get(f"{name}_terms", 0.0))
    if residual is not None:
        compare(f"dresidual {what}", bn.grad_residual, ref["dresidual"], dtype)
    return ref


# (name, shape, axis, mask shape, layout): (N, C), sequences both ways, images with full and broadcast masks,
# channels-last views, Fortran order, a middle channel axis, narrow rows (the channel-minor fold) and long rows,
# and inputs of more than 65536 values (run on several threads).
CASES = [
    ("NC", (40, 5), 1, (40,), "C"),
    ("NCL", (6, 4, 7), 1, (6, 7), "C"),
    ("NLC", (6, 7, 4), -1, (6, 7), "C"),
    ("NCL-L", (6, 4, 7), 1, (7,), "C"),
    ("NCHW", (4, 3, 5, 6), 1, (4, 5, 6), "C"),
    ("NCHW-N1W", (4, 3, 5, 6), 1, (4, 1, 6), "C"),
    ("NCHW-HW", (4, 3, 5, 6), 1, (5, 6), "C"),
    ("NCHW-1", (4, 3, 5, 6), 1, (1,), "C"),
    ("NCHW-channels-last", (4, 3, 5, 6), 1, (4, 5, 6), "channels-last"),
    ("NCHW-channels-last-N1W", (4, 3, 5, 6), 1, (4, 1, 6), "channels-last"),
    ("NCHW-fortran", (4, 3, 5, 6), 1, (4, 5, 6), "fortran"),
    ("NHWC", (4, 5, 6, 3), -1, (4, 5, 6), "C"),
    ("NHWC-H1", (4, 5, 6, 3), -1, (5, 1), "C"),
    ("axis2", (3, 4, 5, 6), 2, (3, 4, 6), "C"),
    ("axis0", (3, 8, 5), 0, (8, 5), "C"),
    ("narrow-rows", (50, 3, 2), 1, (50, 2), "C"),
    ("narrow-rows-1", (60, 3, 1), 1, (60, 1), "C"),
    ("long-rows", (3, 3, 1031), 1, (3, 1031), "C"),
    ("NCDHW", (2, 3, 4, 2, 3), 1, (2, 4, 2, 3), "C"),
    ("NCDHW-W", (2, 3, 4, 2, 3), 1, (3,), "C"),
    ("NDHWC-view", (2, 3, 4, 2, 3), 1, (2, 1, 2, 3), "channels-last"),
    ("NC-parallel", (8192, 12), 1, (8192,), "C"),
    ("NCL-narrow-parallel", (2048, 16, 3), 1, (2048, 3), "C"),
    ("NCHW-parallel", (16, 3, 48, 48), 1, (16, 48, 48), "C"),
    ("NCHW-HW-parallel", (16, 3, 48, 48), 1, (48, 48), "C"),
    ("NHWC-view-parallel", (10, 32, 16, 16), 1, (10, 1, 16), "channels-last"),
    ("long-rows-parallel", (4, 2, 9000), 1, (4, 9000), "C"),
    ("NLC-parallel", (64, 40, 32), -1, (64, 40), "C"),
    # channel-minor rows of 64 or more channels: one position per row (counted rows take the plain passes)
    ("NC-wide", (40, 100), 1, (40,), "C"),
    ("NLC-wide", (6, 7, 80), -1, (6, 7), "C"),
    ("NHWC-view-wide", (4, 96, 5, 6), 1, (4, 5, 6), "channels-last"),
    ("NC-wide-parallel", (1024, 130), 1, (1024,), "C"),
    # in cache, channel-major, in groups of whole channels (runs of 4 channels' rows per image: _whole_channels)
    ("NCHW-whole-channels", (4, 64, 32, 32), 1, (4, 32, 32), "C"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, shape, axis, mask_shape, layout", CASES, ids=[c[0] for c in CASES])
def test_layer_against_reference(name, shape, axis, mask_shape, layout, dtype):
    x, dy, weight, bias = data(shape, axis, dtype)
    mask = random_mask(mask_shape, seed=len(name)) if mask_shape != (1,) else np.ones(1, bool)
    bn = make_layer(len(shape), shape[axis], dtype, weight, bias, axis=axis)
    ref = check_step(bn, x, mask, dy, weight, bias, dtype, axis, layout, what=name)
    assert bn.num_batches_tracked == 1
    assert 1 < ref["n"] < (x.size // shape[axis]) or mask_shape == (1,)  # the mask masks something
    # a second step from the updated running statistics
    x2 = (x.astype(np.float64) * 0.5 - 1).astype(dtype)
    check_step(bn, x2, ~mask if (~mask).sum() > 1 else mask, dy, weight, bias, dtype, axis, layout, what=name)
    assert bn.num_batches_tracked == 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, mask_shape", [((1, 4), (4,)), ((3, 8, 5), (8, 5)), ((2, 6, 4), (4,))], ids=str)
def test_channel_axis_zero_counts_every_valid_position(shape, mask_shape, dtype):
    """Channels at axis 0: the valid count is over the whole mask (its first axis is not the samples), also when
    the mask's first rows hold no valid position."""
    x, dy, weight, bias = data(shape, 0, dtype, seed=16)
    mask = np.zeros(mask_shape, bool)
    mask.reshape(-1)[-3:] = True  # valid positions only at the end of the mask
    bn = make_layer(len(shape), shape[0], dtype, weight, bias, axis=0)
    check_step(bn, x, mask, dy, weight, bias, dtype, axis=0, what="axis0")
    n, mean, _ = F.batch_norm_stats(x, axis=0, mask=mask)
    assert n == masked_reference(x, mask, axis=0)["n"]


def test_mask_changes_the_statistics():
    """The masked result is not the unmasked one (the mask is not ignored), and an all-True mask gives the
    unmasked result."""
    x, dy, weight, bias = data((6, 3, 5), 1, np.float64, seed=3)
    mask = random_mask((6, 5), seed=4)
    plain, masked, ones = (make_layer(3, 3, np.float64, weight, bias) for _ in range(3))
    y_plain, y_masked, y_ones = plain(x), masked(x, mask=mask), ones(x, mask=np.ones((6, 5), bool))
    assert np.max(np.abs(y_plain - y_masked)) > 1e-3
    assert np.max(np.abs(plain.running_var - masked.running_var)) > 1e-4
    compare("y all-True", y_ones, y_plain, np.float64)
    compare("running_var all-True", ones.running_var, plain.running_var, np.float64)
    compare("dx all-True", ones.backward(dy), plain.backward(dy), np.float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, shape, axis, mask_shape, layout", [
    ("NCL", (5, 3, 6), 1, (5, 6), "C"),
    ("NCHW-channels-last-HW", (4, 3, 5, 6), 1, (5, 6), "channels-last"),
    ("NHWC", (4, 5, 6, 3), -1, (4, 1, 6), "C"),
    ("NCHW-parallel", (16, 3, 48, 48), 1, (16, 48, 48), "C"),
    ("NCHW-whole-channels", (4, 64, 32, 32), 1, (4, 32, 32), "C"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_fused_relu_and_residual(name, shape, axis, mask_shape, layout, dtype):
    x, dy, weight, bias = data(shape, axis, dtype, seed=5)
    z = np.random.default_rng(6).standard_normal(shape).astype(dtype)
    mask = random_mask(mask_shape, seed=7)
    bn = make_layer(len(shape), shape[axis], dtype, weight, bias, axis=axis, activation="relu")
    ref = check_step(bn, x, mask, dy, weight, bias, dtype, axis, layout, residual=z, what=f"relu {name}")
    assert 0 < np.mean(ref["y"] > 0) < 1  # the ReLU cuts


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["C", "channels-last"])
def test_functional_out_saved_and_stats(dtype, layout):
    shape, axis = (5, 3, 4, 6), 1
    x, dy, weight, bias = data(shape, axis, dtype, seed=8)
    mask = random_mask((5, 4, 6), seed=9)
    xv, dyv = arrange(x, layout, axis), arrange(dy, layout, axis)
    rm, rv = np.full(3, 0.5, dtype), np.full(3, 2.0, dtype)
    out = np.empty_like(xv)
    w, b = weight.astype(dtype), bias.astype(dtype)
    y, saved = F.batch_norm(xv, rm, rv, w, b, True, 0.3, out=out, return_saved=True, mask=mask)
    assert y is out
    dx_out = np.empty_like(xv)
    dx, dweight, dbias = F.batch_norm_backward(dyv, saved, out=dx_out)
    assert dx is dx_out
    ref = masked_reference(x, mask, weight, bias, dy, (0.5, 2.0), momentum=0.3, axis=axis)
    for name, got in (("y", y), ("dx", dx), ("dweight", dweight), ("dbias", dbias), ("running_mean", rm),
                      ("running_var", rv)):
        compare(f"{name} functional", got, ref[name], dtype)
    # without running statistics, and batch_norm_stats over the valid positions
    y2 = F.batch_norm(xv, None, None, w, b, True, mask=mask)
    compare("y functional-untracked", y2, ref["y"], dtype)
    n, mean, M2 = F.batch_norm_stats(xv, mask=mask)
    assert n == ref["n"] == int(mask.sum())
    compare("mean stats", mean, ref["mean"], np.float64, BOUND[np.float64])
    compare("M2 stats", M2, ref["M2"], np.float64, BOUND[np.float64])
    n_all, _, _ = F.batch_norm_stats(xv, mask=np.ones(1, bool))
    assert n_all == x.size // 3
    n_hw, mean_hw, _ = F.batch_norm_stats(xv, mask=mask[0])  # (H, W) broadcast over N
    assert n_hw == 5 * int(mask[0].sum())
    compare("mean stats-broadcast", mean_hw, masked_reference(x, mask[0])["mean"], np.float64)


def test_batch_norm_stats_axis_minus_one():
    x, _, _, _ = data((7, 5, 4), -1, np.float32, seed=10)
    mask = random_mask((7, 5), seed=11)
    n, mean, M2 = F.batch_norm_stats(x, axis=-1, mask=mask)
    ref = masked_reference(x, mask, axis=-1)
    assert n == ref["n"]
    compare("mean stats", mean, ref["mean"], np.float64, 1e-15)
    compare("M2 stats", M2, ref["M2"], np.float64, 1e-14)


@pytest.mark.parametrize("kind", ["fortran", "negative-strides", "read-only", "broadcast-view", "sliced"])
def test_mask_of_any_layout_gives_the_same_bits(kind):
    """A mask that is not C-contiguous (or is read-only) gives the bits of its C-contiguous copy."""
    x, dy, _, _ = data((4, 3, 6, 8), 1, np.float32, seed=12)
    base = random_mask((4, 6, 8), seed=13)
    if kind == "fortran":
        mask = np.asfortranarray(base)
    elif kind == "negative-strides":
        mask = base[::-1, :, ::-1].copy()[::-1, :, ::-1]
    elif kind == "read-only":
        mask = base.copy()
        mask.flags.writeable = False
    elif kind == "broadcast-view":
        base = np.broadcast_to(base[:1], base.shape)
        mask = base
    else:
        big = np.zeros((4, 12, 8), bool)
        big[:, ::2] = base
        mask = big[:, ::2]
    assert np.array_equal(mask, base)
    a, b = cbn.BatchNorm2d(3), cbn.BatchNorm2d(3)
    np.testing.assert_array_equal(a(x, mask=mask), b(x, mask=np.ascontiguousarray(base)))
    np.testing.assert_array_equal(a.backward(dy), b.backward(dy))
    for key in ("grad_weight", "grad_bias", "running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)


def test_float16_is_the_float32_result_rounded():
    x, dy, _, _ = data((10, 3, 4), 1, np.float16, seed=14)
    mask = random_mask((10, 4), seed=15)
    half, single = cbn.BatchNorm1d(3), cbn.BatchNorm1d(3)
    y = half(x, mask=mask)
    dx = half.backward(dy)
    assert y.dtype == dx.dtype == np.float16
    np.testing.assert_array_equal(y, single(x.astype(np.float32), mask=mask).astype(np.float16))
    np.testing.assert_array_equal(dx, single.backward(dy.astype(np.float32)).astype(np.float16))
    np.testing.assert_array_equal(half.running_var, single.running_var)


# -- gradients against torch autograd ------------------------------------------------------------------------------

def torch_masked(torch, tx, mask, axis, tw, tb, eps=1e-5):
    """(y, mean, var) of the masked batch norm in torch, differentiable in tx, tw, tb."""
    dims = tuple(d for d in range(tx.ndim) if d != axis)
    w = torch.tensor(full_mask(mask, tuple(tx.shape), axis))
    n = w.sum()
    cshape = [1] * tx.ndim
    cshape[axis] = tx.shape[axis]
    mean = (w * tx).sum(dim=dims, keepdim=True) / n
    var = (w * (tx - mean) ** 2).sum(dim=dims, keepdim=True) / n
    y = tw.reshape(cshape) * (tx - mean) / torch.sqrt(var + eps) + tb.reshape(cshape)
    return y, mean, var


@pytest.mark.parametrize("name, shape, axis, mask_shape, fused", [
    ("NCL", (6, 4, 7), 1, (6, 7), False),
    ("NC", (12, 3), 1, (12,), False),
    ("NCHW-HW", (4, 3, 5, 6), 1, (5, 6), False),
    ("NHWC-N1W", (4, 5, 6, 3), -1, (4, 1, 6), False),
    ("NCL-relu-residual", (6, 4, 7), 1, (6, 7), True),
    ("NCHW-channels-last-relu-residual", (4, 3, 5, 6), 1, (4, 5, 6), True),
])
def test_gradient_equals_torch_autograd(name, shape, axis, mask_shape, fused):
    torch = require_torch()
    x, dy, weight, bias = data(shape, axis, np.float64, seed=20)
    mask = random_mask(mask_shape, seed=21)
    z = np.random.default_rng(22).standard_normal(shape) if fused else None
    bn = make_layer(len(shape), shape[axis], np.float64, weight, bias, axis=axis,
                    activation="relu" if fused else None)
    layout = "channels-last" if "channels-last" in name else "C"
    y = bn(arrange(x, layout, axis), mask=mask, residual=z)
    dx = bn.backward(arrange(dy, layout, axis))
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, weight, bias))
    ty, _, _ = torch_masked(torch, tx, mask, axis % len(shape), tw, tb)
    if fused:
        ty = torch.relu(ty + torch.tensor(z))
    ty.backward(torch.tensor(dy))
    for what, got, want in (("y", y, ty.detach()), ("dx", dx, tx.grad), ("dweight", bn.grad_weight, tw.grad),
                            ("dbias", bn.grad_bias, tb.grad)):
        compare(f"{what} vs-torch {name}", got, want.numpy(), np.float64)
    if fused:
        assert_rel(bn.grad_residual, dy * (ty.detach().numpy() > 0), 0, "dresidual")


# -- batch renormalization ----------------------------------------------------------------------------------------

def renorm_reference(x, mask, running_mean, running_var, weight, bias, clipping, momentum=0.1, eps=1e-5, axis=1):
    """Ioffe 2017, Algorithm 1, with the masked batch statistics: (y, running_mean, running_var) in float64."""
    ref = masked_reference(x, mask, axis=axis)
    axis %= x.ndim
    cshape = [1] * x.ndim
    cshape[axis] = x.shape[axis]
    sigma_b, sigma = np.sqrt(ref["var"] + eps), np.sqrt(running_var + eps)
    r = np.clip(sigma_b / sigma, 1 / clipping["rmax"], clipping["rmax"])
    d = np.clip((ref["mean"] - running_mean) / sigma, -clipping["dmax"], clipping["dmax"])
    xhat = (np.asarray(x, np.float64) - ref["mean"].reshape(cshape)) / sigma_b.reshape(cshape)
    y = weight.reshape(cshape) * (xhat * r.reshape(cshape) + d.reshape(cshape)) + bias.reshape(cshape)
    return (y, (1 - momentum) * running_mean + momentum * ref["mean"],
            (1 - momentum) * running_var + momentum * ref["M2"] / (ref["n"] - 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, mask_shape, layout, fused", [((6, 3, 5), (6, 5), "C", False),
                                                              ((6, 3, 5), (6, 5), "C", True),
                                                              ((4, 3, 5, 6), (5, 6), "channels-last", False),
                                                              ((4, 3, 5, 6), (4, 1, 6), "C", True)], ids=str)
def test_renorm_against_algorithm_1_and_torch_autograd(shape, mask_shape, layout, fused, dtype):
    x, dy, weight, bias = data(shape, 1, dtype, seed=30)
    x = (x.astype(np.float64) * 2 + 1).astype(dtype)  # batch statistics away from the running ones: r, d clip
    mask = random_mask(mask_shape, seed=31)
    z = np.random.default_rng(32).standard_normal(x.shape).astype(dtype) if fused else None
    clipping = {"rmax": 1.3, "dmax": 0.3}
    bn = make_layer(len(shape), 3, dtype, weight, bias, renorm=True, renorm_clipping=clipping,
                    activation="relu" if fused else None)
    bn.running_mean[...], bn.running_var[...] = np.linspace(-0.5, 0.5, 3), np.linspace(0.5, 2.0, 3)
    mu, var = bn.running_mean.astype(np.float64), bn.running_var.astype(np.float64)
    xv = arrange(x, layout, 1)
    y = bn(xv, mask=mask, residual=z)
    dx = bn.backward(arrange(dy, layout, 1))
    assert same_layout(y, xv) and same_layout(dx, xv)
    y_ref, rm_ref, rv_ref = renorm_reference(x, mask, mu, var, weight, bias, clipping)
    if fused:
        y_ref = np.maximum(y_ref + z.astype(np.float64), 0)
    compare("y renorm", y, y_ref, dtype)
    compare("running_mean renorm", bn.running_mean, rm_ref, dtype)
    compare("running_var renorm", bn.running_var, rv_ref, dtype)
    torch = require_torch()
    dims = (0,) + tuple(range(2, len(shape)))
    cshape = (1, 3) + (1,) * (len(shape) - 2)
    tx = torch.tensor(x.astype(np.float64), requires_grad=True)
    tw, tb = (torch.tensor(a, requires_grad=True) for a in (weight, bias))
    w = torch.tensor(full_mask(mask, x.shape, 1))
    n = w.sum()
    mu_b = (w * tx).sum(dim=dims, keepdim=True) / n
    sigma_b = torch.sqrt((w * (tx - mu_b) ** 2).sum(dim=dims, keepdim=True) / n + 1e-5)
    with torch.no_grad():
        sigma = torch.sqrt(torch.tensor(var).reshape(cshape) + 1e-5)
        r = torch.clamp(sigma_b / sigma, 1 / 1.3, 1.3)
        d = torch.clamp((mu_b - torch.tensor(mu).reshape(cshape)) / sigma, -0.3, 0.3)
    ty = tw.reshape(cshape) * ((tx - mu_b) / sigma_b * r + d) + tb.reshape(cshape)
    if fused:
        ty = torch.relu(ty + torch.tensor(z.astype(np.float64)))
    ty.backward(torch.tensor(dy.astype(np.float64)))
    for what, got, want in (("y", y, ty.detach()), ("dx", dx, tx.grad), ("dweight", bn.grad_weight, tw.grad),
                            ("dbias", bn.grad_bias, tb.grad)):
        compare(f"{what} renorm-vs-torch", got, want.numpy(), dtype)
    assert float(r.min()) < 1 / 1.3 + 1e-12 or float(r.max()) > 1.3 - 1e-12  # the clipping is active


# -- ghost batches --------------------------------------------------------------------------------------------------

def ghost_reference(x, mask, size, weight, bias, dy, running, momentum=0.1, eps=1e-5, axis=1):
    """Float64 ghost batch norm with a mask: groups of ``size`` samples along axis 0, each normalised with the
    statistics of its valid positions (its slice of the broadcast mask); the running statistics updated with the
    average over groups of their means and unbiased variances (M2_g/(n_g - 1))."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    axis %= x.ndim
    rest = x.shape[:axis] + x.shape[axis + 1:]
    full = np.broadcast_to(np.asarray(mask, bool), rest)
    y, dx = np.empty_like(x), np.empty_like(x)
    dweight, dbias, means, variances = 0.0, 0.0, [], []
    for start in range(0, x.shape[0], size):
        part = slice(start, start + size)
        ref = masked_reference(x[part], full[part], weight, bias, dy[part], eps=eps, axis=axis)
        y[part], dx[part] = ref["y"], ref["dx"]
        dweight, dbias = dweight + ref["dweight"], dbias + ref["dbias"]
        means.append(ref["mean"])
        variances.append(ref["M2"] / (ref["n"] - 1))
    return dict(y=y, dx=dx, dweight=dweight, dbias=dbias,
                running_mean=(1 - momentum) * running[0] + momentum * np.mean(means, axis=0),
                running_var=(1 - momentum) * running[1] + momentum * np.mean(variances, axis=0))


def ghost_mask(rest, size, seed):
    """A random mask of shape ``rest`` with at least two valid positions in every group of ``size`` samples."""
    mask = random_mask(rest, seed=seed, p=0.5)
    for start in range(0, rest[0], size):
        group = mask[start:start + size].reshape(-1)
        if group.sum() < 2:
            group[:2] = True
            mask[start:start + size] = group.reshape(mask[start:start + size].shape)
    return mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis, size, mask_kind, layout", [
    ((10, 3), 1, 4, "full", "C"),
    ((9, 4, 5), 1, 3, "full", "C"),
    ((9, 5, 4), -1, 3, "full", "C"),
    ((7, 3, 4, 5), 1, 2, "full", "channels-last"),
    ((7, 3, 4, 5), 1, 3, "HW", "C"),
    ((7, 3, 4, 5), 1, 2, "N1W", "C"),
], ids=str)
def test_ghost_against_per_group_reference(shape, axis, size, mask_kind, layout, dtype):
    x, dy, weight, bias = data(shape, axis, dtype, seed=40)
    rest = tuple(s for d, s in enumerate(shape) if d != axis % len(shape))
    if mask_kind == "full":
        mask = ghost_mask(rest, size, seed=41)
    elif mask_kind == "HW":
        mask = random_mask(rest[1:], seed=42)
    else:
        mask = ghost_mask((rest[0], 1, rest[2]), size, seed=43)
    bn = make_layer(len(shape), shape[axis], dtype, weight, bias, axis=axis, virtual_batch_size=size)
    ref = ghost_reference(x, mask, size, weight, bias, dy, (0.5, 2.0), axis=axis)
    xv = arrange(x, layout, axis)
    y = bn(xv, mask=mask)
    dx = bn.backward(arrange(dy, layout, axis))
    assert same_layout(y, xv)
    for name, got in (("y", y), ("dx", dx), ("dweight", bn.grad_weight), ("dbias", bn.grad_bias),
                      ("running_mean", bn.running_mean), ("running_var", bn.running_var)):
        compare(f"{name} ghost", got, ref[name], dtype)
    y2, saved = F.batch_norm(xv, None, None, weight.astype(dtype), bias.astype(dtype), True, axis=axis,
                             return_saved=True, virtual_batch_size=size, mask=mask)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(F.batch_norm_backward(arrange(dy, layout, axis), saved)[0], dx)


def test_ghost_gradient_equals_torch_autograd_with_relu_and_residual():
    torch = require_torch()
    x, dy, weight, bias = data((10, 3, 4), 1, np.float64, seed=44)
    mask = ghost_mask((10, 4), 4, seed=45)
    z = np.random.default_rng(46).standard_normal(x.shape)
    bn = make_layer(3, 3, np.float64, weight, bias, virtual_batch_size=4, activation="relu")
    y = bn(x, mask=mask, residual=z)
    dx = bn.backward(dy)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, weight, bias))
    ty = torch.cat([torch_masked(torch, part, mask[i * 4:(i + 1) * 4], 1, tw, tb)[0]
                    for i, part in enumerate(torch.split(tx, 4))])
    ty = torch.relu(ty + torch.tensor(z))
    ty.backward(torch.tensor(dy))
    for what, got, want in (("y", y, ty.detach()), ("dx", dx, tx.grad), ("dweight", bn.grad_weight, tw.grad),
                            ("dbias", bn.grad_bias, tb.grad)):
        compare(f"{what} ghost-vs-torch", got, want.numpy(), np.float64)


# -- precise_stats --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis, mask_kind", [((4, 3, 7), 1, "full"), ((4, 5, 3, 4), 1, "HW"),
                                                    ((4, 6, 5), -1, "full")], ids=str)
def test_precise_stats_over_the_valid_positions(shape, axis, mask_kind, dtype):
    rng = np.random.default_rng(50)
    C = shape[axis]
    bn = make_layer(len(shape), C, dtype, *data(shape, axis, dtype)[2:], axis=axis)
    plain = pickle.loads(pickle.dumps(bn))
    xs, masks = [], []
    for i, n in enumerate((5, 2, 8, 3)):
        xs.append(data((n,) + shape[1:], axis, dtype, seed=51 + i)[0])
        rest = tuple(s for d, s in enumerate(xs[-1].shape) if d != axis % len(shape))
        masks.append(random_mask(rest if mask_kind == "full" else rest[1:], seed=int(rng.integers(1 << 30))))
    with cbn.precise_stats(bn):
        for x, mask in zip(xs, masks):
            y = bn(x, mask=mask)
            np.testing.assert_array_equal(y, plain(x, mask=mask))  # the normal masked training output
    # the population: every batch's valid positions, concatenated
    values = np.concatenate([np.moveaxis(x.astype(np.float64), axis, -1)[np.broadcast_to(
        m, tuple(s for d, s in enumerate(x.shape) if d != axis % x.ndim))] for x, m in zip(xs, masks)])
    compare("running_mean precise", bn.running_mean, values.mean(axis=0), dtype)
    compare("running_var precise", bn.running_var, values.var(axis=0, ddof=1), dtype)
    assert bn.num_batches_tracked == 4


# -- eval and track_running_stats=False ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis, mask_shape", [((6, 3, 5), 1, (6, 5)), ((4, 5, 6, 3), -1, (5, 6)),
                                                     ((16, 3, 48, 48), 1, (16, 48, 48))], ids=str)
def test_eval_ignores_the_mask(shape, axis, mask_shape, dtype):
    x, dy, weight, bias = data(shape, axis, dtype, seed=60)
    mask = random_mask(mask_shape, seed=61)
    bn = make_layer(len(shape), shape[axis], dtype, weight, bias, axis=axis)
    bn(x * 2, mask=mask)
    bn.eval()
    before = full_snapshot(bn)
    y = bn(x, mask=mask)
    dx = bn.backward(dy)
    assert bn.num_batches_tracked == 1
    y_plain, dx_plain = bn(x), bn.backward(dy)
    assert y.tobytes() == y_plain.tobytes() and dx.tobytes() == dx_plain.tobytes()
    y_none = bn(x, mask=np.zeros(mask_shape, bool))  # nothing valid: no statistics are computed in eval
    assert y_none.tobytes() == y_plain.tobytes()
    assert {k: v for k, v in full_snapshot(bn).items() if k not in ("_saved", "grad_weight", "grad_bias")} == \
        {k: v for k, v in before.items() if k not in ("_saved", "grad_weight", "grad_bias")}
    rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    y_f = F.batch_norm(x, rm, rv, weight.astype(dtype), bias.astype(dtype), False, axis=axis, mask=mask)
    np.testing.assert_array_equal(y_f, F.batch_norm(x, rm, rv, weight.astype(dtype), bias.astype(dtype), False,
                                                    axis=axis))


@pytest.mark.parametrize("dtype", DTYPES)
def test_untracked_layer_uses_the_mask_in_eval(dtype):
    x, dy, weight, bias = data((6, 3, 5), 1, dtype, seed=62)
    mask = random_mask((6, 5), seed=63)
    bn = make_layer(3, 3, dtype, weight, bias, track_running_stats=False).eval()
    y = bn(x, mask=mask)
    dx = bn.backward(dy)
    ref = masked_reference(x, mask, weight, bias, dy)
    for name, got in (("y", y), ("dx", dx), ("dweight", bn.grad_weight), ("dbias", bn.grad_bias)):
        compare(f"{name} untracked-eval", got, ref[name], dtype)
    assert bn.running_mean is None and bn.num_batches_tracked == 0


# -- NaN and Inf at masked-out positions ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, axis, mask_shape, layout", [
    ((6, 3, 5), 1, (6, 5), "C"),
    ((30, 4), 1, (30,), "C"),
    ((4, 3, 5, 6), 1, (4, 5, 6), "channels-last"),
    ((4, 5, 6, 3), -1, (5, 6), "C"),
    ((16, 3, 48, 48), 1, (16, 48, 48), "C"),
    ((2048, 16, 3), 1, (2048, 3), "C"),
], ids=str)
def test_nan_and_inf_at_masked_out_positions(shape, axis, mask_shape, layout, dtype):
    x, _, weight, bias = data(shape, axis, dtype, seed=70)
    mask = random_mask(mask_shape, seed=71)
    mask.flat[0] = False  # the very first value too (a shift taken from it would poison the sums)
    bad = ~full_mask(mask, shape, axis).astype(bool)
    poisoned = x.copy()
    cycle = np.resize(np.array([np.nan, np.inf, -np.inf, np.finfo(dtype).max], dtype), poisoned.shape)
    poisoned[np.broadcast_to(bad, shape)] = cycle[np.broadcast_to(bad, shape)]
    clean = x.copy()
    clean[np.broadcast_to(bad, shape)] = 0
    layers = [make_layer(len(shape), shape[axis], dtype, weight, bias, axis=axis) for _ in range(2)]
    with np.errstate(all="ignore"):
        y = layers[0](arrange(poisoned, layout, axis), mask=mask)
    y_clean = layers[1](arrange(clean, layout, axis), mask=mask)
    valid = np.broadcast_to(~bad, shape)
    ref = masked_reference(poisoned, mask, weight, bias, running=(0.5, 2.0), axis=axis)
    assert np.all(np.isfinite(y[valid]))
    compare("y nan-masked", np.where(valid, y, 0), np.where(valid, ref["y"], 0), dtype)
    for key in ("running_mean", "running_var"):
        got = getattr(layers[0], key)
        assert np.all(np.isfinite(got)), key
        compare(f"{key} nan-masked", got, ref[key], dtype)
        assert got.tobytes() == getattr(layers[1], key).tobytes(), f"{key}: the masked-out values changed it"
    assert y[valid].tobytes() == y_clean[valid].tobytes()
    n, mean, M2 = F.batch_norm_stats(arrange(poisoned, layout, axis), axis=axis, mask=mask)
    assert np.all(np.isfinite(mean)) and np.all(np.isfinite(M2))


# -- bad input ------------------------------------------------------------------------------------------------------

def trained(cls=cbn.BatchNorm1d, C=3, **kw):
    """A layer after a forward and backward (gradients and a saved forward to keep)."""
    x, dy, weight, bias = data((6, C, 5), 1, np.float32, seed=80)
    bn = make_layer(3, C, np.float32, weight, bias, **kw)
    bn(x, mask=random_mask((6, 5), seed=81))
    bn.backward(dy)
    return bn, x


def unchanged_after(bn, exc, pattern, *args, **kw):
    before = full_snapshot(bn)
    with pytest.raises(exc, match=pattern) as info:
        bn(*args, **kw)
    assert full_snapshot(bn) == before, "the layer changed"
    return str(info.value)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype_name", ["int64", "uint8", "float32", "float64", "int8"])
def test_mask_of_another_dtype_is_a_type_error(dtype_name, training):
    bn, x = trained()
    bn.train(training)
    mask = np.ones((6, 5), dtype_name)
    message = unchanged_after(bn, TypeError, r"mask", x, mask=mask)
    assert "bool" in message and dtype_name in message, message
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(TypeError, match=r"mask"):
        F.batch_norm(x, rm, rv, training=training, mask=mask)
    assert np.all(rm == 0) and np.all(rv == 1)
    with pytest.raises(TypeError, match=r"mask"):
        F.batch_norm_stats(x, mask=mask)


@pytest.mark.parametrize("value", [[[True] * 5] * 6, True, (True, False, True, True, True), "mask"],
                         ids=["list", "bool", "tuple", "str"])
def test_mask_that_is_not_an_ndarray_is_a_type_error(value):
    bn, x = trained()
    unchanged_after(bn, TypeError, r"mask", x, mask=value)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(TypeError, match=r"mask"):
        F.batch_norm(x, rm, rv, training=True, mask=value)
    assert np.all(rm == 0) and np.all(rv == 1)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("mask_shape", [(7, 5), (6, 4), (6,), (4,), (2, 6, 5), (6, 3, 5), (6, 5, 1), (0,)],
                         ids=str)
def test_mask_shape_that_does_not_broadcast_is_a_value_error(mask_shape, training):
    bn, x = trained()  # x: (6, 3, 5), the mask must broadcast to (6, 5)
    bn.train(training)
    message = unchanged_after(bn, ValueError, r"mask", x, mask=np.ones(mask_shape, bool))
    assert str(mask_shape) in message and "(6, 5)" in message, message
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(ValueError, match=r"mask"):
        F.batch_norm(x, rm, rv, training=training, mask=np.ones(mask_shape, bool))
    assert np.all(rm == 0) and np.all(rv == 1)


@pytest.mark.parametrize("valid, mask_shape, samples", [(0, (6, 5), 6), (1, (6, 5), 6), (0, (5,), 6), (0, (1,), 6),
                                                      (1, (5,), 1), (1, (1, 1), 1)], ids=str)
def test_fewer_than_two_valid_positions_in_training(valid, mask_shape, samples):
    """n = 0 or 1 valid positions (after broadcasting) in training: ValueError naming the count, nothing changed."""
    bn, x = trained()
    x = x[:samples] if samples == 6 else x[:1, :, :mask_shape[-1]]
    mask = np.zeros(mask_shape, bool)
    mask.flat[mask.size // 2] = bool(valid)
    assert int(np.broadcast_to(mask, x.shape[:1] + x.shape[2:]).sum()) == valid
    message = unchanged_after(bn, ValueError, r"(?i)mask|value", x, mask=mask)
    assert str(valid) in message, message
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(ValueError, match=r"(?i)mask|value"):
        F.batch_norm(x, rm, rv, training=True, mask=mask)
    with pytest.raises(ValueError, match=r"(?i)mask|value"):
        F.batch_norm(x, None, None, training=True, mask=mask)
    assert np.all(rm == 0) and np.all(rv == 1)
    unchanged_after(cbn.BatchNorm1d(3, track_running_stats=False).eval(), ValueError, r"(?i)mask|value", x,
                    mask=mask)


def test_ghost_group_with_at_most_one_valid_position():
    bn, x = trained(virtual_batch_size=2)  # groups of 2 samples, 10 positions each
    for valid in (0, 1):
        mask = np.ones((6, 5), bool)
        mask[2:4] = False
        mask[3, 4] = bool(valid)
        message = unchanged_after(bn, ValueError, r"(?i)mask|value", x, mask=mask)
        assert str(valid) in message, message
    mask = np.ones((6, 5), bool)
    mask[2:4] = False
    mask[3, 3:] = True  # two valid positions in the middle group: fine
    bn(x, mask=mask)


def test_renorm_layer_state_unchanged_on_bad_mask():
    bn, x = trained(renorm=True, renorm_clipping={"rmax": 2.0})
    unchanged_after(bn, TypeError, r"mask", x, mask=np.ones((6, 5), np.int32))
    unchanged_after(bn, ValueError, r"mask", x, mask=np.ones((6, 4), bool))
    unchanged_after(bn, ValueError, r"(?i)mask|value", x, mask=np.zeros((6, 5), bool))


def test_precise_stats_state_unchanged_on_bad_mask():
    bn, x = trained()
    with cbn.precise_stats(bn):
        unchanged_after(bn, ValueError, r"(?i)mask|value", x, mask=np.zeros((6, 5), bool))
        bn(x, mask=random_mask((6, 5), seed=82))
    ref = masked_reference(x, random_mask((6, 5), seed=82))
    compare("running_mean precise-after-error", bn.running_mean, ref["mean"], np.float32)
    assert bn.num_batches_tracked == 1


# -- determinism ---------------------------------------------------------------------------------------------------

def _run_all(dtype, layout_kind, threads, cases):
    """Forward and backward of the masked ``cases`` on ``threads`` threads in a forced layout (None: by shape)."""
    from cbn._dispatch import kernels
    results = []
    old = cbn.get_num_threads()
    cbn.set_num_threads(min(threads, cbn.max_num_threads()))
    if layout_kind is not None:
        kernels.force_layout(*layout_kind)
    try:
        for i, (shape, axis, mask_shape, layout, kw) in enumerate(cases):
            x, dy, weight, bias = data(shape, axis, dtype, seed=90 + i)
            mask = random_mask(mask_shape, seed=91 + i)
            bn = make_layer(len(shape), shape[axis], dtype, weight, bias, axis=axis, **kw)
            z = np.ones(shape, dtype) * 0.25 if kw.get("activation") else None
            y = bn(arrange(x, layout, axis), mask=mask, residual=z)
            dx = bn.backward(arrange(dy, layout, axis))
            results.append((x, mask, dy, weight, bias, [y, dx, bn.grad_weight, bn.grad_bias, bn.running_mean,
                                                        bn.running_var]))
    finally:
        kernels.force_layout(None)
        cbn.set_num_threads(old)
    return results


# (shape, axis, mask shape, layout, layer options). Chosen by shape, inputs above 65536 values run on several
# threads; a forced layout runs on the caller's threads at any size, so smaller inputs do there.
DETERMINISM_CASES = {
    "big": [((8, 16, 24, 24), 1, (8, 24, 24), "C", {}),
            ((8, 16, 24, 24), 1, (8, 1, 24), "channels-last", {}),
            ((4500, 16), 1, (4500,), "C", {}),
            ((2048, 16, 3), 1, (2048, 3), "C", {"activation": "relu"}),
            ((12, 3, 2000), 1, (2000,), "C", {}),
            ((64, 40, 32), -1, (64, 40), "C", {"virtual_batch_size": 16}),
            ((1200, 80), 1, (1200,), "C", {"activation": "relu"})],
    "small": [((4, 16, 9, 10), 1, (4, 9, 10), "C", {}),
              ((4, 16, 9, 10), 1, (4, 1, 10), "channels-last", {}),
              ((500, 16), 1, (500,), "C", {}),
              ((256, 16, 3), 1, (256, 3), "C", {"activation": "relu"}),
              ((4, 3, 700), 1, (700,), "C", {}),
              ((16, 10, 8), -1, (16, 10), "C", {"virtual_batch_size": 4}),
              ((6, 5, 7), 1, (6, 7), "C", {"renorm": True, "renorm_clipping": {"rmax": 1.2}}),
              ((60, 70), 1, (60,), "C", {})],
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", FORCED_LAYOUTS[1:] + [None], ids=str)
def test_same_bits_for_1_2_3_threads(layout, dtype):
    cases = DETERMINISM_CASES["big" if layout is None else "small"]
    runs = [_run_all(dtype, layout, n, cases) for n in (1, 2, 3)]
    for i, case in enumerate(runs[0]):
        for other in runs[1:]:
            for k, (a, b) in enumerate(zip(case[-1], other[i][-1])):
                assert a.tobytes() == b.tobytes(), f"case {cases[i][:4]} result {k}: threads differ"
    # and every layout is right (the reference of each case, checked on the 3-thread run)
    for (shape, axis, mask_shape, _, kw), (x, mask, dy, weight, bias, got) in zip(cases, runs[2]):
        if kw:
            continue
        ref = masked_reference(x, mask, weight, bias, dy, (0.5, 2.0), axis=axis)
        for name, value in zip(("y", "dx", "dweight", "dbias", "running_mean", "running_var"), got):
            compare(f"{name} layout={layout}", value, ref[name], dtype)


# -- property test -------------------------------------------------------------------------------------------------

@st.composite
def masked_inputs(draw):
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    rest = tuple(s for d, s in enumerate(shape) if d != axis % ndim)
    # the mask's shape: rest, or a broadcast form of it (leading axes dropped, some axes of size 1)
    drop = draw(st.integers(0, len(rest) - 1))
    mask_shape = tuple(1 if draw(st.booleans()) and draw(st.booleans()) else s for s in rest[drop:])
    seed = draw(st.integers(0, 2 ** 32 - 1))
    p = draw(st.sampled_from([0.2, 0.5, 0.9, 1.0]))
    mask = np.random.default_rng(seed).random(mask_shape) < p
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(["C", "channels-last", "fortran"]))
    return shape, axis, mask, dtype, layout, seed


@settings(max_examples=max(10, settings.default.max_examples // 2))
@given(case=masked_inputs())
def test_property_random_shapes_axes_and_masks(case):
    shape, axis, mask, dtype, layout, seed = case
    n = int(np.broadcast_to(mask, tuple(s for d, s in enumerate(shape) if d != axis % len(shape))).sum())
    note(f"n={n}, mask shape {mask.shape}")
    x, dy, weight, bias = data(shape, axis, dtype, seed=seed % 1000)
    bn = make_layer(len(shape), shape[axis], dtype, weight, bias, axis=axis)
    if n < 2:
        before = full_snapshot(bn)
        with pytest.raises(ValueError):
            bn(arrange(x, layout, axis), mask=mask)
        assert full_snapshot(bn) == before
        return
    check_step(bn, x, mask, dy, weight, bias, dtype, axis, layout, what="property")


@pytest.mark.parametrize("dtype", DTYPES)
def test_frozen_layer_takes_a_mask_without_effect(dtype):
    """FrozenBatchNorm (what cbn.freeze makes) takes the mask a model passes, checks it, and ignores it."""
    bn = cbn.BatchNorm1d(3, dtype=dtype)
    x, mask = data((6, 3, 5), 1, dtype)[0], random_mask((6, 5))
    bn(x, mask=mask)
    frozen = cbn.freeze(bn)
    want = frozen(x)
    assert np.array_equal(frozen(x, mask=mask), want) and np.array_equal(frozen(x, mask=~mask), want)
    with pytest.raises(TypeError, match="bool"):
        frozen(x, mask=mask.astype(np.int8))
    with pytest.raises(ValueError, match="mask must have shape"):
        frozen(x, mask=mask[:, :4])
