"""The call's ears: 20 ms frames -> turn events (speech start / speech end).

``Ears`` joins the call's VAD (``speech.vad.make_vad``: a per-frame speech
probability) and ``speech.turns.TurnDetector`` (onset and hangover), and keeps
the call-audio clock (frames heard x 20 ms) and the frame's level (the DTMF
detector is skipped on frames too quiet to hold a tone). Its checkpoint is the
clock and the detector's few integers; the VAD's adaptive state (noise
floor, model memory) is re-learnt in a few frames after a takeover.

Per-frame cost matters (every frame of every call, in the worker's loop):
the level comes from the VAD when it measured it (``EnergyVoicingVad``),
so a frame is converted and summed once.
"""

from __future__ import annotations

from typing import Any

from piopiy_voice.audio.pcm import rms_dbfs
from piopiy_voice.speech.turns import TurnDetector
from piopiy_voice.speech.vad import make_vad


class Ears:
    """The call's VAD + ``speech.turns.TurnDetector``: 20 ms frames -> turn events."""

    def __init__(self, vad_name: str, rate: int, onset_ms: int, hangover_ms: int,
                 lead_in_ms: int = 60) -> None:
        self.vad = make_vad(vad_name, rate)
        self.turns = TurnDetector(onset_ms=onset_ms, hangover_ms=hangover_ms, lead_in_ms=lead_in_ms)
        self.t_ms = 0          # call-audio time: frames heard x 20 ms
        self.level_db = -120.0

    @property
    def speaking(self) -> bool:
        return self.turns.speaking

    def ahead(self, frames: list[bytes], batch: Any) -> None:
        """Let the VAD score ``frames`` in ``batch`` before ``process`` gets
        them (``speech.vad.VoicingBatch``; VADs that cannot batch ignore it)."""
        for pcm in frames:
            self.vad.ahead(pcm, batch)

    def process(self, pcm: bytes) -> str | None:
        events = self.turns.feed(self.vad.speech_prob(pcm), self.t_ms)
        # The energy VAD measured the frame's level already: reuse it (one pass per frame).
        level = getattr(self.vad, "level_db", None)
        self.level_db = rms_dbfs(pcm) if level is None else level
        self.t_ms += 20
        return events[-1].kind if events else None

    def reset(self) -> None:
        self.turns.load_state({"speaking": False, "run_start": None, "lead_ms": 0,
                               "last_speech_end": self.t_ms, "quiet_ms": 0})

    def to_state(self) -> dict[str, Any]:
        return {"t_ms": self.t_ms, "turns": self.turns.to_state()}

    def restore(self, data: dict[str, Any]) -> None:
        # The VAD's own adaptive state (noise floor, model memory) is re-learnt in a few frames.
        self.t_ms = int(data.get("t_ms", 0))
        if "turns" in data:
            self.turns.load_state(data["turns"])
