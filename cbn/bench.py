"""``cbn-bench`` (``python -m cbn.bench``): speed of cbn against the NumPy reference, PyTorch and the roofline.

For each shape, layout, dtype and thread count it times (medians of repeated calls) the training forward (with the
running-statistic update), the eval forward and the training backward of cbn, the float64 NumPy reference
(``cbn.reference``), PyTorch's ``native_batch_norm`` / ``native_batch_norm_backward`` at the same thread count, and
the roofline: a multi-threaded copy (the floor for forward and eval) and add (the floor for backward) of the same
tensor. Layouts: NCHW (C-contiguous, channels at axis 1), channels-last (the NCHW view of NHWC memory that
PyTorch's ``channels_last`` tensors are; PyTorch gets the same strides) and NLC ((N, L, C) C-contiguous at
axis -1; PyTorch gets its (N, C, L) view). cbn, its roofline and PyTorch are timed round-robin, call after call,
so that drift on a shared machine touches them alike. cbn's calls are timed twice in that round-robin: writing into
a given output (``out=``: the table's time and ratios) and returning a new output (``new-out us``, and PyTorch's time
over it, ``torch/new``), as PyTorch's calls do: a new output is the allocator's memory, warm or faulting in where a
given one was last written a round earlier (docs/benchmarks.md, "Reading the table", says when and by how much).
cbn's results are checked against the reference as it runs, and tracemalloc records what each call allocates (numpy
arrays and the kernels' scratch) beyond its output.

A small-shapes section (:func:`bench_small`, skipped with ``--no-small``) times the per-call cost on the shapes
most NumPy users run: the layer calls as they make them, round-robin with the floor of a trivial NumPy ufunc call;
then PyTorch's module calls and the NumPy reference, each in a round-robin of its own right after (calls that
heavy between the layer's would evict its code and data from the caches, which stay warm in a loop of calls).

PyTorch's calls always share cbn's round-robin. Beside a cbn built from source on Linux the two share one OpenMP
runtime (one libgomp.so.1 in the process); beside a wheel's vendored runtime, each runtime's threads spin for a while
after its parallel regions while the other's want the same cores (``benches/torch_openmp.py``), so that times at 2
threads or more, cbn's and PyTorch's, hold some of that contention.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import platform
import statistics
import sys
import time
import tracemalloc
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

import cbn
from cbn import _roofline
from cbn import reference as R
from cbn._dispatch import kernels as _kernels
from cbn._typing import BoolArray, FloatArray, Shape

K = TypeVar("K")
Calls = dict[str, Callable[[], object]]  # the timed closures of one case, by op
Row = dict[str, Any]  # one row of results (as the JSON file holds it)

SHAPES = [(32, 64, 56, 56), (32, 256, 56, 56), (32, 512, 28, 28), (32, 2048, 7, 7), (8, 3, 224, 224),
          (256, 128, 8, 8), (64, 16, 32, 32), (1, 64, 56, 56), (2, 8, 4, 4),
          (4096, 1024), (256, 4096), (16, 16384), (64, 256, 400)]
# (shape as (N, C, *), layout): every suite shape as it is, the 4-D ones also as channels-last views, and
# sequences (N, C, L) stored as (N, L, C).
CASES = ([(s, "NCHW") for s in SHAPES] + [(s, "channels-last") for s in SHAPES if len(s) == 4]
         + [((64, 256, 400), "NLC"), ((32, 768, 128), "NLC")])
LAYOUTS = ("NCHW", "channels-last", "NLC")
# The fused ReLU and residual add and the training variants, timed on a few cases against the plain layer (and the
# fused ops against the unfused NumPy composition).
VARIANT_CASES = [((32, 64, 56, 56), "NCHW"), ((256, 128, 8, 8), "NCHW"), ((32, 64, 56, 56), "channels-last"),
                 ((4096, 1024), "NCHW"), ((64, 256, 400), "NLC")]
VARIANTS = ("relu", "add_relu", "numpy_add_relu", "masked", "ghost", "precise")
OPS = ("train", "eval", "backward")
# The small-shapes section's shapes, (N, C, *) C-contiguous: MLP activations and small CNN feature maps.
SMALL_SHAPES = [(2, 8, 4, 4), (8, 16), (32, 64), (64, 256), (256, 512), (16, 32, 8, 8), (32, 64, 16, 16),
                (64, 128, 8, 8)]
# The layer of each number of dimensions (PyTorch's module has the same name).
LAYERS = {2: cbn.BatchNorm1d, 3: cbn.BatchNorm1d, 4: cbn.BatchNorm2d, 5: cbn.BatchNorm3d}


def median_times(fns: Mapping[K, Callable[[], object]], budget: float, min_runs: int = 5,
                 max_runs: int = 10000) -> dict[K, float]:
    """Median seconds per call of each function of the dict ``fns``, called round-robin (one call of each per
    round) for at least ``min_runs`` rounds and about ``budget`` seconds per function."""
    for fn in fns.values():
        fn()
    times: dict[K, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_runs or (time.perf_counter() - start < budget * len(fns) and rounds < max_runs):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
        rounds += 1
    return {k: statistics.median(v) for k, v in times.items()}


def median_time(fn: Callable[[], object], budget: float, min_runs: int = 5) -> float:
    """Median seconds per call of ``fn`` over repeated calls (see median_times)."""
    return median_times({0: fn}, budget, min_runs)[0]


def allocated(fn: Callable[[], object], output: int = 0) -> int:
    """Peak bytes that tracemalloc sees allocated during one call of ``fn``, less ``output`` bytes."""
    fn()
    tracemalloc.start()
    try:
        result = fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    del result
    return peak - output


def _torch(threads: int) -> types.ModuleType | None:
    """torch, set to ``threads`` threads, or None when it is missing."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    return torch


