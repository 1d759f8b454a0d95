"""Dialer benchmark: calls placed per second and CPU per call placed, by forking
and in-process dialers, one and two processes, side by side in one run.

    .venv/bin/python bench/dialer_bench.py [--calls 300] [--repeat 1] [--procs 1,2]
        [--modes fork,in-process] [--latency-ms 0] [--limited-rate 40] [--cluster]

Starts a private redis-server (never ``REDIS_URL``) and a stand-in for the
platform's make-call endpoint on loopback (HTTP/1.1 keep-alive, answers at
once: what is measured is the dialer's own cost). For each configuration:

1. RQ is suspended, the dialer processes (``piopiy-voice dialer [--fork]``)
   are started and wait, registered;
2. N calls are enqueued in bulk by this one process through the campaign path
   (``campaign.enqueue_csv``; the HTTP API's bulk enqueue is the same
   ``enqueue_request`` per call): calls/s and CPU ms per call enqueued;
3. RQ is resumed and the dialers place them. Calls/s placed: from the first
   to the last make-call request at the platform. CPU per call placed: the
   dialer processes' CPU over the placing, *including their children*: forked
   work-horses, reaped by the dialer (psutil's ``children_user`` /
   ``children_system``), and live ones and RQ's scheduler process (summed).
   Redis: the redis-server processes' CPU per call. Every call must ring
   exactly once (one request per number) or the run fails.

A last configuration runs two in-process dialers with
``PV_DIAL_RATE_PER_S=--limited-rate``: the rate limit is global, so the two
together must place calls at that rate, not twice it (the busiest 1-second
window is printed). ``--cluster``: the call records on a private local Redis
Cluster (3 primaries, 3 replicas, ``tests/cluster_support.LocalCluster``), the
RQ queue on the plain redis-server (``PV_QUEUE_REDIS_URL``), as deployed
beside a cluster. Rates are not bound by the limit otherwise
(``PV_DIAL_RATE_PER_S`` = 100000). ``--latency-ms``: the platform answers
after that long, as a real one over the Internet does; a dialer places one
call at a time, so its rate is then bound by the reply time and the
processes' scaling shows. Bounded: every wait has a deadline.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
from rq import Queue, Worker
from rq.suspension import resume, suspend

from piopiy_voice.redisconn import EmbeddedRedis, connect
from piopiy_voice.settings import Settings
from piopiy_voice.workers.dialer.campaign import enqueue_csv

ROOT = Path(__file__).resolve().parent.parent
QUEUE = "bench-dial"
CALLER = "919000000000"
CAMPAIGN = "bench"


class FakePlatform:
    """The make-call endpoints: answers every request with a request id after
    ``latency_s`` (0: at once) and records (time, number) of each; keep-alive,
    no Nagle delay."""

    def __init__(self, latency_s: float = 0.0) -> None:
        self.latency_s = latency_s
        self.lock = threading.Lock()
        self.requests: list[tuple[float, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append((time.time(), str(body["to"])))
                    n = len(outer.requests)
                if outer.latency_s:
                    time.sleep(outer.latency_s)
                data = json.dumps({"code": 200, "status": "progress", "request_id": f"req-{n}",
                                   "data": {"status": "progress", "request_id": f"req-{n}"}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reset(self) -> None:
        with self.lock:
            self.requests = []

    def snapshot(self) -> list[tuple[float, str]]:
        with self.lock:
            return list(self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def cpu_s(proc: psutil.Process) -> float:
    """CPU seconds of ``proc``, its reaped children and its live descendants."""
    total = 0.0
    try:
        t = proc.cpu_times()
        total += t.user + t.system + t.children_user + t.children_system
        for kid in proc.children(recursive=True):
            try:
                k = kid.cpu_times()
                total += k.user + k.system
            except psutil.Error:
                pass  # exited between the listing and the read: in children_* next time
    except psutil.Error:
        pass
    return total


def contacts_csv(n: int, offset: int) -> str:
    rows = ["to,id"] + [f"9198{offset + i:08d},c{offset + i}" for i in range(n)]
    return "\n".join(rows) + "\n"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.queue_redis = EmbeddedRedis()
        self.cluster = None
        self.redis_pids = [self.queue_redis.proc.pid]
        if args.cluster:
            sys.path.insert(0, str(ROOT / "tests"))  # the tests' cluster launcher
            from cluster_support import LocalCluster  # noqa: PLC0415

            self.cluster = LocalCluster()
            self.redis_pids += [p.pid for p in self.cluster.procs.values()]
        self.records_url = self.cluster.url if self.cluster else self.queue_redis.url
        self.q = connect(self.queue_redis.url)
        self.records = connect(self.records_url)
        self.platform = FakePlatform(args.latency_ms / 1000)
        self.env = dict(os.environ)
        self.env.update({
            "REDIS_URL": self.records_url,
            "PIOPIY_APP_ID": "4242", "PIOPIY_APP_TOKEN": "bench-token",
            "PIOPIY_BASE_URL": self.platform.url, "PIOPIY_CALLER_ID": CALLER,
            "PV_SIGNING_SECRET": "bench-dialer-signing-secret-0123456789",
            "PV_GATEWAY_PUBLIC_URL": "wss://gw.bench.test", "PV_DIAL_QUEUE": QUEUE,
            "PV_DIAL_RATE_PER_S": "100000", "PV_CAMPAIGN_MAX_LIVE": "1000000",
            "PV_LOG_LEVEL": args.log_level,
        })
        if self.cluster:
            self.env["PV_QUEUE_REDIS_URL"] = self.queue_redis.url
        else:
            self.env.pop("PV_QUEUE_REDIS_URL", None)
        self.offset = 0

    def flush(self) -> None:
        self.q.flushall()
        if self.cluster:
            self.cluster.flushall()
        else:
            self.records.flushall()

    def redis_cpu_s(self) -> float:
        return sum(cpu_s(psutil.Process(pid)) for pid in self.redis_pids)

    def run(self, label: str, *, procs: int, fork: bool, n: int, rate: float | None = None) -> dict:
        self.flush()
        self.platform.reset()
        suspend(self.q)
        env = dict(self.env)
        if rate is not None:
            env["PV_DIAL_RATE_PER_S"] = str(rate)
        cmd = [sys.executable, "-m", "piopiy_voice.cli", "dialer"] + (["--fork"] if fork else [])
        log = tempfile.TemporaryFile()
        dialers = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
                   for _ in range(procs)]
        try:
            deadline = time.monotonic() + 60
            while Worker.count(connection=self.q) < procs:  # registered, held by the suspension
                if time.monotonic() > deadline or any(d.poll() is not None for d in dialers):
                    log.seek(0)
                    raise RuntimeError(f"{label}: dialers did not start: {log.read()[-2000:]!r}")
                time.sleep(0.05)
            time.sleep(0.5)  # start-up work done

            settings = Settings.from_env({k: v for k, v in env.items()
                                          if k.startswith(("PV_", "PIOPIY_", "REDIS_URL"))})
            t0, c0 = time.perf_counter(), time.process_time()
            report = enqueue_csv(self.records, io.StringIO(contacts_csv(n, self.offset)), CAMPAIGN,
                                 settings=settings)
            enq_wall, enq_cpu = time.perf_counter() - t0, time.process_time() - c0
            self.offset += n
            if report.enqueued != n or Queue(QUEUE, connection=self.q).count != n:
                raise RuntimeError(f"{label}: enqueued {report.enqueued} of {n}")

            ps = [psutil.Process(d.pid) for d in dialers]
            cpu0, redis0 = sum(cpu_s(p) for p in ps), self.redis_cpu_s()
            resume(self.q)
            finished = Queue(QUEUE, connection=self.q).finished_job_registry
            deadline = time.monotonic() + max(120.0, n / (rate or 5.0) * 2)
            while finished.count < n:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{label}: {finished.count} of {n} jobs finished in time")
                time.sleep(0.02)
            cpu1, redis1 = sum(cpu_s(p) for p in ps), self.redis_cpu_s()
        finally:
            for d in dialers:
                d.terminate()
            for d in dialers:
                try:
                    d.wait(15)
                except subprocess.TimeoutExpired:
                    d.kill()
                    d.wait()
            log.close()
            resume(self.q)

        reqs = self.platform.snapshot()
        numbers = [to for _, to in reqs]
        if len(numbers) != n or len(set(numbers)) != n:
            raise RuntimeError(f"{label}: {len(numbers)} requests for {len(set(numbers))} numbers, "
                               f"{n} calls: not exactly once each")
        times = sorted(t for t, _ in reqs)
        span = times[-1] - times[0]
        busiest = max(sum(1 for u in times[i:] if u < t + 1.0) for i, t in enumerate(times))
        return {"label": label, "procs": procs, "fork": fork, "n": n,
                "enqueue_per_s": n / enq_wall, "enqueue_cpu_ms": enq_cpu * 1000 / n,
                "placed_per_s": (n - 1) / span if span > 0 else float("inf"),
                "cpu_ms": (cpu1 - cpu0) * 1000 / n, "redis_ms": (redis1 - redis0) * 1000 / n,
                "busiest_1s": busiest, "rate": rate}

    def close(self) -> None:
        self.platform.close()
        self.q.close()
        self.records.close()
        if self.cluster:
            self.cluster.close()
        self.queue_redis.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=300, help="calls per configuration")
    p.add_argument("--repeat", type=int, default=1, help="rounds of every configuration")
    p.add_argument("--limited-rate", type=float, default=40.0,
                   help="PV_DIAL_RATE_PER_S of the last configuration (0: skip it)")
    p.add_argument("--procs", default="1,2", help="dialer processes per configuration, e.g. 1,2,4")
    p.add_argument("--latency-ms", type=float, default=0.0,
                   help="the platform answers each make-call after this long (a real one: ~100 ms)")
    p.add_argument("--modes", default="fork,in-process", help="which dialer modes to run")
    p.add_argument("--log-level", default="INFO", help="the dialers' PV_LOG_LEVEL (logs to a temp file)")
    p.add_argument("--cluster", action="store_true", help="call records on a local Redis Cluster")
    p.add_argument("--json", action="store_true", help="one JSON line per result too")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",")]
    if not set(modes) <= {"fork", "in-process"}:
        p.error(f"--modes: fork and/or in-process, got {args.modes}")
    configs = [(f"{mode} x{n}", n, mode == "fork") for mode in modes
               for n in (int(x) for x in args.procs.split(","))]
    bench = Bench(args)
    results = []
    try:
        for rnd in range(args.repeat):
            for label, procs, fork in configs:
                res = bench.run(label, procs=procs, fork=fork, n=args.calls)
                res["round"] = rnd + 1
                results.append(res)
                print(f"  done: {label} (round {rnd + 1})", file=sys.stderr, flush=True)
        if args.limited_rate > 0:
            n = max(20, int(args.limited_rate * 3))
            res = bench.run(f"in-process x2 @{args.limited_rate:g}/s", procs=2, fork=False, n=n,
                            rate=args.limited_rate)
            res["round"] = 1
            results.append(res)
    finally:
        bench.close()
    where = "records on a 3-primary Redis Cluster, queue on a plain redis-server" if args.cluster \
        else "one redis-server"
    print(f"dialer bench: {args.calls} calls per configuration, {where}, platform answers in "
          f"{args.latency_ms:g} ms, dialers log at {args.log_level}, {os.cpu_count()} cores")
    print(f"{'configuration':<24} {'round':>5} {'calls':>5} {'enq/s':>7} {'enq ms':>7} "
          f"{'placed/s':>9} {'dialer ms/call':>15} {'redis ms/call':>14} {'busiest 1s':>11}")
    for r in results:
        print(f"{r['label']:<24} {r['round']:>5} {r['n']:>5} {r['enqueue_per_s']:>7.0f} "
              f"{r['enqueue_cpu_ms']:>7.2f} {r['placed_per_s']:>9.1f} {r['cpu_ms']:>15.2f} "
              f"{r['redis_ms']:>14.2f} {r['busiest_1s']:>11}")
        if args.json:
            print(json.dumps(r))
    print("dialer ms/call: CPU of the dialer processes incl. forked work-horses and RQ's scheduler, "
          "per call placed; enq: this process enqueueing the calls in bulk (campaign CSV path)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
