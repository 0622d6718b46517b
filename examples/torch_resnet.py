"""Train a ResNet-18-shaped network on CPU with torch's BatchNorm2d and with cbn's (``cbn.torch.convert``): time per
step and time in batch norm (torch profiler), at each thread count, in training and eval, contiguous and
``channels_last``, eager and with ``torch.compile``.

The network is torchvision's ResNet-18 written in plain PyTorch (7x7 stem, max pool, four stages of two basic
blocks, 20 BatchNorm2d layers), on random images and labels (SGD with momentum, cross-entropy): the timings do not
depend on the data. The defaults (batch 8 of 112x112 images: a quarter of ImageNet's pixels) keep a run to a few
minutes on 2 cores; ``--quick`` runs a tiny configuration once.

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

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import cbn
import cbn.torch

# Profiler events that are batch norm, each taking in its children: torch's forward op and autograd node, cbn's
# forward ops and their autograd nodes (cbn::batch_norm_backward runs inside those).
BN_EVENTS = ("aten::batch_norm", "NativeBatchNormBackward0", "cbn::batch_norm_train", "cbn::batch_norm_eval",
             "GeneratedBackwardFor_cbn_batch_norm_train_defaultBackward",
             "GeneratedBackwardFor_cbn_batch_norm_eval_defaultBackward")


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
    """Milliseconds per step that the profiler attributes to batch norm (BN_EVENTS) over ``steps`` steps."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return sum(e.cpu_time_total for e in prof.key_averages() if e.key in BN_EVENTS) / 1e3 / steps


def measure(base, x, labels, training, compiled, steps, warmup):
    """(step ms, BN ms) of torch's and cbn's batch norm in copies of ``base``: steps timed in alternation (medians),
    then profiled apart."""
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
    return {name: (1e3 * statistics.median(times[name]), bn_ms(step, max(1, steps // 2)))
            for name, step in steps_of.items()}


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
             f"cbn {cbn.__version__}, {platform.machine()} ({os.cpu_count()} CPUs), median of {args.steps} steps",
             f"{'threads':>7} {'mode':>5} {'layout':>13} {'compiled':>8} | {'step ms torch':>13} {'cbn':>7} "
             f"{'torch/cbn':>9} | {'BN ms torch':>11} {'cbn':>6} {'torch/cbn':>9}"]
    print("\n".join(lines), flush=True)
    for compiled in (False, True) if args.compile else (False,):
        for threads in map(int, args.threads.split(",")):
            torch.set_num_threads(threads)
            for training in (True, False):
                for layout in (torch.contiguous_format, torch.channels_last):
                    model, x = base.to(memory_format=layout), images.to(memory_format=layout)
                    r = measure(model, x, labels, training, compiled, args.steps, args.warmup)
                    (st, bt), (sc, bc) = r["torch"], r["cbn"]
                    lines.append(f"{threads:>7} {'train' if training else 'eval':>5} "
                                 f"{'channels_last' if layout == torch.channels_last else 'contiguous':>13} "
                                 f"{'yes' if compiled else 'no':>8} | {st:13.1f} {sc:7.1f} {st / sc:9.2f} | "
                                 f"{bt:11.2f} {bc:6.2f} {bt / bc:9.2f}")
                    print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
