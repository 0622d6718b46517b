"""MPI side of tests/test_mpi.py: run as ``mpirun -n P python -m mpi4py tests/mpi_worker.py``.

Every rank takes its shard (uneven sizes, some empty) of a batch that all ranks generate from one seed, runs the
SyncBatchNorm layer and a single-process cbn BatchNorm on the whole batch, and asserts that outputs, gradients and
running statistics agree (relative to the largest reference value: float64 <= 1e-12, float32 <= 2e-6), that the
statistics are bitwise identical on all ranks, and that bad input raises on every rank without hanging or changing
state. Rank 0 prints one line ``CBN_MPI_RESULT {json}`` with the worst errors per dtype.
"""
import copy
import json
import os
import pickle
import sys
import tempfile

import numpy as np
from mpi4py import MPI

import cbn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bn_helpers import RefLayer, snapshot  # noqa: E402

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
BOUND = {"float64": 1e-12, "float32": 2e-6}
worst = {}  # (dtype, quantity) -> worst relative error over all cases and ranks


def rel_err(actual, desired, scale=None):
    """max|actual - desired| / scale, scale = max|desired| by default (a floor keeps it finite)."""
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    assert actual.shape == desired.shape, (actual.shape, desired.shape)
    if not desired.size:
        return 0.0
    scale = float(np.max(np.abs(desired))) if scale is None else scale
    return float(np.max(np.abs(actual - desired)) / max(scale, 1e-300))


def dx_scale(layer, dy, dx_ref):
    """Scale of dx = g*(dy - mean(dy) - xhat*mean(dy*xhat)): its terms g*dy can cancel (e.g. two values per
    channel), so errors are measured against max(|dx|, |g*dy|), the size of what was subtracted."""
    g = layer._saved.invstd * (1.0 if layer.weight is None else layer.weight)
    terms = np.abs(np.moveaxis(np.asarray(dy, np.float64), 1, -1) * g)
    return max(float(np.max(terms, initial=0.0)), float(np.max(np.abs(dx_ref), initial=0.0)))


def record(dtype, what, err, case):
    err = comm.allreduce(err, op=MPI.MAX)
    key = f"{np.dtype(dtype).name} {what}"
    worst[key] = max(worst.get(key, 0.0), err)
    assert err <= BOUND[np.dtype(dtype).name], f"{case}: {key} relative error {err:.3e}"


def ordered_sum(a):
    """Sum over the ranks of a float64 array, in rank order (a test-side reduction of per-rank gradients)."""
    rows = comm.allgather(np.asarray(a, np.float64))
    return sum(rows[1:], rows[0].copy())


def same_on_all_ranks(*arrays):
    blob = b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)
    return all(b == blob for b in comm.allgather(blob))


def layouts(layout, spatial):
    """(arranged, logical) for (N, C, *) data with ``spatial`` trailing axes: arranged(a) is the tested array of the
    values a (as they are: "NCHW"; a view of channels-last memory: "channels-last"; with the channels last, for layers
    at axis -1: "axis-1"), logical(b) turns a result of the tested layout back to (N, C, *)."""
    last = (0,) + tuple(range(2, 2 + spatial)) + (1,)

    def arranged(a):
        if layout == "NCHW":
            return a
        a = np.ascontiguousarray(a.transpose(last))
        return a if layout == "axis-1" else a.transpose(np.argsort(last))

    def logical(b):
        return b.transpose(np.argsort(last)) if layout == "axis-1" else b

    return arranged, logical


