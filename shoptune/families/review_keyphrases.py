"""Task 6, review keyphrase extraction: the phrases of a customer review that carry its opinion (entity
list, micro F1); every keyphrase must occur in the review."""

from __future__ import annotations

from shoptune.families.family import Family, Item, Job, Rejected, Settings, normalized

QUESTION = "Extract the keyphrases from this customer review: '{review}'. Answer with a Python list of strings."


class ReviewKeyphrases(Family):
    name = "review_keyphrases"
    task = 6
    description = "customer reviews and the keyphrases in them"
    task_type = "named_entity_recognition"
    metric = "micro f1"
    track = "amazon-kdd-cup-24-user-behavior-alignment"
    instruction = "Extract the keyphrases from the customer review. Answer with a list of phrases from the review."
    fewshot = (
        {
            "input_field": QUESTION.format(review="Great sound for the price, but the battery dies after two hours."),
            "output_field": ["great sound", "battery dies after two hours"],
        },
    )

    def prompt(self, job: Job, settings: Settings) -> str:
        return (
            f"{job.product.card()}\n\nWrite {settings.items} short customer reviews of this product, in the "
            f'product\'s language. For each write the question "{QUESTION}" with the review in place of {{review}}, '
            "and as the answer 2 to 5 keyphrases copied word for word from the review."
        )

    def check(self, item: Item, job: Job) -> None:
        review = normalized(item.question)
        missing = [k for k in item.answer if normalized(k) not in review]
        if missing:
            raise Rejected("keyphrase_not_in_review", f"{missing[0]!r} is not in the review")
