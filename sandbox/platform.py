"""One sandbox call: the platform side of a PCMO, run on an asyncio loop.

Theory of operation
-------------------
A call has one clock task ticking every 20 ms on an absolute schedule (so
lateness never accumulates into drift). Each tick takes one frame from the
scripted caller, one from the simulated human when bridged, and one from the
playout queue (what the app sent, music, speak); it sends the uplink frame on
the media socket unless paused/stopped, and appends all of it to the
recordings. Everything else (PCMO execution, socket reading) runs in other
tasks and only changes state the next tick reads.

Behaviour where the public platform docs are silent (the sandbox defines it):

* Ringing lasts ``ring_ms``; the PCMO runs once answered. A ``stream`` with
  ``stream_on_answer: false`` is dialed at call creation instead (the stream
  carries silence until the caller answers).
* ``stream`` waits until the socket is open (or failed) and then lets the next
  actions run while streaming. After the last action the call stays up while
  the socket is open, a bridged human is on the line, or a mid-call PCMO is
  running; otherwise the platform hangs up (``pcmo_completed``, or
  ``stream_closed`` when the app closed the socket).
* ``play``/``speak`` block their PCMO list until played or cut by ``break``.
  ``speak`` is real speech: espeak-ng (voice ``PlatformOptions.speak_voice``)
  renders the text in a thread before it is queued (speech-like noise of
  ``speak_ms_per_char`` only if synthesis fails, logged ``speak_synth_error``).
  ``bridge`` blocks until the human leg ends.
* The scripted caller's and human's ``say`` texts are rendered in a thread
  when the call is created (while it rings), never on the clock.
* ``{"action":"stop"}`` ends the audio for good (``resume`` is then ignored)
  but keeps the socket open for control messages; the call goes on.
* A PCMO list received on the socket runs at once, replacing the unfinished
  rest of any earlier list received on the socket (so a ``hangup`` is never
  stuck behind music); audio already queued keeps playing unless ``break``.
* ``listen_mode``: every sandbox call is outbound (placed through make-call),
  so the platform's number is the caller and the person dialed is the callee.
  ``callee`` streams the person dialed (what the seed example asks for),
  ``caller`` the platform's side of the line (the bridged human agent; silence
  before a bridge), ``both`` their mix. The person hears the human in every
  mode. (In this package "the caller" in scenarios means the scripted person
  on the phone, whatever the mode.)
* hold (REST call action): the caller hears a hold tone, the stream carries
  silence, queued app audio waits.
* ``input``/``play_get_input``: the sandbox does not POST digits to
  ``action_url``; the file is played and the action logged as unsupported.
* streamAudio ``mp3``/``ogg`` cannot be decoded without extra dependencies:
  counted in ``playout.undecodable``, nothing is played.
"""

from __future__ import annotations

import asyncio
import json
import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from piopiy_voice.audio import FRAME_MS, frame_bytes, mix, read_wav, resample, rms_dbfs, silence, speech_like
from piopiy_voice.errors import PiopiyValidationError
from piopiy_voice.pcmo_models import (
    Bridge, Hangup, Input, Param, Play, PlayGetInput, Record, Speak, Stream, StreamAudio,
    StreamControl, parse_ws_message,
)

from . import voice
from .caller import ScriptPlayer
from .human import SimulatedHuman
from .media import MediaLibrary, PlatformOptions, Playout, hold_tone, Segment
from .report import Timeline, Tracks, write_report
from .scenario import Scenario, say_texts

log = logging.getLogger(__name__)
#: listen_mode as seen from an inbound call, where the scripted person is the caller.
_INBOUND_LISTEN = {"caller": "callee", "callee": "caller"}

#: Events worth one INFO line each; the rest log at DEBUG.
_LOGGED = frozenset({"answered", "ws_connected", "ws_closed", "stream_failed", "stream_paused",
                     "stream_resumed", "stream_stopped", "playback_cut", "bridge_dialing",
                     "human_answered", "human_left", "dtmf", "hangup", "call_ended", "pcmo_error"})


