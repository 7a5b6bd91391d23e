"""ShopBench scoring the starter kit's way, the baseline of the scoring bench (tests/bench.py):
one row at a time (local_evaluation.py's loop), each embedding metric encoding one sentence
per call with the model loaded once, a new ROUGE or BLEU scorer per row: shopbench's per-row
rules (score_parsed). Run in the evaluation environment:

    python -m tests.official_loop QUESTIONS.jsonl PREDICTIONS.jsonl OUT.json EMBEDDING_MODEL MULTILINGUAL_MODEL

OUT.json receives the summary `shoptune evaluate --out` writes, from the same rules.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shoptune.artifacts import read_jsonl  # noqa: E402
from shoptune.shopbench import Embedder, aggregate, parse, read_questions, score_parsed, summarize  # noqa: E402
from stages.evaluate import resolve_model  # noqa: E402


def main(questions_path: str, predictions_path: str, out: str, embedding_model: str, multilingual_model: str) -> None:
    questions = read_questions(questions_path)
    predictions = [row["prediction"] for row in read_jsonl(predictions_path)]
    models = {"sent-transformer": embedding_model, "multilingual-sent-transformer": multilingual_model}
    embedder = Embedder(resolve_model)
    scores = []
    for question, prediction in zip(questions, predictions, strict=True):
        scores.append(score_parsed(question, parse(question.task_type, prediction), embedder, models))
    summary = summarize(aggregate(questions, scores))
    summary["embedding_models"] = models
    Path(out).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
