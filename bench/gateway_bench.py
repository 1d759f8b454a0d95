"""Gateway load benchmark: N concurrent calls of 20 ms frames in real time.

    .venv/bin/python bench/gateway_bench.py [--calls 300] [--seconds 20] [--rate 8000]

Starts, side by side:
1. a bare websockets receiver on uvloop (no Redis, no parsing: ``async for
   msg in ws``) in its own subprocess;
2. the gateway (``python -m piopiy_voice.gateway.server``) in its own subprocess, writing to a
   private redis-server started for the run.
The load alternates between them in 2 s slices (one unmeasured warm-up slice
each, then ``--seconds`` of measured load each), so both see the same machine
conditions even on a shared, noisy machine.
Both are driven by the same load generator: N sockets, each sending one binary
frame every 20 ms, phases staggered across the 20 ms so arrivals are spread
like independent calls. The generator writes pre-built client frames straight
to the transport (mask key 0, valid per RFC 6455) so its own CPU stays small.

Printed per target: CPU time per inbound frame (user+sys of the child, from
psutil, over the steady-state window only), and for the gateway: the ratio to
the bare receiver, frame-sent -> entry-in-Redis latency p50/p99 (each frame
carries its send time in its first 8 bytes; the entry's stream id carries
Redis' insertion time in ms, so values are floored to 1 ms), frames lost,
memory per call (RSS delta / calls) and the redis-server CPU per frame.

``--cluster``: the gateway writes to a private local Redis Cluster (3
primaries with a replica each, ``tests/cluster_support.LocalCluster``) instead
of one redis-server; the Redis CPU is then the sum over its nodes.

``--listeners K`` (the API's effect on the gateway, issue 11): also starts the
API role (``python -m piopiy_voice.api``) on the same private Redis and a third
subprocess of K real WebSocket listen clients (``websockets``, authenticated by
an API key made with ``api.auth.create_key``) on K of the gateway's calls. The
gateway's load is then split into two phases that alternate slice by slice on
the SAME gateway process and the SAME call sockets: "no API" slices (no listen
socket open, the API's call hubs retired) and "K listeners" slices (the K
sockets connected and streaming). Listen sockets open and close only in
unmeasured gaps between slices. Printed per phase: the gateway's CPU per frame
(and per-slice spread), its ratio to the bare receiver and to the other phase,
the API process's, redis-server's and the listen clients' CPU, the frames the
listeners received, and the gateway's sent -> Redis latency.

``--compare-rev REV`` (without ``--speaking``: the inbound side, issue 14):
the working tree's gateway and the one of git revision REV (``bench/revtree.py``)
side by side on one private redis-server, with the bare receiver, the load
alternating between the three in slices as above (each gateway its own N
calls). Printed per gateway: CPU per inbound frame, the ratio working tree /
REV, redis-server's CPU per frame in that gateway's slices, Redis batches
written per second of load and frames per batch (from ``/metrics``, whole
run), sent -> Redis latency and frames lost.

``--speaking K [--compare-rev REV]`` (the outbound side, issue 14): two
gateway processes side by side on one private redis-server, the working
tree's and the one of git revision REV (default HEAD, via ``bench/revtree.py``),
each holding K call sockets that read what the gateway sends (no inbound
audio: only the playout is measured). The load alternates between them in
slices: in its slice a gateway gets one ``PlayAudio`` command per call (an
utterance of ``--utterance`` seconds, written to its command stream over one
chunk's time, so calls start at spread phases like independent ones) and plays
them all out; the slice ends once every chunk arrived and the utterances'
``finished`` reports are due. One unmeasured warm-up slice each, then
``--seconds`` of measured slices each. A third target in the same rotation, a
bare sender (``websockets`` on uvloop, one timer writing one pre-built chunk
to every socket each 40 ms), is the floor: what the socket writes alone cost.
Printed per target: CPU (user+sys, psutil) per outbound 40 ms chunk and per
speaking call-second; the working tree's ratio to the revision, and of what
each adds above the floor; and per gateway the pacing seen by the clients:
jitter (each chunk's lateness against the earliest chunk of its utterance,
from the 5th chunk on: the first 4 leave at once within the lead) and
headroom (how long before its play time a chunk arrived, the first chunk
playing on arrival, again from the 5th chunk: what the lead has left).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import re
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent

SECRET = "bench-secret-not-for-production"


# ------------------------------------------------------------ bare receiver
def serve_bare() -> None:
    import uvloop
    from websockets.asyncio.server import serve

    lat: list[float] = []
    unpack, now = struct.Struct("<d").unpack_from, time.time

    async def handler(ws):
        # Latency of every 32nd frame, for comparison with the gateway under the
        # same machine load (costs ~0.05 us/frame: negligible for the CPU baseline).
        n = 0
        async for m in ws:
            n += 1
            if not n & 31:
                lat.append(now() - unpack(m)[0])

    import signal as _signal

    def report():
        if lat:
            lat.sort()
            print(f"{lat[len(lat)//2]*1000:.1f} {lat[int(len(lat)*.99)]*1000:.1f} "
                  f"{lat[-1]*1000:.1f}", flush=True)
        os._exit(0)

    async def main():
        async with serve(handler, "127.0.0.1", 0, compression=None, max_size=65536,
                         max_queue=64) as server:
            print(next(iter(server.sockets)).getsockname()[1], flush=True)
            asyncio.get_running_loop().add_signal_handler(_signal.SIGTERM, report)
            await asyncio.Future()

    uvloop.run(main())


# ------------------------------------------------------------- bare sender
def serve_bare_sender(rate: int) -> None:
    """The floor of the outbound side: a websockets server on uvloop that, told
    ``N`` (a binary frame) by a client, writes it N pre-built streamAudio chunks,
    one every 40 ms: one timer for all sockets, the frame built once, no pacer,
    no base64, no Redis. What the socket writes themselves cost."""
    import signal as _signal

    import uvloop
    from websockets.asyncio.server import serve

    from piopiy_voice.gateway import outbound

    msg = outbound.stream_audio(bytes(rate * 2 * 40 // 1000), rate).encode()
    left: dict = {}

    def tick(loop, at):
        for ws, n in list(left.items()):
            if ws.protocol.state.name != "OPEN" or n <= 0:
                del left[ws]
                continue
            ws.protocol.send_text(msg)
            ws.send_data()
            left[ws] = n - 1
        loop.call_at(at + CHUNK_S, tick, loop, at + CHUNK_S)

    async def handler(ws):
        async for m in ws:
            left[ws] = int(m)

    async def main():
        loop = asyncio.get_running_loop()
        async with serve(handler, "127.0.0.1", 0, compression=None, max_size=65536) as server:
            print(next(iter(server.sockets)).getsockname()[1], flush=True)
            loop.add_signal_handler(_signal.SIGTERM, lambda: os._exit(0))
            tick(loop, loop.time())
            await asyncio.Future()

    uvloop.run(main())


# ----------------------------------------------------------- listen clients
def serve_listeners() -> None:
    """K real listen sockets on the API, switched on and off from stdin.

    First stdin line: JSON ``{"base", "key", "cids"}``. Then ``on`` (connect all,
    wait for each hello, answer ``ready``), ``off`` (close all, answer ``off N``:
    binary frames received since ``on``), ``quit``. Errors answer ``error ...``."""
    import json

    import uvloop
    from websockets.asyncio.client import connect

    cfg = json.loads(sys.stdin.readline())
    headers = {"Authorization": f"Bearer {cfg['key']}"}
    count = [0]

    async def listen_one(cid: str, ready: asyncio.Future, socks: list) -> None:
        async with connect(f"{cfg['base']}/calls/{cid}/listen", additional_headers=headers,
                           compression=None, open_timeout=10, close_timeout=2) as ws:
            socks.append(ws)
            hello = json.loads(await ws.recv())
            if hello.get("type") != "hello":
                raise RuntimeError(f"first message is not hello: {hello}")
            ready.set_result(None)
            async for m in ws:
                if isinstance(m, bytes):
                    count[0] += 1

    async def main() -> None:
        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Task] = []
        socks: list = []
        while True:
            cmd = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
            if cmd == "on":
                count[0], socks = 0, []
                readies = [loop.create_future() for _ in cfg["cids"]]
                tasks = [loop.create_task(listen_one(cid, f, socks))
                         for cid, f in zip(cfg["cids"], readies)]
                try:
                    await asyncio.wait_for(asyncio.gather(*readies), 15)
                    print("ready", flush=True)
                except Exception as exc:  # noqa: BLE001 - report, the parent stops the run
                    failed = [t.exception() for t in tasks if t.done() and t.exception()]
                    print(f"error {exc!r} {failed[:1]!r}", flush=True)
            elif cmd == "off":
                await asyncio.gather(*(ws.close() for ws in socks), return_exceptions=True)
                done, pending = await asyncio.wait(tasks, timeout=5) if tasks else (set(), set())
                for t in pending:
                    t.cancel()
                print(f"off {count[0]}", flush=True)
            else:   # "quit" or stdin closed
                for t in tasks:
                    t.cancel()
                return

    uvloop.run(main())


# ---------------------------------------------------------- load generator
class RawClient(asyncio.Protocol):
    """Minimal WebSocket client: handshake, send pre-framed binary, answer pings;
    ``on_text(payload)`` (if set) gets every text message."""

    on_text = None

    def __init__(self, host: str, path: str) -> None:
        self.host, self.path = host, path
        self.ready = asyncio.get_running_loop().create_future()
        self.closed = asyncio.get_running_loop().create_future()
        self.buf = b""
        self.upgraded = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write((
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode())

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.upgraded:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            if not head.startswith(b"HTTP/1.1 101"):
                self.ready.set_exception(RuntimeError(head.split(b"\r\n")[0].decode()))
                return
            self.upgraded, self.buf = True, rest
            self.ready.set_result(None)
        while len(self.buf) >= 2:
            op, n = self.buf[0] & 0x0F, self.buf[1] & 0x7F
            off = 2
            if n == 126:
                if len(self.buf) < 4:
                    return
                n, off = struct.unpack(">H", self.buf[2:4])[0], 4
            elif n == 127:
                if len(self.buf) < 10:
                    return
                n, off = struct.unpack(">Q", self.buf[2:10])[0], 10
            if len(self.buf) < off + n:
                return
            payload, self.buf = self.buf[off:off + n], self.buf[off + n:]
            if op == 0x1 and self.on_text is not None:
                self.on_text(payload)
            elif op == 0x9:  # ping -> pong
                self.transport.write(bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
            elif op == 0x8 and not self.closed.done():
                self.closed.set_result(payload[:2])

    def connection_lost(self, exc) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("lost before upgrade"))
        if not self.closed.done():
            self.closed.set_result(b"")

    def send_frame(self, payload: bytes) -> None:
        n = len(payload)
        head = bytes([0x82, 0x80 | n]) if n < 126 else b"\x82\xfe" + struct.pack(">H", n)
        self.transport.write(head + b"\0\0\0\0" + payload)

    async def close(self) -> None:
        if self.transport.is_closing():
            return
        self.transport.write(b"\x88\x82\0\0\0\0\x03\xe8")
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), 5)
        except asyncio.TimeoutError:
            pass
        self.transport.close()


class Target:
    """One receiver under test: its sockets and CPU/frame accounting."""

    def __init__(self, name: str, port: int, paths: list[str], proc: psutil.Process) -> None:
        self.name, self.port, self.paths, self.proc = name, port, paths, proc
        self.clients: list[RawClient] = []
        self.sent = 0
        self.window_frames = 0
        self.cpu_s = self.user_s = 0.0
        self.late = 0.0
        self.rss_connected = self.rss_end = 0
        self.share: Target | None = None   # drive this target over another's sockets
        self.slices: list[float] = []      # CPU per frame (us) of each measured slice
        self.windows: list[tuple[float, float]] = []   # wall-clock span of each slice
        self.watch_cpu: dict[str, float] = {}          # other processes' CPU in its slices
        self.watch_slices: dict[str, list[float]] = {}  # ... and in each of them (s)


async def _open(target: Target) -> None:
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(20)

    async def open_one(path):
        async with sem:
            _, cl = await loop.create_connection(
                lambda: RawClient(f"127.0.0.1:{target.port}", path), "127.0.0.1", target.port)
            await asyncio.wait_for(cl.ready, 10)
            return cl

    target.clients = list(await asyncio.gather(*(open_one(p) for p in target.paths)))
    target.rss_connected = target.proc.memory_info().rss


async def drive(targets: list[Target], seconds: float, rate: int, slice_s: float = 2.0,
                before_slice=None, watch: dict[str, psutil.Process] | None = None) -> None:
    """Load the targets in alternating slices of ``slice_s`` (each gets ``seconds``
    of measured load plus one unmeasured warm-up slice), so both see the same
    machine conditions however noisy the machine is. ``before_slice(target)``
    (async) runs unmeasured before each slice; ``watch`` names other processes
    whose CPU is added up per target over its measured slices."""
    loop = asyncio.get_running_loop()
    watch = watch or {}
    for t in targets:
        if t.share is not None:
            t.clients, t.rss_connected = t.share.clients, t.share.rss_connected
        else:
            await _open(t)
    frame_len = rate * 2 // 50
    body = (bytes(range(256)) * (frame_len // 256 + 1))[8:frame_len]
    groups = 10  # calls are staggered over the 20 ms tick in 10 groups
    measured_slices = max(1, round(seconds / slice_s))
    schedule = [t for t in targets] + [t for _ in range(measured_slices) for t in targets]
    for k, t in enumerate(schedule):
        measure = k >= len(targets)
        if before_slice is not None:
            await before_slice(t)
        w0 = {name: sum(p.cpu_times()[:2]) for name, p in watch.items()}
        c0 = t.proc.cpu_times()
        sent0 = t.sent
        wall0 = time.time()
        start = loop.time() + 0.01
        ticks = int(slice_s / 0.002)
        for tick in range(ticks):
            t_tick = start + tick * 0.002
            now = loop.time()
            if t_tick > now:
                await asyncio.sleep(t_tick - now)
            elif measure:
                t.late = max(t.late, now - t_tick)
            payload = struct.pack("<d", time.time()) + body
            batch = t.clients[tick % groups::groups]
            for cl in batch:
                cl.send_frame(payload)
            t.sent += len(batch)
        await asyncio.sleep(0.1)  # let the target finish the slice's last frames
        if measure:
            c1 = t.proc.cpu_times()
            t.cpu_s += (c1.user + c1.system) - (c0.user + c0.system)
            t.user_s += c1.user - c0.user
            t.window_frames += t.sent - sent0
            if t.sent > sent0:
                t.slices.append(((c1.user + c1.system) - (c0.user + c0.system)) / (t.sent - sent0) * 1e6)
            t.windows.append((wall0, time.time()))
            for name, p in watch.items():
                used = sum(p.cpu_times()[:2]) - w0[name]
                t.watch_cpu[name] = t.watch_cpu.get(name, 0.0) + used
                t.watch_slices.setdefault(name, []).append(used)
    for t in targets:
        t.rss_end = t.proc.memory_info().rss
        if t.share is None:
            await asyncio.gather(*(cl.close() for cl in t.clients))


def _child(args, env=None, stdout=subprocess.PIPE, stderr=subprocess.PIPE):
    return subprocess.Popen(args, env=env, stdout=stdout, stderr=stderr, text=True)


def _wait_port(stream, pattern, timeout=20.0) -> int:
    box: list[int] = []

    def pump():
        for line in stream:
            m = re.search(pattern, line)
            if m and not box:
                box.append(int(m.group(1)))
    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not box:
        if time.monotonic() > deadline:
            raise RuntimeError("child did not report its port")
        time.sleep(0.02)
    return box[0]


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _read_back(client, ids: list[str]) -> tuple[list[tuple[float, float]], int]:
    """Wait for the gateway to end the calls, then read every call stream back:
    ([(sent at, sent -> Redis ms)], audio entries)."""
    from piopiy_voice import keys

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if all(client.hget(keys.call_meta(cid), "state") == b"ended" for cid in ids[-5:]):
            break
        time.sleep(0.2)
    time.sleep(0.5)
    lat, audio = [], 0
    for cid in ids:
        last = "-"
        while True:
            batch = client.xrange(keys.call_stream(cid), min=last, count=2000)
            if last != "-":
                batch = batch[1:]
            if not batch:
                break
            for eid, f in batch:
                if f.get(b"type") == b"audio":
                    audio += 1
                    sent_at = struct.unpack("<d", f[b"pcm"][:8])[0]
                    lat.append((sent_at, int(eid.split(b"-")[0]) - sent_at * 1000))
            last = batch[-1][0]
    return lat, audio


def _pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(len(values) * q))] if values else float("nan")


def _machine() -> str:
    """The banner's first words: the box and how busy it was at the start."""
    la = os.getloadavg()
    return f"machine: {os.cpu_count()} cpus, load avg {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}"


