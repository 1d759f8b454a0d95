"""One command, one subcommand per role: each resolves to a real entry point with --help."""

import pytest

from shared import cli


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
