"""Admission of a socket, before the WebSocket upgrade: routes, signature, limits.

Theory of operation
-------------------
``websockets`` calls ``Handshake.process_request`` with every HTTP request
before upgrading it. Plain routes are answered here (``/healthz``,
``/readyz``, ``/metrics``); anything else must be a signed stream URL
(``piopiy_voice.signing``) and is refused before the upgrade: bad signature
401, expired URL 403, unknown path 404, bad ``rate`` param 400, draining or
``max_calls`` reached 503, a call that has ended (or whose reconnect grace
passed) 410: a call's URL never re-opens it.

Admission is atomic: a slot is *reserved* synchronously, before the first
await (the record check), and released if the handshake then fails or the
connection goes away before its handler claims it, so concurrent handshakes
can never admit more than ``max_calls``. Connections still in the handshake
are capped too (``max_handshakes``: beyond it a new connection is closed at
once, before reading a byte). Every refusal is counted by reason and status,
including those websockets answers itself (414, 431, 426, 405...): the
connection reports each HTTP response it sends (``DirectConnection``).

An accepted request yields an ``Admission``: what the call socket is (call id,
rate, listen mode, campaign, params), what the record said (``resume.claim``:
state, which gateway held it) and where its sequence resumes: if another
gateway held its socket (and died or drained, and the platform reconnected
here) the call's stream already holds entries, and the new session must
continue after their ``seq`` or workers would drop its entries as
duplicates. No frame can arrive before the upgrade, so waiting here costs
nothing but handshake time.

The admission is kept against its connection object (weakly: a connection
that never upgrades takes it with it) until the socket handler claims it
with ``admission_of``.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from piopiy_voice.audio.pcm import SUPPORTED_RATES
from piopiy_voice.settings import Settings
from piopiy_voice.signing import SignatureError, verify_stream_path

from . import resume
from .metrics import STATUS_REASONS, Metrics

log = logging.getLogger("gateway")

@dataclass(frozen=True)
class Admission:
    """An accepted call socket, as the signed URL described it."""

    call_id: str
    rate: int
    listen_mode: str
    campaign: str | None
    params: dict[str, str] = field(default_factory=dict)
    #: The seq the call's stream had reached when its socket came here from
    #: another gateway (0: a new call, or the call is live here already).
    resume_seq: int = 0
    #: The record's state when the socket arrived ("" if no record, or unread).
    state: str = ""
    #: The gateway the record named.
    held_by: str = ""


class Handshake:
    def __init__(self, *, settings: Settings, metrics: Metrics, redis: Any,
                 is_live: Callable[[str], bool], live_count: Callable[[], int],
                 writer_state: Callable[[], tuple[bool, str]] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.redis = redis
        self.is_live = is_live
        self.live_count = live_count
        #: (ok, why) of the Redis writer, for readiness.
        self.writer_state = writer_state
        #: Refuse new sockets (503) and report not ready: set on SIGTERM.
        self.draining = False
        #: Slots reserved by handshakes admitted but not yet attached.
        self.reserved = 0
        #: Connections opened and not yet through their handshake.
        self.pending = 0
        self._reservations: weakref.WeakSet[ServerConnection] = weakref.WeakSet()
        self._admitted: weakref.WeakKeyDictionary[ServerConnection, Admission] = \
            weakref.WeakKeyDictionary()
        self._routes: dict[str, Callable[[ServerConnection], Awaitable[Response]]] = {
            "/healthz": self._healthz, "/readyz": self._readyz, "/metrics": self._metrics,
        }

    def admission_of(self, conn: ServerConnection) -> Admission:
        """The admission of an upgraded connection (claimed once; its reserved
        slot passes to the registry, which the caller attaches it to now)."""
        self._release(conn)
        return self._admitted.pop(conn)

    # ------------------------------------------------- connection accounting
    def connection_opened(self, conn: ServerConnection) -> bool:
        """A TCP connection arrived: False (close it now) if too many are
        still in their handshake."""
        if self.pending >= self.settings.max_handshakes:
            self.metrics.refused("handshake_backlog")
            return False
        self.pending += 1
        conn.counted_pending = True
        return True

    def handshake_over(self, conn: ServerConnection) -> None:
        if getattr(conn, "counted_pending", False):
            conn.counted_pending = False
            self.pending -= 1

    def response_sent(self, conn: ServerConnection, status: int) -> None:
        """Every HTTP response of a connection: count the refusals."""
        self.handshake_over(conn)
        if status != 101:
            self._release(conn)  # e.g. admitted by us, then refused by websockets (426)
        if status >= 400:
            reason = getattr(conn, "refusal", None) or STATUS_REASONS.get(status, "other")
            self.metrics.refused(reason)

    def connection_lost(self, conn: ServerConnection) -> None:
        self.handshake_over(conn)
        self._release(conn)

    def _reserve(self, conn: ServerConnection) -> bool:
        if self.live_count() + self.reserved >= self.settings.max_calls:
            return False
        self.reserved += 1
        self._reservations.add(conn)
        return True

    def _release(self, conn: ServerConnection) -> None:
        if conn in self._reservations:
            self._reservations.discard(conn)
            self.reserved -= 1

    async def process_request(self, conn: ServerConnection,
                              request: Request) -> Response | None:
        path = request.path
        route = self._routes.get(path.split("?", 1)[0])
        if route is not None:
            return await route(conn)
        try:
            target = verify_stream_path(path, self.settings.signing_secret)
        except SignatureError as exc:
            return self._refuse(conn, 403 if exc.expired else 401, exc.reason,
                                path.split("?", 1)[0],
                                "expired" if exc.expired else "bad_signature")
        except ValueError:
            return self._refuse(conn, 404, "not found", path.split("?", 1)[0], "not_found")
        cid, p = target.call_id, target.params
        if self.draining:
            return self._refuse(conn, 503, "gateway draining", cid, "draining")
        try:
            rate = int(p.get("rate", "8000"))
            if rate not in SUPPORTED_RATES:
                raise ValueError
        except ValueError:
            return self._refuse(conn, 400, f"rate must be one of {SUPPORTED_RATES}", cid,
                                "bad_rate")
        has_socket = self.is_live(cid)
        # Reserve before the first await: check and registration are one step.
        if not has_socket and not self._reserve(conn):
            return self._refuse(conn, 503, f"max calls ({self.settings.max_calls}) reached",
                                cid, "max_calls")
        try:
            claim = await self._claim(cid)
        except resume.CallGone as exc:
            self._release(conn)
            return self._refuse(conn, 410, f"{exc}: its URL cannot open it again", cid,
                                "call_ended")
        except BaseException:
            self._release(conn)
            raise
        if self.draining:  # SIGTERM arrived while we waited
            self._release(conn)
            return self._refuse(conn, 503, "gateway draining", cid, "draining")
        self._admitted[conn] = Admission(
            call_id=cid, rate=rate, listen_mode=p.get("mode", "callee"),
            campaign=p.get("campaign") or None, params=dict(p),
            resume_seq=0 if has_socket else claim.last_seq,
            state=claim.state, held_by=claim.gateway_id)
        return None

    def _refuse(self, conn: ServerConnection, status: int, why: str, what: str,
                reason: str) -> Response:
        conn.refusal = reason  # counted when the response goes out (response_sent)
        log.info("refused %s: %d %s", what, status, why)
        return conn.respond(status, why + "\n")

    # ---------------------------------------------------------------- routes
    async def _healthz(self, conn: ServerConnection) -> Response:
        return conn.respond(200, "ok\n")

    async def _readyz(self, conn: ServerConnection) -> Response:
        ok, why = await self.ready()
        return conn.respond(200 if ok else 503, why + "\n")

    async def _metrics(self, conn: ServerConnection) -> Response:
        return self.metrics.respond(conn)  # exactly one Content-Type header

    async def ready(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if self.writer_state is not None:
            ok, why = self.writer_state()
            if not ok:
                return False, why
        try:
            async with asyncio.timeout(1.0):
                await self.redis.ping()
        except Exception as exc:  # noqa: BLE001
            return False, f"redis unreachable: {exc!r}"
        return True, "ready"

    async def _claim(self, cid: str) -> resume.Claim:
        """The record's word on this socket (``resume.claim``); raises CallGone.
        When Redis cannot answer within a second the socket is admitted as a
        new call (a call must not fail on a Redis blip; counted in the log)."""
        try:
            async with asyncio.timeout(1.0):
                return await resume.claim(self.redis, cid)
        except resume.CallGone:
            raise
        except Exception as exc:  # noqa: BLE001
            log.warning("call %s: cannot read its record (admitted unchecked): %r", cid, exc)
            return resume.Claim(state="", gateway_id="", last_seq=0)
