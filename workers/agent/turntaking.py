"""Turn-taking: the caller's frames, keys and transcripts -> turns and barge-ins.

* Every ``AudioFrame`` goes through the call's ``Ears`` (VAD + onset/hangover
  detector: ``PV_VAD``, per call param ``vad``, ``PV_TURN_ONSET_MS``,
  ``PV_TURN_HANGOVER_MS``). Speech onset while the agent is talking is a
  barge-in: ``Interrupt`` at once (same frame) and the reply work is
  cancelled. A DTMF tone is loud too: speech starting within
  ``TONE_GUARD_S`` of a key is the tone, never a barge-in, and a turn that
  held a key is not answered.
* End of turn = the VAD's silence hangover AND the segment's final
  ``Transcript`` (written by the transcriber role). Whichever comes second
  ends the turn. After the hangover the agent waits at most
  ``PV_TRANSCRIPT_WAIT_MS`` (1200) for the final; none (or an empty one)
  means unintelligible: the shipped "sorry, I didn't catch that" prompt. A
  final that arrives later still with words is answered then.
  (``WAIT_FOR_WORDS`` False: the turn ends at the hangover, with whatever
  finals came by then.)
* A key goes to ``decide("dtmf")``; by default the hand-off key hands off and
  the pause key pauses (``_default_key``).

Per frame the work is the VAD, the DTMF detector only on frames loud enough
to hold a tone (or while a key is held), and the timers only once one is due.

``TurnTaking`` is a mixin of ``ConversationAgent``; its state
(``turn_state``, ``turn_final``, ``turn_deadline``, ``caller_text``,
``key_at``, ``turn_had_key``, ``keys``, ``caller_speech_ms``, ``turn_started``,
``turns``, ``unintelligible``) is the agent's and is checkpointed with it.
"""

from __future__ import annotations

from typing import Any

from piopiy_voice import contracts as c

#: VAD "speech" starting this soon after a DTMF key is the tone itself.
TONE_GUARD_S = 0.2
DTMF_MARGIN_DB = 6.0
MAX_USER_CHARS = 1000


class TurnTaking:
    """The caller's side of the conversation (module docstring)."""

    def hear_ahead(self, frames: list[bytes], batch: Any) -> None:
        """``Agent.hear_ahead``: the frames ``_on_audio`` will hear go to the VAD's batch."""
        if self.mode != "paused":
            self.ears.ahead(frames, batch)   # frames of the wrong size: the VAD skips them

    def _on_audio(self, pcm: bytes, now: float) -> list[Any]:
        if len(pcm) != self.frame_len or self.mode == "paused":
            return []  # frames still in flight after Pause are not ours to hear
        out: list[Any] = []
        ev = self.ears.process(pcm)
        # A frame quieter than the weakest DTMF tone cannot hold a key, and with no
        # key held such a frame would not change the detector's state: skip it.
        if self.dtmf.held is not None or self.ears.level_db >= self.dtmf.min_level_db - DTMF_MARGIN_DB:
            for key in self.dtmf.process(pcm):
                out += self._on_key(key, now)
        if self.ears.speaking:
            self.caller_speech_ms += 20
        if ev == "speech_start":
            self.turn_started = self.last_activity = now
            if now - self.key_at > TONE_GUARD_S:
                # Not the tone's own segment: a key pressed in silence before
                # it must not cost this turn its answer.
                self.turn_had_key = False
                if self.mode == "conversation":
                    out += self._barge_in(now)
                self.turn_state, self.turn_final = "talking", False
        elif ev == "speech_end":
            self.last_activity = now
            had_key, self.turn_had_key = self.turn_had_key, False
            if self.mode == "conversation" and not had_key and self.turn_state == "talking":
                if self.turn_final or not self.WAIT_FOR_WORDS:
                    out += self._end_turn(now)
                else:
                    self.turn_state = "awaiting"
                    self.turn_deadline = now + self.config.transcript_wait_ms / 1000
            elif self.turn_state == "talking":
                self.turn_state = "idle"
        wake = self.next_wakeup()  # _timers does nothing before it: skip the call
        if wake is not None and now >= wake:
            out += self._timers(now)
        return out

    def _on_transcript(self, ev: c.Transcript, now: float) -> list[Any]:
        if not ev.final or ev.channel != "caller" or self.mode != "conversation":
            return []
        text = " ".join(ev.text.split())[:MAX_USER_CHARS]
        if text:
            self.caller_text = f"{self.caller_text} {text}".strip()[:MAX_USER_CHARS]
        if self.turn_state == "talking":
            self.turn_final = True
            return []
        if self.turn_state == "awaiting" or (self.turn_state == "idle" and text):
            return self._end_turn(now)  # idle + words: a final later than our wait
        return []

    def _end_turn(self, now: float) -> list[Any]:
        text, self.caller_text = self.caller_text, ""
        self.turn_state, self.turn_final, self.turn_deadline = "idle", False, None
        self.turns += 1
        self.reprompts = 0
        self.last_activity = now
        info = {"turn": self.turns, "text": text, "speech_ms": round((now - self.turn_started) * 1000),
                "caller_speech_ms_total": self.caller_speech_ms}
        return self.decide("caller_turn", info, now, lambda: self.respond_to(text, now))

    def respond_to(self, text: str, now: float) -> list[Any]:
        """The default answer to a caller's turn: unintelligible -> "sorry", else the brain."""
        if not text:
            self.unintelligible += 1
            return self.say_prompt("sorry", now)
        last = self.history[-1] if self.history else None
        if last and last["role"] == "user":  # nothing answered since: one caller turn
            last["content"] = f"{last['content']} {text}"[:MAX_USER_CHARS]
        else:
            self._remember({"role": "user", "content": text})
        self.reasks = 0
        return self.start_reply(now)

    def _on_key(self, key: str, now: float) -> list[Any]:
        self.keys.append(key)
        self.keys = self.keys[-50:]
        self.key_at = now
        self.turn_had_key = True
        if self.mode != "conversation":
            return []
        return self.decide("dtmf", {"key": key}, now, lambda: self._default_key(key, now))

    def _default_key(self, key: str, now: float) -> list[Any]:
        if key == self.settings.handoff_key:
            return self.handoff(now, cut=True)
        if key == self.settings.pause_key:
            return self._stop_speaking(now) + self._pause(now)
        return []

    def _barge_in(self, now: float) -> list[Any]:
        cancel = self._cancel_reply()
        out = self._stop_speaking(now) + cancel
        if cancel:
            self._drop_unsaid()
        self.pause_at = None
        return out
