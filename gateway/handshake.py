"""Admission of a socket, before the WebSocket upgrade: routes, signature, limits.

Theory of operation
-------------------
``websockets`` calls ``Handshake.process_request`` with every HTTP request
before upgrading it. Plain routes are answered here (``/healthz``,
``/readyz``, ``/metrics``); anything else must be a signed stream URL
(``piopiy_voice.signing``) and is refused before the upgrade: bad signature
401, expired URL 403, unknown path 404, bad ``rate`` param 400, draining or
``max_calls`` reached 503.

An accepted request yields an ``Admission``: what the call socket is (call id,
rate, listen mode, campaign, params) and where its sequence resumes. The
resume position is read here, before the upgrade, when the call is not live
on this gateway: if another gateway held its socket (and died, and the
platform reconnected here) the call's stream already holds entries, and the
new session must continue after their ``seq`` or workers would drop its
entries as duplicates. No frame can arrive before the upgrade, so waiting
here costs nothing but handshake time.

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

from piopiy_voice import keys
from piopiy_voice.audio.pcm import SUPPORTED_RATES
from piopiy_voice.settings import Settings
from piopiy_voice.signing import SignatureError, verify_stream_path

from .metrics import Metrics

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


class Handshake:
    def __init__(self, *, settings: Settings, metrics: Metrics, redis: Any,
                 is_live: Callable[[str], bool], live_count: Callable[[], int]) -> None:
        self.settings = settings
        self.metrics = metrics
        self.redis = redis
        self.is_live = is_live
        self.live_count = live_count
        #: Refuse new sockets (503) and report not ready: set on SIGTERM.
        self.draining = False
        self._admitted: weakref.WeakKeyDictionary[ServerConnection, Admission] = \
            weakref.WeakKeyDictionary()
        self._routes: dict[str, Callable[[ServerConnection], Awaitable[Response]]] = {
            "/healthz": self._healthz, "/readyz": self._readyz, "/metrics": self._metrics,
        }

    def admission_of(self, conn: ServerConnection) -> Admission:
        """The admission of an upgraded connection (claimed once)."""
        return self._admitted.pop(conn)

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
                                path.split("?", 1)[0])
        except ValueError:
            return self._refuse(conn, 404, "not found", path.split("?", 1)[0])
        cid, p = target.call_id, target.params
        if self.draining:
            return self._refuse(conn, 503, "gateway draining", cid)
        live = self.is_live(cid)
        if not live and self.live_count() >= self.settings.max_calls:
            return self._refuse(conn, 503, f"max calls ({self.settings.max_calls}) reached", cid)
        try:
            rate = int(p.get("rate", "8000"))
            if rate not in SUPPORTED_RATES:
                raise ValueError
        except ValueError:
            return self._refuse(conn, 400, f"rate must be one of {SUPPORTED_RATES}", cid)
        self._admitted[conn] = Admission(
            call_id=cid, rate=rate, listen_mode=p.get("mode", "callee"),
            campaign=p.get("campaign") or None, params=dict(p),
            resume_seq=0 if live else await self._last_seq(cid))
        return None

    def _refuse(self, conn: ServerConnection, status: int, why: str, what: str) -> Response:
        self.metrics.inc("handshakes_refused")
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
        try:
            async with asyncio.timeout(1.0):
                await self.redis.ping()
        except Exception as exc:  # noqa: BLE001
            return False, f"redis unreachable: {exc!r}"
        return True, "ready"

    async def _last_seq(self, cid: str) -> int:
        """The seq this call's stream has reached; 0 for a new call, or when
        Redis cannot answer within a second (a new call must not fail on it)."""
        try:
            async with asyncio.timeout(1.0):
                last = await self.redis.xrevrange(keys.call_stream(cid), count=1)
        except Exception as exc:  # noqa: BLE001
            log.warning("call %s: cannot read the stream's last seq: %r", cid, exc)
            return 0
        if not last:
            return 0
        seq = last[0][1].get(b"seq", b"0")
        return int(seq) if seq.isdigit() else 0
