"""cbn for PyTorch: batch norm modules and a functional form whose CPU float32/float64 work runs on cbn's kernels.

``import cbn.torch`` needs torch (``pip install cbn[torch]``); ``import cbn`` never imports it. Three custom ops of
the ``cbn`` namespace (``torch.library.custom_op``) call :mod:`cbn.functional` on NumPy views of the tensors' memory
(no copies, contiguous and ``channels_last`` alike; outputs keep the input's memory layout), on
``torch.get_num_threads()`` threads:

- ``torch.ops.cbn.batch_norm_train(x, weight, bias, running_mean, running_var, momentum, eps) -> (y, mean, invstd,
  new_running_mean, new_running_var)``: batch statistics; float64 ``mean`` and ``invstd`` for the backward, and the
  updated running statistics ((0,) tensors when not given), which :func:`batch_norm` copies into the buffers.
- ``torch.ops.cbn.batch_norm_eval(x, weight, bias, running_mean, running_var, eps) -> y``: running statistics.
- ``torch.ops.cbn.batch_norm_backward(grad_output, x, weight, mean, invstd, training) -> (dx, dweight, dbias)``.

The two forwards are differentiable (``register_autograd``) and have fake implementations, so autograd,
``torch.compile`` and ``torch.export`` see each batch norm as one opaque op. torch refuses a backward formula for a
custom op that mutates its inputs: the training op returns the new running statistics instead (the functional form
torch's own batch norm takes under ``torch.compile``). A double backward (``create_graph=True``) differentiates with
torch's ``native_batch_norm_backward``. Other inputs go to ``torch.nn.functional.batch_norm`` (see
:func:`batch_norm`).
"""
import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Optional, TypeVar, cast, overload

import torch

import cbn
from cbn import functional as _F
from cbn._typing import FloatArray

M = TypeVar("M", bound=torch.nn.Module)

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "batch_norm", "convert", "revert"]

_DTYPES = (torch.float32, torch.float64)


@overload
def _np(t: torch.Tensor) -> FloatArray: ...
@overload
def _np(t: torch.Tensor | None) -> FloatArray | None: ...
def _np(t: torch.Tensor | None) -> FloatArray | None:
    """The NumPy view of a CPU tensor's memory (None for None)."""
    return None if t is None else t.detach().numpy()


