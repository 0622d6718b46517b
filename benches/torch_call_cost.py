"""Per-call cost of cbn.torch against torch's own batch norm: the eval forward (under no_grad), the training forward
(inputs that require grad: autograd records it) and a training step (that forward and its backward,
``torch.autograd.grad``, the graph not retained, as in training), on a tiny tensor, where
a call's Python and dispatch work is all there is, and on the batch norm shapes of ``examples/torch_resnet.py``'s
ResNet-18 (batch 8 of 112x112 images), contiguous and channels_last, with their sum over its 20 layers: its batch
norm time per step without the profiler's cost. ``cbn.functional`` on NumPy views of the same memory is the floor the
adapter adds to. Each figure is the median over rounds in which every implementation takes its turn, in
microseconds per call (per step for the sums).

``--baseline FILE`` also times another version of cbn/torch.py (``git show REV:cbn/torch.py > FILE``) in the same
run, its ops renamed to the namespace ``cbn_before``.

Usage: ``python benches/torch_call_cost.py [--threads 1] [--rounds 7] [--baseline FILE] [--out FILE]``.
"""
import argparse
import os
import statistics
import sys
import timeit
import types

import torch

import cbn
import cbn.torch
from cbn import functional as F

# (shape, calls per timing, layers of that shape in ResNet-18 at batch 8 of 112x112 images)
CASES = (((2, 8, 4, 4), 1000, 0), ((8, 64, 56, 56), 10, 1), ((8, 64, 28, 28), 40, 4), ((8, 128, 14, 14), 100, 5),
         ((8, 256, 7, 7), 200, 5), ((8, 512, 4, 4), 300, 5))
OPS = ("eval", "train", "step")


def load_baseline(path):
    """The module of another version of cbn/torch.py, its ops defined in the namespace cbn_before."""
    with open(path) as f:
        src = f.read()
    for old, new in (('"cbn::', '"cbn_before::'), ("torch.ops.cbn.", "torch.ops.cbn_before."),
                     ('Library("cbn"', 'Library("cbn_before"'), ('f"cbn::', 'f"cbn_before::'),
                     ("torch.ops.cbn,", "torch.ops.cbn_before,")):
        src = src.replace(old, new)
    module = types.ModuleType("cbn_torch_baseline")
    exec(compile(src, path, "exec"), module.__dict__)
    return module


def calls(batch_norm, x, dy, params, stats):
    """{op: function} of one implementation of torch.nn.functional.batch_norm's signature."""
    xg, wg, bg = (t.clone(memory_format=torch.preserve_format).requires_grad_() for t in (x, *params))

    def eval_forward():
        with torch.no_grad():
            batch_norm(x, *stats, *params, False)

    def step():
        torch.autograd.grad(batch_norm(xg, *stats, wg, bg, True), (xg, wg, bg), dy)
    return {"eval": eval_forward, "train": lambda: batch_norm(xg, *stats, wg, bg, True), "step": step}


def functional_calls(x, dy, params, stats):
    """{op: function} of cbn.functional on NumPy views of the same tensors."""
    xn, dyn, wn, bn, mn, vn = (t.numpy() for t in (x, dy, *params, *stats))

    def train():
        return F.batch_norm(xn, mn, vn, wn, bn, True, return_saved=True)
    return {"eval": lambda: F.batch_norm(xn, mn, vn, wn, bn, False), "train": train,
            "step": lambda: F.batch_norm_backward(dyn, train()[1])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (cbn.torch follows it)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--baseline", help="another version of cbn/torch.py, timed beside this one")
    p.add_argument("--out", help="also write the table to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    impls = {"torch": torch.nn.functional.batch_norm, "cbn.torch": cbn.torch.batch_norm}
    if args.baseline:
        impls = {"torch": impls["torch"], "baseline": load_baseline(args.baseline).batch_norm, **impls}
    names = [*impls, "functional"]
    lines = [f"per call, us: medians of {args.rounds} rounds; torch {torch.__version__}, cbn {cbn.__version__}, "
             f"{args.threads} thread(s), {os.cpu_count()} CPUs, load average " +
             ", ".join(f"{v:.2f}" for v in os.getloadavg()) +
             (f"; baseline: {os.path.basename(args.baseline)}" if args.baseline else ""),
             f"{'shape':>16} {'layout':>13} {'op':>8} | " + " ".join(f"{n:>10}" for n in names)]
    print("\n".join(lines), flush=True)
    layouts = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    resnet = {(layout_name, op): dict.fromkeys(names, 0.0) for layout_name in layouts for op in OPS}
    for shape, number, layers in CASES:
        for layout_name, layout in layouts.items():
            g = torch.Generator().manual_seed(0)
            x, dy = (torch.randn(shape, generator=g).contiguous(memory_format=layout) for _ in range(2))
            params = torch.rand(shape[1], generator=g) + 0.5, torch.randn(shape[1], generator=g)
            stats = torch.zeros(shape[1]), torch.ones(shape[1])
            fns = {name: calls(bn, x, dy, params, stats) for name, bn in impls.items()}
            fns["functional"] = functional_calls(x, dy, params, stats)
            for op in OPS:
                times = {name: [] for name in names}
                for _ in range(args.rounds):
                    for name in names:
                        times[name].append(timeit.timeit(fns[name][op], number=number) / number * 1e6)
                medians = {n: statistics.median(times[n]) for n in names}
                for n in names:
                    resnet[layout_name, op][n] += layers * medians[n]
                lines.append(f"{str(shape):>16} {layout_name:>13} {op:>8} | " +
                             " ".join(f"{medians[n]:10.1f}" for n in names))
                print(lines[-1], flush=True)
    for (layout_name, op), sums in resnet.items():
        lines.append(f"{'ResNet-18 sum':>16} {layout_name:>13} {op:>8} | " +
                     " ".join(f"{sums[n]:10.1f}" for n in names))
        print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
