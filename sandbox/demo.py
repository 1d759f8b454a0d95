"""piopiy-voice demo: the whole system, locally, one scripted call.

Starts a private Redis (unless ``--redis-url``/``REDIS_URL`` names one), then
the four roles as real processes: the sandbox (the platform), a gateway, a
worker running the default agent, and a dialer (RQ worker). It places one call
through the dialer and ``RestClient``; the sandbox's scripted caller (scenario
``demo``) waits for the greeting, talks, interrupts the agent, presses the
hand-off key and is bridged to a simulated human while the stream keeps
running, then hangs up. The demo prints what happened, checks it, writes the
recordings, stops every process and exits (0 when the call went as scripted).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from piopiy_voice import callrecord, keys
from piopiy_voice.redisconn import EmbeddedRedis, connect, free_port

from .server import DEV_APP_ID, DEV_APP_TOKEN

log = logging.getLogger("demo")

CALLER_ID = "919000000000"  # an Indian Piopiy number: the ind endpoint is used
PERSON = "919812345678"  # the person the demo calls (scripted by the sandbox)
HUMAN_AGENT = "919000000001"


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


@dataclass
class Role:
    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None

    def start(self, env: dict[str, str]) -> None:
        with open(self.log_path, "wb") as log_file:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "piopiy_voice.cli", *self.argv],
                env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class LocalSystem:
    """The four roles as real local processes on free loopback ports.

    Used by the demo and by the end-to-end tests: ``start()``, place calls with
    ``enqueue``, read ``r`` (Redis) and ``sandbox_report``, then ``stop()``.
    """

    def __init__(self, out_dir: Path, redis_url: str | None = None, *,
                 scenario: str = "demo", extra_env: dict[str, str] | None = None,
                 announce=None) -> None:
        self.out = Path(out_dir).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.announce = announce or (lambda text: None)
        self.redis_server: EmbeddedRedis | None = None
        if redis_url is None:
            self.redis_server = EmbeddedRedis()
            self.announce(f"redis      embedded redis-server started at {self.redis_server.url} "
                          "(private to this run)")
            redis_url = self.redis_server.url
        self.redis_url = redis_url
        self.r = connect(redis_url)
        self.scenario = scenario
        self.roles: list[Role] = []
        self.gateway_port = free_port()
        self.sandbox_port = free_port()
        self.worker_metrics_port = free_port()
        self.sandbox_url = f"http://127.0.0.1:{self.sandbox_port}"
        self.tag = secrets.token_hex(3)
        self.env = self._env(extra_env or {})

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PV_", "PIOPIY_"))}
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
        env.update({
            "REDIS_URL": self.redis_url,
            "PV_LOG_LEVEL": "INFO",
            "PV_GATEWAY_ID": f"local-gw-{self.tag}",
            "PV_GATEWAY_PORT": str(self.gateway_port),
            "PV_GATEWAY_PUBLIC_URL": f"ws://127.0.0.1:{self.gateway_port}",
            "PV_SIGNING_SECRET": secrets.token_hex(16),
            "PV_DRAIN_GRACE_S": "2",
            "PV_WORKER_ID": f"local-worker-{self.tag}",
            # Own queue: two local systems on one Redis never take each other's dial jobs.
            "PV_DIAL_QUEUE": f"calls-{self.tag}",
            "PV_HUMAN_AGENT_NUMBER": HUMAN_AGENT,
            "PV_SANDBOX_PORT": str(self.sandbox_port),
            "PV_SANDBOX_REPORT_DIR": str(self.out),
            "PIOPIY_APP_ID": DEV_APP_ID,
            "PIOPIY_APP_TOKEN": DEV_APP_TOKEN,
            "PIOPIY_BASE_URL": self.sandbox_url,
            "PIOPIY_ACTION_URL": f"{self.sandbox_url}/v1/call/action",
            "PIOPIY_CALLER_ID": CALLER_ID,
        })
        env.update(extra)
        return env

    def start(self, timeout: float = 60.0) -> None:
        specs = [
            ("sandbox", ["sandbox", "--scenario", self.scenario, "--report-dir", str(self.out)]),
            ("gateway", ["gateway"]),
            ("worker", ["worker", "--metrics-port", str(self.worker_metrics_port)]),
            ("dialer", ["dialer"]),
        ]
        for name, argv in specs:
            role = Role(name, argv, self.out / f"{name}.log")
            role.start(self.env)
            self.roles.append(role)
        checks = {
            "sandbox": lambda: _get(f"{self.sandbox_url}/healthz")[0] == 200,
            "gateway": lambda: _get(f"http://127.0.0.1:{self.gateway_port}/readyz")[0] == 200,
            "worker": lambda: _get(f"http://127.0.0.1:{self.worker_metrics_port}/metrics")[0] == 200,
            "dialer": lambda: bool(self.r.smembers(f"rq:workers:{self.env['PV_DIAL_QUEUE']}")),
        }
        deadline = time.monotonic() + timeout
        while checks:
            for name in list(checks):
                role = self.role(name)
                if not role.alive():
                    raise RuntimeError(f"{name} exited during start-up:\n{role.tail()}")
                if checks[name]():
                    self.announce(f"{name:<10} ready (pid {role.proc.pid}, log {role.log_path.name})")
                    del checks[name]
            if checks and time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {timeout}s: {', '.join(checks)}")
            time.sleep(0.1)

    def role(self, name: str) -> Role:
        return next(r for r in self.roles if r.name == name)

    def enqueue(self, *, scenario: str | None = None, to: str = PERSON, **options: Any) -> str:
        """Enqueue one call through the dialer's Python API; returns its call id."""
        from piopiy_voice.settings import Settings  # noqa: PLC0415
        from piopiy_voice.workers.dialer.api import enqueue_call  # noqa: PLC0415

        options.setdefault("listen_mode", "both")
        options.setdefault("voice_quality", 8000)
        extra = dict(options.pop("extra_params", {}))
        extra["scenario"] = scenario or self.scenario
        res = enqueue_call(self.r, to=to, caller_id=CALLER_ID, settings=Settings.from_env(self.env),
                           extra_params=extra, **options)
        self.announce(f"dialer     call {res.call_id} enqueued (job {res.job_id})")
        return res.call_id

    def record(self, call_id: str) -> dict[str, str]:
        return callrecord.decode_record(self.r.hgetall(keys.call_meta(call_id)))

    def wait_ended(self, call_id: str, timeout: float, on_timeline=None) -> dict[str, str]:
        """Wait for the call record to reach ended/failed; feed timeline lines as they come."""
        last = "-"
        deadline = time.monotonic() + timeout
        record: dict[str, str] = {}
        while time.monotonic() < deadline:
            if on_timeline is not None:
                start = f"({last}" if last != "-" else "-"
                for entry_id, fields in self.r.xrange(keys.call_timeline(call_id), min=start):
                    last = entry_id.decode()
                    on_timeline(fields)
            record = self.record(call_id)
            if record.get("state") in ("ended", "failed"):
                return record
            for role in self.roles:
                if not role.alive():
                    raise RuntimeError(f"{role.name} died during the call:\n{role.tail()}")
            time.sleep(0.2)
        raise RuntimeError(f"call {call_id} did not end within {timeout}s (state {record.get('state')})")

    def sandbox_report(self, request_id: str, wait: float = 30.0) -> dict[str, Any]:
        status, body = _get(f"{self.sandbox_url}/sandbox/calls/{request_id}?wait={wait}", timeout=wait + 10)
        if status != 200:
            raise RuntimeError(f"sandbox has no report for {request_id}: HTTP {status} {body[:200]!r}")
        return json.loads(body)

    def stop(self, timeout: float = 10.0) -> dict[str, int | None]:
        """SIGTERM every role (last started first); returns their exit codes."""
        codes = {role.name: role.stop(timeout) for role in reversed(self.roles)}
        try:
            self.r.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
        if self.redis_server is not None:
            self.redis_server.close()
        return codes

    def __enter__(self) -> "LocalSystem":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def run_demo(args: argparse.Namespace) -> int:
    out = Path(args.report_dir or tempfile.mkdtemp(prefix="pv-demo-"))
    system = LocalSystem(out, args.redis_url or os.environ.get("REDIS_URL"), announce=say)
    try:
        system.start(args.start_timeout)
        call_id = system.enqueue()
        say("\ncall timeline (from Redis, as it happens):")
        record = system.wait_ended(call_id, args.timeout, on_timeline=lambda f: say("  " + _timeline_line(f)))
        if record.get("state") == "failed":
            say(f"\ncall failed: {record.get('fail_reason') or record}")
            return 1
        report = system.sandbox_report(record["request_id"])
        print_platform_view(report)
        problems = check_flow(report, record)
        say("\nrecordings (what the platform sent us / what the caller heard / stereo: caller side | heard):")
        for name, path in sorted(report.get("recordings", {}).items()):
            say(f"  {name:<7} {path}")
        say(f"logs: {system.out}/*.log")
        if problems:
            say("\nDEMO FAILED:\n  - " + "\n  - ".join(problems))
            return 1
        say("\ndemo OK: greeting, barge-in, hand-off to a human with the stream kept up, hang-up.")
        return 0
    finally:
        for name, code in system.stop().items():
            if code not in (0, None):
                say(f"{name} exited with {code}; see {system.out}/{name}.log")


