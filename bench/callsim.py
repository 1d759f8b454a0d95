"""A fake gateway for the conversation benchmarks (``bargein_bench``, ``voice_bench``).

Theory of operation
-------------------
``System`` starts, all on loopback and all private: a redis-server
(``EmbeddedRedis``), one ``piopiy-voice worker`` process (the agent under
test; or several sharing the calls, ``workers=N``), optionally transcriber
processes (``piopiy-voice transcriber``: the real recognition role) and a
fake OpenAI-compatible model server (``tests/fake_openai.py`` in its own
process, answering after a fixed delay).
No real gateway runs: ``Gateway`` plays its part on Redis, like
``bench/worker_bench.py`` does, which isolates the worker (and transcriber):

- every 20 ms it XADDs one audio frame per call into the call's stream (one
  pipelined round trip per tick), from each call's ``Caller`` (a script of
  speech and silence, driven by what the agent does); the entry ids the
  server gives back are the frames' times (Redis clock, 1 ms);
- a reader thread XREADs the gateway command stream and hands each command
  (with its entry id's time: when the worker's commit reached Redis, i.e.
  when a real gateway would pick it up) to the caller of its call;
- it can write ``Transcript`` finals itself (``seq`` 0, as the transcriber
  role does) when no transcriber runs.

No ``Playout`` reports are written: the agent keeps its send-time estimate
of what is playing (it is what it uses until a report comes).

Times: speech onset and end are the entry times of the caller's first and
last speech frames; a command's time is its entry time in the gateway's
command stream. Both come from the same Redis clock.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from piopiy_voice import contracts as c
from piopiy_voice import keys
from piopiy_voice.audio import frame_bytes
from piopiy_voice.redisconn import EmbeddedRedis, connect, free_port

ROOT = Path(__file__).resolve().parent.parent
GATEWAY_ID = "sim-gw"
FRAME_S = 0.02

_FAKE_LLM = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("fake_openai", sys.argv[1])
mod = importlib.util.module_from_spec(spec); sys.modules["fake_openai"] = mod; spec.loader.exec_module(mod)
fake = mod.FakeOpenAI()
fake.default = mod.Reply(text=sys.argv[3], first_token_delay_s=float(sys.argv[2]), token_delay_s=0.005)
fake.requests = type("NoRecord", (), {"append": lambda self, x: None})()  # bounded memory
print(fake.base_url, flush=True)
while True:
    time.sleep(3600)
"""


id_ms = keys.entry_ms


