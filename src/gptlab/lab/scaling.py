"""Scaling laws from a sweep of runs: the parametric law of Hoffmann et al. (2022), fitted as
they fitted it (their approach 3), their isoFLOP profiles (approach 2), the compute-optimal
split of a budget, the simpler compute frontier, bootstrap intervals on every fitted number,
and warnings where the runs cannot identify what was fitted.

    L(N, D) = E + A / N^alpha + B / D^beta

N counts every parameter (Hoffmann et al.'s convention; Kaplan et al. 2020 counted
non-embedding parameters), D training tokens, and a run costs C = 6 N D FLOPs. As in the
paper, the fit works in logs: with a = log A, b = log B and e = log E, the predicted log loss is
logsumexp(a - alpha log N, b - beta log D, e), and L-BFGS minimizes the Huber loss between it
and the observed log loss from every point of a grid of starts, keeping the best. The Huber
loss (delta = 1e-3) counts a large miss linearly, so one odd run cannot drag the whole law.

The fit is scipy's L-BFGS on numpy, with the gradient written out (the predicted log loss is
a softmax-weighted sum, so its derivatives are the weights): a few milliseconds a start.

An isoFLOP profile is the runs planned at one budget C with different N: a parabola in log N
through their log losses has its vertex at that budget's best N. Over several budgets,
N_opt = k_n C^a, and D_opt = C / (6 N_opt) = k_d C^b with b = 1 - a.

The intervals are 95% percentile intervals over refits to resampled runs: within each budget
the (N, D) points are drawn with replacement, and at each point drawn its seeds are too.
"""

from __future__ import annotations

import itertools
import math
import numbers
import sys
from collections.abc import Callable, Collection, Hashable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, and none on a server

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colors, ticker
from scipy.optimize import minimize
from tqdm import tqdm

from gptlab.errors import GptlabError
from gptlab.io import atomic_path

LAW_PARAMETERS = 5  # E, A, B, alpha, beta
LAW_NAMES = ("E", "A", "alpha", "B", "beta")
FRONTIER_PARAMETERS = 3  # E, A, gamma
HUBER_DELTA = 1e-3
LARGEST_LOG = math.log(sys.float_info.max)  # exp of more overflows a float
# Starts of L-BFGS: every other point of Hoffmann et al.'s grid (alpha, beta in 0, 0.5, ..., 2;
# e in -1, -0.5, ..., 1.5; a, b in 0, 5, ..., 25), which finds the same optimum on our sweeps
# in a twentieth of the time.
LAW_STARTS = {"a": (0.0, 10.0, 20.0), "b": (0.0, 10.0, 20.0), "e": (-1.0, 0.0, 1.0),
              "alpha": (0.0, 1.0, 2.0), "beta": (0.0, 1.0, 2.0)}
# A resample's law is near the full data's, so its refit starts there, and from one point of
# Hoffmann et al.'s grid (a, b, e, alpha, beta) for a resample whose optimum moved to another
# basin: on the default sweep's narrow grid, the two found the best of four starts in 39
# resamples of 40 (the 40th within 0.1% of its objective), at under half their cost.
BOOTSTRAP_STARTS = ((10.0, 10.0, 0.0, 0.5, 0.5),)
# The frontier's exponent on compute is smaller: about alpha beta / (alpha + beta).
FRONTIER_STARTS = {"a": (0.0, 10.0, 20.0), "e": (-1.0, 0.0, 1.0), "gamma": (0.0, 0.25, 0.5)}
# Run until a step changes nothing: the Huber objective near its optimum is tiny (~1e-5), and
# scipy's default tolerances are relative to max(objective, 1), so they would stop far from it.
LBFGS_OPTIONS = {"maxiter": 1000, "ftol": 1e-15, "gtol": 1e-12, "maxcor": 10}
# Many starts go in two rounds: each runs SCREEN_ITERATIONS, then the KEPT_STARTS best go on from
# where they stopped. On a sweep too small to pin the law down, most grid starts crawl along a
# flat valley to the iteration cap (139 of 243 on the lab test's six runs): 20 s -> 3 s there,
# and 5.4 -> 3.8 s on the committed 20-run study, the same optimum to every printed digit.
SCREEN_ITERATIONS, KEPT_STARTS = 100, 5
INTERVAL_PERCENTILES = (2.5, 97.5)  # a 95% percentile interval
PROFILE_SIZES = 3  # a parabola needs three distinct N
EXPONENT_BUDGETS = 2  # N_opt = k_n C^a needs two budgets' vertices
INTERVAL_BUDGETS = 3  # and an interval on a, a third to disagree with the line
# A term under this share of every run's fitted loss has left the fit: its parameter is
# wherever the optimizer stopped, not a measurement.
VANISHED_SHARE = 0.01
WIDE_INTERVAL = 10.0  # an interval whose ends differ by this factor pins nothing down
SPREAD_FACTOR = 3.0  # residuals this many times the seed spread: the law's form does not fit
N_CONVENTION = ("all parameters, the token table once (Hoffmann et al. 2022's convention; "
                "Kaplan et al. 2020 counted non-embedding parameters)")
FIGURE_SIZE = (14, 5.5)
CURVE_POINTS = 200
# How far the fitted curves reach beyond the runs' compute, each way (a factor).
CURVE_MARGIN = 2.0
COUNT_SUFFIXES = ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"))

Interval = tuple[float, float]


@dataclass(frozen=True)
class ScalingRun:
    name: str
    n_params: float  # N: all parameters
    n_tokens: float  # D: training tokens
    loss: float  # validation loss, nats per token
    budget: float | None = None  # C the run was planned at: one isoFLOP profile's runs share it
    seed: int | None = None

    @property
    def compute(self) -> float:
        """Training FLOPs, C = 6 N D."""
        return 6 * self.n_params * self.n_tokens


