"""The ``refattn`` command."""
import subprocess
import sys

import refattn as ra
from refattn.cli import main


def test_list_prints_every_registered_mechanism(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["name", "family", "kind", "time", "state", "causal", "masks", "GQA",
                      "streaming"]
    for name, spec in ra.mechanisms().items():
        row = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert spec.family in row and ("exact" if spec.exact else "approximate") in row
    assert f"{len(ra.mechanisms())} mechanisms registered." in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "list" in capsys.readouterr().err


def test_console_script_runs():
    done = subprocess.run([sys.executable, "-m", "refattn.cli", "list"], capture_output=True,
                          text=True, check=True)
    assert "tiled_attention" in done.stdout
