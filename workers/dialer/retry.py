"""Explicit, safe retries of failed calls: ``piopiy-voice call retry`` / ``campaign retry``.

A failed dial job is never re-run (``rq requeue`` finds a ``failed`` record
and returns without dialing: on purpose, see ``jobs``). Retrying is a new
attempt with a **new call id** (``<old id>-r<n>``) linked both ways
(``retry_of`` on the new record, ``retried_as`` on the old one), queued with the
request the old record kept (``request``).

Only calls whose outcome is *known* not to have rung are retried:
``outcome`` ``not_placed`` (never reached the platform, or it said 429/503
every time) or ``refused`` (a 4xx: nothing was placed). ``outcome_unknown``
(a read timeout, a 5xx other than 503, a dialer that died mid-request) may have
rung the person: retried only with ``force``. A call is retried once: a second
retry of the same old call answers with the first one's id (retry that one
instead); the link is set atomically, so two operators racing cannot dial twice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from piopiy_voice import keys
from piopiy_voice.errors import PiopiyError

from .api import CallRequest, Enqueued, enqueue_request
from .jobs import NOT_PLACED, OUTCOME_UNKNOWN, REFUSED

RETRYABLE_OUTCOMES = (NOT_PLACED, REFUSED)


class RetryRefused(PiopiyError):
    """This call may not be retried (and why)."""


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def outcome_of(record: dict[str, str]) -> str:
    """The failure outcome of a record (records written before ``outcome``
    existed are classified by their reason)."""
    if record.get("outcome"):
        return record["outcome"]
    reason = record.get("reason", "")
    if reason.startswith(("outcome unknown", "outcome_unknown")) or "inflight" in record:
        return OUTCOME_UNKNOWN
    if reason.startswith(("refused", "invalid request", "dialer misconfigured")):
        return REFUSED
    return NOT_PLACED


def retry_call(conn: Any, call_id: str, *, force: bool = False, settings: Any = None) -> Enqueued:
    """Queue a new attempt of failed call ``call_id`` (see the module docstring).
    Returns the new call (``created`` False when it had been retried already).
    Raises ``RetryRefused`` with the reason otherwise."""
    keys.validate_call_id(call_id)
    meta = keys.call_meta(call_id)
    record = {_s(k): _s(v) for k, v in conn.hgetall(meta).items()}
    if not record:
        raise RetryRefused(f"no call {call_id!r} (unknown or expired)")
    if record.get("retried_as"):
        new = record["retried_as"]
        return Enqueued(new, f"dial-{new}", False)
    if record.get("state") != "failed":
        raise RetryRefused(f"call {call_id} is {record.get('state', '?')}, not failed: nothing to retry")
    outcome = outcome_of(record)
    if outcome not in RETRYABLE_OUTCOMES and not (force and outcome == OUTCOME_UNKNOWN):
        raise RetryRefused(
            f"call {call_id}: outcome unknown (the person may have been rung: "
            f"{record.get('reason', '')!r}); pass --force to dial again anyway")
    if not record.get("request"):
        raise RetryRefused(f"call {call_id}: its record keeps no request to re-send")
    payload = json.loads(record["request"])
    payload.pop("idempotency_key", None)
    payload.pop("start_at", None)
    request = CallRequest.model_validate(payload)
    n = int(record.get("retries", "0")) + 1
    new_id = keys.validate_call_id(f"{call_id}-r{n}"[-128:])
    # The link first, atomically: of two racing retries only one enqueues.
    if not conn.hsetnx(meta, "retried_as", new_id):
        new = _s(conn.hget(meta, "retried_as"))
        return Enqueued(new, f"dial-{new}", False)
    conn.hset(meta, "retries", n)
    try:
        result = enqueue_request(conn, request, settings=settings, call_id=new_id,
                                 extra_record={"retry_of": call_id,
                                               "forced": "1" if outcome == OUTCOME_UNKNOWN else None})
    except Exception:
        conn.hdel(meta, "retried_as")
        raise
    if request.campaign:
        # The old row no longer counts as failed in the campaign's progress.
        conn.hset(keys.campaign_key(request.campaign, "states"), call_id, "retried")
    return result


@dataclass
class CampaignRetry:
    campaign: str
    retried: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  #: call id -> why not


def retry_campaign(conn: Any, name: str, *, force: bool = False, settings: Any = None) -> CampaignRetry:
    """Retry every failed call of campaign ``name`` that ``retry_call`` allows."""
    from .api import _name  # noqa: PLC0415

    _name(name, "name")
    report = CampaignRetry(name)
    failed = [_s(cid) for cid, st in conn.hscan_iter(keys.campaign_key(name, "states"), count=1000)
              if _s(st) == "failed"]
    for cid in sorted(failed):
        try:
            result = retry_call(conn, cid, force=force, settings=settings)
        except (RetryRefused, ValueError) as exc:
            report.skipped[cid] = str(exc)
            continue
        if result.created:
            report.retried.append(result.call_id)
    return report