def _torch_calls(x: FloatArray, dy: FloatArray, layout: str, threads: int) -> Calls | None:
    """Closures timing PyTorch's CPU batch-norm kernels on the same data (the (N, C, L) view of NLC), or None when
    torch is missing."""
    torch = _torch(threads)
    if torch is None:
        return None
    tx, tdy = torch.from_numpy(x), torch.from_numpy(dy)
    if layout == "NLC":
        tx, tdy = tx.transpose(1, 2), tdy.transpose(1, 2)
    C = tx.shape[1]
    w, b = torch.ones(C, dtype=tx.dtype), torch.zeros(C, dtype=tx.dtype)
    rm, rv = torch.zeros(C, dtype=tx.dtype), torch.ones(C, dtype=tx.dtype)
    bn = torch.ops.aten.native_batch_norm
    _, smean, sinvstd = bn(tx, w, b, rm, rv, True, 0.1, 1e-5)
    return {
        "train": lambda: bn(tx, w, b, rm, rv, True, 0.1, 1e-5),
        "eval": lambda: bn(tx, w, b, rm, rv, False, 0.1, 1e-5),
        "backward": lambda: torch.ops.aten.native_batch_norm_backward(
            tdy, tx, w, rm, rv, smean, sinvstd, True, 1e-5, [True, True, True]),
    }


def _torch_module_calls(x: FloatArray, dy: FloatArray, threads: int) -> Calls | None:
    """Closures calling PyTorch's module (``torch.nn.BatchNorm1d/2d/3d``) at ``threads`` threads on x and dy of shape
    (N, C, *) as its users do, or None when torch is missing: the training forward ``m(tx)``, the eval forward
    ``m_eval(tx)`` (autograd on, as by default) and the backward alone: ``torch.autograd.grad`` of the input, weight
    and bias through a kept training-forward graph (``retain_graph=True``) of an input that requires grad, fresh
    gradients each call."""
    torch = _torch(threads)
    if torch is None:
        return None
    module = getattr(torch.nn, LAYERS[x.ndim].__name__)
    C = x.shape[1]
    m, m_eval, m_grad = module(C), module(C).eval(), module(C)
    tx, tdy = torch.from_numpy(x), torch.from_numpy(dy)
    tx_grad = tx.clone().requires_grad_()
    out, inputs = m_grad(tx_grad), (tx_grad, m_grad.weight, m_grad.bias)
    return {"train": lambda: m(tx), "eval": lambda: m_eval(tx),
            "backward": lambda: torch.autograd.grad(out, inputs, tdy, retain_graph=True)}


