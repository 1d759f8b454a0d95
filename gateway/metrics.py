"""Counters and gauges of one gateway process, exported for Prometheus.

The hot path increments plain ints in ``Metrics.c`` (a dict: no locks, one
event loop; ``m.c["frames_in"] += 1`` costs a dict store). ``COUNTERS`` says
which Prometheus family and labels each key becomes; ``render()`` collects
them at scrape time through ``piopiy_voice.observability`` (HELP and TYPE on
every family, ``_bytes``/``_total`` suffixes, ``outcome``/``event`` labels,
``process_*`` metrics). Serve the body with ``CONTENT_TYPE`` — one header.
"""

from __future__ import annotations

from typing import Callable

from piopiy_voice.observability import (
    CONTENT_TYPE,
    CounterSpec,
    Exporter,
    check_name,
    counter_families,
    gauge_family,
)

P = "pv_gateway_"

#: Internal key -> exported family (+ labels). Keys are what the code increments.
COUNTERS: dict[str, CounterSpec] = {
    "frames_in": CounterSpec(P + "audio_frames_received_total", "20 ms audio frames received from the platform"),
    "frames_published": CounterSpec(P + "audio_frames_published_total", "audio frames written to Redis"),
    "frames_dropped": CounterSpec(P + "audio_frames_dropped_total",
                                  "audio frames dropped (Redis unavailable and buffer full)"),
    "bytes_in": CounterSpec(P + "audio_received_bytes_total", "binary bytes received from the platform"),
    "odd_frames": CounterSpec(P + "odd_frames_total",
                              "binary frames of odd length (byte carried to the next frame)"),
    "odd_bytes_dropped": CounterSpec(P + "odd_dropped_bytes_total",
                                     "trailing odd bytes dropped at the end of a call"),
    "text_frames": CounterSpec(P + "text_frames_total", "text frames received"),
    "text_malformed": CounterSpec(P + "text_frames_malformed_total",
                                  "text frames that were not a JSON object with an event"),
    "events_dropped": CounterSpec(P + "platform_events_total",
                                  "platform events that were not published as is, by outcome",
                                  {"outcome": "dropped"}),
    "events_unknown": CounterSpec(P + "platform_events_total",
                                  "platform events that were not published as is, by outcome",
                                  {"outcome": "unknown_name"}),
    "calls_started": CounterSpec(P + "calls_total", "call sockets by lifecycle event", {"event": "started"}),
    "calls_ended": CounterSpec(P + "calls_total", "call sockets by lifecycle event", {"event": "ended"}),
    "calls_replaced": CounterSpec(P + "calls_total", "call sockets by lifecycle event", {"event": "replaced"}),
    "handshakes_refused": CounterSpec(P + "handshakes_refused_total",
                                      "handshakes refused (auth, path, limits, draining)"),
    "commands_applied": CounterSpec(P + "commands_total", "commands from workers by outcome",
                                    {"outcome": "applied"}),
    "commands_rejected": CounterSpec(P + "commands_total", "commands from workers by outcome",
                                     {"outcome": "rejected"}),
    "commands_duplicate": CounterSpec(P + "commands_total", "commands from workers by outcome",
                                      {"outcome": "duplicate"}),
    "commands_malformed": CounterSpec(P + "commands_total", "commands from workers by outcome",
                                      {"outcome": "malformed"}),
    "messages_out": CounterSpec(P + "messages_sent_total", "messages sent to the platform"),
    "send_timeouts": CounterSpec(P + "send_timeouts_total",
                                 "sockets closed because the platform stopped reading (send timed out)"),
    "redis_errors": CounterSpec(P + "redis_errors_total", "Redis errors seen by the writer or the command reader"),
    "redis_reconnects": CounterSpec(P + "redis_reconnects_total", "writer reconnections to Redis"),
    "redis_batches": CounterSpec(P + "redis_batches_total", "pipelined batches written to Redis"),
}

#: Help of the gauges server.py registers (``metrics.gauge(name, fn)``).
GAUGE_HELP = {
    "calls_live": "call sockets open now",
    "draining": "1 after SIGTERM: no new calls, live ones finishing",
    "redis_connected": "1 while the writer's Redis connection is up",
    "redis_buffered_frames": "audio frames held in memory while Redis is unreachable",
}

# Kept for callers that listed the keys through it.
_HELP = {key: spec.help for key, spec in COUNTERS.items()}

for _spec in COUNTERS.values():
    check_name(_spec.family, "counter")


class Metrics:
    """Public API (used on the hot path): ``c`` (dict of ints), ``inc``, ``gauge``, ``render``."""

    content_type = CONTENT_TYPE

    def __init__(self) -> None:
        self.c: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.gauges: dict[str, Callable[[], float]] = {}
        self._exporter: Exporter | None = None

    def inc(self, name: str, n: int = 1) -> None:
        self.c[name] += n

    def gauge(self, name: str, fn: Callable[[], float]) -> None:
        check_name(P + name, "gauge")
        self.gauges[name] = fn

    def collect(self):
        yield from counter_families(self.c, COUNTERS)
        for name, fn in self.gauges.items():
            yield gauge_family(P + name, GAUGE_HELP.get(name, name.replace("_", " ")), fn())

    def render(self) -> str:
        """Prometheus text (send it with ``content_type``)."""
        if self._exporter is None:  # built on first scrape: the process collectors cost a little
            self._exporter = Exporter(self.collect)
        return self._exporter.render().decode()

    def respond(self, conn):
        """A websockets ``Response`` for ``/metrics`` with exactly one Content-Type."""
        resp = conn.respond(200, self.render())
        del resp.headers["Content-Type"]
        resp.headers["Content-Type"] = self.content_type
        return resp
