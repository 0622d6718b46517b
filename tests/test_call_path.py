"""The layers' planned call path: a repeated call whose input fits the last forward's plan skips the input checks.
It must give the bits of the checked path and reject, with the checked path's errors, whatever the plan does not
cover (another layout or dtype, bad or overlapping outputs), with the layer's state unchanged."""
import numpy as np
import pytest

import cbn
import cbn.functional as F


def _state(layer):
    return [np.copy(a) for a in (layer.running_mean, layer.running_var)] + [layer.num_batches_tracked]


@pytest.mark.parametrize("relu", [None, "relu"])
@pytest.mark.parametrize("layout", ["NCHW", "channels-last"])
def test_repeated_calls_equal_the_functional_api(relu, layout):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 3, 5, 6)) * 2 + 7).astype(np.float32)
    if layout == "channels-last":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    bn = cbn.BatchNorm2d(3, activation=relu)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    out, dx_out = np.empty_like(x), np.empty_like(x)
    for step in range(3):  # the first call plans, the next ones reuse the plan (with and without out=)
        y = bn(x) if step != 2 else bn(x, out=out)
        dx = bn.backward(dy) if step != 2 else bn.backward(dy, out=dx_out)
        y_ref, saved = F.batch_norm(x, rm, rv, bn.weight, bn.bias, True, activation=relu, return_saved=True)
        dx_ref, dw, db = F.batch_norm_backward(dy, saved)
        assert y.tobytes() == y_ref.tobytes() and y.strides == y_ref.strides
        assert dx.tobytes() == dx_ref.tobytes() and dx.strides == dx_ref.strides
        assert bn.grad_weight.tobytes() == dw.tobytes() and bn.grad_bias.tobytes() == db.tobytes()
        assert bn.running_mean.tobytes() == rm.tobytes() and bn.running_var.tobytes() == rv.tobytes()
    bn.eval()
    ye = bn(x)
    ye_ref = F.batch_norm(x, rm, rv, bn.weight, bn.bias, False, activation=relu)
    assert ye.tobytes() == ye_ref.tobytes() and bn.num_batches_tracked == 3


def test_planned_calls_reject_what_the_plan_does_not_cover():
    x = np.random.default_rng(1).standard_normal((4, 3, 5, 6)).astype(np.float32)
    bn = cbn.BatchNorm2d(3)
    bn(x)
    bn.backward(x)
    before = _state(bn)
    bad_outputs = {
        "out must not share memory": x,  # the input itself
        "out must have shape": np.empty((4, 3, 5, 6), np.float64),
        "out must be a writeable": np.empty_like(x),
    }
    bad_outputs["out must be a writeable"].flags.writeable = False
    for message, out in bad_outputs.items():
        with pytest.raises(ValueError, match=message):
            bn(x, out=out)
        assert all(np.array_equal(a, b) for a, b in zip(_state(bn), before))
    view = np.empty((8, 3, 5, 6), np.float32)
    with pytest.raises(ValueError, match="out must not share memory"):
        bn(view[:4], out=view[:4])  # an out that owns no memory takes the checks
    dy = x.copy()
    with pytest.raises(ValueError, match="out must not share memory"):
        bn.backward(dy, out=dy)
    with pytest.raises(ValueError, match="expected input with 3 channels"):
        bn(np.ones((4, 2, 5, 6), np.float32))
    assert all(np.array_equal(a, b) for a, b in zip(_state(bn), before))
    y = bn(x.astype(np.float64))  # another dtype: the checked path, converted
    assert y.dtype == np.float32


def test_a_view_of_the_running_statistics_is_checked():
    bn = cbn.BatchNorm1d(4)
    x = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    bn(x)
    bad = np.lib.stride_tricks.as_strided(bn.running_mean, shape=(3, 4), strides=x.strides)
    with pytest.raises(ValueError, match="share memory"):
        bn(bad)


