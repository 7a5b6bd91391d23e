"""Task 18 (multilingual, beyond the recipe), cross-lingual description matching: which description, in
another locale's language, is of the product (multiple choice). The wrong options are descriptions of
other products of the target locale, chosen here. Offline: where the same product id is in the target
locale too, its description there is the right option; with an LLM, the LLM translates the product's
description into that option."""

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
    write_item,
)

QUESTION = "Which of the following {language} descriptions is of the product '{title}'?"


class CrossLingualMatching(Family):
    name = "cross_lingual_matching"
    task = 18
    description = "a product and its description in another locale's language, among other descriptions"
    task_type = "multiple-choice"
    metric = "accuracy"
    track = "amazon-kdd-cup-24-multi-lingual-abilities"
    instruction = "Choose the description of the product. Reply with the number of the correct option only."
    needs_llm = False  # offline for the products also sampled in another locale
    multilingual = True
    fewshot = (
        {
            "input_field": QUESTION.format(language="English", title="Edelstahl Trinkflasche 750 ml")
            + "\n0. A soft cotton t-shirt for everyday wear.\n1. A double-walled steel bottle that keeps drinks cold."
            "\n2. A quiet mouse with a wireless receiver.\nAnswer:",
            "output_field": 1,
        },
    )

    def jobs(self, products: list[Product], settings: Settings, seed: int) -> list[Job]:
        """`settings.items` jobs per product, each for a target locale (its own locales first: the same id
        sampled elsewhere) with options - 1 other descriptions of that locale and the answer's position."""
        by_locale: dict[str, list[Product]] = {}
        for product in products:
            if product.desc:
                by_locale.setdefault(product.locale, []).append(product)
        same_id: dict[str, dict[str, Product]] = {}
        for product in products:
            same_id.setdefault(product.id, {})[product.locale] = product
        jobs = []
        for product in products:
            rng = random.Random(f"{seed}:{self.name}:{product.locale}:{product.id}")
            own = sorted(loc for loc in same_id[product.id] if loc != product.locale and same_id[product.id][loc].desc)
            rest = [loc for loc in sorted(by_locale) if loc != product.locale and loc not in own]
            rng.shuffle(rest)
            targets = [
                loc
                for loc in own + rest
                if sum(1 for p in by_locale[loc] if p.id != product.id) >= settings.options - 1
            ][: settings.items]
            for number, target in enumerate(targets):
                others = [p.desc for p in by_locale[target] if p.id != product.id]
                wrong = rng.sample(others, settings.options - 1)
                answer = rng.randrange(settings.options)
                counterpart = same_id[product.id].get(target)
                context = {
                    "target": target,
                    "wrong": wrong,
                    "answer": answer,
                    "counterpart": counterpart.desc if counterpart else None,
                }
                jobs.append(Job(self.name, product, context, number))
        return jobs

    def options(self, job: Job, right: str) -> list[str]:
        wrong = list(job.context["wrong"])
        return [*wrong[: job.context["answer"]], right, *wrong[job.context["answer"] :]]

    def question(self, job: Job) -> str:
        return QUESTION.format(language=LANGUAGE[job.context["target"]], title=job.product.title)

    def prompt(self, job: Job, settings: Settings) -> str:
        language, k = LANGUAGE[job.context["target"]], job.context["answer"]
        options = self.options(job, f"<the product's description in {language}>")
        listed = "\n".join(f"{i}. {o}" for i, o in enumerate(options))
        description = job.product.desc or "(none: write one from the title and attributes)"
        return (
            f"{job.product.card()}\nDescription: {description}\n\nWrite one item: the question "
            f'"{self.question(job)}", then exactly these options, with option {k} replaced by the product\'s '
            f"description translated into {language} (one line):\n{listed}\nand the answer {k}."
        )

    def check(self, item: Item, job: Job) -> None:
        require_product(item, job)
        k = job.context["answer"]
        if item.answer != k:
            raise Rejected("wrong_answer", f"answer {item.answer}, but the product's description is option {k}")
        given = [normalized(o) for i, o in enumerate(self.options(job, "")) if i != k]
        if [normalized(o) for i, o in enumerate(item.options) if i != k] != given:
            raise Rejected("options_changed", "the other descriptions are not the ones given, in their order")
        require_language(item.options[k], job.context["target"], "the description reads")

    def offline_replies(self, jobs: list[Job], products: list[Product], settings: Settings, seed: int) -> dict:
        return {
            job.id: write_item(self.question(job), self.options(job, job.context["counterpart"]), job.context["answer"])
            for job in jobs
            if job.context["counterpart"]
        }
