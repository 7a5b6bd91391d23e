"""Task 5, product attribute choice (the recipe's family): which value of an attribute the product has.

    The product '<full title>' appears on an e-commerce website. <question about one attribute>
    0. <value>  1. <value>  2. <value>
    Answer: <number>

Offline: questions about the product's own attributes, wrong options drawn from other products'
values of the same attribute, the same locale first.
"""

from __future__ import annotations

import random

from shoptune.catalog import Product
from shoptune.families.family import Family, Item, Job, Rejected, Settings, require_product, write_item

OPENING = "The product '{title}' appears on an e-commerce website."
QUESTION_BY_ATTRIBUTE = {
    "brand": "Which brand makes this product?",
    "color": "What is the color of this product?",
    "size": "What size is this product?",
    "model": "What is the model of this product?",
    "material": "What material is this product made of?",
    "author": "Who is the author of this product?",
}


class ProductAttributeChoice(Family):
    name = "product_attribute_choice"
    task = 5
    description = "multiple-choice questions about a product's attributes (brand, color, size, material ...)"
    task_type = "multiple-choice"
    metric = "accuracy"
    track = "amazon-kdd-cup-24-understanding-shopping-concepts"
    instruction = (
        "Answer the multiple-choice question about an online shopping product. "
        "Reply with the number of the correct option only."
    )
    needs_llm = False
    fewshot = (
        {
            "input_field": "The product 'Ceramic Coffee Mug 350 ml, Matte Finish' appears on an e-commerce website. "
            "What is the capacity of this mug?\n0. 250 ml\n1. 350 ml\n2. 500 ml\nAnswer:",
            "output_field": 1,
        },
        {
            "input_field": "The product 'Laufschuhe Herren leicht, Größe 43' appears on an e-commerce website. "
            "Which size is this product?\n0. 41\n1. 42\n2. 43\nAnswer:",
            "output_field": 2,
        },
    )

    def prompt(self, job: Job, settings: Settings) -> str:
        return (
            f"{job.product.card()}\n\nWrite {settings.items} questions about this product's attributes, each with "
            f"{settings.options} options of which exactly one is correct. Begin each question with "
            f'"{OPENING.format(title=job.product.title)}" and write the options in the product\'s language.'
        )

    def check(self, item: Item, job: Job) -> None:
        if not item.question.startswith("The product"):
            raise Rejected("no_product_opening", "does not start with 'The product'")
        require_product(item, job)

    def offline_replies(self, jobs: list[Job], products: list[Product], settings: Settings, seed: int) -> dict:
        values: dict[tuple[str, str], list[str]] = {}  # (attribute, locale) -> distinct values
        for product in products:
            for name, value in product.attributes.items():
                known = values.setdefault((name, product.locale), [])
                if value not in known:
                    known.append(value)
        replies = {job.id: self._write(job.product, values, settings, seed) for job in jobs}
        return {job_id: reply for job_id, reply in replies.items() if reply}  # none: no attribute to ask about

    def _write(self, product: Product, values: dict, settings: Settings, seed: int) -> str:
        rng = random.Random(f"{seed}:{product.locale}:{product.id}")
        items, wrong = [], settings.options - 1
        for name, value in product.attributes.items():
            # wrong options from the same locale first, then from the others
            local = [v for v in values[(name, product.locale)] if v.casefold() != value.casefold()]
            foreign = [
                v
                for (a, loc), vs in values.items()
                if a == name and loc != product.locale
                for v in vs
                if v.casefold() != value.casefold() and v not in local
            ]
            picked = rng.sample(local, min(wrong, len(local)))
            if len(picked) < wrong:
                if len(foreign) < wrong - len(picked):
                    continue
                picked += rng.sample(foreign, wrong - len(picked))
            options = [*picked, value]
            rng.shuffle(options)
            question = f"{OPENING.format(title=product.title)} {QUESTION_BY_ATTRIBUTE[name]}"
            items.append(write_item(question, options, options.index(value)))
            if len(items) == settings.items:
                break
        return "\n\n".join(items)
