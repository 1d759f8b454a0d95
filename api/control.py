"""Control of a live call over HTTP: a JSON body -> one command -> the gateway's answer.

Bodies (every control the CLI has; ``action`` picks it)::

    {"action": "pause" | "resume" | "stop" | "interrupt" | "hangup"}
    {"action": "play_music", "file": "hold_music.wav"}       # or an http(s)/ftp URL
    {"action": "speak", "text": "One moment please."}
    {"action": "transfer", "to": ["919000000001"] | "919000000001" | "supervisor",
     "caller_id": "9190…"?, "ring_type": "group"?}
    {"action": "pcmo", "pcmo": [{"action": "play", "file_name": "x.wav"}, …]}

``parse_control`` is pure (tests feed it bodies); the command then goes to
the gateway holding the call by ``gateway.control.send_async`` (the asyncio
shell of the exchange ``CallHandle.send`` makes: one copy of it).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from piopiy_voice import contracts as c
from piopiy_voice.errors import PiopiyValidationError, from_pydantic

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
