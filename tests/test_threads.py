"""Thread count never changes a bit of any result; thread controls work; show_config reports OpenMP."""
import os
import platform
import re
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import cbn
from cbn import _dispatch
from cbn import reference as R
from cbn._dispatch import kernels as _kernels

from bn_helpers import forced_layout, layer_class, placed, vendor_rules


def openmp_on():
    """Whether this build has OpenMP, as its kernels report it (show_config prints the same: test_show_config)."""
    return bool(cbn._openmp_enabled())


# (class name, shape): parallel ones (>= 65536 elements) cover the kernel layouts: blocks of whole images (short
# rows), tiles of one channel (long rows), and tasks of whole channels (>= 4M values of >= 16 channels).
SHAPES = [
    ("BatchNorm2d", (8, 3, 128, 128)),
    ("BatchNorm2d", (16, 64, 16, 16)),
    ("BatchNorm2d", (256, 8, 8, 8)),  # short rows in blocks of 16 images or more: a sum lane per column
    ("BatchNorm2d", (4, 2, 300, 300)),
    ("BatchNorm1d", (64, 16)),
    ("BatchNorm1d", (4096, 32)),
    ("BatchNorm1d", (200, 1300)),
    ("BatchNorm1d", (128, 2048)),  # the backward in blocks of all rows of 512 columns (FUSE_WIDTH)
    ("BatchNorm2d", (2, 32, 256, 256)),  # tasks of whole channels (>= 4M values)
    ("BatchNorm2d", (64, 512, 8, 8)),
    ("BatchNorm2d", (32, 4, 40, 40)),  # rows of 1600 values in memory order
    ("BatchNorm2d", (16, 16, 56, 56)),  # the backward in tasks of 1 channel (in cache)
    ("BatchNorm1d", (4096, 24, 3)),  # rows of 3 values: run as 72 columns per image
    ("BatchNorm2d", (1, 512, 28, 28)),  # one image: tiles of channels
    ("BatchNorm1d", (70001, 2)),
    ("BatchNorm1d", (64, 9000)),  # channel-minor blocks side by side (wider than COL_BLOCK)
    ("BatchNorm1d", (3, 5, 40000)),
    ("BatchNorm3d", (2, 3, 16, 40, 40)),
]

SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import cbn

    shapes = {shapes!r}
    out = {{"threads": np.array(cbn.get_num_threads())}}
    for i, (name, shape) in enumerate(shapes):
        for dtype in (np.float32, np.float64):
            rng = np.random.default_rng(i)
            C = shape[1]
            x1 = (rng.standard_normal(shape) * 3 + 1e3).astype(dtype)
            x2 = (rng.standard_normal(shape) * 0.5 - 2).astype(dtype)
            dy = rng.standard_normal(shape).astype(dtype)
            bn = getattr(cbn, name)(C, dtype=dtype, momentum=None)
            bn.weight[...] = rng.uniform(0.5, 1.5, C)
            bn.bias[...] = rng.uniform(-1, 1, C)
            key = f"{{i}}_{{np.dtype(dtype).name}}_"
            out[key + "y1"] = bn(x1)
            out[key + "dx1"] = bn.backward(dy)
            out[key + "gw1"] = bn.grad_weight
            out[key + "gb1"] = bn.grad_bias
            out[key + "y2"] = bn(x2)
            out[key + "dx2"] = bn.backward(dy)
            out[key + "rm"] = bn.running_mean.copy()
            out[key + "rv"] = bn.running_var.copy()
            bn.eval()
            out[key + "ye"] = bn(x1)
            out[key + "dxe"] = bn.backward(dy)
            out[key + "gwe"] = bn.grad_weight
    np.savez(sys.argv[1], **out)
