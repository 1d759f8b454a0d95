"""The single reader of this gateway's command stream.

One task per gateway runs ``XREAD BLOCK`` on ``keys.gateway_commands(id)``
(no consumer group: exactly one gateway holds a call, and its commands are for
it alone). The last id seen is kept across Redis errors, so after a reconnect
reading resumes where it stopped and nothing is skipped. On start it begins
after the newest existing entry: older commands were for sockets an earlier
incarnation of this gateway held, which no longer exist.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

import redis

from piopiy_voice.redisconn import MAX_BLOCK_MS

from .metrics import Metrics

log = logging.getLogger(__name__)

Handler = Callable[[bytes, dict[bytes, bytes]], Awaitable[None]]


class CommandReader:
    def __init__(self, client: Any, stream: str, handler: Handler, *,
                 metrics: Metrics | None = None, block_ms: int = MAX_BLOCK_MS,
                 count: int = 200) -> None:
        if not 0 < block_ms <= MAX_BLOCK_MS:
            raise ValueError(f"block_ms must be in 1..{MAX_BLOCK_MS}, got {block_ms}")
        self.client = client
        self.stream = stream
        self.handler = handler
        self.metrics = metrics or Metrics()
        self.block_ms = block_ms
        self.count = count
        self.last_id: bytes | None = None
        self._stop = False

    async def _initial_id(self) -> bytes:
        newest = await self.client.xrevrange(self.stream, "+", "-", count=1)
        return newest[0][0] if newest else b"0-0"

    async def run(self) -> None:
        backoff = 0.05
        while not self._stop:
            try:
                if self.last_id is None:
                    self.last_id = await self._initial_id()
                reply = await self.client.xread(
                    {self.stream: self.last_id}, count=self.count, block=self.block_ms
                )
                backoff = 0.05
            except (redis.RedisError, OSError) as exc:
                # Any Redis error, not only connection ones: a ResponseError
                # (WRONGTYPE, LOADING, failover) must not end the only reader.
                self.metrics.inc("redis_errors")
                log.warning("command reader: redis error %r; retrying in %.2fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            for _stream, entries in reply or ():
                for entry_id, fields in entries:
                    self.last_id = entry_id
                    try:
                        await self.handler(entry_id, fields)
                    except Exception:  # one bad command must not stop the reader
                        log.exception("command reader: handling entry %s failed", entry_id)

    def stop(self) -> None:
        self._stop = True
