"""examples/async_agent.py: its works run (no Redis) and a worker runs it end to end."""

from __future__ import annotations

import threading

import pytest

from examples_support import load_example
from piopiy_voice import contracts as c
from piopiy_voice.settings import Settings
from piopiy_voice.workers.agent.base import Cancel, Work
from piopiy_voice.workers.runtime import run_now

async_agent = load_example("async_agent")
LookupAgent = async_agent.LookupAgent

CALL = c.CallStarted(call_id="call-1", gateway_id="gw")


def _said(text):
    return c.Transcript(call_id="call-1", segment=0, text=text, final=True)


def test_answer_streams_sentence_by_sentence_and_a_lost_answer_is_asked_again(monkeypatch):
    monkeypatch.setattr(async_agent, "LOOKUP_S", 0.0)
    agent = LookupAgent(CALL, Settings.from_env({}))
    [work] = agent.on_event(_said("what is the answer"), 1.0)
    assert isinstance(work, Work) and work.id == "call-1:w1"
    spoken = []
    for done in run_now("call-1", work):
        spoken += [cmd.text for cmd in agent.on_event(done, 2.0)]
    assert spoken == ["You asked: what is the answer.", "Let me think.", "The answer is 42."]
    [again] = agent.on_event(_said("and why"), 3.0)
    [reask] = agent.on_event(c.WorkDone(call_id="call-1", work_id=again.id, name="lookup",
                                        ok=False, error="lost"), 4.0)
    assert reask.id == "call-1:w3" and reask.args == ("and why",)
    out = agent.on_event(c.PlatformEvent(call_id="call-1", event="dtmf", data={"digit": "#"}), 5.0)
    assert isinstance(out[0], Cancel) and out[0].work_id == "call-1:w3"
    assert out[1].text == "Okay, never mind."


@pytest.mark.integration
def test_a_worker_runs_the_example(r, redis_url):
    from piopiy_voice.redisconn import connect
    from piopiy_voice.workers.runner import Worker
    from workers_support import FakeGateway, wait_for

    worker = Worker(Settings.from_env({}), LookupAgent, r=connect(redis_url), worker_id="wx",
                    lease_ms=1000)
    t = threading.Thread(target=worker.run, kwargs={"max_seconds": 20}, daemon=True)
    t.start()
    try:
        gw = FakeGateway(r, "call-x")
        gw.start()
        gw.r.xadd(f"pv:call:{{call-x}}:in", c.encode(c.Transcript(call_id="call-x", segment=0,
                                                                  text="hi", final=True)))
        wait_for(lambda: len(gw.commands()) == 3, what="three sentences spoken")
    finally:
        worker.stop()
        t.join(10)
    assert [cmd.text for cmd in gw.commands()] == ["You asked: hi.", "Let me think.", "The answer is 42."]
