"""Scoring a whole question set at once, by the rules of shoptune.shopbench: each row's
score is the one its per-row rule (shopbench.score_parsed, the starter kit's loop) gives,
computed in bulk. tests/test_scoring.py holds the two side by side.

- sentence embeddings: every distinct text (generations and truths) encoded once per
  model, in batches, the model loaded once (shopbench.Embedder); each row's score is then
  the starter kit's rule on those vectors (embedding_score, as Embedder.cosine). A padded
  batch sums in another order than a sentence alone: a cosine moves by a few 1e-7 at most;
- ROUGE-L, BLEU and jp-BLEU: one scorer of each kind per process, reused (the starter kit
  builds one per row, jp-BLEU's MeCab tagger included), with the settings of
  shopbench.rouge_l and shopbench.bleu; with many rows, spread over one process per core
  while the embeddings are computed;
- the other metrics (accuracy, hit rate, NDCG, entity counts): shopbench's, row by row.

(shopbench.py itself is left as it is: the infer stage depends on it for its prompts, and
a change there would run the inference again.)
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor

import numpy as np

from shoptune import shopbench
from shoptune.shopbench import Embedder, Question

log = logging.getLogger("scoring")

TEXT_METRICS = ("rougel", "bleu", "jp-bleu")
EMBEDDING_METRICS = ("sent-transformer", "multilingual-sent-transformer")
# Below this many ROUGE/BLEU rows one process is quicker than starting workers; no more
# workers than one per ROWS_PER_WORKER rows.
POOL_MINIMUM_ROWS = 500
ROWS_PER_WORKER = 250
CHUNKS_PER_WORKER = 4
BATCH_SIZE = 64  # sentences per forward pass of an embedding model


def cores() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@functools.cache
def rouge_l_scorer():
    """shopbench.rouge_l's scorer (Porter stemming), made once per process."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


@functools.cache
def bleu_scorer(japanese: bool):
    """shopbench.bleu's metric, made once per process: sacrebleu.corpus_bleu(...) is
    BLEU(same settings).corpus_score(...), and a BLEU object keeps nothing between calls."""
    import sacrebleu

    return sacrebleu.BLEU(
        lowercase=True,
        force=False,
        tokenize="ja-mecab" if japanese else sacrebleu.BLEU.TOKENIZER_DEFAULT,
        smooth_method="exp",
        smooth_value=None,
        effective_order=False,
    )


def text_score(metric: str, generation: str, truth: str) -> float:
    """shopbench.rouge_l, or shopbench.bleu (first line, lower-cased), with reused scorers."""
    if metric == "rougel":
        return rouge_l_scorer().score(generation, truth)["rougeL"].fmeasure
    line = generation.lstrip("\n").rstrip("\n").split("\n")[0]
    return bleu_scorer(metric == "jp-bleu").corpus_score([line], [[truth]]).score / 100


def text_scores(rows: list[tuple[str, str, str]]) -> list[float]:
    """text_score of each (metric, parsed generation, truth) row (a worker's entry point)."""
    return [text_score(metric, generation, truth) for metric, generation, truth in rows]


def cosine(generated: np.ndarray, reference: np.ndarray):
    """Embedder.cosine's similarity: in the embeddings' own precision (float32)."""
    return np.dot(generated, reference) / (np.linalg.norm(generated) * np.linalg.norm(reference))


def embedding_score(generated: np.ndarray, references: list[np.ndarray], truth_is_list: bool):
    """Embedder.cosine's score: the cosine clipped at 0; for a list of truths, the mean of the
    cosines, clipped at 0 (the same types: numpy float32, or the int 0)."""
    if not truth_is_list:
        return max(cosine(generated, references[0]), 0)
    return max(np.mean([cosine(generated, reference) for reference in references]), 0)


