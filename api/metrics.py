"""The API role's Prometheus metrics (``prometheus_client``, default registry,
served at ``/metrics``). Names start with ``pv_api_``; label values are from
small fixed sets (never a call id or a key), so cardinality stays bounded."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

AUTH_REFUSALS = Counter(
    "pv_api_auth_refusals_total",
    "Requests refused by authentication (401) or authorisation (403), by reason.",
    ["status", "reason"])
HTTP_REQUESTS = Counter(
    "pv_api_http_requests_total", "HTTP requests answered, by route template and status.",
    ["method", "route", "status"])
BAD_REQUESTS = Counter(
    "pv_api_bad_requests_total",
    "Requests refused for their input (malformed, oversized, unknown or ended call), by reason.",
    ["reason"])
CONTROL_RESULTS = Counter(
    "pv_api_control_total", "Control commands sent, by action and the gateway's answer.",
    ["action", "status"])
LISTENERS = Gauge("pv_api_listeners", "Open listen sockets.")
LISTEN_HUBS = Gauge("pv_api_listen_hubs", "Calls with a shared reader (at least one listener).")
LISTEN_SKIPPED = Counter(
    "pv_api_listen_skipped_messages_total",
    "Messages a slow listener skipped (its queue was full: the oldest was dropped).")
LISTEN_DROPPED = Counter(
    "pv_api_listen_dropped_total", "Listen sockets closed by the API, by reason.", ["reason"])
LISTEN_FRAMES = Counter("pv_api_listen_frames_total", "Stereo frames produced by the shared readers.")
ANSWERS = Counter(
    "pv_api_answer_total", "Inbound calls answered at the answer URL, by outcome.", ["outcome"])
ANSWER_SECONDS = Histogram(
    "pv_api_answer_seconds", "Time to answer the platform's inbound POST.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0))
