"""Dialer pieces without workers: request validation, idempotent enqueue,
limiters, CSV import and campaign counts (against the test Redis)."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from rq import Queue

from piopiy_voice import callrecord, keys
from piopiy_voice.errors import PiopiyApiError, PiopiyNetworkError, PiopiyValidationError
from piopiy_voice.settings import Settings
from piopiy_voice.workers.dialer import IdempotencyConflict, build_request, enqueue_call
from piopiy_voice.workers.dialer.campaign import campaign_status, enqueue_csv
from piopiy_voice.workers.dialer.jobs import is_retryable
from piopiy_voice.workers.dialer.ratelimit import acquire_live_slot, live_count, reserve_dial_slot

ROOT = Path(__file__).resolve().parent.parent
TO = "919876543210"


@pytest.fixture
def settings():
    return Settings.from_env({}, piopiy_caller_id="919000000000", dial_queue="calls-unit")


@pytest.mark.parametrize("fields, field", [
    ({"to": "98-76"}, "to"),
    ({"to": "0987654321"}, "to"),
    ({"to": TO, "voice_quality": 12345}, "voice_quality"),
    ({"to": TO, "listen_mode": "everyone"}, "listen_mode"),
    ({"to": TO, "flow": "bad flow!"}, "flow"),
    ({"to": TO, "campaign": "x" * 65}, "campaign"),
    ({"to": TO, "duration": 0}, "duration"),
    ({"to": TO, "loop": 2}, "loop"),
    ({"to": TO, "extra_actions": [{"action": "stream", "ws_url": "ws://x/y"}]}, "extra_actions"),
    ({"to": TO, "extra_actions": [{"action": "play"}]}, "extra_actions[0]"),
    ({"to": TO, "extra_params": {"a": [1]}}, "extra_params.a"),
    ({"to": TO, "start_at": "tomorrow"}, "start_at"),
    ({"to": TO, "start_at": "2030-01-01T09:00:00"}, "start_at"),
    ({"to": TO, "stream_on_answer": "no"}, "stream_on_answer"),
    ({"to": TO, "color": "red"}, "color"),
])
def test_bad_requests_name_the_field(settings, fields, field):
    with pytest.raises(PiopiyValidationError) as info:
        build_request(settings, **fields)
    assert info.value.field.startswith(field), info.value


def test_caller_id_defaults_from_settings_and_is_required(settings):
    assert build_request(settings, to="+" + TO).caller_id == "919000000000"
    with pytest.raises(PiopiyValidationError, match="PIOPIY_CALLER_ID"):
        build_request(Settings.from_env({}), to=TO)


def test_loop_and_timeout_apply_to_a_bridge(settings):
    req = build_request(settings, to=TO, loop=2, timeout=25, extra_actions=[
        {"action": "bridge", "from": 919000000000, "connect": [{"type": "pstn", "number": 919000000001}]}])
    (bridge,) = req.pcmo_extra()
    assert bridge["loop"] == 2 and bridge["timeout"] == 25


def test_idempotency_key_gives_stable_id_and_refuses_a_different_request(r, settings):
    a = enqueue_call(r, to=TO, settings=settings, idempotency_key="k-1")
    b = enqueue_call(r, to=TO, settings=settings, idempotency_key="k-1")
    assert a.created and not b.created and a.call_id == b.call_id
    with pytest.raises(IdempotencyConflict, match="k-1"):
        enqueue_call(r, to="919876543211", settings=settings, idempotency_key="k-1")
    c = enqueue_call(r, to=TO, settings=settings)
    d = enqueue_call(r, to=TO, settings=settings)
    assert c.call_id != d.call_id
    assert Queue("calls-unit", connection=r).count == 3
    rec = r.hgetall(keys.call_meta(a.call_id))
    assert rec[b"state"] == b"queued" and rec[b"job_id"] == a.job_id.encode()


def test_retryable_classification():
    assert is_retryable(PiopiyNetworkError("refused", reached=False))
    assert not is_retryable(PiopiyNetworkError("read timeout", reached=True))
    assert is_retryable(PiopiyApiError(429, 429, {}))
    assert is_retryable(PiopiyApiError(503, 503, {}))
    assert is_retryable(PiopiyApiError(200, 503, {"code": 503}))
    # Any other 5xx may be ringing: outcome unknown, never re-sent.
    for status in (500, 502, 504):
        assert not is_retryable(PiopiyApiError(status, status, {}))
    assert not is_retryable(PiopiyApiError(200, 502, {"code": 502}))
    assert not is_retryable(PiopiyApiError(401, 401, {}))
    assert not is_retryable(PiopiyApiError(200, 420, {"code": 420}))
    assert not is_retryable(PiopiyValidationError("to", "bad"))


def test_rate_reservations_are_spaced(r):
    waits = [reserve_dial_slot(r, 20) for _ in range(10)]
    # reserved back to back: the n-th waits about n/20 s
    assert waits[0] < 0.02
    for i, w in enumerate(waits):
        assert abs(w - i * 0.05) < 0.02, waits
    with pytest.raises(ValueError):
        reserve_dial_slot(r, 0)


def test_a_wait_too_long_reserves_nothing(r):
    waits = [reserve_dial_slot(r, 10, max_wait_s=0.25) for _ in range(5)]
    assert [round(w, 1) for w in waits[:3]] == [0.0, 0.1, 0.2]
    # Too far out: told the wait, nothing reserved, so both hear the same.
    assert abs(waits[3] - 0.3) < 0.02 and abs(waits[4] - 0.3) < 0.02, waits
    assert abs(reserve_dial_slot(r, 10) - 0.3) < 0.02  # the slot is still free


def test_live_slots_cap_and_free_on_end(r):
    assert acquire_live_slot(r, "camp", "c1", 2, 60) == (True, 0.0)
    assert acquire_live_slot(r, "camp", "c2", 2, 60)[0]
    granted, wait = acquire_live_slot(r, "camp", "c3", 2, 60)
    assert not granted and 55 < wait <= 60
    assert acquire_live_slot(r, "camp", "c1", 2, 60)[0]  # a retry keeps its slot
    assert live_count(r, "camp") == 2
    with r.pipeline() as pipe:
        callrecord.set_state(pipe, "c2", "ended", campaign="camp")
        pipe.execute()
    assert live_count(r, "camp") == 1  # an ended call's slot is not "in use"
    assert acquire_live_slot(r, "camp", "c3", 2, 60)[0]
    # a slot whose hold lapsed (never-connected call) is reclaimed
    assert acquire_live_slot(r, "camp2", "x1", 1, 0.05)[0]
    import time

    time.sleep(0.1)
    assert live_count(r, "camp2") == 0  # lapsed
    assert acquire_live_slot(r, "camp2", "x2", 1, 60)[0]


CSV = """to,id,name,flow
919876543210,a1,Asha,sales
not-a-number,a2,Bad,sales
919876543211,a3,Ravi,
,a4,Empty,sales
919876543212,a5,Too,many,fields

