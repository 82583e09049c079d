"""Seed statistics for ablations: runs grouped by their params, each group's metrics with a
confidence interval, and each group against a baseline by Welch's t-test.

Two configurations trained from different seeds differ by chance alone; a difference means
something only when it is large against the spread between seeds. A group of one run has no
spread to measure, so it gets no standard deviation and no interval, never a made-up one.
Several groups tested against one baseline find a "significant" difference by chance more
often than one test does; Holm's step-down adjustment of their p-values corrects for that.

Student's t distribution is computed here, from the regularized incomplete beta function, so
that no statistics library is needed.
"""

from __future__ import annotations

import json
import math
import numbers
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from gptlab.errors import GptlabError

SEED_KEY = "seed"
DEFAULT_METRICS = ("val_loss", "bits_per_byte")
CONFIDENCE = 0.95
ONE_GROUP = "all runs"
# A group's commit, where runs come from several, is shown by this many of its hex digits.
SHORT_COMMIT = 7
NO_CORRECTION, HOLM = "none", "holm"
CORRECTIONS = (NO_CORRECTION, HOLM)
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
    commit: str | None = None  # the commit of the code it ran; None where not known


@dataclass(frozen=True)
class Group:
    name: str  # what sets it apart from the other groups: "model.norm=rmsnorm @1a2b3c4"
    params: dict[str, Any]  # the params its runs share, seed and ignored keys left out
    runs: tuple[Run, ...]
    commit: str | None  # its runs' commit where runs come from several commits, else None


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
    p_adjusted: float | None = None  # p_value corrected for the table's comparisons, if asked


@dataclass(frozen=True)
class TargetTest:
    diff: float  # the group's mean minus the target
    p_value: float | None  # one-sided t-test that the mean is below the target; None for one run


@dataclass(frozen=True)
class Row:
    group: Group
    summary: Summary
    versus_baseline: Difference | None  # None on the baseline's own row
    versus_target: TargetTest | None = None  # None without a target


@dataclass(frozen=True)
class Comparison:
    metric: str
    baseline: str  # the baseline group's name
    rows: tuple[Row, ...]  # sorted by the metric's mean
    correction: str = NO_CORRECTION  # of the p-values for multiple comparisons
    target: float | None = None  # the fixed value each group's mean is tested against


# --- grouping ---------------------------------------------------------------------------------

def group_runs(runs: Iterable[Run], ignore: Iterable[str] = ()) -> list[Group]:
    """The runs grouped by their params with `seed` and the keys in `ignore` left out, in the
    order the groups first appear; each group is named by the params that differ between
    groups. Where the runs come from several commits, runs of different commits (which may have
    run different code) never share a group: the commit is part of each group and its name."""
    runs = list(runs)
    left_out = {SEED_KEY, *ignore}
    by_commit = len({run.commit for run in runs}) > 1
    members: dict[tuple[Any, ...], list[Run]] = {}
    for run in runs:
        key = (_hashable(_grouped_params(run.params, left_out)), run.commit if by_commit else None)
        members.setdefault(key, []).append(run)
    if not members:
        raise GptlabError("no runs to compare")
    # A group's params are its first run's: the others' are equal, if perhaps written 1.0 for 1.
    shared = [_grouped_params(grouped[0].params, left_out) for grouped in members.values()]
    differing = _differing_keys(shared)
    return [Group(_group_name(params, differing, commit), params, tuple(grouped), commit)
            for params, ((_, commit), grouped) in zip(shared, members.items(), strict=True)]


def group_of(groups: Iterable[Group], params: dict[str, Any], ignore: Iterable[str] = (),
             commit: str | None = None) -> Group | None:
    """The group whose runs share exactly these params (seed and `ignore` left out), if any;
    where the groups are split by commit, the one of this commit."""
    wanted = _hashable(_grouped_params(params, {SEED_KEY, *ignore}))
    return next((group for group in groups
                 if _hashable(group.params) == wanted and group.commit in (None, commit)), None)


def _grouped_params(params: dict[str, Any], left_out: set[str]) -> dict[str, Any]:
    return {key: value for key, value in params.items() if key not in left_out}


