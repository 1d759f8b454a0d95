"""ConversationAgent: the shared core of the talking agents (offline rules, LLM).

A brain (``DefaultAgent``: intents; ``LlmAgent``: a language model) only
decides *what to answer*; everything about the call is here, pure (events in,
commands and works out, JSON state checkpointed with the call).

Turn-taking (the policy)
------------------------
* Every ``AudioFrame`` goes through the call's VAD (``speech.vad.make_vad``,
  ``PV_VAD``, per call param ``vad``) and an onset/hangover detector
  (``PV_TURN_ONSET_MS``, ``PV_TURN_HANGOVER_MS``). Speech onset while the
  agent is talking is a barge-in: ``Interrupt`` at once (same frame) and the
  reply work is cancelled. A DTMF tone is loud too: speech starting within
  ``TONE_GUARD_S`` of a key is the tone, never a barge-in, and a turn that held
  a key is not answered.
* End of turn = the VAD's silence hangover AND the segment's final
  ``Transcript`` (written by the transcriber role). Whichever comes second
  ends the turn. After the hangover the agent waits at most
  ``PV_TRANSCRIPT_WAIT_MS`` (1200) for the final; none (or an empty one) means
  unintelligible: the shipped "sorry, I didn't catch that" prompt. A final
  that arrives later still with words is answered then.
* While a reply is being prepared nothing is said; the reply's sentences are
  played as they are synthesized (each a ``PlayAudio`` with its own
  utterance id and its ``text``, or a ``Speak`` with the ``platform``
  synthesizer), so the first audio goes out before the reply is complete.

History that keeps the story straight
-------------------------------------
``history`` (bounded: ``PV_HISTORY_MAX_MESSAGES``) holds user messages, tool
results, and assistant messages made of *parts*, one per utterance sent. A
part's ``heard_ms`` comes from the ``Playout`` reports (finished: all of it;
interrupted: ``played_ms``); at barge-in, parts not yet reported are
estimated from the send-time schedule and corrected when the report comes.
``messages()`` renders what the caller actually heard: each part truncated
to ``round(words * heard_ms / total_ms)`` words, unplayed parts dropped, and
an assistant message that was cut ends with ``INTERRUPTED_MARK``. Sentences
never sent (the cancelled rest of a reply) never enter the history, so the
model never believes it said what the caller did not hear.

Failures and takeover
---------------------
A reply work that fails (``ok`` False: timeout, exception; or an item
``{"failed": kind}``: model deadline, HTTP error, cut stream, malformed
chunk, unknown tool, bad arguments, synthesis error, empty reply) is counted
(``failures``, by kind in ``failure_kinds``) and answered with the shipped
"trouble" apology; ``PV_AGENT_MAX_FAILURES`` failures in a row hand the call
to a human. A watchdog (``reply_deadline``) covers a result that never comes.
The runtime puts every ``WorkDone`` on the timeline. After a takeover the
runtime reports the reply work ``lost``: if nothing of it had been sent the
agent asks again (once per turn); if some was sent, the reply ends there.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping

from piopiy_voice import contracts as c
from piopiy_voice.audio import DtmfDetector, frame_bytes, read_wav, resample
from piopiy_voice.audio.pcm import rms_dbfs
from piopiy_voice.speech.config import SpeechConfig
from piopiy_voice.speech.llm import LlmConfig
from piopiy_voice.speech.tts import make_synthesizer
from piopiy_voice.speech.turns import TurnDetector
from piopiy_voice.speech.vad import make_vad
from piopiy_voice.workers.media.make_prompts import PROMPTS as PROMPT_TEXTS

from .base import Agent, Tick

log = logging.getLogger(__name__)

MEDIA = Path(__file__).resolve().parent.parent / "media"
PROMPTS = tuple(PROMPT_TEXTS)
#: The gateway's playout runs a little behind our send time.
PLAYOUT_SLACK_S = 0.3
HANGUP_AFTER_GOODBYE_S = 0.5
#: VAD "speech" starting this soon after a DTMF key is the tone itself.
TONE_GUARD_S = 0.2
DTMF_MARGIN_DB = 6.0
INTERRUPTED_MARK = " [interrupted]"
#: ``Speak`` has no playout report: its length is estimated from the text.
SPEAK_S_PER_CHAR = 0.07
MAX_USER_CHARS = 1000
DEFAULT_SYSTEM_PROMPT = (
    "You are a friendly voice assistant on a phone call. Answer in one to three short "
    "spoken sentences, no lists, no markdown. Use the tools to hand the caller to a human, "
    "hang up, pause the stream while they enter card numbers, or play music. An assistant "
    f"turn ending in '{INTERRUPTED_MARK.strip()}' was cut off by the caller: they did not "
    "hear the rest."
)


@lru_cache(maxsize=None)
def prompt(name: str, rate: int) -> bytes:
    """A shipped prompt as PCM at ``rate`` (cached per rate)."""
    if name not in PROMPTS:
        raise ValueError(f"unknown prompt {name!r}; expected one of {PROMPTS}")
    pcm, src = read_wav(MEDIA / f"{name}.wav")
    return resample(pcm, src, rate) if src != rate else pcm


def _env_int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        v = int(float(raw))
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {v}")
    return v


@dataclass(frozen=True)
class AgentConfig:
    """The talking agents' knobs, from ``PV_*`` environment variables."""

    transcript_wait_ms: int = 1200        # PV_TRANSCRIPT_WAIT_MS
    max_failures: int = 2                 # PV_AGENT_MAX_FAILURES (in a row -> hand off)
    history_max: int = 24                 # PV_HISTORY_MAX_MESSAGES
    system_prompt: str = DEFAULT_SYSTEM_PROMPT   # PV_SYSTEM_PROMPT
    speech: SpeechConfig = field(default_factory=SpeechConfig)   # PV_VAD, PV_TTS, PV_TURN_*
    llm: LlmConfig = field(default_factory=LlmConfig)           # PV_LLM_*

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "AgentConfig":
        e = os.environ if env is None else env
        return cls(
            transcript_wait_ms=_env_int(e, "PV_TRANSCRIPT_WAIT_MS", cls.transcript_wait_ms, 0, 10_000),
            max_failures=_env_int(e, "PV_AGENT_MAX_FAILURES", cls.max_failures, 1, 100),
            history_max=_env_int(e, "PV_HISTORY_MAX_MESSAGES", cls.history_max, 2, 500),
            system_prompt=e.get("PV_SYSTEM_PROMPT", "").strip() or DEFAULT_SYSTEM_PROMPT,
            speech=SpeechConfig.from_env(e),
            llm=LlmConfig.from_env(e),
        )


