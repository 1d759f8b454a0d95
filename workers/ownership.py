"""Who owns which call: consumer group, leases, crash claims, hand-back.

Theory of operation
-------------------
The gateway announces each call with a ``call.started`` entry on
``keys.CALLS_STREAM``. Workers read that stream through the consumer group
``keys.WORKERS_GROUP``; the worker that receives an entry takes the call's
lease (``SET lease <worker> NX PX lease_ms``) and keeps the entry *pending*
(un-ACKed) for the whole call. The entry is ACKed only when the call ends.

A lease and the claimable idle time of its start entry move together: right
after the script that extends the lease (the renew below, and every checkpoint
commit, ``piopiy_voice.workers.checkpoint``) succeeds, the owner ``XCLAIM``s
the start entry to itself (``touch``), which resets its idle time. So "idle
longer than ``lease_ms``" means "the lease was not extended for ``lease_ms``":
the lease has expired. (Before, commits extended the lease but not the idle
time, and 45 % of orphaned calls waited two leases.) The two are separate
round trips because the lease lives in the call's hash slot and the calls
stream in its own (Redis Cluster allows no script across slots), and the
touch comes second so that only a confirmed lease holder moves the entry. An
owner that dies between the two leaves an entry that looks idle while the
lease still runs: a claimer that still finds the lease held gives the entry
back to the holder with its idle time set to how long ago the lease was last
extended, so the next scan claims it exactly when the lease expires, never a
lease later.

While it owns a call a worker renews every ``lease_ms / 3``. The renew script
also repairs what a Redis restarted empty lost (see "Redis restarted empty").

Crash (SIGKILL): the lease expires after ``lease_ms``, at the same instant the
start entry's idle time passes ``lease_ms``. Other workers scan with
``XAUTOCLAIM min-idle=lease_ms``, at most ``claim_limit`` entries per scan (a
Redis stall expires every lease at once: without a limit the first worker to
scan took every call); a claimer then takes the lease with ``SET NX`` and
resumes from the checkpoint.

Graceful stop (SIGTERM): the worker commits a final checkpoint, deletes its
leases and moves its pending start entries to the consumer ``handback`` with
``XCLAIM ... IDLE <large>``, so the very next XAUTOCLAIM scan of any worker
picks them up (no waiting for the lease to expire); then it deletes its own
consumer (now with nothing pending) from the group.

Redis restarted empty
~~~~~~~~~~~~~~~~~~~~~
Groups, leases, checkpoints and start entries are gone; the owners still hold
their calls in memory. Every role recreates its group on ``NOGROUP`` (never
exits). The renew of a call whose lease is missing takes it again *only* if no
other owner has moved the call on since (the checkpoint is missing or still
names us: any other owner's first commit names itself), and reports it
``RELET`` so the owner re-commits its checkpoint from memory. A start entry
that is no longer pending to us is re-claimed with ``XCLAIM FORCE`` when it
still exists, else reported missing: the owner re-announces the call
(``reannounce``: a ``call.started`` XADDed and force-claimed to itself), so a
crash after the restart is still taken over.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import redis

from piopiy_voice import keys
from piopiy_voice.redisconn import script_call

log = logging.getLogger(__name__)

HANDBACK_CONSUMER = "handback"
#: Idle time stamped on handed-back entries: older than any sane lease.
HANDBACK_IDLE_MS = 24 * 3600 * 1000
#: Heartbeat entries (``keys.WORKERS_ZSET``) older than this are pruned.
WORKER_ENTRY_TTL_S = 24 * 3600

#: Renew verdicts on the lease (see "Redis restarted empty").
LOST, OK, RELET = 0, 1, 2

# KEYS: lease, checkpoint. ARGV: worker, lease_ms. Returns LOST | OK | RELET.
_RENEW_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if cur then return 0 end
local owner = redis.call('HGET', KEYS[2], 'owner')
if owner and owner ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 2
"""
# KEYS: calls stream. ARGV: group, consumer, force (0/1), start entry ids...
# Per entry: 1 now pending to the consumer (idle 0), 0 no longer in the stream.
_TOUCH_LUA = """
local out = {}
for i = 4, #ARGV do
  local got = redis.pcall('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  if ARGV[3] == '1' and type(got) == 'table' and got['err'] == nil and #got == 0 then
    got = redis.pcall('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'FORCE', 'JUSTID')
  end
  out[#out + 1] = (type(got) == 'table' and got['err'] == nil and #got > 0) and 1 or 0
end
return out
"""
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def ensure_group(r: Any, group: str = keys.WORKERS_GROUP) -> None:
    """Create a consumer group on the calls stream (from its start) if missing."""
    try:
        r.xgroup_create(keys.CALLS_STREAM, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def is_nogroup(exc: BaseException) -> bool:
    """The group (or the stream a blocked read waited on) vanished: Redis was
    restarted empty or flushed. Recreate the group and go on."""
    text = str(exc)
    return isinstance(exc, redis.ResponseError) and ("NOGROUP" in text or "UNBLOCKED" in text)


def is_oom(exc: BaseException) -> bool:
    """Redis refused a write at ``maxmemory`` (noeviction)."""
    oom = getattr(redis.exceptions, "OutOfMemoryError", ())
    return (isinstance(exc, oom) if oom else False) or (
        isinstance(exc, redis.ResponseError)
        and (str(exc).startswith("OOM") or "maxmemory" in str(exc)))


class Ownership:
    """One role's ownership of calls. Workers use the defaults; the transcriber
    role owns every call a second time, under its own group, lease keys and
    heartbeat set, with the same rules."""

    def __init__(self, r: Any, worker_id: str, lease_ms: int, *,
                 group: str = keys.WORKERS_GROUP,
                 lease_key: Callable[[str], str] = keys.call_lease,
                 members: str = keys.WORKERS_ZSET,
                 checkpoint_key: Callable[[str], str] = keys.call_checkpoint,
                 claim_limit: int = 50) -> None:
        if not worker_id or worker_id == HANDBACK_CONSUMER:
            raise ValueError(f"worker_id must be non-empty and not {HANDBACK_CONSUMER!r}")
        if int(lease_ms) <= 100:
            raise ValueError(f"lease_ms must be > 100, got {lease_ms}")
        self.r = r
        self.worker_id = worker_id
        self.lease_ms = int(lease_ms)
        self.group = group
        self.lease_key = lease_key
        self.members = members
        self.checkpoint_key = checkpoint_key
        #: Most start entries one scan claims (spreads calls after a stall).
        self.claim_limit = max(1, int(claim_limit))
        self._renew = r.register_script(_RENEW_LUA)
        self._touch = r.register_script(_TOUCH_LUA)
        self._release = r.register_script(_RELEASE_LUA)
        ensure_group(r, group)

    # -- leases --------------------------------------------------------
    def acquire(self, call_id: str) -> bool:
        return bool(self.r.set(self.lease_key(call_id), self.worker_id, nx=True, px=self.lease_ms))

    def holder(self, call_id: str) -> str | None:
        v = self.r.get(self.lease_key(call_id))
        return v.decode() if v is not None else None

    def release(self, call_id: str) -> bool:
        return bool(self._release(keys=[self.lease_key(call_id)], args=[self.worker_id]))

    def renew(self, owned: dict[str, str]) -> dict[str, tuple[int, bool]]:
        """Renew the leases of ``owned`` (call id -> start entry id), then
        refresh the idle time of the start entries of those renewed. Returns
        per call ``(LOST | OK | RELET, start entry still pending to us)``."""
        now = time.time()
        pipe = self.r.pipeline(transaction=False)
        pipe.zadd(self.members, {self.worker_id: now})
        # Workers killed without a goodbye never remove themselves.
        pipe.zremrangebyscore(self.members, "-inf", now - WORKER_ENTRY_TTL_S)
        for cid in owned:
            script_call(self._renew, [self.lease_key(cid), self.checkpoint_key(cid)],
                        [self.worker_id, self.lease_ms], pipe)
        verdicts = {cid: int(v) for cid, v in zip(owned, pipe.execute()[2:])}
        kept = [cid for cid, v in verdicts.items() if v != LOST]
        # A start entry Redis lost (restarted empty) is re-claimed with FORCE
        # while it still exists in the stream.
        touched = dict(zip(kept, self.touch([owned[cid] for cid in kept], force=True)))
        return {cid: (v, touched.get(cid, False)) for cid, v in verdicts.items()}

    def touch(self, entry_ids: list[str], *, force: bool = False, pipe: Any = None) -> list[bool]:
        """XCLAIM our start entries to ourselves (their idle time restarts with
        the lease just extended); per entry, whether it is pending to us now.
        With ``pipe`` it is only queued (returns [])."""
        if not entry_ids:
            return []
        args = [self.group, self.worker_id, "1" if force else "0", *entry_ids]
        if pipe is not None:
            script_call(self._touch, [keys.CALLS_STREAM], args, pipe)
            return []
        return [bool(int(x)) for x in self._touch(keys=[keys.CALLS_STREAM], args=args)]

    def reannounce(self, fields: dict) -> str:
        """Re-publish a call's start entry (Redis lost it) and make it pending
        to us at once; returns its id. Another worker reading it sees our lease
        and leaves it to us (or ACKs it: the next renew claims it back with FORCE)."""
        eid = self.r.xadd(keys.CALLS_STREAM, dict(fields, reannounced_by=self.worker_id),
                          maxlen=keys.CALLS_STREAM_MAXLEN, approximate=True)
        eid = eid.decode() if isinstance(eid, bytes) else eid
        try:
            self.r.xclaim(keys.CALLS_STREAM, self.group, self.worker_id, 0, [eid], force=True,
                          justid=True)
        except redis.ResponseError as exc:
            if not is_nogroup(exc):
                raise
            ensure_group(self.r, self.group)
            self.r.xclaim(keys.CALLS_STREAM, self.group, self.worker_id, 0, [eid], force=True,
                          justid=True)
        return eid

    def give_back(self, call_id: str, entry_id: str, holder: str) -> None:
        """A claimed entry whose lease is still held: back to the holder, idle
        since the lease was last extended (so it is claimable when it expires)."""
        pttl = self.r.pttl(self.lease_key(call_id))
        idle = self.lease_ms - pttl if pttl and pttl > 0 else self.lease_ms
        self.r.xclaim(keys.CALLS_STREAM, self.group, holder, 0, [entry_id],
                      idle=max(0, int(idle)), justid=True)

    # -- the calls stream ----------------------------------------------
    def read_new(self, count: int, block_ms: int | None) -> list[tuple[str, dict]]:
        """New entries for this worker (``>``), each as (entry id, raw fields)."""
        return self.new_entries(self.queue_read_new(self.r, count, block_ms))

    def queue_read_new(self, pipe: Any, count: int, block_ms: int | None = None) -> Any:
        """The read of ``read_new`` on ``pipe`` (a pipeline, so a busy worker
        takes new calls in the round trip it reads its calls with; a client
        runs it at once). Its reply goes to ``new_entries``."""
        return pipe.xreadgroup(self.group, self.worker_id, {keys.CALLS_STREAM: ">"},
                               count=count, block=block_ms)

    @staticmethod
    def new_entries(resp: Any) -> list[tuple[str, dict]]:
        return [(eid.decode(), fields) for _stream, entries in resp or () for eid, fields in entries]

    def ack(self, entry_id: str) -> None:
        self.r.xack(keys.CALLS_STREAM, self.group, entry_id)

    def claim_stale(self, limit: int | None = None, max_rounds: int = 10) -> list[tuple[str, dict | None]]:
        """Start entries idle longer than the lease (dead owner or handed back),
        now pending to this worker: at most ``limit`` (default ``claim_limit``).
        Deleted (trimmed) entries come back with ``None`` fields so the caller
        can ACK them."""
        out: list[tuple[str, dict | None]] = []
        cursor = "0-0"
        budget = self.claim_limit if limit is None else int(limit)
        for _ in range(max_rounds):
            if budget <= 0:
                break
            resp = self.r.xautoclaim(
                keys.CALLS_STREAM, self.group, self.worker_id, self.lease_ms,
                start_id=cursor, count=budget,
            )
            budget -= len(resp[1])
            cursor = resp[0].decode() if isinstance(resp[0], bytes) else str(resp[0])
            for item in resp[1]:
                if item is None:
                    continue
                eid, fields = item
                out.append((eid.decode(), fields or None))
            if len(resp) > 2:  # Redis 7: ids deleted from the stream, dropped from the PEL
                for eid in resp[2] or ():
                    log.warning("calls stream entry %s was trimmed while pending", eid)
            if cursor in ("0-0", "0"):
                break
        return out

    def my_pending(self, count: int = 1000) -> list[str]:
        """Start entries pending to this consumer (a restart under the same id)."""
        rows = self.r.xpending_range(
            keys.CALLS_STREAM, self.group, min="-", max="+", count=count,
            consumername=self.worker_id,
        )
        return [row["message_id"].decode() for row in rows]

    def fetch(self, entry_id: str) -> dict | None:
        rows = self.r.xrange(keys.CALLS_STREAM, min=entry_id, max=entry_id, count=1)
        return rows[0][1] if rows else None

    def hand_back(self, entry_ids: list[str]) -> None:
        """Make these pending start entries claimable by any worker right now."""
        if entry_ids:
            self.r.xclaim(
                keys.CALLS_STREAM, self.group, HANDBACK_CONSUMER, 0, entry_ids,
                idle=HANDBACK_IDLE_MS, justid=True,
            )

    def leave_group(self) -> None:
        """Delete this worker's consumer, only if nothing is pending to it
        (DELCONSUMER would silently drop pending entries)."""
        if not self.my_pending(count=1):
            self.r.xgroup_delconsumer(keys.CALLS_STREAM, self.group, self.worker_id)
        self.r.zrem(self.members, self.worker_id)
