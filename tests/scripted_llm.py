"""A scripted LLM for the task families: the reply a capable model would write to a family's request,
built from the request alone (the system prompt names the family, the user prompt holds the product
card, the question to use and the options given). Tests serve it over HTTP and break it on purpose."""

from __future__ import annotations

import re

from shoptune.families import FAMILIES
from shoptune.families.family import write_item
from shoptune.families.query_ner import QUESTION as NER_QUESTION
from shoptune.families.query_relation_choice import RELATIONS
from shoptune.families.review_aspect_retrieval import QUESTION as ASPECT_QUESTION
from shoptune.families.review_keyphrases import QUESTION as KEYPHRASE_QUESTION
from shoptune.families.review_retrieval import QUESTION as RETRIEVAL_QUESTION

# a sentence per language, for answers that must be in a target locale's language
SENTENCE = {
    "German": "Eine praktische Flasche aus Edelstahl für jeden Tag, die das Wasser lange kalt hält.",
    "French": "Une bouteille pratique en acier pour tous les jours, qui garde l'eau froide longtemps.",
    "Spanish": "Una botella práctica de acero para todos los días, que mantiene el agua fría durante horas.",
    "Italian": "Una bottiglia pratica in acciaio per tutti i giorni, che mantiene l'acqua fredda a lungo.",
    "English": "A practical steel bottle for every day that keeps the water cold for a long time.",
    "Japanese": "毎日使える実用的なステンレスボトルで、水を長時間冷たく保ちます。",
}


def family_of(system: str) -> str:
    for family in FAMILIES.values():
        if family.description in system:
            return family.name
    raise ValueError("no family's request")


def card_value(user: str, key: str) -> str | None:
    match = re.search(rf"^{key}: (.*)$", user, re.MULTILINE)
    return match.group(1) if match else None


def given_options(user: str) -> tuple[list[str], int]:
    """The options a prompt gives ('exactly these options:' ... 'and the answer K.')."""
    block = user.split("options", 1)[1].split(":\n", 1)[1].split("\nand the answer")[0]
    options = [re.sub(r"^\d+\. ", "", line) for line in block.splitlines()]
    return options, int(re.search(r"and the answer (\d+)\.", user).group(1))


def quoted_question(user: str) -> str:
    return re.search(r'the question "(.+?)"(?:,| and)', user).group(1)


def reply(system: str, user: str, items: int = 2) -> str:
    """A valid reply to the request (system, user) of any family."""
    family, title = family_of(system), card_value(user, "Title")
    brand = card_value(user, "Brand") or title.split()[0]
    opening = f"The product '{title}' appears on an e-commerce website."
    n = int(m.group(1)) if (m := re.search(r"Write (\d+)", user)) else items
    writers = {
        "category_explanation": lambda i: write_item(
            f"What is the product category 'category {i}'? Explain it in one sentence.",
            [],
            f"Category {i} groups products that people buy for one everyday purpose, such as number {i}.",
        ),
        "category_attribute_choice": lambda i: write_item(
            f"Which attribute matters most for products of category {i}?", ["Size", "Color", "Weight"], i % 3
        ),
        "query_ner": lambda i: write_item(NER_QUESTION.format(query=f"{brand} offer {i}".casefold()), [], [brand]),
        "product_attribute_choice": lambda i: write_item(f"{opening} Question {i}?", ["A", "B", "C"], 2),
        "review_keyphrases": lambda i: write_item(
            KEYPHRASE_QUESTION.format(review=f"Works well and arrived fast, order {i}"),
            [],
            ["works well", "arrived fast"],
        ),
        "review_aspect_retrieval": lambda i: write_item(
            f"A customer wrote this review: 'Sturdy, but pricey ({i}).'\n{ASPECT_QUESTION}",
            ["Durability", "Price", "Color"],
            [1, 2],
            start=1,
        ),
        "product_knowledge": lambda i: write_item(f"{opening} What is it used for ({i})?", ["X", "Y", "Z"], 0),
        "query_relation_choice": lambda i: write_item(
            f"A user searched for '{brand} {i}' and was shown the product '{title}'. "
            "How does the product relate to the query?",
            list(RELATIONS),
            0,
        ),
        "product_keywords": lambda i: write_item(quoted_question(user), [], title.split()[: 3 + i]),
    }
    if family in writers:
        return "\n\n".join(writers[family](i) for i in range(n))
    if family == "review_retrieval":
        options, answer = given_options(user)
        question = f"A customer wrote this review: 'Exactly what I needed.'\n{RETRIEVAL_QUESTION}"
        return write_item(question, options, [answer], start=1)
    if family == "title_translation":
        language = re.search(r"for the (\w+) store", user).group(1)
        return write_item(quoted_question(user), [], SENTENCE[language].split(",")[0])
    if family == "cross_lingual_matching":
        options, answer = given_options(user)
        language = re.search(r"translated into (\w+)", user).group(1)
        options[answer] = SENTENCE[language]
        return write_item(quoted_question(user), options, answer)
    raise AssertionError(family)
