"""Metrics and logs for every role: one abstraction over ``prometheus_client``, one log setup.

Metrics — theory of operation
-----------------------------
The hot paths (20 ms frames, one event loop; the worker's decision loop) must
not pay for a metrics library per increment. So each role keeps its counters
as plain ints in a dict (``counters[key] += 1``, no lock: one writer thread,
and a torn read at scrape time is at worst one increment stale), and declares
once, in a table, which Prometheus family and labels each key is exported as
(``CounterSpec``). At scrape time a custom collector (``Exporter.collect``)
turns the dict into families; ``prometheus_client`` renders them with HELP and
TYPE lines, escapes labels, and adds the standard ``process_*``,
``python_info`` and ``python_gc_*`` families. Several keys may feed one family
under different labels (``commands_total{outcome="applied"}`` and
``{outcome="rejected"}``): labels instead of one name per outcome.

Naming rules (checked by ``check_name``): every family starts with ``pv_<role>_``,
counters end in ``_total``, and a family with a unit ends in it
(``_seconds``, ``_bytes``) before ``_total``.

``Exporter.render()`` gives the body, ``CONTENT_TYPE`` the one header to send.

Logs
----
``setup_logging(role)`` is the one log setup of every role (``piopiy-voice``
calls it before dispatching). ``PV_LOG_FORMAT=text`` (default) prints one
readable line; ``json`` prints one JSON object per line with ``ts``, ``level``,
``logger``, ``message``, ``role``, ``instance`` and, when known, ``call_id``.
The call id comes from ``extra={"call_id": ...}``, from ``call_context(cid)``
(a context variable, so asyncio tasks keep theirs), or from the project's own
``"call %s: ..."`` message convention.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

#: The text exposition format every Prometheus 2.x/3.x scrapes.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
UNITS = ("seconds", "bytes")
_NAME = re.compile(r"^pv_[a-z]+_[a-z0-9_]+$")


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class CounterSpec:
    """How one internal counter key is exported: family (with ``_total``), help, labels."""

    family: str
    help: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class GaugeSpec:
    family: str
    help: str


def check_name(family: str, kind: str) -> str:
    """Refuse names that break the conventions above (a programming error: ValueError)."""
    if not _NAME.match(family):
        raise ValueError(f"metric {family!r}: must match {_NAME.pattern}")
    if kind == "counter" and not family.endswith("_total"):
        raise ValueError(f"counter {family!r}: must end in _total")
    if kind != "counter" and family.endswith("_total"):
        raise ValueError(f"{kind} {family!r}: only counters end in _total")
    return family


def counter_families(values: Mapping[str, float], specs: Mapping[str, CounterSpec]) -> list[Metric]:
    """Families for ``values`` (key -> count) as declared in ``specs`` (key -> spec)."""
    families: dict[str, CounterMetricFamily] = {}
    for key, spec in specs.items():
        fam = families.get(spec.family)
        if fam is None:
            fam = families[spec.family] = CounterMetricFamily(
                spec.family, spec.help, labels=list(spec.labels))
        fam.add_metric(list(spec.labels.values()), values.get(key, 0))
    return list(families.values())


def gauge_family(family: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(family, help_text, value=float(value))


def histogram_family(family: str, help_text: str, bounds: Sequence[float], counts: Sequence[int],
                     total: float) -> HistogramMetricFamily:
    """A histogram from per-bucket (non-cumulative) ``counts``; the last count is +Inf."""
    buckets, acc = [], 0
    for bound, n in zip([*map(str, bounds), "+Inf"], counts):
        acc += n
        buckets.append((bound, acc))
    return HistogramMetricFamily(family, help_text, buckets=buckets, sum_value=total)


class Exporter:
    """One registry per role: the standard process collectors plus ``collect``
    callables returning families at scrape time."""

    def __init__(self, *collect: Callable[[], Iterable[Metric]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._sources = list(collect)
        self.registry.register(self)

    def add(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._sources.append(collect)

    def collect(self) -> Iterator[Metric]:  # the prometheus_client Collector protocol
        for source in self._sources:
            yield from source()

    def render(self) -> bytes:
        return generate_latest(self.registry)


#: An extra route of ``serve_http``: query string -> (body, content type).
Route = Callable[[str], tuple[bytes, str]]


def serve_http(render: Callable[[], bytes], healthy: Callable[[], tuple[bool, str]], host: str,
               port: int, routes: Mapping[str, Route] | None = None) -> ThreadingHTTPServer:
    """Serve ``/metrics`` (``render()``, Prometheus text), ``/healthz`` (200 when
    ``healthy()`` says so, else 503, with its reason) and ``routes`` from a daemon
    thread; returns the server (``.server_port``: the port when 0 was asked)."""
    extra = dict(routes or {})

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            path, _, query = self.path.partition("?")
            code = 200
            if path == "/metrics":
                body, ctype = render(), CONTENT_TYPE
            elif path == "/healthz":
                ok, why = healthy()
                code, body, ctype = (200 if ok else 503), (why + "\n").encode(), "text/plain; charset=utf-8"
            elif path in extra:
                body, ctype = extra[path](query)
            else:
                self.send_error(404)
                return
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # keep scrapes out of the log
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server


# --------------------------------------------------------------------------
# Logs
# --------------------------------------------------------------------------

_call_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("pv_call_id", default=None)
#: Env var holding each role's instance id (others: hostname-pid).
INSTANCE_ENV = {"gateway": "PV_GATEWAY_ID", "worker": "PV_WORKER_ID", "transcriber": "PV_TRANSCRIBER_ID"}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def run_loop_role(role: str, loop: Any, serve: Callable[[str, int], Any] | None, host: str,
                  port: int | None, max_seconds: float | None) -> int:
    """The shell of a looping role (worker, transcriber): serve its metrics when
    asked, turn SIGTERM/SIGINT into ``loop.stop()`` (calls handed back, not
    dropped), and ``loop.run()`` until then. ``serve(host, port)`` returns the
    HTTP server (``server_port``)."""
    log = logging.getLogger(f"piopiy_voice.{role}")
    if port is not None and serve is not None:
        server = serve(host, port)
        log.info("metrics on http://%s:%d/metrics", host, server.server_port)

    def _graceful(signum, _frame):
        log.info("%s: signal %d, handing calls back", role, signum)
        loop.stop()

    signal.signal(signal.SIGTERM, _graceful)
    signal.signal(signal.SIGINT, _graceful)
    freeze_startup_heap()
    loop.run(max_seconds=max_seconds)
    return 0


def freeze_startup_heap() -> None:
    """Move everything alive now (modules, models, the role's set-up) out of
    the cyclic collector's reach, just before a long-running role starts work.

    Why: a full (generation 2) collection walks every tracked object, and a
    role's start-up leaves ~10^5 of them that live for ever (numpy, pydantic,
    pocketsphinx, the agent's tables). The worker at 100 LLM calls ran one
    every ~6 s, each holding its threads for 42-52 ms: a stall that every
    call's frames and barge-ins wait out. After ``gc.freeze()`` the same
    collections take ~6 ms (``bench/bargein_bench.py --calls 100``,
    BENCHMARKS.md). Garbage made later is collected as before."""
    import gc  # noqa: PLC0415

    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def call_context(call_id: str) -> Iterator[None]:
    """Log lines inside carry ``call_id`` (JSON format)."""
    token = _call_id.set(call_id)
    try:
        yield
    finally:
        _call_id.reset(token)


def _record_call_id(record: logging.LogRecord) -> str | None:
    cid = getattr(record, "call_id", None) or _call_id.get()
    if cid:
        return str(cid)
    # The project's convention: log.info("call %s: ...", cid, ...)
    if isinstance(record.msg, str) and record.msg.startswith("call %s") and record.args:
        first = record.args[0] if isinstance(record.args, tuple) else None
        if isinstance(first, str):
            return first
    return None


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, role, instance, call_id, exc."""

    def __init__(self, role: str, instance: str) -> None:
        super().__init__()
        self.role = role
        self.instance = instance

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                  + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "role": self.role,
            "instance": self.instance,
        }
        cid = _record_call_id(record)
        if cid:
            out["call_id"] = cid
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def _env_value(name: str) -> str | None:
    value = os.environ.get(name)
    if value:
        return value
    try:
        from dotenv import dotenv_values  # noqa: PLC0415  (with pydantic-settings)

        from .settings import ENV_FILE  # noqa: PLC0415

        return dotenv_values(ENV_FILE).get(name) or None if os.path.isfile(ENV_FILE) else None
    except (ImportError, OSError):
        return None


def setup_logging(role: str, *, level: str | None = None, fmt: str | None = None,
                  instance: str | None = None, stream=None) -> logging.Handler:
    """Configure the root logger for ``role`` (replacing earlier handlers).

    ``level``/``fmt`` default to ``PV_LOG_LEVEL``/``PV_LOG_FORMAT`` (environment,
    then ``.env``); ``instance`` to the role's id variable, else hostname-pid.
    """
    level = (level or _env_value("PV_LOG_LEVEL") or "INFO").upper()
    fmt = (fmt or _env_value("PV_LOG_FORMAT") or "text").lower()
    if fmt not in ("text", "json"):
        fmt = "text"  # Settings reports the bad value; logging must still work
    if instance is None:
        env = INSTANCE_ENV.get(role)
        instance = (_env_value(env) if env else None) or f"{socket.gethostname()}-{os.getpid()}"
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(role, instance) if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    try:
        root.setLevel(level)
    except ValueError:
        root.setLevel(logging.INFO)
    return handler
