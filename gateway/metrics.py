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
_DROPPED_HELP = "audio frames dropped, by reason"
_THROTTLED_HELP = ("times a socket was paused for exceeding its call's ingress limits "
                   "(bytes, frames or text per second), by limit")
_EVENTS_HELP = "platform events that were not published as is, by outcome"
_CALLS_HELP = "call sockets by lifecycle event"
_COMMANDS_HELP = "commands from workers by outcome"
_REDIRECTS_HELP = "cluster redirects the writer followed, by kind"

#: Internal key -> exported family (+ labels). Keys are what the code increments.
COUNTERS: dict[str, CounterSpec] = {
    "frames_in": CounterSpec(P + "audio_frames_received_total", "20 ms audio frames received from the platform"),
    "frames_published": CounterSpec(P + "audio_frames_published_total", "audio frames written to Redis"),
    "frames_dropped": CounterSpec(P + "audio_frames_dropped_total", _DROPPED_HELP,
                                  {"reason": "redis_unavailable"}),
    "frames_dropped_backlog": CounterSpec(P + "audio_frames_dropped_total", _DROPPED_HELP,
                                          {"reason": "call_backlog"}),
    "frames_dropped_suspended": CounterSpec(P + "audio_frames_dropped_total", _DROPPED_HELP,
                                            {"reason": "after_suspend"}),
    "frames_rejected": CounterSpec(P + "audio_frames_dropped_total", _DROPPED_HELP,
                                   {"reason": "redis_rejected"}),
    "frames_dropped_closing": CounterSpec(P + "audio_frames_dropped_total", _DROPPED_HELP,
                                          {"reason": "writer_closed"}),
    "ingress_throttled": CounterSpec(P + "ingress_throttled_total",
                                     _THROTTLED_HELP,
                                     {"limit": "bytes"}),
    "ingress_throttled_frames": CounterSpec(P + "ingress_throttled_total",
                                            _THROTTLED_HELP, {"limit": "frames"}),
    "ingress_throttled_text": CounterSpec(P + "ingress_throttled_total",
                                          _THROTTLED_HELP, {"limit": "text"}),
    "bytes_in": CounterSpec(P + "audio_received_bytes_total", "binary bytes received from the platform"),
    "odd_frames": CounterSpec(P + "odd_frames_total",
                              "binary frames of odd length (byte carried to the next frame)"),
    "odd_bytes_dropped": CounterSpec(P + "odd_dropped_bytes_total",
                                     "trailing odd bytes dropped at the end of a call"),
    "text_frames": CounterSpec(P + "text_frames_total", "text frames received"),
    "text_malformed": CounterSpec(P + "text_frames_malformed_total",
                                  "text frames that were not a JSON object with an event"),
    "events_dropped": CounterSpec(P + "platform_events_total",
                                  _EVENTS_HELP,
                                  {"outcome": "dropped"}),
    "events_unknown": CounterSpec(P + "platform_events_total",
                                  _EVENTS_HELP,
                                  {"outcome": "unknown_name"}),
    "calls_started": CounterSpec(P + "calls_total", _CALLS_HELP, {"event": "started"}),
    "calls_ended": CounterSpec(P + "calls_total", _CALLS_HELP, {"event": "ended"}),
    "calls_replaced": CounterSpec(P + "calls_total", _CALLS_HELP, {"event": "replaced"}),
    "calls_suspended": CounterSpec(P + "calls_total", _CALLS_HELP,
                                   {"event": "suspended"}),
    "calls_resumed": CounterSpec(P + "calls_total", _CALLS_HELP,
                                 {"event": "resumed"}),
    "calls_swept": CounterSpec(P + "calls_total", _CALLS_HELP,
                               {"event": "grace_expired"}),
    "calls_reregistered": CounterSpec(P + "calls_total", _CALLS_HELP,
                                      {"event": "reregistered"}),
    "commands_applied": CounterSpec(P + "commands_total", _COMMANDS_HELP,
                                    {"outcome": "applied"}),
    "commands_rejected": CounterSpec(P + "commands_total", _COMMANDS_HELP,
                                     {"outcome": "rejected"}),
    "commands_duplicate": CounterSpec(P + "commands_total", _COMMANDS_HELP,
                                      {"outcome": "duplicate"}),
    "commands_malformed": CounterSpec(P + "commands_total", _COMMANDS_HELP,
                                      {"outcome": "malformed"}),
    "messages_out": CounterSpec(P + "messages_sent_total", "messages sent to the platform"),
    "send_timeouts": CounterSpec(P + "send_timeouts_total",
                                 "sockets closed because the platform stopped reading (send timed out)"),
    # The playout tick (gateway/playout.py)
    "playout_ticks": CounterSpec(P + "playout_ticks_total",
                                 "wakes of the playout tick (each serves every speaking call due)"),
    "playout_held": CounterSpec(P + "playout_held_total",
                                "times a speaking call's audio was held back because its socket's "
                                "write buffer was above the high-water mark (the platform is not reading)"),
    "playout_errors": CounterSpec(P + "playout_errors_total",
                                  "times serving one call's playout raised (logged; that call's "
                                  "playout stopped, the others went on)"),
    "reply_to_refused": CounterSpec(P + "commands_total", _COMMANDS_HELP,
                                    {"outcome": "bad_reply_to"}),
    "commands_oversize": CounterSpec(P + "commands_total", _COMMANDS_HELP,
                                     {"outcome": "oversize"}),
    "writer_restarts": CounterSpec(P + "redis_writer_restarts_total",
                                   "times the Redis writer task died and was restarted"),
    "redis_rejected": CounterSpec(P + "redis_rejected_writes_total",
                                  "commands Redis answered with an error (not counted as published)"),
    "redis_errors": CounterSpec(P + "redis_errors_total", "Redis errors seen by the writer or the command reader"),
    "redis_reconnects": CounterSpec(P + "redis_reconnects_total", "writer reconnections to Redis"),
    "redis_batches": CounterSpec(P + "redis_batches_total", "pipelined batches written to Redis"),
    # Redis Cluster (gateway/cluster_route.py)
    "redis_moved": CounterSpec(P + "redis_redirects_total", _REDIRECTS_HELP, {"kind": "moved"}),
    "redis_ask": CounterSpec(P + "redis_redirects_total", _REDIRECTS_HELP, {"kind": "ask"}),
    "redis_retried": CounterSpec(P + "redis_retried_writes_total",
                                 "writes resent after TRYAGAIN, CLUSTERDOWN, LOADING or READONLY"),
    "redis_topology": CounterSpec(P + "redis_topology_refreshes_total",
                                  "times the writer read the cluster's slot map"),
}

