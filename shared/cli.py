"""``piopiy-voice``: one command, one subcommand per role.

Each subcommand lives with its component as ``main(argv) -> int`` with its own
argparse (so ``piopiy-voice gateway --help`` is the gateway's own help); this
module only dispatches, importing the component lazily so that starting one
role never imports another's dependencies.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("piopiy_voice.sandbox.demo:main", "run the whole system locally and place one scripted call"),
    "gateway": ("piopiy_voice.gateway.server:main", "serve the platform's call WebSockets"),
    "worker": ("piopiy_voice.workers.runner:main", "run the conversational agent for calls"),
    "dialer": ("piopiy_voice.workers.dialer.cli:worker_main", "RQ worker that places queued calls"),
    "call": ("piopiy_voice.workers.dialer.cli:call_main", "enqueue one outbound call"),
    "campaign": ("piopiy_voice.workers.dialer.cli:campaign_main", "enqueue a CSV of contacts / show progress"),
    "status": ("piopiy_voice.workers.dialer.cli:status_main", "show the whole life of one call"),
    "control": ("piopiy_voice.gateway.control:main", "steer a live call: pause, resume, interrupt, hangup..."),
    "sandbox": ("piopiy_voice.sandbox.server:main", "local Piopiy emulator (REST + scripted callers)"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: piopiy-voice <command> [options]   (piopiy-voice <command> --help)", "", "commands:"]
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
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"piopiy-voice: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        return int(resolve(name)(rest) or 0)
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
