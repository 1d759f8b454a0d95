"""DefaultAgent decisions on generated audio: exact command sequences (no Redis)."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from piopiy_voice import contracts as c
from piopiy_voice.audio import EnergyVad, dtmf_tone, frame_bytes, silence, speech_like
from piopiy_voice.settings import Settings
from piopiy_voice.workers.agent.base import Agent, Tick, load_agent_class
from piopiy_voice.workers.agent.default import DefaultAgent, prompt

T0 = 1_000_000.0
GREETING_S = len(prompt("greeting", 8000)) / 16000


def _settings(**kw):
    base = dict(PV_SILENCE_TIMEOUT_S="2", PV_PAUSE_RESUME_AFTER_S="3", PV_MAX_CALL_S="60",
                PV_HUMAN_AGENT_NUMBER="919000000042", PIOPIY_CALLER_ID="918000000001")
    base.update(kw)
    return Settings.from_env(base)


class Sim:
    """Feeds an agent 20 ms frames with stream times; records what it decides."""

    def __init__(self, agent_cls=DefaultAgent, rate=8000, settings=None, params=None, roundtrip=False):
        self.call = c.CallStarted(call_id="call-1", gateway_id="gw", rate=rate, started_at=T0,
                                  params=params or {})
        self.settings = settings or _settings()
        self.agent = agent_cls(self.call, self.settings)
        self.rate = rate
        self.t = T0
        self.log: list[tuple[float, Any]] = []
        self.roundtrip = roundtrip
        self._emit(self.agent.on_event(self.call, self.t))

    def _emit(self, cmds):
        for cmd in cmds:
            self.log.append((round(self.t - T0, 2), cmd))
        if self.roundtrip:  # a checkpoint/restore after every event must change nothing
            state = json.loads(json.dumps(self.agent.to_state()))
            self.agent = type(self.agent).from_state(self.call, self.settings, state)

    def audio(self, pcm):
        fb = frame_bytes(self.rate)
        for i in range(0, len(pcm) - fb + 1, fb):
            self.t += 0.02
            self._emit(self.agent.on_event(c.AudioFrame(call_id="call-1", pcm=pcm[i:i + fb]), self.t))

    def silence(self, ms):
        self.audio(silence(ms, self.rate))

    def speech(self, ms, seed=1):
        self.audio(speech_like(ms, rate=self.rate, seed=seed))

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


def test_greets_then_barge_in_interrupts_on_the_vad_decision_then_replies():
    s = Sim()
    s.silence(1000)
    s.speech(1200)
    assert s.kinds() == ["cmd.play_audio:greeting", "cmd.interrupt"]
    # The Interrupt comes on the very frame where a VAD fed the same audio says speech_start.
    vad, fb = EnergyVad(8000), frame_bytes(8000)
    audio = silence(1000, 8000) + speech_like(1200, rate=8000, seed=1)
    first = next(i for i in range(len(audio) // fb)
                 if vad.process(audio[i * fb:(i + 1) * fb]) == "speech_start")
    assert s.log[1][0] == pytest.approx((first + 1) * 0.02, abs=0.001)
    assert s.log[1][0] - 1.0 <= 0.1
    s.silence(1000)
    assert s.kinds() == ["cmd.play_audio:greeting", "cmd.interrupt", "cmd.play_audio:reply"]
    greeting = s.log[0][1]
    assert greeting.rate == 8000 and greeting.pcm == prompt("greeting", 8000)


def test_no_interrupt_when_the_agent_is_not_speaking():
    s = Sim()
    s.silence(int(GREETING_S * 1000) + 500)
    s.speech(800)
    s.silence(600)
    assert s.kinds() == ["cmd.play_audio:greeting", "cmd.play_audio:reply"]


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
    s.silence(400)
    assert s.kinds() == ["cmd.play_audio:greeting", "cmd.play_audio:reprompt",
                         "cmd.interrupt", "cmd.play_audio:reply"]
    assert s.agent.reprompts == 0


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
    s.speech(600)
    s.silence(400)
    assert s.kinds()[-1] == "cmd.play_audio:reply"


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
        sim.speech(900, seed=3)
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
