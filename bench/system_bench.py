"""Whole-system load benchmark (issue 14): N concurrent calls end to end through the real roles.

    .venv/bin/python bench/system_bench.py [--calls 25,50,100,200,400] [--seconds 30]
        [--warmup 5] [--workers 1] [--tts espeak|platform] [--rate 8000] [--keep-going]

Theory of operation
-------------------
One step per N, each on a fresh system, all on loopback and all private:

* a redis-server of its own (``EmbeddedRedis``);
* the real roles as processes, started like ``piopiy-voice demo`` starts them
  (``Supervisor`` + ``role_command``): a gateway, ``--workers`` workers running
  the DefaultAgent (replies synthesized by espeak in the worker's synthesis
  child process, ``PV_TTS_PROCESSES``; or ``--tts platform``: ``speak``
  PCMOs, nothing synthesized by us), and a dialer (the RQ worker);
* a fake platform in its own process (``--serve-platform``): the sandbox's
  REST surface (``sandbox.server.Sandbox``: auth, make-call validation, PCMO
  parsing), whose make-call starts a lean ``LoadCall`` instead of a full
  ``SandboxCall`` (no recordings, no timeline, no mixing: a sandbox call costs
  several times more CPU per frame than the gateway it would measure). Each
  call rings ``ring_ms``, opens the media WebSocket to the ``ws_url`` of the
  PCMO's ``stream`` action and streams 20 ms frames in real time from ONE
  clock for all calls (10 groups staggered over the 20 ms tick, like
  ``gateway_bench.py``). The frames are written pre-framed to the socket's
  transport (mask key 0, valid per RFC 6455): 12 us per frame against 31 us
  through ``websockets``' ``send`` (measured on this machine); the library
  still does the handshake, pings, close and reading.

The caller (``CallerScript``, pure) speaks espeak sentences rendered by
``sandbox.voice`` (the sandbox's own cache): it waits for the agent's audio
(the greeting), talks over it 0.3-1.2 s after it started (a barge-in, which is
also its next question), and every third turn instead lets the answer finish,
presses DTMF "5" (no meaning to the DefaultAgent, but it is detected on every
frame) and then asks. 200 ms after each utterance ends, the platform process
writes that utterance's final ``Transcript`` into the call's stream, as the
transcriber role would: the transcriber is not run (it needs ~2% of a core
per talking call, see BENCHMARKS.md "Voice-to-voice"; 50 talking calls per
core is its own capacity figure), so the agent answers the words it was
"heard" saying.

The steps of one N:

1. start Redis, the gateway, the worker(s) and the platform; enqueue the N
   calls in bulk with the project's campaign API (``campaign.enqueue_csv``:
   one CSV of N contacts); the ``MEMORY USAGE`` of the keys this wrote (or
   grew), over N, is the memory of a queued call;
2. start the dialer; it places the calls (``PV_DIAL_RATE_PER_S``) through
   ``RestClient``; wait until the platform has all N sockets open (ramp);
3. ``--warmup`` seconds, then the measured window of ``--seconds``: CPU
   (psutil user+sys of each role's process tree, reaped children included:
   the dialer's RQ work horses, the worker's synthesis child) at both ends,
   ``used_memory`` at both ends, the workers' stream lag (``/lag``, exact
   quantiles) every 5 s;
4. the platform closes every socket (a normal close: the gateway ends the
   calls) and reports, per call, the frames it sent, the wall-clock time of
   every speech onset it sent and of every ``break`` it received;
5. frames lost = frames sent - ``audio`` entries in the call streams (counted
   inside Redis by a Lua script, after the window).

Figures (all from one clock, the machine's wall clock; Redis entry ids carry
it too):

* CPU per call-second of each role = its CPU seconds in the window / (live
  calls x window seconds); the dialer's per call placed over the ramp;
* barge-in = speech onset (the first frame above -50 dBFS of an utterance
  that started while agent audio was arriving) -> ``{"action":"break"}``
  received on that call's socket; "missed" = no break before the caller's
  next utterance. It includes the turn detector's own need for voiced audio
  (``bargein_bench.vad_delay_ms`` of each sentence, printed);
* command -> socket = entry time of a ``cmd.interrupt`` in the gateway's
  command stream (read by a thread here) -> the ``break`` it caused;
* Redis per call-minute = growth of ``used_memory`` in the window / call-
  minutes in the window.

A step breaks on: frames lost, barge-in p99 > 150 ms, more than 2% of the
barge-ins missed (or none measured), worker lag growing (p99 of the last 5 s
slice above both 100 ms and twice the first slice's), calls that never
connected or that the gateway closed. The run
stops at the first N that breaks unless ``--keep-going``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import secrets
import select
import signal
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bargein_bench import vad_delay_ms
from callsim import pct, speech_frames

from piopiy_voice import contracts as c
from piopiy_voice import keys
from piopiy_voice.audio import dtmf_sequence, frame_bytes

ROOT = Path(__file__).resolve().parent.parent
#: What the callers say (each utterance is a question, and a barge-in when it starts
#: over the agent): sentences that open on a voiced sound, so the turn detector
#: needs only 60-80 ms of them (printed per run: ``vad_floors``); none asks for
#: a person or says goodbye.
TEXTS = ["what are your opening hours", "i have a problem with my card", "wait, I have another question",
         "are you open on monday", "i need help with my order", "no, what about my order",
         "i want to track my parcel", "okay, and my order"]
CALLER_ID = "919000000000"
DTMF_KEY = "5"  # neither the hand-off key (0) nor the pause key (*)
#: The caller talks over the agent this long after its audio started arriving.
BARGE_AFTER_S = (0.3, 1.2)
#: Every LISTEN_EVERY-th turn the caller lets the answer finish, then presses the key.
LISTEN_EVERY = 3
#: Agent audio arrived this recently = the agent is talking (the gateway sends
#: 40 ms chunks up to 100 ms ahead of real time).
AGENT_TALKING_S = 0.15
QUIET_BEFORE_KEY_S = 0.7
NO_REPLY_S = 6.0
FINAL_AFTER_S = 0.2  # utterance end -> its final transcript, as the transcriber would
SPEAK_S_PER_CHAR = 0.06  # --tts platform: how long a speak PCMO "plays" here
CLOCK_GROUPS = 10
LAG_SLICE_S = 5.0
BARGE_P99_TARGET_MS = 150.0
MISSED_MAX = 0.02


# ------------------------------------------------------------ speech material
def client_frame(payload: bytes) -> bytes:
    """A masked binary WebSocket frame with mask key 0 (payload 126..65535 bytes)."""
    return b"\x82\xfe" + len(payload).to_bytes(2, "big") + b"\0\0\0\0" + payload


@dataclass(frozen=True)
class Utterance:
    text: str
    frames: tuple[bytes, ...]  # ready to write on the socket
    onset: int  # index of the first frame above -50 dBFS
    end: int    # index of the last one


@dataclass(frozen=True)
class Speech:
    rate: int
    silence: bytes
    key: tuple[bytes, ...]
    utterances: dict[str, Utterance]


def build_speech(texts: list[str], rate: int) -> Speech:
    from piopiy_voice.sandbox import voice  # espeak, cached like the sandbox's callers

    utts = {}
    for text in texts:
        frames, onset, end = speech_frames(voice.render(text, "en-us", rate), rate)
        utts[text] = Utterance(text, tuple(client_frame(f) for f in frames), onset, end)
    fb = frame_bytes(rate)
    tone = dtmf_sequence(DTMF_KEY, tone_ms=120, rate=rate)
    tone += bytes(-len(tone) % fb)
    key = tuple(client_frame(tone[i:i + fb]) for i in range(0, len(tone), fb))
    return Speech(rate, client_frame(bytes(fb)), key, utts)


def vad_floors(texts: list[str], rate: int) -> dict[str, int]:
    """ms of each sentence the turn detector needs before it may call it speech."""
    from piopiy_voice.sandbox import voice

    out = {}
    for text in texts:
        frames, onset, _ = speech_frames(voice.render(text, "en-us", rate), rate)
        out[text] = vad_delay_ms(frames, onset, rate, int(os.environ.get("PV_TURN_ONSET_MS", "80")))
    return out


# ------------------------------------------------------------------ the caller
class CallerScript:
    """What one caller sends, one frame per call of ``next_frame(now)`` (pure:
    no I/O; ``now`` is wall-clock seconds). The platform reports the agent's
    audio with ``on_agent_audio(now)``. Results: ``onsets`` (ms, kind
    ``barge``|``ask``, text), ``finals`` (due time, text) for the transcript
    stand-in to take, ``no_reply``, ``keys``."""

    def __init__(self, speech: Speech, rng: random.Random) -> None:
        self.speech = speech
        self.rng = rng
        self.queue: deque[tuple[bytes, tuple[str, str] | None]] = deque()
        self.speaking = False
        self.since: float | None = None       # when the caller last stopped talking
        self.agent_first: float | None = None  # first agent audio since then
        self.agent_last = -1e18
        self.plan: str | None = None
        self.barge_at = 0.0
        self.turn = 0
        self.onsets: list[tuple[float, str, str]] = []
        self.finals: list[tuple[float, str]] = []
        self.no_reply = 0
        self.no_reply_after_key = 0
        self.keys = 0
        self.last_why = ""
        #: (wall s, what): agent audio starting, the caller's turns (for reading a call back)
        self.trace: list[tuple[float, str]] = []

    def on_agent_audio(self, now: float) -> None:
        self.agent_last = now
        if self.speaking or self.agent_first is not None:
            return
        self.agent_first = now
        self.trace.append((now, "agent audio"))
        self.turn += 1
        if self.turn % LISTEN_EVERY == 0:
            self.plan = "listen"
        else:
            self.plan, self.barge_at = "barge", now + self.rng.uniform(*BARGE_AFTER_S)

    def next_frame(self, now: float) -> bytes:
        if not self.queue:
            self._idle(now)
        if not self.queue:
            return self.speech.silence
        frame, mark = self.queue.popleft()
        if mark is not None:
            kind, text = mark
            if kind == "onset":
                talking = now - self.agent_last <= AGENT_TALKING_S
                self.onsets.append((now * 1000, "barge" if talking else "ask", text))
            else:
                self.finals.append((now + FINAL_AFTER_S, text))
        return frame

    def _idle(self, now: float) -> None:
        if self.speaking:  # just stopped talking: wait for the agent's answer afresh
            self.speaking, self.since, self.agent_first, self.plan = False, now, None, None
        elif self.since is None:  # the call's first frame
            self.since = now
        if self.agent_first is None:
            if now - self.since > NO_REPLY_S:
                self.no_reply += 1
                self.no_reply_after_key += self.last_why.startswith("key")
                self._say(now, "no reply: ask again")
        elif self.plan == "barge" and now >= self.barge_at:
            self._say(now, "barge")
        elif self.plan == "listen" and now - self.agent_last >= QUIET_BEFORE_KEY_S:
            self.keys += 1
            self.queue.extend((f, None) for f in self.speech.key)
            self.queue.extend([(self.speech.silence, None)] * 40)
            self._say(now, f"key {DTMF_KEY}, then ask")

    def _say(self, now: float, why: str) -> None:
        utt = self.speech.utterances[self.rng.choice(sorted(self.speech.utterances))]
        self.trace.append((now, f"{why}: {utt.text}"))
        self.last_why = why
        for i, f in enumerate(utt.frames):
            mark = ("onset", utt.text) if i == utt.onset else ("end", utt.text) if i == utt.end else None
            self.queue.append((f, mark))
        self.speaking = True


# ------------------------------------------------------- the fake platform
class LoadCall:
    """One call's platform side: ring, open the stream, send the caller's frames
    (``tick``, from the shared clock), read what the gateway sends."""

    def __init__(self, request_id: str, ws_url: str, rate: int, script: CallerScript) -> None:
        self.request_id = request_id
        self.call_id = ws_url.split("/call/", 1)[1].split("?", 1)[0]
        self.ws_url, self.rate, self.script = ws_url, rate, script
        self.state = "ringing"
        self.ws: Any = None
        self.transport: Any = None
        self.sent = 0
        self.breaks: list[float] = []  # wall ms
        self.received: dict[str, int] = {}
        self.speak_until = 0.0
        self.segment = 0

    def tick(self, now: float) -> None:
        if now < self.speak_until:
            self.script.on_agent_audio(now)
        self.transport.write(self.script.next_frame(now))
        self.sent += 1

    def on_message(self, msg: str | bytes, now: float) -> None:
        if isinstance(msg, bytes):
            kind = "binary"
        elif msg.startswith('{"type":"streamAudio"'):
            kind = "streamAudio"
            self.script.on_agent_audio(now)
        elif msg.startswith('{"action":"break"'):
            kind = "break"
            self.breaks.append(now * 1000)
            self.speak_until = 0.0
        elif msg.startswith("[") and '"speak"' in msg:
            kind = "speak"
            for act in json.loads(msg):
                if act.get("action") == "speak":
                    self.speak_until = max(self.speak_until, now) + len(act.get("text", "")) * SPEAK_S_PER_CHAR
        else:
            kind = "other"
        self.received[kind] = self.received.get(kind, 0) + 1

    async def run(self, platform: "LoadPlatform") -> None:
        from websockets.asyncio.client import connect as ws_connect

        await asyncio.sleep(platform.options.ring_ms / 1000)
        try:
            self.ws = await ws_connect(self.ws_url, compression=None, open_timeout=15, close_timeout=3,
                                       max_size=2 ** 20)
        except Exception as exc:  # noqa: BLE001 - counted, the step reports it
            self.state = f"failed: {type(exc).__name__}: {exc}"[:200]
            return
        self.transport, self.state = self.ws.transport, "open"
        platform.clock.add(self)
        try:
            async for msg in self.ws:
                self.on_message(msg, time.time())
        except Exception:  # noqa: BLE001 - an abnormal close is still a close
            pass
        finally:
            platform.clock.remove(self)
            if self.state == "open":
                self.state = "closed by gateway"

    async def close(self) -> None:
        if self.state == "open":
            self.state = "closed"
            await self.ws.close()

    def result(self) -> dict[str, Any]:
        s = self.script
        return {"call_id": self.call_id, "state": self.state, "sent": self.sent, "breaks": self.breaks,
                "onsets": s.onsets, "trace": s.trace, "no_reply": s.no_reply,
                "no_reply_after_key": s.no_reply_after_key, "keys": s.keys, "received": self.received}


class Clock:
    """One 2 ms clock for every call: call k sends on ticks k mod 10, so the
    frames of N calls are spread over each 20 ms like independent calls."""

    def __init__(self) -> None:
        self.groups: list[list[LoadCall]] = [[] for _ in range(CLOCK_GROUPS)]
        self.added = 0
        self.stopped = False
        self.late_ticks = 0   # more than one frame (20 ms) behind
        self.max_late_ms = 0.0

    def add(self, call: LoadCall) -> None:
        self.groups[self.added % CLOCK_GROUPS].append(call)
        self.added += 1

    def remove(self, call: LoadCall) -> None:
        for g in self.groups:
            if call in g:
                g.remove(call)

    def mark(self) -> None:
        self.late_ticks, self.max_late_ms = 0, 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        start, k, step = loop.time(), 0, 0.02 / CLOCK_GROUPS
        while not self.stopped:
            delay = start + k * step - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.02:
                self.late_ticks += 1
                self.max_late_ms = max(self.max_late_ms, -delay * 1000)
            now = time.time()
            for call in self.groups[k % CLOCK_GROUPS]:
                try:
                    call.tick(now)
                except Exception:  # noqa: BLE001 - a closing transport; its reader ends the call
                    pass
            k += 1


def _platform_class():
    from piopiy_voice.pcmo_models import Stream
    from piopiy_voice.sandbox.server import Sandbox

    class LoadPlatform(Sandbox):
        """The sandbox's REST surface; a make-call starts a ``LoadCall``."""

        def __init__(self, speech: Speech, redis_url: str, seed: int, **kw: Any) -> None:
            super().__init__(**kw)
            self.speech, self.redis_url, self.seed = speech, redis_url, seed
            self.clock = Clock()
            self.calls: list[LoadCall] = []
            self.mark_ms = 0.0
            self.finals_written = 0

        def _start_call(self, request_id: str, *, pcmo: list[Any], **_: Any) -> Any:  # Sandbox hook
            stream = next(a for a in pcmo if isinstance(a, Stream))
            rng = random.Random(self.seed * 100_003 + len(self.calls))
            call = LoadCall(request_id, stream.ws_url, stream.voice_quality, CallerScript(self.speech, rng))
            with self._lock:
                self.calls.append(call)
            asyncio.run_coroutine_threadsafe(call.run(self), self._loop)
            return call

        async def transcripts(self) -> None:
            """The transcriber's stand-in: each utterance's final, due FINAL_AFTER_S after its end."""
            from piopiy_voice.redisconn import connect_async

            r = connect_async(self.redis_url)
            while True:
                await asyncio.sleep(0.05)
                now, batch = time.time(), []
                for call in list(self.calls):
                    finals = call.script.finals
                    while finals and finals[0][0] <= now:
                        call.segment += 1
                        batch.append((call.call_id, call.segment, finals.pop(0)[1]))
                if batch:
                    async with r.pipeline(transaction=False) as p:
                        for cid, seg, text in batch:
                            p.xadd(keys.call_stream(cid), c.encode(c.Transcript(
                                call_id=cid, seq=0, segment=seg, text=text, final=True, engine="system_bench")))
                        await p.execute()
                    self.finals_written += len(batch)

        def status(self) -> dict[str, Any]:
            states: dict[str, int] = {}
            for call in list(self.calls):
                key = call.state.split(":")[0]
                states[key] = states.get(key, 0) + 1
            return {"calls": len(self.calls), "states": states}

        async def finish(self) -> dict[str, Any]:
            self.clock.stopped = True
            await asyncio.sleep(0.3)  # the last frames leave before the close frames
            await asyncio.gather(*(call.close() for call in self.calls), return_exceptions=True)
            return {"mark_ms": self.mark_ms, "late_ticks": self.clock.late_ticks,
                    "max_late_ms": round(self.clock.max_late_ms, 1), "finals": self.finals_written,
                    "calls": [call.result() for call in self.calls]}

    return LoadPlatform


