"""Loss functions keyed by config name, matched to the task."""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from finetune.config import FinetuneError, LossConfig, LossName
from finetune.tasks import Task, get_task

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class LossError(FinetuneError):
    """A loss that does not fit the task or the data."""


def resolve_loss_name(cfg: LossConfig, task: str) -> LossName:
    """loss=auto -> the task's default (``Task.losses``); any other name must fit the task."""
    return get_task(task).resolve_loss_name(cfg)


def inverse_frequency(counts: Sequence[int]) -> List[float]:
    """Class weights n / (K * n_c): each class contributes equally to the loss (sklearn 'balanced')."""
    total, k = float(sum(counts)), len(counts)
    return [total / (k * c) if c > 0 else 0.0 for c in counts]


class PerDevice:
    """A constant tensor (class weights, pos_weight) copied to each device once, on first use:
    the loss runs on the training device every step and on the CPU for gathered evaluation
    logits, and a copy per call would be a host-to-device transfer per step."""

    def __init__(self, values: Sequence[float]):
        self._copies = {torch.device("cpu"): torch.tensor(list(values), dtype=torch.float32)}

    def on(self, device: torch.device) -> torch.Tensor:
        if device not in self._copies:
            self._copies[device] = self._copies[torch.device("cpu")].to(device)
        return self._copies[device]


def _weights(value, counts: Sequence[int], key: str) -> Optional[PerDevice]:
    if value is None:
        return None
    weights = inverse_frequency(counts) if value == "auto" else list(value)
    if len(weights) != len(counts):
        raise LossError(f"loss.{key} has {len(weights)} values but the task has {len(counts)} labels.")
    return PerDevice(weights)


def focal_loss(logits, labels, gamma: float, weight: Optional[torch.Tensor] = None, multi_label: bool = False):
    """Focal loss (Lin et al., 2017): the per-example loss scaled by (1 - p_t)^gamma; ``weight`` is
    the per-class alpha, on the logits' device."""
    if multi_label:
        targets = labels.float()
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        p_t = torch.exp(-bce)
        loss = (1 - p_t) ** gamma * bce
        if weight is not None:
            loss = loss * weight
        return loss.mean()
    ce = F.cross_entropy(logits, labels, reduction="none")
    p_t = torch.exp(-ce)
    loss = (1 - p_t) ** gamma * ce
    if weight is not None:
        loss = loss * weight[labels]
    return loss.mean()


def build_loss(cfg: LossConfig, task_name: str, class_counts: Sequence[int], num_examples: int = 0) -> LossFn:
    """``loss_fn(logits, labels) -> scalar``. ``class_counts``: training examples per label
    (positives per label for multi-label, tagged words per tag for token tasks) out of
    ``num_examples``, used by ``auto`` weights."""
    task = get_task(task_name)
    loss = _task_loss(cfg, task, class_counts, num_examples)
    return lambda logits, labels: loss(*task.loss_inputs(logits, labels))


def _task_loss(cfg: LossConfig, task: Task, class_counts: Sequence[int], num_examples: int) -> LossFn:
    name = task.resolve_loss_name(cfg)
    if name == LossName.cross_entropy:
        weight = _weights(cfg.class_weights, class_counts, "class_weights")
        smoothing = cfg.label_smoothing
        return lambda logits, labels: F.cross_entropy(
            logits, labels, weight=None if weight is None else weight.on(logits.device), label_smoothing=smoothing
        )
    if name == LossName.focal:
        weight = _weights(cfg.class_weights, class_counts, "class_weights")
        multi = task.sigmoid_outputs
        return lambda logits, labels: focal_loss(
            logits, labels, cfg.gamma, None if weight is None else weight.on(logits.device), multi_label=multi
        )
    if name == LossName.bce:
        if cfg.pos_weight == "auto":
            # Negatives over positives per label, from the training split.
            pos_weight = PerDevice([(num_examples - c) / c if c > 0 else 1.0 for c in class_counts])
        else:
            pos_weight = _weights(cfg.pos_weight, class_counts, "pos_weight")
        return lambda logits, labels: F.binary_cross_entropy_with_logits(
            logits, labels.float(), pos_weight=None if pos_weight is None else pos_weight.on(logits.device)
        )

    def regression(fn):
        return lambda logits, labels: fn(logits.squeeze(-1).float(), labels.float())

    if name == LossName.mse:
        return regression(F.mse_loss)
    if name == LossName.mae:
        return regression(F.l1_loss)
    if name == LossName.huber:
        return regression(lambda x, y: F.huber_loss(x, y, delta=cfg.delta))
    return regression(lambda x, y: torch.mean(log_cosh(x - y)))


def log_cosh(x: torch.Tensor) -> torch.Tensor:
    """log(cosh(x)) computed without overflow: |x| + log1p(exp(-2|x|)) - log 2."""
    ax = x.abs()
    return ax + torch.log1p(torch.exp(-2 * ax)) - torch.log(torch.tensor(2.0, dtype=x.dtype, device=x.device))
