import subprocess
import sys

from fp4serve import __version__
from fp4serve.cli import SUBCOMMANDS, main


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as exc:
        assert exc.code == 0
    assert __version__ in capsys.readouterr().out


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "fp4serve", "--help"], capture_output=True, text=True, check=True)
    for name in SUBCOMMANDS:
        assert name in out.stdout
