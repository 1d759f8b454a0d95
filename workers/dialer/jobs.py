"""The RQ job that places one call: ``place_call(call_id, request)``.

Theory of operation
-------------------
A call must ring at most once, and a call that is not placed must say why.

1. The call record (``keys.call_meta``) is the source of truth. A job whose
   call is already placed (``placed``/``live``/``ended``) or finally ``failed``
   returns without dialing — so a duplicated job, a re-run or a late retry is
   harmless.
2. The job waits for its turn *before* claiming the call: the campaign's
   live-call cap (a long wait is handed back to RQ as a delayed retry, so the
   worker serves other calls meanwhile) and the shared calls-per-second rate
   (a short sleep for a reserved instant). Waiting never drops a call.
3. It then atomically claims the call: a Lua script sets ``state=dialing`` and an
   ``inflight`` marker only if no attempt is in flight and the call is not
   placed. The marker is cleared only once the attempt's outcome is known.
4. It sends one make-call request (the ``RestClient`` is built with
   ``max_retries=0``: every attempt is visible on the record and in RQ):

   * reply with ``request_id`` -> ``placed`` (the gateway later marks it
     ``live``/``ended``; if it already did, the state is not moved back);
   * ``PiopiyValidationError`` or a 4xx refusal (other than 429) -> ``failed``
     at once, no retry;
   * not reached (connection refused, DNS, connect timeout), 429 or 503
     (the platform said it did not process it) -> ``queued`` again with
     ``retry_in``, and the job returns an RQ ``Retry`` with the backoff (or
     ``Retry-After`` when longer); after ``max_attempts`` the call is
     ``failed`` ("gave up after N attempts");
   * **outcome unknown** (read timeout or reset after the request was sent:
     ``PiopiyNetworkError.reached``; any other 5xx: 500/502/504 may come from
     a platform that placed the call and then failed to answer) -> ``failed``
     with reason ``outcome unknown``, *never* retried: the platform may be
     ringing the person already, and ringing twice is worse than not ringing
     (the same rule as ``piopiy_voice.rest``). The ``inflight`` marker stays,
     so even a manual re-run refuses to dial. The same holds if a worker dies
     mid-request.

Every failed record also says ``outcome``: ``not_placed`` (never reached the
platform, or gave up on 429/503), ``refused`` (a 4xx: nothing rang) or
``outcome_unknown`` — what ``piopiy-voice call retry`` (``retry``) checks before
it dares to dial again.

A whole dialer that crashes mid-request runs no callback at all: its record
would stay ``dialing`` until RQ's clean-up notices (~14 minutes), or for ever
with no dialer left. Every claim adds the call to ``keys.dialer_key("dialing")``
(a sorted set by the time the request went out) and every outcome removes it;
``sweep_stuck`` — run every few seconds by every dialer and once by
``piopiy-voice status`` — marks calls still ``dialing`` after
``PV_DIAL_STUCK_AFTER_S`` as ``failed`` with ``outcome_unknown`` — judged by
the record's own ``inflight`` time, never only by the index entry's (an entry
read before a newer attempt claimed the call is not that attempt's age). An
entry whose record already tells an outcome (its process died between the
record and the index steps) is dropped, and the campaign's state index is
rewritten from the record.

Every change of the record is one transaction over the call's own keys
(record, timeline, expiries: one hash slot, which Redis Cluster requires); the
dialing index and the campaign's states are written just after it. A dialer
dying between the two leaves either an index entry whose record is no longer
``dialing`` (the sweep drops it) or a campaign hash one state behind the record
(the record is the source of truth). The claim adds the index entry *before*
claiming, so no claimed call is ever missing from the index. The job reads and
writes records on ``REDIS_URL`` and is run by RQ on ``PV_QUEUE_REDIS_URL``
when that is set (``data_connection``). Its settings, that Redis client and
the REST client are the process's (``clients``), not built per job.

Final failures raise ``DialFailed`` (the job was enqueued without an RQ
``retry``), so they land in RQ's failed registry with the reason, and the
record says ``failed`` with the same ``reason``.

The job's timeout (RQ's death penalty: ``SIGALRM`` in the process that runs
the job, forked or not, see ``worker``) can fire anywhere. Inside the
make-call request it is an outcome like a read timeout: ``failed``,
``outcome unknown``, never re-sent. Anywhere else it is a job that stopped
without reporting, below.

A job that dies without reporting (dialer worker killed, work-horse killed,
job timeout outside the request) would leave its record ``queued`` or
``dialing`` for ever. ``on_job_failure`` (the job's RQ failure callback, which
RQ also runs when its registry clean-up finds the job abandoned) and
``on_horse_killed`` (the dialer worker's work-horse-killed handler) mark the
record ``failed``: ``outcome unknown`` (never redialed, ``inflight`` kept)
when an attempt was in flight, ``not placed`` otherwise. Retries are driven by the job
returning ``Retry`` (RQ 3), not by RQ's exception-retry, because only the job
knows whether an error is retryable.
"""

