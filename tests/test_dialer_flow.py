"""Dialer end to end: real RQ worker processes (with scheduler) against the test
Redis, placing calls on a scripted REST server on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from rq import Queue
from rq.job import Job

from piopiy_voice import keys
from piopiy_voice.settings import Settings
from piopiy_voice.signing import verify_stream_path
import workers_support  # tests/ is on the path (rootdir conftest)
from piopiy_voice.workers.dialer import enqueue_call

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-dialer-signing-secret"
CALLER = "919000000000"
TO = "919876543210"


wait_for = partial(workers_support.wait_for, timeout=15.0, interval=0.05)


class FakePiopiy:
    """The make-call endpoints: records every request (with the client's port:
    one per connection), replies from a script (a list of (status, body)
    consumed in order, then success). ``keep_alive``: HTTP/1.1 connections
    that serve many requests, as the platform's do."""

    def __init__(self, keep_alive=False):
        self.requests: list[dict] = []
        self.script: list[tuple[int, dict]] = []
        self.lock = threading.Lock()
        #: When set to an Event, every request blocks until it is set
        #: (only requests to ``hang_numbers`` when that is not empty).
        self.hang: threading.Event | None = None
        self.hang_numbers: set[str] = set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            if keep_alive:
                protocol_version = "HTTP/1.1"

                def setup(self):
                    super().setup()
                    import socket  # noqa: PLC0415

                    self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append({"t": time.time(), "path": self.path, "body": body,
                                           "peer": self.client_address[1]})
                    n = len(outer.requests)
                    hang = outer.hang
                    if outer.hang_numbers and str(body.get("to")) not in outer.hang_numbers:
                        hang = None
                if hang is not None:
                    hang.wait(20)
                with outer.lock:
                    status, reply = outer.script.pop(0) if outer.script else (
                        200, {"code": 200, "status": "progress", "request_id": f"req-{n}",
                              "data": {"status": "progress", "request_id": f"req-{n}"}})
                data = json.dumps(reply).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the dialer gave up on a hung request (its job timeout, a kill): the test's point

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def count(self):
        with self.lock:
            return len(self.requests)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def piopiy():
    server = FakePiopiy()
    yield server
    server.close()


@pytest.fixture
def env(subprocess_env, piopiy, tmp_path):
    e = dict(subprocess_env)
    e.update({
        "PIOPIY_APP_ID": "4242", "PIOPIY_APP_TOKEN": "token-xyz", "PIOPIY_BASE_URL": piopiy.url,
        "PIOPIY_CALLER_ID": CALLER, "PV_SIGNING_SECRET": SECRET,
        "PV_GATEWAY_PUBLIC_URL": "wss://gw.example.test", "PV_DIAL_QUEUE": "calls-test",
        "PV_DIAL_RATE_PER_S": "50", "PV_LOG_LEVEL": "INFO",
    })
    return e


@pytest.fixture
def settings(env):
    return Settings.from_env(env)


@pytest.fixture
def workers(env, tmp_path):
    procs = []

    def start(n=1, fork=False, **extra):
        """``n`` dialer processes; ``fork``: a work-horse per job (``--fork``);
        ``extra``: environment variables."""
        e = dict(env, **extra)
        started = []
        for i in range(n):
            log = open(tmp_path / f"worker{len(procs)}.log", "w")
            procs.append((subprocess.Popen(
                [sys.executable, "-m", "piopiy_voice.cli", "dialer"] + (["--fork"] if fork else []),
                cwd=ROOT, env=e, stdout=log, stderr=subprocess.STDOUT), log))
            started.append(procs[-1][0])
        return started

    yield start
    for proc, _ in procs:
        proc.terminate()
    for i, (proc, log) in enumerate(procs):
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        # pytest shows a test's teardown output only when it failed: the
        # dialers' own account of what they did then comes with it.
        tail = (tmp_path / f"worker{i}.log").read_text(errors="replace").splitlines()[-60:]
        print(f"--- dialer {i} (pid {proc.pid}, exit {proc.returncode}), last lines of its log:")
        print("\n".join(tail))


def meta(r, call_id):
    return {k.decode(): v.decode() for k, v in r.hgetall(keys.call_meta(call_id)).items()}


def state_is(r, call_id, *states):
    return lambda: meta(r, call_id).get("state") in states


