"""Synthesis paced to playback (``workers.agent.voice.PlaybackPacer``), in real time.

The pacer's arithmetic is fed directly; the works (``say_sentences`` and the
model's ``reply_stream``) run on a real event loop with a synthesizer that
records when it was asked, because pacing is about wall time.
"""

from __future__ import annotations

import asyncio

import pytest

from fake_openai import FakeOpenAI, Reply
from piopiy_voice.speech.config import SpeechConfig, SpeechConfigError
from piopiy_voice.speech.llm import ChatClient, LlmConfig
from piopiy_voice.workers.agent.config import AgentConfig
from piopiy_voice.workers.agent.default import SAY_PACED_S, DefaultAgent
from piopiy_voice.workers.agent.history import SPEAK_S_PER_CHAR
from piopiy_voice.workers.agent.llm import LlmAgent, reply_stream
from piopiy_voice.workers.agent.voice import PlaybackPacer, say_sentences, speech_s
from test_workers_agent import GREETING_S, Sim

RATE = 8000


class ClockedSynth:
    """``seconds`` of audio per sentence; records (loop time, text) per request."""

    name = "clocked"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.asked: list[tuple[float, str]] = []

    async def synthesize(self, text: str, rate: int) -> bytes:
        self.asked.append((asyncio.get_running_loop().time(), text))
        return b"\x01\x00" * int(rate * self.seconds)


# ------------------------------------------------------------- the arithmetic

def test_the_first_sentence_goes_at_once_the_next_lead_s_before_the_audio_runs_out():
    p = PlaybackPacer(lead_s=1.5, pace_until=100.0)
    assert p.wait_s(10.0) == 0.0
    p.handed_on(3.0, 10.0)                     # plays 10.0 .. 13.0
    assert p.wait_s(10.1) == pytest.approx(1.4)
    assert p.wait_s(11.5) == 0.0 and p.wait_s(12.0) == 0.0
    p.handed_on(2.0, 11.5)                     # queued behind the first: plays 13.0 .. 15.0
    assert p.plays_until == pytest.approx(15.0)
    assert p.wait_s(11.6) == pytest.approx(1.9)


def test_audio_handed_on_after_the_last_played_out_starts_from_now():
    p = PlaybackPacer(lead_s=1.0, pace_until=100.0)
    p.handed_on(1.0, 10.0)
    p.handed_on(1.0, 20.0)                     # a silence in between: no credit for it
    assert p.plays_until == pytest.approx(21.0)


def test_no_pacing_with_lead_zero_or_past_the_deadline():
    off = PlaybackPacer(lead_s=0.0, pace_until=100.0)
    off.handed_on(30.0, 10.0)
    assert off.wait_s(10.0) == 0.0
    capped = PlaybackPacer(lead_s=1.0, pace_until=12.0)
    capped.handed_on(30.0, 10.0)
    assert capped.wait_s(10.0) == pytest.approx(2.0)   # waits only until pace_until
    assert capped.wait_s(12.5) == 0.0


def test_speech_length_from_pcm_or_for_the_platforms_speak_from_the_text():
    assert speech_s("hello", b"\x00\x00" * 4000, RATE) == pytest.approx(0.5)
    assert speech_s("hello there", b"", RATE) == pytest.approx(11 * SPEAK_S_PER_CHAR)


# ------------------------------------------------------------ the works, timed

def _run(gen_factory, cancel_after_s: float | None = None) -> list:
    async def go():
        items = []

        async def consume():
            async for item in gen_factory():
                items.append((asyncio.get_running_loop().time(), item))
        task = asyncio.create_task(consume())
        if cancel_after_s is None:
            await task
        else:
            await asyncio.wait([task], timeout=cancel_after_s)
            task.cancel()                       # what the runtime does on a barge-in
            await asyncio.gather(task, return_exceptions=True)
        return items
    return asyncio.run(go())


def test_sentences_are_synthesized_lead_s_before_the_previous_ones_play_out():
    synth = ClockedSynth(1.0)
    items = _run(lambda: say_sentences(synth, ["One.", "Two.", "Three."], RATE,
                                       lead_s=0.6, pace_for_s=30.0))
    assert [i[1][0] for i in items] == [{"say": "One."}, {"say": "Two."}, {"say": "Three."}]
    asked = [t for t, _ in synth.asked]
    handed = [t for t, _ in items]
    for k in (1, 2):
        plays_out = handed[0] + k * 1.0   # the sentences before k, back to back from the first
        # Not before lead_s ahead of when what was handed on plays out...
        assert asked[k] >= plays_out - 0.6 - 0.01
        # ...and well before it has: no gap in the reply.
        assert handed[k] < plays_out - 0.3