def _reference_calls(x: FloatArray, dy: FloatArray, axis: int) -> Calls:
    """Closures calling the NumPy reference on x and dy: the training forward (updating its running statistics),
    the eval forward and the backward."""
    C = x.shape[axis]
    rm, rv, w, b = np.zeros(C), np.ones(C), np.ones(C), np.zeros(C)
    _, saved = R.batch_norm(x, rm, rv, w, b, True, axis=axis, return_saved=True)
    return {"train": lambda: R.batch_norm(x, rm, rv, w, b, True, axis=axis),
            "eval": lambda: R.batch_norm(x, rm, rv, w, b, False, axis=axis),
            "backward": lambda: R.batch_norm_backward(dy, saved)}


def _data(shape: Shape, layout: str, dtype: npt.DTypeLike) -> tuple[FloatArray, FloatArray, int]:
    """x and dy of the (N, C, *) ``shape`` in ``layout`` (NLC: the (N, L, C) array itself), and the channel axis."""
    rng = np.random.default_rng(0)
    x, dy = (rng.standard_normal(shape) * 2 + 3).astype(dtype), rng.standard_normal(shape).astype(dtype)
    if layout == "NCHW":
        return x, dy, 1
    last = (0,) + tuple(range(2, len(shape))) + (1,)
    x, dy = np.ascontiguousarray(x.transpose(last)), np.ascontiguousarray(dy.transpose(last))
    if layout == "NLC":
        return x, dy, -1
    first = np.argsort(last)
    return x.transpose(first), dy.transpose(first), 1


def _check(y: FloatArray, dx: FloatArray, x: FloatArray, dy: FloatArray, axis: int,
           dtype: npt.DTypeLike) -> tuple[float, float, bool]:
    """Max errors of cbn's training forward and backward against the float64 reference, and whether they pass."""
    C = x.shape[axis]
    yr, saved = R.batch_norm(x, np.zeros(C), np.ones(C), np.ones(C), np.zeros(C), True, 0.1, 1e-5, axis=axis,
                             return_saved=True)
    dxr = R.batch_norm_backward(dy, saved)[0]
    err_y = float(np.max(np.abs(y - yr)))
    err_dx = float(np.max(np.abs(dx - dxr)) / max(np.max(np.abs(dxr)), 1e-300))
    tol = 2e-6 if dtype == np.float32 else 1e-12
    return err_y, err_dx, bool(err_y <= tol * max(1.0, float(np.max(np.abs(yr)))) and err_dx <= 1e3 * tol)


def bench_case(shape: Shape, layout: str, dtype: np.dtype[Any], threads: int, budget: float,
               with_reference: bool = True) -> list[Row]:
    """Time cbn (into ``out=`` and into a new output), the roofline, PyTorch and the NumPy reference on one case;
    return one row per op (times in us)."""
    x, dy, axis = _data(shape, layout, dtype)
    C = shape[1]
    cbn.set_num_threads(threads)
    cls = LAYERS[len(shape)]
    train = cls(C, dtype=dtype, axis=axis)
    ev = cls(C, dtype=dtype, axis=axis).eval()
    y, dx = np.empty_like(x), np.empty_like(x)
    flat_x, flat_dy, flat_out = x.ravel(order="K"), dy.ravel(order="K"), np.empty(x.size, dtype)
    train.forward(x, out=y)
    calls: Calls = {"train": lambda: train.forward(x, out=y), "eval": lambda: ev.forward(x, out=y),
             "backward": lambda: train.backward(dy, out=dx), "train new": lambda: train.forward(x),
             "eval new": lambda: ev.forward(x), "backward new": lambda: train.backward(dy),
             "copy": lambda: _roofline.copy(flat_x, flat_out, threads),
             "add": lambda: _roofline.add(flat_x, flat_dy, flat_out, threads)}
    torch_calls = _torch_calls(x, dy, layout, threads)
    calls.update({f"torch {op}": fn for op, fn in (torch_calls or {}).items()})
    t = median_times(calls, budget)
    floor = {"train": t["copy"], "eval": t["copy"], "backward": t["add"]}
    # Bytes allocated beyond the output: with out=, and without (then the output itself is returned).
    alloc_out = {op: allocated(calls[op]) for op in OPS}
    alloc_new = {"train": allocated(lambda: train.forward(x), x.nbytes),
                 "eval": allocated(lambda: ev.forward(x), x.nbytes),
                 "backward": allocated(lambda: train.backward(dy), x.nbytes)}
    train.forward(x, out=y)
    err_y, err_dx, ok = _check(y, train.backward(dy), x, dy, axis, dtype)
    ref: dict[str, float] = {}
    if with_reference:
        calls = _reference_calls(x, dy, axis)
        ref = {op: median_time(calls[op], budget, min_runs=3) for op in OPS}
    return [{"shape": list(shape), "layout": layout, "dtype": np.dtype(dtype).name, "threads": threads, "op": op,
             "MB": x.nbytes / 1e6, "cbn_us": t[op] * 1e6, "cbn_new_us": t[f"{op} new"] * 1e6,
             "roofline_us": floor[op] * 1e6, "cbn_over_roofline": t[op] / floor[op],
             "numpy_us": ref[op] * 1e6 if ref else None,
             "numpy_over_cbn": ref[op] / t[op] if ref else None,
             "torch_us": t[f"torch {op}"] * 1e6 if torch_calls else None,
             "torch_over_cbn": t[f"torch {op}"] / t[op] if torch_calls else None,
             "torch_over_cbn_new": t[f"torch {op}"] / t[f"{op} new"] if torch_calls else None,
             "alloc_bytes_out": alloc_out[op], "alloc_bytes": alloc_new[op],
             "max_err_y": err_y, "max_rel_err_dx": err_dx, "correct": ok} for op in OPS]


