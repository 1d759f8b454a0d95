"""PCMO builders, compatible with the published Piopiy SDK: ``Action`` and ``StreamAction``.

Usage mirrors the SDK documentation::

    stream = StreamAction()
    stream.stream(ws_url, {"listen_mode": "callee", "voice_quality": "8000"})
    stream.playMusic("hold.wav")
    stream.hangup()
    client.voice.call(to, piopiy_number, stream.PCMO())

Behaviour kept from the SDK: builder methods append one action; ``Action.PCMO()``
returns the list; ``StreamAction.PCMO()`` returns the list as a JSON string and
empties the builder; ``StreamAction.pause()/resume()/stop()/interrupt()/
playStream()`` append nothing and return the JSON text to send on the live
WebSocket (our gateway delivers it; the SDK never did).

Differences, on purpose: every appending method returns the builder, so calls
can be chained (the SDK returned None, so SDK-style code is unaffected); every
value is validated through ``piopiy_voice.pcmo_models`` and bad input raises
``PiopiyValidationError`` naming the field — the SDK wrote anything it was
given. Unknown option keys are refused (a typo would otherwise be dropped).
``stream_on_answer`` defaults to True, as the SDK documents (the SDK code
defaulted to False). ``input``/``playGetInput`` accept the documented option
name ``max_digits`` as a spelling of the wire key ``max_digit``; ``min_digit``
is refused, since the platform has no such key.
"""

from __future__ import annotations

import base64
import copy
import json
from typing import Any, Mapping

from .errors import PiopiyValidationError
from .pcmo_models import (
    BRIDGE_DEFAULTS,
    AUDIO_DATA_TYPES,
    CONTROL_ACTIONS,
    STREAM_AUDIO_RATES,
    StreamAudio,
    check_number,
    check_text,
    is_media_url,
    parse_action,
)

__all__ = ["PcmoBuilder", "Action", "StreamAction", "stream_audio_json", "control_json"]


def _json(obj: Any) -> str:
    # Compact, like the SDK's JSON.stringify output.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _options(opt: Mapping[str, Any] | None, allowed: tuple[str, ...], method: str) -> dict[str, Any]:
    if opt is None:
        return {}
    if not isinstance(opt, Mapping):
        raise PiopiyValidationError("options", f"{method}() options must be a dict, got {type(opt).__name__}")
    for key in opt:
        if key not in allowed:
            raise PiopiyValidationError(
                f"options.{key}", f"unknown {method}() option; expected one of {', '.join(allowed)}"
            )
    return dict(opt)


def _digit_options(opts: dict[str, Any]) -> dict[str, Any]:
    """Map the SDK docs' ``max_digits`` onto the wire's ``max_digit``; refuse ``min_digit``."""
    if "min_digit" in opts:
        raise PiopiyValidationError(
            "options.min_digit", "the platform has no minimum digit count; use max_digit"
        )
    if "max_digits" in opts:
        value = opts.pop("max_digits")
        if "max_digit" in opts and opts["max_digit"] != value:
            raise PiopiyValidationError(
                "options.max_digits", "conflicts with max_digit (they are the same setting)"
            )
        opts["max_digit"] = value
    return opts


class PcmoBuilder:
    """Actions common to ``Action`` and ``StreamAction``."""

    def __init__(self) -> None:
        self._actions: list[dict[str, Any]] = []

    # -- reading ------------------------------------------------------------

    def actions(self) -> list[dict[str, Any]]:
        """A copy of the actions appended so far (does not empty the builder)."""
        return copy.deepcopy(self._actions)

    def __len__(self) -> int:
        return len(self._actions)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._actions!r})"

    def _append(self, action: dict[str, Any]) -> "PcmoBuilder":
        model = parse_action(action, field="")
        self._actions.append(model.to_dict())
        return self

    # -- actions ------------------------------------------------------------

    def playMusic(self, file: str) -> "PcmoBuilder":
        """Play a media file: an http/https/ftp URL goes in ``file_url``, anything
        else is a file name of the app's media library (``file_name``)."""
        text = check_text(file, "file")
        key = "file_url" if is_media_url(text) else "file_name"
        return self._append({"action": "play", key: text})

    def speak(self, text: str) -> "PcmoBuilder":
        return self._append({"action": "speak", "text": text})

    def setValue(self, text: str) -> "PcmoBuilder":
        return self._append({"action": "param", "text": text})

    def record(self) -> "PcmoBuilder":
        return self._append({"action": "record"})

    def hangup(self) -> "PcmoBuilder":
        return self._append({"action": "hangup"})

    def call(self, to: Any, piopiy_number: Any, opt: Mapping[str, Any] | None = None) -> "PcmoBuilder":
        """Bridge the call to ``to`` (a number or a list of numbers, rung together
        with ``ring_type="group"``). Options: duration (s, default 5400), timeout
        (ring seconds, default 40), loop (default 1), ring_type — defaults and
        limits from ``pcmo_models.BRIDGE_DEFAULTS``/``BRIDGE_LIMITS``."""
        opts = _options(opt, ("duration", "timeout", "loop", "ring_type"), "call")
        if isinstance(to, (list, tuple)):
            if not to:
                raise PiopiyValidationError("to", "must name at least one number")
            numbers = [check_number(n, f"to[{i}]") for i, n in enumerate(to)]
        else:
            numbers = [check_number(to, "to")]
        action: dict[str, Any] = {
            "action": "bridge",
            "from": check_number(piopiy_number, "piopiy_number"),
            "connect": [{"type": "pstn", "number": n} for n in numbers],
            **{name: opts.get(name, default) for name, default in BRIDGE_DEFAULTS.items()},
        }
        if opts.get("ring_type") is not None:
            action["ring_type"] = opts["ring_type"]
        return self._append(action)

    def stream(self, ws_url: str, opt: Mapping[str, Any] | None = None) -> "PcmoBuilder":
        """Have the platform open the media WebSocket to ``ws_url`` (ws:// or wss://).

        Options: listen_mode caller|callee|both (default caller), voice_quality
        8000|16000|32000 as int or numeric string (default 8000), stream_on_answer
        bool (default True: start streaming when the call is answered).
        """
        opts = _options(opt, ("listen_mode", "voice_quality", "stream_on_answer"), "stream")
        return self._append({
            "action": "stream",
            "ws_url": ws_url,
            "listen_mode": opts.get("listen_mode", "caller"),
            "voice_quality": opts.get("voice_quality", 8000),
            "stream_on_answer": opts.get("stream_on_answer", True),
        })


