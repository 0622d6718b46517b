"""cbn.precise_stats: the running statistics set to the exact statistics of all training batches seen in the block,
against the float64 statistics of the concatenated data; the normal outputs inside; state restored on exceptions."""
import pickle

import numpy as np
import pytest

import cbn

from bn_helpers import full_snapshot, snapshot, trained_layer

SIZES = (5, 2, 8, 3)  # batches of different sizes


def batches(shape, dtype, seed=0):
    """Batches of shape (n, *shape[1:]) for n in SIZES, with a large mean and channels of different scales."""
    rng = np.random.default_rng(seed)
    C = shape[1]
    scale = np.logspace(-2, 2, C).reshape((1, C) + (1,) * (len(shape) - 2))
    return [(rng.standard_normal((n,) + shape[1:]) * scale + 1e3).astype(dtype) for n in SIZES]


def population(xs, axis=1):
    """Float64 reference: the mean, unbiased variance and largest magnitude per channel of the concatenated
    batches."""
    data = np.concatenate([np.moveaxis(np.asarray(x, np.float64), axis, -1).reshape(-1, x.shape[axis]) for x in xs])
    return data.mean(axis=0), data.var(axis=0, ddof=1), np.abs(data).max(axis=0)


def check_population(layer, xs, dtype, axis=1, batches_seen=None):
    """The layer's running statistics are the population's, within one rounding to the dtype plus the float64
    error of centring values of magnitude max|x| (relative eps64*max|x|/std for the variance)."""
    mean, var, big = population(xs, axis)
    rounding = 2 * np.finfo(dtype).eps
    assert np.all(np.abs(layer.running_mean - mean) <= rounding * np.abs(mean) + 4 * np.finfo(np.float64).eps * big)
    centring = 8 * np.finfo(np.float64).eps * big / np.sqrt(var)
    assert np.all(np.abs(layer.running_var - var) <= (rounding + centring) * var)
    assert layer.num_batches_tracked == (len(xs) if batches_seen is None else batches_seen)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls, shape", [(cbn.BatchNorm1d, (4, 6)), (cbn.BatchNorm1d, (4, 3, 7)),
                                        (cbn.BatchNorm2d, (4, 5, 3, 4)), (cbn.BatchNorm3d, (4, 2, 3, 2, 2))])