""")


def _run(run_record, tmp_path, n):
    """Run SCRIPT with OMP_NUM_THREADS=n; return {name: array}."""
    return run_record(SCRIPT.format(shapes=SHAPES), tmp_path, f"threads{n}", OMP_NUM_THREADS=n)[1]


def test_bitwise_identical_across_thread_counts(run_record, tmp_path):
    runs = {n: _run(run_record, tmp_path, n) for n in (1, 2, 3)}
    for n, r in runs.items():
        if openmp_on():
            assert int(r["threads"]) == n, f"OMP_NUM_THREADS={n} gave {int(r['threads'])} threads"
    base = runs[1]
    for n in (2, 3):
        assert set(runs[n]) == set(base)
        for k in base:
            if k == "threads":
                continue
            a, b = base[k], runs[n][k]
            assert a.dtype == b.dtype and a.shape == b.shape, k
            assert a.tobytes() == b.tobytes(), (f"{k}: 1 vs {n} threads differ, max diff "
                                                f"{np.max(np.abs(a.astype(float) - b.astype(float))):.3e}")


@pytest.fixture
def restore_threads():
    old = cbn.get_num_threads()
    yield old
    cbn.set_num_threads(old)


# the second and third in cache, in groups of whole channels (the third in its backward only: rows of 64 values)
@pytest.mark.parametrize("shape", [(4, 3, 130, 130), (8, 64, 28, 28), (64, 128, 8, 8)])
def test_bitwise_identical_in_process(restore_threads, shape):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 2 + 50).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    results = []
    for n in (1, 2, 4):
        cbn.set_num_threads(n)
        bn = cbn.BatchNorm2d(shape[1])
        y = bn(x)
        dx = bn.backward(dy)
        results.append([y, dx, bn.grad_weight, bn.grad_bias, bn.running_mean, bn.running_var])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.tobytes() == b.tobytes()


# (N, C, S) as the kernels see channel-minor memory: NHWC (N*H*W, C, 1), (N, C) and short rows, folded (rows
# narrower than 64 values taken k at a time) and not.
MINOR = [(64 * 32 * 32, 16, 1), (8 * 224 * 224, 3, 1), (4096, 32, 1), (70001, 2, 1), (4096, 24, 3), (401408, 64, 1),
         (64, 9000, 1), (256 * 16 * 16, 32, 1)]


@pytest.mark.parametrize("shape", MINOR, ids=[f"{n}x{c}x{s}" for n, c, s in MINOR])
def test_every_channel_minor_block_holds_rows(shape):
    """The static schedule hands each thread a share of the blocks: none of them may be empty (blocks cut from
    the rows before the fold left a folded array's work all in the first thread's share)."""
    L = _kernels.layout(*shape)
    assert L["minor"]
    blocks_down = L["nblocks"] // L["ncol"]
    assert (blocks_down - 1) * L["rows"] < L["N"] <= blocks_down * L["rows"]
    assert L["nblocks"] >= 2 or L["N"] * L["W"] < 1 << 16


# (N, C, S) of channel-major tensors in cache of 4 images or more and whether the training forward and the backward
# take groups of whole channels: runs of group*S >= 768 values (the forward of rows of 256 values or more, and every
# float64 forward: >= 1536; the backward: >= 512 values for rows shorter than 256, >= 3072 for longer ones); a group of
# about 64K values, at most C // 16 channels, 16 groups or more
CACHED = [((32, 2048, 49), True, True), ((8, 64, 784), True, True), ((16, 32, 3136), True, True),
          ((64, 128, 64), False, True), ((64, 256, 49), True, True), ((64, 16, 1024), False, False),
          ((64, 32, 784), False, False), ((64, 32, 729), False, False), ((128, 16, 512), False, False),
          ((64, 128, 100), True, True), ((32, 64, 256), False, False), ((32, 48, 256), False, False),
          ((256, 128, 64), False, False), ((8, 3, 50176), False, False), ((16, 64, 1024), True, True),
          ((32, 32, 1024), True, False)]


@pytest.mark.parametrize("shape,forward,backward", CACHED, ids=[f"{n}x{c}x{s}" for (n, c, s), _, _ in CACHED])
def test_tensors_in_cache_of_long_runs_take_whole_channels(shape, forward, backward):
    """A tensor in cache whose group of channels holds long runs in each image sums, finishes and normalises a
    group in one task (its x, and dy, then stay in L2 between the two), in 16 tasks or more; shorter runs keep blocks
    of images in memory order."""
    for sums, whole in ((1, forward), (2, backward)):
        L = _kernels.layout(*shape, sums=sums)
        assert not L["minor"]
        assert (L["fused"] and L["group"] < shape[1]) == whole
        if whole:
            run = (1536 if shape[2] >= 256 else 768) if sums == 1 else 512 if shape[2] < 256 else 3072
            assert L["nblocks"] >= 16 and L["group"] * shape[2] >= run
    group = _kernels.layout(*shape, sums=1)["group"]
    L = _kernels.layout(*shape, sums=1, item=8)  # float64: the forward's groups need runs of 1536 values
    assert (L["fused"] and L["group"] < shape[1]) == (forward and group * shape[2] >= 1536)


# (N, C, S) of channel-major tensors beyond the caches and whether the training forward and the backward take groups
# of whole channels: runs of group*S >= 4096 values (the backward: >= 3072)
BEYOND = [((64, 256, 400), False, True), ((64, 64, 3136), False, True), ((32, 64, 3136), True, True),
          ((128, 64, 784), False, False)]


@pytest.mark.parametrize("shape,forward,backward", BEYOND, ids=[f"{n}x{c}x{s}" for (n, c, s), _, _ in BEYOND])
def test_tensors_beyond_the_caches_of_long_runs_take_whole_channels(shape, forward, backward):
    """A tensor beyond the caches sums, finishes and normalises a group of whole channels in one task (a channel
    leaves memory once) where the group's run in each image is long enough for the prefetchers; the backward, which
    reads a group twice, from shorter runs than the forward."""
    for sums, whole in ((1, forward), (2, backward)):
        L = _kernels.layout(*shape, sums=sums)
        assert not L["minor"] and L["fused"] == whole
        if whole:
            assert L["group"] * shape[2] >= (4096 if sums == 1 else 3072)


STREAM_MIN = 1 << 22


@pytest.mark.parametrize("shape", [(2, 32, 65536), (2, 32, 65535), (4096, 1024, 1), (4095, 1024, 1), (1, 3, 1 << 22)])
def test_outputs_beyond_the_caches_take_non_temporal_stores(shape):
    """A tensor of 4M values or more (beyond the caches) writes its outputs with non-temporal stores on x86-64 (the
    only platform that has them here), in chunks of 1024 values; smaller ones with plain stores. On AMD's CPUs only
    channel-minor tensors do."""
    x86 = platform.machine().lower() in ("x86_64", "amd64") and sys.maxsize > 2**32  # a 64-bit interpreter
    for amd in (False, True):
        with vendor_rules(amd):
            for sums in (0, 1, 2):
                L = _kernels.layout(*shape, sums=sums)
                expected = 1024 if x86 and np.prod(shape) >= STREAM_MIN and (L["minor"] or not amd) else 0
                assert L["stream"] == expected
    with pytest.raises(ValueError, match="stream needs a forced layout kind"):
        _kernels.force_layout(None, 64, True)


# forced layouts (kind, block): the stream chunks are at most block values, so odd blocks cut runs and rows into
# odd chunks, and outputs one value past an aligned address start them mid-vector; rows of 13 columns in blocks of
# 40 or 100 values: whole rows gathered three at a time (after four rows taken together, at 100)
STREAMED = [("major", 23), ("major", 700), ("minor", 40), ("minor", 100), ("minor", 1)]


@pytest.mark.parametrize("layout", STREAMED, ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(6, 5, 37, 11), (7, 13)], ids=str)
def test_non_temporal_stores_change_no_bit(layout, dtype, shape):
    """Every pass gives the same bits through the stream buffer and non-temporal stores as with plain stores:
    forward (plain, fused ReLU, residual + ReLU), eval and backward (one channel's dx cancelling and one holding a
    NaN: recomputed in double), into outputs at an unaligned offset; under the rules of CPUs other than AMD's (whose
    channel-minor backwards store plainly whatever the layout says)."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) * 3 + 20).astype(dtype)
    dy, z = rng.standard_normal(shape).astype(dtype), rng.standard_normal(shape).astype(dtype)

    def unaligned():
        return np.empty(x.size + 1, dtype)[1:].reshape(shape)

    def run(stream):
        results = []
        with vendor_rules(False), forced_layout(layout + (stream,)):
            for options, extra in (({}, {}), ({"activation": "relu"}, {}), ({"activation": "relu"}, {"residual": z})):
                bn = layer_class(len(shape))(shape[1], dtype=dtype, **options)
                y, dx = unaligned(), unaligned()
                bn(x, out=y, **extra)
                dy2 = dy.copy()
                dy2[:, 1] += 1e3 * y[:, 1]
                dy2[(0, 2) + (0,) * (len(shape) - 2)] = np.nan
                bn.backward(dy2, out=dx)
                results += [y, dx, bn.grad_weight, bn.grad_bias, bn.running_mean, bn.running_var]
                bn.eval()
                results.append(bn(x, out=unaligned(), **extra))
        return results

    for a, b in zip(run(False), run(True)):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("shape", [(600, 1000), (512, 1024), (1100, 1000), (300, 64, 70)], ids=str)
