"""Listening to a live call: its audio and events, from Redis only.

Theory of operation
-------------------
Wire format of ``WS /calls/{id}/listen`` (stated in the first message)::

    text   {"type": "hello", "call_id", "rate", "channels": ["caller", "agent"],
            "format": "s16le", "interleaved": true, "frame_ms": 20, "state", ...}
    binary one 20 ms frame: interleaved stereo 16-bit little-endian PCM at the
           call's rate; left = the call's inbound stream (the person; after a
           hand-off, with listen mode ``both``, the person and the human agent:
           the conversation), right = the audio we send (our PlayAudio).
    text   {"type": "event", "event": "<entry type>", ...}   call.started/ended,
           platform.event, command.result, playout, gap, work.done
    text   {"type": "transcript", "segment", "text", "final", ...}
    text   {"type": "timeline", "event", ...}                  the call's timeline
    text   {"type": "notice", "skipped": N}                   this listener skipped N messages

One ``CallHub`` per listened call in this process: a single reader task
XREADs the call's inbound stream and timeline (both hash-tagged on the call,
one command) from "now" and fans every message out to the hub's listeners.
What we send to the caller is not in the call's stream: it is the PlayAudio
commands on the command stream of the gateway holding the call. One
``CommandTap`` per gateway (not per call) reads that stream and hands each
utterance to the hub of its call; the hub's ``StereoMixer`` (pure) lays it on
the right channel 20 ms per inbound frame, so both channels share the
platform's clock. An utterance is cut when the gateway reports it
``interrupted`` (Playout) or an interrupt/hangup/stop command passes. When no
inbound frame arrives for a while (stream paused), the hub paces the agent's
audio itself on the wall clock.

Listening never pushes back: a listener is a bounded queue drained by its own
writer task. When the queue is full the oldest message is dropped (counted in
``pv_api_listen_skipped_messages_total``; the listener is told how many); a
listener that has sent nothing for ``listen_max_stall_s`` while skipping, or
whose socket takes longer than ``SEND_TIMEOUT_S`` to accept one message, is
closed (1008). A burst (a reader catching up after a pause) only makes
listeners skip: it never drops one that keeps reading. The
reader itself only ever appends to queues, so one stuck listener costs the
others nothing, and nothing here writes to Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from typing import Any

import numpy as np

from piopiy_voice import keys
from piopiy_voice import contracts as c
from piopiy_voice.audio import FRAME_MS, SAMPLE_WIDTH, resample
from piopiy_voice.redisconn import MAX_BLOCK_MS

from . import metrics
from .calls import transcript_item

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 5.0
#: Without inbound frames for this long, the hub paces agent audio itself.
STALL_S = 0.1
READ_BLOCK_MS = 100
READ_RETRIES = 5
#: A hub lingers this long after its last listener leaves (a browser reconnecting).
HUB_LINGER_S = 2.0
TAP_IDLE_S = 30.0
#: Agent audio kept queued per call at most (s at the call's rate): a runaway producer
#: cannot grow the API's memory.
MAX_AGENT_QUEUE_S = 300


def interleave(left: bytes, right: bytes) -> bytes:
    """Two mono s16le buffers -> one interleaved stereo buffer (the shorter padded)."""
    a = np.frombuffer(left, dtype="<i2")
    b = np.frombuffer(right, dtype="<i2")
    n = max(a.size, b.size)
    out = np.zeros(2 * n, dtype="<i2")
    out[0:2 * a.size:2] = a
    out[1:2 * b.size:2] = b
    return out.tobytes()


class StereoMixer:
    """Pairs each inbound frame with the next 20 ms of our audio (pure, no I/O).

    Utterances play in arrival order (the gateway plays them in that order too)."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.frame_bytes = rate * FRAME_MS // 1000 * SAMPLE_WIDTH
        self._silence = bytes(self.frame_bytes)
        self._queue: deque[list[Any]] = deque()   # [utterance_id, bytearray]
        self._queued = 0

    @property
    def agent_playing(self) -> bool:
        return self._queued > 0

    def add_agent_audio(self, utterance_id: str, pcm: bytes, rate: int) -> None:
        if rate != self.rate:
            pcm = resample(pcm, rate, self.rate)
        if self._queued + len(pcm) > MAX_AGENT_QUEUE_S * self.rate * 2:
            return
        self._queue.append([utterance_id, bytearray(pcm)])
        self._queued += len(pcm)

    def cut(self, utterance_id: str | None = None) -> None:
        """Drop one utterance's rest (or everything, with None)."""
        keep = deque(u for u in self._queue if utterance_id is not None and u[0] != utterance_id)
        self._queued = sum(len(u[1]) for u in keep)
        self._queue = keep

    def _agent(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n and self._queue:
            utt = self._queue[0]
            take = utt[1][: n - len(out)]
            del utt[1][: len(take)]
            out += take
            if not utt[1]:
                self._queue.popleft()
        self._queued -= len(out)
        return bytes(out)

    def frame(self, inbound: bytes) -> bytes:
        """One stereo frame: ``inbound`` left, as much of our audio right."""
        return interleave(inbound, self._agent(len(inbound) or self.frame_bytes))

    def agent_only(self) -> bytes:
        """One stereo frame of our audio over silence (inbound stalled)."""
        return interleave(self._silence, self._agent(self.frame_bytes))


class Listener:
    """One listen socket: a bounded queue and its writer task."""

    def __init__(self, ws: Any, maxlen: int, max_stall_s: float) -> None:
        self.ws = ws
        self.queue: deque[bytes | str] = deque(maxlen=maxlen)
        self.max_stall_s = max_stall_s
        self.progress_at = time.monotonic()   # last send done (or queue found empty)
        self.skipped_total = 0
        self.wake = asyncio.Event()
        self.closed = asyncio.Event()
        self.close_code = 1000
        self.close_reason = ""

    def offer(self, msg: bytes | str) -> None:
        if self.closed.is_set():
            return
        if len(self.queue) == self.queue.maxlen:
            self.skipped_total += 1
            metrics.LISTEN_SKIPPED.inc()
            if time.monotonic() - self.progress_at > self.max_stall_s:
                self.close(1008, "listener too slow: dropped", "slow")
                return
        self.queue.append(msg)
        self.wake.set()

    def close(self, code: int, reason: str, metric_reason: str | None = None) -> None:
        if not self.closed.is_set():
            self.close_code, self.close_reason = code, reason
            if metric_reason:
                metrics.LISTEN_DROPPED.labels(reason=metric_reason).inc()
            self.closed.set()
            self.wake.set()

    async def run_writer(self) -> None:
        """Send queued messages until closed; a send slower than SEND_TIMEOUT_S drops us."""
        notified = 0
        while not self.closed.is_set():
            if not self.queue:
                self.progress_at = time.monotonic()
                self.wake.clear()
                await self.wake.wait()
                continue
            if self.skipped_total != notified:
                notified = self.skipped_total
                msg: bytes | str = json.dumps({"type": "notice", "skipped": notified})
            else:
                msg = self.queue.popleft()
            try:
                async with asyncio.timeout(SEND_TIMEOUT_S):
                    if isinstance(msg, bytes):
                        await self.ws.send_bytes(msg)
                    else:
                        await self.ws.send_text(msg)
            except TimeoutError:
                self.close(1008, "listener not reading: dropped", "send_timeout")
                return
            except Exception:  # noqa: BLE001 - the peer went away
                self.close(1001, "gone")
                return
            self.progress_at = time.monotonic()


def _event(msg: Any, entry_id: bytes) -> dict[str, Any]:
    data = msg.model_dump(mode="json", exclude={"pcm", "v"})
    data["event"] = data.pop("type")
    data["type"] = "event"
    data["t"] = keys.entry_ms(entry_id) / 1000
    return data


class CallHub:
    """The shared reader of one call and its listeners."""

    def __init__(self, service: "ListenService", call_id: str, rate: int, gateway_id: str) -> None:
        self.service = service
        self.call_id = call_id
        self.gateway_id = gateway_id
        self.mixer = StereoMixer(rate)
        self.listeners: set[Listener] = set()
        self.task: asyncio.Task | None = None
        self.ended = False
        self.last_inbound = time.monotonic()

    def broadcast(self, msg: bytes | str) -> None:
        # No copy: offer() never awaits nor leaves the set (listen() does, in its own task).
        for listener in self.listeners:
            listener.offer(msg)

    def agent_audio(self, cmd_fields: dict[bytes, bytes]) -> None:
        try:
            cmd = c.decode(cmd_fields)
        except ValueError:
            return
        self.mixer.add_agent_audio(cmd.utterance_id, cmd.pcm, cmd.rate)

    async def run(self) -> None:
        ar = self.service.ar
        streams = {keys.call_stream(self.call_id): "$", keys.call_timeline(self.call_id): "$"}
        # "$" resolves per XREAD call: take real ids first so nothing between reads is lost.
        for key in list(streams):
            last = await ar.xrevrange(key, count=1)
            streams[key] = last[0][0] if last else "0-0"
        failures = 0
        while not self.ended:
            try:
                got = await ar.xread(streams, count=500, block=READ_BLOCK_MS)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis away: retry a little, then tell listeners
                failures += 1
                log.warning("listen %s: read failed (%d): %r", self.call_id, failures, exc)
                if failures >= READ_RETRIES:
                    for listener in list(self.listeners):
                        listener.close(1011, "redis unavailable", "redis_error")
                    return
                await asyncio.sleep(0.5)
                continue
            for key, entries in got or ():
                key = key.decode() if isinstance(key, bytes) else key
                for entry_id, fields in entries:
                    streams[key] = entry_id
                    if key.endswith(":timeline"):
                        line = {k.decode(): v.decode("utf-8", "replace") for k, v in fields.items()}
                        self.broadcast(json.dumps({"type": "timeline", **line}))
                    else:
                        self._on_entry(entry_id, fields)
            self._pace()
        for listener in list(self.listeners):
            listener.close(1000, "call ended")

    def _on_entry(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        mtype = fields.get(b"type")
        if mtype == b"audio":
            self.last_inbound = time.monotonic()
            metrics.LISTEN_FRAMES.inc()
            self.broadcast(self.mixer.frame(fields.get(b"pcm", b"")))
            return
        try:
            msg = c.decode(fields)
        except ValueError:
            return
        if isinstance(msg, c.Transcript):
            self.broadcast(json.dumps({"type": "transcript", **transcript_item(msg)}))
            return
        if isinstance(msg, c.Playout) and msg.state == "interrupted":
            self.mixer.cut(msg.utterance_id)
        self.broadcast(json.dumps(_event(msg, entry_id), default=str))
        if isinstance(msg, c.CallEnded):
            self.ended = True

    def _pace(self) -> None:
        """Our audio on the wall clock while the inbound stream is stalled (paused)."""
        now = time.monotonic()
        if now - self.last_inbound < STALL_S or not self.mixer.agent_playing:
            return
        n = min(int((now - self.last_inbound) * 1000 // FRAME_MS), 25)
        for _ in range(n):
            self.broadcast(self.mixer.agent_only())
        self.last_inbound += n * FRAME_MS / 1000


class CommandTap:
    """Reads one gateway's command stream; feeds our audio to the hubs of its calls
    and keeps "is the agent talking" for every call it sees."""

    def __init__(self, service: "ListenService", gateway_id: str) -> None:
        self.service = service
        self.gateway_id = gateway_id
        self.task: asyncio.Task | None = None
        self.idle_since = time.monotonic()
        self.agent_until: dict[str, float] = {}

    async def run(self) -> None:
        ar = self.service.ar
        key = keys.gateway_commands(self.gateway_id)
        last = await ar.xrevrange(key, count=1)
        pos: Any = last[0][0] if last else "0-0"
        while True:
            try:
                got = await ar.xread({key: pos}, count=200, block=MAX_BLOCK_MS // 2)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - retry after a pause
                log.warning("command tap %s: %r", self.gateway_id, exc)
                await asyncio.sleep(1.0)
                continue
            for _key, entries in got or ():
                for entry_id, fields in entries:
                    pos = entry_id
                    self._on_command(fields)
            if len(self.agent_until) > 10_000:
                now = time.time()
                self.agent_until = {k: v for k, v in self.agent_until.items() if v > now}

    def _on_command(self, fields: dict[bytes, bytes]) -> None:
        mtype = fields.get(b"type")
        cid = (fields.get(b"call_id") or b"").decode("utf-8", "replace")
        hub = self.service.hubs.get(cid)
        if mtype == b"cmd.play_audio":
            try:
                rate = int(json.loads(fields.get(b"d", b"{}")).get("rate", 8000))
            except (ValueError, AttributeError):
                rate = 8000
            seconds = len(fields.get(b"pcm", b"")) / (2 * max(rate, 1))
            now = time.time()
            self.agent_until[cid] = max(now, self.agent_until.get(cid, 0.0)) + seconds
            if hub is not None:
                hub.agent_audio(fields)
        elif mtype in (b"cmd.interrupt", b"cmd.hangup", b"cmd.stop"):
            self.agent_until.pop(cid, None)
            if hub is not None:
                hub.mixer.cut()


class ListenService:
    """Owns the hubs and taps of this API process (one event loop, no locks)."""

    def __init__(self, ar: Any, *, queue: int = 50, max_stall_s: float = 5.0,
                 max_listeners: int = 5000) -> None:
        self.ar = ar
        self.queue = queue
        self.max_stall_s = max_stall_s
        self.max_listeners = max_listeners
        self.hubs: dict[str, CallHub] = {}
        self.taps: dict[str, CommandTap] = {}
        self.listener_count = 0
        self._track_all_until = 0.0
        self._janitor: asyncio.Task | None = None

    # ------------------------------------------------------------- taps
    def ensure_tap(self, gateway_id: str) -> None:
        tap = self.taps.get(gateway_id)
        if tap is None:
            tap = self.taps[gateway_id] = CommandTap(self, gateway_id)
            tap.task = asyncio.get_running_loop().create_task(tap.run())
        tap.idle_since = time.monotonic()
        if self._janitor is None or self._janitor.done():
            self._janitor = asyncio.get_running_loop().create_task(self._janitor_loop())

    async def track_gateways(self) -> None:
        """Tap every live gateway for a while (the call list wants "agent talking")."""
        self._track_all_until = time.monotonic() + TAP_IDLE_S
        for gw in await self.ar.zrange(keys.GATEWAYS_ZSET, 0, -1):
            self.ensure_tap(gw.decode())

    def agent_talking(self, call_id: str, gateway_id: str | None = None) -> bool | None:
        hub = self.hubs.get(call_id)
        if hub is not None:
            return hub.mixer.agent_playing
        for tap in self.taps.values():
            if call_id in tap.agent_until:
                return tap.agent_until[call_id] > time.time()
        return None if not self.taps else False

    async def _janitor_loop(self) -> None:
        while self.taps:
            await asyncio.sleep(5.0)
            now = time.monotonic()
            used = {h.gateway_id for h in self.hubs.values()}
            for gw, tap in list(self.taps.items()):
                if gw in used or now < self._track_all_until:
                    tap.idle_since = now
                elif now - tap.idle_since > TAP_IDLE_S:
                    tap.task.cancel()
                    del self.taps[gw]

    # ------------------------------------------------------------- listening
    async def listen(self, ws: Any, call_id: str, record: dict[str, str]) -> None:
        """Serve one accepted listen socket until it or the call ends."""
        rate = int(record.get("rate") or 8000)
        hub = self.hubs.get(call_id)
        if hub is None or hub.task is None or hub.task.done():
            hub = self.hubs[call_id] = CallHub(self, call_id, rate, record.get("gateway_id", ""))
            hub.task = asyncio.get_running_loop().create_task(hub.run())
            metrics.LISTEN_HUBS.set(len(self.hubs))
        if hub.gateway_id:
            self.ensure_tap(hub.gateway_id)
        listener = Listener(ws, self.queue, self.max_stall_s)
        listener.offer(json.dumps({
            "type": "hello", "call_id": call_id, "rate": rate, "channels": ["caller", "agent"],
            "format": "s16le", "interleaved": True, "frame_ms": FRAME_MS,
            "state": record.get("state"), "mode": record.get("listen_mode"),
            "gateway": record.get("gateway_id"), "owner": record.get("owner"),
        }))
        hub.listeners.add(listener)
        self.listener_count += 1
        metrics.LISTENERS.inc()
        writer = asyncio.get_running_loop().create_task(listener.run_writer())
        reader = asyncio.get_running_loop().create_task(self._drain_client(ws, listener))
        try:
            await listener.closed.wait()
        finally:
            hub.listeners.discard(listener)
            self.listener_count -= 1
            metrics.LISTENERS.dec()
            reader.cancel()
            if not writer.done():
                writer.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.gather(writer, reader, return_exceptions=True), 1.0)
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(ws.close(listener.close_code, listener.close_reason), 1.0)
            if not hub.listeners:
                asyncio.get_running_loop().call_later(HUB_LINGER_S, self._retire, call_id, hub)

    async def _drain_client(self, ws: Any, listener: Listener) -> None:
        """Read (and ignore) what the client sends, to notice it leaving."""
        try:
            while True:
                msg = await ws.receive()
                if msg.get("type") == "websocket.disconnect":
                    break
        except Exception:  # noqa: BLE001
            pass
        listener.close(1000, "client left")

    def _retire(self, call_id: str, hub: CallHub) -> None:
        if not hub.listeners and self.hubs.get(call_id) is hub:
            del self.hubs[call_id]
            if hub.task:
                hub.task.cancel()
            metrics.LISTEN_HUBS.set(len(self.hubs))

    async def close(self) -> None:
        for hub in list(self.hubs.values()):
            for listener in list(hub.listeners):
                listener.close(1001, "server shutting down")
            if hub.task:
                hub.task.cancel()
        for tap in self.taps.values():
            tap.task.cancel()
        if self._janitor:
            self._janitor.cancel()
        self.hubs.clear()
        self.taps.clear()
