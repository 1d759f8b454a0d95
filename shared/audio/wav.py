"""WAV read/write for 16-bit PCM (stdlib ``wave``)."""

from __future__ import annotations

import io
import os
import wave

import numpy as np

from .pcm import SAMPLE_WIDTH, check_pcm


def _check_wav_rate(rate: int) -> int:
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or not 1000 <= rate <= 192000:
        raise ValueError(f"rate must be an integer sample rate in 1000..192000 Hz, got {rate!r}")
    return int(rate)


def read_wav(source) -> tuple[bytes, int]:
    """Read a 16-bit PCM WAV and return ``(mono_pcm, rate)``.

    ``source`` is a path (str or os.PathLike), the file's bytes, or a binary
    file object. Stereo (and any multi-channel) audio is downmixed to mono by
    averaging the channels. The rate is returned as stored; use ``resample``
    to reach a voice rate. Raises ValueError for anything that is not
    uncompressed 16-bit PCM, naming what was found.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        fh = io.BytesIO(bytes(source))
        label = "wav bytes"
    elif isinstance(source, (str, os.PathLike)):
        fh = open(source, "rb")
        label = os.fspath(source)
    elif hasattr(source, "read"):
        fh = source
        label = "wav file object"
    else:
        raise TypeError(f"source must be a path, bytes or a binary file object, got {type(source).__name__}")
    try:
        try:
            w = wave.open(fh, "rb")
        except (wave.Error, EOFError) as exc:
            raise ValueError(f"{label}: not a readable PCM WAV file ({exc})") from exc
        with w:
            width = w.getsampwidth()
            channels = w.getnchannels()
            rate = w.getframerate()
            if width != SAMPLE_WIDTH:
                raise ValueError(
                    f"{label}: sample width is {width * 8} bits; only 16-bit PCM is supported"
                )
            if channels < 1:
                raise ValueError(f"{label}: invalid channel count {channels}")
            raw = w.readframes(w.getnframes())
    finally:
        if fh is not source:
            fh.close()
    usable = len(raw) - len(raw) % (SAMPLE_WIDTH * channels)
    data = np.frombuffer(raw[:usable], dtype="<i2")
    if channels == 1:
        return data.tobytes(), rate
    frames = data.reshape(-1, channels).astype(np.int32)
    # Floor division of the sum keeps exact integers and never exceeds int16.
    mono = (frames.sum(axis=1) // channels).astype("<i2")
    return mono.tobytes(), rate


def wav_bytes(pcm: bytes, rate: int) -> bytes:
    """Encode mono 16-bit ``pcm`` at ``rate`` as a complete WAV file in memory."""
    check_pcm(pcm)
    rate = _check_wav_rate(rate)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(SAMPLE_WIDTH)
        w.setframerate(rate)
        w.writeframes(bytes(pcm))
    return buf.getvalue()


def write_wav(path, pcm: bytes, rate: int) -> None:
    """Write mono 16-bit ``pcm`` at ``rate`` to ``path`` (replaced atomically)."""
    data = wav_bytes(pcm, rate)
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)
