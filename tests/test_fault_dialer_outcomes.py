"""Dialer faults (real RQ dialer processes, real Redis, a scripted REST server).

Reproduces issue 12's dialer findings: the job re-sent make-call after
500/502/504 (up to 5 requests, each may ring a person); a whole dialer killed
mid-request left its record ``dialing`` for ~14 minutes; a failed call could
not be retried at all; the dialer started with the published signing secret
behind a wss:// URL; a full Redis gave no clear refusal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from piopiy_voice import keys
from piopiy_voice.redisconn import connect
from piopiy_voice.workers.dialer import enqueue_call
from piopiy_voice.workers.dialer.api import RedisFull
from piopiy_voice.workers.dialer.retry import RetryRefused, retry_call, retry_campaign
from test_dialer_flow import TO, env, meta, piopiy, settings, state_is, wait_for, workers  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
ROOT = Path(__file__).resolve().parent.parent


def test_500_502_504_are_outcome_unknown_one_request_each_never_resent(r, piopiy, workers, settings):
    piopiy.script = [(500, {"code": 500}), (502, {"code": 502}), (504, {"code": 504})]
    calls = [enqueue_call(r, to=TO, settings=settings, backoff_s=[0]) for _ in range(3)]
    workers(1)
    for res in calls:
        wait_for(state_is(r, res.call_id, "failed", "placed"), what="outcome")
    time.sleep(1.5)  # a (wrong) retry with backoff 0 would have gone out by now
    assert piopiy.count() == 3, "exactly one make-call request per call"
    for res in calls:
        rec = meta(r, res.call_id)
        assert rec["state"] == "failed" and rec["outcome"] == "outcome_unknown", rec
        assert "inflight" in rec  # even a manual re-run refuses to dial
        with pytest.raises(RetryRefused):
            retry_call(r, res.call_id, settings=settings)  # no --force: may have rung


def _children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return out


def test_whole_dialer_killed_mid_request_is_swept_to_outcome_unknown(r, piopiy, workers, settings):
    piopiy.hang = threading.Event()
    res = enqueue_call(r, to=TO, settings=settings)
    (dialer,) = workers(1)
    wait_for(state_is(r, res.call_id, "dialing"), what="dialing")
    wait_for(lambda: piopiy.count() == 1, what="request in flight")
    for pid in _children(dialer.pid) + [dialer.pid]:  # the work-horse too: nothing reports
        os.kill(pid, signal.SIGKILL)
    t_kill = time.monotonic()
    workers(1, PV_DIAL_STUCK_AFTER_S="2")  # any other dialer sweeps
    wait_for(state_is(r, res.call_id, "failed"), timeout=15, what="swept")
    swept_s = time.monotonic() - t_kill
    piopiy.hang.set()
    rec = meta(r, res.call_id)
    assert rec["outcome"] == "outcome_unknown" and rec["reason"].startswith("outcome_unknown"), rec
    assert swept_s < 2 + 2 + 1, swept_s  # bound + one sweep period + margin
    assert r.zcard(keys.dialer_key("dialing")) == 0
    assert piopiy.count() == 1
    print(f"\nwhole dialer SIGKILLed mid-request: record failed/outcome_unknown after {swept_s:.1f}s "
          "(PV_DIAL_STUCK_AFTER_S=2)")


def test_failed_before_ringing_is_retried_with_a_new_linked_call_and_campaign_retry(
        r, piopiy, workers, settings):
    piopiy.script = [(422, {"code": 422, "message": "missing property"})] * 2
    a = enqueue_call(r, to=TO, settings=settings, campaign="rc", idempotency_key="campaign:rc:1",
                     extra_params={"row": "1"})
    b = enqueue_call(r, to="919876543299", settings=settings, campaign="rc",
                     idempotency_key="campaign:rc:2")
    workers(1)
    for res in (a, b):
        wait_for(state_is(r, res.call_id, "failed"), what="refused")
    assert meta(r, a.call_id)["outcome"] == "refused"
    # `rq requeue` would do nothing (the record says failed); an explicit retry does.
    new = retry_call(r, a.call_id, settings=settings)
    assert new.created and new.call_id == f"{a.call_id}-r1"
    again = retry_call(r, a.call_id, settings=settings)
    assert not again.created and again.call_id == new.call_id  # never two retries of one call
    wait_for(state_is(r, new.call_id, "placed"), what="retry placed")
    rec = meta(r, new.call_id)
    assert rec["retry_of"] == a.call_id and meta(r, a.call_id)["retried_as"] == new.call_id
    assert piopiy.requests[-1]["body"]["extra_params"] == {"row": "1"}  # same request re-sent
    rep = retry_campaign(r, "rc", settings=settings)
    assert rep.retried == [f"{b.call_id}-r1"] and not rep.skipped
    wait_for(state_is(r, f"{b.call_id}-r1", "placed"), what="campaign retry placed")
    assert piopiy.count() == 4


def test_force_retries_an_unknown_outcome_and_the_cli(r, piopiy, workers, settings, env):
    piopiy.script = [(502, {"code": 502})]
    res = enqueue_call(r, to=TO, settings=settings)
    workers(1)
    wait_for(state_is(r, res.call_id, "failed"), what="unknown outcome")
    cli = [sys.executable, "-m", "piopiy_voice.cli", "call", "retry", res.call_id]
    out = subprocess.run(cli, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "--force" in out.stderr
    out = subprocess.run(cli + ["--force"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == f"{res.call_id}-r1", out.stderr
    wait_for(state_is(r, f"{res.call_id}-r1", "placed"), what="forced retry placed")
    assert piopiy.count() == 2


def test_dialer_refuses_the_dev_secret_behind_wss(env):
    e = {k: v for k, v in env.items() if k != "PV_SIGNING_SECRET"}
    e["PV_GATEWAY_PUBLIC_URL"] = "wss://gw.example.test"
    out = subprocess.run([sys.executable, "-m", "piopiy_voice.cli", "dialer", "--burst"], cwd=ROOT,
                         env=e, capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "PV_SIGNING_SECRET" in out.stderr


def test_enqueue_at_maxmemory_is_refused_clearly(settings):
    from piopiy_voice.redisconn import EmbeddedRedis

    server = EmbeddedRedis()
    r = connect(server.url)
    try:
        r.config_set("maxmemory", r.info("memory")["used_memory"] + 200_000)
        import redis as redis_py

        with pytest.raises(redis_py.ResponseError):
            for i in range(10_000):
                r.set(f"filler:{i}", b"x" * 1000)  # fills to the cap, then OOM
        with pytest.raises(RedisFull, match="NOT queued"):
            enqueue_call(r, to=TO, settings=settings)
    finally:
        r.close()
        server.close()
