"""PCMO builders: exact SDK JSON shapes, the SDK's defects fixed, bad input refused."""

from __future__ import annotations

import base64
import json

import pytest

from piopiy_voice import Action, PiopiyValidationError, StreamAction
from piopiy_voice.pcmo import control_json, stream_audio_json
from piopiy_voice.pcmo_models import parse_ws_message

WS = "wss://gw.example.com/call/c1?exp=1&sig=ab"


def field_of(excinfo) -> str:
    return excinfo.value.field


# -- shapes -------------------------------------------------------------------


def test_simple_actions_exact_shapes():
    a = Action()
    a.playMusic("welcome.wav")
    a.playMusic("https://cdn.example.com/a.mp3")
    a.playMusic("ftp://files.example.com/b.wav")
    a.playMusic("http://x.example.com/c.wav")
    a.speak("hello")
    a.setValue("lead-42")
    a.record()
    a.hangup()
    assert a.PCMO() == [
        {"action": "play", "file_name": "welcome.wav"},
        {"action": "play", "file_url": "https://cdn.example.com/a.mp3"},
        {"action": "play", "file_url": "ftp://files.example.com/b.wav"},
        {"action": "play", "file_url": "http://x.example.com/c.wav"},
        {"action": "speak", "text": "hello"},
        {"action": "param", "text": "lead-42"},
        {"action": "record"},
        {"action": "hangup"},
    ]


def test_call_builds_bridge_with_int_numbers_and_defaults():
    a = Action().call("919876543210", "+919000000001")
    assert a.PCMO() == [{
        "action": "bridge", "from": 919000000001,
        "connect": [{"type": "pstn", "number": 919876543210}],
        "duration": 5400, "timeout": 40, "loop": 1,
    }]


def test_call_list_of_numbers_with_options():
    a = Action().call([919876543210, "14155550100"], 919000000001,
                      {"duration": "600", "timeout": 20, "loop": 2, "ring_type": "group"})
    (bridge,) = a.PCMO()
    assert bridge["connect"] == [{"type": "pstn", "number": 919876543210},
                                 {"type": "pstn", "number": 14155550100}]
    assert (bridge["duration"], bridge["timeout"], bridge["loop"], bridge["ring_type"]) == (600, 20, 2, "group")


def test_stream_defaults_documented_stream_on_answer_true():
    # The SDK documents True but defaulted to False; we default to True.
    (s,) = Action().stream(WS).PCMO()
    assert s == {"action": "stream", "ws_url": WS, "listen_mode": "caller",
                 "voice_quality": 8000, "stream_on_answer": True}


@pytest.mark.parametrize("quality,expected", [(8000, 8000), ("16000", 16000), (" 32000 ", 32000)])
def test_voice_quality_int_or_numeric_string(quality, expected):
    (s,) = Action().stream(WS, {"voice_quality": quality}).PCMO()
    assert s["voice_quality"] == expected and isinstance(s["voice_quality"], int)


@pytest.mark.parametrize("quality", [44100, "8k", 8000.0, True, None, "", "-8000"])
def test_voice_quality_rejected(quality):
    with pytest.raises(PiopiyValidationError) as e:
        Action().stream(WS, {"voice_quality": quality})
    assert field_of(e) == "voice_quality"
    assert "8000, 16000, 32000" in str(e.value)


@pytest.mark.parametrize("mode", ["caller", "callee", "both"])
def test_listen_modes(mode):
    assert Action().stream(WS, {"listen_mode": mode}).PCMO()[0]["listen_mode"] == mode


@pytest.mark.parametrize("opt,field", [
    ({"listen_mode": "all"}, "listen_mode"),
    ({"listen_mode": "CALLER"}, "listen_mode"),
    ({"stream_on_answer": "false"}, "stream_on_answer"),
    ({"stream_on_answer": 1}, "stream_on_answer"),
    ({"voice_qualty": 8000}, "options.voice_qualty"),
])
def test_stream_bad_options(opt, field):
    with pytest.raises(PiopiyValidationError) as e:
        Action().stream(WS, opt)
    assert field_of(e) == field