def serve_platform() -> int:
    """``--serve-platform``: first stdin line is the JSON config; then commands
    ``status`` | ``mark`` | ``stop``, each answered with one JSON line."""
    import logging

    import uvloop

    from piopiy_voice.sandbox.media import PlatformOptions

    logging.basicConfig(level=logging.WARNING)
    cfg = json.loads(sys.stdin.readline())
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())  # the sandbox's loop is uvloop's
    speech = build_speech(cfg["texts"], cfg["rate"])
    unused_reports = tempfile.mkdtemp(prefix="pv-sysbench-platform-")  # a LoadCall writes no report
    platform = _platform_class()(speech, cfg["redis_url"], cfg["seed"], app_id=cfg["app_id"],
                                 app_token=cfg["app_token"], report_dir=unused_reports,
                                 options=PlatformOptions(ring_ms=100))
    url = platform.start()
    loop = platform._loop
    tasks = [asyncio.run_coroutine_threadsafe(platform.clock.run(), loop),
             asyncio.run_coroutine_threadsafe(platform.transcripts(), loop)]
    print(json.dumps({"url": url}), flush=True)
    try:
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "status":
                out = platform.status()
            elif cmd == "mark":
                platform.mark_ms = time.time() * 1000
                loop.call_soon_threadsafe(platform.clock.mark)
                out = {"mark_ms": platform.mark_ms}
            elif cmd == "stop":
                out = asyncio.run_coroutine_threadsafe(platform.finish(), loop).result(30)
                print(json.dumps(out), flush=True)
                break
            else:
                out = {"error": f"unknown command {cmd!r}"}
            print(json.dumps(out), flush=True)
    finally:
        for t in tasks:
            t.cancel()
        platform.stop(5)
        shutil.rmtree(unused_reports, ignore_errors=True)
    return 0