@lru_cache(maxsize=1)
def _env_config() -> AgentConfig:
    return AgentConfig.from_env()


_synths: dict[tuple, Any] = {}


def get_synthesizer(name: str, speech: SpeechConfig) -> Any:
    """One synthesizer per engine per process (they hold libraries and HTTP pools)."""
    opts = speech.synthesizer_opts() if name == speech.tts else {}
    key = (name, tuple(sorted(opts.items())))
    if key not in _synths:
        _synths[key] = make_synthesizer(name, **opts)
    return _synths[key]


async def say_sentences(synth: Any, sentences: list[str], rate: int):
    """Work: synthesize sentences one by one; each ({"say": text}, pcm) as it is ready."""
    for text in sentences:
        try:
            pcm = await synth.synthesize(text, rate)
        except Exception as exc:  # any engine failure is this reply's failure, not the call's
            yield {"failed": "tts", "error": f"{type(exc).__name__}: {exc}"}
            return
        yield ({"say": text}, pcm)


class Ears:
    """The call's VAD + ``speech.turns.TurnDetector``: 20 ms frames -> turn events."""

    def __init__(self, vad_name: str, rate: int, onset_ms: int, hangover_ms: int) -> None:
        self.vad = make_vad(vad_name, rate)
        self.turns = TurnDetector(onset_ms=onset_ms, hangover_ms=hangover_ms)
        self.t_ms = 0          # call-audio time: frames heard x 20 ms
        self.level_db = -120.0

    @property
    def speaking(self) -> bool:
        return self.turns.speaking

    def process(self, pcm: bytes) -> str | None:
        self.level_db = rms_dbfs(pcm)
        events = self.turns.feed(self.vad.speech_prob(pcm), self.t_ms)
        self.t_ms += 20
        return events[-1].kind if events else None

    def reset(self) -> None:
        self.turns.load_state({"speaking": False, "run_start": None,
                               "last_speech_end": self.t_ms, "quiet_ms": 0})

    def to_state(self) -> dict[str, Any]:
        return {"t_ms": self.t_ms, "turns": self.turns.to_state()}

    def restore(self, data: dict[str, Any]) -> None:
        # The VAD's own adaptive state (noise floor, model memory) is re-learnt in a few frames.
        self.t_ms = int(data.get("t_ms", 0))
        if "turns" in data:
            self.turns.load_state(data["turns"])


