"""Enqueueing calls: validate a request, give it a stable call id, queue the RQ job.

Idempotency: with an ``idempotency_key`` the call id is derived from the key
(``c-`` + 32 hex of its SHA-256) and the key is recorded in Redis in the same
transaction that writes the ``queued`` record and enqueues the job. Enqueueing
the same key again returns the existing call id and queues nothing, for
``IDEMPOTENCY_TTL_S`` (7 days) — even after the job itself has expired from
RQ. Reusing a key for a *different* request raises ``IdempotencyConflict``
rather than silently returning a call that does something else. Without a key
every request is a new call (``c-`` + a random uuid).

Everything is validated here, before anything is written: a request that gets
into the queue has only platform-side reasons left to fail.

The dial queue on a Redis of its own (``PV_QUEUE_REDIS_URL``; required when
the call records live on a Redis Cluster, where RQ's transactions over its
own keys are refused): no transaction can span the two, so enqueueing is
three steps, each safe to repeat. (1) The idempotency key is claimed with
``SET NX``; (2) the ``queued`` record is written; (3) the job is enqueued on
the queue's Redis under its deterministic id. If (3) fails the record says
``failed`` (not placed) and the key is released, so the same request can be
sent again. If the process dies between (1) and (3), a re-send with the same
key finds the record still ``queued`` and no job, and enqueues it then
(``_ensure_job``). Steps (2)-(3) are bracketed by an entry in
``enqueuing_key()`` (written before the record, removed after the job), so
the dialers' sweep (``sweep_unfinished_enqueues``) finds an enqueue that died
in between even if nobody re-sends it: with a key the job is queued (a re-send
finds this same call); without one the caller never learned the call id and
may have sent the request again under a new one, so the record is marked
``failed`` (not placed) rather than rung. A job never runs
twice for one call either way: its id is the call's, a job still pending
is never pushed again (``_put_job_once``: WATCH/MULTI on the queue's Redis,
so racing re-sends of one key push one job), and the job itself claims the
record before dialing (``piopiy_voice.workers.dialer.jobs``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import Any

import redis
from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from rq import Callback, Queue

from piopiy_voice import callrecord, keys
from piopiy_voice.errors import PiopiyConfigError, PiopiyError, PiopiyValidationError
from piopiy_voice.pcmo_models import (
    BRIDGE_DEFAULTS,
    check_bridge_option,
    LISTEN_MODES,
    VOICE_QUALITIES,
    check_bool,
    check_choice,
    check_choice_int,
    check_int,
    check_number,
    pcmo_to_list,
)
from piopiy_voice.settings import Settings

log = logging.getLogger(__name__)

#: How long an idempotency key keeps answering with its call id.
IDEMPOTENCY_TTL_S = 7 * 24 * 3600
#: Default make-call duration cap (seconds), as in the platform's API.
DEFAULT_DURATION_S = BRIDGE_DEFAULTS["duration"]
#: Retry schedule (seconds) for retryable failures (network before send, 429, 5xx).
DEFAULT_BACKOFF_S = (2, 10, 30, 60)
DEFAULT_MAX_ATTEMPTS = 5
#: RQ job timeout: rate-limit waits are bounded well below it.
JOB_TIMEOUT_S = 180
RESULT_TTL_S = 24 * 3600

_NAME_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
JOB_FUNC = "piopiy_voice.workers.dialer.jobs.place_call"
#: Marks the record of a job that died without reporting (see ``jobs``).
JOB_ON_FAILURE = "piopiy_voice.workers.dialer.jobs.on_job_failure"


class IdempotencyConflict(ValueError):
    """The idempotency key was already used for a different request."""

    def __init__(self, key: str, call_id: str) -> None:
        self.key = key
        self.call_id = call_id
        super().__init__(
            f"idempotency_key {key!r} was already used for a different request (call {call_id})"
        )


def _name(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise PiopiyValidationError(field, f"must be 1-64 characters of [A-Za-z0-9_.:-], got {value!r}")
    return value


class CallRequest(BaseModel):
    """One outbound call. Field checks raise ``PiopiyValidationError`` naming the field.

    ``to`` / ``caller_id`` are normalised to digit strings (country code first).
    ``listen_mode`` defaults to ``both``: on an outbound call the person dialed is
    the callee and the platform's side (a human agent after a transfer) the
    caller, so ``both`` lets the agent hear the person and, after a hand-off,
    keep monitoring the human too. ``stream_on_answer`` defaults to True. ``extra_actions`` are PCMO actions played after the stream
    (e.g. a goodbye ``play`` and a ``hangup``, or a ``bridge`` to a human);
    ``loop``/``timeout`` override those of the bridge actions there (they need
    one). ``duration`` caps the call (s). ``start_at`` must be timezone-aware.
    ``max_attempts``/``backoff_s``: how often and after how long (s) retryable
    failures are tried again.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    to: str
    caller_id: str
    flow: str | None = None
    campaign: str | None = None
    listen_mode: str = "both"
    voice_quality: int = 8000
    stream_on_answer: bool = True
    duration: int = DEFAULT_DURATION_S
    loop: int | None = None
    timeout: int | None = None
    extra_params: dict[str, str] = {}
    extra_actions: list[dict[str, Any]] = []
    start_at: datetime | None = None
    idempotency_key: str | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    backoff_s: list[int] = list(DEFAULT_BACKOFF_S)

    @field_validator("to", "caller_id", mode="before")
    @classmethod
    def _number(cls, v: Any, info) -> str:
        return str(check_number(v, info.field_name))

    @field_validator("flow", "campaign", mode="before")
    @classmethod
    def _names(cls, v: Any, info) -> str | None:
        return _name(v, info.field_name)

    @field_validator("listen_mode", mode="before")
    @classmethod
    def _mode(cls, v: Any) -> str:
        return check_choice(v, "listen_mode", LISTEN_MODES)

    @field_validator("voice_quality", mode="before")
    @classmethod
    def _vq(cls, v: Any) -> int:
        return check_choice_int(v, "voice_quality", VOICE_QUALITIES)

    @field_validator("stream_on_answer", mode="before")
    @classmethod
    def _soa(cls, v: Any) -> bool:
        return check_bool(v, "stream_on_answer")

    @field_validator("duration", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> int:
        return check_bridge_option(v, "duration")

    @field_validator("loop", mode="before")
    @classmethod
    def _loop(cls, v: Any) -> int | None:
        return None if v is None else check_bridge_option(v, "loop")

    @field_validator("timeout", mode="before")
    @classmethod
    def _timeout(cls, v: Any) -> int | None:
        return None if v is None else check_bridge_option(v, "timeout")

    @field_validator("extra_params", mode="before")
    @classmethod
    def _params(cls, v: Any) -> dict[str, str]:
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise PiopiyValidationError("extra_params", f"must be an object of strings, got {type(v).__name__}")
        out = {}
        for k, val in v.items():
            if not isinstance(k, str) or not k:
                raise PiopiyValidationError("extra_params", f"keys must be non-empty strings, got {k!r}")
            if isinstance(val, bool) or not isinstance(val, (str, int, float)):
                raise PiopiyValidationError(f"extra_params.{k}", f"must be a string or number, got {val!r}")
            out[k] = str(val)
        return out

    @field_validator("extra_actions", mode="before")
    @classmethod
    def _actions(cls, v: Any) -> list[dict[str, Any]]:
        if v is None or v == []:
            return []
        actions = pcmo_to_list(v, "extra_actions")
        if any(a.get("action") == "stream" for a in actions):
            raise PiopiyValidationError("extra_actions", "must not contain a stream action (the dialer adds it)")
        return actions

    @field_validator("start_at", mode="before")
    @classmethod
    def _start(cls, v: Any) -> datetime | None:
        if v is None:
            return None
        if isinstance(v, str):
            try:
                v = datetime.fromisoformat(v.replace("Z", "+00:00"))
            except ValueError:
                raise PiopiyValidationError("start_at", f"must be an ISO 8601 time, got {v!r}") from None
        if not isinstance(v, datetime):
            raise PiopiyValidationError("start_at", f"must be a datetime, got {type(v).__name__}")
        if v.tzinfo is None:
            raise PiopiyValidationError("start_at", "must carry a timezone (e.g. 2026-01-01T09:00:00+05:30 or ...Z)")
        return v.astimezone(timezone.utc)

    @field_validator("idempotency_key", mode="before")
    @classmethod
    def _key(cls, v: Any) -> str | None:
        if v is None:
            return None
        if not isinstance(v, str) or not 1 <= len(v) <= 256:
            raise PiopiyValidationError("idempotency_key", f"must be a string of 1-256 characters, got {v!r}")
        return v

    @field_validator("max_attempts", mode="before")
    @classmethod
    def _attempts(cls, v: Any) -> int:
        return check_int(v, "max_attempts", minimum=1, maximum=50)

    @field_validator("backoff_s", mode="before")
    @classmethod
    def _backoff(cls, v: Any) -> list[int]:
        if not isinstance(v, (list, tuple)) or not v:
            raise PiopiyValidationError("backoff_s", f"must be a non-empty list of seconds, got {v!r}")
        return [check_int(x, "backoff_s", minimum=0, maximum=3600) for x in v]

    @model_validator(mode="before")
    @classmethod
    def _unknown(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                raise PiopiyValidationError(unknown[0], "is not a call option")
        return data

    @model_validator(mode="after")
    def _bridge_options(self) -> "CallRequest":
        # The make-call API takes loop/timeout only inside a bridge action; a
        # streaming call has one only when the caller asked for a transfer.
        for name in ("loop", "timeout"):
            if getattr(self, name) is not None and not any(
                    a.get("action") == "bridge" for a in self.extra_actions):
                raise PiopiyValidationError(
                    name, "applies to a bridge (transfer) action; add one to extra_actions")
        return self

    def pcmo_extra(self) -> list[dict[str, Any]]:
        """``extra_actions`` with ``loop``/``timeout`` applied to their bridge actions."""
        out = []
        for action in self.extra_actions:
            action = dict(action)
            if action.get("action") == "bridge":
                for name in ("loop", "timeout"):
                    if getattr(self, name) is not None:
                        action[name] = getattr(self, name)
            out.append(action)
        return out

    def call_id(self) -> str:
        if self.idempotency_key is None:
            return "c-" + uuid.uuid4().hex
        return "c-" + hashlib.sha256(self.idempotency_key.encode()).hexdigest()[:32]

    def fingerprint(self) -> str:
        """Hash of what the call does (the start time is left out: "in 30 s"
        recomputed on a re-run must still match)."""
        body = self.model_dump(mode="json", exclude={"start_at", "idempotency_key"})
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def build_request(settings: Settings | None = None, **fields: Any) -> CallRequest:
    """A validated ``CallRequest``; ``caller_id`` defaults to ``PIOPIY_CALLER_ID``.

    Raises ``PiopiyValidationError`` (a ``ValueError``) naming the bad field.
    """
    settings = settings or Settings.from_env()
    if fields.get("caller_id") is None:
        if not settings.piopiy_caller_id:
            raise PiopiyValidationError("caller_id", "not given and PIOPIY_CALLER_ID is not set")
        fields["caller_id"] = settings.piopiy_caller_id
    for k in [k for k, v in fields.items() if v is None and k not in ("flow", "campaign", "loop", "timeout",
                                                                     "start_at", "idempotency_key")]:
        del fields[k]  # None means "default" for the rest
    from pydantic import ValidationError

    try:
        return CallRequest.model_validate(fields)
    except ValidationError as exc:
        # Our field checks raise PiopiyValidationError; pydantic wraps them.
        err = exc.errors()[0]
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, PiopiyValidationError):
            raise cause from None
        field = ".".join(str(p) for p in err["loc"]) or "request"
        raise PiopiyValidationError(field, err["msg"]) from None


def job_id_for(call_id: str) -> str:
    return f"dial-{call_id}"


@dataclass(frozen=True)
class Enqueued:
    call_id: str
    job_id: str
    created: bool  #: False when the idempotency key had already been used
    start_at: datetime | None = None


def _idem_key(key: str) -> str:
    return keys.dialer_key("idem:" + hashlib.sha256(key.encode()).hexdigest())


class RedisFull(PiopiyError):
    """Redis is at ``maxmemory``: nothing was queued (live calls come first)."""


def _queued_record(pipe: Any, call_id: str, record: dict[str, Any], extra: dict[str, Any]) -> None:
    """The record of a queued call, without a timeline line: a stream costs
    ~4.7 KB from its first entry, two thirds of what a queued call cost. The
    timeline starts when the call is dialed; ``queued_at`` keeps the time."""
    fields = {k: (v if isinstance(v, str) else str(v)) for k, v in {**record, **extra}.items()
              if v is not None}
    fields.update(state="queued", queued_at=f"{time.time():.3f}")
    pipe.hset(keys.call_meta(call_id), mapping=fields)
    if record.get("campaign"):
        pipe.hset(keys.campaign_key(record["campaign"], "states"), call_id, "queued")
        pipe.expire(keys.campaign_key(record["campaign"], "states"), keys.CAMPAIGN_TTL_S)


def enqueue_request(conn: redis.Redis, request: CallRequest, *, queue_name: str | None = None,
                    settings: Settings | None = None, call_id: str | None = None,
                    extra_record: dict[str, Any] | None = None) -> Enqueued:
    """Queue ``request`` for a dialer worker (or schedule it at ``request.start_at``).

    ``call_id`` overrides the id derived from the request (a retry's new id);
    ``extra_record`` adds fields to the record. Raises ``RedisFull`` when Redis
    refuses the write for lack of memory."""
    try:
        return _enqueue(conn, request, queue_name, settings, call_id, extra_record or {})
    except redis.ResponseError as exc:
        from piopiy_voice.workers.ownership import is_oom  # noqa: PLC0415

        if is_oom(exc):
            raise RedisFull(
                "Redis is out of memory (maxmemory reached): the call was NOT queued; live "
                "calls keep the memory. Retry later or raise maxmemory (deploy/redis.conf)."
            ) from None
        raise


@lru_cache(maxsize=8)
def _queue_client(url: str, socket_timeout: float) -> Any:
    from piopiy_voice.redisconn import connect  # noqa: PLC0415

    return connect(url, socket_timeout=socket_timeout)


def queue_connection(conn: Any, settings: Settings) -> Any:
    """The Redis of the dial queue for a caller holding ``conn`` (the call
    records'): ``conn`` itself, unless ``PV_QUEUE_REDIS_URL`` names another
    (one client per URL and process). A cluster ``conn`` without it is refused
    in one line: RQ cannot run on Redis Cluster."""
    if settings.queue_redis_url:
        return _queue_client(settings.queue_redis_url, settings.redis_socket_timeout_s)
    from piopiy_voice.redisconn import is_cluster_client  # noqa: PLC0415

    if is_cluster_client(conn):
        raise PiopiyConfigError("the call records are on a Redis Cluster; the dial queue (RQ) needs "
                                "a plain Redis: set PV_QUEUE_REDIS_URL")
    return conn


def _put_job(queue: Queue, request_start: datetime | None, call_id: str, job_id: str,
             payload: dict[str, Any], description: str, pipe: Any = None) -> None:
    opts = dict(job_id=job_id, result_ttl=RESULT_TTL_S, pipeline=pipe,
                on_failure=Callback(JOB_ON_FAILURE), description=description)
    if request_start is not None:
        queue.enqueue_at(request_start, JOB_FUNC, args=(call_id, payload), job_timeout=JOB_TIMEOUT_S, **opts)
    else:
        queue.enqueue_call(JOB_FUNC, args=(call_id, payload), timeout=JOB_TIMEOUT_S, **opts)


#: Job statuses of a job that is still going to run (or running): pushing the
#: same id again would run it twice.
_PENDING = {b"queued", b"started", b"scheduled", b"deferred"}


def _put_job_once(queue: Queue, request_start: datetime | None, call_id: str, job_id: str,
                  payload: dict[str, Any], description: str) -> bool:
    """``_put_job`` unless a job of that id is pending already: two enqueuers of
    one call (a re-send racing the first enqueue, two re-sends) push it once.
    WATCH/MULTI on the queue's Redis, which is never a cluster. A finished or
    failed job of the id is replaced (the record says whether to dial)."""
    from rq.job import Job  # noqa: PLC0415

    job_key = Job.key_for(job_id)
    with queue.connection.pipeline() as pipe:
        for _ in range(10):
            try:
                pipe.watch(job_key)
                if pipe.hget(job_key, "status") in _PENDING:
                    pipe.unwatch()
                    return False
                pipe.multi()
                _put_job(queue, request_start, call_id, job_id, payload, description, pipe)
                pipe.execute()
                return True
            except redis.WatchError:
                continue
    raise RuntimeError(f"could not enqueue the dial job of call {call_id}: its job kept changing")


def _enqueue_apart(conn: Any, queue: Queue, request: CallRequest, call_id: str, job_id: str,
                   fingerprint: str, idem: str | None, payload: dict[str, Any],
                   record: dict[str, Any], extra_record: dict[str, Any]) -> Enqueued:
    """Enqueue with the queue on another Redis than the records (see the module docstring)."""
    if idem:
        claim = json.dumps({"call_id": call_id, "fingerprint": fingerprint})
        if not conn.set(idem, claim, nx=True, ex=IDEMPOTENCY_TTL_S):
            prior = json.loads(conn.get(idem) or claim)
            if prior.get("fingerprint") != fingerprint:
                raise IdempotencyConflict(request.idempotency_key, prior["call_id"])
            _ensure_job(conn, queue, prior["call_id"])
            return Enqueued(prior["call_id"], job_id_for(prior["call_id"]), False, request.start_at)
    # Its own round trip, before the record: on a cluster one pipeline's
    # commands to different nodes land in no set order.
    conn.zadd(enqueuing_key(), {call_id: time.time()})
    pipe = conn.pipeline(transaction=False)
    _queued_record(pipe, call_id, record, extra_record)
    pipe.execute()
    try:
        _put_job_once(queue, request.start_at, call_id, job_id, payload, f"dial {request.to}")
    except Exception as exc:
        pipe = conn.pipeline(transaction=False)
        callrecord.set_state(pipe, call_id, "failed", outcome="not_placed",
                             reason=f"not placed: could not enqueue the dial job ({exc})",
                             campaign=request.campaign)
        if idem:
            pipe.delete(idem)
        pipe.zrem(enqueuing_key(), call_id)
        pipe.execute()
        raise
    conn.zrem(enqueuing_key(), call_id)
    return Enqueued(call_id, job_id, True, request.start_at)


def enqueuing_key() -> str:
    """Sorted set (dial queue apart): call id -> time its enqueue began. An
    entry older than a few seconds is an enqueue that died between its record
    and its job (``sweep_unfinished_enqueues``)."""
    return keys.dialer_key("enqueuing")


def sweep_unfinished_enqueues(conn: Any, queue: Queue, older_than_s: float, *,
                              now: float | None = None) -> list[tuple[str, str]]:
    """Finish the enqueues (queue apart) that began more than ``older_than_s``
    ago and never removed their ``enqueuing_key()`` entry: (call id, what was
    done) for each. A job exists: nothing to do. The record is still
    ``queued`` with an idempotency key: its job is queued now (``"queued"``;
    a re-send of the key finds this same call). Without a key: marked
    ``failed``, not placed (``"failed"``): the caller got no call id and may
    have sent the request again as a new call, so ringing this one could ring
    the person twice. No record (died before writing it): the entry goes."""
    from rq.job import Job  # noqa: PLC0415

    now = time.time() if now is None else now
    done: list[tuple[str, str]] = []
    for raw, began in conn.zrangebyscore(enqueuing_key(), "-inf", now - older_than_s, withscores=True):
        call_id = raw.decode() if isinstance(raw, bytes) else raw
        meta = keys.call_meta(call_id)
        if Job.exists(job_id_for(call_id), connection=queue.connection):
            conn.zrem(enqueuing_key(), call_id)
            continue
        side = conn.pipeline(transaction=False)  # the campaign's index: another slot
        with conn.pipeline(transaction=True) as pipe:  # the call's keys: one hash slot
            try:
                pipe.watch(meta)
                rec = callrecord.decode_record(pipe.hgetall(meta))
                if rec.get("state") == "queued" and rec.get("idempotency_key"):
                    pipe.unwatch()
                    _ensure_job(conn, queue, call_id)
                    done.append((call_id, "queued"))
                elif rec.get("state") == "queued":
                    pipe.multi()
                    callrecord.set_state(
                        pipe, call_id, "failed", outcome="not_placed",
                        reason=("not placed: its enqueue stopped between the record and the job "
                                f"{now - began:.0f}s ago "
                                "and it had no idempotency key, so it is not rung: the request may "
                                "have been sent again as a new call"),
                        campaign=rec.get("campaign") or None, campaign_pipe=side)
                    pipe.execute()
                    side.execute()
                    done.append((call_id, "failed"))
                else:
                    pipe.unwatch()
            except redis.WatchError:
                continue  # its job claimed it just now: the next sweep drops the entry
        conn.zrem(enqueuing_key(), call_id)
    for call_id, what in done:
        log.warning("call %s: its enqueue never finished; %s", call_id,
                    "its job is queued now" if what == "queued" else "marked failed (not placed)")
    return done


def _ensure_job(conn: Any, queue: Queue, call_id: str) -> None:
    """A re-sent request whose first enqueue died between its record and its
    job: the record is still ``queued`` and no job exists; enqueue it now."""
    from rq.job import Job  # noqa: PLC0415

    job_id = job_id_for(call_id)
    if Job.exists(job_id, connection=queue.connection):
        return
    rec = callrecord.decode_record(conn.hgetall(keys.call_meta(call_id)))
    if rec.get("state") != "queued" or not rec.get("request"):
        return
    start = datetime.fromisoformat(rec["start_at"]) if rec.get("start_at") else None
    # Once: the first enqueuer (or another re-send) may be pushing it right now.
    _put_job_once(queue, start, call_id, job_id, json.loads(rec["request"]), f"dial {rec.get('to', '')}")


def _enqueue(conn: redis.Redis, request: CallRequest, queue_name: str | None,
             settings: Settings | None, call_id: str | None,
             extra_record: dict[str, Any]) -> Enqueued:
    settings = settings or Settings.from_env()
    queue_conn = queue_connection(conn, settings)
    queue = Queue(queue_name or settings.dial_queue, connection=queue_conn)
    call_id = call_id or request.call_id()
    job_id = job_id_for(call_id)
    fingerprint = request.fingerprint()
    idem = _idem_key(request.idempotency_key) if request.idempotency_key else None
    # Only what differs from the defaults (validated again by the job): the
    # job hash is most of what a queued call costs in Redis.
    payload = request.model_dump(mode="json", exclude_defaults=True)
    record = dict(
        to=request.to, caller_id=request.caller_id, flow=request.flow, campaign=request.campaign,
        job_id=job_id, listen_mode=request.listen_mode, voice_quality=request.voice_quality,
        start_at=request.start_at.isoformat() if request.start_at else None,
        idempotency_key=request.idempotency_key,
        # What an explicit retry re-sends (``piopiy_voice.workers.dialer.retry``).
        request=json.dumps(payload, separators=(",", ":")),
    )
    if queue_conn is not conn:
        return _enqueue_apart(conn, queue, request, call_id, job_id, fingerprint, idem, payload,
                              record, extra_record)
    with conn.pipeline() as pipe:
        for _ in range(10):
            try:
                if idem:
                    pipe.watch(idem)
                    existing = pipe.get(idem)
                    if existing:
                        pipe.unwatch()
                        prior = json.loads(existing)
                        if prior.get("fingerprint") != fingerprint:
                            raise IdempotencyConflict(request.idempotency_key, prior["call_id"])
                        return Enqueued(prior["call_id"], job_id_for(prior["call_id"]), False, request.start_at)
                pipe.multi()
                if idem:
                    pipe.set(idem, json.dumps({"call_id": call_id, "fingerprint": fingerprint}),
                             ex=IDEMPOTENCY_TTL_S)
                _queued_record(pipe, call_id, record, extra_record)
                _put_job(queue, request.start_at, call_id, job_id, payload, f"dial {request.to}", pipe)
                pipe.execute()
                return Enqueued(call_id, job_id, True, request.start_at)
            except redis.WatchError:
                continue
    raise RuntimeError(f"could not enqueue call {call_id}: idempotency key kept changing")


def enqueue_call(conn: redis.Redis, *, to: Any, caller_id: Any = None, settings: Settings | None = None,
                 queue_name: str | None = None, **options: Any) -> Enqueued:
    """Validate and enqueue one call. Options are the ``CallRequest`` fields.

    >>> enqueue_call(r, to="919876543210", flow="sales", idempotency_key="order-17")
    """
    settings = settings or Settings.from_env()
    request = build_request(settings, to=to, caller_id=caller_id, **options)
    return enqueue_request(conn, request, queue_name=queue_name, settings=settings)


def in_seconds(seconds: float) -> datetime:
    """A ``start_at`` that many seconds from now."""
    return datetime.now(timezone.utc) + timedelta(seconds=seconds)
