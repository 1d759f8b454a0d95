"""16-bit little-endian mono PCM: framing, conversion, levels.

All audio in this project is signed 16-bit little-endian mono PCM at one of
the platform's voice rates (8000, 16000 or 32000 Hz), carried in 20 ms frames
(320, 640 or 1280 bytes). Levels are in dBFS relative to a full-scale square
wave, so a full-scale sine measures -3.01 dBFS.
"""

from __future__ import annotations

import math

import numpy as np

FRAME_MS = 20
SAMPLE_WIDTH = 2
SUPPORTED_RATES = (8000, 16000, 32000)

_FULL_SCALE = 32768.0
_INT16 = np.dtype("<i2")


def check_rate(rate: int, name: str = "rate") -> int:
    """Return ``rate`` if it is a supported voice rate, else raise ValueError naming ``name``."""
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or int(rate) not in SUPPORTED_RATES:
        raise ValueError(f"{name} must be one of {SUPPORTED_RATES} (Hz), got {rate!r}")
    return int(rate)


def check_pcm(pcm: bytes, name: str = "pcm") -> bytes:
    """Validate that ``pcm`` is a bytes-like object of whole 16-bit samples."""
    if not isinstance(pcm, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name} must be bytes, got {type(pcm).__name__}")
    if len(pcm) % SAMPLE_WIDTH:
        raise ValueError(f"{name} has odd length {len(pcm)}: 16-bit PCM needs whole 2-byte samples")
    return pcm


def _check_ms(ms: float, name: str = "ms") -> float:
    if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not math.isfinite(ms) or ms < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {ms!r}")
    return ms


def _check_number(value: float, name: str, lo: float, hi: float) -> float:
    """``value`` as a float if it is a number (not a bool) in ``[lo, hi]``, else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


def frame_bytes(rate: int) -> int:
    """Bytes in one 20 ms frame at ``rate`` (320, 640 or 1280)."""
    return check_rate(rate) * FRAME_MS // 1000 * SAMPLE_WIDTH


def frame_samples(rate: int) -> int:
    """Samples in one 20 ms frame at ``rate`` (160, 320 or 640)."""
    return check_rate(rate) * FRAME_MS // 1000


class Reframer:
    """Cuts a byte stream of arbitrary even-sized chunks into whole 20 ms frames.

    Frames come out in order; bytes that do not yet fill a frame stay buffered
    (see ``pending``) until the next ``push``. Nothing is dropped or repeated.
    """

    __slots__ = ("rate", "frame_bytes", "_buf")

    def __init__(self, rate: int):
        self.rate = check_rate(rate)
        self.frame_bytes = frame_bytes(rate)
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Number of buffered bytes not yet forming a whole frame."""
        return len(self._buf)

    def push(self, data: bytes) -> list[bytes]:
        """Add ``data`` and return every whole frame now available, oldest first.

        Raises ValueError if ``data`` has an odd length (a split sample would
        shift every later sample by one byte and turn the audio into noise).
        """
        check_pcm(data, "data")
        fb = self.frame_bytes
        if not self._buf:
            # Common case: the chunk is already frame-aligned; avoid copying into the buffer.
            n = len(data) // fb * fb
            frames = [bytes(data[i:i + fb]) for i in range(0, n, fb)]
            if n < len(data):
                self._buf += data[n:]
            return frames
        self._buf += data
        n = len(self._buf) // fb * fb
        if not n:
            return []
        buf = self._buf
        frames = [bytes(buf[i:i + fb]) for i in range(0, n, fb)]
        del buf[:n]
        return frames

    def flush(self, pad: bool = True) -> bytes:
        """Return the buffered remainder (zero-padded to a whole frame if ``pad``) and clear it.

        Returns b"" when nothing is pending.
        """
        rest = bytes(self._buf)
        self._buf.clear()
        if rest and pad:
            rest += bytes(self.frame_bytes - len(rest))
        return rest


def pcm_to_array(pcm: bytes) -> np.ndarray:
    """View PCM bytes as an int16 array (read-only when ``pcm`` is immutable bytes)."""
    check_pcm(pcm)
    return np.frombuffer(pcm, dtype=_INT16)


def array_to_pcm(arr) -> bytes:
    """Convert samples to PCM bytes.

    Integer arrays are taken as int16 sample values and clipped to the int16
    range. Floating-point arrays are taken as normalised samples (1.0 = full
    scale), scaled by 32767, rounded and clipped.
    """
    a = np.asarray(arr)
    if a.ndim != 1:
        raise ValueError(f"arr must be 1-D (mono), got shape {a.shape}")
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)):
            raise ValueError("arr contains NaN or infinite samples")
        a = np.clip(np.rint(a * 32767.0), -32768, 32767)
    elif a.dtype.kind in "iu":
        if a.dtype != _INT16:
            a = np.clip(a, -32768, 32767)
    else:
        raise ValueError(f"arr must hold integer or float samples, got dtype {a.dtype}")
    return a.astype(_INT16, copy=False).tobytes()


def silence(ms: float, rate: int) -> bytes:
    """``ms`` milliseconds of digital silence at ``rate`` (rounded down to whole samples)."""
    _check_ms(ms)
    return bytes(int(check_rate(rate) * ms / 1000) * SAMPLE_WIDTH)


def duration_ms(pcm: bytes, rate: int) -> float:
    """Duration of ``pcm`` at ``rate`` in milliseconds."""
    check_pcm(pcm)
    return len(pcm) / SAMPLE_WIDTH * 1000.0 / check_rate(rate)


def rms_dbfs(pcm: bytes) -> float:
    """RMS level in dBFS (full-scale square = 0 dB); ``-inf`` for empty or all-zero input."""
    a = pcm_to_array(pcm)
    if not a.size:
        return float("-inf")
    x = a.astype(np.float64)
    ms = float(np.dot(x, x)) / a.size
    if ms <= 0.0:
        return float("-inf")
    return 10.0 * math.log10(ms / (_FULL_SCALE * _FULL_SCALE))


def mix(a: bytes, b: bytes) -> bytes:
    """Sum two PCM signals sample by sample, saturating at the int16 limits.

    The result is as long as the longer input; the shorter one counts as
    silence past its end.
    """
    x = pcm_to_array(check_pcm(a, "a")).astype(np.int32)
    y = pcm_to_array(check_pcm(b, "b")).astype(np.int32)
    if x.size < y.size:
        x, y = y, x
    out = x.copy()
    out[: y.size] += y
    np.clip(out, -32768, 32767, out=out)
    return out.astype(_INT16).tobytes()
