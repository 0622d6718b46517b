"""``cbn.load``: a layer from a file that ``save`` wrote, the whole file checked before the layer is made."""
from __future__ import annotations

import json
import os
import zipfile
from typing import Any

import numpy as np
import numpy.typing as npt

from ._config import BOOLEANS, FORMAT, FORMAT_VERSION, Config
from .distributed import SyncBatchNorm1d, SyncBatchNorm2d, SyncBatchNorm3d
from .frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, Layer
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d

LAYER_CLASSES: dict[str, type[Layer]] = {
    cls.__name__: cls for cls in (BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm1d, SyncBatchNorm2d,
                                  SyncBatchNorm3d, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d)}
_HEADER = ("format", "version", "class", "training")


def load(path: str | os.PathLike[str]) -> Layer:
    """Load a layer written by ``save`` (a file of any format version so far); reads with ``allow_pickle=False``.

    Parameters
    ----------
    path : str or os.PathLike
        The file.

    Returns
    -------
    BatchNorm1d/2d/3d, SyncBatchNorm1d/2d/3d or FrozenBatchNorm1d/2d/3d
        The layer of the file's class (a SyncBatchNorm on COMM_WORLD), settings, mode, parameters and statistics.

    Raises
    ------
    ValueError
        The file is not a cbn layer file of a known version, or a config key or array is missing, unexpected, of
        the wrong type or out of range, or the class is unknown; the message names the key. Everything is checked
        before the layer is made.
    """
    path = os.fspath(path)
    try:
        arrays, header = _read(path)
        cls, config, training = _layer_config(header)
        state = cls._checked_state(config, arrays, strict=True)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"cannot load {path}: {e.args[0]}") from e
    layer = cls._from_config(config)
    layer._assign(state)
    return layer.train(training)


def _read(path: str) -> tuple[dict[str, npt.NDArray[Any]], Any]:
    """The arrays of the .npz file at ``path`` and its parsed ``__config__``, or ValueError."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError(f"expected an .npz archive, got a single {type(data).__name__}")
        with data:
            arrays = {key: data[key] for key in data.files}
    except (EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"not a readable .npz archive: {e}") from e
    try:
        return arrays, json.loads(str(arrays.pop("__config__", "null")))
    except json.JSONDecodeError as e:
        raise ValueError(f"__config__ must be JSON text, got {e}") from e


def _layer_config(header: Any) -> tuple[type[Layer], Config, bool]:
    """The class, checked Config and mode that a file's ``__config__`` describes, or ValueError or TypeError naming
    the key."""
    version = header.get("version") if isinstance(header, dict) else None
    if not isinstance(header, dict) or header.get("format") != FORMAT or type(version) is not int \
            or not 1 <= version <= FORMAT_VERSION:
        got = (header.get("format"), version) if isinstance(header, dict) else header
        raise ValueError(f"not a cbn layer file of a known version (format {FORMAT!r}, version 1 to "
                         f"{FORMAT_VERSION}), got {got!r}")
    cls = LAYER_CLASSES.get(header.get("class"))  # type: ignore[arg-type]  # (a key of another type: None)
    if cls is None:
        raise ValueError(f"config 'class' names an unknown layer class {header.get('class')!r}, expected one of "
                         f"{sorted(LAYER_CLASSES)}")
    names = cls._settings()
    unexpected = [key for key in header if key not in _HEADER and key not in names]
    if unexpected:
        raise ValueError(f"unexpected config key {unexpected[0]!r}: a {cls.__name__} file holds {list(names)}")
    for key in ("training", *BOOLEANS):
        if not isinstance(header.get(key, False), bool):
            raise ValueError(f"config {key!r} must be true or false, got {header[key]!r}")
    if not isinstance(header.get("dtype", ""), str):
        raise ValueError(f"config 'dtype' must be a dtype name such as 'float32', got {header['dtype']!r}")
    config = cls._configured(**{key: header[key] for key in names if key in header})
    missing = [key for key in ("training", *names) if key not in header and cls._SINCE.get(key, 1) <= version]
    if missing:
        raise ValueError(f"config key {missing[0]!r} is missing: a version-{version} {cls.__name__} file holds it")
    return cls, config, header["training"]
