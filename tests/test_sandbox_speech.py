"""Real speech in the sandbox: ``say`` steps with ``text``, the platform's ``speak``,
and a scenario's ``expect`` checked against what the app heard and said.

Speech is checked by listening to it: the offline recognizer (the transcriber
role's engine) must hear the sentence in what the scripted caller sent, and
in what the ``speak`` action played."""

from __future__ import annotations

import json

import pytest
import requests

from piopiy_voice import contracts, keys
from piopiy_voice.audio import frame_bytes, read_wav, rms_dbfs
from piopiy_voice.sandbox import voice
from piopiy_voice.sandbox.caller import ScriptPlayer
from piopiy_voice.sandbox.expect import (
    CallWords, Line, check_expectations, contains, format_result, read_call_words,
)
from piopiy_voice.sandbox.platform import PlatformOptions
from piopiy_voice.sandbox.scenario import Expectations, ScenarioError, load_scenario, parse_scenario
from piopiy_voice.sandbox.server import Sandbox
from piopiy_voice.speech.asr import make_recognizer


@pytest.fixture(scope="module")
def recognizer():
    return make_recognizer("pocketsphinx", mode="domain", corpus=None)


def recognize(recognizer, pcm: bytes, rate: int) -> str:
    stream = recognizer.open(rate)
    step = frame_bytes(rate)
    for i in range(0, len(pcm), step):
        stream.feed(pcm[i:i + step])
    return stream.finish().text


def player(steps, rate=8000):
    log = []
    scen = parse_scenario({"steps": steps})
    return ScriptPlayer(scen.steps, rate, emit=lambda e, **d: log.append((e, d))), log


# ------------------------------------------------------------- say: text

@pytest.mark.parametrize("say,field", [
    ({"text": "hi", "ms": 100}, "steps.0.say"),
    ({"text": "hi", "wav": "a.wav"}, "steps.0.say"),
    ({"text": "   "}, "steps.0.say"),
    ({"text": ""}, "steps.0.say.text"),
    ({"text": "hi", "voice": "en us; rm"}, "steps.0.say.voice"),
])
def test_text_say_is_validated(say, field):
    with pytest.raises(ScenarioError) as exc:
        parse_scenario({"steps": [{"say": say}]})
    assert exc.value.field == field