def test_call_is_placed_with_signed_stream_pcmo(r, piopiy, workers, settings):
    res = enqueue_call(r, to="+" + TO, flow="sales", campaign="spring", settings=settings,
                       extra_actions=[{"action": "play", "file_name": "bye.wav"}, {"action": "hangup"}])
    assert res.created and meta(r, res.call_id)["state"] == "queued"
    workers(1)
    wait_for(state_is(r, res.call_id, "placed", "failed"), what="call placed")
    rec = meta(r, res.call_id)
    assert rec["state"] == "placed", rec
    assert rec["request_id"] == "req-1"
    assert "inflight" not in rec
    assert piopiy.count() == 1
    req = piopiy.requests[0]
    assert req["path"] == "/v2/ind_pcmo_make_call"
    body = req["body"]
    assert body["from"] == int(CALLER) and body["to"] == int(TO)
    assert body["appid"] == 4242 and body["secret"] == "token-xyz" and body["duration"] == 5400
    stream, play, hangup = body["pcmo"]
    assert play == {"action": "play", "file_name": "bye.wav"} and hangup == {"action": "hangup"}
    assert stream["action"] == "stream" and stream["listen_mode"] == "both"
    assert stream["voice_quality"] == 8000 and stream["stream_on_answer"] is True
    url = urlsplit(stream["ws_url"])
    assert f"{url.scheme}://{url.netloc}" == "wss://gw.example.test"
    target = verify_stream_path(f"{url.path}?{url.query}", SECRET)
    assert target.call_id == res.call_id
    assert target.params == {"rate": "8000", "mode": "both", "campaign": "spring", "flow": "sales"}
    # the timeline tells the story and the campaign hash counts it
    events = [f[b"event"].decode() for _, f in r.xrange(keys.call_timeline(res.call_id))]
    assert events == ["state.dialing", "state.placed"]  # queuing writes no timeline line
    assert r.hget(keys.campaign_key("spring", "states"), res.call_id) == b"placed"
    job = Job.fetch(res.job_id, connection=r)
    wait_for(lambda: job.get_status(refresh=True) == "finished", what="job finished")
    assert job.return_value() == {"call_id": res.call_id, "state": "placed", "request_id": "req-1"}


def test_4xx_fails_at_once_without_retry(r, piopiy, workers, settings):
    piopiy.script = [(422, {"code": 422, "message": "missing property"})] * 3
    res = enqueue_call(r, to=TO, settings=settings, backoff_s=[0])
    workers(1)
    wait_for(state_is(r, res.call_id, "failed", "placed"), what="call failed")
    rec = meta(r, res.call_id)
    assert rec["state"] == "failed"
    assert "422" in rec["reason"] and "missing property" in rec["reason"]
    q = Queue("calls-test", connection=r)
    wait_for(lambda: res.job_id in q.failed_job_registry.get_job_ids(), what="failed registry")
    job = Job.fetch(res.job_id, connection=r)
    assert "DialFailed" in (job.latest_result().exc_string or "")
    time.sleep(1.5)  # a retry, if one were (wrongly) scheduled, would have run by now
    assert piopiy.count() == 1


def test_503_then_success_places_exactly_one_call(r, piopiy, workers, settings):
    piopiy.script = [(503, {"code": 503, "message": "busy"})]
    res = enqueue_call(r, to=TO, settings=settings, backoff_s=[1])
    workers(1)
    wait_for(state_is(r, res.call_id, "placed", "failed"), what="call placed after retry")
    rec = meta(r, res.call_id)
    assert rec["state"] == "placed" and rec["request_id"] == "req-2" and rec["dial_attempts"] == "2"
    assert piopiy.count() == 2
    gap = piopiy.requests[1]["t"] - piopiy.requests[0]["t"]
    assert gap >= 0.9, gap  # the backoff was honoured
    events = [f[b"event"].decode() for _, f in r.xrange(keys.call_timeline(res.call_id))]
    # A queued call has no timeline yet (a stream costs ~4.7 KB): it starts at the dial.
    assert events == ["state.dialing", "state.queued", "state.dialing", "state.placed"]
    job = Job.fetch(res.job_id, connection=r)
    wait_for(lambda: job.get_status(refresh=True) == "finished", what="job finished")  # no retry left
    assert piopiy.count() == 2


def test_retries_give_up_after_max_attempts(r, piopiy, workers, settings):
    piopiy.script = [(503, {"code": 503})] * 5
    res = enqueue_call(r, to=TO, settings=settings, backoff_s=[0], max_attempts=3)
    workers(1)
    wait_for(state_is(r, res.call_id, "failed", "placed"), what="call given up")
    rec = meta(r, res.call_id)
    assert rec["reason"].startswith("gave up after 3 attempts"), rec
    assert piopiy.count() == 3
    q = Queue("calls-test", connection=r)
    wait_for(lambda: res.job_id in q.failed_job_registry.get_job_ids(), what="failed registry")


