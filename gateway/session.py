"""One call's state, sans I/O: bytes and commands in, entries and messages out.

Theory of operation
-------------------
The server owns sockets and Redis; a ``CallSession`` owns everything else that
is specific to one call, and never touches a socket, a clock or Redis:

* Inbound audio. The platform's binary frames are a byte stream of 16-bit LE
  mono PCM whose frame size is not documented. ``feed_audio`` re-frames it to
  20 ms. The common case (the platform already sends 20 ms) passes the frame
  through untouched, so the hot path allocates nothing. An odd-length frame is
  *not* an error: the socket is treated as a byte stream, the odd byte waits
  for the next frame (counted in ``odd_frames``); only a trailing odd byte
  at the end of the call is dropped (``tail``). Frames are never closed over
  alignment, because the platform's framing is not ours to police.
* Inbound text. ``parse_text`` turns a JSON object with a string ``event`` into
  a ``PlatformEvent``; anything else is reported as malformed, never raised.
* Commands. ``apply`` turns a command into the exact text messages for the
  platform (see ``piopiy_voice.gateway.outbound``) plus the entries to publish, or rejects
  it with a reason.
* Playout. ``PlayAudio`` is queued and released by ``pump(now)`` in chunks at
  real time plus ``lead_ms``, so at most lead + one chunk is ever in the
  platform's hands. That is what lets ``Interrupt`` cut audio: the local queue
  is dropped and ``{"action":"break"}`` stops what was already sent. Because
  the platform acknowledges nothing, "what the caller heard" is derived from
  the pacing clock: started when the first chunk goes out, finished when the
  last chunk's scheduled end has passed, interrupted with ``played_ms`` =
  time elapsed since the utterance's scheduled start, capped at what was sent.
* Ending. ``end(reason)`` yields ``CallEnded`` exactly once; a prior
  ``Hangup``/``StopStream`` command or a platform ``stop`` event decides the
  reason when the socket then simply closes.

Every entry gets the next per-call ``seq``; consumers drop duplicates by it
(the writer may resend a batch after a Redis reconnect).
"""

from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from piopiy_voice import contracts as c

from . import outbound

log = logging.getLogger(__name__)

FRAME_MS = 20
#: streamAudio chunk length. Small enough that an interrupt leaves little in
#: flight, large enough that base64/JSON overhead per second stays low.
CHUNK_MS = 40
KNOWN_EVENTS = frozenset({"start", "stop", "dtmf", "mark", "media", "connected"})


@dataclass
class Outcome:
    """What applying one command produced."""

    status: str  # "applied" | "rejected"
    reason: str = ""
    messages: list[str] = field(default_factory=list)
    entries: list[Any] = field(default_factory=list)
    #: Start (or re-arm) the playout pump after sending ``messages``.
    wake_playout: bool = False


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


