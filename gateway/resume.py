"""Reconnect grace: a dropped socket suspends its call; a reconnect resumes it.

Theory of operation
-------------------
A socket that drops (no close frame, a close other than a normal 1000 from
the platform, no ``stop`` event and no hangup/stop command of ours, or our own
drain's 1012) may come back: the platform dials the same signed URL again, on
this gateway or another. So the call is *suspended*, not ended:

* ``suspend`` (queued on the writer, after the call's last entries, so
  ordered with them): one script moves the record ``live`` -> ``suspended``
  only if this gateway still holds it, with ``suspended_at``, ``resume_by``
  (now + ``PV_RECONNECT_GRACE_S``), ``last_seq`` and the frame counters, and
  the call joins ``callrecord.SUSPENDED_ZSET`` (scored by ``resume_by``).
  No ``call.ended``: the worker keeps the call and its agent state.
* ``claim`` (in the handshake, before the upgrade): one script reads the
  record and the tail of the call's stream. An ended call, or a suspended one
  whose grace has passed, is refused (410): a call's URL never re-opens it.
  Otherwise it answers where the call's ``seq`` resumes (the highest of the
  record's ``last_seq`` and the stream's last sequenced entries: entries with
  seq 0 written by workers and transcribers are skipped) and which gateway
  held it. The registry then resumes the same session (it was held here) or
  starts a new one continuing the seq; either way a new ``call.started``
  tells the worker where the socket is now (the failover path).
* ``Sweeper`` (every gateway runs one): calls in the suspended set whose
  grace has passed are ended exactly once, whichever gateway gets there
  first: the ending script checks the record is still ``suspended`` with the
  same ``resume_by``/``last_seq`` it read (compare-and-set), then writes
  ``call.ended`` (reason ``socket_lost``, seq ``last_seq + 1``, the frame
  counters the suspension recorded), the record ``ended`` and the keys'
  expiry in one step. Only the winner then announces the end on ``calls``.
  So a gateway that dies during the grace leaves nothing stuck.

Every script touches the keys of one call only (one cluster slot); the global
set and ``calls`` are written outside them, by the one that won.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from piopiy_voice import callrecord, contracts, keys

from .metrics import Metrics

log = logging.getLogger("gateway")

#: Sequenced entries looked at from the end of the stream to find where seq
#: resumes (entries of seq 0 from workers/transcribers may sit after them).
TAIL_SCAN = 200
#: A suspended call being claimed gets at least this long to finish its upgrade.
CLAIM_WINDOW_S = 10.0
END_REASON = "socket_lost"

_CLAIM = """
local st = redis.call('HGET', KEYS[1], 'state')
if st == 'ended' then return {'ended', '', 0} end
local by = tonumber(redis.call('HGET', KEYS[1], 'resume_by') or '0') or 0
if st == 'suspended' and by < tonumber(ARGV[1]) then return {'expired', '', 0} end
local gw = redis.call('HGET', KEYS[1], 'gateway_id') or ''
local last = tonumber(redis.call('HGET', KEYS[1], 'last_seq') or '0') or 0
for _, e in ipairs(redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', ARGV[3])) do
  local f = e[2]
  for i = 1, #f, 2 do
    if f[i] == 'seq' then
      local s = tonumber(f[i + 1]) or 0
      if s > last then last = s end
      break
    end
  end
end
if st == 'suspended' and by < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'resume_by', ARGV[2])
end
return {st or '', gw, last}
"""

_SUSPEND = """
if redis.call('HGET', KEYS[1], 'state') ~= 'live'
   or redis.call('HGET', KEYS[1], 'gateway_id') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', 'suspended', 'suspended_at', ARGV[2], 'resume_by', ARGV[3],
           'last_seq', ARGV[4], 'frames_in', ARGV[5], 'frames_dropped', ARGV[6])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[8], '*', 'event', 'state.suspended', 't', ARGV[2],
           'gateway_id', ARGV[1], 'why', ARGV[7], 'resume_by', ARGV[3])
return 1
"""

_END = """
local rec = redis.call('HMGET', KEYS[1], 'state', 'resume_by', 'last_seq')
if rec[1] ~= 'suspended' then return 0 end
if (rec[2] or '') ~= ARGV[2] or (rec[3] or '') ~= ARGV[3] then return -1 end
if (tonumber(ARGV[2]) or 0) > tonumber(ARGV[1]) then return 2 end
redis.call('HSET', KEYS[1], 'state', 'ended', 'ended_at', ARGV[1], 'end_reason', ARGV[7])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', unpack(ARGV, 10))
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'event', 'state.ended', 't', ARGV[1],
           'end_reason', ARGV[7], 'gateway_id', ARGV[8])
for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], i == 2 and ARGV[9] or ARGV[5]) end
return 1
"""


@dataclass(frozen=True)
class Claim:
    """What the record said when a socket for the call arrived."""

    #: "" (no record yet), "queued"... "live", "suspended"; never "ended"/"expired"
    #: (those are refused).
    state: str
    #: The gateway the record names ("" if none).
    gateway_id: str
    #: The highest seq the call reached (0 for a new call).
    last_seq: int


class CallGone(Exception):
    """The call's URL must not open it again: it ended (or its grace passed)."""

    def __init__(self, state: str) -> None:
        super().__init__(f"call {state}")
        self.state = state


