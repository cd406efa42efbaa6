"""Spearman rank correlation between predictions and references (offline counterpart of the Hub metric `spearmanr`)."""

import datasets
import evaluate
from scipy.stats import spearmanr

_DESCRIPTION = "Spearman rank correlation between predictions and references, in [-1, 1]."
_CITATION = ""
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of float): predicted values.
    references (list of float): ground truth values.
Returns:
    spearman (float)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Spearman(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("float"), "references": datasets.Value("float")}),
            reference_urls=["https://docs.scipy.org/doc/scipy/reference/generated/scipy.stats.spearmanr.html"],
        )

    def _compute(self, predictions, references):
        return {"spearman": float(spearmanr(references, predictions)[0])}