def _dense(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, out): x, or a copy of it when x's memory has gaps or overlaps, and an uninitialised tensor of its shape for
    an output, both laid out as ``torch.empty_like(x)`` (x's own layout when it is dense)."""
    out = torch.empty_like(x)
    return (x if out.stride() == x.stride() else torch.empty_like(out).copy_(x)), out


_MAX_THREADS = cbn.max_num_threads()


@contextlib.contextmanager
def _torch_threads() -> Iterator[None]:
    """Run the block with cbn's thread count in this thread set to torch's, ``torch.get_num_threads()`` (then
    restored), when they differ."""
    before, n = cbn.get_num_threads(), min(torch.get_num_threads(), _MAX_THREADS)
    if n == before:
        yield
        return
    cbn.set_num_threads(n)
    try:
        yield
    finally:
        cbn.set_num_threads(before)


def _channel_stat(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised (C,) float64 tensor for x's channels."""
    return x.new_empty((x.shape[1],), dtype=torch.float64)


@torch.library.custom_op("cbn::batch_norm_train", mutates_args=())
def _train(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
           running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], momentum: float,
           eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = _dense(x)
    stats = [None if t is None else t.clone() for t in (running_mean, running_var)]
    with _torch_threads():
        _, saved = _F.batch_norm(_np(x), _np(stats[0]), _np(stats[1]), _np(weight), _np(bias), True, momentum, eps,
                                 out=y.numpy(), return_saved=True)
    return (y, torch.from_numpy(saved.mean), torch.from_numpy(saved.invstd),  # type: ignore[return-value]
            *(x.new_empty((0,)) if t is None else t for t in stats))  # (the two running statistics)


@_train.register_fake
def _(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, running_mean: torch.Tensor | None,
      running_var: torch.Tensor | None, momentum: float, eps: float) -> tuple[torch.Tensor, ...]:
    return (torch.empty_like(x), _channel_stat(x), _channel_stat(x),
            *(x.new_empty((0,)) if t is None else torch.empty_like(t) for t in (running_mean, running_var)))


@torch.library.custom_op("cbn::batch_norm_eval", mutates_args=())
def _eval(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], running_mean: torch.Tensor,
          running_var: torch.Tensor, eps: float) -> torch.Tensor:
    x, y = _dense(x)
    with _torch_threads():
        _F.batch_norm(_np(x), _np(running_mean), _np(running_var), _np(weight), _np(bias), False, 0.0, eps,
                      out=y.numpy())
    return y


@_eval.register_fake
def _(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, running_mean: torch.Tensor,
      running_var: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("cbn::batch_norm_backward", mutates_args=())
def _backward(grad_output: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], mean: torch.Tensor,
              invstd: torch.Tensor, training: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, dx = _dense(x)
    xn = _np(x)
    order = tuple(sorted(range(xn.ndim), key=lambda d: -xn.strides[d]))  # x's axes in memory order
    mem = xn.transpose(order)
    k = order.index(1)
    x3 = mem.reshape(math.prod(mem.shape[:k]), xn.shape[1], math.prod(mem.shape[k + 1:]))
    saved = _F.BatchNormSaved(x3, _np(mean), _np(invstd), _np(weight), training, xn.shape, xn.dtype, 1, order)
    with _torch_threads():
        _, dweight, dbias = _F.batch_norm_backward(_np(grad_output), saved, out=dx.numpy())
    return dx, torch.from_numpy(dweight), torch.from_numpy(dbias)


@_backward.register_fake
def _(grad_output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
      invstd: torch.Tensor, training: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), x.new_empty((x.shape[1],)), x.new_empty((x.shape[1],))


def _gradients(ctx: Any, grad_output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
               running_mean: torch.Tensor | None, running_var: torch.Tensor | None, mean: torch.Tensor,
               invstd: torch.Tensor, training: bool) -> tuple[torch.Tensor | None, ...]:
    """The gradients of a forward op with respect to its inputs (x, weight, bias, then None for the rest): cbn's
    backward op, or torch's differentiable ``native_batch_norm_backward`` under ``create_graph=True``."""
    affine = weight is not None, ctx.has_bias
    if torch.is_grad_enabled():
        dx, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
            grad_output, x, weight, running_mean, running_var, mean.to(x.dtype), invstd.to(x.dtype), training,
            ctx.eps, [True, *affine])
    else:
        dx, dweight, dbias = torch.ops.cbn.batch_norm_backward(grad_output, x, weight, mean, invstd, training)
    return ((dx, dweight if affine[0] else None, dbias if affine[1] else None)  # type: ignore[no-any-return]
            + (None,) * (ctx.n_inputs - 3))  # (ctx's attributes are untyped)


def _setup_train(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    x, weight, bias, _, _, _, ctx.eps = inputs
    ctx.has_bias, ctx.n_inputs = bias is not None, len(inputs)
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _train_gradients(ctx: Any, grad_output: torch.Tensor | None, *_: Any) -> tuple[torch.Tensor | None, ...]:
    if grad_output is None:  # no gradient reached y (set_materialize_grads(False) leaves it None)
        return (None,) * ctx.n_inputs  # type: ignore[no-any-return]  # (ctx's attributes are untyped)
    x, weight, mean, invstd = ctx.saved_tensors
    return _gradients(ctx, grad_output, x, weight, None, None, mean, invstd, True)


def _setup_eval(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, weight, bias, running_mean, running_var, ctx.eps = inputs
    ctx.has_bias, ctx.n_inputs = bias is not None, len(inputs)
    ctx.save_for_backward(x, weight, running_mean, running_var)


def _eval_gradients(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    x, weight, running_mean, running_var = ctx.saved_tensors
    mean, invstd = running_mean.double(), torch.rsqrt(running_var.double() + ctx.eps)
    return _gradients(ctx, grad_output, x, weight, running_mean, running_var, mean, invstd, False)


_train.register_autograd(_train_gradients, setup_context=_setup_train)
_eval.register_autograd(_eval_gradients, setup_context=_setup_eval)


def _on_cbn(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
            weight: torch.Tensor | None, bias: torch.Tensor | None, training: bool, momentum: float,
            eps: float) -> bool:
    """True when cbn's ops compute this batch norm: a CPU float32/float64 input of at least 2 dimensions, (C,)
    parameters and contiguous statistics of its dtype and device, arguments torch accepts (eps > 0 in training,
    more than one value per channel) and 0 <= momentum <= 1."""
    if not (x.device.type == "cpu" and x.dtype in _DTYPES and x.dim() >= 2):
        return False
    C = x.shape[1]
    if not all(t is None or (t.device == x.device and t.dtype == x.dtype and t.shape == (C,) and t.is_contiguous())
               for t in (running_mean, running_var, weight, bias)):
        return False
    if training:
        return (running_mean is None) == (running_var is None) and eps > 0 and x.numel() != C and 0 <= momentum <= 1
    return running_mean is not None and running_var is not None and eps >= 0


def batch_norm(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """``torch.nn.functional.batch_norm`` on cbn's ops for CPU float32/float64 tensors, torch's own elsewhere.

    torch computes it for input on another device or of another dtype (float16, bfloat16), parameters or
    statistics of another dtype or device than the input, non-contiguous running statistics, momentum outside
    [0, 1], and the arguments torch rejects (it raises its error). Same parameters and result as torch's.
    """
    if not _on_cbn(input, running_mean, running_var, weight, bias, training, momentum, eps):
        return torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                                              eps)
    if training:
        y, _, _, new_mean, new_var = torch.ops.cbn.batch_norm_train(input, weight, bias, running_mean, running_var,
                                                                    momentum, eps)
        if running_mean is not None:
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)  # type: ignore[union-attr]  # (given with running_mean: _on_cbn)
        return cast(torch.Tensor, y)  # (torch.ops' operators are untyped)
    return cast(torch.Tensor, torch.ops.cbn.batch_norm_eval(input, weight, bias, running_mean, running_var, eps))


if TYPE_CHECKING:  # what the mixin is mixed into
    _Module = torch.nn.modules.batchnorm._BatchNorm
else:
    _Module = object


class _CbnForward(_Module):
    """``torch.nn.BatchNorm*d.forward`` with :func:`batch_norm` in place of ``torch.nn.functional.batch_norm``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)  # type: ignore[no-untyped-call]  # (torch leaves it unannotated)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        tracked = not self.training or self.track_running_stats
        return batch_norm(input, self.running_mean if tracked else None, self.running_var if tracked else None,
                          self.weight, self.bias,
                          self.training or (self.running_mean is None and self.running_var is None), factor, self.eps)


class BatchNorm1d(_CbnForward, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` computed by cbn on CPU float32/float64 input (see :func:`batch_norm`)."""


class BatchNorm2d(_CbnForward, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` computed by cbn on CPU float32/float64 input (see :func:`batch_norm`)."""


class BatchNorm3d(_CbnForward, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` computed by cbn on CPU float32/float64 input (see :func:`batch_norm`)."""


_TO_CBN: dict[type[torch.nn.Module], type[torch.nn.Module]] = {
    torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d, torch.nn.BatchNorm3d: BatchNorm3d}
_TO_TORCH: dict[type[torch.nn.Module], type[torch.nn.Module]] = {v: k for k, v in _TO_CBN.items()}


def _swap(module: torch.nn.Module, classes: Mapping[type[torch.nn.Module], type[torch.nn.Module]],
          done: dict[int, torch.nn.Module]) -> torch.nn.Module:
    """``module`` with each module whose exact type is a key of ``classes`` (itself or below) replaced by one of
    the mapped class holding the same attributes, parameters, buffers and hooks; ``done`` maps the ids of modules
    already swapped to their replacements (a module used twice stays one module)."""
    if id(module) in done:
        return done[id(module)]
    cls = classes.get(type(module))
    if cls is not None:
        new = cls.__new__(cls)
        new.__dict__.update({k: v.copy() if isinstance(v, dict) else v for k, v in vars(module).items()})
    else:
        new = module
        for name, child in module.named_children():
            swapped = _swap(child, classes, done)
            if swapped is not child:
                setattr(module, name, swapped)
    done[id(module)] = new
    return new


def convert(model: M) -> M:
    """Swap every ``torch.nn.BatchNorm1d/2d/3d`` of ``model`` for cbn's module of the same rank.

    The new modules hold the same parameters, buffers, hyperparameters, mode and hooks (the same tensors: an
    optimiser built before keeps working), so state_dicts are unchanged. Other batch norm classes (SyncBatchNorm,
    lazy modules before their first call, subclasses) are left as they are.

    Parameters
    ----------
    model : torch.nn.Module
        Changed in place (its children replaced), at any depth: ``Sequential``, ``ModuleList``, ``ModuleDict`` and
        attributes alike.

    Returns
    -------
    torch.nn.Module
        ``model``, or its replacement when it is itself a batch norm module.
    """
    return cast(M, _swap(model, _TO_CBN, {}))  # (each module swapped for a subclass of its class)


def revert(model: torch.nn.Module) -> torch.nn.Module:
    """Swap every cbn.torch ``BatchNorm1d/2d/3d`` of ``model`` back for torch's module (the inverse of
    :func:`convert`, same parameters and buffers); returns ``model`` or its replacement."""
    return _swap(model, _TO_TORCH, {})