def test_the_rules_of_either_cpu_vendor_change_no_bit(shape):
    """The channel-minor float32 forwards between 256K and 4M values give the same bits under AMD's rules (the affine
    pass four adjacent rows at a time up to 1M values, beyond four rows a step from the block's quarters, remainders
    of rows included) and the others' (whole rows from 256K, a call per row): plain, fused ReLU, residual + ReLU,
    eval; with y 16 bytes past x modulo 4 KB too (rows of 4 KB then go one at a time), and against the float64
    reference."""
    rng = np.random.default_rng(5)
    keep = []
    x, past = placed(shape, 0, keep), placed(shape, 16, keep)  # the output 16 bytes past x modulo 4 KB
    x[...] = rng.standard_normal(shape) * 3 + 20
    z = rng.standard_normal(shape).astype(np.float32)

    def run(amd):
        results = []
        with vendor_rules(amd):
            for options, extra in (({}, {}), ({"activation": "relu"}, {}), ({"activation": "relu"}, {"residual": z})):
                for out in (np.empty_like(x), past):
                    bn = cbn.BatchNorm1d(shape[-1], axis=-1, **options)
                    results.append(bn(x, out=out, **extra).copy())
                    bn.eval()
                    results.append(bn(x, out=out, **extra).copy())
        return results

    amd, other = run(True), run(False)
    for a, b in zip(amd, other):
        assert a.tobytes() == b.tobytes()
    y = R.batch_norm(x.astype(np.float64), None, None, training=True, axis=-1)
    assert np.abs(amd[0] - y).max() <= 1e-6 * np.abs(y).max()


