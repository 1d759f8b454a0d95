"""Sans-I/O CallSession: plain bytes and commands in, entries and messages out."""

from __future__ import annotations

import base64
import json

import pytest

from piopiy_voice.gateway.session import CallSession
from piopiy_voice import contracts as c


def _session(**kw):
    kw.setdefault("rate", 8000)
    return CallSession("call-1", **kw)


def test_twenty_ms_frames_pass_through_untouched():
    s = _session()
    frame = bytes(range(256)) + bytes(64)
    out = s.frames_of(frame)
    assert list(out) == [frame] and out[0] is frame
    assert s.frames_in == 1


def test_reframes_any_sizes_without_loss():
    s = _session(rate=16000)  # 640-byte frames
    data = bytes((i * 7) % 251 for i in range(640 * 5 + 100))
    sizes = [1, 99, 640, 1000, 2, 333, 1225]
    assert sum(sizes) == len(data)
    frames, pos = [], 0
    for n in sizes:
        frames += s.frames_of(data[pos:pos + n])
        pos += n
    assert all(len(f) == 640 for f in frames)
    assert b"".join(frames) == data[: 640 * 5]
    tail, odd = s.tail()
    assert odd == 0 and tail == data[640 * 5:] + bytes(540)
    assert s.frames_in == 6
    assert s.odd_frames == 4  # 1, 99, 333 and 1225 bytes
    assert s.tail() == (None, 0)


def test_odd_byte_carried_then_trailing_odd_byte_dropped():
    s = _session()
    assert list(s.frames_of(b"\x01" * 161)) == []
    frames = s.frames_of(b"\x02" * 159)
    assert frames == [b"\x01" * 161 + b"\x02" * 159]
    s.frames_of(b"\x03" * 3)
    tail, odd = s.tail()
    assert odd == 1 and tail == b"\x03\x03" + bytes(318)


@pytest.mark.parametrize("text", ["not json", "[1,2]", '{"x": 1}', '{"event": 5}', '{"event": ""}',
                                  "[" * 60000])
def test_malformed_text_is_reported_not_raised(text):
    s = _session()
    entry, kind = s.parse_text(text)
    assert entry is None and kind == "malformed" and s.text_malformed == 1


def test_text_events_become_platform_events():
    s = _session()
    entry, kind = s.parse_text('{"event": "dtmf", "digit": "5"}')
    assert kind == "ok" and entry.event == "dtmf" and entry.data == {"digit": "5"}
    entry2, kind2 = s.parse_text('{"event": "weird"}')
    assert kind2 == "unknown" and entry2.seq == entry.seq + 1
    s.parse_text('{"event": "stop"}')
    assert s.closing_reason == "stream_stopped"


def _cmd(model, **kw):
    return model(call_id="call-1", **kw)


@pytest.mark.parametrize("model,kw,expected", [
    (c.Pause, {}, {"action": "pause"}),
    (c.Resume, {}, {"action": "resume"}),
    (c.StopStream, {}, {"action": "stop"}),
    (c.Interrupt, {}, {"action": "break"}),
    (c.Hangup, {}, [{"action": "hangup"}]),
    (c.PlayMusic, {"file": "hold.wav"}, [{"action": "play", "file_name": "hold.wav"}]),
    (c.PlayMusic, {"file": "https://x.example/a.mp3"},
     [{"action": "play", "file_url": "https://x.example/a.mp3"}]),
    (c.Speak, {"text": "hello"}, [{"action": "speak", "text": "hello"}]),
    (c.Transfer, {"to": ["919000000001"], "caller_id": "918000000000"},
     [{"action": "bridge", "from": 918000000000,
       "connect": [{"type": "pstn", "number": 919000000001}],
       "duration": 5400, "timeout": 40, "loop": 1}]),
    (c.RawPcmo, {"pcmo": [{"action": "speak", "text": "hi"}]}, [{"action": "speak", "text": "hi"}]),
])
def test_each_command_becomes_the_platform_message(model, kw, expected):
    out = _session().apply(_cmd(model, **kw), now=0.0)
    assert out.status == "applied", out.reason
    assert [json.loads(m) for m in out.messages] == [expected]


