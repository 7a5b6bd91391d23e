"""What a ShopBench prompt asks for, read from its wording: the task type and the numbered candidates.

The competition's harness gives a model only the prompt and the multiple-choice flag
(`batch_predict({"prompt": [...]}, is_multiple_choice)`), so the answer's type is read from the
prompt itself:
- multiple-choice: the flag says so;
- ranking and retrieval: the prompt holds a numbered list 1, 2, ... N (products, review snippets,
  aspects, queries) and asks for numbers ("output three numbers, separated with comma", "select 3
  products from the list"); ranking when it asks to rank or for a permutation;
- named_entity_recognition: it asks for entities ("the entity type 'brand'", "a Python list of strings");
- generation: everything else (explanations, titles, translations, one keyphrase).
Wording is read outside the numbered list, so a candidate's own text ("Ranking Board Game") never
decides the type.
"""

from __future__ import annotations

import re

LIST_ITEM = re.compile(r"^[ \t]*(\d+)[.)]", re.MULTILINE)
RANKING = re.compile(r"\brank(?:s|ed|ing)?\b|\bpermutation\b", re.IGNORECASE)
ASKS_FOR_NUMBERS = re.compile(r"\bnumbers?\b|\bindices\b|\bselect\b|\bchoose\b", re.IGNORECASE)
ENTITIES = re.compile(r"\bentit(?:y|ies)\b|\blist of strings\b", re.IGNORECASE)


def numbered_items(prompt: str) -> list[int]:
    """The numbers 1..N of the prompt's numbered list ("1. ...", "2) ...", "3.stability").

    A list counts up from 1; a line that merely starts with a number ("2.5 inch lift", "0. red" of
    a multiple-choice question) adds nothing. Of several lists, the last one of two items or more
    (the candidates come last, before "Output:"); empty when there is none."""
    runs: list[int] = []  # the length of each run counting up from 1
    for match in LIST_ITEM.finditer(prompt):
        number = int(match.group(1))
        if number == 1:
            runs.append(1)
        elif runs and number == runs[-1] + 1:
            runs[-1] = number
    lists = [length for length in runs if length >= 2]
    return list(range(1, lists[-1] + 1)) if lists else []


def instruction_text(prompt: str) -> str:
    """The prompt without its numbered list's lines: the words that ask the question."""
    return "\n".join(line for line in prompt.splitlines() if not LIST_ITEM.match(line))


def infer_task_type(prompt: str, is_multiple_choice: bool) -> str:
    """One of shopbench.TASK_TYPES, from a prompt's wording (see the module's docstring)."""
    if is_multiple_choice:
        return "multiple-choice"
    instruction = instruction_text(prompt)
    if numbered_items(prompt) and ASKS_FOR_NUMBERS.search(instruction):
        return "ranking" if RANKING.search(instruction) else "retrieval"
    if ENTITIES.search(instruction):
        return "named_entity_recognition"
    return "generation"
