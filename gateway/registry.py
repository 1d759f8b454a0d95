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
  otherwise the reframer's tail is published, then either the call ends
  (the platform closed normally with 1000, or sent ``stop``, or we sent
  hangup/stop, or a frame was too big) or, when the socket merely *dropped*
  (no close frame, any other close code, our drain's 1012), it is
  *suspended* (``suspend``; ``resume.py``): the session stays here without a
  socket for ``PV_RECONNECT_GRACE_S``; no ``call.ended``.
* a suspended call whose socket comes back here (the record still names this
  gateway) is *resumed*: same session, seq goes on, a new ``call.started``
  tells the worker; if it came back elsewhere, the local session is
  forgotten when its grace passes (``forget_expired``).
* ``end``: the session's closing entries, CallEnded on ``calls``, record
  ``ended``, keys set to expire. Exactly once (the session refuses a second).

It is also the one holder of "which gateway holds this call": its
``gateway_id`` goes into CallStarted, the call record, the timeline and every
CommandResult (the dispatcher asks it). Across gateway replicas a replacement
is not detected: the newest gateway takes over the record.

``LiveCall`` binds a session to its current socket (None while suspended).
``publish_frame`` is the one function that publishes an inbound frame (its
seq, gap accounting, the writer's buffer); ``sink`` is the per-socket hot path
that ``DirectConnection`` calls for every frame. It also enforces the call's
ingress limits (bytes, frames and text frames per second): past one, it stops
reading the socket until the second is over, so TCP back-pressure slows the
flooding peer and no one else (nothing is dropped for it).

Playout: ``start_playout`` / ``cut_playout`` put the call on and take it off
the gateway's one ``PlayoutTick`` (``playout.py``; the registry owns it), the
only writer of audio to the call's socket; ``play_due`` is one step of it for
this call: pump the session, write what it released, publish the reports,
or hold everything while the platform is not reading.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Iterator

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from piopiy_voice import callrecord, contracts, keys
from piopiy_voice.settings import Settings

from .connection import WRITE_CLOSED, WRITE_FULL
from .handshake import Admission
from .metrics import Metrics
from .playout import PlayoutTick
from . import resume
from .publisher import Publisher
from .session import CallSession

log = logging.getLogger("gateway")

CLOSE_REPLACED = 4000
#: A held call (its socket's write buffer above the high-water mark) is asked
#: again after this long: one 40 ms chunk.
HELD_RETRY_S = 0.040


async def close_ws(ws: ServerConnection, code: int, reason: str) -> None:
    """Close a socket, bounded in time, ignoring a peer that is already gone."""
    try:
        await asyncio.wait_for(ws.close(code, reason), 5.0)
    except (asyncio.TimeoutError, ConnectionClosed, OSError):
        pass


class LiveCall:
    """A session bound to its current socket."""

    __slots__ = ("session", "ws", "campaign", "drained", "done", "resume_by", "rate_limits",
                 "_publisher", "_metrics", "_prefix", "_add_audio", "_tick")

    def __init__(self, session: CallSession, ws: Any, campaign: str | None,
                 publisher: Publisher, metrics: Metrics, tick: PlayoutTick) -> None:
        self.session = session
        self.ws = ws
        self.campaign = campaign
        #: Closed by the drain (reason ``drained``).
        self.drained = False
        #: Set when the call has left the registry.
        self.done = asyncio.Event()
        #: While suspended (``ws`` None): wall time the grace ends.
        self.resume_by: float | None = None
        #: (bytes, frames, text frames) allowed per second on the socket.
        self.rate_limits = (1 << 62, 1 << 62, 1 << 62)
        self._publisher = publisher
        self._metrics = metrics
        self._prefix = publisher.audio_prefix(session.call_id)
        self._add_audio = publisher.add_audio
        self._tick = tick

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
        # Only when this frame can get through too (the call's own share
        # included): else each dropped frame would add a one-frame report.
        if s.gap_pending and self._publisher.room_for(self._prefix):
            self.publish(s.gap_entry())
        if not self._add_audio(self._prefix, s.next_seq(), pcm):
            reason = self._publisher.full_for(self._prefix)
            s.frame_dropped(reason)
            self._metrics.c["frames_dropped" if reason == "redis_unavailable"
                            else "frames_dropped_backlog"] += 1

    def sink(self, ws: Any = None) -> Callable[[bool, Any], None]:
        """The per-socket hot path, as a closure over everything it touches."""
        frames_of, publish_frame, on_text = self.session.frames_of, self.publish_frame, self.on_text
        m = self._metrics.c
        max_bytes, max_frames, max_text = self.rate_limits
        loop = asyncio.get_running_loop()
        clock = time.monotonic  # a C call: loop.time() costs a Python frame per message
        transport = getattr(ws, "transport", None)
        # One-second windows: [window end, bytes, binary frames, text frames, paused].
        win = [0.0, 0, 0, 0, False]

        def resume_reading() -> None:
            win[4] = False
            if transport is not None and not transport.is_closing():
                transport.resume_reading()

        def throttle(limit: str) -> None:
            # Stop reading until the window ends: the peer's TCP window fills
            # and it slows down. What was already read is still handled.
            m[limit] += 1
            if not win[4] and transport is not None and not transport.is_closing():
                win[4] = True
                transport.pause_reading()
                loop.call_later(max(0.0, win[0] - clock()), resume_reading)

        def on_message(binary: bool, msg: Any) -> None:
            t = clock()
            if t >= win[0]:
                win[0], win[1], win[2], win[3] = t + 1.0, 0, 0, 0
            if not binary:
                win[3] += 1
                if win[3] > max_text:
                    throttle("ingress_throttled_text")
                    if win[3] > 2 * max_text:
                        m["events_dropped"] += 1
                        return  # already read past the pause: not published
                on_text(msg)
                return
            n = len(msg)
            win[1] += n
            win[2] += 1
            if win[1] > max_bytes or win[2] > max_frames:
                throttle("ingress_throttled" if win[1] > max_bytes else "ingress_throttled_frames")
            m["bytes_in"] += n
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
        """A command's messages (the dispatcher's), each awaited like any send."""
        for text in texts:
            ws = self.ws
            if ws is None:
                raise ConnectionError("the call's socket is gone (suspended)")
            await ws.send(text)
            self._metrics.c["messages_out"] += 1

    def start_playout(self) -> None:
        """Audio was queued: serve it now and keep the call on the playout tick."""
        self._tick.wake(self)

    def cut_playout(self) -> None:
        """The queue was dropped or the socket is gone: off the playout tick."""
        self._tick.cut(self)

    def play_due(self, now: float) -> float | None:
        """One playout step (the tick's): returns when to step again, None when
        there is nothing left to play or no socket to play it on."""
        ws = self.ws
        if ws is None:
            return None  # suspended: the queue was cut with the socket
        state = ws.write_state()
        if state == WRITE_CLOSED:
            return None  # the handler's detach ends or suspends the call
        if state == WRITE_FULL:
            # The platform is not reading: release nothing (the Pacer's clock
            # waits, nothing is lost) rather than buffer audio without bound.
            self._metrics.c["playout_held"] += 1
            return now + HELD_RETRY_S
        messages, entries, wake = self.session.pump(now)
        for e in entries:
            self.publish(e)
        if messages:
            ws.write_texts(messages)
            self._metrics.c["messages_out"] += len(messages)
        return wake


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
        #: Calls held here without a socket (suspended), by id.
        self._suspended: dict[str, LiveCall] = {}
        #: Paces every speaking call's audio (``playout.py``).
        self.playout = PlayoutTick(lead_ms=settings.playout_lead_ms, metrics=metrics)

    def get(self, call_id: str) -> LiveCall | None:
        return self._calls.get(call_id)

    def __contains__(self, call_id: str) -> bool:
        return call_id in self._calls

    def has_socket(self, call_id: str) -> bool:
        """The call is live here with a socket (not suspended)."""
        live = self._calls.get(call_id)
        return live is not None and live.ws is not None

    def __len__(self) -> int:
        """Calls with a socket here (what ``max_calls`` bounds)."""
        return len(self._calls) - len(self._suspended)

    @property
    def suspended_count(self) -> int:
        return len(self._suspended)

    def __iter__(self) -> Iterator[LiveCall]:
        return iter(list(self._calls.values()))

    # ---------------------------------------------------------------- attach
    def _new_live(self, session: CallSession, ws: Any, campaign: str | None) -> LiveCall:
        live = LiveCall(session, ws, campaign, self.publisher, self.metrics, self.playout)
        s = self.settings
        live.rate_limits = (s.ingress_bytes_per_s, s.ingress_frames_per_s, s.ingress_text_per_s)
        return live

    def attach(self, ws: Any, adm: Admission) -> LiveCall:
        live = self._calls.get(adm.call_id)
        if live is not None:
            if live.ws is not None:
                self._replace(live, ws)
                return live
            if adm.held_by == self.gateway_id and adm.state == "suspended":
                self._resume(live, ws)
                return live
            # Suspended here, but the call went on elsewhere since: ours is stale.
            self.forget(live)
        s = self.settings
        resume_seq = adm.resume_seq
        session = CallSession(adm.call_id, rate=adm.rate, listen_mode=adm.listen_mode,
                              params=adm.params, lead_ms=s.playout_lead_ms,
                              max_queue_ms=s.max_outbound_queue_ms, resume_seq=resume_seq)
        live = self._new_live(session, ws, adm.campaign)
        self._calls[adm.call_id] = live
        pub, cid = self.publisher, adm.call_id
        if adm.state == "suspended":
            resume.resumed(pub, cid)
            self.metrics.inc("calls_resumed")
        if resume_seq:
            callrecord.timeline(pub, cid, "socket.moved", gateway_id=self.gateway_id,
                                seq=resume_seq, from_gateway=adm.held_by or None)
            log.info("call %s: socket moved here from %s (seq continues at %d)",
                     cid, adm.held_by or "another gateway", resume_seq + 1)
        self._announce(live)
        self.metrics.inc("calls_started")
        log.info("call %s: started (rate %d, mode %s%s)", cid, adm.rate, adm.listen_mode,
                 f", campaign {adm.campaign}" if adm.campaign else "")
        return live

    def _announce(self, live: LiveCall) -> None:
        """Record ``live`` here and a ``call.started`` (next seq) on ``calls`` and
        on the call's stream: how workers learn where the socket is."""
        s, pub, cid = live.session, self.publisher, live.call_id
        started = contracts.encode(s.started_entry(self.gateway_id))
        callrecord.set_state(pub, cid, "live", gateway_id=self.gateway_id, rate=s.rate,
                             listen_mode=s.listen_mode, campaign=live.campaign)
        pub.xadd(keys.CALLS_STREAM, started, maxlen=keys.CALLS_STREAM_MAXLEN)
        pub.xadd(keys.call_stream(cid), started, maxlen=keys.CALL_STREAM_MAXLEN)

    def _resume(self, live: LiveCall, ws: Any) -> None:
        """The suspended call's socket came back here: same session, seq goes on."""
        live.ws, live.resume_by = ws, None
        self._suspended.pop(live.call_id, None)
        resume.resumed(self.publisher, live.call_id)
        callrecord.timeline(self.publisher, live.call_id, "socket.resumed",
                            gateway_id=self.gateway_id)
        self._announce(live)
        self.metrics.inc("calls_resumed")
        log.info("call %s: socket back within the grace; call resumed (seq %d)",
                 live.call_id, live.session.seq)

    # --------------------------------------------------------------- suspend
    def suspend(self, live: LiveCall, why: str) -> None:
        """The socket is gone but the call may come back: keep it resumable for
        the reconnect grace (record ``suspended``), no ``call.ended``."""
        s = live.session
        live.cut_playout()
        for e in s.cut(asyncio.get_running_loop().time()):
            live.publish(e)
        gap = s.gap_entry()
        if gap is not None:
            live.publish(gap)
        now = time.time()
        live.resume_by = now + self.settings.reconnect_grace_s
        live.ws = None
        self._suspended[live.call_id] = live
        resume.suspend(self.publisher, live.call_id, self.gateway_id, now=now,
                       resume_by=live.resume_by, last_seq=s.seq, frames_in=s.frames_in,
                       frames_dropped=s.frames_dropped, why=why)
        self.metrics.inc("calls_suspended")
        log.info("call %s: socket lost (%s); call suspended, resumable for %.0fs",
                 live.call_id, why, self.settings.reconnect_grace_s)

    def forget(self, live: LiveCall) -> None:
        """Drop a call's local session (it ended, or went on elsewhere)."""
        self._suspended.pop(live.call_id, None)
        if self._calls.get(live.call_id) is live:
            del self._calls[live.call_id]
        live.done.set()

    def forget_expired(self, now: float) -> None:
        """Suspended sessions whose grace is over: the sweeper ended them (or the
        call went on on another gateway): forget them."""
        for live in list(self._suspended.values()):
            if live.resume_by is not None and live.resume_by <= now:
                self.forget(live)

    def reregister(self, lost: set[str]) -> None:
        """Redis lost these calls' records (restarted empty): write them again,
        and a new ``call.started`` so that workers and transcribers adopt them."""
        for cid in lost:
            live = self._calls.get(cid)
            if live is None:
                continue
            if live.ws is not None:
                self._announce(live)
            else:
                s = live.session
                callrecord.set_state(self.publisher, cid, "live", gateway_id=self.gateway_id,
                                     rate=s.rate, listen_mode=s.listen_mode,
                                     campaign=live.campaign)
                resume.suspend(self.publisher, cid, self.gateway_id, now=time.time(),
                               resume_by=live.resume_by or time.time(), last_seq=s.seq,
                               frames_in=s.frames_in, frames_dropped=s.frames_dropped,
                               why="reregistered")
            self.metrics.inc("calls_reregistered")
            log.warning("call %s: its record was gone from Redis; registered again", cid)

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
    def detach(self, live: LiveCall, ws: Any, *, clean: bool, too_big: bool = False,
               peer_code: int | None = None) -> None:
        """The handler of ``ws`` finished: end or suspend the call unless ``ws``
        was replaced (or the call was already suspended by a drain).
        ``peer_code``: the close code the platform sent (None: no close frame)."""
        if live.ws is not ws:
            return
        s = live.session
        done = True
        try:
            live.cut_playout()
            frame, odd = s.tail()
            if frame is not None:
                live.publish_frame(frame)
            if odd:
                self.metrics.inc("odd_bytes_dropped", odd)
            dropped = not (s.closing_reason or too_big or peer_code == 1000)
            if dropped and not self.stopping and self.settings.reconnect_grace_s > 0:
                self.suspend(live, "drained" if live.drained else
                             f"close code {peer_code}" if peer_code else "no close frame")
                done = False
                return
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
            if done:
                self.forget(live)

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
