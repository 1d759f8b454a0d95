"""What the processes say to each other through Redis streams.

Theory of operation
-------------------
Every stream entry and every command is one pydantic model of a discriminated
union on ``type``. A single ``TypeAdapter`` over that union is built at import
time and used for all decoding. Models ignore unknown fields, so an older
consumer keeps working when a newer producer adds one; an unknown ``type``
raises ``UnknownMessage`` so the consumer can count and skip it.

On the wire (Redis fields), a message is flat:

    type    the discriminator, e.g. ``audio`` or ``cmd.pause``
    v       protocol version (int)
    call_id the call the entry belongs to
    seq     the producer's per-call sequence number (consumers drop duplicates)
    d       JSON of the remaining non-binary fields (absent when empty)
    <name>  each ``bytes`` field as its own raw binary value (never base64)

Audio frames are the hot path (50 per second per call): ``audio_fields`` and
the fast branch of ``decode`` build and read them without JSON or validation.

Entry kinds (gateway -> workers): ``call.started``, ``call.ended``, ``audio``,
``platform.event``, ``command.result``, ``playout``, ``gap``. Written into the
same per-call stream by other producers (``seq`` 0: not sequenced by the
gateway): ``transcript`` (the transcriber role: what was said, partial and
final) and ``work.done`` (the worker's agent runtime: the result of an agent's
slow work, so it is handled in order with the call's other events and replayed
after a takeover).
Commands (workers, CLI, API -> gateway): ``cmd.play_audio``, ``cmd.play_music``,
``cmd.speak``, ``cmd.pause``, ``cmd.resume``, ``cmd.stop``, ``cmd.interrupt``,
``cmd.hangup``, ``cmd.transfer``, ``cmd.pcmo``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Iterable, Literal, Mapping, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator

from .audio.pcm import SUPPORTED_RATES as VOICE_RATES  # one constant for the stream rates
from .pcmo_models import BRIDGE_DEFAULTS, BRIDGE_LIMITS, BRIDGE_RING_TYPES

PROTOCOL_VERSION = 1


class UnknownMessage(ValueError):
    """An entry of a type this version does not know (from a newer producer?)."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    v: int = PROTOCOL_VERSION
    call_id: str
    seq: int = 0


# --------------------------------------------------------------------------
# Entries: gateway -> workers (per-call stream; start/end also on `calls`)
# --------------------------------------------------------------------------


class CallStarted(_Message):
    type: Literal["call.started"] = "call.started"
    gateway_id: str
    rate: int = 8000
    listen_mode: str = "callee"
    started_at: float = Field(default_factory=time.time)
    #: Query parameters of the ws_url beyond the signature (flow, campaign...).
    params: dict[str, str] = Field(default_factory=dict)


class CallEnded(_Message):
    type: Literal["call.ended"] = "call.ended"
    #: platform_closed | stream_stopped | hangup | socket_error | drained |
    #: limit_exceeded | redis_lost | ...
    reason: str
    ended_at: float = Field(default_factory=time.time)
    frames_in: int = 0
    frames_dropped: int = 0


class AudioFrame(_Message):
    """20 ms of 16-bit little-endian mono PCM at the call's rate."""

    type: Literal["audio"] = "audio"
    pcm: bytes


class PlatformEvent(_Message):
    """A text frame from the platform (content undocumented; parsed tolerantly)."""

    type: Literal["platform.event"] = "platform.event"
    event: str
    data: dict[str, Any] = Field(default_factory=dict)


class CommandResult(_Message):
    type: Literal["command.result"] = "command.result"
    command_id: str
    command: str
    status: Literal["applied", "rejected"]
    reason: str = ""
    gateway_id: str = ""


class Playout(_Message):
    """What the caller has heard of one utterance (derived from pacing)."""

    type: Literal["playout"] = "playout"
    utterance_id: str
    state: Literal["started", "finished", "interrupted"]
    played_ms: int = 0
    total_ms: int = 0


