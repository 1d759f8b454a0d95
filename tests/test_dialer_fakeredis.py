"""Pure unit tests of the dialer's Redis logic on fakeredis[lua] (no server, no
blocking reads): the idempotent enqueue transaction with RQ, and the shared
rate limiter's Lua script. Everything that blocks on streams or runs RQ workers
is tested against a real Redis elsewhere (test_dialer_flow.py)."""

from __future__ import annotations

import fakeredis
import pytest
from rq import Queue

from piopiy_voice import keys
from piopiy_voice.settings import Settings
from piopiy_voice.workers.dialer import IdempotencyConflict, enqueue_call
from piopiy_voice.workers.dialer.ratelimit import reserve_dial_slot

TO = "919876543210"


@pytest.fixture
def fake():
    return fakeredis.FakeRedis()


@pytest.fixture
def settings():
    return Settings.from_env({}, piopiy_caller_id="919000000000", dial_queue="calls-fake")


def test_same_idempotency_key_enqueues_one_job(fake, settings):
    first = enqueue_call(fake, to=TO, settings=settings, idempotency_key="order-17")
    again = enqueue_call(fake, to=TO, settings=settings, idempotency_key="order-17")
    assert first.created and not again.created
    assert again.call_id == first.call_id and again.job_id == first.job_id
    queue = Queue("calls-fake", connection=fake)
    assert queue.job_ids == [first.job_id]
    assert queue.fetch_job(first.job_id).func_name == "piopiy_voice.workers.dialer.jobs.place_call"
    assert fake.hget(keys.call_meta(first.call_id), "state") == b"queued"
    with pytest.raises(IdempotencyConflict):
        enqueue_call(fake, to="919876543211", settings=settings, idempotency_key="order-17")


def test_rate_limiter_spaces_reservations_by_the_rate(fake):
    waits = [reserve_dial_slot(fake, 10.0) for _ in range(4)]
    # The first goes now; each next one 100 ms after the previous reservation.
    assert waits[0] == pytest.approx(0.0, abs=0.02)
    for i in range(1, 4):
        assert waits[i] == pytest.approx(0.1 * i, abs=0.03), waits


def test_rate_limiter_refuses_bad_rates(fake):
    for bad in (0, -1, float("inf"), "5"):
        with pytest.raises(ValueError, match="rate_per_s"):
            reserve_dial_slot(fake, bad)
