"""One call's state, sans I/O: bytes and commands in, entries and messages out.

Theory of operation
-------------------
The gateway's shell owns sockets, Redis and the clock; a ``CallSession`` owns
everything else that is specific to one call, and is its only writer: the
shell *asks* it (methods) and does what the answers say. It never touches a
socket, a clock or Redis.

* Sequence. Every entry of the call gets the next per-call ``seq``
  (``next_seq``); consumers drop duplicates by it (the writer may resend a
  batch after a Redis reconnect). A session resumed on this gateway after
  another one held the call starts from ``resume_seq``.
* Inbound audio. The platform's binary frames are a byte stream of 16-bit LE
  mono PCM whose frame size is not documented. ``frames_of`` cuts it into 20 ms
  frames (``piopiy_voice.audio.pcm.Reframer``). The common case (the platform
  already sends 20 ms, nothing buffered) passes the frame through untouched
  (no copy, no reframing; only a one-item tuple): the one fast path. An odd-length frame is
  *not* an error: the odd byte waits for the next frame (``odd_frames``);
  only a trailing odd byte at the end of the call is dropped (``tail``).
  Frames are never closed over alignment: the platform's framing is not ours
  to police.
* Dropped audio. When the writer's buffer is full (Redis away) a frame still
  takes its seq but is dropped (``frame_dropped``); the count waits in
  ``gap_pending`` until it can be reported as one ``StreamGap`` entry
  (``gap_entry``) ahead of the next frame that gets through, or at the end.
  Because the count lives here, a socket replacement cannot lose it.
* Inbound text. ``parse_text`` turns a JSON object with a string ``event`` into
  a ``PlatformEvent``; anything else is reported as malformed, never raised.
* Commands. ``apply`` is the one switch on command type: it turns a command
  into the exact text messages for the platform (``outbound``), the entries to
  publish, and what the shell must do around them (``Outcome``: take the
  call off the playout tick, wake it, close the socket after a while), or
  rejects it with a reason. ``PlayAudio`` at 32 kHz is resampled to 16 kHz here, inline
  (streamAudio takes 8000|16000; resampling is cheap).
* Playout. Queued audio is paced by ``pacing.Pacer``; ``pump(now)`` releases
  what is due and reports it as ``Playout`` entries.
* Ending. ``end(reason)`` yields the pending gap report, the playout cut and
  ``CallEnded`` exactly once; a prior ``Hangup``/``StopStream`` command or a
  platform ``stop`` event decides the reason when the socket then simply closes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from piopiy_voice import contracts as c
from piopiy_voice.audio.pcm import SUPPORTED_RATES, Reframer
from piopiy_voice.audio.resample import resample

from . import outbound
from .pacing import Pacer, Report

log = logging.getLogger(__name__)

#: streamAudio chunk length. Small enough that an interrupt leaves little in
#: flight, large enough that base64/JSON overhead per second stays low.
CHUNK_MS = 40
KNOWN_EVENTS = frozenset({"start", "stop", "dtmf", "mark", "media", "connected"})


@dataclass
class Outcome:
    """What applying one command produced, and what the shell must do about it."""

    status: str  # "applied" | "rejected"
    reason: str = ""
    messages: list[str] = field(default_factory=list)
    entries: list[Any] = field(default_factory=list)
    #: Put the call on (or wake it on) the playout tick after sending ``messages``.
    wake_playout: bool = False
    #: The queued audio was dropped: take the call off the playout tick (before sending).
    cut_playout: bool = False
    #: The platform should close the socket now; close it ourselves if it has
    #: not after a grace.
    close_after: bool = False
    #: Rejected because a message would exceed ``outbound.MAX_MESSAGE_BYTES``.
    oversize: bool = False


class CallSession:
    def __init__(
        self,
        call_id: str,
        *,
        rate: int = 8000,
        listen_mode: str = "callee",
        params: dict[str, str] | None = None,
        lead_ms: int = 100,
        max_queue_ms: int = 120_000,
        chunk_ms: int = CHUNK_MS,
        resume_seq: int = 0,
    ) -> None:
        if rate not in SUPPORTED_RATES:
            raise ValueError(f"rate must be one of {SUPPORTED_RATES}, got {rate!r}")
        self.call_id = call_id
        self.rate = rate
        self.listen_mode = listen_mode
        self.params = dict(params or {})
        self.seq = resume_seq
        self._reframer = Reframer(rate)
        self.frame_bytes = self._reframer.frame_bytes
        #: An odd byte waiting for its other half (the socket is a byte stream).
        self._odd = b""
        #: Bytes buffered toward the next frame (0 on the fast path).
        self.buffered = 0
        self._pacer = Pacer(lead_ms=lead_ms, max_queue_ms=max_queue_ms, chunk_ms=chunk_ms)
        # Counters (CallEnded carries the first two).
        self.frames_in = 0
        self.frames_dropped = 0
        #: Frames dropped and not yet reported in a StreamGap entry.
        self.gap_pending = 0
        #: Why the pending gap's frames were dropped (its first drop's reason).
        self.gap_reason = "redis_unavailable"
        self.odd_frames = 0
        self.text_malformed = 0
        #: Set by Hangup / StopStream / a platform "stop" event: why the socket
        #: is expected to close.
        self.closing_reason: str | None = None
        self.ended = False

    # ------------------------------------------------------------------ ids
    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def started_entry(self, gateway_id: str) -> c.CallStarted:
        return c.CallStarted(
            call_id=self.call_id, seq=self.next_seq(), gateway_id=gateway_id,
            rate=self.rate, listen_mode=self.listen_mode, params=self.params,
        )

    # -------------------------------------------------------------- inbound
    def frames_of(self, data: bytes) -> tuple[bytes, ...] | list[bytes]:
        """Bytes of one binary frame -> whole 20 ms frames (maybe none)."""
        if len(data) == self.frame_bytes and not self.buffered:
            self.frames_in += 1
            return (data,)
        if len(data) & 1:
            self.odd_frames += 1
        if self._odd:
            data = self._odd + data
        if len(data) & 1:
            data, self._odd = data[:-1], data[-1:]
        else:
            self._odd = b""
        frames = self._reframer.push(data)
        self.buffered = self._reframer.pending + len(self._odd)
        self.frames_in += len(frames)
        return frames

    def tail(self) -> tuple[bytes | None, int]:
        """At the end: the buffered partial frame padded with silence to 20 ms
        (None if nothing is buffered) and the number of odd bytes dropped."""
        odd, self._odd, self.buffered = len(self._odd), b"", 0
        rest = self._reframer.flush(pad=True)
        if not rest:
            return None, odd
        self.frames_in += 1
        return rest, odd

    def frame_dropped(self, reason: str = "redis_unavailable") -> None:
        """The writer refused a frame that already had its seq (``reason``:
        ``redis_unavailable``, or ``call_backlog`` when this call alone
        filled its share of the buffer)."""
        if not self.gap_pending:
            self.gap_reason = reason
        self.frames_dropped += 1
        self.gap_pending += 1

    def gap_entry(self) -> c.StreamGap | None:
        """The report of the frames dropped since the last one (None if none)."""
        if not self.gap_pending:
            return None
        gap = c.StreamGap(call_id=self.call_id, seq=self.next_seq(), frames=self.gap_pending,
                          reason=self.gap_reason)
        log.warning("call %s: %d frames dropped (%s)", self.call_id, self.gap_pending,
                    self.gap_reason)
        self.gap_pending = 0
        return gap

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
        if self.ended:
            return Outcome("rejected", "call has ended")
        handler = _HANDLERS.get(cmd.type)
        if handler is None:
            return Outcome("rejected", f"command type {cmd.type!r} is not supported by this gateway")
        try:
            return handler(self, cmd, now)
        except ValueError as exc:  # the PCMO builders name the bad field
            return Outcome("rejected", str(exc))

    def _play_audio(self, cmd: Any, now: float) -> Outcome:
        pcm, rate = cmd.pcm, cmd.rate
        if not pcm:
            return Outcome("rejected", "pcm is empty")
        if rate not in outbound.STREAM_AUDIO_RATES:
            pcm, rate = resample(pcm, rate, 16000), 16000
            if not pcm:  # an empty utterance would make pump() fail on every call
                return Outcome("rejected", "pcm is shorter than one sample at 16000 Hz")
        refused = self._pacer.enqueue(cmd.utterance_id, pcm, rate, now)
        if refused:
            return Outcome("rejected", refused)
        # The shell's playout tick releases the chunks (``pump``), so that it
        # alone writes audio to the socket, in order.
        return Outcome("applied", wake_playout=True)

    def _interrupt(self, cmd: Any, now: float) -> Outcome:
        return Outcome("applied", messages=[outbound.control("break")], entries=self.cut(now),
                       cut_playout=True)

    def _stream_control(self, cmd: Any, now: float) -> Outcome:
        action = "pause" if cmd.type == "cmd.pause" else "resume"
        if self.closing_reason == "stream_stopped":
            # After ``stop`` the platform ignores both, and the socket closes soon.
            return Outcome("rejected", "the stream was stopped for good (stop); "
                           "it cannot be paused or resumed")
        return Outcome("applied", messages=[outbound.control(action)])

    def _stop(self, cmd: Any, now: float) -> Outcome:
        msg = outbound.control("stop")
        self.closing_reason = "stream_stopped"
        return Outcome("applied", messages=[msg], entries=self.cut(now), cut_playout=True,
                       close_after=True)

    def _hangup(self, cmd: Any, now: float) -> Outcome:
        msg = outbound.hangup()
        self.closing_reason = "hangup"
        return Outcome("applied", messages=[msg], entries=self.cut(now), cut_playout=True,
                       close_after=True)

    # -------------------------------------------------------------- playout
    def queued_ms(self, now: float) -> int:
        return self._pacer.queued_ms(now)

    @property
    def playing(self) -> bool:
        return self._pacer.playing

    def pump(self, now: float) -> tuple[list[str], list[c.Playout], float | None]:
        """Release the chunks due by ``now + lead``; report started/finished.

        Returns (messages, entries, when to call again or None if idle)."""
        messages, reports, wake = self._pacer.pump(now)
        return messages, self._playouts(reports), wake

    def cut(self, now: float) -> list[c.Playout]:
        """Drop all queued audio; report every utterance not yet finished."""
        return self._playouts(self._pacer.cut(now))

    def _playouts(self, reports: list[Report]) -> list[c.Playout]:
        return [c.Playout(call_id=self.call_id, seq=self.next_seq(), utterance_id=r.utterance_id,
                          state=r.state, played_ms=r.played_ms, total_ms=r.total_ms)
                for r in reports]

    # ------------------------------------------------------------------ end
    def end(self, reason: str, now: float) -> list[Any]:
        """Entries closing the call: the pending gap report, the playout cut and
        CallEnded. Empty if already ended."""
        if self.ended:
            return []
        gap = self.gap_entry()
        entries: list[Any] = [gap] if gap is not None else []
        entries += self.cut(now)
        self.ended = True
        entries.append(c.CallEnded(
            call_id=self.call_id, seq=self.next_seq(), reason=reason,
            frames_in=self.frames_in, frames_dropped=self.frames_dropped,
        ))
        return entries


def _platform_message(build: Callable[[Any], str]) -> Callable[[CallSession, Any, float], Outcome]:
    """A command that is one PCMO message on the socket and nothing else."""
    def handler(session: CallSession, cmd: Any, now: float) -> Outcome:
        msg = build(cmd)
        size = len(msg.encode())
        if size > outbound.MAX_MESSAGE_BYTES:
            # Sent, it would make the platform close the socket (1009) and end the call.
            return Outcome("rejected", f"message too large: {size} bytes, the limit on the "
                           f"platform's socket is {outbound.MAX_MESSAGE_BYTES}", oversize=True)
        return Outcome("applied", messages=[msg])
    return handler


#: The one switch on command type.
_HANDLERS: dict[str, Callable[[CallSession, Any, float], Outcome]] = {
    "cmd.play_audio": CallSession._play_audio,
    "cmd.interrupt": CallSession._interrupt,
    "cmd.pause": CallSession._stream_control,
    "cmd.resume": CallSession._stream_control,
    "cmd.stop": CallSession._stop,
    "cmd.hangup": CallSession._hangup,
    "cmd.play_music": _platform_message(lambda cmd: outbound.play_music(cmd.file)),
    "cmd.speak": _platform_message(lambda cmd: outbound.speak(cmd.text)),
    "cmd.transfer": _platform_message(lambda cmd: outbound.bridge(
        cmd.to, cmd.caller_id, duration=cmd.duration, timeout=cmd.timeout, loop=cmd.loop,
        ring_type=cmd.ring_type)),
    "cmd.pcmo": _platform_message(lambda cmd: outbound.raw_pcmo(cmd.pcmo)),
}
