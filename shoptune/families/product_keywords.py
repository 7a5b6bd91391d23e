"""Task 16 (multilingual, beyond the recipe), keyword sets: the search keywords for a product, in its
locale's language (entity list, micro F1)."""

from __future__ import annotations

from shoptune.families.family import LANGUAGE, Family, Item, Job, Settings, require_language, require_product

QUESTION = "Give {language} search keywords for the product '{title}'. Answer with a Python list of strings."


class ProductKeywords(Family):
    name = "product_keywords"
    task = 16
    description = "search keyword sets for a product, in its locale's language"
    task_type = "named_entity_recognition"
    metric = "micro f1"
    track = "amazon-kdd-cup-24-multi-lingual-abilities"
    instruction = (
        "Give search keywords for the product in the language asked for. Answer with a Python list of strings."
    )
    multilingual = True
    fewshot = (
        {
            "input_field": QUESTION.format(language="German", title="Edelstahl Trinkflasche 750 ml auslaufsicher"),
            "output_field": ["trinkflasche", "edelstahl", "auslaufsicher", "750 ml"],
        },
        {
            "input_field": QUESTION.format(language="French", title="Poêle antiadhésive 28 cm induction"),
            "output_field": ["poêle", "antiadhésive", "induction", "28 cm"],
        },
    )

    def prompt(self, job: Job, settings: Settings) -> str:
        language = LANGUAGE[job.product.locale]
        question = QUESTION.format(language=language, title=job.product.title)
        return (
            f'{job.product.card()}\n\nWrite {settings.items} item(s): the question "{question}" and as the '
            f"answer 3 to 8 search keywords in {language} that a shopper would type to find this product."
        )

    def check(self, item: Item, job: Job) -> None:
        require_product(item, job)
        require_language(" ".join(item.answer), job.product.locale, "the keywords read")