def check_equal_to_single_process(cls, counts, tail, dtype, seed, momentum=0.1, affine=True, track=True,
                                  offset=0.0, constant=False, layout="NCHW", fused=False):
    """3 training steps (forward + backward) and an eval forward of SyncBatchNorm on shards vs BatchNorm on all.

    layout: the (N, C, *) data as it is, as a view of channels-last memory ("channels-last"), or with the channels
    last and the layers at axis -1 ("axis-1"). fused: the layers with ReLU, each forward with a residual."""
    case = f"{cls.__name__} counts={counts} tail={tail} {np.dtype(dtype).name} momentum={momentum} " \
           f"affine={affine} track={track} offset={offset} constant={constant} layout={layout} fused={fused}"
    rng = np.random.default_rng(seed)
    C = 3
    kw = dict(momentum=momentum, affine=affine, track_running_stats=track, dtype=dtype,
              axis=-1 if layout == "axis-1" else 1, activation="relu" if fused else None)
    arranged, logical = layouts(layout, len(tail))

    sync = cls(C, **kw)
    plain = {cbn.SyncBatchNorm1d: cbn.BatchNorm1d, cbn.SyncBatchNorm2d: cbn.BatchNorm2d,
             cbn.SyncBatchNorm3d: cbn.BatchNorm3d}[cls](C, **kw)
    ref = RefLayer(C, momentum=momentum, affine=affine, track_running_stats=track)
    if affine:
        sync.weight[...] = plain.weight[...] = rng.uniform(0.5, 1.5, C)
        sync.bias[...] = plain.bias[...] = rng.uniform(-0.5, 0.5, C)
        ref.weight, ref.bias = plain.weight.astype(np.float64), plain.bias.astype(np.float64)
    lo = sum(counts[:rank])
    mine = slice(lo, lo + counts[rank])
    for step in range(4):
        training = step < 3
        for layer in (sync, plain, ref):
            layer.training = training
        x = (rng.standard_normal((sum(counts), C) + tail) * rng.uniform(0.5, 3, (1, C) + (1,) * len(tail))
             + offset).astype(dtype)
        if constant:  # a channel with zero variance
            x[:, 0] = 7.0
        dy = rng.standard_normal(x.shape).astype(dtype)
        x_logical, dy_logical = x, dy
        x, dy = arranged(x), arranged(dy)
        # Eval without running statistics uses each shard's own statistics and communicates nothing (as torch).
        local = not training and not track
        xs, dys, part = (x[mine], dy[mine], slice(None)) if local else (x, dy, mine)
        total = (lambda g: g) if local else ordered_sum
        z = rng.standard_normal(x.shape).astype(dtype) if fused else None
        zs = None if z is None else (z[mine] if local else z)
        y = sync(x[mine], residual=None if z is None else z[mine])
        dx = sync.backward(dy[mine])
        y_all, dx_all = plain(xs, residual=zs), plain.backward(dys)
        if fused:
            record(dtype, "dresidual", rel_err(sync.grad_residual, plain.grad_residual[part]), case)
        assert y.strides == y_all[part].strides or y.size <= 1, f"{case}: output layout"
        y, dx, y_all, dx_all, dys = logical(y), logical(dx), logical(y_all), logical(dx_all), logical(dys)
        record(dtype, "y", rel_err(y, y_all[part]), case)
        record(dtype, "dx", rel_err(dx, dx_all[part], dx_scale(plain, dys, dx_all)), case)
        if affine:
            record(dtype, "dweight", rel_err(total(sync.grad_weight), plain.grad_weight), case)
            record(dtype, "dbias", rel_err(total(sync.grad_bias), plain.grad_bias), case)
        if track:
            record(dtype, "running_mean", rel_err(sync.running_mean, plain.running_mean), case)
            record(dtype, "running_var", rel_err(sync.running_var, plain.running_var), case)
            assert sync.num_batches_tracked == plain.num_batches_tracked, case
        if training:  # identical statistics and running statistics on every rank, bit for bit
            stats = [sync._saved.mean, sync._saved.invstd] + ([sync.running_mean, sync.running_var] if track else [])
            assert same_on_all_ranks(*stats), f"{case}: statistics differ between ranks"
        if dtype == np.float64 and not local and not fused:  # and the float64 reference agrees too
            x, dy = x_logical, dy_logical
            y_ref = ref.forward(x)
            dx_ref, dw_ref, db_ref = ref.backward(dy)
            record(dtype, "y vs reference", rel_err(y, y_ref[mine]), case)
            record(dtype, "dx vs reference", rel_err(dx, dx_ref[mine], dx_scale(plain, dy, dx_ref)), case)
            if affine:
                record(dtype, "dweight vs reference", rel_err(ordered_sum(sync.grad_weight), dw_ref), case)
            if track:
                record(dtype, "running_var vs reference", rel_err(sync.running_var, ref.running_var), case)


