"""PCMO models and live-socket message parsing: what the gateway and sandbox validate with."""

from __future__ import annotations

import base64
import json

import pytest

from piopiy_voice import Action, PiopiyValidationError, StreamAction
from piopiy_voice import pcmo_models as m
from piopiy_voice.pcmo_models import parse_pcmo, parse_ws_message, pcmo_to_list

WS = "ws://127.0.0.1:8765/call/c1?rate=8000&exp=9&sig=aa"


def every_action() -> Action:
    a = Action()
    a.stream(WS, {"listen_mode": "callee", "voice_quality": "16000"})
    a.playMusic("hold.wav").playMusic("https://m.example.com/x.mp3")
    a.speak("hi").setValue("v").record()
    a.call([919876543210, 14155550100], 919000000001, {"ring_type": "group"})
    a.input("https://a.example.com/i", {"max_digit": 2})
    a.playGetInput("https://a.example.com/i", "menu.wav")
    a.hangup()
    return a


def test_every_builder_action_round_trips_through_models():
    a = every_action()
    models = parse_pcmo(a)
    assert [type(x) for x in models] == [m.Stream, m.Play, m.Play, m.Speak, m.Param, m.Record,
                                         m.Bridge, m.Input, m.PlayGetInput, m.Hangup]
    assert pcmo_to_list(a) == a.PCMO()
    assert pcmo_to_list(json.dumps(a.PCMO())) == a.PCMO()
    assert models[6].from_ == 919000000001 and models[6].connect[1].number == 14155550100


def test_accepts_builder_list_and_json_string_alike():
    s = StreamAction().stream(WS).hangup()
    from_builder = pcmo_to_list(s)
    assert len(s) == 2, "parsing a StreamAction must not empty it"
    text = s.PCMO()
    assert pcmo_to_list(text) == from_builder == pcmo_to_list(json.loads(text))
    assert pcmo_to_list(text.encode()) == from_builder
    assert pcmo_to_list([m.Hangup()]) == [{"action": "hangup"}]


def test_normalises_faithful_conversions():
    out = pcmo_to_list([
        {"action": "stream", "ws_url": WS, "voice_quality": "32000"},
        {"action": "bridge", "from": "+919000000001", "connect": [{"type": "pstn", "number": "919876543210"}]},
    ])
    assert out == [
        {"action": "stream", "ws_url": WS, "listen_mode": "caller", "voice_quality": 32000,
         "stream_on_answer": True},
        {"action": "bridge", "from": 919000000001, "connect": [{"type": "pstn", "number": 919876543210}],
         "duration": 5400, "timeout": 40, "loop": 1},
    ]


@pytest.mark.parametrize("pcmo,field,words", [
    ([{"action": "stream", "ws_url": "http://x.example.com"}], "pcmo[0].ws_url", "ws://"),
    ([{"action": "hangup"}, {"action": "stream", "ws_url": WS, "voice_quality": 11025}],
     "pcmo[1].voice_quality", "8000"),
    ([{"action": "stream", "ws_url": WS, "listen_mode": "everyone"}], "pcmo[0].listen_mode", "caller"),
    ([{"action": "stream", "ws_url": WS, "stream_on_answer": "yes"}], "pcmo[0].stream_on_answer", "true"),
    ([{"action": "input", "action_url": "https://a.example.com", "max_digits": 3}],
     "pcmo[0].max_digits", "max_digit"),
    ([{"action": "input", "action_url": "https://a.example.com", "min_digit": 1}],
     "pcmo[0].min_digit", "max_digit"),
    ([{"action": "play"}], "pcmo[0].file_name", "exactly one"),
    ([{"action": "play", "file_name": "a.wav", "file_url": "https://x.example.com/a.wav"}],
     "pcmo[0].file_name", "exactly one"),
    ([{"action": "play", "file_name": ""}], "pcmo[0].file_name", "non-empty"),
    ([{"action": "play", "file_url": "s3://bucket/a.wav"}], "pcmo[0].file_url", "URL"),
    ([{"action": "bridge", "from": 919000000001, "connect": []}], "pcmo[0].connect", "at least 1"),
    ([{"action": "bridge", "from": 919000000001, "connect": [{"type": "pstn", "number": "0123456"}]}],
     "pcmo[0].connect[0].number", "country code"),
    ([{"action": "bridge", "from": "x", "connect": [{"type": "pstn", "number": 919876543210}]}],
     "pcmo[0].from", "digits"),
    ([{"action": "speak", "text": "hi", "voice": "en"}], "pcmo[0].voice", "unknown key"),
    ([{"action": "dance"}], "pcmo[0].action", "unknown action"),
    ([{"text": "hi"}], "pcmo[0].action", "missing"),
    ([], "pcmo", "at least one"),
    ({"action": "hangup"}, "pcmo", "list"),
    ("[{\"action\": ", "pcmo", "JSON"),
    (42, "pcmo", "builder"),
])
def test_errors_name_the_field(pcmo, field, words):
    with pytest.raises(PiopiyValidationError) as e:
        parse_pcmo(pcmo)
    assert e.value.field == field
    assert words in str(e.value)
    assert isinstance(e.value, ValueError)


