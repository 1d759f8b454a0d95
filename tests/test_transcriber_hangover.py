"""The transcriber core holds back the hangover's quiet frames: a pause inside
a sentence still reaches the recognizer whole, only ``tail_ms`` of the
silence after the last word does, and the segments (boundaries, times,
numbering) are the turn detector's, as before. A recording fake recognizer
shows exactly which frames were decoded (the VAD hears espeak speech)."""

from __future__ import annotations

import functools
import subprocess
import sys

import numpy as np
import pytest

from piopiy_voice import contracts as c
from piopiy_voice.speech.asr import Hyp
from piopiy_voice.speech.transcriber import TAIL_MS, CallTranscriber
from piopiy_voice.speech.turns import TurnDetector
from piopiy_voice.speech.vad import make_vad

RATE = 8000
FB = RATE // 50 * 2


class _Recording:
    """Each stream records the frames fed to it; the final names how many."""

    name = "rec"

    def __init__(self) -> None:
        self.streams: list[list[bytes]] = []

    def open(self, rate: int):
        fed: list[bytes] = []
        self.streams.append(fed)

        class _S:
            def feed(self, pcm: bytes) -> list[Hyp]:
                fed.append(pcm)
                return [Hyp(f"p{len(fed)}", False)] if len(fed) % 15 == 0 else []

            def finish(self) -> Hyp:
                return Hyp(f"n{len(fed)}", True, 0.9)

            def close(self) -> None:
                pass

        return _S()


_WORDS = {1: "i want to speak", 2: "to an agent", 3: "what time do you close", 4: "hello there",
          5: "my order please", 6: "thank you goodbye"}


@functools.lru_cache(maxsize=None)
def _speech_of(text_id: int) -> bytes:
    """espeak's rendering of ``_WORDS[text_id]``, made in a fresh process: the
    library carries state from one utterance to the next (its pitch flutter),
    so the same text renders differently depending on what this process
    synthesized before, and this test's pauses are timed against the audio
    (measured: the 240 ms pause split the first sentence after 6 of 12
    different histories). A fresh process renders it the same every run."""
    code = ("import sys; from piopiy_voice.speech.tts import EspeakSynthesizer; "
            "sys.stdout.buffer.write(EspeakSynthesizer(processes=0).synthesize_sync(sys.argv[1], int(sys.argv[2])))")
    return subprocess.run([sys.executable, "-c", code, _WORDS[text_id], str(RATE)],
                          capture_output=True, check=True).stdout


def _voiced(text_id: int) -> list[bytes]:
    """Speech (espeak), trimmed to its loud part so silences are the test's own."""
    x = np.frombuffer(_speech_of(text_id), "<i2")
    loud = np.nonzero(np.abs(x) > 300)[0]
    pcm = x[loud[0]: loud[-1] + 1].tobytes()
    pcm += bytes(-len(pcm) % FB)
    return [pcm[i:i + FB] for i in range(0, len(pcm), FB)]