#: Handshake refusals: reason -> HTTP status ("none": closed without a response).
#: Every refusal is counted under one of them, including those websockets
#: itself answers (414, 431, 426, 405, 400, 505).
REFUSALS: dict[str, str] = {
    "bad_signature": "401", "expired": "403", "not_found": "404", "bad_rate": "400",
    "draining": "503", "max_calls": "503", "call_ended": "410",
    "handshake_backlog": "none", "uri_too_long": "414", "headers_too_large": "431",
    "not_websocket": "426", "method_not_allowed": "405", "bad_request": "400",
    "http_version": "505", "forbidden": "403", "server_error": "500", "shutting_down": "503",
    "other": "other",
}
#: websockets' own refusals: status -> reason.
STATUS_REASONS = {414: "uri_too_long", 431: "headers_too_large", 426: "not_websocket",
                  405: "method_not_allowed", 400: "bad_request", 505: "http_version",
                  403: "forbidden", 500: "server_error", 503: "shutting_down"}
for _reason, _status in REFUSALS.items():
    COUNTERS["refused:" + _reason] = CounterSpec(
        P + "handshakes_refused_total", "handshakes refused, by HTTP status and reason",
        {"status": _status, "reason": _reason})

#: Help of the gauges server.py registers (``metrics.gauge(name, fn)``).
GAUGE_HELP = {
    "calls_live": "call sockets open now",
    "draining": "1 after SIGTERM: no new calls, live ones finishing",
    "redis_connected": "1 while the writer's last command to Redis succeeded",
    "redis_buffered_frames": "audio frames not yet acknowledged by Redis (buffered and in flight)",
    "writer_alive": "1 while the Redis writer task runs",
    "calls_suspended": "calls whose socket dropped, held resumable for the reconnect grace",
    "handshakes_pending": "connections still in the HTTP handshake",
    "calls_speaking": "calls with outbound audio queued or playing (on the playout tick)",
}

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

    def refused(self, reason: str) -> None:
        """Count one refused handshake (``REFUSALS`` names the reasons)."""
        key = "refused:" + reason
        self.c[key if key in self.c else "refused:other"] += 1

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
