"""Gateway integration: real Redis, real websockets client on loopback as the platform."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import urllib.error
import urllib.request

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from piopiy_voice.gateway.server import Gateway
from piopiy_voice import contracts as c
from piopiy_voice import keys
from piopiy_voice.redisconn import connect_async
from piopiy_voice.settings import Settings
from piopiy_voice.signing import sign_stream_url

pytestmark = pytest.mark.integration

SECRET = "test-secret-for-gateway"
GW = "gw-test"


def settings(**kw):
    base = dict(signing_secret=SECRET, gateway_id=GW, playout_lead_ms=100, drain_grace_s=1.0)
    base.update(kw)
    return Settings.from_env({}, **base)


@contextlib.asynccontextmanager
async def running(redis_url, **kw):
    gw = Gateway(settings(**kw), redis_url=redis_url, host="127.0.0.1", port=0)
    await gw.start()
    client = connect_async(redis_url)
    try:
        yield gw, client
    finally:
        await gw.stop()
        await client.aclose()


def url(gw, call_id, secret=SECRET, ttl_s=60, **params):
    params = {"rate": "8000", "mode": "callee", **params}
    return sign_stream_url(f"ws://127.0.0.1:{gw.port}", call_id, secret, ttl_s=ttl_s,
                           params=params)


async def until(cond, timeout=5.0, what="condition"):
    """Poll an async predicate until true (Redis state has no event to await)."""
    deadline = time.monotonic() + timeout
    while True:
        got = await cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def entries(client, call_id):
    return [(eid, c.decode(f)) for eid, f in await client.xrange(keys.call_stream(call_id))]


async def of_type(client, call_id, mtype):
    return [m for _, m in await entries(client, call_id) if m.type == mtype]


async def send_cmd(client, cmd):
    await client.xadd(keys.gateway_commands(GW), c.encode(cmd))


async def result_for(client, call_id, command_id):
    async def find():
        for m in await of_type(client, call_id, "command.result"):
            if m.command_id == command_id:
                return m
    return await until(find, what=f"result of {command_id}")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


# ---------------------------------------------------------------- inbound
def test_audio_in_order_without_loss_and_lifecycle(redis_url, r):
    async def scenario():
        async with running(redis_url) as (gw, client):
            data = bytes((i * 13) % 256 for i in range(320 * 200))
            sizes = [320, 100, 540, 1000, 2, 318, 1280]
            async with connect(url(gw, "call-a", campaign="spring"), compression=None) as ws:
                pos, k = 0, 0
                while pos < len(data):
                    n = sizes[k % len(sizes)]
                    await ws.send(data[pos:pos + n])
                    pos, k = pos + n, k + 1
                await ws.send('{"event": "dtmf", "digit": "7"}')

                async def all_in():
                    return len(await of_type(client, "call-a", "audio")) == 200
                await until(all_in, what="200 frames")
            await until(lambda: _has(client, "call-a", "call.ended"), what="CallEnded")
            es = [m for _, m in await entries(client, "call-a")]
            assert es[0].type == "call.started" and es[0].gateway_id == GW
            assert es[0].params["campaign"] == "spring"
            audio = [m for m in es if m.type == "audio"]
            assert b"".join(m.pcm for m in audio) == data
            seqs = [m.seq for m in es]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
            dtmf = [m for m in es if m.type == "platform.event"]
            assert dtmf[0].event == "dtmf" and dtmf[0].data == {"digit": "7"}
            assert es.index(dtmf[0]) > es.index(audio[-1])
            ended = es[-1]
            assert ended.type == "call.ended" and ended.reason == "platform_closed"
            assert ended.frames_in == 200 and ended.frames_dropped == 0
            lifecycle = [c.decode(f) for _, f in await client.xrange(keys.CALLS_STREAM)]
            assert [(m.type, m.call_id) for m in lifecycle] == [
                ("call.started", "call-a"), ("call.ended", "call-a")]
            meta = await client.hgetall(keys.call_meta("call-a"))
            assert meta[b"state"] == b"ended" and meta[b"end_reason"] == b"platform_closed"
            assert meta[b"gateway_id"] == GW.encode() and meta[b"rate"] == b"8000"
            assert await client.hget(keys.campaign_key("spring", "states"), "call-a") == b"ended"
            assert 0 < await client.ttl(keys.call_stream("call-a")) <= keys.CALL_KEY_TTL_AFTER_END
    run(scenario())


async def _has(client, cid, mtype):
    return bool(await of_type(client, cid, mtype))


def test_malformed_text_and_odd_binary_are_tolerated(redis_url, r):
    async def scenario():
        async with running(redis_url) as (gw, client):
            async with connect(url(gw, "call-t"), compression=None) as ws:
                for bad in ("not json", '{"x": 1}', "[" * 50000):
                    await ws.send(bad)
                await ws.send(b"\x01" * 161)  # odd: the byte waits for the next frame
                await ws.send(b"\x02" * 159)
                await ws.send('{"event": "mark", "name": "m1"}')
                await ws.send('{"event": "stop"}')  # the platform says it is stopping
                await ws.send(b"\x03" * 3)  # trailing odd byte at the end of the call

                async def got_mark():
                    return await of_type(client, "call-t", "platform.event")
                await until(got_mark, what="mark event")
            await until(lambda: _has(client, "call-t", "call.ended"), what="CallEnded")
            ended = await of_type(client, "call-t", "call.ended")
            assert ended[0].reason == "stream_stopped"
            audio = await of_type(client, "call-t", "audio")
            assert [m.pcm for m in audio] == [b"\x01" * 161 + b"\x02" * 159,
                                              b"\x03\x03" + bytes(318)]
            m = gw.metrics.c
            assert m["text_malformed"] == 3 and m["odd_frames"] == 3
            assert m["odd_bytes_dropped"] == 1
    run(scenario())


def test_oversized_frame_closes_1009(redis_url, r):
    async def scenario():
        async with running(redis_url, max_frame_bytes=4096) as (gw, client):
            async with connect(url(gw, "call-big"), compression=None) as ws:
                await ws.send(bytes(320))
                await ws.send(bytes(5000))
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 5)
                assert ws.close_code == 1009
            ended = await until(lambda: of_type(client, "call-big", "call.ended"), what="end")
            assert ended[0].reason == "limit_exceeded"
    run(scenario())


# -------------------------------------------------------------- handshake
def _http(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            # every Content-Type header, joined: there must be exactly one
            return resp.status, resp.read().decode(), ",".join(resp.headers.get_all("Content-Type"))
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), None


async def _status(u):
    try:
        async with connect(u, compression=None):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


def test_handshake_refusals_and_health(redis_url, r):
    async def scenario():
        async with running(redis_url, max_calls=1) as (gw, client):
            assert await _status(url(gw, "c1", secret="wrong-secret-xyz")) == 401
            assert await _status(_expired(gw)) == 403
            assert await _status(f"ws://127.0.0.1:{gw.port}/elsewhere") == 404
            assert await _status(url(gw, "c1", rate="44100")) == 400
            async with connect(url(gw, "c1"), compression=None):
                assert await _status(url(gw, "c2")) == 503  # max_calls=1
            assert (await asyncio.to_thread(_http, gw.port, "/healthz"))[0] == 200
            assert (await asyncio.to_thread(_http, gw.port, "/readyz"))[0] == 200
            status, body, ctype = await asyncio.to_thread(_http, gw.port, "/metrics")
            assert status == 200 and ctype.startswith("text/plain") and "," not in ctype
            for status_, reason in (("401", "bad_signature"), ("403", "expired"),
                                    ("404", "not_found"), ("400", "bad_rate"),
                                    ("503", "max_calls")):
                line = (f'pv_gateway_handshakes_refused_total{{reason="{reason}",'
                        f'status="{status_}"}} 1.0')
                assert line in body, line
            gw.draining = True
            assert (await asyncio.to_thread(_http, gw.port, "/readyz"))[0] == 503
            assert await _status(url(gw, "c3")) == 503
    run(scenario())


def _expired(gw):
    return sign_stream_url(f"ws://127.0.0.1:{gw.port}", "c1", SECRET, ttl_s=10,
                           now=time.time() - 60, params={"rate": "8000"})


# --------------------------------------------------------------- commands
def _json(msg):
    return json.loads(msg)


def test_each_command_type_reaches_the_socket_exactly(redis_url, r):
    cases = [
        (c.Pause(call_id="call-c"), {"action": "pause"}),
        (c.Resume(call_id="call-c"), {"action": "resume"}),
        (c.PlayMusic(call_id="call-c", file="hold.wav"), [{"action": "play", "file_name": "hold.wav"}]),
        (c.PlayMusic(call_id="call-c", file="http://m.example/x.mp3"),
         [{"action": "play", "file_url": "http://m.example/x.mp3"}]),
        (c.Speak(call_id="call-c", text="one moment"), [{"action": "speak", "text": "one moment"}]),
        (c.Transfer(call_id="call-c", to=["919000000001", "919000000002"], caller_id="918000000000",
                    ring_type="group"),
         [{"action": "bridge", "from": 918000000000,
           "connect": [{"type": "pstn", "number": 919000000001},
                       {"type": "pstn", "number": 919000000002}],
           "duration": 5400, "timeout": 40, "loop": 1, "ring_type": "group"}]),
        (c.RawPcmo(call_id="call-c", pcmo=[{"action": "record"}]), [{"action": "record"}]),
        (c.Interrupt(call_id="call-c"), {"action": "break"}),
        (c.Hangup(call_id="call-c"), [{"action": "hangup"}]),
    ]

    async def scenario():
        async with running(redis_url) as (gw, client):
            async with connect(url(gw, "call-c"), compression=None) as ws:
                await until(lambda: _has(client, "call-c", "call.started"), what="start")
                for cmd, expected in cases:
                    await send_cmd(client, cmd)
                    assert _json(await asyncio.wait_for(ws.recv(), 5)) == expected
                    res = await result_for(client, "call-c", cmd.command_id)
                    assert (res.status, res.command, res.gateway_id) == ("applied", cmd.type, GW)
            ended = await until(lambda: of_type(client, "call-c", "call.ended"), what="end")
            assert ended[0].reason == "hangup"
            timeline = [f[b"event"] for _, f in await client.xrange(keys.call_timeline("call-c"))]
            assert b"command.transfer" in timeline and b"command.hangup" in timeline
    run(scenario())


def test_foreign_duplicate_and_invalid_commands(redis_url, r):
    async def scenario():
        async with running(redis_url) as (gw, client):
            async with connect(url(gw, "call-d"), compression=None) as ws:
                await until(lambda: _has(client, "call-d", "call.started"), what="start")
                foreign = c.Pause(call_id="someone-else", reply_to=keys.reply_stream("t1"))
                await send_cmd(client, foreign)
                pause = c.Pause(call_id="call-d")
                await send_cmd(client, pause)
                await send_cmd(client, pause)  # same command_id: ignored
                bad = c.RawPcmo(call_id="call-d", pcmo=[{"no_action": 1}])
                await send_cmd(client, bad)
                await client.xadd(keys.gateway_commands(GW), {"type": "cmd.bogus", "call_id": "x"})
                resume = c.Resume(call_id="call-d")
                await send_cmd(client, resume)
                # In-order delivery: the first two messages on OUR socket are ours,
                # so the foreign pause and the duplicate never reached it.
                assert _json(await asyncio.wait_for(ws.recv(), 5)) == {"action": "pause"}
                assert _json(await asyncio.wait_for(ws.recv(), 5)) == {"action": "resume"}
                reply = await until(lambda: client.xrange(keys.reply_stream("t1")), what="reply")
                res = c.decode(reply[0][1])
                assert (res.status, res.reason) == ("rejected", "call not on this gateway")
                bad_res = await result_for(client, "call-d", bad.command_id)
                assert bad_res.status == "rejected" and "action" in bad_res.reason
                results = await of_type(client, "call-d", "command.result")
                assert [x.command_id for x in results].count(pause.command_id) == 1
                assert gw.metrics.c["commands_duplicate"] == 1
                assert gw.metrics.c["commands_malformed"] == 1
    run(scenario())


def _decode_audio(msg):
    m = _json(msg)
    assert m["type"] == "streamAudio" and m["data"]["audioDataType"] == "raw"
    return base64.b64decode(m["data"]["audioData"])


def test_play_audio_paced_and_finished(redis_url, r):
    async def scenario():
        async with running(redis_url, playout_lead_ms=60) as (gw, client):
            async with connect(url(gw, "call-p"), compression=None) as ws:
                await until(lambda: _has(client, "call-p", "call.started"), what="start")
                pcm = bytes(range(256)) * 25  # 6400 bytes = 400 ms
                cmd = c.PlayAudio(call_id="call-p", pcm=pcm, rate=8000, utterance_id="u1")
                await send_cmd(client, cmd)
                got, t0 = b"", None
                while len(got) < len(pcm):
                    got += _decode_audio(await asyncio.wait_for(ws.recv(), 5))
                    t0 = t0 or time.monotonic()
                elapsed = time.monotonic() - t0
                assert got == pcm
                # Real-time pacing: 400 ms of audio is not dumped at once.
                assert elapsed >= 0.2, elapsed
                pl = await until(
                    lambda: _states(client, "call-p", ["started", "finished"]), what="finished")
                assert pl[-1].played_ms == 400 and pl[-1].total_ms == 400
    run(scenario())


async def _states(client, cid, want):
    got = await of_type(client, cid, "playout")
    return got if [p.state for p in got] == want else None


def test_interrupt_cuts_paced_audio(redis_url, r):
    async def scenario():
        async with running(redis_url, playout_lead_ms=100) as (gw, client):
            async with connect(url(gw, "call-i"), compression=None) as ws:
                await until(lambda: _has(client, "call-i", "call.started"), what="start")
                pcm = bytes(16000 * 2 * 3)  # 3 s at 16 kHz
                play = c.PlayAudio(call_id="call-i", pcm=pcm, rate=16000, utterance_id="long")
                await send_cmd(client, play)
                got = _decode_audio(await asyncio.wait_for(ws.recv(), 5))
                t0 = time.monotonic()
                while time.monotonic() - t0 < 0.3:
                    got += _decode_audio(await asyncio.wait_for(ws.recv(), 5))
                await send_cmd(client, c.Interrupt(call_id="call-i"))
                while True:
                    msg = _json(await asyncio.wait_for(ws.recv(), 5))
                    if msg == {"action": "break"}:
                        break
                    got += base64.b64decode(msg["data"]["audioData"])
                sent_ms = len(got) * 1000 // 32000
                assert sent_ms < 1000, sent_ms  # far less than the 3 s queued
                with pytest.raises(asyncio.TimeoutError):  # nothing more after break
                    await asyncio.wait_for(ws.recv(), 0.3)
                pl = await until(lambda: _states(client, "call-i", ["started", "interrupted"]),
                                 what="interrupted")
                assert pl[-1].total_ms == 3000 and 200 <= pl[-1].played_ms <= sent_ms
    run(scenario())


def test_outbound_queue_limit_rejects_command(redis_url, r):
    async def scenario():
        async with running(redis_url, max_outbound_queue_ms=1000) as (gw, client):
            async with connect(url(gw, "call-q"), compression=None):
                await until(lambda: _has(client, "call-q", "call.started"), what="start")
                cmd = c.PlayAudio(call_id="call-q", pcm=bytes(32000), rate=8000)  # 2 s
                await send_cmd(client, cmd)
                res = await result_for(client, "call-q", cmd.command_id)
                assert res.status == "rejected" and "queue full" in res.reason
    run(scenario())


def test_same_call_reconnecting_replaces_the_socket(redis_url, r):
    async def scenario():
        async with running(redis_url) as (gw, client):
            first = await connect(url(gw, "call-r"), compression=None)
            await first.send(bytes(320))
            await until(lambda: _has(client, "call-r", "audio"), what="audio")
            async with connect(url(gw, "call-r"), compression=None) as second:
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(first.recv(), 5)
                assert first.close_code == 4000
                await second.send(bytes(320))
                await send_cmd(client, c.Pause(call_id="call-r"))
                assert _json(await asyncio.wait_for(second.recv(), 5)) == {"action": "pause"}
                assert not await of_type(client, "call-r", "call.ended")
            ended = await until(lambda: of_type(client, "call-r", "call.ended"), what="end")
            assert len(ended) == 1 and ended[0].frames_in == 2
            assert len(await of_type(client, "call-r", "call.started")) == 1
    run(scenario())


def test_back_to_back_utterances_play_in_order(redis_url, r):
    async def scenario():
        async with running(redis_url, playout_lead_ms=60) as (gw, client):
            async with connect(url(gw, "call-b"), compression=None) as ws:
                await until(lambda: _has(client, "call-b", "call.started"), what="start")
                one, two = b"\x01\x00" * 1600, b"\x02\x00" * 800  # 200 ms, 100 ms
                await send_cmd(client, c.PlayAudio(call_id="call-b", pcm=one, utterance_id="u1"))
                got = _decode_audio(await asyncio.wait_for(ws.recv(), 5))
                await send_cmd(client, c.PlayAudio(call_id="call-b", pcm=two, utterance_id="u2"))
                while len(got) < len(one) + len(two):
                    got += _decode_audio(await asyncio.wait_for(ws.recv(), 5))
                assert got == one + two
                # u2's first chunk goes out `lead` before u1 ends: no gap between them.
                pl = await until(lambda: _states(
                    client, "call-b", ["started", "started", "finished", "finished"]),
                    what="both finished")
                done = [(p.utterance_id, p.played_ms) for p in pl if p.state == "finished"]
                assert done == [("u1", 200), ("u2", 100)]
    run(scenario())


def test_direct_path_keeps_order_with_fragments_and_bad_utf8(redis_url, r):
    async def scenario():
        async with running(redis_url) as (gw, client):
            async with connect(url(gw, "call-f"), compression=None) as ws:
                await ws.send(b"\x01" * 320)
                await ws.send(b"\xff\xfe", text=True)  # not UTF-8: counted, call goes on
                await ws.send([b"\x02" * 100, b"\x02" * 220])  # fragmented: ordinary path
                await ws.send(b"\x03" * 320)
                await ws.send('{"event": "mark"}')

                async def got_all():
                    return len(await of_type(client, "call-f", "platform.event")) == 1
                await until(got_all, what="mark event")
            es = [m for _, m in await entries(client, "call-f")]
            kinds = [(m.type, getattr(m, "pcm", b"")[:1]) for m in es]
            assert kinds[1:5] == [("audio", b"\x01"), ("audio", b"\x02"), ("audio", b"\x03"),
                                  ("platform.event", b"")]
            assert gw.metrics.c["text_malformed"] == 1
    run(scenario())
