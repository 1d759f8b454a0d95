"""Limits shared by every dialer worker, kept in Redis so they hold across processes.

Two independent limits guard the platform and the people being called:

* **Calls per second** (``reserve_dial_slot``): a GCRA bucket in one key. Each
  call *reserves* the next free instant and is told how long to sleep until it;
  reservations are handed out in Redis order using Redis's clock, so N workers
  on N hosts together never exceed the rate, nobody polls, and nobody starves.
  A worker that dies after reserving only wastes that one instant.

* **Live calls per campaign** (``acquire_live_slot``): a sorted set of the
  campaign's call ids scored by the time their slot lapses. A slot is freed when
  the campaign's state hash (kept by ``piopiy_voice.callrecord.set_state``) says the
  call ended or failed, or when its hold time passes — so a call that was placed
  but never connected (the gateway never hears of it) cannot keep its slot for
  ever. The live set and the state hash share the ``{campaign}`` hash tag, so
  the script touches one cluster slot.
"""

from __future__ import annotations

import math

from piopiy_voice import keys

#: Reservation: returns microseconds to wait before the reserved instant.
#: A wait longer than ARGV[3] (when > 0) reserves nothing.
_GCRA = """
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat - now - (burst - 1) * interval
if wait < 0 then wait = 0 end
if max_wait > 0 and wait > max_wait then return math.floor(wait) end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX',
           math.ceil((new_tat - now) / 1000) + 1000)
return math.floor(wait)
"""

#: Returns {granted (0/1), ms to wait before asking again}.
_LIVE_SLOT = """
local call_id = ARGV[1]
local cap = tonumber(ARGV[2])
local hold_ms = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], call_id) then
    redis.call('ZADD', KEYS[1], now + hold_ms, call_id)
    return {1, 0}
end
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, m in ipairs(members) do
    local st = redis.call('HGET', KEYS[2], m)
    if st == 'ended' or st == 'failed' then
        redis.call('ZREM', KEYS[1], m)
    end
end
if redis.call('ZCARD', KEYS[1]) < cap then
    redis.call('ZADD', KEYS[1], now + hold_ms, call_id)
    return {1, 0}
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, math.max(0, tonumber(first[2]) - now)}
"""


def rate_key() -> str:
    return keys.dialer_key("rate")


def live_key(campaign: str) -> str:
    return keys.campaign_key(campaign, "live")


def states_key(campaign: str) -> str:
    return keys.campaign_key(campaign, "states")


def reserve_dial_slot(redis, rate_per_s: float, *, burst: int = 1,
                      max_wait_s: float | None = None) -> float:
    """Reserve the next instant at which this worker may send a make-call.

    Returns the seconds to sleep before sending (0.0 when it may go now).
    ``burst`` lets that many calls go back to back after an idle period.
    With ``max_wait_s``, a wait longer than that reserves nothing (the caller
    comes back later): a reserved instant nobody uses would be lost to every
    worker, and a backlog re-reserving on each retry would push the schedule
    ever further out.
    """
    if not (isinstance(rate_per_s, (int, float)) and rate_per_s > 0 and math.isfinite(rate_per_s)):
        raise ValueError(f"rate_per_s must be a positive number, got {rate_per_s!r}")
    if not isinstance(burst, int) or burst < 1:
        raise ValueError(f"burst must be an integer >= 1, got {burst!r}")
    interval_us = max(1, int(round(1_000_000 / rate_per_s)))
    max_wait_us = 0 if max_wait_s is None else max(1, int(max_wait_s * 1_000_000))
    wait_us = redis.eval(_GCRA, 1, rate_key(), interval_us, burst, max_wait_us)
    return int(wait_us) / 1_000_000


def acquire_live_slot(redis, campaign: str, call_id: str, cap: int, hold_s: float) -> tuple[bool, float]:
    """Take one of ``cap`` live-call slots of ``campaign`` for ``call_id``.

    Idempotent per call id (a retry keeps its slot and refreshes the hold).
    Returns ``(granted, retry_after_s)``; when not granted, ``retry_after_s`` is
    when the oldest slot lapses at the latest (a slot may free sooner when its
    call ends).
    """
    if not isinstance(cap, int) or cap < 1:
        raise ValueError(f"cap must be an integer >= 1, got {cap!r}")
    if not hold_s > 0:
        raise ValueError(f"hold_s must be positive, got {hold_s!r}")
    granted, wait_ms = redis.eval(
        _LIVE_SLOT, 2, live_key(campaign), states_key(campaign), call_id, cap, int(hold_s * 1000)
    )
    return bool(int(granted)), int(wait_ms) / 1000


def release_live_slot(redis, campaign: str, call_id: str) -> None:
    """Give a slot back at once (the call failed before it could ring)."""
    redis.zrem(live_key(campaign), call_id)


def live_count(redis, campaign: str) -> int:
    """Slots held now: neither lapsed nor held by a call that ended or failed.

    Read-only: stale members are only removed by the next ``acquire_live_slot``,
    so counting the raw set would report slots of finished calls as in use."""
    sec, usec = redis.time()
    now_ms = int(sec) * 1000 + int(usec) // 1000
    members = redis.zrangebyscore(live_key(campaign), f"({now_ms}", "+inf")
    if not members:
        return 0
    states = redis.hmget(states_key(campaign), members)
    return sum(1 for st in states if st not in (b"ended", b"failed", "ended", "failed"))
