"""WebhookAgent: turn events POSTed to a URL, commands (or words) taken from the reply.

It is the ``DefaultAgent`` (VAD, transcript turn-taking, DTMF, barge-in, timers
all stay local and instant) whose *turn-level* decisions are asked of an HTTP endpoint
(``Settings.agent_webhook_url``, ``--webhook URL``). Events never carry raw
audio, only what was heard::

    POST <url>   Content-Type: application/json
    {"event": "caller_turn", "event_id": "call-1:caller_turn:3", "call_id": "call-1",
     "time": 1700000000.52, "rate": 8000, "params": {...}, "mode": "conversation",
     "turn": 3, "speech_ms": 1840, "caller_speech_ms_total": 5200, "keys": ["5"],
     "text": "I would like to speak to someone", "segment": 2}

Events: ``call_started``, ``caller_turn`` (speech_ms, and ``text``: the final
transcript of what the caller said), ``dtmf`` (key), ``silence`` (count: 1st,
2nd... timeout in a row), ``call_ended`` (reason; the reply is ignored) and,
with ``PV_AGENT_WEBHOOK_PARTIALS=1``, ``caller_partial`` (segment, text: the
transcript so far; the reply is ignored). ``event_id`` is stable: after a
worker crash the same event may be POSTed again (a takeover mid-reply
re-asks), so endpoints should treat it as an idempotency key.

Words: the transcriber role writes ``Transcript`` entries into the call's
stream; turn-taking is ``ConversationAgent``'s (the VAD's hangover AND the
segment's final transcript end a turn; after ``PV_TRANSCRIPT_WAIT_MS`` with no
final the turn goes with ``text`` ``""``). The ``caller_turn`` POST is the
turn's reply: a barge-in cancels it (its answer is dropped), and its ``say``
becomes part of the conversation history.

Reply (200, JSON)::

    {"say": "Sure, one moment."}
    {"commands": [{"type": "cmd.speak", "text": "Sure."},
                  {"type": "cmd.play_audio", "prompt": "reply"},
                  {"type": "cmd.play_audio", "pcm_b64": "...", "rate": 8000},
                  {"type": "cmd.transfer", "to": ["9190..."], "caller_id": "9180..."}]}

``say`` is spoken with the configured synthesizer (``PV_TTS``, see
``piopiy_voice.speech.tts``), synthesised in the same work right after the
reply; with the ``platform`` synthesizer, or if synthesis fails, it becomes a
``Speak`` command (the platform's own text-to-speech). ``say`` and
``commands`` may come together (the words first). Any command type of
``piopiy_voice.contracts`` is accepted and validated (ids and ``call_id`` are
set by us). ``{"commands": []}`` means "do nothing"; no ``say`` and
``{"commands": null}`` or no ``commands`` key means "do what the default agent
would". Fallback: on a timeout, a connection error, a non-2xx status, or a
reply that is not JSON, nests deeper than ``errors.MAX_JSON_DEPTH`` or has an
invalid command, the whole reply is discarded and the DefaultAgent's decision
is used instead (``FALLBACK = "default"``); set ``FALLBACK = "noop"`` in a
subclass to do nothing instead. Failures are counted in ``webhook_failures``;
never a dead-lettered call.

The POST never runs in the worker's loop: it is a work of the agent runtime
(``piopiy_voice.workers.runtime``) using ``httpx``, with ONE hard total
deadline (``PV_AGENT_WEBHOOK_TIMEOUT_S``, default 2 s) over connect, headers
and body (``asyncio.timeout``): a server that trickles its headers or body
holds nothing but its own turn, and other calls never wait on it. Replies
that arrive after the caller moved on (a transfer, a pause) are dropped.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from typing import Any

import httpx

from piopiy_voice import contracts as c
from piopiy_voice.errors import MAX_JSON_DEPTH
from piopiy_voice.speech.config import SpeechConfig

from .conversation import PLAYOUT_SLACK_S, SPEAK_S_PER_CHAR, get_synthesizer
from .default import PROMPTS, DefaultAgent, prompt

log = logging.getLogger(__name__)

MAX_REPLY_BYTES = 1_000_000
_OURS = ("command_id", "seq", "call_id", "v", "reply_to", "issued_by")
#: Events whose reply is not used (fire and forget).
_IGNORED_REPLIES = ("call_ended", "caller_partial")


class WebhookError(Exception):
    pass


# ---------------------------------------------------------------- the work
_clients: dict[int, httpx.AsyncClient] = {}


def _client() -> httpx.AsyncClient:
    """One pooled client per event loop (the runtime has one loop)."""
    loop = asyncio.get_running_loop()
    client = _clients.get(id(loop))
    if client is None or client.is_closed:
        # No timeouts of its own: the one deadline is ``asyncio.timeout`` below.
        client = httpx.AsyncClient(timeout=None, follow_redirects=False,
                                   headers={"User-Agent": "piopiy-voice-worker"})
        _clients.clear()  # a loop of a finished test or a previous runtime
        _clients[id(loop)] = client
    return client


def _depth_ok(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if d > limit:
            return False
        if isinstance(v, dict):
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, d + 1) for x in v)
    return True


async def post_event(url: str, body: dict[str, Any], timeout_s: float, rate: int,
                     tts: str = "") -> Any:
    """POST one event (the work the agent asks the runtime to run): the parsed
    reply, or ``(reply, pcm)`` when it had words to ``say`` and the configured
    synthesizer rendered them. Raises ``WebhookError``."""
    try:
        async with asyncio.timeout(timeout_s):  # connect + headers + body, all of it
            async with _client().stream("POST", url, json=body) as resp:
                if not 200 <= resp.status_code < 300:
                    raise WebhookError(f"HTTP {resp.status_code}")
                raw = bytearray()
                async for chunk in resp.aiter_bytes():
                    raw += chunk
                    if len(raw) > MAX_REPLY_BYTES:
                        raise WebhookError(f"reply larger than {MAX_REPLY_BYTES} bytes")
    except TimeoutError:
        raise WebhookError(f"no complete reply within {timeout_s:g}s") from None
    except httpx.HTTPError as exc:
        raise WebhookError(f"unreachable: {type(exc).__name__}: {exc}") from None
    try:
        reply = json.loads(bytes(raw))
    except (ValueError, RecursionError):
        raise WebhookError("reply is not JSON (or nests too deeply)") from None
    if not _depth_ok(reply):
        raise WebhookError(f"reply nests deeper than {MAX_JSON_DEPTH} levels")
    say = reply.get("say") if isinstance(reply, dict) else None
    if isinstance(say, str) and say.strip():
        pcm = await _synthesize(say, rate, tts)
        if pcm:
            return reply, pcm
    return reply


#: A synthesizer to use instead of the configured one (tests, custom engines).
SYNTHESIZER: Any = None


async def _synthesize(text: str, rate: int, tts: str) -> bytes:
    """``text`` in the configured voice (``PV_TTS``, or the call's ``tts``
    param), or b"" (then the agent sends ``Speak``: the platform talks)."""
    try:
        synth = SYNTHESIZER
        if synth is None:
            if not tts or tts == "platform":
                return b""
            synth = get_synthesizer(tts, SpeechConfig.from_env())
        return await synth.synthesize(text, rate)
    except Exception as exc:  # noqa: BLE001 (any engine failure: the platform speaks instead)
        log.warning("synthesis failed (%s); the platform will speak the reply", exc)
        return b""


# ---------------------------------------------------------------- the agent
class WebhookAgent(DefaultAgent):
    """The conversational machinery of ``ConversationAgent`` (turn-taking with
    the transcript, barge-in, DTMF, pause, history), with every turn-level
    decision asked of the webhook (module docstring)."""

    FALLBACK = "default"

    def __init__(self, call, settings):
        super().__init__(call, settings)
        if not settings.agent_webhook_url:
            raise ValueError("agent_webhook_url (PV_AGENT_WEBHOOK_URL / --webhook) is required")
        if not settings.agent_webhook_url.startswith(("http://", "https://")):
            raise ValueError(f"agent_webhook_url must be http(s)://, got {settings.agent_webhook_url!r}")
        self.url = settings.agent_webhook_url
        self.timeout = settings.agent_webhook_timeout_s
        self.partials = bool(getattr(settings, "agent_webhook_partials", False))
        self.webhook_failures = 0
        self.events_sent = 0
        #: Work id -> the event asked (kind, info, event_id), until its reply.
        self.asks: dict[str, dict[str, Any]] = {}
        self._ended_work: Any = None

    _FIELDS = DefaultAgent._FIELDS + ("webhook_failures", "events_sent", "asks")

    # -------------------------------------------------------------- events
    def on_event(self, event: Any, now: float) -> list[Any]:
        if isinstance(event, c.WorkDone) and event.work_id in self.asks:
            return self._on_reply(event, now)
        out = super().on_event(event, now)
        if self._ended_work is not None:
            work, self._ended_work = self._ended_work, None
            return [*out, work]  # the machinery drops decide()'s answer to call_ended
        return out

    def _on_transcript(self, ev: c.Transcript, now: float) -> list[Any]:
        out = super()._on_transcript(ev, now)
        if (self.partials and not ev.final and ev.channel == "caller" and ev.text.strip()
                and self.mode == "conversation"):
            out = [*out, self._ask("caller_partial", {"segment": ev.segment,
                                                      "text": ev.text.strip()}, now)]
        return out

    def decide(self, kind, info, now, default):
        work = self._ask(kind, info, now)
        if kind == "call_ended":
            self._ended_work = work
            return []
        if kind == "caller_turn":
            if info.get("text"):
                self._remember({"role": "user", "content": info["text"]})
            # The POST is the turn's reply: barge-in cancels it, a watchdog covers it.
            return self.begin_reply(work, now)
        return [work]

    # ------------------------------------------------------------- asking
    def _ask(self, kind: str, info: dict[str, Any], now: float, event_id: str | None = None) -> Any:
        if event_id is None:
            self.events_sent += 1
            event_id = f"{self.call.call_id}:{kind}:{self.events_sent}"
        body = {
            "event": kind, "event_id": event_id, "call_id": self.call.call_id,
            "time": round(now, 3), "rate": self.call.rate, "params": self.call.params,
            "mode": self.mode, "keys": self.keys[-20:], **info,
        }
        # The runtime's deadline is a backstop: post_event's own is the one that fires
        # (synthesis of a ``say`` comes after it, bounded by the engine's own deadline).
        work = self.work("webhook", post_event, self.url, body, self.timeout, self.call.rate,
                         self.tts, timeout_s=self.timeout + 15.0)
        if kind not in _IGNORED_REPLIES:
            self.asks[work.id] = {"kind": kind, "info": info, "event_id": event_id}
        return work

    def _on_reply(self, ev: c.WorkDone, now: float) -> list[Any]:
        ask = self.asks.pop(ev.work_id)
        kind, info = ask["kind"], ask["info"]
        if kind == "caller_turn":
            if ev.work_id != self.reply_work:
                return []  # cancelled (barge-in, pause, hand-off) or given up on
            self.reply_work = self.reply_deadline = None
        if self.mode != "conversation" or ev.error == "cancelled":
            return []  # the caller moved on (transfer, pause, goodbye): too late
        if not ev.ok and ev.error == "lost":
            # A takeover mid-reply re-asks (same event_id: the endpoint can dedupe).
            work = self._ask(kind, info, now, event_id=ask["event_id"])
            if kind == "caller_turn":
                self.reply_work = work.id
                self.reply_deadline = now + work.timeout_s + 2.0
                msg = self._reply_msg_any(ev.work_id)
                if msg is not None:
                    msg["work"] = work.id
            return [work]
        if kind == "caller_turn":
            self.reply_work = ev.work_id  # say_part adds to this reply's message
        try:
            if not ev.ok:
                raise WebhookError(ev.error)
            cmds = self._reply_commands(ev.value, ev.pcm, now)
        except Exception as exc:  # noqa: BLE001 (anything wrong with a reply: fallback)
            self.webhook_failures += 1
            log.warning("call %s: webhook %s failed (%s); using %s behaviour",
                        self.call.call_id, kind, exc, self.FALLBACK)
            cmds = None if self.FALLBACK == "default" else []
        if kind == "caller_turn":
            self.reply_work = None
            if cmds is None or not cmds:
                self._drop_unsaid()
        if cmds is None:
            return self._default(kind, info, now)
        self._track(cmds, now)
        return cmds

    def _default(self, kind: str, info: dict[str, Any], now: float) -> list[Any]:
        """What the DefaultAgent would have decided for this event, decided now."""
        if kind == "call_started":
            return self.say_prompt("greeting", now)
        if kind == "caller_turn":
            last = self.history[-1] if self.history else None
            if last and last["role"] == "user" and last["content"] == info.get("text"):
                self.history.pop()  # respond_to remembers it again
            return self.respond_to(info.get("text", ""), now)
        if kind == "dtmf":
            return self._default_key(info["key"], now)
        if kind == "silence":
            return self.say_prompt("reprompt", now) if info.get("count", 1) < 2 else self._say_goodbye(now)
        return []

    # ------------------------------------------------------------- replies
    def _reply_commands(self, reply: Any, pcm: bytes, now: float) -> list[Any] | None:
        if not isinstance(reply, dict):
            raise WebhookError("reply must be a JSON object")
        say = reply.get("say")
        if say is not None and not (isinstance(say, str) and say.strip()):
            raise WebhookError("'say' must be a non-empty string")
        cmds = self._commands(reply)
        if say is None:
            return cmds
        # One sentence of the reply: sent and remembered as what the caller hears.
        spoken = self.say_part(say.strip(), pcm if len(pcm) % 2 == 0 else b"", now)
        return spoken + (cmds or [])

    def _commands(self, reply: dict[str, Any]) -> list[Any] | None:
        items = reply.get("commands")
        if items is None:
            return None
        if not isinstance(items, list):
            raise WebhookError("'commands' must be a list")
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or item.get("type") not in c.COMMAND_TYPES:
                raise WebhookError(f"commands[{i}]: 'type' must be one of {sorted(c.COMMAND_TYPES)}")
            data = {k: v for k, v in item.items() if k not in _OURS}
            data["call_id"] = self.call.call_id
            if data["type"] == "cmd.play_audio":
                data = self._audio(i, data)
            try:
                out.append(c.MESSAGE_ADAPTER.validate_python(data))
            except ValueError as exc:
                raise WebhookError(f"commands[{i}] invalid: {exc}".splitlines()[0]) from None
        return out

    def _audio(self, i: int, data: dict[str, Any]) -> dict[str, Any]:
        if "prompt" in data:
            name = data.pop("prompt")
            if name not in PROMPTS:
                raise WebhookError(f"commands[{i}].prompt must be one of {PROMPTS}")
            data["pcm"], data["rate"] = prompt(name, self.call.rate), self.call.rate
        elif "pcm_b64" in data:
            try:
                data["pcm"] = base64.b64decode(data.pop("pcm_b64"), validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise WebhookError(f"commands[{i}].pcm_b64 is not base64") from None
            data.setdefault("rate", self.call.rate)
        else:
            raise WebhookError(f"commands[{i}]: cmd.play_audio needs 'prompt' or 'pcm_b64'")
        data.setdefault("utterance_id", f"{self.call.call_id}:hook:{self.utt_n + 1}")
        self.utt_n += 1
        return data

    def _track(self, cmds: list[Any], now: float) -> None:
        """Keep the local state machine in step with what the webhook decided."""
        s = self.settings
        for cmd in cmds:
            if cmd.type == "cmd.play_audio" and ":say:" not in cmd.utterance_id:
                self.speaking = cmd.utterance_id
                self.queue_end = max(now, self.queue_end) + len(cmd.pcm) / (2 * cmd.rate)
                self.speaking_until = self.queue_end + PLAYOUT_SLACK_S
            elif cmd.type == "cmd.speak" and cmd.text.strip():
                if self.speaking is None or not str(self.speaking).startswith(f"{self.call.call_id}:say:"):
                    self.speaking = f"speak:{cmd.command_id}"
                    self.queue_end = max(now, self.queue_end) + SPEAK_S_PER_CHAR * len(cmd.text)
                    self.speaking_until = self.queue_end + PLAYOUT_SLACK_S
            elif cmd.type == "cmd.pause":
                self.mode, self.resume_at = "paused", now + s.pause_resume_after_s
            elif cmd.type == "cmd.transfer":
                self.mode = "monitoring"
            elif cmd.type in ("cmd.hangup", "cmd.stop"):
                self.mode = "ended"
        self.last_activity = max(self.last_activity, now)
