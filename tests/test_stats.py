"""Seed statistics for ablations: Student's t, grouping, summaries, Welch's test and the three
renderings, each number checked against a closed form written out here."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from gptlab.errors import GptlabError
from gptlab.lab.stats import (
    Run,
    compare,
    comparisons_json,
    group_of,
    group_runs,
    holm,
    regularized_incomplete_beta,
    render_markdown,
    render_text,
    summarize,
    t_cdf,
    t_quantile,
)

Q = 0.975  # the quantile of a two-sided 95% interval
SHARED = {"train.max_iters": 2000, "data.include": ["texts/*.txt"]}


def run(name: str, norm: str, seed: int, val_loss: float, device: str = "cpu") -> Run:
    params = {**SHARED, "model.norm": norm, "seed": seed, "train.device": device}
    return Run(name, params, {"val_loss": val_loss, "bits_per_byte": val_loss / math.log(2)})


# Layernorm and scaled have three seeds with the same spread (Welch's df is then 4), rmsnorm
# and nonorm two (df 2), scalenorm one. The devices differ but are ignored.
RUNS = [
    run("ln-1", "layernorm", 1, 2.00), run("ln-2", "layernorm", 2, 2.03, "cuda"),
    run("ln-3", "layernorm", 3, 2.01),
    run("rms-1", "rmsnorm", 1, 1.95), run("rms-2", "rmsnorm", 2, 1.99),
    run("sn-1", "scalenorm", 1, 2.10),
    run("none-1", "nonorm", 1, 2.05), run("none-2", "nonorm", 2, 2.09),
    run("sc-1", "scaled", 1, 2.10), run("sc-2", "scaled", 2, 2.13), run("sc-3", "scaled", 3, 2.11),
]
LAYERNORM, RMSNORM, NONORM, SCALED = [2.00, 2.03, 2.01], [1.95, 1.99], [2.05, 2.09], [2.10, 2.13,
                                                                                      2.11]


# --- closed forms, written out independently of gptlab.lab.stats ------------------------------

def cdf_df1(t: float) -> float:  # Cauchy
    return 0.5 + math.atan(t) / math.pi


def cdf_df2(t: float) -> float:
    return 0.5 + t / (2 * math.sqrt(2 + t * t))


def cdf_df3(t: float) -> float:
    return 0.5 + (t / (math.sqrt(3) * (1 + t * t / 3)) + math.atan(t / math.sqrt(3))) / math.pi


def cdf_df4(t: float) -> float:
    s = 1 + t * t / 4
    return 0.5 + 3 / 8 * t / math.sqrt(s) * (1 - t * t / (12 * s))


def cdf_normal_limit(t: float, df: float) -> float:
    """Φ(t) with the first correction of the t distribution's expansion in 1/df."""
    phi = math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    return 0.5 * (1 + math.erf(t / math.sqrt(2))) - phi * (t**3 + t) / (4 * df)


def quantile_df1(p: float) -> float:
    # tan(π (p - 1/2)), written with the smaller tail so that p near 0 or 1 keeps its digits.
    return math.copysign(1 / math.tan(math.pi * min(p, 1 - p)), p - 0.5)


def quantile_df2(p: float) -> float:
    return (2 * p - 1) / math.sqrt(2 * p * (1 - p))


def mean_sd(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1))


def welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Welch's difference of means, its standard error and its Welch-Satterthwaite df."""
    (mean_a, sd_a), (mean_b, sd_b) = mean_sd(a), mean_sd(b)
    var_a, var_b = sd_a**2 / len(a), sd_b**2 / len(b)
    df = (var_a + var_b) ** 2 / (var_a**2 / (len(a) - 1) + var_b**2 / (len(b) - 1))
    return mean_a - mean_b, math.sqrt(var_a + var_b), df


