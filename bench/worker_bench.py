"""Worker benchmark: one worker process, N concurrent simulated calls in real time.

    .venv/bin/python bench/worker_bench.py [--calls 200] [--seconds 30] [--rate 8000]

Starts a private redis-server (or uses REDIS_URL), one ``piopiy-voice worker``
process with the DefaultAgent (VAD + DTMF on every frame) and a feeder that
XADDs one 20 ms frame per call every 20 ms, like the gateway: speech-like
bursts, silence and the odd DTMF key. After a warm-up it measures, over the
window, the stream lag (worker's clock at processing minus the entry id's
time, exact quantiles from the worker's ``/lag``) and the worker's CPU time per
frame (from /proc). Prints one summary; exits 1 if p99 >= 100 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from piopiy_voice import contracts as c  # noqa: E402
from piopiy_voice import keys  # noqa: E402
from piopiy_voice.audio import dtmf_tone, frame_bytes, silence, speech_like  # noqa: E402
from piopiy_voice.redisconn import EmbeddedRedis, connect, free_port  # noqa: E402


def _script(i: int, rate: int) -> list[bytes]:
    """A 12 s looped caller: silence, talk, silence, a key, talk (no handoff/pause key)."""
    pcm = (silence(1000 + 37 * (i % 20), rate) + speech_like(1500, rate=rate, seed=i)
           + silence(2500, rate) + dtmf_tone("5", 100, rate=rate) + silence(900, rate)
           + speech_like(2000, rate=rate, seed=i + 1000) + silence(3000, rate))
    fb = frame_bytes(rate)
    return [pcm[k:k + fb] for k in range(0, len(pcm) - fb + 1, fb)]


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        parts = fh.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")


def _lag(port: int, reset: bool = False) -> dict:
    url = f"http://127.0.0.1:{port}/lag" + ("?reset=1" if reset else "")
    return json.loads(urllib.request.urlopen(url, timeout=5).read())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=30.0, help="measured window")
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--rate", type=int, default=8000, choices=(8000, 16000, 32000))
    ap.add_argument("--agent", help="agent class 'package.module:Class' (default: the worker's)")
    ap.add_argument("--profile", metavar="FILE", help="run the worker under cProfile, stats to FILE")
    args = ap.parse_args(argv)

    server = None
    url = os.environ.get("REDIS_URL")
    if not url:
        server = EmbeddedRedis()
        url = server.url
    r = connect(url)
    if server is None:
        print(f"using REDIS_URL={url} (keys of pv:* are written)")
    port = free_port()
    env = dict(os.environ, REDIS_URL=url, PV_LOG_LEVEL="WARNING",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               PV_SILENCE_TIMEOUT_S="30")
    worker = subprocess.Popen(
        [sys.executable, *(["-m", "cProfile", "-o", args.profile] if args.profile else []),
         "-m", "piopiy_voice.workers.runner", "--worker-id", "bench-w1", "--metrics-port",
         str(port), *(["--agent", args.agent] if args.agent else [])], env=env, cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                _lag(port)
                break
            except OSError:
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise SystemExit("worker did not start")
                time.sleep(0.1)
        scripts = [_script(i, args.rate) for i in range(args.calls)]
        ids = [f"bench-{os.getpid()}-{i}" for i in range(args.calls)]
        seqs = [0] * args.calls
        pipe = r.pipeline(transaction=False)
        for i, cid in enumerate(ids):
            seqs[i] += 1
            f = c.encode(c.CallStarted(call_id=cid, seq=seqs[i], gateway_id="bench-gw", rate=args.rate))
            pipe.xadd(keys.call_stream(cid), f)
            pipe.xadd(keys.CALLS_STREAM, f)
        pipe.execute()
        streams = [keys.call_stream(cid) for cid in ids]
        t0 = time.monotonic()
        total = args.warmup + args.seconds
        sent = 0
        tick = 0
        measuring = False
        cpu0 = frames0 = 0.0
        late_ticks = 0
        while True:
            now = time.monotonic() - t0
            if not measuring and now >= args.warmup:
                lag0 = _lag(port, reset=True)
                cpu0, frames0, measuring = _cpu_s(worker.pid), lag0.get("entries_total", 0), True
                tw0 = time.monotonic()
            if now >= total:
                break
            due = int(now / 0.02) + 1
            if due - tick > 2:
                late_ticks += 1
            while tick < due:
                for i in range(args.calls):
                    seqs[i] += 1
                    frame = scripts[i][tick % len(scripts[i])]
                    pipe.xadd(streams[i], c.audio_fields(ids[i], seqs[i], frame),
                              maxlen=keys.CALL_STREAM_MAXLEN, approximate=True)
                pipe.execute()
                sent += args.calls
                tick += 1
            time.sleep(max(0.0, t0 + tick * 0.02 - time.monotonic()))
        time.sleep(0.3)  # let the worker drain the last frames
        window = time.monotonic() - tw0
        lag = _lag(port)
        cpu = _cpu_s(worker.pid) - cpu0
        frames = lag["entries_total"] - frames0
        owned = r.zcard(keys.WORKERS_ZSET)
        cmds = r.xlen(keys.gateway_commands("bench-gw"))
        print(f"worker bench: {args.calls} calls @ {args.rate} Hz, {args.seconds:.0f} s window "
              f"(+{args.warmup:.0f} s warm-up), 1 worker process")
        print(f"  frames fed {sent}, processed in window {frames:.0f} "
              f"({frames / window:.0f}/s), commands published {cmds}, workers alive {owned}")
        print(f"  stream lag ms: p50 {lag['p50'] * 1000:.1f}  p90 {lag['p90'] * 1000:.1f}  "
              f"p99 {lag['p99'] * 1000:.1f}  max {lag['max'] * 1000:.1f}  (n={lag['n']})")
        print(f"  worker CPU: {cpu:.2f} s over {window:.1f} s = {100 * cpu / window:.0f}% of a core, "
              f"{1e6 * cpu / max(frames, 1):.1f} us per frame")
        if late_ticks:
            print(f"  note: the feeder itself fell behind real time on {late_ticks} ticks")
        ok = lag["p99"] < 0.100
        print(f"  target p99 < 100 ms: {'PASS' if ok else 'FAIL'}")
        return 0 if ok else 1
    finally:
        worker.terminate()
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            worker.kill()
        if server:
            server.close()


if __name__ == "__main__":
    sys.exit(main())
