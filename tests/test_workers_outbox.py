"""The worker's command outbox against a real Redis (``workers.checkpoint``):
commands are committed with the checkpoint into the call's own slot, then
delivered to the gateway's stream, in order, retried until they land; the
outbox holds only what is not yet known delivered."""

from __future__ import annotations

import pytest

from piopiy_voice import keys
from piopiy_voice.contracts import decode
from piopiy_voice.redisconn import connect
from piopiy_voice.settings import Settings
from piopiy_voice.workers.checkpoint import load
from piopiy_voice.workers.runner import Worker
from workers_support import CountingAgent, FakeGateway

pytestmark = pytest.mark.integration
FRAME = b"\x00\x01" * 160


def _worker(redis_url, worker_id="wo"):
    return Worker(Settings.from_env({"PV_STALE_COMMAND_MS": "0"}), CountingAgent, r=connect(redis_url),
                  worker_id=worker_id, lease_ms=5000)


def _texts(gw):
    return [cmd.text for cmd in gw.commands()]


def test_delivery_that_fails_is_retried_in_order_and_nothing_is_decided_twice(r, redis_url):
    w = _worker(redis_url)
    gw = FakeGateway(r, "call-o")
    gw.start()
    for _ in range(10):
        gw.audio(FRAME)
    w.step()
    w.step()
    assert _texts(gw) == ["10:11"]
    # The gateway's stream refuses writes (a key of the wrong type stands in for
    # its node being unreachable): the next two commands are committed, not delivered.
    cmds = keys.gateway_commands("gw1")
    saved = r.xrange(cmds)
    r.delete(cmds)
    r.set(cmds, "not a stream")
    for _ in range(20):
        gw.audio(FRAME)
        w.step()
    assert w.metrics.counters["command_deliveries_retried_total"] >= 2
    outbox = [decode(f).text for _, f in r.xrange(keys.call_outbox("call-o"))]
    assert outbox == ["20:21", "30:31"]
    ckpt = load(r, "call-o")
    assert (ckpt.cmd_seq, ckpt.sent_seq) == (3, 1)  # decided and committed, not yet delivered
    # The gateway's node is back: both land, in order, then the next one.
    r.delete(cmds)
    for eid, fields in saved:
        r.xadd(cmds, fields, id=eid)
    w.step()
    for _ in range(10):
        gw.audio(FRAME)
    w.step()
    w.step()
    assert _texts(gw) == ["10:11", "20:21", "30:31", "40:41"]
    assert [cmd.command_id for cmd in gw.commands()] == ["call-o:1", "call-o:2", "call-o:3", "call-o:4"]


def test_outbox_is_emptied_once_delivery_is_checkpointed(r, redis_url):
    w = _worker(redis_url)
    gw = FakeGateway(r, "call-e")
    gw.start()
    for _ in range(10):
        gw.audio(FRAME)
    w.step()
    w.step()
    assert _texts(gw) == ["10:11"]
    # Committed and delivered; the checkpoint that records the delivery comes
    # with the next commit, which trims the outbox to nothing (the key goes).
    assert r.xlen(keys.call_outbox("call-e")) == 1
    w.calls["call-e"].last_commit = 0.0  # the periodic checkpoint is due
    w.step()
    assert load(r, "call-e").sent_seq == 1
    assert not r.exists(keys.call_outbox("call-e"))


def test_a_new_owner_delivers_what_the_outbox_holds_under_the_same_ids(r, redis_url):
    a = _worker(redis_url, "wa")
    gw = FakeGateway(r, "call-t")
    gw.start()
    # "a" commits "10:11" and dies before delivering it.
    a.committer.deliver = lambda pipe, gateway_id, commands: 0
    for _ in range(10):
        gw.audio(FRAME)
    a.step()
    a.step()
    assert _texts(gw) == []
    assert [decode(f).command_id for _, f in r.xrange(keys.call_outbox("call-t"))] == ["call-t:1"]
    # a's lease lapses and its start entry has been idle as long (as after a kill).
    r.delete(keys.call_lease("call-t"))
    r.xclaim(keys.CALLS_STREAM, keys.WORKERS_GROUP, "wa", 0, [a.calls["call-t"].start_entry],
             idle=60_000, justid=True)
    b = _worker(redis_url, "wb")
    b.step()
    assert "call-t" in b.calls
    b.step()
    assert [(cmd.text, cmd.command_id) for cmd in gw.commands()] == [("10:11", "call-t:1")]
    assert b.metrics.counters["commands_redelivered_total"] == 1
    # Nothing was re-decided: the next command continues the numbering.
    for _ in range(10):
        gw.audio(FRAME)
    b.step()
    b.step()
    assert [cmd.command_id for cmd in gw.commands()] == ["call-t:1", "call-t:2"]
