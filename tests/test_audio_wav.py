"""WAV read/write with the stdlib wave module."""

import io
import wave

import numpy as np
import pytest

from piopiy_voice.audio import pcm_to_array, read_wav, tone, wav_bytes, write_wav


def test_roundtrip_file_and_bytes(tmp_path):
    pcm = tone(440, 250, 16000, 0.4)
    p = tmp_path / "a.wav"
    write_wav(p, pcm, 16000)
    assert read_wav(p) == (pcm, 16000)
    assert read_wav(str(p)) == (pcm, 16000)
    assert read_wav(wav_bytes(pcm, 16000)) == (pcm, 16000)
    assert read_wav(io.BytesIO(wav_bytes(pcm, 16000))) == (pcm, 16000)


def _wav(channels: int, width: int, frames: bytes, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(frames)
    return buf.getvalue()


def test_stereo_is_downmixed():
    left = np.array([1000, -2000, 32767, -32768], dtype="<i2")
    right = np.array([3000, 2000, 32767, -32768], dtype="<i2")
    data = np.stack([left, right], axis=1).reshape(-1).tobytes()
    pcm, rate = read_wav(_wav(2, 2, data, 32000))
    assert rate == 32000
    assert pcm_to_array(pcm).tolist() == [2000, 0, 32767, -32768]


@pytest.mark.parametrize("width", [1, 3, 4])
def test_other_sample_widths_rejected(width):
    with pytest.raises(ValueError, match=f"{width * 8} bits.*16-bit"):
        read_wav(_wav(1, width, bytes(width * 10)))


def test_garbage_and_bad_arguments():
    with pytest.raises(ValueError, match="not a readable PCM WAV"):
        read_wav(b"RIFF....nonsense")
    with pytest.raises(TypeError, match="source"):
        read_wav(123)
    with pytest.raises(ValueError, match="rate"):
        wav_bytes(b"\x00\x00", 0)
    with pytest.raises(ValueError, match="pcm"):
        wav_bytes(b"\x00", 8000)
