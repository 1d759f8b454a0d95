"""Worker metrics: counters, a lag histogram, Prometheus text, optional HTTP.

The decision loop increments plain ints (``counters[key] += n``) and sets
``calls_owned`` once per loop turn; ``render()`` turns them into Prometheus
families at scrape time through ``piopiy_voice.observability`` (HELP on every
family, ``outcome``/``kind`` labels, ``process_*`` metrics). ``COUNTER_SPECS``
maps each key to its family:

``pv_worker_calls_owned`` (gauge), ``pv_worker_decisions_total`` (commands
published), ``pv_worker_entries_total``, ``pv_worker_takeovers_total{kind=
"crash"|"handback"}`` (calls taken over from a dead worker / handed back at a
shutdown), ``pv_worker_dead_letters_total``, ``pv_worker_frames_skipped_total``
(trimmed or lost before processing), ``pv_worker_leases_lost_total``,
``pv_worker_calls_finished_total{reason="ended"|"gateway_lost"}`` (the latter:
ended by the worker because the gateway died for good),
``pv_worker_stream_lag_seconds`` (histogram of now minus the entry id's time
when the entry is processed) and ``pv_worker_loop_last_turn_seconds`` (seconds
since the loop last turned).

HTTP (``serve``): ``/metrics``, ``/lag`` (exact recent quantiles, JSON) and
``/healthz`` (200 while the decision loop turned within ``HEALTHY_TURN_S``).
"""

from __future__ import annotations

import bisect
import json
import time
from collections import deque
from http.server import ThreadingHTTPServer

from piopiy_voice.observability import (
    CONTENT_TYPE,
    CounterSpec,
    Exporter,
    check_name,
    counter_families,
    gauge_family,
    histogram_family,
    serve_http,
)

LAG_BUCKETS_S = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
#: Recent lag samples kept for exact quantiles (GET /lag); bounded memory.
LAG_SAMPLES = 500_000
P = "pv_worker_"
_WORKS = "works of the agent runtime, by outcome"
_REDIS = "Redis errors the loop survived, by kind"
COUNTER_SPECS: dict[str, CounterSpec] = {
    "decisions_total": CounterSpec(P + "decisions_total", "commands published to gateways"),
    "entries_total": CounterSpec(P + "entries_total", "stream entries processed"),
    "claims_after_crash_total": CounterSpec(P + "takeovers_total", "calls this worker took over, by kind",
                                            {"kind": "crash"}),
    "handbacks_total": CounterSpec(P + "takeovers_total", "calls this worker took over, by kind",
                                   {"kind": "handback"}),
    "dead_letters_total": CounterSpec(P + "dead_letters_total", "entries sent to the dead-letter stream"),
    "frames_skipped_total": CounterSpec(P + "frames_skipped_total", "frames trimmed or lost before processing"),
    "leases_lost_total": CounterSpec(P + "leases_lost_total", "leases lost (another worker took the call)"),
    "calls_finished_total": CounterSpec(P + "calls_finished_total", "calls this worker saw end, by reason",
                                        {"reason": "ended"}),
    "calls_gateway_lost_total": CounterSpec(P + "calls_finished_total", "calls this worker saw end, by reason",
                                            {"reason": "gateway_lost"}),
    "works_started_total": CounterSpec(P + "works_total", _WORKS, {"outcome": "started"}),
    "works_failed_total": CounterSpec(P + "works_total", _WORKS, {"outcome": "failed"}),
    "works_timed_out_total": CounterSpec(P + "works_total", _WORKS, {"outcome": "timeout"}),
    "works_cancelled_total": CounterSpec(P + "works_total", _WORKS, {"outcome": "cancelled"}),
    "works_lost_total": CounterSpec(P + "works_total", _WORKS, {"outcome": "lost"}),
    "work_results_ignored_total": CounterSpec(P + "works_total", _WORKS, {"outcome": "result_ignored"}),
    "redis_oom_total": CounterSpec(P + "redis_errors_total", _REDIS, {"kind": "oom"}),
    "redis_unavailable_total": CounterSpec(P + "redis_errors_total", _REDIS, {"kind": "unavailable"}),
    "redis_group_recreated_total": CounterSpec(P + "redis_errors_total", _REDIS, {"kind": "nogroup"}),
    "redis_errors_total": CounterSpec(P + "redis_errors_total", _REDIS, {"kind": "other"}),
    "leases_retaken_total": CounterSpec(P + "leases_retaken_total",
                                        "leases re-taken from memory after Redis lost them"),
    "calls_reannounced_total": CounterSpec(P + "calls_reannounced_total",
                                           "start entries re-published after Redis lost them"),
    "calls_resumed_after_reconnect_total": CounterSpec(
        P + "calls_resumed_after_reconnect_total", "calls resumed from a done checkpoint after a reconnect"),
    "commands_redelivered_total": CounterSpec(
        P + "commands_redelivered_total",
        "committed commands a previous owner may not have delivered, delivered again after a takeover"),
    "command_deliveries_retried_total": CounterSpec(
        P + "command_deliveries_retried_total",
        "committed commands whose delivery to the gateway's stream failed and is retried"),
    "urgent_commits_total": CounterSpec(
        P + "urgent_commits_total",
        "calls committed and delivered mid-turn because a barge-in cut their playout"),
    "stale_commands_suppressed_total": CounterSpec(
        P + "stale_commands_suppressed_total", "speech not sent while replaying a backlog after a takeover"),
}
COUNTERS = tuple(COUNTER_SPECS)
for _spec in COUNTER_SPECS.values():
    check_name(_spec.family, "counter")