"+919876543213",a6,"Multi
line",support
919876543214,a7,Flow,bad flow!
"""


def test_csv_bad_rows_reported_by_line_and_good_rows_enqueued(r, settings):
    report = enqueue_csv(r, io.StringIO(CSV), "spring", settings=settings, defaults={"flow": "default"})
    assert [(e.line, e.reason.split(":")[0]) for e in report.errors] == [
        (3, "to"), (5, "to"), (6, "5 fields but the header has 4"), (10, "flow")]
    assert report.enqueued == 3 and report.already == 0 and report.rows == 7
    assert Queue("calls-unit", connection=r).count == 3
    recs = [{k.decode(): v.decode() for k, v in r.hgetall(keys.call_meta(c)).items()} for c in report.call_ids]
    assert [x["to"] for x in recs] == ["919876543210", "919876543211", "919876543213"]
    assert [x["flow"] for x in recs] == ["sales", "default", "support"]
    assert all(x["campaign"] == "spring" and x["state"] == "queued" for x in recs)
    # running the same file again dials nobody twice
    again = enqueue_csv(r, io.StringIO(CSV), "spring", settings=settings, defaults={"flow": "default"})
    assert again.enqueued == 0 and again.already == 3 and len(again.errors) == 4
    assert Queue("calls-unit", connection=r).count == 3
    status = campaign_status(r, "spring")
    assert status["total"] == 3 and status["states"]["queued"] == 3 and status["states"]["failed"] == 0
    assert campaign_status(r, "nobody") is None
    # a campaign's bookkeeping does not live for ever
    for suffix in ("info", "states"):
        assert 0 < r.ttl(keys.campaign_key("spring", suffix)) <= keys.CAMPAIGN_TTL_S


def test_csv_without_to_column_is_refused(r, settings):
    with pytest.raises(ValueError, match="line 1.*'to' column"):
        enqueue_csv(r, io.StringIO("name,phone_no\nx,1\n"), "c", settings=settings)


def test_campaign_cli_reports_lines_and_shows_status(r, redis_url, subprocess_env, tmp_path):
    path = tmp_path / "contacts.csv"
    path.write_text(CSV)
    env = dict(subprocess_env, PIOPIY_CALLER_ID="919000000000", PV_DIAL_QUEUE="calls-unit")
    out = subprocess.run([sys.executable, "-m", "piopiy_voice.cli", "campaign", "enqueue", str(path),
                          "--name", "cli-camp"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1, out.stderr  # some rows were bad
    assert f"{path}:line 3: to:" in out.stderr and f"{path}:line 10: flow:" in out.stderr
    assert "] 7/7 rows 100%" in out.stderr  # the progress bar finished
    assert "3 enqueued" in out.stdout and "4 bad" in out.stdout
    st = subprocess.run([sys.executable, "-m", "piopiy_voice.cli", "campaign", "status", "cli-camp"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert st.returncode == 0 and "3 calls" in st.stdout
    lines = dict(line.split() for line in st.stdout.splitlines()[1:])
    from piopiy_voice import callrecord

    assert lines == {st: "3" if st == "queued" else "0" for st in callrecord.STATES}