class CallSession:
    def __init__(
        self,
        call_id: str,
        *,
        rate: int = 8000,
        listen_mode: str = "callee",
        gateway_id: str = "",
        params: dict[str, str] | None = None,
        lead_ms: int = 100,
        max_queue_ms: int = 120_000,
        chunk_ms: int = CHUNK_MS,
    ) -> None:
        if rate not in c.VOICE_RATES:
            raise ValueError(f"rate must be one of {c.VOICE_RATES}, got {rate!r}")
        if lead_ms < 0 or max_queue_ms <= 0 or chunk_ms <= 0:
            raise ValueError("lead_ms must be >= 0, max_queue_ms and chunk_ms > 0")
        self.call_id = call_id
        self.rate = rate
        self.listen_mode = listen_mode
        self.gateway_id = gateway_id
        self.params = dict(params or {})
        self.lead = lead_ms / 1000.0
        self.max_queue_ms = max_queue_ms
        self.chunk_ms = chunk_ms
        self.frame_bytes = rate * 2 * FRAME_MS // 1000
        self.seq = 0
        #: Bytes waiting for the rest of their 20 ms frame (read on the hot path).
        self.pending = b""
        # Counters (CallEnded carries the first two).
        self.frames_in = 0
        self.frames_dropped = 0
        self.odd_frames = 0
        self.text_malformed = 0
        #: Set by Hangup / StopStream / a platform "stop" event: why the socket
        #: is expected to close.
        self.closing_reason: str | None = None
        self.ended = False
        self._queue: deque[_Utterance] = deque()
        self._finishing: deque[_Utterance] = deque()
        self._clock_end = 0.0

    # ------------------------------------------------------------------ ids
    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def started_entry(self) -> c.CallStarted:
        return c.CallStarted(
            call_id=self.call_id, seq=self.next_seq(), gateway_id=self.gateway_id,
            rate=self.rate, listen_mode=self.listen_mode, params=self.params,
        )

    # -------------------------------------------------------------- inbound
    def feed_audio(self, data: bytes) -> tuple[bytes, ...] | list[bytes]:
        """Bytes of one binary frame -> whole 20 ms frames (maybe none)."""
        fb = self.frame_bytes
        if not self.pending and len(data) == fb:
            self.frames_in += 1
            return (data,)
        if len(data) & 1:
            self.odd_frames += 1
        buf = self.pending + data if self.pending else data
        whole = len(buf) - len(buf) % fb
        self.pending = buf[whole:]
        frames = [buf[i:i + fb] for i in range(0, whole, fb)]
        self.frames_in += len(frames)
        return frames

    def tail(self) -> tuple[bytes | None, int]:
        """At the end: the buffered partial frame padded with silence to 20 ms
        (None if nothing is buffered) and the number of odd bytes dropped."""
        pending, self.pending = self.pending, b""
        odd = len(pending) & 1
        pending = pending[: len(pending) - odd]
        if not pending:
            return None, odd
        self.frames_in += 1
        return pending + bytes(self.frame_bytes - len(pending)), odd

    def parse_text(self, text: str | None) -> tuple[c.PlatformEvent | None, str]:
        """A text frame -> (entry or None, "ok" | "unknown" | "malformed").

        ``None`` stands for a text frame that was not valid UTF-8."""
        try:
            obj = json.loads(text) if text is not None else None
        except (ValueError, RecursionError):  # deeply nested input raises the latter
            obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get("event"), str) or not obj["event"]:
            self.text_malformed += 1
            return None, "malformed"
        event = obj.pop("event")
        if event == "stop" and self.closing_reason is None:
            self.closing_reason = "stream_stopped"
        entry = c.PlatformEvent(call_id=self.call_id, seq=self.next_seq(), event=event, data=obj)
        return entry, ("ok" if event in KNOWN_EVENTS else "unknown")

    # ------------------------------------------------------------- commands
    def apply(self, cmd: Any, now: float) -> Outcome:
        """One decoded command -> Outcome. Never raises for a bad command."""
        try:
            return self._apply(cmd, now)
        except ValueError as exc:
            return Outcome("rejected", str(exc))

    def _apply(self, cmd: Any, now: float) -> Outcome:
        if self.ended:
            return Outcome("rejected", "call has ended")
        t = cmd.type
        if t == "cmd.play_audio":
            return self._enqueue(cmd, now)
        if t == "cmd.interrupt":
            entries = self.cut(now)
            return Outcome("applied", messages=[outbound.control("break")], entries=entries)
        if t in ("cmd.pause", "cmd.resume") and self.closing_reason == "stream_stopped":
            # After ``stop`` the platform ignores both, and the socket closes soon.
            return Outcome("rejected", "the stream was stopped for good (stop); it cannot be paused or resumed")
        if t == "cmd.pause":
            return Outcome("applied", messages=[outbound.control("pause")])
        if t == "cmd.resume":
            return Outcome("applied", messages=[outbound.control("resume")])
        if t == "cmd.stop":
            entries = self.cut(now)
            self.closing_reason = "stream_stopped"
            return Outcome("applied", messages=[outbound.control("stop")], entries=entries)
        if t == "cmd.hangup":
            entries = self.cut(now)
            self.closing_reason = "hangup"
            return Outcome("applied", messages=[outbound.hangup()], entries=entries)
        if t == "cmd.play_music":
            return Outcome("applied", messages=[outbound.play_music(cmd.file)])
        if t == "cmd.speak":
            return Outcome("applied", messages=[outbound.speak(cmd.text)])
        if t == "cmd.transfer":
            msg = outbound.bridge(cmd.to, cmd.caller_id, duration=cmd.duration,
                                  timeout=cmd.timeout, loop=cmd.loop, ring_type=cmd.ring_type)
            return Outcome("applied", messages=[msg])
        if t == "cmd.pcmo":
            return Outcome("applied", messages=[outbound.raw_pcmo(cmd.pcmo)])
        return Outcome("rejected", f"command type {t!r} is not supported by this gateway")

    # -------------------------------------------------------------- playout
    def queued_ms(self, now: float) -> int:
        ahead = max(0.0, self._clock_end - now) * 1000
        return int(ahead + sum(u.total_ms - u.sent_ms for u in self._queue))

    def _enqueue(self, cmd: Any, now: float) -> Outcome:
        pcm, rate = cmd.pcm, cmd.rate
        if not pcm:
            return Outcome("rejected", "pcm is empty")
        if rate not in outbound.STREAM_AUDIO_RATES:
            # streamAudio takes 8000|16000 only; numpy is imported on first need.
            from piopiy_voice.audio import resample  # noqa: PLC0415

            pcm, rate = resample(pcm, rate, 16000), 16000
            if not pcm:  # an empty utterance would make pump() fail on every call
                return Outcome("rejected", "pcm is shorter than one sample at 16000 Hz")
        utt = _Utterance(cmd.utterance_id, pcm, rate)
        queued = self.queued_ms(now)
        if queued + utt.total_ms > self.max_queue_ms:
            return Outcome(
                "rejected",
                f"outbound queue full: {queued} ms queued + {utt.total_ms} ms > "
                f"limit {self.max_queue_ms} ms",
            )
        self._queue.append(utt)
        # The caller's playout loop releases the chunks (``pump``), so that one
        # task alone writes audio to the socket, in order.
        return Outcome("applied", wake_playout=True)

    def pump(self, now: float) -> tuple[list[str], list[Any], float | None]:
        """Release the chunks due by ``now + lead``; report started/finished.

        Returns (messages, entries, when to call again or None if idle).
        """
        messages: list[str] = []
        entries: list[Any] = []
        horizon = now + self.lead
        while self._queue:
            u = self._queue[0]
            start = max(now, self._clock_end)
            if start > horizon:
                break
            if u.start_at is None:
                u.start_at = start
                entries.append(self._playout(u, "started", 0))
            step = u.rate * 2 * self.chunk_ms // 1000
            chunk = u.pcm[u.sent:u.sent + step]
            u.sent += len(chunk)
            self._clock_end = start + len(chunk) / (2 * u.rate)
            messages.append(outbound.stream_audio(chunk, u.rate))
            if u.sent >= len(u.pcm):
                u.end_at = self._clock_end
                self._finishing.append(self._queue.popleft())
        entries += self._finished(now)
        wake = None
        if self._queue:
            wake = max(now, self._clock_end - self.lead)
        if self._finishing:
            end = self._finishing[0].end_at
            wake = end if wake is None else min(wake, end)
        return messages, entries, wake

    def cut(self, now: float) -> list[Any]:
        """Drop all queued audio; report every utterance not yet finished."""
        entries = self._finished(now)
        for u in (*self._finishing, *self._queue):
            played = 0
            if u.start_at is not None:
                played = min(u.sent_ms, max(0, round((now - u.start_at) * 1000)))
            entries.append(self._playout(u, "interrupted", played))
        self._finishing.clear()
        self._queue.clear()
        self._clock_end = now
        return entries

    def _finished(self, now: float) -> list[Any]:
        """``finished`` entries for the utterances whose last chunk has played by ``now``."""
        entries = []
        while self._finishing and self._finishing[0].end_at <= now:
            u = self._finishing.popleft()
            entries.append(self._playout(u, "finished", u.total_ms))
        return entries

    def _playout(self, u: _Utterance, state: str, played_ms: int) -> c.Playout:
        return c.Playout(call_id=self.call_id, seq=self.next_seq(), utterance_id=u.utterance_id,
                         state=state, played_ms=played_ms, total_ms=u.total_ms)

    @property
    def playing(self) -> bool:
        return bool(self._queue or self._finishing)

    # ------------------------------------------------------------------ end
    def end(self, reason: str, now: float) -> list[Any]:
        """Entries closing the call: playout cut + CallEnded. Empty if already ended."""
        if self.ended:
            return []
        entries = self.cut(now)
        self.ended = True
        entries.append(c.CallEnded(
            call_id=self.call_id, seq=self.next_seq(), reason=reason,
            frames_in=self.frames_in, frames_dropped=self.frames_dropped,
        ))
        return entries
