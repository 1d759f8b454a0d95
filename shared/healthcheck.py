"""Container health check for every role: ``piopiy-voice healthcheck [ROLE] [--port N]``.

Exit 0 = healthy, 1 = unhealthy (the Docker HEALTHCHECK contract). One line
on stdout says why, so ``docker inspect`` shows something useful.

Checks, per role:
  gateway  GET /healthz on PV_GATEWAY_PORT (the process serves and its loop turns).
  sandbox  GET /sandbox/calls on PV_SANDBOX_PORT.
  api      GET /healthz on PV_API_PORT (``--port`` of the role wins).
  worker   GET /healthz on the worker's ``--metrics-port`` (200 while its decision
           loop turns), and a fresh heartbeat of this host's worker in Redis
           (the loop reaches Redis, not just the HTTP thread answering).
  transcriber  like the worker: GET /healthz on its ``--metrics-port`` (200 while
           its loop turns) and a fresh heartbeat of this host's transcriber in
           ``pv:transcribers`` (PV_TRANSCRIBER_ID, else ``asr-HOSTNAME-*``).
  dialer   Redis answers and an RQ worker of *this host* is registered; RQ lets
           the registration expire when heartbeats stop, so a wedged dialer
           turns unhealthy on its own.

With no ROLE (the image's default HEALTHCHECK) the role and its options are
read from the running ``piopiy-voice`` process's command line, so one image
serves every role without per-role images. Imports nothing of the project but
the key names (no settings parsing, no role code): a check must stay cheap.
The Redis checks need ``REDIS_URL`` (never a guessed server).
"""

from __future__ import annotations

import argparse
import os
import socket
import time
import urllib.error
import urllib.request

from piopiy_voice.keys import TRANSCRIBERS_ZSET, WORKERS_ZSET

ROLES = ("gateway", "worker", "transcriber", "api", "dialer", "sandbox")
#: Docker kills a check after its own timeout; stay under the usual 5 s.
TIMEOUT_S = 3.0


def find_role_argv(proc_root: str = "/proc") -> list[str] | None:
    """argv after ``piopiy-voice`` of the first running role process, if any."""
    try:
        pids = sorted(int(p) for p in os.listdir(proc_root) if p.isdigit())
    except OSError:
        return None
    for pid in pids:
        try:
            with open(os.path.join(proc_root, str(pid), "cmdline"), "rb") as fh:
                argv = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
        except OSError:
            continue
        for i, arg in enumerate(argv):
            # "piopiy-voice ROLE" as a script, or "python -m piopiy_voice.cli ROLE".
            if (os.path.basename(arg) == "piopiy-voice" or arg == "piopiy_voice.cli") and i + 1 < len(argv):
                if argv[i + 1] in ROLES:
                    return argv[i + 1 :]
    return None


