"""The dialer running jobs in its own process (the default; ``--fork`` for a
work-horse per job): real RQ dialer processes against the test Redis and a
scripted REST server on loopback. Calls placed exactly once each on one Redis
client and one HTTP connection per process, a hung job failed by its timeout
while the dialer goes on, two dialers sharing one queue, a dialer killed
mid-request."""

from __future__ import annotations

import io
import os
import signal
import threading
import time

import pytest
from rq import Queue
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.suspension import resume, suspend
from rq.worker import Worker

from piopiy_voice import keys
from piopiy_voice.workers.dialer import api as dialer_api
from piopiy_voice.workers.dialer import enqueue_call
from piopiy_voice.workers.dialer.campaign import enqueue_csv
from piopiy_voice.workers.dialer.jobs import dialing_key
from piopiy_voice.workers.dialer.retry import retry_call
from test_dialer_flow import (  # noqa: F401 (fixtures)
    CALLER, TO, FakePiopiy, env, meta, settings, state_is, wait_for, workers,
)

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
QUEUE = "calls-test"  # test_dialer_flow's env


@pytest.fixture
def piopiy():
    """Keep-alive connections, as the platform's: one per dialer process
    unless the dialer opens one per call."""
    server = FakePiopiy(keep_alive=True)
    yield server
    server.close()


def numbers(n: int, base: int = 0) -> list[str]:
    return [f"9198{base + i:08d}" for i in range(n)]


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


@pytest.mark.parametrize("fork", [False, True], ids=["in-process", "fork"])
def test_calls_enqueued_in_bulk_ring_exactly_once_on_one_connection_per_process(
        r, piopiy, workers, settings, fork):
    n = 40
    csv = "to,id\n" + "".join(f"{to},row{i}\n" for i, to in enumerate(numbers(n)))
    report = enqueue_csv(r, io.StringIO(csv), "bulk", settings=settings)
    assert report.enqueued == n and Queue(QUEUE, connection=r).count == n
    suspend(r)
    try:
        (proc,) = workers(1, fork=fork, PV_DIAL_RATE_PER_S="1000", PV_CAMPAIGN_MAX_LIVE="1000")
        wait_for(lambda: Worker.count(connection=r) == 1, what="the dialer registered")
        time.sleep(1.0)  # its start-up connections (sweeper, scheduler, pubsub) are made
        before = r.info("stats")["total_connections_received"]
    finally:
        resume(r)
    for cid in report.call_ids:
        wait_for(state_is(r, cid, "placed", "failed"), timeout=30, what=f"{cid} placed")
    opened = r.info("stats")["total_connections_received"] - before
    sent = sorted(str(req["body"]["to"]) for req in piopiy.requests)
    assert sent == sorted(numbers(n))  # every number rung, none twice
    for cid in report.call_ids:
        rec = meta(r, cid)
        assert rec["state"] == "placed" and rec["dial_attempts"] == "1" and "inflight" not in rec
        events = [f[b"event"].decode() for _, f in r.xrange(keys.call_timeline(cid))]
        assert events == ["state.dialing", "state.placed"], events
    assert r.zcard(dialing_key()) == 0
    peers = {req["peer"] for req in piopiy.requests}
    if fork:
        # a work-horse per call: new Redis and HTTP connections per call
        assert len(peers) == n and opened >= n, (len(peers), opened)
    else:
        # one process: its Redis client and its HTTP session serve every call
        assert len(peers) == 1 and opened <= 2, (len(peers), opened)
        assert proc.poll() is None and len(_children(proc.pid)) <= 1  # RQ's scheduler only


def test_a_hung_request_is_failed_by_the_job_timeout_and_the_dialer_goes_on(
        r, piopiy, workers, settings, monkeypatch):
    monkeypatch.setattr(dialer_api, "JOB_TIMEOUT_S", 2)  # the REST read timeout is 15 s
    hung_to, next_to = numbers(2, base=500)
    piopiy.hang, piopiy.hang_numbers = threading.Event(), {hung_to}
    try:
        hung = enqueue_call(r, to=hung_to, settings=settings)
        after = enqueue_call(r, to=next_to, settings=settings)
        (proc,) = workers(1)
        wait_for(state_is(r, hung.call_id, "failed"), what="the hung call failed")
        wait_for(state_is(r, after.call_id, "placed"), what="the next call placed")
        sent = {str(req["body"]["to"]): req["t"] for req in piopiy.requests}
        # Cut by the job's 2 s timeout, not the 15 s read timeout nor the server's 20 s hang.
        assert float(meta(r, hung.call_id)["failed_at"]) - sent[hung_to] < 6
        assert proc.poll() is None  # the same dialer went on
    finally:
        piopiy.hang.set()
    rec = meta(r, hung.call_id)
    assert rec["outcome"] == "outcome_unknown" and "timeout" in rec["reason"], rec
    assert "inflight" in rec  # never dialed again, not even by a re-run
    failed = Queue(QUEUE, connection=r).failed_job_registry
    wait_for(lambda: hung.job_id in failed.get_job_ids(), what="hung job in the failed registry")
    job = Job.fetch(hung.job_id, connection=r)
    assert "DialFailed" in (job.latest_result().exc_string or "")
    assert job.worker_name == Job.fetch(after.job_id, connection=r).worker_name
    time.sleep(1.0)  # a (wrong) re-send would have gone out by now
    assert [str(req["body"]["to"]) for req in piopiy.requests].count(hung_to) == 1
    assert len(piopiy.requests) == 2


