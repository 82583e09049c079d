"""The `gptlab` command: small tools around the pipeline (the stages themselves run from DVC).

`sample` and `chat` take their defaults from the sample section of ./params.yaml when there is
a valid one, else from BUILTIN_SAMPLE; every option overrides its key.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, get_args

from pydantic import ValidationError

from gptlab import __version__
from gptlab.errors import GptlabError, run_main
from gptlab.lab.experiments import Experiments, read_experiments, recover
from gptlab.lab.stats import (
    CORRECTIONS,
    DEFAULT_METRICS,
    NO_CORRECTION,
    Run,
    compare,
    comparisons_json,
    group_of,
    group_runs,
    render_markdown,
    render_text,
)
from gptlab.params import PARAMS_FILE, SampleParams, default_values, describe, load_params
from gptlab.tokens import read_header

if TYPE_CHECKING:  # for annotations only: torch loads for the commands that use it
    import torch

    from gptlab.published import Published
    from gptlab.tokenizers import ChatTokenizer

# The sampling settings the project's params.yaml ships with (the schema's defaults), one
# sample of a newline prompt.
BUILTIN_SAMPLE = SampleParams.model_validate(
    {**default_values(SampleParams), "prompts": ["\n"], "num_samples": 1})
SAMPLING_DEFAULTS = (f"Defaults come from the sample section of ./params.yaml if there is a "
                     f"valid one, else: one sample of {BUILTIN_SAMPLE.max_new_tokens} tokens "
                     f"after a newline, temperature {BUILTIN_SAMPLE.temperature}, top_k "
                     f"{BUILTIN_SAMPLE.top_k}, seed {BUILTIN_SAMPLE.seed}.")
# A gptlab project is a folder with DVC's pipeline, or one inside such a folder.
PROJECT_FILE = "dvc.yaml"
SAMPLE_SEPARATOR = "-" * 15
# `gptlab scaling --queue`'s default sweep, on the default corpus and recipe: four budgets
# about 4.6x apart (100x in all), five shapes at each, sliding up a ladder of nine (N 2.7K to
# 355K, 133x, with the default untied output layer; 175x tied) as the budget grows. The design
# was chosen on synthetic runs: a law of Chinchilla's exponents at this corpus's losses,
# sampled at the tied model's runs with seed-to-seed noise, is recovered within 10%, which the
# narrower design of three budgets over 16x and N over 18x did not do (tests/test_sweep.py).
BUDGETS = (1e10, 4.6e10, 2.2e11, 1e12)
SHAPES = ("1x8", "1x12", "1x16", "1x24", "2x24", "2x32", "2x48", "2x64", "3x96")
SHAPES_PER_BUDGET = 5
# Bootstrap resamples of `gptlab scaling`: 2.5% of 40 is one refit at each end of an interval.
BOOTSTRAP_SAMPLES, MIN_BOOTSTRAP_SAMPLES = 200, 40
# sample.dtype's names, for the --dtype of sample, chat and serve.
DTYPE_CHOICES = get_args(SampleParams.model_fields["dtype"].annotation)
DESCRIPTION = ("Tools around the gptlab pipeline (the stages themselves run with `dvc repro`). "
               "`sample` and `chat` take their defaults from the sample section of "
               "./params.yaml, and every option overrides its key.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gptlab", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"gptlab {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "params", help="validate params.yaml and print it as resolved, or explain its keys",
        description="Every key's meaning, type, allowed values and default are written from "
                    "one place, the schema in gptlab.params: --explain prints a key's, --docs "
                    "writes them all, --comments writes them into the file's comments.")
    check.add_argument("file", nargs="?", default=PARAMS_FILE)
    explained = check.add_mutually_exclusive_group()
    explained.add_argument("--explain", metavar="KEY",
                           help="what a key means, its type, allowed values and default, e.g. "
                                "model.n_layer")
    explained.add_argument("--docs", type=Path, metavar="OUT",
                           help="write the reference of every key, as docs/parameters.md")
    explained.add_argument("--comments", action="store_true",
                           help="write the comment above each key of the file from the schema "
                                "(after `dvc exp run -S` dropped them); values stay as they are")
    tokens = commands.add_parser("tokens", help="describe a token file from its header")
    tokens.add_argument("file")
    sample = commands.add_parser("sample", help="continue prompts with a trained model",
                                 description=SAMPLING_DEFAULTS)
    sample.add_argument("--prompt", dest="prompts", action="append", metavar="TEXT",
                        help="text to continue (repeat for several; default: params.yaml's)")
    sample.add_argument("--num-samples", type=int, metavar="N")
    add_sampling_options(sample)
    chat = commands.add_parser("chat", help="continue each line typed, until EOF or /quit",
                               description=SAMPLING_DEFAULTS)
    add_sampling_options(chat)
    export = commands.add_parser(
        "export", help="write the trained model in another format",
        description="hf: a folder that transformers' AutoModelForCausalLM and AutoTokenizer "
                    "load: GPT-2's layout for learned positions, LayerNorm and GELU, Llama's "
                    "for rope, RMSNorm and SwiGLU.")
    export.add_argument("--format", choices=["hf"], required=True,
                        help="hf: Hugging Face transformers")
    export.add_argument("models_dir", type=Path, metavar="MODELS",
                        help="folder written by the train stage, such as models")
    export.add_argument("out_dir", type=Path, metavar="OUT",
                        help="folder to write; an earlier export there is replaced")
    add_lab_commands(commands)
    add_serve_command(commands)
    template = commands.add_parser(
        "plots-template", help="build the page template of `dvc plots` pages, which renders "
                               "offline (make setup does)")
    template.add_argument("file", nargs="?", default=".gptlab/plots-template.html")
    template.add_argument("--cdn", action="store_true",
                          help="load the plotting libraries from a CDN, as DVC's own page does, "
                               "instead of inlining them from npm")
    stages = commands.add_parser(
        "stages", help="check dvc.yaml's code deps against what each stage's script imports",
        description="Each stage of ./dvc.yaml lists as deps its script, then the gptlab modules "
                    "the script imports directly or through other gptlab modules (sorted), then "
                    "its other deps. Without --write: print what would change, and fail if "
                    "anything would.")
    stages.add_argument("--write", action="store_true",
                        help="rewrite the deps lists in dvc.yaml (nothing else changes)")
    args = parser.parse_args(argv)
    run_main(lambda: run_command(args))


def run_command(args: argparse.Namespace) -> None:
    if needs_project(args):
        require_project(Path.cwd())
    COMMANDS[args.command](args)


def needs_project(args: argparse.Namespace) -> bool:
    """Whether the command reads the project it runs in: its experiments, its params.yaml, or
    its models/ (the default folder, when there is none here)."""
    if args.command in ("compare", "scaling", "speedrun", "report", "recover", "stages"):
        return True
    if args.command == "params":
        return args.file == PARAMS_FILE and not (args.explain or args.docs)
    if args.command in ("sample", "chat", "serve"):
        return args.models in (None, Path("models")) and not Path("models").exists()
    return False


def require_project(folder: Path) -> None:
    if not any((parent / PROJECT_FILE).is_file() for parent in (folder, *folder.parents)):
        raise GptlabError(f"not a gptlab project (no {PROJECT_FILE} here or above): {folder}")


def add_lab_commands(commands: argparse._SubParsersAction) -> None:
    """compare, scaling, speedrun and report: questions answered from the project's DVC
    experiments; and
    recover, which runs again the queued ones a killed worker left behind."""
    compare = commands.add_parser(
        "compare", help="seed statistics of the experiments, grouped by their params",
        description="Groups the experiments of this commit by their params, seed (and --ignore "
                    "keys) left out; for each group and metric: runs, mean, standard deviation "
                    "and 95% interval (Student's t); against the baseline group: the "
                    "difference of means with its interval and Welch's t-test p-value. An "
                    "experiment without a metric is left out of that metric's table only. The "
                    "scaling sweep's experiments (scale-*) are left out.")
    compare.add_argument("--metric", dest="metrics", action="append", metavar="NAME",
                         help="metric to compare (repeat; default: val_loss and bits_per_byte)")
    compare.add_argument("--ignore", action="append", default=[], metavar="KEY",
                         help="a param to leave out of the grouping too, e.g. train.device")
    compare.add_argument("--baseline", metavar="GROUP",
                         help="the group (or a run in it) to compare with (default: the "
                              "group of the workspace's params)")
    compare.add_argument("--all-commits", action="store_true",
                         help="the experiments of every commit, not only the current one. "
                              "Experiments of different commits may have run different code, "
                              "so they never share a group: with several commits, each group's "
                              "name ends with its commit (model.norm=rmsnorm @1a2b3c4)")
    compare.add_argument("--correct", choices=CORRECTIONS, default=NO_CORRECTION,
                         help="correct the p-values of each table for its several comparisons "
                              "with the baseline: holm adds Holm's step-down adjusted p "
                              f"(default: {NO_CORRECTION})")
    compare.add_argument("--target", type=float, metavar="VALUE",
                         help="a fixed value to test each group's mean against too: the "
                              "difference and the one-sided p-value (Student's t) that the mean "
                              "is below VALUE, as a loss target is met (a speedrun record: "
                              "p < 0.01 over 5 or more seeds)")
    output = compare.add_mutually_exclusive_group()
    output.add_argument("--md", action="store_true", help="Markdown tables")
    output.add_argument("--json", action="store_true", help="JSON")
    scaling = commands.add_parser(
        "scaling", help="queue a scaling sweep, or fit scaling laws to the finished one",
        description="With --queue: queue isoFLOP profiles, at each compute budget several model "
                    "shapes trained for the steps that spend it. Without: fit them (Hoffmann et "
                    "al. 2022's approaches 2 and 3: the best N and D of each budget, and L(N, D) "
                    "= E + A/N^alpha + B/D^beta) with bootstrap intervals, and the compute "
                    "frontier; write metrics/scaling.json and plots/scaling.png.")
    scaling.add_argument("--queue", action="store_true", help="queue the sweep's experiments")
    scaling.add_argument("--budgets", type=float_list, default=list(BUDGETS),
                         metavar="C,C,...", help="compute budgets in FLOPs (default: "
                         f"{','.join(f'{c:g}' for c in BUDGETS)})")
    scaling.add_argument("--shapes", type=str_list, default=list(SHAPES),
                         metavar="LxW,...", help="the ladder of model shapes, model.n_layer x "
                         f"model.n_embd (default: {','.join(SHAPES)})")
    scaling.add_argument("--per-budget", type=int, default=SHAPES_PER_BUDGET, metavar="K",
                         help="shapes at each budget, consecutive on the ladder, sliding up it "
                              f"as the budget grows (default: {SHAPES_PER_BUDGET})")
    scaling.add_argument("--budget", type=float, metavar="FLOPS",
                         help="compute for the compute-optimal N and D (default: the largest "
                              "run's)")
    scaling.add_argument("--samples", type=at_least(MIN_BOOTSTRAP_SAMPLES),
                         default=BOOTSTRAP_SAMPLES, metavar="K",
                         help="bootstrap resamples behind each 95%% interval (default: "
                              f"{BOOTSTRAP_SAMPLES}; fewer are quicker and coarser)")
    scaling.add_argument("--all-commits", action="store_true",
                         help="the experiments of every commit, not only the current one")
    add_speedrun_command(commands)
    report = commands.add_parser(
        "report", help="a Markdown report card of the workspace's run or of an experiment")
    report.add_argument("--exp", metavar="NAME", help="a DVC experiment's run")
    report.add_argument("-o", "--out", type=Path, default=Path("metrics/report.md"),
                        metavar="FILE", help="where to write it, the figures beside it "
                                             "(default: metrics/report.md)")
    commands.add_parser(
        "recover", help="run again the queued experiments whose worker was killed",
        description="Finds the queued experiments that DVC shows as Running though no process "
                    "runs them (a killed worker), marks them failed, queues each again under "
                    "its name with the params it was queued with, and starts the queue: each "
                    "resumes from its last checkpoint.")


def add_speedrun_command(commands: argparse._SubParsersAction) -> None:
    from gptlab.lab.speedrun import BY_NAME, SEEDS, TARGET

    speedrun = commands.add_parser(
        "speedrun", help="queue the CPU speedrun's study, or write its records table",
        description="With --queue: queue each recipe of the study (the speedrun preset, each "
                    "of its components left out or another added, and nanoGPT's recipe) at "
                    "each seed as the experiment speedrun-RECIPE-SEED, on the preset's data, "
                    "split and scoring whatever params.yaml holds. Without: test each recipe's "
                    "mean validation loss against the target (a record: below it with a "
                    "one-sided p < 0.01 over 5 or more seeds) and against the preset's "
                    "(Welch), write metrics/speedrun.json and print the records table.")
    speedrun.add_argument("--queue", action="store_true", help="queue the study's experiments")
    speedrun.add_argument("--recipes", type=str_list, metavar="NAME,...",
                          help=f"the recipes to queue (default: all: {','.join(BY_NAME)})")
    speedrun.add_argument("--seeds", type=int_list, default=list(SEEDS), metavar="S,S,...",
                          help=f"(default: {','.join(map(str, SEEDS))})")
    speedrun.add_argument("--set", dest="settings", action="append", default=[],
                          metavar="KEY=VALUE", help="a param of every queued run (repeat), e.g. "
                          "data.source=local and data.spec=PATH for a copy of the text that "
                          "is already on this machine")
    speedrun.add_argument("--target", type=float, default=TARGET, metavar="LOSS",
                          help=f"the loss a record must beat (default: {TARGET}, nanoGPT's)")
    speedrun.add_argument("--all-commits", action="store_true",
                          help="the experiments of every commit, not only the current one")


def add_serve_command(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve", help="serve trained models over an OpenAI-compatible API, with a chat page",
        description="Answers POST /v1/completions and /v1/chat/completions (streamed or not), "
                    "GET /v1/models and /health, and serves a chat page at /. Listens on "
                    "127.0.0.1 only unless --host says otherwise.")
    serve.add_argument("--models", action="append", metavar="[NAME=]DIR",
                       help="a folder written by the train stage, named after the folder "
                            "unless NAME is given (repeat to serve several; default: models)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: 127.0.0.1, this machine only; "
                            "0.0.0.0 for every network)")
    serve.add_argument("--port", type=int, default=8000, help="default: 8000")
    serve.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    serve.add_argument("--dtype", choices=list(DTYPE_CHOICES), default="auto",
                       help="the weights' dtype (default: auto, bfloat16 where the hardware "
                            "does bf16 natively)")
    serve.add_argument("--concurrency", type=at_least(1), default=2, metavar="N",
                       help="generations running at once (default: 2)")
    serve.add_argument("--queue", type=at_least(0), default=16, metavar="N",
                       help="requests waiting for a generation; more get 503 (default: 16)")
    serve.add_argument("--max-tokens", type=at_least(1), default=1024, metavar="N",
                       help="the most tokens one request may ask for (default: 1024)")


def at_least(smallest: int):
    """An argparse type: an integer no smaller than `smallest`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = smallest - 1
        if value < smallest:
            raise argparse.ArgumentTypeError(f"expected an integer >= {smallest}, got {text!r}")
        return value
    return parse


