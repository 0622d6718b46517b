"""Cost of SyncBatchNorm2d's communication against its compute, per rank shard.

Run under MPI, e.g. ``OMP_NUM_THREADS=1 mpirun -n 4 python benches/mpi_bench.py`` (as root add
``--allow-run-as-root``; more ranks than cores needs ``--oversubscribe``). Every time is the median over repeats
of the slowest rank's time, ranks started together by a barrier. Columns (microseconds):

- local fwd/bwd: cbn.BatchNorm2d on the shard alone (no communication: what each rank would do without sync);
- sync fwd/bwd: cbn.SyncBatchNorm2d on the shard (statistics of all shards);
- comm fwd/bwd: the collectives alone, with the same buffers: forward = Allgather of 2 doubles (channel-count
  and input check) + Allgather of 2C+1 doubles (count, mean, M2); backward = Allgather of 2C+1 doubles;
- comm %: comm / sync time.
"""
import argparse
import platform
import time

import numpy as np
from mpi4py import MPI

import cbn

SHAPES = [(2, 64, 8, 8), (8, 64, 56, 56), (8, 256, 14, 14), (8, 2048, 7, 7), (32, 3, 64, 64)]


def timed(fn, comm, repeat):
    """Median over ``repeat`` runs of the slowest rank's wall time of fn(), after one warm-up run."""
    fn()
    times = []
    for _ in range(repeat):
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        times.append(comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
    return float(np.median(times)) * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=21)
    parser.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES),
                        help="per-rank shard shapes NxCxHxW, comma separated")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    P = comm.Get_size()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if comm.Get_rank() == 0:
        library = MPI.Get_library_version().split(",")[0].strip(" \0\n")  # e.g. "Open MPI v4.1.4"
        print(f"# cbn {cbn.__version__}, numpy {np.__version__}, Python {platform.python_version()}, "
              f"{library}, {P} ranks x {cbn.get_num_threads()} "
              f"thread(s), float32, {platform.machine()}")
        print(f"{'shard (per rank)':>20} {'ranks':>5} {'local fwd':>10} {'sync fwd':>10} {'comm fwd':>9} "
              f"{'comm %':>6} {'local bwd':>10} {'sync bwd':>10} {'comm bwd':>9} {'comm %':>6}")
    rng = np.random.default_rng(comm.Get_rank())
    for shape in shapes:
        C = shape[1]
        x = rng.standard_normal(shape).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        local, sync = cbn.BatchNorm2d(C), cbn.SyncBatchNorm2d(C)
        header, headers = np.zeros(2), np.empty((P, 2))
        stats, rows = np.zeros(2 * C + 1), np.empty((P, 2 * C + 1))
        t = [timed(lambda: local(x), comm, args.repeat),
             timed(lambda: sync(x), comm, args.repeat),
             timed(lambda: (comm.Allgather(header, headers), comm.Allgather(stats, rows)), comm, args.repeat),
             timed(lambda: local.backward(dy), comm, args.repeat),
             timed(lambda: sync.backward(dy), comm, args.repeat),
             timed(lambda: comm.Allgather(stats, rows), comm, args.repeat)]
        if comm.Get_rank() == 0:
            print(f"{'x'.join(map(str, shape)):>20} {P:>5} {t[0]:>10.1f} {t[1]:>10.1f} {t[2]:>9.1f} "
                  f"{100 * t[2] / t[1]:>5.1f}% {t[3]:>10.1f} {t[4]:>10.1f} {t[5]:>9.1f} {100 * t[5] / t[4]:>5.1f}%",
                  flush=True)


if __name__ == "__main__":
    main()
