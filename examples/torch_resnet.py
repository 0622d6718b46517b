"""Train a ResNet-18-shaped network on CPU with torch's BatchNorm2d and with cbn's (``cbn.torch.convert``): time per
step and time in batch norm, at each thread count, in training and eval, contiguous and ``channels_last``, eager and
with ``torch.compile``.

Batch norm time is measured two ways: "BN ms" with timing hooks on the batch norm modules (their forward, and the
autograd node of their output in the backward; the same hooks on both models, eager only), and "profiled" with the
torch profiler, which also counts its own cost of recording each op that runs inside a batch norm (cbn's Python
path runs more of them than torch's one op).

The network is torchvision's ResNet-18 written in plain PyTorch (7x7 stem, max pool, four stages of two basic
blocks, 20 BatchNorm2d layers), on random images and labels (SGD with momentum, cross-entropy): the timings do not
depend on the data. The defaults (batch 8 of 112x112 images: a quarter of ImageNet's pixels) keep a run to 1.5 minutes
on 2 cores once torch.compile's cache holds the compiled graphs (5.5 minutes with an empty cache); ``--quick`` runs a
tiny configuration once.

Usage: ``python examples/torch_resnet.py [--threads 1,2] [--batch 8] [--size 112] [--steps 6] [--no-compile]
[--out FILE]``.
"""
import argparse
import copy
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the profiler's log lines (start, stop) off
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import cbn  # noqa: E402
import cbn.torch  # noqa: E402

# Profiler events that are batch norm: torch's forward op and autograd node (its backward op runs inside), cbn's
# forward ops (an eager call records its forward under their names) and their autograd nodes (an eager call's is
# _CbnBatchNormBackward), and the ops alone where a compiled graph calls them.
BN_EVENTS = {"aten::batch_norm", "NativeBatchNormBackward0", "aten::native_batch_norm_backward",
             "cbn::batch_norm_train", "cbn::batch_norm_eval", "cbn::batch_norm_backward",
             "_CbnTrainBackward", "_CbnEvalBackward", "_CbnBatchNormBackward"}


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a shortcut (a 1x1 convolution and batch norm when the shape
    changes)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def resnet18(classes=10):
    """ResNet-18 (He et al. 2016, torchvision's layout) with ``classes`` outputs."""
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes))


def runner(model, x, labels, training):
    """A function running one step: forward, loss, backward and SGD update when ``training``, else an inference
    forward."""
    if not training:
        model.eval()

        def infer():
            with torch.no_grad():
                model(x)
        return infer
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), labels).backward()
        opt.step()
    return train


