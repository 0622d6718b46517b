"""Ghost batches (virtual_batch_size): against a float64 per-group batch norm written here, torch autograd for the
gradient of the fused forms, layouts, the running-statistic update, eval, files and bad input."""
import pickle
import re

import numpy as np
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

import cbn
from cbn import functional as F

from bn_helpers import assert_rel, full_snapshot, require_torch, snapshot

# relative to the largest output (docs/development/kernels.md, "The contract")
BOUND = {np.float32: 1e-6, np.float64: 1e-13}


def ghost_reference(x, size, weight, bias, dy, running, momentum=0.1, eps=1e-5, axis=1):
    """Float64 ghost batch norm: (y, dx, dweight, dbias, running_mean, running_var) with groups of ``size`` samples
    along axis 0, each normalised with its own statistics; the running statistics updated with the average over
    groups of their means and unbiased variances."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)  # (N, ..., C)
    dy = np.moveaxis(np.asarray(dy, np.float64), axis, -1)
    y, dx = np.empty_like(x), np.empty_like(x)
    dweight, dbias, means, variances = 0.0, 0.0, [], []
    for start in range(0, x.shape[0], size):
        xg, dyg = x[start:start + size], dy[start:start + size]
        axes = tuple(range(xg.ndim - 1))
        m = xg.size // xg.shape[-1]
        mean, var = xg.mean(axis=axes), xg.var(axis=axes)
        xhat = (xg - mean) / np.sqrt(var + eps)
        y[start:start + size] = weight * xhat + bias
        db, dw = dyg.sum(axis=axes), (dyg * xhat).sum(axis=axes)
        dx[start:start + size] = weight / np.sqrt(var + eps) * (dyg - db / m - xhat * dw / m)
        dweight, dbias = dweight + dw, dbias + db
        means.append(mean)
        variances.append(var * m / (m - 1))
    running_mean = (1 - momentum) * running[0] + momentum * np.mean(means, axis=0)
    running_var = (1 - momentum) * running[1] + momentum * np.mean(variances, axis=0)
    return (np.moveaxis(y, -1, axis), np.moveaxis(dx, -1, axis), dweight, dbias, running_mean, running_var)


def data(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    C = shape[1]
    x = (rng.standard_normal(shape) * rng.uniform(0.5, 3, C).reshape((1, C) + (1,) * (len(shape) - 2))
         + rng.uniform(-5, 5, C).reshape((1, C) + (1,) * (len(shape) - 2)))
    return x.astype(dtype), rng.standard_normal(shape).astype(dtype), rng.uniform(0.5, 1.5, C), rng.uniform(-1, 1, C)


def layer_with(cls, C, dtype, weight, bias, **kw):
    bn = cls(C, dtype=dtype, **kw)
    bn.weight[...], bn.bias[...] = weight, bias
    bn.running_mean[...], bn.running_var[...] = 0.5, 2.0
    return bn


def check(bn, x, dy, weight, bias, size, dtype, axis=1, layout=lambda a: a):
    """One training forward and backward of ``bn`` on layout(x) against the reference."""
    ref = ghost_reference(x, size, weight.astype(dtype), bias.astype(dtype), dy, (0.5, 2.0), axis=axis)
    y = bn(layout(x))
    dx = bn.backward(layout(dy))
    assert y.strides == layout(x).strides
    bound = BOUND[dtype]
    for what, got, want in (("y", y, ref[0]), ("dx", dx, ref[1]), ("dweight", bn.grad_weight, ref[2]),
                            ("dbias", bn.grad_bias, ref[3]), ("running_mean", bn.running_mean, ref[4]),
                            ("running_var", bn.running_var, ref[5])):
        assert_rel(got, want, bound, what)
    assert bn.num_batches_tracked == 1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls, shape, size", [(cbn.BatchNorm1d, (10, 3), 4), (cbn.BatchNorm1d, (9, 4, 5), 3),
                                              (cbn.BatchNorm2d, (7, 3, 4, 5), 2), (cbn.BatchNorm3d, (5, 2, 3, 2, 3), 4),
                                              (cbn.BatchNorm2d, (6, 3, 1, 1), 2)])
def test_layer_against_per_group_reference(cls, shape, size, dtype):
    x, dy, weight, bias = data(shape, dtype)
    check(layer_with(cls, shape[1], dtype, weight, bias, virtual_batch_size=size), x, dy, weight, bias, size, dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_channels_last_and_axis_minus_one(dtype):
    x, dy, weight, bias = data((7, 3, 4, 5), dtype, seed=1)

    def nhwc_memory(a):  # NCHW shape over NHWC memory
        return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)

    bn = layer_with(cbn.BatchNorm2d, 3, dtype, weight, bias, virtual_batch_size=3)
    check(bn, x, dy, weight, bias, 3, dtype, layout=nhwc_memory)
    xl, dyl = (np.ascontiguousarray(a.transpose(0, 2, 3, 1)) for a in (x, dy))
    bn = layer_with(cbn.BatchNorm2d, 3, dtype, weight, bias, virtual_batch_size=3, axis=-1)
    check(bn, xl, dyl, weight, bias, 3, dtype, axis=3)
    fortran = layer_with(cbn.BatchNorm2d, 3, dtype, weight, bias, virtual_batch_size=3)
    check(fortran, x, dy, weight, bias, 3, dtype, layout=np.asfortranarray)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_functional_out_and_momentum(dtype):
    x, dy, weight, bias = data((9, 4, 6), dtype, seed=2)
    rm, rv = np.full(4, 0.5, dtype), np.full(4, 2.0, dtype)
    out = np.empty_like(x)
    y, saved = F.batch_norm(x, rm, rv, weight.astype(dtype), bias.astype(dtype), True, 0.3, out=out,
                            return_saved=True, virtual_batch_size=4)
    assert y is out and isinstance(saved, F.GhostSaved) and saved.bounds == ((0, 4), (4, 8), (8, 9))
    dx_out = np.empty_like(x)
    dx, dweight, dbias = F.batch_norm_backward(dy, saved, out=dx_out)
    assert dx is dx_out
    ref = ghost_reference(x, 4, weight.astype(dtype), bias.astype(dtype), dy, (0.5, 2.0), momentum=0.3)
    for what, got, want in zip(("y", "dx", "dweight", "dbias", "running_mean", "running_var"),
                               (y, dx, dweight, dbias, rm, rv), ref):
        assert_rel(got, want, BOUND[dtype], what)


def test_one_group_is_the_plain_batch_norm_and_eval_is_unchanged():
    x, dy, weight, bias = data((4, 3, 5), np.float32, seed=3)
    plain, ghost = (layer_with(cbn.BatchNorm1d, 3, np.float32, weight, bias, **kw)
                    for kw in ({}, {"virtual_batch_size": 4}))
    np.testing.assert_array_equal(ghost(x), plain(x))
    np.testing.assert_array_equal(ghost.backward(dy), plain.backward(dy))
    assert snapshot(ghost) == snapshot(plain)
    x8 = np.concatenate([x, x + 1])
    ghost(x8)  # two groups: the state differs from here
    plain.running_mean[...], plain.running_var[...] = ghost.running_mean, ghost.running_var
    ghost.eval(), plain.eval()
    np.testing.assert_array_equal(ghost(x8), plain(x8))
    np.testing.assert_array_equal(ghost.backward(dy[:4].repeat(2, 0)), plain.backward(dy[:4].repeat(2, 0)))


def test_nan_guard_and_untracked():
    x, dy, weight, bias = data((6, 3), np.float64, seed=4)
    x[4, 1] = np.nan  # in the last group only
    bn = layer_with(cbn.BatchNorm1d, 3, np.float64, weight, bias, virtual_batch_size=3, nan_guard=True)
    y = bn(x)
    assert np.all(np.isfinite(y[:3])) and np.all(np.isnan(y[3:, 1])) and bn.running_mean[1] == 0.5
    assert bn.running_mean[0] != 0.5
    clean = data((6, 3), np.float64, seed=5)[0]
    untracked = cbn.BatchNorm1d(3, dtype=np.float64, track_running_stats=False, virtual_batch_size=3)
    assert_rel(untracked(clean), ghost_reference(clean, 3, 1.0, 0.0, clean, (0, 1))[0], 1e-13, "untracked")
    assert_rel(untracked.eval()(clean), ghost_reference(clean, 6, 1.0, 0.0, clean, (0, 1))[0], 1e-13,
               "untracked eval: the batch statistics of the whole batch")


@pytest.mark.parametrize("kw", [dict(virtual_batch_size=3), dict(renorm=True, renorm_clipping={"rmax": 1.5})])
def test_same_bits_on_any_thread_count(kw):
    x, dy, _, _ = data((11, 6, 40, 40), np.float32, seed=10)
    results = []
    threads = cbn.get_num_threads()
    try:
        for n in (1, 2):
            cbn.set_num_threads(n)
            bn = cbn.BatchNorm2d(6, **kw)
            results.append((bn(x), bn.backward(dy), bn.grad_weight, bn.running_mean, bn.running_var))
    finally:
        cbn.set_num_threads(threads)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_precise_stats_records_the_whole_batch():
    x, _, weight, bias = data((8, 3, 4), np.float64, seed=5)
    bn = layer_with(cbn.BatchNorm1d, 3, np.float64, weight, bias, virtual_batch_size=3)
    with cbn.precise_stats(bn):
        bn(x)
    assert_rel(bn.running_var, np.moveaxis(x, 1, -1).reshape(-1, 3).var(axis=0, ddof=1), 1e-14, "population var")


@pytest.mark.parametrize("fused", [False, True])
def test_gradient_equals_torch_autograd(fused):
    torch = require_torch()
    x, dy, weight, bias = data((10, 3, 4), np.float64, seed=6)
    z = np.random.default_rng(7).standard_normal(x.shape) if fused else None
    bn = layer_with(cbn.BatchNorm1d, 3, np.float64, weight, bias, virtual_batch_size=4,
                    activation="relu" if fused else None)
    y = bn(x, residual=z)
    dx = bn.backward(dy)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, weight, bias))
    ty = torch.cat([torch.nn.functional.batch_norm(part, None, None, tw, tb, True, 0.0, 1e-5)
                    for part in torch.split(tx, 4)])
    if fused:
        ty = torch.relu(ty + torch.tensor(z))
    ty.backward(torch.tensor(dy))
    for what, got, want in (("y", y, ty.detach()), ("dx", dx, tx.grad), ("dweight", bn.grad_weight, tw.grad),
                            ("dbias", bn.grad_bias, tb.grad)):
        assert_rel(got, want.numpy(), 1e-13, what)
    if fused:
        assert_rel(bn.grad_residual, dy * (ty.detach().numpy() > 0), 0, "dresidual")


# -- configuration and bad input ---------------------------------------------------------------------------------

def test_repr_pickle_save_load(tmp_path):
    bn = cbn.BatchNorm2d(3, virtual_batch_size=16)
    assert repr(bn).endswith("track_running_stats=True, virtual_batch_size=16)")
    assert pickle.loads(pickle.dumps(bn)).virtual_batch_size == 16
    bn.save(tmp_path / "bn.npz")
    assert cbn.load(tmp_path / "bn.npz").virtual_batch_size == 16
    plain = cbn.BatchNorm2d(3)
    assert "virtual" not in repr(plain)
    state = plain.__getstate__()
    del state["virtual_batch_size"]  # a pickle of an earlier cbn
    old = cbn.BatchNorm2d.__new__(cbn.BatchNorm2d)
    old.__setstate__(state)
    assert old.virtual_batch_size is None


@pytest.mark.parametrize("value, exc, actual", [(0, ValueError, r"got 0"), (-2, ValueError, r"got -2"),
                                                (2.0, ValueError, r"got 2\.0"), (True, ValueError, r"got True"),
                                                ("4", ValueError, r"got '4'")])
def test_bad_virtual_batch_size(value, exc, actual):
    with pytest.raises(exc, match=r"virtual_batch_size must be an integer >= 1, got") as info:
        cbn.BatchNorm1d(3, virtual_batch_size=value)
    assert re.search(actual, str(info.value))
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    with pytest.raises(exc, match=actual):
        F.batch_norm(np.ones((4, 3), np.float32), rm, rv, training=True, virtual_batch_size=value)
    assert np.all(rm == 0) and np.all(rv == 1)


def _unchanged_after(bn, exc, pattern, *args, **kw):
    before = full_snapshot(bn)
    with pytest.raises(exc, match=pattern):
        bn(*args, **kw)
    assert full_snapshot(bn) == before


def test_single_value_in_a_group_and_channel_axis_zero():
    x, dy, weight, bias = data((9, 3), np.float32, seed=8)
    bn = layer_with(cbn.BatchNorm1d, 3, np.float32, weight, bias, virtual_batch_size=4)
    bn(x[:8])
    _unchanged_after(bn, ValueError, r"Expected more than 1 value per channel when training, got 1 in the last "
                                     r"virtual batch \(1 of 9 samples, virtual_batch_size=4\)", x)
    ones = cbn.BatchNorm1d(3, virtual_batch_size=1)
    _unchanged_after(ones, ValueError, r"got 1 in the last virtual batch \(1 of 2 samples", x[:2])
    ones(x[:2, :, None].repeat(2, 2))  # two values per channel in each sample: fine
    with pytest.raises(ValueError, match=r"must not be the channel axis: expected axis other than 0, got axis 0"):
        cbn.BatchNorm1d(3, axis=0, virtual_batch_size=2)
    bn_neg = cbn.BatchNorm1d(3, axis=-2, virtual_batch_size=2)  # axis 0 of 2-D input
    _unchanged_after(bn_neg, ValueError, r"expected a channel axis other than 0 for 2-D input, got axis 0",
                     x.T.copy())
    rm = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"must not be the channel axis"):
        F.batch_norm(x.T.copy(), rm, np.ones(3, np.float32), training=True, axis=0, virtual_batch_size=2)
    assert np.all(rm == 0)


def test_backward_arguments_and_sync():
    x, dy, _, _ = data((8, 3), np.float64, seed=9)
    y, saved = F.batch_norm(x, None, None, training=True, return_saved=True, virtual_batch_size=3)
    with pytest.raises(ValueError, match=r"grad_sums and count must be None after a forward with virtual batches"):
        F.batch_norm_backward(dy, saved, grad_sums=np.zeros((2, 3)), count=16)
    with pytest.raises(TypeError, match=r"saved must be the BatchNormSaved of a forward, got GhostSaved"):
        F.batch_norm_grad_sums(dy, saved)
    with pytest.raises(ValueError, match=r"expected consecutive groups covering the \(8, 3\) input, got bounds"):
        F.batch_norm_backward(dy, saved._replace(bounds=((0, 3), (3, 5), (6, 8))))
    with pytest.raises(ValueError, match=r"grad_output must have the forward input's shape \(8, 3\)"):
        F.batch_norm_backward(dy[:4], saved)
    with pytest.raises(ValueError, match=r"out must not share memory with another argument"):
        F.batch_norm_backward(dy, saved, out=saved.parts[1].x.reshape(saved.parts[1].shape).base)
    pytest.importorskip("mpi4py.MPI")
    with pytest.raises(ValueError, match=r"SyncBatchNorm takes no virtual_batch_size .*expected None, got 4"):
        cbn.SyncBatchNorm1d(3, virtual_batch_size=4)
    model = [cbn.BatchNorm1d(3), cbn.BatchNorm1d(3, virtual_batch_size=4)]
    with pytest.raises(ValueError, match=r"expected None, got 4"):
        cbn.convert_sync_batchnorm(model)
    assert all(type(layer) is cbn.BatchNorm1d for layer in model)


def test_version_3_file_loads_without_virtual_batches(tmp_path):
    import json
    bn = cbn.BatchNorm1d(3, activation="relu")
    config = {"format": "cbn.batchnorm", "version": 3, "class": "BatchNorm1d", "training": False,
              **{k: v for k, v in bn._config().items() if k != "virtual_batch_size"}}
    np.savez(tmp_path / "v3.npz", __config__=np.array(json.dumps(config)), **bn.state_dict())
    loaded = cbn.load(tmp_path / "v3.npz")
    assert loaded.virtual_batch_size is None and loaded.activation == "relu" and not loaded.training


@pytest.mark.parametrize("kw", [dict(virtual_batch_size=4), dict(renorm=True, renorm_clipping={"rmax": 2})])
def test_float16_is_the_float32_result_rounded(kw):
    x, dy, _, _ = data((10, 3, 4), np.float16, seed=11)
    half, single = cbn.BatchNorm1d(3, **kw), cbn.BatchNorm1d(3, **kw)
    y = half(x)
    dx = half.backward(dy)
    assert y.dtype == dx.dtype == np.float16
    np.testing.assert_array_equal(y, single(x.astype(np.float32)).astype(np.float16))
    np.testing.assert_array_equal(dx, single.backward(dy.astype(np.float32)).astype(np.float16))


@st.composite
def ghost_inputs(draw):
    ndim = draw(st.integers(2, 4))
    shape = (draw(st.integers(2, 12)),) + tuple(draw(st.lists(st.integers(1, 5), min_size=ndim - 1,
                                                               max_size=ndim - 1)))
    size = draw(st.integers(1, shape[0]))
    return shape, size, draw(st.sampled_from([np.float32, np.float64])), draw(st.integers(0, 2 ** 16))


@settings(max_examples=max(10, settings.default.max_examples // 2))
@given(case=ghost_inputs())
def test_property_random_shapes_and_group_sizes(case):
    """Any (N, C, *) shape and group size: against the per-group reference, or, when a group would hold a single
    value per channel, a ValueError with the layer unchanged."""
    shape, size, dtype, seed = case
    cls = {2: cbn.BatchNorm1d, 3: cbn.BatchNorm1d, 4: cbn.BatchNorm2d}[len(shape)]
    x, dy, weight, bias = data(shape, dtype, seed)
    bn = layer_with(cls, shape[1], dtype, weight, bias, virtual_batch_size=size)
    per_sample = int(np.prod(shape[2:]))
    last = shape[0] - size * ((shape[0] - 1) // size)
    note(f"last group {last} samples of {per_sample} values")
    if shape[0] > size and last * per_sample == 1:
        before = full_snapshot(bn)
        with pytest.raises(ValueError, match="last virtual batch"):
            bn(x)
        assert full_snapshot(bn) == before
        return
    y, dx = bn(x), bn.backward(dy)
    ref = ghost_reference(x, size, weight.astype(dtype), bias.astype(dtype), dy, (0.5, 2.0))
    # bounds relative to the terms, not the results: dx, dweight and dbias of a few values cancel
    g_dy, abs_dy, abs_dy_xhat = term_scales(x, dy, size, weight.astype(dtype))
    for what, got, want, floor in (("y", y, ref[0], 0.0), ("dx", dx, ref[1], g_dy),
                                   ("dweight", bn.grad_weight, ref[2], abs_dy_xhat),
                                   ("dbias", bn.grad_bias, ref[3], abs_dy),
                                   ("running_mean", bn.running_mean, ref[4], 0.0),
                                   ("running_var", bn.running_var, ref[5], 0.0)):
        assert_rel(got, want, BOUND[dtype], what, floor)


def term_scales(x, dy, size, weight, eps=1e-5):
    """max |gamma*invstd*dy| over the groups, and the largest channel's sum |dy| and sum |dy*xhat| (float64)."""
    x, dy = np.moveaxis(x.astype(np.float64), 1, -1), np.moveaxis(dy.astype(np.float64), 1, -1)
    g_dy, abs_dy, abs_dy_xhat = 0.0, 0.0, 0.0
    for start in range(0, x.shape[0], size):
        xg, dyg = x[start:start + size], dy[start:start + size]
        axes = tuple(range(xg.ndim - 1))
        var = xg.var(axis=axes)
        xhat = (xg - xg.mean(axis=axes)) / np.sqrt(var + eps)
        g_dy = max(g_dy, float(np.max(np.abs(weight / np.sqrt(var + eps) * dyg))))
        abs_dy += np.abs(dyg).sum(axis=axes)
        abs_dy_xhat += np.abs(dyg * xhat).sum(axis=axes)
    return g_dy, float(np.max(abs_dy)), float(np.max(abs_dy_xhat))
