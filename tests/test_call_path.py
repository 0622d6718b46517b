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
