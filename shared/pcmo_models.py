"""Pydantic models of the PCMO (Piopiy call-control JSON) and of our live-socket messages.

Theory of operation
-------------------
A PCMO is a JSON list of action objects discriminated on ``"action"``
(play, speak, param, record, hangup, bridge, stream, input, play_get_input).
Every action has one frozen model here; ``PCMO_ADAPTER`` (one TypeAdapter over
the discriminated union, built at import) validates a whole list. The builders
in ``piopiy_voice.pcmo`` validate each action they append through the same models,
so "what the builder emits" and "what the sandbox/gateway accept" cannot drift.

Models forbid unknown keys: a PCMO is something we send, and a typo such as
``max_digits`` must fail here rather than be ignored by the platform. Values
that have one faithful conversion are normalised (``"8000"`` -> ``8000``,
``"+919..."`` -> ``919...``); anything else is refused with a
``PiopiyValidationError`` whose ``field`` is the path of the bad value
(``pcmo[0].voice_quality``, ``data.audioData``).

What we send on the live WebSocket (``parse_ws_message``): a ``streamAudio``
object, a control object ``{"action": "pause"|"resume"|"stop"|"break"}``, or a
PCMO list (returned as a list of action models).

JSON text from outside is parsed with ``errors.load_json``: nesting deeper than
``errors.MAX_JSON_DEPTH`` is refused before the parser recurses.

The bridge (transfer to a human) defaults and limits live here once
(``BRIDGE_DEFAULTS``, ``BRIDGE_LIMITS``, used by ``Bridge``):
``contracts.Transfer``, the builders (``pcmo.Action.call``), the dialer's
``CallRequest`` and the gateway take theirs from these, so a Transfer valid at
the worker is never refused at the gateway.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Callable, Iterable, Literal, Union
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from .audio.pcm import SUPPORTED_RATES
from .errors import PiopiyValidationError, load_json

#: The platform's voice qualities are our stream rates (one constant: audio.pcm).
VOICE_QUALITIES = SUPPORTED_RATES
STREAM_AUDIO_RATES = (8000, 16000)
LISTEN_MODES = ("caller", "callee", "both")
AUDIO_DATA_TYPES = ("raw", "mp3", "wav", "ogg")
CONTROL_ACTIONS = ("pause", "resume", "stop", "break")
MEDIA_URL_SCHEMES = ("http", "https", "ftp")
#: E.164 allows at most 15 digits; below 5 is no routable number.
NUMBER_MIN_DIGITS, NUMBER_MAX_DIGITS = 5, 15
#: Bridge option -> default: call seconds, ring seconds, ring rounds.
BRIDGE_DEFAULTS: dict[str, int] = {"duration": 5400, "timeout": 40, "loop": 1}
#: Bridge option -> (minimum, maximum), inclusive.
BRIDGE_LIMITS: dict[str, tuple[int, int]] = {"duration": (1, 86400), "timeout": (1, 3600), "loop": (1, 100)}
BRIDGE_RING_TYPES = ("group",)

# --------------------------------------------------------------------------
# Value checks, shared with the builders (each names the field it checks)
# --------------------------------------------------------------------------


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_int(value: Any, field: str, *, minimum: int | None = None,
              maximum: int | None = None) -> int:
    """An int, or a string of decimal digits; never a bool or a float."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise PiopiyValidationError(field, f"must be an integer, got {_short(value)}")
    if isinstance(value, str):
        text = value.strip()
        if not text.isdigit() or not text.isascii():
            raise PiopiyValidationError(field, f"must be an integer, got {_short(value)}")
        value = int(text)
    if minimum is not None and value < minimum:
        raise PiopiyValidationError(field, f"must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise PiopiyValidationError(field, f"must be <= {maximum}, got {value}")
    return value


def check_choice_int(value: Any, field: str, choices: tuple[int, ...]) -> int:
    """One of ``choices``, given as an int or a numeric string."""
    try:
        number = check_int(value, field)
    except PiopiyValidationError:
        raise PiopiyValidationError(
            field, f"must be one of {', '.join(map(str, choices))}, got {_short(value)}"
        ) from None
    if number not in choices:
        raise PiopiyValidationError(
            field, f"must be one of {', '.join(map(str, choices))}, got {_short(value)}"
        )
    return number


def check_choice(value: Any, field: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise PiopiyValidationError(field, f"must be one of {'|'.join(choices)}, got {_short(value)}")
    return value


def check_bool(value: Any, field: str) -> bool:
    # "false" is truthy in Python: refuse strings rather than guess.
    if not isinstance(value, bool):
        raise PiopiyValidationError(field, f"must be true or false, got {_short(value)}")
    return value


def check_text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PiopiyValidationError(field, f"must be a non-empty string, got {_short(value)}")
    return value


def check_number(value: Any, field: str) -> int:
    """A phone number in international form, returned as the int the wire carries.

    Accepts an int or a digit string with an optional leading ``+``. A leading
    ``0`` (trunk prefix) is refused: as an int it would silently lose the zero.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise PiopiyValidationError(field, f"must be a phone number (digits), got {_short(value)}")
    text = str(value).strip() if isinstance(value, str) else str(value)
    if text.startswith("+"):
        text = text[1:]
    if not text.isascii() or not text.isdigit():
        raise PiopiyValidationError(
            field, f"must contain digits only (country code first, optional '+'), got {_short(value)}"
        )
    if text.startswith("0"):
        raise PiopiyValidationError(
            field, f"must start with the country code, not 0, got {_short(value)}"
        )
    if not NUMBER_MIN_DIGITS <= len(text) <= NUMBER_MAX_DIGITS:
        raise PiopiyValidationError(
            field,
            f"must have {NUMBER_MIN_DIGITS}-{NUMBER_MAX_DIGITS} digits, got {len(text)} in {_short(value)}",
        )
    return int(text)


def _check_url(value: Any, field: str, schemes: tuple[str, ...]) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PiopiyValidationError(field, f"must be a non-empty URL string, got {_short(value)}")
    if value != value.strip() or any(c.isspace() for c in value):
        raise PiopiyValidationError(field, f"must not contain whitespace, got {_short(value)}")
    parts = urlsplit(value)
    if parts.scheme.lower() not in schemes or not parts.netloc:
        allowed = " or ".join(f"{s}://" for s in schemes)
        raise PiopiyValidationError(field, f"must be a {allowed} URL with a host, got {_short(value)}")
    return value


def check_ws_url(value: Any, field: str = "ws_url") -> str:
    return _check_url(value, field, ("ws", "wss"))


def check_http_url(value: Any, field: str) -> str:
    return _check_url(value, field, ("http", "https"))


def is_media_url(value: str) -> bool:
    """True when ``value`` is an http/https/ftp URL (play by URL, not by file name)."""
    return urlsplit(value.strip()).scheme.lower() in MEDIA_URL_SCHEMES


def check_file_name(value: Any, field: str = "file_name") -> str:
    text = check_text(value, field)
    if is_media_url(text):
        raise PiopiyValidationError(field, f"is a URL; put it in file_url, got {_short(value)}")
    return text


def check_base64(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise PiopiyValidationError(field, f"must be a non-empty base64 string, got {_short(value)}")
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise PiopiyValidationError(field, "is not valid base64") from None
    return value


def _check(check: Callable[..., Any], field: str, *, optional: bool = False,
           **kw: Any) -> BeforeValidator:
    """A field's before-validator: ``check(value, field, **kw)`` (``None`` passes
    when ``optional``). The check's error names ``field``."""
    if optional:
        return BeforeValidator(lambda v: None if v is None else check(v, field, **kw))
    return BeforeValidator(lambda v: check(v, field, **kw))


_Text = Annotated[str, _check(check_text, "text")]
_ActionUrl = Annotated[str, _check(check_http_url, "action_url")]
_FileName = Annotated[str, _check(check_file_name, "file_name")]
_MaxDigit = Annotated[int, _check(check_int, "max_digit", minimum=1, maximum=32)]
_InputTimeout = Annotated[int, _check(check_int, "timeout", minimum=1, maximum=600)]

# --------------------------------------------------------------------------
# PCMO actions
# --------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def to_dict(self) -> dict[str, Any]:
        """The wire JSON object (aliases, unset optionals left out)."""
        return self.model_dump(by_alias=True, exclude_none=True)


class Play(_Model):
    """Play a file from the app's media library (``file_name``) or a URL (``file_url``)."""

    action: Literal["play"] = "play"
    file_url: Annotated[str | None, _check(_check_url, "file_url", optional=True,
                                           schemes=MEDIA_URL_SCHEMES)] = None
    file_name: Annotated[str | None, _check(check_file_name, "file_name", optional=True)] = None

    @model_validator(mode="after")
    def _one_source(self) -> "Play":
        if (self.file_url is None) == (self.file_name is None):
            raise PiopiyValidationError("file_name", "exactly one of file_name or file_url is required")
        return self


class Speak(_Model):
    action: Literal["speak"] = "speak"
    text: _Text


class Param(_Model):
    """``setValue(text)``: a value the platform passes back with call events."""

    action: Literal["param"] = "param"
    text: _Text


class Record(_Model):
    action: Literal["record"] = "record"


class Hangup(_Model):
    action: Literal["hangup"] = "hangup"


class PstnTarget(_Model):
    type: Literal["pstn"] = "pstn"
    number: Annotated[int, _check(check_number, "number")]


def check_bridge_option(value: Any, field: str, *, name: str | None = None) -> int:
    """``value`` as bridge option ``name`` (duration/timeout/loop; default: ``field``)
    within ``BRIDGE_LIMITS``; the error names ``field``."""
    low, high = BRIDGE_LIMITS[name or field]
    return check_int(value, field, minimum=low, maximum=high)


def _BridgeInt(name: str) -> Any:  # noqa: N802 (a type factory)
    return Annotated[int, _check(check_bridge_option, name)]


class Bridge(_Model):
    """Connect the call to one or more numbers (hand-off to a human)."""

    action: Literal["bridge"] = "bridge"
    from_: Annotated[int, _check(check_number, "from")] = Field(alias="from")
    connect: list[PstnTarget] = Field(min_length=1)
    duration: _BridgeInt("duration") = BRIDGE_DEFAULTS["duration"]
    timeout: _BridgeInt("timeout") = BRIDGE_DEFAULTS["timeout"]
    loop: _BridgeInt("loop") = BRIDGE_DEFAULTS["loop"]
    ring_type: Literal[BRIDGE_RING_TYPES] | None = None  # type: ignore[valid-type]


class Stream(_Model):
    """Open the media WebSocket: the platform dials ``ws_url``.

    Defaults (used when parsing a PCMO that leaves them out, and by the
    builders): ``listen_mode`` caller, ``voice_quality`` 8000,
    ``stream_on_answer`` True (the documented default).
    """

    action: Literal["stream"] = "stream"
    ws_url: Annotated[str, _check(check_ws_url, "ws_url")]
    listen_mode: Annotated[Literal["caller", "callee", "both"],
                           _check(check_choice, "listen_mode", choices=LISTEN_MODES)] = "caller"
    voice_quality: Annotated[int, _check(check_choice_int, "voice_quality",
                                         choices=VOICE_QUALITIES)] = 8000
    stream_on_answer: Annotated[bool, _check(check_bool, "stream_on_answer")] = True


class Input(_Model):
    """Collect DTMF digits; the platform POSTs them to ``action_url``."""

    action: Literal["input"] = "input"
    action_url: _ActionUrl
    max_digit: _MaxDigit = 1
    timeout: _InputTimeout = 5


class PlayGetInput(_Model):
    """Play ``file_name`` and collect DTMF digits (retried ``max_retry`` times)."""

    action: Literal["play_get_input"] = "play_get_input"
    action_url: _ActionUrl
    file_name: _FileName
    max_digit: _MaxDigit = 1
    max_retry: Annotated[int, _check(check_int, "max_retry", minimum=0, maximum=10)] = 3
    timeout: _InputTimeout = 5


PcmoAction = Annotated[
    Union[Play, Speak, Param, Record, Hangup, Bridge, Stream, Input, PlayGetInput],
    Field(discriminator="action"),
]
ACTION_NAMES = ("play", "speak", "param", "record", "hangup", "bridge", "stream", "input",
                "play_get_input")

#: One adapter for a whole PCMO list, one for a single action; built once.
PCMO_ADAPTER: TypeAdapter[list[Any]] = TypeAdapter(list[PcmoAction])
ACTION_ADAPTER: TypeAdapter[Any] = TypeAdapter(PcmoAction)

# Keys the published SDK docs use but the wire does not know: point at the real one.
_MISNAMED_KEYS = {
    "max_digits": "the wire key is 'max_digit'",
    "min_digit": "not a PCMO key (the platform has no minimum); use 'max_digit'",
}

# --------------------------------------------------------------------------
# Live-socket messages we send
# --------------------------------------------------------------------------


class StreamAudioData(_Model):
    audioDataType: Annotated[Literal["raw", "mp3", "wav", "ogg"],
                             _check(check_choice, "audioDataType", choices=AUDIO_DATA_TYPES)] = "raw"
    sampleRate: Annotated[int, _check(check_choice_int, "sampleRate",
                                      choices=STREAM_AUDIO_RATES)] = 8000
    audioData: Annotated[str, _check(check_base64, "audioData")]

    def audio_bytes(self) -> bytes:
        return base64.b64decode(self.audioData)


class StreamAudio(_Model):
    """Audio for the platform to play to the caller."""

    type: Literal["streamAudio"] = "streamAudio"
    data: StreamAudioData


class StreamControl(_Model):
    """pause/resume streaming to us, stop the stream, or break (cut current playback)."""

    action: Literal["pause", "resume", "stop", "break"]


# --------------------------------------------------------------------------
# Parsing entry points
# --------------------------------------------------------------------------


def _field_path(loc: Iterable[Any], prefix: str) -> str:
    path = prefix
    after_index = True  # a single-action location starts with the tag too
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
            after_index = True
            continue
        # A discriminated union inserts the tag into the location: drop it.
        if after_index and part in ACTION_NAMES:
            after_index = False
            continue
        after_index = False
        part = "from" if part == "from_" else part
        path = f"{path}.{part}" if path else str(part)
    return path or "value"


def _convert(exc: ValidationError, prefix: str) -> PiopiyValidationError:
    err = exc.errors()[0]
    cause = (err.get("ctx") or {}).get("error")
    loc = list(err.get("loc", ()))
    if isinstance(cause, PiopiyValidationError):
        message = cause.message
        if loc[-1:] != [cause.field]:
            # A model-level check (play's file_name/file_url) names its own field.
            loc.append(cause.field)
    else:
        message = err["msg"]
        if err["type"] == "extra_forbidden" and loc and loc[-1] in _MISNAMED_KEYS:
            message = f"unknown key: {_MISNAMED_KEYS[loc[-1]]}"
        elif err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] == "union_tag_invalid":
            tag = (err.get("ctx") or {}).get("tag")
            message = f"unknown action {_short(tag)}; expected one of {', '.join(ACTION_NAMES)}"
            loc = [*loc, "action"]
        elif err["type"] == "union_tag_not_found":
            message = "missing 'action'"
            loc = [*loc, "action"]
    extra = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
    return PiopiyValidationError(_field_path(loc, prefix), message + extra)


