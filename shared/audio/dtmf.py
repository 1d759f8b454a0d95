"""DTMF tone generation and in-band detection (the platform sends no DTMF events).

Detection runs once per 20 ms frame. The frame is Hann-windowed and its
spectrum evaluated at the 4 row and 4 column frequencies plus the second
harmonics of the column frequencies: one Goertzel-equivalent single-bin DFT
per frequency, done for all 12 at once as one matrix product against cos/sin
tables precomputed for the rate. A 20 ms window resolves 50 Hz at every rate,
so the same decision rules hold at 8, 16 and 32 kHz.

A frame carries a key when all of these hold:

- level: the strongest row and column tones are each >= ``min_level_db``;
- relative energy: those two tones hold >= ``min_tone_ratio`` of the frame's
  power (speech and music spread their power over many frequencies; noise
  over all of them);
- dominance: each beats the other tones of its group by ``min_dominance_db``;
- twist: row and column levels differ by at most ``max_twist_db``;
- harmonics: the column tone's 2nd harmonic is at least ``harmonic_margin_db``
  below it (voiced sound is harmonic; a DTMF tone is not). Row harmonics are
  not tested because a row tone's 2nd harmonic sits within 1.2-1.5 bins of a
  column frequency and would reject genuine keys.

Reporting is edge-triggered: a key is reported on the first frame it is
heard; it is reported again only after ``release_ms`` (default 40 ms) of
frames without it, or when a different key is heard. State is a JSON-able
dict for checkpoints.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from .pcm import FRAME_MS, _check_number, check_rate, frame_bytes


ROW_FREQS = (697.0, 770.0, 852.0, 941.0)
COL_FREQS = (1209.0, 1336.0, 1477.0, 1633.0)
_LAYOUT = ("123A", "456B", "789C", "*0#D")
KEYS = "".join(_LAYOUT)
_KEY_FREQS = {k: (ROW_FREQS[r], COL_FREQS[c]) for r, row in enumerate(_LAYOUT) for c, k in enumerate(row)}

_STATE_VERSION = 1
_FS2 = 32768.0 * 32768.0


def _key(key: str, name: str = "key") -> str:
    if not isinstance(key, str) or len(key) != 1 or key.upper() not in _KEY_FREQS:
        raise ValueError(f"{name} must be one of {KEYS!r}, got {key!r}")
    return key.upper()


def dtmf_tone(key: str, ms: float = 100, rate: int = 8000, amplitude: float = 0.3) -> bytes:
    """The dual tone for ``key`` (0-9 * # A-D), ``ms`` long.

    ``amplitude`` is each component's peak as a fraction of full scale
    (0 < amplitude <= 0.5 so the sum cannot clip); 0.3 gives -10.5 dBFS RMS.
    """
    key = _key(key)
    rate = check_rate(rate)
    ms = _check_number(ms, "ms", 0, 3_600_000)
    amplitude = _check_number(amplitude, "amplitude", 0, 0.5)
    if amplitude == 0:
        raise ValueError("amplitude must be > 0")
    lo, hi = _KEY_FREQS[key]
    t = np.arange(int(rate * ms / 1000)) / rate
    x = amplitude * 32767.0 * (np.sin(2 * np.pi * lo * t) + np.sin(2 * np.pi * hi * t))
    return np.rint(x).astype("<i2").tobytes()


def dtmf_sequence(
    keys: str, tone_ms: float = 100, gap_ms: float = 100, rate: int = 8000, amplitude: float = 0.3
) -> bytes:
    """Tones for each key of ``keys`` with ``gap_ms`` of silence between them (none after the last)."""
    if not isinstance(keys, str):
        raise ValueError(f"keys must be a str of DTMF keys, got {type(keys).__name__}")
    for i, k in enumerate(keys):
        _key(k, f"keys[{i}]")
    rate = check_rate(rate)
    gap = bytes(int(rate * _check_number(gap_ms, "gap_ms", 0, 3_600_000) / 1000) * 2)
    return gap.join(dtmf_tone(k, tone_ms, rate, amplitude) for k in keys)


class DtmfDetector:
    """Edge-triggered DTMF detector for one call's 20 ms frames at ``rate``.

    ``process(frame)`` returns the keys newly pressed in that frame (usually
    ``[]``, at most one key). ``detect_many(frames)`` does the same for a
    batch of consecutive frames in one matrix product.
    """

    def __init__(
        self,
        rate: int,
        *,
        min_level_db: float = -38.0,
        min_tone_ratio: float = 0.8,
        min_dominance_db: float = 6.0,
        max_twist_db: float = 8.0,
        harmonic_margin_db: float = 10.0,
        release_ms: int = 40,
    ):
        self.rate = check_rate(rate)
        self.min_level_db = _check_number(min_level_db, "min_level_db", -90.0, 0.0)
        self.min_tone_ratio = _check_number(min_tone_ratio, "min_tone_ratio", 0.0, 1.0)
        self.min_dominance_db = _check_number(min_dominance_db, "min_dominance_db", 0.0, 60.0)
        self.max_twist_db = _check_number(max_twist_db, "max_twist_db", 0.0, 40.0)
        self.harmonic_margin_db = _check_number(harmonic_margin_db, "harmonic_margin_db", 0.0, 60.0)
        self.release_ms = int(_check_number(release_ms, "release_ms", FRAME_MS, 10_000))
        self.held: str | None = None
        self.miss_ms = 0
        self._frame_bytes = frame_bytes(self.rate)
        n = self._frame_bytes // 2
        w = np.hanning(n + 2)[1:-1]  # no zero end-points: every sample counts
        freqs = np.array(ROW_FREQS + COL_FREQS + tuple(2 * f for f in COL_FREQS))
        arg = 2 * np.pi * np.outer(np.arange(n), freqs) / self.rate
        self._basis = np.ascontiguousarray(
            np.hstack((w[:, None] * np.cos(arg), w[:, None] * np.sin(arg))), dtype=np.float32
        )
        # Bin power of a sine of amplitude A comes out as A^2/2, in full-scale units.
        self._bin_scale = 2.0 / (float(w.sum()) ** 2 * _FS2)
        self._w2 = (w * w / float((w * w).sum()) / _FS2).astype(np.float32)
        self._min_p = 10 ** (self.min_level_db / 10)
        self._twist = 10 ** (self.max_twist_db / 10)
        self._dom = 10 ** (self.min_dominance_db / 10)
        self._harm = 10 ** (-self.harmonic_margin_db / 10)

    def _classify(self, x: np.ndarray) -> np.ndarray:
        """Key index (0..15, into KEYS) per row of ``x`` (frames x samples), -1 for none."""
        y = x @ self._basis
        p = (y[:, :12] ** 2 + y[:, 12:] ** 2) * self._bin_scale
        frame_p = (x * x) @ self._w2
        rows, cols = p[:, 0:4], p[:, 4:8]
        ri, ci = rows.argmax(axis=1), cols.argmax(axis=1)
        idx = np.arange(x.shape[0])
        pr, pc = rows[idx, ri], cols[idx, ci]
        rows_sorted, cols_sorted = np.sort(rows, axis=1), np.sort(cols, axis=1)
        ok = (
            (pr >= self._min_p) & (pc >= self._min_p)
            & (pr + pc >= self.min_tone_ratio * frame_p)
            & (rows_sorted[:, -2] * self._dom <= pr) & (cols_sorted[:, -2] * self._dom <= pc)
            & (pc <= pr * self._twist) & (pr <= pc * self._twist)
            & (p[idx, 8 + ci] <= pc * self._harm)
        )
        return np.where(ok, ri * 4 + ci, -1)

    def _advance(self, k: int, out: list[str]) -> None:
        if k >= 0:
            key = KEYS[k]
            self.miss_ms = 0
            if key != self.held:
                self.held = key
                out.append(key)
        elif self.held is not None:
            self.miss_ms += FRAME_MS
            if self.miss_ms >= self.release_ms:
                self.held = None
                self.miss_ms = 0

    def _check(self, frame: bytes, name: str) -> None:
        if len(frame) != self._frame_bytes:
            raise ValueError(
                f"{name} must be one 20 ms frame of {self._frame_bytes} bytes at {self.rate} Hz, "
                f"got {len(frame)} bytes (use Reframer)"
            )

    def process(self, frame: bytes) -> list[str]:
        """Feed one 20 ms frame; return the keys whose press starts in it."""
        self._check(frame, "frame")
        x = np.frombuffer(frame, dtype="<i2").astype(np.float32)
        out: list[str] = []
        self._advance(self._classify_one(x), out)
        return out

    def _classify_one(self, x: np.ndarray) -> int:
        """``_classify`` for a single frame in plain Python: for 12 bins, numpy's
        per-call overhead costs more than the arithmetic."""
        y = (x @ self._basis).tolist()
        s = self._bin_scale
        p = [(y[i] * y[i] + y[i + 12] * y[i + 12]) * s for i in range(12)]
        rows, cols = p[0:4], p[4:8]
        pr, pc = max(rows), max(cols)
        min_p = self._min_p
        if pr < min_p or pc < min_p:
            return -1
        if pc > pr * self._twist or pr > pc * self._twist:
            return -1
        ri, ci = rows.index(pr), cols.index(pc)
        if p[8 + ci] > pc * self._harm:
            return -1
        dom = self._dom
        if sorted(rows)[-2] * dom > pr or sorted(cols)[-2] * dom > pc:
            return -1
        if pr + pc < self.min_tone_ratio * float(np.dot(x * x, self._w2)):
            return -1
        return ri * 4 + ci

    def detect_many(self, frames: Iterable[bytes]) -> list[str]:
        """Feed consecutive 20 ms frames; return all newly pressed keys in order.

        Equivalent to concatenating ``process(f)`` over ``frames``, but the
        spectral analysis of the whole batch is a single matrix product.
        """
        frames = list(frames)
        for i, f in enumerate(frames):
            self._check(f, f"frames[{i}]")
        if not frames:
            return []
        x = np.frombuffer(b"".join(frames), dtype="<i2").astype(np.float32).reshape(len(frames), -1)
        out: list[str] = []
        for k in self._classify(x).tolist():
            self._advance(k, out)
        return out

    def reset(self) -> None:
        self.held = None
        self.miss_ms = 0

    def to_state(self) -> dict[str, Any]:
        """The complete detector state (settings included) as a JSON-able dict."""
        return {
            "v": _STATE_VERSION,
            "rate": self.rate,
            "min_level_db": self.min_level_db,
            "min_tone_ratio": self.min_tone_ratio,
            "min_dominance_db": self.min_dominance_db,
            "max_twist_db": self.max_twist_db,
            "harmonic_margin_db": self.harmonic_margin_db,
            "release_ms": self.release_ms,
            "held": self.held,
            "miss_ms": self.miss_ms,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "DtmfDetector":
        """Rebuild a detector from ``to_state()`` output; ValueError names a bad or missing field."""
        if not isinstance(state, dict):
            raise ValueError(f"state must be a dict, got {type(state).__name__}")
        if state.get("v") != _STATE_VERSION:
            raise ValueError(f"state.v must be {_STATE_VERSION}, got {state.get('v')!r}")
        try:
            det = cls(
                state["rate"],
                min_level_db=state["min_level_db"], min_tone_ratio=state["min_tone_ratio"],
                min_dominance_db=state["min_dominance_db"], max_twist_db=state["max_twist_db"],
                harmonic_margin_db=state["harmonic_margin_db"], release_ms=state["release_ms"],
            )
            held, miss_ms = state["held"], state["miss_ms"]
        except KeyError as exc:
            raise ValueError(f"state is missing field {exc.args[0]!r}") from None
        det.held = None if held is None else _key(held, "state.held")
        det.miss_ms = int(_check_number(miss_ms, "state.miss_ms", 0, 1e9))
        return det
