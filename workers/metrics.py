"""Worker metrics: counters, a lag histogram, Prometheus text, optional HTTP.

Exposed names (all prefixed ``pv_worker_``): ``calls_owned`` (gauge),
``decisions_total`` (commands published), ``entries_total``,
``claims_after_crash_total``, ``handbacks_total``, ``dead_letters_total``,
``frames_skipped_total`` (trimmed or lost before processing),
``leases_lost_total``, ``calls_finished_total``, ``calls_gateway_lost_total``
(calls ended by their worker because their gateway died for good) and
``stream_lag_seconds`` (histogram of now minus the
entry id's time when the entry is processed).
"""

from __future__ import annotations

import bisect
import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LAG_BUCKETS_S = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
#: Recent lag samples kept for exact quantiles (GET /lag); bounded memory.
LAG_SAMPLES = 500_000
COUNTERS = (
    "decisions_total", "entries_total", "claims_after_crash_total", "handbacks_total",
    "dead_letters_total", "frames_skipped_total", "leases_lost_total", "calls_finished_total",
    "calls_gateway_lost_total",
)


class Metrics:
    def __init__(self) -> None:
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.calls_owned = 0
        self._lag_counts = [0] * (len(LAG_BUCKETS_S) + 1)
        self._lag_sum = 0.0
        self._lag_n = 0
        self.lag_samples: deque[float] = deque(maxlen=LAG_SAMPLES)
        self._started = time.monotonic()

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

    def render(self) -> str:
        p = "pv_worker_"
        lines = [f"# TYPE {p}calls_owned gauge", f"{p}calls_owned {self.calls_owned}"]
        for name, value in self.counters.items():
            lines += [f"# TYPE {p}{name} counter", f"{p}{name} {value}"]
        lines.append(f"# TYPE {p}stream_lag_seconds histogram")
        acc = 0
        for bound, c in zip(LAG_BUCKETS_S, self._lag_counts):
            acc += c
            lines.append(f'{p}stream_lag_seconds_bucket{{le="{bound}"}} {acc}')
        lines.append(f'{p}stream_lag_seconds_bucket{{le="+Inf"}} {self._lag_n}')
        lines.append(f"{p}stream_lag_seconds_sum {self._lag_sum:.6f}")
        lines.append(f"{p}stream_lag_seconds_count {self._lag_n}")
        return "\n".join(lines) + "\n"

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
    """Serve ``/metrics`` (and ``/lag``: exact recent lag quantiles as JSON,
    ``?reset=1`` to start a new window) in a daemon thread; returns the server (``.server_port``)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server API)
            path, _, query = self.path.partition("?")
            if path == "/metrics":
                body, ctype = metrics.render().encode(), "text/plain; version=0.0.4"
            elif path == "/lag":
                body = json.dumps(metrics.recent_lag(reset="reset=1" in query)).encode()
                ctype = "application/json"
            else:
                self.send_error(404)
                return
            self.send_response(200)
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
