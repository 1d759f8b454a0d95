"""API role benchmark: listen latency at N listened calls, and requests per second
of the list and control endpoints. Loopback only, bounded (well under 2 minutes).

Listen latency: frames are written straight into each call's Redis stream the
way the gateway does (``contracts.audio_fields``), one per call every 20 ms; the
first samples of each frame carry (call index, frame number), so the left
channel of the listen socket says which frame came out and when: latency =
time out of the socket - time of the XADD. Control: a stand-in gateway (a
reader of its command stream answering each command ``applied`` into the
``reply_to`` stream, as the real gateway does) isolates the API from the media
path. Usage: ``python bench/api_bench.py [--calls 50] [--seconds 20]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import numpy as np
import websockets

from piopiy_voice import callrecord, keys
from piopiy_voice import contracts as c
from piopiy_voice.api import auth
from piopiy_voice.redisconn import EmbeddedRedis, connect, free_port

GW = "bench-gw"


def fake_gateway(url: str, stop: threading.Event) -> None:
    r = connect(url)
    key = keys.gateway_commands(GW)
    last = "$"
    while not stop.is_set():
        got = r.xread({key: last}, count=100, block=200)
        for _k, entries in got or ():
            for eid, fields in entries:
                last = eid
                cmd = c.decode(fields)
                if cmd.reply_to:
                    res = c.CommandResult(call_id=cmd.call_id, command_id=cmd.command_id, command=cmd.type,
                                          status="applied", gateway_id=GW)
                    r.xadd(cmd.reply_to, c.encode(res), maxlen=10)


async def listen_latency(base_ws: str, key: str, r, n_calls: int, seconds: float) -> list[float]:
    sent: dict[tuple[int, int], float] = {}
    lat: list[float] = []

    async def listener(i: int, cid: str) -> None:
        async with websockets.connect(f"{base_ws}/calls/{cid}/listen",
                                      additional_headers={"Authorization": f"Bearer {key}"}) as ws:
            async for msg in ws:
                if isinstance(msg, bytes):
                    left = np.frombuffer(msg, "<i2")[0::2]
                    t = sent.get((int(left[0]), int(left[1])))
                    if t is not None:
                        lat.append(time.perf_counter() - t)
    cids = [f"bench-{i}" for i in range(n_calls)]
    tasks = [asyncio.create_task(listener(i, cid)) for i, cid in enumerate(cids)]
    await asyncio.sleep(2.0)   # sockets up, hubs reading
    frame = np.zeros(160, dtype="<i2")
    start = time.perf_counter()
    n = 0
    while time.perf_counter() - start < seconds:
        n += 1
        with r.pipeline(transaction=False) as pipe:
            for i, cid in enumerate(cids):
                frame[0], frame[1] = i, n % 30000
                pipe.xadd(keys.call_stream(cid), c.audio_fields(cid, n, frame.tobytes()), maxlen=3000)
            now = time.perf_counter()
            for i in range(n_calls):
                sent[(i, n % 30000)] = now
            await asyncio.to_thread(pipe.execute)
        await asyncio.sleep(max(0.0, start + n * 0.02 - time.perf_counter()))
    await asyncio.sleep(0.5)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return lat


def rps(url: str, key: str, method: str, body: dict | None, seconds: float, concurrency: int = 8) -> float:
    async def run() -> int:
        done = 0
        stop_at = time.perf_counter() + seconds
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=10) as client:
            async def worker():
                nonlocal done
                while time.perf_counter() < stop_at:
                    resp = await client.request(method, url, json=body)
                    assert resp.status_code == 200, resp.text
                    done += 1
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done
    return asyncio.run(run()) / seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rps-seconds", type=float, default=8.0)
    args = ap.parse_args()
    redis = EmbeddedRedis()
    r = connect(redis.url)
    port = free_port()
    stop = threading.Event()
    env = dict(os.environ, REDIS_URL=redis.url, PV_API_PORT=str(port), PV_LOG_LEVEL="WARNING",
               PV_SIGNING_SECRET="bench-secret-0123456789")
    api = subprocess.Popen([sys.executable, "-m", "piopiy_voice.api"], env=env, cwd=tempfile.gettempdir(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("API did not start")
            time.sleep(0.1)
        _, key = auth.create_key(r, "read,listen,control")
        with r.pipeline() as pipe:
            for i in range(args.calls):
                callrecord.set_state(pipe, f"bench-{i}", "live", gateway_id=GW, rate=8000, listen_mode="both",
                                     owner="bench-worker")
                pipe.xadd(keys.CALLS_STREAM, {"type": "call.started", "call_id": f"bench-{i}"})
            pipe.execute()
        gw = threading.Thread(target=fake_gateway, args=(redis.url, stop), daemon=True)
        gw.start()
        api_cpu0 = _cpu(api.pid)
        lat = asyncio.run(listen_latency(f"ws://127.0.0.1:{port}", key, r, args.calls, args.seconds))
        api_cpu = _cpu(api.pid) - api_cpu0
        expected = args.calls * args.seconds / 0.02
        lat_ms = np.array(lat) * 1000
        print(f"listen: {args.calls} calls listened, {len(lat)} frames out of ~{expected:.0f} written, "
              f"latency p50 {np.percentile(lat_ms, 50):.1f} ms, p99 {np.percentile(lat_ms, 99):.1f} ms, "
              f"max {lat_ms.max():.1f} ms; API CPU {api_cpu / args.seconds * 100:.0f}% of one core "
              f"({api_cpu / max(len(lat), 1) * 1e6:.0f} us per frame out)")
        list_rps = rps(base + "/calls", key, "GET", None, args.rps_seconds)
        print(f"GET /calls ({args.calls} live calls): {list_rps:.0f} requests/s (8 concurrent clients)")
        ctl_rps = rps(f"{base}/calls/bench-0/control", key, "POST", {"action": "interrupt"}, args.rps_seconds)
        print(f"POST /calls/{{id}}/control (stand-in gateway answering): {ctl_rps:.0f} requests/s "
              f"(8 concurrent clients)")
    finally:
        stop.set()
        api.terminate()
        api.wait(10)
        redis.close()
    return 0


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    sys.exit(main())