def test_same_idempotency_key_places_one_call(r, piopiy, workers, settings):
    first = enqueue_call(r, to=TO, settings=settings, idempotency_key="order-17")
    second = enqueue_call(r, to=TO, settings=settings, idempotency_key="order-17")
    assert first.created and not second.created
    assert second.call_id == first.call_id and second.job_id == first.job_id
    assert Queue("calls-test", connection=r).count == 1
    workers(1)
    wait_for(state_is(r, first.call_id, "placed", "failed"), what="call placed")
    third = enqueue_call(r, to=TO, settings=settings, idempotency_key="order-17")
    assert third.call_id == first.call_id and not third.created
    job = Job.fetch(first.job_id, connection=r)
    wait_for(lambda: job.get_status(refresh=True) == "finished", what="job finished")
    assert Queue("calls-test", connection=r).count == 0  # nothing else queued
    assert piopiy.count() == 1


def test_rate_limit_holds_across_two_workers(r, piopiy, workers, settings):
    ids = [enqueue_call(r, to=f"9198765432{i:02d}", settings=settings).call_id for i in range(20)]
    workers(2, PV_DIAL_RATE_PER_S="10")
    wait_for(lambda: piopiy.count() == 20, timeout=30, what="20 calls")
    times = sorted(req["t"] for req in piopiy.requests)
    # 10/s: any 11 consecutive requests span 1 s of reserved time; up to 100 ms
    # of scheduling/HTTP jitter on this shared machine is allowed (11 in 0.9 s
    # would already be a rate above 12/s)
    spans = [times[i + 10] - times[i] for i in range(len(times) - 10)]
    assert min(spans) >= 0.9, spans
    assert times[-1] - times[0] >= 1.85
    for cid in ids:
        wait_for(state_is(r, cid, "placed"), what=f"{cid} placed")


def test_scheduled_call_runs_at_its_time_not_before(r, piopiy, workers, settings):
    start = datetime.now(timezone.utc) + timedelta(seconds=3.5)
    res = enqueue_call(r, to=TO, settings=settings, start_at=start)
    workers(1)
    time.sleep(2.0)
    assert piopiy.count() == 0 and meta(r, res.call_id)["state"] == "queued"
    wait_for(lambda: piopiy.count() == 1, timeout=10, what="scheduled call")
    sent = piopiy.requests[0]["t"]
    assert sent >= start.timestamp(), sent - start.timestamp()
    assert sent - start.timestamp() < 3.0
    wait_for(state_is(r, res.call_id, "placed"), what="placed")


def test_campaign_live_cap_holds_excess_calls_until_a_slot_frees(r, piopiy, workers, settings):
    a = enqueue_call(r, to=TO, campaign="cap1", settings=settings)
    b = enqueue_call(r, to="919876543211", campaign="cap1", settings=settings)
    workers(1, PV_CAMPAIGN_MAX_LIVE="1")
    # The second waits for a slot: the first is still live.
    second = wait_for(lambda: next((x.call_id for x in (a, b)
                                    if meta(r, x.call_id).get("waiting") == "campaign_cap"), None),
                      what="a call waiting for the campaign cap")
    first = a.call_id if second == b.call_id else b.call_id
    wait_for(state_is(r, first, "placed"), what="first call placed")
    assert piopiy.count() == 1
    # the gateway reports the first call ended
    from piopiy_voice import callrecord

    with r.pipeline() as pipe:
        callrecord.set_state(pipe, first, "ended", reason="hangup", campaign="cap1")
        pipe.execute()
    wait_for(lambda: piopiy.count() == 2, timeout=15, what="second call after slot freed")
    wait_for(state_is(r, second, "placed"), what="second placed")


def test_unknown_outcome_is_never_redialed(r, piopiy, workers, settings):
    res = enqueue_call(r, to=TO, settings=settings)
    # a previous attempt sent its request and its worker died before recording the result
    r.hset(keys.call_meta(res.call_id), mapping={"inflight": "1700000000.000", "state": "dialing"})
    workers(1)
    wait_for(state_is(r, res.call_id, "failed"), what="failed")
    assert meta(r, res.call_id)["reason"].startswith("outcome unknown")
    assert piopiy.count() == 0