def expect_error(fn, exc, text, case):
    """fn() must raise exc with text in its message (checked on the calling rank)."""
    try:
        fn()
    except exc as e:
        assert text in str(e), f"{case}: message {str(e)!r} lacks {text!r}"
    else:
        raise AssertionError(f"{case}: no {exc.__name__} raised on rank {rank}")


def check_errors():
    # A rank with a different channel count: ValueError on every rank, no state changed.
    layer = cbn.SyncBatchNorm2d(3 if rank < size - 1 else 4, dtype=np.float64)
    before = snapshot(layer)
    expect_error(lambda: layer(np.ones((2, layer.num_features, 2, 2))), ValueError, "same number of channels",
                 "channel mismatch")
    assert snapshot(layer) == before
    # Bad input on rank 0 only: its own ValueError there, RuntimeError naming rank 0 elsewhere.
    layer = cbn.SyncBatchNorm2d(3)
    before = snapshot(layer)
    x = np.ones((2, 3)) if rank == 0 else np.ones((2, 3, 2, 2))
    expect_error(lambda: layer(x), ValueError if rank == 0 else RuntimeError,
                 "expected 4D input" if rank == 0 else "rank(s) [0] rejected", "bad input on rank 0")
    assert snapshot(layer) == before
    # One value per channel over all ranks: ValueError everywhere.
    layer = cbn.SyncBatchNorm1d(3)
    before = snapshot(layer)
    x = np.ones((1 if rank == 0 else 0, 3))
    expect_error(lambda: layer(x), ValueError, "more than 1 value per channel", "single value")
    assert snapshot(layer) == before
    # One value per rank is fine when there are several ranks.
    layer(np.full((1, 3), float(rank)))
    assert np.allclose(layer.running_mean, 0.1 * (size - 1) / 2)
    # Every shard empty: empty output and gradient, running statistics unchanged, counter counts (as BatchNorm).
    layer = cbn.SyncBatchNorm2d(3)
    before = snapshot(layer)
    y = layer(np.ones((0, 3, 2, 2), np.float32))
    assert y.shape == (0, 3, 2, 2) and layer.backward(np.ones_like(y)).shape == y.shape
    assert layer.num_batches_tracked == 1 and snapshot(layer)["running_var"] == before["running_var"]
    # The same with (empty) masks: nothing to count is not an error when there is nothing at all.
    y = layer(np.ones((0, 3, 2, 2), np.float32), mask=np.ones((0, 2, 2), bool))
    assert y.shape == (0, 3, 2, 2) and layer.num_batches_tracked == 2
    assert snapshot(layer)["running_var"] == before["running_var"]
    # A bad gradient on the last rank: ValueError there, RuntimeError elsewhere.
    layer(np.arange(24.0).reshape(2, 3, 2, 2) + rank)
    dy = np.ones((2, 3, 2, 2)) if rank < size - 1 else np.ones((2, 3, 2))
    expect_error(lambda: layer.backward(dy), ValueError if rank == size - 1 else RuntimeError,
                 "grad_output must have" if rank == size - 1 else f"rank(s) [{size - 1}] rejected", "bad dy")
    expect_error(lambda: cbn.SyncBatchNorm2d(3, comm="world"), TypeError, "mpi4py.MPI.Intracomm", "bad comm")


