"""Resampling between 8/16/32 kHz on real signals."""

import numpy as np
import pytest

from piopiy_voice.audio import Resampler, pcm_to_array, resample, rms_dbfs, speech_like, tone

RATES = (8000, 16000, 32000)


def peak_hz(pcm: bytes, rate: int) -> float:
    a = pcm_to_array(pcm).astype(float)
    spec = np.abs(np.fft.rfft(a * np.hanning(a.size)))
    return float(np.argmax(spec) * rate / a.size)


def middle(pcm: bytes, rate: int) -> bytes:
    """Drop 100 ms at each end, where the abrupt start/stop of a test tone is broadband."""
    return pcm[rate // 10 * 2: len(pcm) - rate // 10 * 2]


def test_1khz_tone_survives_8k_16k_8k():
    src = tone(1000, 1000, 8000, 0.5)
    up = resample(src, 8000, 16000)
    back = resample(up, 16000, 8000)
    assert len(up) == 2 * len(src) and len(back) == len(src)
    assert peak_hz(up, 16000) == pytest.approx(1000, abs=2)
    assert peak_hz(back, 8000) == pytest.approx(1000, abs=2)
    assert rms_dbfs(middle(up, 16000)) == pytest.approx(rms_dbfs(middle(src, 8000)), abs=0.1)
    assert rms_dbfs(middle(back, 8000)) == pytest.approx(rms_dbfs(middle(src, 8000)), abs=0.1)
    # Time-aligned, not just same spectrum: the waveform comes back sample for sample.
    a, b = pcm_to_array(middle(src, 8000)).astype(int), pcm_to_array(middle(back, 8000)).astype(int)
    assert np.max(np.abs(a - b)) <= 3


@pytest.mark.parametrize("src,dst", [(16000, 8000), (32000, 8000)])
def test_6khz_tone_is_removed_not_aliased(src, dst):
    x = tone(6000, 1000, src, 0.5)
    y = resample(x, src, dst)
    assert rms_dbfs(middle(x, src)) > -10
    assert rms_dbfs(middle(y, dst)) < -70  # > 60 dB down; would alias to 2 kHz unfiltered


def test_12khz_removed_going_32k_to_16k_and_passband_kept():
    assert rms_dbfs(middle(resample(tone(12000, 1000, 32000, 0.5), 32000, 16000), 16000)) < -70
    for f in (300, 3000):
        y = resample(tone(f, 1000, 32000, 0.5), 32000, 8000)
        assert rms_dbfs(middle(y, 8000)) == pytest.approx(-9.03, abs=0.2)


@pytest.mark.parametrize("src,dst", [(s, d) for s in RATES for d in RATES if s != d])
def test_streaming_matches_one_shot_for_any_chunking(src, dst):
    x = speech_like(700, src, seed=4)
    rng = np.random.default_rng(src + dst)
    r = Resampler(src, dst)
    out, i = [], 0
    while i < len(x):
        n = 2 * int(rng.integers(0, 500))
        out.append(r.process(x[i:i + n]))
        i += n
    out.append(r.flush())
    streamed = pcm_to_array(b"".join(out))[r.delay:]
    whole = pcm_to_array(resample(x, src, dst))
    assert streamed.size >= whole.size
    assert np.array_equal(streamed[: whole.size], whole)


def test_file_and_synthesiser_rates_convert_with_their_level():
    """44.1 and 22.05 kHz sources (WAV files, espeak) reach every voice rate with a
    1 kHz tone intact: same level, same frequency."""
    import numpy as np
    for src in (22050, 44100, 48000):
        n = src // 2
        t = np.arange(n) / src
        x = (8000 * np.sin(2 * np.pi * 1000 * t)).astype("<i2").tobytes()
        for dst in (8000, 16000, 32000):
            y = np.frombuffer(resample(x, src, dst), "<i2").astype(float)
            assert len(y) == n * dst // src
            mid = y[len(y) // 4: 3 * len(y) // 4]
            rms = np.sqrt(np.mean(mid ** 2))
            assert abs(rms - 8000 / np.sqrt(2)) < 0.02 * 8000
            spec = np.abs(np.fft.rfft(mid))
            assert abs(np.argmax(spec) * dst / len(mid) - 1000) < 5


def test_same_rate_is_identity_and_bad_input_named():
    x = tone(440, 100, 16000)
    assert resample(x, 16000, 16000) == x
    # A whole buffer may come from any file or synthesiser rate (test above),
    # not from a nonsense one.
    for bad in (0, 3999, 192001, 22050.5, True):
        with pytest.raises(ValueError, match="src_rate"):
            resample(x, bad, 8000)
    with pytest.raises(ValueError, match="dst_rate"):
        Resampler(8000, 22050)
    with pytest.raises(ValueError, match="pcm"):
        resample(b"\x00\x00\x00", 8000, 16000)
    with pytest.raises(ValueError, match="chunk"):
        Resampler(8000, 16000).process(b"\x00")
