"""Task 7, review aspect retrieval: which aspects of a product a customer review talks about (retrieval,
hit rate at 3)."""

from __future__ import annotations

from shoptune.families.family import Family, Job, Settings

QUESTION = "Which of the following aspects does the review mention? Answer with their numbers, separated by commas."


class ReviewAspectRetrieval(Family):
    name = "review_aspect_retrieval"
    task = 7
    description = "customer reviews and the product aspects they mention"
    task_type = "retrieval"
    metric = "hit rate@3"
    track = "amazon-kdd-cup-24-user-behavior-alignment"
    instruction = "Select the product aspects that the customer review mentions. Reply with the option numbers."
    fewshot = (
        {
            "input_field": "A customer wrote this review: 'The kettle boils fast but the lid feels flimsy.'"
            f"\n{QUESTION}"
            "\n1. Heating speed\n2. Price\n3. Build quality of the lid\n4. Color",
            "output_field": [1, 3],
        },
    )

    def prompt(self, job: Job, settings: Settings) -> str:
        return (
            f"{job.product.card()}\n\nWrite {settings.items} items, each a short customer review of this product "
            "in the product's language: \"A customer wrote this review: '<review>'\", on the next line "
            f'"{QUESTION}", then {settings.options} aspects of the product numbered from 1, 1 to 3 of them mentioned '
            "by the review, and as the answer the numbers of those mentioned, separated by commas."
        )
