"""THE training loop: one function, read top to bottom."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from finetune.config import FinetuneConfig, Mode, learning_rate
from finetune.metrics import MetricSuite
from finetune.model import layer_depths, load_trainable_state, trainable_state, unfreeze_next_layer
from finetune.optim import build_optimizer, build_scheduler, optimizer_param_names

logger = logging.getLogger(__name__)


@dataclass
class EvalOutput:
    metrics: Dict[str, float]
    logits: np.ndarray
    labels: np.ndarray


@dataclass
class TrainResult:
    model: nn.Module  # as prepared by the accelerator, holding the best weights
    history: List[dict] = field(default_factory=list)
    best: Optional[dict] = None
    test: Optional[dict] = None
    steps: int = 0
    stopped_early: bool = False
    train_seconds: float = 0.0
    validation: Optional[EvalOutput] = None
    test_output: Optional[EvalOutput] = None


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, accelerator: Accelerator, suite: MetricSuite) -> EvalOutput:
    """Metrics over a whole split, gathered from every process without padded duplicates."""
    model.eval()
    all_logits, all_labels = [], []
    for batch in loader:
        labels = batch.pop("labels")
        logits = model(**batch).logits
        logits, labels = accelerator.gather_for_metrics((logits.float(), labels))
        all_logits.append(logits.cpu())
        all_labels.append(labels.cpu())
    model.train()
    logits = torch.cat(all_logits)
    labels = torch.cat(all_labels)
    metrics = suite.compute(logits.argmax(-1).numpy(), labels.numpy())
    metrics["loss"] = F.cross_entropy(logits, labels).item()
    return EvalOutput(metrics=metrics, logits=logits.numpy(), labels=labels.numpy())


def _improved(value: float, best: Optional[float], mode: Mode, min_delta: float) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best + min_delta if mode == Mode.max else value < best - min_delta


def train(
    cfg: FinetuneConfig,
    model: nn.Module,
    loaders: Dict[str, DataLoader],
    suite: MetricSuite,
    accelerator: Accelerator,
) -> TrainResult:
    """Fine-tune ``model``; keep the weights of the best evaluation; evaluate them on test."""
    t, es = cfg.train, cfg.early_stopping
    lr = learning_rate(cfg)
    unfreeze_every = cfg.model.unfreeze_schedule
    depths = layer_depths(model) if cfg.optimizer.layer_decay else None
    # With gradual unfreezing the optimizer holds the frozen layers from the start.
    optimizer = build_optimizer(model, cfg.optimizer, lr, depths, include_frozen=bool(unfreeze_every))
    trained_names = optimizer_param_names(optimizer)

    # Steps are counted per process after sharding, in optimizer steps (after accumulation).
    train_loader, eval_loader = loaders["train"], loaders["validation"]
    steps_per_epoch = math.ceil(math.ceil(len(train_loader) / accelerator.num_processes) / t.gradient_accumulation_steps)
    total_steps = t.max_steps if t.max_steps else t.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    # The schedule is stepped by hand once per optimizer step, so it is not given to prepare().
    scheduler = build_scheduler(optimizer, cfg.scheduler, total_steps)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    test_loader = accelerator.prepare(loaders["test"]) if "test" in loaders else None

    logger.info(
        "Training: %d epoch(s), %d optimizer steps (%d per epoch), %d process(es), batch %d per process "
        "x %d accumulation = %d per step, peak lr %.2e",
        epochs, total_steps, steps_per_epoch, accelerator.num_processes, t.batch_size,
        t.gradient_accumulation_steps, t.batch_size * t.gradient_accumulation_steps * accelerator.num_processes, lr,
    )  # fmt: skip

    result = TrainResult(model=model)
    best_value: Optional[float] = None
    best_state = None
    bad_evals = 0
    step = 0
    start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        train_loader.set_epoch(epoch)
        if unfreeze_every and epoch > 0 and epoch % unfreeze_every == 0:
            unfrozen = unfreeze_next_layer(accelerator.unwrap_model(model))
            if unfrozen:
                logger.info("Gradual unfreezing (epoch %d): %s is now trained.", epoch + 1, unfrozen)
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs}", disable=not accelerator.is_local_main_process)
        running, seen = 0.0, 0
        for batch in train_loader:
            with accelerator.accumulate(model):
                labels = batch.pop("labels")
                logits = model(**batch).logits
                loss = F.cross_entropy(logits.float(), labels)
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            running += loss.item()
            seen += 1
            if not accelerator.sync_gradients:
                continue

            # One optimizer step done.
            scheduler.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{running / seen:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if step % t.log_every == 0:
                logger.info("step %d  loss %.4f  lr %.3e", step, running / seen, scheduler.get_last_lr()[0])
                running, seen = 0.0, 0

            end_of_epoch = step % steps_per_epoch == 0
            last = step >= total_steps
            due = (t.eval_every is None and end_of_epoch) or (t.eval_every is not None and step % t.eval_every == 0)
            if due or last:
                out = evaluate(model, eval_loader, accelerator, suite)
                record = {"step": step, "epoch": round(step / steps_per_epoch, 4), **out.metrics}
                result.history.append(record)
                logger.info("eval @ step %d: %s", step, _fmt(out.metrics))
                value = out.metrics[es.metric]
                if _improved(value, best_value, es.mode, es.min_delta):
                    best_value, bad_evals = value, 0
                    best_state = trainable_state(accelerator.unwrap_model(model), trained_names)
                    result.best, result.validation = record, out
                else:
                    bad_evals += 1
                # Every process computed the same gathered metrics, so they all agree to stop.
                if es.patience is not None and bad_evals >= es.patience:
                    logger.info("Early stopping: %s did not improve for %d evaluations.", es.metric, bad_evals)
                    result.stopped_early = True
            if last or result.stopped_early:
                break
        bar.close()
        if step >= total_steps or result.stopped_early:
            break

    result.steps = step
    result.train_seconds = time.perf_counter() - start
    if best_state is not None:
        load_trainable_state(accelerator.unwrap_model(model), best_state)
        logger.info("Best %s = %.4f at step %d; those weights are kept.", es.metric, best_value, result.best["step"])
    if test_loader is not None:
        result.test_output = evaluate(model, test_loader, accelerator, suite)
        result.test = result.test_output.metrics
        logger.info("test: %s", _fmt(result.test))
    return result


def _fmt(metrics: Dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
