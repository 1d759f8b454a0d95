"""More of the dialer on a Redis Cluster (beside ``test_dialer_cluster``): real
RQ worker processes whose queue lives on a plain Redis (``PV_QUEUE_REDIS_URL``:
the session's EmbeddedRedis) while every call record, campaign index and the
dialer's own keys live on the local cluster. Calls of many slots and three
campaigns, retries and refusals, a work-horse killed mid-request; and the
steps that replaced the cross-slot transactions: racing enqueuers of one
idempotency key push one job, the sweep repairs the indexes from the record
and never fails an attempt younger than its threshold."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from functools import partial
from pathlib import Path

import pytest
from redis.crc import key_slot
from rq import Queue
from rq.job import Job

import workers_support  # tests/ is on the path (rootdir conftest)
from piopiy_voice import callrecord, keys
from piopiy_voice.settings import Settings
from piopiy_voice.workers.dialer import api as dialer_api
from piopiy_voice.workers.dialer import enqueue_call
from piopiy_voice.workers.dialer.jobs import dialing_key, sweep_stuck
from test_dialer_flow import CALLER, SECRET, TO, FakePiopiy, _horse

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parent.parent
QUEUE = "calls-cluster"
wait_for = partial(workers_support.wait_for, timeout=20.0, interval=0.05)


@pytest.fixture
def piopiy():
    server = FakePiopiy()
    yield server
    server.close()


@pytest.fixture
def env(subprocess_env, redis_cluster, redis_url, piopiy):
    e = dict(subprocess_env)
    e.update({
        "REDIS_URL": redis_cluster.url, "PV_QUEUE_REDIS_URL": redis_url,
        "PIOPIY_APP_ID": "4242", "PIOPIY_APP_TOKEN": "token-xyz", "PIOPIY_BASE_URL": piopiy.url,
        "PIOPIY_CALLER_ID": CALLER, "PV_SIGNING_SECRET": SECRET,
        "PV_GATEWAY_PUBLIC_URL": "wss://gw.example.test", "PV_DIAL_QUEUE": QUEUE,
        "PV_DIAL_RATE_PER_S": "200", "PV_LOG_LEVEL": "INFO",
    })
    return e


@pytest.fixture
def settings(env):
    return Settings.from_env(env)


@pytest.fixture
def q(r):
    """The queue's plain Redis (flushed), not the cluster."""
    return r


@pytest.fixture
def workers(env, tmp_path):
    procs = []

    def start(n=1, **extra):
        e = dict(env, **extra)
        started = []
        for _ in range(n):
            log = open(tmp_path / f"dialer{len(procs)}.log", "w")
            procs.append((subprocess.Popen([sys.executable, "-m", "piopiy_voice.cli", "dialer"],
                                           cwd=ROOT, env=e, stdout=log, stderr=subprocess.STDOUT), log))
            started.append(procs[-1][0])
        return started

    yield start
    for proc, _ in procs:
        proc.terminate()
    for proc, log in procs:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def meta(rc, call_id):
    return callrecord.decode_record(rc.hgetall(keys.call_meta(call_id)))


def state_is(rc, call_id, *states):
    return lambda: meta(rc, call_id).get("state") in states


def test_calls_of_many_slots_are_placed_once_each_through_rq(rc, q, piopiy, workers, settings,
                                                            redis_cluster):
    ids = []
    for i in range(24):
        res = enqueue_call(rc, to=f"9198765432{i:02d}", settings=settings,
                           campaign=f"camp{i % 3}", idempotency_key=f"order-{i}")
        assert res.created
        ids.append(res.call_id)
    # again with the same keys: the same calls, nothing queued twice
    again = [enqueue_call(rc, to=f"9198765432{i:02d}", settings=settings, campaign=f"camp{i % 3}",
                          idempotency_key=f"order-{i}") for i in range(24)]
    assert [a.call_id for a in again] == ids and not any(a.created for a in again)
    assert Queue(QUEUE, connection=q).count == 24
    # the calls really are spread over the cluster's primaries
    owners = {redis_cluster.primary_port_for(keys.call_meta(cid)) for cid in ids}
    assert len(owners) >= 2, owners
    assert len({key_slot(keys.call_meta(cid).encode()) for cid in ids}) > 10

    workers(2)
    for cid in ids:
        wait_for(state_is(rc, cid, "placed", "failed"), what=f"{cid} placed")
    assert piopiy.count() == 24
    assert sorted(str(req["body"]["to"]) for req in piopiy.requests) == sorted(
        f"9198765432{i:02d}" for i in range(24))
    for cid in ids:
        rec = meta(rc, cid)
        assert rec["state"] == "placed" and rec["dial_attempts"] == "1" and "inflight" not in rec
        events = [f[b"event"].decode() for _, f in rc.xrange(keys.call_timeline(cid))]
        assert events == ["state.dialing", "state.placed"], events
    for c in range(3):
        states = {k.decode(): v.decode() for k, v in
                  rc.hgetall(keys.campaign_key(f"camp{c}", "states")).items()}
        assert len(states) == 8 and set(states.values()) == {"placed"}, states
    assert rc.zcard(dialing_key()) == 0
    # the data stayed on the cluster, the queue on the plain Redis
    assert not [k for k in q.keys("pv:*")], q.keys("pv:*")
    assert Job.fetch(dialer_api.job_id_for(ids[0]), connection=q).get_status(refresh=True) == "finished"


