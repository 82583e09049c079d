"""Seed statistics for ablations: runs grouped by their params, each group's metrics with a
confidence interval, and each group against a baseline by Welch's t-test.

Two configurations trained from different seeds differ by chance alone; a difference means
something only when it is large against the spread between seeds. A group of one run has no
spread to measure, so it gets no standard deviation and no interval, never a made-up one.

Student's t distribution is computed here, from the regularized incomplete beta function, so
that no statistics library is needed.
"""

from __future__ import annotations

import json
import math
import numbers
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from gptlab.errors import GptlabError

SEED_KEY = "seed"
DEFAULT_METRICS = ("val_loss", "bits_per_byte")
CONFIDENCE = 0.95
ONE_GROUP = "all runs"
# Shown for a param that some groups do not have at all.
UNSET = "(unset)"
# Lentz's method: a stand-in for zero that keeps its divisions finite, the relative change of
# the continued fraction at which it has converged, and a bound on its terms (it needs about
# sqrt(max(a, b)) of them).
TINY = 1e-300
FRACTION_TOLERANCE = 1e-15
MAX_FRACTION_TERMS = 100_000
QUANTILE_TOLERANCE = 1e-14
MAX_QUANTILE_STEPS = 200
P_VALUE_FLOOR = 0.001


@dataclass(frozen=True)
class Run:
    name: str
    params: dict[str, Any]  # flat, dotted keys: {"model.norm": "rmsnorm", "seed": 1}
    metrics: dict[str, float]  # flat: {"val_loss": 1.91, "bits_per_byte": 2.76}


@dataclass(frozen=True)
class Group:
    name: str  # the params that set it apart from the other groups: "model.norm=rmsnorm"
    params: dict[str, Any]  # the params its runs share, seed and ignored keys left out
    runs: tuple[Run, ...]


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    sd: float | None  # sample standard deviation (n - 1); None for a single run
    ci95: tuple[float, float] | None  # 95% interval of the mean (Student's t); None for one run


@dataclass(frozen=True)
class Difference:
    diff: float  # the group's mean minus the baseline's
    ci95: tuple[float, float] | None  # Welch's 95% interval; None when it cannot be estimated
    p_value: float | None  # Welch's two-sided test; None when it cannot be computed


@dataclass(frozen=True)
class Row:
    group: Group
    summary: Summary
    versus_baseline: Difference | None  # None on the baseline's own row


@dataclass(frozen=True)
class Comparison:
    metric: str
    baseline: str  # the baseline group's name
    rows: tuple[Row, ...]  # sorted by the metric's mean


# --- grouping ---------------------------------------------------------------------------------

def group_runs(runs: Iterable[Run], ignore: Iterable[str] = ()) -> list[Group]:
    """The runs grouped by their params with `seed` and the keys in `ignore` left out, in the
    order the groups first appear; each group is named by the params that differ between
    groups."""
    left_out = {SEED_KEY, *ignore}
    members: dict[tuple[tuple[str, str], ...], list[Run]] = {}
    shared: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
    for run in runs:
        params = {key: value for key, value in run.params.items() if key not in left_out}
        key = _hashable(params)
        members.setdefault(key, []).append(run)
        shared[key] = params
    if not members:
        raise GptlabError("no runs to compare")
    differing = _differing_keys(list(shared.values()))
    return [Group(_group_name(shared[key], differing), shared[key], tuple(grouped))
            for key, grouped in members.items()]


def group_of(groups: Iterable[Group], params: dict[str, Any],
             ignore: Iterable[str] = ()) -> Group | None:
    """The group whose runs share exactly these params (seed and `ignore` left out), if any."""
    left_out = {SEED_KEY, *ignore}
    wanted = _hashable({key: value for key, value in params.items() if key not in left_out})
    return next((group for group in groups if _hashable(group.params) == wanted), None)


