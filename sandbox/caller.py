"""The scripted caller: turns scenario steps into 20 ms frames, one per clock tick.

The call's clock (``piopiy_voice.sandbox.platform``) asks :meth:`ScriptPlayer.next_frame`
for exactly one frame every 20 ms and tells it whether the other side was
heard talking in the previous frame; the player answers with the frame the
person says now, or ``None`` when the person hangs up. Nothing here sleeps or
touches a socket, so the same player drives the caller and the simulated human
(``piopiy_voice.sandbox.human``), and tests can step it by hand.

A ``say`` with ``text`` is real speech (espeak-ng, ``piopiy_voice.sandbox.voice``),
rendered when the player is built (the platform renders a call's sentences in
a thread while the phone rings, so here they are cache hits), never per tick.

``wait_for`` steps are causal: they look only at what was heard up to the
previous tick, as a person reacting to the line would.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from piopiy_voice.audio import FRAME_MS, dtmf_sequence, frame_bytes, read_wav, resample, silence, speech_like

from . import voice
from .scenario import DtmfStep, HangupStep, SayStep, SilenceStep, WaitForStep

Emit = Callable[..., None]


class ScriptPlayer:
    """Plays a list of scenario steps, one 20 ms frame at a time.

    ``emit(event, **detail)`` receives what the person does (say_start,
    say_end, dtmf, wait_done, wait_timeout, hangup, step_error).
    ``after_steps``: ``"hangup"`` ends with ``None`` after the last step,
    ``"stay"`` keeps returning silence.
    """

    def __init__(
        self,
        steps: Sequence[Any],
        rate: int,
        *,
        emit: Emit,
        after_steps: str = "hangup",
    ) -> None:
        if after_steps not in ("hangup", "stay"):
            raise ValueError(f"after_steps must be 'hangup' or 'stay', got {after_steps!r}")
        self.rate = rate
        self._frame = frame_bytes(rate)
        self._silence = silence(FRAME_MS, rate)
        self._steps = list(steps)
        self._index = -1
        self._emit = emit
        self._after = after_steps
        self._buffer = b""
        self._pos = 0
        self._end_event: tuple[str, dict] | None = None
        self._wait: WaitForStep | None = None
        self._waited_ms = 0
        self._quiet_ms = 0
        self.hung_up = False
        self.finished = False
        # Errors surface as step_error when their step comes.
        voice.prerender([(s.say.text, s.say.voice) for s in self._steps
                         if isinstance(s, SayStep) and s.say.text is not None], rate)
        self._advance()

    # -- steps -----------------------------------------------------------

    def _advance(self) -> None:
        """Start the next step that produces frames (or waits)."""
        while True:
            if self._end_event:
                name, detail = self._end_event
                self._end_event = None
                self._emit(name, **detail)
            self._index += 1
            if self._index >= len(self._steps):
                self.finished = True
                if self._after == "hangup":
                    self._hang_up("steps_done")
                return
            step = self._steps[self._index]
            try:
                if self._start(step):
                    return
            except Exception as exc:  # noqa: BLE001 - a bad step must not end the call
                self._emit("step_error", step=self._index, error=str(exc))

    def _start(self, step: Any) -> bool:
        if isinstance(step, SayStep):
            spec = step.say
            detail = {}
            if spec.text is not None:
                pcm = voice.render(spec.text, spec.voice, self.rate)
                source = "text"
                detail = {"text": spec.text, "voice": spec.voice}
            elif spec.wav:
                pcm, src_rate = read_wav(spec.wav)
                if src_rate != self.rate:
                    pcm = resample(pcm, src_rate, self.rate)
                source = spec.wav
            else:
                pcm = speech_like(spec.ms, rate=self.rate, seed=spec.seed, level_db=spec.level_db)
                source = "speech_like"
            self._load(pcm)
            ms = self._buffer_ms()
            self._emit("say_start", step=self._index, ms=ms, source=source, **detail)
            self._end_event = ("say_end", {"step": self._index, "ms": ms})
            return True
        if isinstance(step, SilenceStep):
            self._load(silence(step.silence, self.rate))
            return True
        if isinstance(step, DtmfStep):
            self._load(dtmf_sequence(step.dtmf, tone_ms=step.tone_ms, gap_ms=step.gap_ms, rate=self.rate))
            self._emit("dtmf", step=self._index, keys=step.dtmf, tone_ms=step.tone_ms)
            return True
        if isinstance(step, WaitForStep):
            self._wait = step
            self._waited_ms = 0
            self._quiet_ms = 0
            self._emit("wait_start", step=self._index, wait_for=step.wait_for, timeout_ms=step.timeout_ms)
            return True
        if isinstance(step, HangupStep):
            self._hang_up("scenario")
            return True
        raise ValueError(f"unknown step type {type(step).__name__}")

    def _load(self, pcm: bytes) -> None:
        # Pad to whole frames so one step never bleeds into the next one's frame.
        rem = len(pcm) % self._frame
        if rem:
            pcm += b"\x00" * (self._frame - rem)
        self._buffer = pcm
        self._pos = 0

    def _buffer_ms(self) -> int:
        return len(self._buffer) * 1000 // (2 * self.rate)

    def _hang_up(self, why: str) -> None:
        if not self.hung_up:
            self.hung_up = True
            self._emit("hangup", reason=why)

    # -- the clock's entry point -------------------------------------------

    def next_frame(self, heard_talking: bool | Callable[[], bool]) -> bytes | None:
        """The next 20 ms this person says; ``None`` once they have hung up.

        ``heard_talking`` may be a callable: it is then called only while a
        ``wait_for`` step listens, so the clock pays for a level check only then.
        """
        if self.hung_up:
            return None
        if self._wait is not None:
            wait = self._wait
            if callable(heard_talking):
                heard_talking = heard_talking()
            self._waited_ms += FRAME_MS
            self._quiet_ms = 0 if heard_talking else self._quiet_ms + FRAME_MS
            met = heard_talking if wait.wait_for == "agent_audio" else self._quiet_ms >= wait.min_silence_ms
            if met or self._waited_ms >= wait.timeout_ms:
                self._wait = None
                if met:
                    self._emit("wait_done", step=self._index, wait_for=wait.wait_for, waited_ms=self._waited_ms)
                else:
                    self._emit("wait_timeout", step=self._index, wait_for=wait.wait_for, waited_ms=self._waited_ms)
                    if wait.on_timeout == "hangup":
                        self._hang_up("wait_timeout")
                        return None
                self._advance()
                if self.hung_up:
                    return None
            return self._silence
        if self._pos < len(self._buffer):
            frame = self._buffer[self._pos:self._pos + self._frame]
            self._pos += self._frame
            if self._pos >= len(self._buffer):
                self._buffer = b""
                self._pos = 0
                self._advance()
            return frame
        if self.finished:
            return None if self.hung_up else self._silence
        # A step that produced no audio (e.g. an error): move on next tick.
        self._advance()
        return None if self.hung_up else self._silence
