"""Turn detection: per-frame speech probabilities -> speech_start / speech_end.

Pure (no I/O, no clock): the caller passes each frame's probability and its
call-audio time (frame index x 20 ms), and gets back the events that frame
caused, stamped in the same call-audio time.

- ``speech_start`` after ``onset_ms`` of frames at or above ``threshold``
  (default 80 ms: long enough to skip a click or a cough, short enough for
  barge-in). Its ``t_ms`` is where the run began, so recognition can start
  there (the transcriber adds a pre-roll before it).
- ``speech_end`` after ``hangover_ms`` of frames below ``threshold - 0.15``
  (hysteresis; default 400 ms: a mid-sentence pause of telephone speech is
  shorter, an end of turn usually longer). Its ``t_ms`` is the end of the last
  speech frame, not the end of the hangover.

The state is a few integers: ``to_state`` / ``from_state`` checkpoint it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from piopiy_voice.audio.pcm import FRAME_MS

from .errors import SpeechError


@dataclass(frozen=True)
class TurnEvent:
    kind: Literal["speech_start", "speech_end"]
    t_ms: int


class TurnDetector:
    def __init__(self, onset_ms: int = 80, hangover_ms: int = 400, threshold: float = 0.5) -> None:
        if not 0 < onset_ms <= 2000:
            raise SpeechError(f"onset_ms must be in (0, 2000], got {onset_ms}")
        if not 0 < hangover_ms <= 10_000:
            raise SpeechError(f"hangover_ms must be in (0, 10000], got {hangover_ms}")
        if not 0.15 < threshold < 1:
            raise SpeechError(f"threshold must be in (0.15, 1), got {threshold}")
        self.onset_ms = int(onset_ms)
        self.hangover_ms = int(hangover_ms)
        self.threshold = float(threshold)
        self.speaking = False
        self._run_start: int | None = None   # start of the current run of speech frames
        self._last_speech_end = 0            # end time of the newest speech frame
        self._quiet_ms = 0

    def feed(self, prob: float, t_ms: int) -> list[TurnEvent]:
        """One frame's probability; ``t_ms`` is the frame's start in call-audio time."""
        if not isinstance(prob, (int, float)) or prob != prob:
            raise SpeechError(f"prob must be a number in [0, 1], got {prob!r}")
        if not self.speaking:
            if prob >= self.threshold:
                if self._run_start is None:
                    self._run_start = t_ms
                self._last_speech_end = t_ms + FRAME_MS
                if t_ms + FRAME_MS - self._run_start >= self.onset_ms:
                    self.speaking = True
                    self._quiet_ms = 0
                    return [TurnEvent("speech_start", self._run_start)]
            else:
                self._run_start = None
            return []
        if prob >= self.threshold - 0.15:
            self._quiet_ms = 0
            self._last_speech_end = t_ms + FRAME_MS
            return []
        self._quiet_ms += FRAME_MS
        if self._quiet_ms >= self.hangover_ms:
            self.speaking = False
            self._run_start = None
            self._quiet_ms = 0
            return [TurnEvent("speech_end", self._last_speech_end)]
        return []

    @property
    def in_turn(self) -> bool:
        """Speaking, or a run of speech frames under way that may become a turn."""
        return self.speaking or self._run_start is not None

    def to_state(self) -> dict[str, Any]:
        return {"speaking": self.speaking, "run_start": self._run_start,
                "last_speech_end": self._last_speech_end, "quiet_ms": self._quiet_ms}

    def load_state(self, state: dict[str, Any]) -> None:
        try:
            self.speaking = bool(state["speaking"])
            rs = state["run_start"]
            self._run_start = None if rs is None else int(rs)
            self._last_speech_end = int(state["last_speech_end"])
            self._quiet_ms = int(state["quiet_ms"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SpeechError(f"bad turn detector state: {exc!r}") from None
