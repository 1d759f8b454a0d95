"""Call controls and timers: hand-off, pause/resume, goodbye and hang-up, silence.

- ``handoff``: hold notice, music on hold, ``Transfer`` to a human; then the
  agent only monitors (listens, never speaks). ``transfer_failed``: the gateway
  rejected the transfer, so no human is coming: the music is cut, the caller
  hears an apology and the conversation (with its timers: silence, the
  call's length limit) goes on with the agent.
- ``_pause`` / ``_resumed``: ``Pause`` so sensitive input never reaches us,
  ``Resume`` after ``Settings.pause_resume_after_s`` or when someone else
  resumes; ``pause_after_speaking`` waits for what is queued to play.
- ``_say_goodbye`` / ``hang_up_after_speaking``: goodbye, then ``Hangup``
  once it has played (its ``Playout`` report, or ``hangup_at``).
- ``_timers`` (on ``Tick``, and on a frame once ``next_wakeup`` is due):
  resume, hang-up, the call's length limit, a pending pause, the reply
  watchdog, the wait for a turn's final transcript, and silence (reprompt,
  then goodbye). ``next_wakeup`` is the earliest of these deadlines.

``CallControls`` is a mixin of ``ConversationAgent``; its state (``mode``,
``resume_at``, ``pause_at``, ``hangup_at``, ``goodbye``, ``last_activity``,
``reprompts``, ``started_at``) is the agent's and is checkpointed with it.
"""

from __future__ import annotations

from typing import Any

from piopiy_voice import contracts as c

HANGUP_AFTER_GOODBYE_S = 0.5


class CallControls:
    """Controls and timers (module docstring)."""

    def handoff(self, now: float, cut: bool) -> list[Any]:
        """Hold notice, music, bridge to a human; then only monitor."""
        s = self.settings
        out = (self._stop_speaking(now) if cut else []) + self._cancel_reply()
        out += self.say_prompt("hold", now)
        out.append(self.command(c.PlayMusic, file=self.call.params.get("hold_music", s.hold_music)))
        caller_id = self.call.params.get("caller_id") or s.piopiy_caller_id or ""
        out.append(self.command(c.Transfer, to=[s.human_agent_number], caller_id=caller_id))
        self.mode = "monitoring"
        self.speaking = None
        return out

    def transfer_failed(self, reason: str, now: float) -> list[Any]:
        """The bridge was refused: back to the conversation, never dead air."""
        self.mode = "conversation"
        # Counted by kind only: ``failures`` counts failed replies in a row,
        # which hand the call off, and a hand-off is what just failed.
        self.failure_kinds["transfer_rejected"] = self.failure_kinds.get("transfer_rejected", 0) + 1
        self.last_activity = now
        # Interrupt cuts the hold music the platform is playing.
        return [self.command(c.Interrupt)] + self.say_prompt("trouble", now)

    def _pause(self, now: float) -> list[Any]:
        cancel = self._cancel_reply()
        self.mode = "paused"
        self.pause_at = None
        self.resume_at = now + self.settings.pause_resume_after_s
        return cancel + [self.command(c.Pause)]

    def pause_after_speaking(self, now: float) -> list[Any]:
        """Pause once what is queued has played (the model's "type your card now")."""
        if self._is_speaking(now):
            self.pause_at = self.speaking_until
            return []
        return self._pause(now)

    def hang_up_after_speaking(self, now: float) -> list[Any]:
        """End the call after what is queued has played (or say goodbye first)."""
        if not self._is_speaking(now):
            return self._say_goodbye(now)
        self.goodbye = self.speaking
        self.mode = "ending"
        self.hangup_at = self.speaking_until + HANGUP_AFTER_GOODBYE_S
        return []

    def _timers(self, now: float) -> list[Any]:
        s = self.settings
        if self.mode == "paused" and self.resume_at is not None and now >= self.resume_at:
            self._resumed(now)
            return [self.command(c.Resume)]
        if self.mode == "ending" and self.hangup_at is not None and now >= self.hangup_at:
            return self._hangup()
        if self.mode != "conversation":
            return []
        if now - self.started_at >= s.max_call_s:
            return self._stop_speaking(now) + self._cancel_reply() + self._say_goodbye(now)
        if self.pause_at is not None and now >= self.pause_at:
            return self._pause(now)
        if self.reply_work is not None and self.reply_deadline is not None and now >= self.reply_deadline:
            work, self.reply_work, self.reply_deadline = self.reply_work, None, None
            return [self.cancel(work)] + self.reply_failed("deadline", "no result from the reply work", now)
        if self.turn_state == "awaiting" and self.turn_deadline is not None and now >= self.turn_deadline:
            return self._end_turn(now)
        if (self._is_speaking(now) or self.ears.speaking or self.reply_work is not None
                or self.turn_state != "idle"):
            return []
        if now - max(self.last_activity, self.speaking_until) >= s.silence_timeout_s:
            self.reprompts += 1
            self.last_activity = now  # one decision per timeout, whoever makes it
            return self.decide("silence", {"count": self.reprompts}, now,
                               lambda: self.say_prompt("reprompt", now) if self.reprompts < 2
                               else self._say_goodbye(now))
        return []

    def next_wakeup(self) -> float | None:
        # Asked for every call on every loop turn (the runner's XREAD block and
        # its timers), so no list and no generator. Not cached: a subclass may
        # change a deadline on a path of its own (``WebhookAgent``'s replies).
        mode = self.mode
        if mode != "conversation":
            if mode == "paused":
                return self.resume_at
            return self.hangup_at if mode == "ending" else None
        s = self.settings
        su = self.speaking_until
        t = (self.last_activity if self.last_activity > su else su) + s.silence_timeout_s
        end = self.started_at + s.max_call_s
        if end < t:
            t = end
        for x in (self.pause_at, self.reply_deadline, self.turn_deadline):
            if x is not None and x < t:
                t = x
        return t

    def _is_speaking(self, now: float) -> bool:
        return self.speaking is not None and now < self.speaking_until

    def _say_goodbye(self, now: float) -> list[Any]:
        out = self.say_prompt("goodbye", now)
        self.goodbye = self.speaking
        self.mode = "ending"
        self.hangup_at = self.speaking_until + HANGUP_AFTER_GOODBYE_S
        return out

    def _stop_speaking(self, now: float) -> list[Any]:
        if self._is_speaking(now):
            self._mark_interrupted(now)
            self.speaking = None
            self.queue_end = now
            return [self.command(c.Interrupt)]
        return []

    def _hangup(self) -> list[Any]:
        self.mode = "ended"
        self.hangup_at = None
        return [self.command(c.Hangup)]

    def _resumed(self, now: float) -> None:
        self.mode = "conversation"
        self.resume_at = None
        self.last_activity = now
        self.turn_had_key = False  # the key's own VAD segment was cut by the pause
        self.turn_state, self.turn_final, self.caller_text = "idle", False, ""
        self.ears.reset()
