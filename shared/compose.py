"""Run docker-compose.yml's roles as plain local processes (no Docker engine).

Used by the deployment tests, and by hand to try a scaled layout on one box::

    python -m piopiy_voice.compose gateway=2 worker=2 transcriber dialer sandbox
    python deploy/compose_runner.py gateway=2 ...      (the same, from a checkout)

How a compose service becomes local processes:
- ``command: ["piopiy-voice", ROLE, ...]`` runs as ``python -m piopiy_voice.cli ROLE ...``
  (the same dispatcher the console script calls); services whose command is not
  ``piopiy-voice`` are third party (redis, caddy, prometheus, grafana,
  redis-exporter: an image's own command, or none) and are not run: Redis is
  given as a URL, and the roles are reached directly, not through caddy.
- ``environment`` is taken after compose interpolation (``${VAR:-default}``,
  ``${VAR-default}``, ``${VAR:?msg}``, ``$VAR``, ``$$``) against the mapping the
  caller passes (what ``.env`` would hold), so the values tested are the ones
  compose would hand the container.
- Service names become 127.0.0.1: every ``//NAME:PORT`` in an env value (NAME a
  service of the run, PORT one it exposes) points at the local address instead.
  Each replica listens on a free port: an env var ``*_PORT`` or a ``--...port``
  argument equal to the exposed port is rewritten to it, ``0.0.0.0`` becomes
  127.0.0.1. A service run with several replicas gets a round-robin TCP proxy
  as its address, like the DNS round robin / load balancer in front of
  replicas in compose or Kubernetes.
- ``REDIS_URL`` is the given Redis (``--redis-url``/``REDIS_URL``, else a
  private embedded server, announced: never whatever answers on 6379); named
  volume mount points in env values become directories under the run's work dir.
- Compose ``secrets:`` a service lists are files: an env value naming the
  mount point (``/run/secrets/NAME``, or the long form's ``target``) becomes
  the secret's ``file:`` (relative to the compose file's directory), so the
  roles read the very files compose would mount.
- Start order follows ``depends_on``; a service is started once the services
  it depends on pass their compose health check (the same ``piopiy-voice
  healthcheck`` command, run locally with the replica's env and ports).
- Processes are ``piopiy_voice.supervisor`` children: own process group each,
  SIGTERM at ``down()``, SIGKILL after ``stop_timeout_s``.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from piopiy_voice.errors import PiopiyConfigError
from piopiy_voice.redisconn import free_port, redact_url, resolve_redis_url
from piopiy_voice.supervisor import Child, Supervisor, role_command

ENTRY = "piopiy-voice"
DEFAULT_COMPOSE = "docker-compose.yml"
LOOPBACK = "127.0.0.1"

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


class ComposeError(PiopiyConfigError):
    """The compose file asks for something this runner cannot reproduce."""


def _yaml() -> Any:
    try:
        import yaml  # noqa: PLC0415  (a dev dependency: only this tool needs it)
    except ImportError:
        raise ComposeError("the compose runner needs PyYAML: pip install 'piopiy-voice[dev]'") from None
    return yaml


def interpolate(value: str, env: Mapping[str, str], where: str = "value") -> str:
    """Compose-style variable substitution of one string."""

    def sub(m: re.Match) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("braced") or m.group("named")
        op, arg = m.group("op"), m.group("arg") or ""
        present = name in env
        val = env.get(name, "")
        if op == ":-":
            return val if val else arg
        if op == "-":
            return val if present else arg
        if op in (":?", "?") and (not present or (op == ":?" and not val)):
            raise ComposeError(f"{where}: required variable {name} is not set: {arg}")
        return val

    return _VAR.sub(sub, value)


def variables_used(text: str) -> dict[str, str | None]:
    """Every ``${VAR...}``/``$VAR`` in a compose file's values -> its default (or None).

    Only YAML values count (comments are not interpolated by compose).
    """
    found: dict[str, str | None] = {}

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(k)
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str):
            for m in _VAR.finditer(node):
                name = m.group("braced") or m.group("named")
                if name:
                    default = m.group("arg") if m.group("op") in (":-", "-") else None
                    found.setdefault(name, default)

    walk(_yaml().safe_load(text))
    return found


def _interp_tree(node, env, where):
    if isinstance(node, str):
        return interpolate(node, env, where)
    if isinstance(node, list):
        return [_interp_tree(v, env, where) for v in node]
    if isinstance(node, dict):
        return {k: _interp_tree(v, env, f"{where}.{k}") for k, v in node.items()}
    return node


def _as_list(command) -> list[str]:
    if command is None:
        return []
    if isinstance(command, str):
        return shlex.split(command)
    return [str(c) for c in command]


class ComposeFile:
    """A parsed, interpolated compose file (YAML anchors and merge keys resolved)."""

    def __init__(self, path: str | Path = DEFAULT_COMPOSE, environ: Mapping[str, str] | None = None):
        self.path = Path(path)
        raw = _yaml().safe_load(self.path.read_text())
        if not isinstance(raw, dict) or not isinstance(raw.get("services"), dict):
            raise ComposeError(f"{self.path}: no services mapping")
        self.environ = dict(environ or {})
        self.services: dict[str, dict] = {
            name: _interp_tree(spec or {}, self.environ, f"services.{name}")
            for name, spec in raw["services"].items()
        }
        self.secrets: dict[str, dict] = {
            name: _interp_tree(spec or {}, self.environ, f"secrets.{name}")
            for name, spec in (raw.get("secrets") or {}).items()
        }

    def service(self, name: str) -> dict:
        try:
            return self.services[name]
        except KeyError:
            raise ComposeError(f"service: unknown {name!r} (have {', '.join(self.services)})") from None

    def command(self, name: str) -> list[str]:
        return _as_list(self.service(name).get("command"))

    def role_argv(self, name: str) -> list[str] | None:
        """``[ROLE, *args]`` if the service runs ``piopiy-voice``, else None."""
        cmd = self.command(name)
        if cmd and os.path.basename(cmd[0]) == ENTRY:
            return cmd[1:]
        return None

    def environment(self, name: str) -> dict[str, str]:
        env = self.service(name).get("environment") or {}
        if isinstance(env, list):  # ["KEY=VAL", "KEY"] form
            out = {}
            for item in env:
                key, sep, val = str(item).partition("=")
                out[key] = val if sep else self.environ.get(key, "")
            return out
        return {str(k): "" if v is None else str(v) for k, v in env.items()}

    def exposed_ports(self, name: str) -> list[int]:
        ports = [int(str(p).split("/")[0]) for p in self.service(name).get("expose") or []]
        for p in self.service(name).get("ports") or []:
            target = p.get("target") if isinstance(p, dict) else str(p).rsplit(":", 1)[-1].split("/")[0]
            if target is not None and int(target) not in ports:
                ports.append(int(target))
        return ports

    def depends_on(self, name: str) -> list[str]:
        deps = self.service(name).get("depends_on") or []
        return list(deps) if isinstance(deps, (list, dict)) else []

    def volume_targets(self, name: str) -> dict[str, str]:
        """Container path -> volume name, for named volumes (bind mounts are skipped)."""
        out = {}
        for v in self.service(name).get("volumes") or []:
            if isinstance(v, str):
                parts = v.split(":")
                if len(parts) >= 2 and not parts[0].startswith((".", "/", "~")):
                    out[parts[1]] = parts[0]
            elif isinstance(v, dict) and v.get("type", "volume") == "volume":
                out[v["target"]] = v.get("source") or "anon"
        return out

    def secret_files(self, name: str) -> dict[str, Path]:
        """Mount point -> host file, for the file secrets service ``name`` lists."""
        out = {}
        for item in self.service(name).get("secrets") or []:
            source = item if isinstance(item, str) else item["source"]
            target = source if isinstance(item, str) else item.get("target", source)
            spec = self.secrets.get(source)
            if not spec or "file" not in spec:
                raise ComposeError(f"service {name}: secret {source!r} is not a file secret of this compose file")
            mount = target if target.startswith("/") else f"/run/secrets/{target}"
            out[mount] = (self.path.parent / spec["file"]).resolve()
        return out

    def healthcheck(self, name: str) -> list[str] | None:
        test = (self.service(name).get("healthcheck") or {}).get("test")
        if not test or test == ["NONE"]:
            return None
        if isinstance(test, str):
            return ["CMD-SHELL", test]
        return [str(t) for t in test]


class RoundRobinProxy:
    """TCP proxy on loopback spreading connections over backends in turn."""

    def __init__(self, backends: list[int]):
        if not backends:
            raise ValueError("backends: empty")
        self.backends = list(backends)
        self._next = itertools.cycle(self.backends)
        self.connections: dict[int, int] = dict.fromkeys(self.backends, 0)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        if not started.wait(5):
            raise RuntimeError("proxy did not start")

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)

        async def boot():
            self._server = await asyncio.start_server(self._handle, LOOPBACK, 0)
            self.port = self._server.sockets[0].getsockname()[1]
            started.set()

        self._loop.run_until_complete(boot())
        self._loop.run_forever()

    async def _handle(self, reader, writer):
        backend = next(self._next)
        try:
            up_r, up_w = await asyncio.open_connection(LOOPBACK, backend)
        except OSError:
            writer.close()
            return
        self.connections[backend] += 1

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                try:
                    dst.close()
                except OSError:
                    pass

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    def close(self) -> None:
        """Stop listening, cut the piped connections, end the loop thread."""

        async def stop():
            if self._server:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loop.stop()

        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(stop(), self._loop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self._loop.close()


@dataclass
class Replica:
    service: str
    index: int
    argv: list[str]
    env: dict[str, str]
    port_map: dict[int, int]
    log_path: Path
    child: Child | None = None

    @property
    def name(self) -> str:
        return f"{self.service}-{self.index}"

    @property
    def proc(self) -> subprocess.Popen | None:
        return self.child.proc if self.child else None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class LocalStack:
    """Start compose services as local processes; stop them all on exit.

    ``scale`` maps service -> replicas. ``base_env`` is the child processes'
    starting environment (PATH...); compose's own environment is laid over
    it, then the local rewrites. The roles run the package ``python`` has
    installed (as in the image): no source path is injected.
    """

    compose: ComposeFile
    redis_url: str
    base_env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    work_dir: Path | None = None
    stop_timeout_s: float = 15.0
    #: Interpreter of the roles (runs what it has installed).
    python: str = sys.executable
    supervisor: Supervisor = field(default_factory=Supervisor)
    replicas: dict[str, list[Replica]] = field(default_factory=dict)
    addresses: dict[str, dict[int, int]] = field(default_factory=dict)
    proxies: dict[str, RoundRobinProxy] = field(default_factory=dict)

    def __post_init__(self):
        if self.work_dir is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix="pv-stack-"))
        self.work_dir = Path(self.work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)

    # -- planning ---------------------------------------------------------
    def plan(self, scale: Mapping[str, int]) -> None:
        """Allocate every replica's ports and each service's address."""
        for name, n in scale.items():
            if not isinstance(n, int) or n < 1:
                raise ComposeError(f"scale[{name}]: need a positive int, got {n!r}")
            if self.compose.role_argv(name) is None:
                raise ComposeError(f"service {name}: command is not {ENTRY} (got {self.compose.command(name)})")
        ports: dict[str, list[dict[int, int]]] = {}
        # Every address first: a service's env may name any other service.
        for name, n in scale.items():
            exposed = self.compose.exposed_ports(name)
            ports[name] = per_replica = [{p: free_port() for p in exposed} for _ in range(n)]
            if n == 1:
                self.addresses[name] = dict(per_replica[0])
            else:
                addr = {}
                for p in exposed:
                    proxy = RoundRobinProxy([m[p] for m in per_replica])
                    self.proxies[f"{name}:{p}"] = proxy
                    addr[p] = proxy.port
                self.addresses[name] = addr
        for name, per_replica in ports.items():
            self.replicas[name] = [self._replica(name, i, m) for i, m in enumerate(per_replica)]

    def _rewrite(self, value: str, volumes: dict[str, Path], secrets: dict[str, Path]) -> str:
        if value in secrets:
            return str(secrets[value])
        for svc, ports in self.addresses.items():
            for container_port, local in ports.items():
                value = value.replace(f"//{svc}:{container_port}", f"//{LOOPBACK}:{local}")
        for target, local_dir in volumes.items():
            if value == target or value.startswith(target + "/"):
                value = str(local_dir) + value[len(target):]
        if value == "0.0.0.0":
            value = LOOPBACK
        return value

    def _map_args(self, argv: list[str], port_map: dict[int, int]) -> list[str]:
        out = [LOOPBACK if a == "0.0.0.0" else a for a in argv]
        for i, arg in enumerate(out):
            if arg.startswith("--") and "port" in arg:
                if "=" in arg:
                    opt, val = arg.split("=", 1)
                    if val.isdigit() and int(val) in port_map:
                        out[i] = f"{opt}={port_map[int(val)]}"
                elif i + 1 < len(out) and out[i + 1].isdigit() and int(out[i + 1]) in port_map:
                    out[i + 1] = str(port_map[int(out[i + 1])])
        return out

    def _replica(self, name: str, index: int, port_map: dict[int, int]) -> Replica:
        volumes = {}
        for target, vol in self.compose.volume_targets(name).items():
            d = self.work_dir / f"{name}-{index}" / vol
            d.mkdir(parents=True, exist_ok=True)
            volumes[target] = d
        secrets = self.compose.secret_files(name)
        env = dict(self.base_env)
        for key, val in self.compose.environment(name).items():
            val = self._rewrite(val, volumes, secrets)
            if key.endswith("_PORT") and val.isdigit() and int(val) in port_map:
                val = str(port_map[int(val)])
            env[key] = val
        env["REDIS_URL"] = self.redis_url
        argv = self._map_args(self.compose.role_argv(name) or [], port_map)
        log_path = self.work_dir / f"{name}-{index}.log"
        return Replica(name, index, argv, env, port_map, log_path)

    # -- running ----------------------------------------------------------
    def start_order(self) -> list[str]:
        order: list[str] = []
        seen: set[str] = set()

        def visit(name, stack=()):
            if name in seen or name not in self.replicas:
                return
            if name in stack:
                raise ComposeError(f"depends_on cycle through {name}")
            for dep in self.compose.depends_on(name):
                visit(dep, stack + (name,))
            seen.add(name)
            order.append(name)

        for name in self.replicas:
            visit(name)
        return order

    def up(self, scale: Mapping[str, int], *, health_timeout_s: float = 30.0) -> "LocalStack":
        self.plan(scale)
        for name in self.start_order():
            for rep in self.replicas[name]:
                self._spawn(rep)
            self.wait_healthy(name, timeout_s=health_timeout_s)
        return self

    def _spawn(self, rep: Replica) -> None:
        rep.child = self.supervisor.start(rep.name, role_command(*rep.argv, python=self.python),
                                          rep.env, rep.log_path, cwd=str(self.work_dir))

    def health_command(self, rep: Replica) -> list[str] | None:
        test = self.compose.healthcheck(rep.service)
        if test is None:
            return None
        if test[0] != "CMD":
            raise ComposeError(f"service {rep.service}: only exec-form CMD health checks are reproduced")
        args = test[1:]
        if args[:2] == [ENTRY, "healthcheck"]:
            return role_command("healthcheck", *self._map_args(args[2:], rep.port_map), python=self.python)
        raise ComposeError(f"service {rep.service}: unknown health check {test}")

    def healthy(self, rep: Replica) -> tuple[bool, str]:
        if rep.proc is None or rep.proc.poll() is not None:
            code = None if rep.proc is None else rep.proc.returncode
            return False, f"{rep.name} exited ({code}):\n{rep.log()[-3000:]}"
        cmd = self.health_command(rep)
        if cmd is None:
            return True, "no health check"
        res = subprocess.run(cmd, env=rep.env, capture_output=True, text=True, timeout=10)
        return res.returncode == 0, (res.stdout + res.stderr).strip()

    def wait_healthy(self, name: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        for rep in self.replicas[name]:
            while True:
                ok, why = self.healthy(rep)
                if ok:
                    break
                if rep.proc is None or rep.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{rep.name} not healthy: {why}\n--- log ---\n{rep.log()[-3000:]}")
                time.sleep(0.2)

    def url(self, service: str, container_port: int, scheme: str = "http") -> str:
        return f"{scheme}://{LOOPBACK}:{self.addresses[service][container_port]}"

    def all_replicas(self) -> list[Replica]:
        return [r for reps in self.replicas.values() for r in reps]

    def down(self) -> dict[str, int | None]:
        """SIGTERM every replica (last started first), SIGKILL what outlives the timeout."""
        codes = self.supervisor.stop(self.stop_timeout_s)
        for proxy in self.proxies.values():
            proxy.close()
        self.proxies.clear()
        return {rep.name: codes.get(rep.name) for rep in self.all_replicas()}

    def __enter__(self) -> "LocalStack":
        return self

    def __exit__(self, *exc) -> None:
        self.down()


def load_env_file(path: Path) -> dict[str, str]:
    """A compose ``.env`` file: KEY=VALUE lines, # comments, optional quotes."""
    out: dict[str, str] = {}
    if not path.exists():
        return out
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, val = line.partition("=")
        if not sep:
            raise ComposeError(f"{path}:{n}: expected KEY=VALUE")
        val = val.strip()
        if len(val) >= 2 and val[0] == val[-1] and val[0] in "'\"":
            val = val[1:-1]
        out[key.strip()] = val
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("services", nargs="+", help="SERVICE or SERVICE=REPLICAS")
    parser.add_argument("--file", default=DEFAULT_COMPOSE)
    parser.add_argument("--redis-url", default=None, help="default: REDIS_URL, else a private embedded server")
    args = parser.parse_args(argv)
    scale = {}
    for item in args.services:
        name, _, n = item.partition("=")
        scale[name] = int(n or 1)
    environ = {**load_env_file(Path(args.file).with_name(".env")), **os.environ}
    compose = ComposeFile(args.file, environ)
    redis_url = resolve_redis_url(args.redis_url, local=True)
    print(f"redis: {redact_url(redis_url)}", flush=True)
    stack = LocalStack(compose, redis_url)

    def _stop(signum, frame):  # SIGTERM (kill, timeout, a supervisor) stops the roles like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    with stack:
        try:  # a SIGTERM at any point from here on stops the roles and exits 0
            stack.up(scale)
            for name, addr in stack.addresses.items():
                print(f"{name}: {len(stack.replicas[name])} replica(s) "
                      + " ".join(f"{p}->{LOOPBACK}:{lp}" for p, lp in addr.items()), flush=True)
            print(f"logs in {stack.work_dir}; Ctrl-C (or SIGTERM) stops", flush=True)
            while all(r.proc.poll() is None for r in stack.all_replicas()):
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # stopping: a second signal must not orphan roles
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return 0


if __name__ == "__main__":
    sys.exit(main())