def check_eval_is_local():
    """Eval forward and backward communicate nothing: rank 0 alone runs them (a collective would hang here)."""
    layer = cbn.SyncBatchNorm2d(3).eval()
    if rank == 0:
        y = layer(np.ones((2, 3, 2, 2), np.float32))
        layer.backward(np.ones_like(y))
    comm.Barrier()


def check_convert_and_state():
    class Net:
        pass

    net = Net()
    shared = cbn.BatchNorm2d(4)
    net.blocks = [shared, {"bn": cbn.BatchNorm1d(2), "again": shared}, (cbn.BatchNorm3d(5), 7)]
    net.head = shared
    net.me = net
    shared.weight[...] = 2.0
    shared(np.random.default_rng(rank).standard_normal((3, 4, 2, 2)).astype(np.float32))
    state, weight = shared.state_dict(), shared.weight
    sub = comm.Split(rank % 2)
    assert cbn.convert_sync_batchnorm(net, comm=sub) is net
    bn = net.head
    assert type(bn) is cbn.SyncBatchNorm2d and bn.comm is sub and bn.weight is weight
    assert net.blocks[0] is bn and net.blocks[1]["again"] is bn
    assert type(net.blocks[1]["bn"]) is cbn.SyncBatchNorm1d and type(net.blocks[2][0]) is cbn.SyncBatchNorm3d
    assert all(np.array_equal(v, state[k]) for k, v in bn.state_dict().items())
    bn(np.ones((1, 4, 2, 2), np.float32) * sub.Get_rank())  # trains on the sub-communicator
    copied = pickle.loads(pickle.dumps(bn))
    assert type(copied) is cbn.SyncBatchNorm2d and copied.comm == MPI.COMM_WORLD
    assert copy.deepcopy(bn).state_dict().keys() == bn.state_dict().keys()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bn.npz")
        bn.save(path)
        loaded = cbn.load(path)
    assert type(loaded) is cbn.SyncBatchNorm2d
    assert all(np.array_equal(v, bn.state_dict()[k]) for k, v in loaded.state_dict().items())
    state = bn.state_dict()
    assert cbn.revert_sync_batchnorm(net) is net
    assert type(net.head) is cbn.BatchNorm2d and net.blocks[1]["again"] is net.head and not hasattr(net.head, "comm")
    assert type(net.blocks[2][0]) is cbn.BatchNorm3d and net.head.weight is weight
    assert all(np.array_equal(v, state[k]) for k, v in net.head.state_dict().items())
    sub.Free()


def check_precise_stats():
    """In precise_stats a SyncBatchNorm records the global batches: its statistics equal one process's BatchNorm
    in precise_stats over the whole batches, bitwise on every rank."""
    rng = np.random.default_rng(99)
    for dtype in (np.float64, np.float32):
        sync, single = cbn.SyncBatchNorm2d(3, dtype=dtype), cbn.BatchNorm2d(3, dtype=dtype)
        with cbn.precise_stats(sync), cbn.precise_stats(single):
            for counts in ([2, 1, 0, 3][:size], [1] * size, [4] + [0] * (size - 1)):
                whole = (rng.standard_normal((sum(counts), 3, 2, 3)) * 5 + 100).astype(dtype)
                start = sum(counts[:rank])
                sync(whole[start:start + counts[rank]])
                single(whole)
                assert sync.num_batches_tracked == 0
        assert same_on_all_ranks(sync.running_mean, sync.running_var)
        assert sync.num_batches_tracked == single.num_batches_tracked == 3
        for key in ("running_mean", "running_var"):
            record(dtype, key, rel_err(getattr(sync, key), getattr(single, key)), "precise_stats")


