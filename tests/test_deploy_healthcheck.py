"""piopiy_voice.healthcheck (`piopiy-voice healthcheck`): the container health check of every role."""

from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest

from piopiy_voice import healthcheck as hc
from piopiy_voice import keys
from piopiy_voice.redisconn import free_port


@pytest.fixture
def http_server():
    """A loopback HTTP server answering 200 on /healthz, /metrics, /sandbox/calls; 503 elsewhere."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            code = 200 if self.path in ("/healthz", "/metrics", "/sandbox/calls") else 503
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    return free_port()  # free now: nothing listens there


def test_workers_zset_matches_keys():
    assert hc.WORKERS_ZSET == keys.WORKERS_ZSET


def test_option_value():
    assert hc.option_value(["--port", "1", "--x"], "--port") == "1"
    assert hc.option_value(["--port=2"], "--port") == "2"
    assert hc.option_value(["--port", "1", "--port", "3"], "--port") == "3"
    assert hc.option_value(["--metrics-port", "9"], "--port") is None


def test_find_role_argv_reads_proc(tmp_path):
    for pid, argv in {"1": ["/sbin/docker-init", "--", "piopiy-voice", "worker", "--metrics-port", "9101"],
                      "7": ["piopiy-voice", "healthcheck"]}.items():
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (tmp_path / "self").mkdir()
    assert hc.find_role_argv(str(tmp_path)) == ["worker", "--metrics-port", "9101"]
    (tmp_path / "1" / "cmdline").write_bytes(b"python\0-m\0piopiy_voice.cli\0gateway\0")
    assert hc.find_role_argv(str(tmp_path)) == ["gateway"]
    (tmp_path / "1" / "cmdline").write_bytes(b"piopiy-voice\0status\0abc\0")
    assert hc.find_role_argv(str(tmp_path)) is None


def test_gateway_and_sandbox_http(http_server, monkeypatch):
    monkeypatch.setenv("PV_GATEWAY_PORT", str(http_server))
    ok, why = hc.check("gateway", [])
    assert ok, why
    monkeypatch.setenv("PV_SANDBOX_PORT", str(http_server))
    assert hc.check("sandbox", [])[0]
    # --port wins over env.
    dead = closed_port()
    ok, why = hc.check("gateway", [], port=dead)
    assert not ok and "unreachable" in why


def test_non_2xx_is_unhealthy(monkeypatch):
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ok, why = hc.check("gateway", [], port=server.server_port)
        assert not ok and "503" in why
    finally:
        server.shutdown()
        server.server_close()


def test_worker_needs_metrics_and_heartbeat(http_server, r, redis_url, monkeypatch):
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.delenv("PV_WORKER_ID", raising=False)
    assert not hc.check("worker", [])[0]  # no metrics port known
    ok, why = hc.check("worker", ["--metrics-port", str(http_server)])
    assert not ok and "no worker heartbeat" in why
    me = f"{socket.gethostname()}-4242"
    r.zadd(keys.WORKERS_ZSET, {me: time.time() - 100, "otherhost-1": time.time()})
    ok, why = hc.check("worker", [], port=http_server)
    assert not ok and "stale" in why
    r.zadd(keys.WORKERS_ZSET, {me: time.time()})
    ok, why = hc.check("worker", [], port=http_server)
    assert ok, why
    # A worker of this host killed earlier (another pid) left a stale entry.
    r.zadd(keys.WORKERS_ZSET, {f"{socket.gethostname()}-7": time.time() - 1000})
    ok, why = hc.check("worker", [], port=http_server)
    assert ok, why
    monkeypatch.setenv("PV_WORKER_ID", "otherhost-1")
    assert hc.check("worker", [], port=http_server)[0]
    ok, why = hc.check("worker", [], port=closed_port())
    assert not ok and "unreachable" in why


def test_dialer_needs_registered_rq_worker(r, redis_url, monkeypatch):
    monkeypatch.setenv("REDIS_URL", redis_url)
    ok, why = hc.check("dialer", [])
    assert not ok and "no rq worker" in why
    r.sadd("rq:workers", "rq:worker:elsewhere")
    r.hset("rq:worker:elsewhere", "hostname", "elsewhere")
    assert not hc.check("dialer", [])[0]
    r.sadd("rq:workers", "rq:worker:mine")
    r.hset("rq:worker:mine", "hostname", socket.gethostname())
    ok, why = hc.check("dialer", [])
    assert ok and "rq:worker:mine" in why


def test_dialer_redis_down(monkeypatch):
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{closed_port()}/0")
    ok, why = hc.check("dialer", [])
    assert not ok and "redis unreachable" in why


def test_main_exit_codes(http_server, monkeypatch, capsys):
    assert hc.main(["gateway", "--port", str(http_server)]) == 0
    assert capsys.readouterr().out.startswith("healthy:")
    assert hc.main(["gateway", "--port", str(closed_port())]) == 1
    assert capsys.readouterr().out.startswith("unhealthy:")
    with pytest.raises(ValueError, match="role"):
        hc.check("nope", [])
