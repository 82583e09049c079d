"""Scaling laws from a sweep of runs: the parametric law of Hoffmann et al. (2022), fitted as
they fitted it, the compute-optimal split of a budget that it implies, and the simpler compute
frontier.

    L(N, D) = E + A / N^alpha + B / D^beta

N counts non-embedding parameters, D training tokens, and a run costs C = 6 N D FLOPs. As in the
paper, the fit works in logs: with a = log A, b = log B and e = log E, the predicted log loss
is logsumexp(a - alpha log N, b - beta log D, e), and L-BFGS minimizes the Huber loss between it
and the observed log loss from every point of a grid of starts, keeping the best. The Huber
loss (delta = 1e-3) counts a large miss linearly, so one odd run cannot drag the whole law.

The fit is scipy's L-BFGS on numpy, with the gradient written out (the predicted log loss is
a softmax-weighted sum, so its derivatives are the weights): a few milliseconds a start.
"""

from __future__ import annotations

import itertools
import math
import numbers
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, and none on a server

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import ticker
from scipy.optimize import minimize
from tqdm import tqdm

from gptlab.errors import GptlabError
from gptlab.io import atomic_path

LAW_PARAMETERS = 5  # E, A, B, alpha, beta
FRONTIER_PARAMETERS = 3  # E, A, gamma
HUBER_DELTA = 1e-3
# Starts of L-BFGS: every other point of Hoffmann et al.'s grid (alpha, beta in 0, 0.5, ..., 2;
# e in -1, -0.5, ..., 1.5; a, b in 0, 5, ..., 25), which finds the same optimum on our sweeps
# in a twentieth of the time.
LAW_STARTS = {"a": (0.0, 10.0, 20.0), "b": (0.0, 10.0, 20.0), "e": (-1.0, 0.0, 1.0),
              "alpha": (0.0, 1.0, 2.0), "beta": (0.0, 1.0, 2.0)}
# The frontier's exponent on compute is smaller: about alpha beta / (alpha + beta).
FRONTIER_STARTS = {"a": (0.0, 10.0, 20.0), "e": (-1.0, 0.0, 1.0), "gamma": (0.0, 0.25, 0.5)}
# Run until a step changes nothing: the Huber objective near its optimum is tiny (~1e-5), and
# scipy's default tolerances are relative to max(objective, 1), so they would stop far from it.
LBFGS_OPTIONS = {"maxiter": 1000, "ftol": 1e-15, "gtol": 1e-12, "maxcor": 10}
FIGURE_SIZE = (8, 5.5)
CURVE_POINTS = 200
# How far the fitted curves reach beyond the runs' compute, each way (a factor).
CURVE_MARGIN = 2.0
COUNT_SUFFIXES = ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K"))


@dataclass(frozen=True)
class ScalingRun:
    name: str
    n_params: float  # N: non-embedding parameters
    n_tokens: float  # D: training tokens
    loss: float  # validation loss, nats per token

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

    def compute_optimal(self, compute: float) -> Allocation:
        """The N and D of budget C = 6 N D that minimize L(N, D), in closed form:
        N = G (C/6)^(beta / (alpha + beta)) with G = (alpha A / (beta B))^(1 / (alpha + beta))."""
        if not (self.alpha > 0 and self.beta > 0):
            raise GptlabError(f"the fitted exponents (alpha={self.alpha:.3g}, "
                              f"beta={self.beta:.3g}) are not both positive: the runs do not "
                              f"show the loss falling with size and data, so no budget has a "
                              f"best split")
        exponents = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / exponents)
        n_params = g * (compute / 6) ** (self.beta / exponents)
        n_tokens = compute / (6 * n_params)
        return Allocation(compute, n_params, n_tokens, float(self.loss(n_params, n_tokens)))


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
class Sweep:
    runs: tuple[ScalingRun, ...]
    law: LawFit
    frontier: tuple[ScalingRun, ...]  # the runs below every cheaper run, by compute
    frontier_fit: FrontierFit | None  # None when the frontier has fewer than 3 runs