from __future__ import annotations

import logging
import math
import time
from datetime import datetime, timezone
from typing import Any

import redis
from rq import Retry, get_current_job
from rq.timeouts import BaseTimeoutException

from piopiy_voice import callrecord, keys
from piopiy_voice.errors import PiopiyApiError, PiopiyNetworkError, PiopiyValidationError
from piopiy_voice.pcmo import StreamAction
from piopiy_voice.rest import RETRY_STATUSES, RestClient
from piopiy_voice.settings import Settings
from piopiy_voice.signing import sign_stream_url

from . import ratelimit
from .api import CallRequest
from .clients import ProcessClients, process_clients

log = logging.getLogger(__name__)

#: RQ counts returned Retry objects against ``max``; waits for a slot are not
#: failures, so the budget is effectively unbounded and attempts are counted
#: on the record instead (``dial_attempts``).
_RETRY_BUDGET = 1_000_000
#: Longest sleep inside a job (s); longer waits go back to RQ as a delayed retry.
MAX_INLINE_WAIT_S = 60.0
#: How often a call waiting for a campaign slot asks again (s).
CAP_RECHECK_S = 5
#: A campaign slot is held at most the call's duration plus this (s): a call
#: placed but never answered must not keep its slot for ever.
SLOT_MARGIN_S = 180
#: Records of failed and placed calls expire (placed: after duration + this).
FAILED_RECORD_TTL_S = 7 * 24 * 3600
PLACED_RECORD_TTL_S = 2 * 3600

_DONE_STATES = ("placed", "live", "ended")
#: Failure outcomes (record field ``outcome``).
NOT_PLACED, REFUSED, OUTCOME_UNKNOWN = "not_placed", "refused", "outcome_unknown"

#: -> {"ok", attempt} | {"done", state} | {"failed", reason} | {"inflight", since}
#: KEYS: record. ARGV: now (s). One key: one hash slot, as Redis Cluster needs;
#: the dialing index is written around it (``_Attempt._dial``).
_CLAIM = """
local st = redis.call('HGET', KEYS[1], 'state')
if st == 'placed' or st == 'live' or st == 'ended' then return {'done', st} end
if st == 'failed' then return {'failed', redis.call('HGET', KEYS[1], 'reason') or ''} end
local since = redis.call('HGET', KEYS[1], 'inflight')
if since then return {'inflight', since} end
local n = redis.call('HINCRBY', KEYS[1], 'dial_attempts', 1)
redis.call('HSET', KEYS[1], 'inflight', ARGV[1])
return {'ok', tostring(n)}
"""


def dialing_key() -> str:
    """Sorted set: call id -> time its make-call request went out (outcome pending)."""
    return keys.dialer_key("dialing")


class DialFailed(Exception):
    """The call was not placed and will not be retried; ``reason`` says why."""

    def __init__(self, call_id: str, reason: str) -> None:
        self.call_id = call_id
        self.reason = reason
        super().__init__(f"call {call_id}: {reason}")


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _api_status(exc: PiopiyApiError) -> int:
    return exc.status if exc.status >= 400 else (exc.code or 0)


def is_retryable(exc: Exception) -> bool:
    """Whether the platform provably did not place the call and asks us to come
    back: never reached, or 429/503. Any other 5xx may be ringing (see the
    module docstring)."""
    if isinstance(exc, PiopiyNetworkError):
        return not exc.reached
    if isinstance(exc, PiopiyApiError):
        return _api_status(exc) in RETRY_STATUSES
    return False


def is_outcome_unknown(exc: Exception) -> bool:
    """The request may have been processed: never send it again."""
    if isinstance(exc, PiopiyNetworkError):
        return exc.reached
    if isinstance(exc, PiopiyApiError):
        return _api_status(exc) >= 500 and not is_retryable(exc)
    return False


