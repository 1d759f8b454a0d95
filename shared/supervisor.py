"""One process supervisor for every local stack: ``demo``, ``up``, the compose runner, tests.

Theory of operation
-------------------
A ``Supervisor`` starts ``Child`` processes (each in its own session, so a
Ctrl-C in the terminal reaches only the supervisor, which then stops the
children in order), waits until each passes its readiness check, notices when
one dies, and stops them all: SIGTERM to each child's process group (last
started first), one shared grace period, then SIGKILL to whatever outlives it
(an RQ work horse included). ``stop()`` is idempotent and also runs at exit.

Children run the installed package (``python -m piopiy_voice.cli ROLE``): no
``PYTHONPATH`` games; the interpreter is this one unless told otherwise.
Output goes to a log file per child (``Child.tail()`` shows its end on failure).
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

#: Seconds a child gets between SIGTERM and SIGKILL.
DEFAULT_GRACE_S = 10.0


_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None) -> bool:
    """In a child process: SIGKILL when the thread that forked it ends (Linux
    ``PR_SET_PDEATHSIG``), so nothing it holds (sockets, ports) outlives a
    parent killed with SIGKILL. With ``parent_pid``, exit at once if that parent
    died before the request took effect. False where the kernel cannot do it."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes  # noqa: PLC0415

    try:
        if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(0)
    return True


def role_command(role: str, *args: str, python: str | None = None) -> list[str]:
    """The command line of one ``piopiy-voice`` role run by ``python`` (default: this one)."""
    return [python or sys.executable, "-m", "piopiy_voice.cli", role, *args]


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    cwd: str | None = None
    proc: subprocess.Popen | None = None

    def start(self) -> "Child":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                self.argv, env=self.env, cwd=self.cwd, stdout=log_file, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, n: int = 20) -> str:
        return "\n".join(self.log().splitlines()[-n:])

    def signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)  # its own session: pgid == pid
        except (ProcessLookupError, PermissionError):
            pass


@dataclass
class Supervisor:
    grace_s: float = DEFAULT_GRACE_S
    children: list[Child] = field(default_factory=list)

    def __post_init__(self) -> None:
        atexit.register(self.stop)

    def start(self, name: str, argv: list[str], env: Mapping[str, str], log_path: Path,
              cwd: str | None = None) -> Child:
        child = Child(name, list(argv), dict(env), Path(log_path), cwd).start()
        self.children.append(child)
        return child

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def dead(self) -> list[Child]:
        """Children that have exited."""
        return [c for c in self.children if c.proc is not None and not c.alive()]

    def wait_ready(self, checks: Mapping[str, Callable[[], bool]], timeout_s: float,
                   on_ready: Callable[[Child], None] | None = None, poll_s: float = 0.1) -> None:
        """Wait until every ``checks[name]()`` is true; RuntimeError (with the
        child's log tail) when one exits first or time runs out."""
        pending = dict(checks)
        deadline = time.monotonic() + timeout_s
        while pending:
            for name in list(pending):
                child = self.child(name)
                if not child.alive():
                    code = child.proc.returncode if child.proc else None
                    raise RuntimeError(f"{name} exited ({code}) during start-up:\n{child.tail()}")
                if pending[name]():
                    del pending[name]
                    if on_ready:
                        on_ready(child)
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {timeout_s:g}s: {', '.join(pending)}")
            if pending:
                time.sleep(poll_s)

    def stop(self, grace_s: float | None = None) -> dict[str, int | None]:
        """SIGTERM every live child (last started first), SIGKILL after the grace.
        Returns each child's exit code."""
        grace = self.grace_s if grace_s is None else grace_s
        running = [c for c in reversed(self.children) if c.alive()]
        for child in running:
            child.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in running:
            try:
                child.proc.wait(max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.signal_group(signal.SIGKILL)
                child.proc.wait(5)
        # Anything left in a child's group (a forked helper) goes too.
        for child in self.children:
            child.signal_group(signal.SIGKILL)
        return {c.name: (c.proc.returncode if c.proc else None) for c in self.children}

    def __enter__(self) -> "Supervisor":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