def float_list(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of numbers") from None


def int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of integers") from None


def str_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def run_compare(args: argparse.Namespace) -> None:
    metrics = args.metrics or list(DEFAULT_METRICS)
    found = read_experiments(all_commits=args.all_commits)
    groups = group_runs(comparable_runs(found, metrics), args.ignore)
    baseline = args.baseline
    if baseline is None:
        workspace = group_of(groups, found.workspace, args.ignore, found.head)
        if workspace is None:
            print(f"note: no experiment has the workspace's params; the baseline is the first "
                  f"group, {groups[0].name} (choose one with --baseline)", file=sys.stderr)
        baseline = groups[0].name if workspace is None else workspace.name
    comparisons = compare(groups, metrics, baseline, args.correct, args.target)
    if args.json:
        print(json.dumps(comparisons_json(comparisons), indent=2))
    else:
        print((render_markdown if args.md else render_text)(comparisons))


def comparable_runs(found: Experiments, metrics: list[str]) -> list[Run]:
    """The finished experiments that have any of the metrics, but not the scaling sweep's
    (another question); notes on stderr say what was left out, and which experiments each
    metric's table leaves out for lacking it."""
    from gptlab.lab.sweep import PREFIX as SWEEP_PREFIX

    names = [*found.unfinished, *(e.name for e in found.finished)]
    sweep = [name for name in names if name.startswith(SWEEP_PREFIX)]
    candidates = [e for e in found.finished if e.name not in sweep]
    known = sorted({metric for e in candidates for metric in e.metrics})
    for metric in metrics:
        if candidates and all(metric not in e.metrics for e in candidates):
            close = difflib.get_close_matches(metric, known, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else f"metrics: {', '.join(known)}"
            raise GptlabError(f"--metric {metric}: no experiment has it ({hint})")
    runs = [Run(e.name, e.params, e.metrics, e.base) for e in candidates
            if any(metric in e.metrics for metric in metrics)]
    compared = {run.name for run in runs}
    without_results = [name for name in names if name not in compared and name not in sweep]
    if without_results:
        print(f"note: left out {counted(without_results, 'experiment')} without results: "
              f"{', '.join(without_results)}", file=sys.stderr)
    for metric in metrics:
        lacking = [run.name for run in runs if metric not in run.metrics]
        if lacking:
            print(f"note: {metric}: left out {counted(lacking, 'experiment')} without it: "
                  f"{', '.join(lacking)}", file=sys.stderr)
    if sweep:
        print(f"note: left out the scaling sweep's {counted(sweep, 'experiment')} "
              f"({SWEEP_PREFIX}*)", file=sys.stderr)
    if not runs:
        raise GptlabError("no finished experiments to compare (queue some: see the README)")
    return runs


def counted(items: list, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def run_scaling(args: argparse.Namespace) -> None:
    from gptlab.io import write_json
    from gptlab.lab.scaling import (
        analyse_sweep,
        render_scaling,
        scaling_summary,
        write_scaling_figure,
    )
    from gptlab.lab.sweep import (
        isoflop_design,
        queue_sweep,
        repeated_data,
        scaling_runs,
        train_split_tokens,
        workspace_split,
    )

    if args.queue:
        params = load_params()
        vocab_size, train_tokens = workspace_split()
        planned = isoflop_design(params.model, params.train, args.budgets, args.shapes,
                                 args.per_budget, vocab_size)
        for line in repeated_data(planned, train_tokens):
            print(f"note: {line}", file=sys.stderr)
        queue_sweep(planned)
        print(f"queued {len(planned)} experiments ({', '.join(run.name for run in planned)}); "
              f"run them with `dvc queue start`, then `gptlab scaling`")
        return
    experiments = read_experiments(all_commits=args.all_commits)
    runs = scaling_runs(experiments)
    sweep = analyse_sweep(runs, samples=args.samples)
    budget = max(run.compute for run in runs) if args.budget is None else args.budget
    summary = scaling_summary(sweep, budget, train_split_tokens(experiments))
    write_json(Path("metrics/scaling.json"), summary, "the scaling fit")
    figure = write_scaling_figure(sweep, Path("plots/scaling.png"))
    print(render_scaling(summary))
    print(f"wrote metrics/scaling.json and {figure}")


def run_speedrun(args: argparse.Namespace) -> None:
    from gptlab.io import write_json
    from gptlab.lab.speedrun import (
        choose_recipes,
        queue_study,
        records,
        render_records,
        settings_of,
        study_runs,
    )

    if args.queue:
        names = queue_study(choose_recipes(args.recipes), args.seeds, settings_of(args.settings))
        print(f"queued {counted(names, 'experiment')} ({names[0]} to {names[-1]}); run them "
              f"with `dvc queue start`, then `gptlab speedrun`")
        return
    study = records(study_runs(read_experiments(all_commits=args.all_commits)), args.target)
    write_json(Path("metrics/speedrun.json"), study, "the speedrun's records")
    print(render_records(study))
    print("wrote metrics/speedrun.json")


def run_report(args: argparse.Namespace) -> None:
    from gptlab.lab.report import experiment_record, workspace_record, write_report

    run = experiment_record(args.exp) if args.exp else workspace_record()
    print(f"wrote {write_report(run, args.out)}")


def run_recover(args: argparse.Namespace) -> None:
    names = recover()
    print(f"queued again and started: {', '.join(names)}" if names
          else "no queued experiment was left running by a killed worker")


def write_stage_deps(args: argparse.Namespace) -> None:
    from gptlab.io import read_text, write_text
    from gptlab.pipeline import DVC_YAML, changes, with_generated_deps

    current = read_text(DVC_YAML, "run gptlab stages in the project's folder")
    generated = with_generated_deps(Path("."), current)
    if generated == current:
        print(f"{DVC_YAML}: every stage's deps are up to date")
    elif args.write:
        write_text(DVC_YAML, generated, DVC_YAML)
        print(f"wrote the stages' deps into {DVC_YAML}")
    else:
        print(changes(current, generated), end="")
        raise GptlabError(f"{DVC_YAML}: the stages' deps are not what their scripts import; "
                          f"`gptlab stages --write` (or `make deps`) writes them")


def build_plots_template(args: argparse.Namespace) -> None:
    from gptlab.plots import build_page_template  # matplotlib is slow to import

    print(f"wrote {build_page_template(Path(args.file), offline=not args.cdn)}")


def run_export(args: argparse.Namespace) -> None:
    from gptlab.export import export_hf  # torch and tokenizers are slow to import

    layout = export_hf(args.models_dir, args.out_dir)
    print(f"wrote {args.out_dir} ({layout} layout): load it with transformers' "
          f"AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained")


def show_params(args: argparse.Namespace) -> None:
    from gptlab.io import read_text, write_text
    from gptlab.paramdocs import explain, render_docs, with_comments

    if args.explain:
        print(explain(args.explain))
    elif args.docs:
        write_text(args.docs, render_docs(), "the parameter reference")
        print(f"wrote {args.docs}")
    elif args.comments:
        text = read_text(args.file, missing="run from the project folder")
        write_text(args.file, with_comments(text), "the params file")
        print(f"wrote the comments of {args.file}")
    else:
        print(json.dumps(load_params(args.file).model_dump(), indent=2))


def show_tokens(args: argparse.Namespace) -> None:
    header = read_header(args.file)
    print(json.dumps({"file": args.file, "tokens": header.count, "dtype": header.dtype.name,
                      "vocab_size": header.vocab_size,
                      "tokenizer_fingerprint": header.tokenizer_fingerprint,
                      "format_version": header.version}, indent=2))


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", type=Path, default=Path("models"),
                        help="folder written by the train stage (default: models)")
    parser.add_argument("--max-new-tokens", type=int, metavar="N")
    parser.add_argument("--temperature", type=float, metavar="T")
    parser.add_argument("--top-k", type=int, metavar="K")
    parser.add_argument("--top-p", type=float, metavar="P")
    parser.add_argument("--greedy", action=argparse.BooleanOptionalAction)
    parser.add_argument("--seed", type=int, metavar="S")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--dtype", choices=list(DTYPE_CHOICES))


def sampling_params(args: argparse.Namespace) -> SampleParams:
    """The default sampling settings with the options given, validated as params.yaml is."""
    given = {key: value for key in SampleParams.model_fields
             if (value := getattr(args, key, None)) is not None}
    try:
        return SampleParams.model_validate({**default_sampling().model_dump(), **given})
    except ValidationError as error:
        raise GptlabError(describe(error, SampleParams, key_name=option_name)) from None


def default_sampling() -> SampleParams:
    """The sample section of ./params.yaml if there is a valid one, else BUILTIN_SAMPLE."""
    if not Path(PARAMS_FILE).is_file():
        return BUILTIN_SAMPLE
    try:
        return load_params().sample
    except GptlabError as error:
        print(f"note: {error}; using the built-in sampling defaults", file=sys.stderr)
        return BUILTIN_SAMPLE


def option_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def run_sample(args: argparse.Namespace) -> None:
    # Imported here: torch takes over a second to load, which `params` and `tokens` need not.
    from gptlab.device import pick_device
    from gptlab.generate import load_for_generation, sample_all

    params = sampling_params(args)
    published = load_for_generation(args.models, pick_device(params.device, "--device"),
                                    params.dtype, "--dtype")
    prompts_name = "--prompt" if args.prompts else "sample.prompts"
    for result in sample_all(published, params, prompts_name):
        for continuation in result.continuations:
            print(result.prompt + continuation)
            print(SAMPLE_SEPARATOR)


def run_chat(args: argparse.Namespace) -> None:
    import torch

    from gptlab.device import pick_device
    from gptlab.generate import load_for_generation
    from gptlab.tokenizers import chat_tokens_of

    params = sampling_params(args).model_copy(update={"num_samples": 1})
    published = load_for_generation(args.models, pick_device(params.device, "--device"),
                                    params.dtype, "--dtype")
    # One generator for the session: the same lines typed again give the same replies.
    generator = torch.Generator(published.device).manual_seed(params.seed)
    chat = chat_tokens_of(published.tokenizer)
    if chat is None:
        print("This model has no chat template: it continues the text of each line you type. "
              "/help lists the commands.", file=sys.stderr, flush=True)
    messages: list[dict[str, str]] = []
    for line in typed_lines(interactive=sys.stdin.isatty()):
        if line.strip() in CHAT_COMMANDS:
            messages = chat_command(line.strip(), messages)
            continue
        try:
            if chat is None:
                reply = continued(published, line, params, generator)
            else:
                messages = [*messages, {"role": "user", "content": line}]
                reply = answered(published, chat, messages, params, generator)
                messages = [*messages, {"role": "assistant", "content": reply}]
        except GptlabError as error:  # a typo should not end the session
            print(f"error: {error}", file=sys.stderr)
            continue
        print(reply, flush=True)


# `gptlab chat`'s commands; /quit is read by `typed_lines`.
CHAT_COMMANDS = {"/help": "list these commands",
                 "/reset": "start a new conversation (forget the turns so far)",
                 "/quit": "end the session (as does the end of the input)"}


def chat_command(command: str, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Run a chat command; the conversation after it."""
    if command == "/reset":
        return []
    print("\n".join(f"{name:8}{what}" for name, what in CHAT_COMMANDS.items()), flush=True)
    return messages


def continued(published: Published, line: str, params: SampleParams,
              generator: torch.Generator) -> str:
    """A model without a chat template: the line continued as text."""
    from gptlab.generate import encode_prompt, sample_prompt

    ids = encode_prompt(published.tokenizer, line, "input")
    return sample_prompt(published, line, ids, params, generator).continuations[0]


def answered(published: Published, chat: ChatTokenizer, messages: list[dict[str, str]],
             params: SampleParams, generator: torch.Generator) -> str:
    """A model with a chat template: its answer to the conversation (as many of the latest
    turns as fit its context), up to its end-of-turn token."""
    from gptlab.chat import END_OF_TURN, fit_turns
    from gptlab.generate import generate

    ids = fit_turns(chat, messages, published.config.model.block_size)
    [answer] = generate(published.model, ids, num_samples=1,
                        max_new_tokens=params.max_new_tokens, temperature=params.temperature,
                        top_k=params.top_k, top_p=params.top_p, greedy=params.greedy,
                        eot_id=chat.special_ids[END_OF_TURN], generator=generator)
    return chat.decode(answer)


def run_serve(args: argparse.Namespace) -> None:
    # FastAPI, uvicorn and torch load only for this command.
    from gptlab.device import pick_device
    from gptlab.serve import Limits, serve

    limits = Limits(max_tokens=args.max_tokens, concurrency=args.concurrency, queue=args.queue)
    serve(args.models or ["models"], args.host, args.port, pick_device(args.device, "--device"),
          args.dtype, limits)


def typed_lines(interactive: bool) -> Iterator[str]:
    """Lines from stdin, without their newline, until EOF or /quit; blank lines are skipped."""
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return
        if line.strip() == "/quit":
            return
        if line:
            yield line


COMMANDS = {"params": show_params, "tokens": show_tokens, "sample": run_sample,
            "compare": run_compare, "scaling": run_scaling, "speedrun": run_speedrun,
            "report": run_report,
            "recover": run_recover,
            "chat": run_chat, "serve": run_serve, "export": run_export,
            "plots-template": build_plots_template, "stages": write_stage_deps}


if __name__ == "__main__":
    main()
