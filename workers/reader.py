"""Reading the streams of the calls a role owns: one round trip per Redis node per turn.

Theory of operation
-------------------
A worker (and a transcriber) owns many calls and reads all of their inbound
streams every loop turn, each from its own position.

On a single Redis (or a Sentinel-managed primary) that is ONE ``XREAD`` over
every owned stream, blocking up to ``block_ms`` when nothing is there: the
first entry of any call wakes it.

Redis Cluster refuses a command whose keys hash to different slots, and each
call's keys live in their own slot (``piopiy_voice.keys``): there is no
multi-call XREAD and no blocking on many calls at once. So on a cluster every
owned stream gets its own non-blocking ``XREAD``, grouped by the primary that
serves its slot: the reader writes every node's batch first, then reads the
replies, so a turn costs one round trip per node, in parallel, not one per
call. It does this on redis-py's per-node connections itself rather than
through redis-py's cluster pipeline, which resolves a routing policy per
command (measured: the worker used 1.6x the CPU per frame of a single-Redis
worker that way, ``bench/worker_bench.py --cluster``). A reply that says the
slot moved (``MOVED``/``ASK``, a resharding or a failover) or cannot be served
now (``CLUSTERDOWN``, ``TRYAGAIN``) makes the reader refresh the slot map and
skip that stream for this turn: it is read, from the same position, next
turn. A connection error refreshes the slot map and is raised, for the
caller's usual backoff.

With nothing to block on, a turn that read nothing is followed by a pause of
``CLUSTER_POLL_MS`` (never longer than the caller's ``block_ms``, which
already accounts for timers and renewals) before the next read. That bounds
the added latency of a frame, a barge-in or a result to the poll period while
audio is quiet; while callers talk every read finds frames and turns run
back to back, batched by the caller's minimum turn interval.

The reader is a consumer of the role's pipeline: the caller may queue its own
commands first (the worker queues its read of new calls) and gets their
replies back, so they ride the same round trip.
"""

from __future__ import annotations

import time
from typing import Any

from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import (AskError, ClusterDownError, ConnectionError, MovedError, RedisError,
                              TimeoutError, TryAgainError)

#: Pause after an empty read on a cluster (ms): the latency floor while quiet.
CLUSTER_POLL_MS = 10


def is_cluster(r: Any) -> bool:
    """Whether ``r`` is a Redis Cluster client (reads must then be per slot)."""
    return isinstance(r, RedisCluster)


class CallStreamReader:
    """Reads owned call streams through ``r`` (see the module docstring)."""

    def __init__(self, r: Any, *, poll_ms: int = CLUSTER_POLL_MS) -> None:
        self.r = r
        self.clustered = is_cluster(r)
        #: stream key -> hash slot (CRC16 once per call, not per turn)
        self._slots: dict[Any, int] = {}
        self.poll_s = max(0, int(poll_ms)) / 1000.0
        #: Monotonic time of the last cluster read that returned nothing (0: it returned entries).
        self._empty_at = 0.0

    def read(self, pipe: Any, positions: dict[str, str], count: int,
             block_ms: int | None) -> tuple[list[Any], list[tuple[Any, list]]]:
        """Execute ``pipe`` (its queued commands first) with the read of
        ``positions`` (stream -> last id read). Returns the replies of the
        caller's commands and ``[(stream, entries), ...]`` for the streams
        that had entries, as ``XREAD`` returns them."""
        ahead = len(pipe)
        if not self.clustered:
            if positions:
                pipe.xread(positions, count=count, block=block_ms)
            replies = pipe.execute()
            if not positions:
                return replies, []
            return replies[:ahead], replies[ahead] or []
        if self._empty_at and block_ms:
            wait = self._empty_at + min(self.poll_s, block_ms / 1000.0) - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        replies = pipe.execute() if ahead else []
        got = self._read_per_node(positions, count)
        self._empty_at = 0.0 if got else time.monotonic()
        return replies, got

    def _read_per_node(self, positions: dict[str, str], count: int) -> list[tuple[Any, list]]:
        nodes = self.r.nodes_manager
        batches: dict[str, tuple[Any, list[str], list[tuple]]] = {}
        for stream, last_id in positions.items():
            slot = self._slots.get(stream)
            if slot is None:
                slot = self._slots[stream] = key_slot(stream.encode() if isinstance(stream, str) else stream)
            node = nodes.get_node_from_slot(slot)
            batch = batches.get(node.name)
            if batch is None:
                batch = batches[node.name] = (node, [], [])
            batch[1].append(stream)
            batch[2].append(("XREAD", "COUNT", count, "STREAMS", stream, last_id))
        if len(self._slots) > 4 * len(positions) + 1024:
            self._slots = {k: self._slots[k] for k in positions if k in self._slots}
        held: list[tuple[Any, Any]] = []
        got: list[tuple[Any, list]] = []
        moved = False
        try:
            sent = []
            for node, streams, commands in batches.values():
                pool = node.redis_connection.connection_pool
                conn = pool.get_connection()
                held.append((pool, conn))
                conn.send_packed_command(conn.pack_commands(commands), check_health=False)
                sent.append((node, conn, streams))
            for node, conn, streams in sent:
                parse = node.redis_connection.response_callbacks["XREAD"]
                for _ in streams:
                    try:
                        reply = conn.read_response()
                    except (MovedError, AskError, TryAgainError, ClusterDownError):
                        moved = True  # this stream is read next turn, from the same id
                        continue
                    if reply:
                        got += parse(reply)
        except (ConnectionError, TimeoutError, OSError) as exc:
            for _pool, conn in held:
                conn.disconnect()
            self._refresh()
            if isinstance(exc, (ConnectionError, TimeoutError)):
                raise
            raise ConnectionError(f"reading the calls' streams: {exc}") from exc
        finally:
            for pool, conn in held:
                pool.release(conn)
        if moved:
            self._refresh()
        return got

    def _refresh(self) -> None:
        """Re-read the slot map (a slot moved, a primary failed over)."""
        try:
            self.r.nodes_manager.initialize()
        except RedisError:
            pass  # no node answers now: the next turn's read tries again
