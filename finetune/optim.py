"""Optimizer and learning-rate schedule factories keyed by config names."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn
from transformers import get_scheduler

from finetune.config import OptimizerConfig, SchedulerConfig


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # Biases and normalisation weights are never decayed; neither is an embedding matrix whose
    # frozen rows must stay bit-identical while new token rows train.
    is_norm = "norm" in name.lower() or name.endswith("_ln.weight")
    return param.ndim < 2 or name.endswith(".bias") or is_norm or getattr(param, "_finetune_partial", False)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr: float,
    layer_decay: Optional[float] = None,
    depths: Optional[Dict[str, int]] = None,
    include_frozen: bool = False,
) -> List[dict]:
    """Parameter groups: (no) weight decay, and with ``layer_decay`` one rate per depth
    (lr * layer_decay ** (max_depth - depth)). ``include_frozen`` adds parameters that are frozen
    now but may be unfrozen later (they get no gradient, so the optimizer leaves them alone)."""
    groups: Dict[tuple, dict] = {}
    top = max(depths.values()) if depths else 0
    for name, param in model.named_parameters():
        if not (param.requires_grad or include_frozen):
            continue
        depth = depths.get(name, top) if (layer_decay and depths) else top
        scale = layer_decay ** (top - depth) if layer_decay else 1.0
        decay = 0.0 if _no_decay(name, param) else weight_decay
        key = (scale, decay)
        group = groups.setdefault(key, {"params": [], "names": [], "weight_decay": decay, "lr": lr * scale})
        group["params"].append(param)
        group["names"].append(name)
    return sorted(groups.values(), key=lambda g: (g["lr"], g["weight_decay"]))


def build_optimizer(
    model: nn.Module,
    cfg: OptimizerConfig,
    lr: float,
    depths: Optional[Dict[str, int]] = None,
    include_frozen: bool = False,
) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, lr, cfg.layer_decay, depths, include_frozen)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)


def optimizer_param_names(optimizer: torch.optim.Optimizer) -> set:
    return {n for g in optimizer.param_groups for n in g.get("names", [])}


def warmup_steps(cfg: SchedulerConfig, total_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return int(round(cfg.warmup_ratio * total_steps))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, total_steps: int):
    """A transformers schedule stepped once per optimizer step (each group keeps its own peak lr)."""
    return get_scheduler(
        cfg.name.value,
        optimizer,
        num_warmup_steps=warmup_steps(cfg, total_steps),
        num_training_steps=total_steps,
    )
