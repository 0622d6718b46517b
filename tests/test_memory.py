"""Leaks: 10,000 forward+backward calls keep RSS flat and tracemalloc's traced memory constant; the refcounts of
inputs are what they were before the calls (correctness checks, not timings)."""
import gc
import sys
import tracemalloc

import numpy as np
import pytest

import cbn
from cbn import functional as F

SHAPE = (4, 3, 5, 5)
CALLS = 10_000
MB = 1 << 20


def rss_bytes():
    """Resident set size of this process, from /proc/self/status (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    pytest.skip("no /proc/self/status: RSS is only measured on Linux")


def _step(bn, x, dy, out, dx_out, i):
    """One forward+backward, cycling through the code paths: plain, out=, converted input, eval, a failed call."""
    k = i % 5
    if k == 0:
        bn.train()(x)
        bn.backward(dy)
    elif k == 1:
        bn(x, out=out)
        bn.backward(dy, out=dx_out)
    elif k == 2:
        bn(x.astype(np.float64)[:, :, ::-1])
        bn.backward(dy.astype(np.float16))
    elif k == 3:
        bn.eval()(x)
        bn.backward(dy)
    else:
        try:
            bn(x[:, :2])
        except ValueError:
            pass
        bn.train()(x)
        bn.backward(dy)


def test_10k_calls_do_not_leak():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    dy = rng.standard_normal(SHAPE).astype(np.float32)
    out, dx_out = np.empty_like(x), np.empty_like(x)
    inputs = (x, dy, out, dx_out)
    refs = [sys.getrefcount(a) for a in inputs]
    bn = cbn.BatchNorm2d(3, momentum=None)
    for i in range(500):  # warm up: caches, the layer's saved forward and gradients
        _step(bn, x, dy, out, dx_out, i)
    gc.collect()
    rss0 = rss_bytes()
    tracemalloc.start()
    try:
        gc.collect()
        traced0 = tracemalloc.get_traced_memory()[0]
        for i in range(CALLS):
            _step(bn, x, dy, out, dx_out, i)
        gc.collect()
        traced1 = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    rss1 = rss_bytes()
    print(f"\n{CALLS} forward+backward calls: RSS {rss0 / MB:.2f} MB -> {rss1 / MB:.2f} MB, "
          f"tracemalloc traced {traced0} B -> {traced1} B")
    assert bn.num_batches_tracked == 500 - 100 + CALLS - CALLS // 5  # every call but eval (k == 3) counted
    assert traced1 - traced0 < 64 * 1024, f"traced memory grew by {traced1 - traced0} bytes"
    if "fsanitize=address" in cbn._dispatch.kernels.build_info():
        print("RSS bound not asserted: AddressSanitizer's quarantine keeps freed memory resident")
    else:
        assert rss1 - rss0 < 4 * MB, f"RSS grew by {(rss1 - rss0) / MB:.2f} MB"
    del bn
    gc.collect()
    assert [sys.getrefcount(a) for a in inputs] == refs, "a reference to an input was kept or lost"


def test_functional_keeps_no_references():
    """After functional calls (and their failures) return, no argument has gained or lost a reference."""
    rng = np.random.default_rng(1)
    args = [rng.standard_normal(SHAPE).astype(np.float32), np.zeros(3, np.float32), np.ones(3, np.float32),
            np.ones(3, np.float32), np.zeros(3, np.float32)]
    dy = rng.standard_normal(SHAPE).astype(np.float32)
    refs = [sys.getrefcount(a) for a in args + [dy]]
    for _ in range(100):
        y, saved = F.batch_norm(*args, training=True, return_saved=True)
        F.batch_norm_backward(dy, saved)
        F.batch_norm(*args, training=False)
        with pytest.raises(ValueError):
            F.batch_norm(*args, training=True, momentum=2.0)
        with pytest.raises(TypeError):
            F.batch_norm_backward(dy, tuple(saved))
    del y, saved
    gc.collect()
    assert [sys.getrefcount(a) for a in args + [dy]] == refs