class Transcript(_Message):
    """Recognised speech of one segment (an utterance between pauses).

    Partials (``final`` False) may be revised; the final one closes the
    segment. Times are call-audio time: milliseconds of the call's inbound
    stream from its first frame (frame sequence x frame length), so they line up
    with the recordings whatever the transport delays."""

    type: Literal["transcript"] = "transcript"
    #: Whose speech: ``caller`` (the inbound stream while the agent talks with
    #: the person) or ``conversation`` (after a hand-off: the monitored mix of the
    #: person and the human agent).
    channel: str = "caller"
    segment: int = Field(ge=0)
    text: str = ""
    final: bool
    start_ms: int = Field(0, ge=0)
    end_ms: int = Field(0, ge=0)
    confidence: float | None = None
    engine: str = ""


class WorkDone(_Message):
    """A result of an agent's slow work (see ``piopiy_voice.workers.agent.base``).

    A work that yields several results (a streamed reply: one sentence at a
    time) produces one entry per result with ``final`` False and ``index``
    counting from 0, then one with ``final`` True (``value`` None). A work that
    returns produces one entry with ``final`` True. ``ok`` False carries
    ``error`` (failed, timed out, cancelled, lost in a takeover)."""

    type: Literal["work.done"] = "work.done"
    work_id: str
    name: str
    ok: bool = True
    final: bool = True
    index: int = 0
    value: Any = None
    error: str = ""
    #: Audio a work produced (synthesised speech), as a raw binary field.
    pcm: bytes = b""


class StreamGap(_Message):
    """Frames that were lost before this entry (e.g. dropped during a Redis outage)."""

    type: Literal["gap"] = "gap"
    frames: int
    reason: str


# --------------------------------------------------------------------------
# Commands: anyone -> the gateway holding the call
# --------------------------------------------------------------------------


def _new_id() -> str:
    return uuid.uuid4().hex


class _Command(_Message):
    command_id: str = Field(default_factory=_new_id)
    #: Stream key where the gateway also writes the CommandResult (besides the
    #: call's own stream). Used by the control API/CLI to wait for an answer.
    reply_to: str | None = None
    issued_by: str = ""


class PlayAudio(_Command):
    type: Literal["cmd.play_audio"] = "cmd.play_audio"
    utterance_id: str = Field(default_factory=_new_id)
    pcm: bytes
    rate: int = 8000
    #: What the audio says, when the agent knows (synthesised replies): shown on
    #: the timeline, the listen socket and the demo's transcript; never spoken.
    text: str = ""

    @field_validator("rate")
    @classmethod
    def _rate(cls, v: int) -> int:
        if v not in VOICE_RATES:
            raise ValueError(f"rate must be one of {VOICE_RATES}, got {v}")
        return v

    @field_validator("pcm")
    @classmethod
    def _even(cls, v: bytes) -> bytes:
        if len(v) % 2:
            raise ValueError("pcm must be 16-bit samples (even length)")
        return v


class PlayMusic(_Command):
    """Play a file (name known to the platform) or an http(s)/ftp URL."""

    type: Literal["cmd.play_music"] = "cmd.play_music"
    file: str = Field(min_length=1)


class Speak(_Command):
    type: Literal["cmd.speak"] = "cmd.speak"
    text: str = Field(min_length=1)


class Pause(_Command):
    type: Literal["cmd.pause"] = "cmd.pause"


class Resume(_Command):
    type: Literal["cmd.resume"] = "cmd.resume"


class StopStream(_Command):
    """End the media stream for good; the call itself goes on."""

    type: Literal["cmd.stop"] = "cmd.stop"


class Interrupt(_Command):
    """Barge-in: drop queued audio and stop what is playing now."""

    type: Literal["cmd.interrupt"] = "cmd.interrupt"


class Hangup(_Command):
    type: Literal["cmd.hangup"] = "cmd.hangup"