@dataclass(frozen=True)
class Allocation:
    compute: float  # the budget, FLOPs
    n_params: float  # N that minimizes the fitted loss at this budget
    n_tokens: float  # D = C / (6 N)
    loss: float  # the fitted loss there


@dataclass(frozen=True)
class LawFit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    residuals: dict[str, float]  # log L - log L_hat, by run name
    objective: float  # the Huber objective at the fit, summed over runs

    def loss(self, n_params: float | np.ndarray, n_tokens: float | np.ndarray
             ) -> float | np.ndarray:
        """L(N, D), for numbers or numpy arrays."""
        return self.E + self.A / n_params**self.alpha + self.B / n_tokens**self.beta

    @property
    def has_optimum(self) -> bool:
        """Whether a budget has a best split: only when the loss falls with both N and D."""
        return self.alpha > 0 and self.beta > 0

    def compute_optimal(self, compute: float) -> Allocation:
        """The N and D of budget C = 6 N D that minimize L(N, D), in closed form:
        N = G (C/6)^(beta / (alpha + beta)) with G = (alpha A / (beta B))^(1 / (alpha + beta))."""
        if not self.has_optimum:
            raise GptlabError(f"the fitted exponents (alpha={self.alpha:.3g}, "
                              f"beta={self.beta:.3g}) are not both positive: the runs do not "
                              f"show the loss falling with size and data, so no budget has a "
                              f"best split")
        exponents = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / exponents)
        n_params = g * (compute / 6) ** (self.beta / exponents)
        n_tokens = compute / (6 * n_params)
        return Allocation(compute, n_params, n_tokens, float(self.loss(n_params, n_tokens)))

    @property
    def split_exponents(self) -> tuple[float, float] | None:
        """(a, b) of the law's compute-optimal split, N_opt ∝ C^a and D_opt ∝ C^b: approach 3's
        answer to what approach 2 measures (None without a best split)."""
        if not self.has_optimum:
            return None
        return self.beta / (self.alpha + self.beta), self.alpha / (self.alpha + self.beta)

    @property
    def residual_rms(self) -> float:
        """The root mean square of the residuals: about the law's relative miss."""
        return math.sqrt(np.mean(np.square(list(self.residuals.values()))))


@dataclass(frozen=True)
class FrontierFit:
    E: float
    A: float
    gamma: float
    objective: float  # the Huber objective at the fit, summed over the frontier's runs

    def loss(self, compute: float | np.ndarray) -> float | np.ndarray:
        """L(C) = E + A C^-gamma, for numbers or numpy arrays."""
        return self.E + self.A * compute ** -self.gamma


@dataclass(frozen=True)
class IsoflopProfile:
    budget: float  # C, FLOPs
    runs: int  # how many runs it has
    n_range: Interval  # the smallest and largest N of the profile's runs
    parabola: tuple[float, float, float]  # log L = p0 (log N)^2 + p1 log N + p2
    problem: str | None  # why the profile's vertex is not a best N, or None

    @property
    def log_vertex(self) -> float:
        """log N at the parabola's vertex (a maximum when the profile is not convex)."""
        curvature, slope, _ = self.parabola
        return -slope / (2 * curvature)

    @property
    def n_opt(self) -> float:
        """The best N at this budget: the vertex of a usable profile."""
        return math.exp(self.log_vertex)

    def loss(self, n_params: float | np.ndarray) -> float | np.ndarray:
        """The parabola's loss at N, for numbers or numpy arrays."""
        return np.exp(np.polyval(self.parabola, np.log(n_params)))


@dataclass(frozen=True)
class IsoflopFit:
    profiles: tuple[IsoflopProfile, ...]  # every budget with runs at 3 or more distinct N
    a: float | None  # N_opt = k_n C^a over the usable profiles; None with fewer than 2
    k_n: float | None

    @property
    def b(self) -> float | None:
        """D_opt = k_d C^b, and D_opt = C / (6 N_opt), so b = 1 - a."""
        return None if self.a is None else 1 - self.a

    @property
    def usable(self) -> list[IsoflopProfile]:
        return [profile for profile in self.profiles if profile.problem is None]


@dataclass(frozen=True)
class Bootstrap:
    samples: int  # resamples drawn
    seed: int  # of the generator that drew them
    laws: tuple[LawFit, ...]  # the law refitted to every resample with 5 or more distinct (N, D)
    isoflops: tuple[IsoflopFit, ...]  # the isoFLOP fit of every resample that has profiles


@dataclass(frozen=True)
class Sweep:
    runs: tuple[ScalingRun, ...]
    law: LawFit
    frontier: tuple[ScalingRun, ...]  # the runs below every cheaper run, by compute
    frontier_fit: FrontierFit | None  # None when the frontier has fewer than 3 runs
    isoflop: IsoflopFit | None  # None when no budget has runs at 3 or more N
    bootstrap: Bootstrap


def analyse_sweep(runs: Sequence[ScalingRun], samples: int, seed: int = 0) -> Sweep:
    """The law fitted to the runs, their isoFLOP profiles, their compute frontier and its fit,
    and `samples` bootstrap refits (seeded by `seed`) for the intervals."""
    law = fit_law(runs)
    frontier = compute_frontier(runs)
    return Sweep(tuple(runs), law, tuple(frontier), fit_frontier(frontier), fit_isoflop(runs),
                 bootstrap(runs, samples, seed, law))


# --- the law ----------------------------------------------------------------------------------