def check_renorm():
    """A SyncBatchNorm with renorm equals one process's renorm BatchNorm on the whole batch (y, dx, the summed
    parameter gradients, the running statistics over two steps)."""
    rng = np.random.default_rng(7)
    for dtype in (np.float64, np.float32):
        clipping = {"rmax": 1.5, "dmax": 0.5}
        sync = cbn.SyncBatchNorm1d(3, dtype=dtype, renorm=True, renorm_clipping=clipping)
        single = cbn.BatchNorm1d(3, dtype=dtype, renorm=True, renorm_clipping=clipping)
        counts = [2, 0, 3, 1][:size]
        for step in range(2):
            whole = (rng.standard_normal((sum(counts), 3, 4)) * (1 + 2 * step) + step).astype(dtype)
            dy = rng.standard_normal(whole.shape).astype(dtype)
            start, stop = sum(counts[:rank]), sum(counts[:rank + 1])
            y, y_ref = sync(whole[start:stop]), single(whole)
            dx, dx_ref = sync.backward(dy[start:stop]), single.backward(dy)
            record(dtype, "y", rel_err(y, y_ref[start:stop], float(np.max(np.abs(y_ref)))), "renorm")
            record(dtype, "dx", rel_err(dx, dx_ref[start:stop], float(np.max(np.abs(dx_ref)))), "renorm")
            record(dtype, "dweight", rel_err(ordered_sum(sync.grad_weight), single.grad_weight), "renorm")
            record(dtype, "dbias", rel_err(ordered_sum(sync.grad_bias), single.grad_bias), "renorm")
            for key in ("running_mean", "running_var"):
                record(dtype, key, rel_err(getattr(sync, key), getattr(single, key)), "renorm")
        assert same_on_all_ranks(sync.running_mean, sync.running_var)


def masked_statistics(x, mask):
    """Float64 mean and biased variance per channel of (N, C, *) x over the positions where the mask (of x's shape
    without the channel axis, or broadcasting to it) is True."""
    x = np.moveaxis(np.asarray(x, np.float64), 1, -1)
    valid = np.broadcast_to(mask, x.shape[:-1])
    values = x[valid]
    return values.mean(axis=0), values.var(axis=0), len(values)


