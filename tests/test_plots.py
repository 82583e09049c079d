"""Figures of the training log, and the offline page template for `dvc plots`."""

from __future__ import annotations

import json
import shutil
import subprocess

import matplotlib.image
import pytest
from conftest import ROOT, one_error_line, run_stage, write_params

from gptlab.errors import GptlabError
from gptlab.params import load_params
from gptlab.plots import make_figures, read_log
from gptlab.train import LOG_COLUMNS

PLOT_PARAMS = load_params(ROOT / "params.yaml").plot
FIGURES = ["loss.png", "lr.png", "throughput.png"]
TEMPLATE = ROOT / ".gptlab" / "plots-template.html"


def write_log(path, steps: int = 40, eval_every: int = 10) -> None:
    """A log shaped like the train stage's: val at eval steps, no train loss at step 0."""
    lines = [",".join(LOG_COLUMNS), "0,0,,4.2,,,"]
    for step in range(2, steps + 1, 2):
        val = f"{3.5 - step / 40:.4f}" if step % eval_every == 0 else ""
        lines.append(f"{step},{step * 768},{3.6 - step / 50:.4f},{val},{1e-3 * step / steps:.6g},"
                     f"{1.5 - step / 100:.4f},{40000 + step * 10}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def test_figures_are_pngs_sized_by_dpi_and_byte_identical_across_runs(tmp_path):
    log = tmp_path / "train_log.csv"
    write_log(log)
    first = make_figures(log, tmp_path / "a", PLOT_PARAMS)
    second = make_figures(log, tmp_path / "b", PLOT_PARAMS)
    assert [p.name for p in first] == FIGURES
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        assert a.read_bytes() == b.read_bytes()  # no timestamps or versions inside
    height, width = matplotlib.image.imread(first[0]).shape[:2]
    assert (width, height) == (8 * PLOT_PARAMS.dpi, 5 * PLOT_PARAMS.dpi)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == FIGURES  # no temporary files


@pytest.mark.parametrize("smooth", [1, 5])
def test_any_smoothing_and_a_single_row_log_work(tmp_path, smooth):
    log = tmp_path / "train_log.csv"
    log.write_text(",".join(LOG_COLUMNS) + "\n0,0,,4.2,,,\n")
    params = PLOT_PARAMS.model_copy(update={"smooth": smooth})
    assert len(make_figures(log, tmp_path / "out", params)) == 3
    write_log(log)
    assert len(make_figures(log, tmp_path / "out", params)) == 3


def test_read_log_turns_empty_cells_into_missing_values(tmp_path):
    log = tmp_path / "train_log.csv"
    write_log(log)
    frame = read_log(log)
    assert frame["val_loss"].notna().sum() == 5  # step 0 and every 10th step
    assert frame["train_loss"].isna().iloc[0]


@pytest.mark.parametrize(("content", "problem"), [
    (None, "not found"),
    ("", "not a training log"),
    ("step,tokens,train_loss\n1,2,3\n", "missing columns"),
    (",".join(LOG_COLUMNS) + "\n", "no rows"),
    (",".join(LOG_COLUMNS) + "\n1,768,abc,,,,\n", "non-numeric"),
])
def test_bad_logs_are_refused_naming_the_file_and_nothing_is_written(tmp_path, content, problem):
    log = tmp_path / "train_log.csv"
    if content is not None:
        log.write_text(content)
    out = tmp_path / "plots"
    with pytest.raises(GptlabError, match=f"{log}: {problem}"):
        make_figures(log, out, PLOT_PARAMS)
    assert not out.exists() or not any(out.iterdir())


def test_stage_writes_figures_and_refuses_a_missing_log_in_one_line(tmp_path, params_for):
    write_params(tmp_path, params_for())
    assert "plots/train_log.csv: not found" in one_error_line(run_stage("plot.py", tmp_path))
    write_log(tmp_path / "plots" / "train_log.csv")
    result = run_stage("plot.py", tmp_path)
    assert result.returncode == 0, result.stderr
    assert all((tmp_path / "plots" / name).is_file() for name in FIGURES)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(not CHROMIUM or not TEMPLATE.exists(),
                    reason="needs chromium and `make plots` to have built the template")
def test_offline_template_renders_a_vega_lite_chart_without_network(tmp_path):
    spec = {"$schema": "https://vega.github.io/schema/vega-lite/v5.json",
            "data": {"values": [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}]},
            "mark": "line", "encoding": {"x": {"field": "step", "type": "quantitative"},
                                          "y": {"field": "loss", "type": "quantitative"}}}
    # The element DVC puts in place of {plot_divs} (dvc_render's VegaRenderer.DIV).
    div = (f'<div id="plot"><script type="text/javascript">var spec = {json.dumps(spec)};'
           f"vegaEmbed('#plot', spec);</script></div>")
    page = tmp_path / "index.html"
    page.write_text(TEMPLATE.read_text().replace("{plot_divs}", div)
                    .replace("{refresh_tag}", ""))
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
         page.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout
    assert "<svg" in dom or "<canvas" in dom  # vega-embed drew the chart from inlined code