def bn_ms(step, steps):
    """Milliseconds per step that the profiler attributes to batch norm over ``steps`` steps: the time of the
    BN_EVENTS that no other BN event encloses."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()

    def enclosed(e):
        e = e.cpu_parent
        while e is not None and e.name not in BN_EVENTS:
            e = e.cpu_parent
        return e is not None
    return sum(e.cpu_time_total for e in prof.events() if e.name in BN_EVENTS and not enclosed(e)) / 1e3 / steps


def bn_hooked_ms(model, step, steps):
    """Milliseconds per step spent in ``model``'s batch norm modules over ``steps`` steps, without the profiler: each
    module's forward timed by a forward pre-hook and a forward hook, its backward by a pre-hook and a hook on the
    autograd node of its output (the same hooks on torch's modules and cbn's)."""
    total, start = [0.0], {}

    def begin(key, *_):
        start[key] = time.perf_counter()

    def end(key, *_):
        total[0] += time.perf_counter() - start.pop(key)

    def forward_end(module, args, out):
        end(module)
        if out.grad_fn is not None:
            node = out.grad_fn
            node.register_prehook(lambda *_: begin(node))
            node.register_hook(lambda *_: end(node))

    handles = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            handles += [module.register_forward_pre_hook(begin), module.register_forward_hook(forward_end)]
    try:
        for _ in range(steps):
            step()
    finally:
        for h in handles:
            h.remove()
    return 1e3 * total[0] / steps


def measure(base, x, labels, training, compiled, steps, warmup):
    """(step ms, BN ms, profiled BN ms) of torch's and cbn's batch norm in copies of ``base``: steps timed in
    alternation (medians), then with timing hooks on the batch norm modules (bn_hooked_ms; None when compiled), then
    profiled, each model apart. torch's profiled BN ms is None when compiled: inductor fuses its batch norm into
    generated kernels."""
    if compiled:  # fresh dynamo caches: past its recompile limit (8 per function) dynamo would run the models eagerly
        torch.compiler.reset()
    models = {"torch": copy.deepcopy(base), "cbn": cbn.torch.convert(copy.deepcopy(base))}
    steps_of = {}
    for name, model in models.items():
        step = runner(torch.compile(model) if compiled else model, x, labels, training)
        for _ in range(warmup):
            step()
        steps_of[name] = step
    times = {name: [] for name in models}
    for _ in range(steps):
        for name, step in steps_of.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    return {name: (1e3 * statistics.median(times[name]),
                   None if compiled else bn_hooked_ms(models[name], step, max(1, steps // 2)),
                   None if compiled and name == "torch" else bn_ms(step, max(1, steps // 2)))
            for name, step in steps_of.items()}


def ms_columns(torch_ms, cbn_ms, width):
    """The table's three columns of a time measured on both models: torch's, cbn's and their ratio (n/a where a time
    is None)."""
    if cbn_ms is None:
        return f"{'n/a':>{width}} {'n/a':>6} {'n/a':>9}"
    if torch_ms is None:
        return f"{'n/a':>{width}} {cbn_ms:6.2f} {'n/a':>9}"
    return f"{torch_ms:{width}.2f} {cbn_ms:6.2f} {torch_ms / cbn_ms:9.2f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated (default 1,2)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=112, help="image side in pixels (default 112)")
    p.add_argument("--steps", type=int, default=6, help="timed steps of each model per configuration (default 6)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile rows")
    p.add_argument("--quick", action="store_true", help="a tiny run: batch 2 of 32x32 images, 1 step, 1 thread")
    p.add_argument("--out", help="also write the table to this file")
    args = p.parse_args(argv)
    if args.quick:
        args.threads, args.batch, args.size, args.steps, args.warmup, args.compile = "1", 2, 32, 1, 1, False
    torch.manual_seed(0)
    base = resnet18()
    images = torch.randn(args.batch, 3, args.size, args.size)
    labels = torch.randint(0, 10, (args.batch,))
    lines = [f"ResNet-18, batch {args.batch} of 3x{args.size}x{args.size} float32, torch {torch.__version__}, "
             f"cbn {cbn.__version__}, {platform.machine()} ({os.cpu_count()} CPUs), median of {args.steps} steps; load "
             f"average at the start " + ", ".join(f"{v:.2f}" for v in os.getloadavg()),
             f"{'threads':>7} {'mode':>5} {'layout':>13} {'compiled':>8} | {'step ms torch':>13} {'cbn':>7} "
             f"{'torch/cbn':>9} | {'BN ms torch':>11} {'cbn':>6} {'torch/cbn':>9} | {'profiled torch':>14} "
             f"{'cbn':>6} {'torch/cbn':>9}"]
    print("\n".join(lines), flush=True)
    for compiled in (False, True) if args.compile else (False,):
        for threads in map(int, args.threads.split(",")):
            torch.set_num_threads(threads)
            for training in (True, False):
                for layout in (torch.contiguous_format, torch.channels_last):
                    model, x = base.to(memory_format=layout), images.to(memory_format=layout)
                    r = measure(model, x, labels, training, compiled, args.steps, args.warmup)
                    (st, ht, pt), (sc, hc, pc) = r["torch"], r["cbn"]
                    lines.append(f"{threads:>7} {'train' if training else 'eval':>5} "
                                 f"{'channels_last' if layout == torch.channels_last else 'contiguous':>13} "
                                 f"{'yes' if compiled else 'no':>8} | {st:13.1f} {sc:7.1f} {st / sc:9.2f} | "
                                 f"{ms_columns(ht, hc, 11)} | {ms_columns(pt, pc, 14)}")
                    print(lines[-1], flush=True)
    lines.append("load average (1, 5, 15 min) at the end: " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    print(lines[-1])
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
