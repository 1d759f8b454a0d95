"""LlmAgent against the fake OpenAI-compatible server: streamed sentences, tools, fallbacks."""

from __future__ import annotations

import json

import pytest

from fake_openai import FakeOpenAI, Reply
from piopiy_voice import contracts as c
from piopiy_voice.speech.llm import LlmConfig
from piopiy_voice.workers.agent.conversation import INTERRUPTED_MARK, AgentConfig
from piopiy_voice.speech.text import SentenceSplitter
from piopiy_voice.workers.agent.llm import LlmAgent, reply_stream
from test_workers_agent import GREETING_S, FakeSynth, Sim, run_work


@pytest.fixture
def fake():
    f = FakeOpenAI()
    yield f
    f.close()


def _agent_cls(fake, **llm):
    cfg = dict(base_url=fake.base_url, model="fake-1", timeout_s=2.0, first_token_s=0.4)
    cfg.update(llm)

    class Agent(LlmAgent):
        CONFIG = AgentConfig(llm=LlmConfig(**cfg), system_prompt="Be brief.")
    return Agent


def _sim(fake, params=None, **llm):
    s = Sim(agent_cls=_agent_cls(fake, **llm), params=params)
    s.silence(int(GREETING_S * 1000) + 500)
    return s


def test_reply_sentences_cut_early_and_keep_numbers():
    # The splitter the reply stream uses (speech.text): a sentence goes to the
    # synthesiser as soon as it ends; "9.30" is not an end.
    cut = SentenceSplitter()
    assert cut.push("We open at 9.30 every") == []
    assert cut.push(" day. Call") == ["We open at 9.30 every day."]
    assert cut.push(" us! Ok") == ["Call us!"]
    assert cut.flush() == ["Ok"]


def test_reply_streams_sentence_by_sentence_first_audio_before_the_end(fake):
    fake.default = Reply(text="We open at nine every weekday. We close at six. Anything else?",
                         token_delay_s=0.05)
    s = _sim(fake)
    s.turn("when are you open")
    assert s.kinds()[1:] == ["cmd.play_audio:say"] * 3
    assert s.texts()[1:] == ["We open at nine every weekday.", "We close at six.", "Anything else?"]
    req = fake.requests[-1]
    assert req["messages"][0] == {"role": "system", "content": "Be brief."}
    assert req["messages"][-1] == {"role": "user", "content": "when are you open"}
    assert req["messages"][1]["role"] == "assistant"  # the greeting the caller heard


def test_first_sentence_is_yielded_while_the_model_is_still_writing(fake):
    fake.default = Reply(text="First sentence here. " + "slow " * 10 + "end.", token_delay_s=0.05)
    import asyncio
    import time

    from piopiy_voice.speech.llm import ChatClient

    async def go():
        client = ChatClient(LlmConfig(base_url=fake.base_url, model="m", timeout_s=3, first_token_s=1))
        t0, stamps = time.monotonic(), []
        async for item in reply_stream(client, client.config, [{"role": "user", "content": "hi"}],
                                       FakeSynth(), 8000):
            stamps.append((time.monotonic() - t0, item))
        await client.aclose()
        return stamps
    stamps = asyncio.run(go())
    assert stamps[0][1][0] == {"say": "First sentence here."}
    assert stamps[-1][0] - stamps[0][0] >= 0.35  # the rest came ~0.5 s later


def test_per_call_params_choose_prompt_model_and_temperature(fake):
    s = _sim(fake, params={"system_prompt": "You sell pizza.", "model": "big-1", "temperature": "0.9"})
    s.turn("hi")
    req = fake.requests[-1]
    assert req["model"] == "big-1" and req["temperature"] == 0.9
    assert req["messages"][0]["content"] == "You sell pizza."


@pytest.mark.parametrize("tool, kinds", [
    ("transfer_to_human", ["cmd.play_audio:say", "cmd.play_audio:hold", "cmd.play_music", "cmd.transfer"]),
    ("play_music", ["cmd.play_audio:say", "cmd.play_music"]),
])
def test_tool_calls_become_call_controls(fake, tool, kinds):
    fake.default = Reply(text="Sure, one moment please.", tool_calls=[{"name": tool, "arguments": "{}"}])
    s = _sim(fake)
    s.turn("let me talk to someone")
    assert s.kinds()[1:] == kinds
    if tool == "transfer_to_human":
        assert s.log[-1][1].to == ["919000000042"] and s.agent.mode == "monitoring"
    hist = s.agent.messages()
    i = next(i for i, m in enumerate(hist) if m.get("tool_calls"))
    assert hist[i]["tool_calls"][0]["function"]["name"] == tool
    assert hist[i + 1]["role"] == "tool" and hist[i + 1]["tool_call_id"] == "call_0"


