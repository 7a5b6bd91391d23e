"""What every task family shares: a job (one request about one product), the item format the
LLM (or the offline writer) replies in, its parsing into ShopBench rows, and the base class.

A reply holds items separated by blank lines, each in ShopBench form with its answer:

    <question, one or more lines>
    0. <option>                      (multiple-choice and retrieval families only; retrieval
    1. <option>                       candidates are numbered from 1)
    Answer: <answer>

The answer is an option number (multiple-choice, options numbered from 0), option numbers
separated by commas (retrieval, candidates numbered from 1 as in ShopBench), a list of strings
(entity families: a JSON or Python list, or entries separated by semicolons or commas), or one
line of text (generation). A family adds its own checks (the product it names, the options it was
given, the language) on top of the shared ones.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re

from shoptune.catalog import Product

ANSWER = "Answer:"
OPTION = re.compile(r"^\s*(\d+)[.)]\s+(\S.*?)\s*$")
ITEM_BREAK = re.compile(r"\n\s*\n")
LANGUAGE = {"DE": "German", "JP": "Japanese", "UK": "English", "ES": "Spanish", "FR": "French", "IT": "Italian"}


class Rejected(Exception):
    """An item broke a rule: `code` names the rule (counted in the dataset card), the message says how."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code = code


@dataclasses.dataclass(frozen=True)
class Job:
    """One request: a family asked about one product, with what the family chose for it
    (`context`: candidates, the answer's position, a target locale; JSON, stored with the reply).
    Families whose job holds one item (their own candidates) make `number` 0, 1, ... per product."""

    family: str
    product: Product
    context: dict = dataclasses.field(default_factory=dict)
    number: int = 0

    @property
    def id(self) -> str:
        return f"{self.family}:{self.product.locale}:{self.product.id}" + (f":{self.number}" if self.number else "")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The synthesize params a family reads: items per request and options per item."""

    items: int
    options: int


@dataclasses.dataclass(frozen=True)
class Item:
    """One parsed item: the question, its options (empty for open tasks), the answer as ShopBench's
    output_field (an int, a list of ints, a list of strings or a string)."""

    question: str
    options: list[str]
    answer: object

    def input_field(self, task_type: str) -> str:
        start = first_number(task_type)
        lines = [self.question, *(f"{i}. {option}" for i, option in enumerate(self.options, start))]
        if task_type == "multiple-choice":  # as ShopBench's: a choice ends in "Answer:", a retrieval in its list
            lines.append(ANSWER)
        return "\n".join(lines)


def first_number(task_type: str) -> int:
    """ShopBench numbers multiple-choice options from 0 and retrieval candidates from 1."""
    return 1 if task_type == "retrieval" else 0


def split_items(reply: str) -> list[str]:
    return [item.strip() for item in ITEM_BREAK.split(reply.strip()) if item.strip()]


def answer_text(answer: object) -> str:
    """An answer as the reply (and the training output) writes it."""
    if isinstance(answer, list):
        return ", ".join(str(a) for a in answer) if all(isinstance(a, int) for a in answer) else _json(answer)
    return str(answer)


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def write_item(question: str, options: list[str], answer: object, start: int = 0) -> str:
    """An item in the reply format (the offline writer's and the few-shot examples' form); options
    numbered from `start` (1 for retrieval candidates)."""
    numbered = (f"{i}. {option}" for i, option in enumerate(options, start))
    return "\n".join([question, *numbered, f"{ANSWER} {answer_text(answer)}"])


def parse_item(text: str, task_type: str, min_options: int, max_options: int) -> Item:
    """An item's question, options and answer, or Rejected with the first shared rule it breaks."""
    parts = text.split(ANSWER)
    if len(parts) != 2:
        raise Rejected("answer_marker", f"expected exactly one '{ANSWER}', found {len(parts) - 1}")
    body, raw_answer = parts[0], parts[1].strip()
    lines = [line.rstrip() for line in body.strip().splitlines() if line.strip()]
    first_option = next((i for i, line in enumerate(lines) if OPTION.match(line)), len(lines))
    question = "\n".join(line.strip() for line in lines[:first_option])
    if not question:
        raise Rejected("no_question", "no question before the options or the answer")
    options, numbers = [], []
    for line in lines[first_option:]:
        match = OPTION.match(line)
        if not match:
            raise Rejected("option_format", f"line {line.strip()!r} is not a numbered option")
        numbers.append(int(match.group(1)))
        options.append(match.group(2))
    if not raw_answer:
        raise Rejected("empty_answer", "nothing after 'Answer:'")
    if task_type in ("multiple-choice", "retrieval"):
        start = first_number(task_type)
        _check_options(options, numbers, min_options, max_options, start)
        return Item(question, options, _choice_answer(raw_answer, len(options), task_type, start))
    if options:
        raise Rejected("unexpected_options", f"{len(options)} numbered options in a {task_type} item")
    if task_type == "named_entity_recognition":
        return Item(question, [], _entity_answer(raw_answer))
    if "\n" in raw_answer:
        raise Rejected("answer_lines", "the answer runs over several lines")
    return Item(question, [], raw_answer)


def _check_options(options: list[str], numbers: list[int], least: int, most: int, start: int) -> None:
    if not options:
        raise Rejected("no_options", "no numbered options after the question")
    if numbers != list(range(start, start + len(numbers))):
        last = start + len(numbers) - 1
        raise Rejected("option_numbers", f"options are numbered {numbers}, expected {start} to {last}")
    if not least <= len(options) <= most:
        raise Rejected("option_count", f"{len(options)} options, expected {least} to {most}")
    if len({o.casefold() for o in options}) != len(options):
        raise Rejected("duplicate_options", "two options are the same")


