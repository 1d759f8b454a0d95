"""Voice activity: one 20 ms frame in, a probability of speech (0..1) out.

Theory of operation
-------------------
A ``Vad`` is per call (it keeps state between frames: noise floor, a model's
recurrent state) and is made by ``make_vad(name, rate)``. It only scores
frames; deciding when a turn starts and ends is ``speech.turns``' job.

Engines:

- ``energy`` (default, no extra package). The level test of
  ``piopiy_voice.audio.vad.EnergyVad`` (absolute threshold plus an adaptive
  noise floor) is kept, and two cheap spectral tests are added, from one FFT
  of the last 40 ms, because loudness alone calls a TV, hold music or a crowd
  "speech" (measured: 91% of music frames, 89% of babble):
    * voicing: the peak of the autocorrelation of the spectrally *whitened*
      80-1000 Hz band in the 2.5-12.5 ms pitch-lag range. Whitening (dividing
      the power spectrum by its local average) makes white, pink and brown
      noise look alike and unpitched; one talker's harmonics stay pitched,
      while several overlapping talkers (babble) smear each other out.
    * pitch steadiness: a synthetic note or chord holds one exact pitch for
      hundreds of ms; a voice glides. Frames whose pitch lag has not moved
      for 160 ms lose their voicing credit.
  A frame scores high when it is loud *and* voiced, or loud and within 200 ms
  after a voiced frame (unvoiced consonants inside a word).
- ``webrtc`` (extra ``vad``: ``webrtcvad-wheels``): Google's GMM VAD; 0 or 1
  per frame. 8/16/32 kHz natively.
- ``silero`` (extra ``vad``: ``silero-vad`` + ``onnxruntime``): the ONNX model
  shipped inside the silero-vad wheel (never downloaded), one
  ``InferenceSession`` per process shared by all calls, the recurrent state
  per call. The model takes 32 ms windows (512 samples at 16 kHz, 256 at
  8 kHz) so frames are buffered; a frame's score is the newest window's.
  32 kHz calls are resampled to 16 kHz first (``audio.resample.Resampler``).

All engines reject a frame of the wrong size with ``SpeechError``.
"""

from __future__ import annotations

import threading
from collections import deque
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from piopiy_voice.audio.pcm import frame_bytes
from piopiy_voice.audio.resample import Resampler
from piopiy_voice.audio.vad import EnergyVad

from .errors import EngineUnavailable, SpeechError

VAD_NAMES = ("energy", "webrtc", "silero")


class Vad(Protocol):
    rate: int

    def speech_prob(self, pcm: bytes) -> float:
        """Probability that this 20 ms frame at ``rate`` is speech (0..1)."""
        ...


def _check_frame(pcm: bytes, size: int, rate: int) -> None:
    if not isinstance(pcm, (bytes, bytearray, memoryview)) or len(pcm) != size:
        got = len(pcm) if isinstance(pcm, (bytes, bytearray, memoryview)) else type(pcm).__name__
        raise SpeechError(f"a VAD frame is 20 ms = {size} bytes at {rate} Hz, got {got}")


def _check_rate(rate: Any) -> int:
    if rate not in (8000, 16000, 32000) or isinstance(rate, bool):
        raise SpeechError(f"VAD rate must be 8000, 16000 or 32000, got {rate!r}")
    return int(rate)


# --------------------------------------------------------------------------
# energy + voicing
# --------------------------------------------------------------------------

_BG_FRAMES = 75         # 1.5 s of levels for the background estimate
_BG_RANK = 7            # its 10th percentile
_VOICED = 0.55          # whitened-autocorrelation peak above which a frame is pitched
_CARRY_FRAMES = 10      # loud frames within 200 ms after a voiced one still count
_STEADY_FRAMES = 8      # 160 ms of an unmoving pitch = a note, not a voice
_STEADY_TOL = 0.01      # relative lag change that counts as "unmoving"


