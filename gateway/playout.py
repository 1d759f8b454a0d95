"""One playout tick per gateway: every speaking call's audio released by one timer.

Theory of operation
-------------------
Each call's pacing is decided by its ``pacing.Pacer`` (through
``CallSession.pump``): given the time, it releases the 40 ms chunks due by
then plus the lead and says when it next has something to do. That rule is
the only pacing rule; this module only decides *when to ask*, and asks for all
speaking calls at once.

``PlayoutTick`` owns the set of speaking calls and the time each is next due
(``Timetable``: a heap with lazy deletion, so starting, re-timing and cutting
a call are O(log n) and a wake pops exactly the calls due). One event-loop
timer is armed for the earliest due time plus ``slack``; when it fires, every
call due by then is served in that one wake: its ``play_due(now)`` pumps the
session, writes the released messages to its socket synchronously (no task,
no await, no timeout context per chunk: ``DirectConnection.write_texts``) and
publishes the playout reports, then returns its next due time. Where the old
shell woke one task per chunk per call (25 wake-ups a second per speaking
call), the tick wakes at most ``1 / slack`` times a second for all of them.

Slack (coalescing). A call is never served *early*: the Pacer is asked with
the real time, so the platform never holds more than lead + one chunk (the
Pacer's bound). It may be served up to ``slack`` *late*: the timer waits for
the calls due shortly after the earliest one. Lateness eats into the lead the
platform holds (lead .. lead + chunk of audio at each release), so the slack is
a quarter of the lead, at most 20 ms: with the default 100 ms lead the
platform still holds >= 80 ms when a late chunk arrives, and at most 50 wakes
a second serve any number of calls (each 40 ms chunk is due once per 40 ms,
so a wake serves about half of the speaking calls). A lead of 0 gives a slack
of 0: each due time its own wake, as before.

Starting, cutting, holding. ``wake(call)`` (new audio queued) serves the call
at once (its first chunks go out without waiting for the tick) and keeps it on
the timetable; ``cut(call)`` (interrupt, hangup, stop, socket replaced,
suspended, ended) takes it off: nothing is written for it after the cut, and
the dispatcher's ``break`` follows the last chunk written (both are written on
the one event loop, in program order). A call's ``play_due`` returns None when
it has nothing left (or no open socket): it leaves the timetable until woken
again. A call whose socket's write buffer is above its high-water mark (the
platform stopped reading) is *held*: not pumped, so nothing more is released
and buffered for it, and asked again one chunk later (see
``LiveCall.play_due``). An exception while serving one call is logged and
counted (``playout_errors``); that call leaves the timetable, the others are
served in the same wake.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from typing import Any, Hashable, Protocol

from .metrics import Metrics

log = logging.getLogger("gateway")

#: The most a due call waits for its wake (see "Slack" above).
MAX_SLACK_S = 0.020


def slack_for(lead_ms: int) -> float:
    """How late (s) a due call may be served so that one wake serves many:
    a quarter of the lead the platform holds, at most ``MAX_SLACK_S``."""
    return min(MAX_SLACK_S, max(0, lead_ms) / 4000.0)


class Speaking(Protocol):
    """What the tick asks of a call (``registry.LiveCall``)."""

    def play_due(self, now: float) -> float | None: ...


class Timetable:
    """Keys and the time each is next due; pops the due ones in time order."""

    # Stale heap entries (re-timed or discarded keys) are skipped when they
    # surface; the heap is rebuilt when they outnumber the live ones.
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Hashable]] = []
        #: key -> the number of its one current heap entry.
        self._entry: dict[Hashable, int] = {}
        self._numbers = itertools.count()

    def __len__(self) -> int:
        return len(self._entry)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entry

    def set(self, key: Hashable, due: float) -> None:
        """``key`` is next due at ``due`` (replacing any earlier time)."""
        n = next(self._numbers)
        self._entry[key] = n
        heapq.heappush(self._heap, (due, n, key))
        if len(self._heap) > 2 * len(self._entry) + 64:
            self._compact()

    def discard(self, key: Hashable) -> None:
        self._entry.pop(key, None)

    def next_due(self) -> float | None:
        heap, entry = self._heap, self._entry
        while heap:
            due, n, key = heap[0]
            if entry.get(key) == n:
                return due
            heapq.heappop(heap)
        return None

    def pop_due(self, now: float) -> list[Hashable]:
        """The keys due by ``now``, earliest first, taken off the table."""
        heap, entry, due_keys = self._heap, self._entry, []
        while heap and heap[0][0] <= now:
            _, n, key = heapq.heappop(heap)
            if entry.get(key) == n:
                del entry[key]
                due_keys.append(key)
        return due_keys

    def _compact(self) -> None:
        entry = self._entry
        self._heap = [item for item in self._heap if entry.get(item[2]) == item[1]]
        heapq.heapify(self._heap)


class PlayoutTick:
    """The gateway's one playout timer over all speaking calls.

    ``loop`` (tests: a fake with ``time()`` and ``call_at()``) defaults to the
    running loop at first use."""

    def __init__(self, *, lead_ms: int, metrics: Metrics, loop: Any = None) -> None:
        self.slack = slack_for(lead_ms)
        self._metrics = metrics
        self._loop = loop
        self._table = Timetable()
        self._timer: Any = None
        self._timer_at = float("inf")

    def __len__(self) -> int:
        """Calls with audio queued or playing (on the timetable)."""
        return len(self._table)

    def __contains__(self, call: Speaking) -> bool:
        return call in self._table

    @property
    def timer_at(self) -> float | None:
        """When the timer fires next (None: not armed)."""
        return self._timer_at if self._timer is not None else None

    def wake(self, call: Speaking) -> None:
        """New audio was queued for ``call``: serve it now and keep it ticking."""
        loop = self._loop or self._bind()
        self._serve(call, loop.time())
        self._arm()

    def cut(self, call: Speaking) -> None:
        """``call``'s queue was dropped (or its socket is gone): no more playout."""
        self._table.discard(call)

    def close(self) -> None:
        """Stop the timer and forget every call (the gateway is stopping)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, float("inf")
        self._table = Timetable()

    # ------------------------------------------------------------- internals
    def _bind(self) -> Any:
        self._loop = asyncio.get_running_loop()
        return self._loop

    def _serve(self, call: Speaking, now: float) -> None:
        try:
            due = call.play_due(now)
        except Exception:  # one call's bug must not stop the others' audio
            self._metrics.c["playout_errors"] += 1
            log.exception("call %s: playout failed; its playout stops",
                          getattr(call, "call_id", call))
            due = None
        if due is None:
            self._table.discard(call)
        else:
            self._table.set(call, due)

    def _arm(self) -> None:
        """(Re)arm the timer for the earliest due call, plus the slack."""
        first = self._table.next_due()
        if first is None:
            return  # an armed timer fires once, finds nothing due and stays unarmed
        when = first + self.slack
        if self._timer is not None:
            if self._timer_at <= when:
                return
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        self._metrics.c["playout_ticks"] += 1
        now = self._loop.time()
        for call in self._table.pop_due(now):
            self._serve(call, now)
        self._arm()
