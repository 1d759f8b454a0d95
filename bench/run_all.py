"""Run every benchmark harness one after the other (``make bench``).

Each harness prints its own figures; see BENCHMARKS.md for what they mean.
They load both cores: run on an otherwise quiet machine.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
HARNESSES = ["audio_bench.py", "worker_bench.py", "gateway_bench.py"]


def main() -> int:
    failed = []
    for name in HARNESSES:
        print(f"\n=== {name} ===", flush=True)
        if subprocess.run([sys.executable, str(HERE / name)], cwd=HERE.parent).returncode != 0:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
