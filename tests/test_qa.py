"""Did it work: content-word F1, the constant baseline, and the answer evaluation of spoken questions."""

from __future__ import annotations

import pytest

from pipeline.qa import constant_baseline, content_words, summarise_answers, word_f1


def test_content_words_leave_out_function_words():
    assert content_words("The capital of France is Paris.") == ["capital", "france", "paris"]
    assert content_words("It is what it is!") == []


@pytest.mark.parametrize("prediction, reference, expected", [
    ("The capital of France is Paris.", "Paris is the capital of France.", 1.0),
    ("The capital of France is Paris.", "The capital of Spain is Madrid.", 1 / 3),  # capital
    ("I am sorry, but as a chatbot I cannot.", "The capital of France is Paris.", 0.0),
    ("Paris Paris Paris", "Paris, the capital.", 0.4),  # multisets: 1 of 3 predicted, 1 of 2 expected
    ("It is.", "So it is.", 1.0),  # neither has content words: they agree
    ("", "Paris.", 0.0),
])
def test_word_f1_by_hand(prediction, reference, expected):
    assert word_f1(prediction, reference) == pytest.approx(expected)


def test_a_fluent_unrelated_answer_scores_near_zero_without_stop_words():
    """What the issue saw: with stop words an unrelated fluent answer overlaps the reference a lot."""
    unrelated = "The art of crafting a perfect balance is in the details of the work."
    reference = "The capital of France is Paris, a city in the north of the country."
    assert word_f1(unrelated, reference) == 0.0


def test_constant_baseline_and_summary():
    assert constant_baseline([5, 5, 7, 5]) == 0.75 and constant_baseline([]) == 0.0
    rows = [{"teacher_first_token": 5, "student": {"agree": True, "kl": 0.5, "word_f1": 1.0},
             "cascade": {"agree": True, "kl": 0.0, "word_f1": 1.0}},
            {"teacher_first_token": 7, "student": {"agree": False, "kl": 1.5, "word_f1": 0.0},
             "cascade": {"agree": True, "kl": 0.1, "word_f1": 0.5}}]
    summary = summarise_answers(rows, ["student", "cascade"])
    assert summary["count"] == 2 and summary["constant_baseline"] == 0.5
    assert summary["student"] == {"agree": 0.5, "kl": 1.0, "word_f1": 0.5}
    assert summary["cascade"]["word_f1"] == 0.75