def main_listeners(args) -> int:
    """``--listeners K``: the gateway without and with an API streaming K calls."""
    import json

    import httpx
    import uvloop

    from piopiy_voice.api import auth
    from piopiy_voice.redisconn import EmbeddedRedis, connect, free_port
    from piopiy_voice.signing import sign_stream_url

    k = args.listeners
    print(f"{_machine()}; {args.calls} calls x {args.seconds:g} s "
          f"per phase at {args.rate} Hz, 20 ms frames; {k} of them listened in the 'listeners' phase")
    me = psutil.Process()
    bare = _child([sys.executable, __file__, "--serve-bare"], stderr=None)
    redis = EmbeddedRedis()
    env = dict(os.environ, REDIS_URL=redis.url, PV_SIGNING_SECRET=SECRET, PV_LOG_LEVEL="INFO",
               PYTHONPATH=str(ROOT))
    gw = _child([sys.executable, "-m", "piopiy_voice.gateway.server", "--port", "0", "--gateway-id", "bench"],
                env=env, stdout=subprocess.DEVNULL)
    api_port = free_port()
    api_log = open(os.devnull, "w")
    api = _child([sys.executable, "-m", "piopiy_voice.api"],
                 env=dict(env, PV_API_PORT=str(api_port), PV_LOG_LEVEL="WARNING"),
                 stdout=api_log, stderr=None)
    lis = subprocess.Popen([sys.executable, __file__, "--serve-listeners"], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=None, text=True)
    api_http = f"http://127.0.0.1:{api_port}"
    listening = {"on": False, "frames": 0}

    def api_hubs() -> int:
        return httpx.get(api_http + "/healthz", timeout=2).json()["hubs"]

    async def ask(cmd: str, timeout: float = 20.0) -> str:
        lis.stdin.write(cmd + "\n")
        lis.stdin.flush()
        line = await asyncio.wait_for(asyncio.to_thread(lis.stdout.readline), timeout)
        if not line or line.startswith("error"):
            raise RuntimeError(f"listen clients: {line.strip() or 'exited'}")
        return line.strip()

    async def until_hubs(n: int) -> None:
        deadline = time.monotonic() + 10
        while (hubs := await asyncio.to_thread(api_hubs)) != n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"API has {hubs} call hubs, expected {n}")
            await asyncio.sleep(0.1)

    async def before_slice(t: Target) -> None:
        """Listen sockets open before each 'listeners' slice and close (hubs
        retired: the API reads nothing) before any other slice; unmeasured."""
        want = t is g_on
        if want and not listening["on"]:
            await ask("on")
            await until_hubs(k)
            await asyncio.sleep(0.3)   # every hub past its first XREVRANGE, blocked in XREAD
            listening["on"] = True
        elif not want and listening["on"]:
            listening["frames"] += int((await ask("off")).split()[1])
            await until_hubs(0)       # hubs linger api.listen.HUB_LINGER_S after the last listener
            listening["on"] = False

    try:
        bport = int(bare.stdout.readline())
        gport = _wait_port(gw.stderr, r"listening on 127\.0\.0\.1:(\d+)")
        deadline = time.monotonic() + 30
        while True:
            try:
                if api_hubs() == 0:
                    break
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            if api.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("API did not start")
            time.sleep(0.1)
        r = connect(redis.url)
        _, key = auth.create_key(r, "listen", name="gateway_bench")
        ids = [f"bench-{i}" for i in range(args.calls)]
        lis.stdin.write(json.dumps({"base": f"ws://127.0.0.1:{api_port}", "key": key,
                                    "cids": ids[:k]}) + "\n")
        lis.stdin.flush()
        gproc = psutil.Process(gw.pid)
        time.sleep(0.5)
        rss0 = gproc.memory_info().rss
        gpaths = [sign_stream_url(f"ws://127.0.0.1:{gport}", cid, SECRET,
                                  params={"rate": str(args.rate), "mode": "callee"})
                  .split(f":{gport}", 1)[1] for cid in ids]
        b = Target("bare", bport, [f"/x/{i}" for i in range(args.calls)], psutil.Process(bare.pid))
        g_off = Target("gateway, no API", gport, gpaths, gproc)
        g_on = Target(f"gateway, {k} listeners", gport, gpaths, gproc)
        g_on.share = g_off
        watch = {"api": psutil.Process(api.pid), "redis": psutil.Process(redis.proc.pid),
                 "clients": psutil.Process(lis.pid)}
        c0 = sum(me.cpu_times()[:2])
        uvloop.run(drive([b, g_off, g_on], args.seconds, args.rate, before_slice=before_slice, watch=watch))
        gen_cpu = sum(me.cpu_times()[:2]) - c0
        if listening["on"]:
            listening["frames"] += int(uvloop.run(ask("off")).split()[1])
        bare.terminate()
        out, _ = bare.communicate(timeout=10)
        bare_lat = [float(x) for x in out.split()[-3:]] if out.strip() else None
        lat, audio = _read_back(r, ids)
    finally:
        if lis.poll() is None:
            try:
                lis.stdin.write("quit\n")
                lis.stdin.close()
                lis.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        for p in (lis, api, bare, gw):
            _stop(p)
        api_log.close()
        redis.close()

    bus = b.cpu_s / b.window_frames * 1e6
    print(f"bare uvloop receiver  : {bus:6.1f} us CPU/frame "
          f"(user {b.user_s / b.window_frames * 1e6:.1f}; {b.window_frames} frames measured)")
    per = {}
    for t in (g_off, g_on):
        us = per[t.name] = t.cpu_s / t.window_frames * 1e6
        sl = sorted(t.slices)
        print(f"{t.name:<22}: {us:6.1f} us CPU/frame (user {t.user_s / t.window_frames * 1e6:.1f}; "
              f"{t.window_frames} frames, {len(sl)} slices: min {sl[0]:.1f} median "
              f"{statistics.median(sl):.1f} max {sl[-1]:.1f})  ratio to bare {us / bus:.2f}x")
    off_us, on_us = per[g_off.name], per[g_on.name]
    print(f"with / without API    : {on_us / off_us:.3f}x ({on_us - off_us:+.1f} us CPU per gateway frame)")
    for name, label in (("api", "API process"), ("redis", "redis-server"), ("clients", "listen clients")):
        cells = []
        for t in (g_off, g_on):
            secs = sum(w1 - w0 for w0, w1 in t.windows)   # measured slices only
            cpu = t.watch_cpu.get(name, 0.0)
            cells.append(f"{cpu / t.window_frames * 1e6:5.1f} us/gateway frame "
                         f"({cpu / secs * 100 if secs else float('nan'):.0f}% of a core)")
        print(f"{label:<22}: no API {cells[0]}; {k} listeners {cells[1]}")
    print("API CPU per slice (s) : no API " + " ".join(f"{x:.2f}" for x in g_off.watch_slices["api"])
          + f"; {k} listeners " + " ".join(f"{x:.2f}" for x in g_on.watch_slices["api"]))
    expected = k * g_on.sent // args.calls
    print(f"listen frames out     : {listening['frames']} received by the {k} listen sockets of "
          f"{expected} sent on the listened calls in 'listeners' slices")
    for t in (g_off, g_on):
        spans = t.windows
        vs = sorted(v for sent_at, v in lat if any(w0 <= sent_at <= w1 for w0, w1 in spans))
        if vs:
            print(f"latency sent->Redis   : {t.name}: p50 {_pct(vs, .5):.1f} ms, p99 {_pct(vs, .99):.1f} ms, "
                  f"max {vs[-1]:.1f} ms (floored to 1 ms)")
    if bare_lat:
        print(f"bare receiver latency : p50 {bare_lat[0]:.1f} ms, p99 {bare_lat[1]:.1f} ms, max {bare_lat[2]:.1f} ms")
    sent_gw = g_off.sent + g_on.sent
    print(f"load generator        : {gen_cpu / (b.sent + sent_gw) * 1e6:6.1f} us CPU/frame; worst tick "
          f"lateness {b.late * 1000:.1f} / {g_off.late * 1000:.1f} / {g_on.late * 1000:.1f} ms "
          f"(bare / no API / listeners)")
    lost = sent_gw - audio
    print(f"frames lost           : {lost} of {sent_gw} sent to the gateway")
    print(f"memory per call       : {(g_off.rss_end - rss0) / args.calls / 1024:.1f} KiB")
    la = os.getloadavg()
    print(f"load avg after run    : {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}")
    return 0 if lost == 0 else 1


