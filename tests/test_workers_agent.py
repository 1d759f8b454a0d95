"""DefaultAgent decisions on generated audio: exact command sequences (no Redis).

Works the agent asks for (synthesis) are run here with asyncio and their
``WorkDone`` results fed back at once (``Sim(run_works=False)`` keeps them
pending for the test to run), with a fake synthesizer: fast and deterministic.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import sys
from typing import Any

import pytest

from piopiy_voice import contracts as c
from piopiy_voice.audio import dtmf_tone, frame_bytes, silence, speech_like
from piopiy_voice.settings import Settings
from piopiy_voice.workers.agent.base import Agent, Cancel, Tick, Work, load_agent_class
from piopiy_voice.workers.agent.conversation import Ears
from piopiy_voice.workers.agent.default import DefaultAgent, prompt

T0 = 1_000_000.0
GREETING_S = len(prompt("greeting", 8000)) / 16000


def _settings(**kw):
    base = dict(PV_SILENCE_TIMEOUT_S="2", PV_PAUSE_RESUME_AFTER_S="3", PV_MAX_CALL_S="60",
                PV_HUMAN_AGENT_NUMBER="919000000042", PIOPIY_CALLER_ID="918000000001")
    base.update(kw)
    return Settings.from_env(base)


class FakeSynth:
    """60 ms of audio per character; ``fail`` raises, ``garbage`` returns odd bytes."""

    name = "fake"

    def __init__(self, fail: bool = False, garbage: bool = False):
        self.fail, self.garbage, self.texts = fail, garbage, []

    async def synthesize(self, text: str, rate: int) -> bytes:
        self.texts.append(text)
        if self.fail:
            raise RuntimeError("synthesizer exploded")
        if self.garbage:
            return b"\x01"
        return b"\x01\x00" * int(rate * 0.06 * len(text))


def _done(work: Work, item: Any, final: bool, index: int) -> c.WorkDone:
    value, pcm = item, b""
    if isinstance(item, tuple):
        value, pcm = item
    elif isinstance(item, bytes):
        value, pcm = None, item
    return c.WorkDone(call_id="call-1", work_id=work.id, name=work.name, final=final, index=index,
                      value=value, pcm=pcm)


def run_work(work: Work) -> list[c.WorkDone]:
    """What the agent runtime would deliver for ``work`` (no Redis, no thread).

    Sim's clock is virtual and a work's results come back all at once, so a
    reply's synthesis is not paced to playback here (``lead_s`` 0); pacing
    has its own tests in real time (``test_agent_pacing.py``)."""
    kwargs = {**work.kwargs, "lead_s": 0.0} if "lead_s" in work.kwargs else work.kwargs

    async def go() -> list[c.WorkDone]:
        out: list[c.WorkDone] = []
        if inspect.isasyncgenfunction(work.fn):
            async for item in work.fn(*work.args, **kwargs):
                out.append(_done(work, item, False, len(out)))
            out.append(_done(work, None, True, len(out)))
        elif inspect.iscoroutinefunction(work.fn):
            out.append(_done(work, await work.fn(*work.args, **kwargs), True, 0))
        else:
            out.append(_done(work, work.fn(*work.args, **kwargs), True, 0))
        return out

    async def bounded() -> list[c.WorkDone]:
        try:
            return await asyncio.wait_for(go(), work.timeout_s)
        except asyncio.TimeoutError:
            return [c.WorkDone(call_id="call-1", work_id=work.id, name=work.name, ok=False,
                               error="timeout")]
        except Exception as exc:  # noqa: BLE001 - the runtime reports any failure
            return [c.WorkDone(call_id="call-1", work_id=work.id, name=work.name, ok=False,
                               error=f"{type(exc).__name__}: {exc}")]
    return asyncio.run(bounded())


class Sim:
    """Feeds an agent 20 ms frames with stream times; records what it decides."""

    def __init__(self, agent_cls=DefaultAgent, rate=8000, settings=None, params=None, roundtrip=False,
                 synth=None, run_works=True):
        self.call = c.CallStarted(call_id="call-1", gateway_id="gw", rate=rate, started_at=T0,
                                  params=params or {})
        self.settings = settings or _settings()
        self.synth = synth or FakeSynth()
        self.agent = agent_cls(self.call, self.settings)
        self.agent.SYNTHESIZER = self.synth
        self.rate = rate
        self.t = T0
        self.log: list[tuple[float, Any]] = []
        self.works: list[Work] = []      # every work asked for
        self.pending: list[Work] = []    # not run yet (run_works=False)
        self.cancels: list[str] = []
        self.roundtrip = roundtrip
        self.run_works = run_works
        self._emit(self.agent.on_event(self.call, self.t))

    def _emit(self, cmds):
        later = []
        for cmd in cmds:
            if isinstance(cmd, Work):
                self.works.append(cmd)
                (later if self.run_works else self.pending).append(cmd)
            elif isinstance(cmd, Cancel):
                self.cancels.append(cmd.work_id)
            else:
                self.log.append((round(self.t - T0, 2), cmd))
        if self.roundtrip:  # a checkpoint/restore after every event must change nothing
            state = json.loads(json.dumps(self.agent.to_state()))
            vad = self.agent.ears.vad
            self.agent = type(self.agent).from_state(self.call, self.settings, state)
            self.agent.SYNTHESIZER = self.synth
            # speech.vad engines keep adaptive memory (1.5 s of levels, pitch history)
            # with no to_state: after a real takeover it is re-learnt in a few frames.
            # Everything else must survive the JSON round trip exactly.
            self.agent.ears.vad = vad
        for work in later:
            self.finish(work)

    def finish(self, work: Work, results=None):
        """Deliver a work's results (by default: run it now)."""
        if work in self.pending:
            self.pending.remove(work)
        for ev in (run_work(work) if results is None else results):
            self.event(ev)

    def audio(self, pcm):
        fb = frame_bytes(self.rate)
        for i in range(0, len(pcm) - fb + 1, fb):
            self.t += 0.02
            self._emit(self.agent.on_event(c.AudioFrame(call_id="call-1", pcm=pcm[i:i + fb]), self.t))

    def silence(self, ms):
        self.audio(silence(ms, self.rate))

    def speech(self, ms, seed=1):
        self.audio(speech_like(ms, rate=self.rate, seed=seed))

    def said(self, text, segment=0):
        """The transcriber's final for the caller's last segment."""
        self.event(c.Transcript(call_id="call-1", segment=segment, text=text, final=True))

    def turn(self, text, ms=900, seed=1, after_ms=600):
        """The caller says ``text``: speech, the hangover, then its final transcript."""
        self.speech(ms, seed=seed)
        self.silence(after_ms)
        self.said(text)

    def key(self, k):
        self.audio(dtmf_tone(k, ms=100, rate=self.rate))

    def event(self, ev):
        self._emit(self.agent.on_event(ev, self.t))

    def tick(self, at_offset):
        self.t = T0 + at_offset
        self._emit(self.agent.on_event(Tick(), self.t))

    def kinds(self):
        out = []
        for _, cmd in self.log:
            name = cmd.type
            if cmd.type == "cmd.play_audio":
                name += ":" + cmd.utterance_id.split(":")[1]
            out.append(name)
        return out

    def texts(self):
        return [cmd.text for _, cmd in self.log if cmd.type in ("cmd.play_audio", "cmd.speak")]