class Transfer(_Command):
    """Bridge the caller to a human; the stream stays up (monitoring)."""

    type: Literal["cmd.transfer"] = "cmd.transfer"
    to: list[str] = Field(min_length=1)
    caller_id: str
    # Defaults and limits of the PCMO bridge model (pcmo_models): what the
    # worker accepts here the gateway can always send.
    ring_type: Literal[BRIDGE_RING_TYPES] | None = None  # type: ignore[valid-type]
    duration: int = Field(BRIDGE_DEFAULTS["duration"], strict=True, ge=BRIDGE_LIMITS["duration"][0],
                          le=BRIDGE_LIMITS["duration"][1])
    timeout: int = Field(BRIDGE_DEFAULTS["timeout"], strict=True, ge=BRIDGE_LIMITS["timeout"][0],
                         le=BRIDGE_LIMITS["timeout"][1])
    loop: int = Field(BRIDGE_DEFAULTS["loop"], strict=True, ge=BRIDGE_LIMITS["loop"][0],
                      le=BRIDGE_LIMITS["loop"][1])


class RawPcmo(_Command):
    """Any PCMO list, sent over the live socket as-is (validated by the gateway)."""

    type: Literal["cmd.pcmo"] = "cmd.pcmo"
    pcmo: list[dict[str, Any]] = Field(min_length=1)


Entry = Union[CallStarted, CallEnded, AudioFrame, PlatformEvent, CommandResult, Playout, StreamGap,
              Transcript, WorkDone]
Command = Union[
    PlayAudio, PlayMusic, Speak, Pause, Resume, StopStream, Interrupt, Hangup, Transfer, RawPcmo
]
Message = Annotated[Union[Entry, Command], Field(discriminator="type")]

#: The one adapter every consumer decodes with.
MESSAGE_ADAPTER: TypeAdapter[Any] = TypeAdapter(Message)

ENTRY_TYPES = frozenset(m.model_fields["type"].default for m in Entry.__args__)  # type: ignore[attr-defined]
COMMAND_TYPES = frozenset(m.model_fields["type"].default for m in Command.__args__)  # type: ignore[attr-defined]
_BYTES_FIELDS = {
    m.model_fields["type"].default: tuple(
        name for name, f in m.model_fields.items() if f.annotation is bytes
    )
    for m in (*Entry.__args__, *Command.__args__)  # type: ignore[attr-defined]
}
_HEAD = ("type", "v", "call_id", "seq")

# --------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------


def encode(msg: BaseModel) -> dict[str, str | bytes]:
    """A message as flat Redis fields (see the module docstring)."""
    data = msg.model_dump(mode="python")
    mtype = data["type"]
    out: dict[str, str | bytes] = {
        "type": mtype,
        "v": str(data.pop("v")),
        "call_id": data.pop("call_id"),
        "seq": str(data.pop("seq")),
    }
    del data["type"]
    for name in _BYTES_FIELDS[mtype]:
        out[name] = data.pop(name)
    if data:
        out["d"] = json.dumps(data, separators=(",", ":"))
    return out


#: The fields of an ``audio`` entry in the order they are written. The two that
#: change with every frame come last, so a writer can build everything before
#: them once per call (``audio_head``; the gateway's RESP writer does).
AUDIO_FIELD_NAMES = ("type", "v", "call_id", "seq", "pcm")


def audio_fields(call_id: str, seq: int, pcm: bytes) -> dict[str, str | bytes]:
    """Hot path: the fields of an ``audio`` entry without building a model."""
    return {"type": "audio", "v": _AUDIO_V, "call_id": call_id, "seq": str(seq), "pcm": pcm}


def audio_head(call_id: str) -> dict[str, str]:
    """The fields of a call's audio entries that are the same for every frame:
    all of ``AUDIO_FIELD_NAMES`` before ``seq``, in order, with their values."""
    fields = audio_fields(call_id, 0, b"")
    return {name: fields[name] for name in AUDIO_FIELD_NAMES[:-2]}  # type: ignore[misc]


_AUDIO_V = str(PROTOCOL_VERSION)


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


_AUDIO_KEYS = frozenset(AUDIO_FIELD_NAMES)
_AUDIO_NFIELDS = len(AUDIO_FIELD_NAMES)
_AUDIO_V_B = _AUDIO_V.encode()