def _hashable(params: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    # Param values may be lists or dicts (data.include); their JSON text compares them.
    return tuple(sorted((key, json.dumps(value, sort_keys=True, default=str))
                        for key, value in params.items()))


def _differing_keys(param_sets: list[dict[str, Any]]) -> list[str]:
    keys = sorted(set().union(*param_sets))
    return [key for key in keys
            if len({_hashable({key: params.get(key, UNSET)}) for params in param_sets}) > 1]


def _group_name(params: dict[str, Any], differing: list[str]) -> str:
    if not differing:
        return ONE_GROUP
    return ", ".join(f"{key}={_shown(params.get(key, UNSET))}" for key in differing)


def _shown(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


# --- statistics -------------------------------------------------------------------------------

def summarize(values: Sequence[float]) -> Summary:
    """Mean, sample standard deviation and the 95% interval of the mean (Student's t with
    n - 1 degrees of freedom) of one or more values."""
    n, mean = len(values), statistics.fmean(values)
    if n < 2:
        return Summary(n, mean, None, None)
    sd = statistics.stdev(values)
    half_width = t_quantile((1 + CONFIDENCE) / 2, n - 1) * sd / math.sqrt(n)
    return Summary(n, mean, sd, (mean - half_width, mean + half_width))


def difference(group: Summary, baseline: Summary) -> Difference:
    """The group's mean minus the baseline's, with Welch's 95% interval and two-sided p-value
    (Welch-Satterthwaite degrees of freedom); both need two runs or more on each side."""
    diff = group.mean - baseline.mean
    if group.sd is None or baseline.sd is None:
        return Difference(diff, None, None)
    group_var, baseline_var = group.sd**2 / group.n, baseline.sd**2 / baseline.n
    se = math.sqrt(group_var + baseline_var)
    # Runs that all scored the same on both sides leave Welch's statistic undefined.
    if se == 0:
        return Difference(diff, None, None)
    df = (group_var + baseline_var) ** 2 / (group_var**2 / (group.n - 1)
                                            + baseline_var**2 / (baseline.n - 1))
    half_width = t_quantile((1 + CONFIDENCE) / 2, df) * se
    p_value = 2 * _upper_tail(abs(diff) / se, df)
    return Difference(diff, (diff - half_width, diff + half_width), p_value)


def compare(groups: Sequence[Group], metrics: Sequence[str] = DEFAULT_METRICS,
            baseline: str | None = None) -> list[Comparison]:
    """For each metric, every group's summary and its difference from the baseline group (a
    group's name or one of its runs' names; the first group by default), rows sorted by mean."""
    reference = find_baseline(groups, baseline)
    comparisons = []
    for metric in metrics:
        summaries = [summarize(metric_values(group, metric)) for group in groups]
        base = summaries[groups.index(reference)]
        rows = [Row(group, summary, None if group is reference else difference(summary, base))
                for group, summary in zip(groups, summaries, strict=True)]
        rows.sort(key=lambda row: row.summary.mean)
        comparisons.append(Comparison(metric, reference.name, tuple(rows)))
    return comparisons


def find_baseline(groups: Sequence[Group], baseline: str | None) -> Group:
    """The group named `baseline`, or the one holding a run of that name; the first if None."""
    if baseline is None:
        return groups[0]
    for group in groups:
        if baseline == group.name or baseline in (run.name for run in group.runs):
            return group
    names = "; ".join(group.name for group in groups)
    raise GptlabError(f"baseline {baseline!r} is neither a group nor a run (groups: {names})")


def metric_values(group: Group, metric: str) -> list[float]:
    """The metric of each run of the group; a run without it, or with a value that is not a
    finite number, is a GptlabError naming the run."""
    values = []
    for run in group.runs:
        if metric not in run.metrics:
            raise GptlabError(f"run {run.name}: no metric {metric!r} "
                              f"(it has {', '.join(sorted(run.metrics)) or 'none'})")
        value = run.metrics[metric]
        if isinstance(value, bool) or not isinstance(value, numbers.Real) \
                or not math.isfinite(value):
            raise GptlabError(f"run {run.name}: {metric} is {value!r}, not a finite number")
        values.append(float(value))
    return values


# --- Student's t distribution -----------------------------------------------------------------

def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom (any df > 0, not only whole)."""
    tail = _upper_tail(abs(t), df)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p, for 0 < p < 1."""
    if not 0 < p < 1:
        raise ValueError(f"a quantile needs 0 < p < 1, not {p}")
    if p < 0.5:
        return -_upper_quantile(p, df)
    return _upper_quantile(1.0 - p, df) if p > 0.5 else 0.0


def _t_pdf(t: float, df: float) -> float:
    log_scale = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_scale - (df + 1) / 2 * math.log1p(t * t / df))


def _upper_tail(t: float, df: float) -> float:
    """P(T > t) for t >= 0, computed as itself (not 1 - cdf) so a small tail keeps its digits."""
    return 0.5 * regularized_incomplete_beta(df / (df + t * t), df / 2, 0.5)


def _upper_quantile(tail: float, df: float) -> float:
    """The t >= 0 with P(T > t) = tail, for 0 < tail < 1/2: Newton's method, kept inside a
    bracket of the answer; a step that would leave the bracket bisects it instead."""
    low, high = 0.0, 1.0
    while _upper_tail(high, df) > tail:
        low, high = high, 2 * high
    t = (low + high) / 2
    for _ in range(MAX_QUANTILE_STEPS):
        excess = _upper_tail(t, df) - tail
        if excess == 0:
            return t
        if excess > 0:
            low = t
        else:
            high = t
        candidate = t + excess / _t_pdf(t, df)
        if not low < candidate < high:
            candidate = (low + high) / 2
        if abs(candidate - t) <= QUANTILE_TOLERANCE * max(1.0, t):
            return candidate
        t = candidate
    return t


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b) for 0 <= x <= 1 and a, b > 0.

    The continued fraction (Numerical Recipes, 6.4) converges fast for x < (a + 1) / (a + b + 2);
    the symmetry I_x(a, b) = 1 - I_{1-x}(b, a) brings every other x there.
    """
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - regularized_incomplete_beta(1.0 - x, b, a)
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - log_beta)
    return front * _beta_continued_fraction(x, a, b) / a


def _beta_continued_fraction(x: float, a: float, b: float) -> float:
    """The continued fraction of I_x(a, b), evaluated front to back by Lentz's method: each
    term multiplies the value so far by c * d, and it has converged when that is 1."""
    c = 1.0
    d = 1.0 / _away_from_zero(1.0 - (a + b) * x / (a + 1))
    fraction = d
    for m in range(1, MAX_FRACTION_TERMS + 1):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        for numerator in (even, odd):
            d = 1.0 / _away_from_zero(1.0 + numerator * d)
            c = _away_from_zero(1.0 + numerator / c)
            fraction *= c * d
        if abs(c * d - 1.0) < FRACTION_TOLERANCE:
            return fraction
    raise ArithmeticError(f"the incomplete beta fraction did not converge (x={x}, a={a}, b={b})")


def _away_from_zero(value: float) -> float:
    return value if abs(value) > TINY else TINY


# --- rendering --------------------------------------------------------------------------------

def render_text(comparisons: Sequence[Comparison]) -> str:
    """The comparisons as plain-text tables for a terminal, one per metric."""
    sections = []
    for comparison in comparisons:
        header, rows = _cells(comparison)
        widths = [max(len(line[column]) for line in [header, *rows])
                  for column in range(len(header))]
        lines = [f"{comparison.metric} (baseline: {comparison.baseline})"]
        for line in [header, *rows]:
            cells = [line[0].ljust(widths[0])]
            cells += [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
            lines.append("  ".join(cells).rstrip())
        sections.append("\n".join(lines + _notes(comparison)))
    return "\n\n".join(sections) + "\n"


def render_markdown(comparisons: Sequence[Comparison]) -> str:
    """The comparisons as Markdown tables, one per metric."""
    sections = []
    for comparison in comparisons:
        header, rows = _cells(comparison)
        lines = [f"**{comparison.metric}** (baseline: {_escaped(comparison.baseline)})", "",
                 _markdown_line(header),
                 "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += [_markdown_line(row) for row in rows]
        notes = _notes(comparison)
        sections.append("\n".join(lines + (["", *notes] if notes else [])))
    return "\n\n".join(sections) + "\n"


def comparisons_json(comparisons: Sequence[Comparison]) -> dict[str, Any]:
    """The comparisons as plain data for JSON, by metric, numbers unrounded, None for null."""
    return {comparison.metric: {"baseline": comparison.baseline,
                                "rows": [_row_json(row) for row in comparison.rows]}
            for comparison in comparisons}


def _row_json(row: Row) -> dict[str, Any]:
    summary, versus = row.summary, row.versus_baseline
    return {
        "group": row.group.name,
        "runs": [run.name for run in row.group.runs],
        "n": summary.n,
        "mean": summary.mean,
        "sd": summary.sd,
        "ci95": _pair(summary.ci95),
        "vs_baseline": None if versus is None else {
            "diff": versus.diff, "ci95": _pair(versus.ci95), "p_value": versus.p_value},
    }


def _pair(interval: tuple[float, float] | None) -> list[float] | None:
    return None if interval is None else list(interval)


def _cells(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    """The table's header and rows as text, numbers rounded alike within the metric."""
    decimals = _decimals(comparison)
    header = ["group", "n", "mean", "sd", "95% CI", "diff", "diff 95% CI", "p (Welch)"]
    rows = []
    for row in comparison.rows:
        summary, versus = row.summary, row.versus_baseline
        cells = [row.group.name, str(summary.n), f"{summary.mean:.{decimals}f}",
                 _number(summary.sd, decimals), _interval(summary.ci95, decimals)]
        if versus is None:
            cells += ["baseline", "", ""]
        else:
            cells += [f"{versus.diff:+.{decimals}f}", _interval(versus.ci95, decimals),
                      _p_value(versus.p_value)]
        rows.append(cells)
    return header, rows


