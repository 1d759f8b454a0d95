"""VAD engines, the turn detector, sentence splitting and the speech settings."""

from __future__ import annotations

import numpy as np
import pytest

from piopiy_voice.speech.config import SpeechConfig
from piopiy_voice.speech.errors import SpeechError
from piopiy_voice.speech.text import split_sentences
from piopiy_voice.speech.turns import TurnDetector
from piopiy_voice.speech.tts import EspeakSynthesizer
from piopiy_voice.speech.vad import make_vad, silero_model_path


def _frames(x: np.ndarray, rate: int) -> list[bytes]:
    n = rate // 50
    x = np.clip(np.rint(x), -32768, 32767).astype("<i2")
    return [x[i:i + n].tobytes() for i in range(0, x.size - n + 1, n)]


def _speech(rate):
    pcm = EspeakSynthesizer().synthesize_sync("Hello, I would like to check the balance on my account.", rate)
    return np.frombuffer(pcm, "<i2").astype(float)


def _chords(rate, seconds=4.0):
    t = np.arange(int(rate * seconds)) / rate
    x = np.zeros_like(t)
    for f0 in (220.0, 277.2, 329.6):
        for h in range(1, 5):
            x += np.sin(2 * np.pi * f0 * h * t) / h
    return x / np.sqrt(np.mean(x ** 2)) * 1600  # about -26 dBFS


def _brown(rate, seconds=4.0):
    x = np.cumsum(np.random.default_rng(4).standard_normal(int(rate * seconds)))
    x -= np.convolve(x, np.ones(400) / 400, mode="same")  # keep it centred
    return x / np.sqrt(np.mean(x ** 2)) * 1000


@pytest.mark.parametrize("engine", ["energy", "webrtc", "silero"])
@pytest.mark.parametrize("rate", [8000, 16000, 32000])
def test_each_engine_scores_speech_above_silence(engine, rate):
    vad = make_vad(engine, rate)
    assert vad.rate == rate
    quiet = [vad.speech_prob(f) for f in _frames(np.zeros(rate), rate)]
    speech = [vad.speech_prob(f) for f in _frames(_speech(rate), rate)]
    assert all(0.0 <= p <= 1.0 for p in quiet + speech)
    assert max(quiet) < 0.5
    assert np.mean(np.array(speech) >= 0.5) > 0.5


@pytest.mark.parametrize("rate", [8000, 16000])
def test_energy_engine_rejects_steady_music_and_brown_noise_that_loudness_alone_accepts(rate):
    from piopiy_voice.audio.vad import EnergyVad
    from piopiy_voice.speech.vad import level_only_prob

    for sig in (_chords(rate), _brown(rate)):
        fr = _frames(sig, rate)
        old = EnergyVad(rate, start_ms=0, hangover_ms=0)
        new = make_vad("energy", rate)
        old_fa = np.mean([level_only_prob(old, f) >= 0.5 for f in fr])
        new_fa = np.mean([new.speech_prob(f) >= 0.5 for f in fr])
        assert new_fa < 0.2 and new_fa < old_fa


def test_silero_keeps_state_per_call_and_uses_the_shipped_model():
    assert silero_model_path().name == "silero_vad.onnx"
    a, b = make_vad("silero", 16000), make_vad("silero", 16000)
    sp = _frames(_speech(16000), 16000)
    pa = [a.speech_prob(f) for f in sp]
    # b heard nothing so far: its state is its own.
    assert b.speech_prob(bytes(640)) < 0.5
    assert max(pa) > 0.9


@pytest.mark.parametrize("engine", ["energy", "webrtc", "silero"])
def test_wrong_frame_size_and_bad_names(engine):
    vad = make_vad(engine, 8000)
    with pytest.raises(SpeechError, match="320 bytes"):
        vad.speech_prob(bytes(100))
    with pytest.raises(SpeechError, match="rate"):
        make_vad(engine, 11025)
    with pytest.raises(SpeechError, match="unknown VAD"):
        make_vad("magic", 8000)


