"""Agents and a gateway simulator for the worker tests (not a test module)."""

from __future__ import annotations

import time

from piopiy_voice import contracts as c
from piopiy_voice import keys
from piopiy_voice.workers.agent.base import Agent


class CountingAgent(Agent):
    """Speaks "<frames>:<seq>" on every 10th audio frame: any frame processed
    twice or skipped shows up in the published texts."""

    _FIELDS = ("frames",)

    def __init__(self, call, settings):
        super().__init__(call, settings)
        self.frames = 0

    def on_event(self, event, now):
        if isinstance(event, c.AudioFrame):
            self.frames += 1
            if self.frames % 10 == 0:
                return [self.command(c.Speak, text=f"{self.frames}:{event.seq}")]
        if isinstance(event, c.PlatformEvent) and event.event == "boom":
            raise RuntimeError("agent cannot handle boom")
        return []


class FakeGateway:
    """Publishes a call's entries the way the gateway does."""

    def __init__(self, r, call_id, gateway_id="gw1", rate=8000):
        self.r = r
        self.call_id = call_id
        self.gateway_id = gateway_id
        self.rate = rate
        self.seq = 0

    def _next(self):
        self.seq += 1
        return self.seq

    def start(self, **params):
        msg = c.CallStarted(call_id=self.call_id, seq=self._next(), gateway_id=self.gateway_id,
                            rate=self.rate, params=params)
        f = c.encode(msg)
        self.r.xadd(keys.call_stream(self.call_id), f)
        return self.r.xadd(keys.CALLS_STREAM, f).decode()

    def audio(self, pcm):
        self.r.xadd(keys.call_stream(self.call_id), c.audio_fields(self.call_id, self._next(), pcm))

    def entry(self, msg):
        msg.seq = self._next()
        self.r.xadd(keys.call_stream(self.call_id), c.encode(msg))

    def raw(self, fields):
        self.r.xadd(keys.call_stream(self.call_id), fields)

    def end(self, reason="platform_closed"):
        msg = c.CallEnded(call_id=self.call_id, seq=self._next(), reason=reason)
        f = c.encode(msg)
        self.r.xadd(keys.call_stream(self.call_id), f)
        self.r.xadd(keys.CALLS_STREAM, f)

    def commands(self):
        """Every command on the gateway's stream for this call, as delivered
        (a command re-delivered after a takeover appears twice)."""
        rows = self.r.xrange(keys.gateway_commands(self.gateway_id))
        return [c.decode(f) for _, f in rows if f[b"call_id"].decode() == self.call_id]

    def applied(self, delivered=None):
        """The commands a gateway applies (of ``delivered``, default
        ``commands()``): stream order, each ``command_id`` once
        (``gateway.dispatch`` drops one it has seen)."""
        seen, out = set(), []
        for cmd in self.commands() if delivered is None else delivered:
            if cmd.command_id not in seen:
                seen.add(cmd.command_id)
                out.append(cmd)
        return out


def wait_for(pred, timeout=10.0, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def think(seconds, tag):
    """A slow service (a model, a webhook): answers ``tag`` after ``seconds``."""
    import asyncio

    await asyncio.sleep(seconds)
    return tag


class ThinkingAgent(Agent):
    """Asks a slow work (``think_s`` call param, default 1 s) at the start when
    ``ask`` is set and on a ``platform.event`` "ask", speaks its answer; answers a
    marked audio frame (first bytes 0x7f 0x7f) at once with "heard:<seq>".
    A lost work is asked again (``attempts`` counts the asks)."""

    _FIELDS = ("attempts",)

    def __init__(self, call, settings):
        super().__init__(call, settings)
        self.attempts = 0

    def _ask(self):
        self.attempts += 1
        return self.work("think", think, float(self.call.params.get("think_s", "1")),
                         f"{self.call.call_id}#{self.attempts}", timeout_s=30)

    def on_event(self, event, now):
        if isinstance(event, c.CallStarted):
            return [self._ask()] if self.call.params.get("ask") else []
        if isinstance(event, c.AudioFrame):
            if event.pcm[:2] == b"\x7f\x7f":
                return [self.command(c.Speak, text=f"heard:{event.seq}")]
            return []
        if isinstance(event, c.PlatformEvent) and event.event == "ask":
            return [self._ask()]
        if isinstance(event, c.WorkDone):
            if event.ok:
                return [self.command(c.Speak, text=f"answer:{event.value}")]
            if event.error == "lost":
                return [self._ask()]
            return [self.command(c.Speak, text=f"failed:{event.error}")]
        return []
