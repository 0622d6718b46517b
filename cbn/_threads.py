"""The thread count of cbn's kernels: each call passes a cap (``thread_cap``) and runs its ``prange`` loops on the
OpenMP runtime's count for the calling thread, at most that cap.

The count for calls from an OS thread is capped by the OpenMP runtime's count for that thread (OMP_NUM_THREADS, or
the CPU count; ``threadpoolctl.threadpool_limits(n, user_api="openmp")`` lowers it while its block runs): what
``set_num_threads`` chose in that thread, else the CPUs this process may use (no cap of ours when OMP_NUM_THREADS
is set). cbn never changes the runtime's setting.
"""
from __future__ import annotations

import math
import os
import threading
from typing import cast

from . import _validate as V
from ._dispatch import kernels as _kernels

_OPENMP = _kernels.openmp_enabled()


def _cgroup_cpu_limit(proc_cgroup: str = "/proc/self/cgroup", mount: str = "/sys/fs/cgroup") -> int | None:
    """Return the CPUs allowed by the cgroup v2 ``cpu.max`` quotas of this process's cgroup and its ancestors
    (rounded up, at least 1), or None when there is no quota or no cgroup v2."""
    try:
        with open(proc_cgroup) as f:
            path = next((line.rstrip("\n")[3:] for line in f if line.startswith("0::")), None)
    except OSError:
        return None
    if path is None:
        return None
    parts = [p for p in path.split("/") if p]
    limits = []
    for depth in range(len(parts), -1, -1):
        try:
            with open(os.path.join(mount, *parts[:depth], "cpu.max")) as f:
                quota, period = f.read().split()[:2]
            if quota != "max" and int(period) > 0:
                limits.append(max(1, math.ceil(int(quota) / int(period))))
        except (OSError, ValueError):
            continue
    return min(limits) if limits else None


def available_cpus() -> int:
    """Return the number of CPUs this process may use: its CPU affinity, capped by a cgroup v2 CPU quota.

    Not the host's core count: ``os.process_cpu_count()`` (Python 3.13+) or ``os.sched_getaffinity`` where
    available, else ``os.cpu_count()``; then the Linux cgroup v2 ``cpu.max`` quota (containers) if lower.

    Returns
    -------
    int
        The number of CPUs, at least 1.
    """
    if hasattr(os, "process_cpu_count"):
        n = os.process_cpu_count()
    elif hasattr(os, "sched_getaffinity"):
        n = len(os.sched_getaffinity(0))
    else:
        n = os.cpu_count()
    n, quota = n or 1, _cgroup_cpu_limit()
    return min(n, quota) if quota else n


# The default cap on the runtime's count: none (0) when OMP_NUM_THREADS is set (it wins) or the build is serial.
_DEFAULT = 0 if os.environ.get("OMP_NUM_THREADS", "").strip() or not _OPENMP else available_cpus()
class _Chosen(threading.local):
    n = 0  # set_num_threads' count in this thread (0: not set)


_chosen = _Chosen()


def thread_cap() -> int:
    """Return the cap on the threads of a kernel call from this thread (0: none): set_num_threads' count, else the
    default. The kernels take the OpenMP runtime's count, at most this."""
    return _chosen.n or _DEFAULT


# (os.cpu_count() costs microseconds a call: read once)
_MAX_THREADS = max(64, 4 * (os.cpu_count() or 1))


def max_num_threads() -> int:
    """Return the largest count ``set_num_threads`` accepts.

    Returns
    -------
    int
        4 x ``os.cpu_count()`` at import, at least 64.
    """
    return _MAX_THREADS


def get_num_threads() -> int:
    """Return the number of threads cbn's parallel kernels use when called from this thread.

    At most the OpenMP runtime's count (OMP_NUM_THREADS, else the CPU count; threadpoolctl lowers it); the
    default is that count, lowered to the CPUs this process may use (``available_cpus()``) unless OMP_NUM_THREADS
    is set.

    Returns
    -------
    int
        The number of threads (1 in a serial build).
    """
    return cast(int, _kernels.num_threads(thread_cap()))


def set_num_threads(n: int) -> None:
    """Set the number of threads cbn's parallel kernels use when called from this thread.

    The OpenMP runtime's count caps it (OMP_NUM_THREADS, else the CPU count; while a
    ``threadpoolctl.threadpool_limits(n, user_api="openmp")`` block runs, its limit).

    Parameters
    ----------
    n : int
        From 1 to ``max_num_threads()``. A serial build accepts it and keeps running on one thread.
    """
    n = V.integer(n, "number of threads", 1)
    if n > max_num_threads():
        raise ValueError(f"number of threads must be <= {max_num_threads()} (4 x os.cpu_count(), at least 64), "
                         f"got {n!r}")
    _chosen.n = n


def _one_thread_after_fork() -> None:
    """In a forked child: 1 thread by default (GNU libgomp hangs in the first parallel region of a forked child
    whose parent already ran one)."""
    global _DEFAULT
    _DEFAULT = 1
    _chosen.n = 0


if _OPENMP and hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_one_thread_after_fork)