@pytest.mark.parametrize("shape", [(1, 64, 3136), (4, 64, 3136), (1, 512, 784), (2, 128, 3136)])
def test_one_image_of_many_channels_makes_many_blocks(shape):
    """Images larger than a block, of 16 channels or more, are cut into 16 groups of channels or more, so that
    two threads split them evenly (groups of 10 channels gave (1, 64, 56, 56) 7 blocks: 4 and 3 per thread)."""
    L = _kernels.layout(*shape)
    assert not L["minor"] and L["ngroups"] >= 16


def test_set_get_num_threads(restore_threads):
    if not openmp_on():
        pytest.skip("serial build: one thread")
    runtime = _kernels.omp_max_threads()
    for n in (1, runtime, max(1, runtime - 1)):
        cbn.set_num_threads(n)
        assert cbn.get_num_threads() == n
    cbn.set_num_threads(runtime + 1)  # the runtime's count caps it
    assert cbn.get_num_threads() == runtime
    cbn.set_num_threads(np.int64(1))
    assert cbn.get_num_threads() == 1


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_set_num_threads_rejects(restore_threads, bad):
    with pytest.raises(ValueError, match=r">= 1.*got " + re.escape(repr(bad))):
        cbn.set_num_threads(bad)
    assert cbn.get_num_threads() == restore_threads