def two_sided_p_by_quadrature(t: float, df: float, intervals: int = 2000) -> float:
    """2 P(T > |t|) by Simpson's rule, substituting x = |t| / v^4 so that the infinite tail
    becomes 0 < v <= 1 with an integrand that is smooth at v = 0 (it goes as v^(4 df - 1))."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def integrand(v: float) -> float:
        if v == 0:
            return 0.0
        x = abs(t) / v**4
        return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df)) * 4 * abs(t) / v**5

    h = 1 / intervals
    total = integrand(0) + integrand(1)
    total += sum((4 if i % 2 else 2) * integrand(i * h) for i in range(1, intervals))
    return 2 * total * h / 3


# --- Student's t ------------------------------------------------------------------------------

T_VALUES = [-40.0, -3.0, -1.0, -0.25, 0.0, 0.1, 0.9, 2.0, 4.30265, 12.7, 1e4]


@pytest.mark.parametrize(("df", "cdf"), [(1, cdf_df1), (2, cdf_df2), (3, cdf_df3),
                                         (4, cdf_df4)])
def test_t_cdf_matches_the_closed_forms(df, cdf):
    for t in T_VALUES:
        assert t_cdf(t, df) == pytest.approx(cdf(t), abs=1e-12), t


def test_t_cdf_tends_to_the_normal_for_large_df():
    for t in [-3.0, -1.5, 0.3, 1.96, 2.5]:
        assert t_cdf(t, 1e5) == pytest.approx(cdf_normal_limit(t, 1e5), abs=1e-9), t


def test_t_cdf_keeps_a_tiny_tail():
    # 1 - cdf would round this to 0; the tail is 1/(π t) to first order for df=1.
    assert t_cdf(-1e10, 1) == pytest.approx(1 / (math.pi * 1e10), rel=1e-9)


@pytest.mark.parametrize("p", [1e-9, 0.001, 0.025, 0.3, 0.5, 0.8, 0.975, 0.999, 1 - 1e-9])
def test_t_quantile_inverts_the_closed_forms(p):
    assert t_quantile(p, 1) == pytest.approx(quantile_df1(p), rel=1e-8, abs=1e-10)
    assert t_quantile(p, 2) == pytest.approx(quantile_df2(p), rel=1e-8, abs=1e-10)


@pytest.mark.parametrize(("df", "expected"), [(1, 12.7062047), (2, 4.30265273),
                                              (10, 2.22813885), (30, 2.04227246)])
def test_t_quantile_matches_textbook_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-8)  # the digits printed


@pytest.mark.parametrize("df", [0.5, 3.7, 17.0, 250.0])
def test_t_quantile_is_the_inverse_of_the_cdf_for_any_df(df):
    for p in [0.001, 0.2, 0.6, 0.975]:
        assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)


def test_incomplete_beta_at_closed_forms():
    # I_x(a, 1) = x^a and I_x(1, b) = 1 - (1 - x)^b.
    for x in [0.0, 0.01, 0.3, 0.7, 0.999, 1.0]:
        assert regularized_incomplete_beta(x, 2.5, 1) == pytest.approx(x**2.5, abs=1e-14)
        assert regularized_incomplete_beta(x, 1, 3.5) == pytest.approx(1 - (1 - x) ** 3.5,
                                                                       abs=1e-14)


# --- grouping ---------------------------------------------------------------------------------

def test_runs_group_by_params_ignoring_seed_and_the_ignored_keys():
    groups = group_runs(RUNS, ignore=["train.device"])
    assert [group.name for group in groups] == ["model.norm=layernorm", "model.norm=rmsnorm",
                                                "model.norm=scalenorm", "model.norm=nonorm",
                                                "model.norm=scaled"]
    assert [run.name for run in groups[0].runs] == ["ln-1", "ln-2", "ln-3"]
    assert groups[0].params == {**SHARED, "model.norm": "layernorm"}


def test_a_key_not_ignored_splits_the_groups_and_names_them():
    groups = group_runs(RUNS[:3])
    assert [group.name for group in groups] == ["train.device=cpu", "train.device=cuda"]
    assert [len(group.runs) for group in groups] == [2, 1]


def test_runs_that_differ_only_by_seed_are_one_group():
    groups = group_runs(RUNS[:3], ignore=["train.device"])
    assert [(group.name, len(group.runs)) for group in groups] == [("all runs", 3)]


def test_a_param_some_runs_lack_names_its_groups():
    runs = [Run("a", {"seed": 1}, {}), Run("b", {"seed": 1, "model.bias": False}, {})]
    assert [group.name for group in group_runs(runs)] == ["model.bias=(unset)",
                                                          "model.bias=false"]


def test_the_group_of_some_params_shares_them_all_and_no_more():
    groups = group_runs(RUNS, ignore=["train.device"])
    workspace = {**SHARED, "model.norm": "rmsnorm", "seed": 1337, "train.device": "mps"}
    assert group_of(groups, workspace, ignore=["train.device"]).name == "model.norm=rmsnorm"
    # A key the groups lack, or one fewer, is another configuration.
    assert group_of(groups, {**workspace, "model.mlp": "gelu"}, ["train.device"]) is None
    assert group_of(groups, {"model.norm": "rmsnorm"}) is None


def clipped(name: str, seed: int, clip: object, include: list | None = None) -> Run:
    params = {"seed": seed, "train.grad_clip": clip, "data.include": include or ["a"]}
    return Run(name, params, {"val_loss": 2.0})


def test_an_int_and_a_float_of_equal_value_are_one_param_value_but_a_bool_is_not():
    runs = [clipped("int", 1, 1), clipped("float", 2, 1.0), clipped("bool", 1, True),
            clipped("half", 1, 0.5), clipped("nested", 3, 1, [1]), clipped("nested-f", 4, 1, [1.0])]
    groups = group_runs(runs)
    assert [(group.name, [run.name for run in group.runs]) for group in groups] == [
        ('data.include=["a"], train.grad_clip=1', ["int", "float"]),
        ('data.include=["a"], train.grad_clip=true', ["bool"]),
        ('data.include=["a"], train.grad_clip=0.5', ["half"]),
        ("data.include=[1], train.grad_clip=1", ["nested", "nested-f"])]
    workspace = {"seed": 7, "train.grad_clip": 1.0, "data.include": ["a"]}
    assert group_of(groups, workspace) is groups[0]
    assert group_of(groups, {**workspace, "train.grad_clip": False}) is None


def at(commit: str, name: str, norm: str, seed: int, val_loss: float) -> Run:
    return Run(name, {"model.norm": norm, "seed": seed}, {"val_loss": val_loss}, commit)


OLD, NEW = "1a2b3c4d5e6f" + "0" * 28, "9f8e7d6c5b4a" + "0" * 28


def test_runs_of_different_commits_never_share_a_group_and_their_names_say_the_commit():
    runs = [at(OLD, "old-1", "rmsnorm", 1, 2.0), at(NEW, "new-1", "rmsnorm", 1, 1.9),
            at(OLD, "old-2", "rmsnorm", 2, 2.1), at(NEW, "new-ln", "layernorm", 1, 1.8)]
    groups = group_runs(runs)
    assert [(group.name, [run.name for run in group.runs]) for group in groups] == [
        ("model.norm=rmsnorm @1a2b3c4", ["old-1", "old-2"]),
        ("model.norm=rmsnorm @9f8e7d6", ["new-1"]),
        ("model.norm=layernorm @9f8e7d6", ["new-ln"])]
    assert [group.commit for group in groups] == [OLD, NEW, NEW]
    # The workspace's group is the one of its own commit.
    workspace = {"model.norm": "rmsnorm", "seed": 9}
    assert group_of(groups, workspace, commit=NEW) is groups[1]
    assert group_of(groups, workspace) is None


def test_commits_alone_name_the_groups_and_one_commit_is_not_shown():
    same_params = [at(OLD, "old", "rmsnorm", 1, 2.0), at(NEW, "new", "rmsnorm", 1, 1.9)]
    assert [group.name for group in group_runs(same_params)] == ["@1a2b3c4", "@9f8e7d6"]
    one_commit = [at(NEW, "a", "rmsnorm", 1, 2.0), at(NEW, "b", "layernorm", 1, 1.9)]
    groups = group_runs(one_commit)
    assert [(group.name, group.commit) for group in groups] == [("model.norm=rmsnorm", None),
                                                                ("model.norm=layernorm", None)]
    assert group_of(groups, {"model.norm": "rmsnorm"}, commit=OLD) is groups[0]


# --- summaries and Welch's test ---------------------------------------------------------------

def comparison(metric: str = "val_loss", baseline: str | None = None):
    groups = group_runs(RUNS, ignore=["train.device"])
    return compare(groups, [metric], baseline)[0]


def row_of(result, norm: str):
    return next(row for row in result.rows if row.group.name == f"model.norm={norm}")


def test_three_seeds_give_mean_sd_and_a_t_interval_with_two_df():
    summary = row_of(comparison(), "layernorm").summary
    mean, sd = mean_sd(LAYERNORM)
    half = quantile_df2(Q) * sd / math.sqrt(3)
    assert (summary.n, summary.mean, summary.sd) == (3, pytest.approx(mean, abs=1e-14),
                                                     pytest.approx(sd, abs=1e-14))
    assert summary.ci95 == pytest.approx((mean - half, mean + half), abs=1e-12)


def test_two_seeds_give_a_t_interval_with_one_df():
    summary = row_of(comparison(), "rmsnorm").summary
    mean, sd = mean_sd(RMSNORM)
    half = quantile_df1(Q) * sd / math.sqrt(2)
    assert summary.ci95 == pytest.approx((mean - half, mean + half), abs=1e-12)


def test_one_run_has_no_sd_no_interval_and_no_test():
    row = row_of(comparison(), "scalenorm")
    assert (row.summary.n, row.summary.mean, row.summary.sd, row.summary.ci95) == (1, 2.10, None,
                                                                                 None)
    assert row.versus_baseline.diff == pytest.approx(2.10 - mean_sd(LAYERNORM)[0])
    assert (row.versus_baseline.ci95, row.versus_baseline.p_value) == (None, None)


def test_welch_with_two_df_against_the_closed_form():
    versus = row_of(comparison(baseline="model.norm=rmsnorm"), "nonorm").versus_baseline
    diff, se, df = welch(NONORM, RMSNORM)
    assert df == pytest.approx(2, abs=1e-9)  # equal spreads, two runs each
    t = diff / se
    assert versus.diff == pytest.approx(diff, abs=1e-14)
    assert versus.p_value == pytest.approx(1 - abs(t) / math.sqrt(2 + t * t), abs=1e-9)
    half = quantile_df2(Q) * se
    assert versus.ci95 == pytest.approx((diff - half, diff + half), abs=1e-8)


def test_welch_with_four_df_against_the_closed_form():
    versus = row_of(comparison(), "scaled").versus_baseline  # baseline: the first group
    diff, se, df = welch(SCALED, LAYERNORM)
    assert df == pytest.approx(4, abs=1e-9)
    assert versus.p_value == pytest.approx(2 * (1 - cdf_df4(abs(diff / se))), abs=1e-9)


def test_welch_with_unequal_groups_against_quadrature():
    versus = row_of(comparison(), "rmsnorm").versus_baseline
    diff, se, df = welch(RMSNORM, LAYERNORM)
    assert 1 < df < 2 and not df.is_integer()
    assert versus.p_value == pytest.approx(two_sided_p_by_quadrature(diff / se, df), abs=1e-9)


def test_groups_without_any_spread_get_no_test():
    runs = [run(f"{norm}-{seed}", norm, seed, loss) for norm, loss in [("a", 2.0), ("b", 2.1)]
            for seed in (1, 2)]
    versus = compare(group_runs(runs), ["val_loss"])[0].rows[1].versus_baseline
    assert versus.diff == pytest.approx(0.1) and (versus.ci95, versus.p_value) == (None, None)


def test_a_baseline_can_be_named_by_one_of_its_runs():
    assert comparison(baseline="rms-2").baseline == "model.norm=rmsnorm"
    assert row_of(comparison(baseline="rms-2"), "rmsnorm").versus_baseline is None


def test_rows_are_sorted_by_the_metric_mean():
    means = [row.summary.mean for row in comparison().rows]
    assert means == sorted(means)
    assert comparison().rows[0].group.name == "model.norm=rmsnorm"


def test_summarize_needs_no_groups():
    assert summarize([3.0]).sd is None
    assert summarize([1.0, 3.0]).sd == pytest.approx(math.sqrt(2))


def test_a_run_without_a_metric_is_left_out_of_that_metrics_table_only():
    # ln-4 has no bits_per_byte; the only scalenorm run has none either.
    runs = [*RUNS[:6], Run("ln-4", {**RUNS[0].params, "seed": 4}, {"val_loss": 2.02})]
    runs[5] = Run("sn-1", RUNS[5].params, {"val_loss": 2.10})
    loss, bits = compare(group_runs(runs, ignore=["train.device"]))
    assert [(row.group.name, row.summary.n) for row in loss.rows] == [
        ("model.norm=rmsnorm", 2), ("model.norm=layernorm", 4), ("model.norm=scalenorm", 1)]
    assert [run.name for run in loss.rows[1].group.runs] == ["ln-1", "ln-2", "ln-3", "ln-4"]
    assert loss.rows[1].summary.mean == pytest.approx(mean_sd([*LAYERNORM, 2.02])[0])
    assert [(row.group.name, row.summary.n) for row in bits.rows] == [
        ("model.norm=rmsnorm", 2), ("model.norm=layernorm", 3)]
    assert [run.name for run in bits.rows[1].group.runs] == ["ln-1", "ln-2", "ln-3"]
    assert bits.rows[1].summary.mean == pytest.approx(mean_sd(LAYERNORM)[0] / math.log(2))


@pytest.mark.parametrize(("runs", "metric", "baseline", "message"), [
    ([], "val_loss", None, "no runs to compare"),
    (RUNS[:2], "perplexity", None, "no run of the baseline (all runs) has 'perplexity' (they "
                                   "have bits_per_byte, val_loss)"),
    (RUNS[:6], "perplexity", "rms-1", "no run of the baseline (model.norm=rmsnorm) has "
                                      "'perplexity' (they have bits_per_byte, val_loss)"),
    ([Run("x", {}, {"val_loss": float("nan")})], "val_loss", None,
     "run x: val_loss is nan, not a finite number"),
    ([Run("x", {}, {"val_loss": "2.1"})], "val_loss", None,
     "run x: val_loss is '2.1', not a finite number"),
    (RUNS[:2], "val_loss", "ln-9", "baseline 'ln-9' is neither a group nor a run (groups: all "
                                   "runs)"),
])
def test_bad_input_is_one_line(runs, metric, baseline, message):
    with pytest.raises(GptlabError) as error:
        compare(group_runs(runs, ignore=["train.device"]), [metric], baseline)
    assert str(error.value) == message


def test_an_unknown_correction_is_one_line():
    with pytest.raises(GptlabError) as error:
        compare(group_runs(RUNS), ["val_loss"], correction="bonferroni")
    assert str(error.value) == "correction 'bonferroni': expected one of none, holm"


# --- Holm's correction ------------------------------------------------------------------------

def test_holm_multiplies_by_the_remaining_count_and_keeps_the_order():
    # Sorted: 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 raised to the 0.06 before it.
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.3, 0.02]) == pytest.approx([0.3, 0.04])
    assert holm([0.6, 0.4, 0.9]) == [1.0, 1.0, 1.0]  # capped at 1
    assert holm([0.05]) == [0.05] and holm([]) == []


def test_holm_adjusts_each_table_over_its_tests_only():
    plain = comparison()
    corrected = compare(group_runs(RUNS, ignore=["train.device"]), ["val_loss"],
                        correction="holm")[0]
    assert corrected.correction == "holm"
    # rmsnorm, nonorm and scaled are tested against layernorm; scalenorm (one run) is not.
    raw = {norm: row_of(plain, norm).versus_baseline.p_value
           for norm in ("rmsnorm", "nonorm", "scaled")}
    for norm, p_adjusted in zip(raw, holm(list(raw.values())), strict=True):
        versus = row_of(corrected, norm).versus_baseline
        assert versus.p_value == raw[norm] and versus.p_adjusted == p_adjusted
    assert row_of(corrected, "scalenorm").versus_baseline.p_adjusted is None
    assert all(row.versus_baseline is None or row.versus_baseline.p_adjusted is None
               for row in plain.rows)


# --- rendering --------------------------------------------------------------------------------

def two_groups() -> list:
    """Four seeds of each norm: a difference far beyond the spread, so p < 0.001."""
    runs = [run(f"ln-{seed}", "layer", seed, 2.0 + seed / 1000) for seed in range(4)]
    runs += [run(f"rms-{seed}", "rms", seed, 1.9 + seed / 1000) for seed in range(4)]
    runs += [run("sn-1", "scale", 1, 2.05)]
    return compare(group_runs(runs), ["val_loss"])


TEXT = """\
val_loss (baseline: model.norm=layer)
group             n    mean      sd            95% CI      diff         diff 95% CI  p (Welch)
model.norm=rms    4  1.9015  0.0013  [1.8994, 1.9036]   -0.1000  [-0.1022, -0.0978]     <0.001
model.norm=layer  4  2.0015  0.0013  [1.9994, 2.0036]  baseline
model.norm=scale  1  2.0500       -                 -   +0.0485                   -          -
model.norm=scale: one run, so no sd, interval or p-value; run more seeds
"""


def test_text_table_is_aligned_sorted_and_says_what_it_cannot_estimate():
    assert render_text(two_groups()) == TEXT


def test_markdown_table_has_one_row_per_group():
    lines = render_markdown(two_groups()).splitlines()
    assert lines[:4] == ["**val_loss** (baseline: model.norm=layer)", "",
                         "| group | n | mean | sd | 95% CI | diff | diff 95% CI | p (Welch) |",
                         "|:---|---:|---:|---:|---:|---:|---:|---:|"]
    assert lines[4:7] == [
        "| model.norm=rms | 4 | 1.9015 | 0.0013 | [1.8994, 1.9036] | -0.1000 | [-0.1022, -0.0978] "
        "| <0.001 |",
        "| model.norm=layer | 4 | 2.0015 | 0.0013 | [1.9994, 2.0036] | baseline |  |  |",
        "| model.norm=scale | 1 | 2.0500 | - | - | +0.0485 | - | - |"]
    assert lines[7:] == ["", "model.norm=scale: one run, so no sd, interval or p-value; run more "
                             "seeds"]


def test_markdown_escapes_a_pipe_in_a_group_name():
    runs = [Run("a", {"seed": 1, "data.spec": "a|b"}, {"val_loss": 2.0}),
            Run("b", {"seed": 1, "data.spec": "c"}, {"val_loss": 2.1})]
    assert "| data.spec=a\\|b | 1 |" in render_markdown(compare(group_runs(runs), ["val_loss"]))


def test_json_holds_unrounded_numbers_and_null_for_what_is_not_estimated():
    data = json.loads(json.dumps(comparisons_json([comparison()])))
    rows = data["val_loss"]["rows"]
    assert data["val_loss"]["baseline"] == "model.norm=layernorm"
    rms = rows[0]
    assert rms["group"] == "model.norm=rmsnorm"
    assert rms["runs"] == ["rms-1", "rms-2"] and rms["n"] == 2
    assert rms["mean"] == pytest.approx(mean_sd(RMSNORM)[0], abs=1e-14)
    assert rms["vs_baseline"]["p_value"] == row_of(comparison(), "rmsnorm").versus_baseline.p_value
    scalenorm = next(row for row in rows if row["group"] == "model.norm=scalenorm")
    assert (scalenorm["sd"], scalenorm["ci95"], scalenorm["vs_baseline"]["p_value"]) == (None,
                                                                                        None, None)
    assert next(row for row in rows if row["group"] == "model.norm=layernorm")["vs_baseline"] \
        is None


def three_groups_corrected() -> list:
    """Two optimizers tested against sgd, each three seeds 0.01 apart: raw p = 0.00360 and
    0.00183, so Holm gives 2 x 0.00183 to the smaller and raises the other to it."""
    runs = [Run(f"{opt}-{seed}", {"seed": seed, "opt": opt}, {"val_loss": loss + seed / 100})
            for opt, loss in [("sgd", 2.0), ("adam", 1.95), ("lion", 2.06)] for seed in range(3)]
    return compare(group_runs(runs), ["val_loss"], correction="holm")


HOLM_TEXT = """\
val_loss (baseline: opt=sgd)
group     n    mean      sd            95% CI      diff         diff 95% CI  p (Welch)  p (Holm)
opt=adam  3  1.9600  0.0100  [1.9352, 1.9848]   -0.0500  [-0.0727, -0.0273]    0.00360   0.00365
opt=sgd   3  2.0100  0.0100  [1.9852, 2.0348]  baseline
opt=lion  3  2.0700  0.0100  [2.0452, 2.0948]   +0.0600    [0.0373, 0.0827]    0.00183   0.00365
p (Holm): Welch's p, Holm-adjusted for the 2 comparisons of val_loss with the baseline
"""


def test_holm_adds_a_column_and_a_note_to_the_tables_and_a_key_to_json():
    comparisons = three_groups_corrected()
    assert render_text(comparisons) == HOLM_TEXT
    markdown = render_markdown(comparisons).splitlines()
    assert markdown[2] == ("| group | n | mean | sd | 95% CI | diff | diff 95% CI | p (Welch) "
                           "| p (Holm) |")
    assert markdown[5] == "| opt=sgd | 3 | 2.0100 | 0.0100 | [1.9852, 2.0348] | baseline |  |  |  |"
    assert markdown[-1] == HOLM_TEXT.splitlines()[-1]
    table = comparisons_json(comparisons)["val_loss"]
    assert table["correction"] == "holm"
    rms, scaled = table["rows"][0]["vs_baseline"], table["rows"][2]["vs_baseline"]
    assert [rms["p_adjusted"], scaled["p_adjusted"]] == holm([rms["p_value"],
                                                              scaled["p_value"]])
    assert "correction" not in comparisons_json([comparison()])["val_loss"]


# --- a fixed target ---------------------------------------------------------------------------

TARGET = 2.02


def targeted() -> list:
    return compare(group_runs(RUNS, ignore=["train.device"]), ["val_loss"], target=TARGET)


@pytest.mark.parametrize(("norm", "values", "cdf"), [
    ("layernorm", LAYERNORM, cdf_df2),  # three seeds: 2 df, mean below the target
    ("rmsnorm", RMSNORM, cdf_df1),  # two seeds: 1 df
    ("scaled", SCALED, cdf_df2),  # above the target: p near 1
])
def test_each_group_is_tested_one_sided_for_being_below_the_target(norm, values, cdf):
    mean, sd = mean_sd(values)
    test = row_of(targeted()[0], norm).versus_target
    assert test.diff == pytest.approx(mean - TARGET, abs=1e-14)
    assert test.p_value == pytest.approx(cdf((mean - TARGET) / (sd / math.sqrt(len(values)))),
                                         abs=1e-12)


def test_below_the_target_needs_a_spread_and_without_one_is_certain():
    table = targeted()[0]
    assert row_of(table, "scalenorm").versus_target.p_value is None  # one run
    same = [Run(f"r{seed}", {"seed": seed}, {"val_loss": value})
            for seed, value in enumerate([1.9, 1.9, 1.9])]
    below, above = (compare(group_runs(same), ["val_loss"], target=target)[0].rows[0]
                    for target in (2.0, 1.8))
    assert (below.versus_target.p_value, above.versus_target.p_value) == (0.0, 1.0)


def test_a_target_adds_columns_a_note_and_json_keys_and_none_without_it():
    comparisons = targeted()
    text = render_text(comparisons).splitlines()
    assert text[0] == "val_loss (baseline: model.norm=layernorm; target: 2.02)"
    assert text[1].split()[-5:] == ["(Welch)", "vs", "target", "p", "(below)"]
    assert text[-1] == "p (below): one-sided t-test that the group's mean is below 2.02"
    assert render_markdown(comparisons).splitlines()[2].endswith(
        "| p (Welch) | vs target | p (below) |")
    table = comparisons_json(comparisons)["val_loss"]
    assert table["target"] == TARGET
    rms = next(row for row in table["rows"] if row["group"] == "model.norm=rmsnorm")
    assert rms["vs_target"]["diff"] == pytest.approx(mean_sd(RMSNORM)[0] - TARGET)
    assert 0 < rms["vs_target"]["p_below"] < 0.5
    plain = comparisons_json([comparison()])["val_loss"]
    assert "target" not in plain and all("vs_target" not in row for row in plain["rows"])
    assert "target" not in render_text([comparison()])


def test_a_target_that_is_not_a_number_is_one_line():
    with pytest.raises(GptlabError, match=r"^--target: nan is not a finite number$"):
        compare(group_runs(RUNS), ["val_loss"], target=float("nan"))


def test_every_metric_asked_for_is_rendered_with_precision_to_its_scale():
    runs = [Run(f"r{seed}", {"seed": seed}, {"tokens_per_sec": 41000.0 + seed * 123.45,
                                             "val_loss": 2.0 + seed / 100})
            for seed in range(3)]
    comparisons = compare(group_runs(runs), ["val_loss", "tokens_per_sec"])
    text = render_text(comparisons)
    assert "  2.0100  " in text and "  41123  " in text  # four decimals; whole tokens/s
    assert list(comparisons_json(comparisons)) == ["val_loss", "tokens_per_sec"]


def test_stats_imports_no_torch():
    check = "import sys, gptlab.lab.stats; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check]).returncode == 0
