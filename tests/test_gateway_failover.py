"""A gateway dies (SIGKILL) mid-call and the platform reconnects to another replica:
the call goes on. The new gateway continues the call's sequence numbers (workers
would otherwise drop its entries as duplicates) and the worker sends its commands
to the gateway now holding the socket. Real processes: two gateways, one worker;
a websockets client plays the platform."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
from urllib.parse import urlsplit

import pytest
from websockets.asyncio.client import connect as ws_connect

from piopiy_voice import keys
from piopiy_voice.audio import silence, speech_like
from piopiy_voice.contracts import decode
from piopiy_voice.redisconn import free_port
from piopiy_voice.signing import sign_stream_url

pytestmark = pytest.mark.integration

SECRET = "failover-test-secret"
FRAME = 320  # 20 ms at 8 kHz


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def _wait(pred, timeout: float, what: str, procs) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"a process exited while waiting for {what}: {p.args}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def roles(subprocess_env, r, tmp_path):
    env = dict(subprocess_env, PV_SIGNING_SECRET=SECRET, PV_DRAIN_GRACE_S="1")
    ports = {"A": free_port(), "B": free_port()}
    metrics_port = free_port()
    procs = {}
    logs = []

    def start(name, argv, extra):
        log = open(tmp_path / f"{name}.log", "wb")
        logs.append(log)
        procs[name] = subprocess.Popen([sys.executable, "-m", "piopiy_voice.cli", *argv],
                                       env=dict(env, **extra), stdout=log, stderr=subprocess.STDOUT)

    for gw, port in ports.items():
        start(f"gw{gw}", ["gateway"], {"PV_GATEWAY_ID": f"gw-{gw}", "PV_GATEWAY_PORT": str(port)})
    start("worker", ["worker", "--metrics-port", str(metrics_port)], {"PV_WORKER_ID": "w1"})
    try:
        for gw, port in ports.items():
            _wait(lambda p=port: _ready(f"http://127.0.0.1:{p}/readyz"), 30, f"gateway {gw}",
                  procs.values())
        _wait(lambda: _ready(f"http://127.0.0.1:{metrics_port}/metrics"), 30, "worker", procs.values())
        yield ports, procs
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in logs:
            log.close()


async def _stream(ws, pcm: bytes, stop: asyncio.Event) -> None:
    """Send ``pcm`` in 20 ms frames in real time, then silence until ``stop``."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    i = 0
    while not stop.is_set():
        chunk = pcm[i * FRAME:(i + 1) * FRAME] or silence(20, 8000)
        try:
            await ws.send(chunk)
        except Exception:  # noqa: BLE001 - the socket went away: stop sending
            return
        i += 1
        await asyncio.sleep(max(0.0, t0 + i * 0.02 - loop.time()))


async def _first_message(ws, timeout: float) -> dict | list:
    msg = await asyncio.wait_for(ws.recv(), timeout)
    return json.loads(msg)


def test_call_survives_its_gateway_dying(roles, r):
    ports, procs = roles
    cid = "failover-1"
    url_a = sign_stream_url(f"ws://127.0.0.1:{ports['A']}", cid, SECRET, params={"rate": "8000", "mode": "both"})
    path = urlsplit(url_a)
    url_b = f"ws://127.0.0.1:{ports['B']}{path.path}?{path.query}"

    async def platform():
        # 1. The call starts on gateway A; the worker's greeting arrives there.
        stop_a = asyncio.Event()
        ws_a = await ws_connect(url_a, compression=None)
        sender = asyncio.create_task(_stream(ws_a, b"", stop_a))
        greeting = await _first_message(ws_a, 15)
        assert greeting["type"] == "streamAudio"
        await asyncio.sleep(0.5)
        # 2. Gateway A dies without a goodbye; the platform reconnects to B.
        procs["gwA"].send_signal(signal.SIGKILL)
        procs["gwA"].wait(5)
        stop_a.set()
        await sender
        await ws_a.close()
        stop_b = asyncio.Event()
        ws_b = await ws_connect(url_b, compression=None)
        sender = asyncio.create_task(_stream(ws_b, speech_like(1500, seed=3), stop_b))
        # 3. The caller speaks on B: the worker's decision (barge-in break and/or
        # an answer) must reach B's socket.
        got = await _first_message(ws_b, 15)
        stop_b.set()
        await sender
        await ws_b.close()
        return got

    got = asyncio.run(asyncio.wait_for(platform(), 60))
    assert got == {"action": "break"} or got.get("type") == "streamAudio", got

    # The record follows the socket and B's entries continue A's sequence.
    assert r.hget(keys.call_meta(cid), "gateway_id") == b"gw-B"
    starts = [decode(f) for _, f in r.xrange(keys.call_stream(cid)) if f[b"type"] == b"call.started"]
    assert [s.gateway_id for s in starts] == ["gw-A", "gw-B"]
    seqs = [int(f[b"seq"]) for _, f in r.xrange(keys.call_stream(cid))]
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs)), "seq must keep increasing across gateways"
    events = [f[b"event"].decode() for _, f in r.xrange(keys.call_timeline(cid))]
    assert "socket.moved" in events
