"""The simulated human agent that a ``bridge`` action reaches.

Life of the leg: ``ringing`` (for ``answer_after_ms`` of clock time; if that is
longer than the bridge's ``timeout`` the leg is never answered) -> ``talking``
(plays the scenario's ``human`` steps, hearing the caller) -> ``ended`` (after
its steps with ``after_steps="hangup"``, or when the call ends, or after the
bridge's ``duration``). It is stepped by the call's clock like the caller.

Where its voice goes is the platform's business (``piopiy_voice.sandbox.platform``): the
caller always hears it; the media stream carries it when ``listen_mode`` is
``caller`` (the platform's side of an outbound call) or ``both``.
"""

from __future__ import annotations

from typing import Callable

from piopiy_voice.audio import FRAME_MS

from .caller import Emit, ScriptPlayer
from .scenario import HumanScript


class SimulatedHuman:
    def __init__(self, script: HumanScript, rate: int, *, number: int | str, timeout_s: float,
                 duration_s: float, emit: Emit) -> None:
        self.number = number
        self.state = "ringing"
        self._script = script
        self._rate = rate
        self._emit = emit
        self._ring_left_ms = script.answer_after_ms
        self._timeout_ms = int(timeout_s * 1000)
        self._duration_left_ms = int(duration_s * 1000)
        self._player: ScriptPlayer | None = None
        self._emit("human_ringing", number=number, answer_after_ms=script.answer_after_ms)

    @property
    def ended(self) -> bool:
        return self.state in ("ended", "no_answer")

    def next_frame(self, heard_talking: bool | Callable[[], bool]) -> bytes | None:
        """The human's next 20 ms, or ``None`` while not talking."""
        if self.state == "ringing":
            if self._ring_left_ms > self._timeout_ms:
                self.state = "no_answer"
                self._emit("human_no_answer", number=self.number, timeout_ms=self._timeout_ms)
                return None
            self._ring_left_ms -= FRAME_MS
            if self._ring_left_ms > 0:
                return None
            self.state = "talking"
            self._emit("human_answered", number=self.number)
            self._player = ScriptPlayer(
                self._script.steps, self._rate,
                emit=lambda event, **d: self._emit(f"human_{event}", **d),
                after_steps=self._script.after_steps,
            )
        if self.state != "talking" or self._player is None:
            return None
        self._duration_left_ms -= FRAME_MS
        frame = self._player.next_frame(heard_talking)
        if frame is None or self._duration_left_ms <= 0:
            self.hang_up("bridge_duration" if frame is not None else "human_hangup")
            return None
        return frame

    def hang_up(self, reason: str) -> None:
        if self.state in ("ringing", "talking"):
            self.state = "ended"
            self._emit("human_left", number=self.number, reason=reason)
