"""Prompt-side logic of the infer stage: answer constraints, task types read from prompts, parse rates
(the generation itself: tests/test_infer_backends.py and the DVC end-to-end test)."""

import itertools
import json
import re

import pytest

from shoptune import UserError
from shoptune.answer_constraints import (
    AnswerConstraint,
    constraint_for,
    digit_token_ids,
    number_list_pattern,
    option_numbers,
    parse_rates,
)
from shoptune.shopbench import parse
from shoptune.task_types import infer_task_type, numbered_items
from tests.conftest import ROOT


def test_option_numbers_come_from_the_question():
    question = "Which one?\n0. red\n1. blue\n2) green\nAnswer:"
    assert option_numbers(question) == ["0", "1", "2"]
    assert option_numbers("Pick the best one. 12 options in 2024") == [str(d) for d in range(10)]


class CharTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_digits_must_be_single_tokens():
    assert digit_token_ids(CharTokenizer(), ["0", "3"]) == [48, 51]
    with pytest.raises(UserError, match="splits the digit '10' into 2 tokens"):
        digit_token_ids(CharTokenizer(), ["10"])


def test_long_prompts_are_cut_from_the_left_keeping_bos():
    from shoptune.inference import fit_to_context

    assert fit_to_context([1, 2, 3], 5, None) == [1, 2, 3]
    assert fit_to_context([1, 2, 3, 4, 5, 6], 4, None) == [3, 4, 5, 6]  # the end holds options and instruction
    assert fit_to_context([9, 2, 3, 4, 5, 6], 4, 9) == [9, 4, 5, 6]
    assert fit_to_context([2, 3, 4, 5, 6], 4, 9) == [3, 4, 5, 6]


NO_CUDA_BEFORE_VLLM = """
import sys
from pathlib import Path
import torch

def guard(*args, **kwargs):
    if "vllm" not in sys.modules:
        raise SystemExit("CUDA touched before vLLM was imported")
    return False

torch.cuda.is_available = guard
torch.cuda.init = guard
torch.cuda.device_count = lambda: guard() or 0
torch.cuda.is_bf16_supported = guard
from shoptune.profile import InferParams, Sampling
from shoptune.inference import VllmBackend

s = Sampling(1, 0.0, 1.0, -1)
p = InferParams("vllm", "padded", "q", 2, "float32", 1, 64, 0.3, 0, False, s, s)
try:
    VllmBackend(Path(sys.argv[1]), False, p)
except Exception as err:  # no model there: vLLM refuses it, after its import
    print("vLLM reached:", type(err).__name__)
"""


