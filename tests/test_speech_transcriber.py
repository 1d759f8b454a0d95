"""The transcriber: its pure core on synthesized speech, then the real role
process against a real Redis, including a SIGKILL takeover."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from piopiy_voice import contracts as c
from piopiy_voice import callrecord, keys
from piopiy_voice.speech.asr import make_recognizer
from piopiy_voice.speech.transcriber import CallTranscriber
from piopiy_voice.speech.tts import EspeakSynthesizer

RATE = 8000
FB = RATE // 50 * 2


def _speech(text: str, rate: int = RATE) -> bytes:
    return EspeakSynthesizer().synthesize_sync(text, rate)


def _frames(pcm: bytes, fb: int = FB) -> list[bytes]:
    pcm += bytes(-len(pcm) % fb)
    return [pcm[i:i + fb] for i in range(0, len(pcm), fb)]


def _call_audio(*texts: str, rate: int = RATE) -> list[bytes]:
    """Silence, then each sentence followed by 1 s of silence."""
    fb = rate // 50 * 2
    pcm = bytes(fb * 25)
    for t in texts:
        pcm += _speech(t, rate) + bytes(fb * 50)
    return _frames(pcm, fb)


@pytest.fixture(scope="module")
def recognizer():
    return make_recognizer("pocketsphinx")


def _feed(core: CallTranscriber, frames: list[bytes], seq0: int = 1) -> list[c.Transcript]:
    out = []
    for i, f in enumerate(frames):
        out += core.handle(f"{i + 1}-0", c.AudioFrame(call_id="c1", seq=seq0 + i, pcm=f))
    return out


@pytest.mark.parametrize("rate", [8000, 16000])
def test_core_transcribes_segments_with_call_audio_times(recognizer, rate):
    core = CallTranscriber("c1", rate, recognizer)
    frames = _call_audio("i want to speak to an agent", "yes that is right", rate=rate)
    out = _feed(core, frames)
    finals = [t for t in out if t.final]
    assert [t.segment for t in finals] == [0, 1]
    assert finals[0].text.startswith("i want to speak")  # WER itself: bench/asr_bench.py
    assert finals[1].text.startswith("yes that is right")
    # First speech starts after 500 ms of silence (minus at most the 200 ms pre-roll).
    assert 280 <= finals[0].start_ms <= 520
    assert finals[0].start_ms < finals[0].end_ms < finals[1].start_ms < finals[1].end_ms
    assert finals[1].end_ms <= len(frames) * 20
    assert all(t.channel == "caller" and t.seq == 0 and t.engine == "pocketsphinx" for t in out)
    partials = [t for t in out if not t.final]
    assert partials and all(p.segment in (0, 1) for p in partials)


def test_frames_heard_ahead_in_a_batch_give_the_same_transcripts():
    """The role scores each turn's frames of all its calls in one VAD batch
    (``hear_ahead``): a call's transcripts are those it gets without one.
    Each core has a recognizer of its own: one recognizer's decoders share a
    learnt cepstral mean, so what it decoded before shapes the next results."""
    from piopiy_voice.speech.vad import VoicingBatch

    frames = _call_audio("where is my order", "can i talk to a human please")
    other = _call_audio("yes that is right")   # a second call sharing the batches
    plain, batched, neighbour = (CallTranscriber(cid, RATE, make_recognizer("pocketsphinx"))
                                 for cid in ("c1", "c1", "c2"))
    batch = VoicingBatch()
    want, got, scored = _feed(plain, frames), [], 0
    for i in range(0, len(frames), 2):   # two frames a turn
        turn = [c.AudioFrame(call_id="c1", seq=1 + j, pcm=f) for j, f in enumerate(frames[i:i + 2], i)]
        mine = [c.AudioFrame(call_id="c2", seq=1 + j, pcm=f) for j, f in enumerate(other[i:i + 2], i)]
        batched.hear_ahead([m.pcm for m in turn], batch)
        neighbour.hear_ahead([m.pcm for m in mine], batch)
        scored += batch.run()
        for m in turn:
            got += batched.handle(f"{m.seq}-0", m)
        for m in mine:
            neighbour.handle(f"{m.seq}-0", m)
    assert [(t.final, t.segment, t.text, t.start_ms, t.end_ms) for t in got] == \
        [(t.final, t.segment, t.text, t.start_ms, t.end_ms) for t in want]
    assert [t.text for t in got if t.final][0].startswith("where is my order")
    assert scored > 100


def test_core_switches_channel_after_transfer_and_finishes_on_call_end(recognizer):
    core = CallTranscriber("c1", RATE, recognizer)
    first = _call_audio("what time do you close")
    out = _feed(core, first)
    n = len(first)
    res = c.CommandResult(call_id="c1", seq=n + 1, command_id="x", command="cmd.transfer", status="applied")
    out += core.handle(f"{n + 1}-0", res)
    # The call ends while the second sentence is still being spoken: it is finished anyway.
    tail = _frames(bytes(FB * 10) + _speech("thank you goodbye"))
    out += _feed(core, tail, seq0=n + 2)
    out += core.handle("9999-0", c.CallEnded(call_id="c1", seq=n + 2 + len(tail), reason="hangup"))
    finals = [t for t in out if t.final]
    assert [(t.channel, t.segment) for t in finals] == [("caller", 0), ("conversation", 1)]
    assert "close" in finals[0].text
    assert "goodbye" in finals[1].text
    assert core.ended and core.checkpoint()["last_id"] == "9999-0"


def test_core_drops_duplicate_seq_and_counts_gaps(recognizer):
    core = CallTranscriber("c1", RATE, recognizer)
    f = bytes(FB)
    core.handle("1-0", c.AudioFrame(call_id="c1", seq=1, pcm=f))
    core.handle("2-0", c.AudioFrame(call_id="c1", seq=1, pcm=f))  # resent duplicate
    core.handle("3-0", c.StreamGap(call_id="c1", seq=2, frames=50, reason="redis_lost"))
    assert core.frames == 51


# ---------------------------------------------------------------- the role

def _start(env, tid):
    return subprocess.Popen(
        [sys.executable, "-m", "piopiy_voice.speech.transcriber_role", "--id", tid, "--lease-ms", "1000"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _finals(r, cid):
    out = []
    for _id, fields in r.xrange(keys.call_stream(cid)):
        if fields.get(b"type") == b"transcript":
            t = c.decode(fields)
            if t.final:
                out.append(t)
    return out


def _wait(pred, timeout=60.0, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"transcriber exited: {p.stderr.read().decode()[-2000:]}")
        time.sleep(0.1)
    raise AssertionError("timed out")


def _announce(r, cid):
    started = c.CallStarted(call_id=cid, seq=1, gateway_id="gw1", rate=RATE)
    r.xadd(keys.CALLS_STREAM, c.encode(started))
    r.xadd(keys.call_stream(cid), c.encode(started))


def _write_audio(r, cid, frames, seq0):
    pipe = r.pipeline(transaction=False)
    for i, f in enumerate(frames):
        pipe.xadd(keys.call_stream(cid), c.audio_fields(cid, seq0 + i, f))
    pipe.execute()
    return seq0 + len(frames)


@pytest.mark.integration
def test_role_appends_transcripts_and_a_second_process_resumes_after_sigkill(r, subprocess_env):
    env = dict(subprocess_env, PV_LOG_LEVEL="INFO")
    cid = "asr-call-1"
    t1 = _start(env, "t1")
    try:
        _announce(r, cid)
        seq = _write_audio(r, cid, _call_audio("what is my balance"), 2)
        finals = _wait(lambda: _finals(r, cid), procs=[t1])
        assert len(finals) == 1 and "balance" in finals[0].text and finals[0].segment == 0
        assert r.get(keys.call_asr_lease(cid)) == b"t1"
        # Half of the next sentence, then the owner dies mid-utterance.
        second = _call_audio("what time do you close")
        seq = _write_audio(r, cid, second[: len(second) // 2], seq)
        _wait(lambda: json.loads(r.hget(keys.call_asr_checkpoint(cid), "state") or b"{}")
              .get("segment") == 1, procs=[t1])
        t1.send_signal(signal.SIGKILL)
        t1.wait(10)
    finally:
        if t1.poll() is None:
            t1.kill()
    t2 = _start(env, "t2")
    try:
        seq = _write_audio(r, cid, second[len(second) // 2:], seq)
        r.xadd(keys.call_stream(cid), c.encode(c.CallEnded(call_id=cid, seq=seq, reason="hangup")))
        _wait(lambda: r.hget(keys.call_asr_checkpoint(cid), "done") == b"1", procs=[t2])
        finals = _finals(r, cid)
        # Segment 1 was re-decoded from its start by t2: one final per segment, whole sentence.
        assert [f.segment for f in finals] == [0, 1]
        assert finals[1].text.startswith("what") and finals[1].text.endswith("close")
        assert r.hget(keys.call_asr_checkpoint(cid), "owner") == b"t2"
        assert r.get(keys.call_asr_lease(cid)) is None  # released at the end
        assert r.ttl(keys.call_asr_checkpoint(cid)) > 0
        # The finals also went to the call's transcript stream (what status and
        # the API read, kept after the audio is gone), and only the finals.
        kept = [t for _eid, t in callrecord.transcript_finals(r.xrange(keys.call_transcript(cid)))]
        assert [(t.segment, t.text) for t in kept] == [(f.segment, f.text) for f in finals]
        assert r.xlen(keys.call_transcript(cid)) == 2
        assert 0 < r.ttl(keys.call_transcript(cid)) <= keys.CALL_KEY_TTL_AFTER_END
        assert not r.xpending(keys.CALLS_STREAM, keys.TRANSCRIBERS_GROUP)["pending"]
    finally:
        t2.send_signal(signal.SIGTERM)
        try:
            t2.wait(15)
        except subprocess.TimeoutExpired:
            t2.kill()
