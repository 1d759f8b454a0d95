"""The bundled demo scenario against a tiny reactive agent (a WebSocket stub that
hears with a VAD, as the real system does, and counts the caller's turns instead
of understanding them): greeting, question, barge-in with break, the third turn
(the request for a person) handed off with a bridge, the stream kept up while
the caller and the human talk, caller hangs up. The words themselves are the
end-to-end test's business (tests/test_e2e_system.py, with the transcriber).
Also: ``piopiy-voice sandbox`` as a process."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import requests
from websockets.asyncio.server import serve

from piopiy_voice.sandbox.platform import PlatformOptions
from piopiy_voice.sandbox.server import Sandbox
from piopiy_voice.audio import EnergyVad, rms_dbfs, speech_like

ROOT = Path(__file__).resolve().parent.parent


def say(pcm: bytes) -> str:
    return json.dumps({"type": "streamAudio", "data": {"audioDataType": "raw", "sampleRate": 8000,
                                                        "audioData": base64.b64encode(pcm).decode()}})


class ReactiveAgent:
    def __init__(self) -> None:
        self.log: list[tuple[float, str]] = []
        self.frames: list[tuple[float, bytes]] = []
        self.closed = asyncio.Event()

    async def handler(self, ws) -> None:
        vad = EnergyVad(8000)
        loop = asyncio.get_running_loop()
        talking_until = 0.0
        replies = 0
        try:
            async for msg in ws:
                if not isinstance(msg, bytes):
                    continue
                now = loop.time()
                self.frames.append((now, msg))
                if len(self.frames) == 5:
                    await ws.send(say(speech_like(1500, seed=40)))
                    talking_until = now + 1.5
                    self.log.append((now, "greeting"))
                edge = vad.process(msg)
                if replies >= 99:
                    continue  # handed off: only listening
                if edge == "speech_start" and now < talking_until:
                    await ws.send(json.dumps({"action": "break"}))
                    talking_until = now
                    self.log.append((now, "break"))
                elif edge == "speech_end" and replies == 2:  # "can I talk to a real person"
                    self.log.append((now, "handoff"))
                    await ws.send(say(speech_like(800, seed=41)))
                    await ws.send(json.dumps([{"action": "bridge", "from": 14155550123,
                                               "connect": [{"type": "pstn", "number": 919000000001}]}]))
                    replies = 99
                elif edge == "speech_end" and replies < 2:
                    ms = 3000 if replies == 0 else 800
                    await ws.send(say(speech_like(ms, seed=42 + replies)))
                    talking_until = now + ms / 1000
                    replies += 1
                    self.log.append((now, f"reply{replies}"))
        finally:
            self.closed.set()


def test_demo_scenario_end_to_end_against_a_reactive_agent(tmp_path):
    agent = ReactiveAgent()

    async def main():
        async with serve(agent.handler, "127.0.0.1", 0, compression=None) as server:
            port = server.sockets[0].getsockname()[1]
            with Sandbox(report_dir=tmp_path, options=PlatformOptions(ring_ms=100)) as sb:
                r = await asyncio.to_thread(requests.post, sb.base_url + "/v2/ind_pcmo_make_call", json={
                    "appid": 1111111, "secret": "sandbox-dev-token", "from": 919876543210,
                    "to": 14155550100, "pcmo": [{"action": "stream", "ws_url": f"ws://127.0.0.1:{port}/call/d",
                                                  "listen_mode": "both", "voice_quality": 8000}]}, timeout=10)
                rid = r.json()["request_id"]
                rep = await asyncio.to_thread(sb.wait, rid, 60)
            await asyncio.wait_for(agent.closed.wait(), 5)
            return rep

    rep = asyncio.run(main())
    said = [name for _, name in agent.log]
    assert said == ["greeting", "reply1", "break", "reply2", "handoff"], said
    assert rep["end_reason"] == "caller_hangup", rep["end_reason"]
    ev = [(e["src"], e["event"]) for e in rep["events"]]
    order = [("caller", "say_start"), ("platform", "playback_cut"), ("human", "human_answered"),
             ("human", "human_say_start"), ("caller", "hangup"), ("platform", "call_ended")]
    positions = [ev.index(x) for x in order]
    assert positions == sorted(positions), ev
    # The stream stayed up through the bridge until the caller hung up.
    s = rep["stream"]
    assert s["closed_by"] == "platform" and len(s["runs"]) == 1 and s["frames_sent"] == len(agent.frames)
    human_says = next(e for e in rep["events"] if e["event"] == "human_say_start")
    tick = int((human_says["t_ms"] - rep["audio_origin_ms"]) / 20) - s["runs"][0]["first_tick"]
    after = [f for _, f in agent.frames[tick + 5:tick + human_says["ms"] // 20]]
    assert max(rms_dbfs(f) for f in after) > -30  # the human's voice reached the agent
    assert not [e for e in rep["events"] if e["event"] in ("step_error", "human_step_error")]
    for path in rep["recordings"].values():
        assert os.path.getsize(path) > 44


def test_cli_sandbox_process_serves_and_stops_on_sigterm(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), PIOPIY_APP_ID="", PIOPIY_APP_TOKEN="")
    proc = subprocess.Popen([sys.executable, "-m", "piopiy_voice.cli", "sandbox", "--port", "0", "--report-dir",
                             str(tmp_path), "--scenario", "listen"], env=env, cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("sandbox ready at http://127.0.0.1:"), line
        url = line.split()[3]
        assert requests.get(url + "/healthz", timeout=5).json()["status"] == "ok"
        r = requests.post(url + "/v2/global_pcmo_make_call", timeout=5, json={
            "appid": "1111111", "secret": "sandbox-dev-token", "from": 14155550123, "to": 14155550100,
            "pcmo": [{"action": "speak", "text": "hi"}]})
        assert r.status_code == 200
        rid = r.json()["request_id"]
        assert requests.get(f"{url}/sandbox/calls/{rid}?wait=10", timeout=15).json()["finished"]
        assert (tmp_path / rid / "timeline.json").is_file()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert "dev pair" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_cli_rejects_unknown_scenario(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "piopiy_voice.cli", "sandbox", "--port", "0", "--scenario", "nope"],
                         env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "unknown scenario" in res.stderr
