"""The call record: one hash per call plus a timeline stream.

The dialer creates the record (queued -> dialing -> placed | failed), the
gateway moves it on (live when the platform's socket arrives, ended when it
goes), workers add their decisions to the timeline. ``piopiy-voice status``
prints the whole life of one call from these two keys.

Functions here only *queue* commands on a pipeline (sync or asyncio: both
buffer commands synchronously), so each caller batches them with its own
writes and decides when to execute.
"""

from __future__ import annotations

import json
import time
from typing import Any

from . import contracts, keys

#: ``suspended``: the gateway lost the call's socket without an end (a drop, a
#: drain) and keeps it resumable for the reconnect grace (``resume_by``); the
#: platform dialing the same URL again makes it ``live``, the grace passing
#: ``ended`` (``socket_lost``). See ``piopiy_voice.gateway.resume``.
STATES = ("queued", "dialing", "placed", "failed", "live", "suspended", "ended")
TIMELINE_MAXLEN = 2000
#: Sorted set: suspended call id -> resume_by (unix seconds). Every gateway
#: sweeps it and ends the calls whose grace passed.
SUSPENDED_ZSET = f"{keys.PREFIX}:calls:suspended"


def _flat(fields: dict[str, Any]) -> dict[str, str]:
    out = {}
    for k, v in fields.items():
        if v is None:
            continue
        out[k] = v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list)) else str(v)
    return out


def timeline(pipe: Any, call_id: str, event: str, **detail: Any) -> None:
    """Append one line to the call's timeline."""
    fields = {"event": event, "t": f"{time.time():.3f}"}
    fields.update(_flat(detail))
    pipe.xadd(keys.call_timeline(call_id), fields, maxlen=TIMELINE_MAXLEN, approximate=True)


def set_state(pipe: Any, call_id: str, state: str, *, campaign_pipe: Any = None, **fields: Any) -> None:
    """Set the record's state (and any other fields) and log it on the timeline.
    The campaign's index of states (another hash slot than the call's) is
    written on ``campaign_pipe`` when given: a transaction over one call's keys
    is then still one slot, as Redis Cluster requires."""
    if state not in STATES:
        raise ValueError(f"unknown call state {state!r}; expected one of {STATES}")
    now = f"{time.time():.3f}"
    record = {"state": state, f"{state}_at": now}
    record.update(_flat(fields))
    pipe.hset(keys.call_meta(call_id), mapping=record)
    timeline(pipe, call_id, f"state.{state}", **fields)
    campaign = fields.get("campaign")
    if campaign:
        side = pipe if campaign_pipe is None else campaign_pipe
        side.hset(keys.campaign_key(campaign, "states"), call_id, state)
        side.expire(keys.campaign_key(campaign, "states"), keys.CAMPAIGN_TTL_S)


def expire_call(pipe: Any, call_id: str, ttl_s: int = keys.CALL_KEY_TTL_AFTER_END) -> None:
    """Every key of an ended call expires after ``ttl_s`` (its audio sooner:
    ``keys.ttl_after_end``)."""
    for key in keys.call_keys(call_id):
        pipe.expire(key, keys.ttl_after_end(key, call_id, ttl_s))


def transcript_finals(entries: Any) -> list[tuple[str, Any]]:
    """(entry id, ``Transcript``) of each final segment among ``entries`` (an
    XRANGE of ``keys.call_transcript``), in order; undecodable entries skipped."""
    out = []
    for eid, fields in entries:
        if fields.get(b"type") != b"transcript":
            continue
        try:
            t = contracts.decode(fields)
        except ValueError:
            continue
        if isinstance(t, contracts.Transcript) and t.final:
            out.append((eid.decode() if isinstance(eid, bytes) else eid, t))
    return out


def decode_record(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode("utf-8", "replace") for k, v in raw.items()}
