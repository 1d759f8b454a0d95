"""Replies: the agent's answer in flight, sentence by sentence, and its failures.

A brain's ``start_reply`` returns ``begin_reply(work)``: the work's items come
back as ``WorkDone`` events; each ``{"say": text}`` item with its PCM is sent
at once (``say_part``: a ``PlayAudio`` with its own utterance id and its
``text``, or a ``Speak`` with the ``platform`` synthesizer) and added to the
history; other items go to ``on_reply_item`` (the LLM brain's tool calls).

Failures: a reply work that fails (``ok`` False: timeout, exception; or an
item ``{"failed": kind}``: model deadline, HTTP error, cut stream, malformed
chunk, unknown tool, bad arguments, synthesis error, empty reply) is counted
(``failures``, by kind in ``failure_kinds``) and answered with the shipped
"trouble" apology; ``AgentConfig.max_failures`` failures in a row hand the
call to a human. A watchdog (``reply_deadline``, see ``controls``) covers a
result that never comes. After a takeover the runtime reports the reply work
``lost``: if nothing of it had been sent the agent asks again (once per
turn); if some was sent, the reply ends there.

``Replies`` is a mixin of ``ConversationAgent``; its state (``reply_work``,
``reply_deadline``, ``reasks``, ``failures``, ``reply_failures``,
``failure_kinds``, ``utt_n``) is the agent's and is checkpointed with it.
"""

from __future__ import annotations

import logging
from typing import Any

from piopiy_voice import contracts as c

from .history import SPEAK_S_PER_CHAR
from .voice import PROMPT_TEXTS, prompt

log = logging.getLogger("piopiy_voice.workers.agent.conversation")


class Replies:
    """The reply in flight (module docstring)."""

    def begin_reply(self, work: Any, now: float) -> list[Any]:
        """Track ``work`` as the reply in flight (its items come back as WorkDone)."""
        self.reply_work = work.id
        self.reply_deadline = now + work.timeout_s + 2.0
        self.history.append({"role": "assistant", "parts": [], "work": work.id})
        return [work]

    def _on_work_done(self, ev: c.WorkDone, now: float) -> list[Any]:
        if ev.work_id != self.reply_work or self.reply_work is None:
            return []  # cancelled, superseded or someone else's: already dealt with
        if not ev.ok:
            self.reply_work = self.reply_deadline = None
            if ev.error == "cancelled":
                return []
            if ev.error == "lost":
                return self._reask(now)
            return self.reply_failed("work", ev.error, now)
        value = ev.value if isinstance(ev.value, dict) else {}
        if not ev.final:
            if "say" in value:
                return self.say_part(str(value["say"]), ev.pcm, now)
            if "failed" in value:
                self.reply_work = self.reply_deadline = None
                return self.reply_failed(str(value["failed"]), str(value.get("error", "")), now)
            return self.on_reply_item(value, now)
        self.reply_work = self.reply_deadline = None
        msg = self._reply_msg_any(ev.work_id)
        if msg is not None and not msg["parts"] and not msg.get("tool_calls"):
            return self.reply_failed("empty", "the reply said nothing", now)
        self.reply_failures = 0
        return []

    def on_reply_item(self, value: dict[str, Any], now: float) -> list[Any]:
        """A reply item other than ``say``/``failed`` (the LLM brain's tool calls)."""
        return []

    def say_part(self, text: str, pcm: bytes, now: float) -> list[Any]:
        """Send one synthesized sentence of the reply and add it to what we said."""
        if self.mode != "conversation":
            return []
        if len(pcm) % 2 or len(pcm) > 2 * self.call.rate * 120:  # not one sentence of audio
            return self._cancel_reply() + self.reply_failed(
                "tts", f"synthesizer returned {len(pcm)} bytes for {len(text)} characters", now)
        self.utt_n += 1
        uid = f"{self.call.call_id}:say:{self.utt_n}"
        if pcm:
            cmd = self.command(c.PlayAudio, utterance_id=uid, pcm=pcm, rate=self.call.rate, text=text)
            total_ms = round(len(pcm) * 1000 / (2 * self.call.rate))
        else:  # the platform synthesizer: the platform talks
            cmd = self.command(c.Speak, text=text)
            total_ms = round(SPEAK_S_PER_CHAR * len(text) * 1000)
        msg = self._reply_msg()
        if msg is not None:
            msg["parts"].append(self._schedule(uid, text, total_ms, now))
        return [cmd]

    def say_prompt(self, name: str, now: float) -> list[Any]:
        """Play a shipped prompt; it is part of the story too (an assistant message)."""
        pcm = prompt(name, self.call.rate)
        self.utt_n += 1
        uid = f"{self.call.call_id}:{name}:{self.utt_n}"
        total_ms = round(len(pcm) * 1000 / (2 * self.call.rate))
        part = self._schedule(uid, PROMPT_TEXTS[name], total_ms, now)
        self._remember({"role": "assistant", "parts": [part]})
        return [self.command(c.PlayAudio, utterance_id=uid, pcm=pcm, rate=self.call.rate,
                             text=PROMPT_TEXTS[name])]

    _say = say_prompt  # the name subclasses written for the first DefaultAgent use

    def reply_failed(self, kind: str, error: str, now: float) -> list[Any]:
        """Count the failure; apologise, or hand off after too many in a row."""
        self.failures += 1
        self.reply_failures += 1
        self.failure_kinds[kind] = self.failure_kinds.get(kind, 0) + 1
        log.warning("call %s: reply failed (%s: %s), %d in a row", self.call.call_id, kind,
                    error[:200], self.reply_failures)
        self._drop_unsaid()
        if self.mode != "conversation":
            return []
        if self.reply_failures >= self.config.max_failures:
            return self.handoff(now, cut=False)
        return self.say_prompt("trouble", now)

    def _reask(self, now: float) -> list[Any]:
        msg = self._drop_unsaid()
        if msg is not None or self.mode != "conversation":
            return []  # some of it was sent: the reply ends there rather than repeat itself
        if self.reasks >= 1 or not self.history or self.history[-1]["role"] != "user":
            return self.reply_failed("lost", "reply lost twice in a takeover", now)
        self.reasks += 1
        return self.start_reply(now)

    def _cancel_reply(self) -> list[Any]:
        if self.reply_work is None:
            return []
        work, self.reply_work, self.reply_deadline = self.reply_work, None, None
        return [self.cancel(work)]
