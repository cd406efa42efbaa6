"""Metrics: evaluate modules (bundled for offline use, Hub names for everything else), and the
task rules that turn logits into scores and predictions."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import evaluate
import numpy as np

from finetune.config import SINGLE_LABEL, FinetuneError
from finetune.tasks import Task, all_tasks, get_task
from finetune.tasks.regression import VALUE_METRICS

logger = logging.getLogger(__name__)

BUNDLED_DIR = Path(__file__).resolve().parent / "metric_modules"

# Metric name -> (evaluate module, extra compute() arguments). "f1" / "precision" / "recall"
# use average="binary" on two classes and "macro" otherwise; suffixed names pick the average.
_VARIANTS: Dict[str, tuple] = {name: (name, {}) for name in ("accuracy", "matthews_correlation", "roc_auc")}
for _base in ("f1", "precision", "recall"):
    _VARIANTS[_base] = (_base, None)
    for _avg in ("macro", "micro", "weighted"):
        _VARIANTS[f"{_base}_{_avg}"] = (_base, {"average": _avg})
for _name in VALUE_METRICS:
    _VARIANTS[_name] = (_name, {})

# The bundled metrics each task accepts.
TASK_METRICS = {task.name: task.metric_names(list(_VARIANTS)) for task in all_tasks()}


class MetricError(FinetuneError):
    """A metric that cannot be loaded or does not fit the task."""


def bundled_metric_names() -> List[str]:
    return sorted(_VARIANTS)


def _load_module(name: str, config_name: str | None = None) -> evaluate.EvaluationModule:
    local = BUNDLED_DIR / name
    try:
        return evaluate.load(str(local) if local.is_dir() else name, config_name)
    except Exception as err:
        raise MetricError(
            f"metric '{name}' could not be loaded: {err}. Bundled (offline) metrics: "
            f"{bundled_metric_names()}; any other name is fetched from the Hugging Face Hub."
        ) from err


# ---------------------------------------------------------------------------------------------
# From logits to scores and predictions (shared by evaluation, prediction tables and predict)
# ---------------------------------------------------------------------------------------------
def scores_from_logits(logits: np.ndarray, task: str) -> np.ndarray:
    """Class probabilities (softmax), label probabilities (sigmoid) or predicted values."""
    return get_task(task).scores(logits)


def predictions_from_scores(scores: np.ndarray, task: str, threshold: float = 0.5) -> np.ndarray:
    """Class ids (binary: P(class 1) >= threshold), multi-hot rows (P >= threshold), or values."""
    return get_task(task).predictions(scores, threshold)


def label_text(value, task: str, id2label: Dict[int, str]) -> str:
    """A gold or predicted label as written in prediction tables: the label name, the names of a
    multi-hot row joined by '|', or a regression value."""
    return get_task(task).label_text(value, id2label)


def probability_fields(scores_row: np.ndarray, task: str, id2label: Dict[int, str]) -> Dict[str, str]:
    """prob_<label> columns of a prediction table (none for regression)."""
    return get_task(task).probability_fields(scores_row, id2label)


class MetricSuite:
    """The configured metrics for a task; each reports under its own name."""

    def __init__(self, names: Sequence[str], num_labels: int, task: str = SINGLE_LABEL,
                 id2label: Optional[Dict[int, str]] = None):  # fmt: skip
        self.names = list(names)
        self.id2label = id2label
        self.num_labels = num_labels
        self.task = task
        self._task = get_task(task)
        wrong = [n for n in self.names if n in _VARIANTS and n not in TASK_METRICS[task]]
        if wrong:
            raise MetricError(
                f"metrics {wrong} do not apply to {task}; valid bundled metrics for it: {TASK_METRICS[task]}. "
                "Set metrics=[...] (and early_stopping.metric) to fit the task."
            )
        self._modules: Dict[str, evaluate.EvaluationModule] = {}
        self._kwargs: Dict[str, tuple] = {}
        if type(self._task).compute_metrics is not Task.compute_metrics:  # the task computes them all at once
            unknown = [n for n in self.names if n not in TASK_METRICS[task]]
            if unknown:
                raise MetricError(f"metrics {unknown} do not apply to {task}; its metrics: {TASK_METRICS[task]} "
                                  "(besides f1 per entity type, always reported).")  # fmt: skip
            return
        for name in self.names:
            module_name, kwargs = _VARIANTS.get(name, (name, {}))
            if kwargs is None:
                kwargs = {"average": self._task.metric_average(num_labels)}
            if module_name in ("f1", "precision", "recall"):
                # An empty class scores 0 instead of filling the log with sklearn warnings.
                kwargs = {**kwargs, "zero_division": 0}
            if module_name not in self._modules:
                self._modules[module_name] = _load_module(module_name, self._config_name(module_name))
            self._kwargs[name] = (module_name, kwargs)

    def _config_name(self, module_name: str):
        return self._task.metric_config(module_name, self.num_labels, (BUNDLED_DIR / module_name).is_dir())

    def compute(self, logits: np.ndarray, references: np.ndarray, threshold: float = 0.5) -> Dict[str, float]:
        scores = self._task.scores(logits)
        predictions = self._task.predictions(scores, threshold)
        references = self._task.references(references)
        together = self._task.compute_metrics(predictions, references, self.id2label)
        if together is not None:  # the configured names first, then the task's other numbers (per type)
            return {**{n: together[n] for n in self.names}, **{k: v for k, v in together.items() if k not in self.names}}
        results: Dict[str, float] = {}
        for name in self.names:
            module_name, kwargs = self._kwargs[name]
            if module_name == "roc_auc":
                ranked = self._task.ranking_scores(scores, self.num_labels)
                out = self._modules[module_name].compute(prediction_scores=ranked, references=references, **kwargs)
            else:
                out = self._modules[module_name].compute(predictions=predictions, references=references, **kwargs)
            # A Hub module may name its result differently (e.g. "pearsonr"); take its only value then.
            value = out.get(name, out.get(module_name))
            if value is None and len(out) == 1:
                value = next(iter(out.values()))
            if value is None:
                raise MetricError(f"metric '{name}' returned {sorted(out)}; none of them is named '{name}'.")
            results[name] = float(value)
        return results


def seqeval_scores(predicted: List[List[str]], gold: List[List[str]]) -> Dict[str, float]:
    """Entity-level precision / recall / F1 (micro) and token accuracy of IOB2 tag rows, with the
    bundled seqeval module (default mode: conlleval's chunking), plus ``f1_<TYPE>`` per entity type."""
    global _SEQEVAL
    if _SEQEVAL is None:
        _SEQEVAL = _load_module("seqeval")
    out = _SEQEVAL.compute(predictions=predicted, references=gold, zero_division=0)
    scores = {"f1": out["overall_f1"], "precision": out["overall_precision"], "recall": out["overall_recall"],
              "accuracy": out["overall_accuracy"]}  # fmt: skip
    scores.update({f"f1_{kind}": v["f1"] for kind, v in sorted(out.items()) if isinstance(v, dict)})
    return {k: float(v) for k, v in scores.items()}


_SEQEVAL = None


def uses_threshold(task: str, num_labels: int) -> bool:
    return get_task(task).uses_threshold(num_labels)


def tune_threshold(suite: MetricSuite, logits: np.ndarray, references: np.ndarray, metric: str, maximize: bool) -> float:
    """The threshold in 0.05 .. 0.95 that gives the best ``metric`` on these (validation) logits."""
    grid = np.round(np.arange(0.05, 0.951, 0.05), 2)
    values = [suite.compute(logits, references, float(t))[metric] for t in grid]
    best = int(np.argmax(values) if maximize else np.argmin(values))
    return float(grid[best])
