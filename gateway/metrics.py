"""Counters and gauges of one gateway process, rendered as Prometheus text.

Plain ints in a dict: the hot path increments them directly (no locks: one
event loop), and ``/metrics`` renders them on demand.
"""

from __future__ import annotations

from typing import Callable

_HELP = {
    "frames_in": "20 ms audio frames received from the platform",
    "frames_published": "audio frames written to Redis",
    "frames_dropped": "audio frames dropped (Redis unavailable and buffer full)",
    "bytes_in": "binary bytes received from the platform",
    "odd_frames": "binary frames of odd length (byte carried to the next frame)",
    "odd_bytes_dropped": "trailing odd bytes dropped at the end of a call",
    "text_frames": "text frames received",
    "text_malformed": "text frames that were not a JSON object with an event",
    "events_dropped": "platform events dropped (Redis unavailable and buffer full)",
    "events_unknown": "platform events with an unknown event name (still published)",
    "calls_started": "calls accepted",
    "calls_ended": "calls ended",
    "calls_replaced": "sockets replaced by a new connection for the same call",
    "handshakes_refused": "handshakes refused (auth, path, limits, draining)",
    "commands_applied": "commands applied",
    "commands_rejected": "commands rejected",
    "commands_duplicate": "commands ignored as duplicates",
    "commands_malformed": "command entries that could not be decoded",
    "messages_out": "messages sent to the platform",
    "send_timeouts": "sockets closed because the platform stopped reading (send timed out)",
    "redis_errors": "Redis errors seen by the writer or the command reader",
    "redis_reconnects": "writer reconnections to Redis",
    "redis_batches": "pipelined batches written to Redis",
}


class Metrics:
    def __init__(self) -> None:
        self.c: dict[str, int] = dict.fromkeys(_HELP, 0)
        self.gauges: dict[str, Callable[[], float]] = {}

    def inc(self, name: str, n: int = 1) -> None:
        self.c[name] += n

    def gauge(self, name: str, fn: Callable[[], float]) -> None:
        self.gauges[name] = fn

    def render(self) -> str:
        lines = []
        for name, value in self.c.items():
            lines.append(f"# HELP pv_gateway_{name}_total {_HELP.get(name, name)}")
            lines.append(f"# TYPE pv_gateway_{name}_total counter")
            lines.append(f"pv_gateway_{name}_total {value}")
        for name, fn in self.gauges.items():
            lines.append(f"# TYPE pv_gateway_{name} gauge")
            lines.append(f"pv_gateway_{name} {float(fn())}")
        return "\n".join(lines) + "\n"
