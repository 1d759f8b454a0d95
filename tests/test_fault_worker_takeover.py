"""Fault: a worker SIGKILLed mid-call with 30 calls (real processes, real Redis).

Reproduces issue 12's "takeover took ~2x the lease for 45 % of orphaned
calls": commits extended the lease but not the start entry's idle time, so the
claimer found the lease still held and handed the entry back to the dead
owner. Each call's takeover delay (SIGKILL -> the survivor holds its lease) is
measured; every one must be <= lease + 1 s, with no command lost or applied twice.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time

import pytest

from piopiy_voice import keys
from workers_support import FakeGateway, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
FRAME = b"\x00\x01" * 160
N_CALLS = 30
LEASE_MS = 2000


def _spawn(env, worker_id):
    return subprocess.Popen(
        [sys.executable, "-m", "piopiy_voice.workers.runner", "--agent", "workers_support:CountingAgent",
         "--worker-id", worker_id, "--lease-ms", str(LEASE_MS), "--max-seconds", "55"],
        env=dict(env, PV_STALE_COMMAND_MS="0", PV_WORKER_CLAIM_PER_SCAN="50"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_sigkill_with_30_calls_every_call_taken_over_within_lease_plus_1s(r, subprocess_env):
    gws = [FakeGateway(r, f"tk-{i}") for i in range(N_CALLS)]
    victim = _spawn(subprocess_env, "victim")
    survivor = None
    halt = threading.Event()
    try:
        wait_for(lambda: r.zscore(keys.WORKERS_ZSET, "victim"), timeout=15, what="victim up")
        for gw in gws:
            gw.start()
        wait_for(lambda: all(r.get(keys.call_lease(gw.call_id)) == b"victim" for gw in gws),
                 timeout=15, what="victim owns every call")
        survivor = _spawn(subprocess_env, "survivor")
        wait_for(lambda: r.zscore(keys.WORKERS_ZSET, "survivor"), timeout=15, what="survivor up")

        def feed():  # audio on every call: the victim commits (extends leases) all the time
            while not halt.is_set():
                pipe = r.pipeline(transaction=False)
                for gw in gws:
                    gw.r = pipe
                    gw.audio(FRAME)
                    gw.r = r
                pipe.execute()
                time.sleep(0.02)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        time.sleep(3.0)  # a few lease renewals and many commits
        os.kill(victim.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        victim.wait(5)
        taken: dict[str, float] = {}
        deadline = t_kill + 3 * LEASE_MS / 1000 + 5
        while len(taken) < N_CALLS and time.monotonic() < deadline:
            pipe = r.pipeline(transaction=False)
            for gw in gws:
                pipe.get(keys.call_lease(gw.call_id))
            now = time.monotonic()
            for gw, holder in zip(gws, pipe.execute()):
                if holder == b"survivor" and gw.call_id not in taken:
                    taken[gw.call_id] = now - t_kill
            time.sleep(0.01)
        halt.set()
        feeder.join(5)
        delays = sorted(taken.values())
        print(f"\ntakeover after SIGKILL, {N_CALLS} calls, lease {LEASE_MS} ms: "
              f"max {max(delays):.3f}s p50 {statistics.median(delays):.3f}s min {min(delays):.3f}s")
        assert len(taken) == N_CALLS, f"only {len(taken)} of {N_CALLS} calls taken over"
        assert max(delays) <= LEASE_MS / 1000 + 1.0, delays
        # No command lost or applied twice: each call's command numbers run
        # 1..n once the gateway drops repeated command ids; delivery itself is
        # at-least-once (the victim's last delivered command may come again
        # from its outbox, under the same id, right after the original).
        for gw in gws:
            wait_for(lambda gw=gw: r.get(keys.call_lease(gw.call_id)) == b"survivor", what="owner")
        for gw in gws:
            delivered = gw.commands()
            applied = gw.applied(delivered)
            seqs = [cmd.seq for cmd in applied]
            assert seqs == list(range(1, len(seqs) + 1)), (gw.call_id, seqs)
            texts = [cmd.text for cmd in applied]
            assert len(set(texts)) == len(texts), (gw.call_id, texts)
            delivered = [cmd.command_id for cmd in delivered]
            assert len(delivered) - len(applied) <= 1, ' '.join(delivered)
            assert all(cid == delivered[i - 1] for i, cid in enumerate(delivered)
                       if cid in delivered[:i]), ' '.join(delivered)
    finally:
        halt.set()
        for p in (victim, survivor):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
