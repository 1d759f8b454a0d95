"""The agent runtime: works off the worker loop, results into the call's stream."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from piopiy_voice import contracts as c
from piopiy_voice import keys
from piopiy_voice.workers.agent.base import Work
from piopiy_voice.workers.checkpoint import load
from piopiy_voice.workers.runtime import AgentRuntime, RedisPublisher, run_now
from workers_support import FakeGateway, wait_for


def _work(fn, *args, n=1, timeout_s=5.0, **kw):
    return Work(id=f"c:w{n}", name="t", fn=fn, args=args, kwargs=kw, timeout_s=timeout_s)


async def _answer(x):
    await asyncio.sleep(0.01)
    return {"x": x}


async def _sentences(n):
    for i in range(n):
        yield f"s{i}"


def _boom():
    raise RuntimeError("no such thing")


async def _forever():
    await asyncio.sleep(60)


def test_shapes_of_results_and_failures():
    assert [(d.ok, d.final, d.value) for d in run_now("c", _work(_answer, 3))] == [(True, True, {"x": 3})]
    gen = run_now("c", _work(_sentences, 2))
    assert [(d.final, d.index, d.value) for d in gen] == [(False, 0, "s0"), (False, 1, "s1"), (True, 2, None)]
    assert run_now("c", _work(lambda: b"\x01\x00"))[0].pcm == b"\x01\x00"
    both = run_now("c", _work(lambda: ({"t": "hi"}, b"\x02\x00")))[0]
    assert (both.value, both.pcm) == ({"t": "hi"}, b"\x02\x00")
    failed = run_now("c", _work(_boom))[0]
    assert (failed.ok, failed.final, failed.error) == (False, True, "RuntimeError: no such thing")
    assert run_now("c", _work(_forever, timeout_s=0.05))[0].error == "timeout"
    assert "not JSON-able" in run_now("c", _work(lambda: object()))[0].error
    # Every result is a valid stream entry.
    for d in gen + [both, failed]:
        assert c.decode(c.encode(d)) == d


def test_runtime_runs_works_concurrently_bounded_and_cancels():
    got: list[c.WorkDone] = []
    done = threading.Event()

    async def publish(cid, d):
        got.append(d)
        if len([x for x in got if x.final]) == 5:
            done.set()
        return True

    rt = AgentRuntime(publish, concurrency=2)
    try:
        t0 = time.monotonic()
        for i in range(4):
            rt.submit("c", _work(asyncio.sleep, 0.2, n=i))
        rt.submit("c", _work(_forever, n=9))
        rt.cancel("c:w9")
        assert done.wait(5)
        took = time.monotonic() - t0
    finally:
        rt.stop()
    errors = sorted(d.error for d in got)
    assert errors == ["", "", "", "", "cancelled"]
    assert 0.35 <= took < 1.5, took  # 4 x 0.2 s two at a time: two rounds, not four
    assert rt.in_flight == 0


def test_results_are_fenced_by_the_lease(r):
    pub = RedisPublisher(r.connection_pool.connection_kwargs, "w1")

    async def go():
        try:
            ok1 = await pub("call-f", c.WorkDone(call_id="call-f", work_id="call-f:w1", name="t"))
            r.set(keys.call_lease("call-f"), "w1")
            ok2 = await pub("call-f", c.WorkDone(call_id="call-f", work_id="call-f:w2", name="t",
                                                 pcm=b"\x00\xff"))
            return ok1, ok2
        finally:
            await pub.close()

    assert asyncio.run(go()) == (False, True)
    rows = r.xrange(keys.call_stream("call-f"))
    assert [c.decode(f).work_id for _, f in rows] == ["call-f:w2"]
    assert c.decode(rows[0][1]).pcm == b"\x00\xff"


def _spawn(env, worker_id, lease_ms, metrics_port=None):
    args = [sys.executable, "-m", "piopiy_voice.workers.runner", "--agent",
            "workers_support:ThinkingAgent", "--worker-id", worker_id, "--lease-ms", str(lease_ms),
            "--max-seconds", "60"]
    return subprocess.Popen(args, env=dict(env, PV_LOG_LEVEL="WARNING"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _texts(gw):
    return [cmd.text for cmd in gw.commands() if cmd.type == "cmd.speak"]


@pytest.mark.integration
def test_slow_works_of_20_calls_do_not_delay_another_calls_reaction(r, subprocess_env):
    proc = _spawn(subprocess_env, "w1", 3000)
    try:
        wait_for(lambda: r.zcard(keys.WORKERS_ZSET) == 1, timeout=15, what="worker up")
        fast = FakeGateway(r, "fast")
        fast.start()
        wait_for(lambda: r.get(keys.call_lease("fast")), what="fast call owned")
        slow = [FakeGateway(r, f"slow-{i}") for i in range(20)]
        t_ask = time.monotonic()
        for gw in slow:
            gw.start(ask="1", think_s="1")
        wait_for(lambda: all(r.get(keys.call_lease(gw.call_id)) for gw in slow), what="slow calls owned")
        # While the 20 one-second works are in flight, the fast call's frames are
        # answered at the speed of the loop.
        latencies = []
        marked = b"\x7f\x7f" + b"\x00" * 318
        while time.monotonic() - t_ask < 0.9:
            n = len(_texts(fast))
            t0 = time.monotonic()
            fast.audio(marked)
            wait_for(lambda: len(_texts(fast)) > n, timeout=5, interval=0.002, what="reaction")
            latencies.append(time.monotonic() - t0)
        answers_pending = sum(1 for gw in slow if not _texts(gw))
        wait_for(lambda: all(_texts(gw) for gw in slow), timeout=10, what="20 answers")
        all_answered_s = time.monotonic() - t_ask
    finally:
        proc.terminate()
        proc.wait(10)
    print(f"fast call reaction ms while 20 x 1 s works in flight: "
          f"{', '.join(f'{x * 1000:.0f}' for x in latencies)}; all 20 answered in {all_answered_s:.2f} s")
    assert len(latencies) >= 3 and answers_pending > 0, (latencies, answers_pending)
    assert max(latencies) < 0.3, latencies  # far below the 1 s the works take
    assert all_answered_s < 4.0, all_answered_s  # concurrently, not 20 x 1 s
    assert [_texts(gw) for gw in slow] == [[f"answer:slow-{i}#1"] for i in range(20)]


@pytest.mark.integration
def test_sigkill_with_a_work_in_flight_the_new_owner_delivers_lost_and_the_agent_re_asks(
        r, subprocess_env):
    lease = 800
    procs = {wid: _spawn(subprocess_env, wid, lease) for wid in ("w1", "w2")}
    try:
        wait_for(lambda: r.zcard(keys.WORKERS_ZSET) == 2, timeout=15, what="two workers up")
        gw = FakeGateway(r, "call-k")
        gw.start(ask="1", think_s="2")
        wait_for(lambda: (load(r, "call-k") or None) and load(r, "call-k").runtime.get("works"),
                 what="work in flight at a checkpoint")
        owner = r.get(keys.call_lease("call-k")).decode()
        other = "w2" if owner == "w1" else "w1"
        os.kill(procs[owner].pid, signal.SIGKILL)
        procs[owner].wait(10)
        wait_for(lambda: _texts(gw), timeout=15, what="the answer after the takeover")
        assert r.get(keys.call_lease("call-k")) == other.encode()
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
                p.wait(10)
    assert _texts(gw) == ["answer:call-k#2"]  # asked again, answered once
    events = [{k.decode(): v.decode() for k, v in f.items()} for _, f in r.xrange(keys.call_timeline("call-k"))]
    lost = [e for e in events if e["event"] == "worker.work_lost"]
    assert [e["work_id"] for e in lost] == ["call-k:w1"]
    done = [c.decode(f) for _, f in r.xrange(keys.call_stream("call-k")) if f[b"type"] == b"work.done"]
    assert [(d.work_id, d.ok) for d in done] == [("call-k:w2", True)]
