"""Task 11, query relation choice: how a product relates to a shopping query (exact, substitute,
complement, irrelevant: the ESCI labels), as multiple choice with fixed options."""

from __future__ import annotations

from shoptune.families.family import Family, Item, Job, Rejected, Settings, normalized, require_product

RELATIONS = (
    "It is exactly what the query asks for",
    "It can substitute for what the query asks for",
    "It complements what the query asks for",
    "It is irrelevant to the query",
)
QUESTION = (
    "A user searched for '{query}' and was shown the product '{title}'. How does the product relate to the query?"
)


class QueryRelationChoice(Family):
    name = "query_relation_choice"
    task = 11
    description = "shopping queries and how a product relates to them (exact, substitute, complement, irrelevant)"
    task_type = "multiple-choice"
    metric = "accuracy"
    track = "amazon-kdd-cup-24-understanding-shopping-concepts"
    instruction = "Choose how the product relates to the shopping query. Reply with the number of the option only."
    fewshot = (
        {
            "input_field": QUESTION.format(query="espresso machine", title="Stainless Steel Milk Frothing Jug 600 ml")
            + "\n"
            + "\n".join(f"{i}. {r}" for i, r in enumerate(RELATIONS))
            + "\nAnswer:",
            "output_field": 2,
        },
    )

    def prompt(self, job: Job, settings: Settings) -> str:
        options = "\n".join(f"{i}. {r}" for i, r in enumerate(RELATIONS))
        return (
            f"{job.product.card()}\n\nWrite {settings.items} shopping queries, in the product's language, for which "
            "this product is an exact match, a substitute, a complement or irrelevant (vary them). For each write "
            f'the question "{QUESTION.format(query="<query>", title=job.product.title)}", exactly these options:'
            f"\n{options}\nand the number of the right one as the answer."
        )

    def check(self, item: Item, job: Job) -> None:
        if [normalized(o) for o in item.options] != [normalized(r) for r in RELATIONS]:
            raise Rejected("options_changed", "the options are not the four relations, in their order")
        require_product(item, job)
