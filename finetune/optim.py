"""Optimizer and learning-rate schedule factories keyed by config names."""

from __future__ import annotations

from typing import List

import torch
from torch import nn
from transformers import get_scheduler

from finetune.config import OptimizerConfig, SchedulerConfig


def param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """Trainable parameters split so that biases and normalisation weights get no weight decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_norm = "norm" in name.lower() or name.endswith("_ln.weight")
        (no_decay if param.ndim < 2 or name.endswith(".bias") or is_norm else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)


def warmup_steps(cfg: SchedulerConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return int(round(cfg.warmup_ratio * total_steps))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, total_steps: int):
    """A transformers schedule stepped once per optimizer step."""
    return get_scheduler(
        cfg.name.value,
        optimizer,
        num_warmup_steps=warmup_steps(cfg, total_steps),
        num_training_steps=total_steps,
    )