def _choice_answer(raw: str, n_options: int, task_type: str, start: int) -> int | list[int]:
    raw = raw.rstrip(".")
    parts = [part.strip() for part in raw.split(",")] if task_type == "retrieval" else [raw]
    if not all(part.isdigit() for part in parts):
        raise Rejected("answer_not_number", f"answer {raw[:40]!r} is not {'numbers' if len(parts) > 1 else 'a number'}")
    numbers = [int(part) for part in parts]
    for number in numbers:
        if not start <= number < start + n_options:
            last = start + n_options - 1
            raise Rejected("answer_out_of_range", f"answer {number} is out of range {start} to {last}")
    if task_type == "multiple-choice":
        return numbers[0]
    if len(set(numbers)) != len(numbers) or len(numbers) > 3:
        raise Rejected("answer_numbers", f"answer {raw!r}: expected 1 to 3 distinct option numbers")
    return numbers


def _entity_answer(raw: str) -> list[str]:
    """A JSON list, a Python list (models often write one), or entries separated by semicolons or commas."""
    if raw.startswith("["):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                raise Rejected("answer_not_list", f"answer {raw[:60]!r} is not a list of strings") from None
    else:
        value = [part.strip() for part in re.split(";" if ";" in raw else ",", raw) if part.strip()]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise Rejected("answer_not_list", f"answer {raw[:60]!r} is not a list of strings")
    entities = [v.strip() for v in value]
    if len({e.casefold() for e in entities}) != len(entities):
        raise Rejected("duplicate_entities", "the answer lists an entry twice")
    return entities


def normalized(text: str) -> str:
    """Lower case, single spaces, no quotes or trailing stops: for comparing names and questions."""
    return " ".join(re.sub(r"[\"'“”‘’「」]", " ", text).casefold().split()).rstrip(".")


def names_product(question: str, product: Product) -> bool:
    """Does the question name the product: its title, or a quoted name sharing most of the title's words?"""
    if normalized(product.title) in normalized(question):
        return True
    title_words = set(normalized(product.title).split())
    for quoted in re.findall(r"['\"“‘「]([^'\"”’」]{3,})['\"”’」]", question):
        words = set(normalized(quoted).split())
        if words and len(words & title_words) >= 0.8 * max(len(words), len(title_words)):
            return True
    return False


ANSWER_FORMAT = {
    "multiple-choice": "the number of the correct option",
    "retrieval": "the numbers of the right options, separated by commas",
    "named_entity_recognition": 'a JSON list of strings, such as ["a", "b"]',
    "generation": "the answer, on one line",
}


def system_prompt(family: Family, settings: Settings, fewshot: list[dict]) -> str:
    """The family's instructions to the LLM: what it writes, the item format, the few-shot rows as items."""
    start = first_number(family.task_type)
    listed = family.task_type in ("multiple-choice", "retrieval")
    options = f"{start}. <option>\n{start + 1}. <option>\n...\n" if listed else ""
    text = (
        f"You write training data for an online shopping assistant: {family.description}. Write each item in "
        f"this form, and separate items by a blank line:\n<question>\n{options}{ANSWER} "
        f"<{ANSWER_FORMAT[family.task_type]}>\nWrite only the items, nothing before or after them."
    )
    if fewshot:
        text += "\n\nExamples:\n\n" + "\n\n".join(example(row) for row in fewshot)
    return text


def require_product(item: Item, job: Job) -> None:
    """The check of every family whose question names its product: Rejected when it names another."""
    if not names_product(item.question, job.product):
        raise Rejected("other_product", f"does not name the product {job.product.title!r}")


def require_language(text: str, locale: str, what: str) -> None:
    """Rejected when `text` reads as another language than the locale's (`what`: "the title reads")."""
    from shoptune import quality

    fits, found = quality.in_language(text, locale)
    if not fits:
        raise Rejected("wrong_language", f"{what} as {found}, not {LANGUAGE[locale]}")


class Family:
    """A ShopBench task family. Subclasses set the class attributes and write `prompt` (what the LLM
    is asked for one job); they may override `jobs` (for candidates or a target locale), `offline`
    (a reply written without an LLM, where the catalog alone suffices) and `check` (their own rules)."""

    name: str  # the key in params (synthesize.families) and the task name of its rows
    task: int  # the ShopBench task number it synthesizes data for
    description: str
    task_type: str
    metric: str
    track: str
    instruction: str  # the ECInstruct instruction of its training rows
    fewshot: tuple[dict, ...] = ()  # ShopBench rows (input_field, output_field) shown to the LLM
    needs_llm: bool = True
    multilingual: bool = False

    def jobs(self, products: list[Product], settings: Settings, seed: int) -> list[Job]:
        """One job per product (a family that needs candidates or a target locale picks them here)."""
        return [Job(self.name, product) for product in products]

    def prompt(self, job: Job, settings: Settings) -> str:
        raise NotImplementedError

    def offline_replies(self, jobs: list[Job], products: list[Product], settings: Settings, seed: int) -> dict:
        """{job id: reply} written from the catalog alone, for the jobs where it can be (none for a
        family that needs an LLM): the offline backend's replies, in the LLM's format."""
        return {}

    def check(self, item: Item, job: Job) -> None:
        """The family's own rules beyond the shared ones; raises Rejected."""

    def metric_for(self, job: Job) -> str:
        return self.metric


def example(row: dict) -> str:
    """A ShopBench row (input_field, output_field) as an item of a reply."""
    question = row["input_field"].rstrip()
    answer = answer_text(row["output_field"])
    return f"{question} {answer}" if question.endswith(ANSWER) else f"{question}\n{ANSWER} {answer}"
