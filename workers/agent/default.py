"""DefaultAgent: the built-in, offline conversational agent.

It exercises every control the product promises, with no models:

- greets the caller with ``workers/media/greeting.wav`` (at the call's rate);
- turn-taking by energy VAD: when the caller stops talking it answers with
  ``reply.wav``; barge-in: caller speech while it is speaking -> ``Interrupt``
  on the very VAD decision that reports ``speech_start``;
- in-band DTMF (``Settings.handoff_key``): hold notice, music on hold
  (``PlayMusic(Settings.hold_music)``), ``Transfer`` to
  ``Settings.human_agent_number`` (caller id: call param ``caller_id``, else
  ``Settings.piopiy_caller_id``, else empty), then *monitoring*: it keeps
  analysing the audio (speech time, keys) but never speaks again. The three
  commands go out together in one decision (the agent cannot know when the
  human answers): the notice is streamed audio, the music and the bridge are
  mid-call PCMO, so the caller hears the notice, then the music while the
  human's line rings; audio already queued is not cut when the human answers
  (on the sandbox the music's tail can overlap the human's first words).
- ``Settings.pause_key``: ``Pause`` so card digits never reach us; ``Resume``
  after ``Settings.pause_resume_after_s`` (a timer: no audio arrives while
  paused) or when someone else's ``cmd.resume`` is reported applied;
- silence for ``Settings.silence_timeout_s`` -> reprompt; silence again ->
  goodbye, then ``Hangup`` once the goodbye has played (playout report, or its
  duration + 0.5 s); ``Settings.max_call_s`` -> goodbye + hangup likewise.

A DTMF tone is loud, so the VAD also hears it; a "turn" that contained a key is
not answered and a tone never counts as barge-in. Time comes only from the
``now`` the runtime passes in, so the same events always give the same commands.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from piopiy_voice import contracts as c
from piopiy_voice.audio import DtmfDetector, EnergyVad, frame_bytes, read_wav, resample

from .base import Agent, Tick

MEDIA = Path(__file__).resolve().parent.parent / "media"
PROMPTS = ("greeting", "reply", "reprompt", "goodbye", "hold")
#: The gateway's playout runs a little behind our send time.
PLAYOUT_SLACK_S = 0.3
HANGUP_AFTER_GOODBYE_S = 0.5
#: VAD "speech" starting this soon after a DTMF key is the tone itself.
TONE_GUARD_S = 0.2
DTMF_MARGIN_DB = 6.0


@lru_cache(maxsize=None)
def prompt(name: str, rate: int) -> bytes:
    """A shipped prompt as PCM at ``rate`` (cached per rate)."""
    if name not in PROMPTS:
        raise ValueError(f"unknown prompt {name!r}; expected one of {PROMPTS}")
    pcm, src = read_wav(MEDIA / f"{name}.wav")
    return resample(pcm, src, rate) if src != rate else pcm


class DefaultAgent(Agent):
    def __init__(self, call, settings):
        super().__init__(call, settings)
        self.mode = "conversation"  # paused | monitoring | ending | ended
        self.vad = EnergyVad(call.rate)
        self.dtmf = DtmfDetector(call.rate)
        self.frame_len = frame_bytes(call.rate)
        self.started_at = call.started_at
        self.utt_n = 0
        self.speaking: str | None = None
        self.speaking_until = 0.0
        self.last_activity = call.started_at
        self.reprompts = 0
        self.turns = 0
        self.resume_at: float | None = None
        self.hangup_at: float | None = None
        self.goodbye: str | None = None
        self.key_at = -1e18
        self.turn_had_key = False
        self.keys: list[str] = []
        self.caller_speech_ms = 0
        self.turn_started = call.started_at

    # ---------------------------------------------------------------- events
    def on_event(self, event: Any, now: float) -> list[Any]:
        if self.mode == "ended":
            return []
        if isinstance(event, c.AudioFrame):
            return self._on_audio(event.pcm, now)
        if isinstance(event, Tick):
            return self._timers(now)
        if isinstance(event, c.CallStarted):
            self.started_at = now
            self.last_activity = now
            return self.decide("call_started", {}, now, lambda: self._say("greeting", now))
        if isinstance(event, c.Playout):
            return self._on_playout(event, now)
        if isinstance(event, c.CommandResult):
            if (event.command == "cmd.resume" and event.status == "applied"
                    and self.mode == "paused"):
                self._resumed(now)  # someone else resumed the stream
            return []
        if isinstance(event, c.PlatformEvent):
            key = str(event.data.get("digit", event.data.get("key", "")))
            if event.event == "dtmf" and len(key) == 1:
                return self._on_key(key, now)
            return []
        if isinstance(event, c.CallEnded):
            self.decide("call_ended", {"reason": event.reason}, now, list)
            self.mode = "ended"
        return []

    def _on_audio(self, pcm: bytes, now: float) -> list[Any]:
        if len(pcm) != self.frame_len or self.mode == "paused":
            return []  # frames still in flight after Pause are not ours to hear
        out: list[Any] = []
        ev = self.vad.process(pcm)
        # A frame quieter than the weakest DTMF tone cannot hold a key, and with no
        # key held such a frame would not change the detector's state: skip it
        # (about half of all frames; the detector is the costliest step).
        if self.dtmf.held is not None or self.vad.level_db >= self.dtmf.min_level_db - DTMF_MARGIN_DB:
            for key in self.dtmf.process(pcm):
                out += self._on_key(key, now)
        if self.vad.speaking:
            self.caller_speech_ms += 20
        if ev == "speech_start":
            self.turn_started = now
            if now - self.key_at > TONE_GUARD_S and self.mode == "conversation" \
                    and self._is_speaking(now):
                out.append(self.command(c.Interrupt))  # barge-in
                self.speaking = None
            self.last_activity = now
        elif ev == "speech_end":
            self.last_activity = now
            had_key, self.turn_had_key = self.turn_had_key, False
            if self.mode == "conversation" and not had_key:
                self.turns += 1
                self.reprompts = 0
                info = {"turn": self.turns, "speech_ms": round((now - self.turn_started) * 1000),
                        "caller_speech_ms_total": self.caller_speech_ms}
                out += self.decide("caller_turn", info, now, lambda: self._say("reply", now))
        timers = self._timers(now)
        if timers:
            out += timers
        return out

    def _on_key(self, key: str, now: float) -> list[Any]:
        self.keys.append(key)
        self.key_at = now
        self.turn_had_key = True
        if self.mode != "conversation":
            return []
        return self.decide("dtmf", {"key": key}, now, lambda: self._default_key(key, now))

    def _default_key(self, key: str, now: float) -> list[Any]:
        out: list[Any] = []
        s = self.settings
        if key == s.handoff_key:
            out += self._stop_speaking(now)
            out += self._say("hold", now)
            out.append(self.command(c.PlayMusic, file=self.call.params.get("hold_music", s.hold_music)))
            caller_id = self.call.params.get("caller_id") or s.piopiy_caller_id or ""
            out.append(self.command(c.Transfer, to=[s.human_agent_number], caller_id=caller_id))
            self.mode = "monitoring"
            self.speaking = None
        elif key == s.pause_key:
            out += self._stop_speaking(now)
            out.append(self.command(c.Pause))
            self.mode = "paused"
            self.resume_at = now + s.pause_resume_after_s
        return out

    def _on_playout(self, ev: c.Playout, now: float) -> list[Any]:
        if ev.utterance_id != self.speaking and ev.utterance_id != self.goodbye:
            return []
        if ev.state == "started":
            self.speaking_until = now + max(0, ev.total_ms - ev.played_ms) / 1000 + PLAYOUT_SLACK_S
            return []
        if ev.utterance_id == self.speaking:
            self.speaking = None
            self.last_activity = now
        if self.mode == "ending" and ev.utterance_id == self.goodbye:
            return self._hangup()
        return []

    # ---------------------------------------------------------------- timers
    def _timers(self, now: float) -> list[Any]:
        s = self.settings
        if self.mode == "paused" and self.resume_at is not None and now >= self.resume_at:
            self._resumed(now)
            return [self.command(c.Resume)]
        if self.mode == "ending" and self.hangup_at is not None and now >= self.hangup_at:
            return self._hangup()
        if self.mode != "conversation":
            return []
        if now - self.started_at >= s.max_call_s:
            return self._stop_speaking(now) + self._say_goodbye(now)
        if self._is_speaking(now) or self.vad.speaking:
            return []
        if now - max(self.last_activity, self.speaking_until) >= s.silence_timeout_s:
            self.reprompts += 1
            self.last_activity = now  # one decision per timeout, whoever makes it
            return self.decide("silence", {"count": self.reprompts}, now,
                               lambda: self._say("reprompt", now) if self.reprompts < 2
                               else self._say_goodbye(now))
        return []

    # ---------------------------------------------------------- turn hook
    def decide(self, kind: str, info: dict[str, Any], now: float,
               default: Callable[[], list[Any]]) -> list[Any]:
        """One turn-level decision (``call_started``, ``caller_turn``, ``dtmf``,
        ``silence``, ``call_ended``). The default agent runs ``default``;
        ``WebhookAgent`` asks its URL first. Barge-in, pause timers and the
        hangup after a goodbye stay local: they must not wait on anyone."""
        return default()

    def next_wakeup(self) -> float | None:
        s = self.settings
        if self.mode == "paused":
            return self.resume_at
        if self.mode == "ending":
            return self.hangup_at
        if self.mode != "conversation":
            return None
        silent_from = max(self.last_activity, self.speaking_until)
        return min(silent_from + s.silence_timeout_s, self.started_at + s.max_call_s)

    # --------------------------------------------------------------- helpers
    def _is_speaking(self, now: float) -> bool:
        return self.speaking is not None and now < self.speaking_until

    def _say(self, name: str, now: float) -> list[Any]:
        pcm = prompt(name, self.call.rate)
        self.utt_n += 1
        uid = f"{self.call.call_id}:{name}:{self.utt_n}"
        self.speaking = uid
        self.speaking_until = now + len(pcm) / (2 * self.call.rate) + PLAYOUT_SLACK_S
        return [self.command(c.PlayAudio, utterance_id=uid, pcm=pcm, rate=self.call.rate)]

    def _say_goodbye(self, now: float) -> list[Any]:
        out = self._say("goodbye", now)
        self.goodbye = self.speaking
        self.mode = "ending"
        self.hangup_at = self.speaking_until + HANGUP_AFTER_GOODBYE_S
        return out

    def _stop_speaking(self, now: float) -> list[Any]:
        if self._is_speaking(now):
            self.speaking = None
            return [self.command(c.Interrupt)]
        return []

    def _hangup(self) -> list[Any]:
        self.mode = "ended"
        self.hangup_at = None
        return [self.command(c.Hangup)]

    def _resumed(self, now: float) -> None:
        self.mode = "conversation"
        self.resume_at = None
        self.last_activity = now
        self.turn_had_key = False  # the key's own VAD segment was cut by the pause
        self.vad.reset()

    # ----------------------------------------------------------- persistence
    _FIELDS = ("mode", "started_at", "utt_n", "speaking", "speaking_until", "last_activity",
               "reprompts", "turns", "resume_at", "hangup_at", "goodbye", "key_at",
               "turn_had_key", "keys", "caller_speech_ms", "turn_started")

    def to_state(self) -> dict[str, Any]:
        state = super().to_state()
        state["vad"] = self.vad.to_state()
        state["dtmf"] = self.dtmf.to_state()
        return state

    @classmethod
    def from_state(cls, call, settings, data):
        agent = super().from_state(call, settings, data)
        if "vad" in data:
            agent.vad = EnergyVad.from_state(data["vad"])
        if "dtmf" in data:
            agent.dtmf = DtmfDetector.from_state(data["dtmf"])
        return agent