class Action(PcmoBuilder):
    """The general PCMO builder. ``PCMO()`` returns the list of actions."""

    def input(self, action_url: str, opt: Mapping[str, Any] | None = None) -> "Action":
        """Collect DTMF; options max_digit (alias max_digits, default 1), timeout (s, default 5)."""
        opts = _digit_options(_options(opt, ("max_digit", "max_digits", "min_digit", "timeout"), "input"))
        self._append({
            "action": "input",
            "action_url": action_url,
            "max_digit": opts.get("max_digit", 1),
            "timeout": opts.get("timeout", 5),
        })
        return self

    def playGetInput(self, action_url: str, file: str, opt: Mapping[str, Any] | None = None) -> "Action":
        """Play ``file`` (a media-library file name) and collect DTMF. Options
        max_digit (alias max_digits, default 1), max_retry (default 3), timeout (default 5)."""
        opts = _digit_options(_options(
            opt, ("max_digit", "max_digits", "min_digit", "max_retry", "timeout"), "playGetInput"))
        self._append({
            "action": "play_get_input",
            "action_url": action_url,
            "file_name": file,
            "max_digit": opts.get("max_digit", 1),
            "max_retry": opts.get("max_retry", 3),
            "timeout": opts.get("timeout", 5),
        })
        return self

    def PCMO(self) -> list[dict[str, Any]]:
        """The actions as a list (a copy; the builder keeps them)."""
        return self.actions()


class StreamAction(PcmoBuilder):
    """Builder for calls that stream; also produces live-socket control messages."""

    def PCMO(self) -> str:
        """The actions as a JSON string; the builder is then empty (SDK behaviour)."""
        text = _json(self._actions)
        self._actions = []
        return text

    # -- live-socket messages (nothing appended) ------------------------------

    def pause(self) -> str:
        """Ask the platform to stop sending us audio for now."""
        return control_json("pause")

    def resume(self) -> str:
        return control_json("resume")

    def stop(self) -> str:
        """End the stream for good; the call goes on."""
        return control_json("stop")

    def interrupt(self) -> str:
        """Cut the audio now playing to the caller (barge-in)."""
        return control_json("break")

    def playStream(self, audio_base64: str, audio_type: str = "raw", sample_rate: int | str = 8000) -> str:
        """A ``streamAudio`` message: base64 audio of ``audio_type`` raw|mp3|wav|ogg
        at ``sample_rate`` 8000|16000 (raw = 16-bit little-endian mono PCM)."""
        if isinstance(audio_base64, (bytes, bytearray)):
            raise PiopiyValidationError(
                "audio_base64", "must be a base64 str; for raw PCM bytes use stream_audio_json()"
            )
        msg = _validated_stream_audio(audio_base64, audio_type, sample_rate)
        return _json(msg.to_dict())


def _validated_stream_audio(audio_b64: Any, audio_type: Any, sample_rate: Any) -> StreamAudio:
    from pydantic import ValidationError

    from .pcmo_models import _convert

    try:
        return StreamAudio.model_validate(
            {"type": "streamAudio",
             "data": {"audioDataType": audio_type, "sampleRate": sample_rate, "audioData": audio_b64}}
        )
    except ValidationError as exc:
        err = _convert(exc, "")
        names = {"data.audioData": "audio_base64", "data.audioDataType": "audio_type",
                 "data.sampleRate": "sample_rate"}
        raise PiopiyValidationError(names.get(err.field, err.field), err.message) from None


def control_json(action: str) -> str:
    """``{"action":"pause"|"resume"|"stop"|"break"}`` as sent on the live socket."""
    if action not in CONTROL_ACTIONS:
        raise PiopiyValidationError("action", f"must be one of {'|'.join(CONTROL_ACTIONS)}, got {action!r}")
    return _json({"action": action})


def stream_audio_json(pcm: bytes, sample_rate: int = 8000, audio_type: str = "raw") -> str:
    """Encode audio bytes into a ``streamAudio`` message (the gateway's hot path:
    checks the cheap things, skips model validation)."""
    if not isinstance(pcm, (bytes, bytearray, memoryview)) or not pcm:
        raise PiopiyValidationError("pcm", "must be non-empty bytes")
    if isinstance(sample_rate, bool) or sample_rate not in STREAM_AUDIO_RATES:
        raise PiopiyValidationError("sample_rate", f"must be 8000 or 16000, got {sample_rate!r}")
    if audio_type not in AUDIO_DATA_TYPES:
        raise PiopiyValidationError("audio_type", f"must be {'|'.join(AUDIO_DATA_TYPES)}, got {audio_type!r}")
    if audio_type == "raw" and len(pcm) % 2:
        raise PiopiyValidationError("pcm", "raw 16-bit PCM must have an even number of bytes")
    data = base64.b64encode(pcm).decode("ascii")
    return ('{"type":"streamAudio","data":{"audioDataType":"%s","sampleRate":%d,"audioData":"%s"}}'
            % (audio_type, sample_rate, data))
