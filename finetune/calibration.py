"""Temperature scaling (Guo et al., 2017): one temperature T fitted on the validation logits by
minimising their negative log-likelihood, then folded into the classification head (its last
Linear layer's weight and bias divided by T), so that every loader of the saved model
(``from_pretrained``, ``pipeline``, PEFT, ONNX) returns calibrated probabilities with no extra code.

Dividing all logits by one T > 0 keeps their order, so argmax predictions (and multi-label
predictions at threshold 0.5) do not change; only the confidence does. A binary threshold t != 0.5
keeps its decisions only when mapped with T (``mapped_threshold``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from finetune.config import FinetuneError
from finetune.metrics import scores_from_logits
from finetune.tasks import get_task
from finetune.validation import calibration_problem

ECE_BINS = 15
# A validation set the model classifies perfectly pulls T towards 0 without end (every logit
# made infinitely sure is still right); T stays in this range.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0


class CalibrationError(FinetuneError):
    """A model or task that temperature scaling cannot be applied to."""


def nll(logits, labels, task: str) -> float:
    """Mean negative log-likelihood: cross-entropy (single-label) or per-label binary
    cross-entropy with logits over every (row, label) pair (multi-label)."""
    z, y = _tensors(logits, labels, task)
    return float(_nll(z, y, task))


def _tensors(logits, labels, task: str) -> Tuple[torch.Tensor, torch.Tensor]:
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels))
    return z, get_task(task).calibration_targets(y)


def _nll(z: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    return get_task(task).nll(z, y)


def fit_temperature(logits, labels, task: str) -> float:
    """The temperature T > 0 that minimises the NLL of ``logits / T`` (float64, L-BFGS over log T,
    so T stays positive). Single-label: softmax cross-entropy; multi-label: one T for every label,
    on the sigmoid binary cross-entropy. Never worse on these logits than T = 1."""
    problem = calibration_problem(task)
    if problem:
        raise CalibrationError(problem)
    z, y = _tensors(logits, labels, task)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, tolerance_grad=1e-10, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        optimizer.zero_grad()
        loss = _nll(z / log_t.exp(), y, task)
        loss.backward()
        return loss

    optimizer.step(closure)
    value = float(log_t.detach().exp())
    t = min(max(value, MIN_TEMPERATURE), MAX_TEMPERATURE) if math.isfinite(value) else 1.0
    with torch.no_grad():
        if _nll(z / t, y, task) > _nll(z, y, task):  # the NLL in 1/T is convex; this only guards the optimiser
            return 1.0
    return t


def _confidence_and_outcome(logits, labels, task: str) -> Tuple[np.ndarray, np.ndarray]:
    """What each probability claims and whether it came true: the top class's probability and
    whether it is the gold class (single-label), or every (row, label) probability and whether
    the row has that label (multi-label)."""
    return get_task(task).confidence_and_outcome(scores_from_logits(logits, task), np.asarray(labels))


def reliability_bins(logits, labels, task: str, bins: int = ECE_BINS) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per equal-width confidence bin over [0, 1]: mean confidence, observed frequency (accuracy),
    and the number of predictions in it (empty bins: NaN, NaN, 0)."""
    confidence, outcome = _confidence_and_outcome(logits, labels, task)
    # Bin b holds (b/bins, (b+1)/bins]; a confidence of exactly 0 goes to the first bin.
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=confidence, minlength=bins) / counts
        frequency = np.bincount(index, weights=outcome, minlength=bins) / counts
    return mean_conf, frequency, counts


def expected_calibration_error(logits, labels, task: str, bins: int = ECE_BINS) -> float:
    """ECE over ``bins`` equal-width bins: sum over bins of |bin| / n * |accuracy - confidence|.

    Single-label: the standard top-label ECE (confidence = the highest class probability, correct
    = that class is the gold one). Multi-label: the ECE of the per-label probabilities, over every
    (row, label) pair (confidence = P(label), outcome = the row has the label)."""
    mean_conf, frequency, counts = reliability_bins(logits, labels, task, bins)
    filled = counts > 0
    return float(np.sum(counts[filled] / counts.sum() * np.abs(frequency[filled] - mean_conf[filled])))


