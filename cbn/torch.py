"""cbn for PyTorch: batch norm modules and a functional form whose CPU float32/float64 work runs on cbn's kernels.

``import cbn.torch`` needs torch (``pip install cbn[torch]``); ``import cbn`` never imports it. Three custom ops of
the ``cbn`` namespace (defined with ``torch.library.Library``: a CPU kernel and a fake one each) call
:mod:`cbn.functional` on NumPy views of the tensors' memory (no copies, contiguous and ``channels_last`` alike;
outputs keep the input's strides), on ``torch.get_num_threads()`` threads:

- ``torch.ops.cbn.batch_norm_train(x, weight, bias, running_mean, running_var, momentum, eps) -> (y, mean, invstd,
  new_running_mean, new_running_var)``: batch statistics; float64 ``mean`` and ``invstd`` for the backward, and the
  updated running statistics ((0,) tensors when not given), which :func:`batch_norm` copies into the buffers.
- ``torch.ops.cbn.batch_norm_eval(x, weight, bias, running_mean, running_var, eps) -> y``: running statistics.
- ``torch.ops.cbn.batch_norm_backward(grad_output, x, weight, mean, invstd, training) -> (dx, dweight, dbias)``.

The two forwards have an Autograd kernel (what ``torch.library.register_autograd`` registers, with less work per
call), so ``torch.compile`` and ``torch.export`` see each batch norm as one opaque op. torch's custom-op autograd
rules out ops that mutate their inputs: the training op returns the new running statistics instead (the functional
form torch's own batch norm takes under ``torch.compile``). An eager call on plain tensors skips the op dispatch: an
autograd.Function calls :mod:`cbn.functional` directly, updates the running statistics in place and saves what the
ops' autograd saves, as torch's saved tensors (the profiler sees it under the ops' names); without saved-tensor
hooks, its first backward also reuses the forward's :class:`cbn.functional.BatchNormSaved`. A double backward
(``create_graph=True``) differentiates with torch's ``native_batch_norm_backward``. Other inputs go to
``torch.nn.functional.batch_norm`` (see :func:`batch_norm`).
"""
import functools
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

import torch

import cbn
from cbn import functional as _F
from cbn._typing import FloatArray

M = TypeVar("M", bound=torch.nn.Module)
T = TypeVar("T")

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "batch_norm", "convert", "revert"]

_DTYPES = (torch.float32, torch.float64)
_MAX_THREADS = cbn.max_num_threads()
# the ops' definitions and kernels, as long as this module lives (torch.library leaves Library unannotated)
_LIB = torch.library.Library("cbn", "DEF")  # type: ignore[no-untyped-call]


@overload
def _np(t: torch.Tensor) -> FloatArray: ...
@overload
def _np(t: torch.Tensor | None) -> FloatArray | None: ...
def _np(t: torch.Tensor | None) -> FloatArray | None:
    """The NumPy view of a CPU tensor's memory (None for None); through ``.data`` when it requires grad (which,
    unlike ``detach()`` or ``numpy(force=True)``, dispatches no op: nothing for the profiler to record)."""
    return None if t is None else (t.data if t.requires_grad else t).numpy()


# The NumPy views of per-channel tensors (weights, biases, running statistics: the same tensors call after call) by
# id: (the tensor, its data_ptr, dtype and shape when viewed, the view). An entry serves while its tensor has that
# memory, dtype and shape (and, holding the tensor, keeps its id from being reused); at most _MAX_VIEWS of them, the
# oldest dropped all at once.
_VIEWS: dict[int, tuple[torch.Tensor, int, torch.dtype, torch.Size, FloatArray]] = {}
_MAX_VIEWS = 256


def _channel_np(t: torch.Tensor | None) -> FloatArray | None:
    """:func:`_np` of a per-channel tensor, through the views kept in _VIEWS."""
    if t is None:
        return None
    kept = _VIEWS.get(id(t))
    if kept is not None and kept[1] == t.data_ptr() and kept[2] is t.dtype and kept[3] == t.shape:
        return kept[4]
    view = _np(t)
    if t.is_leaf:  # (not a tensor computed anew at each call, by a parametrization say: it would only fill _VIEWS)
        if len(_VIEWS) >= _MAX_VIEWS:
            _VIEWS.clear()
        _VIEWS[id(t)] = (t, t.data_ptr(), t.dtype, t.shape, view)
    return view


