"""Side by side: this cbn against a previous build (e.g. the last main), in another environment or another tree.

    python benches/compare_main.py /path/to/other/venv/bin/python --threads 1,2 --budget 0.1 --rounds 2

Each build runs in its own process (its own Python and compiled kernels), in alternating order, ``--rounds`` times
per thread count: this build, the other, this build, ... Each process times the benchmark suite's layer calls
``forward(x, out=y)`` in training and eval and ``backward(dy, out=dx)``, float32, every layout of the suite, and
the calls of this build's small shapes (``cbn.bench.SMALL_SHAPES``) as a NumPy user makes them (``bn(x)``,
``bn.backward(dy)``: new outputs), with ``cbn.bench.median_times`` (a case the other build cannot take is
skipped). Printed: the median over the rounds of each build's time and of the ratio new/main of the processes run
one after the other (below 1: this build is faster).

    python benches/compare_main.py --in-process /path/to/other/checkout --threads 1,2 --budget 0.2

With ``--in-process`` the other build is a source tree built in place (``python setup.py build_ext --inplace``),
imported into this process beside this one's cbn under other module names (``cbn_other*``), and both builds'
calls of each case are timed in rounds, each op's two calls one after the other, the first alternating between
rounds (new/main: the ratio of the two medians; see ``time_in_process``). Both run on the same arrays and write the
same outputs, so a drift of the machine between processes cancels out; the suite's cases only. With ``--outputs K``
each call writes K output arrays in turn, and a build's time is the mean over them of their medians: where an output
lies in memory can decide a call's time (on AMD's CPUs non-temporal stores were slow into one output in four), and
one output per case measures that placement rather than the build.
"""
import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys

import numpy as np

OPS = ("train", "eval", "backward")


def layer_calls(lib, x, dy, axis, y=None, dx=None):
    """The three timed calls of one cbn build's layers on x and dy (channels at ``axis``), writing y and dx (new
    arrays laid out as x when None)."""
    cls = lib.BatchNorm2d if x.ndim == 4 else lib.BatchNorm1d
    kw = {} if axis == 1 else {"axis": axis}  # builds before the channel axis take axis 1 only
    train, ev = cls(x.shape[axis], **kw), cls(x.shape[axis], **kw).eval()
    if y is None:
        y, dx = np.empty_like(x), np.empty_like(x)
    try:
        train.forward(x, out=y)
    except ValueError:  # a build before channels-last support takes a C-contiguous out only
        y, dx = np.empty(x.shape, x.dtype), np.empty(x.shape, x.dtype)
        train.forward(x, out=y)
    return {"train": lambda: train.forward(x, out=y), "eval": lambda: ev.forward(x, out=y),
            "backward": lambda: train.backward(dy, out=dx)}


def small_calls(lib, shape):
    """The three timed calls of one cbn build's layer on a small float32 input of ``shape``, new outputs each."""
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    cls = lib.BatchNorm2d if x.ndim == 4 else lib.BatchNorm1d
    train, ev = cls(shape[1]), cls(shape[1])
    ev(x)
    ev.eval()
    train(x)
    return {"train": lambda: train(x), "eval": lambda: ev(x), "backward": lambda: train.backward(dy)}


def time_suite(threads, budget, small_shapes):
    """{case: {op: seconds}} of the cbn this process imports (None for a case it cannot take), and under "cbn" the
    file it imported."""
    import cbn
    from cbn import bench
    cbn.set_num_threads(threads)
    times = {"cbn": cbn.__file__}
    for shape, layout in bench.CASES:
        x, dy, axis = bench._data(shape, layout, np.float32)
        try:
            times[f"{shape} {layout}"] = bench.median_times(layer_calls(cbn, x, dy, axis), budget)
        except TypeError:
            times[f"{shape} {layout}"] = None
    for shape in map(tuple, small_shapes):
        times[f"{shape} small"] = bench.median_times(small_calls(cbn, shape), budget)
    return times


def load_tree(path):
    """The cbn of the source tree ``path`` (built in place), imported beside this process's own cbn: its modules are
    renamed ``cbn_other*`` once imported, so that both builds' modules and kernels stay loaded."""
    import cbn  # noqa: F401  (this build first, under its own name)
    own = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "cbn" or k.startswith("cbn.")}
    sys.path.insert(0, os.path.abspath(path))
    try:
        other = importlib.import_module("cbn")
        for k in [k for k in sys.modules if k == "cbn" or k.startswith("cbn.")]:
            sys.modules["cbn_other" + k[3:]] = sys.modules.pop(k)
    finally:
        sys.path.pop(0)
        sys.modules.update(own)
    if not other.__file__.startswith(os.path.abspath(path)):
        raise SystemExit(f"{path} holds no cbn: imported {other.__file__}")
    return other