def option_value(argv: list[str], name: str) -> str | None:
    """Value of ``--name V`` or ``--name=V`` in argv (last one wins, as in argparse)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def http_ok(url: str) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
            return 200 <= resp.status < 300, f"{url} -> {resp.status}"
    except urllib.error.HTTPError as exc:
        return False, f"{url} -> {exc.code}"
    except (OSError, ValueError) as exc:
        return False, f"{url} unreachable: {exc}"


def _port(explicit: int | None, argv: list[str], option: str, env: str, default: int) -> int:
    if explicit is not None:
        return explicit
    raw = option_value(argv, option) or os.environ.get(env) or str(default)
    return int(raw)


def check_dialer() -> tuple[bool, str]:
    import redis

    host = socket.gethostname()
    try:
        # (RQ's registry lives on the queue's Redis: PV_QUEUE_REDIS_URL when set)
        client = _redis(os.environ.get("PV_QUEUE_REDIS_URL") or None)
        for key in client.smembers("rq:workers"):
            if client.hget(key, "hostname") == host.encode():
                return True, f"rq worker {key.decode()} registered"
    except redis.RedisError as exc:
        return False, f"redis unreachable: {exc}"
    return False, f"no rq worker registered for host {host}"


def _redis(url: str | None = None):
    import redis  # the image installs it with the project

    url = url or os.environ.get("REDIS_URL")
    if not url:
        raise redis.ConnectionError("REDIS_URL is not set")
    from .redisconn import connect_once  # noqa: PLC0415

    try:
        # TLS, Sentinel and cluster URLs as the roles read them; no retry inside a 3 s probe.
        return connect_once(url, timeout_s=TIMEOUT_S)
    except ValueError as exc:  # PiopiyConfigError: a bad URL or CA/cert file, in one line
        raise redis.ConnectionError(str(exc)) from None
    except redis.RedisClusterException as exc:  # (not a RedisError) e.g. a cluster URL naming a plain server
        raise redis.ConnectionError(f"redis cluster: {exc}") from None


def check_worker_heartbeat(now: float | None = None) -> tuple[bool, str]:
    """A worker of this host renewed its entry in ``pv:workers`` recently.

    Matches PV_WORKER_ID exactly when set, else the default ``HOSTNAME-PID``
    ids of this host. Fresh = within 3 lease periods (at least 15 s).
    """
    return check_heartbeat("worker", WORKERS_ZSET, os.environ.get("PV_WORKER_ID"),
                           socket.gethostname() + "-", float(os.environ.get("PV_LEASE_MS") or 5000), now)


def check_transcriber_heartbeat(now: float | None = None) -> tuple[bool, str]:
    """Like ``check_worker_heartbeat`` for ``pv:transcribers`` (ids ``asr-HOSTNAME-PID``)."""
    return check_heartbeat("transcriber", TRANSCRIBERS_ZSET, os.environ.get("PV_TRANSCRIBER_ID"),
                           f"asr-{socket.gethostname()}-",
                           float(os.environ.get("PV_TRANSCRIBER_LEASE_MS") or 3000), now)


def check_heartbeat(what: str, zset: str, wanted: str | None, prefix: str, lease_ms: float,
                    now: float | None = None) -> tuple[bool, str]:
    """The newest member of ``zset`` named ``wanted`` (else starting with ``prefix``)
    renewed within 3 lease periods (at least 15 s)."""
    import redis

    max_age = max(15.0, 3 * lease_ms / 1000)
    now = time.time() if now is None else now
    try:
        members = _redis().zrange(zset, 0, -1, withscores=True)
    except redis.RedisError as exc:
        return False, f"redis unreachable: {exc}"
    # Newest first: a process killed earlier on this host (another pid) leaves
    # a stale entry that must not hide the live one.
    for member, score in sorted(members, key=lambda m: -m[1]):
        name = member.decode(errors="replace")
        if (name == wanted) if wanted else name.startswith(prefix):
            if now - score <= max_age:
                return True, f"{what} {name} heartbeat {now - score:.1f}s ago"
            return False, f"{what} {name} heartbeat stale ({now - score:.0f}s > {max_age:.0f}s)"
    return False, f"no {what} heartbeat for {wanted or prefix + '*'}"


def check(role: str, argv: list[str], port: int | None = None) -> tuple[bool, str]:
    if role == "gateway":
        p = _port(port, argv, "--port", "PV_GATEWAY_PORT", 8765)
        return http_ok(f"http://127.0.0.1:{p}/healthz")
    if role == "api":
        p = _port(port, argv, "--port", "PV_API_PORT", 8780)
        return http_ok(f"http://127.0.0.1:{p}/healthz")
    if role == "sandbox":
        p = _port(port, argv, "--port", "PV_SANDBOX_PORT", 8766)
        return http_ok(f"http://127.0.0.1:{p}/sandbox/calls")
    if role in ("worker", "transcriber"):
        if port is None and option_value(argv, "--metrics-port") is None:
            return False, f"{role} runs without --metrics-port: nothing to probe"
        p = _port(port, argv, "--metrics-port", "", 0)
        ok, why = http_ok(f"http://127.0.0.1:{p}/healthz")
        if not ok:
            return ok, why
        # The HTTP thread answers even when the main loop is stuck; the
        # heartbeat proves the loop (lease renewals) still turns.
        return check_worker_heartbeat() if role == "worker" else check_transcriber_heartbeat()
    if role == "dialer":
        return check_dialer()
    raise ValueError(f"role: unknown {role!r}, expected one of {', '.join(ROLES)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="piopiy-voice healthcheck",
                                     description="health check of a piopiy-voice role (exit 0 healthy, 1 not)")
    parser.add_argument("role", nargs="?", choices=ROLES, help="default: detected from the running process")
    parser.add_argument("--port", type=int, help="port to probe (default: from the process / env)")
    args = parser.parse_args(argv)
    if args.role:
        # Told the role: trust env and --port only. Scanning processes could
        # pick up another role's process when several share one host.
        role, role_argv = args.role, []
    else:
        running = find_role_argv() or []
        if not running:
            print("unhealthy: no piopiy-voice role process found")
            return 1
        role, role_argv = running[0], running[1:]
    ok, why = check(role, role_argv, args.port)
    print(("healthy: " if ok else "unhealthy: ") + why)
    return 0 if ok else 1

