"""Fault: Redis restarted EMPTY mid-call, with a worker and a transcriber running.

Reproduces issue 12's "workers exit on NOGROUP; live calls lose their agent for
good": a private redis-server (no persistence) is stopped and started again on
the same port. Both roles must survive (never exit), recreate their groups,
and the call -- re-announced by the gateway as it does after an empty restart
(a ``call.started`` on ``pv:calls``) -- must be served again by the same agent
state (its frame count carries on), with its lease and checkpoint recreated.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from piopiy_voice import keys
from piopiy_voice.redisconn import EmbeddedRedis, connect
from piopiy_voice.workers.checkpoint import load
from workers_support import FakeGateway, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
FRAME = b"\x00\x01" * 160


def _texts(gw):
    return [cmd.text for cmd in gw.commands() if cmd.type == "cmd.speak"]


def test_worker_and_transcriber_survive_an_empty_restart_and_serve_the_call_again(subprocess_env):
    server = EmbeddedRedis()
    port, url = server.port, server.url
    env = dict(subprocess_env, REDIS_URL=url, PV_STALE_COMMAND_MS="0", PV_LOG_LEVEL="INFO")
    procs = [
        subprocess.Popen([sys.executable, "-m", "piopiy_voice.workers.runner", "--agent",
                          "workers_support:CountingAgent", "--worker-id", "w1", "--lease-ms", "1500",
                          "--max-seconds", "55"], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL),
        subprocess.Popen([sys.executable, "-m", "piopiy_voice.cli", "transcriber", "--id", "t1",
                          "--lease-ms", "1500", "--max-seconds", "55"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    r = connect(url)
    try:
        wait_for(lambda: r.zscore(keys.WORKERS_ZSET, "w1") and r.zscore(keys.TRANSCRIBERS_ZSET, "t1"),
                 timeout=40, what="worker and transcriber up")
        gw = FakeGateway(r, "rs-1")
        gw.start()
        r.hset(keys.call_meta("rs-1"), mapping={"state": "live", "gateway_id": "gw1"})
        for _ in range(30):
            gw.audio(FRAME)
        wait_for(lambda: len(_texts(gw)) == 3, what="3 commands before the restart")
        wait_for(lambda: r.get(keys.call_asr_lease("rs-1")) == b"t1", what="transcriber owns it")

        r.close()
        server.close()  # Redis gone...
        time.sleep(1.0)
        server = EmbeddedRedis(port=port)  # ...and back, EMPTY
        r = connect(url)
        assert r.dbsize() == 0
        t_restart = time.monotonic()
        # The gateway re-registers its live call (re-announce, same seq counter).
        gw.r = r
        r.hset(keys.call_meta("rs-1"), mapping={"state": "live", "gateway_id": "gw1"})
        gw.start()
        for _ in range(30):
            gw.audio(FRAME)
        # Served again, by the same agent state: frames 40, 50, 60 of the call.
        wait_for(lambda: len(_texts(gw)) == 3, timeout=15, what="commands after the restart")
        served_s = time.monotonic() - t_restart
        assert _texts(gw) == ["40:42", "50:52", "60:62"], _texts(gw)
        for p in procs:
            assert p.poll() is None, "a role exited after Redis restarted empty"
        assert r.get(keys.call_lease("rs-1")) == b"w1"
        wait_for(lambda: load(r, "rs-1") is not None and load(r, "rs-1").state == {"frames": 60},
                 what="checkpoint recreated from memory")
        wait_for(lambda: r.get(keys.call_asr_lease("rs-1")) == b"t1", what="asr lease re-taken")
        # Each role recreates its group on its next group command after the
        # restart (the transcriber may re-take its lease from memory first).
        wait_for(lambda: {keys.WORKERS_GROUP, keys.TRANSCRIBERS_GROUP} <= {
            g["name"].decode() for g in r.xinfo_groups(keys.CALLS_STREAM)}, what="both groups recreated")
        # Each role keeps a start entry pending (a later crash is still taken over).
        wait_for(lambda: r.xpending(keys.CALLS_STREAM, keys.WORKERS_GROUP)["pending"] == 1,
                 what="worker start entry pending")
        wait_for(lambda: r.xpending(keys.CALLS_STREAM, keys.TRANSCRIBERS_GROUP)["pending"] == 1,
                 what="transcriber start entry pending")
        print(f"\nRedis restarted empty: call served again {served_s:.2f}s after the restart")
        gw.end()
        wait_for(lambda: load(r, "rs-1").done, what="call ended")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(15)
        r.close()
        server.close()