def test_exact_population_statistics(cls, shape, dtype):
    bn = trained_layer(cls, shape[1], shape, dtype)
    plain = pickle.loads(pickle.dumps(bn))
    xs = batches(shape, dtype)
    with cbn.precise_stats(bn):
        for x in xs:
            before = snapshot(bn)
            y = bn(x)
            assert snapshot(bn) == before, "running statistics changed inside the block"
            expected = plain(x)  # the normal training output (its running update does not affect it)
            np.testing.assert_array_equal(y, expected)
            dy = np.random.default_rng(1).standard_normal(x.shape).astype(dtype)
            np.testing.assert_array_equal(bn.backward(dy), plain.backward(dy))
    check_population(bn, xs, dtype)
    # Back to normal: a training forward updates with the momentum.
    mean = bn.running_mean.astype(np.float64)
    bn(xs[0])
    assert bn.num_batches_tracked == len(xs) + 1
    batch_mean = np.moveaxis(xs[0], 1, -1).reshape(-1, shape[1]).mean(axis=0, dtype=np.float64)
    np.testing.assert_allclose(bn.running_mean, 0.9 * mean + 0.1 * batch_mean, rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_channels_last_and_axis_minus_one(dtype):
    shape = (4, 5, 3, 4)
    xs = batches(shape, dtype, seed=2)
    nchw, nhwc = cbn.BatchNorm2d(5, dtype=dtype), cbn.BatchNorm2d(5, dtype=dtype, axis=-1)
    with cbn.precise_stats([nchw, nhwc]):
        for x in xs:
            last = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
            nchw(last.transpose(0, 3, 1, 2))  # NCHW shape over NHWC memory
            nhwc(last)
    check_population(nchw, xs, dtype)
    check_population(nhwc, xs, dtype)


def test_nested_models_eval_frozen_and_untracked():
    shape = (3, 4, 5)
    xs = batches(shape, np.float32, seed=3)
    a, b, c = cbn.BatchNorm1d(4), cbn.BatchNorm1d(4), cbn.BatchNorm1d(4)
    ev = trained_layer(cbn.BatchNorm1d, 4, shape).eval()
    untracked = cbn.BatchNorm1d(4, track_running_stats=False)
    frozen = cbn.FrozenBatchNorm1d(4)

    class Block:
        def __init__(self):
            self.layers = {"a": a, "pair": (b, [c, a])}  # a shared layer is found once
            self.others = [ev, untracked, frozen]

    model = [Block(), (Block(),)]
    untouched = [snapshot(layer) for layer in (ev, untracked, frozen)]
    unused = snapshot(c)
    with cbn.precise_stats(model) as m:
        assert m is model
        for x in xs:
            b(a(x))
            a(x + 1)  # a sees every batch twice
            ev(x)
            untracked(x)
            frozen(x)
    check_population(a, xs + [x + 1 for x in xs], np.float32)
    check_population(b, _second_inputs(xs), np.float32)
    assert snapshot(c) == unused, "a layer that saw no batch keeps its state"
    assert [snapshot(layer) for layer in (ev, untracked, frozen)] == untouched


def _second_inputs(xs):
    """What ``b`` saw in test_nested_models_eval_frozen_and_untracked: a's normal training outputs."""
    layer = cbn.BatchNorm1d(4)
    return [layer(x) for x in xs]


def test_exception_restores_state_and_behaviour():
    shape = (4, 3, 5)
    bn = trained_layer(cbn.BatchNorm1d, 3, shape)
    before = full_snapshot(bn)
    xs = batches(shape, np.float32, seed=4)
    with pytest.raises(KeyError, match="stop"):
        with cbn.precise_stats(bn):
            bn(xs[0])
            bn(xs[1])
            raise KeyError("stop")
    after = full_snapshot(bn)
    assert {k: v for k, v in after.items() if k != "_saved"} == {k: v for k, v in before.items() if k != "_saved"}
    assert bn._population is None
    count = bn.num_batches_tracked
    bn(xs[2])  # normal behaviour again
    assert bn.num_batches_tracked == count + 1


def test_bad_input_inside_the_block_records_nothing():
    shape = (4, 3, 5)
    bn = cbn.BatchNorm1d(3)
    xs = batches(shape, np.float32, seed=5)
    with cbn.precise_stats(bn):
        bn(xs[0])
        with pytest.raises(ValueError, match="channels"):
            bn(np.ones((4, 2, 5), np.float32))
        bn(xs[1])
    check_population(bn, xs[:2], np.float32)


def test_nesting_is_refused_and_changes_nothing():
    bn, other = cbn.BatchNorm1d(3), cbn.BatchNorm1d(3)
    x = batches((4, 3, 5), np.float32)[0]
    with cbn.precise_stats(bn):
        with pytest.raises(RuntimeError, match="expected layers outside any precise_stats block, got BatchNorm1d"):
            with cbn.precise_stats([other, bn]):
                pass
        assert other._population is None
        bn(x)
    check_population(bn, [x], np.float32)


def test_no_batches_and_empty_batches():
    bn = trained_layer(cbn.BatchNorm1d, 3, (4, 3))
    before = snapshot(bn)
    with cbn.precise_stats(bn):
        pass
    assert snapshot(bn) == before
    with cbn.precise_stats(bn):
        bn(np.empty((0, 3), np.float32))
    assert snapshot(bn) == dict(before, num_batches_tracked=1)


def test_nan_guard_keeps_non_finite_channels():
    bn = trained_layer(cbn.BatchNorm1d, 3, (4, 3), nan_guard=True)
    x = np.random.default_rng(6).standard_normal((6, 3)).astype(np.float32)
    x[2, 1] = np.nan
    old = bn.running_mean.copy(), bn.running_var.copy()
    with cbn.precise_stats(bn):
        bn(x)
    mean, var, _ = population([x])
    assert bn.running_mean[1] == old[0][1] and bn.running_var[1] == old[1][1]
    np.testing.assert_allclose(bn.running_mean[[0, 2]], mean[[0, 2]], rtol=1e-6)
    np.testing.assert_allclose(bn.running_var[[0, 2]], var[[0, 2]], rtol=1e-6)


def test_pickle_inside_the_block_is_a_normal_layer():
    bn = cbn.BatchNorm1d(3)
    with cbn.precise_stats(bn):
        copy = pickle.loads(pickle.dumps(bn))
    assert copy._population is None
    copy(np.ones((4, 3), np.float32) + np.arange(4, dtype=np.float32)[:, None])
    assert copy.num_batches_tracked == 1
