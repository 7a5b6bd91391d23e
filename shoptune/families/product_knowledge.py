"""Task 8, product knowledge reasoning: what a product is used for, needs or goes with (multiple choice)."""

from __future__ import annotations

from shoptune.families.family import Family, Item, Job, Settings, require_product

OPENING = "The product '{title}' appears on an e-commerce website."


class ProductKnowledge(Family):
    name = "product_knowledge"
    task = 8
    description = "multiple-choice questions that need knowledge about a product: its use, needs, compatibility"
    task_type = "multiple-choice"
    metric = "accuracy"
    track = "amazon-kdd-cup-24-shopping-knowledge-reasoning"
    instruction = (
        "Answer the multiple-choice question about an online shopping product. "
        "Reply with the number of the correct option only."
    )
    fewshot = (
        {
            "input_field": "The product 'Ceramic Coffee Mug 350 ml, Matte Finish' appears on an e-commerce website. "
            "Which of the following can this product be used for?\n0. Drinking tea\n1. Grilling\n2. Charging a "
            "phone\nAnswer:",
            "output_field": 0,
        },
    )

    def prompt(self, job: Job, settings: Settings) -> str:
        return (
            f"{job.product.card()}\n\nWrite {settings.items} questions that need knowledge about this product (what "
            "it is used for, what it needs, what it goes with), each with "
            f"{settings.options} options of which exactly one is correct. Begin each question with "
            f'"{OPENING.format(title=job.product.title)}"'
        )

    def check(self, item: Item, job: Job) -> None:
        require_product(item, job)