@dataclass
class Calibration:
    """The metrics.json ``calibration`` block (validation split)."""

    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    bins: int = ECE_BINS
    # Tasks decided by a threshold (binary, multi-label): the uncalibrated model's and the saved one's.
    threshold_before: Optional[float] = None
    threshold_after: Optional[float] = None

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def calibrate(logits, labels, task: str) -> Calibration:
    """Fit T on these validation logits; ECE and NLL before and after."""
    t = fit_temperature(logits, labels, task)
    scaled = np.asarray(logits, dtype=np.float64) / t
    return Calibration(
        temperature=t,
        ece_before=expected_calibration_error(logits, labels, task),
        ece_after=expected_calibration_error(scaled, labels, task),
        nll_before=nll(logits, labels, task),
        nll_after=nll(scaled, labels, task),
    )


def mapped_threshold(threshold: float, temperature: float) -> float:
    """The threshold on sigmoid(z / T) that decides exactly as ``threshold`` on sigmoid(z):
    sigmoid(logit(threshold) / T). Binary softmax is the sigmoid of z1 - z0, so it maps P(class 1)
    thresholds too."""
    return float(1.0 / (1.0 + math.exp(-math.log(threshold / (1.0 - threshold)) / temperature)))


# ---------------------------------------------------------------------------------------------
# Folding T into the head
# ---------------------------------------------------------------------------------------------
def head_linear(model: nn.Module) -> nn.Linear:
    """The Linear layer that produces the logits: the last ``nn.Linear`` with ``num_labels``
    outputs in the classification head (BERT / DistilBERT / ModernBERT ``classifier``, RoBERTa
    ``classifier.out_proj``). Under PEFT, the trained copy in ``modules_to_save`` (the one
    forward uses and the adapter saves), never the frozen original.

    Raises CalibrationError when there is none, or when an adapter layer (LoRA, IA3, ...) wraps it:
    T could not be folded into the adapter's own weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    num_labels = base.config.num_labels
    found: List[Tuple[str, nn.Module]] = []

    def visit(module: nn.Module, name: str) -> None:
        if isinstance(module, ModulesToSaveWrapper):
            adapter = module.active_adapters[0]
            visit(module.modules_to_save[adapter], f"{name}.modules_to_save.{adapter}")
        elif isinstance(module, BaseTunerLayer):
            found.append((name, module))
        elif isinstance(module, nn.Linear):
            found.append((name, module))
        else:
            for child_name, child in module.named_children():
                visit(child, f"{name}.{child_name}" if name else child_name)

    for child_name, child in base.named_children():
        if child_name != base.base_model_prefix:  # the encoder's own Linear layers are no head
            visit(child, child_name)
    found = [(n, m) for n, m in found if _out_features(m) == num_labels]
    if not found:
        raise CalibrationError(
            f"eval.calibrate=temperature: no Linear layer with num_labels={num_labels} outputs in the "
            f"classification head of {type(base).__name__}, so the temperature cannot be folded into it. "
            "Set eval.calibrate=none for this architecture."
        )
    name, layer = found[-1]
    if not isinstance(layer, nn.Linear):
        raise CalibrationError(
            f"eval.calibrate=temperature: the head's output layer '{name}' carries an adapter "
            f"({type(layer).__module__}.{type(layer).__name__}), whose weights T cannot be folded into. Leave it out of "
            "adapter.target_modules (the head is trained in full through modules_to_save), or set eval.calibrate=none."
        )
    return layer


def _out_features(module: nn.Module) -> Optional[int]:
    layer = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return getattr(layer, "out_features", None)


@torch.no_grad()
def fold_temperature(model: nn.Module, temperature: float) -> None:
    """Divide the weight and bias of the head's output layer by ``temperature``, in place: the
    model's logits become logits / T."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    layer = head_linear(model)
    layer.weight.div_(temperature)
    if layer.bias is not None:
        layer.bias.div_(temperature)
