"""Redis Cluster clients that find a command's keys without asking a server.

Theory of operation
-------------------
A cluster client must know a command's keys to route it to the node serving
their slot. redis-py reads fixed key positions from its command table, but
for commands whose keys move (``movablekeys``: ``XREAD``, ``XREADGROUP``,
``EVALSHA`` in a sync pipeline) it sends ``COMMAND GETKEYS`` to its *default
node* and waits for the answer, once per command. Two faults follow, both
measured on a local cluster (redis-py 8.1):

- a worker's turn, which reads every owned call with its own ``XREAD``,
  cost one extra blocking round trip per call instead of one per node;
- once the default node died, every such command failed with "connection
  refused" for good: the client refreshed its slot table but kept asking the
  dead node for the keys (a worker killed primary -> 12 s and counting of
  errors, while the cluster had failed over in ~2 s).

These subclasses locate the keys of exactly those commands from their
arguments (the streams after ``STREAMS``; the ``numkeys`` keys of a script)
and leave every other command to redis-py. ``piopiy_voice.redisconn`` builds
its cluster clients from them.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio.cluster as aiocluster
import redis.cluster as cluster


def _text(arg: Any) -> str:
    return (arg.decode() if isinstance(arg, bytes) else str(arg)).upper()


def local_keys(args: tuple) -> list | None:
    """The keys of ``args`` (command name first) for the commands whose keys
    redis-py would ask a server for; None for any other command."""
    name = _text(args[0]) if args else ""
    if name in ("XREAD", "XREADGROUP"):
        for i, arg in enumerate(args):
            if isinstance(arg, (str, bytes)) and _text(arg) == "STREAMS":
                rest = args[i + 1:]
                return list(rest[: len(rest) // 2])
        return None
    if name in ("EVAL", "EVALSHA") and len(args) >= 3:
        return list(args[3: 3 + int(args[2])])
    return None


class _LocatesKeys:
    def _get_command_keys(self, *args: Any) -> Any:
        found = local_keys(args)
        return found if found is not None else super()._get_command_keys(*args)  # type: ignore[misc]


class KeyLocatingPipeline(_LocatesKeys, cluster.ClusterPipeline):
    """The pipeline of ``KeyLocatingCluster`` (no state of its own)."""


class KeyLocatingCluster(_LocatesKeys, cluster.RedisCluster):
    """``redis.cluster.RedisCluster`` that locates stream-read and script keys itself."""

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)
        # redis-py builds its ClusterPipeline with a dozen of the client's
        # internals; re-classing the result (the subclass adds no state) keeps
        # that construction redis-py's own.
        pipe.__class__ = KeyLocatingPipeline
        return pipe


class AsyncKeyLocatingCluster(aiocluster.RedisCluster):
    """``redis.asyncio.cluster.RedisCluster`` that locates stream-read keys itself."""

    async def _determine_slot(self, command: str, *args: Any) -> int:
        found = local_keys((command, *args))
        if found:
            slots = {self.keyslot(k) for k in found}
            if len(slots) != 1:
                raise cluster.RedisClusterException(
                    f"{command} - all keys must map to the same key slot")
            return slots.pop()
        return await super()._determine_slot(command, *args)