def test_the_vllm_backend_touches_no_cuda_before_vllm_is_imported(stage_python, tmp_path):
    """vLLM forks its engine and tensor-parallel workers; a CUDA driver initialized in the parent
    first (torch.cuda.is_available() does that in torch 2.13) makes them fail on a GPU host."""
    import subprocess

    result = subprocess.run(
        [stage_python("infer"), "-c", NO_CUDA_BEFORE_VLLM, str(tmp_path / "no-model")],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert "CUDA touched before vLLM" not in result.stderr + result.stdout
    assert "vLLM reached:" in result.stdout, result.stderr[-2000:]


# ------------------------------------------------------------------ task types read from prompts


def demo_rows() -> list[dict]:
    return [json.loads(line) for line in (ROOT / "data/demo/questions.jsonl").read_text().splitlines()]


def test_the_task_type_of_every_demo_question_is_read_from_its_prompt():
    """What a ShopBench-style harness passes: the prompt and the multiple-choice flag, no task type."""
    rows = demo_rows()
    assert {row["task_type"] for row in rows} == {
        "multiple-choice",
        "ranking",
        "retrieval",
        "named_entity_recognition",
        "generation",
    }
    for row in rows:
        assert infer_task_type(row["input_field"], row["is_multiple_choice"]) == row["task_type"], row["input_field"]


# Prompts in the wording of ShopBench's tasks (written for this test).
WORDINGS = {
    "retrieval": [
        "A customer has bought a(n) kettle product and wants to write a review about its size.\n"
        "You are given a numbered list of 4 potential review snippets. Please select 3 snippets from the list.\n"
        "You should output three numbers, separated with comma. Do not give explanations.\n"
        "Review Snippet List:\n1. too small\n2. holds a lot\n3. Ranking: five stars\n4. roomy\nOutput: ",
        "You are given a user review given to a(n) lamp product. You are also given a numbered list of aspects.\n"
        "Please choose two aspects from the list that are covered by the review.\n"
        "Review:\nBright, 2.5 m cable.\n2.5 metres is long.\nAspect List:\n1.brightness\n2.cable\n3.price\nOutput: ",
        "The following numbered list contains 3 products. Please select 2 products the user may also buy.\n"
        "Product List:\n1. mug\n2. tea\n3. kettle\nOutput: ",
    ],
    "ranking": [
        "A user has made a query with keyword 'kettle'. Given the following numbered list of 3 products, please "
        "rank the products according their relevance with the query.\nProduct List:\n1. kettle\n2. mug\n3. tea\n"
        "You should output a permutation of 1 to 3. There should be a comma separating two numbers.\nOutput: ",
    ],
    "named_entity_recognition": [
        "Please extract phrases from the query that correspond to the entity type 'brand'. If there are multiple "
        "such entities, separate them with comma.\nQuery: house numbers stickers acme\nOutput: ",
    ],
    "generation": [
        "Please extract the keyphrase from the review that mentions the given aspect. You should only extract ONLY "
        "ONE keyphrase.\nReview: 1. great 2. cheap\nAspect: price\nOutput: \n",
        "Instructions: Explain the product category name\nInput: Watch Band\nOutput:",
        "A product entitled 'Blue Mug 300 ml' exists on an online shopping website. Generate an adequate title "
        "for it on a German website.\nOutput: ",
    ],
}


@pytest.mark.parametrize("task_type, prompt", [(t, p) for t, prompts in WORDINGS.items() for p in prompts])
def test_task_types_from_shopbench_wordings(task_type, prompt):
    assert infer_task_type(prompt, is_multiple_choice=False) == task_type
    assert infer_task_type(prompt, is_multiple_choice=True) == "multiple-choice"  # the flag decides


def test_numbered_items_count_up_from_one_and_the_last_list_wins():
    assert numbered_items("Pick:\n1. a\n2. b\n3.c\n") == [1, 2, 3]
    assert numbered_items("Steps:\n1. search\n2. click\nCandidates:\n1) x\n2) y\n3) z\n4) w") == [1, 2, 3, 4]
    assert numbered_items("2.5 inch\n1. a\n7. stray\n2. b\n") == [1, 2]
    assert numbered_items("0. red\n1. blue\n2. green") == [1, 2]  # multiple-choice options start at 0
    assert numbered_items("1. only one") == []
    assert numbered_items("no list") == []


# ------------------------------------------------------------------ answer constraints


def test_number_lists_are_distinct_candidates_separated_by_commas():
    pattern = re.compile(number_list_pattern([1, 2, 3, 10, 11], 3))
    for good in ("1,2,3", "10, 3, 11", "11,1, 10"):
        assert pattern.fullmatch(good), good
    for bad in ("1,1,2", "1,2", "1,2,3,10", "4,1,2", "1;2;3", " 1,2,3", "1,2,3.", "1 ,2,3", "01,2,3", "1,2,3\n"):
        assert not pattern.fullmatch(bad), bad


def test_a_matching_answer_is_exactly_what_the_official_parser_reads():
    """Every order of distinct candidates matches and parses to itself; no repeated one matches."""
    candidates = [1, 2, 3, 4, 5]
    ranking = re.compile(number_list_pattern(candidates, 5))
    for order in itertools.product(candidates, repeat=5):
        text = ", ".join(map(str, order))
        assert bool(ranking.fullmatch(text)) == (len(set(order)) == 5)
        if len(set(order)) == 5:
            assert parse("ranking", text) == list(order)
    retrieval = re.compile(number_list_pattern(list(range(1, 16)), 3))
    for order in itertools.product(range(1, 17), repeat=3):
        text = ",".join(map(str, order))
        assert bool(retrieval.fullmatch(text)) == (len(set(order)) == 3 and max(order) <= 15)


def test_long_lists_keep_their_range_but_may_repeat():
    pattern = re.compile(number_list_pattern(list(range(1, 31)), 3))
    assert pattern.fullmatch("30, 1, 1") and not pattern.fullmatch("31, 1, 2")
    assert len(number_list_pattern(list(range(1, 21)), 3)) < 25_000  # the distinct form stays small enough


def test_constraints_follow_the_task_type_and_the_switches():
    choice = "Which one?\n0. red\n1. blue\n2. green\nAnswer:"
    ranked = "Rank them.\n" + "".join(f"{i}. item\n" for i in range(1, 8)) + "Output:"
    retrieved = "Select three.\n" + "".join(f"{i}. item\n" for i in range(1, 11)) + "Output:"
    assert constraint_for("multiple-choice", choice, True, True) == AnswerConstraint(digits=("0", "1", "2"))
    assert constraint_for("multiple-choice", choice, False, True) is None
    ranking = constraint_for("ranking", ranked, True, True)
    assert ranking.pattern == number_list_pattern([1, 2, 3, 4, 5], 5)  # the parser reads numbers <= 5 only
    assert constraint_for("ranking", "Rank them.", True, True).pattern == ranking.pattern  # no list: 1..5
    assert constraint_for("retrieval", retrieved, True, True).pattern == number_list_pattern(list(range(1, 11)), 3)
    assert constraint_for("retrieval", "Select three.", True, True) is None
    assert constraint_for("ranking", ranked, True, False) is None
    assert constraint_for("generation", retrieved, True, True) is None
    assert constraint_for("named_entity_recognition", retrieved, True, True) is None


def test_parse_rates_count_what_the_official_parser_reads():
    types = ["multiple-choice", "multiple-choice", "ranking", "ranking", "retrieval", "generation", "generation"]
    answers = ["2", "x", "1, 2, 3, 4, 5", "1, 1", "7, 9", "A mug", "  "]
    assert parse_rates(types, answers) == {
        "generation": {"answers": 2, "parsed": 1, "rate": 0.5},
        "multiple-choice": {"answers": 2, "parsed": 1, "rate": 0.5},
        "ranking": {"answers": 2, "parsed": 1, "rate": 0.5},
        "retrieval": {"answers": 1, "parsed": 1, "rate": 1.0},
    }
