"""Dispatcher unit tests with fake sockets (no Redis, no network)."""

from __future__ import annotations

import asyncio
import socket

from piopiy_voice.gateway.dispatch import Dispatcher
from piopiy_voice.gateway.handshake import Admission
from piopiy_voice.gateway.metrics import Metrics
from piopiy_voice.gateway.publisher import Publisher
from piopiy_voice.gateway.registry import Registry
from piopiy_voice.settings import Settings
from piopiy_voice import contracts as c


class FakeWs:
    def __init__(self, stall: bool = False):
        self.stall = stall
        self.sent: list[str] = []
        self.got = asyncio.Event()
        self.closed_with: tuple[int, str] | None = None
        self.closed = asyncio.Event()

    async def close(self, code, reason):
        self.closed_with = (code, reason)
        self.closed.set()

    async def send(self, text):
        if self.stall:  # a peer that stopped reading: drain never completes
            await asyncio.Event().wait()
        self.sent.append(text)
        self.got.set()

    # The playout tick writes audio synchronously (DirectConnection's API).
    def write_state(self):
        return "full" if self.stall else "open"

    def write_texts(self, texts):
        self.sent += texts
        self.got.set()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup():
    """A registry holding two calls on fake sockets; the writer never connects
    (it only buffers). Must run inside an event loop."""
    pub = Publisher(f"redis://127.0.0.1:{_closed_port()}/0")
    metrics = Metrics()
    registry = Registry(gateway_id="gw", settings=Settings.from_env({}, signing_secret="x" * 16),
                        publisher=pub, metrics=metrics)
    sessions = {}
    for cid, stall in (("call-slow", True), ("call-ok", False)):
        sessions[cid] = registry.attach(FakeWs(stall), Admission(cid, 8000, "callee", None))
    d = Dispatcher(registry=registry, redis=None, metrics=metrics)
    return d, sessions


def test_a_stalled_socket_does_not_hold_up_other_calls_commands():
    # Review fix: the single command reader awaited each socket send (up to
    # SEND_TIMEOUT_S), so one call whose peer stopped reading delayed every
    # other call's commands, interrupts included, by 2 s each.
    async def main():
        d, sessions = _setup()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await d.on_command(b"1-0", c.encode(c.Pause(call_id="call-slow")))
        await d.on_command(b"2-0", c.encode(c.Interrupt(call_id="call-ok")))
        await asyncio.wait_for(sessions["call-ok"].ws.got.wait(), 5)
        waited = loop.time() - t0
        assert sessions["call-ok"].ws.sent == ['{"action":"break"}']
        assert waited < 0.5, waited
        await d.close()

    asyncio.run(asyncio.wait_for(main(), 10))


def test_commands_of_one_call_stay_in_order_and_pending_is_bounded():
    async def main():
        d, sessions = _setup()
        for i, cmd in enumerate([c.Pause(call_id="call-ok"), c.Resume(call_id="call-ok"),
                                 c.Interrupt(call_id="call-ok")]):
            await d.on_command(b"%d-0" % i, c.encode(cmd))
        await d.close()
        assert sessions["call-ok"].ws.sent == [
            '{"action":"pause"}', '{"action":"resume"}', '{"action":"break"}']
        # the stalled call: the first command blocks, the rest queue up to the bound
        for i in range(600):
            await d.on_command(b"9-%d" % i, c.encode(c.Pause(call_id="call-slow")))
        assert 0 < d.metrics.c["commands_rejected"] <= 600 - 256
        await d.close()

    asyncio.run(asyncio.wait_for(main(), 20))


def test_a_send_that_times_out_closes_the_socket_and_rejects_the_command(monkeypatch):
    import piopiy_voice.gateway.dispatch as dispatch

    monkeypatch.setattr(dispatch, "SEND_TIMEOUT_S", 0.1)

    async def main():
        d, sessions = _setup()
        await d.on_command(b"1-0", c.encode(c.Pause(call_id="call-slow")))
        await asyncio.wait_for(sessions["call-slow"].ws.closed.wait(), 5)
        assert sessions["call-slow"].ws.closed_with == (1011, "send timeout")
        assert d.metrics.c["send_timeouts"] == 1
        assert d.metrics.c["commands_rejected"] == 1 and d.metrics.c["commands_applied"] == 0
        await d.close()

    asyncio.run(asyncio.wait_for(main(), 10))


def test_32k_audio_is_resampled_inline_and_played_at_16k(monkeypatch):
    # soxr made resampling cheap: no thread hop (the workaround is gone), the
    # session resamples inline through the public resample function.
    import json

    import piopiy_voice.gateway.session as session_mod

    calls = []
    real = session_mod.resample

    def spy(pcm, src, dst):
        calls.append((len(pcm), src, dst))
        return real(pcm, src, dst)

    monkeypatch.setattr(session_mod, "resample", spy)

    def no_thread(*a, **kw):
        raise AssertionError("resampling must not hop to a thread")

    monkeypatch.setattr(asyncio, "to_thread", no_thread)

    async def main():
        d, sessions = _setup()
        pcm = bytes(32000 * 2 // 10)  # 100 ms at 32 kHz
        await d.on_command(b"1-0", c.encode(c.PlayAudio(call_id="call-ok", pcm=pcm, rate=32000)))
        await asyncio.wait_for(sessions["call-ok"].ws.got.wait(), 5)
        await d.close()
        first = json.loads(sessions["call-ok"].ws.sent[0])
        assert first["type"] == "streamAudio" and first["data"]["sampleRate"] == 16000
        sessions["call-ok"].cut_playout()

    asyncio.run(asyncio.wait_for(main(), 10))
    assert calls == [(6400, 32000, 16000)]