def test_a_job_timed_out_before_dialing_is_not_placed_and_may_be_retried(
        r, piopiy, workers, settings, monkeypatch):
    monkeypatch.setattr(dialer_api, "JOB_TIMEOUT_S", 2)
    first, waiting = (enqueue_call(r, to=to, settings=settings) for to in numbers(2, base=600))
    # 1 call per 20 s: the second job sleeps for its reserved instant and its
    # 2 s timeout cuts the sleep (a stand-in for any hang before the request).
    (proc,) = workers(1, PV_DIAL_RATE_PER_S="0.05")
    wait_for(state_is(r, first.call_id, "placed"), what="the first call placed")
    wait_for(state_is(r, waiting.call_id, "failed"), what="the waiting call failed")
    rec = meta(r, waiting.call_id)
    assert rec["outcome"] == "not_placed" and "JobTimeoutException" in rec["reason"], rec
    assert "inflight" not in rec and len(piopiy.requests) == 1 and proc.poll() is None
    assert retry_call(r, waiting.call_id, settings=settings).created  # nothing rang: retryable


def test_two_in_process_dialers_share_the_queue_and_ring_each_call_once(r, piopiy, workers, settings):
    n = 60
    # Both dialers listening before the calls are queued: one dialer places the
    # 60 in about 0.3 s, which is less than a dialer may take to start while the
    # rest of the suite loads the box (seen: the second came up as the first
    # placed the last call, and no call was left to share).
    workers(2, PV_DIAL_RATE_PER_S="200")
    wait_for(lambda: len(Worker.all(queue=Queue(QUEUE, connection=r))) == 2, timeout=30,
             what="both dialers registered on the queue")
    ids = [enqueue_call(r, to=to, settings=settings, idempotency_key=f"k-{to}").call_id
           for to in numbers(n, base=700)]
    # the same requests again (a client re-sending): nothing new queued
    again = [enqueue_call(r, to=to, settings=settings, idempotency_key=f"k-{to}")
             for to in numbers(n, base=700)]
    assert [a.call_id for a in again] == ids and not any(a.created for a in again)
    for cid in ids:
        wait_for(state_is(r, cid, "placed", "failed"), timeout=30, what=f"{cid} placed")
    sent = [str(req["body"]["to"]) for req in piopiy.requests]
    assert sorted(sent) == sorted(numbers(n, base=700))
    assert all(meta(r, cid)["dial_attempts"] == "1" for cid in ids)
    by = {Job.fetch(dialer_api.job_id_for(cid), connection=r).worker_name for cid in ids}
    assert len(by) == 2, by  # both dialers placed calls
    assert len({req["peer"] for req in piopiy.requests}) == 2  # one connection each
    time.sleep(1.0)
    assert len(piopiy.requests) == n


