"""Errors of the Piopiy client side (PCMO builders, PCMO models, RestClient).

Three kinds, because a caller must react to each differently:

* ``PiopiyValidationError`` — our input was wrong; nothing was sent. Fix the input.
* ``PiopiyNetworkError`` — no usable HTTP reply. ``reached`` says whether the
  request may have arrived at the platform: when it is True a make-call may
  already be ringing someone, so blind resubmission can ring them twice.
* ``PiopiyApiError`` — the platform answered and refused (HTTP status, or the
  ``code`` inside a 200 reply's JSON body).
"""

from __future__ import annotations

from typing import Any


class PiopiyError(Exception):
    """Base of every error raised by the Piopiy client side."""


class PiopiyValidationError(PiopiyError, ValueError):
    """Bad input, detected before anything is sent. ``field`` names what was wrong."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


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
