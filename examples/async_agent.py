"""An agent that thinks without blocking anyone: slow work as a Work.

Run it (from this folder, so the module is found)::

    piopiy-voice worker --agent async_agent:LookupAgent

On each final transcript of the caller it asks a slow "service" (here a
coroutine that takes ``LOOKUP_S`` per sentence; in real life a model or an
HTTP API) as ``self.work(...)``. The worker's agent runtime runs it on its
asyncio loop; each sentence the async generator yields comes back as a
``WorkDone(final=False)`` event and is spoken at once with ``Speak``. Meanwhile
the worker's loop goes on handling this call's audio and every other call.
The caller pressing ``#`` cancels the answer. A takeover mid-reply re-asks:
after a worker crash the new owner delivers ``WorkDone(error="lost")`` and the
agent asks again (at most once per question).
"""

from __future__ import annotations

import asyncio

from piopiy_voice.contracts import PlatformEvent, Speak, Transcript, WorkDone
from piopiy_voice.workers.agent.base import Agent

LOOKUP_S = 0.3


async def lookup(question: str):
    """A slow service answering sentence by sentence."""
    for sentence in (f"You asked: {question}.", "Let me think.", "The answer is 42."):
        await asyncio.sleep(LOOKUP_S)
        yield sentence


class LookupAgent(Agent):
    _FIELDS = ("question", "answering", "reasked")

    def __init__(self, call, settings):
        super().__init__(call, settings)
        self.question = ""
        self.answering: str | None = None  # the work id of the answer in flight
        self.reasked = False

    def _ask(self):
        work = self.work("lookup", lookup, self.question, timeout_s=5.0)
        self.answering = work.id
        return [work]

    def on_event(self, event, now):
        if isinstance(event, Transcript) and event.final and event.text.strip():
            out = [self.cancel(self.answering)] if self.answering else []
            self.question, self.reasked = event.text.strip(), False
            return out + self._ask()
        if isinstance(event, PlatformEvent) and event.data.get("digit") == "#" and self.answering:
            work_id, self.answering = self.answering, None
            return [self.cancel(work_id), self.command(Speak, text="Okay, never mind.")]
        if isinstance(event, WorkDone) and event.work_id == self.answering:
            if event.ok and not event.final:
                return [self.command(Speak, text=event.value)]
            self.answering = None
            if event.error == "lost" and not self.reasked:
                self.reasked = True
                return self._ask()
            if not event.ok and event.error != "cancelled":
                return [self.command(Speak, text="Sorry, I could not find that out.")]
        return []
