"""The type aliases of cbn's annotations."""
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

FloatArray: TypeAlias = npt.NDArray[np.floating[Any]]  # what the checks accept and the computations return
Shape: TypeAlias = tuple[int, ...]
BoolArray: TypeAlias = npt.NDArray[np.bool_]  # a statistics mask
Positions: TypeAlias = npt.NDArray[np.intp]  # a mask as the kernels' position weights