#: /healthz fails when the decision loop has not turned for this long.
HEALTHY_TURN_S = 30.0


class Metrics:
    content_type = CONTENT_TYPE

    def __init__(self) -> None:
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._calls_owned = 0
        #: works of the agent runtime running now (the runner sets it once per turn)
        self.works_in_flight = 0
        #: monotonic time of the last loop turn (the runner sets calls_owned once per turn)
        self.last_turn: float | None = None
        self._exporter: Exporter | None = None
        self._lag_counts = [0] * (len(LAG_BUCKETS_S) + 1)
        self._lag_sum = 0.0
        self._lag_n = 0
        self.lag_samples: deque[float] = deque(maxlen=LAG_SAMPLES)
        self._started = time.monotonic()

    @property
    def calls_owned(self) -> int:
        return self._calls_owned

    @calls_owned.setter
    def calls_owned(self, n: int) -> None:
        self._calls_owned = n
        self.last_turn = time.monotonic()

    def healthy(self, now: float | None = None) -> tuple[bool, str]:
        """The decision loop turned within ``HEALTHY_TURN_S`` (the HTTP thread alone proves nothing)."""
        if self.last_turn is None:
            return False, "decision loop not started"
        age = (time.monotonic() if now is None else now) - self.last_turn
        if age > HEALTHY_TURN_S:
            return False, f"decision loop stuck for {age:.0f}s"
        return True, f"decision loop turned {age:.1f}s ago"

    def inc(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def observe_lag(self, seconds: float) -> None:
        self._lag_counts[bisect.bisect_left(LAG_BUCKETS_S, seconds)] += 1
        self._lag_sum += seconds
        self._lag_n += 1
        self.lag_samples.append(seconds)

    def recent_lag(self, reset: bool = False) -> dict:
        """Exact quantiles of the recent lag samples (since the last reset)."""
        xs = sorted(self.lag_samples.copy())  # copy() is atomic under the GIL
        if reset:
            self.lag_samples.clear()
        if not xs:
            return {"n": 0}
        q = lambda p: xs[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
        return {"n": len(xs), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": xs[-1],
                "entries_total": self.counters["entries_total"]}

    def lag_quantile(self, q: float) -> float | None:
        """Upper bucket bound holding quantile ``q`` (coarse; for logs)."""
        if not self._lag_n:
            return None
        target = q * self._lag_n
        acc = 0
        for i, c in enumerate(self._lag_counts):
            acc += c
            if acc >= target:
                return LAG_BUCKETS_S[i] if i < len(LAG_BUCKETS_S) else float("inf")
        return float("inf")

    def collect(self):
        yield gauge_family(P + "calls_owned", "calls this worker holds the lease of", self._calls_owned)
        yield gauge_family(P + "works_in_flight", "works of the agent runtime running now", self.works_in_flight)
        yield from counter_families(self.counters, COUNTER_SPECS)
        yield histogram_family(P + "stream_lag_seconds",
                               "time from an entry's arrival in Redis to its processing",
                               LAG_BUCKETS_S, self._lag_counts, self._lag_sum)
        if self.last_turn is not None:
            yield gauge_family(P + "loop_last_turn_seconds", "seconds since the decision loop last turned",
                               time.monotonic() - self.last_turn)

    def render(self) -> str:
        """Prometheus text (send it with ``content_type``)."""
        if self._exporter is None:
            self._exporter = Exporter(self.collect)
        return self._exporter.render().decode()

    def summary(self) -> str:
        up = max(time.monotonic() - self._started, 1e-9)
        p99 = self.lag_quantile(0.99)
        return (
            f"calls_owned={self.calls_owned} decisions/s={self.counters['decisions_total'] / up:.2f} "
            f"lag_p99<={p99}s claims_after_crash={self.counters['claims_after_crash_total']} "
            f"dead_letters={self.counters['dead_letters_total']} "
            f"frames_skipped={self.counters['frames_skipped_total']}"
        )


def serve(metrics: Metrics, host: str, port: int) -> ThreadingHTTPServer:
    """Serve ``/metrics``, ``/healthz`` and ``/lag`` (exact recent lag quantiles as JSON,
    ``?reset=1`` to start a new window) in a daemon thread; returns the server (``.server_port``)."""

    def lag(query: str) -> tuple[bytes, str]:
        return json.dumps(metrics.recent_lag(reset="reset=1" in query)).encode(), "application/json"

    return serve_http(lambda: metrics.render().encode(), metrics.healthy, host, port, {"/lag": lag})