# -------------------------------------------------------- measurement helpers
def tree_cpu(proc: psutil.Process) -> float:
    """user+sys seconds of a process, its live descendants and its reaped children."""
    try:
        t = proc.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in proc.children(recursive=True):
            try:
                ct = child.cpu_times()
                total += ct.user + ct.system
            except psutil.NoSuchProcess:
                pass
        return total
    except psutil.NoSuchProcess:
        return float("nan")


_COUNT_AUDIO = """
local n, last = 0, '-'
while true do
  local batch = redis.call('XRANGE', KEYS[1], last, '+', 'COUNT', 2000)
  for i = 1, #batch do
    local f = batch[i][2]
    if f[1] == 'type' and f[2] == 'audio' then n = n + 1 end
  end
  if #batch < 2000 then return n end
  last = '(' .. batch[#batch][1]
end
"""


class CommandLog(threading.Thread):
    """Entry times (ms) of ``cmd.interrupt`` per call in a gateway's command stream."""

    def __init__(self, redis_url: str, gateway_id: str) -> None:
        super().__init__(daemon=True)
        from piopiy_voice.redisconn import connect

        self.r = connect(redis_url)
        self.stream = keys.gateway_commands(gateway_id)
        self.interrupts: dict[str, list[int]] = {}
        self.commands = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        last = "0-0"
        while not self.stopping.is_set():
            for _, entries in self.r.xread({self.stream: last}, count=500, block=200) or ():
                for eid, f in entries:
                    last = eid
                    self.commands += 1
                    if f.get(b"type") == b"cmd.interrupt":
                        self.interrupts.setdefault(f[b"call_id"].decode(), []).append(keys.entry_ms(eid))

    def stop(self) -> None:
        self.stopping.set()
        self.join(2)


