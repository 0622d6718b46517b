"""Parity with torch.nn.BatchNorm1d/2d/3d (skipped when torch is not installed, failed when CBN_EXPECT_TORCH=1)."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import cbn

if os.environ.get("CBN_EXPECT_TORCH") == "1":
    import torch  # CI installed it: a missing torch is a failure, not a skip
else:
    torch = pytest.importorskip("torch")

TORCH_CLASSES = {cbn.BatchNorm1d: torch.nn.BatchNorm1d, cbn.BatchNorm2d: torch.nn.BatchNorm2d,
                 cbn.BatchNorm3d: torch.nn.BatchNorm3d}
TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}
# torch's float32 kernel computes x*alpha + beta with alpha, beta rounded to float32 and accumulates its own way:
# compare to it at float32 noise level; float64 tightly.
TOL = {np.float32: dict(y=2e-5, stat=2e-6, grad=1e-4), np.float64: dict(y=1e-11, stat=1e-12, grad=1e-10)}

CASES = [
    (cbn.BatchNorm1d, (32, 6)),
    (cbn.BatchNorm1d, (8, 6, 21)),
    (cbn.BatchNorm2d, (8, 6, 12, 10)),
    (cbn.BatchNorm3d, (4, 6, 5, 6, 7)),
]
IDS = ["1d-NC", "1d-NCL", "2d", "3d"]


@pytest.fixture(autouse=True)
def _torch_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def close(a, t, rel, what):
    t = t.detach().numpy()
    scale = max(float(np.max(np.abs(t))), 1.0) if t.size else 1.0
    np.testing.assert_allclose(np.asarray(a, np.float64), t.astype(np.float64), rtol=0, atol=rel * scale,
                               err_msg=what)


def make_pair(cls, C, dtype, rng, **kw):
    tbn = TORCH_CLASSES[cls](C, dtype=TORCH_DTYPE[dtype], **kw)
    bn = cls(C, dtype=dtype, **kw)
    if bn.affine:
        w = rng.uniform(0.5, 1.5, C).astype(dtype)
        b = rng.uniform(-0.5, 0.5, C).astype(dtype)
        with torch.no_grad():
            tbn.weight.copy_(torch.from_numpy(w))
            tbn.bias.copy_(torch.from_numpy(b))
        bn.weight[...] = w
        bn.bias[...] = b
    return bn, tbn


def step(bn, tbn, x, dy, dtype, what):
    """One forward + backward on both; compare outputs and gradients."""
    tol = TOL[dtype]
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    tbn.zero_grad()
    ty = tbn(tx)
    ty.backward(torch.from_numpy(dy))
    y = bn(x)
    dx = bn.backward(dy)
    assert y.dtype == np.dtype(dtype) and dx.dtype == np.dtype(dtype)
    close(y, ty, tol["y"], what + " y")
    close(dx, tx.grad, tol["grad"], what + " dx")
    if bn.affine:
        close(bn.grad_weight, tbn.weight.grad, tol["grad"], what + " grad_weight")
        close(bn.grad_bias, tbn.bias.grad, tol["grad"], what + " grad_bias")


def compare_stats(bn, tbn, dtype, what):
    if tbn.running_mean is None:
        assert bn.running_mean is None and bn.running_var is None
        return
    assert bn.num_batches_tracked == int(tbn.num_batches_tracked), what
    close(bn.running_mean, tbn.running_mean, TOL[dtype]["stat"], what + " running_mean")
    close(bn.running_var, tbn.running_var, TOL[dtype]["stat"], what + " running_var")


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,shape", CASES, ids=IDS)
def test_training_and_eval_parity(cls, shape, dtype, momentum):
    rng = np.random.default_rng(5)
    C = shape[1]
    bn, tbn = make_pair(cls, C, dtype, rng, momentum=momentum)
    for i in range(4):
        x = (rng.standard_normal(shape) * rng.uniform(0.5, 3) + rng.uniform(-2, 2)).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        step(bn, tbn, x, dy, dtype, f"train step {i}")
        compare_stats(bn, tbn, dtype, f"train step {i}")
    bn.eval()
    tbn.eval()
    for i in range(2):
        x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        step(bn, tbn, x, dy, dtype, f"eval step {i}")
        compare_stats(bn, tbn, dtype, f"eval step {i}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,shape", [(cbn.BatchNorm2d, (8, 6, 12, 10)), (cbn.BatchNorm3d, (4, 6, 5, 6, 7))],
                         ids=["channels_last", "channels_last_3d"])
def test_channels_last_parity(cls, shape, dtype, training):
    """An (N, C, *) view of channels-last memory against torch's channels_last BatchNorm: values, running
    statistics, gradients, and the strides of y and dx (torch keeps the memory format; so does cbn)."""
    rng = np.random.default_rng(7)
    C = shape[1]
    last = (0,) + tuple(range(2, len(shape))) + (1,)
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    bn, tbn = make_pair(cls, C, dtype, rng)
    bn.train(training)
    tbn.train(training)
    for i in range(3):
        x = np.ascontiguousarray((rng.standard_normal(shape) * 2 + 1).astype(dtype).transpose(last))
        dy = np.ascontiguousarray(rng.standard_normal(shape).astype(dtype).transpose(last))
        x, dy = x.transpose(np.argsort(last)), dy.transpose(np.argsort(last))
        tx = torch.from_numpy(x).requires_grad_(True)
        assert tx.is_contiguous(memory_format=fmt)
        tbn.zero_grad()
        ty = tbn(tx)
        ty.backward(torch.from_numpy(dy))
        y = bn(x)
        dx = bn.backward(dy)
        assert ty.is_contiguous(memory_format=fmt) and tx.grad.is_contiguous(memory_format=fmt)
        itemsize = np.dtype(dtype).itemsize
        assert y.strides == tuple(st * itemsize for st in ty.stride())
        assert dx.strides == tuple(st * itemsize for st in tx.grad.stride())
        close(y, ty, TOL[dtype]["y"], f"step {i} y")
        close(dx, tx.grad, TOL[dtype]["grad"], f"step {i} dx")
        close(bn.grad_weight, tbn.weight.grad, TOL[dtype]["grad"], f"step {i} grad_weight")
        close(bn.grad_bias, tbn.bias.grad, TOL[dtype]["grad"], f"step {i} grad_bias")
        compare_stats(bn, tbn, dtype, f"step {i}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,shape", CASES, ids=IDS)
def test_track_running_stats_false(cls, shape, dtype):
    rng = np.random.default_rng(6)
    bn, tbn = make_pair(cls, shape[1], dtype, rng, track_running_stats=False)
    assert set(bn.state_dict()) == set(tbn.state_dict()) == {"weight", "bias"}
    for mode in (True, False):
        bn.train(mode)
        tbn.train(mode)
        x = (rng.standard_normal(shape) + 1).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        step(bn, tbn, x, dy, dtype, f"training={mode}")
        assert bn.running_mean is None and bn.num_batches_tracked == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_affine_false_parity(dtype):
    rng = np.random.default_rng(11)
    bn, tbn = make_pair(cbn.BatchNorm2d, 3, dtype, rng, affine=False)
    for mode in (True, True, False):
        bn.train(mode)
        tbn.train(mode)
        x = rng.standard_normal((4, 3, 5, 5)).astype(dtype)
        step(bn, tbn, x, rng.standard_normal(x.shape).astype(dtype), dtype, f"training={mode}")
        compare_stats(bn, tbn, dtype, f"training={mode}")
    assert bn.grad_weight is None and bn.grad_bias is None


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,shape", CASES, ids=IDS)
def test_load_torch_state_dict(cls, shape, dtype, momentum):
    rng = np.random.default_rng(12)
    C = shape[1]
    tbn = TORCH_CLASSES[cls](C, momentum=momentum, dtype=TORCH_DTYPE[dtype])
    with torch.no_grad():
        tbn.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, C)))
        tbn.bias.copy_(torch.from_numpy(rng.uniform(-1, 1, C)))
        for _ in range(3):
            tbn(torch.from_numpy((rng.standard_normal(shape) * 3 + 2).astype(dtype)))
    tbn.eval()
    sd = {k: v.numpy() for k, v in tbn.state_dict().items()}
    bn = cls(C, momentum=momentum, dtype=dtype)
    assert set(bn.state_dict()) == set(sd)
    bn.load_state_dict(sd)
    bn.eval()
    assert bn.num_batches_tracked == 3
    for k in ("weight", "bias", "running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(bn, k), sd[k])
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    with torch.no_grad():
        ty = tbn(torch.from_numpy(x))
    close(bn(x), ty, TOL[dtype]["y"], "eval after load_state_dict")
    # and the state dict round-trips back into torch
    tbn2 = TORCH_CLASSES[cls](C, momentum=momentum, dtype=TORCH_DTYPE[dtype])
    tbn2.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in bn.state_dict().items()})
    for k, v in tbn.state_dict().items():
        assert torch.equal(v, tbn2.state_dict()[k]), k


def test_state_dict_keys_match_torch():
    for affine in (True, False):
        for track in (True, False):
            bn = cbn.BatchNorm2d(4, affine=affine, track_running_stats=track)
            tbn = torch.nn.BatchNorm2d(4, affine=affine, track_running_stats=track)
            assert list(bn.state_dict()) == list(tbn.state_dict()), (affine, track)


def test_one_value_per_channel_message_matches_torch():
    with pytest.raises(ValueError) as t_err:
        torch.nn.BatchNorm1d(3)(torch.zeros(1, 3))
    with pytest.raises(ValueError) as c_err:
        cbn.BatchNorm1d(3)(np.zeros((1, 3), np.float32))
    prefix = "Expected more than 1 value per channel when training"
    assert str(t_err.value).startswith(prefix) and str(c_err.value).startswith(prefix)


@pytest.mark.parametrize("kwargs", [{}, dict(eps=1e-3, momentum=None, affine=False, track_running_stats=False)])
def test_repr_matches_torch(kwargs):
    assert repr(cbn.BatchNorm2d(16, **kwargs)) == repr(torch.nn.BatchNorm2d(16, **kwargs))


SIDE_BY_SIDE = textwrap.dedent("""
    import json, sys
    if sys.argv[1] == "torch-first":
        import torch, cbn
    else:
        import cbn, torch
    import numpy as np
    from threadpoolctl import threadpool_info
    from cbn import reference as R

    torch.set_num_threads(2)
    cbn.set_num_threads(2)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((16, 8, 48, 48)) * 2 + 3).astype(np.float32)  # large enough for parallel kernels
    dy = rng.standard_normal(x.shape).astype(np.float32)
    errs = []
    for _ in range(3):  # interleave parallel regions of both runtimes
        tx = torch.from_numpy(x).requires_grad_(True)
        ty = torch.nn.functional.batch_norm(tx, None, None, training=True)
        ty.backward(torch.from_numpy(dy))
        bn = cbn.BatchNorm2d(8, affine=False, track_running_stats=False)
        y, dx = bn(x), bn.backward(dy)
        ry = R.batch_norm(x.astype(np.float64), None, None, training=True)
        errs.append([float(np.max(np.abs(y - ry))), float(np.max(np.abs(ty.detach().numpy() - ry))),
                     float(np.max(np.abs(dx - tx.grad.numpy())))])
    libs = [i["filepath"] for i in threadpool_info() if i["user_api"] == "openmp"]
    print(json.dumps({"errs": errs, "openmp": libs, "cbn": cbn.__file__}))
""")


@pytest.mark.parametrize("order", ["torch-first", "cbn-first"])
def test_side_by_side_with_torch_openmp(tmp_path, order):
    """torch and cbn in one process, both multi-threaded: no crash, both right; a wheel brings its own runtime."""
    pytest.importorskip("threadpoolctl")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(cbn.__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", SIDE_BY_SIDE, order], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, f"exit {res.returncode}: {res.stderr[-2000:]}"
    out = json.loads(res.stdout.splitlines()[-1])
    for err_cbn, err_torch, dx_diff in out["errs"]:
        assert err_cbn < 2e-5 and err_torch < 1e-4 and dx_diff < 1e-4, out["errs"]
    if cbn._openmp_enabled():
        assert out["openmp"], "threadpoolctl sees no OpenMP runtime"
    if os.environ.get("CBN_EXPECT_VENDORED_OPENMP") == "1":
        assert len(set(out["openmp"])) >= 2, f"want cbn's vendored and torch's OpenMP runtimes, got {out['openmp']}"

