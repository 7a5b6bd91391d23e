"""clean: raw replies -> accepted items in ShopBench form, and every reject with its reason.

Each reply is split into items at blank lines; an item is accepted when it passes
  1. its family's format (shoptune/families/family.py: exactly one "Answer:", options numbered
     0, 1, 2 ... between min_options and max_options and distinct, an answer of the family's type:
     an option number, option numbers, a list of strings, one line of text),
  2. its family's own checks (it names the product it was written for, keeps the options it was
     given, keyphrases and entities occur in its text, the locale's language ...),
  3. the quality filters: it is not a copy of a few-shot example (share of its word n-grams found in
     them above max_fewshot_overlap), it does not overlap a question the profile is evaluated on
     (evaluate.questions: above max_eval_overlap: decontamination), and its question
     is not one already accepted in its family.
The recipe's rules for its attribute task (items start with "The product", split into two on
"Answer: ", numbered options, a number as the answer) are rule 1 and the attribute family's checks.
"""

from __future__ import annotations

import logging
from collections import Counter

from shoptune import UserError, params
from shoptune.artifacts import read_jsonl, write_json, write_jsonl
from shoptune.catalog import Product
from shoptune.families import FAMILIES
from shoptune.families.family import Job, Rejected, normalized, parse_item, split_items
from shoptune.profile import CleanParams, SynthesizeParams
from shoptune.quality import Overlap, evaluation_questions
from shoptune.workspace import entrypoint, stage_dir

log = logging.getLogger("clean")


def job_of(reply: dict, number: int) -> Job:
    """The job a reply answered, rebuilt from the reply's row."""
    if reply.get("family") not in FAMILIES:
        raise UserError(f"generations.jsonl: row {number}: unknown family {reply.get('family')!r}")
    product = Product(reply["product_id"], reply["locale"], reply["title"], "", reply.get("attributes", {}), "")
    return Job(reply["family"], product, reply.get("context", {}))


def fewshot_texts(profile: str) -> list[str]:
    """Every few-shot example the LLM may have seen: the families' own and the few-shot file's."""
    path = params.load(profile, "synthesize", SynthesizeParams).fewshot
    return [row["input_field"] for f in FAMILIES.values() for row in f.fewshot] + [
        row["input_field"] for row in read_jsonl(path) if "input_field" in row
    ]


def clean(profile: str) -> None:
    p = params.load(profile, "clean", CleanParams)
    replies = read_jsonl(stage_dir(profile, "synthesize") / "generations.jsonl")
    copies = Overlap(fewshot_texts(profile), p.ngram)
    contamination = Overlap(evaluation_questions(profile), p.ngram)
    accepted, rejects, seen = [], [], set()
    items_total = 0
    for number, reply in enumerate(replies, 1):
        job = job_of(reply, number)
        family = FAMILIES[job.family]
        for index, text in enumerate(split_items(reply["reply"])):
            items_total += 1
            where = {"family": family.name, "product_id": job.product.id, "locale": job.product.locale, "item": index}
            try:
                item = parse_item(text, family.task_type, p.min_options, p.max_options)
                family.check(item, job)
                shown = item.input_field(family.task_type)
                if copies.share(shown) > p.max_fewshot_overlap:
                    raise Rejected(
                        "fewshot_copy", f"{copies.share(shown):.0%} of its {p.ngram}-grams are in the few-shot examples"
                    )
                if contamination.share(shown) > p.max_eval_overlap:
                    raise Rejected(
                        "eval_overlap",
                        f"{contamination.share(shown):.0%} of its {p.ngram}-grams are in evaluation questions",
                    )
                key = (family.name, normalized(item.question))
                if key in seen:
                    raise Rejected("duplicate_question", "repeats a question already accepted")
                seen.add(key)
            except Rejected as reject:
                rejects.append({**where, "code": reject.code, "reason": str(reject), "text": text})
                continue
            accepted.append(
                {
                    **where,
                    "task_name": family.name,
                    "task_type": family.task_type,
                    "metric": family.metric_for(job),
                    "track": family.track,
                    "input_field": shown,
                    "output_field": item.answer,
                    "is_multiple_choice": family.task_type == "multiple-choice",
                    "instruction": family.instruction,
                    "question": item.question,
                    "options": item.options,
                }
            )

    folder = stage_dir(profile, "clean")
    write_jsonl(folder / "accepted.jsonl", accepted)
    write_jsonl(folder / "rejects.jsonl", rejects)
    counts = {
        "replies": len(replies),
        "empty_replies": sum(1 for r in replies if not r["reply"].strip()),
        "items": items_total,
        "accepted": len(accepted),
        "rejected": len(rejects),
        "accepted_by_family": dict(sorted(Counter(a["family"] for a in accepted).items())),
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
