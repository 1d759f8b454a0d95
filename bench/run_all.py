"""Run every benchmark harness one after the other (``make bench``).

Each harness prints its own figures; see BENCHMARKS.md for what they mean.
They load both cores: run on an otherwise quiet machine.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: (script, arguments): each a few minutes at most (see BENCHMARKS.md for longer runs).
HARNESSES = [
    ("audio_bench.py", []),
    ("vad_bench.py", ["--engines", "energy-level,energy"]),
    ("worker_bench.py", ["--compare", "bench.legacy_agent:BeforeAgent"]),
    ("gateway_bench.py", []),
    ("bargein_bench.py", ["--calls", "100", "--seconds", "30"]),
    ("voice_bench.py", ["latency", "--calls", "25"]),
    ("voice_bench.py", ["intents"]),
]


def main() -> int:
    failed = []
    for name, argv in HARNESSES:
        print(f"\n=== {name} {' '.join(argv)} ===", flush=True)
        if subprocess.run([sys.executable, str(HERE / name), *argv], cwd=HERE.parent).returncode != 0:
            failed.append(f"{name} {' '.join(argv)}".strip())
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
