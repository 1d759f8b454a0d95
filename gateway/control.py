"""Steer a live call from outside the workers: Python API and CLI.

``CallHandle(redis, call_id)`` finds which gateway replica holds the call (the
call record's ``gateway_id``), appends a command to that gateway's command
stream with ``reply_to`` set to a private reply stream, and waits for the
gateway's ``CommandResult`` (applied, or rejected with a reason). The reply
stream is deleted afterwards (the gateway also gives it a TTL in case we die).

That exchange is written once, as pure steps (``holder_of``, ``addressed``,
``result_in``) with two thin shells: ``CallHandle.send`` (sync) and
``send_async`` (asyncio: the API role).

CLI: ``piopiy-voice control <call_id> pause|resume|stop|interrupt|hangup|
play-music FILE|speak TEXT...|transfer NUMBER... [--caller-id N]|pcmo JSON``.
Exit status 0 applied, 1 rejected, 2 error (unknown call, no answer, bad input).
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from typing import Any

from piopiy_voice import callrecord, keys
from piopiy_voice import contracts as c
from piopiy_voice.redisconn import MAX_BLOCK_MS


class CallControlError(RuntimeError):
    """The command could not be delivered or answered."""


class CallNotFound(CallControlError):
    """No live call with that id (never existed, not yet live, or ended)."""


class CallNotLive(CallNotFound):
    """The call exists but is not live (queued, dialing, placed or ended)."""

    def __init__(self, message: str, state: str) -> None:
        super().__init__(message)
        self.state = state


class CommandTimeout(CallControlError):
    """The gateway did not answer in time."""


# ------------------------------------------------------- the exchange, pure
def holder_of(raw_record: Any, call_id: str) -> str:
    """The gateway holding the call, from its raw record (HGETALL);
    ``CallNotFound`` (unknown) or ``CallNotLive`` (any other state)."""
    rec = callrecord.decode_record(raw_record)
    if not rec:
        raise CallNotFound(f"call {call_id!r} is unknown")
    state = rec.get("state", "?")
    if state != "live" or not rec.get("gateway_id"):
        extra = f" ({rec['end_reason']})" if rec.get("end_reason") else ""
        raise CallNotLive(f"call {call_id!r} is not live: state {state}{extra}", state)
    return rec["gateway_id"]


def addressed(cmd: Any, gateway_id: str, prefix: str) -> tuple[str, dict, str]:
    """(command stream, encoded command, reply stream): ``cmd`` with a fresh
    private ``reply_to``, ready to XADD to the holding gateway."""
    reply = keys.reply_stream(f"{prefix}-{uuid.uuid4().hex}")
    return (keys.gateway_commands(gateway_id), c.encode(cmd.model_copy(update={"reply_to": reply})),
            reply)


def result_in(got: Any, command_id: str, last: str) -> tuple[str, c.CommandResult | None]:
    """Scan an XREAD reply of the reply stream: (last entry id read, the
    ``CommandResult`` for ``command_id`` if it came)."""
    for _stream, entries in got or ():
        for entry_id, fields in entries:
            last = entry_id
            try:
                msg = c.decode(fields)
            except ValueError:
                continue
            if isinstance(msg, c.CommandResult) and msg.command_id == command_id:
                return last, msg
    return last, None


def _timeout(gw: str, call_id: str, timeout_s: float) -> CommandTimeout:
    return CommandTimeout(f"no answer from gateway {gw!r} for call {call_id!r} within "
                          f"{timeout_s:g}s (is the gateway running?)")


async def send_async(ar: Any, cmd: Any, timeout_s: float, prefix: str = "api") -> c.CommandResult:
    """``CallHandle.send`` for asyncio code: deliver ``cmd`` (its ``call_id``
    set) to the gateway holding its call and wait for the result. ``ar`` must
    have a socket timeout above ``MAX_BLOCK_MS`` (``connect_async``)."""
    gw = holder_of(await ar.hgetall(keys.call_meta(cmd.call_id)), cmd.call_id)
    stream, fields, reply = addressed(cmd, gw, prefix)
    try:
        await ar.xadd(stream, fields, maxlen=keys.COMMAND_STREAM_MAXLEN, approximate=True)
        deadline, last = time.monotonic() + timeout_s, "0-0"
        while (left_ms := int((deadline - time.monotonic()) * 1000)) > 0:
            last, result = result_in(await ar.xread({reply: last}, count=10,
                                                    block=min(left_ms, MAX_BLOCK_MS)),
                                     cmd.command_id, last)
            if result is not None:
                return result
        raise _timeout(gw, cmd.call_id, timeout_s)
    finally:
        await ar.delete(reply)


class CallHandle:
    def __init__(self, redis: Any, call_id: str, timeout: float = 5.0,
                 issued_by: str = "control") -> None:
        keys.validate_call_id(call_id)
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout!r}")
        self.redis = redis
        self.call_id = call_id
        self.timeout = float(timeout)
        self.issued_by = issued_by

    # ----------------------------------------------------------- plumbing
    def gateway_id(self) -> str:
        """The gateway holding the call; CallNotFound (CallNotLive) unless it is live."""
        return holder_of(self.redis.hgetall(keys.call_meta(self.call_id)), self.call_id)

    def send(self, cmd: Any) -> c.CommandResult:
        """Deliver one command model and wait for the gateway's result."""
        if not c.is_command(cmd):
            raise TypeError(f"not a command: {type(cmd).__name__}")
        cmd = cmd.model_copy(update={"call_id": self.call_id,
                                     "issued_by": cmd.issued_by or self.issued_by})
        gw = self.gateway_id()
        stream, fields, reply = addressed(cmd, gw, "ctl")
        try:
            self.redis.xadd(stream, fields, maxlen=keys.COMMAND_STREAM_MAXLEN, approximate=True)
            deadline, last = time.monotonic() + self.timeout, "0-0"
            while (left_ms := int((deadline - time.monotonic()) * 1000)) > 0:
                last, result = result_in(self.redis.xread({reply: last}, count=10,
                                                          block=min(left_ms, MAX_BLOCK_MS)),
                                         cmd.command_id, last)
                if result is not None:
                    return result
            raise _timeout(gw, self.call_id, self.timeout)
        finally:
            self.redis.delete(reply)

    # ------------------------------------------------------------ commands
    def _cmd(self, model: type, **kw: Any) -> c.CommandResult:
        return self.send(model(call_id=self.call_id, **kw))

    def pause(self) -> c.CommandResult:
        """Pause the platform's audio stream to us."""
        return self._cmd(c.Pause)

    def resume(self) -> c.CommandResult:
        return self._cmd(c.Resume)

    def stop(self) -> c.CommandResult:
        """End the media stream for good: no resume; the gateway closes the socket
        5 s later and the call goes on with the PCMO's next actions, if any."""
        return self._cmd(c.StopStream)

    def interrupt(self) -> c.CommandResult:
        """Drop queued audio and stop what is playing now."""
        return self._cmd(c.Interrupt)

    def hangup(self) -> c.CommandResult:
        return self._cmd(c.Hangup)

    def play_music(self, file: str) -> c.CommandResult:
        """A file name known to the platform or an http(s)/ftp URL."""
        return self._cmd(c.PlayMusic, file=file)

    def speak(self, text: str) -> c.CommandResult:
        return self._cmd(c.Speak, text=text)

    def transfer(self, to: str | list[str], caller_id: str, *, ring_type: str | None = None,
                 duration: int = 5400, timeout: int = 40, loop: int = 1) -> c.CommandResult:
        """Bridge the caller to a human (numbers as digit strings); the stream stays up."""
        numbers = [to] if isinstance(to, str) else list(to)
        return self._cmd(c.Transfer, to=numbers, caller_id=caller_id, ring_type=ring_type,
                         duration=duration, timeout=timeout, loop=loop)

    def play_audio(self, pcm: bytes, rate: int = 8000,
                   utterance_id: str | None = None) -> c.CommandResult:
        """16-bit LE mono PCM, paced by the gateway; Playout entries report progress."""
        kw: dict[str, Any] = {"pcm": pcm, "rate": rate}
        if utterance_id:
            kw["utterance_id"] = utterance_id
        return self._cmd(c.PlayAudio, **kw)

    def pcmo(self, actions: list[dict[str, Any]]) -> c.CommandResult:
        """Any PCMO list, validated by the gateway and sent on the live socket."""
        return self._cmd(c.RawPcmo, pcmo=actions)


