"""The dialer on a Redis Cluster: real RQ worker processes whose queue lives on
a plain Redis (``PV_QUEUE_REDIS_URL``: the session's EmbeddedRedis) while every
call record, campaign index and the dialer's own keys live on the local
cluster. One call and calls of many slots and three campaigns, a re-sent
request whose job was lost, retries and refusals, a work-horse killed
mid-request, a cluster without a queue URL refused, one cluster client per
in-process dialer (not one per call); and the steps that replaced the
cross-slot transactions: racing enqueuers of one idempotency key push one
job, the sweep repairs the indexes from the record and never fails an attempt
younger than its threshold."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot
from rq import Queue
from rq.job import Job
from rq.suspension import resume, suspend
from rq.worker import Worker

import workers_support  # tests/ is on the path (rootdir conftest)
from piopiy_voice import callrecord, keys
from piopiy_voice.errors import PiopiyConfigError
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

    def start(n=1, fork=False, **extra):
        """``n`` dialer processes; ``fork``: a work-horse per job (``--fork``);
        ``extra``: environment variables."""
        e = dict(env, **extra)
        started = []
        for _ in range(n):
            log = open(tmp_path / f"dialer{len(procs)}.log", "w")
            cmd = [sys.executable, "-m", "piopiy_voice.cli", "dialer"] + (["--fork"] if fork else [])
            procs.append((subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=log,
                                           stderr=subprocess.STDOUT), log))
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


def test_calls_are_placed_with_the_records_on_the_cluster_and_the_queue_apart(rc, q, piopiy, workers,
                                                                               settings):
    res = enqueue_call(rc, to=TO, campaign="spring", settings=settings)
    # The record is on the cluster, the job on the queue's own Redis.
    assert meta(rc, res.call_id)["state"] == "queued"
    assert Job.exists(res.job_id, connection=q)
    assert not q.exists(keys.call_meta(res.call_id))
    workers(1)
    wait_for(state_is(rc, res.call_id, "placed", "failed"), what="call placed")
    rec = meta(rc, res.call_id)
    assert rec["state"] == "placed" and rec["request_id"] == "req-1", rec
    assert "inflight" not in rec and piopiy.count() == 1
    events = [f[b"event"].decode() for _, f in rc.xrange(keys.call_timeline(res.call_id))]
    assert events == ["state.dialing", "state.placed"]
    assert rc.hget(keys.campaign_key("spring", "states"), res.call_id) == b"placed"
    assert rc.zscore(dialing_key(), res.call_id) is None


def test_a_resent_request_whose_job_was_lost_is_queued_again_and_rings_once(rc, q, piopiy, workers,
                                                                            settings):
    first = enqueue_call(rc, to=TO, settings=settings, idempotency_key="order-17")
    # The enqueueing process died after the record, before the job: no job.
    Job.fetch(first.job_id, connection=q).delete()
    again = enqueue_call(rc, to=TO, settings=settings, idempotency_key="order-17")
    assert not again.created and again.call_id == first.call_id
    assert Job.exists(first.job_id, connection=q)
    third = enqueue_call(rc, to=TO, settings=settings, idempotency_key="order-17")
    assert third.call_id == first.call_id
    workers(1)
    wait_for(state_is(rc, first.call_id, "placed"), what="placed")
    time.sleep(1.0)  # a second job, if one had been queued, would have dialed by now
    assert piopiy.count() == 1


def test_a_cluster_without_a_queue_url_is_refused_in_one_line(rc, env):
    settings = Settings.from_env({k: v for k, v in env.items() if k != "PV_QUEUE_REDIS_URL"})
    with pytest.raises(PiopiyConfigError, match="PV_QUEUE_REDIS_URL"):
        enqueue_call(rc, to=TO, settings=settings)
    proc = subprocess.run([sys.executable, "-m", "piopiy_voice.cli", "dialer"], cwd=ROOT,
                          env={k: v for k, v in env.items() if k != "PV_QUEUE_REDIS_URL"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "PV_QUEUE_REDIS_URL" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def _connections_received(cluster) -> int:
    total = 0
    for port in cluster.ports:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
        try:
            total += client.info("stats")["total_connections_received"]
        finally:
            client.close()
    return total


@pytest.mark.parametrize("fork", [False, True], ids=["in-process", "fork"])
def test_a_dialer_keeps_one_cluster_client_not_one_per_call(rc, q, piopiy, workers, settings,
                                                           redis_cluster, fork):
    """Every call placed exactly once in both modes; the in-process dialer
    opens its connections to the cluster once, the forking one per call (each
    work-horse builds its own client: what ``--fork`` costs)."""
    n = 40
    ids = [enqueue_call(rc, to=f"9198765433{i:02d}", settings=settings).call_id for i in range(n)]
    suspend(q)
    try:
        workers(1, fork=fork)
        wait_for(lambda: Worker.count(connection=q) == 1, what="the dialer registered")
        time.sleep(1.0)  # its start-up connections (sweeper, scheduler) are made
        before = _connections_received(redis_cluster)
    finally:
        resume(q)
    for cid in ids:
        wait_for(state_is(rc, cid, "placed", "failed"), what=f"{cid} placed")
    opened = _connections_received(redis_cluster) - before
    assert piopiy.count() == n
    assert sorted(str(req["body"]["to"]) for req in piopiy.requests) == sorted(
        f"9198765433{i:02d}" for i in range(n))
    assert all(meta(rc, cid)["dial_attempts"] == "1" for cid in ids)
    if fork:
        assert opened >= n, opened
    else:
        # One client's worth (measured 11: the topology asked of the seeds, then a
        # connection per primary), whatever the number of calls.
        assert opened <= 3 * len(redis_cluster.ports), opened


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
        (proc,) = workers(1, fork=True)
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

def test_calls_stuck_in_dialing_are_swept_on_the_cluster(rc):
    rc.hset(keys.call_meta("c-stuck"), mapping={"state": "dialing", "inflight": "100.0",
                                                 "campaign": "spring"})
    rc.zadd(dialing_key(), {"c-stuck": 100.0})
    assert sweep_stuck(rc, 60, now=1000.0) == ["c-stuck"]
    rec = meta(rc, "c-stuck")
    assert rec["state"] == "failed" and rec["outcome"] == "outcome_unknown" and "inflight" in rec
    assert rc.zscore(dialing_key(), "c-stuck") is None
    assert rc.hget(keys.campaign_key("spring", "states"), "c-stuck") == b"failed"


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



def _enqueue_dying_before_the_job(monkeypatch, rc, settings, **options):
    """``enqueue_call`` whose process dies (a BaseException nothing catches)
    after the record and before the job, as a SIGKILL there would leave it:
    the call id it left in the enqueuing index."""
    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed between the record and the job")
    before = {m.decode() for m in rc.zrange(dialer_api.enqueuing_key(), 0, -1)}
    monkeypatch.setattr(dialer_api, "_put_job_once", die)
    with pytest.raises(KeyboardInterrupt):
        enqueue_call(rc, to=TO, settings=settings, **options)
    monkeypatch.undo()
    (call_id,) = {m.decode() for m in rc.zrange(dialer_api.enqueuing_key(), 0, -1)} - before
    assert meta(rc, call_id)["state"] == "queued"
    return call_id


def test_an_enqueue_that_died_before_its_job_is_finished_by_the_sweep(monkeypatch, rc, q, settings):
    queue = Queue(QUEUE, connection=q)
    # A whole enqueue leaves nothing in the index.
    enqueue_call(rc, to=TO, settings=settings)
    assert rc.zcard(dialer_api.enqueuing_key()) == 0 and queue.count == 1
    keyless = _enqueue_dying_before_the_job(monkeypatch, rc, settings, campaign="swq")
    keyed = _enqueue_dying_before_the_job(monkeypatch, rc, settings, idempotency_key="order-sweep")
    # Younger than the threshold: left alone (the enqueuer may only be slow).
    assert dialer_api.sweep_unfinished_enqueues(rc, queue, 60) == []
    done = dict(dialer_api.sweep_unfinished_enqueues(rc, queue, 60, now=time.time() + 61))
    assert done == {keyless: "failed", keyed: "queued"}
    # Without a key: failed, never rung (no job); the campaign's index follows.
    rec = meta(rc, keyless)
    assert rec["state"] == "failed" and rec["outcome"] == "not_placed"
    assert "no idempotency key" in rec["reason"]
    assert not Job.exists(dialer_api.job_id_for(keyless), connection=q)
    assert rc.hget(keys.campaign_key("swq", "states"), keyless) == b"failed"
    # With a key: its job is queued, once; a re-send finds the same call and queues nothing more.
    assert meta(rc, keyed)["state"] == "queued" and Job.exists(dialer_api.job_id_for(keyed), connection=q)
    again = enqueue_call(rc, to=TO, settings=settings, idempotency_key="order-sweep")
    assert again.call_id == keyed and not again.created
    assert queue.count == 2  # the whole enqueue's job and the keyed one
    assert rc.zcard(dialer_api.enqueuing_key()) == 0
    assert dialer_api.sweep_unfinished_enqueues(rc, queue, 60, now=time.time() + 61) == []