async def claim(redis: Any, call_id: str, now: float | None = None) -> Claim:
    """Read (atomically) whether the call may take a socket and where seq resumes.
    Raises CallGone for an ended call or a suspension whose grace passed."""
    now = time.time() if now is None else now
    st, gw, last = await redis.eval(_CLAIM, 2, keys.call_meta(call_id), keys.call_stream(call_id),
                                    f"{now:.3f}", f"{now + CLAIM_WINDOW_S:.3f}", TAIL_SCAN)
    st = st.decode() if isinstance(st, bytes) else st
    if st in ("ended", "expired"):
        raise CallGone(st)
    return Claim(state=st, gateway_id=gw.decode() if isinstance(gw, bytes) else gw,
                 last_seq=int(last))


def suspend(pub: Any, call_id: str, gateway_id: str, *, now: float, resume_by: float,
            last_seq: int, frames_in: int, frames_dropped: int, why: str) -> None:
    """Queue the suspension on the writer (ordered after the call's entries)."""
    pub.command("EVAL", _SUSPEND, 2, keys.call_meta(call_id), keys.call_timeline(call_id),
                gateway_id, f"{now:.3f}", f"{resume_by:.3f}", last_seq, frames_in,
                frames_dropped, why, callrecord.TIMELINE_MAXLEN)
    pub.command("ZADD", callrecord.SUSPENDED_ZSET, f"{resume_by:.3f}", call_id)


def resumed(pub: Any, call_id: str) -> None:
    """The call has a socket again: out of the suspended set."""
    pub.command("ZREM", callrecord.SUSPENDED_ZSET, call_id)


class Sweeper:
    """Ends suspended calls whose grace passed (any gateway's), exactly once."""

    def __init__(self, redis: Any, *, gateway_id: str, metrics: Metrics, every_s: float,
                 on_swept: Callable[[float], None] | None = None, batch: int = 100) -> None:
        self.redis = redis
        self.gateway_id = gateway_id
        self.metrics = metrics
        self.every_s = every_s
        #: Called after each sweep with the wall time (the registry forgets the
        #: suspended sessions whose grace passed).
        self.on_swept = on_swept
        self.batch = batch

    async def run(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception as exc:  # noqa: BLE001 (Redis away: try again next turn)
                log.warning("sweeper: %r", exc)
            await asyncio.sleep(self.every_s)

    async def sweep(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        due = await self.redis.zrangebyscore(callrecord.SUSPENDED_ZSET, "-inf", f"{now:.3f}",
                                             start=0, num=self.batch)
        ended = 0
        for raw in due:
            ended += await self.end(raw.decode(), now)
        if self.on_swept is not None:
            self.on_swept(now)
        return ended

    async def end(self, cid: str, now: float) -> bool:
        """End one suspended call if its grace passed; True if this call did it."""
        meta = keys.call_meta(cid)
        state, by, last, fin, fdrop, campaign = await self.redis.hmget(
            meta, "state", "resume_by", "last_seq", "frames_in", "frames_dropped", "campaign")
        if state != b"suspended":
            await self.redis.zrem(callrecord.SUSPENDED_ZSET, cid)
            return False
        by_s, last_s = (by or b"").decode(), (last or b"").decode()
        if float(by_s or 0) > now:
            await self.redis.zadd(callrecord.SUSPENDED_ZSET, {cid: float(by_s)})
            return False
        ended = contracts.CallEnded(call_id=cid, seq=int(last_s or 0) + 1, reason=END_REASON,
                                    ended_at=now, frames_in=int(fin or 0),
                                    frames_dropped=int(fdrop or 0))
        fields = contracts.encode(ended)
        flat: list[Any] = []
        for k, v in fields.items():
            flat += [k, v]
        first = [meta, keys.call_stream(cid), keys.call_timeline(cid)]
        all_keys = first + [k for k in keys.call_keys(cid) if k not in first]
        res = await self.redis.eval(
            _END, len(all_keys), *all_keys,
            f"{now:.3f}", by_s, last_s, keys.CALL_STREAM_MAXLEN, keys.CALL_KEY_TTL_AFTER_END,
            callrecord.TIMELINE_MAXLEN, END_REASON, self.gateway_id,
            keys.ttl_after_end(keys.call_stream(cid), cid), *flat)
        if res != 1:
            if res == 0:
                await self.redis.zrem(callrecord.SUSPENDED_ZSET, cid)
            return False  # -1: it changed under us (resumed, re-suspended): next turn
        async with self.redis.pipeline(transaction=False) as p:
            p.xadd(keys.CALLS_STREAM, fields, maxlen=keys.CALLS_STREAM_MAXLEN, approximate=True)
            p.zrem(callrecord.SUSPENDED_ZSET, cid)
            if campaign:
                ck = keys.campaign_key(campaign.decode(), "states")
                p.hset(ck, cid, "ended")
                p.expire(ck, keys.CAMPAIGN_TTL_S)
            await p.execute()
        self.metrics.inc("calls_swept")
        self.metrics.inc("calls_ended")
        log.info("call %s: ended (%s): no socket came back by %s", cid, END_REASON, by_s)
        return True
