"""Fault: the redis-server frozen (SIGSTOP) mid-call, then thawed (SIGCONT).

Real processes: a private redis-server, a gateway, two workers, platform
clients sending real-time 20 ms frames (the harness of ``bench/fault_suite.py``,
which runs the longer 5 s and 15 s stalls). Checked from the platform's side
and from Redis: every frame sent is an audio entry or reported as a gap (a
small writer buffer forces gaps in the first test); no
command reaches the platform twice; every call answers a probe (a DTMF key)
after the thaw; no role exits. A stall longer than the lease expires every
lease at once: each call must end up held by exactly one live worker, every
move must be one takeover (fenced: the loser counts a lost lease), and one
takeover scan claims at most ``PV_WORKER_CLAIM_PER_SCAN`` calls.
"""

from __future__ import annotations

import os

import pytest

from examples_support import load_bench
from piopiy_voice.redisconn import redis_server_binary

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
fs = load_bench("fault_suite")


def _check_common(res: fs.StallResult) -> None:
    fs.print_stall(res)
    assert not res.client_errors, res.client_errors
    assert res.frames["sent"] > 0 and res.frames["unaccounted"] == 0, res.frames
    assert res.duplicates == 0
    assert len(res.answered) == res.n_calls, f"{len(res.answered)}/{res.n_calls} answered after the thaw"
    assert all(res.alive.values()), res.alive
    assert res.ended
    assert all(holder in res.alive for holder in res.after.values()), res.after


def test_sigstop_2s_with_a_small_buffer_every_frame_is_in_redis_or_a_gap():
    """8 calls x 2 s = 800 frames against a 400-frame writer buffer: what does not
    fit is dropped, counted and reported as ``gap`` entries, never silently lost."""
    res = fs.stall(2, n_calls=8, lease_ms=3000, claim_per_scan=4, quiet=True,
                   extra_env={"PV_REDIS_BUFFER_FRAMES": "400"})
    _check_common(res)
    assert res.frames["gap_frames"] > 0
    assert res.frames["gap_frames"] == res.gateway["dropped"].get("redis_unavailable")
    assert res.after == res.before  # no lease expired: nobody moved
    assert res.recovery_s < 2.0


def test_stall_longer_than_the_lease_each_call_stays_with_one_worker():
    res = fs.stall(4, n_calls=8, lease_ms=1500, claim_per_scan=3, quiet=True)
    _check_common(res)
    assert res.frames["gap_frames"] == 0  # 4 s fits the default buffer: every frame written
    takeovers = sum(res.worker_deltas['pv_worker_takeovers_total{kind="crash"}'].values())
    lost = sum(res.worker_deltas["pv_worker_leases_lost_total"].values())
    assert res.moved == takeovers == lost  # every move a clean, fenced handover
    assert all(b <= 3 for b in res.move_batches())


def test_node_pause_orphans_spread_at_most_claim_per_scan_per_scan():
    """Redis and the worker holding most calls frozen together; Redis thawed
    first: the other worker takes the orphans over, at most 3 per scan."""
    res = fs.stall(3, n_calls=8, lease_ms=1500, claim_per_scan=3, freeze_owner_extra_s=2.5, quiet=True)
    _check_common(res)
    orphans = sum(1 for h in res.before.values() if h == res.owner_frozen)
    assert orphans > 3  # more than one scan's worth, or the limit is not exercised
    assert res.moved == orphans
    batches = res.move_batches()
    assert sum(batches) == orphans and all(b <= 3 for b in batches), batches
    assert len(batches) >= -(-orphans // 3)
    lost = res.worker_deltas["pv_worker_leases_lost_total"][res.owner_frozen]
    assert lost == orphans  # the thawed owner found every lease gone and sent nothing more


@pytest.fixture(autouse=True)
def _needs_redis_server():
    """SIGSTOP needs a redis-server process of our own (not a REDIS_URL)."""
    try:
        redis_server_binary()
    except RuntimeError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"redis-server needed under CI: {exc}")
        pytest.skip(f"needs a local redis-server: {exc}")