def test_one_adapter_built_once(monkeypatch):
    """Parsing reuses the adapters built at import (one per call would be slow)."""
    import pydantic

    def no_new_adapter(*args, **kwargs):
        raise AssertionError("a TypeAdapter was built while parsing")

    monkeypatch.setattr(pydantic, "TypeAdapter", no_new_adapter)
    monkeypatch.setattr(m, "TypeAdapter", no_new_adapter)
    assert [a.action for a in parse_pcmo(every_action())][-1] == "hangup"
    assert m.parse_action({"action": "record"}).action == "record"
    assert isinstance(parse_ws_message('{"action":"pause"}'), m.StreamControl)


def test_models_are_frozen():
    h = m.Hangup()
    with pytest.raises(Exception):
        h.action = "record"


# -- live-socket messages ------------------------------------------------------------


def test_ws_control_messages():
    s = StreamAction()
    for text, action in [(s.pause(), "pause"), (s.resume(), "resume"), (s.stop(), "stop"),
                         (s.interrupt(), "break")]:
        msg = parse_ws_message(text)
        assert isinstance(msg, m.StreamControl) and msg.action == action


def test_ws_stream_audio():
    pcm = b"\x00\x01" * 160
    text = StreamAction().playStream(base64.b64encode(pcm).decode(), "raw", 8000)
    msg = parse_ws_message(text)
    assert isinstance(msg, m.StreamAudio)
    assert msg.data.audio_bytes() == pcm and msg.data.sampleRate == 8000


def test_ws_pcmo_list():
    text = json.dumps([{"action": "play", "file_name": "hold.wav"}])
    msg = parse_ws_message(text)
    assert isinstance(msg, list) and isinstance(msg[0], m.Play)
    transfer = Action().call(919876543210, 919000000001).PCMO()
    assert isinstance(parse_ws_message(json.dumps(transfer))[0], m.Bridge)


@pytest.mark.parametrize("text,field", [
    ('{"type":"streamAudio","data":{"audioDataType":"raw","sampleRate":8000,"audioData":"%%%"}}',
     "data.audioData"),
    ('{"type":"streamAudio","data":{"audioDataType":"raw","sampleRate":8000,"audioData":""}}',
     "data.audioData"),
    ('{"type":"streamAudio","data":{"audioDataType":"pcm","sampleRate":8000,"audioData":"AAAA"}}',
     "data.audioDataType"),
    ('{"type":"streamAudio","data":{"audioDataType":"raw","sampleRate":32000,"audioData":"AAAA"}}',
     "data.sampleRate"),
    ('{"type":"streamAudio"}', "data"),
    ('{"type":"audio","data":{}}', "type"),
    ('{"action":"hangup"}', "message"),
    ('{"action":"rewind"}', "action"),
    ('{"action":"pause","extra":1}', "extra"),
    ('"pause"', "message"),
    ("not json", "message"),
    ('[{"action":"stream","ws_url":"ftp://x"}]', "message[0].ws_url"),
])
def test_ws_errors_name_the_field(text, field):
    with pytest.raises(PiopiyValidationError) as e:
        parse_ws_message(text)
    assert e.value.field == field
