"""ROC AUC (offline counterpart of the Hub metric `roc_auc`): area under the ROC curve from scores."""

import datasets
import evaluate
from sklearn.metrics import roc_auc_score

_DESCRIPTION = "ROC AUC from prediction scores: binary (score of the positive class), multiclass (one-vs-rest), multilabel."
_CITATION = ""
_KWARGS_DESCRIPTION = """
Args:
    references (list of int, or list of lists of int for multilabel): ground truth labels.
    prediction_scores (list of float, or list of lists of float): scores / probabilities.
    average (str): macro (default), micro, weighted, samples or None.
    multi_class (str): 'ovr' (default) or 'ovo' for the multiclass config.
Returns:
    roc_auc (float)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ROCAUC(evaluate.Metric):
    def _info(self):
        if self.config_name == "multiclass":
            features = {"prediction_scores": datasets.Sequence(datasets.Value("float")), "references": datasets.Value("int32")}
        elif self.config_name == "multilabel":
            features = {
                "prediction_scores": datasets.Sequence(datasets.Value("float")),
                "references": datasets.Sequence(datasets.Value("int32")),
            }
        else:
            features = {"prediction_scores": datasets.Value("float"), "references": datasets.Value("int32")}
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(features),
            reference_urls=["https://scikit-learn.org/stable/modules/generated/sklearn.metrics.roc_auc_score.html"],
        )

    def _compute(self, references, prediction_scores, average="macro", multi_class="ovr"):
        kwargs = {"multi_class": multi_class} if self.config_name == "multiclass" else {}
        return {"roc_auc": float(roc_auc_score(references, prediction_scores, average=average, **kwargs))}
