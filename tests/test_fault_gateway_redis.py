"""Fault suite (gateway): the writer dies, Redis restarts empty, command streams grow.

Real Redis servers (private ones this test stops and restarts on the same
port), an in-process gateway, real websockets clients.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest
from websockets.asyncio.client import connect

from piopiy_voice import contracts as c
from piopiy_voice import keys
from piopiy_voice.gateway.server import COMMAND_KEEP_S, GATEWAY_KEYS_TTL_S
from piopiy_voice.redisconn import EmbeddedRedis, connect as connect_sync
from test_gateway_server import GW, run, running, url

pytestmark = pytest.mark.integration


async def until(pred, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def _http(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_writer_survives_runtime_error_and_a_cancelled_flusher(redis_url, r):
    """uvloop raises RuntimeError (not ConnectionError) writing to a reset socket:
    the writer reconnects and resends; a flusher task that dies is restarted."""
    async def scenario():
        async with running(redis_url) as (gw, client):
            pub = gw.publisher
            await until(lambda: pub.connected, what="writer connected")
            async with connect(url(gw, "wr-1"), compression=None) as ws:
                await ws.send(bytes(320))
                await until(lambda: gw.metrics.c["frames_published"] >= 1)
                writer = pub._writer
                real = writer.write

                def reset(data):
                    writer.write = real
                    raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")

                writer.write = reset
                for _ in range(10):
                    await ws.send(bytes(320))
                await until(lambda: gw.metrics.c["frames_published"] >= 11, what="resent")
                assert gw.metrics.c["redis_errors"] >= 1 and pub.alive
                pub._task.cancel()  # the flusher dies: the supervisor starts another
                await asyncio.sleep(0.1)
                assert pub.alive
                for _ in range(5):
                    await ws.send(bytes(320))
                await until(lambda: gw.metrics.c["frames_published"] >= 16, what="after restart")
            audio = [m for _, f in r.xrange(keys.call_stream("wr-1"))
                     if (m := c.decode(f)).type == "audio"]
            assert len({m.seq for m in audio}) == 16
    run(scenario())


def test_redis_restarted_empty_the_gateway_registers_its_calls_again():
    server = EmbeddedRedis()
    port = server.port

    async def scenario():
        nonlocal server
        async with running(server.url, reconnect_grace_s=5.0) as (gw, _client):
            async with connect(url(gw, "re-1"), compression=None) as ws:
                await ws.send(bytes(320))
                await until(lambda: gw.metrics.c["frames_published"] >= 1)
                await until(lambda: gw._beats >= 1, what="first heartbeat")
                assert (await asyncio.to_thread(_http, gw.port, "/readyz"))[0] == 200
                server.close()  # Redis dies...
                await until(lambda: not gw.publisher.connected, 5, "writer notices")
                status, body = await asyncio.to_thread(_http, gw.port, "/readyz")
                assert status == 503 and "redis" in body
                _, metrics = await asyncio.to_thread(_http, gw.port, "/metrics")
                assert "pv_gateway_redis_connected 0.0" in metrics
                server = EmbeddedRedis(port=port)  # ...and comes back empty
                fresh = connect_sync(server.url)
                await until(lambda: fresh.hget(keys.call_meta("re-1"), "state") == b"live", 15,
                            "record registered again")
                for _ in range(3):
                    await ws.send(bytes(320))
                await until(lambda: len(fresh.xrange(keys.call_stream("re-1"))) >= 4, 10)
                assert (await asyncio.to_thread(_http, gw.port, "/readyz"))[0] == 200
                assert fresh.get(keys.gateway_heartbeat(GW)) is not None
                calls = [c.decode(f) for _, f in fresh.xrange(keys.CALLS_STREAM)]
                assert [m.type for m in calls] == ["call.started"]  # workers adopt it again
                assert gw.metrics.c["calls_reregistered"] == 1
                es = [c.decode(f) for _, f in fresh.xrange(keys.call_stream("re-1"))]
                seqs = [m.seq for m in es]
                assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
                fresh.close()

    try:
        run(scenario())
    finally:
        server.close()


def test_command_stream_is_trimmed_by_time_and_expires(redis_url, r):
    async def scenario():
        async with running(redis_url) as (gw, client):
            cmds = keys.gateway_commands(GW)
            async with connect(url(gw, "cs-1"), compression=None) as ws:
                await ws.send(bytes(320))
                now_ms = int(time.time() * 1000)
                # Old commands with PCM, as a long call leaves them behind.
                for k in range(20):
                    await client.xadd(cmds, {"type": "cmd.play_audio", "pcm": bytes(16000)},
                                      id=f"{now_ms - 120_000 + k}-0")
                cmd = c.Speak(call_id="cs-1", text="now")
                await client.xadd(cmds, c.encode(cmd))
                await asyncio.wait_for(ws.recv(), 5)
                await gw.beat()
                left = await client.xrange(cmds)
                assert all(keys.entry_ms(eid) >= now_ms - COMMAND_KEEP_S * 1000 - 1
                           for eid, _ in left), [e for e, _ in left]
                assert 0 < await client.ttl(cmds) <= GATEWAY_KEYS_TTL_S
    run(scenario())
