"""clean: raw generations -> accepted multiple-choice items, and every reject with its reason.

Rules (the recipe's, made strict): a reply is split into items (at blank lines and at
each line opening with "The product"); an item must
  1. start with "The product",
  2. split into exactly two parts on "Answer: ",
  3. have options numbered 0, 1, 2, ... (between min_options and max_options, distinct),
  4. have an answer that is a number, and
  5. in range of the options;
and it must not repeat an item already accepted.
"""

from __future__ import annotations

import logging
import re
from collections import Counter

from shoptune import params
from shoptune.artifacts import read_jsonl, write_json, write_jsonl
from shoptune.profile import CleanParams
from shoptune.workspace import entrypoint, stage_dir

log = logging.getLogger("clean")

OPTION = re.compile(r"^\s*(\d+)[.)]\s+(\S.*?)\s*$")
ITEM_START = re.compile(r"\n\s*\n|\n(?=The product)")


class Rejected(Exception):
    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code = code


def split_items(reply: str) -> list[str]:
    return [item.strip() for item in ITEM_START.split(reply.strip()) if item.strip()]


def parse_item(text: str, p: CleanParams) -> dict:
    """The item's question, options and answer, or Rejected with the first rule it breaks."""
    if not text.startswith("The product"):
        raise Rejected("no_product_opening", "does not start with 'The product'")
    parts = text.split("Answer: ")
    if len(parts) != 2:
        raise Rejected("answer_marker", f"expected exactly one 'Answer: ', found {len(parts) - 1}")
    body, answer = parts
    lines = [line for line in body.strip().splitlines() if line.strip()]
    first_option = next((i for i, line in enumerate(lines) if OPTION.match(line)), None)
    if first_option is None or first_option == 0:
        raise Rejected("no_options", "no numbered options after the question")
    question = " ".join(line.strip() for line in lines[:first_option])
    options, numbers = [], []
    for line in lines[first_option:]:
        match = OPTION.match(line)
        if not match:
            raise Rejected("option_format", f"line {line.strip()!r} is not a numbered option")
        numbers.append(int(match.group(1)))
        options.append(match.group(2))
    if numbers != list(range(len(numbers))):
        raise Rejected("option_numbers", f"options are numbered {numbers}, expected 0 to {len(numbers) - 1}")
    if not p.min_options <= len(options) <= p.max_options:
        raise Rejected("option_count", f"{len(options)} options, expected {p.min_options} to {p.max_options}")
    if len({o.casefold() for o in options}) != len(options):
        raise Rejected("duplicate_options", "two options are the same")
    answer = answer.strip().rstrip(".")
    if not answer.isdigit():
        raise Rejected("answer_not_number", f"answer {answer[:40]!r} is not a number")
    if int(answer) >= len(options):
        raise Rejected("answer_out_of_range", f"answer {int(answer)} is out of range 0 to {len(options) - 1}")
    return {"question": question, "options": options, "answer": int(answer)}


def clean(profile: str) -> None:
    p = params.load(profile, "clean", CleanParams)
    replies = read_jsonl(stage_dir(profile, "synthesize") / "generations.jsonl")
    accepted, rejects, seen = [], [], set()
    items_total = 0
    for reply in replies:
        for index, text in enumerate(split_items(reply["reply"])):
            items_total += 1
            where = {"product_id": reply["product_id"], "locale": reply["locale"], "item": index}
            try:
                item = parse_item(text, p)
                key = (item["question"].casefold(), tuple(o.casefold() for o in item["options"]))
                if key in seen:
                    raise Rejected("duplicate_item", "repeats an item already accepted")
                seen.add(key)
                accepted.append({**where, **item})
            except Rejected as reject:
                rejects.append({**where, "code": reject.code, "reason": str(reject), "text": text})

    folder = stage_dir(profile, "clean")
    write_jsonl(folder / "accepted.jsonl", accepted)
    write_jsonl(folder / "rejects.jsonl", rejects)
    counts = {
        "replies": len(replies),
        "empty_replies": sum(1 for r in replies if not r["reply"].strip()),
        "items": items_total,
        "accepted": len(accepted),
        "rejected": len(rejects),
        "reject_reasons": dict(sorted(Counter(r["code"] for r in rejects).items())),
    }
    write_json(folder / "counts.json", counts)
    log.info(
        "%d items: %d accepted, %d rejected %s",
        items_total,
        len(accepted),
        len(rejects),
        counts["reject_reasons"] or "",
    )


if __name__ == "__main__":
    entrypoint(clean)