def test_bad_commands_are_rejected_with_reason():
    s = _session()
    out = s.apply(_cmd(c.RawPcmo, pcmo=[{"nope": 1}]), now=0.0)
    assert out.status == "rejected" and "action" in out.reason
    out = s.apply(_cmd(c.Transfer, to=["abc"], caller_id="1"), now=0.0)
    assert out.status == "rejected" and "digits" in out.reason
    s.end("platform_closed", 0.0)
    assert s.apply(_cmd(c.Pause), now=0.0).status == "rejected"


def test_pause_and_resume_after_stop_are_rejected():
    s = _session()
    assert s.apply(_cmd(c.StopStream), now=0.0).status == "applied"
    for model in (c.Resume, c.Pause):
        out = s.apply(_cmd(model), now=0.0)
        assert out.status == "rejected" and "stopped" in out.reason and not out.messages
    assert s.apply(_cmd(c.Hangup), now=0.0).status == "applied"


def _audio(msgs):
    return b"".join(base64.b64decode(json.loads(m)["data"]["audioData"]) for m in msgs)


def test_playout_is_paced_with_lead_and_reports_finished():
    s = _session(lead_ms=100, chunk_ms=40)
    pcm = bytes(range(200)) * 16  # 3200 bytes = 200 ms at 8 kHz
    out = s.apply(_cmd(c.PlayAudio, pcm=pcm, rate=8000, utterance_id="u1"), now=10.0)
    assert out.status == "applied" and out.wake_playout and out.messages == []
    out.messages, out.entries, wake = s.pump(10.0)
    # At t=10.0 only what starts by t+lead goes out: chunks at 0, 40, 80 ms.
    assert len(out.messages) == 3 and wake == pytest.approx(10.02)
    assert [e.state for e in out.entries] == ["started"]
    first = json.loads(out.messages[0])
    assert first["type"] == "streamAudio" and first["data"]["sampleRate"] == 8000
    msgs, entries, wake = s.pump(10.05)
    assert len(msgs) == 1 and entries == []  # chunk at 120 ms is now due
    msgs2, entries, wake = s.pump(10.15)
    assert _audio(out.messages + msgs + msgs2) == pcm and entries == []
    assert wake == pytest.approx(10.2)
    _, entries, wake = s.pump(10.201)
    assert [(e.state, e.played_ms, e.total_ms) for e in entries] == [("finished", 200, 200)]
    assert wake is None and not s.playing


def test_interrupt_cuts_queue_and_reports_played_ms():
    s = _session(lead_ms=100, chunk_ms=40)
    s.apply(_cmd(c.PlayAudio, pcm=bytes(16000), rate=8000, utterance_id="long"), now=0.0)
    s.apply(_cmd(c.PlayAudio, pcm=bytes(1600), rate=8000, utterance_id="next"), now=0.0)
    for step in range(0, 6):  # the playout task pumping every 50 ms
        s.pump(step * 0.05)
    out = s.apply(_cmd(c.Interrupt), now=0.3)
    assert [json.loads(m) for m in out.messages] == [{"action": "break"}]
    states = [(e.utterance_id, e.state, e.played_ms, e.total_ms) for e in out.entries]
    assert states == [("long", "interrupted", 300, 1000), ("next", "interrupted", 0, 100)]
    assert s.pump(0.5) == ([], [], None)


def test_underrun_caps_played_ms_at_what_was_sent():
    s = _session(lead_ms=100, chunk_ms=40)
    s.apply(_cmd(c.PlayAudio, pcm=bytes(16000), rate=8000, utterance_id="u"), now=0.0)
    s.pump(0.0)
    out = s.apply(_cmd(c.Interrupt), now=0.5)  # nothing pumped since t=0: 120 ms sent
    assert [(e.state, e.played_ms) for e in out.entries] == [("interrupted", 120)]
    assert s.queued_ms(0.5) == 0