def _dense(x: torch.Tensor) -> bool:
    """Whether x's memory has no gaps or overlaps (some order of its axes makes it C-contiguous)."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return True
    size = 1
    for stride, n in sorted(zip(x.stride(), x.shape)):
        if n != 1:
            if stride != size:
                return False
            size *= n
    return True


def _layout(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x, out) for a kernel call: x, or a copy of it laid out as ``torch.empty_like(x)`` when its memory has gaps or
    overlaps, and the output tensor: None when cbn.functional's output, laid out as x, has x's strides (see
    :func:`_result`), else (for dimensions of size 1, whose strides torch keeps and NumPy sets) torch.empty_like(x)."""
    if not _dense(x):
        x = torch.empty_like(x).copy_(x)
    return x, (torch.empty_like(x) if 1 in x.shape else None)


def _result(y: FloatArray, out: torch.Tensor | None) -> torch.Tensor:
    """The tensor of an output array ``y`` that cbn.functional returned for the ``out`` of :func:`_layout`."""
    return torch.from_numpy(y) if out is None else out


def _on_torch_threads(f: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``f(*args, **kwargs)`` with cbn's thread count in this thread set to torch's, ``torch.get_num_threads()``
    (then restored), when they differ."""
    before, n = cbn.get_num_threads(), min(torch.get_num_threads(), _MAX_THREADS)
    if n == before:
        return f(*args, **kwargs)
    cbn.set_num_threads(n)
    try:
        return f(*args, **kwargs)
    finally:
        cbn.set_num_threads(before)


def _channel_stat(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised (C,) float64 tensor for x's channels."""
    return x.new_empty((x.shape[1],), dtype=torch.float64)


def _define(name: str, schema: str, kernel: Callable[..., Any], fake: Callable[..., Any]) -> Any:
    """Define the op ``cbn::name`` with its CPU kernel and its fake kernel; return its OpOverload."""
    _LIB.define(name + schema, tags=(torch.Tag.flexible_layout,))  # type: ignore[no-untyped-call]
    _LIB.impl(name, kernel, "CPU")  # type: ignore[no-untyped-call]
    torch.library.register_fake(f"cbn::{name}", fake, lib=_LIB)
    return getattr(torch.ops.cbn, name).default


def _below_autograd(op: Any, keyset: Any, args: tuple[Any, ...]) -> Any:
    """``op(*args)`` dispatched past the autograd keys of ``keyset``: its CPU kernel, or a tracing mode's."""
    with torch._C._AutoDispatchBelowAutograd():
        return op.redispatch(keyset & torch._C._after_autograd_keyset, *args)


def _register_autograd(op: Any, function: type[torch.autograd.Function]) -> None:
    """Give ``op`` an Autograd kernel: ``function.apply(keyset, *args)`` (an autograd.Function whose forward runs
    :func:`_below_autograd`) when a gradient is needed, else op below autograd. What
    ``torch.library.register_autograd`` registers, without the per-call work of its generic kernel."""
    def kernel(keyset: Any, *args: Any) -> Any:
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return function.apply(keyset, *args)  # type: ignore[no-untyped-call]
        return _below_autograd(op, keyset, args)
    _LIB.impl(op._opname, kernel, "Autograd", with_keyset=True)  # type: ignore[no-untyped-call]


def _train(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, running_mean: torch.Tensor | None,
           running_var: torch.Tensor | None, momentum: float, eps: float) -> tuple[torch.Tensor, ...]:
    x, out = _layout(x)
    stats = [None if t is None else _np(t).copy() for t in (running_mean, running_var)]  # updated: the new ones
    y, saved = _on_torch_threads(_F.batch_norm, _np(x), *stats, _channel_np(weight), _channel_np(bias), True,
                                 momentum, eps, out=_np(out), return_saved=True)
    return (_result(y, out), torch.from_numpy(saved.mean), torch.from_numpy(saved.invstd),
            *(x.new_empty((0,)) if t is None else torch.from_numpy(t) for t in stats))


def _train_fake(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                running_mean: torch.Tensor | None, running_var: torch.Tensor | None, momentum: float,
                eps: float) -> tuple[torch.Tensor, ...]:
    return (torch.empty_like(x), _channel_stat(x), _channel_stat(x),
            *(x.new_empty((0,)) if t is None else torch.empty_like(t) for t in (running_mean, running_var)))


def _forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
             running_mean: torch.Tensor | None, running_var: torch.Tensor | None, training: bool, momentum: float,
             eps: float, save: bool) -> tuple[torch.Tensor, Any]:
    """(y, the saved forward when ``save``, else None) of cbn.functional's batch norm on views of the tensors (the eval
    op's kernel and eager calls), the running statistics updated in place in training (their version counters left
    as they are, as torch's kernel leaves them)."""
    x, out = _layout(x)
    result = _on_torch_threads(_F.batch_norm, _np(x), _channel_np(running_mean), _channel_np(running_var),
                               _channel_np(weight), _channel_np(bias), training, momentum, eps, out=_np(out),
                               return_saved=save)
    y, saved = result if save else (result, None)
    return _result(y, out), saved


