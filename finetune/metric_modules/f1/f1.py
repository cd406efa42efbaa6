"""F1 (offline copy of the Hub metric `f1`): F1 = 2 * (precision * recall) / (precision + recall)."""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import f1_score

_DESCRIPTION = "F1 = 2 * (precision * recall) / (precision + recall). average: binary | micro | macro | weighted | samples | None."
_CITATION = ""
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted labels.
    references (list of int): ground truth labels.
    labels (list of int): labels to include when average is not binary. Defaults to None.
    pos_label (int): the positive class when average='binary'. Defaults to 1.
    average (str): binary (default), micro, macro, weighted, samples, or None (per-class scores).
    sample_weight (list of float): sample weights. Defaults to None.
    zero_division (int or str): value returned for a zero denominator. Defaults to 'warn'.
Returns:
    f1 (float, or array of floats when average is None)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int32")),
                    "references": datasets.Sequence(datasets.Value("int32")),
                }
                if self.config_name == "multilabel"
                else {
                    "predictions": datasets.Value("int32"),
                    "references": datasets.Value("int32"),
                }
            ),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.f1_score.html"],
        )

    def _compute(
        self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None, zero_division="warn"
    ):
        score = f1_score(
            references,
            predictions,
            labels=labels,
            pos_label=pos_label,
            average=average,
            sample_weight=sample_weight,
            zero_division=zero_division,
        )
        return {"f1": float(score) if np.ndim(score) == 0 else score}