# ---------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="piopiy-voice control",
                                 description="Steer a live call through the gateway holding it.")
    ap.add_argument("call_id")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")
    ap.add_argument("--redis-url", help="Redis URL (REDIS_URL)")
    sub = ap.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (("pause", "pause the stream to us"), ("resume", "resume it"),
                       ("stop", "end the stream for good; the socket closes 5 s later and the "
                                "call goes on with the PCMO's next actions (none: it ends)"),
                       ("interrupt", "cut what is playing"), ("hangup", "hang up the call")):
        sub.add_parser(name, help=text)
    p = sub.add_parser("play-music", help="play a file name or URL")
    p.add_argument("file")
    p = sub.add_parser("speak", help="speak text (platform TTS)")
    p.add_argument("text", nargs="+")
    p = sub.add_parser("transfer", help="bridge to a human")
    p.add_argument("numbers", nargs="+")
    p.add_argument("--caller-id", help="caller id shown (default PIOPIY_CALLER_ID)")
    p.add_argument("--ring-type", help="e.g. group")
    p = sub.add_parser("pcmo", help="send a PCMO JSON list as-is")
    p.add_argument("json")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from pydantic import ValidationError  # noqa: PLC0415

    from piopiy_voice.errors import from_pydantic, load_json  # noqa: PLC0415
    from piopiy_voice.redisconn import connect  # noqa: PLC0415
    from piopiy_voice.settings import Settings  # noqa: PLC0415

    try:
        settings = Settings.from_env()
        handle = CallHandle(connect(args.redis_url or settings.redis_url), args.call_id,
                            timeout=args.timeout)
        a = args.action
        if a in ("pause", "resume", "stop", "interrupt", "hangup"):
            result = getattr(handle, a)()
        elif a == "play-music":
            result = handle.play_music(args.file)
        elif a == "speak":
            result = handle.speak(" ".join(args.text))
        elif a == "transfer":
            caller = args.caller_id or settings.piopiy_caller_id
            if not caller:
                raise ValueError("transfer needs --caller-id (or PIOPIY_CALLER_ID)")
            result = handle.transfer(args.numbers, caller, ring_type=args.ring_type)
        else:
            result = handle.pcmo(load_json(args.json, "pcmo"))  # depth-bounded: no RecursionError
    except ValidationError as exc:  # a command model refused a value: one line naming the field
        print(f"piopiy-voice control: {from_pydantic(exc)}", file=sys.stderr)
        return 2
    except (CallControlError, ValueError, TypeError) as exc:
        print(f"piopiy-voice control: {exc}", file=sys.stderr)
        return 2
    if result.status == "applied":
        print(f"{args.call_id}: {result.command} applied by {result.gateway_id}")
        return 0
    print(f"{args.call_id}: {result.command} rejected by {result.gateway_id}: {result.reason}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
