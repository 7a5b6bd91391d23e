"""ShopBench parsing and scoring, rule for rule as the official starter kit."""

import math

import pytest

from shoptune import UserError
from shoptune import shopbench as sb


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2", 2),
        ("a", -1),
        ("\n", -1),
        (" ", -1),
        (" 2", 2),
        ("\n1", 1),
        ("\n 3", 3),
        ("\n ", -1),
        ("10", 1),
        ("", -1),
        ("３", 3),
    ],  # first character only; int() accepts full-width digits
)
def test_multiple_choice_takes_first_character(text, expected):
    assert sb.parse("multiple-choice", text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1, 2, 3, 4, 5", [1, 2, 3, 4, 5]),
        ("[1, 2, 3, 4, 5]", [1, 2, 3, 4, 5]),
        ("1, 2, 2, 3", []),  # a duplicate empties the list
        ("1, 2, 4, aicrowd, 5", [1, 2, 4, 5]),
        ("\n", []),
        ("The answer is: 1, 2, 3, 4, 5", [1, 2, 3, 4, 5]),
        (",1,2,3,4,5", [1, 2, 3, 4, 5]),
        ("1 2", []),  # spaces are kept, so "1 2" is no int
        ("6, 1, 7, 2", [1, 2]),  # numbers above 5 are dropped
        ("1, 2, 3, 4, 5, 0", [1, 2, 3, 4, 5]),  # at most 5
    ],
)
def test_ranking(text, expected):
    assert sb.parse("ranking", text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1, 2, 3, 4", [1, 2, 3]), ("[7, 7, 9]", [7, 7, 9]), ("3\n4", [34]), ("none", []), ("12, x, 4", [12, 4])],
)
def test_retrieval(text, expected):
    assert sb.parse("retrieval", text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("['Hydrovale', 'Clickwell']", ["Hydrovale", "Clickwell"]),
        ("Hydrovale, Clickwell , ,", ["Hydrovale", "Clickwell"]),
        ("[A, B]", ["[A", "B]"]),  # not a literal: comma split
        ("[1, 2]", ["[1", "2]"]),  # a literal, but not of strings
    ],
)
def test_entities(text, expected):
    assert sb.parse("named_entity_recognition", text) == expected


def test_outputs_are_cut_at_5000_characters():
    long = "x" * 4999 + "yz"
    assert sb.parse("generation", long) == "x" * 4999 + "y"
    # a number of more than 4300 digits is no int for Python >= 3.11, and is skipped like any non-number
    assert sb.parse("retrieval", "1" * 4990 + ", 2") == [2]


def test_a_prediction_must_be_text():
    with pytest.raises(UserError):
        sb.parse("generation", 3)


def test_ndcg_values_and_the_zero_index_quirk():
    weights = [1.0, 3.0, 0.0]
    assert sb.ndcg([2, 1, 3], weights) == pytest.approx(1.0)
    expected = (1 + 7 / math.log2(3)) / (7 + 1 / math.log2(3))
    assert sb.ndcg([1, 2, 3], weights) == pytest.approx(expected)
    # index 0 reads the last weight (2.0): gain 2**2 - 1 = 3 at rank 1
    assert sb.ndcg([0], [0.0, 5.0, 2.0]) == pytest.approx(3 / (31 + 3 / math.log2(3)))
    assert sb.ndcg([0], [5.0, 0.0, 0.0]) == 0
    assert sb.ndcg([9], weights) == 0  # out of range: relevance 0
    assert sb.ndcg([1], [0.0, 0.0]) == 0  # ideal 0


def test_hit_rate_counts_truths_in_the_first_three():
    assert sb.hit_rate_3([5, 1, 9, 2], [1, 2]) == 0.5
    assert sb.hit_rate_3([1, 1, 2], [1, 2]) == 1.0


def test_micro_f1_sums_counts_over_the_task():
    a = sb.entity_counts(["Apple ", "pear", "pear"], ["apple", "Banana"])  # tp 1, fp 2, fn 1
    b = sb.entity_counts([], ["kiwi"])  # tp 0, fp 0, fn 1
    assert (a, b) == ((1, 2, 1), (0, 0, 1))
    precision, recall = 1 / 3, 1 / 3
    assert sb.micro_f1([a, b]) == pytest.approx(2 * precision * recall / (precision + recall))
    assert sb.micro_f1([(0, 0, 0)]) == 0


def test_bleu_reads_the_first_line_lower_cased():
    truth = "stainless steel thermos flask 1 litre"
    assert sb.bleu("\nStainless Steel Thermos Flask 1 Litre\nmore text", truth) == pytest.approx(1.0)
    assert 0 < sb.bleu("steel thermos flask 1 litre", truth) < 1  # brevity penalty
    assert sb.bleu("steel thermos flask", truth) == 0  # no 4-gram at all


def test_japanese_bleu_uses_mecab_words():
    truth = "折りたたみ傘 自動開閉 軽量"
    assert sb.bleu("折りたたみ傘自動開閉軽量", truth, japanese=True) == pytest.approx(1.0)
    assert sb.bleu("折りたたみ傘自動開閉軽量", truth) == 0.0  # 13a sees one token against three


def test_rouge_l_with_stemming():
    assert sb.rouge_l("Cotton T-Shirts pack", "cotton t-shirt packs") == pytest.approx(1.0)


def question(task, metric, truth, task_type="generation", track="t1"):
    return sb.Question("q", truth, task, task_type, metric, track, task_type == "multiple-choice")


def test_aggregate_means_rows_and_micro_f1_for_entity_tasks():
    questions = [
        question("mc", "accuracy", 1, "multiple-choice"),
        question("mc", "accuracy", 2, "multiple-choice"),
        question("ner", "micro f1", ["a"], "named_entity_recognition", "t2"),
        question("ner", "micro f1", ["b"], "named_entity_recognition", "t2"),
    ]
    scores = [True, False, (1, 0, 0), (0, 1, 1)]
    tasks = sb.aggregate(questions, scores)
    assert [(t.task_name, t.score, t.num_samples) for t in tasks] == [("mc", 0.5, 2), ("ner", pytest.approx(0.5), 2)]
    summary = sb.summarize(tasks)
    assert summary["overall"] == pytest.approx(0.5)
    assert summary["tracks"] == {"t1": 0.5, "t2": pytest.approx(0.5)}


def test_malformed_questions_are_one_line_errors(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(
        '{"input_field": "x", "output_field": "1", "task_name": "t", "task_type": "multiple-choice",'
        ' "metric": "accuracy"}\n'
    )
    with pytest.raises(UserError, match=r"q.jsonl: row 1: output_field '1' does not fit metric 'accuracy'"):
        sb.read_questions(path)
    path.write_text("{not json\n")
    with pytest.raises(UserError, match=r"q.jsonl:1: not valid JSON"):
        sb.read_questions(path)


def test_prompts_follow_the_recipe():
    mc = question("mc", "accuracy", 1, "multiple-choice")
    other = question("gen", "rougel", "x")
    assert sb.prompt_for(mc) == sb.SYSTEM_PROMPT + "\n\nq"
    assert sb.prompt_for(other).endswith("q" + "Do not give explanation only Answer. \nOutput:\n")