def _decimals(comparison: Comparison) -> int:
    """Four decimals for numbers below 10 (losses, bits per byte), fewer for larger ones, so
    every value shows about five significant digits."""
    largest = max(abs(row.summary.mean) for row in comparison.rows)
    magnitude = math.floor(math.log10(largest)) if largest >= 1 else 0
    return max(0, 4 - magnitude)


def _number(value: float | None, decimals: int) -> str:
    return "-" if value is None else f"{value:.{decimals}f}"


def _interval(interval: tuple[float, float] | None, decimals: int) -> str:
    if interval is None:
        return "-"
    low, high = interval
    return f"[{low:.{decimals}f}, {high:.{decimals}f}]"


def _p_value(p: float | None) -> str:
    if p is None:
        return "-"
    return f"<{P_VALUE_FLOOR:g}" if p < P_VALUE_FLOOR else f"{p:#.3g}"


def _notes(comparison: Comparison) -> list[str]:
    single = [row.group.name for row in comparison.rows if row.summary.n < 2]
    if not single:
        return []
    each = "one run" if len(single) == 1 else "one run each"
    return [f"{'; '.join(single)}: {each}, so no sd, interval or p-value; run more seeds"]


def _markdown_line(cells: list[str]) -> str:
    return "| " + " | ".join(_escaped(cell) for cell in cells) + " |"


def _escaped(text: str) -> str:
    return text.replace("|", "\\|")