def _quiet(ms: int) -> list[bytes]:
    return [bytes(FB)] * (ms // 20)


def _track() -> list[bytes]:
    """Silence; a 'sentence' with a 240 ms pause inside (shorter than the
    hangover); silence; a second sentence; silence."""
    return (_quiet(500) + _voiced(1) + _quiet(240) + _voiced(2) + _quiet(1000)
            + _voiced(3) + _quiet(1000))


def _run(tail_ms: int, frames: list[bytes]) -> tuple[list[c.Transcript], _Recording]:
    rec = _Recording()
    core = CallTranscriber("c1", RATE, rec, tail_ms=tail_ms)
    out = []
    for i, f in enumerate(frames):
        out += core.handle(f"{i + 1}-0", c.AudioFrame(call_id="c1", seq=i + 1, pcm=f))
    return out, rec


def _turn_events(frames: list[bytes]):
    """The turn detector's own events on the track (what the core must follow)."""
    vad, turns = make_vad("energy", RATE), TurnDetector()
    events = []
    for i, f in enumerate(frames):
        events += [(ev.kind, ev.t_ms, i) for ev in turns.feed(vad.speech_prob(f), i * 20)]
    return events


def test_only_the_tail_of_the_hangover_is_decoded_and_pauses_are_whole():
    frames = _track()
    events = _turn_events(frames)
    assert [k for k, _, _ in events] == ["speech_start", "speech_end"] * 2   # the pause is inside
    held_out, rec = _run(TAIL_MS, frames)
    all_out, rec_all = _run(400, frames)   # tail = hangover: every frame, as before the change
    starts = [i for k, _, i in events if k == "speech_start"]
    ends = [i for k, _, i in events if k == "speech_end"]
    for seg, (fed, fed_all) in enumerate(zip(rec.streams, rec_all.streams)):
        # Before the change the stream got everything from the pre-roll to the frame
        # that ended the turn; now the same frames up to the last word + the tail.
        first = starts[seg] - len(fed_all) + (ends[seg] - starts[seg] + 1)
        assert fed_all == frames[first: ends[seg] + 1]
        last_speech = ends[seg] - 400 // 20   # the turn ends after 400 ms of quiet frames
        assert fed == frames[first: last_speech + 1 + TAIL_MS // 20]
        assert len(fed_all) - len(fed) == (400 - TAIL_MS) // 20
    # The pause inside the first sentence was fed whole (12 quiet frames in a row).
    assert any(rec.streams[0][i:i + 12] == _quiet(240) for i in range(len(rec.streams[0])))
    # Segments, times and numbering: the turn detector's, whatever the tail.
    finals = [(t.segment, t.start_ms, t.end_ms) for t in held_out if t.final]
    assert finals == [(t.segment, t.start_ms, t.end_ms) for t in all_out if t.final]
    assert finals == [(s, e[1] - 200, f[1]) for s, (e, f) in enumerate(zip(events[::2], events[1::2]))]
    assert [t.text for t in held_out if t.final] == [f"n{len(s)}" for s in rec.streams]


def test_speech_resuming_within_the_hangover_feeds_the_held_frames_first():
    frames = _quiet(300) + _voiced(4) + _quiet(360) + _voiced(5) + _quiet(600)
    out, rec = _run(0, frames)
    assert len(rec.streams) == 1
    fed = rec.streams[0]
    assert fed[-1] != bytes(FB)          # tail 0: the last word is the last thing decoded
    assert _quiet(360) == fed[fed.index(bytes(FB), 20):][:18]   # the pause, whole, in order
    assert [t.final for t in out].count(True) == 1


def test_call_end_and_lease_loss_do_not_leak_held_frames():
    frames = _quiet(300) + _voiced(6) + _quiet(200)
    rec = _Recording()
    core = CallTranscriber("c1", RATE, rec, tail_ms=100)
    for i, f in enumerate(frames):
        core.handle(f"{i + 1}-0", c.AudioFrame(call_id="c1", seq=i + 1, pcm=f))
    n = len(frames)
    out = core.handle(f"{n + 1}-0", c.CallEnded(call_id="c1", seq=n + 1, reason="hangup"))
    assert [t.final for t in out].count(True) == 1 and out[-1].final   # (a partial may come first)
    assert rec.streams[0][-5:] == _quiet(100)   # the call ended in the hangover: its tail fed
    assert core._held == []
    core2 = CallTranscriber("c2", RATE, rec, tail_ms=100)
    for i, f in enumerate(frames):
        core2.handle(f"{i + 1}-0", c.AudioFrame(call_id="c2", seq=i + 1, pcm=f))
    core2.close()
    assert core2._held == [] and core2._stream is None


def test_tail_must_not_be_negative():
    with pytest.raises(Exception):
        CallTranscriber("c1", RATE, _Recording(), tail_ms=-20)


def test_the_tail_and_the_second_pass_are_settings():
    from piopiy_voice.speech.config import SpeechConfig  # noqa: PLC0415
    from piopiy_voice.speech.errors import SpeechError  # noqa: PLC0415

    default = SpeechConfig()
    assert default.asr_tail_ms == TAIL_MS == 200
    assert default.recognizer_opts()["second_pass"] is False
    cfg = SpeechConfig.from_env({"PV_ASR_TAIL_MS": "100", "PV_ASR_SECOND_PASS": "true"})
    assert cfg.asr_tail_ms == 100 and cfg.recognizer_opts()["second_pass"] is True
    with pytest.raises(SpeechError, match="PV_ASR_TAIL_MS"):
        SpeechConfig.from_env({"PV_ASR_TAIL_MS": "-20"})


@pytest.mark.integration
def test_the_transcriber_role_feeds_the_configured_tail(r):
    """A call adopted by the role gets ``PV_ASR_TAIL_MS``, not the default."""
    from piopiy_voice import keys  # noqa: PLC0415
    from piopiy_voice.speech.config import SpeechConfig  # noqa: PLC0415
    from piopiy_voice.speech.transcriber_role import Transcriber  # noqa: PLC0415

    t = Transcriber(r, "asr-tail", 1500, _Recording(),
                    config=SpeechConfig.from_env({"PV_ASR_TAIL_MS": "100"}))
    fields = c.encode(c.CallStarted(call_id="c-tail", seq=1, gateway_id="gw1", rate=RATE))
    eid = r.xadd(keys.CALLS_STREAM, fields).decode()
    t._adopt(eid, {k.encode(): v.encode() if isinstance(v, str) else v for k, v in fields.items()},
             claimed=False)
    assert t.calls["c-tail"].core.tail_frames == 100 // 20
