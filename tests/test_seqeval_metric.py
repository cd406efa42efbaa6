"""The bundled seqeval metric (finetune/metric_modules/seqeval): entity-level scores against hand counts."""

import pytest

from finetune.metrics import _load_module
from finetune.tagging import entities

REFERENCES = [
    ["B-PER", "I-PER", "O", "B-LOC", "O"],
    ["B-ORG", "I-ORG", "I-ORG", "O", "B-MISC"],
    ["O", "O"],
]
PREDICTIONS = [
    ["B-PER", "I-PER", "O", "B-ORG", "O"],  # PER right; the LOC found with the wrong type (ORG)
    ["B-ORG", "I-ORG", "O", "O", "I-MISC"],  # ORG one word short (boundary); an I-MISC after O: a MISC, right
    ["B-PER", "O"],  # a PER where there is none
]


@pytest.fixture(scope="module")
def seqeval():
    return _load_module("seqeval")


def test_hand_counted_entities():
    # References: PER, LOC, ORG, MISC. Predictions: PER (right), ORG (wrong type), ORG (wrong
    # boundary), MISC (right: conlleval reads an I- after O as the start of an entity), PER (spurious).
    assert [entities(r) for r in REFERENCES] == [[("PER", 0, 2), ("LOC", 3, 4)], [("ORG", 0, 3), ("MISC", 4, 5)], []]
    assert [entities(p) for p in PREDICTIONS] == [[("PER", 0, 2), ("ORG", 3, 4)], [("ORG", 0, 2), ("MISC", 4, 5)],
                                                  [("PER", 0, 1)]]  # fmt: skip


def test_seqeval_scores_equal_hand_counts(seqeval):
    scores = seqeval.compute(predictions=PREDICTIONS, references=REFERENCES, zero_division=0)
    # 5 predicted entities, 4 true ones, 2 right (PER in row 1, MISC in row 2).
    assert scores["overall_precision"] == pytest.approx(2 / 5)
    assert scores["overall_recall"] == pytest.approx(2 / 4)
    assert scores["overall_f1"] == pytest.approx(2 * 0.4 * 0.5 / (0.4 + 0.5))
    # Tokens: row 1 one wrong of 5, row 2 two wrong of 5, row 3 one wrong of 2 -> 8 of 12.
    assert scores["overall_accuracy"] == pytest.approx(8 / 12)
    assert scores["PER"] == {"precision": pytest.approx(1 / 2), "recall": 1.0, "f1": pytest.approx(2 / 3), "number": 1}
    assert scores["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "number": 1}  # never predicted
    assert scores["ORG"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "number": 1}  # two wrong guesses
    assert scores["MISC"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "number": 1}
    assert sorted(scores) == ["LOC", "MISC", "ORG", "PER", "overall_accuracy", "overall_f1", "overall_precision",
                              "overall_recall"]  # fmt: skip


def test_strict_mode_refuses_the_i_after_o_entity(seqeval):
    """The default (conlleval) mode is what counts the MISC above; strict IOB2 does not."""
    scores = seqeval.compute(predictions=PREDICTIONS, references=REFERENCES, mode="strict", scheme="IOB2",
                             zero_division=0)  # fmt: skip
    assert scores["MISC"]["recall"] == 0.0 and scores["overall_recall"] == pytest.approx(1 / 4)


def test_perfect_predictions_score_one(seqeval):
    scores = seqeval.compute(predictions=REFERENCES, references=REFERENCES)
    assert scores["overall_f1"] == 1.0 and scores["overall_accuracy"] == 1.0
