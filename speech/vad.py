"""Voice activity: one 20 ms frame in, a probability of speech (0..1) out.

Theory of operation
-------------------
A ``Vad`` is per call (it keeps state between frames: noise floor, a model's
recurrent state) and is made by ``make_vad(name, rate)``. It only scores
frames; deciding when a turn starts and ends is ``speech.turns``' job.

Engines:

- ``energy`` (default, no extra package). The level test of
  ``piopiy_voice.audio.vad.EnergyVad`` (absolute threshold plus an adaptive
  noise floor) is kept, and two cheap spectral tests are added, from one
  spectrum of the last 40 ms (its bins up to 1.1 kHz only), because loudness
  alone calls a TV, hold music or a crowd "speech" (measured: 91% of music
  frames, 89% of babble):
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

Batching (``VoicingBatch``, energy engine only): the worker and the transcriber
read one frame or two of every call per loop turn. Before feeding them they
let each call's VAD queue its frames (``EnergyVoicingVad.ahead``: the level
and the analysis window, which depend on the audio alone), and one ``run``
computes the voicing of all of them; ``speech_prob`` then takes its frame's
figures instead of computing them. Decisions stay those of the frame scored
alone (see the class).
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left, insort
from collections import deque
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from piopiy_voice.audio.pcm import check_rate, frame_bytes
from piopiy_voice.audio.resample import Resampler
from piopiy_voice.audio.vad import EnergyVad

from .errors import EngineUnavailable, SpeechError

VAD_NAMES = ("energy", "webrtc", "silero")


class Vad(Protocol):
    rate: int

    def speech_prob(self, pcm: bytes) -> float:
        """Probability that this 20 ms frame at ``rate`` is speech (0..1)."""
        ...

    def ahead(self, pcm: bytes, batch: "VoicingBatch") -> None:
        """``pcm`` will be the next frame scored: queue what can be computed for
        it in ``batch`` (engines that cannot batch do nothing)."""
        ...


def _check_frame(pcm: bytes, size: int, rate: int) -> None:
    if not isinstance(pcm, (bytes, bytearray, memoryview)) or len(pcm) != size:
        got = len(pcm) if isinstance(pcm, (bytes, bytearray, memoryview)) else type(pcm).__name__
        raise SpeechError(f"a VAD frame is 20 ms = {size} bytes at {rate} Hz, got {got}")


def _check_rate(rate: Any) -> int:
    try:
        return check_rate(rate, "VAD rate")
    except ValueError as exc:
        raise SpeechError(str(exc)) from None


# --------------------------------------------------------------------------
# energy + voicing
# --------------------------------------------------------------------------

_BG_FRAMES = 75         # 1.5 s of levels for the background estimate
_BG_RANK = 7            # its 10th percentile
_VOICED = 0.55          # whitened-autocorrelation peak above which a frame is pitched
_CARRY_FRAMES = 10      # loud frames within 200 ms after a voiced one still count
_STEADY_FRAMES = 8      # 160 ms of an unmoving pitch = a note, not a voice
_STEADY_TOL = 0.01      # relative lag change that counts as "unmoving"
_FS2 = 32768.0 * 32768.0
_MIN_DB = -120.0
_FLOOR_FALL = 0.5       # ``EnergyVad``: fraction of the gap closed per quieter frame
_FLOOR_RISE_DB = 6.0 * 0.020   # ``EnergyVad``: 6 dB/s, per 20 ms frame
_MAX_AN_RATE = 16000    # the voicing analysis rate at most (32 kHz is decimated to it)
_BIN_HZ = 7.8125        # FFT resolution the thresholds were tuned with (1024 points at 8 kHz)


class _VoicingTables:
    """The voicing analysis' constant tables for one analysis rate, shared by
    every call at that rate (built once per process: they are ~0.1-0.3 MB,
    too much to hold per call)."""

    def __init__(self, an_rate: int, m: int) -> None:
        nfft = int(round(an_rate / _BIN_HZ))
        win = 2 * m
        bin_hz = an_rate / nfft
        self.k_lo, self.k_hi = int(np.ceil(80 / bin_hz)), int(1000 // bin_hz)
        # Whitening: each band bin's power over a ~200 Hz moving average around it.
        self.half = max(3, int(200 / bin_hz) | 1) // 2
        self.klen = 2 * self.half + 1
        # The spectrum is needed only up to k_hi + half: a DFT of just those bins
        # (rows: cos then -sin), zero-padded to nfft, with the Hann window folded
        # in, is one float32 matrix-vector product. Measured cheaper than numpy's
        # rfft of the whole padded window, whose cost is mostly its call overhead.
        self.bins = self.k_hi + self.half + 1
        # The whitening's moving average as a banded matrix (one product, not
        # running sums): row i averages bins k_lo+i-half .. k_lo+i+half, bins
        # below 0 counting as zero power ("same"-mode edges).
        self.smooth = np.zeros((self.k_hi - self.k_lo + 1, self.bins), dtype=np.float32)
        for i, kc in enumerate(range(self.k_lo, self.k_hi + 1)):
            self.smooth[i, max(0, kc - self.half): kc + self.half + 1] = 1.0 / self.klen
        k, n = np.arange(self.bins), np.arange(win)
        phase = 2 * np.pi * np.outer(k, n) / nfft
        window = np.hanning(win)
        self.dft = (np.concatenate((np.cos(phase), -np.sin(phase))) * window).astype(np.float32)
        lag_lo, lag_hi = int(an_rate * 0.0025), int(an_rate * 0.0125)
        self.lag_lo = lag_lo
        lags = np.concatenate(([0], np.arange(lag_lo, lag_hi + 1)))
        ks = np.arange(self.k_lo, self.k_hi + 1)
        # irfft of a real spectrum that is zero outside the band, at these lags only
        # (its constant factor dropped: only ratios to lag 0 are used).
        self.cos = np.cos(2 * np.pi * np.outer(lags, ks) / nfft).astype(np.float32)
        # Unbias for the shrinking overlap of a finite window (row 0 is lag 0).
        self.unbias = (win / (win - lags[1:])).astype(np.float32)
        # The products take rows of windows (``_voicing_rows``): the tables transposed.
        self.dft_t = np.ascontiguousarray(self.dft.T)
        self.smooth_t = np.ascontiguousarray(self.smooth.T)
        self.cos_t = np.ascontiguousarray(self.cos.T)


@lru_cache(maxsize=None)
def _voicing_tables(an_rate: int, m: int) -> _VoicingTables:
    return _VoicingTables(an_rate, m)


def _voicing_rows(t: _VoicingTables, windows: np.ndarray) -> list[tuple[float, int]]:
    """Voicing and pitch lag of each row of ``windows`` (40 ms analysis
    windows: the previous frame then this one, at the analysis rate): three
    float32 products whatever the number of rows (``EnergyVoicingVad``)."""
    z = windows @ t.dft_t                          # windowed spectra: re then im
    z *= z
    p = z[:, : t.bins]
    p += z[:, t.bins:]                             # power, bins 0 .. k_hi + half
    local = p @ t.smooth_t                         # each band bin's local mean power
    local += 1e-9
    ac = (p[:, t.k_lo: t.k_hi + 1] / local) @ t.cos_t   # whitened band -> autocorrelation
    r = ac[:, 1:]
    r *= t.unbias
    best = r.argmax(axis=1)
    if len(r) == 1:   # one frame scored alone: the same figures, fewer numpy calls
        i, ac0 = int(best[0]), float(ac[0, 0])
        return [(float(r[0, i]) / ac0, t.lag_lo + i) if ac0 > 0 else (0.0, 0)]
    peaks = r[np.arange(len(r)), best].tolist()
    return [(peak / ac0, t.lag_lo + i) if ac0 > 0 else (0.0, 0)
            for peak, ac0, i in zip(peaks, ac[:, 0].tolist(), best.tolist())]


class _Ahead:
    """One frame scored ahead (``EnergyVoicingVad.ahead``): what ``speech_prob``
    would compute from the audio alone."""

    __slots__ = ("pcm", "x", "energy", "v", "lag", "turn")

    def __init__(self, pcm: bytes, x: np.ndarray, energy: float, turn: int) -> None:
        self.pcm, self.x, self.energy, self.turn = pcm, x, energy, turn
        self.v: float | None = None
        self.lag = 0


class VoicingBatch:
    """Many calls' frames, their voicing computed together.

    The worker's loop reads one frame or two of each of its calls per turn and
    used to score them one by one: the voicing's three small products per
    frame were a quarter of the worker's CPU at 200 calls, mostly numpy's call
    overhead. A batch is owned by the loop and reused every turn: the calls'
    VADs ``add`` their frames through ``EnergyVoicingVad.ahead`` (before the
    frames are fed), ``run`` computes every added frame's voicing in three
    products per analysis rate, and each VAD's ``speech_prob`` then takes its
    frame's figures instead of computing them (matched by identity and order;
    anything else is computed on the spot, as without a batch).

    The products are the same as one frame's, but BLAS may sum a many-row
    product in another order than a one-row one: a voicing can differ in its
    last float32 bits from the frame scored alone (at most 1.0e-5 measured on
    the VAD corpus), so a decision can only differ for a frame that lands
    within that of the 0.55 threshold (``tests/test_speech_vad.py`` checks the
    decisions on that corpus)."""

    def __init__(self) -> None:
        self.turn = 0
        self._rows: dict[_VoicingTables, tuple[list[np.ndarray], list[_Ahead]]] = {}

    def add(self, tables: _VoicingTables, window: np.ndarray, item: _Ahead) -> None:
        rows = self._rows.get(tables)
        if rows is None:
            rows = self._rows[tables] = ([], [])
        rows[0].append(window)
        rows[1].append(item)

    def run(self) -> int:
        """Score every frame added since the last run; how many there were."""
        n = 0
        for tables, (windows, items) in self._rows.items():
            if not items:
                continue
            for item, (v, lag) in zip(items, _voicing_rows(tables, np.stack(windows))):
                item.v, item.lag = v, lag
            n += len(items)
            windows.clear()
            items.clear()
        self.turn += 1
        return n


class EnergyVoicingVad:
    """Level (``EnergyVad``'s floor logic) gated by voicing and pitch movement.

    Cost (why it is shaped this way: it runs on every frame of every call, in
    the worker's loop and in the transcriber): one int16 -> float32 conversion
    per frame shared by the level and the voicing; the level test is
    ``EnergyVad.process``'s arithmetic inlined (no second conversion); the
    background percentile comes from a sorted window kept with ``bisect`` (no
    partition of 75 values per frame); the voicing runs only on frames that
    are not quiet (at the call's rate; 32 kHz is low-passed and decimated to
    16 kHz: the band is 80-1000 Hz) as three float32 matrix products with
    tables shared by all calls at a rate: the spectrum of the needed bins only
    (a DFT matrix, the window folded in), the whitening's local means over the
    band only (a banded averaging matrix) and the autocorrelation at the pitch
    lags only (a cosine table). Each replaced numpy calls whose fixed overhead
    was most of their cost (an rfft of the padded window, running sums).
    """

    def __init__(self, rate: int, threshold_db: float = -45.0, snr_db: float = 9.0) -> None:
        self.rate = _check_rate(rate)
        self._size = frame_bytes(self.rate)
        n = self._size // 2
        # --- level test: ``audio.vad.EnergyVad`` (start/hangover are ``turns``' business)
        self.threshold_db = float(threshold_db)
        self.snr_db = float(snr_db)
        self._thr_energy = n * _FS2 * 10 ** (self.threshold_db / 10)
        self._quiet_energy = n * _FS2 * 10 ** ((self.threshold_db - 10) / 10)
        self._inv_norm = 1.0 / (n * _FS2)
        self.noise_floor_db: float | None = None
        self.level_db = _MIN_DB
        # --- voicing analysis: a 40 ms Hann window over the last two frames
        an_rate = min(self.rate, _MAX_AN_RATE)
        self._dec = self.rate // an_rate
        m = n // self._dec
        self._prev = np.zeros(m, dtype=np.float32)   # the previous frame (at the analysis rate)
        if self._dec > 1:
            # Anti-alias low-pass (windowed sinc, cut-off 3.6 kHz) before keeping every
            # ``dec``-th sample; its last taps-1 input samples carry over between frames.
            taps = 8 * self._dec + 1
            t = np.arange(taps) - (taps - 1) / 2
            fc = 0.45 * an_rate / self.rate
            h = 2 * fc * np.sinc(2 * fc * t) * np.hamming(taps)
            self._lp = (h / h.sum()).astype(np.float32)
            self._lp_in = np.zeros(taps - 1 + n, dtype=np.float32)
        self._t = _voicing_tables(an_rate, m)
        self._ready: deque[_Ahead] = deque()   # frames scored ahead (``ahead``)
        self._since_voiced = 10_000
        self._lags: deque[int] = deque(maxlen=_STEADY_FRAMES)
        self.voicing = 0.0
        # Background level: a low percentile of the last 1.5 s of frame levels,
        # seeded quiet so a call that opens with speech is heard at once.
        seed = self.threshold_db - self.snr_db
        self._levels = [seed] * _BG_FRAMES      # ring, in time order
        self._sorted = [seed] * _BG_FRAMES      # the same values, sorted
        self._li = 0
        self.background_db = seed

    def _voicing(self, x: np.ndarray) -> tuple[float, int]:
        return _voicing_rows(self._t, np.concatenate((self._prev, x))[None, :])[0]

    def ahead(self, pcm: bytes, batch: VoicingBatch) -> None:
        """Queue this frame's audio-only figures (level, and the voicing in
        ``batch``) for the ``speech_prob`` call that will follow with the same
        ``pcm``, in order (``VoicingBatch``). 32 kHz calls (decimated first) and
        frames of the wrong size are left to ``speech_prob``."""
        if self._dec > 1 or len(pcm) != self._size:
            return
        ready = self._ready
        if ready and ready[-1].turn != batch.turn:
            ready.clear()   # queued in an earlier turn and never heard: out of step
        x = np.frombuffer(pcm, dtype="<i2").astype(np.float32)
        item = _Ahead(pcm, x, float(x @ x), batch.turn)
        if item.energy >= self._quiet_energy:
            batch.add(self._t, np.concatenate((ready[-1].x if ready else self._prev, x)), item)
        ready.append(item)

    def _background(self, level: float) -> float:
        old = self._levels[self._li]
        self._levels[self._li] = level
        self._li = (self._li + 1) % _BG_FRAMES
        srt = self._sorted
        del srt[bisect_left(srt, old)]
        insort(srt, level)
        return srt[_BG_RANK]

    def speech_prob(self, pcm: bytes) -> float:
        pre = None
        if self._ready:
            pre = self._ready.popleft()
            if pre.pcm is not pcm or (pre.v is None and pre.energy >= self._quiet_energy):
                self._ready.clear()   # not the frame queued next, or its batch never ran
                pre = None
        if pre is None:
            _check_frame(pcm, self._size, self.rate)
            x = np.frombuffer(pcm, dtype="<i2").astype(np.float32)
            energy = float(x @ x)
        else:
            x, energy = pre.x, pre.energy
        level = 10.0 * math.log10(energy * self._inv_norm) if energy > 0 else _MIN_DB
        self.level_db = level
        floor = self.noise_floor_db
        if floor is None:
            floor = min(level, self.threshold_db - self.snr_db)
        if level < floor:
            floor += (level - floor) * _FLOOR_FALL
        else:
            floor += min(level - floor, _FLOOR_RISE_DB)
        self.noise_floor_db = floor
        floor_loud = level >= floor + self.snr_db   # against the updated floor, as before
        bg = self.background_db = self._background(level)
        if self._dec > 1:
            li = self._lp_in
            keep = li.size - x.size
            li[:keep] = li[x.size:]
            li[keep:] = x
            x = np.convolve(li, self._lp, mode="valid")[self._dec - 1::self._dec]
        if energy < self._quiet_energy:
            # Quiet: no spectral work; the voicing memory decays.
            self._prev = x
            self._since_voiced += 1
            self._lags.clear()
            self.voicing = 0.0
            return 0.0
        loud = energy >= self._thr_energy and floor_loud and level >= bg + self.snr_db
        v, lag = self._voicing(x) if pre is None else (pre.v, pre.lag)
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

    def ahead(self, pcm: bytes, batch: "VoicingBatch") -> None:
        """Nothing to batch (a C call per frame)."""

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

    def ahead(self, pcm: bytes, batch: "VoicingBatch") -> None:
        """Nothing to batch: one shared session scores every call's windows."""

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