def speech_frames(pcm: bytes, rate: int) -> tuple[list[bytes], int, int]:
    """``pcm`` cut in 20 ms frames (zero-padded), and the indexes of its first
    and last frames with speech in them (above -50 dBFS)."""
    fb = frame_bytes(rate)
    pcm = pcm + bytes(-len(pcm) % fb)
    frames = [pcm[i:i + fb] for i in range(0, len(pcm), fb)]
    x = np.frombuffer(pcm, "<i2").astype(np.float64).reshape(len(frames), -1)
    lv = 10 * np.log10((x ** 2).mean(axis=1) / 32768 ** 2 + 1e-12)
    loud = np.nonzero(lv > -50)[0]
    return frames, int(loud[0]), int(loud[-1])


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        parts = fh.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def loop_cpu_s(pid: int) -> float:
    """CPU of the process's main thread (the worker's loop), from its task stat."""
    with open(f"/proc/{pid}/task/{pid}/stat") as fh:
        parts = fh.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_s(pid: int) -> float:
    """CPU of the process's live descendants (a worker's synthesis children)."""
    total, kids = 0.0, []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tasks:  # a child belongs to the thread that forked it (the agent runtime's)
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                kids += [int(k) for k in fh.read().split()]
        except OSError:
            pass
    for kid in kids:
        try:
            total += cpu_s(kid) + children_cpu_s(kid)
        except OSError:  # it exited between the two reads
            pass
    return total


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class System:
    """Redis + worker (+ transcribers, + fake model): see the module docstring."""

    def __init__(self, agent: str, env: dict[str, str] | None = None, *, transcribers: int = 0,
                 llm_delay_s: float | None = None, llm_text: str = "", workers: int = 1) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self.redis = EmbeddedRedis()
        self.r = connect(self.redis.url)
        base = dict(os.environ, REDIS_URL=self.redis.url, PV_LOG_LEVEL="WARNING",
                    PV_SILENCE_TIMEOUT_S="60", PV_MAX_CALL_S="3600")
        base.update(env or {})
        if llm_delay_s is not None:
            p = subprocess.Popen([sys.executable, "-c", _FAKE_LLM, str(ROOT / "tests" / "fake_openai.py"),
                                  str(llm_delay_s), llm_text], stdout=subprocess.PIPE, text=True)
            self.procs["fake-llm"] = p
            url = p.stdout.readline().strip()
            if not url.startswith("http://127.0.0.1:"):
                self.close()
                raise SystemExit("the fake model server did not start")
            base.update(PV_LLM_BASE_URL=url, PV_LLM_MODEL="fake",
                        PV_LLM_FIRST_TOKEN_S="5", PV_LLM_TIMEOUT_S="10")
        self.env = base
        #: Worker processes are named "worker", "worker2", ... (their /lag ports in order).
        self.metrics_ports = [free_port() for _ in range(workers)]
        for i, port in enumerate(self.metrics_ports):
            self.procs["worker" if i == 0 else f"worker{i + 1}"] = subprocess.Popen(
                [sys.executable, "-m", "piopiy_voice.workers.runner", "--worker-id", f"sim-w{i + 1}",
                 "--metrics-port", str(port), "--agent", agent], env=base, cwd=ROOT)
        for i in range(transcribers):
            self.procs[f"transcriber{i + 1}"] = subprocess.Popen(
                [sys.executable, "-m", "piopiy_voice.speech.transcriber_role", "--id", f"sim-t{i + 1}",
                 "--redis-url", self.redis.url], env=base, cwd=ROOT)
        self._wait_worker()

    def _wait_worker(self) -> None:
        import urllib.request
        deadline = time.monotonic() + 20
        for port in self.metrics_ports:
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/lag", timeout=2).read()
                    break
                except OSError:
                    if time.monotonic() > deadline or any(
                            p.poll() is not None for n, p in self.procs.items() if n.startswith("worker")):
                        raise SystemExit("worker did not start")
                    time.sleep(0.1)
        time.sleep(1.0 if len(self.procs) > 1 else 0)  # transcribers: model loaded

    def lag(self, reset: bool = False) -> dict:
        """The workers' stream lag; with several workers, each quantile is the
        worst worker's (``n`` and ``entries_total`` are summed)."""
        import urllib.request
        each = [json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{port}/lag" + ("?reset=1" if reset else ""), timeout=5).read())
            for port in self.metrics_ports]
        out = dict(each[0])
        for lag in each[1:]:
            for k, v in lag.items():
                if isinstance(v, (int, float)) and k in out:
                    out[k] = out[k] + v if k in ("n", "entries_total") else max(out[k], v)
        return out

    def usage(self) -> dict[str, tuple[float, float, float, float]]:
        """(cpu seconds, RSS MB, main-thread cpu seconds, its live child
        processes' cpu seconds) per process under test."""
        return {name: (cpu_s(p.pid), rss_mb(p.pid), loop_cpu_s(p.pid), children_cpu_s(p.pid))
                for name, p in self.procs.items() if name != "fake-llm" and p.poll() is None}

    def close(self) -> None:
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.redis.close()


class Caller:
    """One simulated caller: a queue of frames to send, refilled by ``next_frames``
    (subclasses: the benchmarks' scripts). Gets the agent's commands by ``on_command``."""

    def __init__(self, call_id: str, rate: int) -> None:
        self.call_id = call_id
        self.rate = rate
        self.silence = bytes(frame_bytes(rate))
        self.pending: list[tuple[bytes, str | None]] = []   # (frame, mark)
        self.transcripts: list[tuple[float, str]] = []      # (due wall time, text) to write
        #: Set by a subclass when its call is over (hung up, handed off): the gateway
        #: ends it and, with a ``redial`` factory, starts a new call in its place.
        self.finished = False

    def say(self, frames: list[bytes], first: int, last: int, tag: str) -> None:
        for i, f in enumerate(frames):
            mark = f"onset:{tag}" if i == first else f"end:{tag}" if i == last else None
            self.pending.append((f, mark))

    def pause(self, seconds: float) -> None:
        self.pending += [(self.silence, None)] * int(seconds / FRAME_S)

    def next_frame(self, now: float) -> tuple[bytes, str | None]:
        if not self.pending:
            self.idle(now)
        return self.pending.pop(0) if self.pending else (self.silence, None)

    # hooks
    def idle(self, now: float) -> None:
        """Nothing queued: decide what to say next (default: silence)."""

    def on_mark(self, mark: str, t_ms: int, now: float) -> None:
        """A marked frame (``onset:<tag>`` / ``end:<tag>``) was stored at ``t_ms``."""

    def on_command(self, cmd: Any, t_ms: int) -> None:
        """A command for this call reached the gateway stream at ``t_ms``."""


