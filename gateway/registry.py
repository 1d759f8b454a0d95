"""The live calls of this gateway: one registry, one ``LiveCall`` per call.

Theory of operation
-------------------
``Registry`` is the only place that decides a call's life on this gateway:

* ``attach`` a new socket: a new call (CallStarted on the call's stream and on
  ``calls``, record ``live``), a call whose socket moved here from another
  gateway (same, with the seq continuing from the stream's, timeline
  ``socket.moved``), or a *replacement*: the same call id connecting again
  while live (the platform reconnecting after a network blip). A replacement
  keeps the ``LiveCall`` and its session, swaps the socket, cuts queued
  playout (reported interrupted), closes the old socket with 4000 and says
  ``socket.replaced`` on the timeline; no second CallStarted, no CallEnded.
  Everything the session holds (seq, counters, the pending gap report) goes
  on unchanged, because nothing was copied.
* ``detach`` a socket whose handler finished: ignored if it was replaced;
  otherwise the reframer's tail is published and the call ends with a reason
  read from how it closed.
* ``end``: the session's closing entries, CallEnded on ``calls``, record
  ``ended``, keys set to expire. Exactly once (the session refuses a second).

It is also the one holder of "which gateway holds this call": its
``gateway_id`` goes into CallStarted, the call record, the timeline and every
CommandResult (the dispatcher asks it). Across gateway replicas a replacement
is not detected: the newest gateway takes over the record.

``LiveCall`` binds a session to its current socket. ``publish_frame`` is the
one function that publishes an inbound frame (its seq, gap accounting, the
writer's buffer); ``sink`` is the per-socket hot path that ``DirectConnection``
calls for every frame. ``start_playout`` / ``cut_playout`` own the call's one
playout task, the only writer of audio to its socket.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Iterator

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from piopiy_voice import callrecord, contracts, keys
from piopiy_voice.settings import Settings

from .handshake import Admission
from .metrics import Metrics
from .publisher import Publisher
from .session import CallSession

log = logging.getLogger("gateway")

CLOSE_REPLACED = 4000


async def close_ws(ws: ServerConnection, code: int, reason: str) -> None:
    """Close a socket, bounded in time, ignoring a peer that is already gone."""
    try:
        await asyncio.wait_for(ws.close(code, reason), 5.0)
    except (asyncio.TimeoutError, ConnectionClosed, OSError):
        pass


class LiveCall:
    """A session bound to its current socket."""

    __slots__ = ("session", "ws", "campaign", "drained", "done", "playout", "kick",
                 "_publisher", "_metrics", "_prefix", "_add_audio")

    def __init__(self, session: CallSession, ws: Any, campaign: str | None,
                 publisher: Publisher, metrics: Metrics) -> None:
        self.session = session
        self.ws = ws
        self.campaign = campaign
        #: Closed by the drain (reason ``drained``).
        self.drained = False
        #: Set when the call has left the registry.
        self.done = asyncio.Event()
        self.playout: asyncio.Task | None = None
        #: Set when new audio is queued, to wake the sleeping playout loop early.
        self.kick = asyncio.Event()
        self._publisher = publisher
        self._metrics = metrics
        self._prefix = publisher.audio_prefix(session.call_id)
        self._add_audio = publisher.add_audio

    @property
    def call_id(self) -> str:
        return self.session.call_id

    # ---------------------------------------------------------------- inbound
    def publish(self, entry: Any) -> None:
        """Any entry of this call, onto its stream (never refused)."""
        self._publisher.xadd(keys.call_stream(self.session.call_id), contracts.encode(entry),
                             maxlen=keys.CALL_STREAM_MAXLEN)

    def publish_frame(self, pcm: bytes) -> None:
        """The one way an inbound frame is published: a pending gap report goes
        first when the buffer has room again, then the frame takes its seq."""
        s = self.session
        if s.gap_pending:
            pub = self._publisher
            if pub.frames < pub.limit:
                self.publish(s.gap_entry())
        if not self._add_audio(self._prefix, s.next_seq(), pcm):
            s.frame_dropped()
            self._metrics.c["frames_dropped"] += 1

    def sink(self) -> Callable[[bool, Any], None]:
        """The per-socket hot path, as a closure over everything it touches."""
        frames_of, publish_frame, on_text = self.session.frames_of, self.publish_frame, self.on_text
        m = self._metrics.c

        def on_message(binary: bool, msg: Any) -> None:
            if not binary:
                on_text(msg)
                return
            m["bytes_in"] += len(msg)
            frames = frames_of(msg)
            m["frames_in"] += len(frames)
            for frame in frames:
                publish_frame(frame)

        return on_message

    def on_text(self, text: str | None) -> None:
        metrics, s = self._metrics, self.session
        metrics.inc("text_frames")
        if not self._publisher.has_room:
            # Redis has been away long enough to fill the buffer: the platform's
            # text must not grow it without bound.
            metrics.inc("events_dropped")
            return
        entry, kind = s.parse_text(text)
        if entry is None:
            metrics.inc("text_malformed")
            if s.text_malformed <= 3:  # enough to debug, not a log flood
                log.warning("call %s: ignoring malformed text frame %.80r", s.call_id, text)
            return
        if kind == "unknown":
            metrics.inc("events_unknown")
            log.info("call %s: unknown platform event %r", entry.call_id, entry.event)
        self.publish(entry)

    # ---------------------------------------------------------------- playout
    async def send(self, texts: list[str]) -> None:
        for text in texts:
            await self.ws.send(text)
            self._metrics.c["messages_out"] += 1

    def cut_playout(self) -> None:
        if self.playout is not None and not self.playout.done():
            self.playout.cancel()
        self.playout = None

    def start_playout(self) -> None:
        # Never restart a running loop: cancelling it mid-send could lose a chunk
        # the session already counts as sent. Wake it instead.
        if self.playout is not None and not self.playout.done():
            self.kick.set()
            return
        self.playout = asyncio.get_running_loop().create_task(self._playout())

    async def _playout(self) -> None:
        """The only writer of a call's audio: releases chunks as they fall due."""
        loop = asyncio.get_running_loop()
        s = self.session
        while True:
            self.kick.clear()
            messages, entries, wake = s.pump(loop.time())
            for e in entries:
                self.publish(e)
            try:
                await self.send(messages)
            except ConnectionClosed:
                return
            if self.kick.is_set():
                continue
            if wake is None:
                return
            try:
                async with asyncio.timeout(max(0.0, wake - loop.time())):
                    await self.kick.wait()
            except TimeoutError:
                pass


