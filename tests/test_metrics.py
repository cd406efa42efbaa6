"""The bundled offline metrics equal hand computations, for every task type."""

import numpy as np
import pytest

from finetune.config import MULTI_LABEL, REGRESSION, SINGLE_LABEL
from finetune.metrics import (
    MetricError,
    MetricSuite,
    bundled_metric_names,
    predictions_from_scores,
    scores_from_logits,
    tune_threshold,
)

PRED = np.array([1, 0, 1, 1, 0, 1, 0, 0])
GOLD = np.array([1, 0, 0, 1, 1, 1, 0, 1])
# TP=3 (idx 0,3,5), FP=1 (idx 2), FN=2 (idx 4,7), TN=2 (idx 1,6)


def logits_for(pred, k=2):
    """Logits whose argmax is ``pred``."""
    out = np.zeros((len(pred), k))
    out[np.arange(len(pred)), pred] = 2.0
    return out


def test_binary_metrics_match_hand_computation():
    suite = MetricSuite(["accuracy", "f1", "precision", "recall", "matthews_correlation"], num_labels=2)
    out = suite.compute(logits_for(PRED), GOLD)
    tp, fp, fn, tn = 3, 1, 2, 2
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert out["accuracy"] == pytest.approx(5 / 8)
    assert out["precision"] == pytest.approx(precision)
    assert out["recall"] == pytest.approx(recall)
    assert out["f1"] == pytest.approx(2 * precision * recall / (precision + recall))
    mcc = (tp * tn - fp * fn) / np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert out["matthews_correlation"] == pytest.approx(mcc)


def test_binary_threshold_and_roc_auc():
    # P(class 1) = 0.9, 0.6, 0.4, 0.2 ; gold 1, 0, 1, 0
    p1 = np.array([0.9, 0.6, 0.4, 0.2])
    logits = np.stack([np.zeros(4), np.log(p1 / (1 - p1))], axis=1)
    gold = np.array([1, 0, 1, 0])
    suite = MetricSuite(["accuracy", "roc_auc"], num_labels=2)
    assert suite.compute(logits, gold, threshold=0.5)["accuracy"] == pytest.approx(2 / 4)  # 1,1,0,0
    assert suite.compute(logits, gold, threshold=0.3)["accuracy"] == pytest.approx(3 / 4)  # 1,1,1,0
    # AUC: positive scores {0.9, 0.4} vs negatives {0.6, 0.2}: pairs won 3 of 4.
    assert suite.compute(logits, gold)["roc_auc"] == pytest.approx(0.75)
    assert tune_threshold(suite, logits, gold, "accuracy", maximize=True) == pytest.approx(0.25)


def test_multiclass_f1_defaults_to_macro_and_variants_pick_the_average():
    pred = np.array([0, 1, 2, 2, 1, 0])
    gold = np.array([0, 1, 1, 2, 2, 2])
    out = MetricSuite(["f1", "f1_macro", "f1_micro"], num_labels=3).compute(logits_for(pred, 3), gold)
    # Per class F1: class0 P=1/2 R=1 -> 2/3; class1 P=1/2 R=1/2 -> 1/2; class2 P=1/2 R=1/3 -> 2/5.
    macro = (2 / 3 + 1 / 2 + 2 / 5) / 3
    assert out["f1"] == pytest.approx(macro) and out["f1_macro"] == pytest.approx(macro)
    assert out["f1_micro"] == pytest.approx(3 / 6)


def test_multi_label_threshold_and_metrics():
    probs = np.array([[0.9, 0.2, 0.6], [0.4, 0.7, 0.1], [0.3, 0.35, 0.8]])
    logits = np.log(probs / (1 - probs))
    gold = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 1]])
    np.testing.assert_allclose(scores_from_logits(logits, MULTI_LABEL), probs)
    assert predictions_from_scores(probs, MULTI_LABEL, 0.5).tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 1]]
    assert predictions_from_scores(probs, MULTI_LABEL, 0.3).tolist() == [[1, 0, 1], [1, 1, 0], [1, 1, 1]]
    suite = MetricSuite(["accuracy", "f1_micro", "f1_macro"], num_labels=3, task=MULTI_LABEL)
    out = suite.compute(logits, gold, threshold=0.5)
    # threshold 0.5: rows right/wrong as sets: [1,0,1]!=[1,0,0], [0,1,0]!=[1,1,0], [0,0,1]!=[0,1,1]
    assert out["accuracy"] == 0.0
    # micro: TP = 1 (r0c0) + 1 (r1c1) + 1 (r2c2) = 3, FP = 1 (r0c2), FN = 2 (r1c0, r2c1)
    assert out["f1_micro"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))
    # macro: label0 TP1 FN1 -> 2/3 ; label1 TP1 FN1 -> 2/3 ; label2 TP1 FP1 -> 2/3
    assert out["f1_macro"] == pytest.approx(2 / 3)
    out = suite.compute(logits, gold, threshold=0.3)
    # threshold 0.3: [1,0,1] [1,1,0] [1,1,1]: row 1 exact; TP=5, FP=2 (r0c2, r2c0), FN=0
    assert out["accuracy"] == pytest.approx(1 / 3)
    assert out["f1_micro"] == pytest.approx(2 * 5 / (2 * 5 + 2))


def test_regression_correlations_and_errors():
    pred = np.array([1.0, 2.0, 3.0, 5.0])
    gold = np.array([1.5, 1.0, 3.5, 4.0])
    suite = MetricSuite(["pearson", "spearman", "mse", "mae"], num_labels=1, task=REGRESSION)
    out = suite.compute(pred.reshape(-1, 1), gold)
    dp, dg = pred - pred.mean(), gold - gold.mean()
    assert out["pearson"] == pytest.approx((dp * dg).sum() / np.sqrt((dp**2).sum() * (dg**2).sum()))
    # ranks: pred 1,2,3,4 ; gold 2,1,3,4 -> d = -1,1,0,0 -> rho = 1 - 6*2/(4*15)
    assert out["spearman"] == pytest.approx(1 - 6 * 2 / (4 * 15))
    assert out["mse"] == pytest.approx(np.mean((pred - gold) ** 2))
    assert out["mae"] == pytest.approx(np.mean(np.abs(pred - gold)))


def test_metrics_must_fit_the_task():
    with pytest.raises(MetricError, match=r"metrics \['accuracy'\] do not apply to regression; valid .*pearson"):
        MetricSuite(["accuracy"], num_labels=1, task=REGRESSION)
    with pytest.raises(MetricError, match="do not apply to multi_label_classification"):
        MetricSuite(["matthews_correlation"], num_labels=3, task=MULTI_LABEL)


def test_unknown_metric_fails_offline_with_the_bundled_list():
    with pytest.raises(MetricError, match="Bundled \\(offline\\) metrics"):
        MetricSuite(["no_such_metric_xyz"], num_labels=2, task=SINGLE_LABEL)
    assert {"accuracy", "roc_auc", "pearson", "spearman", "mse", "mae"} <= set(bundled_metric_names())
