"""cbn: fast, exact, deterministic CPU batch normalization for NumPy arrays (Cython + OpenMP kernels)."""
import os
import platform

import numpy as np

from . import _dispatch, functional
from ._load import load
from ._threads import available_cpus, get_num_threads, max_num_threads, set_num_threads
from .distributed import (
    SyncBatchNorm1d,
    SyncBatchNorm2d,
    SyncBatchNorm3d,
    convert_sync_batchnorm,
    revert_sync_batchnorm,
)
from .frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, fold, freeze
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .precise import precise_stats

_build_info = _dispatch.kernels.build_info  # the kernels in use: the best instruction-set level built and supported
_openmp_enabled = _dispatch.kernels.openmp_enabled

__version__ = "0.1.0"  # the one place the version is written: pyproject.toml reads it (tool.setuptools.dynamic)
__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm1d", "SyncBatchNorm2d", "SyncBatchNorm3d",
           "convert_sync_batchnorm", "revert_sync_batchnorm", "FrozenBatchNorm1d", "FrozenBatchNorm2d",
           "FrozenBatchNorm3d", "fold", "freeze", "functional", "load", "precise_stats", "get_num_threads",
           "set_num_threads", "max_num_threads", "available_cpus", "show_config", "__version__"]


def show_config() -> None:
    """Print the version, the build and the machine's settings that cbn's speed depends on.

    That is: whether the build has OpenMP, the thread count, the instruction-set level in use and the compiler and
    flags of its kernels.
    """
    built = ", ".join(_dispatch.built_levels())
    print(f"cbn {__version__}\n"
          f"  numpy:    {np.__version__}\n"
          f"  python:   {platform.python_version()} ({platform.machine()})\n"
          f"  openmp:   {'on' if _openmp_enabled() else 'off (serial build)'}\n"
          f"  threads:  {get_num_threads()} (available CPUs: {available_cpus()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})\n"
          f"  cpu level: {_dispatch.LEVEL} (built: {built}; {_dispatch.ENV}="
          f"{os.environ.get(_dispatch.ENV, '').strip() or 'unset'})\n"
          f"  compiler: {_build_info()}")
