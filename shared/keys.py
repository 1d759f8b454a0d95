"""Every Redis key name the processes agree on, in one place.

A call's keys carry its id in a hash tag (``{call_id}``) so that in Redis
Cluster all of one call's keys live in one slot and can be touched by one
pipeline or script. Gateway and global keys are not hash-tagged: they are
never combined with a call's keys in one multi-key command.
"""

from __future__ import annotations

import re

PREFIX = "pv"

#: Call lifecycle (started / ended). Workers read it through WORKERS_GROUP.
CALLS_STREAM = f"{PREFIX}:calls"
WORKERS_GROUP = "workers"
#: Consumer group of the transcribers (speech recognition role) on CALLS_STREAM:
#: every call is owned once by a worker and once by a transcriber.
TRANSCRIBERS_GROUP = "transcribers"
#: Entries that failed validation or made an agent raise repeatedly.
DEAD_LETTER_STREAM = f"{PREFIX}:deadletter"
#: Sorted set: gateway id -> last heartbeat (unix seconds).
GATEWAYS_ZSET = f"{PREFIX}:gateways"
#: Sorted set: worker id -> last heartbeat (unix seconds).
WORKERS_ZSET = f"{PREFIX}:workers"
#: Sorted set transcriber id -> last heartbeat (epoch s).
TRANSCRIBERS_ZSET = f"{PREFIX}:transcribers"

#: Stream maxlen (approximate trimming) for per-call inbound streams: about
#: 2 minutes of 20 ms frames (with the call's other entries), so a live call
#: holds at most ~2.2 MB of Redis (8 kHz) however long it lasts. Its readers
#: (the owning worker and transcriber, resuming from checkpoints at most a
#: lease old; the API's live listeners) are normally milliseconds behind; one
#: 2 minutes behind loses frames, which it counts as a gap. (It was 30 000 =
#: 10 minutes, kept an hour after the call: RELIABILITY.md "Memory".)
CALL_STREAM_MAXLEN = 6_000
#: Final transcript segments kept per call (their own small stream).
TRANSCRIPT_MAXLEN = 2_000
CALLS_STREAM_MAXLEN = 100_000
COMMAND_STREAM_MAXLEN = 10_000
DEAD_LETTER_MAXLEN = 10_000
#: How long a call's keys live after the call ended (seconds): its record,
#: timeline, transcript and checkpoints, for ``status`` and the API.
CALL_KEY_TTL_AFTER_END = 3600
#: ... except its inbound stream (the audio): only until its readers have
#: read the end (they are at most a lease behind), not for an hour.
CALL_STREAM_TTL_AFTER_END = 60
#: A campaign's bookkeeping (states, info) expires this long after its last change.
CAMPAIGN_TTL_S = 30 * 24 * 3600

# \Z, not $: "$" also matches before a trailing newline.
_CALL_ID_RE = re.compile(r"\A[A-Za-z0-9_.:-]{1,128}\Z")


def validate_call_id(call_id: str) -> str:
    """Call ids travel in URLs and key names: keep them to a safe alphabet."""
    if not isinstance(call_id, str) or not _CALL_ID_RE.match(call_id):
        raise ValueError(
            f"call_id must be 1-128 characters of [A-Za-z0-9_.:-], got {call_id!r}"
        )
    return call_id


def _call(call_id: str, suffix: str) -> str:
    return f"{PREFIX}:call:{{{call_id}}}:{suffix}"


def call_stream(call_id: str) -> str:
    """Inbound stream of one call: audio frames, platform events, results, playout."""
    return _call(call_id, "in")


def call_transcript(call_id: str) -> str:
    """Stream: the call's final ``Transcript`` entries, as the transcriber
    writes them into the inbound stream too (that one's audio is short-lived;
    ``status`` and the API read the transcript here)."""
    return _call(call_id, "transcript")


def call_meta(call_id: str) -> str:
    """Hash: the call record (state, gateway, rate, listen mode, owner, campaign...)."""
    return _call(call_id, "meta")


def call_timeline(call_id: str) -> str:
    """Stream: human-readable life of the call (state changes, commands, results)."""
    return _call(call_id, "timeline")


def call_lease(call_id: str) -> str:
    """String: id of the worker owning the call (SET NX PX, renewed)."""
    return _call(call_id, "lease")


def call_checkpoint(call_id: str) -> str:
    """Hash: the agent's state checkpoint and the stream id it covers."""
    return _call(call_id, "ckpt")


def call_outbox(call_id: str) -> str:
    """Stream: the commands a worker committed with its checkpoint and has not
    yet seen delivered to the gateway's command stream (the transactional
    outbox: ``piopiy_voice.workers.checkpoint``); usually empty or one turn's."""
    return _call(call_id, "out")


def call_asr_lease(call_id: str) -> str:
    """String: id of the transcriber owning the call's recognition (SET NX PX)."""
    return _call(call_id, "asr:lease")


def call_asr_checkpoint(call_id: str) -> str:
    """Hash: the transcriber's stream position and recognizer bookkeeping."""
    return _call(call_id, "asr:ckpt")


def ttl_after_end(key: str, call_id: str, ttl_s: int = CALL_KEY_TTL_AFTER_END) -> int:
    """The life of one of ``call_keys(call_id)`` once the call ended."""
    return min(ttl_s, CALL_STREAM_TTL_AFTER_END) if key == call_stream(call_id) else ttl_s


def call_keys(call_id: str) -> list[str]:
    """All keys a call may create (for expiry and clean-up checks)."""
    return [
        call_stream(call_id),
        call_transcript(call_id),
        call_meta(call_id),
        call_timeline(call_id),
        call_lease(call_id),
        call_checkpoint(call_id),
        call_outbox(call_id),
        call_asr_lease(call_id),
        call_asr_checkpoint(call_id),
    ]


def entry_ms(entry_id: str | bytes) -> int:
    """The millisecond time part of a stream entry id (``"1732550000123-0"``):
    when Redis appended the entry, on Redis's clock."""
    head = entry_id.split(b"-", 1)[0] if isinstance(entry_id, bytes) else entry_id.split("-", 1)[0]
    return int(head)


def call_id_of(key: str | bytes) -> str:
    """The call id inside a per-call key name (the hash tag), e.g. from a stream
    name XREAD returned."""
    k = key.decode() if isinstance(key, bytes) else key
    try:
        return k[k.index("{") + 1: k.rindex("}")]
    except ValueError:
        raise ValueError(f"not a per-call key: {k!r}") from None


def gateway_commands(gateway_id: str) -> str:
    """Stream of commands for the calls one gateway holds (single XREAD reader)."""
    return f"{PREFIX}:gw:{gateway_id}:cmd"


def gateway_heartbeat(gateway_id: str) -> str:
    """String with a TTL: present while the gateway is alive."""
    return f"{PREFIX}:gw:{gateway_id}:hb"


def reply_stream(requester_id: str) -> str:
    """Stream where a gateway answers a command's result to whoever asked."""
    return f"{PREFIX}:reply:{requester_id}"


def campaign_key(campaign: str, suffix: str) -> str:
    return f"{PREFIX}:campaign:{{{campaign}}}:{suffix}"


def dialer_key(suffix: str) -> str:
    return f"{PREFIX}:dialer:{suffix}"


# --- the API role ------------------------------------------------------------
#: Hash: SHA-256 of an API key -> its record (id, name, scopes); never the key.
API_KEYS_HASH = f"{PREFIX}:api:keys"
#: Sorted set: call id -> creation time, the API's index of recent calls.
API_CALLS_ZSET = f"{PREFIX}:api:calls"
