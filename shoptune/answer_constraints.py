"""What an answer may be, so that the official parser always reads it, and how many answers it reads.

- multiple choice (infer.constrain_choices): one token, one of the question's option numbers
  ("0. red", "1) blue"; any digit when none are found), what the winning team did; vLLM's
  allowed_token_ids, a logits mask in transformers;
- ranking and retrieval (infer.constrain_number_lists): distinct numbers of the question's numbered
  list, separated by "," or ", ", nothing before or after, as a regular expression that both
  backends enforce with the same grammar engine (xgrammar: vLLM's structured outputs, a logits
  processor in transformers):
    ranking    every candidate up to 5 once (the parser keeps numbers <= 5, five at most, and a
               duplicate empties the list; a longer permutation never lowers NDCG);
    retrieval  three candidates (hit rate@3 reads the first three; a fourth is never read).
  A list of more than MAX_DISTINCT candidates is still limited to its numbers, but not to distinct
  ones (the expression enumerates the orders: 20 x 19 x 18 of them for retrieval). Without a
  numbered list a ranking answer ranks 1..5 and a retrieval answer is free.
Entity lists and generations are never constrained.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shoptune import UserError
from shoptune.shopbench import parse
from shoptune.task_types import numbered_items

OPTION_NUMBER = re.compile(r"^\s*(\d)[.)]\s", re.MULTILINE)
RANKED = 5  # parse_ranking keeps numbers <= 5, at most five
RETRIEVED = 3  # hit rate@3 reads the first three
MAX_DISTINCT = 20
SEPARATOR = ", ?"


@dataclass(frozen=True)
class AnswerConstraint:
    """One answer's allowed form: `digits`, a one-token multiple-choice answer, or `pattern`, a regular
    expression the whole answer matches."""

    digits: tuple[str, ...] = ()
    pattern: str | None = None


def option_numbers(question: str) -> list[str]:
    """The option numbers of a multiple-choice question ("0. ...", "1) ..."), else all digits."""
    found = sorted(set(OPTION_NUMBER.findall(question)))
    return found or [str(d) for d in range(10)]


def digit_token_ids(tokenizer, digits: list[str] | tuple[str, ...]) -> list[int]:
    ids = []
    for digit in digits:
        encoded = tokenizer.encode(digit, add_special_tokens=False)
        if len(encoded) != 1:
            raise UserError(f"the tokenizer splits the digit {digit!r} into {len(encoded)} tokens")
        ids.append(encoded[0])
    return ids


def number_list_pattern(candidates: list[int], count: int) -> str:
    """A regular expression of `count` distinct candidates separated by "," or ", " (repeats allowed
    beyond MAX_DISTINCT candidates). Plain groups and alternation only: xgrammar reads it."""
    count = min(count, len(candidates))
    if count < 1:
        raise ValueError("a number list needs at least one candidate")
    if len(candidates) > MAX_DISTINCT:
        anyone = "(" + "|".join(str(c) for c in candidates) + ")"
        return anyone + f"({SEPARATOR}{anyone})" * (count - 1)

    def rest(used: frozenset[int], left: int) -> str:
        choices = [
            str(c) + ("" if left == 1 else SEPARATOR + rest(used | {c}, left - 1)) for c in candidates if c not in used
        ]
        return "(" + "|".join(choices) + ")"

    return rest(frozenset(), count)


def constraint_for(
    task_type: str, question: str, constrain_choices: bool, constrain_number_lists: bool
) -> AnswerConstraint | None:
    """The constraint on the answer to `question` (its input_field), None when the answer is free."""
    if task_type == "multiple-choice" and constrain_choices:
        return AnswerConstraint(digits=tuple(option_numbers(question)))
    if task_type in ("ranking", "retrieval") and constrain_number_lists:
        candidates = numbered_items(question)
        if task_type == "ranking":
            candidates = [c for c in candidates if c <= RANKED] or list(range(1, RANKED + 1))
            return AnswerConstraint(pattern=number_list_pattern(candidates, len(candidates)))
        if candidates:
            return AnswerConstraint(pattern=number_list_pattern(candidates, RETRIEVED))
    return None


def parses(task_type: str, answer: str) -> bool:
    """Whether the official parser reads an answer: a digit for multiple choice, a non-empty list for
    ranking, retrieval and entities, a non-empty text for generation."""
    parsed = parse(task_type, answer)
    return parsed != -1 if task_type == "multiple-choice" else bool(parsed)


def parse_rates(task_types: list[str], answers: list[str]) -> dict[str, dict]:
    """Per task type: answers, how many the official parser reads, the rate."""
    rates: dict[str, dict] = {}
    for task_type, answer in zip(task_types, answers, strict=True):
        entry = rates.setdefault(task_type, {"answers": 0, "parsed": 0})
        entry["answers"] += 1
        entry["parsed"] += parses(task_type, answer)
    for entry in rates.values():
        entry["rate"] = round(entry["parsed"] / entry["answers"], 4)
    return dict(sorted(rates.items()))
