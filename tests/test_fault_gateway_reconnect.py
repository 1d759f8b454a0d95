"""Fault suite (gateway): sockets that drop and come back, drains, grace expiry.

Real Redis (the session's private server), real gateways (in-process or
``piopiy-voice gateway`` subprocesses), real sockets; SIGKILL where the fault
is a gateway dying. The test plays the platform (websockets clients) and,
where a worker's part is only "send a command to the gateway named by the
latest ``call.started``", the worker too, so what is measured is the gateway.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
from urllib.parse import urlsplit

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from piopiy_voice import callrecord, keys
from piopiy_voice import contracts as c
from piopiy_voice.redisconn import connect_async, free_port
from piopiy_voice.signing import sign_stream_url
from test_gateway_server import SECRET, running, run, url

pytestmark = pytest.mark.integration


async def wait_for(pred, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        got = await pred()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def stream_of(client, cid):
    return [c.decode(f) for _, f in await client.xrange(keys.call_stream(cid))]


async def state_of(client, cid):
    v = await client.hget(keys.call_meta(cid), "state")
    return v.decode() if v else None


def rst(ws):
    """Drop the TCP connection without a close frame (what a network fault does)."""
    ws.transport.abort()


async def latest_gateway(client, cid):
    starts = [m for m in await stream_of(client, cid) if m.type == "call.started"]
    return starts[-1].gateway_id


async def command_reaches_socket(client, cid, ws, text):
    """Play the worker: send Speak to the gateway the latest call.started names;
    the platform's socket must receive it."""
    gw = await latest_gateway(client, cid)
    cmd = c.Speak(call_id=cid, text=text)
    await client.xadd(keys.gateway_commands(gw), c.encode(cmd))
    while True:
        msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if isinstance(msg, list) and msg and msg[0].get("action") == "speak":
            assert msg[0]["text"] == text
            return gw


def test_rst_then_same_url_resumes_the_call_with_seq_continuing(redis_url, r):
    async def scenario():
        async with running(redis_url, reconnect_grace_s=5.0) as (gw, client):
            u = url(gw, "rc-1")
            ws = await connect(u, compression=None)
            for _ in range(10):
                await ws.send(bytes(320))
            await wait_for(lambda: _count(client, "rc-1", "audio", 10), what="10 frames")
            rst(ws)
            await wait_for(lambda: _is(client, "rc-1", "suspended"), what="suspended")
            assert gw.metrics.c["calls_suspended"] == 1
            rec = await client.hgetall(keys.call_meta("rc-1"))
            assert float(rec[b"resume_by"]) - float(rec[b"suspended_at"]) == pytest.approx(5, abs=0.01)
            async with connect(u, compression=None) as ws2:
                await wait_for(lambda: _is(client, "rc-1", "live"), what="live again")
                for _ in range(5):
                    await ws2.send(bytes(320))
                await wait_for(lambda: _count(client, "rc-1", "audio", 15), what="15 frames")
                assert await command_reaches_socket(client, "rc-1", ws2, "welcome back") == gw.gateway_id
            es = await stream_of(client, "rc-1")
            seqs = [m.seq for m in es if m.seq]
            assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))
            assert [m.type for m in es].count("call.started") == 2
            assert gw.metrics.c["calls_resumed"] == 1
            # Dropped during the grace: no call.ended until the platform closes for good.
            await wait_for(lambda: _has(client, "rc-1", "call.ended"), what="end after close")
            ended = [m for m in await stream_of(client, "rc-1") if m.type == "call.ended"]
            assert len(ended) == 1 and ended[0].reason == "platform_closed"
    run(scenario())