def time_in_process(other, threads, budget, outputs=1):
    """[(case, {op: (new seconds, main seconds)})]: medians of this process's cbn and ``other`` on each case, each
    op's two calls one after the other, the first of them alternating from round to round (the second runs on
    caches the first warmed), writing the same output arrays (a call's time moves with where its arrays lie),
    for at least 6 rounds and about ``budget`` seconds per call; with ``outputs`` arrays (y and dx) per case, each
    call writes every one of them in a round, and its time is the mean over them of their medians."""
    import time

    import cbn
    from cbn import bench
    for lib in (cbn, other):
        lib.set_num_threads(threads)
    times = []
    for shape, layout in bench.CASES:
        x, dy, axis = bench._data(shape, layout, np.float32)
        places = [(np.empty_like(x), np.empty_like(x)) for _ in range(outputs)]
        calls = {(name, k): layer_calls(lib, x, dy, axis, y, dx)
                 for name, lib in (("new", cbn), ("main", other)) for k, (y, dx) in enumerate(places)}
        samples = {(name, k, op): [] for name, k in calls for op in OPS}
        start, rounds = time.perf_counter(), 0
        while rounds < 6 or time.perf_counter() - start < budget * len(samples):
            for op in OPS:
                for name in (("new", "main") if rounds % 2 else ("main", "new")):
                    for k in range(outputs):
                        t0 = time.perf_counter()
                        calls[name, k][op]()
                        samples[name, k, op].append(time.perf_counter() - t0)
            rounds += 1
        med = {(name, op): statistics.mean(statistics.median(samples[name, k, op]) for k in range(outputs))
               for name in ("new", "main") for op in OPS}
        times.append((f"{shape} {layout}", {op: (med["new", op], med["main", op]) for op in OPS}))
    return times


def run(python, threads, budget):
    """time_suite in a child process of ``python``, run in this script's folder (from a checkout's root, ``-c``
    code would import the checkout's cbn whatever the environment)."""
    from cbn import bench
    code = (f"import json, compare_main; "
            f"print(json.dumps(compare_main.time_suite({threads}, {budget}, {bench.SMALL_SHAPES!r})))")
    return json.loads(subprocess.run([python, "-c", code], check=True, capture_output=True, text=True,
                                     cwd=sys.path[0]).stdout)


def report(rows, case, threads, op, main, new, ratio):
    """Append the row of one case's op (main and new in seconds, ratio new/main) to rows and print it."""
    rows.append({"case": case, "threads": threads, "op": op, "main_us": main * 1e6, "new_us": new * 1e6,
                 "new_over_main": ratio})
    print(f"{case:>32} {threads:>3} {op:>8} {main * 1e6:10.1f} {new * 1e6:10.1f} {ratio:8.2f}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("other", help="the Python of the other build's environment (--in-process: its source tree)")
    p.add_argument("--in-process", action="store_true", help="both builds in this process (see the docstring)")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--budget", type=float, default=0.1, help="seconds per call kind and case")
    p.add_argument("--rounds", type=int, default=2, help="process pairs per thread count")
    p.add_argument("--outputs", type=int, default=1,
                   help="--in-process: output arrays per case, each call's time the mean over them (see the docstring)")
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args(argv)
    if a.outputs < 1:
        p.error(f"--outputs must be 1 or more, got {a.outputs}")
    if a.outputs > 1 and not a.in_process:
        p.error(f"--outputs {a.outputs} needs --in-process")
    rows = []
    print(f"{'case':>32} {'thr':>3} {'op':>8} {'main us':>10} {'new us':>10} {'new/main':>8}")
    other = load_tree(a.other) if a.in_process else None
    for threads in map(int, a.threads.split(",")):
        if other is not None:
            for case, ops in time_in_process(other, threads, a.budget, a.outputs):
                for op, (new, main) in ops.items():
                    report(rows, case, threads, op, main, new, new / main)
            continue
        pairs = [(run(sys.executable, threads, a.budget), run(a.other, threads, a.budget)) for _ in range(a.rounds)]
        files = {(new.pop("cbn"), main.pop("cbn")) for new, main in pairs}
        if any(new == main for new, main in files):
            raise SystemExit(f"both environments imported the same cbn: {files}")
        print(f"# {threads} thread(s): new {', '.join(n for n, _ in files)}; main {', '.join(m for _, m in files)}")
        for case in pairs[0][0]:
            if any(main[case] is None for _, main in pairs):
                print(f"{case:>32} {threads:>3} skipped: the other build cannot take it")
                continue
            for op in OPS:
                new = [n[case][op] for n, _ in pairs]
                main = [m[case][op] for _, m in pairs]
                report(rows, case, threads, op, statistics.median(main), statistics.median(new),
                       statistics.median(n / m for n, m in zip(new, main)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