class EnergyVoicingVad:
    """Level (``EnergyVad``'s floor logic) gated by voicing and pitch movement."""

    def __init__(self, rate: int, threshold_db: float = -45.0, snr_db: float = 9.0) -> None:
        self.rate = _check_rate(rate)
        self._size = frame_bytes(self.rate)
        # start/hangover are ``turns``' business: the level test alone is used here.
        self._level = EnergyVad(self.rate, threshold_db, 0, 0, snr_db=snr_db)
        n = self._size // 2
        # Analysis runs at 8 kHz-equivalent resolution: decimate 16/32 kHz by
        # plain striding after the band-limited FFT step below ignores >1 kHz anyway.
        self._win = 2 * n
        self._nfft = 1 << (2 * self._win - 1).bit_length()
        freqs = np.fft.rfftfreq(self._nfft, 1 / self.rate)
        self._band = (freqs >= 80) & (freqs <= 1000)
        self._window = np.hanning(self._win).astype(np.float32)
        self._lag_lo = int(self.rate * 0.0025)
        self._lag_hi = int(self.rate * 0.0125)
        self._prev = np.zeros(n, dtype=np.float32)
        self._since_voiced = 10_000
        self._lags: deque[int] = deque(maxlen=_STEADY_FRAMES)
        # Whitening kernel: a ~200 Hz moving average over the power spectrum.
        k = max(3, int(200 / (self.rate / self._nfft)) | 1)
        self._kernel = np.ones(k, dtype=np.float32) / k
        self.voicing = 0.0
        # Background level: a low percentile of the last 1.5 s of frame levels,
        # seeded quiet so a call that opens with speech is heard at once.
        self._levels = np.full(_BG_FRAMES, threshold_db - snr_db, dtype=np.float32)
        self._li = 0
        self.background_db = threshold_db - snr_db

    def _voicing(self, x: np.ndarray) -> tuple[float, int]:
        seg = np.concatenate((self._prev, x)) * self._window
        spec = np.fft.rfft(seg, self._nfft)
        p = (spec.real ** 2 + spec.imag ** 2).astype(np.float32)
        smooth = np.convolve(p, self._kernel, mode="same") + 1e-9
        w = np.where(self._band, p / smooth, 0.0)
        ac = np.fft.irfft(w, self._nfft)[: self._lag_hi + 1]
        if ac[0] <= 0:
            return 0.0, 0
        # Unbias for the shrinking overlap of a finite window.
        lags = np.arange(self._lag_lo, self._lag_hi + 1)
        r = ac[self._lag_lo:] / ac[0] * (self._win / (self._win - lags))
        i = int(np.argmax(r))
        return float(r[i]), int(lags[i])

    def speech_prob(self, pcm: bytes) -> float:
        _check_frame(pcm, self._size, self.rate)
        self._level.process(pcm)
        lv = self._level
        self._levels[self._li] = lv.level_db
        self._li = (self._li + 1) % _BG_FRAMES
        bg = float(np.partition(self._levels, _BG_RANK)[_BG_RANK])
        self.background_db = bg
        floor = lv.noise_floor_db if lv.noise_floor_db is not None else lv.level_db
        loud = (lv.level_db >= lv.threshold_db and lv.level_db >= floor + lv.snr_db
                and lv.level_db >= bg + lv.snr_db)
        x = np.frombuffer(pcm, dtype="<i2").astype(np.float32)
        if lv.level_db < lv.threshold_db - 10:
            # Quiet: no spectral work; the voicing memory decays.
            self._prev = x
            self._since_voiced += 1
            self._lags.clear()
            self.voicing = 0.0
            return 0.0
        v, lag = self._voicing(x)
        self._prev = x
        self.voicing = v
        if v >= _VOICED:
            self._lags.append(lag)
            steady = (len(self._lags) == _STEADY_FRAMES
                      and max(self._lags) - min(self._lags) <= _STEADY_TOL * lag + 1)
            self._since_voiced = 10_000 if steady else 0
        else:
            self._lags.clear()
            self._since_voiced += 1
        if not loud:
            return 0.1 if self._since_voiced == 0 else 0.0
        if self._since_voiced == 0:
            return 0.95
        if self._since_voiced <= _CARRY_FRAMES:
            return 0.7
        return 0.2


# --------------------------------------------------------------------------
# webrtc
# --------------------------------------------------------------------------


