"""deploy/compose_runner.py: compose interpolation and the local rewrite of a service."""

from __future__ import annotations

import socket
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
from piopiy_voice.compose import (
    ComposeError,
    ComposeFile,
    LocalStack,
    RoundRobinProxy,
    interpolate,
    load_env_file,
    variables_used,
)


@pytest.mark.parametrize(
    "text, env, expected",
    [
        ("${A:-d}", {}, "d"),
        ("${A:-d}", {"A": ""}, "d"),
        ("${A-d}", {"A": ""}, ""),
        ("${A-d}", {}, "d"),
        ("${A:-d}", {"A": "x"}, "x"),
        ("$A/${B}", {"A": "1", "B": "2"}, "1/2"),
        ("$$A ${A:-}", {"A": "v"}, "$A v"),
        ("${A:-*}", {}, "*"),
        ("pre-${A:-a:b}-post", {}, "pre-a:b-post"),
    ],
)
def test_interpolate(text, env, expected):
    assert interpolate(text, env) == expected


def test_interpolate_required():
    with pytest.raises(ComposeError, match="X is not set: need it"):
        interpolate("${X:?need it}", {}, "services.a.environment.X")
    assert interpolate("${X:?need it}", {"X": "ok"}) == "ok"


def test_variables_used_ignores_comments():
    text = "# ${NOT_ME:-x}\nservices:\n  a:\n    image: ${IMG:-i}\n    command: [\"$$literal\", \"$PLAIN\"]\n"
    assert variables_used(text) == {"IMG": "i", "PLAIN": None}


def test_load_env_file(tmp_path):
    f = tmp_path / ".env"
    f.write_text("# c\nA=1\nB='two words'\n\nC=\n")
    assert load_env_file(f) == {"A": "1", "B": "two words", "C": ""}
    f.write_text("oops\n")
    with pytest.raises(ComposeError, match=":1: expected KEY=VALUE"):
        load_env_file(f)
    assert load_env_file(tmp_path / "missing") == {}


def test_interpolation_reaches_services():
    compose = ComposeFile(ROOT / "docker-compose.yml", environ={"PV_LEASE_MS": "7000"})
    assert compose.environment("worker")["PV_LEASE_MS"] == "7000"
    assert compose.environment("gateway")["REDIS_URL"] == "redis://redis:6379/0"
    assert compose.role_argv("redis") is None
    assert compose.role_argv("gateway") == ["gateway"]


def test_plan_rewrites_hosts_ports_and_volumes(tmp_path):
    compose = ComposeFile(ROOT / "docker-compose.yml", environ={})
    stack = LocalStack(compose, "redis://127.0.0.1:1/0", base_env={"PATH": "/bin"}, work_dir=tmp_path)
    try:
        stack.plan({"gateway": 2, "worker": 2, "dialer": 1, "sandbox": 1})
        gw_addr = stack.addresses["gateway"][8765]
        sb_addr = stack.addresses["sandbox"][8766]
        gws = stack.replicas["gateway"]
        # Two replicas, each its own port, behind one proxy address.
        assert len({g.env["PV_GATEWAY_PORT"] for g in gws}) == 2
        assert all(int(g.env["PV_GATEWAY_PORT"]) != gw_addr for g in gws)
        assert all(g.env["PV_GATEWAY_HOST"] == "127.0.0.1" for g in gws)
        dialer = stack.replicas["dialer"][0]
        assert dialer.env["PV_GATEWAY_PUBLIC_URL"] == f"ws://127.0.0.1:{gw_addr}"
        assert dialer.env["PIOPIY_BASE_URL"] == f"http://127.0.0.1:{sb_addr}"
        assert dialer.env["PIOPIY_ACTION_URL"] == f"http://127.0.0.1:{sb_addr}/v1/call/action"
        assert dialer.env["REDIS_URL"] == "redis://127.0.0.1:1/0"
        assert dialer.argv[0] == "dialer"
        workers = stack.replicas["worker"]
        ports = [w.argv[w.argv.index("--metrics-port") + 1] for w in workers]
        assert len(set(ports)) == 2 and "9101" not in ports
        assert all("0.0.0.0" not in w.argv for w in workers)
        assert all("PV_WORKER_ID" not in w.env for w in workers)
        sandbox = stack.replicas["sandbox"][0]
        assert sandbox.env["PV_SANDBOX_PORT"] == str(sb_addr)  # single replica: no proxy
        report_dir = Path(sandbox.env["PV_SANDBOX_REPORT_DIR"])
        assert report_dir.is_dir() and tmp_path in report_dir.parents
        # Health checks run locally with the replica's port.
        cmd = stack.health_command(workers[0])
        assert cmd[-2:] == ["--port", ports[0]]
        assert stack.start_order().index("gateway") < stack.start_order().index("sandbox")
    finally:
        stack.down()


def test_plan_rejects_non_role_services(tmp_path):
    stack = LocalStack(ComposeFile(ROOT / "docker-compose.yml", environ={}), "redis://x", work_dir=tmp_path)
    with pytest.raises(ComposeError, match="redis: command is not piopiy-voice"):
        stack.plan({"redis": 1})
    with pytest.raises(ComposeError, match=r"scale\[worker\]"):
        stack.plan({"worker": 0})
    with pytest.raises(ComposeError, match="unknown 'nope'"):
        stack.plan({"nope": 1})


def _echo_server(tag: bytes):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                data = conn.recv(100)
                conn.sendall(tag + data)

    threading.Thread(target=serve, daemon=True).start()
    return srv


def test_round_robin_proxy():
    a, b = _echo_server(b"a:"), _echo_server(b"b:")
    proxy = RoundRobinProxy([a.getsockname()[1], b.getsockname()[1]])
    try:
        seen = []
        for i in range(4):
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c:
                c.sendall(b"hi")
                seen.append(c.recv(100))
        assert seen == [b"a:hi", b"b:hi", b"a:hi", b"b:hi"]
        assert list(proxy.connections.values()) == [2, 2]
    finally:
        proxy.close()
        a.close()
        b.close()


def test_sigterm_stops_the_roles_it_started(subprocess_env):
    # `timeout 60 python -m piopiy_voice.compose ...` or a supervisor sends SIGTERM, not Ctrl-C:
    # the roles must not be left running as orphans.
    import re
    import signal
    import subprocess
    import time

    proc = subprocess.Popen([sys.executable, "-m", "piopiy_voice.compose", "sandbox"],
                            cwd=ROOT, env=subprocess_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "stops" in line:
                break
        port = int(re.search(r"sandbox: .*->127\.0\.0\.1:(\d+)", "".join(lines)).group(1))
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # the sandbox is up
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                break  # nothing listens any more: the sandbox was stopped
            assert time.monotonic() < deadline, "the sandbox outlived the runner"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