def test_ended_call_url_is_refused_410(redis_url, r):
    async def scenario():
        async with running(redis_url) as (gw, client):
            u = url(gw, "rc-end")
            async with connect(u, compression=None) as ws:
                await ws.send(bytes(320))
            await wait_for(lambda: _is(client, "rc-end", "ended"), what="ended")
            with pytest.raises(InvalidStatus) as exc:
                async with connect(u, compression=None):
                    pass
            assert exc.value.response.status_code == 410
            assert await state_of(client, "rc-end") == "ended"
            es = await stream_of(client, "rc-end")
            assert [m.type for m in es].count("call.started") == 1
            assert gw.metrics.c["refused:call_ended"] == 1
    run(scenario())


def test_grace_expiry_ends_the_call_once_even_with_two_sweepers(redis_url, r):
    async def scenario():
        async with running(redis_url, reconnect_grace_s=0.6) as (a, client):
            async with running(redis_url, reconnect_grace_s=0.6, gateway_id="gw-other") as (b, _):
                ws = await connect(url(a, "rc-exp"), compression=None)
                for _ in range(3):
                    await ws.send(bytes(320))
                await wait_for(lambda: _count(client, "rc-exp", "audio", 3), what="frames")
                rst(ws)
                await wait_for(lambda: _has(client, "rc-exp", "call.ended"), what="call.ended")
                await asyncio.sleep(1.5)  # both sweepers keep running: still only one end
                es = await stream_of(client, "rc-exp")
                ended = [m for m in es if m.type == "call.ended"]
                assert len(ended) == 1 and ended[0].reason == "socket_lost"
                assert ended[0].frames_in == 3 and ended[0].seq == es[-2].seq + 1
                calls = [c.decode(f) for _, f in await client.xrange(keys.CALLS_STREAM)]
                assert [m.type for m in calls if m.call_id == "rc-exp"] == ["call.started",
                                                                            "call.ended"]
                assert a.metrics.c["calls_swept"] + b.metrics.c["calls_swept"] == 1
                assert await client.ttl(keys.call_meta("rc-exp")) > 0
                assert await client.zscore(callrecord.SUSPENDED_ZSET, "rc-exp") is None
                assert "rc-exp" not in a.registry  # the local session is forgotten too
                with pytest.raises(InvalidStatus) as exc:
                    async with connect(url(b, "rc-exp"), compression=None):
                        pass
                assert exc.value.response.status_code == 410
    run(scenario())


