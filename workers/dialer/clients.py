"""The dialer's settings and clients, built once per process.

Theory of operation
-------------------
A dial job needs three things besides its arguments: the settings, a client
of the call records' Redis and a REST client of the platform. Built per job
they cost more than the call itself: reading the settings is ~4 ms of CPU
(pydantic-settings, the ``.env`` file), a Redis Cluster client asks for the
slot map and opens a connection per node on first use (a forking dialer on
a cluster spent 85 ms of CPU per call placed, 45 ms on one server), and a new
HTTP session opens a new TCP (and, in production, TLS) connection to the
platform for every call.

So each dialer process keeps one of each (``process_clients()``): a dialer
runs one job at a time in its main thread (``worker``), so nothing shares them
concurrently. The stuck-dial sweeper thread has its own Redis client.

Forks. A forking dialer (``--fork``) runs every job in a fresh child that
inherits its parent's memory, cached clients included; a socket used by two
processes interleaves their bytes. The cache is therefore tied to the process
id: a child builds its own clients (and keeps the parent's settings: plain
data, safe to share) and never touches, let alone closes, the inherited ones
(redis-py's ``disconnect`` shuts the socket down for the parent too).

The HTTP session reads the environment's proxy and CA settings once per
host and process (``_Session``); requests reads the whole environment again
on every request (0.35 ms of a ~9 ms call here with 35 variables; more where
there are many, e.g. the several Kubernetes injects per service). A dialer, like any process, takes a changed
environment at its next start.

A REST session whose request ended in an unknown way (a network error, the
job's timeout firing mid-request) is dropped (``discard_rest``): the next job
starts on a new connection rather than one in an unknown state.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

import requests

from piopiy_voice.rest import RestClient
from piopiy_voice.settings import Settings


class _Session(requests.Session):
    """A ``requests.Session`` that merges the environment's settings (proxies,
    ``REQUESTS_CA_BUNDLE``, ...) into a request once per host and arguments,
    not on every request (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._merged: dict[tuple, dict[str, Any]] = {}

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any,
                                   cert: Any) -> dict[str, Any]:
        parts = urlsplit(url)
        key = (parts.scheme, parts.netloc, tuple(sorted((proxies or {}).items())), stream,
               verify, cert)
        merged = self._merged.get(key)
        if merged is None:
            merged = self._merged[key] = super().merge_environment_settings(
                url, proxies, stream, verify, cert)
        return {**merged, "proxies": dict(merged["proxies"])}


class ProcessClients:
    """Settings, the records' Redis and the REST client of one dialer process."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.pid = os.getpid()
        self.settings = settings or Settings.from_env()
        self._records: dict[tuple[str, float], Any] = {}
        self._rest: RestClient | None = None

    def records(self, queue_conn: Any) -> Any:
        """The Redis of the call records for a job RQ runs on ``queue_conn``:
        that same client, unless the dial queue has a Redis of its own
        (``PV_QUEUE_REDIS_URL``, e.g. beside a Redis Cluster, since RQ needs a
        plain Redis); then one client of ``REDIS_URL`` per process."""
        settings = self.settings
        if queue_conn is not None and not settings.queue_redis_url:
            return queue_conn
        from piopiy_voice.redisconn import connect, resolve_redis_url  # noqa: PLC0415

        url = resolve_redis_url(settings.redis_url)
        key = (url, settings.redis_socket_timeout_s)
        client = self._records.get(key)
        if client is None:
            client = self._records[key] = connect(url, socket_timeout=settings.redis_socket_timeout_s)
        return client

    def rest(self) -> RestClient:
        """The platform's REST client (one attempt per request: the job decides
        about retries, see ``jobs``). Raises ``ValueError`` on bad settings,
        and then caches nothing: the next job tries again."""
        if self._rest is None:
            self._rest = RestClient.from_settings(self.settings, max_retries=0, session=_Session())
        return self._rest

    def discard_rest(self) -> None:
        """Drop the REST client (and its connections) after a request that
        ended in an unknown way; the next job builds a new one."""
        rest, self._rest = self._rest, None
        if rest is not None:
            rest.session.close()  # ours: ``RestClient.close`` leaves a given session open


_current: ProcessClients | None = None


def process_clients() -> ProcessClients:
    """This process's ``ProcessClients`` (built on first use, and again in a
    forked child; see the module docstring)."""
    global _current
    current = _current
    if current is None or current.pid != os.getpid():
        current = _current = ProcessClients(current.settings if current is not None else None)
    return current


def start_process(settings: Settings) -> None:
    """Use ``settings`` (read by the dialer at start-up) for this process's
    jobs and those of the work-horses it forks, instead of reading them again."""
    global _current
    _current = ProcessClients(settings)
