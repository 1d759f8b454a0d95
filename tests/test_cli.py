"""One command, one subcommand per role: each resolves to a real entry point with --help."""

import pytest

from piopiy_voice import cli


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_subcommand_has_its_own_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([name, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "--help" in out


def test_top_level_help_lists_every_command(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert f"  {name}" in out


def test_unknown_command_is_an_error(capsys):
    assert cli.main(["dial-everyone"]) == 2
    assert "unknown command 'dial-everyone'" in capsys.readouterr().err


# A subcommand printing far more than a pipe buffer, into a pipe closed early
# (``piopiy-voice status ID | head -3``): no traceback, exit status 0.
_BIG_OUTPUT = """
import sys, types
from piopiy_voice import cli
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
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.Popen([sys.executable, "-c", _BIG_OUTPUT], cwd=Path(__file__).resolve().parent.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(30) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
