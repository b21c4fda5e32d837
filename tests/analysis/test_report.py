"""refattn report: deterministic for a seed, reproduces the committed report, and fails
clearly on bad presets, unwritable directories and unreachable schedulers."""
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from refattn.analysis.report import PRESETS, Preset, ReportError, build_report
from refattn.analysis.sweep import COST_VARIABLES
from refattn.cli import main

ROOT = Path(__file__).resolve().parents[2]
TINY = Preset(n=32, budgets=(4, 8), seeds=(0,), entropy_budget=8,
              temperatures=(0.1, 1.0, 8.0), minilm_tokens=24, kernel_ms=(8,),
              kernel_trials=300, complexity_ns=(64, 128), real_tokens=16, real_texts=1,
              real_budgets=(4, 8), real_seeds=(0,), quality_docs=4,
              quality_query_tokens=4, quality_passage_tokens=8, quality_budgets=(2, 4, 8),
              quality_mechanisms=("sliding_window_attention", "topk_attention",
                                  "performer_attention"), headline_budget=8)
#: Variables measuring the machine and the run (timings; traced memory varies by a few
#: hundred bytes from run to run), not the preset and seed: the fits of both and their
#: verdicts.
MACHINE = set(COST_VARIABLES) | {"time_s", "peak_bytes"} | {
    f"{what}_{part}" for what in ("time", "memory")
    for part in ("exponent", "ci_low", "ci_high", "r2", "flag", "text")}


def _data(directory):
    out = {}
    for path in sorted(Path(directory).glob("*.nc")):
        with xr.open_dataset(path, engine="scipy") as ds:
            out[path.name] = ds.drop_vars([v for v in ds.data_vars if v in MACHINE]).load()
    return out


def _same(a, b, rtol):
    assert a.keys() == b.keys()
    for name in a:
        for var in a[name].data_vars:
            x, y = a[name][var].values, b[name][var].values
            if x.dtype.kind in "fc":
                np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-300, equal_nan=True,
                                           err_msg=f"{name}:{var}")
            else:
                np.testing.assert_array_equal(x, y, err_msg=f"{name}:{var}")


@pytest.mark.slow
def test_the_report_is_deterministic_for_a_seed(tmp_path):
    pytest.importorskip("safetensors")
    first = build_report(tmp_path / "a", preset=TINY, seed=3, workers=1)
    build_report(tmp_path / "b", preset=TINY, seed=3, workers=1)
    text = first.read_text()
    for section in ("Summary", "Error vs cost", "Error on real attention",
                    "Quality a real model loses", "entropy", "MiniLM", "Performer",
                    "Complexity", "state sizes in bf16", "Published facts"):
        assert section in text
    assert "**Chance accuracy: 25.0%;**" in text and "| exact (MiniLM-L6) | all |" in text
    for png in ("cost_axis", "pareto", "entropy", "minilm_spectrum", "kernel_fidelity",
                "complexity"):
        assert (tmp_path / "a" / f"{png}.png").stat().st_size > 10_000
    _same(_data(tmp_path / "a"), _data(tmp_path / "b"), rtol=0)
    other = build_report(tmp_path / "c", preset=TINY, seed=4, workers=1,
                         mechanisms=["attention", "topk_attention", "nystrom_attention"])
    assert "Skipped: needs a sparse" in other.read_text()
    with xr.open_dataset(other.parent / "pareto.nc", engine="scipy") as c, \
            xr.open_dataset(tmp_path / "a" / "pareto.nc", engine="scipy") as a:
        pick = dict(mechanism="topk_attention")
        assert c.mechanism.values.tolist() == ["topk_attention", "nystrom_attention",
                                               "attention"]
        assert not np.allclose(a.output_rel_fro.sel(**pick), c.output_rel_fro.sel(**pick))


@pytest.mark.slow
def test_regenerating_the_committed_quick_report_reproduces_its_numbers(tmp_path):
    """``reports/quick`` was made by ``refattn report --out reports/quick``."""
    pytest.importorskip("safetensors")
    committed = ROOT / "reports" / "quick"
    if not (committed / "index.md").is_file():
        pytest.skip("no committed report")
    build_report(tmp_path, preset="quick", seed=0)
    new, old = _data(tmp_path), _data(committed)
    if old["minilm_spectrum.nc"].attrs["text"] != new["minilm_spectrum.nc"].attrs["text"]:
        # the text is the stdlib's docstrings: another Python version reads other text
        for name in ("minilm_spectrum.nc", "real_attention.nc", "model_quality.nc"):
            new.pop(name, None), old.pop(name, None)
    _same(new, old, rtol=1e-9)     # BLAS may round differently on another CPU


def test_bad_preset_and_directory_are_reported(tmp_path):
    with pytest.raises(ReportError, match="unknown preset 'huge'; choose one of"):
        build_report(tmp_path, preset="huge")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ReportError, match="cannot write the report to"):
        build_report(blocker / "sub", preset=TINY)
    assert main(["report", "--preset", "huge", "--out", str(tmp_path)]) == 2
    with pytest.raises(ReportError, match=r"unknown mechanism\(s\) \['flash'\]; registered"):
        build_report(tmp_path, preset=TINY, mechanisms=["attention", "flash"])
    assert main(["report", "--mechanisms", "attention,flash", "--out", str(tmp_path)]) == 2
    with pytest.raises(ReportError, match="unknown state dtype 'int4'; choose one of"):
        build_report(tmp_path, preset=TINY, state_dtype="int4")
    assert main(["report", "--state-dtype", "int4", "--out", str(tmp_path)]) == 2
    assert set(PRESETS) == {"quick", "full"}


def test_unreachable_scheduler_says_what_to_do(tmp_path, capsys):
    pytest.importorskip("distributed")
    code = main(["report", "--out", str(tmp_path), "--scheduler", "tcp://127.0.0.1:9",
                 "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "127.0.0.1:9" in err and "without" in err
