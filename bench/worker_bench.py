"""Worker benchmark: one worker process, N concurrent simulated calls in real time.

    .venv/bin/python bench/worker_bench.py [--calls 200] [--seconds 30] [--rate 8000]
        [--agent SPEC] [--compare SPEC] [--profile FILE]

Starts a private redis-server (or uses REDIS_URL), one ``piopiy-voice worker``
process with the DefaultAgent (VAD + DTMF on every frame) and a feeder that
XADDs one 20 ms frame per call every 20 ms, like the gateway: speech-like
bursts, silence and the odd DTMF key. After a warm-up it measures, over the
window, the stream lag (worker's clock at processing minus the entry id's
time, exact quantiles from the worker's ``/lag``) and the worker's CPU time per
frame (from /proc). Prints one summary; exits 1 if p99 >= 100 ms.

``--compare SPEC`` runs a second worker (agent class SPEC, e.g.
``bench.legacy_agent:BeforeAgent``: the per-frame path before the cost work)
on its own private redis-server at the same time, fed the same frames in the
same feeder turn: both see the same machine, so their CPU per frame compare.
``--compare-rev REV`` runs the second worker on the code of git revision
REV instead (``bench/revtree.py``), same agent: the working tree's loop
against an earlier one's, side by side.
``--cluster`` runs the worker on a private local Redis Cluster (3 primaries,
3 replicas: ``tests/cluster_support.LocalCluster``) and a second, identical
worker on a single private redis-server, fed the same frames side by side:
what reading per node and committing per slot cost against one XREAD.
``--agent-only`` measures the agent classes alone in this process (no Redis,
no worker loop): the agent's own share of the per-frame cost.
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


def agent_cost(specs: list[str], calls: int, rate: int, frames: int = 600) -> dict[str, float]:
    """CPU per frame of each agent class alone (no Redis, no worker): ``calls``
    agents fed the bench's caller script in turn, ``frames`` frames each,
    ``process_time``; the classes alternate twice so both see the same machine."""
    from piopiy_voice.settings import Settings
    from piopiy_voice.workers.agent.base import load_agent_class

    settings = Settings.from_env({**os.environ, "PV_SILENCE_TIMEOUT_S": "30"})
    scripts = [_script(i, rate) for i in range(calls)]
    events = [[c.AudioFrame(call_id=f"cost-{i}", seq=t + 2, pcm=scripts[i][t % len(scripts[i])])
               for t in range(frames)] for i in range(calls)]
    classes = {}
    for spec in specs:
        classes[spec] = load_agent_class(spec)  # as the worker does (finds bench.* from the repo root)
    best: dict[str, float] = {}
    for _ in range(2):
        for spec, cls in classes.items():
            agents = []
            for i in range(calls):
                call = c.CallStarted(call_id=f"cost-{i}", seq=1, gateway_id="g", rate=rate)
                agent = cls(call, settings)
                agent.on_event(call, 0.0)
                agents.append(agent)
            t0 = time.process_time()
            for t in range(frames):
                now = 0.02 * (t + 1)
                for i, agent in enumerate(agents):
                    agent.on_event(events[i][t], now)
            us = (time.process_time() - t0) / (frames * calls) * 1e6
            best[spec] = min(us, best.get(spec, us))
    return best


class Target:
    """One system under test: a private redis-server and one worker process."""

    def __init__(self, label: str, agent: str | None, profile: str | None, url: str | None,
                 code: Path | None = None) -> None:
        self.label = label
        self.server = None
        if not url:
            self.server = EmbeddedRedis()
            url = self.server.url
        self.url = url
        self.r = connect(url)
        self.port = free_port()
        env = dict(os.environ, REDIS_URL=url, PV_LOG_LEVEL="WARNING",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(code) if code else None, str(ROOT),
                                                            os.environ.get("PYTHONPATH")])),
                   PV_SILENCE_TIMEOUT_S="30")
        self.worker = subprocess.Popen(
            [sys.executable, *(["-m", "cProfile", "-o", profile] if profile else []),
             "-m", "piopiy_voice.workers.runner", "--worker-id", "bench-w1", "--metrics-port",
             str(self.port), *(["--agent", agent] if agent else [])], env=env, cwd=ROOT,
        )
        self.pipe = self.r.pipeline(transaction=False)

    def wait_up(self) -> None:
        deadline = time.monotonic() + 15
        while True:
            try:
                _lag(self.port)
                return
            except OSError:
                if time.monotonic() > deadline or self.worker.poll() is not None:
                    raise SystemExit(f"worker ({self.label}) did not start")
                time.sleep(0.1)

    def close(self) -> None:
        self.worker.terminate()
        try:
            self.worker.wait(15)
        except subprocess.TimeoutExpired:
            self.worker.kill()
        if self.server:
            self.server.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=30.0, help="measured window")
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--rate", type=int, default=8000, choices=(8000, 16000, 32000))
    ap.add_argument("--agent", help="agent class 'package.module:Class' (default: the worker's)")
    ap.add_argument("--compare", metavar="AGENT",
                    help="run a second worker with this agent class at the same time, on its own "
                         "redis-server, fed the same frames (e.g. bench.legacy_agent:BeforeAgent)")
    ap.add_argument("--compare-rev", metavar="REV",
                    help="run a second worker on the code of git revision REV, same agent, at the "
                         "same time (e.g. HEAD: the last commit against the working tree)")
    ap.add_argument("--cluster", action="store_true",
                    help="the worker on a local Redis Cluster, side by side with one on a single redis-server")
    ap.add_argument("--profile", metavar="FILE", help="run the worker under cProfile, stats to FILE")
    ap.add_argument("--agent-only", action="store_true",
                    help="no Redis, no worker: CPU per frame of the agent (and --compare) alone")
    args = ap.parse_args(argv)

    if args.agent_only:
        specs = [args.agent or "piopiy_voice.workers.agent.default:DefaultAgent"]
        specs += [args.compare] if args.compare else []
        cost = agent_cost(specs, min(args.calls, 20), args.rate)
        print(f"agent alone, {min(args.calls, 20)} calls x 600 frames @ {args.rate} Hz, the caller "
              f"script above (best of 2, process_time; load average {os.getloadavg()[0]:.2f}):")
        for spec, us in cost.items():
            print(f"  {spec}: {us:.1f} us per frame")
        if len(cost) == 2:
            a, b = cost.values()
            print(f"  ratio {specs[0]} / {specs[1]}: {a / b:.2f}x")
        return 0

    url = os.environ.get("REDIS_URL")
    if sum(map(bool, (args.compare, args.compare_rev, args.cluster))) > 1:
        raise SystemExit("--compare, --compare-rev, --cluster: one at a time")
    cluster = None
    if args.cluster:
        if url:
            raise SystemExit("--cluster starts its own cluster: unset REDIS_URL")
        sys.path.insert(0, str(ROOT / "tests"))  # the tests' cluster launcher
        from cluster_support import LocalCluster

        cluster = LocalCluster()
        url = cluster.url
    if url and (args.compare or args.compare_rev) and not cluster:
        raise SystemExit("--compare needs private redis-servers: unset REDIS_URL")
    if url:
        print(f"using REDIS_URL={url} (keys of pv:* are written)")
    targets = [Target(args.agent or "default agent", args.agent, args.profile, url)]
    try:
        if cluster is not None:
            targets[0].label = "cluster, 3 primaries"
            targets.append(Target("single redis-server", args.agent, None, None))
        elif args.compare:
            targets.append(Target(args.compare, args.compare, None, None))
        elif args.compare_rev:
            from revtree import package_root

            targets[0].label = "working tree"
            targets.append(Target(f"revision {args.compare_rev}", args.agent, None, None,
                                  code=package_root(args.compare_rev)))
        for t in targets:
            t.wait_up()
        scripts = [_script(i, args.rate) for i in range(args.calls)]
        ids = [f"bench-{os.getpid()}-{i}" for i in range(args.calls)]
        seqs = [0] * args.calls
        for i, cid in enumerate(ids):
            seqs[i] += 1
            f = c.encode(c.CallStarted(call_id=cid, seq=seqs[i], gateway_id="bench-gw", rate=args.rate))
            for t in targets:
                t.pipe.xadd(keys.call_stream(cid), f)
                t.pipe.xadd(keys.CALLS_STREAM, f)
        for t in targets:
            t.pipe.execute()
        streams = [keys.call_stream(cid) for cid in ids]
        load0 = os.getloadavg()
        t0 = time.monotonic()
        total = args.warmup + args.seconds
        sent = 0
        tick = 0
        measuring = False
        late_ticks = 0
        base: dict[str, tuple[float, float]] = {}
        while True:
            now = time.monotonic() - t0
            if not measuring and now >= args.warmup:
                for t in targets:
                    lag0 = _lag(t.port, reset=True)
                    base[t.label] = (_cpu_s(t.worker.pid), lag0.get("entries_total", 0))
                measuring = True
                tw0 = time.monotonic()
            if now >= total:
                break
            due = int(now / 0.02) + 1
            if due - tick > 2:
                late_ticks += 1
            while tick < due:
                for i in range(args.calls):
                    seqs[i] += 1
                    fields = c.audio_fields(ids[i], seqs[i], scripts[i][tick % len(scripts[i])])
                    for t in targets:
                        t.pipe.xadd(streams[i], fields, maxlen=keys.CALL_STREAM_MAXLEN, approximate=True)
                for t in targets:
                    t.pipe.execute()
                sent += args.calls
                tick += 1
            time.sleep(max(0.0, t0 + tick * 0.02 - time.monotonic()))
        time.sleep(0.3)  # let the workers drain the last frames
        window = time.monotonic() - tw0
        print(f"worker bench: {args.calls} calls @ {args.rate} Hz, {args.seconds:.0f} s window "
              f"(+{args.warmup:.0f} s warm-up), {len(targets)} worker process(es) fed the same "
              f"frames at the same time; load average before {load0[0]:.2f}, "
              f"after {os.getloadavg()[0]:.2f}")
        ok = True
        per_frame = {}
        for t in targets:
            lag = _lag(t.port)
            cpu0, frames0 = base[t.label]
            cpu = _cpu_s(t.worker.pid) - cpu0
            frames = lag["entries_total"] - frames0
            owned = t.r.zcard(keys.WORKERS_ZSET)
            cmds = t.r.xlen(keys.gateway_commands("bench-gw"))
            per_frame[t.label] = 1e6 * cpu / max(frames, 1)
            print(f"[{t.label}]")
            print(f"  frames fed {sent}, processed in window {frames:.0f} "
                  f"({frames / window:.0f}/s), commands published {cmds}, workers alive {owned}")
            print(f"  stream lag ms: p50 {lag['p50'] * 1000:.1f}  p90 {lag['p90'] * 1000:.1f}  "
                  f"p99 {lag['p99'] * 1000:.1f}  max {lag['max'] * 1000:.1f}  (n={lag['n']})")
            print(f"  worker CPU: {cpu:.2f} s over {window:.1f} s = {100 * cpu / window:.0f}% of a core, "
                  f"{per_frame[t.label]:.1f} us per frame")
            ok = ok and lag["p99"] < 0.100
        if len(targets) == 2:
            a, b = (per_frame[t.label] for t in targets)
            print(f"  CPU per frame {targets[0].label} / {targets[1].label}: {a / b:.2f}x")
        if late_ticks:
            print(f"  note: the feeder itself fell behind real time on {late_ticks} ticks")
        print(f"  target p99 < 100 ms: {'PASS' if ok else 'FAIL'}")
        return 0 if ok else 1
    finally:
        for t in targets:
            t.close()
        if cluster is not None:
            cluster.close()


if __name__ == "__main__":
    sys.exit(main())