# ------------------------------------------- inbound, side by side (--compare-rev)
def _tree_and_rev_gateways(rev: str, redis_url: str, ids: tuple[str, str]
                           ) -> list[tuple[str, str, int, subprocess.Popen]]:
    """A gateway on the working tree's code and one on ``rev``'s, both on
    ``redis_url``, each answering /healthz: (label, gateway id, port, process)."""
    import urllib.request

    from revtree import package_root

    from piopiy_voice.redisconn import free_port

    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    code = package_root(rev)
    gws: list[tuple[str, str, int, subprocess.Popen]] = []
    for label, gid, path in (("working tree", ids[0], str(ROOT)),
                             (f"revision {rev} ({sha})", ids[1], f"{code}{os.pathsep}{ROOT}")):
        port = free_port()
        env = dict(os.environ, REDIS_URL=redis_url, PV_SIGNING_SECRET=SECRET,
                   PV_LOG_LEVEL="WARNING", PYTHONPATH=path)
        where = subprocess.run([sys.executable, "-c", "import piopiy_voice.gateway.registry as m; "
                                "print(m.__file__)"], env=env, capture_output=True, text=True,
                               cwd="/").stdout.strip()
        print(f"{label:<28}: gateway code from {where}")
        gws.append((label, gid, port, _child(
            [sys.executable, "-m", "piopiy_voice.gateway.server", "--port", str(port),
             "--gateway-id", gid], env=env, stdout=subprocess.DEVNULL, stderr=None)))
    for label, _, port, proc in gws:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    for *_, p in gws:
                        _stop(p)
                    raise RuntimeError(f"{label}: gateway did not start")
                time.sleep(0.1)
    return gws


