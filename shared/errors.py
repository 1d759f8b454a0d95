"""The project's own exceptions: one root, ``PiopiyError``, subclassed by area.

Areas (catch the one you can act on; catch ``PiopiyError`` for "anything of ours"):

* ``PiopiyValidationError`` — bad input (a PCMO, a CLI value, JSON from outside).
* ``PiopiyConfigError`` — the process is configured wrongly (settings, a missing
  ``REDIS_URL`` for a production role). CLIs turn it into exit status 2.
* ``PiopiyProtocolError`` — a peer broke the wire contract.
* ``PiopiyNetworkError`` / ``PiopiyApiError`` — the Piopiy REST client (below).

Bad input never surfaces as a bare ``RecursionError``, ``OverflowError`` or a
pydantic dump: ``load_json`` bounds nesting depth before parsing, and
``from_pydantic`` turns a ``ValidationError`` into one line naming the field.

The Piopiy client side has three kinds, because a caller must react to each differently:

* ``PiopiyValidationError`` — our input was wrong; nothing was sent. Fix the input.
* ``PiopiyNetworkError`` — no usable HTTP reply. ``reached`` says whether the
  request may have arrived at the platform: when it is True a make-call may
  already be ringing someone, so blind resubmission can ring them twice.
* ``PiopiyApiError`` — the platform answered and refused (HTTP status, or the
  ``code`` inside a 200 reply's JSON body).
"""

from __future__ import annotations

import json
import re
from typing import Any

#: Deepest JSON nesting accepted from outside (PCMO lists, control commands,
#: webhook replies). Real messages nest 3-4 levels; Python's parser recurses.
MAX_JSON_DEPTH = 32


class PiopiyError(Exception):
    """Root of every error this project raises on purpose."""


class PiopiyValidationError(PiopiyError, ValueError):
    """Bad input, detected before anything is sent. ``field`` names what was wrong."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class PiopiyConfigError(PiopiyError, ValueError):
    """The process is configured wrongly (a setting, a missing REDIS_URL)."""


class PiopiyProtocolError(PiopiyError, ValueError):
    """A peer sent something that breaks the wire contract."""


class PiopiyNetworkError(PiopiyError):
    """The request got no HTTP reply.

    ``reached`` is False only when the request provably never left (connection
    refused, DNS failure, connect timeout); True means it may have been
    processed (read timeout, connection reset after sending).
    """

    def __init__(self, message: str, *, reached: bool, attempts: int = 1) -> None:
        self.reached = reached
        self.attempts = attempts
        super().__init__(message)


class PiopiyApiError(PiopiyError):
    """The platform replied with an error.

    ``status`` is the HTTP status; ``code`` the platform's own code (the JSON
    body's ``code`` when present, else the HTTP status); ``payload`` the parsed
    JSON body (or the raw text when it was not JSON).
    """

    #: Documented platform codes.
    KNOWN_CODES = {
        420: "authentication failed (appid/secret)",
        422: "missing or invalid property",
        404: "music file not found",
        502: "platform error",
    }

    def __init__(
        self,
        status: int,
        code: int | None,
        payload: Any,
        *,
        retry_after: float | None = None,
        attempts: int = 1,
    ) -> None:
        self.status = status
        self.code = code
        self.payload = payload
        self.retry_after = retry_after
        self.attempts = attempts
        meaning = self.KNOWN_CODES.get(code) if code is not None else None
        detail = ""
        if isinstance(payload, dict):
            for key in ("message", "msg", "error", "status"):
                if isinstance(payload.get(key), str):
                    detail = payload[key]
                    break
        parts = [f"HTTP {status}", f"code {code}" if code is not None else None, meaning, detail]
        super().__init__("Piopiy API error: " + ", ".join(p for p in parts if p))


# --------------------------------------------------------------------------
# Borders: JSON and pydantic errors from outside become PiopiyValidationError
# --------------------------------------------------------------------------

# A JSON string literal (escapes included): its brackets do not nest.
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(rb"[\[\]{}]")


def json_depth(text: str | bytes) -> int:
    """Deepest bracket nesting of a JSON text (strings skipped), without parsing it."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    depth = deepest = 0
    for m in _BRACKETS.finditer(_JSON_STRING.sub(b'""', data)):
        if m.group() in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def load_json(text: str | bytes, field: str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` for text from outside: ``PiopiyValidationError`` naming
    ``field`` when it is not JSON or nests deeper than ``max_depth``."""
    # Fewer opening brackets than the limit cannot nest deeper (the common case:
    # a streamAudio message is one object around base64), so skip the scan.
    if isinstance(text, str):
        opening = text.count("[") + text.count("{")
    else:
        text = bytes(text)
        opening = text.count(b"[") + text.count(b"{")
    if opening > max_depth and json_depth(text) > max_depth:
        raise PiopiyValidationError(field, f"nests deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PiopiyValidationError(field, f"is not valid JSON ({exc})") from None
    except RecursionError:  # belt and braces: the depth check should catch it first
        raise PiopiyValidationError(field, f"nests deeper than {max_depth} levels") from None


def from_pydantic(exc: Any, prefix: str = "") -> PiopiyValidationError:
    """One line naming the field, from a pydantic ``ValidationError`` (first problem,
    plus a count of the others). A ``PiopiyValidationError`` raised inside a
    validator keeps its own field and message."""
    errors = exc.errors()
    if not errors:
        return PiopiyValidationError(prefix or "value", str(exc).splitlines()[0])
    err = errors[0]
    cause = (err.get("ctx") or {}).get("error")
    path = prefix
    for part in err.get("loc", ()):
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    if isinstance(cause, PiopiyValidationError):
        field, message = cause.field if not path else path, cause.message
    else:
        field, message = path or "value", err.get("msg", "invalid")
    more = len(errors) - 1
    if more:
        message += f" (and {more} more problem(s))"
    return PiopiyValidationError(field, message)
