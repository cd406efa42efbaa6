"""THE training loop: one function, read top to bottom."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from finetune.batching import ROW_INDEX
from finetune.data import TEACHER_LOGITS
from finetune.windows import DOCUMENT
from finetune.checkpoint import BEST_STATE, checkpoints_dir, load_checkpoint, save_checkpoint, set_aside_later_checkpoints
from finetune.config import FinetuneConfig, FinetuneError, Mode, NanPolicy, learning_rate
from finetune.metrics import MetricSuite, tune_threshold, uses_threshold
from finetune.engine import (
    MIN_LOSS_SCALE,
    BestWeights,
    StepWindow,
    StopRequest,
    WindowStats,
    active_scaler,
    all_finite,
    full_precision,
    grad_norm,
    optimizer_step,
)
from finetune.model import layer_depths, unfreeze_next_layer
from finetune.tasks import get_task
from finetune.optim import body_lr, build_optimizer, build_scheduler, is_plateau, l1_penalty, optimizer_param_names

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class NonFiniteLossError(FinetuneError):
    """The loss or the gradients became NaN / inf."""


class TrainingInterrupted(FinetuneError):
    """SIGTERM / SIGINT: the run stopped after writing a checkpoint."""

    exit_code = 130


@dataclass
class EvalOutput:
    metrics: Dict[str, float]
    logits: np.ndarray
    labels: np.ndarray


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    best_value: Optional[float] = None
    bad_evals: int = 0
    best: Optional[dict] = None
    history: List[dict] = field(default_factory=list)
    stopped_early: bool = False
    skipped_steps: int = 0
    scaler_skipped_steps: int = 0  # fp16 steps the loss scaler skipped (gradient overflow)
    batch_size: Optional[int] = None  # per process; train.batch_size=auto reuses it on resume
    losses: List[list] = field(default_factory=list)  # [step, training loss of that step]
    unfrozen: List[str] = field(default_factory=list)  # modules made trainable by gradual unfreezing


@dataclass
class TrainResult:
    model: nn.Module  # as prepared by the accelerator, holding the best weights
    history: List[dict] = field(default_factory=list)
    best: Optional[dict] = None
    test: Optional[dict] = None
    steps: int = 0
    stopped_early: bool = False
    skipped_steps: int = 0
    scaler_skipped_steps: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0  # part of train_seconds spent evaluating
    losses: List[list] = field(default_factory=list)
    validation: Optional[EvalOutput] = None
    test_output: Optional[EvalOutput] = None
    threshold: float = 0.5
    calibration: Optional[dict] = None  # eval.calibrate: the temperature, ECE and NLL before / after
    mixed_precision: str = "no"  # what training (and its evaluations) ran in; final outputs are fp32


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    accelerator: Accelerator,
    suite: MetricSuite,
    loss_fn: LossFn,
    threshold: float = 0.5,
    window_pool: str = "mean",
) -> EvalOutput:
    """Metrics over a whole split, gathered from every process without padded duplicates; the
    logits come back in dataset order (batches may be sorted by length, see batching.eval_loader).
    Windows of long documents (data.long_text=window) are pooled into one row per document after
    the gather, so that a document split across processes is still counted once."""
    model.eval()
    task = get_task(suite.task)
    all_logits, all_labels, all_rows, all_docs = [], [], [], []
    for batch in loader:
        labels = batch.pop("labels")
        rows = batch.pop(ROW_INDEX, None)
        docs = batch.pop(DOCUMENT, None)
        logits, labels = task.batch_outputs(model(**batch).logits, labels, accelerator)
        extra = tuple(x for x in (rows, docs) if x is not None)
        # Kept on the device and copied to the host once per split: a copy per batch would make
        # the host wait for every batch's forward before queueing the next.
        gathered = accelerator.gather_for_metrics((logits.float(), labels) + extra)
        all_logits.append(gathered[0])
        all_labels.append(gathered[1])
        if rows is not None:
            all_rows.append(gathered[2])
        if docs is not None:
            all_docs.append(gathered[-1])
    model.train()
    # Per-token outputs of batches of different lengths are padded to the longest (the task says how).
    logits, labels = task.join_outputs(all_logits, 0.0).cpu(), task.join_outputs(all_labels, task.label_pad_id or 0).cpu()
    rows = torch.cat(all_rows).cpu() if all_rows else None
    docs = torch.cat(all_docs).cpu() if all_docs else None
    if rows is not None:  # back to dataset order
        order = torch.argsort(rows)
        logits, labels = logits[order], labels[order]
        docs = docs[order] if docs is not None else None
    if docs is not None:  # one row per document (or sentence): the task joins its windows
        pooled, pooled_labels = task.pool_outputs(logits.numpy(), labels.numpy(), docs.numpy(), window_pool)
        logits, labels = torch.from_numpy(pooled), torch.from_numpy(pooled_labels)
    metrics = suite.compute(logits.numpy(), labels.numpy(), threshold)
    metrics["loss"] = loss_fn(logits, labels).item()
    return EvalOutput(metrics=metrics, logits=logits.numpy(), labels=labels.numpy())


def _improved(value: float, best: Optional[float], mode: Mode, min_delta: float) -> bool:
    if best is None or math.isnan(best):
        return not math.isnan(value)
    return value > best + min_delta if mode == Mode.max else value < best - min_delta


def compile_blocks(model: nn.Module, backend: str) -> None:
    """Regional torch.compile in place: every repeated block (encoder layer) and each remaining
    leaf module compiled with dynamic shapes, so one compilation serves all layers and batch
    lengths, and state-dict names (checkpoints, saved models) stay those of the eager model."""
    from accelerate.utils import compile_regions_deepspeed  # the in-place variant; works on any module

    compile_regions_deepspeed(model, backend=backend, dynamic=True)


def train(
    cfg: FinetuneConfig,
    model: nn.Module,
    loaders: Dict[str, DataLoader],
    suite: MetricSuite,
    accelerator: Accelerator,
    loss_fn: LossFn,
    output_dir: Path,
    resume_from: Optional[Path] = None,
    log_prefix: str = "",
) -> TrainResult:
    """Fine-tune ``model``; keep the weights of the best evaluation; evaluate them on test."""
    t, es, ck = cfg.train, cfg.early_stopping, cfg.checkpoint
    threshold = cfg.eval.threshold
    pool = cfg.data.window_pool.value  # how evaluation pools the windows of a long document
    lr = learning_rate(cfg)
    unfreeze_every = cfg.model.unfreeze_schedule
    depths = layer_depths(model) if cfg.optimizer.layer_decay else None
    # With gradual unfreezing the optimizer holds the frozen layers from the start.
    optimizer = build_optimizer(model, cfg.optimizer, lr, depths, bool(unfreeze_every), accelerator.device)
    trained_names = optimizer_param_names(optimizer)

    # Steps are counted per process after sharding, in optimizer steps (after accumulation).
    train_loader, eval_loader = loaders["train"], loaders["validation"]
    # Our batch sampler, which accelerate wraps (and does not forward set_epoch to) across processes.
    batch_sampler = train_loader.batch_sampler
    accum = accelerator.gradient_accumulation_steps
    steps_per_epoch = math.ceil(math.ceil(len(train_loader) / accelerator.num_processes) / accum)
    total_steps = t.max_steps if t.max_steps else t.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    if t.compile:
        compile_blocks(model, t.compile_backend)
    # The schedule is stepped by hand once per optimizer step, so it is not given to prepare().
    scheduler = build_scheduler(optimizer, cfg.scheduler, total_steps, mode=es.mode.value)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    test_loader = accelerator.prepare(loaders["test"]) if "test" in loaders else None

    state, best_output = TrainState(), None
    best = BestWeights(accelerator, checkpoints_dir(output_dir) / BEST_STATE, trained_names)
    scaler = active_scaler(accelerator)
    saved_best = None
    if resume_from is not None:
        saved, saved_best = load_checkpoint(accelerator, resume_from, scheduler)
        state = TrainState(**saved)
        for name in state.unfrozen:  # gradual unfreezing done before the checkpoint
            accelerator.unwrap_model(model).get_submodule(name).requires_grad_(True)
        logger.info("Resumed from %s: step %d, epoch %d, batch %d.", resume_from, state.step, state.epoch + 1,
                    state.batches_in_epoch)  # fmt: skip
    best.start(saved_best, state.best, resume_from)  # the checkpoint's best, or none when starting afresh
    if accelerator.is_main_process:
        set_aside_later_checkpoints(output_dir, resume_from, state.step)
    state.batch_size = batch_sampler.batch_size
    logger.info(
        "Training: %d epoch(s), %d optimizer steps (%d per epoch), %d process(es), batch %d per process "
        "x %d accumulation = %d per step, peak lr %.2e",
        epochs, total_steps, steps_per_epoch, accelerator.num_processes, batch_sampler.batch_size,
        accum, batch_sampler.batch_size * accum * accelerator.num_processes, lr,
    )  # fmt: skip

    def current_lr() -> float:
        return body_lr(optimizer)

    start, eval_seconds = time.perf_counter(), 0.0
    # Per-step values stay on the device; they are read (one host sync) at log points and before
    # every evaluation or checkpoint, so no non-finite weights are ever evaluated, kept or saved.
    window = StepWindow(accelerator.device)
    tick, eval_at_tick = start, 0.0
    model.train()
    with StopRequest(accelerator.num_processes) as stop:
        for epoch in range(state.epoch, epochs):
            if state.step >= total_steps or state.stopped_early:  # also a run resumed at its end
                break
            if state.epoch != epoch:
                state.epoch, state.batches_in_epoch = epoch, 0
            train_loader.set_epoch(epoch)
            batch_sampler.set_epoch(epoch)
            if unfreeze_every and epoch > 0 and epoch % unfreeze_every == 0 and state.batches_in_epoch == 0:
                unfrozen = unfreeze_next_layer(accelerator.unwrap_model(model))
                if unfrozen:
                    state.unfrozen.append(unfrozen)
                    logger.info("Gradual unfreezing (epoch %d): %s is now trained.", epoch + 1, unfrozen)
            loader = train_loader
            if state.batches_in_epoch:  # resuming mid-epoch: skip what was already trained on
                loader = accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
            # The steps this epoch makes: all of its own, or those train.max_steps leaves it.
            bar = tqdm(total=min(steps_per_epoch, total_steps - epoch * steps_per_epoch),
                       initial=state.step - epoch * steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs}",
                       disable=not accelerator.is_local_main_process)  # fmt: skip
            for batch in loader:
                state.batches_in_epoch += 1
                with accelerator.accumulate(model):
                    labels = batch.pop("labels")
                    teacher = batch.pop(TEACHER_LOGITS, None)  # distill.teacher: loss_fn is distill.distillation_loss
                    logits = model(**batch).logits
                    loss = loss_fn(logits.float(), labels) if teacher is None else loss_fn(logits.float(), labels, teacher)
                    if cfg.optimizer.l1:
                        loss = loss + cfg.optimizer.l1 * l1_penalty(optimizer)
                    accelerator.backward(loss)
                    window.add_batch(loss, batch)
                    if accelerator.sync_gradients:
                        # The gradient norm is all-reduced, so every process takes the same decision.
                        norm = grad_norm(accelerator, model, t.max_grad_norm)
                        bad = window.end_step(state.step + 1, current_lr(), norm, scaler is not None)
                        optimizer_step(optimizer, bad, t.nan_policy == NanPolicy.skip_step, scaler)
                        optimizer.zero_grad(set_to_none=True)
                if not accelerator.sync_gradients:
                    continue

                # One optimizer step done (or skipped by the loss scaler / nan_policy=skip_step).
                if not is_plateau(scheduler):
                    scheduler.step()
                state.step += 1
                bar.update(1)
                end_of_epoch = state.step % steps_per_epoch == 0
                last = state.step >= total_steps
                due = (t.eval_every is None and end_of_epoch) or (t.eval_every is not None and state.step % t.eval_every == 0)
                evaluated = due or last
                stopping = stop.now  # one process; several decide together at the flush below
                checkpoint_due = (evaluated and ck.at_eval) or (ck.every and state.step % ck.every == 0) or stopping
                if state.step % t.log_every == 0 or evaluated or checkpoint_due:
                    stats = window.flush(accelerator, scaler, stop.requested)
                    stopping = stats.stop  # any process's request: the same on every process
                    checkpoint_due = checkpoint_due or stopping
                    now = time.perf_counter()
                    seconds = max(now - tick - (eval_seconds - eval_at_tick), 1e-9)
                    tick, eval_at_tick = now, eval_seconds
                    _account_window(stats, state, t.nan_policy, epoch, lr, output_dir)
                    _log_window(stats, seconds, state, accelerator, bar, log_prefix)

                if evaluated:
                    eval_start = time.perf_counter()
                    out = evaluate(model, eval_loader, accelerator, suite, loss_fn, threshold, pool)
                    eval_seconds += time.perf_counter() - eval_start
                    record = {"step": state.step, "epoch": round(state.step / steps_per_epoch, 4), **out.metrics}
                    state.history.append(record)
                    logger.info("eval @ step %d: %s", state.step, _fmt(out.metrics))
                    accelerator.log({f"{log_prefix}eval/{k}": v for k, v in out.metrics.items()}, step=state.step)
                    value = out.metrics[es.metric]
                    if is_plateau(scheduler):
                        scheduler.step(value)
                    if _improved(value, state.best_value, es.mode, es.min_delta):
                        state.best_value, state.bad_evals, state.best = value, 0, record
                        best.keep(model)
                        best_output = out
                    else:
                        state.bad_evals += 1
                    # Every process computed the same gathered metrics, so they all agree to stop.
                    if es.patience is not None and state.bad_evals >= es.patience:
                        logger.info("Early stopping: %s did not improve for %d evaluations.", es.metric, state.bad_evals)
                        state.stopped_early = True

                if checkpoint_due:
                    _check_finite_weights(model, accelerator, state, output_dir)
                    path = save_checkpoint(accelerator, output_dir, asdict(state), scheduler, best.saved, ck.keep_last)
                    if stopping:
                        raise TrainingInterrupted(
                            f"{stop.signal or 'SIGTERM / SIGINT (to another process)'} received: stopped after step "
                            f"{state.step} and saved {path}. "
                            "Continue with the same command plus resume=auto (same output_dir)."
                        )
                if last or state.stopped_early:
                    break
            bar.close()

    result = TrainResult(model=model, history=state.history, best=state.best, steps=state.step,
                         stopped_early=state.stopped_early, skipped_steps=state.skipped_steps,
                         scaler_skipped_steps=state.scaler_skipped_steps,
                         train_seconds=time.perf_counter() - start, eval_seconds=eval_seconds,
                         losses=state.losses, mixed_precision=accelerator.mixed_precision)  # fmt: skip
    # Evaluations during training run as training does (under autocast when mixed precision is on,
    # for speed); the final validation and test outputs describe the model as it is saved and
    # served, so they are computed in full precision: its tables, metrics.json's best / test,
    # finetune.predict and pipeline() on model/ then agree on every machine.
    autocast = accelerator.mixed_precision != "no"
    if best.kept:
        best.restore(model)
        logger.info("Best %s = %.4f at step %d; those weights are kept.", es.metric, state.best_value, state.best["step"])
        # The best evaluation's outputs, or (after a resume, or when it ran under autocast) the same
        # computed anew in full precision.
        result.validation = None if autocast else best_output
        if result.validation is None:
            with full_precision(accelerator, model):
                result.validation = evaluate(model, eval_loader, accelerator, suite, loss_fn, threshold, pool)
        if autocast:  # metrics.json's best: the saved model's; `history` keeps those measured in training
            result.best = {**state.best, **result.validation.metrics}
            logger.info("Validation of the kept weights in full precision (fp32; evaluations during training "
                        "ran under %s autocast): %s", accelerator.mixed_precision, _fmt(result.validation.metrics))
        if cfg.eval.tune_threshold:
            threshold = _tuned_threshold(cfg, suite, result.validation, threshold)
            v = result.validation
            metrics = {**suite.compute(v.logits, v.labels, threshold), "loss": v.metrics["loss"]}
            result.validation = EvalOutput(metrics=metrics, logits=v.logits, labels=v.labels)
    result.threshold = threshold
    if test_loader is not None:
        with full_precision(accelerator, model):
            result.test_output = evaluate(model, test_loader, accelerator, suite, loss_fn, threshold, pool)
        result.test = result.test_output.metrics
        logger.info("test: %s", _fmt(result.test))
    return result


def _account_window(stats: WindowStats, state: TrainState, policy: NanPolicy, epoch: int, lr: float,
                    output_dir: Path) -> None:  # fmt: skip
    """Non-finite steps and loss-scaler overflows of one log window; stop where the run cannot go on."""
    state.scaler_skipped_steps += stats.overflow_steps
    if stats.overflow_steps:
        logger.info("fp16 loss scaler: %d overflowing step(s) skipped by step %d (scale now %g).",
                    stats.overflow_steps, stats.steps[-1], stats.loss_scale)  # fmt: skip
    if stats.bad_steps and policy == NanPolicy.stop:
        raise NonFiniteLossError(
            f"the loss or its gradients became non-finite at step {stats.bad_steps[0]} (epoch {epoch + 1}); "
            f"training stopped. The last good checkpoint is kept under {checkpoints_dir(output_dir)}. Lower "
            f"train.lr (now {lr:g}), keep gradient clipping on (train.max_grad_norm), or set train.nan_policy=skip_step."
        )
    if stats.bad_steps:
        state.skipped_steps += len(stats.bad_steps)
        logger.warning("Non-finite loss/gradients at step(s) %s: skipped.", ", ".join(map(str, stats.bad_steps)))
    if stats.loss_scale is not None and stats.loss_scale < MIN_LOSS_SCALE:
        raise NonFiniteLossError(
            f"the fp16 loss scale fell to {stats.loss_scale:g} by step {stats.steps[-1]}: the gradients overflow "
            "fp16 at nearly every step, so training makes no progress. Use train.mixed_precision=bf16 (where "
            "the GPU has it) or no, or lower train.lr."
        )


def _log_window(stats: WindowStats, seconds: float, state: TrainState, accelerator: Accelerator, bar,
                log_prefix: str) -> None:  # fmt: skip
    """Per-step values of one window to the trackers, the progress bar and the log."""
    tokens_per_s = stats.tokens / seconds
    for i, step in enumerate(stats.steps):
        logged = {"train/loss": stats.losses[i], "train/lr": stats.lrs[i]}
        if stats.norms[i] is not None:
            logged["train/grad_norm"] = stats.norms[i]
        if step == stats.steps[-1]:
            logged["train/tokens_per_s"] = tokens_per_s
        accelerator.log({log_prefix + k: v for k, v in logged.items()}, step=step)
        state.losses.append([step, stats.losses[i]])
    mean_loss = sum(stats.losses) / len(stats.losses)
    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{stats.lrs[-1]:.2e}", tok_s=f"{tokens_per_s:.0f}")
    logger.info("step %d  loss %.4f  lr %.3e  %.0f tokens/s", state.step, mean_loss, stats.lrs[-1], tokens_per_s)


def _tuned_threshold(cfg: FinetuneConfig, suite: MetricSuite, validation: EvalOutput, default: float) -> float:
    metric = cfg.early_stopping.metric
    if not uses_threshold(suite.task, suite.num_labels) or metric == "loss":
        logger.info("eval.tune_threshold: %s with %s has no threshold to tune; keeping %.2f.", suite.task, metric, default)
        return default
    tuned = tune_threshold(suite, validation.logits, validation.labels, metric, cfg.early_stopping.mode == Mode.max)
    logger.info("eval.tune_threshold: threshold %.2f maximises validation %s.", tuned, metric)
    return tuned


def _check_finite_weights(model: nn.Module, accelerator: Accelerator, state: TrainState, output_dir: Path) -> None:
    """Never write a checkpoint holding NaN / inf weights: the previous one stays the last good one.
    Decided over every process's shard with one host read, so all processes raise or none does."""
    if not all_finite(accelerator, model.parameters()):
        raise NonFiniteLossError(
            f"the weights became non-finite by step {state.step}; training stopped without checkpointing them. "
            f"The last good checkpoint is kept under {checkpoints_dir(output_dir)}. Lower train.lr."
        )


def _fmt(metrics: Dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
