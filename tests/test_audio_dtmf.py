"""DTMF generation and Goertzel detection on generated tones, speech, noise, silence."""

import json

import numpy as np
import pytest

from piopiy_voice.audio import (
    DTMF_KEYS, DtmfDetector, array_to_pcm, dtmf_sequence, dtmf_tone, frame_bytes, mix,
    pcm_to_array, rms_dbfs, silence, speech_like, tone,
)

RATES = (8000, 16000, 32000)


def frames(pcm: bytes, rate: int) -> list[bytes]:
    fb = frame_bytes(rate)
    pcm += bytes(-len(pcm) % fb)
    return [pcm[i:i + fb] for i in range(0, len(pcm), fb)]


def run(det: DtmfDetector, pcm: bytes) -> str:
    return "".join(k for f in frames(pcm, det.rate) for k in det.process(f))


def noise_like(pcm: bytes, snr_db: float, seed: int) -> bytes:
    """White noise ``snr_db`` below the RMS of ``pcm``, same length."""
    n = len(pcm) // 2
    level = 10 ** ((rms_dbfs(pcm) - snr_db) / 20)
    return array_to_pcm(np.random.default_rng(seed).standard_normal(n) * level)


def test_tone_contains_exactly_the_two_frequencies():
    pcm = dtmf_tone("5", 1000, 8000, 0.3)
    spec = np.abs(np.fft.rfft(pcm_to_array(pcm).astype(float)))
    peaks = sorted(np.argsort(spec)[-2:].tolist())  # 1 Hz bins for a 1 s signal
    assert peaks == [770, 1336]
    assert rms_dbfs(pcm) == pytest.approx(-10.46, abs=0.05)
    assert len(dtmf_tone("a", 40, 16000)) == 1280  # lower-case A-D accepted


@pytest.mark.parametrize("rate", RATES)
def test_every_key_detected_once_when_held(rate):
    for key in DTMF_KEYS:
        assert run(DtmfDetector(rate), silence(60, rate) + dtmf_tone(key, 400, rate) + silence(200, rate)) == key


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("seed", range(4))
def test_40ms_tones_at_minus20dbfs_with_15db_snr_any_alignment(rate, seed):
    # Per-component amplitude 0.1 -> -20 dBFS RMS for the pair.
    rng = np.random.default_rng(seed)
    lead = silence(int(rng.integers(0, 20)) + 0.5, rate)  # misaligned against frame boundaries
    keys = "".join(rng.choice(list(DTMF_KEYS), 16).tolist())
    seq = lead + dtmf_sequence(keys, tone_ms=40, gap_ms=40, rate=rate, amplitude=0.1) + silence(60, rate)
    assert rms_dbfs(dtmf_tone("1", 40, rate, 0.1)) == pytest.approx(-20, abs=0.1)
    noisy = mix(seq, noise_like(dtmf_tone("1", 1000, rate, 0.1), 15, seed)[: len(seq)])
    assert run(DtmfDetector(rate), noisy) == keys


@pytest.mark.parametrize("rate", RATES)
def test_same_key_twice_with_40ms_gap_reported_twice(rate):
    for lead_ms in (0, 5, 10, 13):
        seq = silence(lead_ms, rate) + dtmf_sequence("7777", 60, 40, rate) + silence(100, rate)
        assert run(DtmfDetector(rate), seq) == "7777", lead_ms


def test_short_dropout_inside_a_press_is_not_a_second_press():
    rate = 8000
    held = dtmf_tone("9", 200, rate)
    # 10 ms of the tone lost in the middle (packet loss): still one press.
    pcm = held[:1600] + silence(10, rate) + held[1760:]
    assert run(DtmfDetector(rate), pcm) == "9"


def test_key_change_without_gap_reports_both():
    rate = 8000
    assert run(DtmfDetector(rate), dtmf_tone("1", 100, rate) + dtmf_tone("2", 100, rate)) == "12"


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("seed", range(6))
def test_no_detection_on_speech_silence_or_noise(rate, seed):
    det = DtmfDetector(rate)
    for level in (-10, -20, -30):
        assert run(det, speech_like(3000, rate, seed=seed, level_db=level)) == ""
    assert run(det, silence(1000, rate)) == ""
    for level in (-6.0, -20.0, -40.0):
        white = np.random.default_rng(seed).standard_normal(rate * 2) * 10 ** (level / 20)
        assert run(det, array_to_pcm(np.clip(white, -1, 1))) == ""


def test_single_tones_and_weak_tones_rejected():
    rate = 8000
    det = DtmfDetector(rate)
    for f in (697, 1209, 1000, 1633):
        assert run(det, tone(f, 300, rate, 0.5)) == ""
    assert run(det, dtmf_tone("5", 300, rate, amplitude=0.005)) == ""  # -49 dBFS: below min level


def test_speech_with_dtmf_over_it_still_detects_when_tone_dominates():
    rate = 8000
    speech = speech_like(1000, rate, seed=3, level_db=-30)
    keys = dtmf_sequence("42", 100, 100, rate, amplitude=0.3)
    pcm = mix(speech, silence(300, rate) + keys)
    assert run(DtmfDetector(rate), pcm) == "42"


@pytest.mark.parametrize("rate", [8000, 32000])
def test_detect_many_equals_process(rate):
    pcm = speech_like(500, rate, seed=1) + dtmf_sequence("159#", 60, 40, rate) + silence(50, rate)
    fs = frames(pcm, rate)
    a, b = DtmfDetector(rate), DtmfDetector(rate)
    per_frame = [a.process(f) for f in fs]
    assert "".join(k for ks in per_frame for k in ks) == "159#"
    assert b.detect_many(fs[:20]) + b.detect_many(fs[20:]) == list("159#")
    assert (a.to_state(), b.detect_many([])) == (b.to_state(), [])


def test_state_roundtrip_mid_press():
    rate = 16000
    fs = frames(dtmf_tone("3", 200, rate) + silence(100, rate) + dtmf_tone("3", 100, rate), rate)
    det = DtmfDetector(rate)
    got = [k for f in fs[:5] for k in det.process(f)]
    assert got == ["3"] and det.held == "3"
    resumed = DtmfDetector.from_state(json.loads(json.dumps(det.to_state())))
    rest = [k for f in fs[5:] for k in resumed.process(f)]
    assert rest == ["3"]  # the held press is not re-reported; the next press is


def test_bad_input_named():
    with pytest.raises(ValueError, match="key"):
        dtmf_tone("E")
    with pytest.raises(ValueError, match="amplitude"):
        dtmf_tone("1", amplitude=0.8)
    with pytest.raises(ValueError, match=r"keys\[2\]"):
        dtmf_sequence("12x")
    with pytest.raises(ValueError, match="rate"):
        DtmfDetector(44100)
    with pytest.raises(ValueError, match="frame"):
        DtmfDetector(8000).process(bytes(100))
    with pytest.raises(ValueError, match=r"frames\[1\]"):
        DtmfDetector(8000).detect_many([bytes(320), bytes(2)])
    with pytest.raises(ValueError, match="held"):
        DtmfDetector.from_state({**DtmfDetector(8000).to_state(), "held": "Z"})
    with pytest.raises(ValueError, match="release_ms"):
        DtmfDetector(8000, release_ms=0)
