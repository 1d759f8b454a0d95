"""Who owns which call: consumer group, leases, crash claims, hand-back.

Theory of operation
-------------------
The gateway announces each call with a ``call.started`` entry on
``keys.CALLS_STREAM``. Workers read that stream through the consumer group
``keys.WORKERS_GROUP``; the worker that receives an entry takes the call's
lease (``SET lease <worker> NX PX lease_ms``) and keeps the entry *pending*
(un-ACKed) for the whole call. The entry is ACKed only when the call ends.

While it owns a call a worker, every ``lease_ms / 3``:
- renews the lease with a compare-and-renew script (only if the value is still
  its own id), and
- re-claims its pending start entries to itself with ``XCLAIM ... JUSTID``,
  which resets their idle time. So a pending entry stays idle longer than
  ``lease_ms`` only when its owner stopped renewing.

Crash (SIGKILL): the lease expires after ``lease_ms`` and the start entry's
idle time passes ``lease_ms``. Other workers scan with ``XAUTOCLAIM
min-idle=lease_ms``; a claimer then takes the lease with ``SET NX`` and
resumes from the checkpoint. If the lease is still held (a live but slow
owner), the claimer leaves the entry alone: the owner's next renew pulls it
back with XCLAIM.

Graceful stop (SIGTERM): the worker commits a final checkpoint, deletes its
leases and moves its pending start entries to the consumer ``handback`` with
``XCLAIM ... IDLE <large>``, so the very next XAUTOCLAIM scan of any worker
picks them up (no waiting for the lease to expire); then it deletes its own
consumer (now with nothing pending) from the group.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import redis

from piopiy_voice import keys

log = logging.getLogger(__name__)

HANDBACK_CONSUMER = "handback"
#: Idle time stamped on handed-back entries: older than any sane lease.
HANDBACK_IDLE_MS = 24 * 3600 * 1000
#: Heartbeat entries (``keys.WORKERS_ZSET``) older than this are pruned.
WORKER_ENTRY_TTL_S = 24 * 3600

_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
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


class Ownership:
    """One role's ownership of calls. Workers use the defaults; the transcriber
    role owns every call a second time, under its own group, lease keys and
    heartbeat set, with the same rules."""

    def __init__(self, r: Any, worker_id: str, lease_ms: int, *,
                 group: str = keys.WORKERS_GROUP,
                 lease_key: Callable[[str], str] = keys.call_lease,
                 members: str = keys.WORKERS_ZSET) -> None:
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
        self._renew = r.register_script(_RENEW_LUA)
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

    def renew(self, owned: dict[str, str]) -> set[str]:
        """Renew the leases of ``owned`` (call id -> start entry id); refresh the
        idle time of the start entries still ours. Returns the calls lost."""
        now = time.time()
        pipe = self.r.pipeline(transaction=False)
        pipe.zadd(self.members, {self.worker_id: now})
        # Workers killed without a goodbye never remove themselves.
        pipe.zremrangebyscore(self.members, "-inf", now - WORKER_ENTRY_TTL_S)
        pipe.execute()
        if not owned:
            return set()
        calls = list(owned)
        pipe = self.r.pipeline(transaction=False)
        for cid in calls:
            self._renew(keys=[self.lease_key(cid)], args=[self.worker_id, self.lease_ms], client=pipe)
        results = pipe.execute()
        lost = {cid for cid, ok in zip(calls, results) if not ok}
        kept = [owned[cid] for cid in calls if cid not in lost]
        if kept:
            self.r.xclaim(keys.CALLS_STREAM, self.group, self.worker_id, 0, kept, justid=True)
        return lost

    # -- the calls stream ----------------------------------------------
    def read_new(self, count: int, block_ms: int | None) -> list[tuple[str, dict]]:
        """New entries for this worker (``>``), each as (entry id, raw fields)."""
        resp = self.r.xreadgroup(
            self.group, self.worker_id, {keys.CALLS_STREAM: ">"}, count=count, block=block_ms
        )
        out = []
        for _stream, entries in resp or ():
            for eid, fields in entries:
                out.append((eid.decode(), fields))
        return out

    def ack(self, entry_id: str) -> None:
        self.r.xack(keys.CALLS_STREAM, self.group, entry_id)

    def claim_stale(self, count: int = 50, max_rounds: int = 10) -> list[tuple[str, dict | None]]:
        """Start entries idle longer than the lease (dead owner or handed back),
        now pending to this worker. Deleted (trimmed) entries come back with
        ``None`` fields so the caller can ACK them."""
        out: list[tuple[str, dict | None]] = []
        cursor = "0-0"
        for _ in range(max_rounds):
            resp = self.r.xautoclaim(
                keys.CALLS_STREAM, self.group, self.worker_id, self.lease_ms,
                start_id=cursor, count=count,
            )
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
