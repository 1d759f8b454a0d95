"""`piopiy-voice up` as a real process: its export lines let another process place a
call against the sandbox, and SIGINT stops every child (no orphans)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

pytestmark = [pytest.mark.e2e]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_up_prints_exports_serves_a_call_and_stops_on_sigint(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PV_", "PIOPIY_")) and k != "REDIS_URL"}
    up = subprocess.Popen([sys.executable, "-m", "piopiy_voice.cli", "up", "--report-dir", str(tmp_path),
                           "--grace", "5"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 90
        for line in up.stdout:
            lines.append(line)
            if line.startswith("export "):
                break
            assert time.monotonic() < deadline, "".join(lines)
        out = "".join(lines)
        assert lines and lines[-1].startswith("export "), out
        pids = [int(p) for p in re.findall(r"ready \(pid (\d+)", out)]
        assert len(pids) == 5, out  # sandbox, gateway, worker, transcriber, dialer
        exported = dict(item.split("=", 1) for item in shlex.split(lines[-1])[1:])
        assert {"REDIS_URL", "PIOPIY_BASE_URL", "PV_DIAL_QUEUE"} <= set(exported)
        redis_port = int(exported["REDIS_URL"].rsplit(":", 1)[1].split("/")[0])

        # "Another terminal": a fresh environment plus the export line only.
        client_env = {**env, **exported}
        cli = [sys.executable, "-m", "piopiy_voice.cli"]
        placed = subprocess.run([*cli, "call", "--to", "919812345678", "--param", "scenario=hangup_mid_utterance"],
                                env=client_env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
        assert placed.returncode == 0, placed.stderr
        call_id = placed.stdout.strip()
        state = None
        for _ in range(120):
            status = subprocess.run([*cli, "status", call_id, "--json"], env=client_env, cwd=tmp_path,
                                    capture_output=True, text=True, timeout=30)
            if status.returncode == 0:
                import json

                state = json.loads(status.stdout)["record"].get("state")
                if state in ("ended", "failed"):
                    break
            time.sleep(0.5)
        assert state == "ended", status.stdout + status.stderr

        up.send_signal(signal.SIGINT)
        assert up.wait(30) == 0
        rest = up.stdout.read()
        assert "stopping" in rest
        for pid in pids:
            assert not _alive(pid), f"child {pid} outlived `up`:\n{rest}"
        import socket

        with pytest.raises(OSError):  # the private Redis is gone too
            socket.create_connection(("127.0.0.1", redis_port), timeout=1).close()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(10)