class Registry:
    def __init__(self, *, gateway_id: str, settings: Settings, publisher: Publisher,
                 metrics: Metrics) -> None:
        self.gateway_id = gateway_id
        self.settings = settings
        self.publisher = publisher
        self.metrics = metrics
        #: Set when the gateway stops: calls still open end ``gateway_stopped``.
        self.stopping = False
        self._calls: dict[str, LiveCall] = {}

    def get(self, call_id: str) -> LiveCall | None:
        return self._calls.get(call_id)

    def __contains__(self, call_id: str) -> bool:
        return call_id in self._calls

    def __len__(self) -> int:
        return len(self._calls)

    def __iter__(self) -> Iterator[LiveCall]:
        return iter(list(self._calls.values()))

    # ---------------------------------------------------------------- attach
    def attach(self, ws: Any, adm: Admission) -> LiveCall:
        live = self._calls.get(adm.call_id)
        if live is not None:
            self._replace(live, ws)
            return live
        s = self.settings
        session = CallSession(adm.call_id, rate=adm.rate, listen_mode=adm.listen_mode,
                              params=adm.params, lead_ms=s.playout_lead_ms,
                              max_queue_ms=s.max_outbound_queue_ms, resume_seq=adm.resume_seq)
        live = LiveCall(session, ws, adm.campaign, self.publisher, self.metrics)
        self._calls[adm.call_id] = live
        pub, cid = self.publisher, adm.call_id
        started = contracts.encode(session.started_entry(self.gateway_id))
        if adm.resume_seq:
            callrecord.timeline(pub, cid, "socket.moved", gateway_id=self.gateway_id,
                                seq=adm.resume_seq)
            log.info("call %s: socket moved here from another gateway (seq continues at %d)",
                     cid, adm.resume_seq + 1)
        callrecord.set_state(pub, cid, "live", gateway_id=self.gateway_id, rate=adm.rate,
                             listen_mode=adm.listen_mode, campaign=adm.campaign)
        pub.xadd(keys.CALLS_STREAM, started, maxlen=keys.CALLS_STREAM_MAXLEN)
        pub.xadd(keys.call_stream(cid), started, maxlen=keys.CALL_STREAM_MAXLEN)
        self.metrics.inc("calls_started")
        log.info("call %s: started (rate %d, mode %s%s)", cid, adm.rate, adm.listen_mode,
                 f", campaign {adm.campaign}" if adm.campaign else "")
        return live

    def _replace(self, live: LiveCall, ws: Any) -> None:
        old, live.ws = live.ws, ws
        live.cut_playout()
        for e in live.session.cut(asyncio.get_running_loop().time()):
            live.publish(e)
        callrecord.timeline(self.publisher, live.call_id, "socket.replaced",
                            gateway_id=self.gateway_id)
        self.metrics.inc("calls_replaced")
        log.info("call %s: new socket replaces the old one", live.call_id)
        asyncio.get_running_loop().create_task(
            close_ws(old, CLOSE_REPLACED, "replaced by a new connection"))

    # ---------------------------------------------------------------- detach
    def detach(self, live: LiveCall, ws: Any, *, clean: bool, too_big: bool = False) -> None:
        """The handler of ``ws`` finished: end the call unless ``ws`` was replaced."""
        if live.ws is not ws:
            return
        s = live.session
        try:
            live.cut_playout()
            frame, odd = s.tail()
            if frame is not None:
                live.publish_frame(frame)
            if odd:
                self.metrics.inc("odd_bytes_dropped", odd)
            if live.drained:
                reason = "drained"
            elif self.stopping:
                reason = "gateway_stopped"
            elif s.closing_reason:
                reason = s.closing_reason
            elif too_big:
                reason = "limit_exceeded"
            elif not clean:
                reason = "socket_error"
            else:
                reason = "platform_closed"
            self.end(live, reason)
            self.metrics.inc("odd_frames", s.odd_frames)
            log.info("call %s: ended (%s; close code %s; %d frames in, %d dropped, %d odd frames)",
                     s.call_id, reason, getattr(ws, "close_code", None), s.frames_in,
                     s.frames_dropped, s.odd_frames)
            if too_big:
                log.warning("call %s: frame larger than %d bytes, closed with 1009",
                            s.call_id, self.settings.max_frame_bytes)
        finally:
            if self._calls.get(s.call_id) is live:
                del self._calls[s.call_id]
            live.done.set()

    def end(self, live: LiveCall, reason: str) -> None:
        entries = live.session.end(reason, asyncio.get_running_loop().time())
        if not entries:
            return
        pub, cid = self.publisher, live.call_id
        for e in entries:
            live.publish(e)
        pub.xadd(keys.CALLS_STREAM, contracts.encode(entries[-1]), maxlen=keys.CALLS_STREAM_MAXLEN)
        callrecord.set_state(pub, cid, "ended", end_reason=reason, gateway_id=self.gateway_id,
                             campaign=live.campaign)
        callrecord.expire_call(pub, cid)
        self.metrics.inc("calls_ended")

    def close_if_current(self, live: LiveCall, ws: Any) -> None:
        """Close ``ws`` if it is still the call's socket (after hangup/stop the
        platform should have closed it; a replacement socket is left alone)."""
        if self._calls.get(live.call_id) is live and live.ws is ws:
            asyncio.get_running_loop().create_task(
                close_ws(ws, 1000, live.session.closing_reason or "done"))
