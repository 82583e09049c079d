"""Figures of the training log, and the page template of `dvc plots`."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest
from dvc_render.html import render_html
from dvc_render.image import ImageRenderer
from dvc_render.vega import VegaRenderer
from helpers import (
    PROJECT_PARAMS,
    ROOT,
    VENV,
    copy_project,
    dvc,
    one_error_line,
    run_stage,
    write_params,
)

from gptlab import plots
from gptlab.errors import GptlabError
from gptlab.plots import (
    PAGE_STYLE,
    VEGA_PACKAGES,
    build_page_template,
    log_frame,
    loss_figure,
    make_figures,
)
from gptlab.trainlog import LOG_COLUMNS

PLOT_PARAMS = PROJECT_PARAMS.plot
FIGURES = ["loss.png", "lr.png", "throughput.png"]
# The figures dvc.yaml lists besides the plot stage's: `gptlab scaling`'s, committed.
LISTED_FIGURES = sorted([*FIGURES, "scaling.png"])
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


def test_the_log_table_has_numbers_and_missing_values_where_cells_are_empty(tmp_path):
    log = tmp_path / "train_log.csv"
    write_log(log)
    frame = log_frame(log)
    assert list(frame.columns) == list(LOG_COLUMNS)
    assert frame["val_loss"].notna().sum() == 5  # step 0 and every 10th step
    assert frame["train_loss"].isna().iloc[0]
    assert frame["step"].dtype.kind == "i" and frame["lr"].dtype.kind == "f"


# Every kind of bad log is tested in test_trainlog; here, that none leaves a figure behind.
@pytest.mark.parametrize(("content", "problem"), [
    (None, "not found"),
    (",".join(LOG_COLUMNS) + "\n1,768,abc,,,,\n", "line 2: non-numeric"),
])
def test_bad_logs_are_refused_naming_the_file_and_nothing_is_written(tmp_path, content, problem):
    log = tmp_path / "train_log.csv"
    if content is not None:
        log.write_text(content)
    out = tmp_path / "plots"
    with pytest.raises(GptlabError, match=f"{log}: {problem}"):
        make_figures(log, out, PLOT_PARAMS)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_stage_writes_figures_and_refuses_a_missing_log_in_one_line(tmp_path, params_for):
    write_params(tmp_path, params_for())
    assert "plots/train_log.csv: not found" in one_error_line(run_stage("plot", tmp_path))
    write_log(tmp_path / "plots" / "train_log.csv")
    result = run_stage("plot", tmp_path)
    assert result.returncode == 0, result.stderr
    assert all((tmp_path / "plots" / name).is_file() for name in FIGURES)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# Every series of the training log, and what it is drawn against.
SERIES = {"loss": ("step", {"train_loss", "val_loss"}),
          "loss_by_tokens": ("tokens", {"train_loss", "val_loss"}),
          "learning_rate": ("step", {"lr"}), "grad_norm": ("step", {"grad_norm"}),
          "throughput": ("step", {"tokens_per_sec"})}


def test_dvc_plots_draw_every_logged_series_and_each_figure_once(pipeline):
    project, _ = pipeline
    shown = json.loads(dvc(project, "plots", "show", "--json"))["data"]
    images = sorted(name for name, entries in shown.items() if entries[0]["type"] == "image")
    assert images == [f"plots/{name}" for name in LISTED_FIGURES]
    assert all(len(shown[name]) == 1 for name in images)  # not also under a stage's plots:
    curves = {name: entries for name, entries in shown.items() if entries[0]["type"] == "vega"}
    assert curves.keys() == SERIES.keys()
    logged = [line.split(",") for line in
              (project / "plots" / "train_log.csv").read_text().splitlines()]
    for name, (x, fields) in SERIES.items():
        points = curves[name][0]["content"]["data"]["values"]
        # Several series of one plot are told apart by "field"; a single one needs none.
        drawn = {point.get("field") for point in points}
        assert drawn == fields if len(fields) > 1 else all(
            set(fields) <= point.keys() for point in points), name
        column = logged[0].index(x)
        assert sorted({point[x] for point in points}, key=int) == [
            row[column] for row in logged[1:]], name
        # DVC passes CSV cells on as strings, empty ones too, and vega draws '' as 0: the
        # template must drop them (val_loss is empty outside evaluations, lr at step 0).
        assert "!== ''" in json.dumps(curves[name][0]["content"].get("transform")), name
    loss_points = curves["loss"][0]["content"]["data"]["values"]
    assert any(point[point["field"]] == "" for point in loss_points)
    diff = json.loads(dvc(project, "plots", "diff", "HEAD", "--json"))["data"]
    assert diff.keys() == shown.keys()
    assert all(len(diff[name]) == 2 for name in images)  # workspace and HEAD, once each
    assert all(len(diff[name][0]["content"]["data"]["values"]) == 2 * len(
        shown[name][0]["content"]["data"]["values"]) for name in SERIES)  # both revisions


def fake_npm(folder: Path, sources: dict[str, str]) -> None:
    """An `npm` on PATH whose `npm pack NAME@VERSION` yields a package of the given code."""
    packages = folder / "packages"
    packages.mkdir()
    for name, code in sources.items():
        archive = packages / f"{name}-{VEGA_PACKAGES[name]}.tgz"
        with tarfile.open(archive, "w:gz") as tar:
            data = code.encode()
            member = tarfile.TarInfo(f"package/build/{name}.min.js")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    npm = folder / "bin" / "npm"
    npm.parent.mkdir()
    npm.write_text(f'#!/bin/sh\nname=$(echo "$2" | tr @ -).tgz\n'
                   f'cp "{packages}/$name" . && echo "$name"\n')
    npm.chmod(0o755)


def test_offline_template_inlines_the_packages_dvc_would_load_from_the_cdn(tmp_path,
                                                                            monkeypatch):
    cdn = re.findall(r"cdn\.jsdelivr\.net/npm/([\w-]+)@([\d.]+)", VegaRenderer.SCRIPTS)
    assert dict(cdn) == VEGA_PACKAGES  # the versions DVC's own page asks for
    sources = {name: f"var {name.replace('-', '_')} = '</script>';" for name in VEGA_PACKAGES}
    fake_npm(tmp_path, sources)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    template = build_page_template(tmp_path / "out" / "template.html").read_text()
    for name in VEGA_PACKAGES:
        assert f"var {name.replace('-', '_')} = '<\\/script>';" in template
    page = tmp_path / "page" / "index.html"
    renderer = VegaRenderer([{"step": "1", "loss": "2.0"}], "loss", x="step", y="loss")
    render_html([renderer], page, html_template=tmp_path / "out" / "template.html")
    html = page.read_text()
    assert "vegaEmbed(" in html and "<script src" not in html  # DVC added no CDN tags


def test_offline_template_names_npm_when_it_fails(tmp_path, monkeypatch):
    npm = tmp_path / "npm"
    npm.write_text("#!/bin/sh\necho 'npm error 404 Not Found' >&2\nexit 1\n")
    npm.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    with pytest.raises(GptlabError, match=r"npm pack vega@[\d.]+ failed: npm error 404"):
        build_page_template(tmp_path / "template.html")
    assert not (tmp_path / "template.html").exists()


@pytest.mark.skipif(not CHROMIUM or not TEMPLATE.exists(),
                    reason="needs chromium, and npm when `make setup` built the template")
def test_plain_dvc_plots_pages_render_offline_once_setup_set_the_template(pipeline, tmp_path):
    project = copy_project(pipeline[0], tmp_path)
    # What `make setup` does once it has built the template.
    dvc(project, "config", "--local", "plots.html_template", str(TEMPLATE))
    out = tmp_path / "dvc_plots"
    dvc(project, "plots", "diff", "HEAD", "-o", str(out))  # no --html-template: the config's
    html = (out / "index.html").read_text()
    assert "<script src" not in html and "cdn.jsdelivr" not in html
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         # No host name resolves: a library the page still expected from a CDN would not load.
         "--host-resolver-rules=MAP * ~NOTFOUND",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
         (out / "index.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout
    # The inlined libraries contain "<svg" and "<img" themselves: look outside the scripts.
    drawn = re.sub(r"<script\b.*?</script>", "", dom, flags=re.DOTALL)
    assert drawn.count("<canvas") == len(SERIES)  # vega-embed drew every series
    assert drawn.count("<img") == 2 * len(LISTED_FIGURES)  # the figures of both revisions


@pytest.mark.slow
def test_setup_without_npm_says_so_in_one_line_and_sets_a_page_loading_the_cdn(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "Makefile", project)
    (project / ".venv").symlink_to(VENV)
    subprocess.run([VENV / "bin" / "dvc", "init", "--no-scm", "-q"], cwd=project, check=True)
    bin_dir = Path(sys.executable).parent
    result = subprocess.run(["make", "--no-print-directory", "plots-template"], cwd=project,
                            env={"PATH": f"{bin_dir}:{tmp_path}", "HOME": str(tmp_path)},
                            capture_output=True, text=True, executable=shutil.which("make"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "note: npm not found: dvc plots pages will load their libraries from a CDN"]
    template = (project / ".gptlab" / "plots-template.html").read_text()
    assert "{scripts}" in template and PAGE_STYLE in template  # DVC's CDN tags, our layout
    config = (project / ".dvc" / "config.local").read_text()
    assert "html_template = ../.gptlab/plots-template.html" in config


def test_the_cdn_template_gets_dvcs_script_tags_and_the_page_layout(tmp_path):
    template = build_page_template(tmp_path / "template.html", offline=False)
    page = tmp_path / "page" / "index.html"
    renderer = VegaRenderer([{"step": "1", "loss": "2.0"}], "loss", x="step", y="loss")
    render_html([renderer], page, html_template=template)
    html = page.read_text()
    assert "cdn.jsdelivr.net/npm/vega-embed" in html and PAGE_STYLE in html


def test_a_log_scaled_loss_axis_says_so():
    rows = [[0, 0, None, 9.0], [10, 7680, 3.0, 2.5]]
    log = pd.DataFrame([row + [None] * (len(LOG_COLUMNS) - 4) for row in rows],
                       columns=list(LOG_COLUMNS), dtype=float)
    axes = loss_figure(log, smooth=1).axes[0]
    assert axes.get_yscale() == "log"
    assert axes.get_ylabel() == "cross-entropy (nats per token, log scale)"
    flat = log.assign(val_loss=[3.0, 2.5])
    assert loss_figure(flat, smooth=1).axes[0].get_ylabel() == "cross-entropy (nats per token)"


# Reported by the page itself once vega has drawn: the window's width, each chart's and each
# figure's width, and each figure's box.
MEASURE = """<script>setTimeout(() => document.body.setAttribute("data-layout", JSON.stringify({
  window: document.documentElement.clientWidth,
  charts: [...document.querySelectorAll("canvas")].map(c => c.getBoundingClientRect().width),
  figures: [...document.querySelectorAll("img")].map(i => [i.getBoundingClientRect().right,
    i.getBoundingClientRect().width, i.parentElement.getBoundingClientRect().width])})),
  2000);</script>"""


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM or not TEMPLATE.exists(),
                    reason="needs chromium, and npm when `make setup` built the template")
def test_charts_span_the_page_and_every_revisions_figure_fits_it(tmp_path, monkeypatch):
    libraries = re.findall(r"<script>.*?</script>", TEMPLATE.read_text(), flags=re.DOTALL)
    monkeypatch.setattr(plots, "inlined_libraries", lambda: libraries)
    template = build_page_template(tmp_path / "template.html")
    log = tmp_path / "train_log.csv"
    write_log(log)
    [figure, *_] = make_figures(log, tmp_path / "figures", PLOT_PARAMS)
    points = [{"step": str(step), "loss": str(4 - step / 50), "rev": rev}
              for rev in ("workspace", "exp-a") for step in range(50)]
    chart = VegaRenderer(points, "loss", x="step", y="loss", template="linear_gaps",
                         template_dir=str(ROOT / ".dvc" / "plots"))
    # Two revisions of a 960-pixel figure: side by side they are wider than the window.
    images = ImageRenderer([{"rev": rev, "src": str(figure)} for rev in ("workspace", "exp-a")],
                           "plots/loss.png")
    page = tmp_path / "page" / "index.html"
    render_html([chart, images], page, html_template=template)
    html, end, rest = page.read_text().rpartition("</body>")  # the libraries hold "</body>" too
    page.write_text(html + MEASURE + end + rest)
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--window-size=1200,900", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout
    layout = json.loads(re.search(r'data-layout="([^"]*)"', dom)[1].replace("&quot;", '"'))
    assert layout["charts"] and all(width > 0.8 * layout["window"] for width in layout["charts"])
    assert len(layout["figures"]) == 2
    for right, width, box in layout["figures"]:
        assert right <= layout["window"] and width <= box
