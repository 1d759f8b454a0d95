"""Energy voice-activity detection with an adaptive noise floor and hysteresis.

A 20 ms frame is *speech-level* when its RMS level is at least
``threshold_db`` dBFS and at least ``snr_db`` above the running noise floor.
The floor follows quiet frames down quickly and creeps up at most
``floor_rise_db_per_s`` while louder frames continue, so steady background
noise (fan, line hiss) stops counting as speech after a while but the pauses
between syllables keep pulling it back down during real speech.

Speech starts after ``start_ms`` of consecutive speech-level frames and ends
after ``hangover_ms`` of consecutive frames below it. The detector's whole
state is a JSON-able dict (``to_state`` / ``from_state``) so a worker can
checkpoint it and another worker can resume the call.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

from .pcm import FRAME_MS, _check_number, check_rate, frame_bytes


VadEvent = Literal["speech_start", "speech_end"]

_STATE_VERSION = 1
_FS2 = 32768.0 * 32768.0
_MIN_DB = -120.0  # level reported for digital silence; keeps state JSON-finite
_FLOOR_FALL = 0.5  # fraction of the gap closed per quieter frame


class EnergyVad:
    """Frame-by-frame speech start/end detector for one call.

    ``process(frame)`` takes exactly one 20 ms frame and returns
    ``"speech_start"``, ``"speech_end"`` or None. ``speaking`` tells whether
    the caller is currently considered to be talking.
    """

    __slots__ = (
        "rate", "threshold_db", "start_ms", "hangover_ms", "snr_db", "floor_rise_db_per_s",
        "speaking", "run_ms", "quiet_ms", "noise_floor_db", "level_db",
        "_frame_bytes", "_thr_energy", "_rise_per_frame",
    )

    def __init__(
        self,
        rate: int,
        threshold_db: float = -35.0,
        start_ms: int = 60,
        hangover_ms: int = 300,
        *,
        snr_db: float = 9.0,
        floor_rise_db_per_s: float = 6.0,
    ):
        self.rate = check_rate(rate)
        self.threshold_db = _check_number(threshold_db, "threshold_db", -100.0, 0.0)
        self.start_ms = int(_check_number(start_ms, "start_ms", 0, 10_000))
        self.hangover_ms = int(_check_number(hangover_ms, "hangover_ms", 0, 60_000))
        self.snr_db = _check_number(snr_db, "snr_db", 0.0, 60.0)
        self.floor_rise_db_per_s = _check_number(floor_rise_db_per_s, "floor_rise_db_per_s", 0.0, 100.0)
        self._frame_bytes = frame_bytes(self.rate)
        n = self._frame_bytes // 2
        # Compare raw sum-of-squares against a precomputed energy so the common
        # (quiet) frame skips the logarithm.
        self._thr_energy = n * _FS2 * 10 ** (self.threshold_db / 10)
        self._rise_per_frame = self.floor_rise_db_per_s * FRAME_MS / 1000
        self.speaking = False
        self.run_ms = 0
        self.quiet_ms = 0
        self.noise_floor_db: float | None = None
        self.level_db = _MIN_DB

    def process(self, frame: bytes) -> VadEvent | None:
        """Feed one 20 ms frame; return the transition it causes, if any."""
        if len(frame) != self._frame_bytes:
            raise ValueError(
                f"frame must be one 20 ms frame of {self._frame_bytes} bytes at {self.rate} Hz, "
                f"got {len(frame)} bytes (use Reframer)"
            )
        x = np.frombuffer(frame, dtype="<i2").astype(np.float32)
        energy = float(x @ x)
        level = 10.0 * math.log10(energy / (x.size * _FS2)) if energy > 0 else _MIN_DB
        self.level_db = level

        floor = self.noise_floor_db
        if floor is None:
            # Start low enough that a call opening with speech is heard at once.
            floor = min(level, self.threshold_db - self.snr_db)
        loud = energy >= self._thr_energy and level >= floor + self.snr_db
        if level < floor:
            floor += (level - floor) * _FLOOR_FALL
        else:
            floor += min(level - floor, self._rise_per_frame)
        self.noise_floor_db = floor

        if not self.speaking:
            if loud:
                self.run_ms += FRAME_MS
                if self.run_ms >= self.start_ms:
                    self.speaking = True
                    self.quiet_ms = 0
                    return "speech_start"
            else:
                self.run_ms = 0
            return None
        if loud:
            self.quiet_ms = 0
            return None
        self.quiet_ms += FRAME_MS
        if self.quiet_ms >= self.hangover_ms:
            self.speaking = False
            self.run_ms = 0
            self.quiet_ms = 0
            return "speech_end"
        return None

    def reset(self) -> None:
        """Forget speech state and the noise floor (e.g. after a stream gap)."""
        self.speaking = False
        self.run_ms = 0
        self.quiet_ms = 0
        self.noise_floor_db = None
        self.level_db = _MIN_DB

    def to_state(self) -> dict[str, Any]:
        """The complete detector state as a JSON-able dict."""
        return {
            "v": _STATE_VERSION,
            "rate": self.rate,
            "threshold_db": self.threshold_db,
            "start_ms": self.start_ms,
            "hangover_ms": self.hangover_ms,
            "snr_db": self.snr_db,
            "floor_rise_db_per_s": self.floor_rise_db_per_s,
            "speaking": self.speaking,
            "run_ms": self.run_ms,
            "quiet_ms": self.quiet_ms,
            "noise_floor_db": self.noise_floor_db,
            "level_db": self.level_db,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "EnergyVad":
        """Rebuild a detector from ``to_state()`` output; ValueError names a bad or missing field."""
        if not isinstance(state, dict):
            raise ValueError(f"state must be a dict, got {type(state).__name__}")
        if state.get("v") != _STATE_VERSION:
            raise ValueError(f"state.v must be {_STATE_VERSION}, got {state.get('v')!r}")
        try:
            vad = cls(
                state["rate"], state["threshold_db"], state["start_ms"], state["hangover_ms"],
                snr_db=state["snr_db"], floor_rise_db_per_s=state["floor_rise_db_per_s"],
            )
            speaking, run_ms, quiet_ms = state["speaking"], state["run_ms"], state["quiet_ms"]
            floor, level = state["noise_floor_db"], state["level_db"]
        except KeyError as exc:
            raise ValueError(f"state is missing field {exc.args[0]!r}") from None
        if not isinstance(speaking, bool):
            raise ValueError(f"state.speaking must be a bool, got {speaking!r}")
        vad.speaking = speaking
        vad.run_ms = int(_check_number(run_ms, "state.run_ms", 0, 1e9))
        vad.quiet_ms = int(_check_number(quiet_ms, "state.quiet_ms", 0, 1e9))
        vad.noise_floor_db = None if floor is None else _check_number(floor, "state.noise_floor_db", -200, 10)
        vad.level_db = _check_number(level, "state.level_db", -200, 10)
        return vad
