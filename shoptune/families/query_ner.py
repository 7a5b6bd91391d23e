"""Task 4, query named-entity recognition: the attribute values a shopping query mentions (entity list,
micro F1). Offline: queries made of the product's own attribute values and its title's first words."""

from __future__ import annotations

import itertools
import random

from shoptune.catalog import Product
from shoptune.families.family import Family, Item, Job, Rejected, Settings, normalized, write_item

QUESTION = (
    "Extract the product attributes (brand, color, size, model, material, author) mentioned in the search query "
    "'{query}'. Answer with a Python list of strings."
)


def query_of(question: str) -> str:
    start, end = question.find("'"), question.rfind("'")
    return question[start + 1 : end] if 0 <= start < end else question


class QueryNer(Family):
    name = "query_ner"
    task = 4
    description = "shopping search queries and the product attributes they mention"
    task_type = "named_entity_recognition"
    metric = "micro f1"
    track = "amazon-kdd-cup-24-understanding-shopping-concepts"
    instruction = (
        "Extract the product attributes mentioned in the shopping query. Answer with a Python list of strings."
    )
    needs_llm = False
    fewshot = (
        {
            "input_field": QUESTION.format(query="nike air zoom pegasus black 44"),
            "output_field": ["nike", "black", "44"],
        },
        {"input_field": QUESTION.format(query="tefal bratpfanne 28 cm induktion"), "output_field": ["tefal", "28 cm"]},
    )

    def prompt(self, job: Job, settings: Settings) -> str:
        return (
            f"{job.product.card()}\n\nWrite {settings.items} search queries, in the product's language, that a "
            "shopper looking for this product might type, each mentioning some of its attribute values. For each "
            f'write the question "{QUESTION}" with the query in place of {{query}}, and as the answer the attribute '
            "values the query mentions, exactly as written in the query."
        )

    def check(self, item: Item, job: Job) -> None:
        query = normalized(query_of(item.question))
        missing = [e for e in item.answer if normalized(e) not in query]
        if missing:
            raise Rejected("entity_not_in_query", f"{missing[0]!r} is not in the query")
        known = [normalized(v) for v in job.product.attributes.values()] + normalized(job.product.title).split()
        if not any(normalized(e) in known or any(normalized(e) in k for k in known) for e in item.answer):
            raise Rejected("other_product", "no entity is one of the product's attribute values or title words")

    def offline_replies(self, jobs: list[Job], products: list[Product], settings: Settings, seed: int) -> dict:
        replies = {job.id: self._write(job.product, settings, seed) for job in jobs}
        return {job_id: reply for job_id, reply in replies.items() if reply}  # none: no attribute to ask about

    def _write(self, product: Product, settings: Settings, seed: int) -> str:
        rng = random.Random(f"{seed}:{self.name}:{product.locale}:{product.id}")
        values = [v for k, v in product.attributes.items() if k != "author" and len(v) <= 30]
        head = " ".join(product.title.split()[:2])
        pairs = [c for size in (2, 1) for c in itertools.combinations(values, size)]
        items = []
        for chosen in pairs[: settings.items]:
            words = [head, *chosen]
            rng.shuffle(words)
            query = " ".join(words).casefold()
            entities = [v.casefold() for v in chosen]
            items.append(write_item(QUESTION.format(query=query), [], entities))
        return "\n\n".join(items)
