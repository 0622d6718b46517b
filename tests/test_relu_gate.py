"""The backward of a forward with a fused ReLU (and no residual) recomputes where the ReLU let a value through from x
and the forward's scale and shift (``saved.gate``) instead of reading the saved output: it must give the bits of the
backward that reads the output (``saved._replace(gate=None)``), in every kernel layout, dtype and training mode,
with masks, ghost batches and renorm, and on inputs whose pre-activation is exactly 0, tiny, huge, infinite or NaN.
(A float32 training dx runs in float32 from the gate, unless the input's rows hold 2 to 31 values or its channels
fewer than 32, and in double from the saved output: there dweight and dbias keep the bits and dx agrees within the
contract, 1e-6 of its largest magnitude; a value the two gated differently would move dx by its whole
gamma*invstd*dy, and dweight and dbias.)"""
import numpy as np
import pytest

from cbn import functional as F

from bn_helpers import FORCED_LAYOUTS, forced_layout

SHAPES = [(6, 3, 5, 4), (32, 8), (4, 5, 33), (2, 16, 40, 40), (5, 7), (128, 3, 5, 4)]


def _data(shape, dtype, seed):
    """x with values on both sides of each channel's mean, repeated values at it, and extremes; dy."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 3 + 100.0
    x.flat[::7] = 100.0  # many values at the mean's neighbourhood: pre-activations near 0
    x.flat[::11] = x.flat[0]
    return x.astype(dtype), rng.standard_normal(shape).astype(dtype)


def _both(dy, saved):
    """(dx, dweight, dbias) from the gate and from the saved output."""
    assert saved.gate is not None
    return F.batch_norm_backward(dy, saved), F.batch_norm_backward(dy, saved._replace(gate=None))


def _same(a, b, single=False):
    """(dx, dweight, dbias) bitwise equal; with single (a float32 training dx, in float32 from the gate) dx within
    1e-6 of b's largest magnitude."""
    if single:
        assert np.max(np.abs(a[0] - b[0])) <= 1e-6 * np.max(np.abs(b[0]))
        a, b = a[1:], b[1:]
    for u, v in zip(a, b):
        assert u.tobytes() == v.tobytes()


def _single(shape, dtype, training):
    """Whether the gated backward of this input computes its dx in float32 (see the module's docstring)."""
    return dtype == np.float32 and training and not 1 < int(np.prod(shape[2:])) < 32


@pytest.mark.parametrize("layout", FORCED_LAYOUTS, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gate_gives_the_bits_of_the_saved_output(shape, dtype, training, layout):
    x, dy = _data(shape, dtype, 0)
    C = shape[1]
    rng = np.random.default_rng(1)
    weight, bias = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    rm, rv = np.full(C, 100.0, dtype), np.full(C, 9.0, dtype)
    with forced_layout(layout):
        y, saved = F.batch_norm(x, rm, rv, weight, bias, training, activation="relu", return_saved=True)
        assert 0 < np.count_nonzero(y) < y.size
        _same(*_both(dy, saved), _single(shape, dtype, training))
        _, saved = F.batch_norm(x, rm, rv, None, None, training, activation="relu", return_saved=True)
        _same(*_both(dy, saved), _single(shape, dtype, training))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gate_with_extreme_values(dtype):
    big = np.finfo(dtype).max / 4
    x = np.array([[0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, big, -big, 1e-30, -1e-30, 2.0, 0.5]] * 3,
                 dtype).T.copy()  # (12, 3): channel-minor
    dy = np.linspace(-1, 1, x.size).reshape(x.shape).astype(dtype)
    rm, rv = np.array([0.0, 1.0, 1e-30], dtype), np.array([1.0, 4.0, 1e-6], dtype)
    for xs in (x, np.ascontiguousarray(x.T)[None].transpose(0, 2, 1)[0].copy()):
        for training in (True, False):
            for weight in (None, np.array([0.0, -1.0, 0.0], dtype), np.array([-2.0, 0.0, np.inf], dtype)):
                _, saved = F.batch_norm(xs, rm, rv, weight, np.array([0.0, -0.5, 0.25], dtype), training,
                                        activation="relu", return_saved=True)
                got, want = _both(dy, saved)
                for u, v in zip(got, want):
                    np.testing.assert_array_equal(u, v)  # NaN where the other has NaN


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(16, 2), (1, 2, 16)], ids=["minor", "major"])
def test_gate_keeps_the_low_part_of_the_mean(shape, dtype):
    """Per channel 4 values 1 and 12 values 1 + ulp: the mean 1 + 0.75 ulp rounds to 1 + ulp, so the forward's
    pre-activation of 1 + ulp is positive only through the mean's low part (hi - lo split in float32)."""
    one_up = np.nextafter(dtype(1), dtype(2))
    x = np.full(16, one_up, dtype)
    x[:4] = 1
    x = np.stack([x, x], axis=-1) if shape == (16, 2) else np.stack([x, x])[None]
    dy = np.linspace(-1, 1, x.size).reshape(x.shape).astype(dtype)
    y, saved = F.batch_norm(x, None, None, None, None, True, activation="relu", return_saved=True)
    if dtype == np.float32:
        assert np.array_equal(y > 0, x == one_up)
    _same(*_both(dy, saved), _single(x.shape, dtype, True))


def test_gate_with_masks_ghost_batches_and_renorm():
    x, dy = _data((16, 4, 3, 5), np.float32, 2)
    mask = np.random.default_rng(3).random((16, 3, 5)) < 0.7
    rm, rv = np.full(4, 99.0, np.float32), np.full(4, 8.0, np.float32)
    _, saved = F.batch_norm(x, rm.copy(), rv.copy(), None, None, True, activation="relu", mask=mask,
                            return_saved=True)
    _same(*_both(dy, saved))
    _, saved = F.batch_norm(x, rm.copy(), rv.copy(), None, None, True, activation="relu", renorm=True,
                            renorm_clipping={"rmax": 1.5, "dmax": 0.5}, return_saved=True)
    _same(*_both(dy, saved))
    _, ghost = F.batch_norm(x, rm.copy(), rv.copy(), None, None, True, activation="relu", virtual_batch_size=4,
                            return_saved=True)
    got = F.batch_norm_backward(dy, ghost)
    want = F.batch_norm_backward(dy, ghost._replace(parts=tuple(p._replace(gate=None) for p in ghost.parts)))
    _same(got, want)


def test_a_residual_keeps_reading_the_output():
    x, dy = _data((4, 3, 5, 6), np.float32, 4)
    z = np.ones_like(x)
    _, saved = F.batch_norm(x, None, None, None, None, True, activation="relu", residual=z, return_saved=True)
    assert saved.gate is None and saved.y is not None


def test_a_gate_after_a_residual_is_refused():
    x, dy = _data((4, 3, 5, 6), np.float32, 5)
    _, saved = F.batch_norm(x, None, None, None, None, True, activation="relu", return_saved=True)
    with pytest.raises(ValueError, match="saved.gate must be None, or without a residual"):
        F.batch_norm_backward(dy, saved._replace(residual=True))
    with pytest.raises(ValueError, match=r"saved.gate must be .* shape \(2, 3\)"):
        F.batch_norm_backward(dy, saved._replace(gate=np.zeros((3, 2))))
