"""The console command."""

import subprocess
import sys

import pytest

from doublesparse.cli import SUBCOMMANDS, build_parser


def test_help_lists_every_subcommand():
    result = subprocess.run(
        [sys.executable, "-m", "doublesparse.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for name in SUBCOMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([name, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip()
