"""Metrics: evaluate modules (bundled for offline use, Hub names for everything else)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Sequence

import evaluate
import numpy as np

from finetune.config import FinetuneError

logger = logging.getLogger(__name__)

BUNDLED_DIR = Path(__file__).resolve().parent / "metric_modules"

# Metric name -> (evaluate module, extra compute() arguments). "f1" / "precision" / "recall"
# use average="binary" on two classes and "macro" otherwise; suffixed names pick the average.
_VARIANTS: Dict[str, tuple] = {"accuracy": ("accuracy", {}), "matthews_correlation": ("matthews_correlation", {})}
for _base in ("f1", "precision", "recall"):
    _VARIANTS[_base] = (_base, None)
    for _avg in ("macro", "micro", "weighted"):
        _VARIANTS[f"{_base}_{_avg}"] = (_base, {"average": _avg})


class MetricError(FinetuneError):
    """A metric that cannot be loaded or computed."""


def bundled_metric_names() -> List[str]:
    return sorted(_VARIANTS)


def _load_module(name: str) -> evaluate.EvaluationModule:
    local = BUNDLED_DIR / name
    try:
        return evaluate.load(str(local) if local.is_dir() else name)
    except Exception as err:
        raise MetricError(
            f"metric '{name}' could not be loaded: {err}. Bundled (offline) metrics: "
            f"{bundled_metric_names()}; any other name is fetched from the Hugging Face Hub."
        ) from err


class MetricSuite:
    """The configured metrics for a classification task; each reports under its own name."""

    def __init__(self, names: Sequence[str], num_labels: int):
        self.names = list(names)
        self.num_labels = num_labels
        self._modules: Dict[str, evaluate.EvaluationModule] = {}
        self._kwargs: Dict[str, dict] = {}
        for name in self.names:
            module_name, kwargs = _VARIANTS.get(name, (name, {}))
            if kwargs is None:
                kwargs = {"average": "binary" if num_labels == 2 else "macro"}
            if module_name in ("f1", "precision", "recall"):
                # An empty class scores 0 instead of filling the log with sklearn warnings.
                kwargs = {**kwargs, "zero_division": 0}
            if module_name not in self._modules:
                self._modules[module_name] = _load_module(module_name)
            self._kwargs[name] = (module_name, kwargs)

    def compute(self, predictions: np.ndarray, references: np.ndarray) -> Dict[str, float]:
        results: Dict[str, float] = {}
        for name in self.names:
            module_name, kwargs = self._kwargs[name]
            out = self._modules[module_name].compute(predictions=predictions, references=references, **kwargs)
            # A Hub module may name its result differently (e.g. "pearsonr"); take its only value then.
            value = out.get(name, out.get(module_name))
            if value is None and len(out) == 1:
                value = next(iter(out.values()))
            if value is None:
                raise MetricError(f"metric '{name}' returned {sorted(out)}; none of them is named '{name}'.")
            results[name] = float(value)
        return results
