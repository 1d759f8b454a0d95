"""Publisher edge cases that need no Redis."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from piopiy_voice.gateway.publisher import Publisher


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tls_url_is_refused_not_silently_sent_in_clear():
    # Review fix: the hand-written RESP writer speaks plain TCP only; a
    # rediss:// URL was accepted and then failed forever (or leaked in clear).
    with pytest.raises(ValueError, match="rediss"):
        Publisher("rediss://127.0.0.1:6380/0")


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
    assert pub.metrics.c["frames_dropped"] == 1
    assert any("discarding 2 unwritten entries (1 audio frames)" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_platform_text_cannot_grow_the_outage_buffer_without_bound():
    # Review fix: text frames became entries that were "never refused", so
    # during a Redis outage a chatty platform grew the buffer without limit.
    from piopiy_voice.gateway.dispatch import LiveCall  # noqa: PLC0415
    from piopiy_voice.gateway.server import Gateway  # noqa: PLC0415
    from piopiy_voice.gateway.session import CallSession  # noqa: PLC0415
    from piopiy_voice.settings import Settings  # noqa: PLC0415

    gw = Gateway(Settings.from_env({}, signing_secret="x" * 16, gateway_id="gw-u",
                                   redis_buffer_frames=10),
                 redis_url=f"redis://127.0.0.1:{_closed_port()}/0")
    gw.publisher.max_bytes = 50_000  # Redis is down: nothing drains the buffer
    live = LiveCall(CallSession("call-u"), None, gw.publisher.audio_prefix("call-u"), None)
    text = '{"event": "mark", "pad": "%s"}' % ("x" * 1000)
    for _ in range(500):
        gw._on_text(live, text)
    assert len(gw.publisher._buf) < 50_000 + 2_000
    assert gw.metrics.c["events_dropped"] > 400
    assert gw.metrics.c["text_frames"] == 500
