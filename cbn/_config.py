"""A layer's configuration: one record of its settings, their defaults and their checks, and the file format's name
and version."""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Concatenate, Literal, ParamSpec

import numpy as np
import numpy.typing as npt

from . import _validate as V

P = ParamSpec("P")

FORMAT = "cbn.batchnorm"
FORMAT_VERSION = 5  # every earlier version loads too; each field's "since" is the version that added it to files
# (5: a frozen layer's activation, cbn.frozen)


def _since(version: int, default: object, **options: Any) -> Any:
    """A field with ``default`` (and dataclasses.field's ``options``) that files hold from format ``version`` on."""
    return dataclasses.field(default=default, metadata={"since": version}, **options)


@dataclasses.dataclass(frozen=True)
class Config:
    """The settings of a batch-norm layer, checked and normalised when the record is made (see
    :class:`cbn.BatchNorm2d` for their meaning).

    The layer constructors take these fields as their arguments, in this order (those after ``activation`` by
    keyword only); ``repr``, pickle, ``save``/``load`` and the conversions carry the record whole. What depends on
    the layer class (the channel axis against its ranks, SyncBatchNorm's and FrozenBatchNorm's restrictions) the
    class checks (``_validated``).
    """

    num_features: int
    eps: float = 1e-5
    momentum: float | None = 0.1
    affine: bool = True
    track_running_stats: bool = True
    dtype: npt.DTypeLike = np.float32  # a numpy.dtype once the record is made
    nan_guard: bool = _since(2, False)  # some version-1 files hold it
    axis: int = _since(2, 1)
    activation: Literal["relu"] | None = _since(3, None)
    _: dataclasses.KW_ONLY
    virtual_batch_size: int | None = _since(4, None)
    renorm: bool = _since(4, False)
    renorm_clipping: Mapping[str, float] | None = _since(4, None, hash=False)  # a dict once made: not hashed

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        put("num_features", V.integer(self.num_features, "num_features", 1))
        if V.is_integer(self.axis):  # its range depends on the layer's ranks: the layer class checks it
            put("axis", int(self.axis))
        put("activation", V.activation(self.activation))
        put("virtual_batch_size", V.virtual_batch_size(self.virtual_batch_size))
        clipping = V.renorm(self.renorm, self.renorm_clipping, self.virtual_batch_size)
        if clipping is not None and not self.track_running_stats:
            raise ValueError("renorm needs running statistics: expected track_running_stats=True with renorm=True, "
                             f"got track_running_stats={self.track_running_stats!r}")
        put("renorm", bool(self.renorm))
        put("renorm_clipping", None if clipping is None or self.renorm_clipping is None
            else dict(zip(("rmax", "dmax"), clipping)))
        V.scalars(0.0 if self.momentum is None else self.momentum, self.eps)
        put("eps", float(self.eps))
        put("momentum", None if self.momentum is None else float(self.momentum))
        for name in ("affine", "track_running_stats", "nan_guard"):
            put(name, bool(getattr(self, name)))
        put("dtype", V.compute_dtype(self.dtype))

    def to_json(self, names: Iterable[str]) -> dict[str, Any]:
        """The fields ``names`` as JSON values (the dtype by its name)."""
        return {name: np.dtype(self.dtype).name if name == "dtype" else getattr(self, name) for name in names}

    def shown(self, names: Iterable[str]) -> str:
        """``", name=value"`` for each of the fields ``names`` that differs from its default, as ``repr`` shows them."""
        return "".join(f", {name}={value}" if name == "dtype" else f", {name}={value!r}"
                       for name in names if (value := getattr(self, name)) != DEFAULTS[name])


FIELDS = dataclasses.fields(Config)
NAMES = tuple(field.name for field in FIELDS)
DEFAULTS: dict[str, Any] = {field.name: field.default for field in FIELDS}  # num_features: dataclasses.MISSING
SINCE = {field.name: field.metadata.get("since", 1) for field in FIELDS}
BOOLEANS = tuple(field.name for field in FIELDS if isinstance(field.default, bool))


def signature(*extra: inspect.Parameter) -> inspect.Signature:
    """The signature of a constructor that takes Config's fields, then the keyword-only parameters ``extra``
    (:class:`inspect.Parameter`)."""
    fields = list(inspect.signature(Config).parameters.values())
    self = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return inspect.Signature([self, *fields, *extra])


def constructor(config: Callable[P, Config]) -> Callable[[Callable[..., None]], Callable[Concatenate[Any, P], None]]:
    """A decorator that gives a layer class's ``__init__(self, *args, **kwargs)`` the parameters of ``config``, the
    Config class: the :func:`signature` that inspect and the documentation read, and for type checkers their
    types."""
    def give(init: Callable[..., None]) -> Callable[Concatenate[Any, P], None]:
        init.__signature__ = signature()  # type: ignore[attr-defined]
        return init
    return give
