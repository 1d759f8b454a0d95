"""ConversationAgent core via DefaultAgent: intents, turn policy, honest history, failures."""

from __future__ import annotations

import pytest

from piopiy_voice import contracts as c
from piopiy_voice.workers.agent.conversation import INTERRUPTED_MARK, heard_text
from piopiy_voice.workers.agent.intents import classify
from test_workers_agent import GREETING_S, FakeSynth, Sim, T0


def _after_greeting(**kw):
    s = Sim(**kw)
    s.silence(int(GREETING_S * 1000) + 500)
    return s


@pytest.mark.parametrize("text, intent, action", [
    ("can I talk to a human please", "handoff", "handoff"),
    ("get me a real person", "handoff", "handoff"),
    ("Operator!", "handoff", "handoff"),
    ("I want a representative", "handoff", "handoff"),
    ("okay bye", "goodbye", "goodbye"),
    ("no that's all", "goodbye", "goodbye"),
    ("what are your opening hours", "hours", None),
    ("where is my order", "order_status", None),
    ("what can you do", "capabilities", None),
    ("hello", "greeting", None),
    ("the weather is nice", "other", None),
    ("", "unintelligible", None),
])
def test_intents(text, intent, action):
    got = classify(text)
    assert (got.name, got.action) == (intent, action)


def test_heard_text_is_proportional_by_word():
    assert heard_text("one two three four", None, 1000) == "one two three four"
    assert heard_text("one two three four", 1000, 1000) == "one two three four"
    assert heard_text("one two three four", 500, 1000) == "one two"
    assert heard_text("one two three four", 0, 1000) == ""


def test_asking_for_a_person_in_words_hands_off_like_the_key():
    s = _after_greeting(params={"caller_id": "918000000099"})
    s.turn("can I speak to a real person")
    assert s.kinds()[1:] == ["cmd.play_audio:hold", "cmd.play_music", "cmd.transfer"]
    assert s.log[-1][1].to == ["919000000042"] and s.agent.mode == "monitoring"
    s.turn("hello?")  # the human has the call now: we only listen
    assert len(s.log) == 4


def test_bye_says_goodbye_then_hangs_up():
    s = _after_greeting()
    s.turn("that's all, bye")
    assert s.kinds()[1:] == ["cmd.play_audio:goodbye"]
    s.event(c.Playout(call_id="call-1", utterance_id=s.log[-1][1].utterance_id, state="finished"))
    assert s.kinds()[-1] == "cmd.hangup"


def test_end_of_turn_needs_the_hangover_and_the_final_transcript():
    s = _after_greeting()
    s.speech(900)
    s.said("what are your opening hours")  # the final arrives while the VAD still hears speech
    assert s.kinds() == ["cmd.play_audio:greeting"]
    s.silence(700)  # the hangover ends the turn: both conditions met
    assert s.kinds()[-1] == "cmd.play_audio:say"
    assert s.agent.history[-2] == {"role": "user", "content": "what are your opening hours"}


def test_a_late_final_after_the_wait_is_still_answered():
    s = _after_greeting()
    s.speech(900)
    s.silence(2000)
    assert s.kinds()[-1] == "cmd.play_audio:sorry"
    s.said("where is my order")
    assert s.kinds()[-1] == "cmd.play_audio:say" and "Your order is on its way." in s.texts()


