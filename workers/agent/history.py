"""The conversation's history: what was said, and what the caller heard of it.

``history`` (bounded: ``AgentConfig.history_max``) holds user messages, tool
results, and assistant messages made of *parts*, one per utterance sent. A
part's ``heard_ms`` comes from the ``Playout`` reports (finished: all of it;
interrupted: ``played_ms``); at barge-in, parts not yet reported are
estimated from the send-time schedule (``_mark_interrupted``) and corrected
when the report comes. ``messages()`` renders what the caller actually heard:
each part truncated to ``round(words * heard_ms / total_ms)`` words
(``heard_text``), unplayed parts dropped, and an assistant message that was
cut ends with ``INTERRUPTED_MARK``. Sentences never sent (the cancelled rest
of a reply) never enter the history (``_drop_unsaid``), so the model never
believes it said what the caller did not hear.

The playout schedule lives here too: ``_schedule`` queues a part after what
is already queued (``queue_end``), and ``_on_playout`` follows the gateway's
reports (``speaking``, ``speaking_until``; the goodbye's end hangs up, a
pending pause starts).

``PlayoutHistory`` is a mixin of ``ConversationAgent``: its state
(``history``, ``speaking``, ``speaking_until``, ``queue_end``) is the agent's
and is checkpointed with it.
"""

from __future__ import annotations

from typing import Any

from piopiy_voice import contracts as c

INTERRUPTED_MARK = " [interrupted]"
#: The gateway's playout runs a little behind our send time.
PLAYOUT_SLACK_S = 0.3
#: ``Speak`` has no playout report: its length is estimated from the text.
SPEAK_S_PER_CHAR = 0.07


def heard_text(text: str, heard_ms: int | None, total_ms: int) -> str:
    """The words of ``text`` the caller heard: proportional to played time, by word."""
    if heard_ms is None or total_ms <= 0 or heard_ms >= total_ms:
        return text if heard_ms is None or heard_ms > 0 or total_ms <= 0 else ""
    words = text.split()
    return " ".join(words[:round(len(words) * max(0, heard_ms) / total_ms)])


class PlayoutHistory:
    """History and playout accounting (module docstring)."""

    history: list[dict[str, Any]]

    def _schedule(self, uid: str, text: str, total_ms: int, now: float) -> dict[str, Any]:
        start = max(now, self.queue_end)
        self.queue_end = start + total_ms / 1000
        self.speaking = uid
        self.speaking_until = self.queue_end + PLAYOUT_SLACK_S
        return {"uid": uid, "text": text, "total_ms": total_ms, "start": start, "heard_ms": None}

    def _reply_msg(self) -> dict[str, Any] | None:
        for msg in reversed(self.history[-4:]):
            if msg["role"] == "assistant" and msg.get("work") == self.reply_work:
                return msg
        return None

    def _reply_msg_any(self, work_id: str) -> dict[str, Any] | None:
        for msg in reversed(self.history[-4:]):
            if msg.get("work") == work_id:
                return msg
        return None

    def _drop_unsaid(self) -> dict[str, Any] | None:
        """Remove the last reply message if nothing of it was sent; else return it."""
        if self.history and self.history[-1]["role"] == "assistant" and "work" in self.history[-1]:
            msg = self.history[-1]
            if not msg["parts"] and not msg.get("tool_calls"):
                self.history.pop()
                return None
            return msg
        return None

    def _mark_interrupted(self, now: float) -> None:
        """Estimate what was heard of every unreported part (reports correct it later)."""
        for msg in self.history[-3:]:
            if msg["role"] != "assistant":
                continue
            cut = False
            for part in msg["parts"]:
                if part["heard_ms"] is None:
                    part["heard_ms"] = max(0, min(part["total_ms"], round((now - part["start"]) * 1000)))
                    cut = cut or part["heard_ms"] < part["total_ms"]
            if cut:
                msg["interrupted"] = True

    def _on_playout(self, ev: c.Playout, now: float) -> list[Any]:
        part, msg = self._find_part(ev.utterance_id)
        if part is not None:
            if ev.state == "started":
                part["start"] = now
            elif ev.state == "finished":
                part["heard_ms"] = part["total_ms"]
            else:
                part["heard_ms"] = min(ev.played_ms, part["total_ms"])
                if part["heard_ms"] < part["total_ms"]:
                    msg["interrupted"] = True
        if ev.utterance_id != self.speaking and ev.utterance_id != self.goodbye:
            return []
        if ev.state == "started":
            self.speaking_until = now + max(0, ev.total_ms - ev.played_ms) / 1000 + PLAYOUT_SLACK_S
            return []
        if ev.utterance_id == self.speaking:
            self.speaking = None
            self.queue_end = min(self.queue_end, now)
            self.last_activity = now
        if self.mode == "ending" and ev.utterance_id == self.goodbye:
            return self._hangup()
        if self.mode == "conversation" and self.pause_at is not None:
            return self._pause(now)
        return []

    def _find_part(self, uid: str) -> tuple[dict | None, dict | None]:
        for msg in reversed(self.history[-6:]):
            for part in msg.get("parts", ()):
                if part["uid"] == uid:
                    return part, msg
        return None, None

    def messages(self) -> list[dict[str, Any]]:
        """The history as chat messages: only what the caller heard (module docstring)."""
        out: list[dict[str, Any]] = []
        for msg in self.history:
            if msg["role"] != "assistant":
                out.append({k: v for k, v in msg.items()})
                continue
            said = [heard_text(p["text"], p["heard_ms"], p["total_ms"]) for p in msg["parts"]]
            text = " ".join(s for s in said if s)
            if text and msg.get("interrupted"):
                text += INTERRUPTED_MARK
            if not text and not msg.get("tool_calls"):
                continue
            m: dict[str, Any] = {"role": "assistant", "content": text}
            if msg.get("tool_calls"):
                m["tool_calls"] = msg["tool_calls"]
            out.append(m)
        return out

    def _remember(self, msg: dict[str, Any]) -> None:
        self.history.append(msg)
        limit = self.config.history_max
        if len(self.history) > limit:
            del self.history[:len(self.history) - limit]
            while self.history and self.history[0]["role"] == "tool":
                self.history.pop(0)  # never keep a tool result without its call
