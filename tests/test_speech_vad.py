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