@dataclass
class StreamState:
    ws_url: str
    listen_mode: str
    rate: int
    state: str = "connecting"  # connecting | open | failed | closed
    ws: Any = None
    paused: bool = False
    stopped: bool = False
    pause_started_ms: float | None = None
    paused_ranges: list[list[float]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    frames_sent: int = 0
    bytes_sent: int = 0
    connected_ms: float | None = None
    closed_ms: float | None = None
    close_code: int | None = None
    close_reason: str | None = None
    closed_by: str | None = None
    error: str | None = None

    def close_pause(self, now_ms: float) -> None:
        """Record the open pause, if any, as ending at ``now_ms``."""
        if self.pause_started_ms is not None:
            self.paused_ranges.append([self.pause_started_ms, now_ms])
            self.pause_started_ms = None

    def summary(self) -> dict[str, Any]:
        return {
            "ws_url": self.ws_url, "listen_mode": self.listen_mode, "voice_quality": self.rate,
            "state": self.state, "paused": self.paused, "stopped": self.stopped,
            "frame_bytes": frame_bytes(self.rate), "frames_sent": self.frames_sent,
            "bytes_sent": self.bytes_sent,
            "runs": [{**r, "frames": r["last_tick"] - r["first_tick"] + 1} for r in self.runs],
            "paused_ranges": self.paused_ranges,
            "connected_ms": self.connected_ms, "closed_ms": self.closed_ms,
            "close_code": self.close_code, "close_reason": self.close_reason,
            "closed_by": self.closed_by, "error": self.error,
        }


class SandboxCall:
    """The platform side of one call. ``await run()`` returns the final report."""

    def __init__(self, request_id: str, *, from_: int | str, to: int | str, duration_s: float,
                 pcmo: list[Any], scenario: Scenario, report_dir: Path,
                 options: PlatformOptions | None = None, extra_params: dict | None = None,
                 endpoint: str = "", direction: str = "outbound") -> None:
        if direction not in ("outbound", "inbound"):
            raise ValueError(f"direction must be outbound or inbound, got {direction!r}")
        self.request_id = request_id
        #: ``inbound``: the scripted person dialed the platform's number, so they are
        #: the *caller* and the platform's side (a bridged human) the *callee*.
        self.direction = direction
        self.from_, self.to = from_, to
        self.pcmo = pcmo
        self.scenario = scenario
        self.options = options or PlatformOptions()
        self.media = MediaLibrary(self.options)
        self.extra_params = extra_params or {}
        self.endpoint = endpoint
        self.report_dir = Path(report_dir) / request_id
        self.max_duration_s = min(float(duration_s), scenario.max_duration_s)
        streams = [a for a in pcmo if isinstance(a, Stream)]
        self.rate = streams[0].voice_quality if streams else 8000
        self.timeline = Timeline()
        self.tracks = Tracks(self.rate)
        self.playout = Playout(self.rate)
        self.state = "ringing"
        self.end_reason: str | None = None
        self.stream: StreamState | None = None
        self.human: SimulatedHuman | None = None
        self.on_hold = False
        self.recording = False
        self.received: dict[str, int] = {}
        self.malformed: list[dict[str, Any]] = []
        self.undecodable = 0
        self.received_audio_ms = 0.0
        self.recordings: dict[str, str] = {}
        self.late_ticks = 0
        self.max_late_ms = 0.0
        self.audio_origin_ms: float | None = None
        self._silence = silence(FRAME_MS, self.rate)
        self._hold = hold_tone(self.rate)
        # Last frame the caller heard / last caller frame the human heard; their
        # levels are checked only when a wait_for step asks (see _talking).
        self._heard = self._silence
        self._said = self._silence
        self._threshold = scenario.talk_threshold_db
        self._caller: ScriptPlayer | None = None
        self._main_running = True
        self._socket_task: asyncio.Task | None = None
        self._stream_task: asyncio.Task | None = None
        self._human_done: asyncio.Event | None = None
        self._ended: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._voices: asyncio.Task | None = None
        self.finished = False

    # -- lifecycle -----------------------------------------------------------

    @property
    def ended(self) -> bool:
        return self.end_reason is not None

    def event(self, src: str, event: str, **detail: Any) -> None:
        self.timeline.add(src, event, **detail)
        if event in _LOGGED:
            log.info("call %s %s %s %s", self.request_id, src, event,
                     " ".join(f"{k}={v}" for k, v in detail.items() if k != "detail"))
        elif log.isEnabledFor(logging.DEBUG):
            log.debug("call %s %s %s %s", self.request_id, src, event, detail)

    async def run(self) -> dict[str, Any]:
        self._ended = asyncio.Event()
        self.event("api", "call_created", endpoint=self.endpoint, **{"from": self.from_}, to=self.to,
                   pcmo=[a.action for a in self.pcmo], scenario=self.scenario.name,
                   max_duration_s=self.max_duration_s)
        loop = asyncio.get_running_loop()
        texts = say_texts(self.scenario)
        if texts:  # the script's sentences, rendered off the clock while the phone rings
            self._voices = loop.create_task(asyncio.to_thread(voice.prerender, texts, self.rate))
        self._tasks = [loop.create_task(self._clock()), loop.create_task(self._run_main())]
        timer = loop.call_later(self.max_duration_s, self.end, "max_duration")
        try:
            await self._ended.wait()
        finally:
            timer.cancel()
            await self._teardown()
        return self.report()

    async def _teardown(self) -> None:
        for task in (*self._tasks, self._socket_task):
            if task and not task.done():
                task.cancel()
        stream = self.stream
        if stream and stream.ws is not None and stream.state == "open":
            if self.options.text_events:
                await self._send_text({"event": "stop", "reason": self.end_reason})
            stream.closed_by = stream.closed_by or "platform"
            try:
                await asyncio.wait_for(stream.ws.close(1000, (self.end_reason or "")[:100]), 3.0)
            except Exception:  # noqa: BLE001 - the peer may already be gone
                pass
        if self._stream_task and not self._stream_task.done():
            try:
                await asyncio.wait_for(self._stream_task, 3.0)
            except (asyncio.TimeoutError, asyncio.CancelledError, Exception):  # noqa: BLE001
                self._stream_task.cancel()
        try:
            self.recordings = await asyncio.to_thread(self.tracks.write, self.report_dir)
        except Exception as exc:  # noqa: BLE001 - a report failure must not hide the call's end
            self.event("platform", "recording_error", error=str(exc))
        # The audio is on disk now; a load run keeps many finished calls in memory.
        self.tracks = Tracks(self.rate)
        self.finished = True
        try:
            await asyncio.to_thread(write_report, self.report_dir, self.report())
        except Exception:  # noqa: BLE001
            log.exception("call %s: could not write report", self.request_id)
        log.debug("call %s report written to %s", self.request_id, self.report_dir)

    def end(self, reason: str, **detail: Any) -> None:
        if self.ended:
            return
        self.end_reason = reason
        self.state = "ended"
        if self.human and not self.human.ended:
            self.human.hang_up("call_ended")
        if self.stream:
            self.stream.close_pause(self.timeline.now_ms())
        self.playout.clear()
        self.event("platform", "call_ended", reason=reason, **detail)
        if self._ended is not None:
            self._ended.set()

    def _maybe_end(self, reason: str = "pcmo_completed") -> None:
        if self.ended or self.state == "ringing" or self._main_running:
            return
        if self._socket_task is not None and not self._socket_task.done():
            return
        if self.stream is not None and self.stream.state in ("connecting", "open"):
            return
        if self.human is not None and not self.human.ended:
            return
        self.end(reason)

    def _caller_event(self, event: str, **detail: Any) -> None:
        self.event("caller", event, **detail)
        if event == "dtmf" and self.options.text_events:
            asyncio.get_running_loop().create_task(self._send_text({"event": "dtmf", "digits": detail["keys"]}))

    # -- the clock -----------------------------------------------------------

    async def _clock(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        self.audio_origin_ms = self.timeline.now_ms()
        tick = 0
        while not self.ended:
            delay = start + tick * FRAME_MS / 1000 - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -FRAME_MS / 1000:
                self.late_ticks += 1
                self.max_late_ms = max(self.max_late_ms, -delay * 1000)
            if self.ended:
                break
            try:
                up = self._tick(tick)
                if up is not None:
                    await self.stream.ws.send(up)
            except ConnectionClosed:
                pass  # the reader task reports the close
            except Exception as exc:  # noqa: BLE001 - one bad tick must not freeze the call
                log.exception("call %s: tick %d failed", self.request_id, tick)
                self.event("platform", "clock_error", tick=tick, error=str(exc))
            tick += 1

    def _tick(self, tick: int) -> bytes | None:
        """One 20 ms step of the whole call; returns the frame to send, if any."""
        frame = self._silence
        caller = frame
        if self.state == "live" and self._caller is not None:
            got = self._caller.next_frame(self._caller_heard_talking)
            if got is None:
                self.end("caller_hangup")
                return None
            caller = got
        human = None
        if self.human is not None and not self.human.ended:
            human = self.human.next_frame(self._human_heard_talking)
            if self.human.ended and self._human_done is not None:
                self._human_done.set()
                asyncio.get_running_loop().call_soon(self._maybe_end, "bridge_ended")
        if self.on_hold:
            offset = (tick * len(frame)) % len(self._hold)
            heard = self._hold[offset: offset + len(frame)]
            heard = heard if len(heard) == len(frame) else frame
        else:
            app = self.playout.next_frame(self._seg_start, self._seg_end) or frame
            heard = mix(app, human) if human else app
        side = mix(caller, human) if human else caller
        stream = self.stream
        up = caller
        if stream is not None:
            mode = stream.listen_mode
            if self.direction == "inbound":  # the person is the caller here
                mode = _INBOUND_LISTEN.get(mode, mode)
            if mode == "caller":
                up = human or frame
            elif mode == "both":
                up = side
        if self.on_hold:
            up = frame
        self._heard = heard
        if human is not None:
            self._said = caller
        sending = (stream is not None and stream.state == "open" and not stream.paused
                   and not stream.stopped)
        self.tracks.append(sent=up if sending else frame, heard=heard, side=side)
        if not sending:
            return None
        now = self.timeline.now_ms()
        run = stream.runs[-1] if stream.runs else None
        if run is None or run["last_tick"] != tick - 1:
            run = {"start_ms": now, "end_ms": now, "first_tick": tick, "last_tick": tick}
            stream.runs.append(run)
        run["end_ms"], run["last_tick"] = now, tick
        if stream.rate != self.rate:
            up = resample(up, self.rate, stream.rate)
        stream.frames_sent += 1
        stream.bytes_sent += len(up)
        return up

    # Level checks cost more than the rest of a tick: done only when a scripted
    # person is waiting on the other side's audio, and skipped for known silence.
    def _talking(self, frame: bytes) -> bool:
        return frame is not self._silence and rms_dbfs(frame) > self._threshold

    def _caller_heard_talking(self) -> bool:
        return self._talking(self._heard)

    def _human_heard_talking(self) -> bool:
        return self._talking(self._said)

    def _seg_start(self, seg: Segment) -> None:
        if seg.label:
            self.event("platform", "play_started", what=seg.label, source=seg.source,
                       ms=len(seg.pcm) * 1000 // (2 * self.rate))

    def _seg_end(self, seg: Segment) -> None:
        if seg.label:
            self.event("platform", "play_finished", what=seg.label, source=seg.source)

    # -- PCMO execution ------------------------------------------------------

    async def _run_main(self) -> None:
        try:
            early = next((a for a in self.pcmo if isinstance(a, Stream) and not a.stream_on_answer), None)
            if early is not None:
                await self._start_stream(early, lane="main")
            await asyncio.sleep(self.options.ring_ms / 1000)
            if self._voices is not None:  # rings on until the script's voice is ready
                for error in await self._voices:
                    self.event("platform", "say_render_error", error=error)
            if self.ended:
                return
            self.state = "live"
            self.event("platform", "answered", to=self.to)
            # The person picks up now: their script starts at answer, not at dialing.
            self._caller = ScriptPlayer(
                self.scenario.steps, self.rate, after_steps=self.scenario.after_steps,
                emit=self._caller_event,
            )
            await self._execute(self.pcmo, lane="main", skip=early)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - report, never crash the loop
            log.exception("call %s: PCMO execution failed", self.request_id)
            self.event("platform", "pcmo_error", error=str(exc))
        finally:
            self._main_running = False
        self._maybe_end("pcmo_completed")

    async def _execute(self, actions: list[Any], *, lane: str, skip: Any = None) -> None:
        for index, act in enumerate(actions):
            if self.ended:
                return
            if act is skip:
                continue
            self.event("platform", "action", lane=lane, index=index, action=act.action,
                       detail=_detail(act))
            if isinstance(act, Hangup):
                self.end("hangup_pcmo", lane=lane)
                return
            if isinstance(act, Stream):
                await self._start_stream(act, lane=lane)
            elif isinstance(act, Play):
                await self._play_media(file_name=act.file_name, file_url=act.file_url,
                                       label=f"play:{act.file_name or act.file_url}")
            elif isinstance(act, Speak):
                pcm = await self._speak_audio(act.text)
                await self._play(Segment("speak", pcm, label=f"speak:{act.text[:40]}"))
            elif isinstance(act, Bridge):
                await self._bridge(act)
            elif isinstance(act, Record):
                self.recording = True
                self.event("platform", "record_started")
            elif isinstance(act, Param):
                self.event("platform", "param_set", text=act.text)
            elif isinstance(act, PlayGetInput):
                await self._play_media(file_name=act.file_name, file_url=None,
                                       label=f"play_get_input:{act.file_name}")
                self.event("platform", "input_unsupported", action=act.action, action_url=act.action_url)
            elif isinstance(act, Input):
                self.event("platform", "input_unsupported", action=act.action, action_url=act.action_url)

    async def _speak_audio(self, text: str) -> bytes:
        """The platform's voice saying ``text``, rendered off the clock."""
        try:
            return await asyncio.to_thread(voice.render, text, self.options.speak_voice, self.rate)
        except voice.SayRenderError as exc:
            self.event("platform", "speak_synth_error", error=str(exc))
            ms = max(400, min(20_000, len(text) * self.options.speak_ms_per_char))
            return speech_like(ms, rate=self.rate, seed=zlib.crc32(text.encode()) & 0xFFFF)

    async def _play_media(self, *, file_name: str | None, file_url: str | None, label: str) -> None:
        pcm, source = self.media.audio(file_name=file_name, file_url=file_url, rate=self.rate)
        await self._play(Segment("music" if source == "synthesized" else source, pcm, label=label))

    async def _play(self, seg: Segment) -> None:
        seg.done = asyncio.get_running_loop().create_future()
        self.playout.push(seg)
        result = await seg.done
        if result == "cut":
            self.event("platform", "play_cut", what=seg.label)

    async def _bridge(self, act: Bridge) -> None:
        if self.human is not None and not self.human.ended:
            self.event("platform", "bridge_ignored", reason="already bridged")
            return
        numbers = [t.number for t in act.connect]
        self.event("platform", "bridge_dialing", numbers=numbers, **{"from": act.from_},
                   ring_type=act.ring_type, timeout=act.timeout)
        self._human_done = asyncio.Event()
        self.human = SimulatedHuman(
            self.scenario.human, self.rate, number=numbers[0], timeout_s=act.timeout,
            duration_s=act.duration, emit=lambda event, **d: self.event("human", event, **d),
        )
        await self._human_done.wait()

    # -- the media socket ----------------------------------------------------

    async def _start_stream(self, act: Stream, *, lane: str) -> None:
        if self.stream is not None and self.stream.state in ("connecting", "open"):
            self.event("platform", "stream_ignored", reason="a stream is already active", lane=lane)
            return
        self.stream = StreamState(act.ws_url, act.listen_mode, act.voice_quality)
        opened = asyncio.get_running_loop().create_future()
        self._stream_task = asyncio.get_running_loop().create_task(self._stream_loop(self.stream, opened))
        await opened

    async def _stream_loop(self, stream: StreamState, opened: asyncio.Future) -> None:
        self.event("platform", "ws_connecting", url=stream.ws_url)
        try:
            ws = await ws_connect(stream.ws_url, compression=None, open_timeout=self.options.connect_timeout_s,
                                  max_size=self.options.ws_max_size, close_timeout=3)
        except Exception as exc:  # noqa: BLE001 - any dial failure is reported the same way
            stream.state, stream.error = "failed", f"{type(exc).__name__}: {exc}"
            self.event("platform", "stream_failed", error=stream.error)
            if not opened.done():
                opened.set_result(False)
            asyncio.get_running_loop().call_soon(self._maybe_end, "stream_failed")
            return
        stream.ws, stream.state = ws, "open"
        stream.connected_ms = self.timeline.now_ms()
        self.event("platform", "ws_connected", url=stream.ws_url, rate=stream.rate,
                   listen_mode=stream.listen_mode)
        if not opened.done():
            opened.set_result(True)
        if self.options.text_events:
            await self._send_text({"event": "start", "request_id": self.request_id,
                                   "voice_quality": stream.rate, "listen_mode": stream.listen_mode})
        try:
            async for message in ws:
                try:
                    self._on_message(message)
                except Exception as exc:  # noqa: BLE001 - a bad message never ends the call
                    log.exception("call %s: message handling failed", self.request_id)
                    self._malformed(str(message)[:200], "message", f"handler error: {exc}")
        except ConnectionClosed:
            pass
        finally:
            stream.state = "closed"
            stream.closed_ms = self.timeline.now_ms()
            stream.close_code = ws.close_code
            stream.close_reason = ws.close_reason
            stream.closed_by = stream.closed_by or "gateway"
            stream.close_pause(stream.closed_ms)
            self.event("platform", "ws_closed", code=ws.close_code, reason=ws.close_reason,
                       by=stream.closed_by)
            if not self.ended:
                asyncio.get_running_loop().call_soon(self._maybe_end, "stream_closed")

    async def _send_text(self, obj: dict[str, Any]) -> None:
        stream = self.stream
        if stream is None or stream.state != "open":
            return
        try:
            await stream.ws.send(json.dumps(obj))
            self.event("platform", "ws_text_sent", payload=obj)
        except ConnectionClosed:
            pass

    def _count(self, kind: str) -> None:
        self.received[kind] = self.received.get(kind, 0) + 1

    def _malformed(self, text: str, field: str | None, error: str) -> None:
        self._count("malformed")
        entry = self.timeline.add("gateway", "ws_malformed", field=field, error=error, text=text[:200])
        self.malformed.append(entry)

    def _on_message(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            self._count("binary")
            self.event("gateway", "ws_binary", bytes=len(message))
            return
        try:
            parsed = parse_ws_message(message)
        except PiopiyValidationError as exc:
            self._malformed(message, exc.field, exc.message)
            return
        if isinstance(parsed, StreamAudio):
            self._on_stream_audio(parsed)
        elif isinstance(parsed, StreamControl):
            self._on_control(parsed.action)
        else:
            self._count("pcmo")
            self.event("gateway", "ws_message", kind="pcmo", actions=[a.action for a in parsed])
            self._run_socket_pcmo(parsed)

    def _on_stream_audio(self, msg: StreamAudio) -> None:
        self._count("streamAudio")
        data = msg.data
        raw = data.audio_bytes()
        detail = {"kind": "streamAudio", "audio_type": data.audioDataType, "sample_rate": data.sampleRate,
                  "bytes": len(raw)}
        if data.audioDataType == "raw":
            pcm, rate = raw[: len(raw) & ~1], data.sampleRate
        elif data.audioDataType == "wav":
            try:
                pcm, rate = read_wav(raw)
            except Exception as exc:  # noqa: BLE001
                self._malformed(f"<wav {len(raw)} bytes>", "data.audioData", f"undecodable wav: {exc}")
                return
        else:
            self.undecodable += 1
            self.event("gateway", "ws_message", decoded=False, **detail)
            return
        if rate != self.rate:
            pcm = resample(pcm, rate, self.rate)
        ms = len(pcm) * 1000 / (2 * self.rate)
        self.received_audio_ms += ms
        self.event("gateway", "ws_message", ms=round(ms, 1), queued_ms=self.playout.queued_ms, **detail)
        if pcm:
            self.playout.push(Segment("stream", pcm))

    def _on_control(self, action: str) -> None:
        self._count(action)
        self.event("gateway", "ws_message", kind="control", action=action)
        stream = self.stream
        now = self.timeline.now_ms()
        if action == "break":
            cut_ms, sources = self.playout.clear()
            self.event("platform", "playback_cut", cut_ms=cut_ms, segments=len(sources))
            return
        if stream is None:
            self.event("platform", "control_ignored", action=action, reason="no stream")
            return
        if action == "stop":
            stream.close_pause(now)
            stream.paused, stream.stopped = False, True
            self.event("platform", "stream_stopped")
        elif stream.stopped:
            self.event("platform", "control_ignored", action=action, reason="stream stopped")
        elif action == "pause":
            if stream.paused:
                self.event("platform", "control_ignored", action=action, reason="already paused")
            else:
                stream.paused, stream.pause_started_ms = True, now
                self.event("platform", "stream_paused")
        elif action == "resume":
            if not stream.paused:
                self.event("platform", "control_ignored", action=action, reason="not paused")
            else:
                stream.close_pause(now)
                stream.paused = False
                self.event("platform", "stream_resumed")

    def _run_socket_pcmo(self, actions: list[Any]) -> None:
        if self._socket_task is not None and not self._socket_task.done():
            self._socket_task.cancel()
            self.event("platform", "pcmo_preempted")

        async def runner() -> None:
            try:
                await self._execute(actions, lane="socket")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                log.exception("call %s: socket PCMO failed", self.request_id)
                self.event("platform", "pcmo_error", error=str(exc))
            asyncio.get_running_loop().call_soon(self._maybe_end, "pcmo_completed")

        self._socket_task = asyncio.get_running_loop().create_task(runner())

    # -- REST call actions ---------------------------------------------------

    def api_action(self, action: str) -> None:
        """hangup | hold | unhold | holdToggle, as POSTed to /v1/call/action."""
        self.event("api", "call_action", action=action)
        if action == "hangup":
            self.end("api_hangup")
        elif action in ("hold", "unhold", "holdToggle"):
            hold = {"hold": True, "unhold": False}.get(action, not self.on_hold)
            if hold != self.on_hold:
                self.on_hold = hold
                self.event("platform", "held" if hold else "unheld")
        else:
            raise ValueError(f"action: unknown call action {action!r}")

    # -- reporting -----------------------------------------------------------

    def report(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "status": self.state,
            "finished": self.finished,
            "end_reason": self.end_reason,
            "endpoint": self.endpoint,
            "direction": self.direction,
            "from": self.from_,
            "to": self.to,
            "scenario": self.scenario.name,
            "extra_params": self.extra_params,
            "pcmo": [a.to_dict() for a in self.pcmo],
            "rate": self.rate,
            "started_at": self.timeline.started_at,
            "duration_ms": self.timeline.now_ms(),
            "audio_origin_ms": self.audio_origin_ms,
            "stream": self.stream.summary() if self.stream else None,
            "received": dict(self.received),
            "playout": {
                "received_ms": round(self.received_audio_ms, 1),
                "played_ms": self.playout.played_bytes * 1000 // (2 * self.rate),
                "cut_ms": self.playout.cut_bytes * 1000 // (2 * self.rate),
                "queued_ms": self.playout.queued_ms,
                "undecodable": self.undecodable,
            },
            "human": ({"number": self.human.number, "state": self.human.state} if self.human else None),
            "on_hold": self.on_hold,
            "recording": self.recording,
            "late_ticks": self.late_ticks,
            "max_late_ms": round(self.max_late_ms, 1),
            "malformed": list(self.malformed),
            "events": list(self.timeline.events),
            "report_dir": str(self.report_dir),
            "recordings": dict(self.recordings),
        }


def _detail(act: Any) -> dict[str, Any]:
    d = act.to_dict()
    d.pop("action", None)
    return d