def check_masked():
    """SyncBatchNorm with masks equals one process's BatchNorm on the whole batch with the whole mask (y, dx, the
    summed parameter gradients, the running statistics over two steps, both dtypes), with the ranks' valid counts
    combined: one rank's shard fully masked (n = 0 there), ranks without samples, masks of the whole shard and
    broadcast ones, channels-last views and the channels at axis -1, ReLU with a residual. Also: fewer than two
    valid positions over all ranks is a ValueError on every rank, a bad mask on one rank raises on every rank, the
    eval forward with a mask communicates nothing."""
    rng = np.random.default_rng(2024)
    # (class, spatial tail, mask kind, shard sizes, fused, layout); the shard of rank 1 is fully masked with "full"
    cases = [(cbn.SyncBatchNorm2d, (4, 5), "full", [2, 3, 1, 2], False, "NCHW"),
             (cbn.SyncBatchNorm1d, (), "full", [3, 2, 4, 1], False, "NCHW"),
             (cbn.SyncBatchNorm1d, (6,), "full", [2, 2, 0, 3], False, "axis-1"),
             (cbn.SyncBatchNorm2d, (4, 5), "full", [3, 1, 2, 0], True, "channels-last"),
             (cbn.SyncBatchNorm2d, (4, 5), "N1W", [1, 2, 3, 2], False, "NCHW"),
             (cbn.SyncBatchNorm2d, (4, 5), "HW", [2, 0, 3, 1], True, "NCHW"),
             (cbn.SyncBatchNorm3d, (2, 3, 2), "full", [2, 1, 0, 2], False, "channels-last")]
    for dtype in (np.float64, np.float32):
        for cls, tail, kind, counts, fused, layout in cases:
            counts = counts[:size]
            case = f"masked {cls.__name__} tail={tail} mask={kind} counts={counts} {np.dtype(dtype).name} " \
                   f"fused={fused} layout={layout}"
            C = 3
            kw = dict(dtype=dtype, axis=-1 if layout == "axis-1" else 1, activation="relu" if fused else None)
            sync = cls(C, **kw)
            plain = {cbn.SyncBatchNorm1d: cbn.BatchNorm1d, cbn.SyncBatchNorm2d: cbn.BatchNorm2d,
                     cbn.SyncBatchNorm3d: cbn.BatchNorm3d}[cls](C, **kw)
            sync.weight[...] = plain.weight[...] = rng.uniform(0.5, 1.5, C)
            sync.bias[...] = plain.bias[...] = rng.uniform(-0.5, 0.5, C)
            arranged, logical = layouts(layout, len(tail))

            start, stop = sum(counts[:rank]), sum(counts[:rank + 1])
            for step in range(2):
                N = sum(counts)
                x = (rng.standard_normal((N, C) + tail) * rng.uniform(0.5, 3, (1, C) + (1,) * len(tail))
                     + 2 * step).astype(dtype)
                dy = rng.standard_normal(x.shape).astype(dtype)
                z = rng.standard_normal(x.shape).astype(dtype) if fused else None
                if kind == "full":
                    mask = rng.random((N,) + tail) < 0.6
                    mask[sum(counts[:1]):sum(counts[:2])] = False  # rank 1 (if any): nothing valid
                    mask[:1] = True  # rank 0 has valid positions
                    mine = mask[start:stop]
                elif kind == "N1W":
                    mask = rng.random((N, 1) + tail[1:]) < 0.6
                    mask[:1] = True
                    mine = mask[start:stop]
                else:  # the same (H, W) mask on every rank, broadcast over the samples
                    mask = rng.random(tail) < 0.6
                    mask.flat[:2] = True
                    mine = mask
                if size > 1 and kind == "full":
                    assert not mine.any() or rank != 1
                x, dy = arranged(x), arranged(dy)
                zs = None if z is None else arranged(z)
                y = sync(x[start:stop], mask=mine, residual=None if zs is None else zs[start:stop])
                dx = sync.backward(dy[start:stop])
                y_all = plain(x, mask=mask, residual=zs)
                dx_all = plain.backward(dy)
                assert y.strides == y_all[start:stop].strides or y.size <= 1, f"{case}: output layout"
                if fused:
                    record(dtype, "masked dresidual", rel_err(sync.grad_residual, plain.grad_residual[start:stop]),
                           case)
                y, dx, y_all, dx_all, dy_l = logical(y), logical(dx), logical(y_all), logical(dx_all), logical(dy)
                record(dtype, "masked y", rel_err(y, y_all[start:stop]), case)
                record(dtype, "masked dx", rel_err(dx, dx_all[start:stop], dx_scale(plain, dy_l, dx_all)), case)
                record(dtype, "masked dweight", rel_err(ordered_sum(sync.grad_weight), plain.grad_weight), case)
                record(dtype, "masked dbias", rel_err(ordered_sum(sync.grad_bias), plain.grad_bias), case)
                record(dtype, "masked running_mean", rel_err(sync.running_mean, plain.running_mean), case)
                record(dtype, "masked running_var", rel_err(sync.running_var, plain.running_var), case)
                assert sync.num_batches_tracked == plain.num_batches_tracked == step + 1, case
                assert same_on_all_ranks(sync._saved.mean, sync._saved.invstd, sync.running_mean,
                                         sync.running_var), f"{case}: statistics differ between ranks"
                if dtype == np.float64 and not fused:  # the statistics of the valid positions, in NumPy
                    mean, var, n = masked_statistics(logical(x), mask)
                    record(dtype, "mean vs reference", rel_err(sync._saved.mean, mean), case)
                    invstd = 1 / np.sqrt(var + sync.eps)
                    record(dtype, "invstd vs reference", rel_err(sync._saved.invstd, invstd), case)
    # Fewer than two valid positions over all ranks (one on rank 0): ValueError on every rank, nothing changed.
    layer = cbn.SyncBatchNorm1d(3, dtype=np.float64)
    layer(np.arange(12.0).reshape(4, 3) + rank)
    before = snapshot(layer)
    for valid in (0, 1):
        mask = np.zeros(4, bool)
        mask[0] = bool(valid) and rank == 0
        try:
            layer(np.ones((4, 3)), mask=mask)
        except ValueError:
            pass
        else:
            raise AssertionError(f"masked: {valid} valid position(s) over all ranks, no ValueError on rank {rank}")
        assert snapshot(layer) == before, f"masked: state changed after {valid} valid position(s)"
    # One valid position on each of two ranks is enough when there are several ranks.
    if size > 1:
        mask = np.zeros(4, bool)
        mask[0] = rank < 2
        layer(np.full((4, 3), float(rank)), mask=mask)
        r0 = np.frombuffer(before["running_mean"][2], np.float64)
        assert np.allclose(layer.running_mean, 0.9 * r0 + 0.1 * 0.5), "masked: one valid position on two ranks"
    # A bad mask on rank 0 only: its TypeError there, RuntimeError naming rank 0 elsewhere; nothing changed.
    layer = cbn.SyncBatchNorm2d(3)
    before = snapshot(layer)
    mask = np.ones((2, 2, 2), np.int32 if rank == 0 else bool)
    expect_error(lambda: layer(np.ones((2, 3, 2, 2), np.float32), mask=mask), TypeError if rank == 0 else RuntimeError,
                 "mask" if rank == 0 else "rank(s) [0] rejected", "bad mask on rank 0")
    assert snapshot(layer) == before
    # Eval with a mask communicates nothing: rank 0 alone runs it.
    layer = cbn.SyncBatchNorm2d(3).eval()
    if rank == 0:
        x = np.random.default_rng(0).standard_normal((2, 3, 2, 2)).astype(np.float32)
        y = layer(x, mask=np.zeros((2, 2, 2), bool))
        assert y.tobytes() == layer(x).tobytes()
    comm.Barrier()


