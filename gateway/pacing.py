"""Outbound playout pacing of one call, sans I/O: utterances in, timed chunks out.

Theory of operation
-------------------
An utterance (``PlayAudio``) is queued whole and released by ``pump(now)`` in
``chunk_ms`` chunks at real time plus ``lead``, so at most lead + one chunk is
ever in the platform's hands. That is what lets an interrupt cut audio: the
local queue is dropped (``cut``) and ``{"action":"break"}`` stops what was
already sent. One pacing clock (``_clock_end``: when the last released chunk
ends playing) runs across utterances, so back-to-back ones play without a gap.

The platform acknowledges nothing, so "what the caller heard" is derived from
that clock: *started* when the first chunk goes out, *finished* when the last
chunk's scheduled end has passed, *interrupted* with ``played_ms`` = time
elapsed since the utterance's scheduled start, capped at what was sent.
Reports are plain ``Report`` tuples; the session turns them into entries.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from . import outbound


class Report(NamedTuple):
    utterance_id: str
    state: str  # "started" | "finished" | "interrupted"
    played_ms: int
    total_ms: int


@dataclass
class _Utterance:
    utterance_id: str
    pcm: bytes
    rate: int
    sent: int = 0
    start_at: float | None = None
    end_at: float = 0.0

    @property
    def total_ms(self) -> int:
        return len(self.pcm) * 1000 // (2 * self.rate)

    @property
    def sent_ms(self) -> int:
        return self.sent * 1000 // (2 * self.rate)

    def report(self, state: str, played_ms: int) -> Report:
        return Report(self.utterance_id, state, played_ms, self.total_ms)


class Pacer:
    def __init__(self, *, lead_ms: int, max_queue_ms: int, chunk_ms: int) -> None:
        if lead_ms < 0 or max_queue_ms <= 0 or chunk_ms <= 0:
            raise ValueError("lead_ms must be >= 0, max_queue_ms and chunk_ms > 0")
        self.lead = lead_ms / 1000.0
        self.max_queue_ms = max_queue_ms
        self.chunk_ms = chunk_ms
        self._queue: deque[_Utterance] = deque()
        self._finishing: deque[_Utterance] = deque()
        self._clock_end = 0.0

    @property
    def playing(self) -> bool:
        return bool(self._queue or self._finishing)

    def queued_ms(self, now: float) -> int:
        ahead = max(0.0, self._clock_end - now) * 1000
        return int(ahead + sum(u.total_ms - u.sent_ms for u in self._queue))

    def enqueue(self, utterance_id: str, pcm: bytes, rate: int, now: float) -> str:
        """Queue an utterance (rate: one streamAudio takes); "" or why it was refused."""
        utt = _Utterance(utterance_id, pcm, rate)
        queued = self.queued_ms(now)
        if queued + utt.total_ms > self.max_queue_ms:
            return (f"outbound queue full: {queued} ms queued + {utt.total_ms} ms > "
                    f"limit {self.max_queue_ms} ms")
        self._queue.append(utt)
        return ""

    def pump(self, now: float) -> tuple[list[str], list[Report], float | None]:
        """Release the chunks due by ``now + lead``; report started/finished.

        Returns (messages, reports, when to call again or None if idle)."""
        messages: list[str] = []
        reports: list[Report] = []
        horizon = now + self.lead
        while self._queue:
            u = self._queue[0]
            start = max(now, self._clock_end)
            if start > horizon:
                break
            if u.start_at is None:
                u.start_at = start
                reports.append(u.report("started", 0))
            step = u.rate * 2 * self.chunk_ms // 1000
            chunk = u.pcm[u.sent:u.sent + step]
            u.sent += len(chunk)
            self._clock_end = start + len(chunk) / (2 * u.rate)
            messages.append(outbound.stream_audio(chunk, u.rate))
            if u.sent >= len(u.pcm):
                u.end_at = self._clock_end
                self._finishing.append(self._queue.popleft())
        reports += self._finished(now)
        wake = None
        if self._queue:
            wake = max(now, self._clock_end - self.lead)
        if self._finishing:
            end = self._finishing[0].end_at
            wake = end if wake is None else min(wake, end)
        return messages, reports, wake

    def cut(self, now: float) -> list[Report]:
        """Drop all queued audio; report every utterance not yet finished."""
        reports = self._finished(now)
        for u in (*self._finishing, *self._queue):
            played = 0
            if u.start_at is not None:
                played = min(u.sent_ms, max(0, round((now - u.start_at) * 1000)))
            reports.append(u.report("interrupted", played))
        self._finishing.clear()
        self._queue.clear()
        self._clock_end = now
        return reports

    def _finished(self, now: float) -> list[Report]:
        """Reports for the utterances whose last chunk has played by ``now``."""
        reports = []
        while self._finishing and self._finishing[0].end_at <= now:
            u = self._finishing.popleft()
            reports.append(u.report("finished", u.total_ms))
        return reports
