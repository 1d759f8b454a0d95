import json

import pytest
from pydantic import ValidationError

from piopiy_voice import contracts as c


def _wire(fields):
    """What redis-py hands back: bytes keys and values."""
    return {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()}


SAMPLES = [
    c.CallStarted(call_id="a", seq=1, gateway_id="gw1", rate=16000, listen_mode="both", params={"flow": "x"}),
    c.CallEnded(call_id="a", seq=9, reason="hangup", frames_in=10, frames_dropped=1),
    c.PlatformEvent(call_id="a", seq=2, event="dtmf", data={"digit": "5"}),
    c.CommandResult(call_id="a", seq=3, command_id="k", command="cmd.pause", status="rejected", reason="no"),
    c.Playout(call_id="a", seq=4, utterance_id="u", state="interrupted", played_ms=340, total_ms=2000),
    c.StreamGap(call_id="a", seq=5, frames=12, reason="redis_down"),
    c.PlayAudio(call_id="a", seq=6, pcm=b"\x01\x02" * 80, rate=8000, reply_to="r"),
    c.PlayMusic(call_id="a", file="https://x/y.mp3"),
    c.Speak(call_id="a", text="hello"),
    c.Pause(call_id="a"),
    c.Resume(call_id="a"),
    c.StopStream(call_id="a"),
    c.Interrupt(call_id="a"),
    c.Hangup(call_id="a"),
    c.Transfer(call_id="a", to=["919876543210"], caller_id="919000000000", ring_type="group"),
    c.RawPcmo(call_id="a", pcmo=[{"action": "hangup"}]),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: m.type)
def test_every_message_round_trips_through_redis_fields(msg):
    fields = c.encode(msg)
    assert fields["type"] == msg.type
    # Binary payloads are their own raw fields, never inside the JSON part.
    if "d" in fields:
        assert "pcm" not in json.loads(fields["d"])
    back = c.decode(_wire(fields))
    assert type(back) is type(msg)
    assert back == msg


def test_audio_fast_path_matches_model_encoding():
    pcm = bytes(range(256)) * 2
    fast = c.audio_fields("call-1", 42, pcm)
    slow = c.encode(c.AudioFrame(call_id="call-1", seq=42, pcm=pcm))
    assert fast == slow
    frame = c.decode(_wire(fast))
    assert isinstance(frame, c.AudioFrame)
    assert (frame.call_id, frame.seq, frame.pcm) == ("call-1", 42, pcm)
    # The fast-built frame is indistinguishable from a validated one.
    assert frame == c.AudioFrame(call_id="call-1", seq=42, pcm=pcm)
    assert frame.model_dump() == c.AudioFrame(call_id="call-1", seq=42, pcm=pcm).model_dump()
    # str keys, an extra field or a newer version take the general path, same result.
    for variant in ({**fast}, {**_wire(fast), b"trace": b"x"}, {**_wire(fast), b"v": b"2"}):
        other = c.decode(variant)
        assert (other.call_id, other.seq, other.pcm) == ("call-1", 42, pcm)


def test_audio_with_odd_length_is_rejected():
    with pytest.raises(ValueError, match="odd"):
        c.decode(_wire(c.audio_fields("a", 1, b"\x00\x01\x02")))


def test_unknown_fields_from_newer_producers_are_tolerated():
    fields = _wire(c.encode(c.Pause(call_id="a", command_id="k1")))
    d = json.loads(fields[b"d"])
    d["priority"] = "high"
    fields[b"d"] = json.dumps(d).encode()
    fields[b"trace"] = b"xyz"
    msg = c.decode(fields)
    assert isinstance(msg, c.Pause) and msg.command_id == "k1"


def test_unknown_type_raises_unknown_message():
    with pytest.raises(c.UnknownMessage, match="cmd.teleport"):
        c.decode({b"type": b"cmd.teleport", b"call_id": b"a"})


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({b"call_id": b"a"}, "type"),
        ({b"type": b"cmd.pause", b"call_id": b"a", b"d": b"{not json"}, "JSON"),
        ({b"type": b"cmd.pause", b"call_id": b"a", b"d": b"[1]"}, "object"),
        ({b"type": b"playout", b"call_id": b"a", b"d": b'{"utterance_id":"u","state":"paused"}'}, "state"),
    ],
)
def test_malformed_entries_raise_value_error_naming_the_problem(fields, needle):
    with pytest.raises(ValueError, match=needle):
        c.decode(fields)


def test_play_audio_validates_rate_and_sample_width():
    with pytest.raises(ValidationError, match="rate"):
        c.PlayAudio(call_id="a", pcm=b"\x00\x00", rate=44100)
    with pytest.raises(ValidationError, match="even"):
        c.PlayAudio(call_id="a", pcm=b"\x00", rate=8000)


def test_transfer_needs_a_number_and_commands_get_unique_ids():
    with pytest.raises(ValidationError, match="to"):
        c.Transfer(call_id="a", to=[], caller_id="1")
    assert c.Pause(call_id="a").command_id != c.Pause(call_id="a").command_id


def test_type_sets_partition_the_union():
    assert c.ENTRY_TYPES.isdisjoint(c.COMMAND_TYPES)
    assert all(t.startswith("cmd.") for t in c.COMMAND_TYPES)
    assert c.is_command(c.Hangup(call_id="a")) and not c.is_command(SAMPLES[0])


def test_audio_entry_without_call_id_is_a_value_error():
    # Review fix: the audio fast path raised KeyError, which the documented
    # contract ("ValueError for a malformed entry") and callers do not expect.
    with pytest.raises(ValueError, match="call_id"):
        c.decode({b"type": b"audio", b"seq": b"1", b"pcm": b"\x00\x00"})


def test_binary_field_inside_json_is_refused_not_coerced():
    # Review fix: pcm given inside "d" (e.g. base64 text) was silently turned
    # into the bytes of that text and played as audio.
    fields = _wire({"type": "cmd.play_audio", "v": "1", "call_id": "a", "seq": "0",
                    "d": json.dumps({"rate": 8000, "pcm": "AAAA"})})
    with pytest.raises(ValueError, match="pcm"):
        c.decode(fields)
