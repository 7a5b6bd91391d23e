"""ShopBench (Amazon KDD Cup 2024): question rows, the official parsers and metrics, prompts.

The parsing and scoring rules follow the public starter kit (parsers.py v0.1.1,
metrics.py and local_evaluation.py v0.1.0) rule for rule, quirks included, so that
local scores equal official ones:
- every output is cut at 5,000 characters before parsing;
- multiple choice: int of the first character of the stripped output, else -1;
- ranking: keep numeric characters, commas, spaces; split on commas; ints <= 5, first 5;
  any duplicate empties the list; retrieval: the same without the bound, first 3;
- entity lists: a Python list literal of strings, else comma-split, stripped, non-empty;
- NDCG indexes the truth's relevance weights by predicted number - 1 (so 0 reads the
  last weight, as the official code does);
- BLEU: sacrebleu corpus BLEU of the first line, lower-cased, 13a tokenizer (ja-mecab for
  jp-bleu), smoothing "exp", as the `evaluate` wrapper that the starter kit calls;
- cosine similarity of sentence embeddings, clipped at 0, averaged over a list of truths
  before clipping;
- a task's score is the mean of its rows, micro-F1 over summed counts for "micro f1";
  a track's score is the mean of its tasks.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shoptune import UserError
from shoptune.artifacts import read_jsonl

MAX_RESPONSE_CHARACTERS = 5000
TASK_TYPES = ("multiple-choice", "generation", "retrieval", "ranking", "named_entity_recognition")
METRICS = (
    "accuracy",
    "hit rate@3",
    "rougel",
    "sent-transformer",
    "multilingual-sent-transformer",
    "micro f1",
    "ndcg",
    "bleu",
    "jp-bleu",
)

# The recipe's prompts (4th place, multilingual track).
SYSTEM_PROMPT = (
    "You are a helpful online shopping assistant. Please answer the following question about "
    "online shopping and follow the given instructions."
)
NON_CHOICE_SUFFIX = "Do not give explanation only Answer. \nOutput:\n"


@dataclass(frozen=True)
class Question:
    input_field: str
    output_field: object
    task_name: str
    task_type: str
    metric: str
    track: str
    is_multiple_choice: bool


def read_questions(path: str | Path) -> list[Question]:
    """ShopBench rows from a JSON-lines file; a malformed row is a one-line UserError."""
    questions = []
    for number, row in enumerate(read_jsonl(path), 1):
        where = f"{path}: row {number}"
        for key in ("input_field", "output_field", "task_name", "task_type", "metric"):
            if key not in row:
                raise UserError(f"{where}: missing '{key}'")
        if row["task_type"] not in TASK_TYPES:
            raise UserError(f"{where}: task_type {row['task_type']!r} is not one of {', '.join(TASK_TYPES)}")
        if row["metric"] not in METRICS:
            raise UserError(f"{where}: metric {row['metric']!r} is not one of {', '.join(METRICS)}")
        if not isinstance(row["input_field"], str):
            raise UserError(f"{where}: input_field must be a string")
        _check_truth(row["output_field"], row["metric"], where)
        questions.append(
            Question(
                input_field=row["input_field"],
                output_field=row["output_field"],
                task_name=str(row["task_name"]),
                task_type=row["task_type"],
                metric=row["metric"],
                track=str(row.get("track", "")),
                is_multiple_choice=bool(row.get("is_multiple_choice", row["task_type"] == "multiple-choice")),
            )
        )
    if not questions:
        raise UserError(f"{path}: no questions")
    return questions


def _check_truth(truth, metric: str, where: str) -> None:
    def is_list_of(kind) -> bool:
        return isinstance(truth, list) and all(isinstance(x, kind) and not isinstance(x, bool) for x in truth)

    ok = {
        "accuracy": isinstance(truth, int) and not isinstance(truth, bool),
        "hit rate@3": is_list_of(int) and len(truth) > 0,
        "ndcg": is_list_of((int, float)),
        "micro f1": is_list_of(str),
        "rougel": isinstance(truth, str),
        "bleu": isinstance(truth, str),
        "jp-bleu": isinstance(truth, str),
        "sent-transformer": isinstance(truth, str) or (is_list_of(str) and len(truth) > 0),
        "multilingual-sent-transformer": isinstance(truth, str) or (is_list_of(str) and len(truth) > 0),
    }[metric]
    if not ok:
        raise UserError(f"{where}: output_field {truth!r} does not fit metric '{metric}'")


# ------------------------------------------------------------------ parsers


def parse_multiple_choice(response: str) -> int:
    try:
        return int(response.strip()[0])
    except Exception:
        return -1


def _numbers(response: str) -> list[int]:
    cleaned = "".join(c for c in response if c.isnumeric() or c in [",", " "])
    items = []
    for item in cleaned.split(","):
        try:
            items.append(int(item))
        except ValueError:
            pass
    return items


def parse_ranking(response: str) -> list[int]:
    ranked = [item for item in _numbers(response) if item <= 5][:5]
    return [] if len(ranked) != len(set(ranked)) else ranked


def parse_retrieval(response: str) -> list[int]:
    return _numbers(response)[:3]


def parse_entities(response: str) -> list[str]:
    try:
        entities = ast.literal_eval(response)
        if isinstance(entities, list) and all(isinstance(item, str) for item in entities):
            return entities
    except Exception:
        pass
    return [entity.strip() for entity in response.split(",") if entity.strip() != ""]


def parse_generation(response: str) -> str:
    return response.strip()


PARSERS: dict[str, Callable[[str], object]] = {
    "multiple-choice": parse_multiple_choice,
    "generation": parse_generation,
    "retrieval": parse_retrieval,
    "ranking": parse_ranking,
    "named_entity_recognition": parse_entities,
}


def parse(task_type: str, response: str):
    if not isinstance(response, str):
        raise UserError(f"a prediction must be a string, got {type(response).__name__}")
    return PARSERS[task_type](response[:MAX_RESPONSE_CHARACTERS])


# ------------------------------------------------------------------ metrics


def accuracy(prediction: int, truth: int) -> bool:
    return prediction == truth


def hit_rate_3(retrieved: list[int], truth: list[int]) -> float:
    return len(set(truth).intersection(set(retrieved[:3]))) / len(truth)


def ndcg(predicted: list[int], weights: list[float]) -> float:
    if len(predicted) > len(weights):
        predicted = predicted[: len(weights)]
    dcg, idcg = 0.0, 0.0
    for i, index in enumerate(predicted, start=1):
        relevance = weights[index - 1] if index - 1 < len(weights) else 0
        dcg += (np.power(2, relevance) - 1) / np.log2(i + 1)
    for i, weight in enumerate(sorted(weights, reverse=True), start=1):
        idcg += (np.power(2, weight) - 1) / np.log2(i + 1)
    return 0 if idcg == 0 else dcg / idcg


def entity_counts(extracted: list[str], truth: list[str]) -> tuple[int, int, int]:
    extracted = [entity.lower().strip() for entity in extracted]
    truth = [entity.lower() for entity in truth]
    tp = len(set(extracted).intersection(set(truth)))
    return tp, len(extracted) - tp, len(truth) - tp


def micro_f1(counts: list[tuple[int, int, int]]) -> float:
    tp = sum(c[0] for c in counts)
    fp = sum(c[1] for c in counts)
    fn = sum(c[2] for c in counts)
    precision = tp / (tp + fp) if (tp + fp) > 0 else 0
    recall = tp / (tp + fn) if (tp + fn) > 0 else 0
    return 0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def rouge_l(generation: str, truth: str) -> float:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(generation, truth)["rougeL"].fmeasure


def bleu(generation: str, truth: str, japanese: bool = False) -> float:
    import sacrebleu

    line = generation.lstrip("\n").rstrip("\n").split("\n")[0]
    result = sacrebleu.corpus_bleu(
        [line],
        [[truth]],
        smooth_method="exp",
        smooth_value=None,
        force=False,
        lowercase=True,
        tokenize="ja-mecab" if japanese else sacrebleu.BLEU.TOKENIZER_DEFAULT,
        use_effective_order=False,
    )
    return result.score / 100


class Embedder:
    """Sentence-embedding cosine similarity, one model loaded once per name."""

    def __init__(self, resolve: Callable[[str], str]):
        self.resolve = resolve
        self.models: dict[str, object] = {}

    def model(self, name: str):
        if name not in self.models:
            import torch
            from sentence_transformers import SentenceTransformer

            device = "cuda" if torch.cuda.is_available() else "cpu"
            self.models[name] = SentenceTransformer(self.resolve(name)).to(device)
        return self.models[name]

    def cosine(self, generation: str, truth: str | list[str], name: str) -> float:
        model = self.model(name)
        generated = model.encode([generation])[0]

        def similarity(reference: str):
            ref = model.encode([reference])[0]
            return np.dot(generated, ref) / (np.linalg.norm(generated) * np.linalg.norm(ref))

        if isinstance(truth, str):
            return max(similarity(truth), 0)
        return max(np.mean([similarity(reference) for reference in truth]), 0)


# ------------------------------------------------------------------ scoring


@dataclass
class TaskScore:
    task_name: str
    task_type: str
    metric: str
    track: str
    num_samples: int
    score: float


def score_parsed(question: Question, parsed, embedder: Embedder, embedding_models: dict[str, str]):
    """The row's per-sample score of a parsed answer (a (tp, fp, fn) triple for micro f1)."""
    truth = question.output_field
    metric = question.metric
    if metric == "accuracy":
        return accuracy(parsed, truth)
    if metric == "hit rate@3":
        return hit_rate_3(parsed, truth)
    if metric == "ndcg":
        return ndcg(parsed, truth)
    if metric == "micro f1":
        return entity_counts(parsed, truth)
    if metric == "rougel":
        return rouge_l(parsed, truth)
    if metric in ("bleu", "jp-bleu"):
        return bleu(parsed, truth, japanese=metric == "jp-bleu")
    return embedder.cosine(parsed, truth, embedding_models[metric])


