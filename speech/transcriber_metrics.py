"""The transcriber role's metrics and health (``--metrics-port``).

Plain ints bumped by the one loop thread, exported at scrape time through
``piopiy_voice.observability`` (like the worker's ``workers.metrics``):

``pv_transcriber_calls_owned`` (gauge), ``pv_transcriber_segments_total``
(speech segments recognized), ``pv_transcriber_transcripts_total{kind=
"partial"|"final"}`` (Transcript entries committed), ``pv_transcriber_decode_cpu_seconds_total``
(CPU time of the loop thread spent in VAD + recognition: the capacity signal,
one core per process), ``pv_transcriber_commits_refused_total`` (lease lost at
commit), ``pv_transcriber_redis_errors_total{kind="unavailable"|"oom"|"nogroup"|
"other"}`` (Redis failures the loop survived, the same family and kinds as the
worker's ``pv_worker_redis_errors_total``: an alert written for one fits the
other) and ``pv_transcriber_loop_last_turn_seconds``. ``/healthz`` is 200
while the loop turned within ``HEALTHY_TURN_S``.
"""

from __future__ import annotations

import time
from http.server import ThreadingHTTPServer

from piopiy_voice.observability import (
    CounterSpec,
    Exporter,
    check_name,
    counter_families,
    gauge_family,
    serve_http,
)

P = "pv_transcriber_"
_REDIS = "Redis errors the loop survived, by kind"
COUNTER_SPECS: dict[str, CounterSpec] = {
    "segments_total": CounterSpec(P + "segments_total", "speech segments recognized"),
    "partials_total": CounterSpec(P + "transcripts_total", "Transcript entries committed, by kind",
                                  {"kind": "partial"}),
    "finals_total": CounterSpec(P + "transcripts_total", "Transcript entries committed, by kind",
                                {"kind": "final"}),
    "decode_cpu_seconds_total": CounterSpec(P + "decode_cpu_seconds_total",
                                            "CPU seconds spent in VAD and recognition"),
    "commits_refused_total": CounterSpec(P + "commits_refused_total",
                                         "commits refused because the asr lease was lost"),
    "redis_oom_total": CounterSpec(P + "redis_errors_total", _REDIS, {"kind": "oom"}),
    "redis_unavailable_total": CounterSpec(P + "redis_errors_total", _REDIS, {"kind": "unavailable"}),
    "redis_group_recreated_total": CounterSpec(P + "redis_errors_total", _REDIS, {"kind": "nogroup"}),
    "redis_errors_total": CounterSpec(P + "redis_errors_total", _REDIS, {"kind": "other"}),
}
#: ``Transcriber.on_redis_error``'s kinds -> the counter each one bumps.
REDIS_ERROR_COUNTERS = {"oom": "redis_oom_total", "unavailable": "redis_unavailable_total",
                        "nogroup": "redis_group_recreated_total", "other": "redis_errors_total"}
for _spec in COUNTER_SPECS.values():
    check_name(_spec.family, "counter")
#: /healthz fails when the loop has not turned for this long (a decode is far shorter).
HEALTHY_TURN_S = 30.0


class TranscriberMetrics:
    def __init__(self) -> None:
        self.counters: dict[str, float] = dict.fromkeys(COUNTER_SPECS, 0)
        self._calls_owned = 0
        self.last_turn: float | None = None
        self._exporter: Exporter | None = None

    @property
    def calls_owned(self) -> int:
        return self._calls_owned

    @calls_owned.setter
    def calls_owned(self, n: int) -> None:
        """Set once per loop turn: also the liveness mark."""
        self._calls_owned = n
        self.last_turn = time.monotonic()

    def count(self, transcripts) -> None:
        for t in transcripts:
            self.counters["finals_total" if t.final else "partials_total"] += 1

    def healthy(self, now: float | None = None) -> tuple[bool, str]:
        if self.last_turn is None:
            return False, "transcriber loop not started"
        age = (time.monotonic() if now is None else now) - self.last_turn
        if age > HEALTHY_TURN_S:
            return False, f"transcriber loop stuck for {age:.0f}s"
        return True, f"transcriber loop turned {age:.1f}s ago"

    def collect(self):
        yield gauge_family(P + "calls_owned", "calls this transcriber holds the asr lease of",
                           self._calls_owned)
        yield from counter_families(self.counters, COUNTER_SPECS)
        if self.last_turn is not None:
            yield gauge_family(P + "loop_last_turn_seconds", "seconds since the loop last turned",
                               time.monotonic() - self.last_turn)

    def render(self) -> bytes:
        if self._exporter is None:
            self._exporter = Exporter(self.collect)
        return self._exporter.render()


def serve(metrics: TranscriberMetrics, host: str, port: int) -> ThreadingHTTPServer:
    """``/metrics`` and ``/healthz`` from a daemon thread."""
    return serve_http(metrics.render, metrics.healthy, host, port)