def say(text: str) -> None:
    print(text, flush=True)


def _timeline_line(fields: dict[bytes, bytes]) -> str:
    f = {k.decode(): v.decode("utf-8", "replace") for k, v in fields.items()}
    t = time.strftime("%H:%M:%S", time.localtime(float(f.pop("t", "0"))))
    event = f.pop("event", "?")
    detail = " ".join(f"{k}={v}" for k, v in f.items() if len(v) < 80)
    return f"{t}  {event:<22} {detail}"


_PERSON_EVENTS = {
    "say_start": "speaks", "dtmf": "presses", "hangup": "hangs up", "human_ringing": "rings",
    "human_answered": "answers", "human_say_start": "speaks", "human_left": "leaves",
}
_PLATFORM_EVENTS = {
    "answered", "ws_connected", "ws_closed", "stream_paused", "stream_resumed", "stream_stopped",
    "playback_cut", "bridge_dialing", "call_ended", "play_started",
}


def print_platform_view(report: dict[str, Any]) -> None:
    """The same call as the platform (sandbox) saw it, condensed."""
    say("\nthe call as the platform saw it (sandbox report):")
    audio_open = False
    for ev in report.get("events", []):
        src, name = ev.get("src"), ev.get("event")
        t = f"{ev.get('t_ms', 0) / 1000:7.2f}s"
        if src == "gateway" and name == "ws_message":
            if ev.get("kind") == "pcmo":
                say(f"  {t}  gateway -> platform  PCMO {ev.get('actions')}")
                audio_open = False
            elif ev.get("kind") == "control":
                say(f"  {t}  gateway -> platform  {{'action': '{ev.get('action')}'}}")
                audio_open = False
            elif not audio_open:
                say(f"  {t}  gateway -> platform  streamAudio ... (agent speaking)")
                audio_open = True
            continue
        if src in ("caller", "human") and name in _PERSON_EVENTS:
            detail = ev.get("keys") or (f"{ev['ms']} ms" if "ms" in ev else "")
            say(f"  {t}  {src:<8}             {_PERSON_EVENTS[name]} {detail}".rstrip())
            continue
        if src == "platform" and name in _PLATFORM_EVENTS:
            extra = {k: v for k, v in ev.items() if k not in ("t_ms", "src", "event") and not isinstance(v, (dict, list))}
            say(f"  {t}  platform             {name} {extra if extra else ''}".rstrip())


