"""CallDriver, the worker's pure per-call core: raw entries in, Outcome out (no Redis)."""

from __future__ import annotations

import asyncio

from piopiy_voice import contracts as c
from piopiy_voice.settings import Settings
from piopiy_voice.workers.agent.base import Agent
from piopiy_voice.workers.checkpoint import Checkpoint
from piopiy_voice.workers.driver import CallDriver
from workers_support import CountingAgent

FRAME = b"\x00\x01" * 160
SETTINGS = Settings.from_env({})
CALL = c.CallStarted(call_id="call-1", seq=1, gateway_id="gw1", started_at=1000.0)


class Entries:
    """Stream entries as redis-py returns them: (id, {bytes: bytes})."""

    def __init__(self):
        self.ms = 1_000_000

    def __call__(self, *msgs):
        out = []
        for m in msgs:
            self.ms += 20
            f = m if isinstance(m, dict) else c.encode(m)
            out.append((f"{self.ms}-0".encode(),
                        {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in f.items()}))
        return out


def audio(seq):
    return c.audio_fields("call-1", seq, FRAME)


def test_dedup_gaps_poison_and_agent_failures_become_an_outcome():
    drv, out = CallDriver.start(CountingAgent, SETTINGS, CALL, "w1")
    assert out.notes == [("worker.owned", {"worker": "w1"})] and out.dirty
    e = Entries()
    out = drv.feed(e(*[audio(s) for s in range(2, 11)]), wall=2000.0)
    assert out.entries == 9 and out.commands == [] and drv.ckpt.runtime["seq"] == 10
    bad = {"type": "audio", "v": "1", "call_id": "call-1", "seq": "11", "pcm": b"\x01\x02\x03"}
    out = drv.feed(e(audio(10), audio(9), bad, c.PlatformEvent(call_id="call-1", seq=12, event="boom"),
                     audio(15)), wall=2000.0)
    assert [d.reason.split(":")[0] for d in out.dead_letters] == ["decode failed", "agent raised"]
    assert out.dead_letters[1].type == "platform.event"
    assert out.skipped == 2 and out.notes[0][0] == "worker.skipped"  # 13 and 14 never came
    assert [cmd.text for cmd in out.commands] == ["10:15"]
    cmd = out.commands[0]
    assert (cmd.command_id, cmd.seq, cmd.issued_by) == ("call-1:1", 1, "worker:w1")
    assert drv.pending == out.commands
    ck = drv.checkpoint()
    assert ck.state == {"frames": 10} and ck.cmd_seq == 1 and ck.last_id == e.ms.__str__() + "-0"
    drv.committed()
    assert drv.pending == [] and not drv.dirty


def test_a_later_call_started_moves_the_commands_and_call_ended_ends():
    drv, _ = CallDriver.start(CountingAgent, SETTINGS, CALL, "w1")
    e = Entries()
    moved = c.CallStarted(call_id="call-1", seq=2, gateway_id="gw2")
    ended = c.CallEnded(call_id="call-1", seq=4, reason="hangup")
    out = drv.feed(e(moved, audio(3), ended, audio(5)), wall=0.0)
    assert drv.call.gateway_id == "gw2"
    assert out.ended and drv.ended and out.entries == 3  # nothing after the end
    assert drv.checkpoint().done


async def _slow(x):
    await asyncio.sleep(10)
    return x


class Asker(Agent):
    """Asks a work on the start and on every "ask"; speaks every result."""

    _FIELDS = ("seen",)

    def __init__(self, call, settings):
        super().__init__(call, settings)
        self.seen = []

    def on_event(self, event, now):
        if isinstance(event, c.CallStarted) or (isinstance(event, c.PlatformEvent)
                                                and event.event == "ask"):
            return [self.work("think", _slow, 1, timeout_s=5)]
        if isinstance(event, c.PlatformEvent) and event.event == "stop":
            return [self.cancel(f"{self.call.call_id}:w1")]
        if isinstance(event, c.WorkDone):
            self.seen.append([event.work_id, event.ok, event.error, event.value])
            return [self.command(c.Speak, text=f"{event.work_id}:{event.error or event.value}")]
        return []


def _done(work_id, **kw):
    return c.WorkDone(call_id="call-1", work_id=work_id, name="think", **kw)


