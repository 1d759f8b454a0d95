"""What the platform understands on the live socket (protocol doc, section 3).

Commands from Redis become either a stream-control object
(``{"action": "pause"|"resume"|"stop"|"break"}``), a ``streamAudio`` object, or
a PCMO list sent as JSON. Everything is built and validated by the shared PCMO
builders (``piopiy_voice.pcmo``), so the gateway sends exactly what a PCMO built by
the dialer would contain; bad values raise ``PiopiyValidationError`` (a
``ValueError`` naming the field), which the session turns into a rejection.
"""

from __future__ import annotations

import json
from typing import Any

from piopiy_voice.pcmo import Action, control_json, stream_audio_json
from piopiy_voice.pcmo_models import BRIDGE_DEFAULTS, STREAM_AUDIO_RATES, pcmo_to_list

#: Largest text message sent on a call's socket. The platform's own limit is not
#: documented (websockets' default is 1 MiB); a message over it makes the peer
#: close with 1009 and ends the call, so commands that would build one are
#: refused instead. 64 KiB is an hour of ``speak`` text; audio goes in 40 ms chunks.
MAX_MESSAGE_BYTES = 64 * 1024

__all__ = ["MAX_MESSAGE_BYTES", "STREAM_AUDIO_RATES", "control", "stream_audio", "play_music", "speak", "hangup",
           "bridge", "raw_pcmo"]


def dumps(obj: Any) -> str:
    # Compact, like the builders' own JSON output.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def control(action: str) -> str:
    """``{"action": "pause"}`` and friends."""
    return control_json(action)


def stream_audio(pcm: bytes, rate: int) -> str:
    return stream_audio_json(pcm, rate)


def play_music(file: str) -> str:
    return dumps(Action().playMusic(file).PCMO())


def speak(text: str) -> str:
    return dumps(Action().speak(text).PCMO())


def hangup() -> str:
    return dumps(Action().hangup().PCMO())


def bridge(to: list[str], caller_id: str, *, duration: int = BRIDGE_DEFAULTS["duration"],
           timeout: int = BRIDGE_DEFAULTS["timeout"], loop: int = BRIDGE_DEFAULTS["loop"],
           ring_type: str | None = None) -> str:
    """A bridge PCMO; defaults and limits are the PCMO bridge model's (``BRIDGE_*``),
    the same ``contracts.Transfer`` takes, so a Transfer the worker could build
    is never refused here for its options."""
    opts: dict[str, Any] = {"duration": duration, "timeout": timeout, "loop": loop}
    if ring_type:
        opts["ring_type"] = ring_type
    return dumps(Action().call(list(to), caller_id, opts).PCMO())


def raw_pcmo(pcmo: list[dict[str, Any]]) -> str:
    """Validate a PCMO list and serialise it; ValueError names the bad item."""
    return dumps(pcmo_to_list(pcmo))
