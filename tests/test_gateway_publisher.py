"""Publisher edge cases that need no Redis."""

from __future__ import annotations

import asyncio
import logging
import socket


from piopiy_voice import contracts as c
from piopiy_voice import keys
from piopiy_voice.gateway.publisher import Publisher


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tls_url_is_never_sent_in_clear():
    # Review fix: a rediss:// URL was once accepted and then sent in clear. Now
    # it gets a verifying TLS context (tests/test_redis_tls.py runs it for real).
    import ssl

    from piopiy_voice.redisconn import RedisTls

    pub = Publisher("rediss://127.0.0.1:6380/0", tls=RedisTls())
    assert isinstance(pub._ssl, ssl.SSLContext) and pub._ssl.verify_mode == ssl.CERT_REQUIRED
    assert Publisher("redis://127.0.0.1:6380/0")._ssl is None


def test_close_reports_what_could_not_be_written(caplog):
    # Review fix: close() after a failed flush dropped buffered entries
    # (CallEnded included) without a word.
    async def main():
        pub = Publisher(f"redis://127.0.0.1:{_closed_port()}/0", connect_timeout=0.1)
        pub.start()
        prefix = pub.audio_prefix("call-x")
        assert pub.add_audio(prefix, 1, b"\x00\x00" * 160)
        pub.xadd("pv:calls", {"type": "call.ended"})
        await pub.close(timeout=0.2)
        return pub

    with caplog.at_level(logging.WARNING, logger="piopiy_voice.gateway.publisher"):
        pub = asyncio.run(asyncio.wait_for(main(), 10))
    assert pub.metrics.c["frames_dropped_closing"] == 1  # reason="writer_closed"
    assert any("discarding 2 unwritten entries (1 audio frames)" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_platform_text_cannot_grow_the_outage_buffer_without_bound():
    # Review fix: text frames became entries that were "never refused", so
    # during a Redis outage a chatty platform grew the buffer without limit.
    from piopiy_voice.gateway.handshake import Admission  # noqa: PLC0415
    from piopiy_voice.gateway.server import Gateway  # noqa: PLC0415
    from piopiy_voice.settings import Settings  # noqa: PLC0415

    async def main():
        gw = Gateway(Settings.from_env({}, signing_secret="x" * 16, gateway_id="gw-u",
                                       redis_buffer_frames=10),
                     redis_url=f"redis://127.0.0.1:{_closed_port()}/0")
        gw.publisher.max_bytes = 50_000  # Redis is down: nothing drains the buffer
        live = gw.registry.attach(None, Admission("call-u", 8000, "callee", None))
        text = '{"event": "mark", "pad": "%s"}' % ("x" * 1000)
        for _ in range(500):
            live.on_text(text)
        assert len(gw.publisher._buf) < 50_000 + 2_000
        assert gw.metrics.c["events_dropped"] > 400
        assert gw.metrics.c["text_frames"] == 500
        await gw.redis.aclose()

    asyncio.run(asyncio.wait_for(main(), 10))


# ------------------------------------------------- one copy of the audio contract
def _write(redis_url, frames):
    async def main():
        pub = Publisher(redis_url)
        pub.start()
        for cid, seq, pcm in frames:
            assert pub.add_audio(pub.audio_prefix(cid), seq, pcm)
        assert await pub.flush(5)
        await pub.close()

    asyncio.run(asyncio.wait_for(main(), 10))


def test_audio_entry_round_trips_through_redis_and_the_decoder(redis_url, r):
    # Bytes the hand-written writer produces -> a real XADD -> XRANGE -> the
    # contract's decoder: the same frame, with exactly the contract's fields.
    pcm = bytes(range(256)) * 5  # 1280 bytes: a 20 ms frame at 32 kHz
    _write(redis_url, [("call-rt", 7, pcm), ("call-rt", 8, pcm[:320])])
    got = r.xrange(keys.call_stream("call-rt"))
    assert len(got) == 2
    fields = got[0][1]
    assert list(fields) == [name.encode() for name in c.AUDIO_FIELD_NAMES]
    want = c.audio_fields("call-rt", 7, pcm)
    assert fields == {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in want.items()}
    assert c.decode(fields) == c.AudioFrame(call_id="call-rt", seq=7, pcm=pcm)
    assert c.decode(got[1][1]) == c.AudioFrame(call_id="call-rt", seq=8, pcm=pcm[:320])


def test_writer_prefix_follows_the_contract_not_its_own_copy(redis_url, r, monkeypatch):
    # If the contract's fixed fields change (a new version, one more field), the
    # writer writes that, with a consistent field count, without being edited.
    real = c.audio_head
    monkeypatch.setattr(c, "audio_head", lambda cid: {**real(cid), "v": "9", "codec": "l16"})
    _write(redis_url, [("call-v", 1, b"\x01\x00" * 160)])
    [(_, fields)] = r.xrange(keys.call_stream("call-v"))
    assert fields[b"v"] == b"9" and fields[b"codec"] == b"l16"
    assert fields[b"seq"] == b"1" and fields[b"pcm"] == b"\x01\x00" * 160


def test_a_call_over_its_backlog_share_gets_one_gap_report_not_one_per_frame():
    # Review fix: the pending gap report went out whenever the *whole* buffer
    # had room, so a call over its own share (call_frames) added a one-frame
    # StreamGap (and a warning) for every frame it dropped.
    from piopiy_voice.gateway.handshake import Admission  # noqa: PLC0415
    from piopiy_voice.gateway.metrics import Metrics  # noqa: PLC0415
    from piopiy_voice.gateway.registry import Registry  # noqa: PLC0415
    from piopiy_voice.settings import Settings  # noqa: PLC0415

    async def main():
        pub = Publisher(f"redis://127.0.0.1:{_closed_port()}/0", buffer_frames=1000,
                        call_frames=10)
        registry = Registry(gateway_id="gw", settings=Settings.from_env({}, signing_secret="x" * 16),
                            publisher=pub, metrics=Metrics())
        live = registry.attach(None, Admission("call-b", 8000, "callee", None))
        entries = len(pub._kinds)
        for _ in range(100):
            live.publish_frame(bytes(320))
        assert pub._kinds[entries:] == bytearray([1] * 10)  # 10 frames, no gap entries
        assert live.session.gap_pending == 90 and live.session.frames_dropped == 90

    asyncio.run(asyncio.wait_for(main(), 10))


def test_a_batch_redis_never_answers_is_resent_on_a_new_connection(redis_url, r):
    # The flusher keeps no timer per batch: one watchdog per connection cuts a
    # connection whose batch has waited past ``reply_timeout``; the batch is
    # then resent (at least once) on a new connection, as after any loss.
    from urllib.parse import urlparse

    real = urlparse(redis_url)

    async def main():
        connections = []

        async def serve(reader, writer):
            connections.append(writer)
            if len(connections) == 1:
                # Answer the connection handshake (PING), then swallow everything.
                assert (await reader.readuntil(b"PING\r\n")).endswith(b"PING\r\n")
                writer.write(b"+PONG\r\n")
                while await reader.read(1 << 16):
                    pass
                return
            up_r, up_w = await asyncio.open_connection(real.hostname, real.port)

            async def pipe(src, dst):
                while data := await src.read(1 << 16):
                    dst.write(data)
                dst.close()
            await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pub = Publisher(f"redis://127.0.0.1:{port}/0", reply_timeout=0.4)
        pub.start()
        t0 = asyncio.get_running_loop().time()
        assert pub.add_audio(pub.audio_prefix("call-late"), 1, b"\x05\x00" * 160)
        assert await pub.flush(5)
        waited = asyncio.get_running_loop().time() - t0
        err = pub.metrics.c["redis_errors"]
        await pub.close()
        server.close()
        for w in connections:
            w.close()
        return waited, err, len(connections)

    waited, errors, conns = asyncio.run(asyncio.wait_for(main(), 20))
    # Cut between reply_timeout and reply_timeout + a quarter of it (+ scheduling).
    assert 0.4 <= waited < 1.5, waited
    assert errors == 1 and conns == 2
    [(_, fields)] = r.xrange(keys.call_stream("call-late"))
    assert fields[b"seq"] == b"1" and fields[b"pcm"] == b"\x05\x00" * 160