def test_works_are_started_tracked_in_the_checkpoint_and_their_results_delivered_once():
    drv, out = CallDriver.start(Asker, SETTINGS, CALL, "w1")
    assert [w.id for w in out.works] == ["call-1:w1"] and out.commands == []
    assert drv.checkpoint().runtime["works"] == {"call-1:w1": "think"}
    assert drv.checkpoint().runtime["work_n"] == 1
    e = Entries()
    out = drv.feed(e(c.PlatformEvent(call_id="call-1", seq=2, event="stop"),
                     _done("call-1:w1", final=False, value="part"),
                     _done("call-1:w1", value=None),
                     _done("call-1:w1", value="again"),  # a replayed run's duplicate
                     _done("call-1:w9", value="stranger")), wall=0.0)
    assert out.cancels == ["call-1:w1"]
    assert [cmd.text for cmd in out.commands] == ["call-1:w1:part", "call-1:w1:None"]
    assert out.ignored == 2 and [d.work_id for d in out.finished] == ["call-1:w1"]
    assert drv.checkpoint().runtime["works"] == {}


def test_after_a_takeover_works_without_a_final_result_are_lost_once_caught_up():
    drv, _ = CallDriver.start(Asker, SETTINGS, CALL, "w1")
    drv.feed(Entries()(c.PlatformEvent(call_id="call-1", seq=2, event="ask")), wall=0.0)
    ck = drv.checkpoint()
    assert set(ck.runtime["works"]) == {"call-1:w1", "call-1:w2"}
    saved = Checkpoint(call_id="call-1", last_id=ck.last_id, cmd_seq=ck.cmd_seq, state=ck.state,
                       runtime=dict(ck.runtime, works=dict(ck.runtime["works"])), owner="w1")
    new, out, kind = CallDriver.resume(Asker, SETTINGS, CALL, saved, "w2")
    assert kind == "crash" and out.notes[0][0] == "worker.claimed"
    assert new.suspects == {"call-1:w1", "call-1:w2"}
    # The dead worker's runtime got w2's result out before it died.
    e = Entries()
    e.ms = 2_000_000
    out = new.feed(e(_done("call-1:w2", value="ok")), wall=0.0)
    assert [cmd.text for cmd in out.commands] == ["call-1:w2:ok"]
    out = new.caught_up(wall=5.0)
    assert out.notes == [("worker.work_lost", {"work_id": "call-1:w1", "name": "think"})]
    assert [cmd.text for cmd in out.commands] == ["call-1:w1:lost"]
    assert new.caught_up(wall=6.0) is None
    # Its late result (it cannot come: fenced) would be ignored; new works get new ids.
    out = new.feed(e(_done("call-1:w1", value="late"),
                     c.PlatformEvent(call_id="call-1", seq=3, event="ask")), wall=0.0)
    assert out.ignored == 1 and [w.id for w in out.works] == ["call-1:w3"]


def test_ticks_and_orphan_end():
    class Timer(CountingAgent):
        def next_wakeup(self):
            return 50.0

        def on_event(self, event, now):
            if event.type == "tick":
                return [self.command(c.Hangup)]
            return super().on_event(event, now)

    drv, _ = CallDriver.start(Timer, SETTINGS, CALL, "w1")
    assert drv.tick(10.0) is None
    out = drv.tick(60.0)
    assert [cmd.type for cmd in out.commands] == ["cmd.hangup"]
    out = drv.end_orphan(70.0)
    assert out.ended and out.commands == [] and drv.pending == []


class _Speaker(Agent):
    """Speaks on every marked frame, interrupts on a platform event "barge"."""

    def on_event(self, event, now):
        if isinstance(event, c.AudioFrame) and event.pcm[:2] == b"\x7f\x7f":
            return [self.command(c.Speak, text=f"reply:{event.seq}")]
        if isinstance(event, c.PlatformEvent) and event.event == "barge":
            return [self.command(c.Interrupt)]
        return []


def _resumed(stale_ms, ckpt=None):
    settings = Settings.from_env({"PV_STALE_COMMAND_MS": str(stale_ms)})
    ckpt = ckpt or Checkpoint(call_id="call-1", last_id="999999-0", runtime={"seq": 1},
                              state={}, owner="dead")
    drv, _out, kind = CallDriver.resume(_Speaker, settings, CALL, ckpt, "w2")
    return drv, kind


