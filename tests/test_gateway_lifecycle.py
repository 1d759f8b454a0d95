"""Process lifecycle: SIGTERM drain (real subprocess) and a Redis outage under the writer."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from piopiy_voice.gateway.publisher import Publisher
from piopiy_voice import contracts as c
from piopiy_voice import keys
from piopiy_voice.redisconn import EmbeddedRedis, connect as connect_sync
from piopiy_voice.signing import sign_stream_url
from piopiy_voice import callrecord
from test_gateway_server import run

pytestmark = pytest.mark.integration
SECRET = "drain-test-secret"


class _Proc:
    def __init__(self, args, env):
        self.lines: list[str] = []
        self.p = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                  text=True)
        self._t = threading.Thread(target=self._pump, daemon=True)
        self._t.start()

    def _pump(self):
        for line in self.p.stderr:
            self.lines.append(line)

    def wait_line(self, pattern, timeout=15):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                m = re.search(pattern, line)
                if m:
                    return m
            if self.p.poll() is not None and not self._t.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"no log line matching {pattern!r}:\n{''.join(self.lines)}")


def test_sigterm_drains_then_closes_1012(subprocess_env, r):
    env = dict(subprocess_env, PV_SIGNING_SECRET=SECRET)
    proc = _Proc([sys.executable, "-m", "piopiy_voice.gateway.server", "--port", "0", "--gateway-id", "gw-d",
                  "--drain-grace", "1.0"], env)
    try:
        port = int(proc.wait_line(r"listening on 127\.0\.0\.1:(\d+)").group(1))

        def u(cid):
            return sign_stream_url(f"ws://127.0.0.1:{port}", cid, SECRET, params={"rate": "8000"})

        async def scenario():
            async with connect(u("call-z"), compression=None) as ws:
                await ws.send(bytes(320))
                proc.wait_line("call call-z: started")
                deadline = time.monotonic() + 5
                while r.get(keys.gateway_heartbeat("gw-d")) is None:
                    assert time.monotonic() < deadline, "no heartbeat key"
                    await asyncio.sleep(0.02)
                t0 = time.monotonic()
                proc.p.send_signal(signal.SIGTERM)
                await asyncio.to_thread(proc.wait_line, "draining")
                with pytest.raises(InvalidStatus) as exc:  # no new calls while draining
                    async with connect(u("call-new"), compression=None):
                        pass
                assert exc.value.response.status_code == 503
                await ws.send(bytes(320))  # the live call keeps working during grace
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 10)
                waited = time.monotonic() - t0
            assert ws.close_code == 1012
            assert 0.9 <= waited < 5, waited
        run(scenario())
        assert proc.p.wait(10) == 0, "".join(proc.lines)
        # A drain hands the call over: suspended (resumable on another gateway
        # for the reconnect grace), not ended.
        types = [c.decode(f).type for _, f in r.xrange(keys.call_stream("call-z"))]
        assert "call.ended" not in types and types.count("audio") == 2
        rec = r.hgetall(keys.call_meta("call-z"))
        assert rec[b"state"] == b"suspended" and rec[b"frames_in"] == b"2"
        assert int(rec[b"last_seq"]) == 3  # call.started + 2 frames
        assert r.zscore(callrecord.SUSPENDED_ZSET, "call-z") is not None
        assert r.get(keys.gateway_heartbeat("gw-d")) is None
        assert r.zscore(keys.GATEWAYS_ZSET, "gw-d") is None
    finally:
        if proc.p.poll() is None:
            proc.p.kill()
            proc.p.wait(5)


def test_writer_buffers_through_a_redis_outage_and_counts_drops():
    server = EmbeddedRedis()
    port = server.port

    async def scenario():
        nonlocal server
        pub = Publisher(server.url, buffer_frames=50)
        pub.start()
        prefix = pub.audio_prefix("call-o")
        assert pub.add_audio(prefix, 1, b"\x01\x00" * 160)
        assert await pub.flush(5)
        server.close()  # Redis goes away
        accepted = sum(pub.add_audio(prefix, seq, b"\x02\x00" * 160) for seq in range(2, 102))
        assert accepted == 50  # bounded buffer: the rest is refused, the caller counts it
        # Await the writer actually hitting the outage (a fixed sleep could pass
        # without ever exercising the buffering path).
        await _until(lambda: pub.metrics.c["redis_errors"] >= 2)
        server = EmbeddedRedis(port=port)  # Redis is back on the same address
        assert await pub.flush(10)
        assert pub.metrics.c["redis_reconnects"] >= 2
        await pub.close()

    try:
        run(scenario())
        client = connect_sync(server.url)
        got = client.xrange(keys.call_stream("call-o"))
        seqs = [int(f[b"seq"]) for _, f in got]
        # The pre-outage frame was on the old (non-persistent) server; all 50
        # buffered frames arrive once Redis is back, in order.
        assert seqs == list(range(2, 52))
        client.close()
    finally:
        server.close()


def test_gateway_keeps_socket_through_outage_and_reports_gap():
    from test_gateway_server import running, url  # noqa: PLC0415

    server = EmbeddedRedis()
    port = server.port

    async def scenario():
        nonlocal server
        async with running(server.url, redis_buffer_frames=20) as (gw, _client):
            async with connect(url(gw, "call-g"), compression=None) as ws:
                for _ in range(10):
                    await ws.send(bytes(320))
                await _until(lambda: gw.metrics.c["frames_published"] >= 10)
                server.close()
                for i in range(50):
                    await ws.send(i.to_bytes(2, "little") * 160)
                await _until(lambda: gw.metrics.c["frames_in"] >= 60)
                server = EmbeddedRedis(port=port)
                await _until(lambda: gw.publisher.connected and gw.publisher.frames == 0, 15)
                for _ in range(5):
                    await ws.send(b"\x07\x00" * 160)
                await _until(lambda: gw.metrics.c["frames_published"] >= 35, 10)
                assert gw.metrics.c["frames_dropped"] == 30

    try:
        run(scenario())
        client = connect_sync(server.url)
        es = [c.decode(f) for _, f in client.xrange(keys.call_stream("call-g"))]
        kinds = [e.type for e in es]
        gap = kinds.index("gap")
        assert es[gap].frames == 30 and es[gap].reason == "redis_unavailable"
        assert kinds[:gap] == ["audio"] * 20 and kinds[gap + 1:gap + 6] == ["audio"] * 5
        assert [e.pcm[:2] for e in es[:gap]] == [i.to_bytes(2, "little") for i in range(20)]
        # seq numbers leave a hole exactly as large as the gap
        seqs = [e.seq for e in es]
        assert seqs == sorted(seqs)
        assert es[gap].seq - es[gap - 1].seq == 30 + 1  # the dropped frames' seqs are missing
        assert es[-1].type == "call.ended" and es[-1].frames_dropped == 30
        client.close()
    finally:
        server.close()


def test_socket_replacement_keeps_the_pending_gap_report():
    # Review fix (issue 10): the gap counter lived on the per-socket object, so
    # a platform reconnecting during a Redis outage (a socket replacement) lost
    # the pending StreamGap: workers saw a hole in seq with no report. The count
    # now lives in the call's session, which a replacement keeps.
    from test_gateway_server import running, url  # noqa: PLC0415

    server = EmbeddedRedis()
    port = server.port

    async def scenario():
        nonlocal server
        async with running(server.url, redis_buffer_frames=20) as (gw, _client):
            first = await connect(url(gw, "call-rg"), compression=None)
            for _ in range(10):
                await first.send(bytes(320))
            await _until(lambda: gw.metrics.c["frames_published"] >= 10)
            server.close()
            for i in range(50):  # 20 fit in the buffer, 30 are dropped
                await first.send(i.to_bytes(2, "little") * 160)
            await _until(lambda: gw.metrics.c["frames_in"] >= 60)
            assert gw.metrics.c["frames_dropped"] == 30
            # The platform reconnects with the same call while Redis is away.
            second = await connect(url(gw, "call-rg"), compression=None)
            await asyncio.wait_for(first.wait_closed(), 5)
            assert first.close_code == 4000
            server = EmbeddedRedis(port=port)
            await _until(lambda: gw.publisher.connected and gw.publisher.frames == 0, 15)
            for _ in range(5):
                await second.send(b"\x07\x00" * 160)
            await _until(lambda: gw.metrics.c["frames_published"] >= 35, 10)
            await second.close()
            await _until(lambda: gw.metrics.c["calls_ended"] == 1)

    try:
        run(scenario())
        client = connect_sync(server.url)
        es = [c.decode(f) for _, f in client.xrange(keys.call_stream("call-rg"))]
        kinds = [e.type for e in es]
        assert kinds.count("gap") == 1
        gap = kinds.index("gap")
        assert es[gap].frames == 30 and es[gap].reason == "redis_unavailable"
        assert kinds[:gap] == ["audio"] * 20
        assert [e.pcm[:2] for e in es[gap + 1:gap + 6]] == [b"\x07\x00"] * 5
        # The report comes before the next frame, and accounts for the seq hole.
        assert es[gap].seq - es[gap - 1].seq == 30 + 1
        assert es[gap + 1].seq == es[gap].seq + 1
        assert es[-1].type == "call.ended" and es[-1].frames_dropped == 30
        assert es[-1].frames_in == 65 and es[-1].reason == "platform_closed"
        client.close()
    finally:
        server.close()


async def _until(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)
