"""The gateway process: the platform's call WebSockets <-> Redis streams.

A thin asyncio shell (``websockets`` server) that wires the gateway's parts:

* ``Handshake`` (``handshake.py``) answers ``/healthz``, ``/readyz``,
  ``/metrics`` and admits or refuses call sockets before the upgrade;
* one handler task per socket attaches it to the ``Registry`` of live calls
  (``registry.py``: attach / replace / detach / end) and hands its frames to
  the call's hot path (``LiveCall.sink``: binary -> 20 ms frames ->
  ``Publisher.add_audio``; text -> ``PlatformEvent``), which
  ``DirectConnection`` calls synchronously for each frame, with no task
  wake-up per frame;
* one ``CommandReader`` task hands commands to the ``Dispatcher``
  (``dispatch.py``), which applies them to the calls this gateway holds and
  answers each with a ``CommandResult``; one playout tick for all calls
  (``playout.py``: a timer, armed only while some call has audio queued)
  paces ``streamAudio``, as the writer's one flusher serves the inbound side;
* a heartbeat task keeps ``keys.gateway_heartbeat`` alive and the gateway in
  ``GATEWAYS_ZSET``, gives this gateway's command stream a TTL (so a dead
  gateway's stream expires) and trims it by time (``COMMAND_KEEP_S`` behind
  what was read: commands carry PCM). When the heartbeat key was gone
  (Redis restarted empty) it writes again the records and ``call.started``
  of the calls this gateway holds whose records vanished, so workers and
  transcribers adopt them again;
* a sweeper task (``resume.Sweeper``) ends suspended calls whose reconnect
  grace passed, this gateway's or any other's;
* SIGTERM: stop accepting (503), wait up to ``drain_grace_s`` for calls to
  end, then hand the rest over: suspend them (records written and flushed
  first, so another gateway resumes their seq), then close with 1012. The
  platform reconnecting to another replica resumes each call there.

A call ends exactly once (``CallEnded`` on the call's stream and on ``calls``,
record ``ended`` with ``end_reason``, keys set to expire) with reason
``platform_closed`` (clean close), ``socket_error`` (abnormal close),
``hangup`` / ``stream_stopped`` (after our command or the platform's ``stop``
event), ``limit_exceeded`` (frame over ``max_frame_bytes``: closed 1009),
``socket_lost`` (the socket dropped and did not come back within
``PV_RECONNECT_GRACE_S``; see ``resume.py``), ``drained`` (only with a
zero grace) or ``gateway_stopped``. Same call id connecting again while live
replaces the socket (see ``registry.py``).
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

from piopiy_voice import keys
from piopiy_voice.observability import setup_logging
from piopiy_voice.redisconn import connect_async, redact_url, resolve_redis_url
from piopiy_voice.settings import Settings

from .commands import CommandReader
from .connection import DirectConnection
from .dispatch import Dispatcher
from .handshake import Handshake
from .metrics import Metrics
from .publisher import Publisher
from .registry import Registry, close_ws
from .resume import Sweeper

log = logging.getLogger("gateway")

HEARTBEAT_EVERY_S = 2.0
HEARTBEAT_TTL_S = 10
CLOSE_DRAINED = 1012
#: Per-gateway keys (the command stream) live this long after the last heartbeat.
GATEWAY_KEYS_TTL_S = 60
#: Commands kept in the command stream behind the last one read (seconds).
#: Read commands are never read again (a restarted gateway starts after the
#: newest), so this only leaves a short trail for debugging.
COMMAND_KEEP_S = 10
#: Gateways whose last heartbeat is older than this leave ``GATEWAYS_ZSET``.
GATEWAY_FORGET_S = 3600


class Gateway:
    def __init__(self, settings: Settings, *, redis_url: str | None = None,
                 host: str | None = None, port: int | None = None,
                 gateway_id: str | None = None) -> None:
        self.settings = settings
        self.host = host if host is not None else settings.gateway_host
        self.port = port if port is not None else settings.gateway_port
        gid = keys.validate_call_id(gateway_id or settings.gateway_id)
        self.redis_url = resolve_redis_url(redis_url or settings.redis_url)
        self.metrics = Metrics()
        try:
            self.publisher = Publisher(self.redis_url, metrics=self.metrics,
                                       buffer_frames=settings.redis_buffer_frames)
        except ValueError as exc:
            raise ValueError(str(exc).replace(self.redis_url, redact_url(self.redis_url))) from None
        self.redis = connect_async(self.redis_url, socket_timeout=settings.redis_socket_timeout_s)
        self.registry = Registry(gateway_id=gid, settings=settings, publisher=self.publisher,
                                 metrics=self.metrics)
        self.handshake = Handshake(settings=settings, metrics=self.metrics, redis=self.redis,
                                   is_live=self.registry.has_socket,
                                   live_count=self.registry.__len__,
                                   writer_state=self._writer_state)
        self.sweeper = Sweeper(self.redis, gateway_id=gid, metrics=self.metrics,
                               every_s=min(1.0, max(0.05, settings.reconnect_grace_s / 4)),
                               on_swept=self.registry.forget_expired)
        self.dispatch = Dispatcher(registry=self.registry, redis=self.redis, metrics=self.metrics)
        self.reader = CommandReader(self.redis, keys.gateway_commands(gid),
                                    self.dispatch.on_command, metrics=self.metrics)
        self._tasks: list[asyncio.Task] = []
        self._server: Any = None
        self.metrics.gauge("calls_live", lambda: len(self.registry))
        self.metrics.gauge("draining", lambda: float(self.draining))
        self.metrics.gauge("redis_connected", lambda: float(self.publisher.connected))
        self.metrics.gauge("redis_buffered_frames", lambda: self.publisher.pending_frames)
        self.metrics.gauge("writer_alive", lambda: float(self.publisher.alive))
        self.metrics.gauge("calls_suspended", lambda: self.registry.suspended_count)
        self.metrics.gauge("handshakes_pending", lambda: self.handshake.pending)
        self.metrics.gauge("calls_speaking", lambda: len(self.registry.playout))
        self._beats = 0

    def _writer_state(self) -> tuple[bool, str]:
        pub = self.publisher
        if not pub.alive:
            return False, "redis writer not running"
        if not pub.connected:
            return False, f"redis writer not connected ({pub.last_error or 'connecting'})"
        return True, "ok"

    @property
    def gateway_id(self) -> str:
        return self.registry.gateway_id

    @property
    def draining(self) -> bool:
        """Refusing new sockets (held by the handshake, which enforces it)."""
        return self.handshake.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.handshake.draining = value

    # ------------------------------------------------------------- lifecycle
    async def start(self) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self.publisher.start()
        self._tasks = [
            loop.create_task(self.reader.run(), name="commands"),
            loop.create_task(self._heartbeat(), name="heartbeat"),
            loop.create_task(self.sweeper.run(), name="sweeper"),
        ]
        s = self.settings
        conn_cls = type("GatewayConnection", (DirectConnection,), {"gate": self.handshake})
        self._server = await serve(
            self._handler, self.host, self.port,
            process_request=self.handshake.process_request,
            compression=None,
            max_size=s.max_frame_bytes,
            max_queue=64,
            server_header=None,
            create_connection=conn_cls,
        )
        sock = next(iter(self._server.sockets))
        self.port = sock.getsockname()[1]
        log.info("gateway %s listening on %s:%d", self.gateway_id, self.host, self.port)
        return self.host, self.port

    async def drain(self, grace_s: float | None = None) -> None:
        """Stop accepting, let calls end for ``grace_s``, close the rest with 1012."""
        grace = self.settings.drain_grace_s if grace_s is None else grace_s
        self.draining = True
        log.info("gateway %s draining: %d calls, grace %.1fs", self.gateway_id,
                 len(self.registry), grace)
        deadline = time.monotonic() + grace
        while len(self.registry) and time.monotonic() < deadline:
            await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        remaining = [lv for lv in self.registry if lv.ws is not None]
        if self.settings.reconnect_grace_s > 0:
            # Hand the calls over: suspended (records say where seq stands)
            # and flushed *before* the sockets close, so a platform reconnecting
            # to another replica at once finds the call resumable there.
            sockets = []
            for live in remaining:
                ws = live.ws
                live.drained = True
                if isinstance(ws, DirectConnection):
                    ws.set_sink(self._after_suspend(live.session.frame_bytes))
                self.registry.suspend(live, "drained")
                sockets.append(ws)
            if not await self.publisher.flush(5.0):
                log.warning("drain: Redis did not take the suspensions within 5 s")
            log.info("drain: %d calls handed over (closing with 1012)", len(sockets))
            await asyncio.gather(*(close_ws(ws, CLOSE_DRAINED, "gateway restarting")
                                   for ws in sockets))
            return
        for live in remaining:
            live.drained = True
            log.info("call %s: closing with 1012 after drain grace", live.call_id)
        # Concurrently: one unresponsive peer must not hold up the others' close.
        await asyncio.gather(*(close_ws(lv.ws, CLOSE_DRAINED, "gateway restarting")
                               for lv in remaining))
        for live in remaining:
            try:
                await asyncio.wait_for(live.done.wait(), 5.0)
            except asyncio.TimeoutError:
                log.warning("call %s: handler did not finish after close", live.call_id)

    def _after_suspend(self, frame_bytes: int) -> Callable[[bool, Any], None]:
        """The sink of a drained socket between its suspension and its close:
        frames past the recorded seq, so not published; counted (in the
        call's own 20 ms frames: 320 bytes only at 8 kHz)."""
        inc = self.metrics.inc

        def sink(binary: bool, msg: Any) -> None:
            if binary:
                inc("frames_dropped_suspended", max(1, len(msg) // frame_bytes))
        return sink

    async def stop(self) -> None:
        """Close the listener and any remaining sockets (reason ``gateway_stopped``),
        write what is buffered, remove the heartbeat. Call ``drain`` first for a
        graceful shutdown."""
        self.draining = True
        self.registry.stopping = True
        if self._server is not None:
            self._server.close(close_connections=True)
            await self._server.wait_closed()
        self.reader.stop()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.dispatch.close()
        self.registry.playout.close()
        await self.publisher.close()
        try:
            await self.redis.delete(keys.gateway_heartbeat(self.gateway_id),
                                    keys.gateway_commands(self.gateway_id))
            await self.redis.zrem(keys.GATEWAYS_ZSET, self.gateway_id)
        except Exception as exc:  # noqa: BLE001 (best effort on the way out)
            log.warning("could not remove heartbeat: %r", exc)
        await self.redis.aclose()
        log.info("gateway %s stopped", self.gateway_id)

    async def _heartbeat(self) -> None:
        while True:
            try:
                await self.beat()
            except Exception as exc:  # noqa: BLE001 (keep beating through outages)
                self.metrics.inc("redis_errors")
                log.warning("heartbeat failed: %r", exc)
            await asyncio.sleep(HEARTBEAT_EVERY_S)

    async def beat(self) -> None:
        """One heartbeat: presence, per-gateway keys' TTL and trimming, and
        re-registration of held calls after Redis lost them."""
        hb, cmds = keys.gateway_heartbeat(self.gateway_id), keys.gateway_commands(self.gateway_id)
        now = time.time()
        async with self.redis.pipeline(transaction=False) as p:
            p.set(hb, f"{now:.3f}", ex=HEARTBEAT_TTL_S, get=True)
            p.zadd(keys.GATEWAYS_ZSET, {self.gateway_id: now})
            p.zremrangebyscore(keys.GATEWAYS_ZSET, "-inf", now - GATEWAY_FORGET_S)
            p.expire(cmds, GATEWAY_KEYS_TTL_S)
            last = self.reader.last_id
            if last and last != b"0-0":
                keep_ms = keys.entry_ms(last) - COMMAND_KEEP_S * 1000
                if keep_ms > 0:
                    p.xtrim(cmds, minid=str(keep_ms), approximate=True)
            previous = (await p.execute())[0]
        first, self._beats = self._beats == 0, self._beats + 1
        if previous is None and not first:
            await self._reregister()

    async def _reregister(self) -> None:
        """Our heartbeat key was gone: Redis restarted (empty) or we stalled past
        its TTL. Calls whose records vanished are registered again."""
        held = [lv.call_id for lv in self.registry]
        log.warning("heartbeat key was gone (Redis restarted?); checking %d calls", len(held))
        if not held:
            return
        async with self.redis.pipeline(transaction=False) as p:
            for cid in held:
                p.exists(keys.call_meta(cid))
            found = await p.execute()
        lost = {cid for cid, n in zip(held, found) if not n}
        if lost:
            self.registry.reregister(lost)

    # ---------------------------------------------------------------- socket
    async def _handler(self, ws: ServerConnection) -> None:
        adm = self.handshake.admission_of(ws)
        live = self.registry.attach(ws, adm)
        on_message = live.sink(ws)
        direct = isinstance(ws, DirectConnection)
        if direct:
            ws.set_sink(on_message)
        clean, too_big = True, False
        try:
            # Only messages the direct path handed back (fragmented ones) arrive
            # here; this loop also ends when the socket closes.
            async for msg in ws:
                on_message(msg.__class__ is bytes, msg)
        except ConnectionClosedError as exc:
            clean = False
            # Our 1009 (an inbound frame over max_frame_bytes) only if we closed
            # first: a peer closing with 1009 (our message too big for it) gets
            # its code echoed back, which is not an inbound frame of ours.
            too_big = (exc.sent is not None and exc.sent.code == 1009
                       and not exc.rcvd_then_sent)
        except Exception:
            log.exception("call %s: handler failed", adm.call_id)
            clean = False
        finally:
            if direct and live.ws is ws:
                ws.set_sink(None)
            proto = ws.protocol
            rcvd = proto.close_rcvd
            peer_code = rcvd.code if rcvd is not None else None
            if rcvd is not None and proto.close_rcvd_then_sent and rcvd.code != 1000:
                log.warning("call %s: the platform closed the socket with %d %s", adm.call_id,
                            rcvd.code, rcvd.reason or "")
            self.registry.detach(live, ws, clean=clean, too_big=too_big, peer_code=peer_code)


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
    setup_logging("gateway", level=settings.log_level, fmt=settings.log_format,
                  instance=args.gateway_id)
    fast = False if args.no_uvloop else _install_uvloop()
    if settings.using_dev_secret and settings.gateway_public_url.lower().startswith("wss://"):
        # A wss:// public URL is a production deployment: anyone who read the
        # published development secret could sign URLs for it.
        print("piopiy-voice gateway: refusing to start: PV_SIGNING_SECRET is the published "
              "development secret while PV_GATEWAY_PUBLIC_URL is wss:// (production). "
              "Set PV_SIGNING_SECRET or PV_SIGNING_SECRET_FILE to a secret of your own "
              "(e.g. `openssl rand -hex 32`).", file=sys.stderr)
        return 2
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