def aggregate(questions: list[Question], sample_scores: list) -> list[TaskScore]:
    """Per task, in order of first appearance: mean of rows, micro-F1 over summed counts."""
    tasks: dict[str, list] = {}
    first: dict[str, Question] = {}
    for question, score in zip(questions, sample_scores, strict=True):
        tasks.setdefault(question.task_name, []).append(score)
        first.setdefault(question.task_name, question)
    result = []
    for name, scores in tasks.items():
        q = first[name]
        value = micro_f1(scores) if q.metric == "micro f1" else np.mean(scores)
        result.append(TaskScore(name, q.task_type, q.metric, q.track, len(scores), float(value)))
    return result


def summarize(tasks: list[TaskScore]) -> dict:
    """Task scores grouped: per track and per task type, each the mean over its tasks."""

    def mean_by(key) -> dict[str, float]:
        groups: dict[str, list[float]] = {}
        for task in tasks:
            groups.setdefault(key(task), []).append(task.score)
        return {name: float(np.mean(values)) for name, values in sorted(groups.items())}

    return {
        "overall": float(np.mean([task.score for task in tasks])),
        "tracks": mean_by(lambda t: t.track or "(no track)"),
        "task_types": mean_by(lambda t: t.task_type),
        "tasks": {
            t.task_name: {
                "task_type": t.task_type,
                "metric": t.metric,
                "track": t.track,
                "num_samples": t.num_samples,
                "score": t.score,
            }
            for t in tasks
        },
    }


def prompt_for(question: Question) -> str:
    """The recipe's inference prompt: system prompt, a blank line, the question (+ suffix)."""
    text = f"{SYSTEM_PROMPT}\n\n{question.input_field}"
    return text if question.is_multiple_choice else text + NON_CHOICE_SUFFIX
