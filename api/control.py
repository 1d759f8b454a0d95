"""Control of a live call over HTTP: a JSON body -> one command -> the gateway's answer.

Bodies (every control the CLI has; ``action`` picks it)::

    {"action": "pause" | "resume" | "stop" | "interrupt" | "hangup"}
    {"action": "play_music", "file": "hold_music.wav"}       # or an http(s)/ftp URL
    {"action": "speak", "text": "One moment please."}
    {"action": "transfer", "to": ["919000000001"] | "919000000001" | "supervisor",
     "caller_id": "9190…"?, "ring_type": "group"?}
    {"action": "pcmo", "pcmo": [{"action": "play", "file_name": "x.wav"}, …]}

``parse_control`` is pure (tests feed it bodies); ``send_command`` is the
asyncio twin of ``gateway.control.CallHandle.send`` built from the same
blocks: find the gateway in the call record, XADD the command to that
gateway's command stream with ``reply_to`` a private reply stream, block on
that stream for the ``CommandResult``, delete it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import ValidationError

from piopiy_voice import callrecord, keys
from piopiy_voice import contracts as c
from piopiy_voice.errors import PiopiyValidationError, from_pydantic
from piopiy_voice.gateway.control import CallNotFound, CommandTimeout
from piopiy_voice.redisconn import MAX_BLOCK_MS

ACTIONS: dict[str, type] = {
    "pause": c.Pause, "resume": c.Resume, "stop": c.StopStream, "interrupt": c.Interrupt,
    "hangup": c.Hangup, "play_music": c.PlayMusic, "speak": c.Speak, "transfer": c.Transfer,
    "pcmo": c.RawPcmo,
}
_FIELDS = {"pause": (), "resume": (), "stop": (), "interrupt": (), "hangup": (),
           "play_music": ("file",), "speak": ("text",),
           "transfer": ("to", "caller_id", "ring_type", "duration", "timeout", "loop"),
           "pcmo": ("pcmo",)}
MAX_TEXT = 2000


class CallNotLive(CallNotFound):
    """The call exists but is not live (queued, dialing, placed or ended)."""

    def __init__(self, message: str, state: str) -> None:
        super().__init__(message)
        self.state = state


def parse_control(body: Any, call_id: str, *, default_caller_id: str | None = None,
                  supervisor_number: str | None = None, issued_by: str = "api") -> Any:
    """A validated command model for ``call_id``; ``PiopiyValidationError`` naming the field."""
    if not isinstance(body, dict):
        raise PiopiyValidationError("body", "must be a JSON object with an 'action'")
    action = body.get("action")
    if isinstance(action, str):
        action = action.replace("-", "_")
    if action not in ACTIONS:
        raise PiopiyValidationError("action", f"must be one of {', '.join(ACTIONS)}; got {action!r}")
    extra = sorted(set(body) - {"action", *_FIELDS[action]})
    if extra:
        raise PiopiyValidationError(extra[0], f"is not an option of {action}")
    fields = {k: body[k] for k in _FIELDS[action] if k in body and body[k] is not None}
    if action == "speak" and isinstance(fields.get("text"), str) and len(fields["text"]) > MAX_TEXT:
        raise PiopiyValidationError("text", f"longer than {MAX_TEXT} characters")
    if action == "transfer":
        to = fields.get("to")
        if to == "supervisor":
            if not supervisor_number:
                raise PiopiyValidationError("to", "no supervisor number is configured (PV_SUPERVISOR_NUMBER)")
            to = supervisor_number
        if isinstance(to, (str, int)) and not isinstance(to, bool):
            to = [to]
        if not isinstance(to, list) or not to or len(to) > 10:
            raise PiopiyValidationError("to", "must be a number, a list of 1-10 numbers, or 'supervisor'")
        numbers = []
        for n in to:
            digits = str(n).lstrip("+") if isinstance(n, (str, int)) and not isinstance(n, bool) else ""
            if not digits.isdigit() or not 6 <= len(digits) <= 15:
                raise PiopiyValidationError("to", f"{n!r} is not a phone number (6-15 digits)")
            numbers.append(digits)
        fields["to"] = numbers
        caller = fields.get("caller_id") or default_caller_id
        if not caller:
            raise PiopiyValidationError("caller_id", "not given and PIOPIY_CALLER_ID is not set")
        fields["caller_id"] = str(caller)
    try:
        return ACTIONS[action](call_id=call_id, issued_by=issued_by, **fields)
    except ValidationError as exc:
        raise from_pydantic(exc) from None


async def live_gateway(ar: Any, call_id: str) -> str:
    """The gateway holding a live call; ``CallNotFound``/``CallNotLive`` otherwise."""
    rec = callrecord.decode_record(await ar.hgetall(keys.call_meta(call_id)))
    if not rec:
        raise CallNotFound(f"call {call_id!r} is unknown")
    state = rec.get("state", "?")
    if state != "live" or not rec.get("gateway_id"):
        extra = f" ({rec['end_reason']})" if rec.get("end_reason") else ""
        raise CallNotLive(f"call {call_id!r} is not live: state {state}{extra}", state)
    return rec["gateway_id"]


async def send_command(ar: Any, cmd: Any, timeout_s: float) -> c.CommandResult:
    """Deliver ``cmd`` to the gateway holding its call and wait for the result.

    ``ar`` must have a socket timeout above ``MAX_BLOCK_MS`` (``connect_async``)."""
    gw = await live_gateway(ar, cmd.call_id)
    reply = keys.reply_stream(f"api-{uuid.uuid4().hex}")
    cmd = cmd.model_copy(update={"reply_to": reply})
    try:
        await ar.xadd(keys.gateway_commands(gw), c.encode(cmd), maxlen=keys.COMMAND_STREAM_MAXLEN,
                      approximate=True)
        deadline = time.monotonic() + timeout_s
        last = "0-0"
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                raise CommandTimeout(f"no answer from gateway {gw!r} for call {cmd.call_id!r} "
                                     f"within {timeout_s:g}s")
            got = await ar.xread({reply: last}, count=10, block=min(left_ms, MAX_BLOCK_MS))
            for _stream, entries in got or ():
                for entry_id, fields in entries:
                    last = entry_id
                    try:
                        msg = c.decode(fields)
                    except ValueError:
                        continue
                    if isinstance(msg, c.CommandResult) and msg.command_id == cmd.command_id:
                        return msg
    finally:
        await ar.delete(reply)