# ----------------------------------------------------------- pure summaries
def barge_latencies(calls: list[dict[str, Any]], since_ms: float, until_ms: float
                    ) -> tuple[list[float], int, list[tuple[float, str]]]:
    """(onset -> first break before the next onset, in ms; barge-ins with no
    break; (latency, text) pairs) over the barge onsets inside the window."""
    lat, missed, pairs = [], 0, []
    for call in calls:
        onsets = sorted(call["onsets"])
        breaks = sorted(call["breaks"])
        for i, (t_on, kind, text) in enumerate(onsets):
            if kind != "barge" or not since_ms <= t_on < until_ms:
                continue
            nxt = onsets[i + 1][0] if i + 1 < len(onsets) else float("inf")
            hit = next((b for b in breaks if t_on <= b < nxt), None)
            if hit is None:
                missed += 1
            else:
                lat.append(hit - t_on)
                pairs.append((hit - t_on, text))
    return lat, missed, pairs


def command_latencies(calls: list[dict[str, Any]], interrupts: dict[str, list[int]],
                      since_ms: float, until_ms: float) -> list[float]:
    """``cmd.interrupt`` entry -> the ``break`` received after it, in ms: each
    break is paired with the latest interrupt at or before it, unless that one
    was already paired (a break the gateway sent on its own is left out)."""
    out = []
    for call in calls:
        cmds = sorted(interrupts.get(call["call_id"], ()))
        used: set[int] = set()
        for b in sorted(call["breaks"]):
            if not since_ms <= b < until_ms:
                continue
            # entry ids are floored to 1 ms: an interrupt "at" b's millisecond counts
            latest = max((i for i, t in enumerate(cmds) if t <= b + 1), default=None)
            if latest is not None and latest not in used:
                used.add(latest)
                out.append(max(0.0, b - cmds[latest]))
    return out


