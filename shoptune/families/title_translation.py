"""Task 17 (multilingual, beyond the recipe), a title for a target locale: the product's title written
for another of the catalog's locales (generation; BLEU, Japanese tokenization for a Japanese target)."""

from __future__ import annotations

import random

from shoptune.catalog import Product
from shoptune.families.family import (
    LANGUAGE,
    Family,
    Item,
    Job,
    Rejected,
    Settings,
    normalized,
    require_language,
    require_product,
)

QUESTION = "Write the title of the product '{title}' for the {language} store."


class TitleTranslation(Family):
    name = "title_translation"
    task = 17
    description = "product titles written for the store of another locale (language)"
    task_type = "generation"
    metric = "bleu"
    track = "amazon-kdd-cup-24-multi-lingual-abilities"
    instruction = "Write the product title for the store of the language asked for."
    multilingual = True
    fewshot = (
        {
            "input_field": QUESTION.format(title="Stainless Steel Insulated Water Bottle 750ml", language="German"),
            "output_field": "Isolierte Trinkflasche aus Edelstahl 750 ml",
        },
        {
            "input_field": QUESTION.format(title="Poêle antiadhésive 28 cm induction", language="Japanese"),
            "output_field": "IH対応 焦げ付かない フライパン 28cm",
        },
    )

    def jobs(self, products: list[Product], settings: Settings, seed: int) -> list[Job]:
        """`settings.items` target locales per product (at most five), seeded."""
        jobs = []
        for product in products:
            rng = random.Random(f"{seed}:{self.name}:{product.locale}:{product.id}")
            targets = rng.sample([loc for loc in LANGUAGE if loc != product.locale], min(settings.items, 5))
            jobs += [Job(self.name, product, {"target": t}, number) for number, t in enumerate(targets)]
        return jobs

    def metric_for(self, job: Job) -> str:
        return "jp-bleu" if job.context["target"] == "JP" else "bleu"

    def prompt(self, job: Job, settings: Settings) -> str:
        language = LANGUAGE[job.context["target"]]
        question = QUESTION.format(title=job.product.title, language=language)
        return (
            f'{job.product.card()}\n\nWrite one item: the question "{question}" and as the answer the title, '
            f"in {language}, as the {language} store would list this product (one line)."
        )

    def check(self, item: Item, job: Job) -> None:
        require_product(item, job)
        if normalized(str(item.answer)) == normalized(job.product.title):
            raise Rejected("not_translated", "the answer is the title itself")
        require_language(str(item.answer), job.context["target"], "the title reads")