def _as_action_list(obj: Any, field: str) -> list[Any]:
    from .pcmo import PcmoBuilder  # the builders import this module

    if isinstance(obj, PcmoBuilder):
        return obj.actions()
    if isinstance(obj, (str, bytes, bytearray)):
        obj = load_json(obj, field)
    if isinstance(obj, dict):
        raise PiopiyValidationError(field, "must be a list of actions, got a single object (wrap it in [...])")
    if not isinstance(obj, (list, tuple)):
        raise PiopiyValidationError(
            field, f"must be a builder, a list or a JSON string, got {type(obj).__name__}"
        )
    if not obj:
        raise PiopiyValidationError(field, "must contain at least one action")
    return [item.to_dict() if isinstance(item, _Model) else item for item in obj]


def parse_action(obj: Any, field: str = "action") -> Any:
    """Validate one action object (dict) -> its model."""
    try:
        return ACTION_ADAPTER.validate_python(obj)
    except ValidationError as exc:
        raise _convert(exc, field) from None


def parse_pcmo(obj: Any, field: str = "pcmo") -> list[Any]:
    """A builder, a list of action dicts/models, or a JSON string -> list of action models.

    A builder is read without being emptied (``StreamAction.PCMO()`` empties it;
    this does not).
    """
    items = _as_action_list(obj, field)
    try:
        return PCMO_ADAPTER.validate_python(items)
    except ValidationError as exc:
        raise _convert(exc, field) from None