@pytest.mark.parametrize("extra", [1, 10**6, 2**31, 2**70])
def test_set_num_threads_rejects_absurd_counts(restore_threads, extra):
    limit = cbn.max_num_threads()
    assert limit == max(64, 4 * os.cpu_count())
    bad = limit + extra
    with pytest.raises(ValueError, match=rf"<= {limit} .*got {bad}$"):
        cbn.set_num_threads(bad)
    assert cbn.get_num_threads() == restore_threads
    cbn.set_num_threads(limit)  # the limit itself is accepted, capped by the runtime (a serial build keeps 1 thread)
    assert cbn.get_num_threads() == (min(limit, _kernels.omp_max_threads()) if openmp_on() else 1)


def test_build_has_openmp_unless_serial_is_intended():
    """A build or wheel that lost OpenMP by accident fails here; CBN_EXPECT_SERIAL=1 says a serial build is meant."""
    expect_serial = os.environ.get("CBN_EXPECT_SERIAL") == "1"
    assert openmp_on() != expect_serial, (f"build has OpenMP: {openmp_on()}, CBN_EXPECT_SERIAL="
                                          f"{os.environ.get('CBN_EXPECT_SERIAL')!r}; build info: {cbn._build_info()}")


def test_vendored_openmp_runtime():
    """In a repaired wheel, threadpoolctl sees the OpenMP runtime bundled with cbn, and it is the one cbn drives."""
    if os.environ.get("CBN_EXPECT_VENDORED_OPENMP") != "1":
        pytest.skip("only for an installed, repaired wheel: set CBN_EXPECT_VENDORED_OPENMP=1")
    from threadpoolctl import threadpool_info

    pkg = os.path.dirname(os.path.realpath(cbn.__file__))
    vendored = {os.path.join(os.path.dirname(pkg), "cbn.libs"), os.path.join(pkg, ".dylibs")}  # auditwheel,
    libs = [i for i in threadpool_info() if i["user_api"] == "openmp"]                     # delvewheel; delocate
    ours = [i for i in libs if os.path.dirname(os.path.realpath(i["filepath"])) in vendored]
    assert len(ours) == 1, f"want one OpenMP runtime in {sorted(vendored)}, threadpoolctl sees {libs}"
    assert ours[0]["num_threads"] == cbn.get_num_threads()


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_cpu_limit(tmp_path):
    proc, mount = tmp_path / "cgroup", tmp_path / "fs"
    lim = cbn._threads._cgroup_cpu_limit
    assert lim(str(tmp_path / "missing"), str(mount)) is None
    _write(proc, "12:cpu,cpuacct:/x\n")  # cgroup v1 only
    assert lim(str(proc), str(mount)) is None
    _write(proc, "0::/a/b\n")
    assert lim(str(proc), str(mount)) is None  # no cpu.max anywhere
    _write(mount / "a" / "b" / "cpu.max", "max 100000\n")
    assert lim(str(proc), str(mount)) is None  # no quota
    _write(mount / "a" / "cpu.max", "250000 100000\n")
    assert lim(str(proc), str(mount)) == 3  # 2.5 CPUs of the parent, rounded up
    _write(mount / "a" / "b" / "cpu.max", "50000 100000\n")
    assert lim(str(proc), str(mount)) == 1  # the tightest level wins, at least 1
    _write(mount / "cpu.max", "garbage\n")
    assert lim(str(proc), str(mount)) == 1
    _write(proc, "0::/\n")
    assert lim(str(proc), str(mount)) is None


DEFAULT_SCRIPT = textwrap.dedent("""
    import os, sys, threading
    if sys.argv[1] != "all":
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    import cbn
    from cbn._dispatch import kernels as _kernels
    seen = {}
    def worker(key):
        seen[key] = cbn.get_num_threads()
    t = threading.Thread(target=worker, args=("thread",)); t.start(); t.join()  # the default holds in every thread
    seen["main"] = cbn.get_num_threads()
    # a lower default (e.g. a container quota) wins over the runtime's own count in a new thread
    cbn._threads._DEFAULT = 1 if cbn._threads._DEFAULT else 0
    t = threading.Thread(target=lambda: seen.update(runtime=_kernels.omp_max_threads())); t.start(); t.join()
    t = threading.Thread(target=worker, args=("clamped",)); t.start(); t.join()
    print(seen["main"], seen["thread"], seen["runtime"], seen["clamped"], cbn.available_cpus())
""")