def test_an_in_process_dialer_killed_mid_request_leaves_the_call_failed_never_redialed(
        r, piopiy, workers, settings):
    """No work-horse to lose: the dialer itself dies with the request in
    flight. RQ's clean-up of abandoned jobs fails the record (outcome
    unknown); another dialer's sweep would too (test_fault_dialer_outcomes)."""
    piopiy.hang = threading.Event()
    try:
        res = enqueue_call(r, to=TO, campaign="k1", settings=settings)
        (proc,) = workers(1)
        wait_for(lambda: len(piopiy.requests) == 1, what="the request in flight")
        assert meta(r, res.call_id)["state"] == "dialing"
        kids = _children(proc.pid)
        assert len(kids) <= 1  # RQ's scheduler; no work-horse
        os.kill(proc.pid, signal.SIGKILL)
        for kid in kids:
            os.kill(kid, signal.SIGKILL)
        proc.wait(5)
    finally:
        piopiy.hang.set()
    assert meta(r, res.call_id)["state"] == "dialing"
    StartedJobRegistry(QUEUE, connection=r).cleanup(timestamp=time.time() + 3600)
    rec = meta(r, res.call_id)
    assert rec["state"] == "failed" and rec["outcome"] == "outcome_unknown", rec
    assert "AbandonedJobError" in rec["reason"] and "inflight" in rec
    assert r.hget(keys.campaign_key("k1", "states"), res.call_id) == b"failed"
    # A re-run of the job (by hand, or a new dialer) refuses to dial.
    rerun = Queue(QUEUE, connection=r).enqueue_call(
        "piopiy_voice.workers.dialer.jobs.place_call", args=(res.call_id, {"to": TO, "caller_id": CALLER}))
    workers(1)
    wait_for(lambda: rerun.get_status(refresh=True) in ("finished", "failed"), what="re-run done")
    assert len(piopiy.requests) == 1


def test_a_dialer_killed_with_sigkill_leaves_no_scheduler_holding_its_socket(
        r, piopiy, workers, settings):
    """RQ runs the scheduler in a process forked from the dialer, which holds a
    copy of the dialer's Redis socket. Killed with SIGKILL, the dialer used to
    leave it behind, and with it the dialer's blocking BLMOVE, which swallowed
    the next job pushed (that call was never dialed: the first of 60 here,
    every time). The dialer's forked children now die with it
    (``dialer.worker.tie_forked_children``)."""
    (dialer,) = workers(1)
    wait_for(lambda: os.path.exists(f"/proc/{dialer.pid}") and _children(dialer.pid),
             what="the dialer's scheduler process")
    time.sleep(0.5)   # the dialer is blocked in BLMOVE on the empty queue
    (scheduler,) = _children(dialer.pid)
    os.kill(dialer.pid, signal.SIGKILL)
    dialer.wait(5)
    wait_for(lambda: not os.path.exists(f"/proc/{scheduler}") or _zombie(scheduler), timeout=2,
             what="the scheduler to die with its dialer")
    ids = [enqueue_call(r, to=to, settings=settings).call_id for to in numbers(60, base=800)]
    workers(2, PV_DIAL_RATE_PER_S="200")
    for cid in ids:
        wait_for(state_is(r, cid, "placed"), timeout=15, what=f"{cid} placed")
    assert r.llen(f"rq:queue:{QUEUE}:intermediate") == 0
    assert sorted(str(req["body"]["to"]) for req in piopiy.requests) == numbers(60, base=800)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def finished_job() -> str:
    return "done"


@pytest.mark.parametrize("cls", ["DialerWorker", "ForkingDialerWorker"])
def test_a_stop_signal_swallowed_by_a_log_line_still_stops_the_dialer(r, cls):
    # RQ stops an idle worker by raising StopRequested from its signal handler
    # wherever the main thread is; logging swallows any Exception raised while
    # it writes a line. Here the signal "arrives" while RQ logs the dequeued job
    # (the worker is not busy yet): the handler runs inside the formatter.
    import logging

    from piopiy_voice.workers.dialer import worker as dialer_worker

    queue = Queue("stop-test", connection=r)
    job = queue.enqueue(finished_job)
    worker = getattr(dialer_worker, cls)([queue], connection=r, name=f"stop-{cls}")
    delivered = []

    class SignalInsideALogLine(logging.StreamHandler):
        def format(self, record):
            text = super().format(record)
            if job.id in text and not delivered:
                delivered.append(text)
                worker.request_stop(signal.SIGTERM, None)   # raises StopRequested here
            return text

    rq_log = logging.getLogger("rq.worker")
    handler = SignalInsideALogLine(io.StringIO())
    rq_log.addHandler(handler)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    raise_exceptions, logging.raiseExceptions = logging.raiseExceptions, False
    try:
        t0 = time.monotonic()
        # Without the fix the dialer goes back to the queue after the job and
        # waits there until max_idle_time (20 s) ends it.
        worker.work(max_idle_time=20, logging_level="INFO", with_scheduler=False)
        took = time.monotonic() - t0
    finally:
        logging.raiseExceptions = raise_exceptions
        rq_log.removeHandler(handler)
        for s, h in saved.items():
            signal.signal(s, h)
    assert delivered, "the log line of the dequeued job never came"
    assert Job.fetch(job.id, connection=r).get_status() == "finished"
    assert took < 10, f"the dialer went on for {took:.1f} s after its stop"
    assert "stopping on request" in handler.stream.getvalue()