def stream_url(settings: Settings, call_id: str, req: CallRequest) -> str:
    params = {"rate": str(req.voice_quality), "mode": req.listen_mode}
    if req.campaign:
        params["campaign"] = req.campaign
    if req.flow:
        params["flow"] = req.flow
    return sign_stream_url(settings.gateway_public_url, call_id, settings.signing_secret,
                           ttl_s=settings.stream_url_ttl_s, params=params)


def build_pcmo(settings: Settings, call_id: str, req: CallRequest) -> list[dict[str, Any]]:
    """The stream action (signed for this call) followed by the requested extra actions."""
    builder = StreamAction()
    builder.stream(stream_url(settings, call_id, req), {
        "listen_mode": req.listen_mode,
        "voice_quality": req.voice_quality,
        "stream_on_answer": req.stream_on_answer,
    })
    return builder.actions() + req.pcmo_extra()


class _Attempt:
    def __init__(self, conn: redis.Redis, settings: Settings, call_id: str, req: CallRequest,
                 clients: ProcessClients | None = None) -> None:
        # ``clients``: the dialer process's (``place_call``); None for an
        # attempt that only records a failure (the horse-killed and failure hooks).
        self.r = conn
        self.settings = settings
        self.call_id = call_id
        self.req = req
        self.campaign = req.campaign
        self.clients = clients

    # -- record helpers ------------------------------------------------------

    def fail(self, reason: str, *, keep_inflight: bool = False, outcome: str | None = None) -> DialFailed:
        outcome = outcome or (OUTCOME_UNKNOWN if keep_inflight else NOT_PLACED)
        side = self.r.pipeline(transaction=False)
        with self.r.pipeline(transaction=True) as pipe:  # the call's keys: one hash slot
            if not keep_inflight:
                pipe.hdel(keys.call_meta(self.call_id), "inflight")
            callrecord.set_state(pipe, self.call_id, "failed", reason=reason, outcome=outcome,
                                 campaign=self.campaign, campaign_pipe=side)
            callrecord.expire_call(pipe, self.call_id, FAILED_RECORD_TTL_S)
            pipe.execute()
        side.zrem(dialing_key(), self.call_id)
        side.execute()
        if self.campaign and not keep_inflight:
            ratelimit.release_live_slot(self.r, self.campaign, self.call_id)
        log.warning("call %s failed: %s", self.call_id, reason)
        return DialFailed(self.call_id, reason)

    def placed(self, reply: dict[str, Any]) -> dict[str, Any]:
        data = reply.get("data") if isinstance(reply.get("data"), dict) else {}
        request_id = str(reply.get("request_id") or data.get("request_id") or "")
        meta = keys.call_meta(self.call_id)
        # The record's transition is one transaction over the call's keys (one
        # hash slot); the dialing index and the campaign's states follow.
        side = self.r.pipeline(transaction=False)
        side.zrem(dialing_key(), self.call_id)
        with self.r.pipeline(transaction=True) as pipe:
            for _ in range(10):
                try:
                    pipe.watch(meta)
                    state = _s(pipe.hget(meta, "state") or b"")
                    pipe.multi()
                    pipe.hdel(meta, "inflight")
                    if state in ("live", "ended"):
                        # The platform's socket beat the REST reply: keep the later state.
                        pipe.hset(meta, "request_id", request_id)
                        callrecord.timeline(pipe, self.call_id, "placed", request_id=request_id,
                                            note=f"gateway already reported {state}")
                    else:
                        callrecord.set_state(pipe, self.call_id, "placed", request_id=request_id,
                                             campaign=self.campaign, campaign_pipe=side)
                        # A call that is never answered never reaches the gateway,
                        # which is what expires ended calls: bound its record here.
                        callrecord.expire_call(pipe, self.call_id,
                                               self.req.duration + PLACED_RECORD_TTL_S)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        side.execute()
        log.info("call %s placed to %s: request_id=%s", self.call_id, self.req.to, request_id)
        return {"call_id": self.call_id, "state": "placed", "request_id": request_id}

    def retry_later(self, attempt: int, exc: Exception) -> Retry:
        req = self.req
        if attempt >= req.max_attempts:
            raise self.fail(f"gave up after {attempt} attempts: {exc}")
        delay = req.backoff_s[min(attempt - 1, len(req.backoff_s) - 1)]
        retry_after = getattr(exc, "retry_after", None)
        if retry_after:
            delay = max(delay, math.ceil(retry_after))
        side = self.r.pipeline(transaction=False)
        with self.r.pipeline(transaction=True) as pipe:  # the call's keys: one hash slot
            pipe.hdel(keys.call_meta(self.call_id), "inflight")
            callrecord.set_state(pipe, self.call_id, "queued", retry_in=delay, last_error=str(exc),
                                 attempt=attempt, campaign=self.campaign, campaign_pipe=side)
            pipe.execute()
        side.zrem(dialing_key(), self.call_id)
        side.execute()
        if self.campaign:
            ratelimit.release_live_slot(self.r, self.campaign, self.call_id)
        log.warning("call %s attempt %d failed (%s); retry in %ds", self.call_id, attempt, exc, delay)
        return Retry(max=_RETRY_BUDGET, interval=delay)

    def wait(self, reason: str, seconds: float) -> Retry:
        meta = keys.call_meta(self.call_id)
        # One timeline line per wait episode, not one per recheck.
        if self.r.hget(meta, "waiting") != reason.encode():
            with self.r.pipeline(transaction=True) as pipe:  # the call's keys: one slot
                pipe.hset(meta, "waiting", reason)
                callrecord.timeline(pipe, self.call_id, "waiting", reason=reason)
                pipe.execute()
        return Retry(max=_RETRY_BUDGET, interval=max(1, math.ceil(seconds)))

    # -- the attempt -----------------------------------------------------------

    def run(self) -> dict[str, Any] | Retry:
        call_id, req = self.call_id, self.req
        meta = {_s(k): _s(v) for k, v in self.r.hgetall(keys.call_meta(call_id)).items()}
        state = meta.get("state")
        if state in _DONE_STATES:
            log.info("call %s already %s; not dialing again", call_id, state)
            return {"call_id": call_id, "state": state, "request_id": meta.get("request_id", "")}
        if state == "failed":
            return {"call_id": call_id, "state": "failed", "reason": meta.get("reason", "")}
        if "inflight" in meta:
            raise self.fail(_unknown_reason(meta["inflight"]), keep_inflight=True)

        if req.start_at is not None:
            # RQ's scheduler works in whole seconds and may release a job early.
            early = (req.start_at - datetime.now(timezone.utc)).total_seconds()
            if early > MAX_INLINE_WAIT_S:
                return self.wait("start_at", early)
            if early > 0:
                time.sleep(early)

        assert self.clients is not None, "an attempt that dials needs its process's clients"
        try:
            client = self.clients.rest()
            # Built before the claim: a bad setting must fail the call, not
            # leave it claimed with an attempt that never went out.
            pcmo = build_pcmo(self.settings, call_id, req)
        except ValueError as exc:  # PiopiyValidationError is one too
            raise self.fail(f"dialer misconfigured: {exc}", outcome=REFUSED) from None

        if self.campaign:
            granted, wait_s = ratelimit.acquire_live_slot(
                self.r, self.campaign, call_id, self.settings.campaign_max_live,
                req.duration + SLOT_MARGIN_S)
            if not granted:
                return self.wait("campaign_cap", min(CAP_RECHECK_S, max(wait_s, 1)))
        wait_s = ratelimit.reserve_dial_slot(self.r, self.settings.dial_rate_per_s,
                                             max_wait_s=MAX_INLINE_WAIT_S)
        if wait_s > MAX_INLINE_WAIT_S:
            # Nothing reserved: come back when a slot is within reach.
            return self.wait("rate", wait_s - MAX_INLINE_WAIT_S + 1)
        if wait_s > 0:
            time.sleep(wait_s)
        return self._dial(client, pcmo)

    def _dial(self, client: RestClient, pcmo: list[dict[str, Any]]) -> dict[str, Any] | Retry:
        call_id, req = self.call_id, self.req
        now = f"{time.time():.3f}"
        # Into the dialing index first: a dialer dying between the two leaves an
        # index entry whose record is not "dialing", which the sweep just drops;
        # the other order could leave a claimed call nobody sweeps.
        self.r.zadd(dialing_key(), {call_id: now})
        verdict, detail = (_s(x) for x in self.r.eval(_CLAIM, 1, keys.call_meta(call_id), now))
        if verdict != "ok":
            self.r.zrem(dialing_key(), call_id)
        if verdict == "done":
            return {"call_id": call_id, "state": detail}
        if verdict == "failed":
            return {"call_id": call_id, "state": "failed", "reason": detail}
        if verdict == "inflight":
            raise self.fail(_unknown_reason(detail), keep_inflight=True)
        attempt = int(detail)
        side = self.r.pipeline(transaction=False)
        with self.r.pipeline(transaction=True) as pipe:  # the call's keys: one hash slot
            pipe.hdel(keys.call_meta(call_id), "waiting")
            callrecord.set_state(pipe, call_id, "dialing", attempt=attempt, campaign=self.campaign,
                                 campaign_pipe=side)
            pipe.execute()
        side.execute()

        try:
            options = {"duration": req.duration, "extra_params": dict(req.extra_params)}
            log.info("call %s dialing %s (attempt %d)", call_id, req.to, attempt)
            reply = client.voice.call(req.to, req.caller_id, pcmo, options)
        except PiopiyValidationError as exc:
            raise self.fail(f"invalid request: {exc}", outcome=REFUSED) from None
        except PiopiyNetworkError as exc:
            self.clients.discard_rest()  # its connection's state is unknown
            if exc.reached:
                raise self.fail(
                    f"outcome unknown: the request may have reached the platform ({exc}); "
                    "not retried so the callee is not rung twice", keep_inflight=True) from None
            return self.retry_later(attempt, exc)
        except PiopiyApiError as exc:
            if is_retryable(exc):
                return self.retry_later(attempt, exc)
            if is_outcome_unknown(exc):
                raise self.fail(
                    f"outcome unknown: the platform answered {exc} after receiving the request "
                    "(it may be ringing); not retried so the callee is not rung twice",
                    keep_inflight=True) from None
            raise self.fail(f"refused by the platform: {exc}", outcome=REFUSED) from None
        except BaseTimeoutException as exc:  # the job's timeout fired mid-request
            self.clients.discard_rest()
            raise self.fail(f"outcome unknown: the dial job's timeout ran out while the request was "
                            f"in flight ({exc}); not retried so the callee is not rung twice",
                            keep_inflight=True) from exc
        except Exception as exc:  # noqa: BLE001 - whether it was sent is unknown
            self.clients.discard_rest()
            raise self.fail(f"outcome unknown: unexpected error while dialing ({exc!r}); "
                            "not retried so the callee is not rung twice", keep_inflight=True) from exc
        return self.placed(reply)