def padding_mask(shape: Sequence[int] | npt.NDArray[Any]) -> BoolArray:
    """A statistics mask of ``shape`` ((N, *positions)) as padding gives: sample n's first (in C order) L_n of its
    L positions are True, L_n drawn from [0.6 L, L] (a fixed seed); 80% of the positions on average."""
    N, L = shape[0], math.prod(shape[1:])
    lengths = np.random.default_rng(0).integers(math.ceil(0.6 * L), L, N, endpoint=True)
    return (np.arange(L) < lengths[:, None]).reshape(shape)


def bench_variants(shape: Shape, layout: str, threads: int, budget: float) -> Row:
    """Time the layer's float32 training forward and backward of one case, plain and as each of VARIANTS: with
    activation="relu"; with a residual too; the unfused NumPy composition of that, np.maximum(bn(x) + z, 0), and its
    backward (dy masked by y > 0, then bn.backward); with a statistics mask (:func:`padding_mask`);
    ghost batches of a quarter of the batch; inside ``precise_stats`` (forward only). Returns one row (us):
    "train" and "backward", and "train_<variant>", "backward_<variant>"."""
    x, dy, axis = _data(shape, layout, np.float32)
    z = np.negative(dy)
    C = x.shape[axis]
    cbn.set_num_threads(threads)
    cls = LAYERS[len(shape)]
    options: dict[str, dict[str, Any]] = {"relu": {"activation": "relu"}, "add_relu": {"activation": "relu"},
               "ghost": {"virtual_batch_size": -(-shape[0] // 4)}}
    layers = {v: cls(C, axis=axis, **options.get(v, {})) for v in ("plain",) + VARIANTS}
    args: dict[str, dict[str, Any]] = {"add_relu": {"residual": z},
                                       "masked": {"mask": padding_mask(np.delete(x.shape, axis))}}
    y = {v: np.empty_like(x) for v in layers}  # each layer's own: a ReLU backward reads its forward's output
    dx, grad = np.empty_like(x), np.empty_like(x)
    calls: Calls = {}
    for v, layer in layers.items():
        suffix = "" if v == "plain" else f"_{v}"
        # (mypy cannot infer a lambda with defaults where a callable without arguments is expected)
        calls["train" + suffix] = lambda layer=layer, v=v: layer(x, out=y[v], **args.get(v, {}))  # type: ignore[misc]
        if v != "precise":  # its backward is the plain one
            calls["backward" + suffix] = lambda layer=layer: layer.backward(dy, out=dx)  # type: ignore[misc]
    unfused = layers["numpy_add_relu"]

    def unfused_forward() -> FloatArray:
        out = unfused(x, out=y["numpy_add_relu"])
        np.add(out, z, out=out)
        return np.maximum(out, 0, out=out)

    def unfused_backward() -> FloatArray:
        np.multiply(dy, y["numpy_add_relu"] > 0, out=grad)  # the residual's gradient
        return unfused.backward(grad, out=dx)

    calls["train_numpy_add_relu"], calls["backward_numpy_add_relu"] = unfused_forward, unfused_backward
    for call in calls.values():  # each layer's backward follows its own forward
        call()
    with cbn.precise_stats(layers["precise"]):
        t = median_times(calls, budget)
    return {"shape": list(shape), "layout": layout, "threads": threads, **{k: v * 1e6 for k, v in t.items()}}


# (column, numerator, denominator) of the variant table's ratios
VARIANT_COLUMNS = (("relu/plain", "relu", ""), ("add+relu/plain", "add_relu", ""),
                   ("numpy/fused", "numpy_add_relu", "add_relu"), ("mask/plain", "masked", ""),
                   ("ghost/plain", "ghost", ""))
VARIANT_HEADER = (f"{'shape':>18} {'layout':>13} {'thr':>3} {'train us':>9} "
                  + " ".join(f"{c:>{len(c)}}" for c, _, _ in VARIANT_COLUMNS) + f" {'precise/plain'} {'bwd us':>9} "
                  + " ".join(f"{c:>{len(c)}}" for c, _, _ in VARIANT_COLUMNS))


def format_variants(r: Row) -> str:
    """One line of the variant table: the plain times, and each variant's time over its denominator's."""
    def ratios(op: str) -> str:
        key = {"": op, **{v: f"{op}_{v}" for v in VARIANTS}}
        return " ".join(f"{r[key[num]] / r[key[den]]:{len(c)}.2f}" for c, num, den in VARIANT_COLUMNS)
    return (f"{str(tuple(r['shape'])):>18} {r['layout']:>13} {r['threads']:>3} {r['train']:9.1f} {ratios('train')} "
            f"{r['train_precise'] / r['train']:13.2f} {r['backward']:9.1f} {ratios('backward')}")


def bench_small(shape: Shape, threads: int, budget: float, with_reference: bool = True) -> list[Row]:
    """Per-call times of one small float32 (N, C, *) shape (C-contiguous): in one round-robin the layer called as
    a NumPy user calls it (``bn(x)`` training with the running-statistic update, ``bn_eval(x)``, ``bn.backward(dy)``
    after the training forward; a new output each call) and the floor, ``np.add(a, b, out=c)`` on 64 float32
    values; then PyTorch's module calls (:func:`_torch_module_calls`) and the NumPy reference, each in a
    round-robin of its own. Returns one row per op (times in us; numpy and torch None when not measured)."""
    x, dy, axis = _data(shape, "NCHW", np.float32)
    cbn.set_num_threads(threads)
    cls = LAYERS[len(shape)]
    bn, bn_eval = cls(shape[1]), cls(shape[1]).eval()
    a, b, c = np.ones(64, np.float32), np.ones(64, np.float32), np.empty(64, np.float32)
    calls: dict[object, Callable[[], object]] = {"floor": lambda: np.add(a, b, out=c), ("cbn", "train"): lambda: bn(x),
             ("cbn", "eval"): lambda: bn_eval(x), ("cbn", "backward"): lambda: bn.backward(dy)}
    t = {k: v * 1e6 for k, v in median_times(calls, budget).items()}
    torch_calls = _torch_module_calls(x, dy, threads)
    if torch_calls:
        t.update({("torch", op): v * 1e6 for op, v in median_times(torch_calls, budget).items()})
    if with_reference:
        reference = {("numpy", op): fn for op, fn in _reference_calls(x, dy, axis).items()}
        t.update({k: v * 1e6 for k, v in median_times(reference, budget).items()})
    return [{"shape": list(shape), "layout": "NCHW", "dtype": "float32", "threads": threads, "op": op,
             "cbn_us": t["cbn", op], "floor_us": t["floor"], "cbn_over_floor": t["cbn", op] / t["floor"],
             "numpy_us": t.get(("numpy", op)),
             "numpy_over_cbn": t["numpy", op] / t["cbn", op] if with_reference else None,
             "torch_us": t["torch", op] if torch_calls else None,
             "torch_over_cbn": t["torch", op] / t["cbn", op] if torch_calls else None} for op in OPS]


SMALL_TITLE = ("Small shapes (per call, float32): the layer calls as a NumPy user makes them (new outputs) and "
               "the floor\n(a 64-value np.add(a, b, out=c)) in one round-robin per row, PyTorch's module calls "
               "(backward: autograd) and the NumPy\nreference each in its own right after; cbn/floor = cbn time / "
               "floor; numpy/cbn and torch/cbn = how many times faster cbn is")
SMALL_HEADER = (f"{'shape':>16} {'thr':>3} {'op':>8} {'cbn us':>8} {'numpy us':>9} {'torch us':>9} {'floor us':>8} "
                f"{'cbn/floor':>9} {'numpy/cbn':>9} {'torch/cbn':>9}")


def format_small(r: Row) -> str:
    """One line of the small-shapes table: the times and the ratios."""
    return (f"{str(tuple(r['shape'])):>16} {r['threads']:>3} {r['op']:>8} {r['cbn_us']:8.1f} "
            f"{_fmt(r['numpy_us'], '9.1f')} {_fmt(r['torch_us'], '9.1f')} {r['floor_us']:8.2f} "
            f"{r['cbn_over_floor']:9.1f} {_fmt(r['numpy_over_cbn'], '9.2f')} {_fmt(r['torch_over_cbn'], '9.2f')}")


def _shapes(text: str) -> list[Shape]:
    """Shapes written like 8x3x224x224,2x8x4x4."""
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",")]


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


HEADER = (f"{'shape':>18} {'layout':>13} {'dtype':>7} {'thr':>3} {'op':>8} {'MB':>7} {'cbn us':>10} {'cbn/roof':>8} "
          f"{'numpy/cbn':>9} {'torch/cbn':>9} {'new-out us':>10} {'torch/new':>9} {'alloc KB':>9} {'ok':>3}")


def format_row(r: Row) -> str:
    """One table line: time into out=, its ratio to the roofline and speedups over NumPy and PyTorch, the time
    returning a new output and PyTorch's over it, allocation, correctness."""
    return (f"{str(tuple(r['shape'])):>18} {r['layout']:>13} {r['dtype']:>7} {r['threads']:>3} {r['op']:>8} "
            f"{r['MB']:7.1f} "
            f"{r['cbn_us']:10.1f} {r['cbn_over_roofline']:8.2f} {_fmt(r['numpy_over_cbn'], '9.1f')} "
            f"{_fmt(r['torch_over_cbn'], '9.2f')} {r['cbn_new_us']:10.1f} {_fmt(r['torch_over_cbn_new'], '9.2f')} "
            f"{r['alloc_bytes_out'] / 1e3:9.1f} "
            f"{'yes' if r['correct'] else 'NO':>3}")


def header() -> dict[str, Any]:
    """Versions and machine the numbers belong to."""
    try:
        tv = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        tv = "not installed"
    return {"cbn": cbn.__version__, "numpy": np.__version__, "torch": tv, "python": platform.python_version(),
            "machine": platform.machine(), "processor": _cpu_model(), "cpus": cbn.available_cpus(),
            "openmp": _kernels.openmp_enabled(), "build": _kernels.build_info()}


def _cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _label(r: Row) -> str:
    """A case's name in the chart: its shape, and its layout unless NCHW."""
    return str(tuple(r["shape"])) + ("" if r["layout"] == "NCHW" else f" {r['layout']}")


def plot(rows: list[Row], path: str) -> None:
    """Bar chart of cbn/roofline and torch/cbn per shape and op (needs matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = sorted({(r["dtype"], r["threads"]) for r in rows})
    fig, axes = plt.subplots(len(keys), 2, figsize=(14, 3.5 * len(keys)), squeeze=False)
    for (dtype, threads), (ax1, ax2) in zip(keys, axes):
        sel = [r for r in rows if r["dtype"] == dtype and r["threads"] == threads]
        shapes = list(dict.fromkeys(_label(r) for r in sel))
        for j, op in enumerate(OPS):
            vals = {_label(r): r for r in sel if r["op"] == op}
            xs = np.arange(len(shapes)) + (j - 1) * 0.27
            ax1.bar(xs, [vals[s]["cbn_over_roofline"] for s in shapes], 0.27, label=op)
            ax2.bar(xs, [vals[s]["torch_over_cbn"] or 0 for s in shapes], 0.27, label=op)
        for ax, title, line in ((ax1, "cbn time / roofline (lower is better, log scale)", 1.0),
                                (ax2, "PyTorch time / cbn time (higher is better)", 1.0)):
            ax.axhline(line, color="k", lw=0.8)
            if ax is ax1:
                ax.set_yscale("log")
            ax.set_xticks(range(len(shapes)), shapes, rotation=30, fontsize=7)
            ax.set_title(f"{title} - {dtype}, {threads} thread(s)", fontsize=9)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: run the benchmark, print the table, optionally write JSON and a PNG."""
    p = argparse.ArgumentParser(prog="cbn-bench", description=__doc__.splitlines()[0])
    p.add_argument("--threads", default=str(cbn.get_num_threads()), help="comma-separated thread counts")
    p.add_argument("--dtype", default="float32", help="comma-separated: float32,float64")
    p.add_argument("--shapes", default="all", help="'all', 'small' or shapes like 8x3x224x224,2x8x4x4 (as (N, C, *))")
    p.add_argument("--layouts", default=",".join(LAYOUTS),
                   help="comma-separated: NCHW,channels-last (4-D shapes),NLC (3-D shapes)")
    p.add_argument("--budget", type=float, default=0.2, help="seconds of repetitions per measurement")
    p.add_argument("--no-reference", action="store_true", help="skip timing the slow NumPy reference")
    p.add_argument("--no-variants", action="store_true",
                   help="skip the table of the fused ops and training variants (of VARIANT_CASES, or of the shapes "
                        "given)")
    p.add_argument("--no-small", action="store_true", help="skip the small-shapes section (per-call cost)")
    p.add_argument("--small-shapes", default="all",
                   help="'all' or the small-shapes section's shapes like 2x8x4x4,8x16 (as (N, C, *))")
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--plot", help="write a PNG chart to this file (needs matplotlib)")
    a = p.parse_args(argv)
    layouts = a.layouts.split(",")
    if a.shapes in ("all", "small"):
        cases = [(s, lay) for s, lay in CASES if lay in layouts and (a.shapes == "all" or np.prod(s) * 4 < 50e6)]
    else:
        cases = [(s, lay) for s in _shapes(a.shapes) for lay in layouts
                 if lay == "NCHW" or (lay == "channels-last" and len(s) == 4) or (lay == "NLC" and len(s) == 3)]
    info = header()
    print("cbn benchmark: medians; cbn us: into out=; cbn/roof = cbn time / (copy for train and eval, add for "
          "backward);\nnumpy/cbn and torch/cbn = how many times faster cbn is; new-out us: cbn returning a new output, "
          "torch/new = PyTorch's time over it. " +
          ", ".join(f"{k} {v}" for k, v in info.items()))
    rows, variants, small = [], [], []
    saved_threads = cbn.get_num_threads()
    try:
        for threads in (int(t) for t in a.threads.split(",")):
            for dtype in a.dtype.split(","):
                for shape, layout in cases:
                    rows += bench_case(shape, layout, np.dtype(dtype), threads, a.budget, not a.no_reference)
                    print(f"  measured {shape} {layout} {dtype} at {threads} thread(s)", file=sys.stderr,
                          flush=True)
            if not a.no_variants:
                variants += [bench_variants(shape, layout, threads, a.budget) for shape, layout in
                             (VARIANT_CASES if a.shapes in ("all", "small") else cases)]
            if not a.no_small:
                for shape in SMALL_SHAPES if a.small_shapes == "all" else _shapes(a.small_shapes):
                    small += bench_small(shape, threads, a.budget, not a.no_reference)
    finally:
        cbn.set_num_threads(saved_threads)
    print(HEADER)
    for r in rows:
        print(format_row(r))
    if variants:
        print("fused ops and training variants, float32 training forward and backward: the plain layer's time, and "
              "over it\nthe fused ReLU, the fused residual add + ReLU, a statistics mask (padding: the first 60-100% "
              "of each\nsample's positions), ghost batches (a quarter of the batch each) and the forward inside "
              "precise_stats;\nnumpy/fused: the unfused NumPy composition np.maximum(bn(x) + z, 0) (and its backward) "
              "over the fused call")
        print(VARIANT_HEADER)
        for r in variants:
            print(format_variants(r))
    if small:
        print(SMALL_TITLE)
        print(SMALL_HEADER)
        for r in small:
            print(format_small(r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"header": info, "rows": rows, "variants": variants, "small": small}, f, indent=1)
    if a.plot:
        plot(rows, a.plot)
    return 0 if all(r["correct"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
