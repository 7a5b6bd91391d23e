"""Task 1, category explanation: what a product category is, in a sentence (generation, scored by the
cosine similarity of sentence embeddings)."""

from __future__ import annotations

from shoptune.families.family import Family, Item, Job, Rejected, Settings


class CategoryExplanation(Family):
    name = "category_explanation"
    task = 1
    description = "explanations of the product categories a product belongs to"
    task_type = "generation"
    metric = "sent-transformer"
    track = "amazon-kdd-cup-24-understanding-shopping-concepts"
    instruction = "Explain the online shopping product category in one sentence."
    fewshot = (
        {
            "input_field": "What is the product category 'French press'? Explain it in one sentence.",
            "output_field": "A French press is a coffee maker that steeps ground coffee in hot water and separates "
            "the grounds with a plunger and a mesh filter.",
        },
        {
            "input_field": "What is the product category 'trail running shoes'? Explain it in one sentence.",
            "output_field": "Trail running shoes are running shoes with a grippy, protective sole for running on "
            "unpaved paths and rough ground.",
        },
    )

    def prompt(self, job: Job, settings: Settings) -> str:
        return (
            f"{job.product.card()}\n\nName {settings.items} product categories this product belongs to, from "
            'broad to specific, in English, and for each write the question "What is the product category '
            "'<category>'? Explain it in one sentence.\" and its answer: one sentence that explains the category, "
            "not this product."
        )

    def check(self, item: Item, job: Job) -> None:
        n = len(str(item.answer).split())
        if not 5 <= n <= 60:
            raise Rejected("answer_length", f"the explanation has {n} words, expected 5 to 60")