def main_inbound_compare(args) -> int:
    """``--compare-rev REV``: the working tree's gateway against REV's, inbound load."""
    import uvloop

    from piopiy_voice.redisconn import EmbeddedRedis, connect
    from piopiy_voice.signing import sign_stream_url

    rev = args.compare_rev
    print(f"{_machine()}; {args.calls} calls per gateway x {args.seconds:g} s at {args.rate} Hz, 20 ms frames, "
          f"slices alternating")
    me = psutil.Process()
    bare = _child([sys.executable, __file__, "--serve-bare"], stderr=None)
    redis = EmbeddedRedis()
    gws: list[tuple[str, str, int, subprocess.Popen]] = []
    try:
        gws = _tree_and_rev_gateways(rev, redis.url, ("tree", "rev"))
        bport = int(bare.stdout.readline())
        b = Target("bare", bport, [f"/x/{i}" for i in range(args.calls)], psutil.Process(bare.pid))
        targets, ids = [b], {}
        for label, gid, port, proc in gws:
            ids[label] = [f"{gid}-{i}" for i in range(args.calls)]
            paths = [sign_stream_url(f"ws://127.0.0.1:{port}", cid, SECRET,
                                     params={"rate": str(args.rate), "mode": "callee"})
                     .split(f":{port}", 1)[1] for cid in ids[label]]
            targets.append(Target(label, port, paths, psutil.Process(proc.pid)))
        watch = {"redis": psutil.Process(redis.proc.pid)}
        c0 = sum(me.cpu_times()[:2])
        uvloop.run(drive(targets, args.seconds, args.rate, watch=watch))
        gen_cpu = sum(me.cpu_times()[:2]) - c0
        batches = {label: _metric(port, "pv_gateway_redis_batches_total") for label, _, port, _ in gws}
        bare.terminate()
        bare.communicate(timeout=10)
        client = connect(redis.url)
        back = {label: _read_back(client, ids[label]) for label in ids}
    finally:
        for *_, proc in gws:
            _stop(proc)
        _stop(bare)
        redis.close()

    bus = b.cpu_s / b.window_frames * 1e6
    print(f"bare uvloop receiver  : {bus:6.1f} us CPU/frame "
          f"(user {b.user_s / b.window_frames * 1e6:.1f}; {b.window_frames} frames measured)")
    per, lost = {}, 0
    for t in targets[1:]:
        us = per[t.name] = t.cpu_s / t.window_frames * 1e6
        sl = sorted(t.slices)
        secs = sum(w1 - w0 for w0, w1 in t.windows)
        print(f"{t.name:<22}: {us:6.1f} us CPU/frame (user {t.user_s / t.window_frames * 1e6:.1f}; "
              f"{t.window_frames} frames, {len(sl)} slices: min {sl[0]:.1f} median "
              f"{statistics.median(sl):.1f} max {sl[-1]:.1f}); ratio to bare {us / bus:.2f}x")
        rcpu = t.watch_cpu.get("redis", 0.0)
        load_s = t.sent / args.calls * 0.020   # seconds of load this gateway got (all slices)
        print(f"{'':<22}  redis-server {rcpu / t.window_frames * 1e6:.1f} us CPU/frame in its slices "
              f"({rcpu / secs * 100 if secs else float('nan'):.0f}% of a core); "
              f"{batches[t.name] / load_s:.0f} Redis batches per second of load, "
              f"{t.sent / max(1.0, batches[t.name]):.1f} entries per batch (whole run)")
        lat, audio = back[t.name]
        vs = sorted(v for _, v in lat)
        lost += t.sent - audio
        if vs:
            print(f"{'':<22}  latency sent->Redis p50 {_pct(vs, .5):.1f} ms, p99 {_pct(vs, .99):.1f} ms, "
                  f"max {vs[-1]:.1f} ms (floored to 1 ms); frames lost {t.sent - audio} of {t.sent}")
    new, old = per[targets[1].name], per[targets[2].name]
    print(f"ratio working tree / {rev}: {new / old:.3f}x CPU per frame ({new - old:+.1f} us per frame); "
          f"above the bare receiver: {new - bus:.1f} us vs {old - bus:.1f} us per frame")
    sent = sum(t.sent for t in targets)
    print(f"load generator        : {gen_cpu / sent * 1e6:6.1f} us CPU/frame; worst tick lateness "
          + " / ".join(f"{t.late * 1000:.1f}" for t in targets) + " ms (bare / tree / rev)")
    la = os.getloadavg()
    print(f"load avg after run    : {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}")
    return 0 if lost == 0 else 1


