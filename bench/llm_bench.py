"""CPU of the chat-completions client per streamed token (the agent runtime's main cost).

    .venv/bin/python bench/llm_bench.py [--concurrent 4] [--rounds 40] [--tokens 80] [--compare-rev REV]

The fake OpenAI-compatible server of ``tests/fake_openai.py`` runs in its own
process (its CPU is not counted) and streams a reply of ``--tokens`` word
tokens with no delay; this process runs ``speech.llm.ChatClient.stream`` for
``--concurrent`` replies at a time, ``--rounds`` times (after 2 rounds of
warm-up), and prints CPU (``time.process_time``) per delta received. At 100
talking calls the worker's agent runtime spends most of its time here.

``--compare-rev REV`` runs the same measurement on the code of git revision
REV (``bench/revtree.py``) in a child process, alternating with this tree's,
twice each, so both see the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_SERVER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("fake_openai", sys.argv[1])
mod = importlib.util.module_from_spec(spec); sys.modules["fake_openai"] = mod; spec.loader.exec_module(mod)
fake = mod.FakeOpenAI()
fake.default = mod.Reply(text=" ".join(["word"] * int(sys.argv[2])) + ".", token_delay_s=0.0)
fake.requests = type("NoRecord", (), {"append": lambda self, x: None})()  # bounded memory
print(fake.base_url, flush=True)
sys.stdin.read()  # until the bench closes our stdin
"""


def measure(url: str, concurrent: int, rounds: int) -> tuple[int, float]:
    """(deltas received, CPU seconds) of ``rounds`` x ``concurrent`` streamed replies."""
    from piopiy_voice.speech.llm import ChatClient, LlmConfig

    cfg = LlmConfig.from_env({"PV_LLM_BASE_URL": url, "PV_LLM_MODEL": "fake",
                              "PV_LLM_FIRST_TOKEN_S": "5", "PV_LLM_TIMEOUT_S": "30"})

    async def run() -> tuple[int, float]:
        client = ChatClient(cfg)
        n = 0

        async def one() -> None:
            nonlocal n
            async for _ in client.stream([{"role": "user", "content": "hi"}]):
                n += 1

        for _ in range(2):
            await asyncio.gather(*[one() for _ in range(concurrent)])
        n = 0
        t0 = time.process_time()
        for _ in range(rounds):
            await asyncio.gather(*[one() for _ in range(concurrent)])
        return n, time.process_time() - t0

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # The fake server is a ThreadingHTTPServer (listen backlog 5): a few at a time.
    ap.add_argument("--concurrent", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=80)
    ap.add_argument("--compare-rev", metavar="REV")
    ap.add_argument("--url", help=argparse.SUPPRESS)  # internal: the --compare-rev child
    args = ap.parse_args(argv)
    if args.url:
        n, cpu = measure(args.url, args.concurrent, args.rounds)
        print(f"{n} {cpu}")
        return 0
    server = subprocess.Popen([sys.executable, "-c", _SERVER, str(ROOT / "tests" / "fake_openai.py"),
                               str(args.tokens)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        if not url.startswith("http://127.0.0.1:"):
            raise SystemExit("the fake model server did not start")
        runs: list[tuple[str, dict]] = [("working tree", dict(os.environ))]
        if args.compare_rev:
            from revtree import package_root

            code = str(package_root(args.compare_rev))
            runs.append((f"revision {args.compare_rev}", dict(os.environ, PYTHONPATH=code)))
        print(f"llm client bench: {args.concurrent} streams at a time x {args.rounds} rounds, "
              f"{args.tokens}-token replies; load average {os.getloadavg()[0]:.2f}")
        for _ in range(2 if args.compare_rev else 1):
            for label, env in runs:
                out = subprocess.run([sys.executable, __file__, "--url", url, "--concurrent",
                                      str(args.concurrent), "--rounds", str(args.rounds)],
                                     env=env, cwd="/", capture_output=True, text=True, check=True).stdout
                n, cpu = out.split()
                print(f"  {label}: {int(n)} deltas, {float(cpu) * 1e6 / int(n):.1f} us CPU per delta")
    finally:
        server.stdin.close()
        server.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
