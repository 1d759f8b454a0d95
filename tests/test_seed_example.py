"""The corrected seed example: its exact PCMO, and that it places the call as documented."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from piopiy_voice.signing import verify_stream_path
from examples_support import load_example
from test_rest import OK, FakePlatform

build_pcmo = load_example("seed_example").build_pcmo
main = load_example("seed_example").main

ROOT = Path(__file__).resolve().parent.parent
SECRET = "seed-test-secret-0123"
WS = "ws://127.0.0.1:8765/call/seed-1?rate=8000&mode=callee&exp=9&sig=ab"


def test_build_pcmo_exact():
    text = build_pcmo(WS, "hold_music.wav")
    assert isinstance(text, str)  # StreamAction.PCMO() form, which voice.call accepts
    assert json.loads(text) == [
        {"action": "stream", "ws_url": WS, "listen_mode": "callee", "voice_quality": 8000,
         "stream_on_answer": True},
        {"action": "play", "file_name": "hold_music.wav"},
        {"action": "hangup"},
    ]


def test_build_pcmo_music_url_goes_to_file_url():
    assert json.loads(build_pcmo(WS, "https://cdn.example.com/m.mp3"))[1] == {
        "action": "play", "file_url": "https://cdn.example.com/m.mp3"}


@pytest.fixture
def platform():
    p = FakePlatform()
    try:
        yield p
    finally:
        p.close()


def seed_env(platform: FakePlatform) -> dict[str, str]:
    return {
        "PIOPIY_APP_ID": "4242", "PIOPIY_APP_TOKEN": "seed-token",
        "PIOPIY_BASE_URL": platform.url, "PIOPIY_ACTION_URL": platform.url + "/v1/call/action",
        "PIOPIY_CALLER_ID": "919000000001",
        "PV_GATEWAY_PUBLIC_URL": "ws://127.0.0.1:8765", "PV_SIGNING_SECRET": SECRET,
    }


def test_main_places_the_call(platform, monkeypatch, capsys):
    for k, v in seed_env(platform).items():
        monkeypatch.setenv(k, v)
    assert main(["919876543210", "--call-id", "seed-42"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"call_id": "seed-42", "reply": OK}
    (req,) = platform.requests
    assert req["path"] == "/v2/ind_pcmo_make_call"
    body = req["body"]
    assert (body["appid"], body["secret"], body["from"], body["to"]) == (4242, "seed-token", 919000000001,
                                                                         919876543210)
    stream, play, hangup = body["pcmo"]
    assert (stream["listen_mode"], stream["voice_quality"], stream["stream_on_answer"]) == ("callee", 8000, True)
    assert play == {"action": "play", "file_name": "hold_music.wav"} and hangup == {"action": "hangup"}
    # The gateway accepts the URL and learns the call, rate and mode from it.
    url = urlsplit(stream["ws_url"])
    target = verify_stream_path(f"{url.path}?{url.query}", SECRET)
    assert target.call_id == "seed-42" and target.params == {"rate": "8000", "mode": "callee"}


def test_main_reports_missing_settings(monkeypatch, capsys):
    for k in ("PIOPIY_APP_ID", "PIOPIY_APP_TOKEN", "PIOPIY_CALLER_ID"):
        monkeypatch.delenv(k, raising=False)
    assert main(["919876543210"]) == 2
    assert "PIOPIY_CALLER_ID" in capsys.readouterr().err
    monkeypatch.setenv("PIOPIY_CALLER_ID", "919000000001")
    assert main(["919876543210"]) == 1
    assert "PIOPIY_APP_ID" in capsys.readouterr().err


def test_runs_as_a_script(platform):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIOPIY_", "PV_"))}
    env.update(seed_env(platform))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "seed_example.py"), "919876543210"],
                          env=env, cwd="/", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["reply"]["request_id"] == "req-1"
    assert len(platform.requests) == 1