def lag_growing(slices_p99: list[float]) -> bool:
    """The worker fell behind for good: its last slice's lag p99 is above both
    100 ms and twice the first slice's."""
    return len(slices_p99) >= 2 and slices_p99[-1] > max(0.1, 2 * slices_p99[0])


def step_problems(s: dict[str, Any]) -> list[str]:
    out = []
    if s["connected"] < s["calls"]:
        out.append(f"{s['calls'] - s['connected']} calls never connected")
    if s["dropped_by_gateway"]:
        out.append(f"{s['dropped_by_gateway']} calls closed by the gateway")
    if s["lost"] > 0:
        out.append(f"{s['lost']} frames lost")
    if s["barge"] and pct(s["barge"], 99) > BARGE_P99_TARGET_MS:
        out.append(f"barge-in p99 {pct(s['barge'], 99):.0f} ms > {BARGE_P99_TARGET_MS:.0f}")
    n = len(s["barge"]) + s["missed"]
    if n and s["missed"] / n > MISSED_MAX:
        out.append(f"{s['missed']} of {n} barge-ins missed")
    if not n:
        out.append("no barge-in measured")
    if lag_growing(s["lag_slices"]):
        out.append("worker lag growing (p99 per 5 s: " + ", ".join(f"{x * 1000:.0f}" for x in s["lag_slices"]) + " ms)")
    return out


def fmt_row(s: dict[str, Any]) -> str:
    b, cmd = s["barge"], s["cmd"]
    q = lambda xs, p: f"{pct(xs, p):.0f}" if xs else "-"  # noqa: E731
    cpu = s["cpu_ms_per_call_s"]
    return (f"| {s['calls']} | {cpu['gateway']:.2f} | {cpu['workers']:.2f} | {cpu['redis']:.2f} | "
            f"{s['dialer_ms_per_call']:.0f} | {cpu['platform']:.2f} | {q(b, 50)} / {q(b, 99)} ({len(b)}, "
            f"{s['missed']} missed) | {q(s['beyond'], 99)} | {q(cmd, 50)} / {q(cmd, 99)} | "
            f"{s['lag_p99'] * 1000:.0f} | {s['lost']} of {s['sent']} | {s['mb_per_call_min']:.2f} | "
            f"{s['kb_per_queued']:.1f} | {s['load'][0]:.1f} -> {s['load'][1]:.1f} | "
            f"{'; '.join(s['problems']) or 'ok'} |")


