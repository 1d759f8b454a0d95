"""The playout tick over real WebSockets: the real gateway server, clients on loopback."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import socket
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from piopiy_voice import contracts as c
from piopiy_voice import keys
from test_gateway_server import GW, running
from test_gateway_server import url as signed_url

pytestmark = pytest.mark.integration

LEAD_MS = 100
CHUNK_S = 0.040
BREAK = {"action": "break"}


def url(gw, call_id):
    return signed_url(gw, call_id, rate="16000")


async def until(cond, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def play(client, cid, pcm, uid="u"):
    await client.xadd(keys.gateway_commands(GW), c.encode(
        c.PlayAudio(call_id=cid, pcm=pcm, rate=16000, utterance_id=uid)))


async def playouts(client, cid):
    return [(m.utterance_id, m.state, m.played_ms)
            for m in (c.decode(f) for _, f in await client.xrange(keys.call_stream(cid)))
            if m.type == "playout"]


class Listener:
    """One platform socket: records every message and when it arrived."""

    def __init__(self, ws):
        self.ws = ws
        self.got: list[tuple[float, dict]] = []
        self.task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self):
        with contextlib.suppress(ConnectionClosed):   # the tests check codes themselves
            async for msg in self.ws:
                self.got.append((time.monotonic(), json.loads(msg)))

    def chunks(self):
        return [(t, base64.b64decode(m["data"]["audioData"]))
                for t, m in self.got if m.get("type") == "streamAudio"]

    def pcm(self):
        return b"".join(p for _, p in self.chunks())


async def play_each(client, ids, pcms):
    for cid, pcm in zip(ids, pcms):
        await play(client, cid, pcm)


async def heard_whole(listeners, pcms, what="all audio"):
    """Each listener received its pcm whole, in order."""
    await until(lambda: all(len(li.pcm()) == len(p) for li, p in zip(listeners, pcms)), what=what)
    for li, pcm in zip(listeners, pcms):
        assert li.pcm() == pcm


async def open_calls(gw, ids, **kw):
    conns = [await connect(url(gw, cid), compression=None, **kw) for cid in ids]
    await until(lambda: all(gw.registry.has_socket(cid) for cid in ids), what="calls attached")
    return conns


def test_many_speaking_calls_are_paced_at_real_time_within_the_lead(redis_url, r):
    n, ms = 40, 1200

    async def scenario():
        async with running(redis_url, playout_lead_ms=LEAD_MS) as (gw, client):
            ids = [f"call-many-{i}" for i in range(n)]
            conns = await open_calls(gw, ids)
            listeners = [Listener(ws) for ws in conns]
            rnd = random.Random(3)
            pcms = [rnd.randbytes(32 * ms) for _ in ids]
            ticks0 = gw.metrics.c["playout_ticks"]
            for cid, pcm in zip(ids, pcms):       # starts spread over a chunk's time
                await play(client, cid, pcm)
                await asyncio.sleep(rnd.uniform(0, 0.002))
            await heard_whole(listeners, pcms)
            ticks = gw.metrics.c["playout_ticks"] - ticks0
            for ws in conns:
                await ws.close()
            worst_late = worst_early = 0.0
            for cid, li in zip(ids, listeners):
                chunks = li.chunks()
                t0 = chunks[0][0]
                for k, (t, _) in enumerate(chunks):
                    plays_at = t0 + k * CHUNK_S     # the platform plays chunk k then
                    worst_late = max(worst_late, t - plays_at)
                    worst_early = max(worst_early, plays_at - t)
                finished = await until(lambda: playouts(client, cid), what="reports")
                assert finished[0] == ("u", "started", 0)
            # Every chunk arrived before it had to play (the lead absorbed the
            # tick's slack and the machine's jitter), and never more than lead +
            # one chunk ahead (the Pacer's bound).
            assert worst_late <= 0.0, f"a chunk arrived {worst_late * 1000:.0f} ms after its play time"
            assert worst_early <= (LEAD_MS / 1000 + CHUNK_S) + 0.005, worst_early
            # One wake served many calls: far fewer wakes than chunks (n * 30 here).
            assert ticks <= 1.5 * ms / 1000 / gw.registry.playout.slack + 20, ticks
            assert gw.metrics.c["playout_held"] == 0 and gw.metrics.c["playout_errors"] == 0

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_interrupt_cuts_one_call_mid_utterance_with_break_after_its_last_chunk(redis_url, r):
    async def scenario():
        async with running(redis_url, playout_lead_ms=LEAD_MS) as (gw, client):
            ids = ["call-cut", "call-on-1", "call-on-2"]
            conns = await open_calls(gw, ids)
            listeners = [Listener(ws) for ws in conns]
            pcms = [random.Random(i).randbytes(32 * 1500) for i in range(3)]
            await play_each(client, ids, pcms)
            await asyncio.sleep(0.5)
            await client.xadd(keys.gateway_commands(GW), c.encode(c.Interrupt(call_id="call-cut")))
            cut = listeners[0]
            await until(lambda: any(m == BREAK for _, m in cut.got), what="break")
            await heard_whole(listeners[1:], pcms[1:], what="others")
            await asyncio.sleep(0.3)
            messages = [m for _, m in cut.got]
            assert messages[-1] == BREAK and messages.count(BREAK) == 1   # nothing after it
            sent = cut.pcm()
            assert pcms[0].startswith(sent) and 300 <= len(sent) // 32 <= 900
            [started, interrupted] = await until(lambda: playouts(client, "call-cut"))
            assert interrupted[:2] == ("u", "interrupted") and interrupted[2] <= len(sent) // 32
            for li, pcm in zip(listeners[1:], pcms[1:]):   # nothing more came after
                assert li.pcm() == pcm and BREAK not in [m for _, m in li.got]
            for ws in conns:
                await ws.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_peer_that_stops_reading_is_held_without_unbounded_buffering(redis_url, r):
    async def scenario():
        async with running(redis_url, playout_lead_ms=LEAD_MS) as (gw, client):
            loop = asyncio.get_running_loop()
            # The slow peer's receive buffer, and the gateway's send buffer for
            # it, are made small so that its transport's buffer fills in a
            # second rather than after megabytes of kernel buffers.
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", gw.port))
            slow_ws = await connect(url(gw, "call-slow"), sock=sock, compression=None,
                                    max_queue=4)
            [ok_ws] = await open_calls(gw, ["call-fine"])
            await until(lambda: gw.registry.has_socket("call-slow"))
            server_ws = gw.registry.get("call-slow").ws
            server_ws.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            slow_ws.transport.pause_reading()        # the platform stops reading
            fine = Listener(ok_ws)
            pcm_slow = random.Random(1).randbytes(32 * 8000)   # 8 s
            pcm_fine = random.Random(2).randbytes(32 * 3000)   # 3 s
            await play(client, "call-slow", pcm_slow)
            await play(client, "call-fine", pcm_fine)
            await until(lambda: gw.metrics.c["playout_held"] > 0, what="held")
            limit = server_ws.write_limit_high
            peak, t_end = 0, time.monotonic() + 2.5
            while time.monotonic() < t_end:
                peak = max(peak, server_ws.transport.get_write_buffer_size())
                await asyncio.sleep(0.01)
            # Held at the mark: at most one wake's release (lead + one chunk,
            # ~4 messages of 1.8 KB) above it, however long the peer sleeps.
            assert peak <= limit + 4 * 1800, (peak, limit)
            live = gw.registry.get("call-slow")
            assert live.session.queued_ms(loop.time()) >= 8000 - 4000  # not released
            assert gw.metrics.c["playout_held"] >= 20
            # The other call played on, at real time.
            await until(lambda: len(fine.pcm()) == len(pcm_fine), what="the other call")
            assert fine.pcm() == pcm_fine
            span = fine.chunks()[-1][0] - fine.chunks()[0][0]
            assert 3.0 - LEAD_MS / 1000 - CHUNK_S - 0.05 <= span <= 3.2, span
            # The peer reads again: everything arrives, in order, nothing lost.
            slow_ws.transport.resume_reading()
            slow = Listener(slow_ws)
            await until(lambda: len(slow.pcm()) == len(pcm_slow), timeout=20, what="slow audio")
            assert slow.pcm() == pcm_slow
            await until(lambda: _finished(client, "call-slow"), what="finished")
            await slow_ws.close()
            await ok_ws.close()

    asyncio.run(asyncio.wait_for(scenario(), 90))


async def _finished(client, cid):
    got = await playouts(client, cid)
    return got and got[-1] == ("u", "finished", 8000)


def test_one_failing_call_does_not_stop_the_others(redis_url, r):
    async def scenario():
        async with running(redis_url, playout_lead_ms=LEAD_MS) as (gw, client):
            ids = ["call-bad", "call-good-1", "call-good-2"]
            conns = await open_calls(gw, ids)
            listeners = [Listener(ws) for ws in conns]

            def boom(now):
                raise RuntimeError("a bug in one call")

            gw.registry.get("call-bad").session.pump = boom
            pcms = [random.Random(i).randbytes(32 * 800) for i in range(3)]
            await play_each(client, ids, pcms)
            await heard_whole(listeners[1:], pcms[1:], what="others")
            assert gw.metrics.c["playout_errors"] == 1 and listeners[0].pcm() == b""
            assert "call-bad" in gw.registry and gw.registry.has_socket("call-bad")
            # Its socket still carries commands.
            await client.xadd(keys.gateway_commands(GW), c.encode(c.Pause(call_id="call-bad")))
            await until(lambda: any(m == {"action": "pause"} for _, m in listeners[0].got))
            for ws in conns:
                await ws.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_replaced_and_dropped_sockets_take_their_calls_off_the_tick(redis_url, r):
    async def scenario():
        async with running(redis_url, playout_lead_ms=LEAD_MS) as (gw, client):
            tick = gw.registry.playout
            first, dropped = await open_calls(gw, ["call-moving", "call-dropping"])
            old, drop = Listener(first), Listener(dropped)
            pcm = random.Random(5).randbytes(32 * 3000)
            await play(client, "call-moving", pcm)
            await play(client, "call-dropping", pcm)
            await until(lambda: len(tick) == 2 and old.chunks() and drop.chunks(), what="speaking")
            await asyncio.sleep(0.3)
            # The same call connects again: the old socket is closed (4000),
            # the queue cut and reported, the new socket hears nothing of it.
            second = await connect(url(gw, "call-moving"), compression=None)
            new = Listener(second)
            await until(lambda: first.close_code == 4000, what="old socket closed")
            # The other call's socket drops without a close frame: suspended.
            dropped.transport.abort()
            await until(lambda: gw.registry.suspended_count == 1, what="suspended")
            assert len(tick) == 0
            for cid in ("call-moving", "call-dropping"):
                states = [s for _, s, _ in await until(lambda cid=cid: playouts(client, cid))]
                assert states == ["started", "interrupted"], (cid, states)
            await asyncio.sleep(0.3)
            assert new.got == [] and old.pcm() == pcm[:len(old.pcm())] and len(old.pcm()) < len(pcm)
            # New audio plays on the new socket, from its start.
            short = pcm[:32 * 400]
            await play(client, "call-moving", short, uid="again")
            await until(lambda: new.pcm() == short, what="audio on the new socket")
            await second.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))
