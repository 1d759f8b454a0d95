"""Whole-system CPU per call-second, ours against pipecat, same calls, same VAD (issue 14).

    # once: pipecat in a venv of its own, outside the repo (never in .venv)
    python3 -m venv /work/pipecat-venv
    /work/pipecat-venv/bin/pip install 'pipecat-ai[websocket]==1.14.0' 'uvicorn[standard]==0.54.0' py-spy==0.4.3

    flock /tmp/bench.lock .venv/bin/python bench/pipecat_bench.py [--calls 25,50] [--seconds 20]
        [--warmup 5] [--rounds 2] [--pipecat-python /work/pipecat-venv/bin/python]
        [--pipecat-defaults] [--code-rev REV] [--profile DIR] [--json FILE]

The work, identical on both sides
---------------------------------
N concurrent calls, each a WebSocket speaking Piopiy's media protocol
(``/work/shared/piopiy-protocol.md`` section 3): the caller sends binary 20 ms
L16 frames at 8 kHz in real time; the bot answers with ``streamAudio`` JSON
(base64 PCM, 40 ms chunks paced at real time) and ``{"action":"break"}``.

* The callers are ``system_bench``'s (``CallerScript`` on espeak sentences
  rendered by ``sandbox.voice``, one shared 2 ms clock for all calls,
  pre-framed writes: ``LoadCall``/``Clock``), without the DTMF key (neither
  bot detects keys): a caller waits for the bot's audio, talks over it
  0.3-1.2 s after it started (a barge-in, and the next question), and every
  third turn lets the clip finish, waits 0.8 s and then asks. Seeds are per
  round and call, so both systems get the same scripts.
* The bot, per call: the project's VAD (``speech.vad``, the worker's default
  engine ``energy``) on every frame; a turn starts after ``PV_TURN_ONSET_MS``
  (80) of speech and ends after ``PV_TURN_HANGOVER_MS`` (400) of silence; at
  the call's start and at every end of turn it plays one fixed pre-rendered
  clip (4.1 s of espeak, the same bytes on both sides); a turn starting while
  the clip plays interrupts it (``break``). No recognition, no synthesis, no
  DTMF on either side.
* Ours: the real roles as processes, started like ``system_bench`` starts them
  (``Supervisor`` + ``role_command``): a private ``redis-server``, the gateway
  and one worker running ``bench.pipecat_agent:ClipAgent`` (the worker's
  ``Ears``: the same VAD + ``TurnDetector`` the ``ConversationAgent`` uses).
  The calls come straight to the gateway on signed stream URLs
  (``signing.sign_stream_url``; no dialer, no REST: not part of either bot).
* Pipecat: ``bench/pipecat_server.py`` in its own venv: FastAPI + uvicorn,
  one pipeline per socket (``FastAPIWebsocketTransport`` with a Piopiy
  ``FrameSerializer``, ``VADProcessor`` over a ``VADAnalyzer`` that calls the
  project's VAD, ``UserTurnProcessor``, a clip player); its interruption
  sends ``break``. Details and its settings in that module.

Measurement
-----------
Both systems run for the whole bench (started once); ONE load generator
process (``--serve-load``, this file) drives them in alternation: per N,
``--rounds`` rounds of (ours, pipecat), each phase opening N fresh calls,
``--warmup`` seconds, then a ``--seconds`` measured window, then closing them.
Per window: CPU = psutil user+sys of each process tree (ours: gateway +
worker + redis-server; pipecat: its ``--pipecat-procs`` server processes,
default 2 = one per core, calls spread round-robin, since one pipecat
process is one core at most; the generator apart) over the window only,
summed over the rounds and divided by live calls x window seconds. Our
redis-server's ``INFO commandstats`` over the window: commands per second
and server time per call. Barge-in = the caller's speech onset (the first
frame above -50 dBFS of an utterance started while bot audio was arriving)
-> the first
``break`` received on that call before its next utterance, both on the
generator's clock; "missed" = none. Printed per N: each role's CPU per
call-second, each system's sum, the ratio ours / pipecat, barge-in p50/p99,
the generator's own CPU, and counts showing the work was the same (clips
started, ``streamAudio`` chunks and breaks received, turns left unanswered).
A process above 85% of a core in a window is flagged SATURATED: it is falling
behind (fewer chunks delivered, late breaks), so its CPU per call-second there
counts work not done and the ratio is not a like-for-like figure. First, with
no calls, ``--idle`` seconds measure what each process costs doing nothing
(a fixed cost that a per-call-second figure spreads over N).

``--profile DIR``: py-spy (from the pipecat venv; ``record --nonblocking``,
100 Hz, Python frames, idle threads left out; ``--profile-native``: ``--native``
at 50 Hz, C frames too, but it stops the process for every sample) records the
gateway, the worker and the pipecat servers during the last round's windows,
one raw (collapsed-stack) file each; ``bench/pipecat_profile.py`` sums them per
function. The figures of a profiled run are perturbed: py-spy samples on the
same 2 cores (and ``--native`` stalls pipecat's per-call threads badly).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from callsim import pct
from system_bench import TEXTS, CallerScript, Clock, LoadCall, barge_latencies, build_speech, tree_cpu

ROOT = Path(__file__).resolve().parent.parent
PIPECAT_PYTHON = "/work/pipecat-venv/bin/python"
CLIP_TEXT = "We are open from nine in the morning to six in the evening, Monday to Saturday."
CLIP_CHUNK_MS = 40
SYSTEMS = ("ours", "pipecat")
TARGET_RATIO = 1 / 3
#: A process above this share of a core in a window is flagged: on 2 shared cores it
#: is falling behind (its CPU per call-second then counts work not done).
SATURATED = 0.85


# ------------------------------------------------------------ the load generator
class LoadGenerator:
    """``--serve-load``: one process for both systems. JSON lines on stdin
    (``start`` with the URLs and a seed, ``status``, ``mark``, ``stop``), one JSON
    line back per command."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.speech = dataclasses.replace(build_speech(TEXTS, rate), key=())  # no DTMF: neither bot hears keys
        self.clock = Clock()
        self.shim = types.SimpleNamespace(options=types.SimpleNamespace(ring_ms=0), clock=self.clock)
        self.calls: list[LoadCall] = []
        self.tasks: list[asyncio.Future] = []  # held: the loop keeps only weak references to tasks
        self.mark_ms = 0.0

    def start(self, urls: list[str], seed: int) -> dict[str, Any]:
        self.calls = [LoadCall(f"r{i}", url, self.rate, CallerScript(self.speech, random.Random(seed * 100_003 + i)))
                      for i, url in enumerate(urls)]
        self.tasks = [asyncio.ensure_future(call.run(self.shim)) for call in self.calls]
        return {"started": len(self.calls)}

    def status(self) -> dict[str, Any]:
        states: dict[str, int] = {}
        for call in self.calls:
            key = call.state.split(":")[0]
            states[key] = states.get(key, 0) + 1
        return {"states": states}

    def mark(self) -> dict[str, Any]:
        self.mark_ms = time.time() * 1000
        self.clock.mark()
        return {"mark_ms": self.mark_ms}

    async def stop(self) -> dict[str, Any]:
        calls, self.calls = self.calls, []
        for call in calls:       # no frame after this: the close frames go out after the last audio
            self.clock.remove(call)
        await asyncio.gather(*(call.close() for call in calls), return_exceptions=True)
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=10)
        self.tasks = []
        return {"late_ticks": self.clock.late_ticks, "max_late_ms": round(self.clock.max_late_ms, 1),
                "calls": [call.result() for call in calls]}

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        clock = asyncio.ensure_future(self.clock.run())
        print(json.dumps({"ready": True}), flush=True)
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "start":
                out = self.start(cmd["urls"], cmd["seed"])
            elif op == "status":
                out = self.status()
            elif op == "mark":
                out = self.mark()
            elif op == "stop":
                out = await self.stop()
            else:
                out = {"error": f"unknown op {op!r}"}
            print(json.dumps(out), flush=True)
        self.clock.stopped = True
        clock.cancel()


