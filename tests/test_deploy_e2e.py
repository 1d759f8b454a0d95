"""The compose roles, started as plain processes from docker-compose.yml, pass a call.

Two gateways (behind a round-robin proxy: the public URL the dialer signs),
two workers, one dialer and the sandbox, against the test Redis. One call is
enqueued with ``piopiy-voice call``; the sandbox (as the platform) dials a
gateway, a worker runs the default agent: greeting, an answer to the caller,
a reprompt after silence, goodbye, hangup. Two calls are placed so that each
gateway replica holds one socket. Each call record must reach ``ended`` and
the sandbox report must show what the agent did; then every role must stop
cleanly on SIGTERM. The secrets come from files, as compose mounts them: a
SECRETS_DIR made here with a non-development signing secret, which the dialer
signs with and the gateways verify with.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from piopiy_voice import keys

ROOT = Path(__file__).resolve().parent.parent
from piopiy_voice.compose import ComposeFile, LocalStack

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

#: What a .env would say for this run: short timers so the call ends quickly.
ENV = {
    "PV_DRAIN_GRACE_S": "2",
    "PV_SILENCE_TIMEOUT_S": "2",
    "PV_LOG_LEVEL": "INFO",
}
SIGNING_SECRET = "e2e-signing-secret-0123456789"
CALL_DEADLINE_S = 90


def wait_for(predicate, timeout_s: float, what: str, stack: LocalStack, interval: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for rep in stack.all_replicas():
            if rep.proc.poll() is not None:
                pytest.fail(f"{rep.name} exited ({rep.proc.returncode}) while waiting for {what}:\n{rep.log()[-3000:]}")
        time.sleep(interval)
    logs = "\n".join(f"--- {r.name}\n{r.log()[-1500:]}" for r in stack.all_replicas())
    pytest.fail(f"timed out after {timeout_s}s waiting for {what}\n{logs}")


def get_json(url: str, timeout: float = 10):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


@pytest.fixture
def stack(redis_url, r, subprocess_env, tmp_path):
    secrets = tmp_path / "secrets"
    shutil.copytree(ROOT / "deploy" / "secrets" / "dev", secrets)
    (secrets / "pv_signing_secret").write_text(SIGNING_SECRET + "\n")
    compose = ComposeFile(ROOT / "docker-compose.yml", environ={**ENV, "SECRETS_DIR": str(secrets)})
    base = {k: v for k, v in subprocess_env.items() if not k.startswith(("PV_", "PIOPIY_"))}
    s = LocalStack(compose, redis_url, base_env=base, work_dir=tmp_path, stop_timeout_s=10)
    try:
        s.up({"gateway": 2, "worker": 2, "dialer": 1, "sandbox": 1}, health_timeout_s=60)
        yield s
    finally:
        s.down()


def place_call(stack: LocalStack, to: str, scenario: str) -> str:
    dialer = stack.replicas["dialer"][0]
    res = subprocess.run(
        [sys.executable, "-m", "piopiy_voice.cli", "call", "--to", to, "--param", f"scenario={scenario}"],
        env=dialer.env, cwd=stack.work_dir, capture_output=True, text=True, timeout=30,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1]


def record(r, call_id: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in r.hgetall(keys.call_meta(call_id)).items()}


def test_calls_end_to_end_through_scaled_roles(stack, r):
    assert len(stack.replicas["gateway"]) == 2 and len(stack.replicas["worker"]) == 2
    for rep in (*stack.replicas["gateway"], *stack.replicas["dialer"]):
        assert Path(rep.env["PV_SIGNING_SECRET_FILE"]).read_text().strip() == SIGNING_SECRET
        assert "PV_SIGNING_SECRET" not in rep.env
    # Two calls: the proxy alternates, so each gateway replica holds one
    # socket and each must receive its call's commands (routed by gateway_id).
    calls = [place_call(stack, "919812345678", "listen"), place_call(stack, "919812345679", "listen")]

    wait_for(lambda: all(record(r, c).get("state") == "ended" for c in calls),
             CALL_DEADLINE_S, f"calls {calls} to end", stack)
    gateway_ids = {g.decode() for g in r.zrange(keys.GATEWAYS_ZSET, 0, -1)}
    assert len(gateway_ids) == 2
    records = [record(r, c) for c in calls]
    assert {rec.get("gateway_id") for rec in records} == gateway_ids, records
    assert list(stack.proxies["gateway:8765"].connections.values()) == [1, 1]

    sandbox = stack.url("sandbox", 8766)
    for call_id, rec in zip(calls, records):
        assert rec.get("end_reason") == "hangup", rec
        assert rec.get("owner"), rec
        report = get_json(f"{sandbox}/sandbox/calls/{rec['request_id']}?wait=30", timeout=40)
        assert report["finished"], report["status"]
        assert report["scenario"] == "listen"
        assert str(report["to"]) == rec["to"]
        # The agent spoke (greeting, reply, reprompt, goodbye), then hung up.
        assert report["received"].get("streamAudio", 0) >= 3, report["received"]
        assert report["playout"]["received_ms"] > 2000, report["playout"]
        assert report["end_reason"] == "hangup_pcmo", report["end_reason"]
        actions = [a for e in report["events"] if e.get("kind") == "pcmo" for a in e.get("actions", [])]
        assert actions == ["hangup"], actions
        assert not report["malformed"], report["malformed"]

        status = subprocess.run(
            [sys.executable, "-m", "piopiy_voice.cli", "status", call_id, "--json"],
            env=stack.replicas["dialer"][0].env, capture_output=True, text=True, timeout=30,
        )
        assert status.returncode == 0, status.stderr
        events = [e["event"] for e in json.loads(status.stdout)["timeline"]]
        for expected in ("placed", "live", "ended"):
            assert any(expected in ev for ev in events), events

    # SIGTERM (what compose/k8s send) stops every role cleanly and in time.
    codes = stack.down()
    assert codes == {rep.name: 0 for rep in stack.all_replicas()}, codes