def _eval(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, running_mean: torch.Tensor,
          running_var: torch.Tensor, eps: float) -> torch.Tensor:
    return _forward(x, weight, bias, running_mean, running_var, False, 0.0, eps, False)[0]


def _eval_fake(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, running_mean: torch.Tensor,
               running_var: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x)


def _backward(grad_output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
              invstd: torch.Tensor, training: bool,
              saved: _F.BatchNormSaved | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward op's kernel, and an eager call's backward: with ``saved`` (the forward's BatchNormSaved, which
    holds views of the same x, weight, mean and invstd) it is not rebuilt."""
    x, out = _layout(x)
    if saved is None:
        xn = _np(x)
        order = tuple(range(xn.ndim))
        if not xn.flags.c_contiguous:
            order = tuple(sorted(order, key=lambda d: -xn.strides[d]))
        mem = xn.transpose(order)  # x's axes in memory order
        k = order.index(1)
        x3 = mem.reshape(math.prod(mem.shape[:k]), xn.shape[1], math.prod(mem.shape[k + 1:]))
        saved = _F.BatchNormSaved(x3, _np(mean), _np(invstd), _channel_np(weight), training, xn.shape, xn.dtype, 1,
                                  order)
    dx, dweight, dbias = _on_torch_threads(_F.batch_norm_backward, _np(grad_output), saved, out=_np(out))
    return _result(dx, out), torch.from_numpy(dweight), torch.from_numpy(dbias)


def _backward_fake(grad_output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
                   invstd: torch.Tensor, training: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), x.new_empty((x.shape[1],)), x.new_empty((x.shape[1],))


def _gradients(ctx: Any, grad_output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, a: torch.Tensor,
               b: torch.Tensor, training: bool,
               backward: Callable[..., Any]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dweight, dbias) of a forward (None for an absent weight or bias) from what it saved: (a, b) the batch's
    mean and invstd in training, else the running mean and variance. By cbn's ``backward`` (the backward op, or
    :func:`_backward` itself for an eager call), or torch's differentiable ``native_batch_norm_backward`` under
    ``create_graph=True``."""
    if training:
        running_mean, running_var, mean, invstd = None, None, a, b
    else:
        running_mean, running_var, mean, invstd = a, b, a.double(), torch.rsqrt(b.double() + ctx.eps)
    if torch.is_grad_enabled():
        dx, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
            grad_output, x, weight, running_mean, running_var, mean.to(x.dtype), invstd.to(x.dtype), training,
            ctx.eps, [True, *ctx.affine])
    else:
        dx, dweight, dbias = backward(grad_output, x, weight, mean, invstd, training)
    return dx, dweight if ctx.affine[0] else None, dbias if ctx.affine[1] else None