def serve_load(rate: int) -> int:
    import uvloop

    uvloop.run(LoadGenerator(rate).serve())
    return 0


# ------------------------------------------------------------ the systems
def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status
    except OSError:
        return 0


class Systems:
    """Both systems under test, the generator, and the measurement of one window."""

    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        from piopiy_voice.redisconn import EmbeddedRedis, free_port
        from piopiy_voice.sandbox import voice
        from piopiy_voice.speech.config import SpeechConfig
        from piopiy_voice.supervisor import Supervisor, role_command

        self.args, self.out = args, out
        self.speech_cfg = SpeechConfig.from_env(os.environ)
        pcm = voice.render(CLIP_TEXT, "en-us", args.rate)
        chunk = args.rate * 2 * CLIP_CHUNK_MS // 1000
        self.clip = out / "clip.raw"
        self.clip.write_bytes(pcm + bytes(-len(pcm) % chunk))
        self.clip_s = self.clip.stat().st_size / (2 * args.rate)
        code_root, pkg_path = ROOT, None
        self.export: Path | None = None  # a git export of --code-rev, removed at close
        if args.code_rev:
            import revtree

            pkg_path = revtree.package_root(args.code_rev)
            code_root = pkg_path.parent / "tree"
            self.export = pkg_path.parent
        self.code = f"{args.code_rev} ({code_root})" if args.code_rev else f"working tree ({ROOT})"
        self.sup = Supervisor(grace_s=10)
        self.redis = EmbeddedRedis()
        self.secret = secrets.token_hex(16)
        self.gw_port, self.worker_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PV_", "PIOPIY_"))}
        env.update({
            "REDIS_URL": self.redis.url, "PV_LOG_LEVEL": "WARNING", "PV_GATEWAY_ID": "pcb-gw",
            "PV_GATEWAY_PORT": str(self.gw_port), "PV_GATEWAY_PUBLIC_URL": f"ws://127.0.0.1:{self.gw_port}",
            "PV_SIGNING_SECRET": self.secret, "PV_SILENCE_TIMEOUT_S": "60", "PV_MAX_CALL_S": "3600",
            "BENCH_CLIP_FILE": str(self.clip),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(pkg_path) if pkg_path else None, str(ROOT),
                                                        os.environ.get("PYTHONPATH")])),
        })
        # Tuning set in the environment (PV_VAD, PV_TURN_*, PV_WORKER_MIN_TURN_MS...) reaches
        # our roles; what the bench sets itself wins.
        env.update({k: v for k, v in os.environ.items() if k.startswith("PV_") and k not in env})
        self.sup.start("gateway", role_command("gateway"), env, out / "gateway.log", cwd=str(out))
        self.sup.start("worker", role_command("worker", "--metrics-port", str(self.worker_port), "--worker-id",
                                              "pcb-w1", "--agent", "bench.pipecat_agent:ClipAgent"),
                       env, out / "worker.log", cwd=str(out))
        sp = self.speech_cfg
        self.pc_ports = [free_port() for _ in range(args.pipecat_procs)]
        for i, port in enumerate(self.pc_ports):
            self.sup.start(f"pipecat{i + 1}", [
                args.pipecat_python, str(ROOT / "bench" / "pipecat_server.py"), "--port", str(port),
                "--clip", str(self.clip), "--onset-ms", str(sp.turn_onset_ms),
                "--hangover-ms", str(sp.turn_hangover_ms), "--vad", sp.vad, "--project-root", str(code_root)]
                + (["--pipecat-defaults"] if args.pipecat_defaults else []),
                dict(os.environ, PYTHONPATH=""), out / f"pipecat{i + 1}.log", cwd=str(out))
        checks = {"gateway": lambda: _get(f"http://127.0.0.1:{self.gw_port}/readyz") == 200,
                  "worker": lambda: _get(f"http://127.0.0.1:{self.worker_port}/lag") == 200}
        for i, port in enumerate(self.pc_ports):
            checks[f"pipecat{i + 1}"] = lambda port=port: _get(f"http://127.0.0.1:{port}/healthz") == 200
        self.sup.wait_ready(checks, 90)
        self.gen = subprocess.Popen([sys.executable, __file__, "--serve-load", "--rate", str(args.rate)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT / "bench")
        self._read(60)
        self.procs = {"gateway": [psutil.Process(self.sup.child("gateway").pid)],
                      "worker": [psutil.Process(self.sup.child("worker").pid)],
                      "redis": [psutil.Process(self.redis.proc.pid)],
                      "pipecat": [psutil.Process(self.sup.child(f"pipecat{i + 1}").pid)
                                  for i in range(args.pipecat_procs)],
                      "generator": [psutil.Process(self.gen.pid)]}

    def _read(self, timeout: float) -> dict[str, Any]:
        ready, _, _ = select.select([self.gen.stdout], [], [], timeout)
        line = self.gen.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError("the load generator did not answer")
        return json.loads(line)

    def ask(self, op: str, timeout: float = 30, **kw: Any) -> dict[str, Any]:
        self.gen.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.gen.stdin.flush()
        return self._read(timeout)

    def urls(self, system: str, n: int, tag: str) -> list[str]:
        if system == "pipecat":
            # Round-robin over the pipecat processes, as a load balancer in front of them would.
            return [f"ws://127.0.0.1:{self.pc_ports[i % len(self.pc_ports)]}/call/pcb-{tag}-{i}?rate={self.args.rate}"
                    for i in range(n)]
        from piopiy_voice.signing import sign_stream_url

        return [sign_stream_url(f"ws://127.0.0.1:{self.gw_port}", f"pcb-{tag}-{i}", self.secret,
                                params={"rate": str(self.args.rate), "mode": "callee"}) for i in range(n)]

    def redis_commands(self) -> dict[str, tuple[int, int]]:
        """(calls, usec) per command of our redis-server, from INFO commandstats."""
        from piopiy_voice.redisconn import connect

        stats = connect(self.redis.url).info("commandstats")
        return {k.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for k, v in stats.items()}

    def cpu(self) -> dict[str, float]:
        """CPU seconds of every process tree, keyed ``role#k``."""
        return {f"{name}#{k}": tree_cpu(p) for name, ps in self.procs.items() for k, p in enumerate(ps)}

    def profile(self, names: list[str], seconds: float, tag: str) -> list[subprocess.Popen]:
        spy = str(Path(self.args.pipecat_python).parent / "py-spy")
        out = Path(self.args.profile)
        out.mkdir(parents=True, exist_ok=True)
        how = ["--native", "-r", "50"] if self.args.profile_native else ["--nonblocking", "-r", "100"]
        return [subprocess.Popen([spy, "record", *how, "-d", str(int(seconds)),
                                  "-f", "raw", "-o", str(out / f"{tag}-{name}{k + 1}.txt"), "-p", str(p.pid)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for name in names for k, p in enumerate(self.procs[name])]

    def close(self) -> None:
        if self.gen.poll() is None:
            try:
                self.gen.stdin.close()
                self.gen.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.gen.kill()
                self.gen.wait(5)
        self.sup.stop(10)
        self.redis.close()
        if self.export is not None:
            shutil.rmtree(self.export, ignore_errors=True)


ROLES = {"ours": ("gateway", "worker", "redis"), "pipecat": ("pipecat",)}


def run_phase(sy: Systems, system: str, n: int, rnd: int, profile: bool) -> dict[str, Any]:
    args = sy.args
    sy.ask("start", urls=sy.urls(system, n, f"{system[0]}{n}r{rnd}"), seed=1000 * n + rnd)
    deadline = time.monotonic() + 30
    while True:
        st = sy.ask("status")["states"]
        if st.get("open", 0) + sum(v for k, v in st.items() if k.startswith(("failed", "closed"))) >= n:
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    connected = st.get("open", 0)
    time.sleep(args.warmup)
    spies = sy.profile(list(ROLES[system]) if system == "pipecat" else ["gateway", "worker"],
                       args.seconds, f"n{n}-{system}") if profile else []
    cmd0 = sy.redis_commands() if system == "ours" else {}
    cpu0 = sy.cpu()
    mark = sy.ask("mark")["mark_ms"]
    t0 = time.monotonic()
    time.sleep(args.seconds)
    window = time.monotonic() - t0
    cpu1 = sy.cpu()
    cmd1 = sy.redis_commands() if system == "ours" else {}
    until = time.time() * 1000
    res = sy.ask("stop", timeout=60)
    for p in spies:
        p.wait(30)
    time.sleep(1.0)  # the calls end on both sides before the next phase
    calls = res["calls"]
    lat, missed, _ = barge_latencies(calls, mark, until)
    return {
        "system": system, "round": rnd, "calls": n, "connected": connected, "window_s": window,
        "cpu_s": {r: sum(cpu1[k] - cpu0[k] for k in cpu1 if k.split("#")[0] == r) for r in sy.procs},
        "core_share": {k: (cpu1[k] - cpu0[k]) / window for k in cpu1}, "barge": lat, "missed": missed,
        "clips": sum(1 for x in calls for t, what in x["trace"] if what == "agent audio" and mark <= t * 1000 < until),
        "no_reply": sum(x["no_reply"] for x in calls), "late_ticks": res["late_ticks"],
        "dropped": sum(1 for x in calls if x["state"] == "closed by gateway"),
        "received": {k: sum(x["received"].get(k, 0) for x in calls) for k in ("streamAudio", "break")},
        "redis_per_s": {k: ((v[0] - cmd0.get(k, (0, 0))[0]) / window, v[1] - cmd0.get(k, (0, 0))[1])
                        for k, v in cmd1.items() if v[0] > cmd0.get(k, (0, 0))[0]},
    }


def summarize(phases: list[dict[str, Any]], n: int) -> dict[str, Any]:
    out: dict[str, Any] = {"calls": n}
    for system in SYSTEMS:
        ps = [p for p in phases if p["system"] == system and p["calls"] == n]
        call_s = sum(p["connected"] * p["window_s"] for p in ps)
        roles = {r: sum(p["cpu_s"][r] for p in ps) / call_s * 1000 for r in ROLES[system]}
        out[system] = {
            "roles_ms_per_call_s": roles, "total_ms_per_call_s": sum(roles.values()),
            "per_round_total": [sum(p["cpu_s"][r] for r in ROLES[system]) / (p["connected"] * p["window_s"]) * 1000
                                for p in ps],
            "generator_ms_per_call_s": sum(p["cpu_s"]["generator"] for p in ps) / call_s * 1000,
            "barge": [x for p in ps for x in p["barge"]], "missed": sum(p["missed"] for p in ps),
            "clips": sum(p["clips"] for p in ps), "no_reply": sum(p["no_reply"] for p in ps),
            "connected": [p["connected"] for p in ps], "late_ticks": sum(p["late_ticks"] for p in ps),
            "dropped": sum(p["dropped"] for p in ps),
            "breaks": sum(p["received"]["break"] for p in ps),
            "max_core_share": {k: max(p["core_share"][k] for p in ps) for k in ps[0]["core_share"]
                               if k.split("#")[0] in ROLES[system]},
            # Redis commands per second and their server time per call (ours only), last round's window
            "redis_per_s": {k: (c, us / max(1.0, c * ps[-1]["window_s"]))
                            for k, (c, us) in ps[-1]["redis_per_s"].items()},
            "chunks": sum(p["received"]["streamAudio"] for p in ps),
        }
    out["ratio"] = out["ours"]["total_ms_per_call_s"] / out["pipecat"]["total_ms_per_call_s"]
    return out


def report(s: dict[str, Any]) -> None:
    n = s["calls"]
    print(f"\n  N={n}")
    for system in SYSTEMS:
        x = s[system]
        b = x["barge"]
        roles = ", ".join(f"{r} {v:.2f}" for r, v in x["roles_ms_per_call_s"].items())
        print(f"    {system:8s} CPU ms per call-second: {x['total_ms_per_call_s']:.2f} ({roles}); per round "
              + " / ".join(f"{v:.2f}" for v in x["per_round_total"]))
        print(f"             barge-in onset -> break: n={len(b)} missed={x['missed']} p50 {pct(b, 50):.0f} "
              f"p95 {pct(b, 95):.0f} p99 {pct(b, 99):.0f} max {max(b, default=float('nan')):.0f} ms")
        print(f"             work: clips started {x['clips']}, streamAudio chunks {x['chunks']}, breaks "
              f"{x['breaks']}, turns unanswered in 6 s {x['no_reply']}; connected {x['connected']}, "
              f"closed by the server {x['dropped']}; generator {x['generator_ms_per_call_s']:.2f} ms per "
              f"call-second, clock ticks > 20 ms late {x['late_ticks']}")
        if x["redis_per_s"]:
            top = sorted(x["redis_per_s"].items(), key=lambda kv: -kv[1][0] * kv[1][1])[:6]
            print("             redis-server, last window: " + ", ".join(
                f"{k} {c:.0f}/s x {us:.1f} us" for k, (c, us) in top))
        shares = x["max_core_share"]
        print("             busiest window, share of a core: "
              + ", ".join(f"{k} {v * 100:.0f}%" for k, v in shares.items())
              + ("  <- SATURATED: a process near a full core does less work; its CPU per call-second is a floor"
                 if max(shares.values()) > SATURATED else ""))
    verdict = "met" if s["ratio"] <= TARGET_RATIO else "NOT met"
    print(f"    ratio ours / pipecat (gateway + worker + redis vs pipecat): {s['ratio']:.3f}x "
          f"(target <= {TARGET_RATIO:.3f}: {verdict})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", default="25", help="comma-separated N")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured window per phase")
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=2, help="(ours, pipecat) pairs per N")
    ap.add_argument("--rate", type=int, default=8000, choices=(8000, 16000))
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of no calls measured first (0: skip)")
    ap.add_argument("--pipecat-python", default=PIPECAT_PYTHON)
    ap.add_argument("--pipecat-procs", type=int, default=2,
                    help="pipecat server processes (calls spread round-robin); one process is one core at most")
    ap.add_argument("--pipecat-defaults", action="store_true", help="pipecat with RTVI and turn tracking on")
    ap.add_argument("--code-rev", help="run our roles (and the VAD on both sides) on this git revision")
    ap.add_argument("--profile", metavar="DIR", help="py-spy the roles in the last round's windows")
    ap.add_argument("--profile-native", action="store_true",
                    help="py-spy --native (C frames too; stops the process per sample: perturbs much more)")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--log-dir", metavar="DIR")
    ap.add_argument("--serve-load", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_load:
        return serve_load(args.rate)
    if not Path(args.pipecat_python).exists():
        raise SystemExit(f"{args.pipecat_python} not found: install pipecat as this module's docstring says")
    ns = [int(x) for x in args.calls.split(",") if x.strip()]
    out = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="pv-pipecat-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    pc_version = subprocess.run([args.pipecat_python, "-c", "import importlib.metadata as m; "
                                 "print(m.version('pipecat-ai'))"], capture_output=True, text=True).stdout.strip()
    print(f"pipecat bench: {os.cpu_count()} cpus, load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"N = {ns}; {args.rounds} rounds of (ours, pipecat) per N, {args.warmup:g} s warm-up + "
          f"{args.seconds:g} s window each; {args.rate} Hz; pipecat-ai {pc_version}"
          f"{' (RTVI + turn tracking on)' if args.pipecat_defaults else ''}; logs in {out}", flush=True)
    # A SIGTERM (``timeout``, a CI cancel) must still stop the children: they run in
    # sessions of their own, so nothing else would.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sy = Systems(args, out)
    print(f"code under test: {sy.code}; VAD {sy.speech_cfg.vad}, onset {sy.speech_cfg.turn_onset_ms} ms, "
          f"hangover {sy.speech_cfg.turn_hangover_ms} ms; clip {sy.clip_s:.2f} s", flush=True)
    summaries, phases, idle = [], [], {}
    try:
        if args.idle > 0:  # no calls: what each process costs doing nothing
            c0 = sy.cpu()
            time.sleep(args.idle)
            c1 = sy.cpu()
            idle = {k: (c1[k] - c0[k]) / args.idle for k in c1}
            print("idle (no calls), share of a core over " + f"{args.idle:g} s: "
                  + ", ".join(f"{k} {v * 100:.1f}%" for k, v in idle.items()), flush=True)
        for n in ns:
            for rnd in range(args.rounds):
                for system in SYSTEMS:
                    p = run_phase(sy, system, n, rnd, profile=bool(args.profile) and rnd == args.rounds - 1)
                    phases.append(p)
                    tot = sum(p["cpu_s"][r] for r in ROLES[system]) / max(1e-9, p["connected"] * p["window_s"]) * 1000
                    print(f"  N={n} round {rnd + 1} {system}: {p['connected']} connected, {tot:.2f} ms CPU per "
                          f"call-second, barge-in n={len(p['barge'])} p99 {pct(p['barge'], 99):.0f} ms, "
                          f"load avg {os.getloadavg()[0]:.2f}", flush=True)
                    dead = sy.sup.dead()
                    if dead:
                        raise RuntimeError(f"{dead[0].name} died:\n{dead[0].tail()}")
            s = summarize(phases, n)
            report(s)
            summaries.append(s)
    finally:
        sy.close()
    print("\n| calls | ours: gateway / worker / redis = total | pipecat | ours / pipecat | barge-in p50 / p99 ours "
          "(n, missed) | pipecat | generator ms per call-s |\n|---|---|---|---|---|---|---|")
    for s in summaries:
        o, p = s["ours"], s["pipecat"]
        r = o["roles_ms_per_call_s"]
        def q(x: dict[str, Any]) -> str:
            return f"{pct(x['barge'], 50):.0f} / {pct(x['barge'], 99):.0f} ({len(x['barge'])}, {x['missed']})"
        print(f"| {s['calls']} | {r['gateway']:.2f} / {r['worker']:.2f} / {r['redis']:.2f} = "
              f"{o['total_ms_per_call_s']:.2f} | {p['total_ms_per_call_s']:.2f} | **{s['ratio']:.2f}x** | {q(o)} | "
              f"{q(p)} | {o['generator_ms_per_call_s']:.2f} / {p['generator_ms_per_call_s']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"summaries": summaries, "phases": phases, "idle": idle},
                                              indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