def sweep_stuck(conn: Any, older_than_s: float, *, now: float | None = None) -> list[str]:
    """Mark calls ``dialing`` for longer than ``older_than_s`` as ``failed``
    (``outcome_unknown``: their dialer died mid-request, nobody knows whether
    the phone rang; ``inflight`` is kept so nothing dials them again). Returns
    the call ids marked. Cheap: one sorted-set range when nothing is stuck."""
    now = time.time() if now is None else now
    stuck = [_s(c) for c in conn.zrangebyscore(dialing_key(), "-inf", now - older_than_s)]
    marked = []
    for call_id in stuck:
        meta = keys.call_meta(call_id)
        side = conn.pipeline(transaction=False)
        with conn.pipeline(transaction=True) as pipe:  # the call's keys: one hash slot
            try:
                pipe.watch(meta)
                rec = {_s(k): _s(v) for k, v in pipe.hgetall(meta).items()}
                since = float(rec.get("inflight") or rec.get("dialing_at") or now)
                if rec.get("state") == "dialing" and since > now - older_than_s:
                    # A newer attempt than this entry's time (the entry was read
                    # before it claimed): not stuck. Keep the entry, at its time.
                    pipe.unwatch()
                    conn.zadd(dialing_key(), {call_id: rec.get("inflight") or since}, xx=True)
                    continue
                pipe.multi()
                if rec.get("state") != "dialing" and rec.get("campaign") and rec.get("state"):
                    # An outcome whose process died before its index steps: the
                    # record is the truth, the campaign's index follows it.
                    side.hset(keys.campaign_key(rec["campaign"], "states"), call_id, rec["state"])
                if rec.get("state") == "dialing":
                    callrecord.set_state(
                        pipe, call_id, "failed", outcome=OUTCOME_UNKNOWN,
                        reason=(f"outcome_unknown: still dialing {now - since:.0f}s after the "
                                "request went out (its dialer died mid-request); not retried so "
                                "the callee is not rung twice"),
                        campaign=rec.get("campaign") or None, campaign_pipe=side)
                    callrecord.expire_call(pipe, call_id, FAILED_RECORD_TTL_S)
                    marked.append(call_id)
                pipe.execute()
            except redis.WatchError:
                continue  # its outcome arrived just now
        # Out of the index once the record says so (a crash in between: the
        # next sweep finds the record failed and only drops the entry).
        side.zrem(dialing_key(), call_id)
        side.execute()
    for call_id in marked:
        log.warning("call %s: stuck in dialing; marked failed (outcome unknown)", call_id)
    return marked


