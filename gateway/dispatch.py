"""Commands in, platform messages and results out: the gateway's outbound side.

``Dispatcher.on_command`` is the ``CommandReader``'s handler: it decodes one
command, drops duplicates (by ``command_id``, last 10 000 remembered), refuses
commands for calls this gateway does not hold (never touching another call's
socket) and queues the rest on their call. One task per call with pending
commands applies them in order: the call's ``CallSession`` decides
(``Outcome``: messages, entries, and whether to cut or wake the call's playout
or close the socket after a grace), this module only carries that out, then
publishes a ``CommandResult`` to the call's stream and to ``reply_to``, plus a
timeline line per applied command. Nothing here switches on command type.

``reply_to`` may only name a reply stream (``keys.reply_stream``): a command
naming any other key is rejected (and counted), since the gateway would write
to it and set its TTL. A command for a call that is suspended (its socket
dropped, waiting for the platform to reconnect) is rejected with a reason
saying so, and its result carries seq 0: the session's seq must not move
while another gateway may be resuming the call.

The reader never waits for a socket, so a peer that stops reading (its send
blocks up to ``SEND_TIMEOUT_S``) delays only its own call's commands; at most
``MAX_PENDING_COMMANDS`` wait per call, more are rejected. Audio is written to
a socket only by the gateway's playout tick (``playout.py``; ``LiveCall.start_playout``).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

from websockets.exceptions import ConnectionClosed

from piopiy_voice import callrecord, contracts, keys

from .metrics import Metrics
from .registry import LiveCall, Registry, close_ws

#: The only keys a command's ``reply_to`` may name.
REPLY_PREFIX = keys.reply_stream("")

log = logging.getLogger("gateway")

SEND_TIMEOUT_S = 2.0
#: After we send hangup/stop, the platform should close; if not, we do.
CLOSE_AFTER_END_S = 5.0
RECENT_COMMANDS = 10_000
MAX_PENDING_COMMANDS = 256


class Dispatcher:
    def __init__(self, *, registry: Registry, redis: Any, metrics: Metrics) -> None:
        self.registry = registry
        self.publisher = registry.publisher
        self.redis = redis
        self.metrics = metrics
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        #: call id -> commands waiting for that call's command task.
        self._pending: dict[str, collections.deque] = {}
        self._tasks: set[asyncio.Task] = set()

    async def on_command(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        try:
            cmd = contracts.decode(fields)
            if not contracts.is_command(cmd):
                raise ValueError(f"entry type {cmd.type!r} is not a command")
        except ValueError as exc:
            self.metrics.inc("commands_malformed")
            log.warning("command %s: malformed, skipped: %s", entry_id.decode(), exc)
            return
        if cmd.reply_to and (not cmd.reply_to.startswith(REPLY_PREFIX)
                             or len(cmd.reply_to) <= len(REPLY_PREFIX)):
            self.metrics.inc("reply_to_refused")
            log.warning("call %s: %s rejected: reply_to %.80r is not a reply stream (%s...)",
                        cmd.call_id, cmd.type, cmd.reply_to, REPLY_PREFIX)
            bad = cmd.reply_to
            cmd = cmd.model_copy(update={"reply_to": None})
            if self.registry.get(cmd.call_id) is not None:
                self._result(cmd, "rejected", f"reply_to {bad[:80]!r} is not a reply stream "
                             f"({REPLY_PREFIX}...)", on_call_stream=True, seq=0)
            return
        if cmd.command_id in self._recent:
            self.metrics.inc("commands_duplicate")
            log.info("call %s: duplicate command %s ignored", cmd.call_id, cmd.command_id)
            return
        self._recent[cmd.command_id] = None
        if len(self._recent) > RECENT_COMMANDS:
            self._recent.popitem(last=False)
        live = self.registry.get(cmd.call_id)
        if live is None:
            await self._reject_foreign(cmd)
            return
        queue = self._pending.get(cmd.call_id)
        if queue is None:
            queue = self._pending[cmd.call_id] = collections.deque()
            task = asyncio.get_running_loop().create_task(self._run_call(cmd.call_id, queue))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if len(queue) >= MAX_PENDING_COMMANDS:
            self._result(cmd, "rejected", f"too many commands pending for this call "
                         f"({MAX_PENDING_COMMANDS})", on_call_stream=True,
                         seq=live.session.next_seq() if live.ws is not None else 0)
            self.metrics.inc("commands_rejected")
            log.warning("call %s: %s rejected: command queue full", cmd.call_id, cmd.type)
            return
        queue.append(cmd)

    async def _run_call(self, cid: str, queue: collections.deque) -> None:
        """Apply one call's queued commands in order (looked up afresh each time:
        the socket may have been replaced, or the call may have ended)."""
        try:
            while queue:
                cmd = queue.popleft()
                live = self.registry.get(cid)
                try:
                    if live is None:
                        await self._reject_foreign(cmd)
                    elif live.ws is None:
                        self._reject_suspended(cmd)
                    else:
                        await self._apply(live, cmd)
                except Exception:  # one bad command must not strand the others
                    log.exception("call %s: applying %s failed", cid, cmd.type)
        finally:
            if self._pending.get(cid) is queue:
                del self._pending[cid]

    async def close(self, timeout: float = SEND_TIMEOUT_S + 1) -> None:
        """Let queued commands finish (bounded), then cancel what is left."""
        tasks = set(self._tasks)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=timeout)
            for t in late:
                t.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def _apply(self, live: LiveCall, cmd: Any) -> None:
        s = live.session
        loop = asyncio.get_running_loop()
        outcome = s.apply(cmd, loop.time())
        if outcome.cut_playout:
            live.cut_playout()
        ws = live.ws
        if outcome.status == "applied":
            try:
                async with asyncio.timeout(SEND_TIMEOUT_S):
                    await live.send(outcome.messages)
            except (ConnectionClosed, TimeoutError, OSError) as exc:
                outcome.status, outcome.reason = "rejected", f"socket send failed: {exc!r}"
                if isinstance(exc, TimeoutError):
                    # A platform that has not read for SEND_TIMEOUT_S on a real-time
                    # call is gone: end the call rather than keep a half-applied state.
                    log.warning("call %s: send timed out, closing the socket", s.call_id)
                    self.metrics.inc("send_timeouts")
                    loop.create_task(close_ws(ws, 1011, "send timeout"))
        for e in outcome.entries:
            live.publish(e)
        # Suspended meanwhile: its seq is recorded and may go on elsewhere.
        self._result(cmd, outcome.status, outcome.reason, on_call_stream=True,
                     seq=s.next_seq() if live.ws is not None else 0)
        if outcome.status == "applied":
            self.metrics.inc("commands_applied")
            detail = {"command_id": cmd.command_id, "issued_by": cmd.issued_by or None,
                      # What the agent said (PlayAudio/Speak text): the call's story in words.
                      "text": getattr(cmd, "text", None) or None}
            callrecord.timeline(self.publisher, s.call_id, f"command.{cmd.type[4:]}", **detail)
            log.info("call %s: %s applied (%s)", s.call_id, cmd.type, cmd.command_id)
            if outcome.wake_playout:
                live.start_playout()
            if outcome.close_after:
                loop.call_later(CLOSE_AFTER_END_S, self.registry.close_if_current, live, ws)
        else:
            self.metrics.inc("commands_rejected")
            if outcome.oversize:
                self.metrics.inc("commands_oversize")
            log.info("call %s: %s rejected: %s", s.call_id, cmd.type, outcome.reason)

    def _reject_suspended(self, cmd: Any) -> None:
        reason = "call suspended: its socket dropped; waiting for the platform to reconnect"
        self.metrics.inc("commands_rejected")
        log.info("call %s: %s rejected: %s", cmd.call_id, cmd.type, reason)
        self._result(cmd, "rejected", reason, on_call_stream=True, seq=0)

    async def _reject_foreign(self, cmd: Any) -> None:
        reason = "call not on this gateway"
        self.metrics.inc("commands_rejected")
        log.info("call %s: %s rejected: %s", cmd.call_id, cmd.type, reason)
        # Put the answer in the call's stream only when that call has ended (its
        # keys already expire); a call live elsewhere must not be written to.
        on_stream = False
        try:
            state = await self.redis.hget(keys.call_meta(cmd.call_id), "state")
            on_stream = state == b"ended"
        except Exception as exc:  # noqa: BLE001
            log.warning("call %s: cannot read record: %r", cmd.call_id, exc)
        self._result(cmd, "rejected", reason, on_call_stream=on_stream, seq=0)

    def _result(self, cmd: Any, status: str, reason: str, *, on_call_stream: bool,
                seq: int) -> None:
        res = contracts.CommandResult(call_id=cmd.call_id, seq=seq, command_id=cmd.command_id,
                                      command=cmd.type, status=status, reason=reason,
                                      gateway_id=self.registry.gateway_id)
        fields = contracts.encode(res)
        if on_call_stream:
            self.publisher.xadd(keys.call_stream(cmd.call_id), fields,
                                maxlen=keys.CALL_STREAM_MAXLEN)
        if cmd.reply_to:
            self.publisher.xadd(cmd.reply_to, fields, maxlen=1000)
            # Abandoned reply streams (requester died) must not live forever.
            self.publisher.expire(cmd.reply_to, 600)
