"""The numpy polyphase resampler piopiy_voice.audio.resample had before soxr (kept for bench/audio_bench.py only).

Sample-rate conversion between the voice rates 8000, 16000 and 32000 Hz.

Every pair of voice rates differs by a factor of 2 or 4, so conversion is
either integer interpolation (up by L) or integer decimation (down by M) with
one linear-phase low-pass FIR (Kaiser-windowed sinc) designed at the higher
rate. The filter passes up to 0.42 x the lower rate (3.36 kHz for 8 kHz, the
telephone band) and stops from 0.5 x the lower rate with about 80 dB of
attenuation, so content above the lower Nyquist frequency does not alias.

Upsampling uses the polyphase form (one short sub-filter per output phase) and
downsampling evaluates the filter only at the kept output instants.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from piopiy_voice.audio.pcm import SAMPLE_WIDTH, check_pcm, check_rate

_STOP_DB = 80.0
_PASS_EDGE = 0.42  # of the lower rate
_STOP_EDGE = 0.50  # of the lower rate


@lru_cache(maxsize=None)
def _design(high: int, low: int) -> np.ndarray:
    """Low-pass FIR at rate ``high`` for the boundary of rate ``low`` (unit DC gain)."""
    factor = high // low
    trans = (_STOP_EDGE - _PASS_EDGE) * low / high  # cycles per sample at `high`
    cutoff = 0.5 * (_STOP_EDGE + _PASS_EDGE) * low / high
    # Kaiser's estimates for the length and beta that reach _STOP_DB.
    n = int(math.ceil((_STOP_DB - 7.95) / (2.285 * 2 * math.pi * trans))) + 1
    # Length - 1 a multiple of 2 * factor keeps the group delay a whole number
    # of samples at both rates, so one-shot output can be aligned exactly.
    step = 2 * factor
    n = ((n - 1 + step - 1) // step) * step + 1
    beta = 0.1102 * (_STOP_DB - 8.7)
    m = np.arange(n) - (n - 1) / 2
    h = 2 * cutoff * np.sinc(2 * cutoff * m) * np.kaiser(n, beta)
    h /= h.sum()
    return h


class Resampler:
    """Streaming converter from ``src`` to ``dst`` Hz; keeps filter state across chunks.

    ``process(chunk)`` returns the output available so far. The output is
    delayed by ``delay`` output samples (the FIR's group delay, 4 ms for
    every rate pair); call ``flush()`` at the end of the stream
    to obtain the tail. Dropping the first ``delay`` samples of everything
    returned (including the flush) gives, sample for sample, ``resample()``
    of the whole stream followed by a few trailing samples of filter ring-out.
    Chunks may have any even length; odd lengths raise ValueError. After
    ``flush()`` the object behaves as if silence had been inserted; use a
    new Resampler for a new stream.
    """

    def __init__(self, src: int, dst: int):
        self.src = check_rate(src, "src_rate")
        self.dst = check_rate(dst, "dst_rate")
        self.delay = 0
        if self.src == self.dst:
            self._mode = "copy"
            return
        if self.dst > self.src:
            self._mode = "up"
            self.factor = self.dst // self.src
            h = _design(self.dst, self.src) * self.factor
            taps = -(-h.size // self.factor)
            padded = np.zeros(taps * self.factor)
            padded[: h.size] = h
            # Column p holds the phase-p sub-filter, reversed to act on a window
            # of past inputs ordered oldest -> newest.
            self._bank = np.ascontiguousarray(padded.reshape(taps, self.factor)[::-1, :])
            self._hist = np.zeros(taps - 1)
            self.delay = (h.size - 1) // 2
        else:
            self._mode = "down"
            self.factor = self.src // self.dst
            h = _design(self.src, self.dst)
            self._taps = h[::-1].copy()
            self._hist = np.zeros(h.size - 1)
            self._count = 0  # input samples seen so far, modulo the factor
            self.delay = (h.size - 1) // 2 // self.factor

    def _run(self, x: np.ndarray) -> np.ndarray:
        if self._mode == "up":
            buf = np.concatenate((self._hist, x))
            k = self._hist.size
            win = np.lib.stride_tricks.sliding_window_view(buf, k + 1)
            y = (win @ self._bank).reshape(-1)
            self._hist = buf[buf.size - k:].copy()
            return y
        buf = np.concatenate((self._hist, x))
        # Window i ends at input sample (count + i); output instants are the
        # input samples whose absolute index is a multiple of the factor.
        start = (-self._count) % self.factor
        win = np.lib.stride_tricks.sliding_window_view(buf, self._taps.size)[start::self.factor]
        y = win @ self._taps
        self._count = (self._count + x.size) % self.factor
        self._hist = buf[buf.size - self._hist.size:].copy()
        return y

    def process(self, chunk: bytes) -> bytes:
        """Convert the next chunk of the stream; returns whatever output is ready."""
        check_pcm(chunk, "chunk")
        if self._mode == "copy":
            return bytes(chunk)
        if not chunk:
            return b""
        x = np.frombuffer(chunk, dtype="<i2").astype(np.float64)
        return _to_pcm(self._run(x))

    def _pad(self) -> int:
        """Input samples of silence that release the last ``delay`` output samples."""
        return -(-self.delay // self.factor) if self._mode == "up" else self.delay * self.factor

    def flush(self) -> bytes:
        """Push silence through the filter to release the last ``delay`` output samples."""
        if self._mode == "copy":
            return b""
        return _to_pcm(self._run(np.zeros(self._pad())))


def _to_pcm(y: np.ndarray) -> bytes:
    return np.clip(np.rint(y), -32768, 32767).astype("<i2").tobytes()


def resample(pcm: bytes, src_rate: int, dst_rate: int) -> bytes:
    """Convert a whole PCM buffer from ``src_rate`` to ``dst_rate`` (8000/16000/32000).

    The output is time-aligned with the input (the filter delay is removed)
    and has ``floor(samples * dst_rate / src_rate)`` samples. Each call starts
    from silence: to convert a continuous stream chunk by chunk without
    clicks at the boundaries, use ``Resampler``.
    """
    check_pcm(pcm)
    src = check_rate(src_rate, "src_rate")
    dst = check_rate(dst_rate, "dst_rate")
    if src == dst:
        return bytes(pcm)
    n_in = len(pcm) // SAMPLE_WIDTH
    n_out = n_in * dst // src
    if not n_out:
        return b""
    r = Resampler(src, dst)
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    y = r._run(np.concatenate((x, np.zeros(r._pad()))))
    return _to_pcm(y[r.delay: r.delay + n_out])