def _functional_args(layout, dtype):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((4, 3, 5, 6)) * 2 + 7).astype(dtype)
    if layout == "channels-last":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    weight, bias = rng.random(3).astype(dtype) + 0.5, rng.standard_normal(3).astype(dtype)
    return x, weight, bias


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["NCHW", "channels-last"])
def test_repeated_functional_calls_reuse_the_plan(layout, dtype, monkeypatch):
    """cbn.functional.batch_norm remembers the plan of a plain call's input: a repeated call with that signature
    skips the input checks (input_array runs once) and gives the checked call's bits, in training (with and
    without running statistics) and in eval, with or without an ``out`` laid out as the input (a view of another
    array's memory too, as NumPy views of torch tensors are)."""
    x, weight, bias = _functional_args(layout, dtype)
    F._PLANS.clear()
    checked = []
    monkeypatch.setattr(F.V, "input_array", lambda *a, _f=F.V.input_array: checked.append(1) or _f(*a))
    results = []
    for _ in range(2):
        stats = [np.zeros(3, dtype), np.ones(3, dtype)]
        out = np.zeros(x.size + 8, dtype)[8:].reshape(x.shape) if layout == "NCHW" else np.zeros_like(x)
        results.append([*F.batch_norm(x, *stats, weight, bias, True, return_saved=True), stats[0].copy(),
                        stats[1].copy(), F.batch_norm(x, None, None, weight, bias, True),
                        F.batch_norm(x, *stats, weight, bias, False),
                        F.batch_norm(x, None, None, weight, bias, True, out=out), out])
    assert len(checked) == 1
    assert results[1][-1].tobytes() == results[1][-2].tobytes() == results[1][4].tobytes()
    c_order = np.zeros(x.shape, dtype)  # (channels-last input: another layout than the plan's, the full checks)
    assert F.batch_norm(x, None, None, weight, bias, True, out=c_order) is c_order
    assert c_order.tobytes() == results[1][4].tobytes()
    first, second = results
    saved = first.pop(1), second.pop(1)
    assert saved[0].mean.tobytes() == saved[1].mean.tobytes() and saved[0].order == saved[1].order
    for a, b in zip(first, second):
        assert a.tobytes() == b.tobytes() and a.strides == b.strides
    F._PLANS.clear()


def test_functional_calls_with_a_known_plan_keep_the_checks():
    """Arguments that a remembered plan does not cover take the full checks: their errors, no state changed; a
    weight of another dtype is converted there, as on a first call."""
    x, weight, bias = _functional_args("NCHW", np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    F.batch_norm(x, rm, rv, weight, bias, True)  # remembers x's plan
    before = [rm.copy(), rv.copy()]
    frozen = rv.copy()
    frozen.flags.writeable = False
    buffer = np.zeros(x.size + 3, np.float32)
    inside = buffer[:x.size].reshape(x.shape)
    inside[...] = x
    for message, args in {
        "weight must have shape": (x, rm, rv, weight[:2], bias, True),
        "running_var must be a writeable": (x, rm, frozen, weight, bias, True),
        "momentum must be a number": (x, rm, rv, weight, bias, True, 1.5),
        "eps must be a finite number": (x, rm, rv, weight, bias, True, 0.1, -1.0),
        "running_mean and running_var are required": (x, None, None, weight, bias, False),
    }.items():
        with pytest.raises((ValueError, TypeError), match=message):
            F.batch_norm(*args)
        assert all(np.array_equal(a, b) for a, b in zip((rm, rv), before)), message
    F.batch_norm(inside, rm, rv, weight, bias, True)  # remembers the view's plan
    kept = buffer.copy()
    with pytest.raises(ValueError, match="running_mean must not share memory"):
        F.batch_norm(inside, buffer[:3], rv, weight, bias, True)  # a running mean inside the input
    assert np.array_equal(buffer, kept)
    before = [rm.copy(), rv.copy()]
    other = np.zeros(x.size + 3, np.float32)  # an out whose last values are the weight's memory
    read_only = np.empty_like(x)
    read_only.flags.writeable = False
    for message, out, w in [
        ("out must have shape", np.empty((2, 3), np.float32), weight),
        ("out must be a writeable", read_only, weight),
        ("out must not share memory with another argument, got memory shared with input", inside, weight),
        ("out must not share memory with another argument, got memory shared with weight",
         other[:x.size].reshape(x.shape), other[x.size - 3:x.size]),
    ]:
        with pytest.raises(ValueError, match=message):
            F.batch_norm(inside, rm, rv, w, bias, True, out=out)
        assert np.array_equal(buffer, kept) and all(np.array_equal(a, b) for a, b in zip((rm, rv), before)), message
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        F.batch_norm(np.ones((1, 3), np.float32), None, None, None, None, True)
    one = np.ones((1, 3), np.float32)
    F.batch_norm(one, rm, rv, None, None, False)  # remembers (1, 3) in eval
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        F.batch_norm(one, None, None, None, None, True)
    want = F.batch_norm(x, rm.copy(), rv.copy(), weight.astype(np.float64), bias, True)
    assert want.tobytes() == F.batch_norm(x, rm.copy(), rv.copy(), weight, bias, True).tobytes()
