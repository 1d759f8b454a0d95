"""The dialer with its call records on a real Redis Cluster and its RQ queue on
a plain redis-server of its own (``PV_QUEUE_REDIS_URL``): real RQ worker
processes place calls on a scripted REST server on loopback."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from rq.job import Job

from piopiy_voice import keys
from piopiy_voice.errors import PiopiyConfigError
from piopiy_voice.redisconn import EmbeddedRedis, connect
from piopiy_voice.settings import Settings
from piopiy_voice.workers.dialer import enqueue_call
from piopiy_voice.workers.dialer.jobs import dialing_key, sweep_stuck
from test_dialer_flow import FakePiopiy
from workers_support import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parent.parent
TO = "919876543210"


@pytest.fixture(scope="module")
def queue_server():
    server = EmbeddedRedis()
    yield server
    server.close()


@pytest.fixture
def queue(queue_server):
    q = connect(queue_server.url)
    q.flushdb()
    yield q
    q.close()


@pytest.fixture
def piopiy():
    server = FakePiopiy()
    yield server
    server.close()


@pytest.fixture
def env(subprocess_env, piopiy, redis_cluster, queue_server):
    e = dict(subprocess_env)
    e.update({
        "REDIS_URL": redis_cluster.url, "PV_QUEUE_REDIS_URL": queue_server.url,
        "PIOPIY_APP_ID": "4242", "PIOPIY_APP_TOKEN": "token-xyz", "PIOPIY_BASE_URL": piopiy.url,
        "PIOPIY_CALLER_ID": "919000000000", "PV_SIGNING_SECRET": "test-dialer-signing-secret",
        "PV_GATEWAY_PUBLIC_URL": "wss://gw.example.test", "PV_DIAL_QUEUE": "calls-cluster",
        "PV_DIAL_RATE_PER_S": "50", "PV_LOG_LEVEL": "INFO",
    })
    return e


@pytest.fixture
def dialer(env, tmp_path):
    procs = []

    def start(**extra):
        log = open(tmp_path / f"dialer{len(procs)}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "piopiy_voice.cli", "dialer"], cwd=ROOT,
                                env=dict(env, **extra), stdout=log, stderr=subprocess.STDOUT)
        procs.append((proc, log))
        return proc

    yield start
    for proc, log in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _meta(rc, call_id):
    return {k.decode(): v.decode() for k, v in rc.hgetall(keys.call_meta(call_id)).items()}


def test_calls_are_placed_with_the_records_on_the_cluster_and_the_queue_apart(rc, queue, piopiy, dialer, env):
    settings = Settings.from_env(env)
    res = enqueue_call(rc, to=TO, campaign="spring", settings=settings)
    # The record is on the cluster, the job on the queue's own Redis.
    assert _meta(rc, res.call_id)["state"] == "queued"
    assert Job.exists(res.job_id, connection=queue)
    assert not queue.exists(keys.call_meta(res.call_id))
    dialer()
    wait_for(lambda: _meta(rc, res.call_id).get("state") in ("placed", "failed"), timeout=20,
             what="call placed")
    rec = _meta(rc, res.call_id)
    assert rec["state"] == "placed" and rec["request_id"] == "req-1", rec
    assert "inflight" not in rec and piopiy.count() == 1
    events = [f[b"event"].decode() for _, f in rc.xrange(keys.call_timeline(res.call_id))]
    assert events == ["state.dialing", "state.placed"]
    assert rc.hget(keys.campaign_key("spring", "states"), res.call_id) == b"placed"
    assert rc.zscore(dialing_key(), res.call_id) is None


def test_a_resent_request_whose_job_was_lost_is_queued_again_and_rings_once(rc, queue, piopiy, dialer, env):
    settings = Settings.from_env(env)
    first = enqueue_call(rc, to=TO, settings=settings, idempotency_key="order-17")
    # The enqueueing process died after the record, before the job: no job.
    Job.fetch(first.job_id, connection=queue).delete()
    again = enqueue_call(rc, to=TO, settings=settings, idempotency_key="order-17")
    assert not again.created and again.call_id == first.call_id
    assert Job.exists(first.job_id, connection=queue)
    third = enqueue_call(rc, to=TO, settings=settings, idempotency_key="order-17")
    assert third.call_id == first.call_id
    dialer()
    wait_for(lambda: _meta(rc, first.call_id).get("state") == "placed", timeout=20, what="placed")
    time.sleep(1.0)  # a second job, if one had been queued, would have dialed by now
    assert piopiy.count() == 1


def test_a_cluster_without_a_queue_url_is_refused_in_one_line(rc, env, tmp_path):
    settings = Settings.from_env({k: v for k, v in env.items() if k != "PV_QUEUE_REDIS_URL"})
    with pytest.raises(PiopiyConfigError, match="PV_QUEUE_REDIS_URL"):
        enqueue_call(rc, to=TO, settings=settings)
    proc = subprocess.run([sys.executable, "-m", "piopiy_voice.cli", "dialer"], cwd=ROOT,
                          env={k: v for k, v in env.items() if k != "PV_QUEUE_REDIS_URL"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "PV_QUEUE_REDIS_URL" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_calls_stuck_in_dialing_are_swept_on_the_cluster(rc):
    rc.hset(keys.call_meta("c-stuck"), mapping={"state": "dialing", "inflight": "100.0",
                                                 "campaign": "spring"})
    rc.zadd(dialing_key(), {"c-stuck": 100.0})
    assert sweep_stuck(rc, 60, now=1000.0) == ["c-stuck"]
    rec = _meta(rc, "c-stuck")
    assert rec["state"] == "failed" and rec["outcome"] == "outcome_unknown" and "inflight" in rec
    assert rc.zscore(dialing_key(), "c-stuck") is None
    assert rc.hget(keys.campaign_key("spring", "states"), "c-stuck") == b"failed"