def test_barge_in_cancels_the_reply_and_history_keeps_only_what_was_heard():
    s = _after_greeting(run_works=False)
    s.turn("what can you do")
    (work,) = s.pending
    s.finish(work)  # three sentences queued for playout
    said = [cmd for _, cmd in s.log[1:]]
    assert [cmd.type for cmd in said] == ["cmd.play_audio"] * 2
    first, second = said
    s.event(c.Playout(call_id="call-1", utterance_id=first.utterance_id, state="started"))
    s.event(c.Playout(call_id="call-1", utterance_id=first.utterance_id, state="finished",
                      played_ms=1000, total_ms=1000))
    s.event(c.Playout(call_id="call-1", utterance_id=second.utterance_id, state="started"))
    s.speech(400, seed=5)  # the caller talks over the second sentence
    assert s.kinds()[-1] == "cmd.interrupt"
    total = len(second.pcm) * 1000 // 16000
    s.event(c.Playout(call_id="call-1", utterance_id=second.utterance_id, state="interrupted",
                      played_ms=total // 2, total_ms=total))
    msgs = s.agent.messages()
    words = second.text.split()
    assert msgs[-2]["role"] == "user"
    assert msgs[-1] == {"role": "assistant", "content": first.text + " " +
                        " ".join(words[:round(len(words) / 2)]) + INTERRUPTED_MARK}


def test_barge_in_while_thinking_cancels_and_merges_the_caller_turns():
    s = _after_greeting(run_works=False)
    s.turn("I would like")
    (work,) = s.pending
    s.speech(600, seed=4)  # more words before any answer was sent
    assert s.cancels == [work.id] and "cmd.interrupt" not in s.kinds()
    s.finish(work)  # its results arrive anyway: stale, ignored
    assert s.kinds() == ["cmd.play_audio:greeting"]
    s.silence(600)
    s.said("to know your hours")
    assert [m["content"] for m in s.agent.history if m["role"] == "user"] == [
        "I would like to know your hours"]


def test_unplayed_sentences_never_enter_the_history():
    s = _after_greeting(run_works=False)
    s.turn("hello")
    (work,) = s.pending
    s.finish(work)
    cmds = [cmd for _, cmd in s.log[1:]]
    assert len(cmds) == 3
    s.event(c.Playout(call_id="call-1", utterance_id=cmds[0].utterance_id, state="started"))
    s.speech(300, seed=6)
    for cmd, played in zip(cmds, (300, 0, 0)):
        s.event(c.Playout(call_id="call-1", utterance_id=cmd.utterance_id, state="interrupted",
                          played_ms=played, total_ms=len(cmd.pcm) * 1000 // 16000))
    assistant = s.agent.messages()[-1]
    assert assistant["content"].endswith(INTERRUPTED_MARK)
    assert "What would you like" not in assistant["content"]


def test_takeover_lost_reply_is_asked_again_once():
    s = _after_greeting(run_works=False)
    s.turn("where is my order")
    (work,) = s.pending
    s.finish(work, [c.WorkDone(call_id="call-1", work_id=work.id, name=work.name, ok=False,
                               error="lost")])
    assert len(s.pending) == 1 and s.pending[0].id != work.id  # re-asked
    s.finish(s.pending[0])
    assert s.kinds()[-1] == "cmd.play_audio:say" and s.agent.failures == 0


@pytest.mark.parametrize("synth, kind", [(FakeSynth(fail=True), "tts"), (FakeSynth(garbage=True), "tts")])
def test_synthesis_failure_apologises_with_a_shipped_prompt(synth, kind):
    s = _after_greeting(synth=synth)
    s.turn("what are your hours")
    assert s.kinds()[-1] == "cmd.play_audio:trouble"
    assert s.agent.failures == 1 and s.agent.failure_kinds == {kind: 1}


def test_repeated_failures_hand_off_and_a_result_that_never_comes_is_a_failure():
    s = _after_greeting(run_works=False)
    s.turn("what are your hours")
    (work,) = s.pending
    deadline = s.agent.reply_deadline
    assert s.agent.next_wakeup() <= deadline
    s.tick(deadline - T0)  # the watchdog: no WorkDone at all
    assert s.kinds()[-1] == "cmd.play_audio:trouble" and work.id in s.cancels
    s.silence(int(s.log[-1][1].pcm.__len__() / 16) + 500)
    s.turn("hours please")
    s.finish(s.pending[-1], [c.WorkDone(call_id="call-1", work_id=s.pending[-1].id, name="say",
                                        ok=False, error="timeout")])
    assert s.kinds()[-3:] == ["cmd.play_audio:hold", "cmd.play_music", "cmd.transfer"]
    assert s.agent.failures == 2 and s.agent.mode == "monitoring"
