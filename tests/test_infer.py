"""Prompt-side logic of the infer stage (the generation itself runs in the DVC end-to-end test)."""

import pytest

from shoptune import UserError
from stages.infer import digit_token_ids, option_numbers


def test_option_numbers_come_from_the_question():
    question = "Which one?\n0. red\n1. blue\n2) green\nAnswer:"
    assert option_numbers(question) == ["0", "1", "2"]
    assert option_numbers("Pick the best one. 12 options in 2024") == [str(d) for d in range(10)]


class CharTokenizer:
    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_digits_must_be_single_tokens():
    assert digit_token_ids(CharTokenizer(), ["0", "3"]) == [48, 51]
    with pytest.raises(UserError, match="splits the digit '10' into 2 tokens"):
        digit_token_ids(CharTokenizer(), ["10"])