def _audio_frame(call_id: str, seq: int, pcm: bytes, v: int = PROTOCOL_VERSION) -> AudioFrame:
    """An ``AudioFrame`` from fields already checked, without pydantic's
    ``model_construct`` machinery (about 4x cheaper; a worker decodes 10k/s)."""
    obj = object.__new__(AudioFrame)
    object.__setattr__(obj, "__dict__", {"v": v, "call_id": call_id, "seq": seq, "type": "audio", "pcm": pcm})
    object.__setattr__(obj, "__pydantic_fields_set__", set(_AUDIO_KEYS))
    object.__setattr__(obj, "__pydantic_extra__", None)
    object.__setattr__(obj, "__pydantic_private__", None)
    return obj


def audio_pcms(entries: Iterable[tuple[Any, Mapping[bytes | str, bytes | str]]]) -> list[bytes]:
    """The PCM of the audio entries among ``entries`` ((id, fields) as redis-py's
    XREAD returns them, bytes keys), in order: the same objects ``decode`` puts in
    its ``AudioFrame``s (the VAD batch matches them by identity). Not a
    validation: ``decode`` still judges each entry."""
    out = []
    for _, fields in entries:
        if fields.get(b"type") == b"audio":  # type: ignore[call-overload]
            pcm = fields.get(b"pcm")  # type: ignore[call-overload]
            if pcm.__class__ is bytes:
                out.append(pcm)
    return out


def decode(fields: Mapping[bytes | str, bytes | str]) -> Any:
    """Redis fields -> a validated message model.

    Raises ``UnknownMessage`` for a type this version does not know and
    ``ValueError`` (pydantic's ValidationError is one) for a malformed entry.
    """
    # Hot path: a well-formed audio entry as redis-py returns it (bytes keys and
    # values, exactly the five fields of ``audio_fields``); anything else,
    # including a malformed audio entry, takes the general path below.
    if fields.get(b"type") == b"audio" and len(fields) == _AUDIO_NFIELDS:  # type: ignore[call-overload]
        pcm, seq, cid = fields.get(b"pcm"), fields.get(b"seq"), fields.get(b"call_id")  # type: ignore[call-overload]
        if (pcm.__class__ is bytes and not len(pcm) % 2 and seq is not None and seq.isdigit()
                and cid is not None and fields.get(b"v") == _AUDIO_V_B):  # type: ignore[call-overload]
            return _audio_frame(cid.decode(), int(seq), pcm)
    f = {_s(k): v for k, v in fields.items()}
    try:
        mtype = _s(f["type"])
    except KeyError:
        raise ValueError("entry has no 'type' field") from None
    if mtype == "audio":
        # Fast path: construct without validation; only the length is checked.
        pcm = f.get("pcm", b"")
        if isinstance(pcm, str):
            pcm = pcm.encode("latin-1")
        if len(pcm) % 2:
            raise ValueError("audio entry with odd-length pcm")
        if "call_id" not in f:
            raise ValueError("audio entry has no 'call_id' field")
        return _audio_frame(_s(f["call_id"]), int(f.get("seq", 0)), pcm, int(f.get("v", 1)))
    if mtype not in _BYTES_FIELDS:
        raise UnknownMessage(f"unknown message type {mtype!r}")
    data: dict[str, Any] = {}
    if "d" in f:
        try:
            data = json.loads(f["d"])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"entry 'd' field is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("entry 'd' field must be a JSON object")
        for name in _BYTES_FIELDS[mtype]:
            if name in data:
                # pydantic would turn a JSON string into its UTF-8 bytes: refuse.
                raise ValueError(f"'{name}' must be its own binary field, not inside 'd'")
    for name in _HEAD:
        if name in f:
            data[name] = _s(f[name])
    for name in _BYTES_FIELDS[mtype]:
        if name in f:
            raw = f[name]
            data[name] = raw.encode("latin-1") if isinstance(raw, str) else raw
    return MESSAGE_ADAPTER.validate_python(data)


def is_command(msg: Any) -> bool:
    return getattr(msg, "type", None) in COMMAND_TYPES
