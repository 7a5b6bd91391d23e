"""Quality filters for synthetic items: word n-gram overlap (copies of few-shot examples, evaluation
questions leaking into training) and the language a text is written in.

Overlap of a text with a set of reference texts: the share of the text's word n-grams (lower
case, punctuation dropped) that occur in any reference. A text shorter than n words is one
n-gram of all its words. Language: py3langid's naive Bayes model (97 languages, shipped with the
package), restricted to the catalog's six languages; it decides only when its normalized
probability reaches MIN_CONFIDENCE, since short titles full of brand names often mislead it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

from shoptune import params
from shoptune.profile import EvaluateParams
from shoptune.shopbench import read_questions

WORD = re.compile(r"\w+", re.UNICODE)
LOCALE_LANGUAGE = {"DE": "de", "JP": "ja", "UK": "en", "ES": "es", "FR": "fr", "IT": "it"}
MIN_CONFIDENCE = 0.9
# Japanese has no spaces between words: a CJK or kana run counts as characters, not as one word
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uff66-\uff9f]")


def words(text: str) -> list[str]:
    tokens = []
    for token in WORD.findall(text.casefold()):
        tokens.extend(list(token) if CJK.search(token) else [token])
    return tokens


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    tokens = words(text)
    if len(tokens) < n:
        return {tuple(tokens)} if tokens else set()
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


class Overlap:
    """The n-grams of a set of reference texts, and the share of a text's n-grams found among them."""

    def __init__(self, references: Iterable[str], n: int):
        self.n = n
        self.grams: set[tuple[str, ...]] = set()
        for text in references:
            self.grams |= ngrams(text, n)

    def share(self, text: str) -> float:
        grams = ngrams(text, self.n)
        return len(grams & self.grams) / len(grams) if grams else 0.0


@functools.cache
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    identifier.set_languages(sorted(set(LOCALE_LANGUAGE.values())))
    return identifier


def language(text: str) -> str | None:
    """The text's language (de, ja, en, es, fr or it), or None where the model is not confident."""
    if CJK.search(text):  # kana or kanji: Japanese among the six
        return "ja"
    code, probability = _identifier().classify(text)
    return code if probability >= MIN_CONFIDENCE else None


def in_language(text: str, locale: str) -> tuple[bool, str | None]:
    """(is the text not in another language than the locale's, the language found)."""
    found = language(text)
    return found is None or found == LOCALE_LANGUAGE[locale], found


def evaluation_questions(profile: str) -> list[str]:
    """The questions the profile is evaluated on (evaluate.questions): no training row may overlap them."""
    return [q.input_field for q in read_questions(params.load(profile, "evaluate", EvaluateParams).questions)]
