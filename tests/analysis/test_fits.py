"""Scaling fits with their quality (refattn.analysis.fits, scaling_section): a fit is
printed only when good and consistent with the stated complexity; synthetic timing
series check each flag."""
import numpy as np
import pytest
import xarray as xr

import refattn as ra
from refattn.analysis.fits import fit_power_law, judge_fit, stated_exponent
from refattn.analysis.scaling_section import judge_scaling, scaling_parameters

NS = np.array([512, 1024, 2048, 4096, 8192])


def _noisy(p, sigma, seed=0, scale=1e-9):
    rng = np.random.default_rng(seed)
    return scale * NS ** p * np.exp(sigma * rng.standard_normal(NS.size))


def test_a_clean_power_law_is_recovered_with_a_tight_interval():
    f = fit_power_law(NS, _noisy(1.0, 0.02))
    assert abs(f.exponent - 1.0) < 0.05 and f.ci[0] < 1.0 < f.ci[1]
    assert f.r2 > 0.999 and f.span == 16 and f.points == 5
    judged = judge_fit(f, stated=1.0)
    assert judged.flag == "" and judged.text.startswith("1.0")


def test_a_quadratic_series_contradicts_a_linear_stated_complexity():
    f = fit_power_law(NS, _noisy(2.0, 0.05))
    judged = judge_fit(f, stated_exponent("O(N·w·D)"))
    assert judged.flag.startswith("contradicts stated O(N^1)")
    assert judged.text.startswith("⚠") and "2" in judged.text
    assert judge_fit(f, stated_exponent("O(N·M·D)")).flag == ""


def test_overheads_and_noise_are_flagged_not_printed():
    overhead = 0.05 + 1e-7 * NS                   # fixed cost dominates: slope << 1
    j = judge_fit(fit_power_law(NS, overhead), stated=1.0)
    assert j.flag.startswith("below stated O(N^1)") or j.flag.startswith("poor fit")
    negative = fit_power_law(NS, 1.0 / NS ** 0.7 * np.array([1, 1.3, 0.6, 1.1, 0.9]))
    assert judge_fit(negative, stated=1.0).flag          # -0.7 is never printed bare
    poor = fit_power_law(NS, _noisy(1.0, 0.8, seed=3))
    assert poor.r2 < 0.95 and judge_fit(poor, 1.0).flag.startswith("poor fit")
    narrow = fit_power_law(NS[:2], _noisy(1.0, 0.0)[:2])
    assert "usable points" in judge_fit(narrow, 1.0).flag
    short = fit_power_law(np.array([1000, 1200, 1400, 1600]), 1e-6 * np.array(
        [1000, 1200, 1400, 1600.0]))
    assert "spans" in judge_fit(short, 1.0).flag


def test_memory_may_not_exceed_the_stated_time_but_may_stay_below():
    f = fit_power_law(NS, _noisy(0.3, 0.01))
    assert judge_fit(f, stated=2.0, at_most=True).flag == ""
    assert judge_fit(f, stated=2.0).flag.startswith("below stated")
    g = fit_power_law(NS, _noisy(2.0, 0.01))
    assert judge_fit(g, stated=1.0, at_most=True).flag.startswith("contradicts")


def test_stated_exponents_of_every_registered_mechanism_are_readable():
    for name, spec in ra.mechanisms().items():
        e = stated_exponent(spec.time)
        assert np.isnan(e) or e in (1.0, 2.0), (name, spec.time, e)
    assert stated_exponent("O(N·(s + N/s)·D)") == 2.0
    assert stated_exponent("O(c·(N+M)·(D+Dv) + c³·I)") == 1.0
    assert np.isnan(stated_exponent("no complexity given"))


def test_judge_scaling_flags_a_synthetic_timing_series_in_the_table():
    """The report's table path: a mechanism stated O(N·w·D) whose timings grow like
    N² is flagged; a linear one is printed; one whose budget parameters grow with N is
    judged on fit quality only."""
    names = ["sliding_window_attention", "performer_attention", "strided_kv_attention"]
    times = np.stack([_noisy(2.0, 0.02), _noisy(1.0, 0.02), _noisy(1.0, 0.02)])
    peaks = np.stack([1e3 * NS, 1e3 * NS, 1e3 * NS]).astype(float)
    ds = xr.Dataset({"time_s": (("mechanism", "n"), times),
                     "peak_bytes": (("mechanism", "n"), peaks)},
                    coords={"mechanism": names, "n": NS}, attrs={"budget": 32})
    out = judge_scaling(ds)
    flags = dict(zip(names, out.time_flag.values))
    assert flags["sliding_window_attention"].startswith("contradicts stated O(N^1)")
    assert flags["performer_attention"] == ""
    assert flags["strided_kv_attention"] == ""
    assert np.isnan(float(out.stated_exponent.sel(mechanism="strided_kv_attention")))
    assert str(out.scaling_params.sel(mechanism="strided_kv_attention").values) == "stride"
    assert str(out.time_text.sel(mechanism="sliding_window_attention").values
               ).startswith("⚠")
    assert scaling_parameters(ra.mechanisms()["performer_attention"], NS, 32) == []


def test_fit_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        fit_power_law(NS, NS[:3])