class _CbnTrain(torch.autograd.Function):
    """Autograd of the training op (the dispatch keyset first, then the op's arguments)."""

    @staticmethod
    def forward(ctx: Any, keyset: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                running_mean: torch.Tensor | None, running_var: torch.Tensor | None, momentum: float,
                eps: float) -> Any:
        out = _below_autograd(_TRAIN, keyset, (x, weight, bias, running_mean, running_var, momentum, eps))
        ctx.eps, ctx.affine = eps, (weight is not None, bias is not None)
        ctx.save_for_backward(x, weight, out[1], out[2])
        ctx.mark_non_differentiable(*out[1:])
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor | None, *_: Any) -> tuple[torch.Tensor | None, ...]:
        if grad_output is None:  # no gradient reached y (set_materialize_grads(False) leaves it None)
            return (None,) * 8
        x, weight, mean, invstd = ctx.saved_tensors
        return None, *_gradients(ctx, grad_output, x, weight, mean, invstd, True, _BACKWARD), None, None, None, None


class _CbnEval(torch.autograd.Function):
    """Autograd of the eval op (the dispatch keyset first, then the op's arguments)."""

    @staticmethod
    def forward(ctx: Any, keyset: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                running_mean: torch.Tensor, running_var: torch.Tensor, eps: float) -> Any:
        ctx.eps, ctx.affine = eps, (weight is not None, bias is not None)
        ctx.save_for_backward(x, weight, running_mean, running_var)
        return _below_autograd(_EVAL, keyset, (x, weight, bias, running_mean, running_var, eps))

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, running_mean, running_var = ctx.saved_tensors
        return (None, *_gradients(ctx, grad_output, x, weight, running_mean, running_var, False, _BACKWARD), None,
                None, None)


class _CbnBatchNorm(torch.autograd.Function):
    """Autograd of an eager call (:func:`_eager_batch_norm`): it saves what the ops' autograd saves (x, weight and
    the batch's mean and invstd, or the running statistics in eval), through torch's saved tensors (their version
    checks and hooks), and differentiates with :func:`_backward`. In training its first backward reuses the forward's
    own BatchNormSaved when that views the memory the saved tensors hold: no saved_tensors_hooks were active (torch
    then keeps the saved tensors as they are), x was dense (not copied for the kernels) and neither x's nor the
    weight's memory was replaced (``.data``) since."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                running_mean: torch.Tensor | None, running_var: torch.Tensor | None, training: bool,
                momentum: float, eps: float) -> torch.Tensor:
        y, saved = _forward(x, weight, bias, running_mean, running_var, training, momentum, eps, training)
        ctx.training, ctx.eps, ctx.affine = training, eps, (weight is not None, bias is not None)
        ctx.save_for_backward(x, weight, *((torch.from_numpy(saved.mean), torch.from_numpy(saved.invstd))
                                           if training else (running_mean, running_var)))
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
        ctx.saved = (saved, _addresses(x, weight)) if training and hooks is None and _dense(x) else None
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        kept, ctx.saved = ctx.saved, None  # (released with torch's saved tensors; a retained graph rebuilds it)
        if grad_output is None:  # no gradient reached y (set_materialize_grads(False) leaves it None)
            return (None,) * 8
        x, weight, a, b = ctx.saved_tensors
        backward = _backward
        if kept is not None and kept[1] == _addresses(x, weight):
            backward = functools.partial(_backward, saved=kept[0])
        return *_gradients(ctx, grad_output, x, weight, a, b, ctx.training, backward), None, None, None, None, None


def _addresses(x: torch.Tensor, weight: torch.Tensor | None) -> tuple[int, int]:
    """Where x's and the weight's memory start (0 for no weight)."""
    return x.data_ptr(), 0 if weight is None else weight.data_ptr()


# Function.apply without its per-call work for torch.func (the unwrapping of dead wrappers, the transforms' path): an
# eager call has neither (_eager)
_CBN_APPLY = super(torch.autograd.Function, _CbnBatchNorm).apply


def _eager_batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      running_mean: torch.Tensor | None, running_var: torch.Tensor | None, training: bool,
                      momentum: float, eps: float) -> torch.Tensor:
    """:func:`batch_norm` of an eager call: through :class:`_CbnBatchNorm` when autograd records it."""
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                    or (bias is not None and bias.requires_grad)):
        return cast(torch.Tensor, _CBN_APPLY(  # type: ignore[no-untyped-call]  # (untyped in torch)
            x, weight, bias, running_mean, running_var, training, momentum, eps))
    return _forward(x, weight, bias, running_mean, running_var, training, momentum, eps, False)[0]


def _eager(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    """True for a call on plain tensors that nothing traces or transforms: one that :func:`_eager_batch_norm`
    computes. Tensor subclasses (fake, functional), torch.func's wrapped tensors (vmap, jvp, and the dead ones a
    transform leaves; as input, weight or bias), calls inside a torch.func transform or under a dispatch mode
    (make_fx, FakeTensorMode, FlopCounterMode) and the calls that torch.compile or torch.jit.trace traces go through
    the ops, which those see."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return (not torch.compiler.is_compiling() and type(x) is torch.Tensor  # (compiling first: dynamo traces this)
            and torch._C._len_torch_dispatch_stack() == 0 and not torch._C._are_functorch_transforms_active()
            and not wrapped(x) and not (weight is not None and wrapped(weight))
            and not (bias is not None and wrapped(bias))
            and not torch.jit.is_tracing())  # type: ignore[attr-defined, no-untyped-call]  # (unannotated in torch)


