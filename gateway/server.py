"""The gateway process: the platform's call WebSockets <-> Redis streams.

A thin asyncio shell (``websockets`` server) around ``CallSession``:

* ``process_request`` answers ``/healthz``, ``/readyz``, ``/metrics`` and
  refuses call sockets before the upgrade: bad signature 401, expired URL 403,
  unknown path 404, bad ``rate`` param 400, draining or ``max_calls`` reached 503.
* one handler task per socket registers the call; its inbound hot path
  (binary -> 20 ms frames -> ``Publisher.add_audio``; text -> ``PlatformEvent``)
  is a per-call closure that ``DirectConnection`` calls synchronously for each
  frame, with no task wake-up per frame;
* one ``CommandReader`` task hands commands to the ``Dispatcher``
  (``piopiy_voice.gateway.dispatch``), which applies them to the sessions this gateway holds
  and answers each with a ``CommandResult``; a playout task per call (only
  while it has audio queued) paces ``streamAudio``;
* a heartbeat task keeps ``keys.gateway_heartbeat`` alive and the gateway in
  ``GATEWAYS_ZSET``;
* SIGTERM: stop accepting (503), wait up to ``drain_grace_s`` for calls to
  end, then close the rest with 1012 (reason ``drained``).

A call ends exactly once (``CallEnded`` on the call's stream and on ``calls``,
record ``ended`` with ``end_reason``, keys set to expire) with reason
``platform_closed`` (clean close), ``socket_error`` (abnormal close),
``hangup`` / ``stream_stopped`` (after our command or the platform's ``stop``
event), ``limit_exceeded`` (frame over ``max_frame_bytes``: closed 1009),
``drained`` (SIGTERM grace over: closed 1012) or ``gateway_stopped``.

Same call id connecting again while live: the new socket *replaces* the old
one (the platform reconnecting after a network blip is the likely cause, and
refusing would leave the call deaf until the dead socket times out). The old
socket is closed with 4000, the call continues with the same session and
``seq``, queued playout is cut (reported interrupted) and the timeline says
``socket.replaced``; no second CallStarted, no CallEnded. (Across gateway
replicas this is not detected: the newest gateway takes over the record.)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from typing import Any, Callable

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosedError
from websockets.http11 import Request, Response

from piopiy_voice import callrecord, contracts, keys
from piopiy_voice.redisconn import connect_async, resolve_redis_url
from piopiy_voice.settings import Settings
from piopiy_voice.signing import SignatureError, verify_stream_path

from .commands import CommandReader
from .connection import DirectConnection
from .dispatch import Dispatcher, LiveCall, close_ws, publish_entry
from .metrics import Metrics
from .publisher import Publisher
from .session import CallSession

log = logging.getLogger("gateway")

HEARTBEAT_EVERY_S = 2.0
HEARTBEAT_TTL_S = 10
CLOSE_REPLACED = 4000
CLOSE_DRAINED = 1012


class Gateway:
    def __init__(self, settings: Settings, *, redis_url: str | None = None,
                 host: str | None = None, port: int | None = None,
                 gateway_id: str | None = None) -> None:
        self.settings = settings
        self.host = host if host is not None else settings.gateway_host
        self.port = port if port is not None else settings.gateway_port
        self.gateway_id = keys.validate_call_id(gateway_id or settings.gateway_id)
        self.redis_url = resolve_redis_url(redis_url or settings.redis_url)
        self.metrics = Metrics()
        self.sessions: dict[str, LiveCall] = {}
        self.draining = False
        self.publisher = Publisher(self.redis_url, metrics=self.metrics,
                                   buffer_frames=settings.redis_buffer_frames)
        self.redis = connect_async(self.redis_url, socket_timeout=settings.redis_socket_timeout_s)
        self.dispatch = Dispatcher(sessions=self.sessions, publisher=self.publisher,
                                   redis=self.redis, metrics=self.metrics,
                                   gateway_id=self.gateway_id)
        self.reader = CommandReader(self.redis, keys.gateway_commands(self.gateway_id),
                                    self.dispatch.on_command, metrics=self.metrics)
        self._tasks: list[asyncio.Task] = []
        self._server: Any = None
        self._stopping = False
        self.metrics.gauge("calls_live", lambda: len(self.sessions))
        self.metrics.gauge("draining", lambda: float(self.draining))
        self.metrics.gauge("redis_connected", lambda: float(self.publisher.connected))
        self.metrics.gauge("redis_buffered_frames", lambda: self.publisher.frames)

    # ------------------------------------------------------------- lifecycle
    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self.publisher.start()
        self._tasks = [
            loop.create_task(self.reader.run(), name="commands"),
            loop.create_task(self._heartbeat(), name="heartbeat"),
        ]
        s = self.settings
        self._server = await serve(
            self._handler, self.host, self.port,
            process_request=self._process_request,
            compression=None,
            max_size=s.max_frame_bytes,
            max_queue=64,
            server_header=None,
            create_connection=DirectConnection,
        )
        sock = next(iter(self._server.sockets))
        self.port = sock.getsockname()[1]
        log.info("gateway %s listening on %s:%d (redis %s)", self.gateway_id, self.host,
                 self.port, self.redis_url)
        return self.host, self.port

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop accepting, let calls end for ``grace_s``, close the rest with 1012."""
        grace = self.settings.drain_grace_s if grace_s is None else grace_s
        self.draining = True
        log.info("gateway %s draining: %d calls, grace %.1fs", self.gateway_id,
                 len(self.sessions), grace)
        deadline = time.monotonic() + grace
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        remaining = list(self.sessions.values())
        for live in remaining:
            live.drained = True
            log.info("call %s: closing with 1012 after drain grace", live.session.call_id)
        # Concurrently: one unresponsive peer must not hold up the others' close.
        await asyncio.gather(*(close_ws(lv.ws, CLOSE_DRAINED, "gateway restarting")
                               for lv in remaining))
        for live in remaining:
            try:
                await asyncio.wait_for(live.done.wait(), 5.0)
            except asyncio.TimeoutError:
                log.warning("call %s: handler did not finish after close", live.session.call_id)

    async def stop(self) -> None:
        """Close the listener and any remaining sockets (reason ``gateway_stopped``),
        write what is buffered, remove the heartbeat. Call ``drain`` first for a
        graceful shutdown."""
        self.draining = True
        self._stopping = True
        if self._server is not None:
            self._server.close(close_connections=True)
            await self._server.wait_closed()
        self.reader.stop()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.dispatch.close()
        await self.publisher.close()
        try:
            await self.redis.delete(keys.gateway_heartbeat(self.gateway_id))
            await self.redis.zrem(keys.GATEWAYS_ZSET, self.gateway_id)
        except Exception as exc:  # noqa: BLE001 (best effort on the way out)
            log.warning("could not remove heartbeat: %r", exc)
        await self.redis.aclose()
        log.info("gateway %s stopped", self.gateway_id)

    async def _heartbeat(self) -> None:
        hb = keys.gateway_heartbeat(self.gateway_id)
        while True:
            try:
                async with self.redis.pipeline(transaction=False) as p:
                    p.set(hb, f"{time.time():.3f}", ex=HEARTBEAT_TTL_S)
                    p.zadd(keys.GATEWAYS_ZSET, {self.gateway_id: time.time()})
                    await p.execute()
            except Exception as exc:  # noqa: BLE001 (keep beating through outages)
                self.metrics.inc("redis_errors")
                log.warning("heartbeat failed: %r", exc)
            await asyncio.sleep(HEARTBEAT_EVERY_S)

    # ------------------------------------------------------------- handshake
    async def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = request.path
        route = path.split("?", 1)[0]
        if route == "/healthz":
            return conn.respond(200, "ok\n")
        if route == "/readyz":
            ok, why = await self._ready()
            return conn.respond(200 if ok else 503, why + "\n")
        if route == "/metrics":
            resp = conn.respond(200, self.metrics.render())
            resp.headers["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
            return resp
        try:
            target = verify_stream_path(path, self.settings.signing_secret)
        except SignatureError as exc:
            return self._refuse(conn, 403 if exc.expired else 401, exc.reason, route)
        except ValueError:
            return self._refuse(conn, 404, "not found", route)
        if self.draining:
            return self._refuse(conn, 503, "gateway draining", target.call_id)
        if target.call_id not in self.sessions and len(self.sessions) >= self.settings.max_calls:
            return self._refuse(conn, 503, f"max calls ({self.settings.max_calls}) reached",
                                target.call_id)
        try:
            rate = int(target.params.get("rate", "8000"))
            if rate not in contracts.VOICE_RATES:
                raise ValueError
        except ValueError:
            return self._refuse(conn, 400, f"rate must be one of {contracts.VOICE_RATES}",
                                target.call_id)
        conn.pv_target = target  # type: ignore[attr-defined]
        # Read before the upgrade: no frame can arrive yet, so waiting costs nothing
        # but handshake time (after it, frames would pile up ahead of the sink).
        conn.pv_seq_base = (  # type: ignore[attr-defined]
            0 if target.call_id in self.sessions else await self._last_seq(target.call_id))
        return None

    def _refuse(self, conn: ServerConnection, status: int, why: str, what: str) -> Response:
        self.metrics.inc("handshakes_refused")
        log.info("refused %s: %d %s", what, status, why)
        return conn.respond(status, why + "\n")

    async def _ready(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        try:
            async with asyncio.timeout(1.0):
                await self.redis.ping()
        except Exception as exc:  # noqa: BLE001
            return False, f"redis unreachable: {exc!r}"
        return True, "ready"

    # ---------------------------------------------------------------- socket
    async def _handler(self, ws: ServerConnection) -> None:
        target = ws.pv_target  # type: ignore[attr-defined]
        cid = target.call_id
        live = self._attach(ws, target, getattr(ws, "pv_seq_base", 0))
        on_message = self._message_sink(live)
        if isinstance(ws, DirectConnection):
            ws.set_sink(on_message)
        clean, too_big = True, False
        try:
            # Only messages the direct path handed back (fragmented ones) arrive
            # here; this loop also ends when the socket closes.
            async for msg in ws:
                on_message(msg.__class__ is bytes, msg)
        except ConnectionClosedError as exc:
            clean = False
            too_big = exc.sent is not None and exc.sent.code == 1009
        except Exception:
            log.exception("call %s: handler failed", cid)
            clean = False
        finally:
            if isinstance(ws, DirectConnection):
                ws.set_sink(None)
            self._detach(live, clean, too_big)

    def _message_sink(self, live: LiveCall) -> Callable[[bool, Any], None]:
        """The per-call hot path, as a closure over everything it touches."""
        session, pub, m = live.session, self.publisher, self.metrics.c
        add, feed, prefix, fb = pub.add_audio, session.feed_audio, live.prefix, session.frame_bytes
        publish_slow, on_text = self._publish_slow, self._on_text

        def on_message(binary: bool, msg: Any) -> None:
            if not binary:
                on_text(live, msg)
                return
            n = len(msg)
            m["bytes_in"] += n
            # No pydantic, no allocation when the platform sends 20 ms frames.
            if n == fb and not session.pending:
                session.frames_in += 1
                m["frames_in"] += 1
                if live.gap_pending or not add(prefix, session.seq + 1, msg):
                    publish_slow(live, msg)
                else:
                    session.seq += 1
                return
            frames = feed(msg)
            m["frames_in"] += len(frames)
            for frame in frames:
                if live.gap_pending or not add(prefix, session.seq + 1, frame):
                    publish_slow(live, frame)
                else:
                    session.seq += 1

        return on_message

    def _publish_slow(self, live: LiveCall, frame: bytes) -> None:
        """A frame while frames are being dropped or a gap is still unreported."""
        s, pub = live.session, self.publisher
        if live.gap_pending and pub.frames < pub.limit:
            self._emit_gap(live)
        s.seq += 1
        if not pub.add_audio(live.prefix, s.seq, frame):
            s.frames_dropped += 1
            live.gap_pending += 1
            self.metrics.c["frames_dropped"] += 1

    async def _last_seq(self, cid: str) -> int:
        """The seq this call's stream has reached, when another gateway held its
        socket before (that gateway died and the platform reconnected here): the
        new session continues from it, or workers would drop its entries as
        duplicates. 0 for a new call, or when Redis cannot answer within a second."""
        try:
            async with asyncio.timeout(1.0):
                last = await self.redis.xrevrange(keys.call_stream(cid), count=1)
        except Exception as exc:  # noqa: BLE001 - a new call must not fail on this
            log.warning("call %s: cannot read the stream's last seq: %r", cid, exc)
            return 0
        if not last:
            return 0
        seq = last[0][1].get(b"seq", b"0")
        return int(seq) if seq.isdigit() else 0

    def _attach(self, ws: ServerConnection, target: Any, seq_base: int = 0) -> LiveCall:
        cid = target.call_id
        old = self.sessions.get(cid)
        if old is not None:
            old.replaced = True
            live = LiveCall(old.session, ws, old.prefix, old.campaign)
            self.sessions[cid] = live
            self.dispatch.cancel_playout(old)
            for e in old.session.cut(asyncio.get_running_loop().time()):
                self._entry(cid, e)
            callrecord.timeline(self.publisher, cid, "socket.replaced", gateway_id=self.gateway_id)
            self.metrics.inc("calls_replaced")
            log.info("call %s: new socket replaces the old one", cid)
            asyncio.get_running_loop().create_task(
                close_ws(old.ws, CLOSE_REPLACED, "replaced by a new connection"))
            return live
        p = target.params
        rate = int(p.get("rate", "8000"))
        mode = p.get("mode", "callee")
        campaign = p.get("campaign") or None
        s = self.settings
        session = CallSession(cid, rate=rate, listen_mode=mode, gateway_id=self.gateway_id,
                              params=p, lead_ms=s.playout_lead_ms,
                              max_queue_ms=s.max_outbound_queue_ms)
        session.seq = seq_base
        live = LiveCall(session, ws, self.publisher.audio_prefix(cid), campaign)
        self.sessions[cid] = live
        started = contracts.encode(session.started_entry())
        pub = self.publisher
        if seq_base:
            callrecord.timeline(pub, cid, "socket.moved", gateway_id=self.gateway_id, seq=seq_base)
            log.info("call %s: socket moved here from another gateway (seq continues at %d)",
                     cid, seq_base + 1)
        callrecord.set_state(pub, cid, "live", gateway_id=self.gateway_id, rate=rate,
                             listen_mode=mode, campaign=campaign)
        pub.xadd(keys.CALLS_STREAM, started, maxlen=keys.CALLS_STREAM_MAXLEN)
        pub.xadd(keys.call_stream(cid), started, maxlen=keys.CALL_STREAM_MAXLEN)
        self.metrics.inc("calls_started")
        log.info("call %s: started (rate %d, mode %s%s)", cid, rate, mode,
                 f", campaign {campaign}" if campaign else "")
        return live

    def _detach(self, live: LiveCall, clean: bool, too_big: bool = False) -> None:
        s = live.session
        cid = s.call_id
        try:
            if live.replaced:
                return
            self.dispatch.cancel_playout(live)
            frame, odd = s.tail()
            if frame is not None:
                s.seq += 1
                if not self.publisher.add_audio(live.prefix, s.seq, frame):
                    s.frames_dropped += 1
            if odd:
                self.metrics.inc("odd_bytes_dropped", odd)
            code = live.ws.close_code
            if live.drained:
                reason = "drained"
            elif self._stopping:
                reason = "gateway_stopped"
            elif s.closing_reason:
                reason = s.closing_reason
            elif too_big:
                reason = "limit_exceeded"
            elif not clean:
                reason = "socket_error"
            else:
                reason = "platform_closed"
            self._end(live, reason)
            self.metrics.inc("odd_frames", s.odd_frames)
            log.info("call %s: ended (%s; close code %s; %d frames in, %d dropped, %d odd frames)",
                     cid, reason, code, s.frames_in, s.frames_dropped, s.odd_frames)
            if too_big:
                log.warning("call %s: frame larger than %d bytes, closed with 1009",
                            cid, self.settings.max_frame_bytes)
        finally:
            if self.sessions.get(cid) is live:
                del self.sessions[cid]
            live.done.set()

    def _end(self, live: LiveCall, reason: str) -> None:
        s = live.session
        cid = s.call_id
        if live.gap_pending:
            self._emit_gap(live)
        entries = s.end(reason, asyncio.get_running_loop().time())
        if not entries:
            return
        pub = self.publisher
        for e in entries:
            self._entry(cid, e)
        pub.xadd(keys.CALLS_STREAM, contracts.encode(entries[-1]), maxlen=keys.CALLS_STREAM_MAXLEN)
        callrecord.set_state(pub, cid, "ended", end_reason=reason, gateway_id=self.gateway_id,
                             campaign=live.campaign)
        callrecord.expire_call(pub, cid)
        self.metrics.inc("calls_ended")

    def _emit_gap(self, live: LiveCall) -> None:
        s = live.session
        gap = contracts.StreamGap(call_id=s.call_id, seq=s.next_seq(), frames=live.gap_pending,
                                  reason="redis_unavailable")
        log.warning("call %s: %d frames dropped while redis was unavailable",
                    s.call_id, live.gap_pending)
        live.gap_pending = 0
        self._entry(s.call_id, gap)

    def _on_text(self, live: LiveCall, text: str) -> None:
        self.metrics.inc("text_frames")
        if not self.publisher.has_room:
            # Redis has been away long enough to fill the buffer: the platform's
            # text must not grow it without bound.
            self.metrics.inc("events_dropped")
            return
        entry, kind = live.session.parse_text(text)
        if entry is None:
            self.metrics.inc("text_malformed")
            if live.session.text_malformed <= 3:  # enough to debug, not a log flood
                log.warning("call %s: ignoring malformed text frame %.80r", live.session.call_id,
                            text)
            return
        if kind == "unknown":
            self.metrics.inc("events_unknown")
            log.info("call %s: unknown platform event %r", entry.call_id, entry.event)
        self._entry(entry.call_id, entry)

    def _entry(self, cid: str, model: Any) -> None:
        publish_entry(self.publisher, cid, model)

# ---------------------------------------------------------------------- CLI
def _install_uvloop() -> bool:
    try:
        import uvloop  # noqa: PLC0415 (optional speed-up)
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


async def _serve(gw: Gateway) -> None:
    await gw.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await gw.drain()
    await gw.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="piopiy-voice gateway",
                                 description="Serve the platform's call WebSockets.")
    ap.add_argument("--host", help="bind address (PV_GATEWAY_HOST)")
    ap.add_argument("--port", type=int, help="port, 0 for any free one (PV_GATEWAY_PORT)")
    ap.add_argument("--gateway-id", help="this replica's id (PV_GATEWAY_ID)")
    ap.add_argument("--redis-url", help="Redis URL (REDIS_URL)")
    ap.add_argument("--drain-grace", type=float, help="seconds to drain on SIGTERM")
    ap.add_argument("--no-uvloop", action="store_true", help="use the default asyncio loop")
    args = ap.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"piopiy-voice gateway: {exc}", file=sys.stderr)
        return 2
    if args.drain_grace is not None:
        settings = settings.model_copy(update={"drain_grace_s": args.drain_grace})
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fast = False if args.no_uvloop else _install_uvloop()
    if settings.using_dev_secret:
        log.warning("PV_SIGNING_SECRET not set: using the insecure development secret")
    try:
        gw = Gateway(settings, redis_url=args.redis_url, host=args.host, port=args.port,
                     gateway_id=args.gateway_id)
    except ValueError as exc:
        print(f"piopiy-voice gateway: {exc}", file=sys.stderr)
        return 2
    log.info("event loop: %s", "uvloop" if fast else "asyncio")
    asyncio.run(_serve(gw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
