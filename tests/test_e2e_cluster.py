"""End to end on a real Redis Cluster with a primary SIGKILLed mid-call:
dialer -> sandbox (platform) -> gateway -> a local 3-primary cluster with
replicas -> worker + transcriber -> gateway -> sandbox, every role a real
process (``sandbox.demo.LocalSystem``), the dial queue on a redis-server of
its own. The calls must go on (the demo's whole flow: greeting, answer,
barge-in, hand-off, monitoring) and every frame that did not make it to the
workers' stream must be counted by them. (The demo conversation itself runs
on the cluster in ``test_e2e_system.py``.)
"""

from __future__ import annotations

import time

import pytest

from piopiy_voice import keys
from piopiy_voice.contracts import decode
from piopiy_voice.redisconn import EmbeddedRedis
from piopiy_voice.sandbox.demo import LocalSystem, check_flow

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

CALL_TIMEOUT_S = 90


@pytest.fixture
def csystem(redis_cluster, tmp_path):
    redis_cluster.heal()
    redis_cluster.flushall()
    queue = EmbeddedRedis()
    s = LocalSystem(tmp_path, redis_cluster.url, queue_url=queue.url)
    try:
        s.start()
        yield s
    finally:
        codes = s.stop()
        queue.close()
        redis_cluster.heal()
        assert all(code == 0 for code in codes.values()), codes


def _audio_seqs(system: LocalSystem, call_id: str) -> list[int]:
    return [decode(f).seq for _, f in system.r.xrange(keys.call_stream(call_id))
            if f.get(b"type") == b"audio"]


def _skipped(system: LocalSystem, call_id: str) -> int:
    """Frames the worker found missing (seq gaps), from its timeline notes."""
    return sum(int(f.get(b"entries", b"0")) for _, f in system.r.xrange(keys.call_timeline(call_id))
               if f.get(b"event") == b"worker.skipped")


def test_a_primary_killed_mid_call_the_calls_go_on_and_every_lost_frame_is_counted(csystem, redis_cluster):
    placed = [csystem.enqueue(scenario="demo") for _ in range(3)]
    first = placed[0]
    deadline = time.monotonic() + 30
    while csystem.record(first).get("state") != "live" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert csystem.record(first).get("state") == "live"
    time.sleep(4.0)  # mid-conversation: the greeting is playing, the caller is about to ask
    hit = {cid for cid in placed if redis_cluster.primary_port_for(keys.call_stream(cid))
           == redis_cluster.primary_port_for(keys.call_stream(first))}
    victim = redis_cluster.kill_primary_of(keys.call_stream(first))
    t_kill = time.monotonic()
    redis_cluster.wait_healthy(30)
    promoted_s = time.monotonic() - t_kill
    lines = []
    for call_id in placed:
        record = csystem.wait_ended(call_id, CALL_TIMEOUT_S)
        report = csystem.sandbox_report(record["request_id"])
        assert check_flow(report, record) == [], call_id  # greeting, answer, barge-in, hand-off
        sent = report["stream"]["frames_sent"]
        seqs = _audio_seqs(csystem, call_id)
        lost = sent - len(seqs)
        counted = _skipped(csystem, call_id)
        lines.append(f"{call_id}: sent {sent}, in the stream {len(seqs)}, lost {lost}, "
                     f"gaps the worker counted {counted}"
                     f"{' (its primary was killed)' if call_id in hit else ''}")
        assert lost >= 0 and lost == counted, lines[-1]
        assert seqs == sorted(seqs)
    print(f"\nprimary {victim} SIGKILLed mid-call; cluster healthy again after {promoted_s:.1f} s\n  "
          + "\n  ".join(lines))
