"""The ``piopiy-voice`` dispatcher."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A subcommand printing far more than a pipe buffer, into a pipe closed early
# (``piopiy-voice status ID | head -3``): no traceback, exit status 0.
SCRIPT = """
import sys, types
from shared import cli
mod = types.ModuleType("pv_fake_cmd")
def big(argv):
    for i in range(100000):
        print("line", i)
    return 0
mod.main = big
sys.modules["pv_fake_cmd"] = mod
cli.COMMANDS["big"] = ("pv_fake_cmd:main", "prints a lot")
sys.exit(cli.main(["big"]))
"""


def test_output_piped_into_head_is_not_an_error():
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(30) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