# ------------------------------------------------------- outbound (--speaking)
CHUNK_S = 0.040
#: Chunks 0-2 of an utterance leave at once (the default 100 ms lead); pacing
#: jitter is measured from the 5th on.
STEADY_FROM = 4
TICKS = "pv_gateway_playout_ticks_total"


class Speaker:
    """One gateway under the outbound load: its process, command stream and calls."""

    def __init__(self, label: str, gid: str, port: int, proc: subprocess.Popen,
                 bare: bool = False) -> None:
        self.label, self.gid, self.port, self.popen = label, gid, port, proc
        self.bare = bare                       # the bare sender: told over its sockets
        self.proc = psutil.Process(proc.pid)
        self.clients: list[RawClient] = []
        self.arrivals: list[list[float]] = []
        self.cpu_s = self.user_s = 0.0
        self.chunks = 0
        self.call_s = 0.0
        self.slices: list[float] = []          # us CPU per chunk of each measured slice
        self.jitter: list[float] = []          # s, every steady chunk
        self.headroom: list[float] = []        # s, every steady chunk
        self.missing = 0
        self.wakes = 0.0                       # playout tick wakes (nan: no tick in this code)


def _metric(port: int, family: str) -> float:
    import urllib.request

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    m = re.search(rf"^{family} ([0-9.e+]+)$", body, re.M)
    return float(m.group(1)) if m else float("nan")


