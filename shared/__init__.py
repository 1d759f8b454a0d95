"""Contracts every process agrees on, and the Piopiy client side.

Importable the way the Piopiy SDK documentation imports it, one package over::

    from shared import RestClient, StreamAction, Action

The client-side names load on first use, so processes that only need keys or
contracts do not import ``requests``.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "RestClient": "shared.rest",
    "Action": "shared.pcmo",
    "StreamAction": "shared.pcmo",
    "PiopiyError": "shared.errors",
    "PiopiyValidationError": "shared.errors",
    "PiopiyNetworkError": "shared.errors",
    "PiopiyApiError": "shared.errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'shared' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
