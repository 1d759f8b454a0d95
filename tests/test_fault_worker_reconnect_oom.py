"""Worker faults: a call whose socket came back after a drop, and Redis at maxmemory.

Reconnect (issue 12): the worker saw a ``done`` checkpoint and silently dropped
the re-announced call. Now a call announced again while its record is live (or
suspended) is resumed from its checkpoint with the same agent state; a call
whose record says ended is still dropped.

Memory: at ``maxmemory`` (noeviction) every write fails with OOM; the worker
must log and count it, take no new call, keep its live call and go on once
memory is freed -- never exit, never lose or repeat a command.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from piopiy_voice import keys
from piopiy_voice.redisconn import EmbeddedRedis, connect
from piopiy_voice.settings import Settings
from piopiy_voice.workers.checkpoint import load
from piopiy_voice.workers.runner import Worker
from workers_support import CountingAgent, FakeGateway, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
FRAME = b"\x00\x01" * 160


def _texts(gw):
    """What the gateway applies: each command id once (the worker's outbox
    delivers at least once; ``gateway.dispatch`` drops a repeated id)."""
    return [cmd.text for cmd in gw.applied() if cmd.type == "cmd.speak"]


def _at_most_one_adjacent_repeat(gw):
    """A repeat is the outbox delivering again what its checkpoint had not yet
    recorded as delivered: at most one, right after the original, same id."""
    ids = [cmd.command_id for cmd in gw.commands()]
    assert len(ids) - len(set(ids)) <= 1, ids
    assert all(cid == ids[i - 1] for i, cid in enumerate(ids) if cid in ids[:i]), ids


def test_reannounced_live_call_resumes_from_its_done_checkpoint_ended_one_stays_dropped(
        r, subprocess_env):
    proc = subprocess.Popen(
        [sys.executable, "-m", "piopiy_voice.workers.runner", "--agent", "workers_support:CountingAgent",
         "--worker-id", "w1", "--lease-ms", "1000", "--max-seconds", "50"],
        env=dict(subprocess_env, PV_STALE_COMMAND_MS="0"), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: r.zscore(keys.WORKERS_ZSET, "w1"), timeout=15, what="worker up")
        back, gone = FakeGateway(r, "rc-back"), FakeGateway(r, "rc-gone")
        for gw in (back, gone):
            gw.start()
            for _ in range(15):
                gw.audio(FRAME)
            gw.end()  # the old gateway ended the call on the socket drop
            wait_for(lambda gw=gw: (load(r, gw.call_id) or None) and load(r, gw.call_id).done,
                     what="done checkpoint")
        # The socket of one call comes back: record live again, start re-announced.
        r.hset(keys.call_meta("rc-back"), mapping={"state": "live", "gateway_id": "gw1"})
        r.hset(keys.call_meta("rc-gone"), mapping={"state": "ended", "gateway_id": "gw1"})
        for gw in (back, gone):
            gw.start()
            for _ in range(10):
                gw.audio(FRAME)
        wait_for(lambda: len(_texts(back)) == 2, what="the resumed call served again")
        # Frame 20 counts the 15 frames before the drop: the same agent state.
        assert _texts(back) == ["10:11", "20:23"]
        _at_most_one_adjacent_repeat(back)
        assert r.get(keys.call_lease("rc-back")) == b"w1" and not load(r, "rc-back").done
        time.sleep(0.5)
        assert _texts(gone) == ["10:11"] and r.get(keys.call_lease("rc-gone")) is None
        _at_most_one_adjacent_repeat(gone)
        events = [f[b"event"] for _, f in r.xrange(keys.call_timeline("rc-back"))]
        claimed = [f for _, f in r.xrange(keys.call_timeline("rc-back")) if f[b"event"] == b"worker.claimed"]
        assert b"worker.claimed" in events and claimed[-1][b"after"] == b"reconnect"
    finally:
        proc.terminate()
        proc.wait(15)


def test_at_maxmemory_the_worker_reports_keeps_its_call_and_never_exits():
    server = EmbeddedRedis()
    r = connect(server.url)
    try:
        settings = Settings.from_env({"PV_STALE_COMMAND_MS": "0"})
        worker = Worker(settings, CountingAgent, r=connect(server.url), worker_id="w1", lease_ms=3000)
        gw = FakeGateway(r, "oom-1")
        gw.start()
        for _ in range(10):
            gw.audio(FRAME)
        wait_for(lambda: worker.step() or len(_texts(gw)) == 1, what="first command")
        # While the worker is between turns: the caller goes on talking, a new
        # call is announced, and Redis reaches maxmemory.
        for _ in range(10):
            gw.audio(FRAME)
        FakeGateway(r, "oom-new").start()
        r.config_set("maxmemory", 1)  # every write is refused (OOM) from now on
        thread = threading.Thread(target=worker.run, kwargs={"max_seconds": 40}, daemon=True)
        thread.start()
        wait_for(lambda: worker.metrics.counters.get("redis_oom_total", 0) >= 2, what="OOM counted")
        time.sleep(1.0)
        assert thread.is_alive(), "the worker exited at maxmemory"
        assert "oom-new" not in worker.calls  # new calls are shed first
        assert "oom-1" in worker.calls and _texts(gw) == ["10:11"]  # live call kept, nothing sent
        r.config_set("maxmemory", 0)  # memory freed
        wait_for(lambda: len(_texts(gw)) == 2, timeout=15, what="the live call goes on")
        assert _texts(gw) == ["10:11", "20:21"]  # none lost, none repeated
        wait_for(lambda: "oom-new" in worker.calls, timeout=15, what="the new call taken after")
        assert thread.is_alive()
        print(f"\nmaxmemory: {worker.metrics.counters['redis_oom_total']} OOM errors counted, "
              "worker alive, live call kept and resumed, new call shed then taken")
        worker.stop()
        thread.join(10)
    finally:
        r.close()
        server.close()