def _unknown_reason(since: str) -> str:
    return (f"outcome unknown: an earlier attempt (started at {since}) never reported back; "
            "not dialing again so the callee is not rung twice")


def mark_abandoned(conn: Any, call_id: str, request: Any, why: str) -> str | None:
    """Make the record of a job that died without reporting say so (see the
    module docstring). Returns the reason written, or None when the record
    already told the outcome (placed, live, ended, failed) or is gone."""
    meta = {_s(k): _s(v) for k, v in conn.hgetall(keys.call_meta(call_id)).items()}
    state = meta.get("state")
    if state is None or state in _DONE_STATES or state == "failed":
        return None
    campaign = request.get("campaign") if isinstance(request, dict) else None
    attempt = _Attempt(conn, None, call_id, CallRequest.model_construct(campaign=campaign))  # type: ignore[arg-type]
    if "inflight" in meta:
        reason = (f"outcome unknown: the dialer job stopped while a request was in flight ({why}); "
                  "not retried so the callee is not rung twice")
        attempt.fail(reason, keep_inflight=True)
    else:
        reason = f"not placed: the dialer job stopped before dialing ({why})"
        attempt.fail(reason)
    return reason


def data_connection(queue_conn: Any, settings: Settings | None = None) -> Any:
    """The Redis of the call records for a job that RQ runs on ``queue_conn``:
    the same one, unless the dial queue has its own (``PV_QUEUE_REDIS_URL``,
    e.g. beside a Redis Cluster: RQ needs a plain Redis), then ``REDIS_URL``
    (one client per process: ``clients``)."""
    if settings is None:
        return process_clients().records(queue_conn)
    return ProcessClients(settings).records(queue_conn)


