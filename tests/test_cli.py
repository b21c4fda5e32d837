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
    every = ra.mechanisms(all_inputs=True)
    for name, spec in every.items():
        mark = "" if spec.inputs == ("q", "k", "v") else "*"
        row = next(line for line in out.splitlines() if line.startswith(name + mark + " "))
        assert spec.family in row and ("exact" if spec.exact else "approximate") in row
    assert f"{len(every)} mechanisms registered." in out
    assert len(every) > len(ra.mechanisms())           # MLA: inputs other than q, k, v
    assert "* mla_attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv)" in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "list" in capsys.readouterr().err


def test_console_script_runs():
    done = subprocess.run([sys.executable, "-m", "refattn.cli", "list"], capture_output=True,
                          text=True, check=True)
    assert "tiled_attention" in done.stdout


def test_mask_command_writes_a_png(tmp_path, capsys):
    out = tmp_path / "m.png"
    assert main(["mask", "causal() & sliding_window(8) | sinks(2)", "--n", "40", "--m", "48",
                 "--block", "8", "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(causal() & sliding_window(8)) | sinks(2), N=40, M=48" in capsys.readouterr().out


def test_mask_command_explains_a_bad_expression(capsys):
    assert main(["mask", "window(3)", "-o", "unused.png"]) == 2
    err = capsys.readouterr().err
    assert "cannot build a mask from 'window(3)'" in err and "sliding_window" in err
    assert main(["mask", "3 + 4"]) == 2
    assert "is a int, not a mask" in capsys.readouterr().err


def test_state_sizes_table(capsys):
    assert main(["state-sizes", "--heads-q", "4", "--heads-kv", "2", "--d", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    full = next(line for line in lines if line.startswith("attention "))
    # full KV cache: 2 heads x (8 + 8) float64 per token, growing linearly
    assert "0.24 MiB" in full and "244.14 MiB" in full
    window = next(line for line in lines if line.startswith("sink_attention "))
    assert len(set(window.split()[1::2])) == 1          # constant
