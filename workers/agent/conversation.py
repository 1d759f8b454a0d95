"""ConversationAgent: the shared core of the talking agents (offline rules, LLM).

A brain (``DefaultAgent``: intents; ``LlmAgent``: a language model) only
decides *what to answer* (``start_reply``); everything about the call is
here, pure (events in, commands and works out, JSON state checkpointed with
the call). ``ConversationAgent`` routes each event to the part that owns it;
one module per concept:

- ``turntaking``: frames, keys and transcripts -> turns and barge-ins
  (``ears``: VAD + onset/hangover per frame);
- ``replies``: the reply in flight, sentence by sentence, and its failures
  (apology, hand-off after too many, re-ask after a takeover);
- ``history``: what was said and what the caller heard of it (playout
  reports), so the model never believes it said what was cut;
- ``controls``: hand-off, pause/resume, goodbye and hang-up, timers;
- ``voice``: shipped prompts and synthesizers; ``config``: ``AgentConfig``.

``decide(kind, info, now, default)`` is the one hook for turn-level decisions
(``call_started``, ``caller_turn``, ``dtmf``, ``silence``, ``call_ended``):
``WebhookAgent`` asks its webhook there. Barge-in, pause timers and the
hang-up after a goodbye stay local: they must not wait on anyone.

The parts are mixins over one object on purpose: the agent's state is one
flat JSON checkpoint (``_FIELDS``), unchanged by the split, so a call taken
over from a worker running the previous version resumes.
"""

from __future__ import annotations

from typing import Any, Callable

from piopiy_voice import contracts as c
from piopiy_voice.audio import DtmfDetector, frame_bytes

from .base import Agent, Tick
from .config import DEFAULT_SYSTEM_PROMPT, AgentConfig, env_config
from .controls import HANGUP_AFTER_GOODBYE_S, CallControls
from .ears import Ears
from .history import (INTERRUPTED_MARK, PLAYOUT_SLACK_S, SPEAK_S_PER_CHAR, PlayoutHistory,
                      heard_text)
from .replies import Replies
from .turntaking import DTMF_MARGIN_DB, MAX_USER_CHARS, TONE_GUARD_S, TurnTaking
from .voice import MEDIA, PROMPTS, get_synthesizer, prompt, say_sentences

__all__ = [
    "AgentConfig", "ConversationAgent", "DEFAULT_SYSTEM_PROMPT", "DTMF_MARGIN_DB", "Ears",
    "HANGUP_AFTER_GOODBYE_S", "INTERRUPTED_MARK", "MAX_USER_CHARS", "MEDIA", "PLAYOUT_SLACK_S",
    "PROMPTS", "SPEAK_S_PER_CHAR", "TONE_GUARD_S", "get_synthesizer", "heard_text", "prompt",
    "say_sentences",
]


