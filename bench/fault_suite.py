"""Fault suite: inject faults into a real stack, print one table of promises kept.

    python bench/fault_suite.py                 # every scenario, one aggregated table
    python bench/fault_suite.py --only stall-5,worker-kill
    python bench/fault_suite.py soak --calls 50 --minutes 10

Theory of operation
-------------------
Each scenario builds a real stack of its own: a private ``redis-server``
(``redisconn.EmbeddedRedis``: never the machine's shared Redis), one gateway
process (``python -m piopiy_voice.cli gateway``) and two worker processes
(``python -m piopiy_voice.workers.runner``) running ``ProbeAgent`` (below, in
this module: the workers import it through ``PYTHONPATH``). The harness plays
the platform: one websockets client per call sends a 20 ms frame every 20 ms
on an absolute schedule (real time, no drift) and records every message the
gateway sends back.

What the agent says is chosen so the platform side can check the promises on
its own: ``tick:<n>`` every ``TICK_FRAMES`` audio frames (``n`` = frames the
agent has processed, checkpointed with the call: a text heard twice is a
command delivered twice) and ``probe:<id>`` for a DTMF event carrying a probe
id. After a fault every call sends a new probe each second until one is
answered (a platform user pressing a key again): the time from the end of the
fault to the last call's first answer is the recovery time. Probes rather than
ticks, because after a takeover speech decided on a backlog older than
``PV_STALE_COMMAND_MS`` is not sent by design.

Frame accounting, per call: frames the client sent = distinct audio ``seq``s in
the call's stream + frames reported lost by ``gap`` entries (``StreamGap``,
which the gateway writes for frames it dropped, also counted in
``pv_gateway_audio_frames_dropped_total``). "Unaccounted" is what is left: it
must be 0. Calls are short (< ``CALL_STREAM_MAXLEN`` frames), so nothing is
trimmed. The gateway's own view (``/metrics``: received = published + dropped
+ still buffered) is printed next to it.

Spread after a stall longer than the lease: every lease expires at once while
Redis is frozen (Redis keeps wall-clock expiry times); each worker's renew
re-takes its own calls unless the other worker's takeover scan
(``XAUTOCLAIM``, at most ``PV_WORKER_CLAIM_PER_SCAN`` per scan) got there
first. Lease holders are read before the stall and after recovery.

Scenarios that exist as tests and need a stack this harness does not build
(gateway drain with a second gateway, dialer 5xx) are run as those pytest
tests; their row says so and carries the test's pass/fail and wall time.

``soak``: ``--calls`` concurrent real-time calls for ``--minutes``; each call
lasts ``--call-s`` seconds (staggered), then stops and the slot dials a new
call id, so call-minutes accumulate. Redis ``used_memory`` is sampled every
``--sample-s`` seconds. After the last call ended: memory, the TTL of every
key (ended calls' keys expire after ``CALL_KEY_TTL_AFTER_END``, 1 h: they may
not be forgotten sooner), then the keys holding a TTL are deleted to stand in
for their expiry and memory is read again: that figure must be near the
baseline (a key without TTL that grows with calls is a leak).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from piopiy_voice import contracts as c
from piopiy_voice import keys
from piopiy_voice.workers.agent.base import Agent

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SECRET = "fault-suite-signing-secret"
FRAME = b"\x00\x01" * 160  # 20 ms at 8 kHz, 16-bit
FRAME_S = 0.020
TICK_FRAMES = 50  # one tick per second of audio per call
PROBE_EVERY_S = 1.0


# ------------------------------------------------------------------ the agent
class ProbeAgent(Agent):
    """``tick:<frames>`` every ``TICK_FRAMES`` frames; ``probe:<id>`` for a DTMF event with a probe id."""

    _FIELDS = ("frames",)

    def __init__(self, call, settings):
        super().__init__(call, settings)
        self.frames = 0

    def on_event(self, event, now):
        if isinstance(event, c.AudioFrame):
            self.frames += 1
            if self.frames % TICK_FRAMES == 0:
                return [self.command(c.Speak, text=f"tick:{self.frames}")]
        elif isinstance(event, c.PlatformEvent) and event.event == "dtmf" and event.data.get("probe"):
            return [self.command(c.Speak, text=f"probe:{event.data['probe']}")]
        return []


# --------------------------------------------------------------- the platform
@dataclass(eq=False)
class PlatformCall:
    """One call as the platform plays it: real-time frames out, messages in."""

    call_id: str
    url: str
    sent: int = 0
    texts: Counter = field(default_factory=Counter)
    answered: dict = field(default_factory=dict)  # probe id -> monotonic time of the answer
    outbox: list = field(default_factory=list)
    connected: bool = False
    closed_code: int | None = None
    error: str | None = None

    def probe(self, pid: str) -> None:
        self.outbox.append(json.dumps({"event": "dtmf", "digit": "5", "probe": pid}))

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.texts.values() if n > 1)

    @property
    def ticks(self) -> int:
        return sum(1 for t in self.texts if t.startswith("tick:"))

    async def run(self, stop: asyncio.Event) -> None:
        from websockets.asyncio.client import connect as ws_connect

        loop = asyncio.get_running_loop()
        try:
            async with ws_connect(self.url, compression=None, max_queue=None) as ws:
                self.connected = True
                reader = asyncio.create_task(self._read(ws))
                t0, n = loop.time(), 0
                while not stop.is_set() and not reader.done():
                    while self.outbox:  # one sender: texts go between frames, never concurrently
                        await ws.send(self.outbox.pop(0))
                    await ws.send(FRAME)
                    self.sent += 1
                    n += 1
                    delay = t0 + n * FRAME_S - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                if not reader.done():
                    await ws.send(json.dumps({"event": "stop"}))
                    await ws.close()
                reader.cancel()
                self.closed_code = ws.close_code
        except Exception as exc:  # noqa: BLE001 (reported in the table, never hidden)
            self.error = repr(exc)

    async def _read(self, ws) -> None:
        async for msg in ws:
            if isinstance(msg, bytes):
                continue
            try:
                items = json.loads(msg)
            except ValueError:
                continue
            for item in items if isinstance(items, list) else [items]:
                if isinstance(item, dict) and item.get("action") == "speak":
                    text = str(item.get("text", ""))
                    self.texts[text] += 1
                    if text.startswith("probe:"):
                        self.answered.setdefault(text[6:], time.monotonic())


# ------------------------------------------------------------------ the stack
def _get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (no HELP/TYPE lines)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


class Stack:
    """A private redis-server, one gateway and N workers, all stopped by ``close``."""

    def __init__(self, lease_ms: int = 3000, claim_per_scan: int = 4, workers: int = 2,
                 extra_env: dict | None = None, tag: str = "fs") -> None:
        from piopiy_voice.redisconn import EmbeddedRedis, connect, free_port

        self.tag = tag
        self.logdir = Path(tempfile.mkdtemp(prefix=f"pv-{tag}-"))
        #: the processes' logs are removed on close unless a scenario failed
        self.keep_logs = False
        self.procs: dict[str, subprocess.Popen] = {}
        self.redis = EmbeddedRedis()
        self.r = connect(self.redis.url)
        self.lease_ms = lease_ms
        env = dict(os.environ)
        env.update(REDIS_URL=self.redis.url, PV_SIGNING_SECRET=SECRET, PV_LOG_LEVEL="INFO",
                   PV_WORKER_CLAIM_PER_SCAN=str(claim_per_scan),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")])))
        env.update(extra_env or {})
        self.env = env
        self.gw_port = free_port()
        self.worker_ports: dict[str, int] = {}
        self._free_port = free_port
        try:
            self._start_gateway("gw-fs")
            for i in range(workers):
                self.start_worker(f"w{i + 1}")
        except BaseException:  # a role that does not start: stop what did, keep the logs
            self.keep_logs = True
            self.close()
            raise

    def _spawn(self, name: str, argv: list[str], env: dict) -> subprocess.Popen:
        with open(self.logdir / f"{name}.log", "ab") as log:  # the child keeps its own copy
            p = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = p
        return p

    def _start_gateway(self, gid: str) -> None:
        p = self._spawn(gid, [sys.executable, "-m", "piopiy_voice.cli", "gateway"],
                        dict(self.env, PV_GATEWAY_ID=gid, PV_GATEWAY_PORT=str(self.gw_port)))
        self._wait(lambda: _get(f"http://127.0.0.1:{self.gw_port}/readyz")[0] == 200, p, gid)

    def start_worker(self, wid: str) -> None:
        port = self._free_port()
        self.worker_ports[wid] = port
        p = self._spawn(wid, [sys.executable, "-m", "piopiy_voice.workers.runner", "--agent",
                              "fault_suite:ProbeAgent", "--worker-id", wid, "--lease-ms",
                              str(self.lease_ms), "--metrics-port", str(port)], self.env)
        self._wait(lambda: self.r.zscore(keys.WORKERS_ZSET, wid) is not None, p, wid)

    def _wait(self, pred, p, name, timeout=40.0):
        deadline = time.monotonic() + timeout
        while not pred():
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start; log: {self.logdir / (name + '.log')}")
            time.sleep(0.05)

    def url(self, call_id: str) -> str:
        from piopiy_voice.signing import sign_stream_url

        return sign_stream_url(f"ws://127.0.0.1:{self.gw_port}", call_id, SECRET,
                               params={"rate": "8000"})

    def gateway_metrics(self) -> dict[str, float]:
        return parse_metrics(_get(f"http://127.0.0.1:{self.gw_port}/metrics")[1])

    def worker_metrics(self, wid: str) -> dict[str, float]:
        return parse_metrics(_get(f"http://127.0.0.1:{self.worker_ports[wid]}/metrics")[1])

    def holders(self, call_ids) -> dict[str, str | None]:
        pipe = self.r.pipeline(transaction=False)
        for cid in call_ids:
            pipe.get(keys.call_lease(cid))
        return {cid: (v.decode() if v else None) for cid, v in zip(call_ids, pipe.execute())}

    def restart_redis_empty(self) -> None:
        from piopiy_voice.redisconn import EmbeddedRedis, connect

        port = self.redis.port
        self.r.close()
        self.redis.close()
        time.sleep(1.0)
        self.redis = EmbeddedRedis(port=port)
        self.r = connect(self.redis.url)

    def alive(self) -> dict[str, bool]:
        return {name: p.poll() is None for name, p in self.procs.items()}

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        try:
            self.r.close()
        finally:
            self.redis.close()
            if self.keep_logs:
                print(f"  logs kept in {self.logdir}")
            else:
                shutil.rmtree(self.logdir, ignore_errors=True)


# -------------------------------------------------------------- measurements
def account_frames(r, calls: list[PlatformCall]) -> dict:
    """Per call: frames sent vs distinct audio seqs + gap frames in its stream."""
    out = {"sent": 0, "audio": 0, "gap_frames": 0, "unaccounted": 0, "dup_entries": 0}
    for call in calls:
        seqs: list[int] = []
        gap = 0
        for _, f in r.xrange(keys.call_stream(call.call_id)):
            m = c.decode(f)
            if m.type == "audio":
                seqs.append(m.seq)
            elif m.type == "gap":
                gap += m.frames
        distinct = len(set(seqs))
        out["sent"] += call.sent
        out["audio"] += distinct
        out["gap_frames"] += gap
        out["dup_entries"] += len(seqs) - distinct
        out["unaccounted"] += call.sent - distinct - gap
    return out


def gateway_frames(m: dict[str, float]) -> dict:
    dropped = {k.split('reason="')[1].rstrip('"}'): v for k, v in m.items()
               if k.startswith("pv_gateway_audio_frames_dropped_total{") and v}
    return {"received": m.get("pv_gateway_audio_frames_received_total", 0),
            "published": m.get("pv_gateway_audio_frames_published_total", 0),
            "buffered": m.get("pv_gateway_redis_buffered_frames", 0), "dropped": dropped}


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f} s"


async def until(pred, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        await asyncio.sleep(interval)
    return bool(pred())


async def probe_until_answered(calls: list[PlatformCall], tag: str, since: float,
                               timeout: float = 60.0) -> dict[str, float]:
    """Each call probes every second until one probe sent after ``since`` is answered;
    returns call id -> seconds from ``since`` to that answer (missing: never answered)."""
    done: dict[str, float] = {}
    n = 0
    deadline = since + timeout
    while len(done) < len(calls) and time.monotonic() < deadline:
        for call in calls:
            if call.call_id not in done:
                call.probe(f"{tag}-{n}")
        n += 1
        step_end = time.monotonic() + PROBE_EVERY_S
        while time.monotonic() < step_end:
            for call in calls:
                if call.call_id in done:
                    continue
                hits = [t for pid, t in call.answered.items() if pid.startswith(f"{tag}-")]
                if hits:
                    done[call.call_id] = min(hits) - since
            if len(done) == len(calls):
                break
            await asyncio.sleep(0.02)
    return done


async def dial(stack: Stack, ids: list[str], stop: asyncio.Event) -> tuple[list[PlatformCall], list]:
    calls = [PlatformCall(cid, stack.url(cid)) for cid in ids]
    tasks = [asyncio.create_task(call.run(stop)) for call in calls]
    ok = await until(lambda: all(call.ticks >= 1 for call in calls), 30)
    if not ok:
        raise RuntimeError(f"not every call served at start; logs in {stack.logdir}")
    return calls, tasks


async def hang_up(stack: Stack, calls, tasks, stop: asyncio.Event) -> bool:
    stop.set()
    await asyncio.gather(*tasks)
    return await until(lambda: all(_ended(stack.r, call.call_id) for call in calls), 20, 0.1)


def run_on(stack: "Stack", scenario, *args):
    """Run one scenario (a coroutine function taking the stack first) on its own
    stack, always closed; its role logs are kept when the scenario raised."""
    try:
        return asyncio.run(scenario(stack, *args))
    except BaseException:
        stack.keep_logs = True
        raise
    finally:
        stack.close()


def _ended(r, call_id: str) -> bool:
    return r.hget(keys.call_meta(call_id), "state") == b"ended"


# ------------------------------------------------------------------ scenarios
@dataclass
class Row:
    fault: str
    promise: str
    measured: str
    ok: bool


@dataclass
class StallResult:
    """What a Redis stall did, as measured from the platform, Redis and /metrics."""

    seconds: float
    lease_ms: int
    claim_per_scan: int
    n_calls: int
    frames: dict
    gateway: dict
    duplicates: int
    client_errors: list
    answered: dict  # call id -> seconds from the end of the fault to its first answer
    before: dict  # call id -> lease holder
    after: dict
    moves: list  # seconds after SIGCONT at which a call's lease moved to another worker
    worker_deltas: dict  # metric -> {worker: increase during the fault}
    alive: dict
    ended: bool
    owner_frozen: str | None = None
    label: str = ""

    @property
    def recovery_s(self) -> float | None:
        return max(self.answered.values()) if len(self.answered) == self.n_calls else None

    @property
    def moved(self) -> int:
        return sum(1 for cid in self.before if self.before[cid] != self.after[cid])

    def spread(self, holders: dict) -> dict:
        return dict(sorted(Counter(v or "none" for v in holders.values()).items()))

    def move_batches(self, gap_s: float = 0.15) -> list[int]:
        """Moves grouped into bursts (one takeover scan each): the size of each burst."""
        out: list[int] = []
        last = None
        for t in sorted(self.moves):
            if last is None or t - last > gap_s:
                out.append(0)
            out[-1] += 1
            last = t
        return out


def stall(seconds: float, n_calls: int = 16, lease_ms: int = 3000, claim_per_scan: int = 4,
          freeze_owner_extra_s: float | None = None, late_second_worker: bool = False,
          extra_env: dict | None = None, label: str = "", quiet: bool = False) -> StallResult:
    """SIGSTOP the redis-server for ``seconds`` mid-call, then SIGCONT. With
    ``freeze_owner_extra_s`` the worker holding most calls is frozen with Redis
    and thawed that much later (a node-wide pause: its calls are orphans when
    Redis comes back). With ``late_second_worker`` the calls are dialled with
    one worker and the second starts before the stall. ``extra_env`` goes to
    every process (e.g. a small ``PV_REDIS_BUFFER_FRAMES``: the gap path)."""
    stack = Stack(lease_ms=lease_ms, claim_per_scan=claim_per_scan, tag=f"stall{seconds:g}",
                  workers=1 if late_second_worker else 2, extra_env=extra_env)
    res = run_on(stack, _stall, seconds, n_calls, freeze_owner_extra_s, late_second_worker)
    res.claim_per_scan = claim_per_scan
    res.label = label
    if not quiet:
        print_stall(res)
    return res


async def _stall(stack: Stack, seconds: float, n_calls: int, freeze_owner_extra_s: float | None,
                 late_second_worker: bool) -> StallResult:
    stop = asyncio.Event()
    ids = [f"st{seconds:g}-{i}" for i in range(n_calls)]
    calls, tasks = await dial(stack, ids, stop)
    if late_second_worker:
        await asyncio.to_thread(stack.start_worker, "w2")
    await asyncio.sleep(1.0)  # steady state: leases renewed, commits flowing
    before = stack.holders(ids)
    w_before = {w: stack.worker_metrics(w) for w in stack.worker_ports}
    frozen = [stack.redis.proc.pid]
    owner = None
    if freeze_owner_extra_s is not None:
        owner = Counter(before.values()).most_common(1)[0][0]
        frozen.append(stack.procs[owner].pid)
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(seconds)  # the calls keep streaming in real time
    finally:
        os.kill(frozen[0], signal.SIGCONT)
    t_cont = time.monotonic()
    moves: dict[str, float] = {}

    def watch_moves() -> bool:
        now = time.monotonic()
        for cid, holder in stack.holders(ids).items():
            if holder is not None and holder != before[cid]:
                moves.setdefault(cid, now - t_cont)
        return False

    prober = asyncio.create_task(probe_until_answered(calls, "after", t_cont))
    try:
        if owner is not None:
            await until(watch_moves, freeze_owner_extra_s, 0.01)
    finally:
        for pid in frozen[1:]:
            os.kill(pid, signal.SIGCONT)
    watcher = asyncio.create_task(until(watch_moves, 3.0, 0.02))
    answered = await prober
    await watcher
    await asyncio.sleep(1.5)  # a thawed owner's next renew finds its lost leases
    after = stack.holders(ids)
    w_after = {w: stack.worker_metrics(w) for w in stack.worker_ports}
    ended = await hang_up(stack, calls, tasks, stop)
    names = ('pv_worker_takeovers_total{kind="crash"}', 'pv_worker_leases_lost_total',
             'pv_worker_redis_errors_total{kind="unavailable"}',
             'pv_worker_stale_commands_suppressed_total')
    deltas = {n: {w: int(w_after[w].get(n, 0) - w_before[w].get(n, 0)) for w in stack.worker_ports}
              for n in names}
    return StallResult(seconds=seconds, lease_ms=stack.lease_ms, claim_per_scan=0, n_calls=n_calls,
                       frames=account_frames(stack.r, calls), gateway=gateway_frames(stack.gateway_metrics()),
                       duplicates=sum(call.duplicates for call in calls),
                       client_errors=[call.error for call in calls if call.error], answered=answered,
                       before=before, after=after, moves=list(moves.values()), worker_deltas=deltas,
                       alive=stack.alive(), ended=ended, owner_frozen=owner)


def print_stall(res: StallResult) -> None:
    acc, gw = res.frames, res.gateway
    rec = res.recovery_s
    what = "Redis" + (f" + owner {res.owner_frozen} (thawed later)" if res.owner_frozen else "") + res.label
    print(f"\n== {what} SIGSTOP {res.seconds:g} s ({res.n_calls} calls, lease {res.lease_ms} ms, "
          f"claim per scan {res.claim_per_scan})")
    print(f"  frames: sent {acc['sent']}, distinct audio entries {acc['audio']}, gap frames "
          f"{acc['gap_frames']}, unaccounted {acc['unaccounted']}, resent duplicate entries "
          f"{acc['dup_entries']}")
    print(f"  gateway /metrics: received {gw['received']:.0f} published {gw['published']:.0f} "
          f"buffered {gw['buffered']:.0f} dropped {gw['dropped']}")
    print(f"  platform: duplicate commands {res.duplicates}, client errors {res.client_errors}")
    p50 = statistics.median(res.answered.values()) if res.answered else float("nan")
    print(f"  probes answered after SIGCONT: {len(res.answered)}/{res.n_calls}; recovery max "
          f"{'-' if rec is None else f'{rec:.2f}'} s, p50 {p50:.2f} s")
    print(f"  lease holders before {res.spread(res.before)} after {res.spread(res.after)}; "
          f"calls that changed worker {res.moved}; takeover bursts {res.move_batches()} at "
          f"{[round(t, 2) for t in sorted(res.moves)]} s")
    for name, per in res.worker_deltas.items():
        print(f"  {name}: {per}")
    print(f"  processes alive {res.alive}; calls ended after hang-up: {res.ended}")


def stall_rows(res: StallResult) -> list[Row]:
    acc, rec = res.frames, res.recovery_s
    f = f"Redis SIGSTOP {res.seconds:g} s" + (" + owner worker" if res.owner_frozen else "") + res.label
    rows = [
        Row(f"{f}: frames", "frames sent = audio entries + gap frames (0 unaccounted)",
            f"{acc['sent']} sent, {acc['audio']} in Redis, {acc['gap_frames']} gap, "
            f"{acc['unaccounted']} unaccounted", acc["unaccounted"] == 0 and not res.client_errors),
        Row(f"{f}: commands", "0 duplicate commands at the platform", f"{res.duplicates} duplicates",
            res.duplicates == 0),
        Row(f"{f}: service", "every call answers a probe after SIGCONT; no role exits",
            f"{len(res.answered)}/{res.n_calls} answered, recovery max "
            f"{'-' if rec is None else f'{rec:.2f}'} s; alive {sum(res.alive.values())}/{len(res.alive)}",
            rec is not None and all(res.alive.values()) and res.ended),
    ]
    if res.seconds * 1000 > res.lease_ms:
        takeovers = sum(res.worker_deltas['pv_worker_takeovers_total{kind="crash"}'].values())
        lost = sum(res.worker_deltas["pv_worker_leases_lost_total"].values())
        batches = res.move_batches()
        ok = (all(h in res.alive and res.alive[h] for h in res.after.values())
              and res.moved == takeovers and (res.owner_frozen is None or res.moved == lost)
              and all(b <= res.claim_per_scan for b in batches))
        rows.append(Row(f"{f}: spread", f"every call held by one live worker; each move is one "
                        f"takeover; a scan claims <= PV_WORKER_CLAIM_PER_SCAN ({res.claim_per_scan})",
                        f"before {res.spread(res.before)} after {res.spread(res.after)}; {res.moved} moved "
                        f"in bursts {batches}; takeovers {takeovers}, leases lost {lost}", ok))
    return rows


def worker_kill(n_calls: int = 16, lease_ms: int = 2000) -> list[Row]:
    return run_on(Stack(lease_ms=lease_ms, claim_per_scan=50, tag="kill"), _worker_kill, n_calls)


async def _worker_kill(stack: Stack, n_calls: int) -> list[Row]:
    stop = asyncio.Event()
    ids = [f"wk-{i}" for i in range(n_calls)]
    calls, tasks = await dial(stack, ids, stop)
    await asyncio.sleep(2.0)
    before = stack.holders(ids)
    victim = Counter(before.values()).most_common(1)[0][0]
    orphans = [cid for cid in ids if before[cid] == victim]
    survivor = next(w for w in stack.worker_ports if w != victim)
    stack.procs[victim].send_signal(signal.SIGKILL)
    t_kill = time.monotonic()
    taken: dict[str, float] = {}

    def poll():
        now = time.monotonic()
        for cid, holder in stack.holders(orphans).items():
            if holder == survivor:
                taken.setdefault(cid, now - t_kill)
        return len(taken) == len(orphans)

    await until(poll, stack.lease_ms / 1000 * 3 + 5, 0.01)
    answered = await probe_until_answered(calls, "kill", t_kill)
    ended = await hang_up(stack, calls, tasks, stop)
    dups = sum(call.duplicates for call in calls)
    mx = max(taken.values()) if len(taken) == len(orphans) else None
    print(f"\n== worker SIGKILL ({len(orphans)} of {n_calls} calls on the victim, lease "
          f"{stack.lease_ms} ms): takeover max {_s(mx)}, answered {len(answered)}/{n_calls}, "
          f"recovery max {_s(max(answered.values()) if answered else None)}, duplicates {dups}, "
          f"ended {ended}")
    return [Row("worker SIGKILL", f"orphans taken over <= lease + 1 s ({stack.lease_ms / 1000 + 1:g} s); "
                "0 duplicates; all calls answer",
                f"{len(taken)}/{len(orphans)} taken, max {'-' if mx is None else f'{mx:.2f}'} s; "
                f"{len(answered)}/{n_calls} answered; {dups} duplicates",
                mx is not None and mx <= stack.lease_ms / 1000 + 1 and dups == 0
                and len(answered) == n_calls)]


def redis_restart(n_calls: int = 8) -> list[Row]:
    return run_on(Stack(lease_ms=3000, claim_per_scan=20, tag="restart"), _redis_restart, n_calls)


async def _redis_restart(stack: Stack, n_calls: int) -> list[Row]:
    stop = asyncio.Event()
    ids = [f"rr-{i}" for i in range(n_calls)]
    calls, tasks = await dial(stack, ids, stop)
    await asyncio.sleep(2.0)
    await asyncio.to_thread(stack.restart_redis_empty)
    t_back = time.monotonic()
    answered = await probe_until_answered(calls, "restart", t_back)
    ended = await hang_up(stack, calls, tasks, stop)
    gw = gateway_frames(stack.gateway_metrics())
    dups = sum(call.duplicates for call in calls)
    alive = stack.alive()
    rec = max(answered.values()) if len(answered) == n_calls else None
    print(f"\n== Redis restarted empty ({n_calls} calls): answered {len(answered)}/{n_calls} "
          f"recovery max {_s(rec)}, duplicates {dups}, gateway {gw}, alive {alive}, ended {ended}")
    unacc = gw["received"] - gw["published"] - gw["buffered"] - sum(gw["dropped"].values())
    return [Row("Redis restarted empty", "no role exits; every call answers again; 0 duplicates",
                f"{len(answered)}/{n_calls} answered, recovery max {'-' if rec is None else f'{rec:.2f}'} s; "
                f"{dups} duplicates; gateway frames received-published-dropped {unacc:.0f}",
                rec is not None and dups == 0 and all(alive.values()))]


def pytest_row(fault: str, promise: str, test: str) -> list[Row]:
    """A scenario that lives as a test: run it, report its verdict and wall time."""
    py = ROOT / ".venv" / "bin" / "pytest"
    argv = [str(py) if py.exists() else sys.executable, *([] if py.exists() else ["-m", "pytest"]),
            "-q", "-s", "-p", "no:cacheprovider", test]
    t0 = time.monotonic()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    wall = time.monotonic() - t0
    figures = [ln.strip() for ln in proc.stdout.splitlines()
               if ln.strip() and not ln.startswith(("=", ".", "F")) and "passed" not in ln
               and "warning" not in ln.lower()][:2]
    print(f"\n== {fault}: {test} -> exit {proc.returncode} in {wall:.1f}s {figures}")
    return [Row(fault, promise, f"`{test.split('::')[-1]}` {'passed' if proc.returncode == 0 else 'FAILED'}"
                f" ({wall:.0f} s){'; ' + '; '.join(figures) if figures else ''}", proc.returncode == 0)]


SCENARIOS = {
    "stall-2": lambda: stall_rows(stall(2)),
    "stall-5": lambda: stall_rows(stall(5)),
    "stall-15": lambda: stall_rows(stall(15)),
    "stall-owner": lambda: stall_rows(stall(5, freeze_owner_extra_s=4.0)),
    "stall-overflow": lambda: stall_rows(stall(5, extra_env={"PV_REDIS_BUFFER_FRAMES": "2000"},
                                               label=", gateway buffer 2000 frames")),
    "worker-kill": worker_kill,
    "redis-restart": redis_restart,
    "gateway-drain": lambda: pytest_row(
        "gateway SIGTERM (drain), 20 calls", "all handed over with 1012, resumed on the other gateway",
        "tests/test_fault_gateway_reconnect.py::test_drain_hands_20_calls_to_another_gateway"),
    "dialer-5xx": lambda: pytest_row(
        "dialer: platform 500/502/504", "make-call sent <= 1 time, outcome_unknown",
        "tests/test_fault_dialer_outcomes.py::test_500_502_504_are_outcome_unknown_one_request_each_never_resent"),
}


def print_table(rows: list[Row]) -> None:
    print("\n| Fault | Promise | Measured | Result |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row.fault} | {row.promise} | {row.measured} | {'pass' if row.ok else 'FAIL'} |")


# ----------------------------------------------------------------------- soak
def soak(n_calls: int, minutes: float, call_s: float, sample_s: float) -> int:
    stack = Stack(lease_ms=5000, claim_per_scan=20, workers=1, tag="soak",
                  extra_env={"PV_GATEWAY_MAX_CALLS": str(max(2 * n_calls, 100))})
    return run_on(stack, _soak, n_calls, minutes * 60, call_s, sample_s)


def _used_memory(r) -> int:
    return int(r.info("memory")["used_memory"])


async def _soak(stack: Stack, n_calls: int, duration_s: float, call_s: float, sample_s: float) -> int:
    import psutil

    r = stack.r
    await asyncio.sleep(1.0)
    baseline = _used_memory(r)
    stop_all = asyncio.Event()
    done_calls: list[PlatformCall] = []
    every_call: list[PlatformCall] = []
    t0 = time.monotonic()
    procs = {name: psutil.Process(p.pid) for name, p in stack.procs.items()}
    cpu0 = {name: sum(p.cpu_times()[:2]) for name, p in procs.items()}

    async def slot(k: int) -> None:
        await asyncio.sleep(k * call_s / n_calls)  # staggered: ends and dials spread out
        n = 0
        while not stop_all.is_set():
            call = PlatformCall(f"soak-{k}-{n}", stack.url(f"soak-{k}-{n}"))
            every_call.append(call)
            ends = asyncio.Event()
            task = asyncio.create_task(call.run(ends))
            remaining = t0 + duration_s - time.monotonic()
            try:
                await asyncio.wait_for(stop_all.wait(), max(0.0, min(call_s, remaining)))
            except asyncio.TimeoutError:
                pass
            ends.set()
            await task
            done_calls.append(call)
            n += 1
            if time.monotonic() >= t0 + duration_s:
                return

    tasks = [asyncio.create_task(slot(k)) for k in range(n_calls)]
    series = []
    next_sample = t0
    while time.monotonic() < t0 + duration_s + 1:
        if time.monotonic() >= next_sample:
            frames = sum(call.sent for call in every_call)
            mem = await asyncio.to_thread(_used_memory, r)
            series.append((time.monotonic() - t0, mem, frames))
            print(f"  t={series[-1][0]:6.0f}s used_memory={mem / 1e6:8.2f} MB "
                  f"call-minutes={frames * FRAME_S / 60:7.1f} calls-done={len(done_calls)}", flush=True)
            next_sample += sample_s
        if all(t.done() for t in tasks):
            break
        await asyncio.sleep(0.2)
    stop_all.set()
    await asyncio.gather(*tasks)
    cpu = {name: sum(p.cpu_times()[:2]) - cpu0[name] for name, p in procs.items() if p.is_running()}
    ended = await until(lambda: all(_ended(r, call.call_id) for call in done_calls), 30, 0.5)
    await asyncio.sleep(2.0)
    peak = max(m for _, m, _ in series)
    after_end = _used_memory(r)
    # The audio streams of ended calls expire first (keys.CALL_STREAM_TTL_AFTER_END):
    # what is left then is records, timelines, transcripts (kept an hour).
    await asyncio.sleep(keys.CALL_STREAM_TTL_AFTER_END + 3.0)
    after_audio = _used_memory(r)
    frames = sum(call.sent for call in done_calls)
    call_min = frames * FRAME_S / 60
    no_ttl, with_ttl, bad_ttl = [], [], []
    for key in r.scan_iter(count=1000):
        ttl = r.ttl(key)
        (no_ttl if ttl == -1 else with_ttl).append(key)
        if ttl > keys.CALL_KEY_TTL_AFTER_END:
            bad_ttl.append((key, ttl))
    no_ttl_sizes = {k.decode(): r.memory_usage(k) or 0 for k in no_ttl}
    no_ttl_bytes = sum(no_ttl_sizes.values())
    call_keys_no_ttl = [k.decode() for k in no_ttl if b"soak-" in k]
    for i in range(0, len(with_ttl), 500):
        r.delete(*with_ttl[i:i + 500])
    after_expiry = _used_memory(r)
    errors = [call.error for call in done_calls if call.error]
    dups = sum(call.duplicates for call in done_calls)
    gw = gateway_frames(stack.gateway_metrics())
    growth = (series[-1][1] - series[0][1]) / max(series[-1][2] * FRAME_S / 60, 1e-9)
    print(f"\nsoak: {n_calls} concurrent real-time calls of {call_s:.0f} s, {duration_s / 60:.1f} min, "
          f"{len(done_calls)} calls, {call_min:.1f} call-minutes, client errors {len(errors)} {errors[:2]}")
    print(f"  used_memory baseline {baseline / 1e6:.2f} MB, peak {peak / 1e6:.2f} MB, "
          f"growth over the run {(series[-1][1] - series[0][1]) / 1e6:.2f} MB "
          f"= {growth / 1e3:.1f} KB per call-minute")
    print(f"  after all calls ended: {after_end / 1e6:.2f} MB ({(after_end - baseline) / 1e6:.2f} MB above "
          f"baseline); all ended: {ended}")
    print(f"  {keys.CALL_STREAM_TTL_AFTER_END} s later (the ended calls' audio expired): {after_audio / 1e6:.2f} MB "
          f"({(after_audio - baseline) / max(len(done_calls), 1) / 1e3:.1f} KB per ended call kept by the "
          f"{keys.CALL_KEY_TTL_AFTER_END} s TTL of its record, timeline and transcript)")
    print(f"  keys: {len(with_ttl)} with TTL (none above {keys.CALL_KEY_TTL_AFTER_END} s: {not bad_ttl}), "
          f"{len(no_ttl)} without TTL ({no_ttl_bytes / 1e3:.1f} KB: {no_ttl_sizes}; call keys among "
          f"them: {call_keys_no_ttl[:5]})")
    print(f"  after deleting the TTL keys (standing in for their expiry): {after_expiry / 1e6:.2f} MB "
          f"= baseline {'+' if after_expiry >= baseline else '-'}{abs(after_expiry - baseline) / 1e3:.1f} KB")
    print(f"  gateway frames: {gw}; duplicate commands at the platform {dups}")
    print("  CPU seconds (user+sys) over the run: " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()))
    ok = (ended and not errors and dups == 0 and not call_keys_no_ttl and not bad_ttl
          and after_expiry - baseline < 1_000_000)
    print_table([Row(f"memory soak {n_calls} calls x {duration_s / 60:g} min",
                     "memory returns to baseline once ended calls' keys expire (TTL <= 1 h); "
                     "no call key without TTL",
                     f"peak {peak / 1e6:.1f} MB; +{growth / 1e3:.0f} KB per call-minute over the run; "
                     f"{(after_end - baseline) / 1e6:.1f} MB held when the last call ended, "
                     f"{(after_audio - baseline) / 1e6:.1f} MB once its audio expired; "
                     f"{(after_expiry - baseline) / 1e3:+.0f} KB vs baseline after expiry",
                     ok)])
    return 0 if ok else 1


# ----------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd")
    run = sub.add_parser("run", help="every fault scenario (the default)")
    run.add_argument("--only", help="comma-separated: " + ",".join(SCENARIOS))
    s = sub.add_parser("soak", help="memory soak")
    s.add_argument("--calls", type=int, default=50)
    s.add_argument("--minutes", type=float, default=10.0)
    s.add_argument("--call-s", type=float, default=60.0, help="length of each call before it is redialled")
    s.add_argument("--sample-s", type=float, default=30.0)
    args = p.parse_args(argv)
    if args.cmd == "soak":
        return soak(args.calls, args.minutes, args.call_s, args.sample_s)
    names = (getattr(args, "only", None) or ",".join(SCENARIOS)).split(",")
    rows: list[Row] = []
    for name in names:
        try:
            rows += SCENARIOS[name]()
        except Exception as exc:  # noqa: BLE001 (a scenario that cannot run is a failed row)
            rows.append(Row(name, "scenario runs", f"error: {exc!r}", False))
    print_table(rows)
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
