"""piopiy-voice demo: the whole system, locally, one scripted call.

Starts a private Redis (unless ``--redis-url``/``REDIS_URL`` names one), then
the five roles as real processes: the sandbox (the platform), a gateway, a
worker running the default agent, a transcriber (speech recognition) and a
dialer (RQ worker). It places one call through the dialer and ``RestClient``;
the sandbox's scripted caller (scenario ``demo``) speaks real sentences
(espeak-ng): it waits for the greeting, asks for the opening hours, interrupts
the answer with another question, asks for a real person and is bridged to a
simulated human while the stream keeps running (monitored and transcribed),
then hangs up. The demo prints the call as it happens, both sides'
words (the caller's from the transcripts, the agent's from what it sent), the
scenario's expectations checked against them, and the recordings; it stops
every process and exits 0 when the call went as scripted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import signal
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from piopiy_voice import callrecord, keys
from piopiy_voice.observability import setup_logging
from piopiy_voice.redisconn import EmbeddedRedis, connect, free_port, redact_url
from piopiy_voice.supervisor import Child, Supervisor, role_command

from .expect import check_expectations, format_result, format_words, read_call_words, wait_transcribed
from .scenario import load_scenario
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


#: The stack's roles, in start order (stopped in reverse).
ROLES = ("sandbox", "gateway", "worker", "transcriber", "dialer")


class LocalSystem:
    """The five roles (``ROLES``) as real local processes on free loopback ports.

    Used by the demo and by the end-to-end tests: ``start()``, place calls with
    ``enqueue``, read ``r`` (Redis) and ``sandbox_report``, then ``stop()``.
    ``queue_url``: the dial queue's own Redis (``PV_QUEUE_REDIS_URL``; needed
    when ``redis_url`` is a Redis Cluster).
    """

    def __init__(self, out_dir: Path, redis_url: str | None = None, *,
                 scenario: str = "demo", extra_env: dict[str, str] | None = None,
                 announce=None, gateway_port: int | None = None, sandbox_port: int | None = None,
                 dial_queue: str | None = None, queue_url: str | None = None) -> None:
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
        self.supervisor = Supervisor()
        self.gateway_port = gateway_port or free_port()
        self.sandbox_port = sandbox_port or free_port()
        self.worker_metrics_port = free_port()
        self.sandbox_url = f"http://127.0.0.1:{self.sandbox_port}"
        self.tag = secrets.token_hex(3)
        self.transcriber_id = f"local-asr-{self.tag}"
        self.dial_queue = dial_queue or f"calls-{self.tag}"
        self.queue_url = queue_url
        #: The dial queue's Redis (RQ's keys): ``r`` unless ``queue_url`` names another.
        self.q = connect(queue_url) if queue_url else self.r
        self.env = self._env(extra_env or {})

    @property
    def roles(self) -> list[Child]:
        return self.supervisor.children

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PV_", "PIOPIY_"))}
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
            "PV_DIAL_QUEUE": self.dial_queue,
            "PV_HUMAN_AGENT_NUMBER": HUMAN_AGENT,
            "PV_SANDBOX_PORT": str(self.sandbox_port),
            "PV_SANDBOX_REPORT_DIR": str(self.out),
            "PIOPIY_APP_ID": DEV_APP_ID,
            "PIOPIY_APP_TOKEN": DEV_APP_TOKEN,
            "PIOPIY_BASE_URL": self.sandbox_url,
            "PIOPIY_ACTION_URL": f"{self.sandbox_url}/v1/call/action",
            "PIOPIY_CALLER_ID": CALLER_ID,
        })
        if self.queue_url:
            env["PV_QUEUE_REDIS_URL"] = self.queue_url
        env.update(extra)
        return env

    def start(self, timeout: float = 60.0) -> None:
        specs = [
            ("sandbox", ["sandbox", "--scenario", self.scenario, "--report-dir", str(self.out)]),
            ("gateway", ["gateway"]),
            ("worker", ["worker", "--metrics-port", str(self.worker_metrics_port)]),
            ("transcriber", ["transcriber", "--id", self.transcriber_id]),
            ("dialer", ["dialer"]),
        ]
        for name, argv in specs:
            # cwd: the report dir, so a developer's own .env never leaks into the roles.
            self.supervisor.start(name, role_command(*argv), self.env, self.out / f"{name}.log",
                                  cwd=str(self.out))
        checks = {
            "sandbox": lambda: _get(f"{self.sandbox_url}/healthz")[0] == 200,
            "gateway": lambda: _get(f"http://127.0.0.1:{self.gateway_port}/readyz")[0] == 200,
            "worker": lambda: _get(f"http://127.0.0.1:{self.worker_metrics_port}/metrics")[0] == 200,
            # Its first loop turn heartbeats into the transcribers' set (after building its model).
            "transcriber": lambda: self.r.zscore(keys.TRANSCRIBERS_ZSET, self.transcriber_id) is not None,
            "dialer": lambda: bool(self.q.smembers(f"rq:workers:{self.env['PV_DIAL_QUEUE']}")),
        }
        self.supervisor.wait_ready(checks, timeout, on_ready=lambda c: self.announce(
            f"{c.name:<11} ready (pid {c.pid}, log {c.log_path.name})"))

    def role(self, name: str) -> Child:
        return self.supervisor.child(name)

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
            for role in self.supervisor.dead():
                raise RuntimeError(f"{role.name} died during the call:\n{role.tail()}")
            time.sleep(0.2)
        raise RuntimeError(f"call {call_id} did not end within {timeout}s (state {record.get('state')})")

    def words(self, call_id: str, timeout: float = 15.0):
        """Both sides' words (``expect.CallWords``), once the transcriber is done with the call."""
        if not wait_transcribed(self.r, call_id, timeout):
            self.announce(f"transcriber did not finish call {call_id} within {timeout:g}s; "
                          "its last words may be missing")
        return read_call_words(self.r, call_id)

    def sandbox_report(self, request_id: str, wait: float = 30.0) -> dict[str, Any]:
        status, body = _get(f"{self.sandbox_url}/sandbox/calls/{request_id}?wait={wait}", timeout=wait + 10)
        if status != 200:
            raise RuntimeError(f"sandbox has no report for {request_id}: HTTP {status} {body[:200]!r}")
        return json.loads(body)

    def stop(self, timeout: float = 10.0) -> dict[str, int | None]:
        """SIGTERM every role (last started first); returns their exit codes."""
        codes = self.supervisor.stop(timeout)
        for client in {id(self.r): self.r, id(self.q): self.q}.values():
            try:
                client.close()
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
        words = system.words(call_id)
        say("\nthe conversation in words (caller: the transcriber's finals; agent: the text of "
            "what it sent;\non the line: the monitored conversation after the hand-off):")
        for line in format_words(words):
            say(line)
        result = check_expectations(load_scenario(system.scenario).expect, words)
        say("\nexpectations of the scenario:")
        for line in format_result(result):
            say(line)
        problems += [f"expected but not found: {m}" for m in result.missing]
        say("\nrecordings (what the platform sent us / what the caller heard / stereo: caller side | heard):")
        for name, path in sorted(report.get("recordings", {}).items()):
            say(f"  {name:<7} {path}")
        say(f"logs: {system.out}/*.log")
        if problems:
            say("\nDEMO FAILED:\n  - " + "\n  - ".join(problems))
            return 1
        say("\ndemo OK: greeting, a question answered, barge-in, hand-off to a human asked for in "
            "words with the stream kept up and transcribed, hang-up.")
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
    "say_start": "says", "dtmf": "presses", "hangup": "hangs up", "human_ringing": "rings",
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
            detail = (ev.get("keys") or (repr(ev["text"]) if ev.get("text") else "")
                      or (f"{ev['ms']} ms" if "ms" in ev else ""))
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
    if not audio:
        problems.append("the agent never spoke (no streamAudio received)")
    if not breaks:
        problems.append("no barge-in: the platform never received {'action': 'break'}")
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
        human = [e for e in events if e.get("src") == "human" and e.get("event") == "human_answered"]
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
    setup_logging("demo", level="WARNING", fmt="text")
    try:
        return run_demo(args)
    except RuntimeError as exc:
        say(f"demo: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130


# ------------------------------------------------------------------ up
UP_DESCRIPTION = """Run a whole local stack until Ctrl-C: a private Redis, the sandbox (the
platform), a gateway, a worker, a transcriber and a dialer, as child processes. Prints the
export lines that make `piopiy-voice call`, `status` and `control` work from
another terminal. Ctrl-C (or SIGTERM) stops every child: SIGTERM, then SIGKILL
after --grace seconds."""


def export_lines(system: LocalSystem) -> list[str]:
    """Shell lines giving another terminal this stack's Redis, dial queue and platform."""
    import shlex  # noqa: PLC0415

    env = {name: system.env[name] for name in
           ("REDIS_URL", "PV_DIAL_QUEUE", "PIOPIY_BASE_URL", "PIOPIY_ACTION_URL", "PIOPIY_CALLER_ID")}
    return ["export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())]


def up_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="piopiy-voice up", description=UP_DESCRIPTION)
    p.add_argument("--redis-url", help="use this Redis instead of a private embedded one "
                                       "(REDIS_URL in the environment is ignored: it may be a stale export)")
    p.add_argument("--gateway-port", type=int, default=0, help="gateway port (default: a free one)")
    p.add_argument("--sandbox-port", type=int, default=0, help="sandbox port (default: a free one)")
    p.add_argument("--scenario", default="demo",
                   help="the sandbox's scripted caller for placed calls (default demo; "
                        "per call: --param scenario=NAME)")
    p.add_argument("--report-dir", help="recordings, reports and logs (default: a new temp dir)")
    p.add_argument("--start-timeout", type=float, default=60.0, help="seconds for the roles to get ready")
    p.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL at stop")
    args = p.parse_args(argv)
    setup_logging("up", level="WARNING", fmt="text")
    out = Path(args.report_dir or tempfile.mkdtemp(prefix="pv-up-"))

    def _terminate(signum, _frame):  # SIGTERM stops the stack like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    system = None
    code = 0
    try:
        system = LocalSystem(out, args.redis_url, scenario=args.scenario, announce=say,
                             gateway_port=args.gateway_port or None,
                             sandbox_port=args.sandbox_port or None)
        system.supervisor.grace_s = args.grace
        system.start(args.start_timeout)
        say(f"\nlocal stack up: redis {redact_url(system.redis_url)}, sandbox {system.sandbox_url}, "
            f"gateway ws://127.0.0.1:{system.gateway_port}; logs in {system.out}")
        say("in another terminal:\n")
        for line in export_lines(system):
            say(line)
        say(f"piopiy-voice call --to {PERSON}        # prints the call id\n"
            "piopiy-voice status CALL_ID\n"
            "piopiy-voice control CALL_ID hangup\n\nCtrl-C stops everything.")
        while not system.supervisor.dead():
            time.sleep(0.5)
        for child in system.supervisor.dead():
            say(f"{child.name} exited ({child.proc.returncode}); stopping the stack:\n{child.tail()}")
        code = 1
    except KeyboardInterrupt:
        say("\nstopping...")
    except RuntimeError as exc:
        say(f"up: {exc}")
        code = 1
    finally:
        # Stopping: a second Ctrl-C / SIGTERM must not orphan children.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if system is not None:
            for name, rc in system.stop(args.grace).items():
                say(f"  {name:<8} exited {rc}")
    return code
