"""Who may do what: API keys with scopes, and signed URLs that expire.

API keys
--------
A key is ``pvk_<id>_<secret>`` (``id`` 8 hex characters, ``secret`` 32 random
bytes, URL-safe). Only its SHA-256 is stored, in the hash ``pv:api:keys``
(field: the hash; value: JSON ``{id, name, scopes, created}``). A key has as
much entropy as a random 256-bit token, so one round of SHA-256 is the right
tool (a slow password hash would only cost each request CPU): a Redis dump
gives nobody a usable key. ``create_key`` returns the key once; it cannot be
recovered, only revoked (by its id) and replaced.

Scopes: ``read`` (list calls, a call's record), ``listen`` (the live audio),
``control`` (steer a live call), ``dial`` (place calls). Bearer auth:
``Authorization: Bearer pvk_…``.

Signed URLs
-----------
Browsers cannot put headers on a WebSocket, and a supervisor may hand a link
to someone without a key. So a call's listen and control URLs carry
``?scope=…&exp=…&sig=…``: an HMAC-SHA256 over (scope, call id, expiry) with a
key derived from ``PV_SIGNING_SECRET`` (domain-separated from the gateway's
stream URLs, so one kind of signature can never pass for the other). A signed
URL grants exactly one scope on exactly one call until ``exp``.

Refusals are ``Refusal(status, reason)``: 401 when no valid credential was
presented, 403 when the credential is valid but does not allow this; each is
counted in ``pv_api_auth_refusals_total{status,reason}``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, Iterable

from piopiy_voice import keys

from .metrics import AUTH_REFUSALS

SCOPES = ("read", "listen", "control", "dial")
_KEY_PREFIX = "pvk_"


class Refusal(Exception):
    """A request without the right to what it asks (401 or 403, with a reason)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def refuse(status: int, reason: str, label: str) -> Refusal:
    """Count a refusal and return it (to be raised)."""
    AUTH_REFUSALS.labels(status=str(status), reason=label).inc()
    return Refusal(status, reason)


@dataclass(frozen=True)
class Principal:
    """Who is asking: an API key (``key_id``) or a signed URL (``call_id``)."""

    scopes: frozenset[str]
    key_id: str = ""
    name: str = ""
    call_id: str = ""   # a signed URL is good for this call only

    def require(self, scope: str, call_id: str | None = None) -> None:
        if scope not in self.scopes:
            raise refuse(403, f"this credential lacks the {scope!r} scope "
                              f"(it has: {', '.join(sorted(self.scopes)) or 'none'})", "scope")
        if self.call_id and call_id != self.call_id:
            raise refuse(403, "this signed URL is for another call", "wrong_call")


# ---------------------------------------------------------------- API keys
def parse_scopes(text: str | Iterable[str]) -> frozenset[str]:
    items = text.split(",") if isinstance(text, str) else list(text)
    scopes = frozenset(s.strip() for s in items if s.strip())
    bad = sorted(scopes - set(SCOPES))
    if bad or not scopes:
        raise ValueError(f"scopes must be a non-empty list of {', '.join(SCOPES)}; got {bad or 'none'}")
    return scopes


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_key() -> tuple[str, str]:
    """(key id, full key)."""
    key_id = secrets.token_hex(4)
    return key_id, f"{_KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def create_key(r: Any, scopes: str | Iterable[str], name: str = "") -> tuple[str, str]:
    """Store a new key (hashed); returns (key id, key). Sync Redis client."""
    scope_set = parse_scopes(scopes)
    key_id, key = new_key()
    record = {"id": key_id, "name": name, "scopes": sorted(scope_set), "created": int(time.time())}
    r.hset(keys.API_KEYS_HASH, hash_key(key), json.dumps(record))
    return key_id, key


def list_keys(r: Any) -> list[dict[str, Any]]:
    return sorted((json.loads(v) for v in r.hvals(keys.API_KEYS_HASH)), key=lambda k: k["created"])


def revoke_key(r: Any, key_id: str) -> bool:
    """Delete the key with that id; False when there is none."""
    for field, value in r.hgetall(keys.API_KEYS_HASH).items():
        if json.loads(value).get("id") == key_id:
            r.hdel(keys.API_KEYS_HASH, field)
            return True
    return False


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise refuse(401, "Authorization must be 'Bearer <api key>'", "malformed_header")
    return token.strip()


async def principal_for_key(ar: Any, key: str) -> Principal:
    """The principal of an API key (async Redis); 401 when unknown or revoked."""
    if not key.startswith(_KEY_PREFIX) or len(key) > 200:
        raise refuse(401, "not an API key of this service", "bad_key")
    raw = await ar.hget(keys.API_KEYS_HASH, hash_key(key))
    if raw is None:
        raise refuse(401, "unknown or revoked API key", "unknown_key")
    rec = json.loads(raw)
    return Principal(scopes=frozenset(rec.get("scopes", ())), key_id=rec.get("id", ""),
                     name=rec.get("name", ""))


# -------------------------------------------------------------- signed URLs
def _url_key(secret: str) -> bytes:
    return hmac.new(secret.encode(), b"piopiy-voice api url v1", hashlib.sha256).digest()


def _url_sig(secret: str, scope: str, call_id: str, exp: int) -> str:
    msg = f"{scope}\n{call_id}\n{exp}".encode()
    return hmac.new(_url_key(secret), msg, hashlib.sha256).hexdigest()


def sign_params(secret: str, scope: str, call_id: str, ttl_s: int,
                now: float | None = None) -> dict[str, str]:
    """Query parameters granting ``scope`` on ``call_id`` for ``ttl_s`` seconds."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")
    keys.validate_call_id(call_id)
    exp = int((time.time() if now is None else now) + ttl_s)
    return {"scope": scope, "exp": str(exp), "sig": _url_sig(secret, scope, call_id, exp)}


def verify_params(secret: str, call_id: str, query: dict[str, str],
                  now: float | None = None) -> Principal:
    """The principal a signed URL's query grants; 401 when forged or expired."""
    scope, exp_s, sig = query.get("scope", ""), query.get("exp", ""), query.get("sig", "")
    if not (scope and exp_s and sig):
        raise refuse(401, "signed URL needs scope, exp and sig", "unsigned")
    if scope not in SCOPES or not exp_s.isdigit() or len(exp_s) > 12:
        raise refuse(401, "signed URL is malformed", "bad_signature")
    expected = _url_sig(secret, scope, call_id, int(exp_s))
    if not hmac.compare_digest(expected.encode(), sig.encode("utf-8", "replace")):
        raise refuse(401, "signed URL has a bad signature", "bad_signature")
    if int(exp_s) < (time.time() if now is None else now):
        raise refuse(401, "signed URL has expired", "expired")
    return Principal(scopes=frozenset({scope}), call_id=call_id)