class WebrtcVad:
    def __init__(self, rate: int, mode: int = 2) -> None:
        self.rate = _check_rate(rate)
        try:
            import webrtcvad
        except ImportError:
            raise EngineUnavailable("PV_VAD=webrtc needs the 'vad' extra (webrtcvad-wheels)") from None
        if mode not in (0, 1, 2, 3):
            raise SpeechError(f"webrtc VAD mode must be 0..3, got {mode!r}")
        self._vad = webrtcvad.Vad(mode)
        self._size = frame_bytes(self.rate)

    def speech_prob(self, pcm: bytes) -> float:
        _check_frame(pcm, self._size, self.rate)
        return 1.0 if self._vad.is_speech(bytes(pcm), self.rate) else 0.0


# --------------------------------------------------------------------------
# silero (ONNX)
# --------------------------------------------------------------------------

_SILERO_LOCK = threading.Lock()
_SILERO_SESSION: Any = None


def silero_model_path() -> Path:
    """The ONNX model inside the installed silero-vad wheel (never downloaded)."""
    try:
        import silero_vad.data as data
    except ImportError:
        raise EngineUnavailable("PV_VAD=silero needs the 'vad' extra (silero-vad, onnxruntime)") from None
    path = Path(data.__file__).parent / "silero_vad.onnx"
    if not path.is_file():
        raise EngineUnavailable(f"silero-vad is installed but {path} is missing")
    return path


def _silero_session() -> Any:
    global _SILERO_SESSION
    with _SILERO_LOCK:
        if _SILERO_SESSION is None:
            try:
                import onnxruntime
            except ImportError:
                raise EngineUnavailable("PV_VAD=silero needs onnxruntime (the 'vad' extra)") from None
            opts = onnxruntime.SessionOptions()
            # One thread per session: the process serves many calls, not one fast.
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            _SILERO_SESSION = onnxruntime.InferenceSession(
                str(silero_model_path()), sess_options=opts, providers=["CPUExecutionProvider"])
        return _SILERO_SESSION


class SileroVad:
    def __init__(self, rate: int) -> None:
        self.rate = _check_rate(rate)
        self._size = frame_bytes(self.rate)
        self._session = _silero_session()
        self._model_rate = 8000 if self.rate == 8000 else 16000
        self._down = Resampler(32000, 16000) if self.rate == 32000 else None
        self._window = 256 if self._model_rate == 8000 else 512
        self._context_n = 32 if self._model_rate == 8000 else 64
        self._sr = np.array(self._model_rate, dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros(self._context_n, dtype=np.float32)
        self._buf = np.zeros(0, dtype=np.float32)
        self._prob = 0.0

    def speech_prob(self, pcm: bytes) -> float:
        _check_frame(pcm, self._size, self.rate)
        if self._down is not None:
            pcm = self._down.process(pcm)
        x = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
        buf = np.concatenate((self._buf, x))
        w = self._window
        while buf.size >= w:
            chunk = np.concatenate((self._context, buf[:w]))[None, :]
            out, self._state = self._session.run(
                None, {"input": chunk, "state": self._state, "sr": self._sr})
            self._prob = float(out[0][0])
            self._context = buf[w - self._context_n: w]
            buf = buf[w:]
        self._buf = buf
        return self._prob


def make_vad(name: str = "energy", rate: int = 8000, **opts: Any) -> Vad:
    """A per-call VAD: ``energy`` (default) | ``webrtc`` | ``silero``."""
    name = (name or "energy").lower()
    if name == "energy":
        return EnergyVoicingVad(rate, **opts)
    if name == "webrtc":
        return WebrtcVad(rate, **opts)
    if name == "silero":
        return SileroVad(rate, **opts)
    raise SpeechError(f"unknown VAD {name!r}; choose one of {', '.join(VAD_NAMES)}")


def level_only_prob(vad: EnergyVad, pcm: bytes) -> float:
    """The unimproved decision (loudness above threshold and floor), for comparison."""
    vad.process(pcm)
    floor = vad.noise_floor_db if vad.noise_floor_db is not None else vad.level_db
    return 1.0 if vad.level_db >= vad.threshold_db and vad.level_db >= floor + vad.snr_db else 0.0