def test_call_and_status_cli(r, piopiy, workers, env):
    out = subprocess.run([sys.executable, "-m", "piopiy_voice.cli", "call", "--to", TO, "--flow", "demo",
                          "--key", "cli-1", "--then-hangup"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    call_id = out.stdout.strip()
    keys.validate_call_id(call_id)
    again = subprocess.run([sys.executable, "-m", "piopiy_voice.cli", "call", "--to", TO, "--flow", "demo",
                            "--key", "cli-1", "--then-hangup"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert again.stdout.strip() == call_id and "already enqueued" in again.stderr
    bad = subprocess.run([sys.executable, "-m", "piopiy_voice.cli", "call", "--to", "12ab"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "to:" in bad.stderr
    workers(1)
    wait_for(state_is(r, call_id, "placed"), what="placed")
    st = subprocess.run([sys.executable, "-m", "piopiy_voice.cli", "status", call_id],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert st.returncode == 0, st.stderr
    assert f"call {call_id}: placed" in st.stdout
    assert "request_id" in st.stdout and "req-1" in st.stdout
    assert "JobStatus" not in st.stdout  # the rq job's state reads "(finished)", not an enum repr
    for event in ("state.queued", "state.dialing", "state.placed"):
        assert event in st.stdout
    missing = subprocess.run([sys.executable, "-m", "piopiy_voice.cli", "status", "c-nope"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert missing.returncode == 1


def test_unreachable_platform_is_retried_then_given_up(r, piopiy, workers, settings):
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    res = enqueue_call(r, to=TO, settings=settings, backoff_s=[0], max_attempts=2)
    workers(1, PIOPIY_BASE_URL=dead)
    wait_for(state_is(r, res.call_id, "failed", "placed"), what="given up")
    rec = meta(r, res.call_id)
    assert rec["reason"].startswith("gave up after 2 attempts") and "did not reach" in rec["reason"], rec
    assert rec["dial_attempts"] == "2" and "inflight" not in rec


def _horse(pid):
    """The RQ work-horse: the dialer worker's youngest child (the scheduler,
    its other child, is forked at start-up)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        kids = [int(x) for x in f.read().split()]

    def started(k):
        with open(f"/proc/{k}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])

    return max(kids, key=started) if kids else None


def test_dialer_dying_mid_request_leaves_a_failed_record_never_redialed(r, piopiy, workers, settings):
    """The work-horse (``--fork``) killed while its make-call request is in
    flight: the record must not stay "dialing" for ever, and nothing dials
    again. (The in-process dialer: ``test_dialer_inprocess``.)"""
    import os
    import signal

    piopiy.hang = threading.Event()
    try:
        res = enqueue_call(r, to=TO, settings=settings)
        (proc,) = workers(1, fork=True)
        wait_for(lambda: piopiy.count() == 1, what="the request in flight")
        assert meta(r, res.call_id)["state"] == "dialing"
        horse = wait_for(lambda: _horse(proc.pid), what="the work-horse")
        os.kill(horse, signal.SIGKILL)
        wait_for(state_is(r, res.call_id, "failed"), what="record failed")
    finally:
        piopiy.hang.set()
    rec = meta(r, res.call_id)
    assert rec["reason"].startswith("outcome unknown") and "work-horse killed" in rec["reason"]
    assert "inflight" in rec
    # A re-run of the job (by hand) refuses to dial.
    rerun = Queue("calls-test", connection=r).enqueue_call(
        "piopiy_voice.workers.dialer.jobs.place_call", args=(res.call_id, {"to": TO, "caller_id": CALLER}))
    wait_for(lambda: rerun.get_status(refresh=True) in ("finished", "failed"), what="re-run done")
    assert piopiy.count() == 1


def test_abandoned_dial_job_is_marked_failed_by_rq_cleanup(r, piopiy, workers, settings):
    """The whole (forking) dialer worker dies mid-request (no goodbye): RQ's
    registry clean-up finds the job abandoned and its failure callback fixes
    the record."""
    import os
    import signal

    from rq.registry import StartedJobRegistry

    piopiy.hang = threading.Event()
    try:
        res = enqueue_call(r, to=TO, campaign="c1", settings=settings)
        (proc,) = workers(1, fork=True)
        wait_for(lambda: piopiy.count() == 1, what="the request in flight")
        horse = wait_for(lambda: _horse(proc.pid), what="the work-horse")
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            kids = [int(x) for x in f.read().split()]
        assert horse in kids
        os.kill(proc.pid, signal.SIGKILL)
        for kid in kids:  # the work-horse and the scheduler
            os.kill(kid, signal.SIGKILL)
        proc.wait(5)
    finally:
        piopiy.hang.set()
    assert meta(r, res.call_id)["state"] == "dialing"
    # What any RQ worker's maintenance does once the job's heartbeat has lapsed.
    StartedJobRegistry("calls-test", connection=r).cleanup(timestamp=time.time() + 3600)
    rec = meta(r, res.call_id)
    assert rec["state"] == "failed" and rec["reason"].startswith("outcome unknown"), rec
    assert "AbandonedJobError" in rec["reason"] and "inflight" in rec
    assert r.hget(keys.campaign_key("c1", "states"), res.call_id) == b"failed"
    assert Job.fetch(res.job_id, connection=r).get_status(refresh=True) == "failed"
