"""Signed stream URLs.

The platform's media WebSocket carries no call id, handshake or auth of its
own: the only things we learn about a socket are the path and query string of
the ``ws_url`` we put in the PCMO. So that URL names the call and carries an
HMAC over (call id, expiry). The gateway recomputes it and compares in
constant time; an expired or forged URL is refused before the upgrade.

URL shape: ``{public_base}/call/{call_id}?{params...}&exp={unix_seconds}&sig={hex}``
The signature covers the call id, the expiry and every other query parameter.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from .keys import validate_call_id

CALL_PATH_PREFIX = "/call/"
#: One hour (the settings default, PV_STREAM_URL_TTL_S): a leaked URL is a key
#: to the call. An ended call's URL is refused by the gateway whatever its life.
DEFAULT_TTL_S = 3600


class SignatureError(Exception):
    """The URL's signature is missing, malformed, forged or expired."""

    def __init__(self, reason: str, *, expired: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.expired = expired


def _sign(secret: str, call_id: str, exp: int, params: dict[str, str]) -> str:
    if not secret:
        raise ValueError("signing secret must not be empty")
    # Percent-encoded, so a value containing "&" or "=" cannot be re-split into
    # other params with the same signature.
    extra = urlencode(sorted(params.items()))
    msg = f"{call_id}\n{exp}\n{extra}".encode()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


def sign_stream_url(
    public_base: str,
    call_id: str,
    secret: str,
    *,
    ttl_s: int = DEFAULT_TTL_S,
    now: float | None = None,
    params: dict[str, str] | None = None,
) -> str:
    """Build the ``ws_url`` for one call, valid for ``ttl_s`` seconds.

    ``params`` (e.g. ``{"rate": "8000", "mode": "callee"}``) ride in the query
    string and are covered by the signature, so they cannot be altered.
    """
    validate_call_id(call_id)
    scheme = urlsplit(public_base).scheme
    if scheme not in ("ws", "wss"):
        raise ValueError(f"public_base must be a ws:// or wss:// URL, got {public_base!r}")
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be positive, got {ttl_s}")
    extra: dict[str, str] = {}
    for k, v in (params or {}).items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (str, int)):
            # No str() on anything: None would be signed in as "None".
            raise ValueError(f"params.{k} must be a str or int, got {v!r}")
        extra[k] = str(v)
    for reserved in ("exp", "sig"):
        if reserved in extra:
            raise ValueError(f"params may not contain {reserved!r}")
    exp = int((time.time() if now is None else now) + ttl_s)
    base = public_base.rstrip("/")
    query = urlencode({**extra, "exp": exp, "sig": _sign(secret, call_id, exp, extra)})
    return f"{base}{CALL_PATH_PREFIX}{quote(call_id, safe='')}?{query}"


@dataclass(frozen=True, slots=True)
class StreamTarget:
    call_id: str
    expires_at: int
    params: dict[str, str]


def parse_call_path(path: str) -> tuple[str, dict[str, str]] | None:
    """Split a request path into (call id, query params); None if not a call path."""
    parts = urlsplit(path)
    # A reverse proxy may mount us under a prefix: take the last /call/<id>.
    idx = parts.path.rfind(CALL_PATH_PREFIX)
    if idx < 0:
        return None
    call_id = parts.path[idx + len(CALL_PATH_PREFIX):]
    if not call_id or "/" in call_id:
        return None
    # sign_stream_url percent-encodes the id (":" becomes %3A): decode it here.
    call_id = unquote(call_id)
    params = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    return call_id, params


def verify_stream_path(path: str, secret: str, *, now: float | None = None) -> StreamTarget:
    """Check a request path's signature; return the call it names.

    Raises SignatureError (``expired`` set when only the time is wrong).
    Raises ValueError when the path is not a call path at all.
    """
    parsed = parse_call_path(path)
    if parsed is None:
        raise ValueError(f"not a call stream path: {path!r}")
    call_id, params = parsed
    try:
        validate_call_id(call_id)
    except ValueError as exc:
        raise SignatureError(str(exc)) from None
    sig = params.get("sig", "")
    exp_s = params.get("exp", "")
    if not sig or not exp_s:
        raise SignatureError("missing sig or exp")
    try:
        exp = int(exp_s)
    except ValueError:
        raise SignatureError(f"exp is not an integer: {exp_s!r}") from None
    extra = {k: v for k, v in params.items() if k not in ("exp", "sig")}
    expected = _sign(secret, call_id, exp, extra)
    if not hmac.compare_digest(expected.encode(), sig.encode()):
        raise SignatureError("bad signature")
    if exp < (time.time() if now is None else now):
        raise SignatureError("stream URL expired", expired=True)
    return StreamTarget(call_id=call_id, expires_at=exp, params=extra)
