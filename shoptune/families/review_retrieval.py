"""Task 3, review-based retrieval: which of several products a customer review is about (retrieval,
hit rate at 3). The candidates are chosen here (the product and other products of its locale), so the
item's options are known before the LLM writes the review; the LLM's options must be them, in order."""

from __future__ import annotations

import random

from shoptune.catalog import Product
from shoptune.families.family import Family, Item, Job, Rejected, Settings, normalized


def candidate_jobs(family: Family, products: list[Product], settings: Settings, seed: int, text) -> list[Job]:
    """`settings.items` jobs per product, each with the product and options - 1 others of its locale
    (`text(product)` is what an option shows) in a seeded order; products of a locale with too few
    others get none."""
    by_locale: dict[str, list[Product]] = {}
    for product in products:
        by_locale.setdefault(product.locale, []).append(product)
    jobs = []
    for product in products:
        others = [p for p in by_locale[product.locale] if p.id != product.id and text(p) and text(p) != text(product)]
        if len(others) < settings.options - 1 or not text(product):
            continue
        for number in range(settings.items):
            rng = random.Random(f"{seed}:{family.name}:{product.locale}:{product.id}:{number}")
            options = [*(text(p) for p in rng.sample(others, settings.options - 1)), text(product)]
            rng.shuffle(options)
            context = {"options": options, "answer": options.index(text(product))}
            jobs.append(Job(family.name, product, context, number))
    return jobs


def check_given_options(item: Item, job: Job) -> None:
    if [normalized(o) for o in item.options] != [normalized(o) for o in job.context["options"]]:
        raise Rejected("options_changed", "the options are not the ones given, in their order")
    answer = item.answer if isinstance(item.answer, list) else [item.answer]
    if answer != [job.context["answer"] + 1]:  # candidates are numbered from 1
        raise Rejected("wrong_answer", f"answer {item.answer}, but the product is option {job.context['answer'] + 1}")


QUESTION = "Which of the following products is the review most likely about? Answer with the option's number."


class ReviewRetrieval(Family):
    name = "review_retrieval"
    task = 3
    description = "customer reviews and the product they are about, among similar products"
    task_type = "retrieval"
    metric = "hit rate@3"
    track = "amazon-kdd-cup-24-user-behavior-alignment"
    instruction = "Given a customer review, select the product the review is about. Reply with the option number."
    fewshot = (
        {
            "input_field": "A customer wrote this review: 'Keeps my tea hot all morning and fits the car cup holder.'"
            f"\n{QUESTION}"
            "\n1. Bamboo Cutting Board Set of 3\n2. Vacuum Insulated Travel Mug 450 ml\n3. USB-C Charging Cable 2 m",
            "output_field": [2],
        },
    )

    def jobs(self, products: list[Product], settings: Settings, seed: int) -> list[Job]:
        return candidate_jobs(self, products, settings, seed, lambda p: p.title)

    def prompt(self, job: Job, settings: Settings) -> str:
        options = "\n".join(f"{i}. {o}" for i, o in enumerate(job.context["options"], 1))
        return (
            f"{job.product.card()}\n\nWrite a short customer review of this product, in the product's language, "
            "that does not quote its title. Then write one item: \"A customer wrote this review: '<review>'\", on "
            f'the next line "{QUESTION}", then exactly these options:\n{options}\nand the answer '
            f"{job.context['answer'] + 1}."
        )

    def check(self, item: Item, job: Job) -> None:
        check_given_options(item, job)
