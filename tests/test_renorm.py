"""Batch renormalization (renorm, renorm_clipping): against Algorithm 1 of Ioffe 2017 in float64 written here, torch
autograd of the same formula with r and d constant, layouts, eval, files and bad input."""
import json
import pickle

import numpy as np
import pytest
from hypothesis import given, note, settings
from hypothesis import strategies as st

import cbn
from cbn import functional as F

from bn_helpers import assert_rel, full_snapshot, require_torch

# relative to the largest output (docs/development/kernels.md, "The contract")
BOUND = {np.float32: 1e-6, np.float64: 1e-13}
CLIPPINGS = [None, {"rmax": 1.5, "dmax": 0.2}, {"rmax": 1.0, "dmax": 0.0}, {"dmax": 0.5}]


def algorithm1(x, running_mean, running_var, weight, bias, clipping, dy, momentum=0.1, eps=1e-5, axis=1):
    """Ioffe 2017, Algorithm 1, in float64, with r and d held constant for the gradient: returns (y, dx, dweight,
    dbias, running_mean, running_var)."""
    clipping = clipping or {}
    rmax, dmax = clipping.get("rmax", np.inf), clipping.get("dmax", np.inf)
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    dy = np.moveaxis(np.asarray(dy, np.float64), axis, -1)
    axes = tuple(range(x.ndim - 1))
    m = x.size // x.shape[-1]
    mu_b, var_b = x.mean(axis=axes), x.var(axis=axes)
    sigma_b, sigma = np.sqrt(var_b + eps), np.sqrt(np.asarray(running_var, np.float64) + eps)
    r = np.clip(sigma_b / sigma, 1 / rmax, rmax)
    d = np.clip((mu_b - running_mean) / sigma, -dmax, dmax)
    xhat = (x - mu_b) / sigma_b
    y = weight * (xhat * r + d) + bias
    # Gradient with r, d constant: y = (weight*r)*xhat + const, xhat the batch-normalised x.
    g = dy * weight * r
    dx = (g - g.mean(axis=axes) - xhat * (g * xhat).mean(axis=axes)) / sigma_b
    dweight = (dy * (xhat * r + d)).sum(axis=axes)
    dbias = dy.sum(axis=axes)
    new_mean = (1 - momentum) * running_mean + momentum * mu_b
    new_var = (1 - momentum) * running_var + momentum * var_b * m / (m - 1)
    return np.moveaxis(y, -1, axis), np.moveaxis(dx, -1, axis), dweight, dbias, new_mean, new_var


def data(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    C = shape[1]
    per_channel = (1, C) + (1,) * (len(shape) - 2)
    x = rng.standard_normal(shape) * rng.uniform(0.3, 3, C).reshape(per_channel) + rng.uniform(-2, 2, C).reshape(
        per_channel)
    return x.astype(dtype), rng.standard_normal(shape).astype(dtype), rng.uniform(0.5, 1.5, C), rng.uniform(-1, 1, C)


def make(cls, C, dtype, weight, bias, clipping, **kw):
    bn = cls(C, dtype=dtype, renorm=True, renorm_clipping=clipping, **kw)
    bn.weight[...], bn.bias[...] = weight, bias
    bn.running_mean[...] = np.linspace(-0.5, 0.5, C)
    bn.running_var[...] = np.linspace(0.5, 2.0, C)
    return bn


def steps(bn, xs, dys, weight, bias, clipping, dtype, axis=1, layout=lambda a: a):
    """Several training steps of ``bn`` against Algorithm 1, each from the layer's running statistics; returns the
    worst relative error of each quantity."""
    w, b = weight.astype(dtype).astype(np.float64), bias.astype(dtype).astype(np.float64)
    worst = {}
    for x, dy in zip(xs, dys):
        ref = algorithm1(x, bn.running_mean.astype(np.float64), bn.running_var.astype(np.float64), w, b, clipping,
                         dy, axis=axis)
        y = bn(layout(x))
        dx = bn.backward(layout(dy))
        for what, got, want in zip(("y", "dx", "dweight", "dbias", "running_mean", "running_var"),
                                   (y, dx, bn.grad_weight, bn.grad_bias, bn.running_mean, bn.running_var), ref):
            assert_rel(got, want, BOUND[dtype], what)
            worst[what] = max(worst.get(what, 0.0), float(np.max(np.abs(got - want)) / np.max(np.abs(want))))
    return worst


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("cls, shape", [(cbn.BatchNorm1d, (8, 4)), (cbn.BatchNorm1d, (5, 3, 6)),
                                        (cbn.BatchNorm2d, (4, 3, 5, 4)), (cbn.BatchNorm3d, (3, 2, 3, 2, 4))])
def test_against_algorithm_1(cls, shape, clipping, dtype):
    x, dy, weight, bias = data(shape, dtype)
    xs = [x, x * 3 + 1, x * 0.2 - 2]  # moves the batch statistics away from the running ones: r and d clip
    bn = make(cls, shape[1], dtype, weight, bias, clipping)
    steps(bn, xs, [dy] * 3, weight, bias, clipping, dtype)
    assert bn.num_batches_tracked == 3


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_channels_last_axis_minus_one_and_functional(dtype):
    x, dy, weight, bias = data((5, 3, 4, 4), dtype, seed=1)
    clipping = {"rmax": 2.0, "dmax": 1.0}

    def nhwc_memory(a):
        return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)

    steps(make(cbn.BatchNorm2d, 3, dtype, weight, bias, clipping), [x, 2 * x], [dy] * 2, weight, bias, clipping,
          dtype, layout=nhwc_memory)
    xl, dyl = (np.ascontiguousarray(a.transpose(0, 2, 3, 1)) for a in (x, dy))
    steps(make(cbn.BatchNorm2d, 3, dtype, weight, bias, clipping, axis=-1), [xl, 2 * xl], [dyl] * 2, weight, bias,
          clipping, dtype, axis=3)
    rm, rv = np.linspace(-0.5, 0.5, 3).astype(dtype), np.linspace(0.5, 2.0, 3).astype(dtype)
    ref = algorithm1(x, rm.astype(np.float64), rv.astype(np.float64), weight.astype(dtype), bias.astype(dtype),
                     clipping, dy)
    y, saved = F.batch_norm(x, rm, rv, weight.astype(dtype), bias.astype(dtype), True, return_saved=True,
                            renorm=True, renorm_clipping=clipping)
    dx, dweight, dbias = F.batch_norm_backward(dy, saved)
    for what, got, want in zip(("y", "dx", "dweight", "dbias", "running_mean", "running_var"),
                               (y, dx, dweight, dbias, rm, rv), ref):
        assert_rel(got, want, BOUND[dtype], what)
    sums, dweight2, _ = F.batch_norm_grad_sums(dy, saved)
    np.testing.assert_array_equal(dweight2, dweight)


