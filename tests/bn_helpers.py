"""Shared helpers for the cbn test suite: a reference layer, state snapshots and honest error bounds."""
import contextlib
import os

import numpy as np
import pytest

import cbn
from cbn import reference as R

EPS64 = np.finfo(np.float64).eps

# Layouts the kernels can be forced into (a kind, a block size in values, and whether outputs go out through
# non-temporal stores, in chunks of at most a block; None: chosen by shape). Small blocks cut even tiny inputs into
# many blocks, and a forced layout runs them on two threads: the property tests reach the channel-major and
# channel-minor paths, their block merges, their parallel loops and the stream stores.
FORCED_LAYOUTS = [None, ("major", 1), ("major", 23), ("minor", 1), ("minor", 40), ("major", 23, True),
                  ("minor", 40, True)]


@contextlib.contextmanager
def forced_layout(layout):
    """Run the block with the kernels forced into ``layout`` (an entry of FORCED_LAYOUTS) on 2 threads."""
    if layout is None:
        yield
        return
    from cbn._dispatch import kernels
    threads = cbn.get_num_threads()
    kernels.force_layout(*layout)
    cbn.set_num_threads(2)
    try:
        yield
    finally:
        kernels.force_layout(None)
        cbn.set_num_threads(threads)


@contextlib.contextmanager
def vendor_rules(amd):
    """Run the block under the kernels' rules for AMD's CPUs (True) or for the others (False), whatever the CPU."""
    from cbn._dispatch import kernels
    kernels.vendor_rules(amd)
    try:
        yield
    finally:
        kernels.vendor_rules(None)


def require_torch():
    """The torch module, or skip the calling test when it is not installed (a failure when CBN_EXPECT_TORCH=1: CI
    installed it)."""
    if os.environ.get("CBN_EXPECT_TORCH") == "1":
        import torch
        return torch
    return pytest.importorskip("torch")


CLASSES = {2: cbn.BatchNorm1d, 3: cbn.BatchNorm1d, 4: cbn.BatchNorm2d, 5: cbn.BatchNorm3d}


def placed(shape, offset, keep, dtype=np.float32):
    """An array of ``shape`` and ``dtype`` whose data starts ``offset`` bytes past a 4 KB boundary (its buffer
    appended to ``keep``)."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = np.empty(size + 8192, np.uint8)
    keep.append(buf)
    start = (-buf.ctypes.data) % 4096 + offset
    return buf[start:start + size].view(dtype).reshape(shape)


def layer_class(ndim):
    """The cbn layer class that accepts ``ndim``-dimensional input."""
    return CLASSES[ndim]


class RefLayer:
    """torch.nn.BatchNorm semantics on top of ``cbn.reference``, every state in float64.

    momentum None => factor 1/num_batches_tracked; track_running_stats=False => batch statistics in both modes;
    eval with running statistics uses them.
    """

    def __init__(self, C, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, weight=None, bias=None):
        self.C, self.eps, self.momentum = C, eps, momentum
        self.affine, self.track = affine, track_running_stats
        self.weight = (np.ones(C) if weight is None else np.asarray(weight, np.float64)) if affine else None
        self.bias = (np.zeros(C) if bias is None else np.asarray(bias, np.float64)) if affine else None
        self.running_mean = np.zeros(C) if track_running_stats else None
        self.running_var = np.ones(C) if track_running_stats else None
        self.num_batches_tracked = 0
        self.training = True
        self.saved = None

    def forward(self, x):
        x = np.asarray(x, dtype=np.float64)
        if self.training and self.track:
            self.num_batches_tracked += 1
            f = 1.0 / self.num_batches_tracked if self.momentum is None else self.momentum
            y, self.saved = R.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, f,
                                         self.eps, return_saved=True)
        elif self.training or not self.track:
            y, self.saved = R.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps,
                                         return_saved=True)
        else:
            y, self.saved = R.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                                         self.eps, return_saved=True)
        return y

    def backward(self, dy):
        return R.batch_norm_backward(np.asarray(dy, dtype=np.float64), self.saved)


def snapshot(layer):
    """Bytes of every array of the layer's state, plus the counter and the dtypes (for byte-for-byte checks)."""
    snap = {"num_batches_tracked": layer.num_batches_tracked}
    for key in ("weight", "bias", "running_mean", "running_var"):
        a = getattr(layer, key)
        snap[key] = None if a is None else (a.dtype.str, a.shape, a.tobytes())
    return snap


def full_snapshot(layer):
    """snapshot() plus the mode, the gradients and the saved forward (identity and bytes of every field)."""
    snap = dict(snapshot(layer), training=layer.training)
    for key in ("grad_weight", "grad_bias"):
        a = getattr(layer, key)
        snap[key] = None if a is None else (id(a), a.tobytes())
    saved = layer._saved
    if saved is not None:
        saved = (id(saved),) + tuple((id(v), v.dtype.str, v.shape, v.tobytes()) if isinstance(v, np.ndarray) else v
                                     for v in saved)
    snap["_saved"] = saved
    return snap


def trained_layer(cls, C, shape, dtype=np.float32, seed=0, steps=2, **kw):
    """A layer with non-default weight, bias, running stats and counter."""
    rng = np.random.default_rng(seed)
    layer = cls(C, dtype=dtype, **kw)
    if layer.affine:
        layer.weight[...] = rng.uniform(0.5, 1.5, C)
        layer.bias[...] = rng.uniform(-0.5, 0.5, C)
    for _ in range(steps):
        layer(rng.standard_normal(shape).astype(dtype) * 2 + 0.5)
    return layer


