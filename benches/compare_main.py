"""Side by side: this cbn against a previous build (e.g. the last main) installed in another environment.

    python benches/compare_main.py /path/to/other/site-packages/cbn --threads 1,2 --budget 0.3

The other build is imported in the same process under the name ``cbn_main`` (its package directory is given), and
both are timed round-robin, call after call (``cbn.bench.median_times``), on the benchmark suite's shapes: the
layer calls ``forward(x, out=y)`` in training and eval and ``backward(dy, out=dx)``, float32, every layout of the
suite (a case the other build cannot take, e.g. an axis before it had one, is skipped). Printed: the median
times and new/main (below 1: this build is faster).
"""
import argparse
import importlib.util
import json
import sys

import numpy as np

import cbn
from cbn import bench


def load_other(path):
    """Import the cbn package in directory ``path`` as the module ``cbn_main``."""
    spec = importlib.util.spec_from_file_location("cbn_main", f"{path}/__init__.py", submodule_search_locations=[path])
    module = importlib.util.module_from_spec(spec)
    sys.modules["cbn_main"] = module
    spec.loader.exec_module(module)
    return module


def layer_calls(lib, x, dy, axis):
    """The three timed calls of one cbn build's layers on x and dy (channels at ``axis``)."""
    cls = lib.BatchNorm2d if x.ndim == 4 else lib.BatchNorm1d
    kw = {} if axis == 1 else {"axis": axis}  # builds before the channel axis take axis 1 only
    train, ev = cls(x.shape[axis], **kw), cls(x.shape[axis], **kw).eval()
    y, dx = np.empty_like(x), np.empty_like(x)
    try:
        train.forward(x, out=y)
    except ValueError:  # a build before channels-last support takes a C-contiguous out only
        y, dx = np.empty(x.shape, x.dtype), np.empty(x.shape, x.dtype)
        train.forward(x, out=y)
    return {"train": lambda: train.forward(x, out=y), "eval": lambda: ev.forward(x, out=y),
            "backward": lambda: train.backward(dy, out=dx)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("other", help="directory of the other build's cbn package")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--budget", type=float, default=0.3, help="seconds per call kind and case")
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args(argv)
    other = load_other(a.other)
    rows = []
    print(f"{'shape':>18} {'layout':>13} {'thr':>3} {'op':>8} {'main us':>10} {'new us':>10} {'new/main':>8}")
    for threads in map(int, a.threads.split(",")):
        other.set_num_threads(threads)
        cbn.set_num_threads(threads)
        for shape, layout in bench.CASES:
            x, dy, axis = bench._data(shape, layout, np.float32)
            try:
                calls = {("main", op): f for op, f in layer_calls(other, x, dy, axis).items()}
            except TypeError as e:
                print(f"{str(shape):>18} {layout:>13} {threads:>3} skipped: the other build cannot take it ({e})")
                continue
            calls.update({("new", op): f for op, f in layer_calls(cbn, x, dy, axis).items()})
            t = bench.median_times(calls, a.budget)
            for op in bench.OPS:
                row = {"shape": list(shape), "layout": layout, "threads": threads, "op": op,
                       "main_us": t["main", op] * 1e6, "new_us": t["new", op] * 1e6,
                       "new_over_main": t["new", op] / t["main", op]}
                rows.append(row)
                print(f"{str(shape):>18} {layout:>13} {threads:>3} {op:>8} {row['main_us']:10.1f} "
                      f"{row['new_us']:10.1f} {row['new_over_main']:8.2f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
