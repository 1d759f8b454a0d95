"""Worker runtime against a real Redis: ownership, checkpoints, crashes, hand-back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from piopiy_voice import contracts as c
from piopiy_voice import keys
from piopiy_voice.redisconn import connect
from piopiy_voice.settings import Settings
from workers_support import CountingAgent, FakeGateway, wait_for
from piopiy_voice.workers.checkpoint import load
from piopiy_voice.workers.runner import Worker

pytestmark = pytest.mark.integration
FRAME = b"\x00\x01" * 160


def _settings():
    # Exactly-once tests: every replayed command must be sent (no stale suppression).
    return Settings.from_env({"PV_STALE_COMMAND_MS": "0"})


class _Running:
    """A Worker object run in a thread (own Redis client)."""

    def __init__(self, redis_url, worker_id, lease_ms=1000):
        self.worker = Worker(_settings(), CountingAgent, r=connect(redis_url), worker_id=worker_id,
                             lease_ms=lease_ms)
        self.thread = threading.Thread(target=self.worker.run, kwargs={"max_seconds": 60}, daemon=True)
        self.thread.start()

    def stop(self):
        self.worker.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()


def _texts(gw):
    return [cmd.text for cmd in gw.applied() if cmd.type == "cmd.speak"]


def _expected(n_frames, first_seq=2):
    # Audio seqs follow the call.started entry (seq 1).
    return [f"{k}:{first_seq + k - 1}" for k in range(10, n_frames + 1, 10)]


def test_call_owned_processed_in_order_and_released(r, redis_url):
    w = _Running(redis_url, "w1")
    try:
        gw = FakeGateway(r, "call-a")
        gw.start()
        for _ in range(100):
            gw.audio(FRAME)
        wait_for(lambda: len(_texts(gw)) == 10, what="10 commands")
        assert r.get(keys.call_lease("call-a")) == b"w1"
        gw.end()
        wait_for(lambda: (load(r, "call-a") or None) and load(r, "call-a").done, what="final checkpoint")
        wait_for(lambda: r.xpending(keys.CALLS_STREAM, keys.WORKERS_GROUP)["pending"] == 0,
                 what="start entry ACKed")
    finally:
        w.stop()
    assert _texts(gw) == _expected(100)
    cmds = gw.commands()
    assert [cmd.command_id for cmd in cmds] == [f"call-a:{i}" for i in range(1, 11)]
    assert r.get(keys.call_lease("call-a")) is None
    ck = load(r, "call-a")
    assert ck.cmd_seq == 10 and ck.state == {"frames": 100}
    assert 0 < r.ttl(keys.call_checkpoint("call-a")) <= keys.CALL_KEY_TTL_AFTER_END
    events = [f[b"event"] for _, f in r.xrange(keys.call_timeline("call-a"))]
    assert b"worker.owned" in events and b"worker.released" in events


def test_poison_entries_dead_lettered_call_goes_on(r, redis_url):
    w = _Running(redis_url, "w1")
    try:
        gw = FakeGateway(r, "call-p")
        gw.start()
        for _ in range(5):
            gw.audio(FRAME)
        gw.raw({"type": "audio", "v": "1", "call_id": "call-p", "seq": "7", "pcm": b"\x01\x02\x03"})
        gw.seq += 1
        gw.raw({"type": "cmd.nonsense", "call_id": "call-p", "seq": "8"})
        gw.seq += 1
        gw.entry(c.PlatformEvent(call_id="call-p", event="boom"))
        for _ in range(5):
            gw.audio(FRAME)
        wait_for(lambda: len(_texts(gw)) == 1, what="command after poison entries")
        wait_for(lambda: r.xlen(keys.DEAD_LETTER_STREAM) == 3, what="3 dead letters")
    finally:
        w.stop()
    rows = [{k.decode(): v.decode() for k, v in f.items()} for _, f in r.xrange(keys.DEAD_LETTER_STREAM)]
    assert [row["call_id"] for row in rows] == ["call-p"] * 3
    assert "odd-length" in rows[0]["reason"]
    assert "unknown message type" in rows[1]["reason"]
    assert "agent raised" in rows[2]["reason"] and rows[2]["type"] == "platform.event"
    assert all(row["entry_id"] for row in rows)
    assert w.worker.metrics.counters["dead_letters_total"] == 3
    assert _texts(gw) == ["10:14"]
    assert w.worker.metrics.counters["frames_skipped_total"] == 0


def test_duplicates_dropped_and_gaps_counted(r, redis_url):
    w = _Running(redis_url, "w1")
    try:
        gw = FakeGateway(r, "call-g")
        gw.start()
        for _ in range(5):
            gw.audio(FRAME)
        gw.seq -= 2  # the gateway resends two entries after a reconnect
        for _ in range(2):
            gw.audio(FRAME)
        gw.seq += 3  # three entries never reached the stream
        for _ in range(5):
            gw.audio(FRAME)
        wait_for(lambda: len(_texts(gw)) == 1, what="command")
    finally:
        w.stop()
    assert _texts(gw) == ["10:14"]
    assert w.worker.metrics.counters["frames_skipped_total"] == 3
    events = [f[b"event"] for _, f in r.xrange(keys.call_timeline("call-g"))]
    assert b"worker.skipped" in events


def test_lease_expiry_lets_another_worker_take_over_and_fences_the_old_one(r, redis_url):
    lease = 300
    a = Worker(_settings(), CountingAgent, r=connect(redis_url), worker_id="wa", lease_ms=lease)
    b = Worker(_settings(), CountingAgent, r=connect(redis_url), worker_id="wb", lease_ms=lease)
    gw = FakeGateway(r, "call-l")
    gw.start()
    for _ in range(10):
        gw.audio(FRAME)
    a.step()
    a.step()
    assert "call-l" in a.calls and _texts(gw) == ["10:11"]
    b.step()
    assert "call-l" not in b.calls  # lease still held: no takeover
    # "a" stalls: no renewals. After the lease, b claims the call.
    for _ in range(10):
        gw.audio(FRAME)
    wait_for(lambda: r.get(keys.call_lease("call-l")) is None, timeout=5, what="lease expiry")
    wait_for(lambda: (b.step() or "call-l" in b.calls), timeout=5, what="b to claim")
    b.step()
    assert _texts(gw) == ["10:11", "20:21"]
    assert b.metrics.counters["claims_after_crash_total"] == 1
    # "a" delivered 10:11 but stalled before a checkpoint recorded it: b
    # delivers it again from the outbox, under the same command id, which the
    # gateway drops (at-least-once delivery, exactly-once application).
    delivered = [(cmd.text, cmd.command_id) for cmd in gw.commands()]
    assert delivered == [("10:11", "call-l:1"), ("10:11", "call-l:1"), ("20:21", "call-l:2")]
    assert b.metrics.counters["commands_redelivered_total"] == 1
    # The stalled worker wakes up: its commit is refused and it drops the call.
    a.step()
    assert "call-l" not in a.calls
    assert a.metrics.counters["leases_lost_total"] == 1
    assert _texts(gw) == ["10:11", "20:21"]


def _spawn(subprocess_env, worker_id, lease_ms):
    env = dict(subprocess_env, PV_LOG_LEVEL="INFO", PV_STALE_COMMAND_MS="0")
    return subprocess.Popen(
        [sys.executable, "-m", "piopiy_voice.workers.runner", "--agent", "workers_support:CountingAgent",
         "--worker-id", worker_id, "--lease-ms", str(lease_ms), "--max-seconds", "60"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


class _Feeder(threading.Thread):
    """Feeds audio frames in (roughly) real time until stopped."""

    def __init__(self, r, gw):
        super().__init__(daemon=True)
        self.r, self.gw = r, gw
        self.sent = 0
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            self.gw.audio(FRAME)
            self.sent += 1
            time.sleep(0.005)


def _two_workers_run(r, subprocess_env, lease_ms, sig):
    procs = {wid: _spawn(subprocess_env, wid, lease_ms) for wid in ("w1", "w2")}
    try:
        wait_for(lambda: r.zcard(keys.WORKERS_ZSET) == 2, timeout=15, what="two workers up")
        gw = FakeGateway(r, "call-x")
        gw.start()
        feeder = _Feeder(r, gw)
        feeder.start()
        owner = wait_for(lambda: r.get(keys.call_lease("call-x")), what="an owner").decode()
        other = "w2" if owner == "w1" else "w1"
        wait_for(lambda: len(_texts(gw)) >= 5, what="commands before the kill")
        os.kill(procs[owner].pid, sig)
        t_signal = time.monotonic()
        procs[owner].wait(10)
        wait_for(lambda: r.get(keys.call_lease("call-x")) == other.encode(), timeout=15,
                 what="the other worker to take over")
        took_over_s = time.monotonic() - t_signal
        n_before_end = len(_texts(gw))
        wait_for(lambda: len(_texts(gw)) >= n_before_end + 5, what="commands after takeover")
        feeder.halt.set()
        feeder.join(5)
        gw.end()
        wait_for(lambda: (load(r, "call-x") or None) and load(r, "call-x").done, what="call ended")
        return gw, feeder.sent, took_over_s, other
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
                p.wait(10)


def test_sigkill_mid_call_other_worker_resumes_from_checkpoint(r, subprocess_env):
    lease = 800
    gw, sent, took_over_s, survivor = _two_workers_run(r, subprocess_env, lease, signal.SIGKILL)
    assert _texts(gw) == _expected(sent), "every 10th frame exactly once, none skipped"
    assert [cmd.seq for cmd in gw.applied()] == list(range(1, sent // 10 + 1))
    # Delivery is at-least-once: the killed owner's last delivered command may
    # come again from its outbox (one commit's worth, here one command), under
    # the same command id, which the gateway drops.
    delivered = gw.commands()
    applied = gw.applied(delivered)
    delivered = [cmd.command_id for cmd in delivered]
    assert len(delivered) - len(applied) <= 1
    assert all(cid == delivered[i - 1] for i, cid in enumerate(delivered)
               if cid in delivered[:i])
    events = [{k.decode(): v.decode() for k, v in f.items()} for _, f in r.xrange(keys.call_timeline("call-x"))]
    claimed = [e for e in events if e["event"] == "worker.claimed"]
    assert len(claimed) == 1 and claimed[0]["after"] == "crash" and claimed[0]["worker"] == survivor
    # It had to wait for the lease to expire (renewed every lease/3 before the kill).
    assert took_over_s >= lease / 1000 * 0.6
    assert load(r, "call-x").state == {"frames": sent}


def test_sigterm_hands_back_faster_than_the_lease(r, subprocess_env):
    lease = 4000
    gw, sent, took_over_s, survivor = _two_workers_run(r, subprocess_env, lease, signal.SIGTERM)
    assert took_over_s < lease / 1000, f"hand-back took {took_over_s:.2f}s"
    assert _texts(gw) == _expected(sent)
    events = [{k.decode(): v.decode() for k, v in f.items()} for _, f in r.xrange(keys.call_timeline("call-x"))]
    assert [e["event"] for e in events if e["event"] in ("worker.handback", "worker.claimed")] == [
        "worker.handback", "worker.claimed"]
    assert [e["after"] for e in events if e["event"] == "worker.claimed"] == ["handback"]
    # Both workers have stopped gracefully by now: they left the group, nothing pending.
    consumers = {row["name"].decode() for row in r.xinfo_consumers(keys.CALLS_STREAM, keys.WORKERS_GROUP)}
    assert consumers.isdisjoint({"w1", "w2"})
    assert r.xpending(keys.CALLS_STREAM, keys.WORKERS_GROUP)["pending"] == 0


def test_default_agent_through_redis_pause_resumed_by_the_worker_clock(r, redis_url):
    from piopiy_voice.audio import dtmf_tone, frame_bytes, silence
    from piopiy_voice.workers.agent.default import DefaultAgent

    settings = Settings.from_env({"PV_PAUSE_RESUME_AFTER_S": "0.5"})
    worker = Worker(settings, DefaultAgent, r=connect(redis_url), worker_id="wd", lease_ms=1000)
    t = threading.Thread(target=worker.run, kwargs={"max_seconds": 30}, daemon=True)
    t.start()
    try:
        gw = FakeGateway(r, "call-d")
        gw.start()
        wait_for(lambda: gw.commands(), what="greeting")
        fb = frame_bytes(8000)
        audio = silence(200, 8000) + dtmf_tone("*", 100) + silence(100, 8000)
        for i in range(0, len(audio), fb):
            gw.audio(audio[i:i + fb])
        # No audio arrives while paused: only the worker's clock can resume.
        wait_for(lambda: [x.type for x in gw.commands()][-1:] == ["cmd.resume"], timeout=5,
                 what="resume by timer")
    finally:
        worker.stop()
        t.join(10)
    assert [x.type for x in gw.commands()] == ["cmd.play_audio", "cmd.interrupt", "cmd.pause",
                                               "cmd.resume"]


def test_metrics_endpoint_serves_prometheus_text():
    import urllib.request

    from piopiy_voice.workers.metrics import Metrics, serve

    m = Metrics()
    m.inc("dead_letters_total", 2)
    m.observe_lag(0.03)
    m.calls_owned = 3
    server = serve(m, "127.0.0.1", 0)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert "pv_worker_calls_owned 3" in body and "pv_worker_dead_letters_total 2" in body
    assert 'pv_worker_stream_lag_seconds_bucket{le="0.05"} 1' in body
    assert 'pv_worker_stream_lag_seconds_bucket{le="0.02"} 0' in body


def test_entries_trimmed_before_processing_are_counted_on_takeover(r, redis_url):
    lease = 300
    a = Worker(_settings(), CountingAgent, r=connect(redis_url), worker_id="wa", lease_ms=lease)
    b = Worker(_settings(), CountingAgent, r=connect(redis_url), worker_id="wb", lease_ms=lease)
    gw = FakeGateway(r, "call-t")
    gw.start()
    for _ in range(10):
        gw.audio(FRAME)
    a.step()
    a.step()
    assert load(r, "call-t").runtime["seq"] == 11
    for _ in range(50):  # "a" dies; the stream is trimmed before anyone reads these
        gw.audio(FRAME)
    r.xtrim(keys.call_stream("call-t"), maxlen=20, approximate=False)
    wait_for(lambda: (b.step() or "call-t" in b.calls), timeout=5, what="b to claim")
    b.step()
    assert b.metrics.counters["frames_skipped_total"] == 30
    assert load(r, "call-t").state == {"frames": 30}  # 10 by a, the 20 left by b
    lines = [{k.decode(): v.decode() for k, v in f.items()} for _, f in r.xrange(keys.call_timeline("call-t"))]
    assert [x["entries"] for x in lines if x["event"] == "worker.skipped"] == ["30"]


def test_restart_under_the_same_id_adopts_its_own_pending_call(r, redis_url):
    a = Worker(_settings(), CountingAgent, r=connect(redis_url), worker_id="wa", lease_ms=5000)
    gw = FakeGateway(r, "call-s")
    gw.start()
    for _ in range(10):
        gw.audio(FRAME)
    a.step()
    a.step()
    # Same worker id comes back before its lease expired (e.g. a fast pod restart).
    a2 = Worker(_settings(), CountingAgent, r=connect(redis_url), worker_id="wa", lease_ms=5000)
    for _ in range(10):
        gw.audio(FRAME)
    a2.step()
    a2.step()
    assert "call-s" in a2.calls and _texts(gw) == ["10:11", "20:21"]


def test_checkpoint_is_read_after_the_lease_is_taken(r, redis_url):
    """The previous owner's last commit may land between a claimer's checkpoint
    read and its lease grab: the claimer must resume from that commit, not
    from the older checkpoint (or it re-issues commands already published)."""
    lease = 300
    a = Worker(_settings(), CountingAgent, r=connect(redis_url), worker_id="wa", lease_ms=lease)
    b = Worker(_settings(), CountingAgent, r=connect(redis_url), worker_id="wb", lease_ms=lease)
    gw = FakeGateway(r, "call-r")
    gw.start()
    for _ in range(10):
        gw.audio(FRAME)
    a.step()
    a.step()
    assert _texts(gw) == ["10:11"]
    for _ in range(10):
        gw.audio(FRAME)
    wait_for(lambda: r.get(keys.call_lease("call-r")) is None, timeout=5, what="lease expiry")
    real_acquire = b.own.acquire

    def acquire_after_a_last_commit(cid):
        # "a" was only slow: it processes and commits 20:21 (re-taking its
        # lease), then stalls for good and its lease lapses.
        r.set(keys.call_lease(cid), "wa", px=lease)
        a.step()
        r.delete(keys.call_lease(cid))
        return real_acquire(cid)

    b.own.acquire = acquire_after_a_last_commit
    wait_for(lambda: (b.step() or "call-r" in b.calls), timeout=5, what="b to claim")
    b.own.acquire = real_acquire
    assert _texts(gw) == ["10:11", "20:21"]
    assert b.calls["call-r"].ckpt.cmd_seq == 2
    for _ in range(10):
        gw.audio(FRAME)
    b.step()
    assert _texts(gw) == ["10:11", "20:21", "30:31"]
    assert [cmd.seq for cmd in gw.applied()] == [1, 2, 3]
    # a's last command came again from its outbox (a never checkpointed its
    # delivery), with the same id: no command was re-derived under a new one.
    assert [cmd.command_id for cmd in gw.commands()] == ["call-r:1", "call-r:2", "call-r:2", "call-r:3"]


def test_repeated_announcement_of_an_owned_call_is_acked(r, redis_url):
    w = Worker(_settings(), CountingAgent, r=connect(redis_url), worker_id="wa", lease_ms=1000)
    gw = FakeGateway(r, "call-rep")
    start_id = gw.start()
    w.step()
    assert "call-rep" in w.calls
    again = c.encode(c.CallStarted(call_id="call-rep", seq=1, gateway_id="gw1", rate=8000))
    r.xadd(keys.CALLS_STREAM, again)
    w.step()
    pending = r.xpending_range(keys.CALLS_STREAM, keys.WORKERS_GROUP, "-", "+", 10)
    assert [p["message_id"].decode() for p in pending] == [start_id]
    gw.end()
    wait_for(lambda: (w.step() or "call-rep" not in w.calls), timeout=5, what="call end")
    assert r.xpending(keys.CALLS_STREAM, keys.WORKERS_GROUP)["pending"] == 0


def test_a_busy_worker_takes_a_new_call_in_the_round_trip_of_its_next_turn(r, redis_url):
    # Before: while owning calls, new calls were polled every 100 ms, so every
    # greeting could start up to 100 ms late. Now the new-call read rides in
    # the XREAD round trip of every turn.
    w = Worker(_settings(), CountingAgent, r=connect(redis_url), worker_id="wa", lease_ms=1000)
    busy = FakeGateway(r, "call-busy")
    busy.start()
    w.step()
    assert set(w.calls) == {"call-busy"}
    for _ in range(3):
        busy.audio(FRAME)
    w.step()  # now busy: the next new call must not wait for a poll period
    fresh = FakeGateway(r, "call-fresh")
    fresh.start()
    busy.audio(FRAME)
    w.step()
    assert set(w.calls) == {"call-busy", "call-fresh"}
    # Owned for real in that turn: its first checkpoint is committed.
    assert load(r, "call-fresh") is not None


def test_call_of_a_dead_gateway_is_ended_by_its_owner(r, redis_url, monkeypatch):
    from piopiy_voice.workers import orphans

    monkeypatch.setattr(orphans, "GATEWAY_LOST_S", 0.5)
    w = Worker(_settings(), CountingAgent, r=connect(redis_url), worker_id="wa", lease_ms=300)
    live_gw = FakeGateway(r, "call-alive", gateway_id="gw-alive")
    dead_gw = FakeGateway(r, "call-dead", gateway_id="gw-dead")
    r.set(keys.gateway_heartbeat("gw-alive"), "1", ex=30)
    for gw in (live_gw, dead_gw):
        r.hset(keys.call_meta(gw.call_id), mapping={"state": "live", "gateway_id": gw.gateway_id,
                                                    "campaign": "camp1"})
        gw.start()
        for _ in range(10):
            gw.audio(FRAME)
    w.step()
    w.step()
    assert set(w.calls) == {"call-alive", "call-dead"}
    # gw-dead never beats and sends nothing more: no call.ended will ever come.
    wait_for(lambda: (w.step() or "call-dead" not in w.calls), timeout=5, what="orphan ended")
    assert "call-alive" in w.calls  # its gateway is alive: a quiet call is not ended
    assert w.metrics.counters["calls_gateway_lost_total"] == 1
    assert load(r, "call-dead").done and r.get(keys.call_lease("call-dead")) is None
    meta = {k.decode(): v.decode() for k, v in r.hgetall(keys.call_meta("call-dead")).items()}
    assert meta["state"] == "ended" and meta["end_reason"] == "gateway_lost"
    assert r.hget(keys.campaign_key("camp1", "states"), "call-dead") == b"ended"
    assert 0 < r.ttl(keys.call_meta("call-dead")) <= keys.CALL_KEY_TTL_AFTER_END
    pending = r.xpending_range(keys.CALLS_STREAM, keys.WORKERS_GROUP, "-", "+", 10)
    assert len(pending) == 1  # only call-alive's start entry
    assert _texts(dead_gw) == ["10:11"]


def test_heartbeats_of_long_dead_workers_are_pruned(r, redis_url):
    r.zadd(keys.WORKERS_ZSET, {"gone-1": time.time() - 3 * 24 * 3600, "recent-1": time.time() - 60})
    w = Worker(_settings(), CountingAgent, r=connect(redis_url), worker_id="wa", lease_ms=1000)
    w.step()
    assert {m.decode() for m in r.zrange(keys.WORKERS_ZSET, 0, -1)} == {"recent-1", "wa"}
