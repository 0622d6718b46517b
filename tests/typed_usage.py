"""cbn's public API used as its users use it, with the types it promises: ``mypy --strict`` checks this file
(``.ci/types``), so an annotation that stops saying what the code takes or returns fails there (each ``assert_type``
is exact). tests/test_types.py runs it too, so what it shows works; the SyncBatchNorm part only type-checks (it needs
MPI), the PyTorch part runs where torch is installed. Not a test module itself (pytest collects ``test_*.py``)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import TYPE_CHECKING, Any, Literal, assert_type

import numpy as np
import numpy.typing as npt

import cbn
from cbn import functional as F
from cbn import reference as R

if TYPE_CHECKING:
    from mpi4py.MPI import Intracomm

FloatArray = npt.NDArray[np.floating[Any]]
Layer = (cbn.BatchNorm1d | cbn.BatchNorm2d | cbn.BatchNorm3d | cbn.FrozenBatchNorm1d | cbn.FrozenBatchNorm2d
         | cbn.FrozenBatchNorm3d)


def data() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """An (N, C, H, W) float32 input and a gradient for it."""
    rng = np.random.default_rng(0)
    return rng.standard_normal((8, 4, 5, 5), np.float32), rng.standard_normal((8, 4, 5, 5), np.float32)


def layers() -> None:
    """A layer's forward and backward, its state, its settings."""
    x, dy = data()
    bn = cbn.BatchNorm2d(4, momentum=None, activation="relu", renorm=True, renorm_clipping={"rmax": 3.0})
    assert_type(bn.train(), cbn.BatchNorm2d)
    assert_type(bn(x), FloatArray)
    mask = np.ones((8, 5, 5), dtype=bool)
    assert_type(bn.forward(x, out=np.empty_like(x), residual=dy, mask=mask), FloatArray)
    assert_type(bn.backward(dy), FloatArray)
    assert_type(bn.grad_weight, FloatArray | None)
    assert_type(bn.grad_residual, FloatArray | None)
    assert_type(bn.running_var, FloatArray | None)
    assert_type(bn.num_batches_tracked, int)
    assert_type(bn.training, bool)
    assert_type(bn.eval(), cbn.BatchNorm2d)
    # the settings: num_features, affine, track_running_stats and dtype are read only
    assert_type(bn.num_features, int)
    assert_type(bn.dtype, np.dtype[Any])
    assert_type(bn.momentum, float | None)
    assert_type(bn.activation, Literal["relu"] | None)
    assert_type(bn.renorm_clipping, dict[str, float] | None)
    bn.eps, bn.momentum, bn.activation, bn.renorm_clipping, bn.renorm = 1e-3, 0.01, None, None, False
    state = bn.state_dict()
    assert_type(state, dict[str, npt.NDArray[Any]])
    other = cbn.BatchNorm2d(4, dtype=np.float64, axis=-1)
    other.load_state_dict({key: value.tolist() for key, value in state.items()}, strict=True)
    other.reset_parameters()
    assert_type(repr(other), str)


def functional() -> None:
    """The functional API: a forward that returns what its backward needs, and the data-parallel steps."""
    x, dy = data()
    mean, var = np.zeros(4, np.float32), np.ones(4, np.float32)
    assert_type(F.batch_norm(x, mean, var, training=True), FloatArray)
    y, saved = F.batch_norm(x, mean, var, training=True, return_saved=True)
    assert_type(saved, F.BatchNormSaved)
    _, ghost = F.batch_norm(x, mean, var, training=True, return_saved=True, virtual_batch_size=2)
    assert_type(ghost, F.BatchNormSaved | F.GhostSaved)
    dx, dweight, dbias = F.batch_norm_backward(dy, saved)
    assert_type(dx, FloatArray)
    count, batch_mean, M2 = F.batch_norm_stats(x, axis=1, dtype=np.float64)
    assert_type(count, int)
    sums, _, _ = F.batch_norm_grad_sums(dy, saved)
    y, saved = F.batch_norm_elemt(x, batch_mean, M2 / count, return_saved=True)
    assert_type(F.batch_norm_backward(dy, saved, grad_sums=sums, count=count), tuple[FloatArray, ...])


def inference() -> None:
    """Folding, freezing and exact population statistics."""
    x, _ = data()
    model = [cbn.BatchNorm2d(4), cbn.BatchNorm2d(4)]
    with cbn.precise_stats(model) as same:
        assert_type(same, list[cbn.BatchNorm2d])
        model[1](model[0](x))
    weight, bias = cbn.fold(model[0], np.ones((4, 3, 3, 3), np.float32), np.zeros(4, np.float32))
    assert_type(weight, FloatArray)
    frozen = cbn.freeze(model[0])
    assert_type(frozen, cbn.FrozenBatchNorm2d)
    assert_type(cbn.freeze(frozen), cbn.FrozenBatchNorm2d)
    assert_type(cbn.freeze(model), list[cbn.BatchNorm2d])  # a container: the same object, its layers frozen
    assert_type(cbn.FrozenBatchNorm1d(4, activation="relu").forward(np.ones((2, 4))), FloatArray)


def files(directory: str) -> None:
    """Saving a layer and loading it back."""
    path = os.path.join(directory, "bn.npz")
    cbn.BatchNorm3d(4, nan_guard=True).save(path)
    layer = cbn.load(path)
    assert_type(layer, Layer)
    assert isinstance(layer, cbn.BatchNorm3d) and layer.nan_guard


def threads() -> None:
    """The thread count of this thread's calls, and the build."""
    n = cbn.get_num_threads()
    assert_type(n, int)
    cbn.set_num_threads(min(cbn.max_num_threads(), cbn.available_cpus()))
    cbn.set_num_threads(n)
    with contextlib.redirect_stdout(None):
        cbn.show_config()
    assert_type(cbn.__version__, str)


def reference() -> None:
    """The float64 reference, with the functional API's signatures."""
    x, dy = data()
    y, saved = R.batch_norm(x, None, None, training=True, return_saved=True)
    assert_type(saved, R.Saved)
    assert_type(R.batch_norm_backward(dy, saved), tuple[FloatArray, ...])


def sync(comm: Intracomm) -> None:
    """SyncBatchNorm over an MPI communicator (type-checked only: running it needs MPI)."""
    x, dy = data()
    bn = cbn.SyncBatchNorm2d(4, comm=comm)
    bn.comm = comm
    assert_type(bn(x), FloatArray)
    assert_type(cbn.convert_sync_batchnorm(cbn.BatchNorm2d(4), comm), cbn.BatchNorm2d)
    assert_type(cbn.revert_sync_batchnorm(bn), cbn.BatchNorm2d)


def torch_adapter() -> None:
    """cbn.torch's modules in a PyTorch model (needs torch)."""
    import torch

    import cbn.torch

    model = cbn.torch.convert(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)))
    assert_type(model, torch.nn.Sequential)
    y = cbn.torch.batch_norm(torch.ones(2, 4), None, None, training=True)
    assert_type(y, torch.Tensor)
    assert_type(cbn.torch.revert(model), torch.nn.Module)


def main() -> None:
    """Run every part that needs neither MPI nor torch."""
    layers()
    functional()
    inference()
    with tempfile.TemporaryDirectory() as directory:
        files(directory)
    threads()
    reference()


if __name__ == "__main__":
    main()
