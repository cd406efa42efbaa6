"""seqeval (offline copy of the Hub metric `seqeval`): entity-level precision, recall and F1 of
tag sequences, micro-averaged over all entities and per entity type, and token accuracy."""

import importlib

import datasets
import evaluate
from seqeval.metrics import accuracy_score
from seqeval.metrics import classification_report

_DESCRIPTION = """seqeval evaluates sequence labelling (named-entity recognition, chunking) by entities:
an entity counts as found when its type and its boundaries both match. The default mode chunks
tags as the conlleval script does (an I-X after no X starts an entity); mode="strict" with a
scheme (IOB2, IOBES, ...) counts only well-formed entities."""
_CITATION = ""
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of list of str): predicted tags, one list per sentence.
    references (list of list of str): ground truth tags, one list per sentence.
    suffix (bool): True if the tag type comes before the prefix (PER-B). Defaults to False.
    scheme (str): IOB1, IOB2, IOE1, IOE2, IOBES or BILOU, for mode="strict". Defaults to None.
    mode (str): None (conlleval, the default) or "strict".
    sample_weight (list of float): sentence weights. Defaults to None.
    zero_division (int or str): value returned for a zero denominator. Defaults to 'warn' (0, warned).
Returns:
    for each entity type: {precision, recall, f1, number (its count in the references)};
    overall_precision, overall_recall, overall_f1 (micro-averaged over all entities);
    overall_accuracy (of the tags, token by token).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Seqeval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string", id="label"), id="sequence"),
                    "references": datasets.Sequence(datasets.Value("string", id="label"), id="sequence"),
                }
            ),
            reference_urls=["https://github.com/chakki-works/seqeval"],
        )

    def _compute(self, predictions, references, suffix=False, scheme=None, mode=None, sample_weight=None,
                 zero_division="warn"):  # fmt: skip
        if scheme is not None:
            try:
                scheme = getattr(importlib.import_module("seqeval.scheme"), scheme)
            except AttributeError:
                raise ValueError(f"scheme should be one of IOB1, IOB2, IOE1, IOE2, IOBES, BILOU; got {scheme}") from None
        report = classification_report(
            y_true=references,
            y_pred=predictions,
            suffix=suffix,
            output_dict=True,
            scheme=scheme,
            mode=mode,
            sample_weight=sample_weight,
            zero_division=zero_division,
        )
        report.pop("macro avg")
        report.pop("weighted avg")
        overall = report.pop("micro avg")
        scores = {
            name: {"precision": float(s["precision"]), "recall": float(s["recall"]), "f1": float(s["f1-score"]),
                   "number": int(s["support"])}
            for name, s in report.items()
        }  # fmt: skip
        scores["overall_precision"] = float(overall["precision"])
        scores["overall_recall"] = float(overall["recall"])
        scores["overall_f1"] = float(overall["f1-score"])
        scores["overall_accuracy"] = float(accuracy_score(y_true=references, y_pred=predictions))
        return scores