class Gateway:
    """Feeds the callers' frames in real time and routes commands back to them."""

    def __init__(self, system: System, callers: list[Caller], *, params: dict[str, str] | None = None,
                 redial=None) -> None:
        self.system = system
        self.r = system.r
        self.redial = redial
        self.ended: list[Caller] = []   # finished callers (their measurements stay readable)
        self.callers = {cl.call_id: cl for cl in callers}
        self.seqs = {cl.call_id: 0 for cl in callers}
        self.params = params or {}
        self._cmds: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self.late_ticks = 0
        self.reader = threading.Thread(target=self._read_commands, daemon=True)

    def _read_commands(self) -> None:
        r = connect(self.system.redis.url)
        stream = keys.gateway_commands(GATEWAY_ID)
        last = "0-0"
        while not self._stop.is_set():
            resp = r.xread({stream: last}, count=500, block=100)
            for _, entries in resp or ():
                for eid, fields in entries:
                    last = eid
                    try:
                        cmd = c.decode(fields)
                    except Exception:  # noqa: BLE001 (a bench: count it as nothing)
                        continue
                    self._cmds.put((cmd, id_ms(eid)))

    def start_calls(self) -> None:
        pipe = self.r.pipeline(transaction=False)
        for cl in self.callers.values():
            self._announce(pipe, cl)
        pipe.execute()
        self.reader.start()

    def _announce(self, pipe, cl: Caller) -> None:
        self.seqs[cl.call_id] = 1
        f = c.encode(c.CallStarted(call_id=cl.call_id, seq=1, gateway_id=GATEWAY_ID,
                                   rate=cl.rate, params=self.params))
        pipe.xadd(keys.call_stream(cl.call_id), f)
        pipe.xadd(keys.CALLS_STREAM, f)

    def _replace_finished(self, pipe) -> None:
        for cid, cl in list(self.callers.items()):
            if not cl.finished:
                continue
            self.seqs[cid] += 1
            f = c.encode(c.CallEnded(call_id=cid, seq=self.seqs[cid], reason="hangup"))
            pipe.xadd(keys.call_stream(cid), f)
            pipe.xadd(keys.CALLS_STREAM, f)
            del self.callers[cid]
            self.ended.append(cl)
            if self.redial is not None:
                new = self.redial(cl)
                self.callers[new.call_id] = new
                self._announce(pipe, new)

    def all_callers(self) -> list[Caller]:
        return self.ended + list(self.callers.values())

    def run_measured(self, warmup: float, seconds: float) -> dict:
        """``run`` for ``warmup + seconds``, measuring the last ``seconds``:
        ``since`` and ``until`` (the window's start and end, wall ms),
        ``usage0``/``usage`` (the
        processes' ``System.usage`` at its start and end) and ``lag`` (the
        workers' stream lag over the window)."""
        marks: dict = {}

        def on_tick(now: float) -> None:
            if "since" not in marks and now >= warmup:
                marks["since"] = int(time.time() * 1000)
                marks["usage0"] = self.system.usage()
                self.system.lag(reset=True)

        self.run(warmup + seconds, on_tick)
        marks["until"] = int(time.time() * 1000)
        return dict(marks, lag=self.system.lag(), usage=self.system.usage())

    def run(self, seconds: float, on_tick=None) -> None:
        t0 = time.monotonic()
        tick = 0
        pipe = self.r.pipeline(transaction=False)
        while True:
            now = time.monotonic() - t0
            if now >= seconds:
                break
            self._route_commands()
            self._replace_finished(pipe)
            ids = list(self.callers)
            due = int(now / FRAME_S) + 1
            if due - tick > 2:
                self.late_ticks += 1
            while tick < due:
                wall = time.time()
                sent: list[tuple[Caller, str | None]] = []   # one per XADD, in order
                for cid in ids:
                    cl = self.callers[cid]
                    frame, mark = cl.next_frame(wall)
                    self.seqs[cid] += 1
                    pipe.xadd(keys.call_stream(cid), c.audio_fields(cid, self.seqs[cid], frame),
                              maxlen=keys.CALL_STREAM_MAXLEN, approximate=True)
                    sent.append((cl, mark))
                    while cl.transcripts and wall >= cl.transcripts[0][0]:
                        _, text = cl.transcripts.pop(0)
                        pipe.xadd(keys.call_stream(cid), c.encode(c.Transcript(
                            call_id=cid, seq=0, segment=self.seqs[cid], text=text, final=True,
                            engine="bench")))
                        sent.append((cl, None))
                for (cl, mark), eid in zip(sent, pipe.execute()):
                    if mark is not None:
                        cl.on_mark(mark, id_ms(eid), wall)
                tick += 1
            if on_tick is not None:
                on_tick(now)
            time.sleep(max(0.0, t0 + tick * FRAME_S - time.monotonic()))
        self._route_commands()

    def _route_commands(self) -> None:
        while True:
            try:
                cmd, t_ms = self._cmds.get_nowait()
            except queue.Empty:
                return
            cl = self.callers.get(getattr(cmd, "call_id", ""))
            if cl is not None:
                cl.on_command(cmd, t_ms)

    def stop(self) -> None:
        self._stop.set()
        self.reader.join(2)