@pytest.mark.parametrize("cpus", ["all", "one"])
def test_default_thread_count(run_python, tmp_path, cpus):
    if cpus == "one" and not hasattr(os, "sched_setaffinity"):
        pytest.skip("CPU affinity is set with os.sched_setaffinity, which this platform lacks")
    res = run_python(["-c", DEFAULT_SCRIPT, cpus], tmp_path, OMP_NUM_THREADS=None)
    assert res.returncode == 0, res.stderr
    main, thread, runtime, clamped, available = map(int, res.stdout.split())
    if not openmp_on():
        assert (main, thread, clamped) == (1, 1, 1)
        return
    assert available == (cbn.available_cpus() if cpus == "all" else 1)
    assert main == thread == min(runtime, available)  # the default lowers the runtime's count, never raises it
    assert clamped == 1  # a lower default (runtime is 2+ on a multi-core machine) reaches new threads


def test_omp_num_threads_wins(run_python, tmp_path):
    code = "import threading, cbn; t = threading.Thread(target=lambda: print(cbn.get_num_threads())); t.start()"
    res = run_python(["-c", code], tmp_path, OMP_NUM_THREADS=3)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout) == (3 if openmp_on() else 1)


def test_threadpoolctl_limits(restore_threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if openmp_on():
        cbn.set_num_threads(2)
    before = cbn.get_num_threads()
    with threadpoolctl.threadpool_limits(1, user_api="openmp"):
        assert cbn.get_num_threads() == 1
    assert cbn.get_num_threads() == before


def test_show_config(capsys, monkeypatch):
    """Each line of show_config's printout says what the package, the build and the runtime report."""
    monkeypatch.setenv("OMP_NUM_THREADS", "5")  # read from the environment when printed, not applied
    cbn.show_config()
    first, *rest = capsys.readouterr().out.splitlines()
    assert first == f"cbn {cbn.__version__}"
    fields = {key.strip(): value.strip() for key, value in (line.split(":", 1) for line in rest)}
    assert list(fields) == ["numpy", "python", "openmp", "threads", "cpu level", "compiler"], fields
    assert fields["numpy"] == np.__version__
    assert fields["python"] == f"{platform.python_version()} ({platform.machine()})"
    assert fields["openmp"] == ("on" if cbn._openmp_enabled() else "off (serial build)")
    assert fields["threads"] == (f"{cbn.get_num_threads()} (available CPUs: {cbn.available_cpus()}, "
                                 "OMP_NUM_THREADS=5)")
    assert fields["cpu level"].startswith(f"{_dispatch.LEVEL} (built: {', '.join(_dispatch.built_levels())}; ")
    assert fields["compiler"] == cbn._build_info()


# -- Python threads ------------------------------------------------------------------------------------------------
def _train_steps(bn, xs, dy, steps):
    """``steps`` forward+backward calls over ``xs``; returns every output and the final state."""
    results = []
    for i in range(steps):
        results.append(bn(xs[i % len(xs)]).tobytes())
        results.append(bn.backward(dy).tobytes())
        results.append(bn.grad_weight.tobytes())
    return results + [bn.running_mean.tobytes(), bn.running_var.tobytes(), bn.num_batches_tracked]


def _run_threads(targets):
    """Run the callables in threads started together; return their results (re-raising their exceptions)."""
    import threading
    barrier = threading.Barrier(len(targets))
    results, errors = [None] * len(targets), []

    def run(i):
        try:
            barrier.wait()
            results[i] = targets[i]()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(targets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (8, 3, 64, 64)], ids=["serial-kernels", "parallel-kernels"])
