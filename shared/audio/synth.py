"""Test-signal synthesis: pure tones and a speech-like voiced signal.

``speech_like`` is not speech, but it has the properties detectors key on: a
harmonic source at a wandering, jittered pitch (100-220 Hz), a formant-shaped
spectrum (harmonics up to 4 kHz) that changes per syllable, a little breath noise, and a 3-6 Hz
syllabic amplitude envelope with short pauses. An energy VAD hears speech in
it; a DTMF detector must hear nothing.
"""

from __future__ import annotations

import math

import numpy as np

from .pcm import _check_ms, array_to_pcm, check_rate

# (F1, F2, F3) in Hz for a handful of vowels, with bandwidths below.
_VOWELS = np.array([
    (730, 1090, 2440),  # a
    (270, 2290, 3010),  # i
    (300, 870, 2240),   # u
    (530, 1840, 2480),  # e
    (570, 840, 2410),   # o
    (660, 1720, 2410),  # ae
], dtype=np.float64)
_BANDWIDTHS = np.array([90.0, 110.0, 170.0])


def tone(freq: float, ms: float, rate: int = 8000, amplitude: float = 0.5) -> bytes:
    """A sine of ``freq`` Hz lasting ``ms`` ms; ``amplitude`` is the peak as a fraction of full scale."""
    rate = check_rate(rate)
    _check_ms(ms)
    if isinstance(freq, bool) or not isinstance(freq, (int, float)) or not 0 < freq < rate / 2:
        raise ValueError(f"freq must be in (0, {rate / 2}) Hz for rate {rate}, got {freq!r}")
    if isinstance(amplitude, bool) or not isinstance(amplitude, (int, float)) or not 0 <= amplitude <= 1:
        raise ValueError(f"amplitude must be in [0, 1], got {amplitude!r}")
    n = int(rate * ms / 1000)
    t = np.arange(n) / rate
    return array_to_pcm(amplitude * np.sin(2 * np.pi * freq * t))


def _smooth_noise(rng: np.random.Generator, n: int, rate: int, hz: float) -> np.ndarray:
    """Unit-variance noise band-limited to about ``hz`` by interpolating random knots."""
    step = max(1, int(rate / hz))
    knots = rng.standard_normal(n // step + 3)
    return np.interp(np.arange(n) / step, np.arange(knots.size), knots)


def speech_like(ms: float, rate: int = 8000, seed: int = 0, level_db: float = -20.0) -> bytes:
    """``ms`` ms of voiced, syllabic, speech-like audio with RMS level ``level_db`` dBFS.

    Deterministic for a given ``seed``.
    """
    rate = check_rate(rate)
    _check_ms(ms)
    if isinstance(level_db, bool) or not isinstance(level_db, (int, float)) or not -90 <= level_db <= -3:
        raise ValueError(f"level_db must be in [-90, -3] dBFS, got {level_db!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    n = int(rate * ms / 1000)
    if n == 0:
        return b""
    rng = np.random.default_rng(seed)

    # Pitch: a per-speaker base, slow intonation drift, and fast jitter.
    f0_base = rng.uniform(100.0, 220.0)
    f0 = f0_base * (1 + 0.12 * _smooth_noise(rng, n, rate, 2.0).clip(-2, 2) / 2)
    f0 *= 1 + 0.015 * _smooth_noise(rng, n, rate, 150.0)
    phase = 2 * np.pi * np.cumsum(f0) / rate

    # Syllables: random durations for a 3-6 Hz rate, each with its own vowel.
    syl_rate = rng.uniform(3.0, 6.0)
    bounds = [0]
    while bounds[-1] < n:
        bounds.append(bounds[-1] + int(rate / syl_rate * rng.uniform(0.7, 1.3)))
    env = np.zeros(n)
    formants = np.zeros((n, 3))
    for a, b in zip(bounds[:-1], bounds[1:]):
        seg = min(b, n) - a
        length = b - a
        # Raised-cosine syllable with a short pause between syllables.
        u = np.arange(seg) / length
        shape = np.sin(np.pi * np.clip(u / 0.8, 0, 1)) ** 1.5
        env[a:a + seg] = shape * rng.uniform(0.5, 1.0)
        v0, v1 = _VOWELS[rng.integers(len(_VOWELS))], _VOWELS[rng.integers(len(_VOWELS))]
        formants[a:a + seg] = v0 + np.outer(u, v1 - v0)  # glide from one vowel towards another

    # Harmonic source (-6 dB/octave: glottal roll-off plus lip radiation) shaped by the
    # formant resonances evaluated at each harmonic's instantaneous frequency.
    nyq = rate / 2
    k_max = int((min(nyq, 4000.0) - 100) / 100)
    voiced = np.zeros(n)
    for k in range(1, k_max + 1):
        fk = k * f0
        active = fk < min(nyq * 0.95, 4000.0)
        if not active.any():
            break
        gain = np.zeros(n)
        for j in range(3):
            gain += 1.0 / np.sqrt(1 + ((fk - formants[:, j]) / (_BANDWIDTHS[j] / 2)) ** 2) / (j + 1)
        voiced += np.where(active, gain / k * np.sin(k * phase + k * 0.7), 0.0)

    breath = 0.03 * rng.standard_normal(n) * np.std(voiced)
    x = (voiced + breath) * env
    rms = math.sqrt(float(np.mean(x * x))) or 1.0
    target = 10 ** (level_db / 20) * 32768 / 32767  # array_to_pcm scales floats by 32767
    return array_to_pcm(x / rms * target)
