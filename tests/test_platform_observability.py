"""Metrics through prometheus_client (HELP, units, labels, process_*, one Content-Type),
the worker's /healthz, and JSON logs with role, instance and call_id."""

from __future__ import annotations

import io
import json
import logging
import re
import time
import urllib.error
import urllib.request

import pytest

from piopiy_voice.gateway.metrics import Metrics as GatewayMetrics
from piopiy_voice.observability import CONTENT_TYPE, call_context, check_name, setup_logging
from piopiy_voice.workers import metrics as wm


def families(text: str) -> dict[str, dict]:
    """family -> {"help":..., "type":..., "samples": [lines]} from Prometheus text."""
    out: dict[str, dict] = {}
    for line in text.splitlines():
        m = re.match(r"# (HELP|TYPE) (\S+) (.*)", line)
        if m:
            out.setdefault(m.group(2), {"samples": []})[m.group(1).lower()] = m.group(3)
        elif line:
            name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group()
            fam = next((f for f in out if name == f or name.startswith(f + "_")), name)
            out.setdefault(fam, {"samples": []})["samples"].append(line)
    return out


def check_conventions(text: str, prefix: str) -> dict[str, dict]:
    fams = families(text)
    ours = {k: v for k, v in fams.items() if k.startswith(prefix)}
    assert ours
    for name, fam in fams.items():
        assert fam.get("help"), f"{name}: no HELP"
        assert fam.get("type"), f"{name}: no TYPE"
    for name, fam in ours.items():
        if fam["type"] == "counter":
            assert all(s.split("{")[0].split(" ")[0].endswith("_total") for s in fam["samples"]), name
    assert "process_cpu_seconds_total" in fams and "process_resident_memory_bytes" in fams
    return ours


def test_gateway_metrics_labels_and_conventions():
    m = GatewayMetrics()
    m.c["commands_applied"] += 3  # the hot path: a plain dict increment
    m.inc("commands_rejected")
    m.inc("calls_started", 2)
    m.c["bytes_in"] += 320
    m.gauge("calls_live", lambda: 4)
    ours = check_conventions(m.render(), "pv_gateway_")
    cmds = ours["pv_gateway_commands"]["samples"] if "pv_gateway_commands" in ours else \
        ours["pv_gateway_commands_total"]["samples"]
    assert 'pv_gateway_commands_total{outcome="applied"} 3.0' in cmds
    assert 'pv_gateway_commands_total{outcome="rejected"} 1.0' in cmds
    text = m.render()
    assert 'pv_gateway_calls_total{event="started"} 2.0' in text
    assert "pv_gateway_audio_received_bytes_total 320.0" in text
    assert "pv_gateway_calls_live 4.0" in text


def test_gateway_metrics_response_has_one_content_type():
    from websockets.datastructures import Headers
    from websockets.http11 import Response

    class Conn:  # what websockets' ServerConnection.respond does
        def respond(self, status, text):
            h = Headers()
            h["Content-Type"] = "text/plain; charset=utf-8"
            return Response(status, "OK", h, text.encode())

    resp = GatewayMetrics().respond(Conn())
    assert resp.headers.get_all("Content-Type") == [CONTENT_TYPE]


def test_worker_metrics_conventions_and_labels():
    m = wm.Metrics()
    m.calls_owned = 3
    m.inc("claims_after_crash_total")
    m.inc("calls_gateway_lost_total", 2)
    m.counters["entries_total"] += 10
    m.observe_lag(0.03)
    ours = check_conventions(m.render(), "pv_worker_")
    text = m.render()
    assert 'pv_worker_takeovers_total{kind="crash"} 1.0' in text
    assert 'pv_worker_calls_finished_total{reason="gateway_lost"} 2.0' in text
    assert 'pv_worker_stream_lag_seconds_bucket{le="0.05"} 1.0' in text
    assert ours["pv_worker_stream_lag_seconds"]["type"] == "histogram"


@pytest.mark.parametrize("name,kind", [("pv_gateway_frames", "counter"), ("pv_x_total", "gauge"),
                                       ("gateway_frames_total", "counter")])
