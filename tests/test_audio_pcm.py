"""PCM framing, conversion and level helpers."""

import math

import numpy as np
import pytest

from piopiy_voice.audio import (
    FRAME_MS, Reframer, array_to_pcm, duration_ms, frame_bytes, mix, pcm_to_array, rms_dbfs,
    silence, tone,
)


def test_frame_bytes_per_rate():
    assert FRAME_MS == 20
    assert [frame_bytes(r) for r in (8000, 16000, 32000)] == [320, 640, 1280]


@pytest.mark.parametrize("bad", [44100, 0, -8000, 8000.0, "8000", True, None])
def test_bad_rate_rejected_naming_rate(bad):
    with pytest.raises(ValueError, match="rate"):
        frame_bytes(bad)
    with pytest.raises(ValueError, match="rate"):
        Reframer(bad)


@pytest.mark.parametrize("rate", [8000, 16000, 32000])
def test_reframer_any_even_chunks_loses_and_duplicates_nothing(rate):
    rng = np.random.default_rng(rate)
    stream = rng.integers(-32768, 32767, size=rate * 3, dtype=np.int16).tobytes()
    fb = frame_bytes(rate)
    rf = Reframer(rate)
    out, i = [], 0
    while i < len(stream):
        n = 2 * int(rng.integers(0, 1000))  # includes empty chunks and multi-frame chunks
        out += rf.push(stream[i:i + n])
        i += n
    assert all(len(f) == fb for f in out)
    whole = len(stream) // fb * fb
    assert b"".join(out) == stream[:whole]
    assert rf.pending == len(stream) - whole
    tail = rf.flush()
    assert tail[: len(stream) - whole] == stream[whole:]
    assert len(tail) in (0, fb)
    assert rf.pending == 0 and rf.flush() == b""


def test_reframer_keeps_remainder_between_pushes():
    rf = Reframer(8000)
    assert rf.push(b"\x01\x00" * 100) == []
    assert rf.pending == 200
    frames = rf.push(b"\x02\x00" * 100)
    assert frames == [b"\x01\x00" * 100 + b"\x02\x00" * 60]
    assert rf.pending == 80
    assert rf.flush(pad=False) == b"\x02\x00" * 40


def test_reframer_rejects_odd_chunk_naming_data():
    rf = Reframer(8000)
    with pytest.raises(ValueError, match="data"):
        rf.push(b"\x00" * 321)
    assert rf.pending == 0


def test_array_roundtrip_and_clipping():
    a = np.array([0, 1, -1, 32767, -32768], dtype=np.int16)
    assert np.array_equal(pcm_to_array(array_to_pcm(a)), a)
    assert pcm_to_array(array_to_pcm(np.array([40000, -40000]))).tolist() == [32767, -32768]
    assert pcm_to_array(array_to_pcm(np.array([0.5, -2.0, 2.0]))).tolist() == [16384, -32768, 32767]
    with pytest.raises(ValueError, match="pcm"):
        pcm_to_array(b"\x00")
    with pytest.raises(ValueError, match="arr"):
        array_to_pcm(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        array_to_pcm(np.array([np.nan]))


def test_silence_duration_and_levels():
    assert silence(20, 16000) == bytes(640)
    assert duration_ms(silence(250, 8000), 8000) == 250.0
    assert rms_dbfs(silence(20, 8000)) == -math.inf
    assert rms_dbfs(b"") == -math.inf
    # A sine of peak A measures 20*log10(A/sqrt(2)) dBFS.
    assert rms_dbfs(tone(1000, 1000, 8000, 0.5)) == pytest.approx(20 * math.log10(0.5 / math.sqrt(2)), abs=0.01)
    with pytest.raises(ValueError, match="ms"):
        silence(-1, 8000)


def test_mix_saturates_and_extends():
    a = array_to_pcm(np.array([30000, -30000, 100], dtype=np.int16))
    b = array_to_pcm(np.array([10000, -10000], dtype=np.int16))
    assert pcm_to_array(mix(a, b)).tolist() == [32767, -32768, 100]
    assert pcm_to_array(mix(b, a)).tolist() == [32767, -32768, 100]
    with pytest.raises(ValueError, match="b"):
        mix(a, b"\x00")
