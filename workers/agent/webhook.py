"""WebhookAgent: turn events POSTed to a URL, commands taken from the reply.

It is the ``DefaultAgent`` (VAD, DTMF, barge-in, timers all stay local and
instant) whose *turn-level* decisions are asked of an HTTP endpoint
(``Settings.agent_webhook_url``, ``--webhook URL``). Events never carry raw
audio, only what was heard::

    POST <url>   Content-Type: application/json
    {"event": "caller_turn", "event_id": "call-1:caller_turn:3", "call_id": "call-1",
     "time": 1700000000.52, "rate": 8000, "params": {...}, "mode": "conversation",
     "turn": 3, "speech_ms": 1840, "caller_speech_ms_total": 5200, "keys": ["5"]}

Events: ``call_started``, ``caller_turn`` (speech_ms), ``dtmf`` (key),
``silence`` (count: 1st, 2nd... timeout in a row), ``call_ended`` (reason; the
reply is ignored). ``event_id`` is stable: after a worker crash the same event
may be POSTed again, so endpoints should treat it as an idempotency key.

Reply (200, JSON)::

    {"commands": [{"type": "cmd.speak", "text": "Sure."},
                  {"type": "cmd.play_audio", "prompt": "reply"},
                  {"type": "cmd.play_audio", "pcm_b64": "...", "rate": 8000},
                  {"type": "cmd.transfer", "to": ["9190..."], "caller_id": "9180..."}]}

Any command type of ``piopiy_voice.contracts`` is accepted and validated (ids and
``call_id`` are set by us). ``{"commands": []}`` means "do nothing";
``{"commands": null}`` or no ``commands`` key means "do what the default agent
would". Fallback: on a timeout (``Settings.agent_webhook_timeout_s``), a
connection error, a non-2xx status, or a reply that is not JSON or has an
invalid command, the whole reply is discarded and the DefaultAgent's decision
is used instead (``FALLBACK = "default"``); set ``FALLBACK = "noop"`` in a
subclass to do nothing instead. Failures are counted in ``webhook_failures``.

The POST runs inside the worker loop: keep the endpoint fast (the default
timeout is 2 s) — a slow webhook delays the worker's other calls.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
import urllib.error
import urllib.request
from typing import Any, Callable

from piopiy_voice import contracts as c

from .default import PROMPTS, DefaultAgent, prompt

log = logging.getLogger(__name__)

MAX_REPLY_BYTES = 1_000_000
_OURS = ("command_id", "seq", "call_id", "v", "reply_to", "issued_by")


class WebhookError(Exception):
    pass


class WebhookAgent(DefaultAgent):
    FALLBACK = "default"

    def __init__(self, call, settings):
        super().__init__(call, settings)
        if not settings.agent_webhook_url:
            raise ValueError("agent_webhook_url (PV_AGENT_WEBHOOK_URL / --webhook) is required")
        if not settings.agent_webhook_url.startswith(("http://", "https://")):
            raise ValueError(f"agent_webhook_url must be http(s)://, got {settings.agent_webhook_url!r}")
        self.url = settings.agent_webhook_url
        self.timeout = settings.agent_webhook_timeout_s
        self.webhook_failures = 0
        self.events_sent = 0

    _FIELDS = DefaultAgent._FIELDS + ("webhook_failures", "events_sent")

    def decide(self, kind: str, info: dict[str, Any], now: float,
               default: Callable[[], list[Any]]) -> list[Any]:
        self.events_sent += 1
        body = {
            "event": kind, "event_id": f"{self.call.call_id}:{kind}:{self.events_sent}",
            "call_id": self.call.call_id, "time": round(now, 3), "rate": self.call.rate,
            "params": self.call.params, "mode": self.mode, "keys": self.keys[-20:], **info,
        }
        try:
            reply = self._post(body)
            cmds = self._commands(reply)
        except WebhookError as exc:
            self.webhook_failures += 1
            log.warning("call %s: webhook %s failed (%s); using %s behaviour",
                        self.call.call_id, kind, exc, self.FALLBACK)
            return default() if self.FALLBACK == "default" else []
        if kind == "call_ended":
            return []
        if cmds is None:
            return default()
        self._track(cmds, now)
        return cmds

    def _post(self, body: dict[str, Any]) -> Any:
        req = urllib.request.Request(
            self.url, data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "piopiy-voice-worker"},
        )
        # The socket timeout bounds each read, not the whole exchange: a reply
        # trickling in would hold the worker loop; the deadline bounds it all.
        deadline = time.monotonic() + self.timeout
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                chunks, size = [], 0
                while size < MAX_REPLY_BYTES:
                    if time.monotonic() > deadline:
                        raise WebhookError(f"no complete reply within {self.timeout:g}s")
                    chunk = resp.read1(MAX_REPLY_BYTES - size)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    size += len(chunk)
                raw = b"".join(chunks)
        except urllib.error.HTTPError as exc:
            raise WebhookError(f"HTTP {exc.code}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise WebhookError(f"unreachable: {exc}") from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise WebhookError("reply is not JSON") from None

    def _commands(self, reply: Any) -> list[Any] | None:
        if not isinstance(reply, dict):
            raise WebhookError("reply must be a JSON object")
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
            if cmd.type == "cmd.play_audio":
                self.speaking = cmd.utterance_id
                self.speaking_until = now + len(cmd.pcm) / (2 * cmd.rate) + 0.3
            elif cmd.type == "cmd.speak":
                self.speaking = f"speak:{cmd.command_id}"
                self.speaking_until = now + 0.08 * len(cmd.text) + 0.3
            elif cmd.type == "cmd.pause":
                self.mode, self.resume_at = "paused", now + s.pause_resume_after_s
            elif cmd.type == "cmd.transfer":
                self.mode = "monitoring"
            elif cmd.type in ("cmd.hangup", "cmd.stop"):
                self.mode = "ended"
