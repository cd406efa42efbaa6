"""The bundled offline metrics equal hand computations."""

import numpy as np
import pytest

from finetune.metrics import MetricError, MetricSuite, bundled_metric_names

PRED = np.array([1, 0, 1, 1, 0, 1, 0, 0])
GOLD = np.array([1, 0, 0, 1, 1, 1, 0, 1])
# TP=3 (idx 0,3,5), FP=1 (idx 2), FN=2 (idx 4,7), TN=2 (idx 1,6)


def test_binary_metrics_match_hand_computation():
    suite = MetricSuite(["accuracy", "f1", "precision", "recall", "matthews_correlation"], num_labels=2)
    out = suite.compute(PRED, GOLD)
    tp, fp, fn, tn = 3, 1, 2, 2
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert out["accuracy"] == pytest.approx(5 / 8)
    assert out["precision"] == pytest.approx(precision)
    assert out["recall"] == pytest.approx(recall)
    assert out["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    mcc = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert out["matthews_correlation"] == pytest.approx(mcc)


def test_multiclass_f1_defaults_to_macro_and_variants_pick_the_average():
    pred = np.array([0, 1, 2, 2, 1, 0])
    gold = np.array([0, 1, 1, 2, 2, 2])
    out = MetricSuite(["f1", "f1_macro", "f1_micro"], num_labels=3).compute(pred, gold)
    # Per class F1: class0 P=1/2 R=1 -> 2/3; class1 P=1/2 R=1/2 -> 1/2; class2 P=1/2 R=1/3 -> 2/5.
    macro = (2 / 3 + 1 / 2 + 2 / 5) / 3
    assert out["f1"] == pytest.approx(macro) and out["f1_macro"] == pytest.approx(macro)
    assert out["f1_micro"] == pytest.approx(3 / 6)


def test_unknown_metric_fails_offline_with_the_bundled_list():
    with pytest.raises(MetricError, match="Bundled \\(offline\\) metrics"):
        MetricSuite(["no_such_metric_xyz"], num_labels=2)
    assert "accuracy" in bundled_metric_names()
