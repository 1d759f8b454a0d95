"""Test-signal synthesis: what the other audio tests rely on."""

import numpy as np
import pytest

from piopiy_voice.audio import pcm_to_array, rms_dbfs, speech_like, tone


def test_tone_frequency_length_level():
    pcm = tone(1000, 500, 16000, 0.5)
    a = pcm_to_array(pcm).astype(float)
    assert a.size == 8000
    assert np.argmax(np.abs(np.fft.rfft(a))) * 16000 / a.size == pytest.approx(1000, abs=2)
    assert np.max(np.abs(a)) == pytest.approx(16383.5, abs=2)
    with pytest.raises(ValueError, match="freq"):
        tone(5000, 100, 8000)
    with pytest.raises(ValueError, match="amplitude"):
        tone(440, 100, 8000, 1.5)


@pytest.mark.parametrize("rate", [8000, 16000, 32000])
def test_speech_like_level_pitch_and_syllables(rate):
    pcm = speech_like(4000, rate, seed=2, level_db=-20)
    a = pcm_to_array(pcm).astype(float)
    assert a.size == rate * 4
    assert rms_dbfs(pcm) == pytest.approx(-20, abs=0.2)
    # Voiced: strong autocorrelation peak at a pitch period of 100-220 Hz.
    seg = a[rate // 2: rate // 2 + rate // 10 * 4]
    ac = np.correlate(seg, seg, "full")[seg.size - 1:]
    lo, hi = rate // 240, rate // 90
    assert ac[lo:hi].max() > 0.3 * ac[0]
    # Syllabic: 20 ms frame energy envelope is modulated at 3-6 Hz.
    env = (a[: a.size // (rate // 50) * (rate // 50)].reshape(-1, rate // 50) ** 2).mean(axis=1)
    spec = np.abs(np.fft.rfft(env - env.mean()))
    peak_hz = np.argmax(spec[1:]) + 1
    assert 2.5 <= peak_hz * 50 / env.size <= 7
    # Deterministic per seed, different across seeds.
    assert speech_like(200, rate, seed=2) == speech_like(200, rate, seed=2)
    assert speech_like(200, rate, seed=2) != speech_like(200, rate, seed=3)


def test_speech_like_bad_input():
    with pytest.raises(ValueError, match="level_db"):
        speech_like(100, 8000, level_db=3)
    with pytest.raises(ValueError, match="rate"):
        speech_like(100, 12000)
    with pytest.raises(ValueError, match="ms"):
        speech_like(-5, 8000)