def heard_text(text: str, heard_ms: int | None, total_ms: int) -> str:
    """The words of ``text`` the caller heard: proportional to played time, by word."""
    if heard_ms is None or total_ms <= 0 or heard_ms >= total_ms:
        return text if heard_ms is None or heard_ms > 0 or total_ms <= 0 else ""
    words = text.split()
    return " ".join(words[:round(len(words) * max(0, heard_ms) / total_ms)])


class ConversationAgent(Agent):
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
        cfg = self.config = self.CONFIG or _env_config()
        p = call.params
        vad = p.get("vad") if p.get("vad") in ("energy", "webrtc", "silero") else cfg.speech.vad
        self.tts = p.get("tts") if p.get("tts") in ("espeak", "platform", "http") else cfg.speech.tts
        self.ears = Ears(vad, call.rate, cfg.speech.turn_onset_ms, cfg.speech.turn_hangover_ms)
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
        ev = self.ears.process(pcm)
        # A frame quieter than the weakest DTMF tone cannot hold a key, and with no
        # key held such a frame would not change the detector's state: skip it.
        if self.dtmf.held is not None or self.ears.level_db >= self.dtmf.min_level_db - DTMF_MARGIN_DB:
            for key in self.dtmf.process(pcm):
                out += self._on_key(key, now)
        if self.ears.speaking:
            self.caller_speech_ms += 20
        if ev == "speech_start":
            self.turn_started = self.last_activity = now
            if self.mode == "conversation" and now - self.key_at > TONE_GUARD_S:
                out += self._barge_in(now)
                self.turn_state, self.turn_final = "talking", False
        elif ev == "speech_end":
            self.last_activity = now
            had_key, self.turn_had_key = self.turn_had_key, False
            if self.mode == "conversation" and not had_key and self.turn_state == "talking":
                if self.turn_final or not self.WAIT_FOR_WORDS:
                    out += self._end_turn(now)
                else:
                    self.turn_state = "awaiting"
                    self.turn_deadline = now + self.config.transcript_wait_ms / 1000
            elif self.turn_state == "talking":
                self.turn_state = "idle"
        return out + self._timers(now)

    def _on_transcript(self, ev: c.Transcript, now: float) -> list[Any]:
        if not ev.final or ev.channel != "caller" or self.mode != "conversation":
            return []
        text = " ".join(ev.text.split())[:MAX_USER_CHARS]
        if text:
            self.caller_text = f"{self.caller_text} {text}".strip()[:MAX_USER_CHARS]
        if self.turn_state == "talking":
            self.turn_final = True
            return []
        if self.turn_state == "awaiting" or (self.turn_state == "idle" and text):
            return self._end_turn(now)  # idle + words: a final later than our wait
        return []

    def _end_turn(self, now: float) -> list[Any]:
        text, self.caller_text = self.caller_text, ""
        self.turn_state, self.turn_final, self.turn_deadline = "idle", False, None
        self.turns += 1
        self.reprompts = 0
        self.last_activity = now
        info = {"turn": self.turns, "text": text, "speech_ms": round((now - self.turn_started) * 1000),
                "caller_speech_ms_total": self.caller_speech_ms}
        return self.decide("caller_turn", info, now, lambda: self.respond_to(text, now))

    def respond_to(self, text: str, now: float) -> list[Any]:
        """The default answer to a caller's turn: unintelligible -> "sorry", else the brain."""
        if not text:
            self.unintelligible += 1
            return self.say_prompt("sorry", now)
        last = self.history[-1] if self.history else None
        if last and last["role"] == "user":  # nothing answered since: one caller turn
            last["content"] = f"{last['content']} {text}"[:MAX_USER_CHARS]
        else:
            self._remember({"role": "user", "content": text})
        self.reasks = 0
        return self.start_reply(now)

    def _on_key(self, key: str, now: float) -> list[Any]:
        self.keys.append(key)
        self.keys = self.keys[-50:]
        self.key_at = now
        self.turn_had_key = True
        if self.mode != "conversation":
            return []
        return self.decide("dtmf", {"key": key}, now, lambda: self._default_key(key, now))

    def _default_key(self, key: str, now: float) -> list[Any]:
        if key == self.settings.handoff_key:
            return self.handoff(now, cut=True)
        if key == self.settings.pause_key:
            return self._stop_speaking(now) + self._pause(now)
        return []

    # ---------------------------------------------------------------- replies
    def begin_reply(self, work: Any, now: float) -> list[Any]:
        """Track ``work`` as the reply in flight (its items come back as WorkDone)."""
        self.reply_work = work.id
        self.reply_deadline = now + work.timeout_s + 2.0
        self.history.append({"role": "assistant", "parts": [], "work": work.id})
        return [work]

    def _reply_msg(self) -> dict[str, Any] | None:
        for msg in reversed(self.history[-4:]):
            if msg["role"] == "assistant" and msg.get("work") == self.reply_work:
                return msg
        return None

    def _on_work_done(self, ev: c.WorkDone, now: float) -> list[Any]:
        if ev.work_id != self.reply_work or self.reply_work is None:
            return []  # cancelled, superseded or someone else's: already dealt with
        if not ev.ok:
            self.reply_work = self.reply_deadline = None
            if ev.error == "cancelled":
                return []
            if ev.error == "lost":
                return self._reask(now)
            return self.reply_failed("work", ev.error, now)
        value = ev.value if isinstance(ev.value, dict) else {}
        if not ev.final:
            if "say" in value:
                return self.say_part(str(value["say"]), ev.pcm, now)
            if "failed" in value:
                self.reply_work = self.reply_deadline = None
                return self.reply_failed(str(value["failed"]), str(value.get("error", "")), now)
            return self.on_reply_item(value, now)
        self.reply_work = self.reply_deadline = None
        msg = self._reply_msg_any(ev.work_id)
        if msg is not None and not msg["parts"] and not msg.get("tool_calls"):
            return self.reply_failed("empty", "the reply said nothing", now)
        self.reply_failures = 0
        return []

    def _reply_msg_any(self, work_id: str) -> dict[str, Any] | None:
        for msg in reversed(self.history[-4:]):
            if msg.get("work") == work_id:
                return msg
        return None

    def on_reply_item(self, value: dict[str, Any], now: float) -> list[Any]:
        """A reply item other than ``say``/``failed`` (the LLM brain's tool calls)."""
        return []

    def say_part(self, text: str, pcm: bytes, now: float) -> list[Any]:
        """Send one synthesized sentence of the reply and add it to what we said."""
        if self.mode != "conversation":
            return []
        if len(pcm) % 2 or len(pcm) > 2 * self.call.rate * 120:  # not one sentence of audio
            return self._cancel_reply() + self.reply_failed(
                "tts", f"synthesizer returned {len(pcm)} bytes for {len(text)} characters", now)
        self.utt_n += 1
        uid = f"{self.call.call_id}:say:{self.utt_n}"
        if pcm:
            cmd = self.command(c.PlayAudio, utterance_id=uid, pcm=pcm, rate=self.call.rate, text=text)
            total_ms = round(len(pcm) * 1000 / (2 * self.call.rate))
        else:  # the platform synthesizer: the platform talks
            cmd = self.command(c.Speak, text=text)
            total_ms = round(SPEAK_S_PER_CHAR * len(text) * 1000)
        msg = self._reply_msg()
        if msg is not None:
            msg["parts"].append(self._schedule(uid, text, total_ms, now))
        return [cmd]

    def _schedule(self, uid: str, text: str, total_ms: int, now: float) -> dict[str, Any]:
        start = max(now, self.queue_end)
        self.queue_end = start + total_ms / 1000
        self.speaking = uid
        self.speaking_until = self.queue_end + PLAYOUT_SLACK_S
        return {"uid": uid, "text": text, "total_ms": total_ms, "start": start, "heard_ms": None}

    def say_prompt(self, name: str, now: float) -> list[Any]:
        """Play a shipped prompt; it is part of the story too (an assistant message)."""
        pcm = prompt(name, self.call.rate)
        self.utt_n += 1
        uid = f"{self.call.call_id}:{name}:{self.utt_n}"
        total_ms = round(len(pcm) * 1000 / (2 * self.call.rate))
        part = self._schedule(uid, PROMPT_TEXTS[name], total_ms, now)
        self._remember({"role": "assistant", "parts": [part]})
        return [self.command(c.PlayAudio, utterance_id=uid, pcm=pcm, rate=self.call.rate,
                             text=PROMPT_TEXTS[name])]

    _say = say_prompt  # the name subclasses written for the first DefaultAgent use

    def reply_failed(self, kind: str, error: str, now: float) -> list[Any]:
        """Count the failure; apologise, or hand off after too many in a row."""
        self.failures += 1
        self.reply_failures += 1
        self.failure_kinds[kind] = self.failure_kinds.get(kind, 0) + 1
        log.warning("call %s: reply failed (%s: %s), %d in a row", self.call.call_id, kind,
                    error[:200], self.reply_failures)
        self._drop_unsaid()
        if self.mode != "conversation":
            return []
        if self.reply_failures >= self.config.max_failures:
            return self.handoff(now, cut=False)
        return self.say_prompt("trouble", now)

    def _reask(self, now: float) -> list[Any]:
        msg = self._drop_unsaid()
        if msg is not None or self.mode != "conversation":
            return []  # some of it was sent: the reply ends there rather than repeat itself
        if self.reasks >= 1 or not self.history or self.history[-1]["role"] != "user":
            return self.reply_failed("lost", "reply lost twice in a takeover", now)
        self.reasks += 1
        return self.start_reply(now)

    def _drop_unsaid(self) -> dict[str, Any] | None:
        """Remove the last reply message if nothing of it was sent; else return it."""
        if self.history and self.history[-1]["role"] == "assistant" and "work" in self.history[-1]:
            msg = self.history[-1]
            if not msg["parts"] and not msg.get("tool_calls"):
                self.history.pop()
                return None
            return msg
        return None

    def _barge_in(self, now: float) -> list[Any]:
        out: list[Any] = []
        if self._is_speaking(now):
            out.append(self.command(c.Interrupt))
            self._mark_interrupted(now)
            self.speaking = None
            self.queue_end = now
        if self.reply_work is not None:
            out.append(self.cancel(self.reply_work))
            self.reply_work = self.reply_deadline = None
            self._drop_unsaid()
        self.pause_at = None
        return out

    def _mark_interrupted(self, now: float) -> None:
        """Estimate what was heard of every unreported part (reports correct it later)."""
        for msg in self.history[-3:]:
            if msg["role"] != "assistant":
                continue
            cut = False
            for part in msg["parts"]:
                if part["heard_ms"] is None:
                    part["heard_ms"] = max(0, min(part["total_ms"], round((now - part["start"]) * 1000)))
                    cut = cut or part["heard_ms"] < part["total_ms"]
            if cut:
                msg["interrupted"] = True

    def _on_playout(self, ev: c.Playout, now: float) -> list[Any]:
        part, msg = self._find_part(ev.utterance_id)
        if part is not None:
            if ev.state == "started":
                part["start"] = now
            elif ev.state == "finished":
                part["heard_ms"] = part["total_ms"]
            else:
                part["heard_ms"] = min(ev.played_ms, part["total_ms"])
                if part["heard_ms"] < part["total_ms"]:
                    msg["interrupted"] = True
        if ev.utterance_id != self.speaking and ev.utterance_id != self.goodbye:
            return []
        if ev.state == "started":
            self.speaking_until = now + max(0, ev.total_ms - ev.played_ms) / 1000 + PLAYOUT_SLACK_S
            return []
        if ev.utterance_id == self.speaking:
            self.speaking = None
            self.queue_end = min(self.queue_end, now)
            self.last_activity = now
        if self.mode == "ending" and ev.utterance_id == self.goodbye:
            return self._hangup()
        if self.mode == "conversation" and self.pause_at is not None:
            return self._pause(now)
        return []

    def _find_part(self, uid: str) -> tuple[dict | None, dict | None]:
        for msg in reversed(self.history[-6:]):
            for part in msg.get("parts", ()):
                if part["uid"] == uid:
                    return part, msg
        return None, None

    def messages(self) -> list[dict[str, Any]]:
        """The history as chat messages: only what the caller heard (module docstring)."""
        out: list[dict[str, Any]] = []
        for msg in self.history:
            if msg["role"] != "assistant":
                out.append({k: v for k, v in msg.items()})
                continue
            said = [heard_text(p["text"], p["heard_ms"], p["total_ms"]) for p in msg["parts"]]
            text = " ".join(s for s in said if s)
            if text and msg.get("interrupted"):
                text += INTERRUPTED_MARK
            if not text and not msg.get("tool_calls"):
                continue
            m: dict[str, Any] = {"role": "assistant", "content": text}
            if msg.get("tool_calls"):
                m["tool_calls"] = msg["tool_calls"]
            out.append(m)
        return out

    def _remember(self, msg: dict[str, Any]) -> None:
        self.history.append(msg)
        limit = self.config.history_max
        if len(self.history) > limit:
            del self.history[:len(self.history) - limit]
            while self.history and self.history[0]["role"] == "tool":
                self.history.pop(0)  # never keep a tool result without its call

    # ----------------------------------------------------------- call controls
    def handoff(self, now: float, cut: bool) -> list[Any]:
        """Hold notice, music, bridge to a human; then only monitor."""
        s = self.settings
        out = self._stop_speaking(now) if cut else []
        if self.reply_work is not None:
            out.append(self.cancel(self.reply_work))
            self.reply_work = self.reply_deadline = None
        out += self.say_prompt("hold", now)
        out.append(self.command(c.PlayMusic, file=self.call.params.get("hold_music", s.hold_music)))
        caller_id = self.call.params.get("caller_id") or s.piopiy_caller_id or ""
        out.append(self.command(c.Transfer, to=[s.human_agent_number], caller_id=caller_id))
        self.mode = "monitoring"
        self.speaking = None
        return out

    def _pause(self, now: float) -> list[Any]:
        if self.reply_work is not None:
            cancel = [self.cancel(self.reply_work)]
            self.reply_work = self.reply_deadline = None
        else:
            cancel = []
        self.mode = "paused"
        self.pause_at = None
        self.resume_at = now + self.settings.pause_resume_after_s
        return cancel + [self.command(c.Pause)]

    def pause_after_speaking(self, now: float) -> list[Any]:
        """Pause once what is queued has played (the model's "type your card now")."""
        if self._is_speaking(now):
            self.pause_at = self.speaking_until
            return []
        return self._pause(now)

    def hang_up_after_speaking(self, now: float) -> list[Any]:
        """End the call after what is queued has played (or say goodbye first)."""
        if not self._is_speaking(now):
            return self._say_goodbye(now)
        self.goodbye = self.speaking
        self.mode = "ending"
        self.hangup_at = self.speaking_until + HANGUP_AFTER_GOODBYE_S
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
            return self._stop_speaking(now) + self._cancel_reply() + self._say_goodbye(now)
        if self.pause_at is not None and now >= self.pause_at:
            return self._pause(now)
        if self.reply_work is not None and self.reply_deadline is not None and now >= self.reply_deadline:
            work, self.reply_work, self.reply_deadline = self.reply_work, None, None
            return [self.cancel(work)] + self.reply_failed("deadline", "no result from the reply work", now)
        if self.turn_state == "awaiting" and self.turn_deadline is not None and now >= self.turn_deadline:
            return self._end_turn(now)
        if (self._is_speaking(now) or self.ears.speaking or self.reply_work is not None
                or self.turn_state != "idle"):
            return []
        if now - max(self.last_activity, self.speaking_until) >= s.silence_timeout_s:
            self.reprompts += 1
            self.last_activity = now  # one decision per timeout, whoever makes it
            return self.decide("silence", {"count": self.reprompts}, now,
                               lambda: self.say_prompt("reprompt", now) if self.reprompts < 2
                               else self._say_goodbye(now))
        return []

    def next_wakeup(self) -> float | None:
        if self.mode == "paused":
            return self.resume_at
        if self.mode == "ending":
            return self.hangup_at
        if self.mode != "conversation":
            return None
        silent_from = max(self.last_activity, self.speaking_until)
        times = [silent_from + self.settings.silence_timeout_s, self.started_at + self.settings.max_call_s,
                 self.pause_at, self.reply_deadline, self.turn_deadline]
        return min(t for t in times if t is not None)

    # --------------------------------------------------------------- helpers
    def _is_speaking(self, now: float) -> bool:
        return self.speaking is not None and now < self.speaking_until

    def _cancel_reply(self) -> list[Any]:
        if self.reply_work is None:
            return []
        work, self.reply_work, self.reply_deadline = self.reply_work, None, None
        return [self.cancel(work)]

    def _say_goodbye(self, now: float) -> list[Any]:
        out = self.say_prompt("goodbye", now)
        self.goodbye = self.speaking
        self.mode = "ending"
        self.hangup_at = self.speaking_until + HANGUP_AFTER_GOODBYE_S
        return out

    def _stop_speaking(self, now: float) -> list[Any]:
        if self._is_speaking(now):
            self._mark_interrupted(now)
            self.speaking = None
            self.queue_end = now
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
        self.turn_state, self.turn_final, self.caller_text = "idle", False, ""
        self.ears.reset()