def _hashable(params: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    # Param values may be lists or dicts (data.include); their JSON text compares them.
    return tuple(sorted((key, json.dumps(_canonical(value), sort_keys=True, default=str))
                        for key, value in params.items()))


def _canonical(value: Any) -> Any:
    """The value with each whole float made an int: `-S train.grad_clip=1` and `=1.0` set the
    same param. A bool is no number here (True is not 1), and JSON keeps it apart."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_canonical(item) for item in value]
    if isinstance(value, dict):
        return {key: _canonical(item) for key, item in value.items()}
    return value


def _differing_keys(param_sets: list[dict[str, Any]]) -> list[str]:
    keys = sorted(set().union(*param_sets))
    return [key for key in keys
            if len({_hashable({key: params.get(key, UNSET)}) for params in param_sets}) > 1]


def _group_name(params: dict[str, Any], differing: list[str], commit: str | None) -> str:
    shown = ", ".join(f"{key}={_shown(params.get(key, UNSET))}" for key in differing)
    if commit is not None:
        return f"{shown} @{commit[:SHORT_COMMIT]}".lstrip()
    return shown or ONE_GROUP


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


def below_target(summary: Summary, target: float) -> TargetTest:
    """The group's mean minus `target`, with the one-sided p-value of Student's t-test (n - 1
    degrees of freedom) that the mean is below it: the rule of a speedrun record, where a
    recipe counts when its mean loss over seeds is below the target with p < 0.01."""
    diff = summary.mean - target
    if summary.sd is None:
        return TargetTest(diff, None)
    if summary.sd == 0:  # every run scored the same: below the target for certain, or not
        return TargetTest(diff, 0.0 if diff < 0 else 1.0)
    return TargetTest(diff, t_cdf(diff / (summary.sd / math.sqrt(summary.n)), summary.n - 1))


def compare(groups: Sequence[Group], metrics: Sequence[str] = DEFAULT_METRICS,
            baseline: str | None = None, correction: str = NO_CORRECTION,
            target: float | None = None) -> list[Comparison]:
    """For each metric, every group's summary and its difference from the baseline group (a
    group's name or one of its runs' names; the first group by default), rows sorted by mean;
    with a `target`, each group's test of being below it too.

    A metric's table counts the runs that have it: a run without it is left out of that table
    only, and a group with no such run has no row. `correction` "holm" adjusts the p-values of
    each table for its number of comparisons."""
    if correction not in CORRECTIONS:
        raise GptlabError(f"correction {correction!r}: expected one of {', '.join(CORRECTIONS)}")
    if target is not None and not math.isfinite(target):
        raise GptlabError(f"--target: {target} is not a finite number")
    reference = find_baseline(groups, baseline)
    return [_compare_metric(groups, reference, metric, correction, target) for metric in metrics]


def _compare_metric(groups: Sequence[Group], reference: Group, metric: str,
                    correction: str, target: float | None) -> Comparison:
    base_group = _runs_with(reference, metric)
    if not base_group.runs:
        known = sorted({name for run in reference.runs for name in run.metrics})
        raise GptlabError(f"no run of the baseline ({reference.name}) has {metric!r} (they "
                          f"have {', '.join(known) or 'none'})")
    base = summarize(metric_values(base_group, metric))
    rows = []
    for group in groups:
        if group is reference:
            rows.append(Row(base_group, base, None))
        elif (measured := _runs_with(group, metric)).runs:
            summary = summarize(metric_values(measured, metric))
            rows.append(Row(measured, summary, difference(summary, base)))
    if correction == HOLM:
        rows = _holm_adjusted(rows)
    if target is not None:
        rows = [replace(row, versus_target=below_target(row.summary, target)) for row in rows]
    rows.sort(key=lambda row: row.summary.mean)
    return Comparison(metric, reference.name, tuple(rows), correction, target)


def _runs_with(group: Group, metric: str) -> Group:
    """The group with only the runs that have the metric."""
    return replace(group, runs=tuple(run for run in group.runs if metric in run.metrics))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of k p-values, in their order: the i-th smallest is
    multiplied by k - i + 1 (i from 1), capped at 1, and raised to the largest adjusted value
    before it, so that the adjusted values keep the order of the raw ones."""
    k = len(p_values)
    adjusted = [0.0] * k
    running = 0.0
    for rank, index in enumerate(sorted(range(k), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (k - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def _holm_adjusted(rows: list[Row]) -> list[Row]:
    """The rows with Holm's adjustment over the tests that have a p-value."""
    tested = [index for index, row in enumerate(rows) if _tested(row)]
    adjusted = dict(zip(tested, holm([rows[index].versus_baseline.p_value for index in tested]),
                        strict=True))
    return [replace(row, versus_baseline=replace(row.versus_baseline, p_adjusted=adjusted[index]))
            if index in adjusted else row for index, row in enumerate(rows)]


def _tested(row: Row) -> bool:
    """Whether the row has a test against the baseline (a p-value)."""
    return row.versus_baseline is not None and row.versus_baseline.p_value is not None


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
    """The metric of each run of the group, which all have it; a value that is not a finite
    number is a GptlabError naming the run."""
    values = []
    for run in group.runs:
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
        lines = [f"{comparison.metric} (baseline: {comparison.baseline}{_target_text(comparison)})"]
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
        lines = [f"**{comparison.metric}** (baseline: {_escaped(comparison.baseline)}"
                 f"{_target_text(comparison)})", "",
                 _markdown_line(header),
                 "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += [_markdown_line(row) for row in rows]
        notes = _notes(comparison)
        sections.append("\n".join(lines + (["", *notes] if notes else [])))
    return "\n\n".join(sections) + "\n"


def comparisons_json(comparisons: Sequence[Comparison]) -> dict[str, Any]:
    """The comparisons as plain data for JSON, by metric, numbers unrounded, None for null."""
    return {comparison.metric: _comparison_json(comparison) for comparison in comparisons}


def _comparison_json(comparison: Comparison) -> dict[str, Any]:
    # A correction's keys only with a correction: plain output has no keys that are always null.
    corrected = comparison.correction != NO_CORRECTION
    return {"baseline": comparison.baseline,
            **({"correction": comparison.correction} if corrected else {}),
            **({"target": comparison.target} if comparison.target is not None else {}),
            "rows": [_row_json(row, corrected) for row in comparison.rows]}


def _row_json(row: Row, corrected: bool) -> dict[str, Any]:
    summary, versus, target = row.summary, row.versus_baseline, row.versus_target
    return {
        "group": row.group.name,
        "runs": [run.name for run in row.group.runs],
        "n": summary.n,
        "mean": summary.mean,
        "sd": summary.sd,
        "ci95": interval_json(summary.ci95),
        "vs_baseline": None if versus is None else {
            "diff": versus.diff, "ci95": interval_json(versus.ci95), "p_value": versus.p_value,
            **({"p_adjusted": versus.p_adjusted} if corrected else {})},
        **({"vs_target": {"diff": target.diff, "p_below": target.p_value}}
           if target is not None else {}),
    }


def interval_json(interval: tuple[float, float] | None) -> list[float] | None:
    """An interval as JSON holds it: a [low, high] list, or null."""
    return None if interval is None else list(interval)


def _cells(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    """The table's header and rows as text, numbers rounded alike within the metric."""
    decimals = _decimals(comparison)
    corrected = comparison.correction == HOLM
    header = ["group", "n", "mean", "sd", "95% CI", "diff", "diff 95% CI", "p (Welch)"]
    header += ["p (Holm)"] if corrected else []
    header += ["vs target", "p (below)"] if comparison.target is not None else []
    rows = []
    for row in comparison.rows:
        summary, versus = row.summary, row.versus_baseline
        cells = [row.group.name, str(summary.n), f"{summary.mean:.{decimals}f}",
                 _number(summary.sd, decimals), _interval(summary.ci95, decimals)]
        if versus is None:
            cells += ["baseline", "", ""] + ([""] if corrected else [])
        else:
            cells += [f"{versus.diff:+.{decimals}f}", _interval(versus.ci95, decimals),
                      format_p(versus.p_value)]
            cells += [format_p(versus.p_adjusted)] if corrected else []
        if (target := row.versus_target) is not None:
            cells += [f"{target.diff:+.{decimals}f}", format_p(target.p_value)]
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


def format_p(p: float | None) -> str:
    if p is None:
        return "-"
    return f"<{P_VALUE_FLOOR:g}" if p < P_VALUE_FLOOR else f"{p:#.3g}"


def _target_text(comparison: Comparison) -> str:
    return "" if comparison.target is None else f"; target: {comparison.target:g}"


def _notes(comparison: Comparison) -> list[str]:
    notes = []
    single = [row.group.name for row in comparison.rows if row.summary.n < 2]
    if single:
        each = "one run" if len(single) == 1 else "one run each"
        notes.append(f"{'; '.join(single)}: {each}, so no sd, interval or p-value; "
                     f"run more seeds")
    tests = sum(_tested(row) for row in comparison.rows)
    if comparison.correction == HOLM and tests:
        notes.append(f"p (Holm): Welch's p, Holm-adjusted for the {tests} "
                     f"comparison{'' if tests == 1 else 's'} of {comparison.metric} with the "
                     f"baseline")
    if comparison.target is not None:
        notes.append(f"p (below): one-sided t-test that the group's mean is below "
                     f"{comparison.target:g}")
    return notes


def _markdown_line(cells: list[str]) -> str:
    return "| " + " | ".join(_escaped(cell) for cell in cells) + " |"


def _escaped(text: str) -> str:
    return text.replace("|", "\\|")