def fit_law(runs: Sequence[ScalingRun]) -> LawFit:
    """L(N, D) fitted to the runs as Hoffmann et al. did (see the module's docstring); bad
    runs are a GptlabError naming the problem."""
    check_runs(runs)
    return _law_from(runs, _with_progress(_grid(LAW_STARTS)))


def _law_from(runs: Sequence[ScalingRun], starts: Collection[tuple[float, ...]]) -> LawFit:
    """The best of the L-BFGS fits of the law to the runs from `starts` (a, b, e, alpha, beta)."""
    n_params, n_tokens, loss = (np.array([getattr(run, field) for run in runs], dtype=np.float64)
                                for field in ("n_params", "n_tokens", "loss"))
    theta, objective = _best_huber_fit(_law_log_loss, [np.log(n_params), np.log(n_tokens)],
                                       np.log(loss), starts)
    a, b, e, alpha, beta = theta
    law = LawFit(math.exp(e), math.exp(a), math.exp(b), alpha, beta, {}, objective)
    residuals = np.log(loss) - np.log(law.loss(n_params, n_tokens))
    return replace(law, residuals={run.name: float(residual)
                                   for run, residual in zip(runs, residuals, strict=True)})


def check_runs(runs: Sequence[ScalingRun]) -> None:
    """Refuse, in one line, runs that cannot identify the law's five parameters."""
    for run in runs:
        fields = [("N", run.n_params), ("D", run.n_tokens), ("loss", run.loss)]
        if run.budget is not None:
            fields.append(("budget", run.budget))
        for what, value in fields:
            if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                    or not (math.isfinite(value) and value > 0):
                raise GptlabError(f"run {run.name}: {what} is {value!r}, not a positive finite "
                                  f"number")
    points = {(run.n_params, run.n_tokens) for run in runs}
    if len(points) < LAW_PARAMETERS:
        raise GptlabError(f"a scaling law needs runs at {LAW_PARAMETERS} or more distinct (N, D) "
                          f"to fit its {LAW_PARAMETERS} parameters; got {len(points)}")
    for what, exponent, values in (("model size N", "alpha", {n for n, _ in points}),
                                   ("token budget D", "beta", {d for _, d in points})):
        if len(values) < 2:
            raise GptlabError(f"every run has the same {what} ({next(iter(values)):.4g}), so "
                              f"{exponent} cannot be fitted; add runs of another {what}")