def test_eval_unchanged_and_no_clipping_normalises_with_running_statistics():
    x, dy, weight, bias = data((6, 3, 5), np.float64, seed=2)
    bn = make(cbn.BatchNorm1d, 3, np.float64, weight, bias, None)
    plain = cbn.BatchNorm1d(3, dtype=np.float64)
    plain.load_state_dict(bn.state_dict())
    bn.eval(), plain.eval()
    np.testing.assert_array_equal(bn(x), plain(x))
    np.testing.assert_array_equal(bn.backward(dy), plain.backward(dy))
    # Unclipped, the forward is the eval transform (r, d undo the batch statistics), the gradient is not.
    y_train = bn.train()(x)
    assert_rel(y_train, plain(x), 1e-14, "unclipped training forward = eval forward")


def test_precise_stats_keeps_the_renorm_outputs():
    """Inside precise_stats a renorm layer gives the normal renorm outputs (with its running statistics, which stay
    as they were) and records the population."""
    x, _, weight, bias = data((6, 3, 5), np.float64, seed=3)
    bn = make(cbn.BatchNorm1d, 3, np.float64, weight, bias, {"rmax": 1.2})
    with cbn.precise_stats(bn):
        for batch in (x, x + 1):
            np.testing.assert_array_equal(bn(batch), pickle.loads(pickle.dumps(bn))(batch))  # a copy is normal
    assert_rel(bn.running_mean, np.concatenate([x, x + 1]).mean(axis=(0, 2)), 1e-14, "population mean")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fused", [False, True])
def test_gradient_equals_torch_autograd_with_constant_r_and_d(dtype, fused):
    torch = require_torch()
    x, dy, weight, bias = data((6, 3, 5), dtype, seed=4)
    z = np.random.default_rng(5).standard_normal(x.shape).astype(dtype) if fused else None
    clipping = {"rmax": 1.3, "dmax": 0.3}
    bn = make(cbn.BatchNorm1d, 3, dtype, weight, bias, clipping, activation="relu" if fused else None)
    mu, var = (torch.tensor(a.astype(np.float64)).reshape(1, 3, 1) for a in (bn.running_mean, bn.running_var))
    y = bn(x * 2 + 1, residual=z)
    dx = bn.backward(dy)
    tx = torch.tensor(x.astype(np.float64) * 2 + 1, requires_grad=True)
    tw, tb = (torch.tensor(a.astype(dtype).astype(np.float64), requires_grad=True) for a in (weight, bias))
    mu_b = tx.mean(dim=(0, 2), keepdim=True)
    sigma_b = torch.sqrt(tx.var(dim=(0, 2), unbiased=False, keepdim=True) + 1e-5)
    with torch.no_grad():
        sigma = torch.sqrt(var + 1e-5)
        r = torch.clamp(sigma_b / sigma, 1 / 1.3, 1.3)
        d = torch.clamp((mu_b - mu) / sigma, -0.3, 0.3)
    ty = tw.reshape(1, 3, 1) * ((tx - mu_b) / sigma_b * r + d) + tb.reshape(1, 3, 1)
    if fused:
        ty = torch.relu(ty + torch.tensor(z.astype(np.float64)))
    ty.backward(torch.tensor(dy.astype(np.float64)))
    for what, got, want in (("y", y, ty.detach()), ("dx", dx, tx.grad), ("dweight", bn.grad_weight, tw.grad),
                            ("dbias", bn.grad_bias, tb.grad)):
        assert_rel(got, want.numpy(), BOUND[dtype], what)
    assert float(r.min()) < 1 / 1.3 + 1e-12 or float(r.max()) > 1.3 - 1e-12  # the clipping is active