def test_retry_refusal_and_failed_registry_on_the_queue_redis(rc, q, piopiy, workers, settings):
    piopiy.script = [(503, {"code": 503, "message": "busy"})]
    retried = enqueue_call(rc, to=TO, settings=settings, backoff_s=[1], campaign="rt")
    workers(1)
    wait_for(state_is(rc, retried.call_id, "placed", "failed"), what="placed after a 503")
    rec = meta(rc, retried.call_id)
    assert rec["state"] == "placed" and rec["dial_attempts"] == "2" and piopiy.count() == 2
    assert rc.hget(keys.campaign_key("rt", "states"), retried.call_id) == b"placed"

    piopiy.script = [(422, {"code": 422, "message": "missing property"})]
    refused = enqueue_call(rc, to=TO, settings=settings, campaign="rt")
    wait_for(state_is(rc, refused.call_id, "failed", "placed"), what="refused")
    rec = meta(rc, refused.call_id)
    assert rec["state"] == "failed" and rec["outcome"] == "refused" and "422" in rec["reason"]
    assert rc.hget(keys.campaign_key("rt", "states"), refused.call_id) == b"failed"
    registry = Queue(QUEUE, connection=q).failed_job_registry
    wait_for(lambda: refused.job_id in registry.get_job_ids(), what="failed registry (queue Redis)")
    assert piopiy.count() == 3
    assert rc.zcard(dialing_key()) == 0


def test_work_horse_killed_mid_request_fails_the_record_on_the_cluster(rc, q, piopiy, workers,
                                                                       settings):
    piopiy.hang = threading.Event()
    try:
        res = enqueue_call(rc, to=TO, settings=settings)
        (proc,) = workers(1)
        wait_for(lambda: piopiy.count() == 1, what="the request in flight")
        assert meta(rc, res.call_id)["state"] == "dialing"
        assert rc.zscore(dialing_key(), res.call_id) is not None
        horse = wait_for(lambda: _horse(proc.pid), what="the work-horse")
        os.kill(horse, signal.SIGKILL)
        # on_horse_killed gets the queue connection; it must write to the cluster
        wait_for(state_is(rc, res.call_id, "failed"), what="record failed")
    finally:
        piopiy.hang.set()
    rec = meta(rc, res.call_id)
    assert rec["reason"].startswith("outcome unknown") and "work-horse killed" in rec["reason"]
    assert "inflight" in rec
    rerun = Queue(QUEUE, connection=q).enqueue_call(
        "piopiy_voice.workers.dialer.jobs.place_call", args=(res.call_id, {"to": TO, "caller_id": CALLER}))
    wait_for(lambda: rerun.get_status(refresh=True) in ("finished", "failed"), what="re-run done")
    assert piopiy.count() == 1


# --------------------------------------------------- crash points, without workers

def test_racing_enqueuers_of_one_key_queue_one_job(rc, q, settings):
    results, errors = [], []

    def go():
        try:
            results.append(enqueue_call(rc, to=TO, settings=settings, idempotency_key="race"))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert len({r.call_id for r in results}) == 1 and sum(r.created for r in results) == 1
    assert Queue(QUEUE, connection=q).count == 1


def test_sweep_repairs_indexes_and_never_fails_a_fresh_attempt(rc):
    now = 1_800_000_000.0
    # a dialer died mid-request long ago: failed, outcome unknown, inflight kept
    rc.hset(keys.call_meta("c-dead"), mapping={"state": "dialing", "inflight": f"{now - 600}",
                                               "campaign": "sw"})
    # a fresh attempt whose index entry is older (a leftover of a dead claim)
    rc.hset(keys.call_meta("c-fresh"), mapping={"state": "dialing", "inflight": f"{now - 1}"})
    # an outcome whose process died before its index steps: record placed
    rc.hset(keys.call_meta("c-placed"), mapping={"state": "placed", "campaign": "sw"})
    rc.hset(keys.campaign_key("sw", "states"), mapping={"c-dead": "dialing", "c-placed": "dialing"})
    rc.zadd(dialing_key(), {"c-dead": now - 600, "c-fresh": now - 600, "c-placed": now - 600})
    assert sweep_stuck(rc, 60, now=now) == ["c-dead"]
    dead = meta(rc, "c-dead")
    assert dead["state"] == "failed" and dead["outcome"] == "outcome_unknown" and "inflight" in dead
    assert meta(rc, "c-fresh")["state"] == "dialing"
    assert rc.zscore(dialing_key(), "c-fresh") == pytest.approx(now - 1)
    assert rc.zscore(dialing_key(), "c-dead") is None and rc.zscore(dialing_key(), "c-placed") is None
    assert rc.hgetall(keys.campaign_key("sw", "states")) == {b"c-dead": b"failed", b"c-placed": b"placed"}
    events = [f[b"event"] for _, f in rc.xrange(keys.call_timeline("c-dead"))]
    assert events == [b"state.failed"]
    assert 0 < rc.ttl(keys.call_meta("c-dead")) <= 7 * 24 * 3600


def test_status_reads_the_job_from_the_queue_redis(rc, q, settings, monkeypatch):
    from piopiy_voice.workers.dialer.cli import call_status  # noqa: PLC0415

    res = enqueue_call(rc, to=TO, settings=settings)
    monkeypatch.setenv("REDIS_URL", settings.redis_url)
    monkeypatch.setenv("PV_QUEUE_REDIS_URL", settings.queue_redis_url)
    st = call_status(rc, res.call_id)
    assert st["record"]["state"] == "queued"
    assert st["job"] == {"id": res.job_id, "status": "queued", "origin": QUEUE}
    monkeypatch.delenv("PV_QUEUE_REDIS_URL")
    assert "PV_QUEUE_REDIS_URL" in call_status(rc, res.call_id)["job"]["status"]
