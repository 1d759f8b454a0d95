"""Turn detection: per-frame speech probabilities -> speech_start / speech_end.

Pure (no I/O, no clock): the caller passes each frame's probability and its
call-audio time (frame index x 20 ms), and gets back the events that frame
caused, stamped in the same call-audio time.

- ``speech_start`` after ``onset_ms`` of speech (default 80 ms: long enough
  to skip a click or a cough, short enough for barge-in). Speech is a run of
  frames at or above ``threshold`` ("voiced" for the energy VAD), plus at
  most ``lead_in_ms`` of the *lead-in* frames directly before that run:
  frames at or above ``LEAD_IN_FRACTION`` x ``threshold`` (0.2 by default;
  the energy VAD scores a loud frame that is not voiced 0.2). Why: many words open on an unvoiced consonant
  ("sorry", "hold on", "fine", "stop"); it is loud but not pitched, so the
  VAD cannot call it speech on its own, and without the lead-in the onset
  clock starts only at the first vowel, 40-100 ms later. Only directly
  before a voiced run, and only up to ``lead_in_ms``, so a hiss or a door
  followed by one pitched frame is not a turn: the run must still hold
  ``onset_ms - lead_in_ms`` of frames at or above ``threshold``.
  ``lead_in_ms=0`` gives the plain rule; it is capped at ``onset_ms`` less
  one frame. Its ``t_ms`` is where the counted
  speech began (lead-in included), so recognition can start there (the
  transcriber adds a pre-roll before it). ``bench/vad_bench.py`` prints the
  onset delay on speech and the false turn starts per minute on noise, music
  and babble for both rules.
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

#: A frame at or above this fraction of ``threshold`` counts as a lead-in (loud, not voiced).
LEAD_IN_FRACTION = 0.4
#: Hysteresis: once speaking, frames down to ``threshold - SPEAKING_MARGIN`` are speech.
SPEAKING_MARGIN = 0.15


@dataclass(frozen=True)
class TurnEvent:
    kind: Literal["speech_start", "speech_end"]
    t_ms: int


class TurnDetector:
    def __init__(self, onset_ms: int = 80, hangover_ms: int = 400, threshold: float = 0.5,
                 lead_in_ms: int = 60) -> None:
        if not 0 < onset_ms <= 2000:
            raise SpeechError(f"onset_ms must be in (0, 2000], got {onset_ms}")
        if not 0 < hangover_ms <= 10_000:
            raise SpeechError(f"hangover_ms must be in (0, 10000], got {hangover_ms}")
        if not 0.15 < threshold < 1:
            raise SpeechError(f"threshold must be in (0.15, 1), got {threshold}")
        if not 0 <= lead_in_ms <= 2000:
            raise SpeechError(f"lead_in_ms must be in [0, 2000], got {lead_in_ms}")
        self.onset_ms = int(onset_ms)
        self.hangover_ms = int(hangover_ms)
        self.threshold = float(threshold)
        # At least one frame of the run must be at ``threshold`` (voiced).
        self.lead_in_ms = min(int(lead_in_ms), max(0, self.onset_ms - FRAME_MS))
        self._lead_threshold = LEAD_IN_FRACTION * self.threshold
        self.speaking = False
        self._run_start: int | None = None   # start of the counted run (lead-in included)
        self._lead_ms = 0                    # lead-in frames just heard, in a row
        self._last_speech_end = 0            # end time of the newest speech frame
        self._quiet_ms = 0

    def feed(self, prob: float, t_ms: int) -> list[TurnEvent]:
        """One frame's probability; ``t_ms`` is the frame's start in call-audio time."""
        if not isinstance(prob, (int, float)) or prob != prob:
            raise SpeechError(f"prob must be a number in [0, 1], got {prob!r}")
        if not self.speaking:
            if prob >= self.threshold:
                if self._run_start is None:
                    self._run_start = t_ms - min(self._lead_ms, self.lead_in_ms)
                    self._lead_ms = 0
                self._last_speech_end = t_ms + FRAME_MS
                if t_ms + FRAME_MS - self._run_start >= self.onset_ms:
                    self.speaking = True
                    self._quiet_ms = 0
                    return [TurnEvent("speech_start", self._run_start)]
            else:
                self._run_start = None
                self._lead_ms = (self._lead_ms + FRAME_MS
                                 if prob >= self._lead_threshold else 0)
            return []
        if prob >= self.threshold - SPEAKING_MARGIN:
            self._quiet_ms = 0
            self._last_speech_end = t_ms + FRAME_MS
            return []
        self._quiet_ms += FRAME_MS
        if self._quiet_ms >= self.hangover_ms:
            self.speaking = False
            self._run_start = None
            self._lead_ms = 0
            self._quiet_ms = 0
            return [TurnEvent("speech_end", self._last_speech_end)]
        return []

    @property
    def in_turn(self) -> bool:
        """Speaking, or a run of speech frames under way that may become a turn."""
        return self.speaking or self._run_start is not None

    @property
    def in_hangover(self) -> bool:
        """Speaking, and the newest frames were quiet: the hangover is running."""
        return self.speaking and self._quiet_ms > 0

    def to_state(self) -> dict[str, Any]:
        return {"speaking": self.speaking, "run_start": self._run_start, "lead_ms": self._lead_ms,
                "last_speech_end": self._last_speech_end, "quiet_ms": self._quiet_ms}

    def load_state(self, state: dict[str, Any]) -> None:
        try:
            self.speaking = bool(state["speaking"])
            rs = state["run_start"]
            self._run_start = None if rs is None else int(rs)
            # Checkpoints written before the lead-in existed have no "lead_ms".
            self._lead_ms = int(state.get("lead_ms", 0))
            self._last_speech_end = int(state["last_speech_end"])
            self._quiet_ms = int(state["quiet_ms"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SpeechError(f"bad turn detector state: {exc!r}") from None
