"""``piopiy-voice``: one command, one subcommand per role.

Each subcommand lives with its component as ``main(argv) -> int`` with its own
argparse (so ``piopiy-voice gateway --help`` is the gateway's own help); this
module only dispatches, importing the component lazily so that starting one
role never imports another's dependencies.

A new role is one line in ``COMMANDS``: name -> (``module:function``, help).
Long-running roles (every command not in ``CLIENT_COMMANDS``) get the one log
setup (``observability.setup_logging``: ``PV_LOG_LEVEL``, ``PV_LOG_FORMAT``
text|json with role/instance/call_id) before their ``main`` runs.
``piopiy-voice --version`` prints the installed version.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("piopiy_voice.sandbox.demo:main", "run the whole system locally and place one scripted call"),
    "gateway": ("piopiy_voice.gateway.server:main", "serve the platform's call WebSockets"),
    "worker": ("piopiy_voice.workers.runner:main", "run the conversational agent for calls"),
    "transcriber": ("piopiy_voice.speech.transcriber_role:main",
                    "speech recognition: transcribe the calls' audio into their streams"),
    "api": ("piopiy_voice.api.server:main",
            "HTTP API: list, listen to and steer calls, answer inbound calls, supervisor console"),
    "dialer": ("piopiy_voice.workers.dialer.cli:worker_main", "RQ worker that places queued calls"),
    "call": ("piopiy_voice.workers.dialer.cli:call_main", "enqueue one outbound call"),
    "campaign": ("piopiy_voice.workers.dialer.cli:campaign_main", "enqueue a CSV of contacts / show progress"),
    "status": ("piopiy_voice.workers.dialer.cli:status_main", "show the whole life of one call"),
    "control": ("piopiy_voice.gateway.control:main", "steer a live call: pause, resume, interrupt, hangup..."),
    "sandbox": ("piopiy_voice.sandbox.server:main", "local Piopiy emulator (REST + scripted callers)"),
    "up": ("piopiy_voice.sandbox.demo:up_main", "run a whole local stack until Ctrl-C; prints its export lines"),
    "healthcheck": ("piopiy_voice.healthcheck:main", "container health check of a running role (exit 0/1)"),
}

#: One-shot commands: they print for a person, so no role log setup.
CLIENT_COMMANDS = frozenset({"call", "campaign", "status", "control", "healthcheck", "demo", "up"})


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: piopiy-voice [--version] <command> [options]   (piopiy-voice <command> --help)",
             "", "commands:"]
    lines += [f"  {name.ljust(width)}  {desc}" for name, (_, desc) in COMMANDS.items()]
    return "\n".join(lines)


def resolve(name: str):
    target, _ = COMMANDS[name]
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if args[0] in ("-V", "--version"):
        from piopiy_voice import __version__  # noqa: PLC0415

        print(f"piopiy-voice {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"piopiy-voice: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if name not in CLIENT_COMMANDS and not {"-h", "--help"} & set(rest):
        from piopiy_voice.observability import setup_logging  # noqa: PLC0415

        setup_logging(name)
    try:
        return int(resolve(name)(rest) or 0)
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
