"""The energy VAD and the agent's per-frame path as they were before the
per-frame cost work (kept for ``bench/worker_bench.py --compare`` only).

``LegacyEnergyVoicingVad`` is ``speech.vad.EnergyVoicingVad`` before it was
made cheap (same decisions: ``bench/vad_bench.py`` gives identical tables):
a second int16 conversion inside ``audio.vad.EnergyVad``, ``np.partition``
of 75 levels per frame, a full 1024-point ``irfft`` and a ``np.convolve``
whitening per non-quiet frame, at the call's full rate. ``BeforeAgent`` is
the ``DefaultAgent`` with that VAD, its own ``rms_dbfs`` level per frame, the
timers run on every frame and the list-building ``next_wakeup``.

    .venv/bin/python bench/worker_bench.py --compare bench.legacy_agent:BeforeAgent

``LevelOnlyAgent`` is the reference floor: the agent with the level-only
decision of the first ``DefaultAgent`` (no voicing).

    .venv/bin/python bench/legacy_agent.py

runs ``bench/vad_bench.py``'s signals through both VAD versions in one process
(identical decisions expected; the CPU per frame is the difference).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from piopiy_voice.audio.pcm import frame_bytes
from piopiy_voice.audio.vad import EnergyVad
from piopiy_voice.speech.vad import _check_frame, _check_rate, level_only_prob
from piopiy_voice.workers.agent.default import DefaultAgent

_BG_FRAMES = 75         # 1.5 s of levels for the background estimate
_BG_RANK = 7            # its 10th percentile
_VOICED = 0.55          # whitened-autocorrelation peak above which a frame is pitched
_CARRY_FRAMES = 10      # loud frames within 200 ms after a voiced one still count
_STEADY_FRAMES = 8      # 160 ms of an unmoving pitch = a note, not a voice
_STEADY_TOL = 0.01      # relative lag change that counts as "unmoving"


class LegacyEnergyVoicingVad:
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


class BeforeAgent(DefaultAgent):
    """``DefaultAgent`` with the per-frame path it had before (module docstring)."""

    def __init__(self, call, settings):
        super().__init__(call, settings)
        if self.ears.vad.__class__.__name__ == "EnergyVoicingVad":
            self.ears.vad = LegacyEnergyVoicingVad(call.rate)

    def _on_audio(self, pcm: bytes, now: float) -> list[Any]:
        # (``Ears`` measures the level with ``rms_dbfs`` itself for a VAD without ``level_db``.)
        wake = self.next_wakeup()
        out = super()._on_audio(pcm, now)
        if wake is None or now < wake:
            out += self._timers(now)  # not due: nothing to do, but it ran on every frame
        return out

    def next_wakeup(self) -> float | None:
        if self.mode == "paused":
            return self.resume_at
        if self.mode == "ending":
            return self.hangup_at
        if self.mode != "conversation":
            return None
        silent_from = max(self.last_activity, self.speaking_until)
        times = [silent_from + self.settings.silence_timeout_s, self.started_at + self.settings.max_call_s,
                 self.pause_at, self.reply_deadline, self.turn_deadline]
        return min(t for t in times if t is not None)


class _LevelOnlyVad:
    """The first DefaultAgent's decision: ``audio.vad.EnergyVad``'s level test alone."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._vad = EnergyVad(rate, start_ms=0, hangover_ms=0)

    def speech_prob(self, pcm: bytes) -> float:
        return level_only_prob(self._vad, pcm)


class LevelOnlyAgent(DefaultAgent):
    """Reference floor: today's agent with the level-only VAD of the first
    DefaultAgent (no voicing; it calls music and babble speech)."""

    def __init__(self, call, settings):
        super().__init__(call, settings)
        self.ears.vad = _LevelOnlyVad(call.rate)


def compare_vads(seconds: float = 20.0) -> None:
    """``bench/vad_bench.py``'s signals through the VAD before and after, same input,
    same process, alternating twice (decisions must be identical, CPU is the change)."""
    import time

    import vad_bench as vb  # the sibling harness (this script's directory is on sys.path)

    from piopiy_voice.speech.vad import EnergyVoicingVad

    print(f"{'energy VAD':<13}{'rate':>6}{'recall':>8}{'silence':>9}{'white':>7}{'pink':>7}{'brown':>7}"
          f"{'music':>7}{'babble':>8}{'us/frame':>10}")
    for rate in (8000, 16000):
        speech, labels = vb.speech_track(rate)
        rng = np.random.default_rng(9)
        others = {"silence": rng.standard_normal(int(rate * seconds)) * 10 ** (-70 / 20),
                  "white": vb._scale_to(vb.colored_noise(rate, seconds, "white", 2), -30),
                  "pink": vb._scale_to(vb.colored_noise(rate, seconds, "pink", 3), -30),
                  "brown": vb._scale_to(vb.colored_noise(rate, seconds, "brown", 4), -30),
                  "music": vb._scale_to(vb.music(rate, seconds, 5), -26),
                  "babble": vb._scale_to(vb.babble(rate, seconds, 6), -30)}
        frames = {"speech": vb._frames(speech, rate), **{k: vb._frames(v, rate) for k, v in others.items()}}
        for _ in range(2):
            for name, cls in (("before", LegacyEnergyVoicingVad), ("after", EnergyVoicingVad)):
                rates, cpus = {}, []
                for kind, fr in frames.items():
                    vad = cls(rate)
                    t = time.process_time()
                    p = np.array([vad.speech_prob(f) for f in fr])
                    cpus.append((time.process_time() - t) / len(fr))
                    rates[kind] = float((p[labels[:p.size]] >= 0.5).mean() if kind == "speech"
                                        else (p >= 0.5).mean())
                print(f"{name:<13}{rate:>6}{rates['speech']:>8.1%}{rates['silence']:>9.1%}"
                      f"{rates['white']:>7.1%}{rates['pink']:>7.1%}{rates['brown']:>7.1%}"
                      f"{rates['music']:>7.1%}{rates['babble']:>8.1%}{np.mean(cpus) * 1e6:>10.0f}")


if __name__ == "__main__":
    compare_vads()
