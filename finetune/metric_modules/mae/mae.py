"""Mean absolute error (offline counterpart of the Hub metric `mae`)."""

import datasets
import evaluate
from sklearn.metrics import mean_absolute_error

_DESCRIPTION = "Mean absolute error between predicted and reference values (lower is better)."
_CITATION = ""
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of float): predicted values.
    references (list of float): ground truth values.
    sample_weight (list of float): sample weights. Defaults to None.
Returns:
    mae (float)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanAbsoluteError(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("float"), "references": datasets.Value("float")}),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.mean_absolute_error.html"],
        )

    def _compute(self, predictions, references, sample_weight=None):
        return {"mae": float(mean_absolute_error(references, predictions, sample_weight=sample_weight))}