def embed(embedder: Embedder, texts: list[str], name: str, batch_size: int = BATCH_SIZE) -> dict[str, np.ndarray]:
    """{text: embedding} for the distinct texts, encoded in batches by the embedder's model `name`."""
    distinct = list(dict.fromkeys(texts))
    if not distinct:
        return {}
    vectors = embedder.model(name).encode(
        distinct, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False
    )
    return dict(zip(distinct, vectors, strict=True))


class TextScoring:
    """ROUGE/BLEU rows scored in worker processes (started at once, collected by `result`),
    or in this process when they are few or there is one core."""

    def __init__(self, rows: list[tuple[str, str, str]], workers: int):
        self.rows = rows
        self.pool: ProcessPoolExecutor | None = None
        self.futures: list[Future] = []
        workers = min(workers, max(1, len(rows) // ROWS_PER_WORKER))
        if workers > 1 and len(rows) >= POOL_MINIMUM_ROWS:
            # fork: the workers start at once with what this process has imported (no torch:
            # the embeddings are computed after they start, and the workers never use it)
            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
            size = -(-len(rows) // (workers * CHUNKS_PER_WORKER))
            self.futures = [self.pool.submit(text_scores, rows[i : i + size]) for i in range(0, len(rows), size)]
            log.info("%d ROUGE/BLEU rows over %d processes", len(rows), workers)

    def result(self) -> list[float]:
        if self.pool is None:
            return text_scores(self.rows)
        try:
            return [score for future in self.futures for score in future.result()]
        finally:
            self.pool.shutdown(cancel_futures=True)


def score_rows(
    questions: list[Question],
    parsed: list,
    embedder: Embedder,
    embedding_models: dict[str, str],
    workers: int | None = None,
) -> list:
    """Every row's score (a (tp, fp, fn) triple for micro f1), in order; the same as
    [shopbench.score_parsed(q, p, embedder, embedding_models) for q, p in zip(questions, parsed)]."""
    scores: list = [None] * len(questions)
    kinds = dict.fromkeys(TEXT_METRICS, "text") | dict.fromkeys(EMBEDDING_METRICS, "embedding")
    by_kind: dict[str, list[int]] = {"text": [], "embedding": [], "other": []}
    for i, question in enumerate(questions):
        by_kind[kinds.get(question.metric, "other")].append(i)

    text = TextScoring(
        [(questions[i].metric, parsed[i], questions[i].output_field) for i in by_kind["text"]],
        cores() if workers is None else workers,
    )
    try:
        for i in by_kind["other"]:
            scores[i] = shopbench.score_parsed(questions[i], parsed[i], embedder, embedding_models)
        _embedding_scores(questions, parsed, by_kind["embedding"], embedder, embedding_models, scores)
        text_results = text.result()
    except BaseException:
        if text.pool is not None:
            text.pool.shutdown(cancel_futures=True)
        raise
    for i, score in zip(by_kind["text"], text_results, strict=True):
        scores[i] = score
    return scores


def _embedding_scores(
    questions: list[Question],
    parsed: list,
    rows: list[int],
    embedder: Embedder,
    embedding_models: dict[str, str],
    scores: list,
) -> None:
    """Fill scores[i] for the embedding rows: the texts of all rows that use one model are
    encoded together, each distinct text once."""
    by_model: dict[str, list[int]] = {}
    for i in rows:
        by_model.setdefault(embedding_models[questions[i].metric], []).append(i)
    for name, indices in by_model.items():
        texts = []
        for i in indices:
            truth = questions[i].output_field
            texts.append(parsed[i])
            texts.extend([truth] if isinstance(truth, str) else truth)
        vectors = embed(embedder, texts, name)
        log.info("%d rows scored by %s: %d distinct texts encoded", len(indices), name, len(vectors))
        for i in indices:
            truth = questions[i].output_field
            references = [truth] if isinstance(truth, str) else truth
            scores[i] = embedding_score(
                vectors[parsed[i]], [vectors[r] for r in references], not isinstance(truth, str)
            )