def test_replayed_stale_audio_is_suppressed_state_changes_kept_until_caught_up():
    """A reply started and interrupted within 0.5 s before the takeover: the
    new owner replays both entries 2 s late; it must not speak the reply, but
    it keeps the interrupt (a state change) and numbers only what it sends."""
    drv, kind = _resumed(500)
    assert kind == "crash" and drv.replaying
    e = Entries()
    entries = e(c.AudioFrame(call_id="call-1", seq=2, pcm=b"\x7f\x7f" + FRAME[2:]),
                c.PlatformEvent(call_id="call-1", seq=3, event="barge"))
    wall = e.ms / 1000 + 2.0  # both entries are 2 s old when replayed
    out = drv.feed(entries, wall)
    assert [cmd.type for cmd in out.commands] == ["cmd.interrupt"]
    assert out.commands[0].command_id == "call-1:1"  # suppressed commands take no number
    assert out.stale == 1
    assert [n for n, _ in out.notes] == ["worker.stale_suppressed"]
    # A fresh entry during the replay (younger than the bound) is spoken.
    fresh = e(c.AudioFrame(call_id="call-1", seq=4, pcm=b"\x7f\x7f" + FRAME[2:]))
    out = drv.feed(fresh, e.ms / 1000 + 0.1)
    assert [cmd.text for cmd in out.commands] == ["reply:4"]
    # Caught up: the replay is over, nothing is suppressed any more, however late.
    drv.caught_up(e.ms / 1000)
    assert not drv.replaying
    out = drv.feed(e(c.AudioFrame(call_id="call-1", seq=5, pcm=b"\x7f\x7f" + FRAME[2:])),
                   e.ms / 1000 + 5.0)
    assert [cmd.text for cmd in out.commands] == ["reply:5"] and out.stale == 0


def test_stale_bound_zero_sends_everything_and_new_calls_never_suppress():
    drv, _ = _resumed(0)
    e = Entries()
    out = drv.feed(e(c.AudioFrame(call_id="call-1", seq=2, pcm=b"\x7f\x7f" + FRAME[2:])),
                   e.ms / 1000 + 10)
    assert [cmd.text for cmd in out.commands] == ["reply:2"]
    drv, _ = CallDriver.start(_Speaker, SETTINGS, CALL, "w1")
    assert not drv.replaying
    out = drv.feed(e(c.AudioFrame(call_id="call-1", seq=2, pcm=b"\x7f\x7f" + FRAME[2:])),
                   e.ms / 1000 + 10)
    assert [cmd.text for cmd in out.commands] == ["reply:2"]


def test_a_done_checkpoint_announced_again_resumes_the_same_agent_state():
    """The socket dropped (the old gateway ended the call) and came back: the
    worker resumes from the done checkpoint with the agent's state, not anew."""
    drv, _ = CallDriver.start(CountingAgent, SETTINGS, CALL, "w1")
    e = Entries()
    drv.feed(e(*[audio(s) for s in range(2, 14)]), e.ms / 1000)
    drv.feed(e(c.CallEnded(call_id="call-1", seq=14, reason="platform_closed")), e.ms / 1000)
    ckpt = drv.checkpoint()
    assert ckpt.done and ckpt.state == {"frames": 12}
    again, out, kind = CallDriver.resume(CountingAgent, SETTINGS, CALL, ckpt, "w2")
    assert kind == "reconnect" and not again.ended and not again.ckpt.done
    assert out.notes[0][1]["after"] == "reconnect"
    fed = again.feed(e(*[audio(s) for s in range(15, 23)]), e.ms / 1000)
    assert [cmd.text for cmd in fed.commands] == ["20:22"]  # frame 20 counted across the drop
    assert again.ckpt.cmd_seq == 2 and fed.commands[0].command_id == "call-1:2"


def test_frames_heard_ahead_in_a_batch_change_no_decision():
    """``hear_ahead`` (the worker's VAD batch across calls) is a speed hook: a
    conversation fed with it decides exactly what it decides without it, and
    its loud frames really went through the batch."""
    import numpy as np

    from piopiy_voice.speech.tts import EspeakSynthesizer
    from piopiy_voice.speech.vad import VoicingBatch
    from piopiy_voice.workers.agent.default import DefaultAgent

    speech = EspeakSynthesizer().synthesize_sync("Wait, I have another question for you.", 8000)
    pcm = np.frombuffer(speech, "<i2")
    frames = [b"\0" * 320] * 50 + [pcm[i:i + 160].tobytes() for i in range(0, pcm.size - 159, 160)]
    frames += [b"\0" * 320] * 60
    plain, _ = CallDriver.start(DefaultAgent, SETTINGS, CALL, "w1")
    ahead, _ = CallDriver.start(DefaultAgent, SETTINGS, CALL, "w1")
    batch = VoicingBatch()
    e1, e2 = Entries(), Entries()
    got, want, scored = [], [], 0
    for i in range(0, len(frames), 3):   # three frames a turn
        turn = [c.audio_fields("call-1", 2 + j, f) for j, f in enumerate(frames[i:i + 3], start=i)]
        want += [(cmd.type, cmd.command_id) for cmd in plain.feed(e1(*turn), wall=2000.0).commands]
        entries = e2(*turn)
        ahead.hear_ahead(entries, batch)
        scored += batch.run()
        got += [(cmd.type, cmd.command_id) for cmd in ahead.feed(entries, wall=2000.0).commands]
    assert ("cmd.interrupt", "call-1:2") in want   # the caller talked over the greeting
    assert got == want
    assert ahead.checkpoint().state == plain.checkpoint().state
    assert scored >= 40
