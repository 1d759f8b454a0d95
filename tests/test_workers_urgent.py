"""Barge-in does not wait for the loop turn (``workers.runner``, step 4), and the
turn's frames are scored in one VAD batch, against a real Redis.

A loop turn feeds every owned call's entries, then commits. A call whose
agent cut the playout (``Interrupt``) is committed and delivered the moment
it is decided, before the next call of the turn is fed.
"""

from __future__ import annotations

import pytest

from piopiy_voice import contracts as c
from piopiy_voice import keys
from piopiy_voice.redisconn import connect
from piopiy_voice.settings import Settings
from piopiy_voice.workers.agent.base import Agent
from piopiy_voice.workers.runner import Worker
from workers_support import FakeGateway

pytestmark = pytest.mark.integration
LOUD = b"\x00\x40" * 160


class Witness(Agent):
    """Call "a" answers its first frame with ``DECISION``; call "b" writes down,
    when fed its frame, what the gateway's command stream already holds (a test
    agent may look at Redis; a real one never does)."""

    DECISION = c.Interrupt
    r = None
    seen: list[list[str]] = []

    def on_event(self, event, now):
        if not isinstance(event, c.AudioFrame):
            return []
        if self.call.call_id.endswith("-a"):
            return [self.command(self.DECISION)]
        rows = self.r.xrange(keys.gateway_commands("gw1"))
        Witness.seen.append([f[b"type"].decode() for _, f in rows])
        return []


@pytest.mark.parametrize("decision, delivered_before_b", [
    (c.Interrupt, ["cmd.interrupt"]),   # urgent: delivered mid-turn
    (c.Hangup, []),                     # not urgent: with the turn's commit
])
def test_an_interrupt_is_delivered_before_the_turn_feeds_the_next_call(r, redis_url, decision,
                                                                        delivered_before_b):
    Witness.DECISION, Witness.r, Witness.seen = decision, r, []
    w = Worker(Settings.from_env({}), Witness, r=connect(redis_url), worker_id="wu", lease_ms=5000)
    a, b = FakeGateway(r, "urg-a"), FakeGateway(r, "urg-b")
    a.start()
    w.step()
    b.start()
    w.step()
    assert list(w.calls) == ["urg-a", "urg-b"]   # one XREAD returns the streams in this order
    a.audio(LOUD)
    b.audio(LOUD)
    w.step()
    assert Witness.seen == [delivered_before_b]
    assert [cmd.type for cmd in a.commands()] == [decision.model_fields["type"].default]
    assert w.metrics.counters["urgent_commits_total"] == len(delivered_before_b)