_TRAIN = _define("batch_norm_train", "(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, "
                 "Tensor? running_var, float momentum, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
                 _train, _train_fake)
_EVAL = _define("batch_norm_eval", "(Tensor x, Tensor? weight, Tensor? bias, Tensor running_mean, "
                "Tensor running_var, float eps) -> Tensor", _eval, _eval_fake)
_BACKWARD = _define("batch_norm_backward", "(Tensor grad_output, Tensor x, Tensor? weight, Tensor mean, "
                    "Tensor invstd, bool training) -> (Tensor, Tensor, Tensor)", _backward, _backward_fake)
_register_autograd(_TRAIN, _CbnTrain)
_register_autograd(_EVAL, _CbnEval)


def _on_cbn(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
            weight: torch.Tensor | None, bias: torch.Tensor | None, training: bool, momentum: float,
            eps: float) -> bool:
    """True when cbn's ops compute this batch norm: a CPU float32/float64 input of at least 2 dimensions, (C,)
    parameters and contiguous statistics of its dtype and device that do not require grad, arguments torch accepts
    (eps > 0 in training, more than one value per channel) and 0 <= momentum <= 1."""
    if not (x.is_cpu and x.dtype in _DTYPES and x.dim() >= 2):
        return False
    C, dtype = x.shape[1], x.dtype
    for t in (running_mean, running_var, weight, bias):
        if t is not None and not (t.is_cpu and t.dtype == dtype and t.shape == (C,) and t.is_contiguous()):
            return False
    if (running_mean is not None and running_mean.requires_grad) or (running_var is not None
                                                                      and running_var.requires_grad):
        return False  # (torch raises: not differentiable with respect to them)
    if training:
        return (running_mean is None) == (running_var is None) and eps > 0 and x.numel() != C and 0 <= momentum <= 1
    return running_mean is not None and running_var is not None and eps >= 0


def batch_norm(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """``torch.nn.functional.batch_norm`` on cbn's ops for CPU float32/float64 tensors, torch's own elsewhere.

    torch computes it for input on another device or of another dtype (float16, bfloat16), parameters or
    statistics of another dtype or device than the input, non-contiguous running statistics or ones that require
    grad, momentum outside [0, 1], and the arguments torch rejects (it raises its error). Same parameters and result
    as torch's.
    """
    if not _on_cbn(input, running_mean, running_var, weight, bias, training, momentum, eps):
        return torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                                              eps)
    if _eager(input, weight, bias):
        if torch._C._autograd._profiler_enabled():  # under the ops' names
            with torch.profiler.record_function(f"cbn::batch_norm_{'train' if training else 'eval'}"):
                return _eager_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps)
        return _eager_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps)
    if training:
        y, _, _, new_mean, new_var = _TRAIN(input, weight, bias, running_mean, running_var, momentum, eps)
        if running_mean is not None:
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)  # type: ignore[union-attr]  # (given with running_mean: _on_cbn)
        return cast(torch.Tensor, y)  # (the ops' overloads are untyped)
    return cast(torch.Tensor, _EVAL(input, weight, bias, running_mean, running_var, eps))


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