def pcmo_to_list(obj: Any, field: str = "pcmo") -> list[dict[str, Any]]:
    """Like ``parse_pcmo`` but returns validated, normalised plain dicts (the wire form)."""
    return [model.to_dict() for model in parse_pcmo(obj, field)]


def parse_ws_message(text: str | bytes) -> StreamAudio | StreamControl | list[Any]:
    """Validate a text message we send on the live socket.

    Returns a ``StreamAudio``, a ``StreamControl``, or a list of PCMO action models.
    """
    obj = load_json(text, "message")
    if isinstance(obj, list):
        return parse_pcmo(obj, "message")
    if not isinstance(obj, dict):
        raise PiopiyValidationError("message", f"must be a JSON object or list, got {type(obj).__name__}")
    try:
        if "type" in obj:
            if obj["type"] != "streamAudio":
                raise PiopiyValidationError("type", f"must be 'streamAudio', got {_short(obj['type'])}")
            return StreamAudio.model_validate(obj)
        action = obj.get("action")
        if action in CONTROL_ACTIONS:
            return StreamControl.model_validate(obj)
        if action in ACTION_NAMES:
            raise PiopiyValidationError(
                "message", f'a PCMO action must be sent as a list: [{{"action": "{action}", ...}}]'
            )
        raise PiopiyValidationError(
            "action", f"must be one of {'|'.join(CONTROL_ACTIONS)} (or send a streamAudio object "
            f"or a PCMO list), got {_short(action)}"
        )
    except ValidationError as exc:
        raise _convert(exc, "") from None