def test_outbound_queue_limit_rejects():
    s = _session(max_queue_ms=500)
    ok = s.apply(_cmd(c.PlayAudio, pcm=bytes(6400), rate=8000), now=0.0)  # 400 ms
    assert ok.status == "applied"
    out = s.apply(_cmd(c.PlayAudio, pcm=bytes(3200), rate=8000), now=0.0)
    assert out.status == "rejected" and "queue full" in out.reason


def test_end_is_exactly_once_and_uses_hangup_reason():
    s = _session()
    s.apply(_cmd(c.Hangup), now=0.0)
    assert s.closing_reason == "hangup"
    entries = s.end(s.closing_reason, 0.0)
    assert isinstance(entries[-1], c.CallEnded) and entries[-1].reason == "hangup"
    assert s.end("platform_closed", 0.0) == []


def test_rejects_bad_rate():
    with pytest.raises(ValueError, match="rate"):
        CallSession("x", rate=44100)


def test_32k_audio_is_resampled_to_16k_for_the_platform():
    s = _session()
    out = s.apply(_cmd(c.PlayAudio, pcm=bytes(6400), rate=32000, utterance_id="hi"), now=0.0)
    assert out.status == "applied"
    msgs, entries, _ = s.pump(0.0)
    assert json.loads(msgs[0])["data"]["sampleRate"] == 16000
    assert entries[0].total_ms == 100


def test_32k_audio_too_short_to_resample_is_rejected_not_wedging_playout():
    # Review fix: one 32 kHz sample resamples to b"", which was queued; pump()
    # then raised on the empty chunk every time, so the call's playout task
    # died and no later utterance could ever play.
    s = _session()
    out = s.apply(_cmd(c.PlayAudio, pcm=b"\x01\x00", rate=32000, utterance_id="tiny"), now=0.0)
    assert out.status == "rejected" and "pcm" in out.reason
    ok = s.apply(_cmd(c.PlayAudio, pcm=bytes(320), rate=8000, utterance_id="next"), now=0.0)
    assert ok.status == "applied"
    msgs, entries, _ = s.pump(0.0)
    assert len(msgs) == 1 and [e.utterance_id for e in entries] == ["next"]


def test_dropped_frames_are_counted_and_reported_once_before_the_next_frame():
    s = _session(resume_seq=41)  # the stream of a call that moved here had reached 41
    assert s.started_entry("gw").seq == 42
    assert s.gap_entry() is None
    for _ in range(3):
        s.next_seq()  # each dropped frame keeps its seq: the hole is the gap
        s.frame_dropped()
    gap = s.gap_entry()
    assert (gap.frames, gap.seq, gap.reason) == (3, 46, "redis_unavailable")
    assert s.gap_entry() is None and s.frames_dropped == 3
    s.next_seq()
    s.frame_dropped()
    entries = s.end("platform_closed", 0.0)  # a report still pending goes out first
    assert [e.type for e in entries] == ["gap", "call.ended"]
    assert entries[0].frames == 1 and entries[1].frames_dropped == 4


@pytest.mark.parametrize("model,cut,close", [
    (c.Interrupt, True, False), (c.StopStream, True, True), (c.Hangup, True, True),
    (c.Pause, False, False), (c.Speak, False, False),
])
def test_outcome_tells_the_shell_what_to_do(model, cut, close):
    kw = {"text": "hi"} if model is c.Speak else {}
    out = _session().apply(_cmd(model, **kw), now=0.0)
    assert out.status == "applied"
    assert (out.cut_playout, out.close_after, out.wake_playout) == (cut, close, False)


def test_unknown_command_type_is_rejected_by_the_one_switch():
    class Odd:
        type = "cmd.teleport"

    out = _session().apply(Odd(), now=0.0)
    assert out.status == "rejected" and "cmd.teleport" in out.reason