@pytest.mark.parametrize("url", ["http://gw/call/1", "https://gw/x", "gw:8765/call/1", "", "ws://", 42,
                                 " ws://gw/call/1"])
def test_stream_url_must_be_ws(url):
    with pytest.raises(PiopiyValidationError) as e:
        Action().stream(url)
    assert field_of(e) == "ws_url"


def test_failed_append_leaves_builder_unchanged():
    a = StreamAction().hangup()
    with pytest.raises(PiopiyValidationError):
        a.stream("http://nope")
    assert a.actions() == [{"action": "hangup"}]


# -- input / playGetInput -------------------------------------------------------


def test_input_wire_key_is_max_digit():
    a = Action().input("https://app.example.com/dtmf", {"max_digit": 4, "timeout": 10})
    assert a.PCMO() == [{"action": "input", "action_url": "https://app.example.com/dtmf",
                         "max_digit": 4, "timeout": 10}]
    assert Action().input("https://a.example.com/d").PCMO()[0] == {
        "action": "input", "action_url": "https://a.example.com/d", "max_digit": 1, "timeout": 5}


def test_input_documented_max_digits_maps_to_max_digit():
    (i,) = Action().input("https://a.example.com/d", {"max_digits": 3}).PCMO()
    assert i["max_digit"] == 3 and "max_digits" not in i


def test_input_min_digit_refused_and_conflict_refused():
    with pytest.raises(PiopiyValidationError) as e:
        Action().input("https://a.example.com/d", {"min_digit": 1})
    assert field_of(e) == "options.min_digit" and "max_digit" in str(e.value)
    with pytest.raises(PiopiyValidationError) as e:
        Action().input("https://a.example.com/d", {"max_digits": 3, "max_digit": 4})
    assert field_of(e) == "options.max_digits"


def test_play_get_input_shape_and_validation():
    (p,) = Action().playGetInput("https://a.example.com/d", "menu.wav", {"max_digits": 2}).PCMO()
    assert p == {"action": "play_get_input", "action_url": "https://a.example.com/d",
                 "file_name": "menu.wav", "max_digit": 2, "max_retry": 3, "timeout": 5}
    with pytest.raises(PiopiyValidationError) as e:
        Action().playGetInput("https://a.example.com/d", "")
    assert field_of(e) == "file_name"
    with pytest.raises(PiopiyValidationError) as e:
        Action().playGetInput("ws://a.example.com/d", "menu.wav")
    assert field_of(e) == "action_url"


def test_input_only_on_action():
    assert not hasattr(StreamAction(), "input")
    assert not hasattr(StreamAction(), "playGetInput")


# -- numbers, files -------------------------------------------------------------


@pytest.mark.parametrize("number,field", [
    ("09876543210", "to"),          # trunk zero would vanish in an int
    ("91 98765 43210", "to"),
    ("91-9876543210", "to"),
    ("1234", "to"),
    ("1234567890123456", "to"),
    (9.1e11, "to"),
    (True, "to"),
    ("", "to"),
])
def test_bad_numbers(number, field):
    with pytest.raises(PiopiyValidationError) as e:
        Action().call(number, 919000000001)
    assert field_of(e) == field


def test_bad_caller_and_list_entries_named():
    with pytest.raises(PiopiyValidationError) as e:
        Action().call(919876543210, "abc")
    assert field_of(e) == "piopiy_number"
    with pytest.raises(PiopiyValidationError) as e:
        Action().call([919876543210, "x1"], 919000000001)
    assert field_of(e) == "to[1]"
    with pytest.raises(PiopiyValidationError) as e:
        Action().call([], 919000000001)
    assert field_of(e) == "to"
    with pytest.raises(PiopiyValidationError) as e:
        Action().call(919876543210, 919000000001, {"ring_type": "parallel"})
    assert field_of(e) == "ring_type"
    with pytest.raises(PiopiyValidationError) as e:
        Action().call(919876543210, 919000000001, {"timeout": 0})
    assert field_of(e) == "timeout"