def test_turn_detector_onset_hangover_and_times():
    td = TurnDetector(onset_ms=80, hangover_ms=400)
    events = []
    probs = [0.0] * 10 + [0.9] * 2 + [0.0] + [0.9] * 30 + [0.5] * 3 + [0.0] * 30
    for i, p in enumerate(probs):
        events += [(e.kind, e.t_ms) for e in td.feed(p, i * 20)]
    # a 40 ms blip is ignored; speech starts where the 80 ms run began (frame 13);
    # 0.5 stays "speech" (hysteresis); the end is the last speech frame's end.
    assert events == [("speech_start", 260), ("speech_end", (13 + 30 + 3) * 20)]
    state = td.to_state()
    td2 = TurnDetector()
    td2.load_state(state)
    assert td2.to_state() == state
    with pytest.raises(SpeechError):
        TurnDetector(onset_ms=0)


def test_sentence_splitter_gives_the_first_clause_early():
    tokens = ["Sure", ",", " I can", " help with that", ", and ", "Dr. Smith", " opens at 9.30 am", ". ",
              "Anything", " **else**?", " Bye"]
    got = []
    for out in [list(split_sentences(tokens[:k])) for k in range(1, len(tokens) + 1)]:
        got = out
    assert got == ["Sure, I can help with that,", "and Dr. Smith opens at 9.30 am.", "Anything else?", "Bye"]
    # Early: the first piece is out before the sentence is complete.
    assert list(split_sentences(tokens[:5]))[0] == "Sure, I can help with that,"


def test_speech_config_from_env():
    cfg = SpeechConfig.from_env({"PV_VAD": "silero", "PV_ASR": "deepgram", "PV_DEEPGRAM_API_KEY": "k",
                                 "PV_TTS": "http", "PV_TTS_URL": "http://x", "PV_TTS_TIMEOUT_S": "3"})
    assert (cfg.vad, cfg.asr, cfg.tts, cfg.tts_timeout_s) == ("silero", "deepgram", "http", 3.0)
    assert cfg.recognizer_opts()["api_key"] == "k"
    assert cfg.synthesizer_opts()["url"] == "http://x"
    assert SpeechConfig.from_env({}) == SpeechConfig()
    with pytest.raises(SpeechError, match="PV_VAD"):
        SpeechConfig.from_env({"PV_VAD": "loud"})
    with pytest.raises(SpeechError, match="PV_TTS_TIMEOUT_S"):
        SpeechConfig.from_env({"PV_TTS_TIMEOUT_S": "soon"})


def _reference_voicing(prev: np.ndarray, x: np.ndarray, rate: int) -> tuple[float, int]:
    """The voicing measure written the direct way (full FFT, "same" convolution,
    full inverse FFT): what the energy engine's cheaper arithmetic must equal."""
    win = 2 * x.size
    nfft = 1 << (2 * win - 1).bit_length()
    seg = np.concatenate((prev, x)) * np.hanning(win).astype(np.float32)
    p = np.abs(np.fft.rfft(seg, nfft)) ** 2
    f = np.fft.rfftfreq(nfft, 1 / rate)
    k = max(3, int(200 / (rate / nfft)) | 1)
    w = np.where((f >= 80) & (f <= 1000), p / (np.convolve(p, np.ones(k) / k, mode="same") + 1e-9), 0.0)
    lo, hi = int(rate * 0.0025), int(rate * 0.0125)
    ac = np.fft.irfft(w, nfft)[: hi + 1]
    lags = np.arange(lo, hi + 1)
    r = ac[lo:] / ac[0] * (win / (win - lags))
    i = int(np.argmax(r))
    return float(r[i]), int(lags[i])


