"""Sum py-spy raw (collapsed-stack) profiles per function: where a role's CPU goes.

    .venv/bin/python bench/pipecat_profile.py /tmp/prof/n25-ours-worker1.txt [...] [--top 25]
        [--group MODULE_PREFIX ...] [--idle-leaf 'runner.py:472)' ...]

Reads the files ``bench/pipecat_bench.py --profile DIR`` writes (one line per
distinct stack: ``frame;frame;...;leaf COUNT``). Samples whose leaf is a wait
in the kernel (``epoll_wait``, ``poll``, ``select``, a futex, ``nanosleep``;
only ``--native`` profiles have them) are idle and left out, so every share is
of the busy samples. Without ``--native`` a ``time.sleep`` shows as the Python
line that calls it: name such lines with ``--idle-leaf`` (a substring of the
raw leaf frame, line number included; e.g. the worker's batch-by-time sleep,
``runner.py:472)`` at 09dbb08). Prints, per file: the leaf functions by own samples
("self"), the functions by samples with them anywhere on the stack
("total"), and for each ``--group`` prefix (e.g. ``redis/``, ``websockets/``,
``speech/vad.py``) the share of busy samples with a frame from it on the
stack. A frame is ``function (file:line)``; lines are dropped to sum per
function.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter

IDLE_LEAVES = ("epoll_wait", "epoll_pwait", "poll (", "select (", "clock_nanosleep", "nanosleep",
               "pthread_cond_wait", "pthread_cond_timedwait", "futex", "sem_wait", "sem_timedwait")
_LINE = re.compile(r":\d+\)$")


def function_of(frame: str) -> str:
    """``fn (path/file.py:123)`` -> ``fn (path/file.py)``."""
    return _LINE.sub(")", frame.strip())


def parse(lines, idle_leaves: tuple[str, ...] = ()) -> list[tuple[list[str], int]]:
    """(stack of functions, count) per line; stacks whose raw leaf matches
    ``idle_leaves`` come back as ``["<idle>"]``."""
    out = []
    for line in lines:
        line = line.rstrip("\n")
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if any(k in frames[-1] for k in idle_leaves):
            out.append((["<idle>"], int(count)))
            continue
        out.append(([function_of(f) for f in frames], int(count)))
    return out


def is_idle(stack: list[str]) -> bool:
    leaf = stack[-1]
    if leaf == "<idle>":
        return True
    return any(k in leaf for k in IDLE_LEAVES) or leaf.startswith("0x") and "libc" in leaf and len(stack) > 1 \
        and any(k in " ".join(stack[-3:]) for k in ("wait", "sleep", "select", "_poll", "acquire"))


def summarize(stacks: list[tuple[list[str], int]], groups: list[str]) -> dict:
    busy = [(s, n) for s, n in stacks if not is_idle(s)]
    total = sum(n for _, n in busy)
    own, incl, grp = Counter(), Counter(), Counter()
    for s, n in busy:
        own[s[-1]] += n
        for f in set(s):
            incl[f] += n
        for g in groups:
            if any(g in f for f in s):
                grp[g] += n
    return {"samples": sum(n for _, n in stacks), "busy": total, "self": own, "total": incl, "groups": grp}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--group", action="append", default=[], help="module path prefix to total (repeatable)")
    ap.add_argument("--idle-leaf", action="append", default=[],
                    help="a raw leaf frame substring that is a sleep, not work (repeatable)")
    args = ap.parse_args(argv)
    for path in args.files:
        with open(path) as fh:
            s = summarize(parse(fh, tuple(args.idle_leaf)), args.group)
        busy = s["busy"] or 1
        print(f"== {path}: {s['samples']} samples, {s['busy']} busy")
        for title, counter in (("self", s["self"]), ("total", s["total"])):
            print(f"  -- {title}")
            for f, n in counter.most_common(args.top):
                print(f"  {n / busy * 100:5.1f}%  {f[:140]}")
        if args.group:
            print("  -- groups (busy samples with a frame from it)")
            for g in args.group:
                print(f"  {s['groups'][g] / busy * 100:5.1f}%  {g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