# -- configuration and bad input ---------------------------------------------------------------------------------

def test_repr_pickle_save_load(tmp_path):
    bn = cbn.BatchNorm2d(3, renorm=True, renorm_clipping={"rmax": 3, "dmax": 5})
    assert repr(bn).endswith("renorm=True, renorm_clipping={'rmax': 3.0, 'dmax': 5.0})")
    assert repr(cbn.BatchNorm2d(3, renorm=True)).endswith("track_running_stats=True, renorm=True)")
    copy = pickle.loads(pickle.dumps(bn))
    assert copy.renorm and copy.renorm_clipping == {"rmax": 3.0, "dmax": 5.0}
    bn.save(tmp_path / "bn.npz")
    loaded = cbn.load(tmp_path / "bn.npz")
    assert loaded.renorm and loaded.renorm_clipping == {"rmax": 3.0, "dmax": 5.0}
    half = cbn.BatchNorm2d(3, renorm=True, renorm_clipping={"rmax": 2})
    half.save(tmp_path / "half.npz")
    assert cbn.load(tmp_path / "half.npz").renorm_clipping == {"rmax": 2.0, "dmax": np.inf}
    state = cbn.BatchNorm2d(3).__getstate__()
    for key in ("renorm", "renorm_clipping"):  # a pickle of an earlier cbn
        del state[key]
    old = cbn.BatchNorm2d.__new__(cbn.BatchNorm2d)
    old.__setstate__(state)
    assert old.renorm is False and old.renorm_clipping is None
    config = {"format": "cbn.batchnorm", "version": 4, "class": "BatchNorm2d", "training": True,
              **dict(bn._config(), renorm_clipping={"rmax": 0.5})}
    np.savez(tmp_path / "bad.npz", __config__=np.array(json.dumps(config)), **bn.state_dict())
    with pytest.raises(ValueError, match=r"renorm_clipping\['rmax'\] must be a number >= 1, got 0\.5"):
        cbn.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("kw, exc, pattern", [
    (dict(renorm="yes"), TypeError, r"renorm must be True or False, got 'yes'"),
    (dict(renorm=True, renorm_clipping=[3, 5]), TypeError, r"renorm_clipping must be None or a dict .* got list"),
    (dict(renorm=True, renorm_clipping={"rmin": 0.5}), ValueError, r"keys must be among 'rmax' and 'dmax', got 'rmin'"),
    (dict(renorm=True, renorm_clipping={"rmax": 0.5}), ValueError, r"\['rmax'\] must be a number >= 1, got 0\.5"),
    (dict(renorm=True, renorm_clipping={"rmax": float("nan")}), ValueError, r"\['rmax'\] must be .* got nan"),
    (dict(renorm=True, renorm_clipping={"rmax": "3"}), ValueError, r"\['rmax'\] must be a number >= 1, got '3'"),
    (dict(renorm=True, renorm_clipping={"dmax": -1}), ValueError, r"\['dmax'\] must be a number >= 0, got -1"),
    (dict(renorm_clipping={"rmax": 3}), ValueError, r"only with renorm=True: expected None .* got \{'rmax': 3\}"),
    (dict(renorm=True, virtual_batch_size=4), ValueError, r"expected virtual_batch_size=None with renorm=True, got 4"),
    (dict(renorm=True, track_running_stats=False), ValueError,
     r"expected track_running_stats=True with renorm=True, got track_running_stats=False"),
])
def test_bad_options(kw, exc, pattern):
    with pytest.raises(exc, match=pattern):
        cbn.BatchNorm1d(3, **kw)
    functional = {k: v for k, v in kw.items() if k != "track_running_stats"}
    if "track_running_stats" in kw:
        functional["running_mean"] = functional["running_var"] = None
        pattern = r"renorm needs the running statistics: expected running_mean and running_var arrays when " \
                  r"training, got NoneType and NoneType"
    args = dict(running_mean=np.zeros(3, np.float32), running_var=np.ones(3, np.float32))
    args.update(functional)
    before = [None if a is None else a.copy() for a in (args["running_mean"], args["running_var"])]
    with pytest.raises(exc, match=pattern):
        F.batch_norm(np.ones((4, 3), np.float32) * np.arange(4, dtype=np.float32)[:, None], training=True, **args)
    for a, b in zip((args["running_mean"], args["running_var"]), before):
        assert a is None or np.array_equal(a, b)


