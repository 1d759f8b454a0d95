"""Scenario models, loading, and the frame-by-frame script player (no sockets)."""

from __future__ import annotations

import json

import pytest

from piopiy_voice.sandbox.caller import ScriptPlayer
from piopiy_voice.sandbox.human import SimulatedHuman
from piopiy_voice.sandbox.scenario import HumanScript, ScenarioError, bundled_names, load_scenario, parse_scenario
from piopiy_voice.audio import DtmfDetector, frame_bytes, rms_dbfs, speech_like, write_wav


def player(steps, rate=8000, after="hangup"):
    log = []
    scen = parse_scenario({"steps": steps, "after_steps": after})
    p = ScriptPlayer(scen.steps, rate, after_steps=scen.after_steps,
                     emit=lambda event, **d: log.append((event, d)))
    return p, log


def run(p, n, heard=lambda i: False):
    frames = []
    for i in range(n):
        f = p.next_frame(heard(i))
        if f is None:
            break
        frames.append(f)
    return frames


def test_bundled_scenarios_load_and_demo_has_the_story():
    assert {"demo", "listen", "hangup_mid_utterance"} <= set(bundled_names())
    demo = load_scenario("demo")
    kinds = [next(iter(s.model_dump(exclude_defaults=True))) for s in demo.steps]
    assert kinds[0] == "wait_for" and "say" in kinds and kinds[-1] == "hangup"
    # The hand-off is asked for in words now, not with the key.
    assert any("real person" in (getattr(getattr(s, "say", None), "text", None) or "") for s in demo.steps)


@pytest.mark.parametrize("doc,field", [
    ({"steps": [{"say": {"ms": 100}, "silence": 5}]}, "steps.0"),
    ({"steps": [{"nope": 1}]}, "steps.0"),
    ({"steps": [{"say": {}}]}, "steps.0.say"),
    ({"steps": [{"say": {"ms": 100, "wav": "a.wav"}}]}, "steps.0.say"),
    ({"steps": [{"dtmf": "0x"}]}, "steps.0.dtmf"),
    ({"steps": [{"wait_for": "sunrise"}]}, "steps.0.wait_for"),
    ({"steps": [], "max_duration_s": 0}, "max_duration_s"),
    ({"steps": [], "surprise": 1}, "surprise"),
])
def test_invalid_scenarios_name_the_field(doc, field):
    with pytest.raises(ScenarioError) as exc:
        parse_scenario(doc)
    assert exc.value.field == field


def test_load_by_path_resolves_relative_wavs_and_reports_errors(tmp_path):
    write_wav(str(tmp_path / "hello.wav"), speech_like(400, rate=16000), 16000)
    (tmp_path / "s.json").write_text(json.dumps({"steps": [{"say": {"wav": "hello.wav"}}]}))
    scen = load_scenario(str(tmp_path / "s.json"))
    assert scen.name == "s" and scen.steps[0].say.wav == str(tmp_path / "hello.wav")
    p, log = player([{"say": {"wav": scen.steps[0].say.wav}}])
    frames = run(p, 100)
    assert len(frames) == 20  # 400 ms resampled to 8 kHz
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ScenarioError, match="not valid"):
        load_scenario(str(tmp_path / "bad.json"))
    with pytest.raises(ScenarioError, match="unknown scenario"):
        load_scenario("nope")
    with pytest.raises(ScenarioError, match="not found"):
        load_scenario(str(tmp_path / "missing.json"))


def test_say_silence_dtmf_then_hangup_frame_exact():
    p, log = player([{"say": {"ms": 200}}, {"silence": 100}, {"dtmf": "0#", "tone_ms": 100, "gap_ms": 100},
                     {"hangup": True}])
    frames = run(p, 200)
    assert all(len(f) == frame_bytes(8000) for f in frames)
    assert len(frames) == 10 + 5 + 15  # dtmf: tone, gap, tone
    assert p.next_frame(False) is None and p.hung_up
    assert all(rms_dbfs(f) < -80 for f in frames[10:15])
    det = DtmfDetector(8000)
    keys = [k for f in frames for k in det.process(f)]
    assert keys == ["0", "#"]
    assert [e for e, _ in log] == ["say_start", "say_end", "dtmf", "hangup"]


def test_wait_for_agent_audio_and_silence_are_causal():
    p, log = player([{"wait_for": "agent_audio", "timeout_ms": 1000},
                     {"wait_for": "agent_silence", "min_silence_ms": 100, "timeout_ms": 1000},
                     {"say": {"ms": 40}}])
    talking = set(range(10, 20))  # the agent talks for ticks 10..19
    frames = run(p, 100, heard=lambda i: i in talking)
    events = [(e, d.get("waited_ms")) for e, d in log]
    assert events[:4] == [("wait_start", None), ("wait_done", 220), ("wait_start", None), ("wait_done", 280)]
    # speech starts right after 5 quiet ticks following the agent's last frame (tick 19)
    first_voiced = next(i for i, f in enumerate(frames) if rms_dbfs(f) > -60)
    assert first_voiced == 25
    assert p.hung_up


def test_heard_talking_callable_is_asked_only_while_waiting():
    # The clock passes a callable so that it measures levels only when a wait listens.
    p, log = player([{"say": {"ms": 100}}, {"wait_for": "agent_audio", "timeout_ms": 1000}, {"say": {"ms": 40}}])
    asked = []

    def heard() -> bool:
        asked.append(True)
        return len(asked) >= 3

    frames = run(p, 50, heard=lambda i: heard)
    assert len(asked) == 3
    assert len(frames) == 5 + 3 + 2 and p.hung_up
    assert ("wait_done", 60) in [(e, d.get("waited_ms")) for e, d in log]


def test_wait_timeout_can_hang_up_and_stay_keeps_silence():
    p, log = player([{"wait_for": "agent_audio", "timeout_ms": 100, "on_timeout": "hangup"}])
    assert len(run(p, 50)) == 4 and p.hung_up and ("wait_timeout" in [e for e, _ in log])
    p, _ = player([{"silence": 40}], after="stay")
    frames = run(p, 30)
    assert len(frames) == 30 and not p.hung_up


def test_human_rings_answers_talks_and_leaves():
    log = []
    script = HumanScript(answer_after_ms=100, steps=[{"say": {"ms": 200}}], after_steps="hangup")
    h = SimulatedHuman(script, 8000, number=919000000001, timeout_s=40, duration_s=5400,
                       emit=lambda e, **d: log.append(e))
    frames = [h.next_frame(False) for _ in range(30)]
    assert frames[:4] == [None] * 4 and all(f is not None for f in frames[4:14])
    assert frames[14] is None
    assert h.ended and log[:2] == ["human_ringing", "human_answered"] and log[-1] == "human_left"
    slow = SimulatedHuman(HumanScript(answer_after_ms=5000), 8000, number=1, timeout_s=2, duration_s=60,
                          emit=lambda e, **d: log.append(e))
    assert slow.next_frame(False) is None and slow.state == "no_answer"
