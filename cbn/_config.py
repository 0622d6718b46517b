"""A layer's configuration: one record of its settings, their defaults, their checks and their documentation (the
layers' docstrings and signatures), and the file format's name and version."""
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


# The layer constructors' parameters as the layers' docstrings give them (numpydoc entries), each written once:
# :func:`docstring` makes the docstring of every layer class from them. ``{ndim}`` is the largest accepted rank.
PARAMETERS = {
    "num_features": """int
    C, the number of channels.""",
    "eps": """float
    Added to the variance (finite, >= 0).""",
    "momentum": """float or None
    Running-statistic factor in [0, 1]; None means the cumulative average over all batches seen.""",
    "affine": """bool
    Learn weight (gamma) and bias (beta).""",
    "track_running_stats": """bool
    Keep running statistics for eval; without them batch statistics are used in both modes.""",
    "dtype": """{float32, float64}
    Dtype of the parameters, statistics and computation.""",
    "nan_guard": """bool
    In training, leave the running statistics of a channel unchanged when its batch statistics are not finite
    (NaN or Inf in its values); see :func:`cbn.functional.batch_norm`. The counter still counts the batch.""",
    "axis": """int
    The channel axis: 1 (channels first, and channels-last arrays viewed that way, as torch takes them) or -1
    (channels last, as Keras takes them); any axis in [-{ndim}, {ndim}) of the input.""",
    "activation": """{None, "relu"}
    Fused activation, y = max(0, BN(x) [+ residual]) in the same pass as the normalisation; the backward
    recomputes where the ReLU let values through from x (with a residual: from the saved output).""",
    "virtual_batch_size": """int, optional
    Ghost batches (keyword only): in training, axis 0 is split into groups of this many samples (the last may be
    smaller), each normalised with its own statistics; the running statistics are updated once per call with
    the average over groups of the groups' means and unbiased variances; see
    :func:`cbn.functional.batch_norm`. Eval is unchanged. The channel axis must not be 0.""",
    "renorm": """bool
    Batch renormalization (Ioffe 2017; keyword only, needs ``track_running_stats``, not with
    ``virtual_batch_size``): in training y = weight*((x - mean_B)/sigma_B*r + d) + bias with
    r = clip(sigma_B/sigma, 1/rmax, rmax) and d = clip((mean_B - running_mean)/sigma, -dmax, dmax),
    sigma = sqrt(running_var + eps), r and d constants for the gradient; see :func:`cbn.functional.batch_norm`.""",
    "renorm_clipping": """dict, optional
    {"rmax": >= 1, "dmax": >= 0} (keyword only; a missing key or None: no clipping, as Keras).""",
}
SETTABLE = ("Each setting is an attribute of the layer; all but num_features, affine, track_running_stats and dtype "
            "(they shape the arrays) may be set later, checked as in the constructor.")


def docstring(summary: str, about: str, ndim: int, names: Iterable[str], **own: str) -> str:
    """A layer class's docstring: ``summary``, ``about`` (its extended summary), then the Parameters section of
    its constructor's parameters ``names``, with the entries of ``own`` or else of :data:`PARAMETERS`."""
    entries = "\n".join(f"{name} : {own.get(name) or PARAMETERS[name].replace('{ndim}', str(ndim))}" for name in names)
    return f"{summary}\n\n{about}\n\nParameters\n----------\n{entries}\n"