def analyse_sweep(runs: Sequence[ScalingRun]) -> Sweep:
    """The law fitted to the runs, their compute frontier and its fit."""
    law = fit_law(runs)
    frontier = compute_frontier(runs)
    return Sweep(tuple(runs), law, tuple(frontier), fit_frontier(frontier))


# --- the law ----------------------------------------------------------------------------------

def fit_law(runs: Sequence[ScalingRun]) -> LawFit:
    """L(N, D) fitted to the runs as Hoffmann et al. did (see the module's docstring); bad
    runs are a GptlabError naming the problem."""
    check_runs(runs)
    n_params, n_tokens, loss = (np.array([getattr(run, field) for run in runs], dtype=np.float64)
                                for field in ("n_params", "n_tokens", "loss"))
    theta, objective = _best_huber_fit(_law_log_loss, [np.log(n_params), np.log(n_tokens)],
                                       np.log(loss), _grid(LAW_STARTS))
    a, b, e, alpha, beta = theta
    law = LawFit(math.exp(e), math.exp(a), math.exp(b), alpha, beta, {}, objective)
    residuals = np.log(loss) - np.log(law.loss(n_params, n_tokens))
    return replace(law, residuals={run.name: float(residual)
                                   for run, residual in zip(runs, residuals, strict=True)})


def check_runs(runs: Sequence[ScalingRun]) -> None:
    """Refuse, in one line, runs that cannot identify the law's five parameters."""
    for run in runs:
        for what, value in (("N", run.n_params), ("D", run.n_tokens), ("loss", run.loss)):
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
                                       _grid(FRONTIER_STARTS))
    a, e, gamma = theta
    return FrontierFit(math.exp(e), math.exp(a), gamma, objective)


def _frontier_log_loss(theta: np.ndarray, log_c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log L_hat = logsumexp(a - gamma log C, e) and its Jacobian in theta."""
    a, e, gamma = theta
    terms, weights = _logsumexp_terms([a - gamma * log_c, np.full_like(log_c, e)])
    return terms, np.stack([weights[0], weights[1], -weights[0] * log_c], axis=1)


# --- fitting ----------------------------------------------------------------------------------

def _grid(starts: dict[str, tuple[float, ...]]) -> list[tuple[float, ...]]:
    return list(itertools.product(*starts.values()))


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
                    starts: list[tuple[float, ...]]) -> tuple[list[float], float]:
    """The parameters, and the objective, of the best L-BFGS run over the starts."""
    best: tuple[list[float], float] | None = None
    for start in tqdm(starts, desc="fitting", unit="start", leave=False, disable=None,
                      file=sys.stderr):
        theta, objective = _lbfgs(log_loss, columns, observed, start)
        if math.isfinite(objective) and (best is None or objective < best[1]):
            best = theta, objective
    if best is None:
        raise GptlabError("the scaling fit diverged from every start; check the runs' losses")
    return best


def _lbfgs(log_loss: Callable[..., tuple[np.ndarray, np.ndarray]], columns: list[np.ndarray],
           observed: np.ndarray, start: tuple[float, ...]) -> tuple[list[float], float]:
    """Minimize the summed Huber loss between log_loss(theta, *columns) and `observed` with
    L-BFGS from `start`; return where it stopped and the objective there."""

    def huber_and_gradient(theta: np.ndarray) -> tuple[float, np.ndarray]:
        predicted, jacobian = log_loss(theta, *columns)
        residual = predicted - observed
        inside = np.abs(residual) <= HUBER_DELTA
        huber = np.where(inside, residual**2 / 2,
                         HUBER_DELTA * (np.abs(residual) - HUBER_DELTA / 2))
        slope = np.where(inside, residual, HUBER_DELTA * np.sign(residual))
        return float(huber.sum()), jacobian.T @ slope

    # A start far from the data can overflow exp on the way: that start is simply not kept.
    with np.errstate(over="ignore", invalid="ignore"):
        result = minimize(huber_and_gradient, np.array(start, dtype=np.float64), jac=True,
                          method="L-BFGS-B", options=LBFGS_OPTIONS)
    return result.x.tolist(), float(result.fun)


# --- the figure and the summary ---------------------------------------------------------------

def write_scaling_figure(sweep: Sweep, path: str | Path, dpi: int = 120) -> Path:
    """The sweep's figure as a PNG, written atomically and byte-identical for the same sweep."""
    figure = scaling_figure(sweep)
    with atomic_path(path, "the scaling figure") as tmp:
        # No software/date metadata, so the same sweep gives byte-identical files.
        figure.savefig(tmp, format="png", dpi=dpi, metadata={"Software": None})
    plt.close(figure)
    return Path(path)


def scaling_figure(sweep: Sweep) -> plt.Figure:
    """Loss against compute on log axes: the runs coloured by model size with the fitted law's
    curve for each size, and the compute frontier with its fit."""
    figure, axes = plt.subplots(figsize=FIGURE_SIZE)
    sizes = sorted({run.n_params for run in sweep.runs})
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(sizes)))
    computes = [run.compute for run in sweep.runs]
    curve_compute = np.geomspace(min(computes) / CURVE_MARGIN, max(computes) * CURVE_MARGIN,
                                 CURVE_POINTS)
    for size, colour in zip(sizes, colours, strict=True):
        runs = [run for run in sweep.runs if run.n_params == size]
        axes.scatter([run.compute for run in runs], [run.loss for run in runs], color=colour,
                     zorder=3, label=f"runs, N = {_count(size)}")
        axes.plot(curve_compute, sweep.law.loss(size, curve_compute / (6 * size)), color=colour,
                  linewidth=1, alpha=0.7)
    law = sweep.law
    axes.plot([], [], color="gray", linewidth=1,
              label=f"fit: L = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3f} "
                    f"+ {law.B:.3g}/D^{law.beta:.3f}")
    _draw_frontier(axes, sweep, curve_compute)
    axes.set(xscale="log", yscale="log", xlabel="training compute C = 6ND (FLOPs)",
             ylabel="validation loss (nats/token)",
             title=f"Scaling law fitted to {len(sweep.runs)} runs (Hoffmann et al. 2022)")
    # A log scale's default labels name only the powers of ten, which a loss range rarely spans.
    for axis_formatter in (axes.yaxis.set_major_formatter, axes.yaxis.set_minor_formatter):
        axis_formatter(ticker.FormatStrFormatter("%.1f"))
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


