"""The ShopBench task families synthesis writes data for, by name (params: synthesize.families).

Each family is one module: its prompt, few-shot rows in ShopBench form, answer format, checks, task
type and metric, and, where the catalog alone suffices, an offline writer (needs_llm False).
"""

from __future__ import annotations

from shoptune.families.category_attribute_choice import CategoryAttributeChoice
from shoptune.families.category_explanation import CategoryExplanation
from shoptune.families.cross_lingual_matching import CrossLingualMatching
from shoptune.families.family import Family
from shoptune.families.product_attribute_choice import ProductAttributeChoice
from shoptune.families.product_keywords import ProductKeywords
from shoptune.families.product_knowledge import ProductKnowledge
from shoptune.families.query_ner import QueryNer
from shoptune.families.query_relation_choice import QueryRelationChoice
from shoptune.families.review_aspect_retrieval import ReviewAspectRetrieval
from shoptune.families.review_keyphrases import ReviewKeyphrases
from shoptune.families.review_retrieval import ReviewRetrieval
from shoptune.families.title_translation import TitleTranslation

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        CategoryExplanation(),  # task 1
        CategoryAttributeChoice(),  # 2
        ReviewRetrieval(),  # 3
        QueryNer(),  # 4
        ProductAttributeChoice(),  # 5
        ReviewKeyphrases(),  # 6
        ReviewAspectRetrieval(),  # 7
        ProductKnowledge(),  # 8
        QueryRelationChoice(),  # 11
        ProductKeywords(),  # 16
        TitleTranslation(),  # 17
        CrossLingualMatching(),  # 18
    )
}