async def _speak(targets: list[Speaker], redis_url: str, k: int, rate: int, seconds: float,
                 utterance_s: float) -> None:
    from piopiy_voice import contracts as c
    from piopiy_voice import keys
    from piopiy_voice.redisconn import connect_async
    from piopiy_voice.signing import sign_stream_url

    loop = asyncio.get_running_loop()
    r = connect_async(redis_url)
    size = int(rate * 2 * utterance_s) & ~1
    pcm = (bytes(range(256)) * (size // 256 + 1))[:size]
    chunk_bytes = rate * 2 * 40 // 1000
    per_call = -(-len(pcm) // chunk_bytes)
    sem = asyncio.Semaphore(20)
    for t in targets:
        t.arrivals = [[] for _ in range(k)]

        async def open_one(i: int, t: Speaker = t) -> RawClient:
            path = f"/x/{i}" if t.bare else sign_stream_url(
                f"ws://127.0.0.1:{t.port}", f"{t.gid}-{i}", SECRET,
                params={"rate": str(rate), "mode": "callee"}).split(f":{t.port}", 1)[1]
            async with sem:
                _, cl = await loop.create_connection(
                    lambda: RawClient(f"127.0.0.1:{t.port}", path), "127.0.0.1", t.port)
                await asyncio.wait_for(cl.ready, 10)
            cl.on_text = lambda _payload, a=t.arrivals[i], now=time.monotonic: a.append(now())
            return cl

        t.clients = list(await asyncio.gather(*(open_one(i) for i in range(k))))
    await asyncio.sleep(1.0)  # calls started, records written
    measured = max(1, round(seconds / utterance_s))
    schedule = list(targets) + [t for _ in range(measured) for t in targets]
    for n, t in enumerate(schedule):
        measure = n >= len(targets)
        cmds = keys.gateway_commands(t.gid)
        fields = [c.encode(c.PlayAudio(call_id=f"{t.gid}-{i}", pcm=pcm, rate=rate)) for i in range(k)]
        for a in t.arrivals:
            a.clear()
        if measure and not t.bare:
            w0 = await asyncio.to_thread(_metric, t.port, TICKS)
        c0 = t.proc.cpu_times()
        groups = 8  # commands spread over one chunk's time: calls at independent phases
        if t.bare:
            for cl in t.clients:
                cl.send_frame(b"%d" % per_call)
        for g in range(0 if t.bare else groups):
            async with r.pipeline(transaction=False) as p:
                for f in fields[g::groups]:
                    p.xadd(cmds, f)
                await p.execute()
            await asyncio.sleep(CHUNK_S / groups)
        deadline = time.monotonic() + utterance_s + 10
        while any(len(a) < per_call for a in t.arrivals) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)   # past the last utterance's end: its finished report is out
        c1 = t.proc.cpu_times()
        if not measure:
            continue
        if not t.bare:
            t.wakes += await asyncio.to_thread(_metric, t.port, TICKS) - w0
        cpu = (c1.user + c1.system) - (c0.user + c0.system)
        got = sum(len(a) for a in t.arrivals)
        t.missing += k * per_call - got
        t.cpu_s += cpu
        t.user_s += c1.user - c0.user
        t.chunks += got
        t.call_s += k * len(pcm) / (2 * rate)
        t.slices.append(cpu / max(1, got) * 1e6)
        for a in t.arrivals:
            if not a or t.bare:
                continue
            offsets = [at - j * CHUNK_S for j, at in enumerate(a)]
            steady = offsets[STEADY_FROM:]
            if steady:
                first = min(steady)
                t.jitter += [o - first for o in steady]
            t.headroom += [a[0] - o for o in offsets[STEADY_FROM:]]
    for t in targets:
        await asyncio.gather(*(cl.close() for cl in t.clients))
    await r.aclose()


def main_speaking(args) -> int:
    """``--speaking K``: the working tree's playout against revision ``--compare-rev``."""
    import uvloop

    from piopiy_voice.redisconn import EmbeddedRedis

    k, rev = args.speaking, args.compare_rev or "HEAD"
    print(f"{_machine()}; {k} speaking calls per gateway at {args.rate} Hz, {args.utterance:g} s utterances, "
          f"{args.seconds:g} s measured per gateway, slices alternating")
    redis = EmbeddedRedis()
    targets: list[Speaker] = []
    try:
        for label, gid, port, proc in _tree_and_rev_gateways(rev, redis.url, ("bench-tree", "bench-rev")):
            targets.append(Speaker(label, gid, port, proc))
        bare = _child([sys.executable, __file__, "--serve-bare-sender", "--rate", str(args.rate)],
                      stderr=None)
        try:
            targets.append(Speaker("bare sender (floor)", "bare", int(bare.stdout.readline()),
                                   bare, bare=True))
        except (ValueError, OSError):
            _stop(bare)
            raise
        uvloop.run(_speak(targets, redis.url, k, args.rate, args.seconds, args.utterance))
    finally:
        for t in targets:
            _stop(t.popen)
        redis.close()

    per = {}
    for t in targets:
        us = per[t.label] = t.cpu_s / max(1, t.chunks) * 1e6
        sl = sorted(t.slices)
        jit, head = sorted(t.jitter), sorted(t.headroom)
        print(f"{t.label:<28}: {us:6.1f} us CPU per outbound chunk "
              f"(user {t.user_s / max(1, t.chunks) * 1e6:.1f}), "
              f"{t.cpu_s / t.call_s * 1e3:6.3f} ms CPU per speaking call-second "
              f"({t.chunks} chunks, {len(sl)} slices: min {sl[0]:.1f} median "
              f"{statistics.median(sl):.1f} max {sl[-1]:.1f} us/chunk; {t.missing} chunks missing)")
        if t.bare:
            continue
        print(f"{'':<28}  pacing: jitter p50 {_pct(jit, .5) * 1e3:.1f} ms, "
              f"p99 {_pct(jit, .99) * 1e3:.1f} ms, "
              f"max {jit[-1] * 1e3:.1f} ms; headroom min {head[0] * 1e3:.1f} ms, "
              f"p1 {_pct(head, .01) * 1e3:.1f} ms, p50 {_pct(head, .5) * 1e3:.1f} ms")
    new, old, floor = (per[t.label] for t in targets)
    print(f"ratio working tree / {rev:<9}: {new / old:.3f}x CPU per chunk "
          f"({new - old:+.1f} us per chunk); above the bare sender: {new - floor:.1f} us "
          f"vs {old - floor:.1f} us per chunk ({(new - floor) / (old - floor):.3f}x)")
    for t in targets:
        if t.wakes == t.wakes and not t.bare:  # nan: this code has no playout tick
            print(f"{t.label:<28}: {t.wakes:.0f} playout tick wakes in the measured slices, "
                  f"{t.chunks / max(1.0, t.wakes):.1f} chunks per wake, "
                  f"{t.wakes / (t.call_s / k):.1f} wakes per second of playout")
    la = os.getloadavg()
    print(f"load avg after run          : {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}")
    return 0 if all(t.missing == 0 for t in targets) else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rate", type=int, default=8000, choices=(8000, 16000))
    ap.add_argument("--listeners", type=int, default=0, metavar="K",
                    help="also measure the gateway while an API process streams K of its calls "
                         "to K listen sockets (two phases alternating on the same gateway)")
    ap.add_argument("--cluster", action="store_true",
                    help="write to a local Redis Cluster (3 primaries + replicas) instead of one redis-server")
    ap.add_argument("--speaking", type=int, default=0, metavar="K",
                    help="outbound mode: K calls kept speaking by PlayAudio commands on the working "
                         "tree's gateway and on --compare-rev's, slices alternating")
    ap.add_argument("--compare-rev", metavar="REV",
                    help="the git revision to compare the working tree's gateway against, side by "
                         "side (with --speaking: default HEAD; without: the inbound side)")
    ap.add_argument("--utterance", type=float, default=3.0,
                    help="with --speaking: seconds of audio per PlayAudio (one per call per slice)")
    ap.add_argument("--serve-bare", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--serve-bare-sender", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--serve-listeners", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_bare:
        serve_bare()
        return 0
    if args.serve_bare_sender:
        serve_bare_sender(args.rate)
        return 0
    if args.serve_listeners:
        serve_listeners()
        return 0
    if args.speaking:
        return main_speaking(args)
    if not 0 <= args.listeners <= args.calls:
        ap.error("--listeners must be between 0 and --calls")
    if args.listeners:
        return main_listeners(args)
    if args.compare_rev:
        return main_inbound_compare(args)
    import uvloop

    from piopiy_voice.redisconn import EmbeddedRedis, connect
    from piopiy_voice.signing import sign_stream_url

    print(f"{_machine()}; {args.calls} calls x {args.seconds:g} s at {args.rate} Hz, 20 ms frames")
    me = psutil.Process()
    bare = _child([sys.executable, __file__, "--serve-bare"], stderr=None)
    if args.cluster:
        sys.path.insert(0, str(ROOT / "tests"))  # the tests' cluster launcher
        from cluster_support import LocalCluster

        redis = LocalCluster()
        rprocs = [psutil.Process(proc.pid) for proc in redis.procs.values()]
    else:
        redis = EmbeddedRedis()
        rprocs = [psutil.Process(redis.proc.pid)]
    env = dict(os.environ, REDIS_URL=redis.url, PV_SIGNING_SECRET=SECRET, PV_LOG_LEVEL="INFO",
               PYTHONPATH=str(ROOT))
    gw = _child([sys.executable, "-m", "piopiy_voice.gateway.server", "--port", "0", "--gateway-id", "bench"],
                env=env, stdout=subprocess.DEVNULL)
    try:
        bport = int(bare.stdout.readline())
        gport = _wait_port(gw.stderr, r"listening on 127\.0\.0\.1:(\d+)")
        gproc = psutil.Process(gw.pid)
        time.sleep(0.5)
        rss0 = gproc.memory_info().rss
        rc0 = sum(sum(rp.cpu_times()[:2]) for rp in rprocs)
        ids = [f"bench-{i}" for i in range(args.calls)]
        gpaths = [sign_stream_url(f"ws://127.0.0.1:{gport}", cid, SECRET,
                                  params={"rate": str(args.rate), "mode": "callee"})
                  .split(f":{gport}", 1)[1] for cid in ids]
        b = Target("bare", bport, [f"/x/{i}" for i in range(args.calls)], psutil.Process(bare.pid))
        g = Target("gateway", gport, gpaths, gproc)
        c0 = sum(me.cpu_times()[:2])
        uvloop.run(drive([b, g], args.seconds, args.rate))
        gen_cpu = sum(me.cpu_times()[:2]) - c0
        redis_cpu = sum(sum(rp.cpu_times()[:2]) for rp in rprocs) - rc0
        bare.terminate()
        out, _ = bare.communicate(timeout=10)
        bare_lat = [float(x) for x in out.split()[-3:]] if out.strip() else None
        lat, audio = _read_back(connect(redis.url), ids)
    finally:
        _stop(bare)
        _stop(gw)
        redis.close()

    if os.environ.get("BENCH_LAT_TRACE") and lat:
        t_first = min(t for t, _ in lat)
        per_s: dict[int, list[float]] = {}
        for t, v in lat:
            per_s.setdefault(int(t - t_first), []).append(v)
        for sec, vs in sorted(per_s.items()):
            vs.sort()
            print(f"  t={sec:3d}s n={len(vs)} p50={vs[len(vs)//2]:.1f} p99={vs[int(len(vs)*.99)-1]:.1f}")
    lat_v = sorted(v for _, v in lat)
    p50 = statistics.median(lat_v) if lat_v else float("nan")
    p99 = lat_v[int(len(lat_v) * 0.99) - 1] if lat_v else float("nan")
    lost = g.sent - audio
    bus, gus = b.cpu_s / b.window_frames * 1e6, g.cpu_s / g.window_frames * 1e6
    print(f"bare uvloop receiver : {bus:6.1f} us CPU/frame "
          f"(user {b.user_s / b.window_frames * 1e6:.1f}; {b.window_frames} frames measured)")
    print(f"gateway              : {gus:6.1f} us CPU/frame "
          f"(user {g.user_s / g.window_frames * 1e6:.1f}; {g.window_frames} frames measured)  "
          f"ratio {gus / bus:.2f}x  (target <= 1.5x)")
    if bare_lat:
        print(f"bare receiver latency: p50 {bare_lat[0]:.1f} ms, p99 {bare_lat[1]:.1f} ms, "
              f"max {bare_lat[2]:.1f} ms (sent -> received, every 32nd frame: what the machine adds)")
    print(f"load generator       : {gen_cpu / (b.sent + g.sent) * 1e6:6.1f} us CPU/frame; worst "
          f"tick lateness {b.late * 1000:.1f} ms (bare) / {g.late * 1000:.1f} ms (gateway slices)")
    print(f"redis-server         : {redis_cpu / g.sent * 1e6:6.1f} us CPU/gateway frame (whole run)")
    if lat_v:
        print(f"latency sent->Redis  : p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {lat_v[-1]:.1f} ms "
              f"(stream-id ms resolution, floored; target p99 < 10 ms)")
    print(f"frames lost          : {lost} of {g.sent} sent to the gateway")
    print(f"memory per call      : {(g.rss_end - rss0) / args.calls / 1024:.1f} KiB "
          f"(gateway RSS {rss0 / 2**20:.1f} -> {g.rss_end / 2**20:.1f} MiB)")
    print(f"load avg after run   : {os.getloadavg()[0]:.2f}")
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
