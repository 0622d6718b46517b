"""The model walker of freeze, convert_sync_batchnorm, revert_sync_batchnorm and precise_stats."""
from __future__ import annotations

import types
from collections.abc import Callable, Iterable
from typing import Any

from .modules import _BatchNorm


def swap_layers(obj: Any, swap: Callable[[_BatchNorm], object], memo: dict[int, Any] | None = None) -> Any:
    """``obj`` with each batch-norm layer replaced by ``swap(layer)``: lists, dicts and attributes in place, tuples
    rebuilt.

    ``memo`` maps id(object) to its result, so shared layers stay shared and cycles end.
    """
    memo = {} if memo is None else memo
    items: Iterable[Any]
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, _BatchNorm):
        memo[id(obj)] = swap(obj)
        return memo[id(obj)]
    memo[id(obj)] = obj
    if isinstance(obj, (type, types.ModuleType, types.FunctionType, types.MethodType)):
        return obj
    if isinstance(obj, tuple):
        items = [swap_layers(v, swap, memo) for v in obj]
        if any(a is not b for a, b in zip(items, obj)):
            memo[id(obj)] = type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
        return memo[id(obj)]
    assign: Callable[[Any, Any], None]
    if isinstance(obj, (list, dict)):
        items, assign = (enumerate(obj) if isinstance(obj, list) else obj.items()), obj.__setitem__
    elif hasattr(obj, "__dict__"):
        items, assign = vars(obj).items(), lambda k, v: setattr(obj, k, v)
    else:
        return obj
    for k, v in list(items):
        new = swap_layers(v, swap, memo)
        if new is not v:
            assign(k, new)
    return obj
