"""listen_mode on an outbound call: ``callee`` streams the person dialed, ``caller``
the platform's side (the bridged human), ``both`` the mix. The person speaks
first, then is bridged to a human who speaks while the person is silent; which
of the two reaches the stream tells the mode apart."""

from __future__ import annotations

import asyncio
import json

import pytest

from piopiy_voice.audio import rms_dbfs
from test_sandbox_stream import run_call, sandbox  # noqa: F401  (module fixture)

SPEECH_DB = -30.0


def _scenario(tmp_path):
    path = tmp_path / "two_voices.json"
    path.write_text(json.dumps({
        "steps": [{"say": {"ms": 800, "seed": 1}}], "after_steps": "stay", "max_duration_s": 20,
        "human": {"answer_after_ms": 200, "steps": [{"say": {"ms": 800, "seed": 9}}], "after_steps": "stay"},
    }))
    return str(path)


def _loud(frames) -> bool:
    return max(rms_dbfs(f) for f in frames) > SPEECH_DB


@pytest.mark.parametrize("mode, person_heard, human_heard", [
    ("callee", True, False),
    ("caller", False, True),
    ("both", True, True),
])
def test_listen_mode_selects_whose_voice_is_streamed(sandbox, tmp_path, mode, person_heard, human_heard):  # noqa: F811
    marks = {}

    async def script(gw):
        await gw.wait_frames(60)  # the person's 800 ms are over
        marks["bridge"] = len(gw.frames)
        await gw.send([{"action": "bridge", "from": 14155550123,
                        "connect": [{"type": "pstn", "number": 919000000001}]}])
        await gw.wait_frames(marks["bridge"] + 75)  # ring 200 ms + 800 ms of talk + margin
        await gw.send([{"action": "hangup"}])

    gw, rep = asyncio.run(run_call(sandbox, script, mode=mode, extra={"scenario": _scenario(tmp_path)}))
    frames = [f for _, f in gw.frames]
    person_window = frames[2:40]
    human_window = frames[marks["bridge"] + 12: marks["bridge"] + 70]
    assert [e["event"] for e in rep["events"] if e["src"] == "human"][:2] == ["human_ringing", "human_answered"]
    assert _loud(person_window) is person_heard
    assert _loud(human_window) is human_heard
