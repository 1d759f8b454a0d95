"""Reading calls: the live-and-recent list, one call's record, timeline and
transcript. All reads, no writes except the API's own index of the calls it
placed or answered.

Which calls exist: Redis has no index of call records, and scanning the key
space is not an option on a shared server. The list is the union of

* the last ``LIFECYCLE_SCAN`` entries of ``pv:calls`` (every call that went
  live and ended recently, whoever placed it), and
* ``pv:api:calls``, a sorted set (call id -> creation time, trimmed to a day
  and ``INDEX_MAX`` entries) of the calls placed through this API or answered
  at its answer URL, so queued and dialing calls show before they are live.

"Who is talking": ``caller`` when the last inbound frame (at most
``TALK_RECENT_MS`` old) is above ``TALK_DBFS`` (after a hand-off that stream
is the person and the human agent: it is the conversation); ``agent`` when our
audio is playing (known from the gateway command streams while this process
taps them, see ``listen``); both, or ``none``.

The transcript is the call's final segments, in their own small stream
(``keys.call_transcript``, written by the transcriber; the inbound stream's
audio lives only ~30 s): one XRANGE.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from piopiy_voice import callrecord, keys
from piopiy_voice import contracts as c
from piopiy_voice.audio import rms_dbfs

INDEX_MAX = 5000
INDEX_MAX_AGE_S = 24 * 3600
LIFECYCLE_SCAN = 2000
LIST_MAX = 200
TALK_DBFS = -45.0
TALK_RECENT_MS = 1000
TIMELINE_MAX = 500

_FIELDS = ("state", "direction", "to", "from", "caller_id", "rate", "voice_quality", "listen_mode",
           "owner", "gateway_id", "campaign", "flow", "end_reason", "reason", "request_id")


def index_call(pipe: Any, call_id: str, now: float | None = None) -> None:
    """Queue the index update for a call this API created (sync or async pipeline)."""
    now = time.time() if now is None else now
    pipe.zadd(keys.API_CALLS_ZSET, {call_id: now})
    pipe.zremrangebyscore(keys.API_CALLS_ZSET, "-inf", now - INDEX_MAX_AGE_S)
    pipe.zremrangebyrank(keys.API_CALLS_ZSET, 0, -INDEX_MAX - 1)


def _f(rec: dict[str, str], name: str) -> float | None:
    try:
        return float(rec[name])
    except (KeyError, ValueError):
        return None


def summarize(call_id: str, rec: dict[str, str], now: float, talking: str | None = None) -> dict[str, Any]:
    """One list row from a call record (pure)."""
    state = rec.get("state", "unknown")
    live_at, ended_at = _f(rec, "live_at"), _f(rec, "ended_at")
    duration = None
    if live_at is not None:
        duration = round(max(0.0, (ended_at if ended_at and ended_at >= live_at else now) - live_at), 1)
    rate = rec.get("rate") or rec.get("voice_quality")
    row: dict[str, Any] = {
        "call_id": call_id, "state": state,
        "direction": rec.get("direction", "outbound"),
        "rate": int(rate) if rate and rate.isdigit() else None,
        "mode": rec.get("listen_mode"), "owner": rec.get("owner"),
        "gateway": rec.get("gateway_id"), "duration_s": duration,
        "talking": talking if state == "live" else None,
        "to": rec.get("to"), "from": rec.get("from") or rec.get("caller_id"),
        "campaign": rec.get("campaign"), "end_reason": rec.get("end_reason") or rec.get("reason"),
        "updated_at": max(filter(None, (_f(rec, f"{s}_at") for s in callrecord.STATES)), default=None),
    }
    return row


def caller_talking(entries: list[tuple[bytes, dict[bytes, bytes]]], now_ms: int) -> bool:
    """Whether the newest audio entry (XREVRANGE order) is recent and loud (pure)."""
    for entry_id, fields in entries:
        if fields.get(b"type") != b"audio":
            continue
        if now_ms - keys.entry_ms(entry_id) > TALK_RECENT_MS:
            return False
        return rms_dbfs(fields.get(b"pcm", b"")) > TALK_DBFS
    return False


def talking_label(caller: bool, agent: bool | None) -> str:
    if caller and agent:
        return "both"
    return "caller" if caller else "agent" if agent else "none"


async def list_calls(ar: Any, *, agent_talking: Callable[[str], bool | None] = lambda cid: None,
                     limit: int = LIST_MAX, state: str | None = None) -> list[dict[str, Any]]:
    """Live calls first (newest first), then the recent ones."""
    ids: dict[str, None] = {}
    for cid in await ar.zrevrange(keys.API_CALLS_ZSET, 0, INDEX_MAX - 1):
        ids[cid.decode()] = None
    for _eid, fields in await ar.xrevrange(keys.CALLS_STREAM, count=LIFECYCLE_SCAN):
        cid = fields.get(b"call_id")
        if cid:
            ids.setdefault(cid.decode(), None)
    order = list(ids)
    async with ar.pipeline(transaction=False) as pipe:
        for cid in order:
            pipe.hgetall(keys.call_meta(cid))
        records = await pipe.execute()
    now = time.time()
    rows = [(cid, callrecord.decode_record(raw)) for cid, raw in zip(order, records) if raw]
    if state:
        rows = [(cid, rec) for cid, rec in rows if rec.get("state") == state]
    live = [cid for cid, rec in rows if rec.get("state") == "live"]
    talking: dict[str, str] = {}
    if live:
        async with ar.pipeline(transaction=False) as pipe:
            for cid in live:
                pipe.xrevrange(keys.call_stream(cid), count=3)
            tails = await pipe.execute()
        now_ms = int(now * 1000)
        for cid, tail in zip(live, tails):
            talking[cid] = talking_label(caller_talking(tail, now_ms), agent_talking(cid))
    out = [summarize(cid, rec, now, talking.get(cid)) for cid, rec in rows]
    out.sort(key=lambda row: (row["state"] != "live", -(row["updated_at"] or 0)))
    return out[:limit]


async def read_record(ar: Any, call_id: str) -> dict[str, str]:
    return callrecord.decode_record(await ar.hgetall(keys.call_meta(call_id)))


async def read_timeline(ar: Any, call_id: str, count: int = TIMELINE_MAX) -> list[dict[str, Any]]:
    out = []
    for entry_id, fields in reversed(await ar.xrevrange(keys.call_timeline(call_id), count=count)):
        line: dict[str, Any] = {k.decode(): v.decode("utf-8", "replace") for k, v in fields.items()}
        line["id"] = entry_id.decode()
        out.append(line)
    return out


def transcript_item(msg: c.Transcript) -> dict[str, Any]:
    return {"segment": msg.segment, "channel": msg.channel, "text": msg.text, "final": msg.final,
            "start_ms": msg.start_ms, "end_ms": msg.end_ms, "confidence": msg.confidence,
            "engine": msg.engine}


async def read_transcript(ar: Any, call_id: str) -> list[dict[str, Any]]:
    """The call's final transcript segments, in call-audio order."""
    entries = await ar.xrange(keys.call_transcript(call_id), min="-", max="+",
                              count=keys.TRANSCRIPT_MAXLEN)
    items = [transcript_item(t) for _eid, t in callrecord.transcript_finals(entries)]
    return sorted(items, key=lambda i: (i["start_ms"], i["segment"]))
