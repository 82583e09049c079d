"""evaluate stage: score MODELS_DIR on every token of the validation shards in TOKENS_DIR, and on
the downstream tasks of params eval.tasks (their data kept in the download cache)."""

from pathlib import Path

from gptlab.errors import run_main
from gptlab.evaluate import evaluate_model
from gptlab.io import cache_dir, write_json
from gptlab.params import load_params


def main(models_dir: Path, tokens_dir: Path, metrics_json: Path) -> None:
    params = load_params()
    metrics = evaluate_model(models_dir, tokens_dir, params.eval, cache_dir("downloads"))
    write_json(metrics_json, metrics, "the evaluation metrics")
    print(", ".join(f"{key}={value}" for key, value in metrics.items()))


if __name__ == "__main__":
    run_main(main, "MODELS_DIR", "TOKENS_DIR", "METRICS_JSON")
