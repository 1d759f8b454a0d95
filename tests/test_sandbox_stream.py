"""Sandbox media stream: the sandbox dials a test WebSocket server (standing in for
the gateway), streams real-time binary L16 frames, and obeys what the server sends.
No gateway or Redis involved."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import wave

import pytest
import requests
from websockets.asyncio.server import serve

from piopiy_voice.sandbox.platform import PlatformOptions
from piopiy_voice.sandbox.server import Sandbox
from piopiy_voice.audio import frame_bytes, read_wav, rms_dbfs, speech_like

APP_ID, TOKEN = "777", "stream-test-token"


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    sb = Sandbox(app_id=APP_ID, app_token=TOKEN, report_dir=tmp_path_factory.mktemp("reports"),
                 scenario="listen", options=PlatformOptions(ring_ms=50))
    sb.start()
    yield sb
    sb.stop()


class Gateway:
    """A test WebSocket server that records every frame with its arrival time."""

    def __init__(self) -> None:
        self.frames: list[tuple[float, bytes]] = []
        self.connected = asyncio.Event()
        self.closed = asyncio.Event()
        self.ws = None
        self.path = None
        self._waiters: list[tuple[int, asyncio.Event]] = []

    async def handler(self, ws) -> None:
        self.ws, self.path = ws, ws.request.path
        self.connected.set()
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    self.frames.append((time.monotonic(), message))
                    for n, ev in self._waiters:
                        if len(self.frames) >= n:
                            ev.set()
        finally:
            self.closed.set()

    async def wait_frames(self, n: int, timeout: float = 10.0) -> None:
        ev = asyncio.Event()
        self._waiters.append((n, ev))
        if len(self.frames) >= n:
            ev.set()
        await asyncio.wait_for(ev.wait(), timeout)

    async def send(self, obj) -> None:
        await self.ws.send(obj if isinstance(obj, (str, bytes)) else json.dumps(obj))


def place(sb: Sandbox, port: int, *, rate=8000, mode="callee", on_answer=True, extra=None, more=()):
    pcmo = [{"action": "stream", "ws_url": f"ws://127.0.0.1:{port}/call/t1?x=1", "listen_mode": mode,
             "voice_quality": rate, "stream_on_answer": on_answer}, *more]
    r = requests.post(sb.base_url + "/v2/global_pcmo_make_call", timeout=10, json={
        "appid": APP_ID, "secret": TOKEN, "from": 14155550123, "to": 14155550100,
        "extra_params": extra or {}, "pcmo": pcmo})
    assert r.status_code == 200, r.text
    return r.json()["request_id"]


async def run_call(sb, script, **kw):
    """Start a gateway stub, place a call against it, run ``script(gw)``, return (gw, report)."""
    gw = Gateway()
    async with serve(gw.handler, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        rid = await asyncio.to_thread(place, sb, port, **kw)
        await asyncio.wait_for(gw.connected.wait(), 10)
        await script(gw)
        report = await asyncio.to_thread(sb.wait, rid, 20)
        await asyncio.wait_for(gw.closed.wait(), 5)
    return gw, report


def events(report, name):
    return [e for e in report["events"] if e["event"] == name]


def stream_audio(pcm: bytes, rate=8000, kind="raw") -> dict:
    return {"type": "streamAudio", "data": {"audioDataType": kind, "sampleRate": rate,
                                             "audioData": base64.b64encode(pcm).decode()}}


@pytest.mark.parametrize("rate", [8000, 16000])
def test_real_time_frames_of_the_right_size_then_pcmo_hangup(sandbox, rate):
    async def script(gw):
        await gw.wait_frames(60)
        await gw.send([{"action": "hangup"}])

    gw, rep = asyncio.run(run_call(sandbox, script, rate=rate))
    assert gw.path == "/call/t1?x=1"
    sizes = {len(f) for _, f in gw.frames}
    assert sizes == {frame_bytes(rate)}
    # 50 frames a second, paced (not a burst): 59 intervals of 20 ms.
    span = gw.frames[59][0] - gw.frames[0][0]
    assert 1.0 <= span <= 1.4, span
    assert rep["end_reason"] == "hangup_pcmo"
    s = rep["stream"]
    assert s["frames_sent"] == len(gw.frames) and s["frame_bytes"] == frame_bytes(rate)
    assert s["closed_by"] == "platform" and s["close_code"] == 1000
    assert [e["actions"] for e in events(rep, "ws_message")] == [["hangup"]]
    with wave.open(rep["recordings"]["caller"]) as w:
        assert w.getframerate() == rate


def test_pause_leaves_a_gap_resume_restarts(sandbox):
    marks = {}

    async def script(gw):
        await gw.wait_frames(25)
        await gw.send({"action": "pause"})
        marks["paused_at"] = len(gw.frames)
        await asyncio.sleep(0.6)  # the pause we want to see as a gap
        marks["during_pause"] = len(gw.frames) - marks["paused_at"]
        await gw.send({"action": "resume"})
        await gw.wait_frames(marks["paused_at"] + 30)
        await gw.send([{"action": "hangup"}])

    gw, rep = asyncio.run(run_call(sandbox, script))
    # At most one frame already in flight when the pause was sent.
    assert marks["during_pause"] <= 1
    gaps = [b[0] - a[0] for a, b in zip(gw.frames, gw.frames[1:])]
    big = [g for g in gaps if g > 0.2]
    assert len(big) == 1 and 0.5 <= big[0] <= 0.8, big
    s = rep["stream"]
    assert len(s["paused_ranges"]) == 1
    start, end = s["paused_ranges"][0]
    assert 550 <= end - start <= 800
    assert len(s["runs"]) == 2 and sum(r["frames"] for r in s["runs"]) == len(gw.frames)
    tick_gap = s["runs"][1]["first_tick"] - s["runs"][0]["last_tick"]
    assert 25 <= tick_gap <= 40  # ~0.6 s of 20 ms ticks with nothing sent
    assert [e["event"] for e in rep["events"] if e["event"] in ("stream_paused", "stream_resumed")] == \
        ["stream_paused", "stream_resumed"]
    # caller.wav is silent exactly where nothing was sent.
    pcm, rate = read_wav(rep["recordings"]["caller"])
    assert len(pcm) >= frame_bytes(rate) * s["runs"][1]["last_tick"]


def test_stream_audio_is_played_and_break_cuts_it(sandbox):
    speech = speech_like(2000, rate=16000, seed=5)

    async def script(gw):
        await gw.wait_frames(10)
        # 2 s at 16 kHz in 100 ms chunks, sent faster than real time (the gateway leads a bit).
        chunk = frame_bytes(16000) * 5
        for i in range(0, len(speech), chunk):
            await gw.send(stream_audio(speech[i:i + chunk], rate=16000))
        n = len(gw.frames)
        await gw.wait_frames(n + 25)  # ~0.5 s of it played
        await gw.send({"action": "break"})
        await gw.wait_frames(len(gw.frames) + 25)
        await gw.send([{"action": "hangup"}])

    gw, rep = asyncio.run(run_call(sandbox, script))
    assert rep["received"]["streamAudio"] == 20 and rep["received"]["break"] == 1
    p = rep["playout"]
    assert p["received_ms"] == 2000.0
    assert 350 <= p["played_ms"] <= 800 and p["played_ms"] + p["cut_ms"] == 2000
    cut = events(rep, "playback_cut")[0]
    assert cut["cut_ms"] == p["cut_ms"]
    # agent.wav: speech until the break, silence right after it.
    pcm, rate = read_wav(rep["recordings"]["agent"])
    assert rate == 8000
    fb = frame_bytes(rate)
    origin = rep["audio_origin_ms"]
    first = next(e for e in rep["events"] if e.get("kind") == "streamAudio")["t_ms"]
    t_cut = cut["t_ms"]

    def level(t0, t1):
        a, b = int((t0 - origin) / 20) * fb, int((t1 - origin) / 20) * fb
        return rms_dbfs(pcm[a:b])

    assert level(first + 40, t_cut - 40) > -35
    assert level(t_cut + 60, t_cut + 400) < -80


def test_malformed_messages_are_reported_and_never_end_the_call(sandbox):
    async def script(gw):
        await gw.wait_frames(5)
        await gw.send("not json")
        await gw.send({"action": "dance"})
        await gw.send({"type": "streamAudio", "data": {"audioDataType": "raw", "sampleRate": 8000,
                                                       "audioData": "%%%"}})
        await gw.send(b"\x00\x01")
        await gw.send(stream_audio(b"ID3fake-mp3", kind="mp3"))
        await gw.send({"action": "play", "file_name": "x.wav"})  # a PCMO action not in a list
        n = len(gw.frames)
        await gw.wait_frames(n + 10)  # still streaming
        await gw.send([{"action": "hangup"}])

    gw, rep = asyncio.run(run_call(sandbox, script))
    assert rep["end_reason"] == "hangup_pcmo"
    fields = [m["field"] for m in rep["malformed"]]
    assert fields == ["message", "action", "data.audioData", "message"]
    assert rep["received"]["binary"] == 1 and rep["playout"]["undecodable"] == 1


def test_stop_ends_streaming_not_the_call_and_mid_call_pcmo_runs(sandbox):
    marks = {}

    async def script(gw):
        await gw.wait_frames(10)
        await gw.send({"action": "stop"})
        await asyncio.sleep(0.3)
        marks["after_stop"] = len(gw.frames)
        await gw.send({"action": "resume"})  # ignored: stop is final
        await gw.send([{"action": "play", "file_name": "hold.wav"}])
        await asyncio.sleep(0.5)
        marks["later"] = len(gw.frames)
        await gw.ws.close(1000, "app done")

    gw, rep = asyncio.run(run_call(sandbox, script))
    assert marks["later"] == marks["after_stop"] <= 12
    assert events(rep, "stream_stopped") and events(rep, "control_ignored")[0]["action"] == "resume"
    assert events(rep, "play_started")[0]["what"] == "play:hold.wav"
    assert rep["stream"]["closed_by"] == "gateway" and rep["stream"]["close_reason"] == "app done"
    # The socket closed while the music was playing: the running PCMO keeps the call up
    # until it is done, then the platform hangs up.
    assert rep["end_reason"] == "pcmo_completed" and not events(rep, "play_cut")
    closed, finished = events(rep, "ws_closed")[0], events(rep, "play_finished")[0]
    assert closed["t_ms"] < finished["t_ms"] <= events(rep, "call_ended")[0]["t_ms"]


def test_caller_hangup_closes_the_socket(sandbox):
    async def script(gw):
        pass

    gw, rep = asyncio.run(run_call(sandbox, script, extra={"scenario": "hangup_mid_utterance"}))
    assert rep["end_reason"] == "caller_hangup"
    assert rep["stream"]["closed_by"] == "platform" and rep["stream"]["close_code"] == 1000
    said = events(rep, "say_start")[0]
    # 300 ms silence + 1200 ms speech were streamed before the hangup.
    assert 74 <= len(gw.frames) <= 80
    assert max(rms_dbfs(f) for _, f in gw.frames[16:75]) > -30
    assert said["ms"] == 1200


def test_bridge_mid_call_human_is_streamed_with_listen_mode_both(sandbox, tmp_path):
    scen = tmp_path / "bridge.json"
    scen.write_text(json.dumps({
        "steps": [{"silence": 200}], "after_steps": "stay", "max_duration_s": 20,
        "human": {"answer_after_ms": 300, "steps": [{"say": {"ms": 800, "seed": 9}}], "after_steps": "hangup"},
    }))

    async def script(gw):
        await gw.wait_frames(5)
        await gw.send([{"action": "bridge", "from": 14155550123,
                        "connect": [{"type": "pstn", "number": 919000000001}]}])
        await gw.wait_frames(len(gw.frames) + 80)  # ring + talk + a bit
        await gw.send([{"action": "hangup"}])

    gw, rep = asyncio.run(run_call(sandbox, script, mode="both", extra={"scenario": str(scen)}))
    assert rep["end_reason"] == "hangup_pcmo"
    names = [e["event"] for e in rep["events"] if e["src"] == "human"]
    assert names[:2] == ["human_ringing", "human_answered"] and "human_left" in names
    assert max(rms_dbfs(f) for _, f in gw.frames) > -30  # the human's voice came up the stream
    assert rep["stream"]["state"] == "closed" and rep["stream"]["closed_by"] == "platform"


def test_early_stream_connects_before_answer(sandbox):
    async def script(gw):
        await gw.wait_frames(20)
        await gw.send([{"action": "hangup"}])

    gw, rep = asyncio.run(run_call(sandbox, script, on_answer=False))
    order = [e["event"] for e in rep["events"] if e["event"] in ("ws_connected", "answered")]
    assert order == ["ws_connected", "answered"]


def test_unreachable_stream_fails_and_call_ends(sandbox):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    rid = place(sandbox, port)
    rep = sandbox.wait(rid, 20)
    assert rep["stream"]["state"] == "failed" and events(rep, "stream_failed")
    assert rep["end_reason"] in ("stream_failed", "pcmo_completed")


def test_optional_text_events_start_dtmf_stop(tmp_path):
    texts = []

    async def handler(ws):
        async for m in ws:
            if isinstance(m, str):
                texts.append(json.loads(m))

    scen = tmp_path / "keys.json"
    scen.write_text(json.dumps({"steps": [{"silence": 100}, {"dtmf": "5"}, {"silence": 100}, {"hangup": True}]}))

    async def main():
        async with serve(handler, "127.0.0.1", 0, compression=None) as server:
            port = server.sockets[0].getsockname()[1]
            with Sandbox(app_id=APP_ID, app_token=TOKEN, report_dir=tmp_path, scenario=str(scen),
                         options=PlatformOptions(ring_ms=20, text_events=True)) as sb:
                rid = await asyncio.to_thread(place, sb, port)
                return await asyncio.to_thread(sb.wait, rid, 20)

    rep = asyncio.run(main())
    assert rep["end_reason"] == "caller_hangup"
    assert [t["event"] for t in texts] == ["start", "dtmf", "stop"]
    assert texts[0]["request_id"] == rep["request_id"] and texts[1]["digits"] == "5"
    assert texts[2]["reason"] == "caller_hangup"


def test_hold_streams_silence_and_caller_hears_the_hold_tone(sandbox, tmp_path):
    scen = tmp_path / "talker.json"
    scen.write_text(json.dumps({"steps": [{"say": {"ms": 6000, "seed": 3}}], "max_duration_s": 20}))
    marks = {}

    def action(rid, what):
        r = requests.post(sandbox.base_url + "/v1/call/action", timeout=5,
                          json={"appid": APP_ID, "secret": TOKEN, "cmiuuid": rid, "action": what})
        assert r.status_code == 200, r.text

    async def script(gw):
        await gw.wait_frames(20)
        rid = sandbox.calls()[-1]["request_id"]
        await asyncio.to_thread(action, rid, "hold")
        marks["hold"] = len(gw.frames)
        await gw.wait_frames(marks["hold"] + 30)
        await asyncio.to_thread(action, rid, "unhold")
        marks["unhold"] = len(gw.frames)
        await gw.wait_frames(marks["unhold"] + 20)
        await gw.send([{"action": "hangup"}])

    gw, rep = asyncio.run(run_call(sandbox, script, extra={"scenario": str(scen)}))
    levels = [rms_dbfs(f) for _, f in gw.frames]
    assert max(levels[marks["hold"] + 3:marks["hold"] + 28]) < -90  # caller muted on the stream
    assert max(levels[marks["unhold"] + 3:marks["unhold"] + 20]) > -30  # talking again
    held = next(e for e in rep["events"] if e["event"] == "held")["t_ms"]
    pcm, rate = read_wav(rep["recordings"]["agent"])
    a = int((held - rep["audio_origin_ms"]) / 20 + 2) * frame_bytes(rate)
    assert rms_dbfs(pcm[a:a + frame_bytes(rate) * 10]) > -40  # the hold tone
