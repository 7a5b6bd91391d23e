"""ECInstruct rows (the EcomGPT/eCeLLM instruction format) and the Alpaca training prompt."""

from __future__ import annotations

from pathlib import Path

from shoptune import UserError
from shoptune.artifacts import read_jsonl
from shoptune.families.family import answer_text

FIELDS = ("split", "task", "setting", "instruction", "input", "options", "output", "few_shot_example")

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
ALPACA_TEMPLATE = (
    ALPACA_PREAMBLE
    + """

### Instruction:
{instruction}

### Input:
{input}

### Options:
{options}

### Response:
{output}"""
)


def options_text(options) -> str:
    if isinstance(options, list):
        return "\n".join(str(o) for o in options)
    return "" if options is None else str(options)


def alpaca_prompt(row: dict, eos_token: str) -> str:
    """The training text: the Alpaca template with the response and EOS appended."""
    return (
        ALPACA_TEMPLATE.format(
            instruction=row["instruction"],
            input=row["input"],
            options=options_text(row["options"]),
            output=row["output"],
        )
        + eos_token
    )


def from_item(item: dict, setting: str) -> dict:
    """An accepted synthetic item (clean's accepted.jsonl) as an ECInstruct row of its family's task."""
    return {
        "split": "",
        "task": item["family"],
        "setting": setting,
        "instruction": item["instruction"],
        "input": item["question"],
        "options": [f"{i}. {option}" for i, option in enumerate(item["options"])] if item["options"] else "",
        "output": answer_text(item["output_field"]),
        "few_shot_example": "",
    }


def from_shopbench(row: dict) -> dict:
    """A ShopBench question with its truth as an ECInstruct row (the prompt holds the options)."""
    truth = row["output_field"]
    if isinstance(truth, list):
        truth = ", ".join(str(x) for x in truth)
    return {
        "split": "",
        "task": str(row.get("task_name", "shopbench")),
        "setting": "ShopBench",
        "instruction": row["input_field"],
        "input": "",
        "options": "",
        "output": str(truth),
        "few_shot_example": "",
    }


def read_rows(path: str | Path) -> list[dict]:
    """ECInstruct or ShopBench rows from a JSON-lines file, as ECInstruct rows."""
    rows = []
    for number, row in enumerate(read_jsonl(path), 1):
        if "input_field" in row and "output_field" in row:
            rows.append(from_shopbench(row))
        elif all(k in row for k in ("instruction", "input", "output")):
            rows.append({k: row.get(k, "") for k in FIELDS} | {"output": str(row["output"])})
        else:
            raise UserError(
                f"{path}: row {number}: neither ECInstruct (instruction, input, output) "
                "nor ShopBench (input_field, output_field)"
            )
    return rows