@pytest.mark.parametrize("rate", [8000, 16000])
def test_energy_engine_voicing_equals_the_direct_definition(rate):
    vad = make_vad("energy", rate)
    frames = _frames(np.concatenate((_speech(rate), _chords(rate, 1.0), _brown(rate, 1.0))), rate)
    prev = np.zeros(rate // 50, dtype=np.float32)
    checked = 0
    for pcm in frames[::7]:
        x = np.frombuffer(pcm, "<i2").astype(np.float32)
        vad._prev = prev
        got = vad._voicing(x)
        want = _reference_voicing(prev, x, rate)
        if want[0] > 0.3:  # argmax ties between near-equal lags only matter for pitched frames
            assert got[1] == want[1]
        assert got[0] == pytest.approx(want[0], abs=2e-3)
        prev = x
        checked += 1
    assert checked > 20


def test_energy_engine_background_is_the_10th_percentile_of_the_last_1_5_s():
    vad = make_vad("energy", 8000)
    levels = []
    rng = np.random.default_rng(3)
    for i in range(300):
        pcm = (rng.standard_normal(160) * 10 ** rng.uniform(0.5, 4)).astype("<i2").tobytes()
        vad.speech_prob(pcm)
        levels.append(vad.level_db)
        window = ([vad.threshold_db - vad.snr_db] * 75 + levels)[-75:]
        assert vad.background_db == pytest.approx(float(np.partition(window, 7)[7]))
    # The level is the frame's RMS in dBFS (what the agent's DTMF gate reuses).
    x = np.frombuffer(pcm, "<i2").astype(float)
    assert vad.level_db == pytest.approx(10 * np.log10(np.mean(x ** 2) / 32768 ** 2), abs=1e-3)


def test_turn_detector_lead_in_counts_an_unvoiced_opening_toward_the_onset():
    # 0.2 = loud but not voiced (the energy VAD's score for an "s" or "h").
    probs = [0.0] * 10 + [0.2] * 4 + [0.9] * 10 + [0.0] * 30
    fired = {}
    for lead in (0, 60):
        td = TurnDetector(onset_ms=80, hangover_ms=400, lead_in_ms=lead)
        for i, p in enumerate(probs):
            for e in td.feed(p, i * 20):
                fired.setdefault(lead, (e.kind, i, e.t_ms))
    # plain rule: 4 voiced frames (frames 14..17) -> fires on frame 17, starting at 280 ms
    assert fired[0] == ("speech_start", 17, 280)
    # lead-in: 60 ms of the 80 ms "s" count, so the first voiced frame fires,
    # and the turn starts 60 ms before it
    assert fired[60] == ("speech_start", 14, 280 - 60)


def test_turn_detector_lead_in_needs_a_voiced_run_and_is_capped():
    # Loud unvoiced sound alone never starts a turn, however long.
    td = TurnDetector(onset_ms=80, lead_in_ms=60)
    assert not any(td.feed(0.2, i * 20) for i in range(200))
    # ... and a quiet frame between the lead-in and the voice breaks the lead-in.
    td = TurnDetector(onset_ms=80, lead_in_ms=60)
    events = [e for i, p in enumerate([0.2] * 5 + [0.0] + [0.9] * 2) for e in td.feed(p, i * 20)]
    assert events == []
    # The lead-in is capped at the onset less one frame: one voiced frame is always needed.
    td = TurnDetector(onset_ms=40, lead_in_ms=60)
    assert td.lead_in_ms == 20
    events = [(e.kind, i) for i, p in enumerate([0.2] * 5 + [0.9] * 3) for e in td.feed(p, i * 20)]
    assert events == [("speech_start", 5)]
    # A checkpoint written before the lead-in existed still loads.
    td.load_state({"speaking": False, "run_start": None, "last_speech_end": 0, "quiet_ms": 0})
    assert td.to_state()["lead_ms"] == 0


def _four_calls(rate):
    """Four calls' frames of equal length: speech, chords, brown noise, silence then speech."""
    n = rate // 50
    sigs = [_speech(rate), _chords(rate, 2.0), _brown(rate, 2.0),
            np.concatenate((np.zeros(rate), _speech(rate)))]
    calls = [_frames(s, rate) for s in sigs]
    m = min(len(c) for c in calls)
    assert m * n >= rate  # at least a second each
    return [c[:m] for c in calls]


@pytest.mark.parametrize("rate", [8000, 16000])
def test_frames_scored_ahead_in_a_batch_get_the_decisions_they_get_alone(rate):
    """The worker scores each turn's frames of all its calls in one batch
    (``VoicingBatch``): every call's probabilities must be those of its VAD fed
    alone, whatever shares its turns (1-3 frames per call per turn here)."""
    from piopiy_voice.speech.vad import VoicingBatch

    calls = _four_calls(rate)
    alone = [make_vad("energy", rate) for _ in calls]
    batched = [make_vad("energy", rate) for _ in calls]
    batch = VoicingBatch()
    rng = np.random.default_rng(7)
    i = scored = 0
    while i < len(calls[0]):
        k = int(rng.integers(1, 4))
        for vad, frames in zip(batched, calls):
            for pcm in frames[i:i + k]:
                vad.ahead(pcm, batch)
        scored += batch.run()
        for a, b, frames in zip(alone, batched, calls):
            for pcm in frames[i:i + k]:
                assert b.speech_prob(pcm) == a.speech_prob(pcm)
                assert b.voicing == pytest.approx(a.voicing, abs=1e-4)
        i += k
    # Every loud frame went through the batch (not the per-frame fallback).
    assert scored > len(calls[0])
    assert all(not vad._ready for vad in batched)


def test_a_frame_not_scored_ahead_is_scored_alone_and_the_queue_resyncs():
    """``speech_prob`` takes a queued figure only for the very frame queued next;
    anything else (a frame skipped, a batch never run, another frame) is
    computed on the spot, and the stale queue is dropped."""
    from piopiy_voice.speech.vad import VoicingBatch

    rate = 8000
    frames = _frames(_speech(rate), rate)[:60]
    ref = make_vad("energy", rate)
    want = [ref.speech_prob(f) for f in frames]
    vad = make_vad("energy", rate)
    batch = VoicingBatch()
    got = []
    # Turn 1: queue 0..9 but the batch never runs: all scored alone.
    for f in frames[:10]:
        vad.ahead(f, batch)
    got += [vad.speech_prob(f) for f in frames[:10]]
    batch.run()   # a late run does not matter: the queue was dropped
    # Turn 2: queue 10..19, but 10 is heard as a copy (another object): resync.
    for f in frames[10:20]:
        vad.ahead(f, batch)
    batch.run()
    got.append(vad.speech_prob(bytes(bytearray(frames[10]))))
    got += [vad.speech_prob(f) for f in frames[11:20]]
    # Turn 3: queued 20..29 and not heard; turn 4 queues 30..59 (the earlier
    # queue is dropped as out of step) and hears 20..59 in order.
    for f in frames[20:30]:
        vad.ahead(f, batch)
    batch.run()
    for f in frames[30:60]:
        vad.ahead(f, batch)
    batch.run()
    got += [vad.speech_prob(f) for f in frames[20:60]]
    assert got == want
    # Wrong-size frames and 32 kHz calls are not queued at all.
    vad.ahead(b"\0" * 10, batch)
    hi = make_vad("energy", 32000)
    hi.ahead(_frames(_speech(32000), 32000)[0], batch)
    assert not vad._ready and not hi._ready and batch.run() == 0


@pytest.mark.parametrize("package", ["piopiy_voice.workers", "piopiy_voice.speech"])
def test_the_roles_packages_keep_blas_to_one_thread_unless_told(package):
    """A batched product must not fan out over every core (``piopiy_voice.blas``):
    importing the package before numpy leaves one BLAS thread; an explicit
    setting wins."""
    import os
    import subprocess
    import sys

    code = (f"import {package}, os, numpy as np\n"
            "a = np.ones((400, 400), dtype=np.float32); a @ a\n"
            "print(os.environ['OPENBLAS_NUM_THREADS'], len(os.listdir('/proc/self/task')))\n")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["1", "1"]
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, OPENBLAS_NUM_THREADS="2"),
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["2", str(min(2, os.cpu_count() or 1))]
