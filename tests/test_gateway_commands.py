"""CommandReader unit tests with a scripted client (no Redis needed)."""

from __future__ import annotations

import asyncio

import redis

from piopiy_voice.gateway.commands import CommandReader


class ScriptedClient:
    """xread replies (or exceptions) in order; records the ids asked for."""

    def __init__(self, script, reader_box):
        self.script = list(script)
        self.asked: list[bytes] = []
        self.box = reader_box

    async def xrevrange(self, stream, hi, lo, count):
        return [(b"5-0", {})]

    async def xread(self, streams, count, block):
        (last,) = streams.values()
        self.asked.append(last)
        if not self.script:
            self.box[0].stop()
            return []
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return [(b"s", step)]


def _run(script):
    box: list[CommandReader] = []
    got: list[bytes] = []

    async def handler(entry_id, fields):
        got.append(entry_id)

    client = ScriptedClient(script, box)
    reader = CommandReader(client, "s", handler)
    box.append(reader)

    async def main():
        await asyncio.wait_for(reader.run(), 10)

    asyncio.run(main())
    return client, got


def test_reader_resumes_from_last_id_after_a_connection_error():
    client, got = _run([
        [(b"6-0", {}), (b"7-0", {})],
        redis.ConnectionError("gone"),
        [(b"8-0", {})],
    ])
    assert got == [b"6-0", b"7-0", b"8-0"]
    # starts after the newest existing entry, and resumes at 7-0 after the error
    assert client.asked[:4] == [b"5-0", b"7-0", b"7-0", b"8-0"]


def test_reader_survives_other_redis_errors():
    # Review fix: only connection/timeout errors were caught, so e.g. a
    # ResponseError (WRONGTYPE, LOADING, failover) killed the task silently and
    # the gateway stopped applying commands for good.
    client, got = _run([
        redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        [(b"6-0", {})],
    ])
    assert got == [b"6-0"]