def test_greets_then_barge_in_interrupts_on_the_vad_decision_then_replies():
    s = Sim()
    s.silence(1000)
    s.speech(1200)
    assert s.kinds() == ["cmd.play_audio:greeting", "cmd.interrupt"]
    # The Interrupt comes on the very frame where the same VAD + turn detector fed the
    # same audio says speech_start.
    ears, fb = Ears("energy", 8000, 80, 400), frame_bytes(8000)
    audio = silence(1000, 8000) + speech_like(1200, rate=8000, seed=1)
    first = next(i for i in range(len(audio) // fb)
                 if ears.process(audio[i * fb:(i + 1) * fb]) == "speech_start")
    assert s.log[1][0] == pytest.approx((first + 1) * 0.02, abs=0.001)
    assert s.log[1][0] - 1.0 <= 0.15
    s.silence(600)
    assert s.kinds() == ["cmd.play_audio:greeting", "cmd.interrupt"]  # waiting for the words
    s.said("what are your opening hours")
    assert s.kinds() == ["cmd.play_audio:greeting", "cmd.interrupt", "cmd.play_audio:say"]
    assert "open Monday to Friday" in s.log[-1][1].text
    assert s.synth.texts == [s.log[-1][1].text]
    greeting = s.log[0][1]
    assert greeting.rate == 8000 and greeting.pcm == prompt("greeting", 8000)


def test_no_interrupt_when_the_agent_is_not_speaking():
    s = Sim()
    s.silence(int(GREETING_S * 1000) + 500)
    s.turn("hello")
    # One PlayAudio per sentence of the reply, each with its own utterance id.
    assert s.kinds() == ["cmd.play_audio:greeting"] + ["cmd.play_audio:say"] * 3
    assert s.texts()[1:] == ["Hello!", "I can tell you our opening hours, check on an order, or "
                             "connect you to a person.", "What would you like?"]
    assert len({cmd.utterance_id for _, cmd in s.log}) == 4


def test_silence_reprompts_then_says_goodbye_and_hangs_up():
    s = Sim()
    s.silence(20_000)
    assert s.kinds() == ["cmd.play_audio:greeting", "cmd.play_audio:reprompt",
                         "cmd.play_audio:goodbye", "cmd.hangup"]
    t_reprompt = s.log[1][0]
    assert t_reprompt == pytest.approx(GREETING_S + 0.3 + 2.0, abs=0.03)
    assert s.agent.next_wakeup() is None


def test_goodbye_playout_finished_triggers_hangup_at_once():
    s = Sim(settings=_settings(PV_MAX_CALL_S="5"))
    s.silence(5000)
    assert s.kinds() == ["cmd.play_audio:greeting", "cmd.interrupt", "cmd.play_audio:goodbye"]
    goodbye = s.log[-1][1]
    s.event(c.Playout(call_id="call-1", utterance_id=goodbye.utterance_id, state="finished"))
    assert s.kinds()[-1] == "cmd.hangup"
    s.silence(5000)
    assert s.kinds().count("cmd.hangup") == 1


def test_caller_speech_resets_the_reprompt():
    s = Sim()
    s.silence(int((GREETING_S + 0.3 + 2.1) * 1000))
    s.speech(700)
    s.silence(1700)  # no transcript within the wait: unintelligible
    assert s.kinds() == ["cmd.play_audio:greeting", "cmd.play_audio:reprompt",
                         "cmd.interrupt", "cmd.play_audio:sorry"]
    assert s.agent.reprompts == 0 and s.agent.unintelligible == 1


def test_handoff_key_transfers_and_switches_to_monitoring():
    s = Sim(params={"caller_id": "918000000099"})
    s.silence(500)
    s.key("0")
    assert s.kinds() == ["cmd.play_audio:greeting", "cmd.interrupt", "cmd.play_audio:hold",
                         "cmd.play_music", "cmd.transfer"]
    transfer = s.log[-1][1]
    assert transfer.to == ["919000000042"] and transfer.caller_id == "918000000099"
    assert s.log[-2][1].file == "hold_music.wav"
    before = s.agent.caller_speech_ms
    s.silence(500)
    s.speech(2000)
    s.silence(30_000)  # no reprompt, no goodbye: a human has the call
    assert len(s.log) == 5
    assert s.agent.mode == "monitoring" and s.agent.caller_speech_ms > before + 1500


def test_rejected_transfer_brings_the_agent_back_with_its_timers():
    """A bridge the gateway refuses must not leave the caller on hold music
    with nobody coming: music cut, an apology, and the conversation (silence
    reprompt, the call's length limit) goes on."""
    s = Sim()
    s.silence(500)
    s.key("0")
    transfer = s.log[-1][1]
    assert s.agent.mode == "monitoring"
    s.event(c.CommandResult(call_id="call-1", command_id=transfer.command_id, command="cmd.transfer",
                            status="rejected", reason="to: not a phone number"))
    assert s.kinds()[-2:] == ["cmd.interrupt", "cmd.play_audio:trouble"]
    assert s.agent.mode == "conversation"
    assert s.agent.failure_kinds == {"transfer_rejected": 1}
    n = len(s.log)
    wake = s.agent.next_wakeup()  # the silence timer, counted from the apology's end
    assert wake is not None
    s.silence(int((wake - s.t + 1) * 1000))
    assert "cmd.play_audio:reprompt" in s.kinds()[n:]  # timers run again


def test_handoff_caller_id_falls_back_to_settings():
    s = Sim()
    s.silence(int(GREETING_S * 1000) + 500)
    s.key("0")
    assert s.kinds()[1:] == ["cmd.play_audio:hold", "cmd.play_music", "cmd.transfer"]
    assert s.log[-1][1].caller_id == "918000000001"


def test_pause_key_pauses_and_the_timer_resumes():
    s = Sim()
    s.silence(int(GREETING_S * 1000) + 500)
    s.key("*")
    assert s.kinds() == ["cmd.play_audio:greeting", "cmd.pause"]
    paused_at = s.t - T0
    s.speech(200)  # frames still in flight: ignored
    wake = s.agent.next_wakeup()
    assert wake == pytest.approx(T0 + paused_at - 0.08 + 3.0, abs=0.05)
    s.tick(wake - T0 - 0.5)
    assert s.kinds()[-1] == "cmd.pause"
    s.tick(wake - T0)
    assert s.kinds() == ["cmd.play_audio:greeting", "cmd.pause", "cmd.resume"]
    s.turn("is my order on its way", ms=600)
    assert s.kinds()[-1] == "cmd.play_audio:say"


def test_external_resume_ends_the_pause_without_a_command():
    s = Sim()
    s.silence(int(GREETING_S * 1000) + 500)
    s.key("*")
    s.event(c.CommandResult(call_id="call-1", command_id="cli-1", command="cmd.resume",
                            status="applied"))
    assert s.agent.mode == "conversation"
    s.tick(s.t - T0 + 10)
    assert "cmd.resume" not in s.kinds()


def test_dtmf_tone_is_not_a_turn_and_other_keys_are_only_noted():
    s = Sim()
    s.silence(int(GREETING_S * 1000) + 500)
    s.key("5")
    s.silence(600)
    assert s.kinds() == ["cmd.play_audio:greeting"]
    assert s.agent.keys == ["5"]


def test_a_question_asked_after_a_key_between_turns_is_answered():
    # Regression (found by bench/system_bench.py): a key pressed while the caller
    # was silent marked the NEXT speech turn as the key's own, so the question
    # asked after it was never answered.
    for press in (False, True):
        s = Sim()
        s.silence(int(GREETING_S * 1000) + 500)
        if press:
            s.key("5")
        s.silence(800)
        s.speech(900)
        s.said("what are your opening hours")
        s.silence(700)
        assert s.kinds()[1:] == ["cmd.play_audio:say"], (press, s.kinds())
    assert s.agent.keys == ["5"]


def test_max_call_duration_says_goodbye_and_hangs_up():
    s = Sim(settings=_settings(PV_MAX_CALL_S="12", PV_SILENCE_TIMEOUT_S="100"))
    s.silence(int(GREETING_S * 1000) + 500)
    s.speech(8000)  # still talking when the limit comes
    assert s.kinds() == ["cmd.play_audio:greeting", "cmd.play_audio:goodbye"]
    assert s.log[1][0] == pytest.approx(12.0, abs=0.021)
    s.silence(4000)
    assert s.kinds()[-1] == "cmd.hangup"


def test_sixteen_khz_call_plays_prompts_at_its_rate():
    s = Sim(rate=16000)
    s.silence(300)
    greeting = s.log[0][1]
    assert greeting.rate == 16000
    assert abs(len(greeting.pcm) - 2 * len(prompt("greeting", 8000))) <= 4


def test_checkpoint_after_every_event_changes_no_decision():
    def script(sim):
        sim.silence(2000)
        sim.turn("hello there", seed=3)
        sim.silence(1500)
        sim.key("*")
        sim.tick(sim.t - T0 + 3.5)
        sim.silence(12_000)
    plain, restored = Sim(), Sim(roundtrip=True)
    script(plain)
    script(restored)
    assert plain.kinds() == restored.kinds()
    assert [t for t, _ in plain.log] == [t for t, _ in restored.log]
    assert len(plain.log) >= 6


def test_call_ended_stops_all_decisions():
    s = Sim()
    s.event(c.CallEnded(call_id="call-1", reason="platform_closed"))
    s.silence(20_000)
    assert s.kinds() == ["cmd.play_audio:greeting"]


def test_load_agent_class_rejects_bad_specs():
    assert load_agent_class("piopiy_voice.workers.agent.default:DefaultAgent") is DefaultAgent
    for spec, msg in [("nocolon", "package.module:Class"), ("a:b:c", "package.module:Class"),
                      ("no_such_mod_xyz:X", "cannot be imported"),
                      ("piopiy_voice.workers.agent.default:Nope", "no attribute"),
                      ("piopiy_voice.workers.agent.default:prompt", "not a subclass")]:
        with pytest.raises(ValueError, match=msg):
            load_agent_class(spec)
    assert issubclass(DefaultAgent, Agent)


def test_load_agent_class_finds_a_module_in_the_current_directory(tmp_path, monkeypatch):
    # `piopiy-voice worker --agent mypkg.agents:Echo` run from the folder holding mypkg:
    # the console script does not put the current directory on sys.path.
    (tmp_path / "pv_cwd_pkg").mkdir()
    (tmp_path / "pv_cwd_pkg" / "__init__.py").write_text("")
    (tmp_path / "pv_cwd_pkg" / "agents.py").write_text(
        "from piopiy_voice.workers.agent.base import Agent\n\nclass Echo(Agent):\n    pass\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "pv_cwd_pkg", raising=False)
    monkeypatch.delitem(sys.modules, "pv_cwd_pkg.agents", raising=False)
    assert load_agent_class("pv_cwd_pkg.agents:Echo").__name__ == "Echo"


def test_ears_take_the_frame_level_from_the_energy_vad_and_measure_it_for_others():
    from piopiy_voice.audio.pcm import rms_dbfs

    import importlib.util

    pcm = speech_like(200, rate=8000, seed=3)[:320]
    engines = ["energy"] + (["webrtc"] if importlib.util.find_spec("webrtcvad") else [])
    for vad in engines:  # webrtc (no level of its own) is an optional extra
        ears = Ears(vad, 8000, 80, 400)
        ears.process(pcm)
        assert ears.level_db == pytest.approx(rms_dbfs(pcm), abs=1e-3)