def check_flow(report: dict[str, Any], record: dict[str, str]) -> list[str]:
    """What the scripted call must show; each miss is a line of the failure."""
    problems = []
    events = report.get("events", [])
    received = [e for e in events if e.get("src") == "gateway" and e.get("event") == "ws_message"]
    audio = [e for e in received if e.get("kind") not in ("pcmo", "control")]
    breaks = [e for e in received if e.get("kind") == "control" and e.get("action") == "break"]
    pcmo = [e for e in received if e.get("kind") == "pcmo"]
    bridges = [e for e in pcmo if "bridge" in (e.get("actions") or [])]
    dtmf = [e for e in events if e.get("src") == "caller" and "dtmf" in str(e.get("event"))]
    if not audio:
        problems.append("the agent never spoke (no streamAudio received)")
    if not breaks:
        problems.append("no barge-in: the platform never received {'action': 'break'}")
    if not dtmf:
        problems.append("the caller never pressed the hand-off key")
    if not bridges:
        problems.append("no hand-off: no bridge PCMO reached the platform")
    else:
        t_bridge = bridges[0]["t_ms"]
        if breaks and breaks[0]["t_ms"] > t_bridge:
            problems.append("the barge-in came after the hand-off")
        runs = report.get("stream", {}).get("runs") or []
        last_frame_ms = max((run["end_ms"] for run in runs), default=0)
        if last_frame_ms <= t_bridge:
            problems.append("the stream did not keep running after the hand-off")
        human = [e for e in events if e.get("src") == "human"]
        if not human:
            problems.append("the simulated human never answered")
    if record.get("state") != "ended":
        problems.append(f"call record state is {record.get('state')!r}, not 'ended'")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="piopiy-voice demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--redis-url", help="use this Redis (default: REDIS_URL, else a private embedded one)")
    p.add_argument("--report-dir", help="where recordings, reports and logs go (default: a new temp dir)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds the call may take (default 120)")
    p.add_argument("--start-timeout", type=float, default=60.0, help="seconds for the roles to get ready")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run_demo(args)
    except RuntimeError as exc:
        say(f"demo: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130
