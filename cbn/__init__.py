"""cbn: fast, exact, deterministic CPU batch normalization for NumPy arrays (Cython + OpenMP kernels)."""
import os
import platform

import numpy as np

from . import functional
from ._kernels import build_info as _build_info
from ._kernels import openmp_enabled as _openmp_enabled
from .distributed import (SyncBatchNorm1d, SyncBatchNorm2d, SyncBatchNorm3d, convert_sync_batchnorm,
                          revert_sync_batchnorm)
from ._threads import available_cpus, get_num_threads, max_num_threads, set_num_threads
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, load

__version__ = "0.1.0"
__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm1d", "SyncBatchNorm2d", "SyncBatchNorm3d",
           "convert_sync_batchnorm", "revert_sync_batchnorm", "functional", "load", "get_num_threads",
           "set_num_threads", "max_num_threads", "available_cpus", "show_config", "__version__"]


def show_config():
    """Print the version, whether the build has OpenMP, the thread count and the compiler and flags used."""
    print(f"cbn {__version__}\n"
          f"  numpy:    {np.__version__}\n"
          f"  python:   {platform.python_version()} ({platform.machine()})\n"
          f"  openmp:   {'on' if _openmp_enabled() else 'off (serial build)'}\n"
          f"  threads:  {get_num_threads()} (available CPUs: {available_cpus()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})\n"
          f"  compiler: {_build_info()}")
