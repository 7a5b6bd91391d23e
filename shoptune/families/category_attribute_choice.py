"""Task 2, category-attribute choice: which attribute matters for a product category (multiple choice)."""

from __future__ import annotations

from shoptune.families.family import Family, Job, Settings


class CategoryAttributeChoice(Family):
    name = "category_attribute_choice"
    task = 2
    description = "multiple-choice questions on which attributes matter for a product category"
    task_type = "multiple-choice"
    metric = "accuracy"
    track = "amazon-kdd-cup-24-understanding-shopping-concepts"
    instruction = (
        "Answer the multiple-choice question about a product category. "
        "Reply with the number of the correct option only."
    )
    fewshot = (
        {
            "input_field": "Which of the following attributes is the most important when choosing a sleeping bag?"
            "\n0. Comfort temperature rating\n1. Screen resolution\n2. Caffeine content\nAnswer:",
            "output_field": 0,
        },
        {
            "input_field": "Which of the following is an attribute of the product category 'running shoes'?"
            "\n0. Page count\n1. Heel-to-toe drop\n2. Wattage\nAnswer:",
            "output_field": 1,
        },
    )

    def prompt(self, job: Job, settings: Settings) -> str:
        return (
            f"{job.product.card()}\n\nThink of the product category this product belongs to. Write "
            f"{settings.items} questions in English on which attributes matter for that category (name the category "
            f"in each question, not the product), each with {settings.options} options of which exactly one is correct."
        )