def on_job_failure(job: Any, connection: Any, exc_type: Any, exc_value: Any, _tb: Any) -> None:
    """RQ ``on_failure`` callback of every dial job."""
    if isinstance(exc_value, DialFailed):
        return  # the record already says why
    call_id, request = (list(job.args) + [None, None])[:2]
    if call_id:
        name = getattr(exc_type, "__name__", str(exc_type))
        mark_abandoned(data_connection(connection), call_id, request,
                       f"{name}: {exc_value}" if str(exc_value) else name)


def on_horse_killed(job: Any, _retpid: int, ret_val: int, _rusage: Any) -> None:
    """RQ ``work_horse_killed_handler`` of the dialer worker (RQ runs no
    failure callback when only the work-horse dies)."""
    call_id, request = (list(job.args) + [None, None])[:2]
    if call_id:
        mark_abandoned(data_connection(job.connection), call_id, request,
                       f"work-horse killed (status {ret_val})")


def place_call(call_id: str, request: dict[str, Any]) -> dict[str, Any] | Retry:
    """RQ job: place call ``call_id`` described by ``request`` (a ``CallRequest`` dump).

    Returns a summary dict, or an RQ ``Retry`` to be run again later; raises
    ``DialFailed`` when the call is finally not placed (see module docstring).
    """
    job = get_current_job()
    clients = process_clients()
    settings = clients.settings
    conn = clients.records(job.connection if job is not None else None)
    keys.validate_call_id(call_id)
    try:
        req = CallRequest.model_validate(request)
    except Exception as exc:  # noqa: BLE001 - a corrupt job must still leave a reason
        attempt = _Attempt(conn, settings, call_id, CallRequest.model_construct(campaign=None))
        raise attempt.fail(f"invalid job payload: {exc}") from None
    return _Attempt(conn, settings, call_id, req, clients).run()
