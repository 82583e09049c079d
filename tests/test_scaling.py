"""Scaling laws: the fit recovers a known law from a seeded synthetic sweep, the compute-optimal
split is the closed form's, the frontier is the lower envelope, bad sweeps are one line each,
and the figure is a PNG that the same sweep writes byte for byte."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest

from gptlab.errors import GptlabError
from gptlab.lab.scaling import (
    FrontierFit,
    LawFit,
    ScalingRun,
    analyse_sweep,
    compute_frontier,
    fit_frontier,
    fit_law,
    scaling_summary,
    write_scaling_figure,
)

# The law Hoffmann et al. (2022) fitted to their runs (their approach 3).
TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
SIZES = [1e6, 1e7, 1e8, 1e9]
TOKENS = [1e8, 1e9, 1e10]
NOISE = 0.002  # multiplicative, like seed-to-seed differences of a well-tuned run
BUDGET = 1e21


def true_loss(n_params: float, n_tokens: float) -> float:
    return (TRUE["E"] + TRUE["A"] / n_params ** TRUE["alpha"]
            + TRUE["B"] / n_tokens ** TRUE["beta"])


def synthetic_runs(noise: float, seed: int = 0) -> list[ScalingRun]:
    rng = np.random.default_rng(seed)
    return [ScalingRun(f"n{n:.0e}-d{d:.0e}", n, d,
                       true_loss(n, d) * float(np.exp(rng.normal(0, noise))))
            for n, d in itertools.product(SIZES, TOKENS)]


@pytest.fixture(scope="module")
def sweep():
    return analyse_sweep(synthetic_runs(NOISE))


def known_law(**changes: float) -> LawFit:
    return LawFit(**{**TRUE, **changes}, residuals={}, objective=0.0)


# --- the law ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_fit_recovers_the_law_from_noisy_runs(sweep):
    law = sweep.law
    assert law.alpha == pytest.approx(TRUE["alpha"], rel=0.05)
    assert law.beta == pytest.approx(TRUE["beta"], rel=0.05)
    assert law.E / TRUE["E"] == pytest.approx(1, rel=0.03)


@pytest.mark.slow
def test_residuals_are_the_runs_log_losses_minus_the_fitted_ones(sweep):
    law = sweep.law
    assert list(law.residuals) == [run.name for run in sweep.runs]
    for run in sweep.runs:
        predicted = law.E + law.A / run.n_params**law.alpha + law.B / run.n_tokens**law.beta
        assert law.residuals[run.name] == pytest.approx(math.log(run.loss / predicted),
                                                        abs=1e-12)
        assert abs(law.residuals[run.name]) < 4 * NOISE
    huber = sum(r * r / 2 if abs(r) < 1e-3 else 1e-3 * (abs(r) - 0.5e-3)
                for r in law.residuals.values())
    assert law.objective == pytest.approx(huber, rel=1e-6)


@pytest.mark.slow
def test_the_fit_is_exact_on_runs_without_noise():
    law = fit_law(synthetic_runs(noise=0.0))
    for name, value in TRUE.items():
        assert getattr(law, name) == pytest.approx(value, rel=1e-4), name
    assert max(abs(r) for r in law.residuals.values()) < 1e-8


def test_compute_optimal_split_is_the_closed_form_and_the_minimum_at_its_budget():
    law = known_law()
    alpha, beta, a, b = TRUE["alpha"], TRUE["beta"], TRUE["A"], TRUE["B"]
    g = (alpha * a / (beta * b)) ** (1 / (alpha + beta))
    n_opt = g * (BUDGET / 6) ** (beta / (alpha + beta))
    optimal = law.compute_optimal(BUDGET)
    assert optimal.n_params == pytest.approx(n_opt, rel=1e-12)
    assert optimal.n_tokens == pytest.approx(BUDGET / (6 * n_opt), rel=1e-12)
    # No other split of the budget does better.
    others = np.geomspace(optimal.n_params / 10, optimal.n_params * 10, 2001)
    losses = law.loss(others, BUDGET / (6 * others))
    assert losses.min() >= optimal.loss - 1e-12
    assert others[losses.argmin()] == pytest.approx(optimal.n_params, rel=2e-3)


def test_an_exponent_that_is_not_positive_has_no_compute_optimal_split():
    with pytest.raises(GptlabError, match=r"^the fitted exponents \(alpha=-0.1, beta=0.28\)"):
        known_law(alpha=-0.1).compute_optimal(BUDGET)


# --- the compute frontier ---------------------------------------------------------------------

def run_at(name: str, compute: float, loss: float) -> ScalingRun:
    return ScalingRun(name, compute / 6e9, 1e9, loss)  # 6 N D = compute


def test_the_frontier_keeps_the_runs_below_every_cheaper_one():
    runs = [run_at("c8", 8e18, 3.0), run_at("c2", 2e18, 5.5), run_at("c1", 1e18, 5.0),
            run_at("c3-worse", 3e18, 4.2), run_at("c3", 3e18, 4.0), run_at("c5-equal", 5e18, 4.0)]
    assert [run.name for run in compute_frontier(runs)] == ["c1", "c3", "c8"]


@pytest.mark.slow
def test_the_frontier_of_the_sweep_is_its_lower_envelope(sweep):
    frontier = sweep.frontier
    assert [run.compute for run in frontier] == sorted(run.compute for run in frontier)
    assert all(later.loss < earlier.loss for earlier, later in itertools.pairwise(frontier))
    for run in sweep.runs:
        cheaper = [point for point in frontier if point.compute <= run.compute]
        assert cheaper[-1].loss <= run.loss


@pytest.mark.slow
def test_the_frontier_fit_recovers_a_power_law_in_compute():
    e, a, gamma = 1.8, 2000.0, 0.17
    runs = [run_at(f"c{i}", c, e + a * c**-gamma)
            for i, c in enumerate(np.geomspace(1e15, 1e20, 8))]
    fit = fit_frontier(compute_frontier(runs))
    assert (fit.E, fit.A, fit.gamma) == (pytest.approx(e, rel=1e-4), pytest.approx(a, rel=1e-3),
                                         pytest.approx(gamma, rel=1e-4))


def test_a_frontier_of_two_runs_has_no_fit():
    runs = [run_at("c1", 1e18, 3.0), run_at("c2", 2e18, 2.9), run_at("c3", 4e18, 3.1)]
    assert fit_frontier(compute_frontier(runs)) is None


# --- bad sweeps -------------------------------------------------------------------------------

GOOD = synthetic_runs(NOISE)


one_size = [ScalingRun(f"d{d:.0e}", 1e7, d, true_loss(1e7, d)) for d in np.geomspace(1e8, 1e10, 6)]
one_budget = [ScalingRun(f"n{n:.0e}", n, 1e9, true_loss(n, 1e9)) for n in np.geomspace(1e6, 1e9, 6)]


def replaced(index: int, **changes: float) -> list[ScalingRun]:
    runs = list(GOOD)
    bad = runs[index]
    runs[index] = ScalingRun(bad.name, changes.get("n", bad.n_params),
                             changes.get("d", bad.n_tokens), changes.get("loss", bad.loss))
    return runs


@pytest.mark.parametrize(("runs", "message"), [
    (GOOD[:4], "a scaling law needs runs at 5 or more distinct (N, D) to fit its 5 parameters; "
               "got 4"),
    (GOOD[:4] * 2, "a scaling law needs runs at 5 or more distinct (N, D) to fit its 5 "
                   "parameters; got 4"),
    (one_size, "every run has the same model size N (1e+07), so alpha cannot be fitted; add "
               "runs of another model size N"),
    (one_budget, "every run has the same token budget D (1e+09), so beta cannot be fitted; add "
                 "runs of another token budget D"),
    (replaced(3, loss=float("nan")), "run n1e+07-d1e+08: loss is nan, not a positive finite "
                                     "number"),
    (replaced(0, loss=float("inf")), "run n1e+06-d1e+08: loss is inf, not a positive finite "
                                     "number"),
    (replaced(5, n=0.0), "run n1e+07-d1e+10: N is 0.0, not a positive finite number"),
    (replaced(7, d=-1e9), "run n1e+08-d1e+09: D is -1000000000.0, not a positive finite number"),
])
def test_a_bad_sweep_is_refused_in_one_line(runs, message):
    with pytest.raises(GptlabError) as error:
        fit_law(runs)
    assert str(error.value) == message


@pytest.mark.slow
def test_a_budget_that_is_not_a_positive_number_is_refused(sweep):
    with pytest.raises(GptlabError) as error:
        scaling_summary(sweep, 0.0)
    assert str(error.value) == "the compute budget must be a positive number of FLOPs, not 0.0"


# --- the summary and the figure ---------------------------------------------------------------

def numbers_only(data) -> bool:
    if isinstance(data, dict):
        return all(numbers_only(value) for value in data.values())
    return isinstance(data, (int, float)) and not isinstance(data, bool)


@pytest.mark.slow
def test_summary_is_numbers_for_dvc_metrics(sweep):
    summary = json.loads(json.dumps(scaling_summary(sweep, BUDGET)))
    assert numbers_only(summary)  # `dvc metrics` shows numbers
    law, optimal = sweep.law, sweep.law.compute_optimal(BUDGET)
    assert summary["runs"] == 12
    assert summary["law"] == {"E": law.E, "A": law.A, "B": law.B, "alpha": law.alpha,
                              "beta": law.beta, "huber": law.objective,
                              "residuals": law.residuals}
    assert summary["compute_optimal"] == {
        "compute": BUDGET, "n_params": optimal.n_params, "n_tokens": optimal.n_tokens,
        "loss": optimal.loss, "tokens_per_param": optimal.n_tokens / optimal.n_params}
    fit = sweep.frontier_fit
    assert isinstance(fit, FrontierFit)
    assert summary["frontier"] == {"runs": len(sweep.frontier), "E": fit.E, "A": fit.A,
                                   "gamma": fit.gamma, "huber": fit.objective}


@pytest.mark.slow
def test_figure_is_a_png_byte_identical_across_writes(sweep, tmp_path):
    first = write_scaling_figure(sweep, tmp_path / "a" / "scaling.png", dpi=60)
    second = write_scaling_figure(sweep, tmp_path / "b" / "scaling.png", dpi=60)
    assert first.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert first.read_bytes() == second.read_bytes()
    height, width = matplotlib.image.imread(first).shape[:2]
    assert (width, height) == (8 * 60, 5.5 * 60)
    assert [path.name for path in (tmp_path / "a").iterdir()] == ["scaling.png"]


def test_scaling_does_not_import_torch():
    check = "import sys, gptlab.lab.scaling; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check]).returncode == 0
