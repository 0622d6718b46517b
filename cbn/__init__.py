"""cbn: fast, exact, deterministic CPU batch normalization for NumPy arrays (Cython + OpenMP kernels)."""
import numbers
import os
import platform

import numpy as np

from . import functional
from ._kernels import build_info as _build_info
from ._kernels import get_num_threads
from ._kernels import openmp_enabled as _openmp_enabled
from ._kernels import set_num_threads as _set_num_threads
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, load

__version__ = "0.1.0"
__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "functional", "load", "get_num_threads", "set_num_threads",
           "show_config", "__version__"]

if _openmp_enabled() and hasattr(os, "register_at_fork"):
    # GNU libgomp hangs in the first parallel region of a forked child whose parent already ran one (its thread
    # pool is not fork-safe), so a forked child starts with 1 thread. For threads in child processes use the
    # multiprocessing "spawn" or "forkserver" start method.
    os.register_at_fork(after_in_child=lambda: _set_num_threads(1))


def set_num_threads(n):
    """Set the number of threads cbn's parallel kernels use (for the calling thread; like omp_set_num_threads).

    Parameters
    ----------
    n : int
        At least 1. OMP_NUM_THREADS sets the default; threadpoolctl's ``threadpool_limits(n, user_api="openmp")``
        works too.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"number of threads must be an integer >= 1, got {n!r}")
    _set_num_threads(int(n))


def show_config():
    """Print the version, whether the build has OpenMP, the thread count and the compiler and flags used."""
    print(f"cbn {__version__}\n"
          f"  numpy:    {np.__version__}\n"
          f"  python:   {platform.python_version()} ({platform.machine()})\n"
          f"  openmp:   {'on' if _openmp_enabled() else 'off (serial build)'}\n"
          f"  threads:  {get_num_threads()}\n"
          f"  compiler: {_build_info()}")