def _law_log_loss(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """log L_hat = logsumexp(a - alpha log N, b - beta log D, e) and its Jacobian in theta."""
    a, b, e, alpha, beta = theta
    terms, weights = _logsumexp_terms([a - alpha * log_n, b - beta * log_d,
                                       np.full_like(log_n, e)])
    jacobian = np.stack([weights[0], weights[1], weights[2],
                         -weights[0] * log_n, -weights[1] * log_d], axis=1)
    return terms, jacobian


def _law_theta(law: LawFit) -> tuple[float, ...]:
    """The law as the optimizer's parameters (a, b, e, alpha, beta), to start a refit from."""
    return math.log(law.A), math.log(law.B), math.log(law.E), law.alpha, law.beta


def seed_spread(runs: Sequence[ScalingRun]) -> float | None:
    """The standard deviation of log loss between runs at the same (N, D), pooled over the
    points that have several (seeds); None when no point has two runs."""
    squares, freedom = 0.0, 0
    for repeats in _grouped(runs, lambda run: (run.n_params, run.n_tokens)).values():
        log_loss = np.log([run.loss for run in repeats])
        squares += float(np.sum((log_loss - log_loss.mean()) ** 2))
        freedom += len(repeats) - 1
    return math.sqrt(squares / freedom) if freedom else None


# --- isoFLOP profiles -------------------------------------------------------------------------

def fit_isoflop(runs: Sequence[ScalingRun]) -> IsoflopFit | None:
    """Hoffmann et al.'s approach 2: a parabola through each budget's runs, its vertex that
    budget's best N, and N_opt = k_n C^a by least squares in logs over the usable vertices.
    None when no budget has runs at 3 or more distinct N."""
    by_budget = _grouped([run for run in runs if run.budget is not None],
                         lambda run: run.budget)
    profiles = [fit_profile(budget, by_budget[budget]) for budget in sorted(by_budget)
                if len({run.n_params for run in by_budget[budget]}) >= PROFILE_SIZES]
    if not profiles:
        return None
    usable = [profile for profile in profiles if profile.problem is None]
    if len(usable) < EXPONENT_BUDGETS:
        return IsoflopFit(tuple(profiles), None, None)
    a, log_k_n = np.polyfit(np.log([profile.budget for profile in usable]),
                            np.log([profile.n_opt for profile in usable]), 1)
    return IsoflopFit(tuple(profiles), float(a), math.exp(log_k_n))


def fit_profile(budget: float, runs: Sequence[ScalingRun]) -> IsoflopProfile:
    """The parabola of log loss in log N through one budget's runs (3 or more distinct N).

    Log loss rather than loss: seeds scatter a loss by a share of it, so in logs every run
    weighs the same in the least squares, as in the law's fit."""
    log_n = np.log([run.n_params for run in runs])
    parabola = np.polyfit(log_n, np.log([run.loss for run in runs]), 2)
    profile = IsoflopProfile(budget, len(runs), (math.exp(log_n.min()), math.exp(log_n.max())),
                             tuple(float(p) for p in parabola), None)
    smallest, largest = profile.n_range
    # The vertex stays in logs until it is known to lie among the runs: a nearly flat
    # profile puts it past a float's range.
    if not parabola[0] > 0:
        problem = "not convex, so its runs do not bracket a best N"
    elif profile.log_vertex > log_n.max():
        problem = f"its vertex lies past its largest N, {largest:.3g}: add larger models"
    elif profile.log_vertex < log_n.min():
        problem = f"its vertex lies below its smallest N, {smallest:.3g}: add smaller models"
    else:
        return profile
    return replace(profile, problem=problem)


# --- the compute frontier ---------------------------------------------------------------------

def compute_frontier(runs: Sequence[ScalingRun]) -> list[ScalingRun]:
    """The runs whose loss is below that of every cheaper run, by compute: the lowest loss
    reached at each budget."""
    frontier: list[ScalingRun] = []
    for run in sorted(runs, key=lambda run: (run.compute, run.loss)):
        if not frontier or run.loss < frontier[-1].loss:
            frontier.append(run)
    return frontier


def fit_frontier(frontier: Sequence[ScalingRun]) -> FrontierFit | None:
    """L(C) = E + A C^-gamma fitted to the frontier (Huber loss on log L, as for the law); None
    when the frontier has fewer runs than the curve has parameters."""
    if len(frontier) < FRONTIER_PARAMETERS:
        return None
    compute = np.array([run.compute for run in frontier], dtype=np.float64)
    loss = np.array([run.loss for run in frontier], dtype=np.float64)
    theta, objective = _best_huber_fit(_frontier_log_loss, [np.log(compute)], np.log(loss),
                                       _with_progress(_grid(FRONTIER_STARTS)))
    a, e, gamma = theta
    return FrontierFit(math.exp(e), math.exp(a), gamma, objective)


def _frontier_log_loss(theta: np.ndarray, log_c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log L_hat = logsumexp(a - gamma log C, e) and its Jacobian in theta."""
    a, e, gamma = theta
    terms, weights = _logsumexp_terms([a - gamma * log_c, np.full_like(log_c, e)])
    return terms, np.stack([weights[0], weights[1], -weights[0] * log_c], axis=1)


# --- the bootstrap ----------------------------------------------------------------------------

def bootstrap(runs: Sequence[ScalingRun], samples: int, seed: int = 0,
              law: LawFit | None = None) -> Bootstrap:
    """The law and the isoFLOP fit refitted to `samples` resamples of the runs, drawn by a
    generator seeded with `seed`. Each refit starts from `law`, the fit to all the runs (fitted
    here when not given), and from BOOTSTRAP_STARTS."""
    law = fit_law(runs) if law is None else law
    starts = [_law_theta(law), *BOOTSTRAP_STARTS]
    generator = np.random.default_rng(seed)
    laws, isoflops = [], []
    for _ in _with_progress(range(samples), "bootstrap"):
        sample = resample(runs, generator)
        isoflop = fit_isoflop(sample)
        if isoflop is not None:
            isoflops.append(isoflop)
        try:
            check_runs(sample)
            laws.append(_law_from(sample, starts))
        except GptlabError:
            continue  # too few distinct (N, D) drawn to identify the law, or every start diverged
    return Bootstrap(samples, seed, tuple(laws), tuple(isoflops))


def resample(runs: Sequence[ScalingRun], generator: np.random.Generator) -> list[ScalingRun]:
    """One bootstrap resample: within each budget (the runs without one together, so that
    each isoFLOP profile keeps its size), as many (N, D) points as there are, drawn with
    replacement, and at each point drawn, as many of its runs (seeds) as it has, drawn too."""
    sample: list[ScalingRun] = []
    for stratum in _grouped(runs, lambda run: run.budget).values():
        points = list(_grouped(stratum, lambda run: (run.n_params, run.n_tokens)).values())
        for point in generator.integers(len(points), size=len(points)):
            seeds = points[point]
            drawn = generator.integers(len(seeds), size=len(seeds))
            sample.extend(seeds[index] for index in drawn)
    return sample


def interval95(values: Iterable[float | None]) -> Interval | None:
    """The 95% percentile interval of the values given (None skipped); None when none are."""
    kept = [value for value in values if value is not None]
    if not kept:
        return None
    low, high = np.percentile(kept, INTERVAL_PERCENTILES)
    return float(low), float(high)


def parameter_intervals(sweep: Sweep) -> dict[str, Interval | None]:
    """The 95% intervals of the law's parameters and of its split's exponents (law_a, law_b,
    over the refits that have a split), and of the isoFLOP exponents a and b when 3 or more
    profiles are usable (None where there is none)."""
    bounds = {name: interval95(getattr(law, name) for law in sweep.bootstrap.laws)
              for name in LAW_NAMES}
    splits = [split for law in sweep.bootstrap.laws if (split := law.split_exponents)]
    bounds |= {"law_a": interval95(a for a, _ in splits),
               "law_b": interval95(b for _, b in splits)}
    if sweep.isoflop is not None and len(sweep.isoflop.usable) >= INTERVAL_BUDGETS:
        isoflops = sweep.bootstrap.isoflops
    else:
        isoflops = ()  # a line always passes through two vertices: nothing tests the power law
    return bounds | {name: interval95(getattr(fit, name) for fit in isoflops)
                     for name in ("a", "b")}


def allocation_intervals(sweep: Sweep, budget: float) -> dict[str, Interval | None]:
    """The 95% intervals of the law's compute-optimal N_opt and D_opt at `budget`, over the
    refits whose exponents are both positive."""
    optima = [law.compute_optimal(budget) for law in sweep.bootstrap.laws if law.has_optimum]
    return {"N_opt": interval95(optimal.n_params for optimal in optima),
            "D_opt": interval95(optimal.n_tokens for optimal in optima)}


def profile_interval(sweep: Sweep, budget: float) -> Interval | None:
    """The 95% interval of the best N at one budget, over the resamples where its profile
    has a usable vertex."""
    return interval95(profile.n_opt for fit in sweep.bootstrap.isoflops
                      for profile in fit.usable if profile.budget == budget)


# --- warnings ---------------------------------------------------------------------------------

def fit_warnings(sweep: Sweep, budget: float, train_tokens: float | None = None) -> list[str]:
    """One line for each way the fit does not identify what it reports: a term of the law that
    vanished, an interval spanning more than 10x, an exponent that is not positive, residuals
    well beyond the seeds' spread, an isoFLOP profile without a usable vertex, and a
    compute-optimal split outside the runs or past one epoch of `train_tokens`."""
    bounds = parameter_intervals(sweep) | allocation_intervals(sweep, budget)
    return [*_vanished_terms(sweep), *_wide_intervals(bounds), *_exponent_signs(sweep, bounds),
            *_misfit(sweep), *_profile_problems(sweep),
            *_extrapolation(sweep, budget, train_tokens)]


def _vanished_terms(sweep: Sweep) -> list[str]:
    law = sweep.law
    n_params = np.array([run.n_params for run in sweep.runs], dtype=np.float64)
    n_tokens = np.array([run.n_tokens for run in sweep.runs], dtype=np.float64)
    predicted = law.loss(n_params, n_tokens)
    terms = ((f"E = {law.E:.2g} is at its bound,", law.E, "the runs do not reach the loss floor"),
             ("A/N^alpha is", law.A / n_params**law.alpha,
              "the runs do not show the loss falling with N"),
             ("B/D^beta is", law.B / n_tokens**law.beta,
              "the runs do not show the loss falling with D"))
    return [f"{term} under {VANISHED_SHARE:.0%} of every run's fitted loss ({why})"
            for term, values, why in terms if np.max(values / predicted) < VANISHED_SHARE]


def _wide_intervals(bounds: dict[str, Interval | None]) -> list[str]:
    warnings = []
    for name in ("E", "A", "B", "N_opt", "D_opt"):
        if bounds[name] is not None and bounds[name][1] > WIDE_INTERVAL * bounds[name][0]:
            low, high = bounds[name]
            warnings.append(f"{name}'s 95% interval, {low:.3g} to {high:.3g}, spans more than "
                            f"{WIDE_INTERVAL:.0f}x (the runs do not pin it down)")
    return warnings


def _exponent_signs(sweep: Sweep, bounds: dict[str, Interval | None]) -> list[str]:
    values = {"alpha": sweep.law.alpha, "beta": sweep.law.beta}
    if sweep.isoflop is not None and sweep.isoflop.a is not None:
        values |= {"a": sweep.isoflop.a, "b": sweep.isoflop.b}
    warnings = []
    for name, value in values.items():
        if value <= 0:
            warnings.append(f"{name} = {value:.3g} is not positive")
        elif bounds[name] is not None and bounds[name][0] <= 0:
            warnings.append(f"{name}'s 95% interval reaches {bounds[name][0]:.3g}: the runs "
                            f"do not show it positive")
    return warnings


def _misfit(sweep: Sweep) -> list[str]:
    spread, rms = seed_spread(sweep.runs), sweep.law.residual_rms
    if spread is None or rms <= SPREAD_FACTOR * spread:
        return []
    return [f"the law misses the runs by {rms:.2%} rms, more than {SPREAD_FACTOR:.0f}x the "
            f"spread between seeds ({spread:.2%}): its form does not fit them"]


def _profile_problems(sweep: Sweep) -> list[str]:
    profiles = [] if sweep.isoflop is None else sweep.isoflop.profiles
    return [f"the isoFLOP profile at {profile.budget:.3g} FLOPs is not used: {profile.problem}"
            for profile in profiles if profile.problem is not None]


def _extrapolation(sweep: Sweep, budget: float, train_tokens: float | None) -> list[str]:
    if not sweep.law.has_optimum:
        return []  # no split to extrapolate; the exponents' warning says why
    optimal = sweep.law.compute_optimal(budget)
    warnings = []
    for name, value, observed in (("N", optimal.n_params, [run.n_params for run in sweep.runs]),
                                  ("D", optimal.n_tokens, [run.n_tokens for run in sweep.runs])):
        if not min(observed) <= value <= max(observed):
            warnings.append(f"the compute-optimal {name} = {value:.3g} at {budget:.3g} FLOPs "
                            f"lies outside the runs' {name} ({min(observed):.3g} to "
                            f"{max(observed):.3g}): an extrapolation")
    if train_tokens is not None and optimal.n_tokens > train_tokens:
        warnings.append(f"the compute-optimal D = {optimal.n_tokens:.3g} is "
                        f"{optimal.n_tokens / train_tokens:.1f} epochs of the "
                        f"{train_tokens:.3g}-token train split, and the law knows only "
                        f"tokens seen once")
    return warnings


# --- fitting ----------------------------------------------------------------------------------

def _grid(starts: dict[str, tuple[float, ...]]) -> list[tuple[float, ...]]:
    return list(itertools.product(*starts.values()))


def _with_progress(items: Iterable, what: str = "fitting") -> Iterable:
    """The items, with a progress bar on a terminal's stderr."""
    return tqdm(items, desc=what, leave=False, disable=None, file=sys.stderr)


def _grouped(runs: Iterable[ScalingRun], key: Callable[[ScalingRun], Hashable]
             ) -> dict[Any, list[ScalingRun]]:
    """The runs by key, keys in the order first seen."""
    groups: dict[Any, list[ScalingRun]] = {}
    for run in runs:
        groups.setdefault(key(run), []).append(run)
    return groups


def _logsumexp_terms(terms: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """logsumexp over the terms, elementwise, and each term's softmax weight: the derivative
    of the logsumexp by that term."""
    stacked = np.stack(terms)
    peak = stacked.max(axis=0)
    exps = np.exp(stacked - peak)
    total = exps.sum(axis=0)
    return peak + np.log(total), exps / total


def _best_huber_fit(log_loss: Callable[..., tuple[np.ndarray, np.ndarray]],
                    columns: list[np.ndarray], observed: np.ndarray,
                    starts: Collection[tuple[float, ...]]) -> tuple[list[float], float]:
    """The parameters, and the objective, of the best L-BFGS run over the starts."""
    if len(starts) > KEPT_STARTS:  # iterating starts moves its progress bar
        screened = [_lbfgs(log_loss, columns, observed, start, SCREEN_ITERATIONS)
                    for start in starts]
        kept = sorted((fit for fit in screened if math.isfinite(fit[1])), key=lambda fit: fit[1])
        starts = [tuple(theta) for theta, _ in kept[:KEPT_STARTS]]
    fits = [_lbfgs(log_loss, columns, observed, start) for start in starts]
    finite = [fit for fit in fits if math.isfinite(fit[1])]
    if not finite:
        raise GptlabError("the scaling fit diverged from every start; check the runs' losses")
    return min(finite, key=lambda fit: fit[1])


def _lbfgs(log_loss: Callable[..., tuple[np.ndarray, np.ndarray]], columns: list[np.ndarray],
           observed: np.ndarray, start: tuple[float, ...],
           iterations: int = LBFGS_OPTIONS["maxiter"]) -> tuple[list[float], float]:
    """Minimize the summed Huber loss between log_loss(theta, *columns) and `observed` with
    L-BFGS from `start`, for at most `iterations`; return where it stopped and the objective
    there."""

    def huber_and_gradient(theta: np.ndarray) -> tuple[float, np.ndarray]:
        predicted, jacobian = log_loss(theta, *columns)
        residual = predicted - observed
        inside = np.abs(residual) <= HUBER_DELTA
        huber = np.where(inside, residual**2 / 2,
                         HUBER_DELTA * (np.abs(residual) - HUBER_DELTA / 2))
        slope = np.where(inside, residual, HUBER_DELTA * np.sign(residual))
        return float(huber.sum()), jacobian.T @ slope

    # A start far from the data can overflow exp on the way, or stop where a parameter's exp
    # (A, B or E) is past a float's range: that start is simply not kept.
    with np.errstate(over="ignore", invalid="ignore"):
        result = minimize(huber_and_gradient, np.array(start, dtype=np.float64), jac=True,
                          method="L-BFGS-B", options={**LBFGS_OPTIONS, "maxiter": iterations})
    in_range = bool(np.all(np.abs(result.x) < LARGEST_LOG))
    return result.x.tolist(), float(result.fun) if in_range else math.inf


# --- the figure -------------------------------------------------------------------------------

def write_scaling_figure(sweep: Sweep, path: str | Path, dpi: int = 120) -> Path:
    """The sweep's figure as a PNG, written atomically and byte-identical for the same sweep."""
    figure = scaling_figure(sweep)
    with atomic_path(path, "the scaling figure") as tmp:
        # No software/date metadata, so the same sweep gives byte-identical files.
        figure.savefig(tmp, format="png", dpi=dpi, metadata={"Software": None})
    plt.close(figure)
    return Path(path)


def scaling_figure(sweep: Sweep) -> plt.Figure:
    """Two panels: loss against compute with the fitted law and the compute frontier (left),
    and the isoFLOP profiles, loss against N at each budget with its parabola (right)."""
    figure, (law_axes, isoflop_axes) = plt.subplots(1, 2, figsize=FIGURE_SIZE)
    _draw_law(figure, law_axes, sweep)
    _draw_isoflop(isoflop_axes, sweep)
    figure.tight_layout()
    return figure


def _draw_law(figure: plt.Figure, axes: plt.Axes, sweep: Sweep) -> None:
    """The runs coloured by model size, the law's curve for each size, and the frontier."""
    sizes = sorted({run.n_params for run in sweep.runs})
    # A colour bar rather than a legend entry per size: an isoFLOP sweep has many sizes.
    colours = plt.cm.ScalarMappable(colors.LogNorm(sizes[0], sizes[-1]), plt.get_cmap("viridis"))
    computes = [run.compute for run in sweep.runs]
    curve_compute = np.geomspace(min(computes) / CURVE_MARGIN, max(computes) * CURVE_MARGIN,
                                 CURVE_POINTS)
    for size in sizes:
        runs = [run for run in sweep.runs if run.n_params == size]
        colour = colours.to_rgba(size)
        axes.scatter([run.compute for run in runs], [run.loss for run in runs], color=colour,
                     zorder=3)
        axes.plot(curve_compute, sweep.law.loss(size, curve_compute / (6 * size)), color=colour,
                  linewidth=1, alpha=0.7)
    figure.colorbar(colours, ax=axes, label="model size N (parameters)")
    axes.plot([], [], color="gray", linewidth=1, label=_law_label(sweep))
    _draw_frontier(axes, sweep, curve_compute)
    axes.set(xscale="log", yscale="log", xlabel="training compute C = 6ND (FLOPs)",
             ylabel="validation loss (nats/token)",
             title=f"Scaling law fitted to {len(sweep.runs)} runs (Hoffmann et al. 2022)")
    _label_losses(axes)
    axes.legend(fontsize="small")


def _law_label(sweep: Sweep) -> str:
    """The law with an interval on each of its numbers, and its split's exponents."""
    law, bounds = sweep.law, parameter_intervals(sweep)
    lines = [f"fit: L = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3f} + {law.B:.3g}/D^{law.beta:.3f}",
             ", ".join(f"{name} {_with_interval(getattr(law, name), bounds[name])}"
                       for name in ("E", "A", "B")),
             ", ".join(f"{name} {_with_interval(getattr(law, name), bounds[name])}"
                       for name in ("alpha", "beta"))]
    if law.split_exponents is not None:
        lines.append("split: " + ", ".join(
            f"{name} {_with_interval(value, bounds[f'law_{name}'])}"
            for name, value in zip(("a", "b"), law.split_exponents, strict=True)))
    return "\n".join(lines)


def _draw_frontier(axes: plt.Axes, sweep: Sweep, curve_compute: np.ndarray) -> None:
    axes.plot([run.compute for run in sweep.frontier], [run.loss for run in sweep.frontier],
              color="black", linewidth=1, marker="o", markerfacecolor="none", markersize=9,
              label="compute frontier (lowest loss so far)")
    if sweep.frontier_fit is not None:
        fit = sweep.frontier_fit
        axes.plot(curve_compute, fit.loss(curve_compute), color="black", linestyle="--",
                  label=f"frontier fit: L = {fit.E:.3g} + {fit.A:.3g} C^-{fit.gamma:.3f}")


def _draw_isoflop(axes: plt.Axes, sweep: Sweep) -> None:
    """Each budget's runs, its parabola, and its vertex N_opt where the profile is usable."""
    if sweep.isoflop is None:
        axes.text(0.5, 0.5, f"no isoFLOP profiles:\nno compute budget has runs at "
                            f"{PROFILE_SIZES} or more model sizes",
                  ha="center", va="center", transform=axes.transAxes)
        axes.set_axis_off()
        return
    profiles = sweep.isoflop.profiles
    colours = plt.get_cmap("plasma")(np.linspace(0, 0.8, len(profiles)))
    for profile, colour in zip(profiles, colours, strict=True):
        runs = [run for run in sweep.runs if run.budget == profile.budget]
        axes.scatter([run.n_params for run in runs], [run.loss for run in runs], color=colour,
                     zorder=3)
        low, high = profile.n_range
        curve_n = np.geomspace(low / CURVE_MARGIN, high * CURVE_MARGIN, CURVE_POINTS)
        if profile.problem is None:
            axes.plot(curve_n, profile.loss(curve_n), color=colour, linewidth=1,
                      label=f"C = {profile.budget:.3g}: N_opt = {_count(profile.n_opt)}")
            axes.plot(profile.n_opt, profile.loss(profile.n_opt), color=colour, marker="*",
                      markersize=14, markeredgecolor="black", zorder=4)
        else:
            axes.plot(curve_n, profile.loss(curve_n), color=colour, linewidth=1,
                      linestyle=":", label=f"C = {profile.budget:.3g}: not used")
    isoflop, bounds = sweep.isoflop, parameter_intervals(sweep)
    exponent = ("" if isoflop.a is None else
                f": N_opt ∝ C^a, a {_with_interval(isoflop.a, bounds['a'])}")
    axes.set(xscale="log", yscale="log", xlabel="model size N (parameters)",
             ylabel="validation loss (nats/token)", title=f"isoFLOP profiles{exponent}")
    _label_losses(axes)
    axes.legend(fontsize="small", title="budget (FLOPs)")


def _label_losses(axes: plt.Axes) -> None:
    # A log scale's default labels name only the powers of ten, which a loss range rarely spans.
    for axis_formatter in (axes.yaxis.set_major_formatter, axes.yaxis.set_minor_formatter):
        axis_formatter(ticker.FormatStrFormatter("%.1f"))
    axes.grid(True, which="both", alpha=0.3)


def _count(n: float) -> str:
    """1.6e7 as "16M": a model size as people say it."""
    for scale, suffix in COUNT_SUFFIXES:
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.3g}"


def _with_interval(value: float, interval: Interval | None) -> str:
    """0.34 [0.31, 0.37]: a value and its 95% interval, when it has one."""
    if interval is None:
        return f"{value:.3g}"
    return f"{value:.3g} [{interval[0]:.3g}, {interval[1]:.3g}]"


# --- the summary and its text -----------------------------------------------------------------

def scaling_summary(sweep: Sweep, budget: float, train_tokens: float | None = None
                    ) -> dict[str, Any]:
    """The fit as JSON for metrics/scaling.json, deterministic for the same sweep: every fitted
    number as {"value", "ci95": {"low", "high"}} (no ci95 where no refit has it), the law and
    its residuals, the isoFLOP fit, the frontier's fit, the compute-optimal N and D for
    `budget` FLOPs (with "reliable" false and the reasons when any warning holds), the
    warnings, and each run's epochs of a `train_tokens`-token train split when that is given."""
    for what, value, unit in (("the compute budget", budget, "FLOPs"),
                              ("train_tokens", train_tokens, "tokens")):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise GptlabError(f"{what} must be a positive number of {unit}, not {value}")
    bounds = parameter_intervals(sweep) | allocation_intervals(sweep, budget)
    warnings = fit_warnings(sweep, budget, train_tokens)
    law = sweep.law
    summary: dict[str, Any] = {
        "runs": len(sweep.runs),
        "N": N_CONVENTION,
        "law": {**{name: _estimate(getattr(law, name), bounds[name]) for name in LAW_NAMES},
                **_split_summary(law, bounds),
                "huber": law.objective, "residual_rms": law.residual_rms,
                "residuals": law.residuals},
        "frontier": _frontier_summary(sweep),
        "compute_optimal": _advice(law, budget, bounds, warnings),
        "warnings": warnings,
        "bootstrap": {"samples": sweep.bootstrap.samples, "seed": sweep.bootstrap.seed,
                      "law_refits": len(sweep.bootstrap.laws),
                      "isoflop_refits": len(sweep.bootstrap.isoflops)},
    }
    if (spread := seed_spread(sweep.runs)) is not None:
        summary["seed_spread"] = spread
    if sweep.isoflop is not None:
        summary["isoflop"] = _isoflop_summary(sweep, bounds)
    if train_tokens is not None:
        summary["train_tokens"] = train_tokens
        summary["epochs"] = {run.name: run.n_tokens / train_tokens for run in sweep.runs}
    return summary


def _estimate(value: float, interval: Interval | None) -> dict[str, Any]:
    if interval is None:
        return {"value": value}
    return {"value": value, "ci95": {"low": interval[0], "high": interval[1]}}


def _split_summary(law: LawFit, bounds: dict[str, Interval | None]) -> dict[str, Any]:
    """The law's a and b, as the isoFLOP fit's are named, when it has a best split."""
    if law.split_exponents is None:
        return {}
    a, b = law.split_exponents
    return {"a": _estimate(a, bounds["law_a"]), "b": _estimate(b, bounds["law_b"])}


def _frontier_summary(sweep: Sweep) -> dict[str, Any]:
    frontier: dict[str, Any] = {"runs": len(sweep.frontier)}
    if sweep.frontier_fit is not None:
        fit = sweep.frontier_fit
        frontier |= {"E": fit.E, "A": fit.A, "gamma": fit.gamma, "huber": fit.objective}
    return frontier


def _advice(law: LawFit, budget: float, bounds: dict[str, Interval | None],
            warnings: list[str]) -> dict[str, Any]:
    """The law's compute-optimal split of `budget`: reliable only when no warning holds."""
    advice: dict[str, Any] = {"compute": budget, "reliable": not warnings}
    if law.has_optimum:
        optimal = law.compute_optimal(budget)
        advice |= {"n_params": _estimate(optimal.n_params, bounds["N_opt"]),
                   "n_tokens": _estimate(optimal.n_tokens, bounds["D_opt"]),
                   "loss": optimal.loss,
                   "tokens_per_param": optimal.n_tokens / optimal.n_params}
    if warnings:
        advice["reasons"] = warnings
    return advice


def _isoflop_summary(sweep: Sweep, bounds: dict[str, Interval | None]) -> dict[str, Any]:
    """Each profile's vertex (or why it is not used), keyed by its budget, and a and b."""
    isoflop = sweep.isoflop
    profiles = {}
    for profile in isoflop.profiles:
        entry: dict[str, Any] = {"runs": profile.runs}
        if profile.problem is None:
            entry |= {"n_opt": _estimate(profile.n_opt, profile_interval(sweep, profile.budget)),
                      "loss": float(profile.loss(profile.n_opt))}
        else:
            entry["problem"] = profile.problem
        profiles[str(float(profile.budget))] = entry
    summary: dict[str, Any] = {"profiles": profiles}
    if isoflop.a is not None:
        summary |= {"a": _estimate(isoflop.a, bounds["a"]), "b": _estimate(isoflop.b, bounds["b"]),
                    "k_n": isoflop.k_n}
    return summary


def render_scaling(summary: dict[str, Any]) -> str:
    """The summary as a few lines for a terminal: the law with its intervals, the isoFLOP
    exponents, the compute-optimal split or why it is withheld, and the warnings."""
    law, advice = summary["law"], summary["compute_optimal"]
    lines = [f"{summary['runs']} runs: L(N, D) = {law['E']['value']:.3g} + "
             f"{law['A']['value']:.4g}/N^{law['alpha']['value']:.3f} + "
             f"{law['B']['value']:.4g}/D^{law['beta']['value']:.3f}",
             f"  95% intervals from {summary['bootstrap']['samples']} resamples: "
             + ", ".join(f"{name} {_rendered(law[name])}" for name in LAW_NAMES),
             *([f"  its compute-optimal split: N_opt ∝ C^a with a = {_rendered(law['a'])}, "
                f"D_opt ∝ C^b with b = {_rendered(law['b'])}"] if "a" in law else []),
             f"  N counts {summary['N']}",
             *_rendered_isoflop(summary.get("isoflop"))]
    if advice["reliable"]:
        lines.append(f"compute-optimal at {advice['compute']:.3g} FLOPs: "
                     f"N = {_rendered(advice['n_params'])}, D = {_rendered(advice['n_tokens'])} "
                     f"({advice['tokens_per_param']:.1f} tokens per parameter)")
    else:
        lines.append(f"no compute-optimal split for {advice['compute']:.3g} FLOPs: these runs "
                     f"do not support one (the warnings below)")
    lines += [f"warning: {warning}" for warning in summary["warnings"]]
    return "\n".join(lines)


def _rendered(estimate: dict[str, Any]) -> str:
    interval = estimate.get("ci95")
    return _with_interval(estimate["value"],
                          None if interval is None else (interval["low"], interval["high"]))


def _rendered_isoflop(isoflop: dict[str, Any] | None) -> list[str]:
    if isoflop is None:
        return [f"no isoFLOP profiles: no compute budget has runs at {PROFILE_SIZES} or more "
                f"model sizes"]
    if "a" in isoflop:
        lines = [f"isoFLOP profiles: N_opt ∝ C^a with a = {_rendered(isoflop['a'])}, "
                 f"D_opt ∝ C^b with b = {_rendered(isoflop['b'])}"]
    else:
        lines = [f"isoFLOP profiles: a and b need {EXPONENT_BUDGETS} or more usable ones"]
    for budget, profile in isoflop["profiles"].items():
        found = (f"N_opt = {_rendered(profile['n_opt'])}" if "n_opt" in profile
                 else f"not used: {profile['problem']}")
        lines.append(f"  at {float(budget):.3g} FLOPs ({profile['runs']} runs): {found}")
    return lines
