"""Contracts every process agrees on, and the Piopiy client side.

Importable the way the Piopiy SDK documentation imports it, one package over::

    from piopiy_voice import RestClient, StreamAction, Action

The client-side names load on first use, so processes that only need keys or
contracts do not import ``requests``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as _version
from typing import Any

try:
    __version__ = _version("piopiy-voice")
except PackageNotFoundError:  # running from a tree that was never installed
    __version__ = "0+unknown"

_LAZY = {
    "RestClient": "piopiy_voice.rest",
    "Action": "piopiy_voice.pcmo",
    "StreamAction": "piopiy_voice.pcmo",
    "PiopiyError": "piopiy_voice.errors",
    "PiopiyValidationError": "piopiy_voice.errors",
    "PiopiyNetworkError": "piopiy_voice.errors",
    "PiopiyApiError": "piopiy_voice.errors",
    "PiopiyConfigError": "piopiy_voice.errors",
    "PiopiyProtocolError": "piopiy_voice.errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'piopiy_voice' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