@pytest.mark.parametrize("rate", [8000, 16000])
def test_text_say_speaks_the_sentence_rendered_when_the_script_is_built(recognizer, rate):
    text = "What are your opening hours?"
    p, log = player([{"silence": 200}, {"say": {"text": text, "voice": "en-us"}}, {"silence": 300},
                     {"hangup": True}], rate)
    # Built = rendered: the clock will only slice cached audio.
    assert voice.cached(text, "en-us", rate)
    renders = voice.renders
    frames = []
    while (f := p.next_frame(False)) is not None:
        frames.append(f)
    assert voice.renders == renders  # nothing synthesized on the 20 ms clock
    assert all(len(f) == frame_bytes(rate) for f in frames)
    start = next(d for e, d in log if e == "say_start")
    assert start["text"] == text and start["voice"] == "en-us" and start["source"] == "text"
    speech = voice.render(text, "en-us", rate)
    assert start["ms"] == -(-len(speech) // frame_bytes(rate)) * 20  # whole frames of it
    assert 800 < start["ms"] < 3000
    assert max(rms_dbfs(f) for f in frames) > -30
    assert recognize(recognizer, b"".join(frames), rate) == "what are your opening hours"


def test_render_is_cached_per_text_voice_and_rate():
    text = "This sentence is only said by the cache test."  # not rendered by any other test
    before = voice.renders
    a = voice.render(text, "en-us", 8000)
    assert voice.render(text, "en-us", 8000) is a
    assert voice.renders == before + 1
    b = voice.render(text, "en-us", 16000)
    c = voice.render(text, "en-us+f3", 8000)
    assert voice.renders == before + 3
    assert abs(len(b) - 2 * len(a)) < 400 and c != a


def test_an_unknown_voice_is_a_step_error_not_a_crash():
    p, log = player([{"say": {"text": "hello", "voice": "xx-nope"}}, {"say": {"ms": 40}}])
    frames = []
    while (f := p.next_frame(False)) is not None:
        frames.append(f)
    errors = [d for e, d in log if e == "step_error"]
    assert len(errors) == 1 and "xx-nope" in errors[0]["error"]
    assert len(frames) == 2  # the next step still ran
    with pytest.raises(voice.SayRenderError, match="xx-nope"):
        voice.render("hello", "xx-nope", 8000)


def test_bundled_demo_is_a_conversation_in_words():
    demo = load_scenario("demo")
    texts = [s.say.text for s in demo.steps if getattr(s, "say", None) and s.say.text]
    assert any("opening hours" in t for t in texts)
    assert any("real person" in t for t in texts)
    assert not any(getattr(s, "dtmf", None) for s in demo.steps)  # hand-off asked for in words
    assert all(s.say.text for s in demo.human.steps if getattr(s, "say", None))
    assert demo.expect.heard and demo.expect.said and demo.expect.conversation


# --------------------------------------------------------- speak action

def test_speak_action_plays_real_synthesized_speech(tmp_path, recognizer):
    with Sandbox(report_dir=tmp_path, scenario="listen", options=PlatformOptions(ring_ms=50)) as sb:
        r = requests.post(sb.base_url + "/v2/global_pcmo_make_call", timeout=10, json={
            "appid": 1111111, "secret": "sandbox-dev-token", "from": 14155550123, "to": 14155550100,
            "pcmo": [{"action": "speak", "text": "Can I talk to a real person please?"},
                     {"action": "hangup"}]})
        assert r.status_code == 200, r.text
        rep = sb.wait(r.json()["request_id"], 30)
    assert rep["end_reason"] == "hangup_pcmo"
    events = rep["events"]
    assert not [e for e in events if e["event"] == "speak_synth_error"]
    started = next(e for e in events if e["event"] == "play_started")
    assert started["source"] == "speak"
    expected = voice.render("Can I talk to a real person please?", "en-us", 8000)
    assert started["ms"] == len(expected) * 1000 // 16000  # espeak's length, not 60 ms a character
    heard, rate = read_wav(rep["recordings"]["agent"])
    assert "real person" in recognize(recognizer, heard, rate)


# ---------------------------------------------------------- expectations

def words() -> CallWords:
    return CallWords([
        Line(1.0, "agent", "Hello, this is the automated assistant."),
        Line(2.0, "caller", "what are your opening hours"),
        Line(3.0, "agent", "We are open Monday to Friday, from nine in the morning."),
        Line(3.5, "interrupt"),
        Line(4.0, "caller", "can i talk to a real person you"),
        Line(5.0, "agent", "Please hold while I connect you to a person."),
        Line(8.0, "conversation", "sure i can help you with your account"),
    ])


def test_expectations_match_case_insensitive_substrings_of_each_side():
    expect = Expectations(heard=["Opening Hours", "real person", "hours can i"],
                          said=["open monday to friday", "connect you", "opening hours"],
                          conversation=["your account", "real person"])
    result = check_expectations(expect, words())
    met = {(c.side, c.phrase): c.met for c in result.checks}
    assert met == {
        ("heard", "Opening Hours"): True,
        ("heard", "real person"): True,
        ("heard", "hours can i"): True,          # over the joined texts
        ("said", "open monday to friday"): True,  # punctuation ignored
        ("said", "connect you"): True,
        ("said", "opening hours"): False,         # the caller said it, not the agent
        ("conversation", "your account"): True,
        ("conversation", "real person"): False,   # before the hand-off: channel caller
    }
    assert not result.ok
    assert result.missing == ["said: 'opening hours'", "conversation: 'real person'"]
    assert result.to_dict()["checks"][0] == {"side": "heard", "phrase": "Opening Hours", "met": True}
    assert any(line.startswith("  MISSING") for line in format_result(result))
    assert check_expectations(Expectations(heard=["hours"]), words()).ok
    assert check_expectations(Expectations(), words()).checks == []
    assert contains(["a b", "c"], "B C") and not contains([], "x")


def test_expect_is_validated():
    with pytest.raises(ScenarioError) as exc:
        parse_scenario({"steps": [], "expect": {"heard": ["ok", " "]}})
    assert exc.value.field == "expect.heard"
    with pytest.raises(ScenarioError) as exc:
        parse_scenario({"steps": [], "expect": {"felt": ["x"]}})
    assert exc.value.field == "expect.felt"


def test_call_words_are_read_from_the_call_transcript_and_timeline(r):
    cid = "c-words"
    stream, timeline = keys.call_stream(cid), keys.call_timeline(cid)

    def transcript(text, final, channel="caller", segment=0):
        # As the transcriber role writes: every segment into the inbound stream,
        # finals also into the call's transcript.
        fields = contracts.encode(contracts.Transcript(
            call_id=cid, seq=0, channel=channel, segment=segment, text=text, final=final, start_ms=40))
        r.xadd(stream, fields)
        if final:
            r.xadd(keys.call_transcript(cid), fields)

    r.xadd(timeline, {"event": "command.play_audio", "t": "100.0", "text": "Hello there."})
    r.xadd(timeline, {"event": "command.play_music", "t": "100.1"})
    transcript("what are", False)
    transcript("what are your opening hours", True)
    r.xadd(timeline, {"event": "command.play_audio", "t": "1e12", "text": "We are open."})
    r.xadd(timeline, {"event": "command.interrupt", "t": "2e12"})
    transcript("", True, segment=1)                          # nothing recognised: no line
    transcript("sure i can help", True, "conversation", 2)
    got = read_call_words(r, cid)
    assert got.caller == ["what are your opening hours"]
    assert got.agent == ["Hello there.", "We are open."]
    assert got.conversation == ["sure i can help"]
    assert [ln.who for ln in got.lines] == ["agent", "caller", "conversation", "agent", "interrupt"]
    assert got.lines[1].start_ms == 40
    assert json.dumps(check_expectations(Expectations(heard=["opening"]), got).to_dict())