def test_hang_up_tool_hangs_up_after_the_goodbye_played(fake):
    fake.default = Reply(text="Thanks for calling, goodbye.", tool_calls=[{"name": "hang_up"}])
    s = _sim(fake)
    s.turn("that is everything")
    # The first clause goes out on its own (early first audio): two utterances.
    assert s.texts()[1:] == ["Thanks for calling,", "goodbye."] and s.agent.mode == "ending"
    first, last = (cmd.utterance_id for kind, cmd in s.log[-2:])
    s.event(c.Playout(call_id="call-1", utterance_id=first, state="finished"))
    assert "cmd.hangup" not in s.kinds()  # not over its own goodbye
    s.event(c.Playout(call_id="call-1", utterance_id=last, state="finished"))
    assert s.kinds()[-1] == "cmd.hangup"


def test_pause_tool_pauses_after_the_instruction_and_resumes_later(fake):
    fake.default = Reply(text="Please key in your card number now.",
                         tool_calls=[{"name": "pause_for_sensitive_input"}])
    s = _sim(fake)
    s.turn("I want to pay")
    assert s.kinds()[1:] == ["cmd.play_audio:say"]  # not paused over its own instruction
    s.event(c.Playout(call_id="call-1", utterance_id=s.log[-1][1].utterance_id, state="finished"))
    assert s.kinds()[-1] == "cmd.pause" and s.agent.mode == "paused"
    s.tick(s.agent.next_wakeup() - 1_000_000.0)
    assert s.kinds()[-1] == "cmd.resume"
    # The next request is well formed: the tool call was answered.
    s.turn("done")
    assert fake.requests[-1]["messages"][-2]["role"] == "tool"


@pytest.mark.parametrize("reply, kind", [
    (Reply(first_token_delay_s=1.0), "timeout"),
    (Reply(status=500), "http"),
    (Reply(drop_after=0), "connection"),
    (Reply(bad_chunk_at=1), "protocol"),
    (Reply(text="", tool_calls=[{"name": "launch_rockets"}]), "protocol"),
    (Reply(text="", tool_calls=[{"name": "hang_up", "arguments": "{oops"}]), "protocol"),
    (Reply(text=""), "empty"),
])
def test_broken_model_replies_fall_back_to_audio_never_silence(fake, reply, kind):
    fake.default = reply
    s = _sim(fake)
    s.turn("what are your hours")
    assert s.kinds()[-1] == "cmd.play_audio:trouble"  # an apology, at once
    assert s.agent.failures == 1 and s.agent.failure_kinds == {kind: 1}
    assert s.agent.mode == "conversation"
    s.silence(6000)
    s.turn("hours please")  # a second failure in a row: a person takes over
    assert s.kinds()[-3:] == ["cmd.play_audio:hold", "cmd.play_music", "cmd.transfer"]


def test_a_failure_mid_reply_keeps_what_was_said_and_apologises(fake):
    fake.default = Reply(text="We open at nine every day. And we close at six.", drop_after=9)
    s = _sim(fake)
    s.turn("hours")
    assert s.kinds()[1:] == ["cmd.play_audio:say", "cmd.play_audio:trouble"]
    assert s.texts()[1] == "We open at nine every day."


def test_history_sent_to_the_model_holds_only_what_was_heard(fake):
    fake.default = Reply(text="We open at nine every weekday morning. We close at six.")
    sim = Sim(agent_cls=_agent_cls(fake), run_works=False)
    sim.silence(int(GREETING_S * 1000) + 500)
    sim.turn("when are you open")
    sim.finish(sim.pending[0])
    first, second = [cmd for _, cmd in sim.log[1:]]
    sim.event(c.Playout(call_id="call-1", utterance_id=first.utterance_id, state="started"))
    sim.speech(300, seed=7)  # barge-in 0.3 s into the first sentence
    total = len(first.pcm) * 1000 // 16000
    for cmd, played in ((first, total // 2), (second, 0)):
        sim.event(c.Playout(call_id="call-1", utterance_id=cmd.utterance_id, state="interrupted",
                            played_ms=played, total_ms=len(cmd.pcm) * 1000 // 16000))
    sim.silence(600)
    sim.said("and on saturday")
    sim.finish(sim.pending[-1])
    msgs = fake.requests[-1]["messages"]
    assert msgs[-2] == {"role": "assistant", "content": "We open at nine" + INTERRUPTED_MARK}
    assert msgs[-1] == {"role": "user", "content": "and on saturday"}
    assert "close at six" not in json.dumps(msgs)


def test_lost_in_a_takeover_asks_the_model_again(fake):
    sim = Sim(agent_cls=_agent_cls(fake), run_works=False)
    sim.silence(int(GREETING_S * 1000) + 500)
    sim.turn("hello")
    work = sim.pending[0]
    state = json.loads(json.dumps(sim.agent.to_state()))
    sim.agent = type(sim.agent).from_state(sim.call, sim.settings, state)
    sim.agent.SYNTHESIZER = sim.synth
    sim.finish(work, [c.WorkDone(call_id="call-1", work_id=work.id, name=work.name, ok=False,
                                 error="lost")])
    assert len(sim.pending) == 1 and sim.pending[0].id == "call-1:w2"
    for ev in run_work(sim.pending[0]):
        sim.event(ev)
    assert sim.kinds()[-1] == "cmd.play_audio:say" and len(fake.requests) == 1