def test_a_barge_in_leaves_the_later_sentences_unsynthesized():
    paced, unpaced = ClockedSynth(3.0), ClockedSynth(3.0)
    sentences = ["One.", "Two.", "Three."]
    _run(lambda: say_sentences(paced, sentences, RATE, lead_s=1.0, pace_for_s=30.0),
         cancel_after_s=0.5)
    _run(lambda: say_sentences(unpaced, sentences, RATE, lead_s=0.0, pace_for_s=30.0),
         cancel_after_s=0.5)
    assert [t for _, t in paced.asked] == ["One."]
    assert [t for _, t in unpaced.asked] == sentences


def test_pacing_stops_at_its_deadline_so_a_long_reply_ends_within_the_work():
    synth = ClockedSynth(3.0)
    t0 = [0.0]

    def start():
        t0[0] = asyncio.get_running_loop().time()
        return say_sentences(synth, ["One.", "Two.", "Three."], RATE, lead_s=1.0, pace_for_s=0.3)
    _run(start)
    assert len(synth.asked) == 3
    assert synth.asked[-1][0] - t0[0] < 1.0     # unpaced: 2 s later, then 5 s later


def test_a_failing_engine_ends_the_paced_reply_with_the_failure():
    class Broken(ClockedSynth):
        async def synthesize(self, text, rate):
            if text == "Two.":
                raise RuntimeError("engine down")
            return await super().synthesize(text, rate)
    items = _run(lambda: say_sentences(Broken(0.2), ["One.", "Two.", "Three."], RATE,
                                       lead_s=0.1, pace_for_s=30.0))
    assert items[0][1][0] == {"say": "One."}
    assert items[1][1] == {"failed": "tts", "error": "RuntimeError: engine down"}
    assert len(items) == 2


@pytest.fixture
def fake():
    f = FakeOpenAI()
    yield f
    f.close()


def test_the_models_reply_is_paced_too_and_a_barge_in_stops_it(fake):
    fake.default = Reply(text="We open at nine. We close at six. Anything else?", token_delay_s=0.0)
    synth = ClockedSynth(2.0)

    async def client_stream():
        client = ChatClient(LlmConfig(base_url=fake.base_url, model="m", timeout_s=5, first_token_s=2))
        try:
            async for item in reply_stream(client, client.config, [{"role": "user", "content": "hi"}],
                                           synth, RATE, lead_s=1.0):
                yield item
        finally:
            await client.aclose()
    items = _run(client_stream, cancel_after_s=0.7)
    # The whole reply was written within ~0.1 s; only its first sentence was spoken.
    assert [t for _, t in synth.asked] == ["We open at nine."]
    assert [i[1][0] for i in items] == [{"say": "We open at nine."}]


# -------------------------------------------------- the agents ask for pacing

@pytest.mark.parametrize("lead", [0.0, 0.7])
def test_agents_pace_by_the_configured_lead(fake, lead):
    speech = SpeechConfig(tts_lead_s=lead)

    class Rules(DefaultAgent):
        CONFIG = AgentConfig(speech=speech)

    class Model(LlmAgent):
        CONFIG = AgentConfig(speech=speech, llm=LlmConfig(base_url=fake.base_url, model="m"))

    for cls, expected in ((Rules, {"lead_s": lead, "pace_for_s": SAY_PACED_S}), (Model, {"lead_s": lead})):
        s = Sim(agent_cls=cls, run_works=False)
        s.silence(int(GREETING_S * 1000) + 500)
        s.turn("what are your opening hours")
        assert s.pending and s.pending[-1].kwargs == expected


def test_the_lead_setting_is_checked():
    assert SpeechConfig.from_env({}).tts_lead_s == 1.5
    assert SpeechConfig.from_env({"PV_TTS_LEAD_S": "0"}).tts_lead_s == 0.0
    with pytest.raises(SpeechConfigError, match="PV_TTS_LEAD_S"):
        SpeechConfig.from_env({"PV_TTS_LEAD_S": "-1"})