def test_names_are_checked(name, kind):
    with pytest.raises(ValueError):
        check_name(name, kind)


def test_worker_http_metrics_and_healthz(monkeypatch):
    m = wm.Metrics()
    server = wm.serve(m, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + "/healthz", timeout=5)
        assert e.value.code == 503  # the loop has not turned yet
        m.calls_owned = 0  # one loop turn
        with urllib.request.urlopen(base + "/healthz", timeout=5) as resp:
            assert resp.status == 200
        with urllib.request.urlopen(base + "/metrics", timeout=5) as resp:
            assert resp.headers.get_all("Content-Type") == [CONTENT_TYPE]
            assert b"pv_worker_calls_owned 0.0" in resp.read()
        monkeypatch.setattr(wm.time, "monotonic", lambda: time.monotonic_ns() / 1e9 + wm.HEALTHY_TURN_S + 5)
        ok, why = m.healthy()
        assert not ok and "stuck" in why
    finally:
        server.shutdown()
        server.server_close()


def test_json_logs_carry_role_instance_and_call_id():
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    out = io.StringIO()
    try:
        setup_logging("worker", level="INFO", fmt="json", instance="w-1", stream=out)
        log = logging.getLogger("piopiy_voice.test")
        log.info("call %s: sent %s", "c-42", "cmd.hangup")
        with call_context("c-7"):
            log.warning("slow turn")
        log.info("worker up")
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [ln.get("call_id") for ln in lines] == ["c-42", "c-7", None]
    assert all(ln["role"] == "worker" and ln["instance"] == "w-1" for ln in lines)
    assert lines[0]["message"] == "call c-42: sent cmd.hangup" and lines[1]["level"] == "WARNING"


def test_every_counter_the_worker_runtime_counts_is_exported():
    """The runner counts works, Redis errors and recovery events; each name must
    be a declared family, or it would be counted and never scraped."""
    from piopiy_voice.workers.metrics import Metrics

    m = Metrics()
    for name in ("works_started_total", "works_lost_total", "work_results_ignored_total",
                 "redis_oom_total", "redis_group_recreated_total", "leases_retaken_total",
                 "calls_reannounced_total", "calls_resumed_after_reconnect_total",
                 "stale_commands_suppressed_total", "urgent_commits_total"):
        m.inc(name, 3)
    m.works_in_flight = 2
    text = m.render()
    for line in ('pv_worker_works_total{outcome="started"} 3.0',
                 'pv_worker_works_total{outcome="lost"} 3.0',
                 'pv_worker_works_total{outcome="result_ignored"} 3.0',
                 'pv_worker_redis_errors_total{kind="oom"} 3.0',
                 'pv_worker_redis_errors_total{kind="nogroup"} 3.0',
                 "pv_worker_leases_retaken_total 3.0",
                 "pv_worker_calls_reannounced_total 3.0",
                 "pv_worker_calls_resumed_after_reconnect_total 3.0",
                 "pv_worker_stale_commands_suppressed_total 3.0",
                 "pv_worker_urgent_commits_total 3.0",
                 "pv_worker_works_in_flight 2.0"):
        assert line in text, line
    with pytest.raises(KeyError):
        m.inc("not_a_declared_counter")


def test_a_looping_role_starts_work_with_its_start_up_heap_frozen():
    """``run_loop_role`` freezes what start-up left before ``loop.run`` (full
    collections then skip it: ``freeze_startup_heap``)."""
    import gc  # noqa: PLC0415
    import signal  # noqa: PLC0415

    from piopiy_voice.observability import run_loop_role  # noqa: PLC0415

    class Loop:
        frozen = -1

        def run(self, max_seconds=None):
            self.frozen = gc.get_freeze_count()

        def stop(self):
            pass

    saved = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    gc.unfreeze()
    loop = Loop()
    try:
        assert gc.get_freeze_count() == 0
        assert run_loop_role("worker", loop, None, "127.0.0.1", None, None) == 0
    finally:
        gc.unfreeze()
        signal.signal(signal.SIGTERM, saved[0])
        signal.signal(signal.SIGINT, saved[1])
    assert loop.frozen > 10_000  # the test process's modules, at least
