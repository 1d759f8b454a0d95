"""The worker on a real Redis Cluster (3 primaries with replicas, on loopback):
calls spread over the slots, one read round trip per node, every script on one
slot, and a primary SIGKILLed mid-call failed over with the calls going on and
every lost frame counted."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from piopiy_voice import keys
from piopiy_voice.redisconn import connect
from piopiy_voice.settings import Settings
from piopiy_voice.workers.runner import Worker
from workers_support import CountingAgent, FakeGateway, wait_for

pytestmark = pytest.mark.integration
FRAME = b"\x00\x01" * 160
N_CALLS = 24


def _worker(url, worker_id="wk", lease_ms=5000):
    return Worker(Settings.from_env({"PV_STALE_COMMAND_MS": "0"}), CountingAgent, r=connect(url),
                  worker_id=worker_id, lease_ms=lease_ms)


def _getkeys_calls(cluster) -> int:
    total = 0
    for port, _role in cluster.nodes:
        stats = redis.Redis(port=port).info("commandstats")
        total += stats.get("cmdstat_command|getkeys", {}).get("calls", 0)
    return total


def test_calls_spread_over_the_slots_are_served_like_on_one_redis(rc, redis_cluster):
    gws = [FakeGateway(rc, f"cl-{i}") for i in range(N_CALLS)]
    # The calls' keys live on every primary.
    assert len({redis_cluster.primary_port_for(keys.call_stream(g.call_id)) for g in gws}) == 3
    w = _worker(redis_cluster.url)
    before = _getkeys_calls(redis_cluster)
    for g in gws:
        g.start()
    for _ in range(30):
        for g in gws:
            g.audio(FRAME)
        w.step()
    wait_for(lambda: w.step() or all(len(g.commands()) == 3 for g in gws), timeout=10, what="commands")
    assert [[c.text for c in g.commands()] for g in gws] == [["10:11", "20:21", "30:31"]] * N_CALLS
    # redis-py alone would have asked a node for the keys of every XREAD and script.
    assert _getkeys_calls(redis_cluster) == before
    for g in gws[:5]:
        g.end()
    wait_for(lambda: w.step() or len(w.calls) == N_CALLS - 5, timeout=10, what="ended calls released")
    w.hand_back_all()
    pending = rc.xpending(keys.CALLS_STREAM, keys.WORKERS_GROUP)
    assert pending["pending"] == N_CALLS - 5
    assert {c["name"] for c in pending["consumers"]} == {b"handback"}


def test_a_primary_killed_mid_call_is_failed_over_and_every_lost_frame_counted(rc, redis_cluster):
    gws = [FakeGateway(rc, f"fo-{i}") for i in range(N_CALLS)]
    w = _worker(redis_cluster.url, lease_ms=10_000)
    for g in gws:
        g.start()
    runner = threading.Thread(target=w.run, kwargs={"max_seconds": 60}, daemon=True)
    runner.start()
    failed = {g.call_id: 0 for g in gws}
    halt = threading.Event()
    # The feeder's own client and gateways: one-shot writes, so a frame the
    # cluster cannot take now is lost, as from a gateway whose buffer is full,
    # and must show up as a counted gap (its seq was taken).
    feeder_r = connect(redis_cluster.url)
    feeder_r.pv_retry_window_s = 0.0
    feeds = [FakeGateway(feeder_r, g.call_id) for g in gws]
    for f, g in zip(feeds, gws):
        f.seq = g.seq

    def feed():
        while not halt.is_set():
            for f in feeds:
                try:
                    f.audio(FRAME)
                except redis.RedisError:
                    failed[f.call_id] += 1
            time.sleep(0.02)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        wait_for(lambda: all(len(g.commands()) >= 2 for g in gws), timeout=20, what="commands before")
        victim_key = keys.call_stream(gws[0].call_id)
        on_victim = [g for g in gws if redis_cluster.primary_port_for(keys.call_stream(g.call_id))
                     == redis_cluster.primary_port_for(victim_key)]
        counts = {g.call_id: len(g.commands()) for g in gws}
        t_kill = time.monotonic()
        redis_cluster.kill_primary_of(victim_key)
        # Every call goes on, those whose primary died included.
        wait_for(lambda: all(len(g.commands()) >= counts[g.call_id] + 3 for g in gws), timeout=30,
                 interval=0.05, what="every call answered again after the failover")
        recovered_s = time.monotonic() - t_kill
        halt.set()
        feeder.join(5)
        wait_for(lambda: all(w.calls[f.call_id].ckpt.runtime.get("seq", 0) >= f.seq for f in feeds),
                 timeout=20, what="worker caught up")
    finally:
        halt.set()
        w.stop()
        runner.join(15)
    assert not runner.is_alive()
    lost = sum(failed.values())
    skipped = w.metrics.counters["frames_skipped_total"]
    print(f"\nprimary SIGKILLed with {len(on_victim)} of {N_CALLS} calls on it: every call answered "
          f"again {recovered_s:.2f} s after the kill; frames not written {lost}, gaps the worker "
          f"counted {skipped}, Redis errors the worker survived "
          f"{w.metrics.counters['redis_unavailable_total'] + w.metrics.counters['redis_errors_total']}")
    assert on_victim
    # Frames acknowledged by the dead primary but not yet on its replica are
    # lost too (asynchronous replication): the worker counts every gap.
    assert skipped >= lost
    for g in gws:
        seqs = [c.seq for c in g.applied()]
        assert seqs == list(range(1, len(seqs) + 1)), (g.call_id, seqs)