def test_threads_on_different_layers_match_serial(shape):
    """Several Python threads, each training its own layer at the same time (the kernels drop the GIL), get
    bitwise the results of running the layers one after another."""
    def job(k):
        rng = np.random.default_rng(k)
        xs = [(rng.standard_normal(shape) * (k + 1) + k).astype(np.float32) for _ in range(3)]
        dy = rng.standard_normal(shape).astype(np.float32)
        return lambda: _train_steps(cbn.BatchNorm2d(shape[1], momentum=None), xs, dy, 12)

    serial = [job(k)() for k in range(4)]
    threaded = _run_threads([job(k) for k in range(4)])
    assert threaded == serial


def test_same_layer_from_two_threads_is_serialised():
    """One layer called from two threads: the layer's lock makes each forward (its counter and running-statistics
    update) and backward atomic, so 2*K concurrent steps on the same input give bitwise the state of 2*K serial
    steps (momentum=None: the update depends on the counter, so a lost or torn update shows)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 3, 64, 64)).astype(np.float32) * 2 + 1
    dy = rng.standard_normal(x.shape).astype(np.float32)
    K = 40
    serial = cbn.BatchNorm2d(3, momentum=None)
    for _ in range(2 * K):
        serial(x)
    shared = cbn.BatchNorm2d(3, momentum=None)

    def steps():
        for _ in range(K):
            y = shared(x)
            assert np.all(np.isfinite(y))
            shared.backward(dy)
        return True

    assert _run_threads([steps, steps]) == [True, True]
    assert shared.num_batches_tracked == 2 * K
    assert shared.running_mean.tobytes() == serial.running_mean.tobytes()
    assert shared.running_var.tobytes() == serial.running_var.tobytes()


# -- fork and multiprocessing --------------------------------------------------------------------------------------
FORK_SCRIPT = textwrap.dedent("""
    import multiprocessing as mp
    import os
    import sys
    import numpy as np
    import cbn

    SHAPE = (8, 3, 128, 128)  # above the parallel threshold: the parent runs a parallel region before forking


    def work(seed):
        x = np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)
        bn = cbn.BatchNorm2d(3)
        y = bn(x)
        dx = bn.backward(y)
        return cbn.get_num_threads(), y.tobytes() + dx.tobytes() + bn.running_var.tobytes()


    if __name__ == "__main__":
        method = sys.argv[1]
        cbn.set_num_threads(2)
        parent = [work(s)[1] for s in range(2)]
        if method == "os.fork":
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                threads, res = work(0)
                os.write(w, b"ok %d" % threads if res == parent[0] else b"different")
                os._exit(0)
            os.close(w)
            _, status = os.waitpid(pid, 0)
            msg = os.read(r, 100).decode()
            assert status == 0 and msg.startswith("ok"), (status, msg)
            print("child threads", msg.split()[1])
        else:
            with mp.get_context(method).Pool(2) as pool:
                got = pool.map(work, range(2))
            assert [g[1] for g in got] == parent, "a child computed different results"
            print("child threads", got[0][0])
""")


@pytest.mark.parametrize("method", ["os.fork", "fork", "forkserver", "spawn"])
def test_child_processes_do_not_hang(subprocess_env, tmp_path, method):
    """A child made by os.fork() or multiprocessing (fork, forkserver, spawn) after the parent ran a parallel
    region finishes and computes bitwise the parent's results. GNU libgomp hangs in a forked child's first
    parallel region, so cbn starts forked children with 1 thread (docs/user-guide/threads.md); spawn and forkserver
    children are fresh processes with the full thread count."""
    if method != "spawn" and not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    script = tmp_path / "forks.py"
    script.write_text(FORK_SCRIPT)
    env = subprocess_env(OMP_NUM_THREADS=2)
    # own session: on a hang the script and its children are killed together
    proc = subprocess.Popen([sys.executable, str(script), method], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"a child process made with {method} hung")
    assert proc.returncode == 0, err
    threads = int(out.split()[-1])
    if openmp_on():
        assert threads == (1 if method in ("os.fork", "fork") else 2), out
