"""Gateway load benchmark: N concurrent calls of 20 ms frames in real time.

    .venv/bin/python bench/gateway_bench.py [--calls 300] [--seconds 20] [--rate 8000]

Runs, in one invocation and one after the other on the same machine:
1. a bare websockets receiver on uvloop (no Redis, no parsing: ``async for
   msg in ws: pass``) in its own subprocess;
2. the gateway (``python -m gateway.server``) in its own subprocess, writing to a
   private redis-server started for the run.
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
sys.path.insert(0, str(ROOT))

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


# ---------------------------------------------------------- load generator
class RawClient(asyncio.Protocol):
    """Minimal WebSocket client: handshake, send pre-framed binary, answer pings."""

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
            if op == 0x9:  # ping -> pong
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


async def drive(port: int, paths: list[str], seconds: float, rate: int, proc: psutil.Process,
                warmup: float = 2.0) -> dict:
    loop = asyncio.get_running_loop()
    clients: list[RawClient] = []
    sem = asyncio.Semaphore(20)

    async def open_one(path):
        async with sem:
            _, cl = await loop.create_connection(lambda: RawClient(f"127.0.0.1:{port}", path),
                                                 "127.0.0.1", port)
            await asyncio.wait_for(cl.ready, 10)
            return cl

    clients = list(await asyncio.gather(*(open_one(p) for p in paths)))
    rss_conn = proc.memory_info().rss
    frame_len = rate * 2 // 50
    body = bytes(range(256)) * (frame_len // 256 + 1)
    body = body[8:frame_len]
    groups = 10  # calls are staggered over the 20 ms tick in 10 groups
    sent = 0
    window = {}
    start = loop.time() + 0.05
    end = start + warmup + seconds
    tick = 0
    cpu0 = None
    late = 0.0
    while True:
        now = loop.time()
        t_tick = start + tick * 0.002
        if t_tick > end:
            break
        if t_tick > now:
            await asyncio.sleep(t_tick - now)
        elif cpu0 is not None:
            late = max(late, now - t_tick)
        if cpu0 is None and t_tick >= start + warmup:
            c = proc.cpu_times()
            cpu0 = c.user + c.system
            window["sent0"] = sent
        g = tick % groups
        ts = struct.pack("<d", time.time())
        payload = ts + body
        for cl in clients[g::groups]:
            cl.send_frame(payload)
        sent += len(clients[g::groups])
        tick += 1
    await asyncio.sleep(0.2)  # let the target finish the last frames
    c = proc.cpu_times()
    cpu1 = c.user + c.system
    frames_window = sent - window["sent0"]
    rss_end = proc.memory_info().rss
    await asyncio.gather(*(cl.close() for cl in clients))
    return {
        "sent": sent, "window_frames": frames_window, "cpu_s": cpu1 - cpu0,
        "cpu_us_per_frame": (cpu1 - cpu0) / frames_window * 1e6,
        "rss_connected": rss_conn, "rss_end": rss_end, "late_ms": late * 1000,
    }


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rate", type=int, default=8000, choices=(8000, 16000))
    ap.add_argument("--serve-bare", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_bare:
        serve_bare()
        return 0
    import uvloop

    from shared import keys
    from shared.redisconn import EmbeddedRedis, connect
    from shared.signing import sign_stream_url

    print(f"machine: {os.cpu_count()} cpus, load avg {os.getloadavg()[0]:.2f}; "
          f"{args.calls} calls x {args.seconds:g} s at {args.rate} Hz, 20 ms frames")
    results = {}

    # 1. bare uvloop receiver
    bare = _child([sys.executable, __file__, "--serve-bare"], stderr=None)
    me = psutil.Process()
    try:
        port = int(bare.stdout.readline())
        paths = [f"/x/{i}" for i in range(args.calls)]
        c0 = sum(me.cpu_times()[:2])
        results["bare"] = uvloop.run(drive(port, paths, args.seconds, args.rate,
                                           psutil.Process(bare.pid)))
        results["bare"]["gen_cpu_s"] = sum(me.cpu_times()[:2]) - c0
        bare.terminate()
        out, _ = bare.communicate(timeout=10)
        results["bare"]["latency"] = [float(x) for x in out.split()[-3:]] if out.strip() else None
    finally:
        _stop(bare)

    # 2. the gateway, on a private redis-server
    redis = EmbeddedRedis()
    env = dict(os.environ, REDIS_URL=redis.url, PV_SIGNING_SECRET=SECRET, PV_LOG_LEVEL="INFO",
               PYTHONPATH=str(ROOT))
    gw = _child([sys.executable, "-m", "gateway.server", "--port", "0", "--gateway-id", "bench"],
                env=env, stdout=subprocess.DEVNULL)
    try:
        port = _wait_port(gw.stderr, r"listening on 127\.0\.0\.1:(\d+)")
        gproc = psutil.Process(gw.pid)
        time.sleep(0.5)
        rss0 = gproc.memory_info().rss
        rproc = psutil.Process(redis.proc.pid)
        rc0 = sum(rproc.cpu_times()[:2])
        ids = [f"bench-{i}" for i in range(args.calls)]
        paths = [sign_stream_url(f"ws://127.0.0.1:{port}", cid, SECRET,
                                 params={"rate": str(args.rate), "mode": "callee"})
                 .split(f":{port}", 1)[1] for cid in ids]
        res = uvloop.run(drive(port, paths, args.seconds, args.rate, gproc))
        res["redis_cpu_s"] = sum(rproc.cpu_times()[:2]) - rc0
        res["rss0"] = rss0
        results["gateway"] = res
        # Let the gateway finish writing the ends of calls, then read everything back.
        client = connect(redis.url)
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
        res["audio_entries"] = audio
        res["latency"] = lat
    finally:
        _stop(gw)
        redis.close()

    b, g = results["bare"], results["gateway"]
    t_first = min(t for t, _ in g["latency"]) if g["latency"] else 0
    if os.environ.get("BENCH_LAT_TRACE"):
        per_s: dict[int, list[float]] = {}
        for t, v in g["latency"]:
            per_s.setdefault(int(t - t_first), []).append(v)
        for sec, vs in sorted(per_s.items()):
            vs.sort()
            print(f"  t={sec:3d}s n={len(vs)} p50={vs[len(vs)//2]:.1f} p99={vs[int(len(vs)*.99)-1]:.1f}")
    lat = sorted(v for _, v in g["latency"])
    p50 = statistics.median(lat) if lat else float("nan")
    p99 = lat[int(len(lat) * 0.99) - 1] if lat else float("nan")
    lost = g["sent"] - g["audio_entries"]
    print(f"bare uvloop receiver : {b['cpu_us_per_frame']:6.1f} us CPU/frame "
          f"({b['window_frames']} frames in window)")
    print(f"gateway              : {g['cpu_us_per_frame']:6.1f} us CPU/frame "
          f"({g['window_frames']} frames in window)  ratio {g['cpu_us_per_frame'] / b['cpu_us_per_frame']:.2f}x"
          f"  (target <= 1.5x)")
    bl = b["latency"]
    if bl:
        print(f"bare receiver latency: p50 {bl[0]:.1f} ms, p99 {bl[1]:.1f} ms, max {bl[2]:.1f} ms "
              "(sent -> received, every 32nd frame: what the machine itself adds)")
    print(f"load generator       : {b['gen_cpu_s'] / b['sent'] * 1e6:6.1f} us CPU/frame; "
          f"worst tick lateness {b['late_ms']:.1f} ms (bare) / {g['late_ms']:.1f} ms (gateway)")
    print(f"redis-server         : {g['redis_cpu_s'] / g['sent'] * 1e6:6.1f} us CPU/frame (whole run)")
    print(f"latency sent->Redis  : p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {lat[-1]:.1f} ms "
          f"(stream-id ms resolution, floored; target p99 < 10 ms)")
    print(f"frames lost          : {lost} of {g['sent']} sent")
    print(f"memory per call      : {(g['rss_end'] - g['rss0']) / args.calls / 1024:.1f} KiB "
          f"(gateway RSS {g['rss0'] / 2**20:.1f} -> {g['rss_end'] / 2**20:.1f} MiB)")
    print(f"load avg after run   : {os.getloadavg()[0]:.2f}")
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