@pytest.mark.parametrize("bad", ["", "   ", None, 3])
def test_play_music_needs_a_name(bad):
    with pytest.raises(PiopiyValidationError) as e:
        Action().playMusic(bad)
    assert field_of(e) == "file"


def test_speak_needs_text():
    with pytest.raises(PiopiyValidationError) as e:
        Action().speak("")
    assert field_of(e) == "text"


# -- PCMO() semantics, chaining ---------------------------------------------------


def test_action_pcmo_returns_copy_and_keeps():
    a = Action().hangup()
    first = a.PCMO()
    first.append({"action": "record"})
    assert a.PCMO() == [{"action": "hangup"}]


def test_stream_action_pcmo_is_json_then_empties():
    s = StreamAction()
    s.stream(WS, {"listen_mode": "both"})
    s.speak("hi")
    text = s.PCMO()
    assert isinstance(text, str)
    assert json.loads(text) == [
        {"action": "stream", "ws_url": WS, "listen_mode": "both", "voice_quality": 8000,
         "stream_on_answer": True},
        {"action": "speak", "text": "hi"},
    ]
    assert len(s) == 0 and s.PCMO() == "[]"


def test_methods_return_builder_for_chaining():
    a = Action()
    assert a.record() is a and a.hangup() is a and a.stream(WS) is a
    s = StreamAction()
    assert s.playMusic("x.wav").speak("y").hangup() is s
    assert len(s) == 3


# -- live-socket messages ---------------------------------------------------------


def test_control_messages_exact_strings():
    s = StreamAction()
    assert s.pause() == '{"action":"pause"}'
    assert s.resume() == '{"action":"resume"}'
    assert s.stop() == '{"action":"stop"}'
    assert s.interrupt() == '{"action":"break"}'
    assert len(s) == 0  # nothing appended
    with pytest.raises(PiopiyValidationError):
        control_json("hangup")


def test_play_stream_message():
    pcm = b"\x01\x00\xff\x7f" * 80
    b64 = base64.b64encode(pcm).decode()
    s = StreamAction()
    msg = json.loads(s.playStream(audio_base64=b64, audio_type="raw", sample_rate="16000"))
    assert msg == {"type": "streamAudio",
                   "data": {"audioDataType": "raw", "sampleRate": 16000, "audioData": b64}}
    assert json.loads(s.playStream(b64)) == {
        "type": "streamAudio", "data": {"audioDataType": "raw", "sampleRate": 8000, "audioData": b64}}
    assert len(s) == 0


@pytest.mark.parametrize("kwargs,field", [
    ({"audio_base64": "not base64!"}, "audio_base64"),
    ({"audio_base64": ""}, "audio_base64"),
    ({"audio_base64": b"AAAA"}, "audio_base64"),
    ({"audio_base64": "AAAA", "audio_type": "flac"}, "audio_type"),
    ({"audio_base64": "AAAA", "sample_rate": 32000}, "sample_rate"),
    ({"audio_base64": "AAAA", "sample_rate": 8000.5}, "sample_rate"),
])
def test_play_stream_rejects(kwargs, field):
    with pytest.raises(PiopiyValidationError) as e:
        StreamAction().playStream(**kwargs)
    assert field_of(e) == field


def test_stream_audio_json_fast_path_round_trips():
    pcm = bytes(range(256)) * 2
    text = stream_audio_json(pcm, 16000)
    msg = parse_ws_message(text)
    assert msg.data.sampleRate == 16000 and msg.data.audio_bytes() == pcm
    for bad, field in [((b"",), "pcm"), ((b"abc",), "pcm"), ((b"ab", 32000), "sample_rate"),
                       ((b"ab", 8000, "flac"), "audio_type")]:
        with pytest.raises(PiopiyValidationError) as e:
            stream_audio_json(*bad)
        assert field_of(e) == field