TABLE_HEAD = ("| calls | gateway | worker(s) | redis | dialer ms/call placed | fake platform | barge-in p50 / p99 ms "
              "(n, missed) | beyond VAD floor p99 | interrupt -> socket p50 / p99 ms | worker lag p99 ms | "
              "frames lost | Redis MB per call-min | Redis KB per queued call | load avg | breaks on |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


# -------------------------------------------------------------- one step
class Step:
    """The system under test for one N: see the module docstring."""

    def __init__(self, args: argparse.Namespace, n: int, out: Path) -> None:
        from piopiy_voice.redisconn import EmbeddedRedis, connect, free_port
        from piopiy_voice.sandbox.server import DEV_APP_ID, DEV_APP_TOKEN
        from piopiy_voice.supervisor import Supervisor

        self.args, self.n, self.out = args, n, out
        self.cluster = None
        if args.cluster:
            sys.path.insert(0, str(ROOT / "tests"))  # the tests' cluster launcher
            from cluster_support import LocalCluster

            # The data on a 3-primary cluster; the dial queue on a plain
            # redis-server of its own (RQ cannot run on a cluster).
            self.cluster = LocalCluster()
            self.redis = EmbeddedRedis()
            self.url = self.cluster.url
            self.q = connect(self.redis.url)
        else:
            self.redis = EmbeddedRedis()
            self.url = self.redis.url
        self.r = connect(self.url)
        if self.cluster is None:
            self.q = self.r
        self.sup = Supervisor(grace_s=10)
        self.tag = secrets.token_hex(3)
        self.gateway_id = f"sys-gw-{self.tag}"
        self.gw_port = free_port()
        self.worker_ports = [free_port() for _ in range(args.workers)]
        self.queue = f"calls-{self.tag}"
        self.platform: subprocess.Popen | None = None
        self.app = (DEV_APP_ID, DEV_APP_TOKEN)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PV_", "PIOPIY_"))}
        env.update({
            "REDIS_URL": self.url, "PV_LOG_LEVEL": "WARNING",
            "PV_GATEWAY_ID": self.gateway_id, "PV_GATEWAY_PORT": str(self.gw_port),
            "PV_GATEWAY_PUBLIC_URL": f"ws://127.0.0.1:{self.gw_port}",
            "PV_SIGNING_SECRET": secrets.token_hex(16), "PV_DIAL_QUEUE": self.queue,
            "PV_DIAL_RATE_PER_S": str(args.dial_rate), "PV_CAMPAIGN_MAX_LIVE": str(max(50, n)),
            "PV_SILENCE_TIMEOUT_S": "60", "PV_MAX_CALL_S": "3600", "PV_TTS": args.tts,
            "PIOPIY_APP_ID": DEV_APP_ID, "PIOPIY_APP_TOKEN": DEV_APP_TOKEN, "PIOPIY_CALLER_ID": CALLER_ID,
        })
        if self.cluster is not None:
            env["PV_QUEUE_REDIS_URL"] = self.redis.url
        self.env = env

    def _get(self, url: str) -> int:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status
        except OSError:
            return 0

    def ask(self, cmd: str, timeout: float = 10.0) -> dict[str, Any]:
        assert self.platform is not None
        self.platform.stdin.write(cmd + "\n")
        self.platform.stdin.flush()
        ready, _, _ = select.select([self.platform.stdout], [], [], timeout)
        line = self.platform.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"fake platform did not answer {cmd!r}")
        return json.loads(line)

    def start(self) -> None:
        from piopiy_voice.supervisor import role_command

        self.platform = subprocess.Popen([sys.executable, __file__, "--serve-platform"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.platform.stdin.write(json.dumps({"texts": TEXTS, "rate": self.args.rate, "redis_url": self.url,
                                              "seed": self.n, "app_id": self.app[0],
                                              "app_token": self.app[1]}) + "\n")
        self.platform.stdin.flush()
        ready, _, _ = select.select([self.platform.stdout], [], [], 60)
        line = self.platform.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError("fake platform did not start")
        base = json.loads(line)["url"]
        self.env.update(PIOPIY_BASE_URL=base, PIOPIY_ACTION_URL=f"{base}/v1/call/action")
        self.sup.start("gateway", role_command("gateway"), self.env, self.out / "gateway.log", cwd=str(self.out))
        checks = {"gateway": lambda: self._get(f"http://127.0.0.1:{self.gw_port}/readyz") == 200}
        for i, port in enumerate(self.worker_ports):
            name = f"worker{i + 1}"
            self.sup.start(name, role_command("worker", "--metrics-port", str(port), "--worker-id",
                                              f"sys-w{i + 1}-{self.tag}"),
                           self.env, self.out / f"{name}.log", cwd=str(self.out))
            checks[name] = lambda port=port: self._get(f"http://127.0.0.1:{port}/lag") == 200
        self.sup.wait_ready(checks, 60)

    def start_dialer(self) -> None:
        from piopiy_voice.supervisor import role_command

        self.sup.start("dialer", role_command("dialer"), self.env, self.out / "dialer.log", cwd=str(self.out))
        self.sup.wait_ready({"dialer": lambda: bool(self.q.smembers(f"rq:workers:{self.queue}"))}, 60)

    def enqueue(self) -> list[str]:
        from piopiy_voice.settings import Settings
        from piopiy_voice.workers.dialer.campaign import enqueue_csv

        rows = "to,id\n" + "".join(f"9198{10_000_000 + i:08d},contact-{i}\n" for i in range(self.n))
        report = enqueue_csv(self.r, io.StringIO(rows), f"sysbench-{self.tag}",
                             defaults={"voice_quality": self.args.rate, "caller_id": CALLER_ID},
                             settings=Settings.from_env(self.env))
        if report.errors or report.enqueued != self.n:
            raise RuntimeError(f"enqueue: {report.enqueued} of {self.n} enqueued, errors {report.errors[:3]}")
        return report.call_ids

    def procs(self) -> dict[str, list[psutil.Process]]:
        roles = {"gateway": [psutil.Process(self.sup.child("gateway").pid)],
                 "workers": [psutil.Process(self.sup.child(f"worker{i + 1}").pid)
                             for i in range(self.args.workers)],
                 "redis": [psutil.Process(self.redis.proc.pid)]
                 + ([psutil.Process(p.pid) for p in self.cluster.procs.values()] if self.cluster else []),
                 "platform": [psutil.Process(self.platform.pid)]}
        if any(ch.name == "dialer" for ch in self.sup.children):
            roles["dialer"] = [psutil.Process(self.sup.child("dialer").pid)]
        return roles

    def cpu(self) -> dict[str, float]:
        return {role: sum(tree_cpu(p) for p in ps) for role, ps in self.procs().items()}

    def _servers(self) -> list[Any]:
        """A plain client per data server (each primary of a cluster), and the queue's."""
        if self.cluster is None:
            return [self.r]
        import redis as _redis

        return [_redis.Redis(port=port) for port, role in self.cluster.nodes if role == "primary"] + [self.q]

    def key_memory(self) -> dict[bytes, int]:
        """MEMORY USAGE (exact: every element) of every key, on every server."""
        return {k: c.memory_usage(k, samples=0) or 0 for c in self._servers() for k in c.scan_iter(count=1000)}

    def used_memory(self) -> int:
        return sum(int(c.info("memory")["used_memory"]) for c in self._servers())

    def lag(self, reset: bool) -> list[dict[str, Any]]:
        out = []
        for port in self.worker_ports:
            url = f"http://127.0.0.1:{port}/lag" + ("?reset=1" if reset else "")
            with urllib.request.urlopen(url, timeout=5) as resp:
                out.append(json.loads(resp.read()))
        return out

    def count_audio(self, call_ids: list[str]) -> int:
        script = self.r.register_script(_COUNT_AUDIO)
        return sum(int(script(keys=[keys.call_stream(cid)])) for cid in call_ids)

    def wait_ended(self, call_ids: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = [self.r.hget(keys.call_meta(cid), "state") for cid in call_ids]
            if all(s in (b"ended", b"failed") for s in states):
                return
            time.sleep(0.2)

    def close(self) -> None:
        if self.platform is not None and self.platform.poll() is None:
            try:
                self.platform.stdin.close()
                self.platform.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.platform.kill()
                self.platform.wait(5)
        self.sup.stop(10)
        try:
            self.r.close()
        finally:
            self.redis.close()
            if self.cluster is not None:
                self.cluster.close()


def run_step(args: argparse.Namespace, n: int, floors: dict[str, int], say=print) -> dict[str, Any]:
    if args.log_dir:
        out = Path(args.log_dir) / f"n{n}"
        out.mkdir(parents=True, exist_ok=True)
    else:
        out = Path(tempfile.mkdtemp(prefix=f"pv-sysbench-{n}-"))
    load0 = os.getloadavg()[0]
    step = Step(args, n, out)
    cmdlog: CommandLog | None = None
    try:
        cmdlog = CommandLog(step.url, step.gateway_id)
        step.start()
        cmdlog.start()
        k0 = step.key_memory()
        call_ids = step.enqueue()
        k1 = step.key_memory()
        queued_bytes = sum(v - k0.get(k, 0) for k, v in k1.items())
        t_ramp = time.monotonic()
        step.start_dialer()
        dialer_cpu0 = step.cpu()["dialer"]
        deadline = time.monotonic() + 30 + 2 * n / args.dial_rate
        while True:
            st = step.ask("status")
            if st["states"].get("open", 0) + sum(v for k, v in st["states"].items()
                                                 if k.startswith(("failed", "closed"))) >= n:
                break
            if time.monotonic() > deadline:
                break
            for dead in step.sup.dead():
                raise RuntimeError(f"{dead.name} died during the ramp:\n{dead.tail()}")
            time.sleep(0.5)
        ramp_s = time.monotonic() - t_ramp
        connected = st["states"].get("open", 0)
        dialer_ramp_cpu = step.cpu()["dialer"] - dialer_cpu0
        say(f"  N={n}: {connected} of {n} calls connected in {ramp_s:.1f} s; warm-up {args.warmup:g} s "
            f"(role logs in {out})")
        time.sleep(args.warmup)
        step.lag(reset=True)
        cpu0, mem0 = step.cpu(), step.used_memory()
        mark = step.ask("mark")["mark_ms"]
        t0 = time.monotonic()
        slices = []
        while time.monotonic() - t0 < args.seconds - 1e-3:
            time.sleep(min(LAG_SLICE_S, args.seconds - (time.monotonic() - t0)))
            slices.append(max((x.get("p99", 0.0) for x in step.lag(reset=True)), default=0.0))
        window = time.monotonic() - t0
        cpu1, mem1 = step.cpu(), step.used_memory()
        until = time.time() * 1000
        load1 = os.getloadavg()[0]
        res = step.ask("stop", timeout=60)
        step.wait_ended(call_ids, 20)
        cmdlog.stop()
        audio = step.count_audio(call_ids)
    finally:
        if cmdlog is not None:
            cmdlog.stopping.set()
        step.close()
    calls = res["calls"]
    lat, missed, pairs = barge_latencies(calls, mark, until)
    beyond = [v - floors.get(t, 0) for v, t in pairs]
    cmd = command_latencies(calls, cmdlog.interrupts, mark, until)
    call_s = connected * window
    cpu = {k: (cpu1[k] - cpu0[k]) / call_s * 1000 if call_s else float("nan") for k in cpu1}
    sent = sum(x["sent"] for x in calls)
    s = {
        "calls": n, "connected": connected, "window_s": window, "ramp_s": ramp_s,
        "cpu_ms_per_call_s": cpu, "cpu_core_share": {k: (cpu1[k] - cpu0[k]) / window for k in cpu1},
        "dialer_ms_per_call": dialer_ramp_cpu / max(1, connected) * 1000,
        "barge": lat, "missed": missed, "beyond": beyond, "cmd": cmd, "interrupts": sum(map(len, cmdlog.interrupts.values())),
        "lag_slices": slices, "lag_p99": max(slices, default=0.0),
        "sent": sent, "lost": sent - audio, "audio": audio,
        "mb_per_call_min": (mem1 - mem0) / 2 ** 20 / (call_s / 60) if call_s else float("nan"),
        "kb_per_queued": queued_bytes / 1024 / n, "used_memory_mb": mem1 / 2 ** 20,
        "load": (load0, load1), "platform_late_ticks": res["late_ticks"], "platform_max_late_ms": res["max_late_ms"],
        "finals": res["finals"], "keys": sum(x["keys"] for x in calls),
        "no_reply": sum(x["no_reply"] for x in calls), "commands": cmdlog.commands,
        "no_reply_after_key": sum(x["no_reply_after_key"] for x in calls),
        "states": st["states"],
        "dropped_by_gateway": sum(1 for x in calls if x["state"] == "closed by gateway"),
        "sample_calls": calls[:3],  # their traces, for reading a call back (--json)
    }
    s["problems"] = step_problems(s)
    return s


def report_step(s: dict[str, Any], say=print) -> None:
    cpu, share = s["cpu_ms_per_call_s"], s["cpu_core_share"]
    say(f"  N={s['calls']}: window {s['window_s']:.1f} s, load avg {s['load'][0]:.2f} -> {s['load'][1]:.2f}")
    say("    CPU ms per call-second: " + ", ".join(f"{k} {cpu[k]:.3f} ({share[k] * 100:.0f}% of a core)"
                                                 for k in sorted(cpu)))
    say(f"    all of them together: {sum(share.values()):.2f} cores of {os.cpu_count()} (the transcriber, not run, "
        f"would add ~2% of a core per talking call)")
    say(f"    dialer: {s['dialer_ms_per_call']:.1f} ms CPU per call placed (ramp {s['ramp_s']:.1f} s)")
    if s["barge"]:
        b = s["barge"]
        say(f"    barge-in onset -> break at the socket: n={len(b)} missed={s['missed']} p50 {pct(b, 50):.0f} "
            f"p95 {pct(b, 95):.0f} p99 {pct(b, 99):.0f} max {max(b):.0f} ms; beyond the VAD floor p50 "
            f"{pct(s['beyond'], 50):.0f} p99 {pct(s['beyond'], 99):.0f} ms")
    if s["cmd"]:
        say(f"    cmd.interrupt entry -> break at the socket: n={len(s['cmd'])} p50 {pct(s['cmd'], 50):.1f} "
            f"p99 {pct(s['cmd'], 99):.1f} max {max(s['cmd']):.1f} ms")
    say("    worker lag p99 per 5 s slice: " + ", ".join(f"{x * 1000:.0f}" for x in s["lag_slices"]) + " ms")
    say(f"    frames: {s['sent']} sent, {s['audio']} audio entries, lost {s['lost']}")
    say(f"    Redis: {s['mb_per_call_min']:.3f} MB per call-minute (window growth), {s['kb_per_queued']:.2f} KB per "
        f"queued call (MEMORY USAGE of the keys the enqueue wrote), used_memory {s['used_memory_mb']:.1f} MB at the window's end")
    say(f"    callers: {s['finals']} finals written, {s['keys']} keys pressed, {s['no_reply']} turns unanswered "
        f"in {NO_REPLY_S:g} s ({s['no_reply_after_key']} of them asked after a key); {s['commands']} commands; platform clock: {s['platform_late_ticks']} ticks "
        f"> 20 ms late (max {s['platform_max_late_ms']:.0f} ms)")
    say(f"    verdict: {'; '.join(s['problems']) or 'ok'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", default="25,50,100,200,400", help="comma-separated N, one step each")
    ap.add_argument("--seconds", type=float, default=30.0, help="measured window per step")
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--tts", default="espeak", choices=("espeak", "platform"))
    ap.add_argument("--rate", type=int, default=8000, choices=(8000, 16000))
    ap.add_argument("--dial-rate", type=float, default=40.0, help="PV_DIAL_RATE_PER_S")
    ap.add_argument("--keep-going", action="store_true", help="do not stop at the first N that breaks")
    ap.add_argument("--json", metavar="FILE", help="also write every step's figures here")
    ap.add_argument("--log-dir", metavar="DIR", help="the roles' logs, one folder per N (default: a temp folder)")
    ap.add_argument("--cluster", action="store_true",
                    help="the data on a local Redis Cluster (3 primaries + replicas), the dial queue apart")
    ap.add_argument("--serve-platform", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_platform:
        return serve_platform()
    # A bench stopped with SIGTERM (kill, timeout) must still stop the roles
    # and servers it started: raising unwinds through every step's ``finally``.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    ns = [int(x) for x in args.calls.split(",") if x.strip()]
    floors = vad_floors(TEXTS, args.rate)
    print(f"system bench: {os.cpu_count()} cpus, load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"N = {ns}; {args.seconds:g} s window + {args.warmup:g} s warm-up per step; {args.workers} worker(s), "
          f"DefaultAgent, TTS {args.tts}; {args.rate} Hz; Redis: "
          f"{'a local cluster, 3 primaries + 3 replicas (dial queue apart)' if args.cluster else 'one redis-server'}; "
          f"turn detector floor per sentence: "
          + ", ".join(f"{v} ms" for v in sorted(set(floors.values()))), flush=True)
    import piopiy_voice
    print(f"code under test: {Path(piopiy_voice.__file__).parent} (PYTHONPATH {os.environ.get('PYTHONPATH', '-')})",
          flush=True)
    steps = []
    for n in ns:
        s = run_step(args, n, floors, say=lambda t: print(t, flush=True))
        report_step(s)
        steps.append(s)
        if s["problems"] and not args.keep_going:
            print(f"  stopping: N={n} breaks")
            break
    print("\n" + TABLE_HEAD)
    for s in steps:
        print(fmt_row(s))
    print("(CPU columns: ms of CPU per call-second, process trees, measured window only)")
    if args.json:
        Path(args.json).write_text(json.dumps(steps, indent=1, default=str))
    return 1 if any(s["problems"] for s in steps) else 0


if __name__ == "__main__":
    sys.exit(main())