def main():
    # Shard sizes: uneven, with empty ranks, and (1d) one value on some ranks.
    uneven = [1, 2, 3, 4][:size]
    with_empty = [3, 0, 4, 0][:size]
    first_only = [5] + [0] * (size - 1)
    seed = 0
    for dtype in (np.float64, np.float32):
        for counts in (uneven, with_empty, first_only):
            for cls, tail in ((cbn.SyncBatchNorm2d, (4, 5)), (cbn.SyncBatchNorm1d, ()),
                              (cbn.SyncBatchNorm1d, (6,)), (cbn.SyncBatchNorm3d, (2, 3, 2))):
                seed += 1
                check_equal_to_single_process(cls, counts, tail, dtype, seed)
        for kw in (dict(momentum=None), dict(affine=False), dict(track=False), dict(offset=1e3),
                   dict(constant=True)):
            seed += 1
            check_equal_to_single_process(cbn.SyncBatchNorm2d, with_empty, (4, 5), dtype, seed, **kw)
        seed += 1
        check_equal_to_single_process(cbn.SyncBatchNorm1d, [1] * size, (), dtype, seed)
        seed += 1  # longer rows
        check_equal_to_single_process(cbn.SyncBatchNorm2d, uneven, (16, 16), dtype, seed)
        for kw in (dict(track=True), dict(track=False), dict(layout="channels-last")):
            seed += 1
            check_equal_to_single_process(cbn.SyncBatchNorm2d, with_empty, (4, 5), dtype, seed, fused=True, **kw)
        for layout in ("channels-last", "axis-1"):
            for cls, tail in ((cbn.SyncBatchNorm2d, (4, 5)), (cbn.SyncBatchNorm1d, (6,))):
                for counts in (uneven, with_empty):
                    seed += 1
                    check_equal_to_single_process(cls, counts, tail, dtype, seed, layout=layout)
    check_errors()
    check_eval_is_local()
    check_convert_and_state()
    check_precise_stats()
    check_renorm()
    check_masked()
    if rank == 0:
        print("CBN_MPI_RESULT " + json.dumps({"size": size, "worst_relative_error": worst}), flush=True)


main()