def test_layer_state_unchanged_on_bad_input():
    x, dy, weight, bias = data((6, 3, 5), np.float32, seed=6)
    bn = make(cbn.BatchNorm1d, 3, np.float32, weight, bias, {"rmax": 2.0})
    bn(x)
    bn.backward(dy)
    before = full_snapshot(bn)
    with pytest.raises(ValueError, match=r"expected input with 3 channels at axis 1, got 2"):
        bn(x[:, :2])
    with pytest.raises(ValueError, match=r"residual must have shape"):
        bn(x, residual=x[:3])
    assert full_snapshot(bn) == before


def test_saved_renorm_is_checked():
    x, dy, _, _ = data((6, 3), np.float64, seed=7)
    _, saved = F.batch_norm(x, np.zeros(3), np.ones(3), training=True, return_saved=True, renorm=True)
    with pytest.raises(ValueError, match=r"saved\.renorm must be None or an aligned C-contiguous float64 array of "
                                         r"shape \(2, 3\), got float64 array of shape \(3,\)"):
        F.batch_norm_backward(dy, saved._replace(renorm=np.zeros(3)))


@st.composite
def renorm_inputs(draw):
    ndim = draw(st.integers(2, 4))
    shape = (draw(st.integers(2, 10)),) + tuple(draw(st.lists(st.integers(1, 5), min_size=ndim - 1,
                                                               max_size=ndim - 1)))
    clipping = draw(st.one_of(st.none(), st.fixed_dictionaries(
        {}, optional={"rmax": st.floats(1.0, 3.0), "dmax": st.floats(0.0, 2.0)})))
    return shape, clipping, draw(st.sampled_from([np.float32, np.float64])), draw(st.integers(0, 2 ** 16))


@settings(max_examples=max(10, settings.default.max_examples // 2))
@given(case=renorm_inputs())
def test_property_random_shapes_and_clippings(case):
    """Any (N, C, *) shape and clipping: one step against Algorithm 1, the gradients bounded relative to their terms
    (sums of a few values cancel)."""
    shape, clipping, dtype, seed = case
    note(f"clipping {clipping}")
    cls = {2: cbn.BatchNorm1d, 3: cbn.BatchNorm1d, 4: cbn.BatchNorm2d}[len(shape)]
    x, dy, weight, bias = data(shape, dtype, seed)
    bn = make(cls, shape[1], dtype, weight, bias, clipping)
    w, b = weight.astype(dtype).astype(np.float64), bias.astype(dtype).astype(np.float64)
    running = bn.running_mean.astype(np.float64), bn.running_var.astype(np.float64)
    ref = algorithm1(x, *running, w, b, clipping, dy)
    y, dx = bn(x), bn.backward(dy)
    # the terms: |weight*r/sigma_B*dy| for dx, sum |dy*(xhat*r + d)| for dweight, sum |dy| for dbias
    x64, dy64 = np.moveaxis(x.astype(np.float64), 1, -1), np.moveaxis(dy.astype(np.float64), 1, -1)
    axes = tuple(range(x64.ndim - 1))
    sigma_b = np.sqrt(x64.var(axis=axes) + 1e-5)
    clip = clipping or {}
    r = np.clip(sigma_b / np.sqrt(running[1] + 1e-5), 1 / clip.get("rmax", np.inf), clip.get("rmax", np.inf))
    d = np.clip((x64.mean(axis=axes) - running[0]) / np.sqrt(running[1] + 1e-5), -clip.get("dmax", np.inf),
                clip.get("dmax", np.inf))
    xhat = (x64 - x64.mean(axis=axes)) / sigma_b
    floors = (0.0, float(np.max(np.abs(w * r / sigma_b * dy64))), float(np.max(np.abs(dy64 * (xhat * r + d)).sum(
        axis=axes))), float(np.max(np.abs(dy64).sum(axis=axes))), 0.0, 0.0)
    for what, got, want, floor in zip(("y", "dx", "dweight", "dbias", "running_mean", "running_var"),
                                      (y, dx, bn.grad_weight, bn.grad_bias, bn.running_mean, bn.running_var), ref,
                                      floors):
        assert_rel(got, want, BOUND[dtype], what, floor)