class ConversationAgent(TurnTaking, Replies, PlayoutHistory, CallControls, Agent):
    """The call-level machinery shared by the talking agents (module docstring)."""

    #: Class-wide config; None reads the environment once per process.
    CONFIG: AgentConfig | None = None
    #: A synthesizer to use instead of the configured one (tests, custom engines).
    SYNTHESIZER: Any = None
    #: False: a caller turn ends at the VAD's hangover, with whatever finals came
    #: by then (a subclass that waits for words itself, e.g. ``WebhookAgent``).
    WAIT_FOR_WORDS = True

    def __init__(self, call, settings):
        super().__init__(call, settings)
        cfg = self.config = self.CONFIG or env_config()
        p = call.params
        vad = p.get("vad") if p.get("vad") in ("energy", "webrtc", "silero") else cfg.speech.vad
        self.tts = p.get("tts") if p.get("tts") in ("espeak", "platform", "http") else cfg.speech.tts
        self.ears = Ears(vad, call.rate, cfg.speech.turn_onset_ms, cfg.speech.turn_hangover_ms,
                         cfg.speech.turn_lead_in_ms)
        self.dtmf = DtmfDetector(call.rate)
        self.frame_len = frame_bytes(call.rate)
        self.mode = "conversation"  # paused | monitoring | ending | ended
        self.started_at = call.started_at
        self.utt_n = 0
        self.speaking: str | None = None
        self.speaking_until = 0.0
        self.queue_end = 0.0
        self.last_activity = call.started_at
        self.reprompts = 0
        self.turns = 0
        self.resume_at: float | None = None
        self.pause_at: float | None = None
        self.hangup_at: float | None = None
        self.goodbye: str | None = None
        self.key_at = -1e18
        self.turn_had_key = False
        self.keys: list[str] = []
        self.caller_speech_ms = 0
        self.turn_started = call.started_at
        # turn-taking: idle | talking | awaiting (hangover passed, final not yet in)
        self.turn_state = "idle"
        self.turn_final = False
        self.turn_deadline: float | None = None
        self.caller_text = ""
        self.unintelligible = 0
        # replies
        self.history: list[dict[str, Any]] = []
        self.reply_work: str | None = None
        self.reply_deadline: float | None = None
        self.reasks = 0
        self.failures = 0
        self.reply_failures = 0
        self.failure_kinds: dict[str, int] = {}

    _FIELDS = ("mode", "started_at", "utt_n", "speaking", "speaking_until", "queue_end",
               "last_activity", "reprompts", "turns", "resume_at", "pause_at", "hangup_at",
               "goodbye", "key_at", "turn_had_key", "keys", "caller_speech_ms", "turn_started",
               "turn_state", "turn_final", "turn_deadline", "caller_text", "unintelligible",
               "history", "reply_work", "reply_deadline", "reasks", "failures",
               "reply_failures", "failure_kinds")

    def to_state(self) -> dict[str, Any]:
        state = super().to_state()
        state["ears"] = self.ears.to_state()
        state["dtmf"] = self.dtmf.to_state()
        return state

    @classmethod
    def from_state(cls, call, settings, data):
        agent = super().from_state(call, settings, data)
        agent.ears.restore(data.get("ears") or {})
        if "dtmf" in data:
            agent.dtmf = DtmfDetector.from_state(data["dtmf"])
        return agent

    # ------------------------------------------------------------ the brain
    def synthesizer(self) -> Any:
        return self.SYNTHESIZER or get_synthesizer(self.tts, self.config.speech)

    def start_reply(self, now: float) -> list[Any]:
        """Answer the last user message of ``history`` (brains override)."""
        raise NotImplementedError

    def decide(self, kind: str, info: dict[str, Any], now: float,
               default: Callable[[], list[Any]]) -> list[Any]:
        """One turn-level decision (``call_started``, ``caller_turn`` with ``text``,
        ``dtmf``, ``silence``, ``call_ended``). Runs ``default`` here; a subclass may
        decide otherwise (``WebhookAgent``). Barge-in, pause timers and the hangup
        after a goodbye stay local: they must not wait on anyone."""
        return default()

    # ---------------------------------------------------------------- events
    def on_event(self, event: Any, now: float) -> list[Any]:
        if self.mode == "ended":
            return []
        if isinstance(event, c.AudioFrame):
            return self._on_audio(event.pcm, now)
        if isinstance(event, Tick):
            return self._timers(now)
        if isinstance(event, c.WorkDone):
            return self._on_work_done(event, now)
        if isinstance(event, c.Transcript):
            return self._on_transcript(event, now)
        if isinstance(event, c.Playout):
            return self._on_playout(event, now)
        if isinstance(event, c.CallStarted):
            self.started_at = self.last_activity = now
            return self.decide("call_started", {}, now, lambda: self.say_prompt("greeting", now))
        if isinstance(event, c.CommandResult):
            if event.command == "cmd.resume" and event.status == "applied" and self.mode == "paused":
                self._resumed(now)  # someone else resumed the stream
            if event.command == "cmd.transfer" and event.status == "rejected" and self.mode == "monitoring":
                return self.transfer_failed(event.reason, now)
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