def max_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def assert_rel(actual, desired, rel, what="", floor=0.0):
    """max|actual - desired| <= rel * max(max|desired|, floor), NaNs in the same places."""
    actual = np.asarray(actual)
    desired = np.asarray(desired)
    assert actual.shape == desired.shape, f"{what}: shape {actual.shape} != {desired.shape}"
    scale = max(float(np.max(np.abs(desired))) if desired.size else 0.0, floor)
    np.testing.assert_allclose(actual.astype(np.float64), desired, rtol=0, atol=rel * scale + 1e-300,
                               err_msg=what)


# -- honest error bounds -----------------------------------------------------------------------------------------
# The kernels accumulate in double and round once to the data type; float32 results carry a few ulps of their
# own magnitude and of the magnitudes of the terms that were added. The mean in double is exact to about
# eps64*max|x|; an error delta in x - mean changes x_hat by delta*invstd and invstd by up to delta*invstd*|x_hat|.
# The bounds below are per channel and built from the float64 reference quantities.

def _per_channel_max(a):
    return np.max(np.abs(a), axis=(0, 2)) if a.size else np.zeros(a.shape[1])


def _tiny(dtype):
    """Absolute floor for results in or near the subnormal range: a few subnormal spacings (a subnormal
    coefficient such as gamma*invstd has only a few bits, so the floor is scaled by what it multiplies)."""
    return 8 * float(np.finfo(dtype).smallest_subnormal)


def forward_tolerance(x, mean, invstd, weight, bias, y_ref, dtype):
    """Per-channel bound on |y - y_ref| for the forward of ``dtype``: x (N, C, S) float64, the rest from the ref."""
    C = x.shape[1]
    eps = np.finfo(dtype).eps
    w = np.ones(C) if weight is None else np.asarray(weight, np.float64)
    b = np.zeros(C) if bias is None else np.asarray(bias, np.float64)
    xhat = (x - mean[:, None]) * invstd[:, None]
    g = np.abs(w * invstd)
    delta = 32 * EPS64 * _per_channel_max(x)  # error of x - mean computed in double (cbn and the reference)
    xh = _per_channel_max(xhat)
    return (4 * eps * (np.abs(w) * xh + np.abs(b) + _per_channel_max(y_ref))
            + 2 * g * delta * (1 + xh ** 2) + _tiny(dtype) * (1 + g) * (1 + _per_channel_max(x - mean[:, None])))


def backward_tolerance(x, dy, mean, invstd, weight, use_batch_stats, ref, dtype):
    """Per-channel bounds (dx, dweight, dbias) for the backward of ``dtype``; ref = reference (dx, dw, db)."""
    N, C, S = x.shape
    m = N * S
    eps = np.finfo(dtype).eps
    w = np.ones(C) if weight is None else np.asarray(weight, np.float64)
    dx_ref, dw_ref, db_ref = (np.asarray(r, np.float64) for r in ref)
    dx_ref = dx_ref.reshape(N, C, S)
    xhat = (x - mean[:, None]) * invstd[:, None]
    xh = _per_channel_max(xhat)
    g = np.abs(w * invstd)
    delta = 32 * EPS64 * _per_channel_max(x)
    rel_inv = delta * invstd * xh if use_batch_stats else np.zeros(C)  # relative error of a batch invstd
    sum_dy = np.sum(np.abs(dy), axis=(0, 2))
    sum_dyxh = np.sum(np.abs(dy * xhat), axis=(0, 2))
    # double-precision errors of the two sums (naive summation bound), then one rounding to dtype
    e_db = m * EPS64 * sum_dy
    # (the last term: products dy*(x - mean) that fall into double's subnormal range round to a multiple of
    # 2**-1074 before the sum is scaled by invstd)
    e_dw = (m * EPS64 * sum_dyxh + 2 * sum_dy * delta * invstd * (1 + xh ** 2) + np.abs(dw_ref) * rel_inv
            + m * float(np.finfo(np.float64).smallest_subnormal) * invstd)
    tol_db = 2 * eps * np.abs(db_ref) + e_db
    tol_dw = 2 * eps * np.abs(dw_ref) + e_dw
    gdy = _per_channel_max(dy) * g
    if use_batch_stats:
        terms = gdy + g * xh * np.abs(dw_ref) / m + g * np.abs(db_ref) / m + _per_channel_max(dx_ref)
        tol_dx = (4 * eps * terms + g * (e_db + xh * e_dw) / m + g * np.abs(dw_ref) / m * delta * invstd
                  + 4 * rel_inv * terms)
    else:
        tol_dx = 4 * eps * (gdy + _per_channel_max(dx_ref))
    floor = (_tiny(dtype) * (1 + g + g * invstd) * (1 + _per_channel_max(dy))
             * (1 + _per_channel_max(x - mean[:, None])))
    return tol_dx + floor, tol_dw + floor, tol_db + floor


def assert_per_channel(actual, desired, tol, what):
    """|actual - desired| <= tol[c] for every element of channel c (actual, desired of shape (N, C, ...))."""
    actual = np.asarray(actual, np.float64)
    desired = np.asarray(desired, np.float64)
    assert actual.shape == desired.shape, f"{what}: shape {actual.shape} != {desired.shape}"
    if actual.ndim == 1:
        err = np.abs(actual - desired)
        bound = tol
    else:
        N, C = actual.shape[:2]
        err = np.abs(actual - desired).reshape(N, C, -1)
        bound = np.broadcast_to(np.asarray(tol)[None, :, None], err.shape)
    bad = ~(err <= bound)
    if np.any(bad):
        idx = np.argwhere(bad)[0]
        raise AssertionError(f"{what}: error {err[tuple(idx)]:.3e} > bound {bound[tuple(idx)]:.3e} at {tuple(idx)} "
                             f"(worst ratio {np.nanmax(err / np.maximum(bound, 1e-300)):.3g})")