# ------------------------------------------------------------- subprocesses
def _ready(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def _start_gateway(env, gid, port, tmp_path, **extra):
    log = open(tmp_path / f"{gid}.log", "wb")
    p = subprocess.Popen([sys.executable, "-m", "piopiy_voice.cli", "gateway"],
                         env=dict(env, PV_GATEWAY_ID=gid, PV_GATEWAY_PORT=str(port), **extra),
                         stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not _ready(port):
        assert p.poll() is None, (tmp_path / f"{gid}.log").read_text()
        assert time.monotonic() < deadline, "gateway not ready"
        time.sleep(0.05)
    return p


def _stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()


def test_gateway_killed_during_grace_another_gateway_ends_the_call(subprocess_env, r, tmp_path,
                                                                   redis_url):
    env = dict(subprocess_env, PV_SIGNING_SECRET=SECRET, PV_RECONNECT_GRACE_S="1.5")
    port_a = free_port()
    pa = _start_gateway(env, "gw-ka", port_a, tmp_path)
    try:
        async def scenario():
            async with running(redis_url, reconnect_grace_s=1.5, gateway_id="gw-kb") as (b, client):
                u = sign_stream_url(f"ws://127.0.0.1:{port_a}", "rc-kill", SECRET,
                                    params={"rate": "8000"})
                ws = await connect(u, compression=None)
                for _ in range(4):
                    await ws.send(bytes(320))
                await wait_for(lambda: _count(client, "rc-kill", "audio", 4), what="frames")
                rst(ws)
                await wait_for(lambda: _is(client, "rc-kill", "suspended"), what="suspended")
                pa.send_signal(signal.SIGKILL)  # the holder of the suspension dies
                pa.wait(5)
                await wait_for(lambda: _has(client, "rc-kill", "call.ended"), 10, "call.ended")
                ended = [m for m in await stream_of(client, "rc-kill") if m.type == "call.ended"]
                assert len(ended) == 1 and ended[0].reason == "socket_lost"
                assert b.metrics.c["calls_swept"] == 1
        run(scenario())
    finally:
        _stop(pa)


def test_drain_hands_20_calls_to_another_gateway(subprocess_env, r, tmp_path, redis_url):
    n = 20
    env = dict(subprocess_env, PV_SIGNING_SECRET=SECRET, PV_RECONNECT_GRACE_S="20",
               PV_DRAIN_GRACE_S="0.5")
    port_a, port_b = free_port(), free_port()
    pa = _start_gateway(env, "gw-da", port_a, tmp_path)
    pb = _start_gateway(env, "gw-db", port_b, tmp_path)
    try:
        async def call(i, client, drained: asyncio.Event):
            cid = f"drain-{i}"
            ua = sign_stream_url(f"ws://127.0.0.1:{port_a}", cid, SECRET, params={"rate": "8000"})
            parts = urlsplit(ua)
            ub = f"ws://127.0.0.1:{port_b}{parts.path}?{parts.query}"
            ws = await connect(ua, compression=None)
            sent = 0
            while not drained.is_set():  # real-time audio until the gateway closes us
                try:
                    await ws.send(bytes(320))
                    sent += 1
                except Exception:  # noqa: BLE001 (closed by the drain)
                    break
                await asyncio.sleep(0.02)
            await ws.wait_closed()
            code = ws.close_code
            # The platform dials the same URL again; the proxy sends it to B.
            async with connect(ub, compression=None) as ws2:
                for _ in range(5):
                    await ws2.send(bytes(320))
                await wait_for(lambda: _gateway_is(client, cid, "gw-db"), 10, f"{cid} on B")
                heard = await command_reaches_socket(client, cid, ws2, f"hello again {i}")
                await ws2.send(json.dumps({"event": "stop"}))
            return code, heard

        async def scenario():
            client = connect_async(redis_url)
            drained = asyncio.Event()
            tasks = [asyncio.create_task(call(i, client, drained)) for i in range(n)]
            await wait_for(lambda: _all_live(client, n), 20, "20 calls live on A")
            await asyncio.sleep(0.3)
            pa.send_signal(signal.SIGTERM)
            await asyncio.to_thread(pa.wait, 20)
            drained.set()
            results = await asyncio.gather(*tasks)
            out = []
            for i in range(n):
                es = await stream_of(client, f"drain-{i}")
                out.append(es)
            await client.aclose()
            return results, out

        results, streams = run(scenario())
        assert pa.returncode == 0
        assert [code for code, _ in results] == [1012] * n
        assert [heard for _, heard in results] == ["gw-db"] * n  # all 20 heard the agent again
        for es in streams:
            starts = [m.gateway_id for m in es if m.type == "call.started"]
            assert starts == ["gw-da", "gw-db"]
            assert not [m for m in es if m.type == "call.ended" and m.reason != "stream_stopped"]
            seqs = [m.seq for m in es if m.seq]
            assert seqs == sorted(seqs) and len(seqs) == len(set(seqs)), "seq continues on B"
    finally:
        _stop(pa)
        _stop(pb)


# ----------------------------------------------------------------- helpers
async def _count(client, cid, mtype, n):
    return len([m for m in await stream_of(client, cid) if m.type == mtype]) >= n


async def _has(client, cid, mtype):
    return any(m.type == mtype for m in await stream_of(client, cid))


async def _is(client, cid, state):
    return await state_of(client, cid) == state


async def _gateway_is(client, cid, gid):
    rec = await client.hmget(keys.call_meta(cid), "state", "gateway_id")
    return rec == [b"live", gid.encode()]


async def _all_live(client, n):
    for i in range(n):
        if await state_of(client, f"drain-{i}") != "live":
            return False
    return True