def _draw_frontier(axes: plt.Axes, sweep: Sweep, curve_compute: np.ndarray) -> None:
    axes.plot([run.compute for run in sweep.frontier], [run.loss for run in sweep.frontier],
              color="black", linewidth=1, marker="o", markerfacecolor="none", markersize=9,
              label="compute frontier (lowest loss so far)")
    if sweep.frontier_fit is not None:
        fit = sweep.frontier_fit
        axes.plot(curve_compute, fit.loss(curve_compute), color="black", linestyle="--",
                  label=f"frontier fit: L = {fit.E:.3g} + {fit.A:.3g} C^-{fit.gamma:.3f}")


def _count(n: float) -> str:
    """1.6e7 as "16M": a model size as people say it."""
    for scale, suffix in COUNT_SUFFIXES:
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.3g}"


def scaling_summary(sweep: Sweep, budget: float) -> dict[str, Any]:
    """The fit as numbers for metrics/scaling.json: the law, its residuals, the frontier's fit
    and the compute-optimal N and D for `budget` FLOPs."""
    if not (math.isfinite(budget) and budget > 0):
        raise GptlabError(f"the compute budget must be a positive number of FLOPs, not {budget}")
    law, optimal = sweep.law, sweep.law.compute_optimal(budget)
    frontier: dict[str, Any] = {"runs": len(sweep.frontier)}
    if sweep.frontier_fit is not None:
        fit = sweep.frontier_fit
        frontier |= {"E": fit.E, "A": fit.A, "gamma": fit.gamma, "huber": fit.objective}
    return {
        "runs": len(sweep.runs),
        "law": {"E": law.E, "A": law.A, "B": law.B, "alpha": law.alpha, "beta": law.beta,
                "huber": law.objective, "residuals": law.residuals},
        "frontier": frontier,
        "compute_optimal": {"compute": optimal.compute, "n_params": optimal.n_params,
                            "n_tokens": optimal.n_tokens, "loss": optimal.loss,
                            "tokens_per_param": optimal.n_tokens / optimal.n_params},
    }
