"""The answer URL: the platform POSTs an inbound call, we reply with its PCMO.

The platform's request: ``{"action": "inbound", "from", "to", "time", "cmiuuid"}``.
The reply: a ``stream`` action to a freshly signed gateway URL for the call,
followed by the configured flow's actions (``PV_ANSWER_EXTRA_ACTIONS``). The
call id is derived from ``cmiuuid`` (``in-`` + 32 hex of its SHA-256), so a
platform retrying the POST gets the same call, and the record is written like
an outbound call's (state ``placed``, ``direction`` inbound, from, to,
``request_id`` = cmiuuid); from the socket on, gateway and workers cannot tell
the difference.

Who may POST: see ``config`` (token or allow-list, fail closed). The platform
waits for the answer with the caller ringing, so the answer never waits on
Redis for more than ``PV_ANSWER_REDIS_TIMEOUT_S``: the record write is started,
awaited that long, and then the PCMO goes out anyway (the gateway needs no
record to take the socket: the signed URL is the authority; the write goes on
in the background, bounded). Everything here but ``record_inbound`` is pure.

``record_inbound`` writes two things in two slots (Redis Cluster): the record
(``{call_id}``: one MULTI, and only if the call had no record when checked, so a retried
POST never moves a live call back to ``placed``), then the API's index of calls
(``pv:api:calls``). A process dying between them leaves the call out of the
index: it still shows in the list once its socket arrives (``pv:calls``), and
the platform's retried POST indexes it (indexing is idempotent).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
from typing import Any

from piopiy_voice import callrecord, keys
from piopiy_voice.errors import PiopiyValidationError
from piopiy_voice.pcmo import StreamAction
from piopiy_voice.settings import Settings
from piopiy_voice.signing import sign_stream_url

from .auth import refuse
from .calls import index_call
from .config import ApiSettings

_CMIUUID = re.compile(r"\A[A-Za-z0-9_.:-]{1,128}\Z")
_NUMBER = re.compile(r"\A\+?\d{3,20}\Z")


def check_caller(api: ApiSettings, client_ip: str | None, query_token: str | None,
                 authorization: str | None) -> str:
    """Whether the request may come from the platform; returns how it proved it
    ("token" or "allow_list") or raises a counted ``Refusal``."""
    if api.answer_token:
        presented = query_token
        if presented is None and authorization and authorization.lower().startswith("basic "):
            try:
                presented = base64.b64decode(authorization[6:].strip()).decode().partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                presented = None
        if presented is not None and hmac.compare_digest(presented.encode(), api.answer_token.encode()):
            return "token"
    nets = api.allow_networks
    if nets and client_ip:
        try:
            ip = ipaddress.ip_address(client_ip)
        except ValueError:
            ip = None
        if ip is not None and any(ip in net for net in nets):
            return "allow_list"
    if not api.answer_token and not nets:
        raise refuse(403, "answer URL has no credentials or allow-list configured "
                          "(PV_ANSWER_TOKEN / PV_ANSWER_ALLOW_IPS)", "answer_unconfigured")
    if (api.answer_token and (query_token is not None or authorization)):
        raise refuse(403, "answer URL credentials do not match", "answer_bad_token")
    raise refuse(401, "answer URL needs the platform's token or an allowed source address",
                 "answer_no_credentials")


def parse_inbound(body: Any) -> dict[str, str]:
    """The inbound event, checked; ``PiopiyValidationError`` naming the field."""
    if not isinstance(body, dict):
        raise PiopiyValidationError("body", "must be a JSON object")
    if body.get("action") != "inbound":
        raise PiopiyValidationError("action", f"must be 'inbound', got {body.get('action')!r}")
    out: dict[str, str] = {}
    for name in ("from", "to"):
        v = body.get(name)
        text = str(v) if isinstance(v, (str, int)) and not isinstance(v, bool) else ""
        if not _NUMBER.match(text):
            raise PiopiyValidationError(name, f"must be a phone number, got {v!r}")
        out[name] = text.lstrip("+")
    cmiuuid = body.get("cmiuuid")
    if not isinstance(cmiuuid, str) or not _CMIUUID.match(cmiuuid):
        raise PiopiyValidationError("cmiuuid", "must be 1-128 characters of [A-Za-z0-9_.:-]")
    out["cmiuuid"] = cmiuuid
    t = body.get("time")
    out["time"] = str(t)[:64] if isinstance(t, (str, int, float)) and not isinstance(t, bool) else ""
    return out


def inbound_call_id(cmiuuid: str) -> str:
    return "in-" + hashlib.sha256(cmiuuid.encode()).hexdigest()[:32]


def answer_pcmo(settings: Settings, api: ApiSettings, call_id: str) -> list[dict[str, Any]]:
    """The reply: a stream to the gateway (signed for this call) + the flow's actions."""
    params = {"rate": str(api.answer_voice_quality), "mode": api.answer_listen_mode, "dir": "in"}
    if api.answer_flow:
        params["flow"] = api.answer_flow
    url = sign_stream_url(settings.gateway_public_url, call_id, settings.signing_secret,
                          ttl_s=settings.stream_url_ttl_s, params=params)
    builder = StreamAction()
    builder.stream(url, {"listen_mode": api.answer_listen_mode,
                         "voice_quality": api.answer_voice_quality, "stream_on_answer": True})
    return [*builder.actions(), *api.extra_actions]


async def record_inbound(ar: Any, call_id: str, event: dict[str, str], api: ApiSettings) -> None:
    """Write the record (unless the call is already known: a retried POST) and index it."""
    if not await ar.exists(keys.call_meta(call_id)):
        # One slot (the call's): a MULTI is allowed on a cluster too.
        async with ar.pipeline(transaction=True) as pipe:
            callrecord.set_state(pipe, call_id, "placed", direction="inbound", to=event["to"],
                                 caller_id=event["to"], request_id=event["cmiuuid"],
                                 listen_mode=api.answer_listen_mode,
                                 voice_quality=api.answer_voice_quality,
                                 flow=api.answer_flow or None, platform_time=event["time"] or None,
                                 **{"from": event["from"]})
            await pipe.execute()
    async with ar.pipeline(transaction=False) as pipe:
        index_call(pipe, call_id)
        await pipe.execute()
