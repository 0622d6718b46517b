"""cbn's public names, as the API reference must document them (docs/conf.py checks it) and numpydoc validates them
(docs/check_docstrings.py): the names of ``cbn.__all__`` and ``cbn.functional.__all__``, the functions and classes of
``cbn.reference``, and the public methods of these classes."""
import inspect

import cbn
import cbn.functional
import cbn.reference


def public_names():
    """Fully qualified names (``cbn.BatchNorm2d``, ``cbn.BatchNorm2d.forward``, ...), sorted."""
    objects = {f"cbn.{n}": getattr(cbn, n) for n in cbn.__all__ if n not in ("functional", "__version__")}
    objects |= {f"cbn.functional.{n}": getattr(cbn.functional, n) for n in cbn.functional.__all__}
    objects |= {f"cbn.reference.{n}": v for n, v in vars(cbn.reference).items()
                if not n.startswith("_") and getattr(v, "__module__", None) == "cbn.reference"}
    for name, cls in list(objects.items()):
        if inspect.isclass(cls):
            objects |= {f"{name}.{n}": v for n, v in inspect.getmembers(cls, inspect.isfunction)
                        if not n.startswith("_") and v.__module__.startswith("cbn")}
    return sorted(objects)
