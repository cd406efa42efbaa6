"""Cross-field validation of a composed config: everything that types alone cannot check,
reported together in one ConfigError, before anything heavy is imported or downloaded."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path
from typing import List, Optional

from finetune.config import (
    MULTI_LABEL,
    REGRESSION,
    REPO_ID_RE,
    AdapterType,
    Calibrate,
    ConfigError,
    DataConfig,
    ExportFormat,
    FinetuneConfig,
    LongText,
    Mode,
    NanPolicy,
    OptimizerType,
    SamplerType,
    SchedulerType,
    TaskType,
    WindowPool,
)

LOWER_IS_BETTER = {"loss", "mse", "mae"}
FREEZE_RE = re.compile(r"^(none|base|embeddings|layers:\d+|regex:.+)$")
FREEZE_FORMS = "none, base, embeddings, layers:N (N = 0..number of layers), regex:PATTERN"


def validate(cfg: FinetuneConfig) -> None:
    """Check everything that types alone cannot; raise one ConfigError listing every problem."""
    problems: List[str] = []
    d, t, a, es = cfg.data, cfg.train, cfg.adapter, cfg.early_stopping

    m = cfg.model
    if m.name_or_path.startswith(("/", "./", "../", "~")) and not Path(m.name_or_path).expanduser().is_dir():
        problems.append(
            f"model.name_or_path='{m.name_or_path}' is not a folder; give the folder save_pretrained wrote "
            "(config.json, weights, tokenizer) or a Hub model id (e.g. bert-base-uncased)."
        )
    if not FREEZE_RE.match(m.freeze):
        problems.append(f"model.freeze='{m.freeze}' is not a freeze strategy; valid: {FREEZE_FORMS}.")
    elif m.freeze.startswith("regex:"):
        try:
            re.compile(m.freeze[len("regex:"):])
        except re.error as err:
            problems.append(f"model.freeze='{m.freeze}': the pattern does not compile ({err}).")
    if a.type != AdapterType.none and m.freeze != "none":
        problems.append(
            f"model.freeze='{m.freeze}' with adapter={a.type.value}: an adapter already freezes the "
            "base model; set model.freeze=none."
        )
    if m.unfreeze_schedule is not None:
        if m.unfreeze_schedule < 1:
            problems.append(f"model.unfreeze_schedule={m.unfreeze_schedule} must be >= 1 (epochs between unfreezes).")
        if m.freeze == "none" or a.type != AdapterType.none:
            problems.append(
                "model.unfreeze_schedule needs frozen layers to unfreeze: set model.freeze=base or layers:N "
                "(and adapter=none)."
            )
    if m.head_dropout is not None and not 0.0 <= m.head_dropout < 1.0:
        problems.append(f"model.head_dropout={m.head_dropout} must be in [0, 1).")
    if m.add_tokens and a.type not in (AdapterType.none, AdapterType.lora):
        problems.append(
            f"model.add_tokens with adapter={a.type.value}: new token rows can be trained with adapter=none or "
            "adapter=lora only."
        )
    if cfg.save.merge_adapter and a.type == AdapterType.none:
        problems.append("save.merge_adapter=true needs an adapter (adapter=lora, ia3 or peft).")
    if cfg.save.export != ExportFormat.none:  # found now, not after hours of training
        missing = [p for p in ("onnxruntime", "onnxscript") if importlib.util.find_spec(p) is None]
        if missing:
            problems.append(
                f"save.export={cfg.save.export.value} needs {' and '.join(missing)}, which is not installed: "
                "pip install -e \".[export]\" (the dev extra has it too), or save.export=none."
            )
    ld = cfg.optimizer.layer_decay
    if ld is not None and not 0.0 < ld <= 1.0:
        problems.append(f"optimizer.layer_decay={ld} must be in (0, 1].")
    if ld is not None and a.type != AdapterType.none:
        problems.append(f"optimizer.layer_decay with adapter={a.type.value}: layer-wise decay is for full or partial fine-tuning (adapter=none).")

    if d.dataset is None and d.train_file is None:
        problems.append("data: no training data; set data.dataset (a Hub dataset) or data.train_file (a local file).")
    if d.dataset is not None and d.train_file is not None:
        problems.append(
            f"data: both data.dataset='{d.dataset}' and data.train_file='{d.train_file}' are set; choose one."
        )
    for key in ("train_file", "validation_file", "test_file"):
        value = getattr(d, key)
        if value is not None and not Path(value).is_file():
            problems.append(f"data.{key}='{value}' does not exist or is not a file.")
    if d.max_length < 1:
        problems.append(f"data.max_length={d.max_length} must be >= 1.")
    for key in ("max_train_samples", "max_eval_samples", "max_test_samples"):
        value = getattr(d, key)
        if value is not None and value < 1:
            problems.append(f"data.{key}={value} must be >= 1 (or null for all rows).")
    if not 0.0 < d.validation_size < 1.0:
        problems.append(f"data.validation_size={d.validation_size} must be between 0 and 1.")
    if not 0.0 <= d.sampler_power <= 1.0:
        problems.append(f"data.sampler_power={d.sampler_power} must be in [0, 1] (1 = fully balanced classes).")
    if d.sampler == SamplerType.balanced and cfg.task == TaskType.regression:
        problems.append("data.sampler=balanced needs classes to balance; with task=regression use data.sampler=random.")
    for key in ("delete", "swap", "mask"):
        value = getattr(d.augment, key)
        if not 0.0 <= value < 1.0:
            problems.append(f"data.augment.{key}={value} must be in [0, 1).")
    if d.text_column == d.label_column:
        problems.append(f"data.text_column and data.label_column are both '{d.text_column}'.")
    if d.long_text == LongText.window:
        if not 0 <= d.window_stride < d.max_length:
            problems.append(
                f"data.window_stride={d.window_stride} must be >= 0 and below data.max_length={d.max_length} (it is "
                "the number of tokens consecutive windows share); e.g. data.window_stride="
                f"{max(d.max_length // 4, 0)}."
            )
        if any((d.augment.delete, d.augment.swap, d.augment.mask)):
            problems.append("data.augment with data.long_text=window is not supported yet; turn one of them off.")

    if t.epochs < 1 and not t.max_steps:
        problems.append(f"train.epochs={t.epochs} must be >= 1 (or set train.max_steps).")
    if t.max_steps is not None and t.max_steps < 1:
        problems.append(f"train.max_steps={t.max_steps} must be >= 1 (or null).")
    if not (t.batch_size == "auto" or (isinstance(t.batch_size, int) and not isinstance(t.batch_size, bool) and t.batch_size >= 1)):
        problems.append(f"train.batch_size={t.batch_size!r} must be a positive integer or auto.")
    if t.effective_batch_size < 1:
        problems.append(f"train.effective_batch_size={t.effective_batch_size} must be >= 1.")
    if t.eval_batch_size is not None and t.eval_batch_size < 1:
        problems.append(f"train.eval_batch_size={t.eval_batch_size} must be >= 1.")
    if t.compile:
        from torch._dynamo import list_backends

        backends = list_backends(exclude_tags=())
        if t.compile_backend not in backends:
            problems.append(f"train.compile_backend='{t.compile_backend}' is not a torch.compile backend; "
                            f"use one of {', '.join(backends)}.")  # fmt: skip
    if not t.lr > 0:
        problems.append(f"train.lr={t.lr} must be > 0.")
    if a.lr is not None and not a.lr > 0:
        problems.append(f"adapter.lr={a.lr} must be > 0 (or null to use train.lr).")
    if t.gradient_accumulation_steps < 1:
        problems.append(f"train.gradient_accumulation_steps={t.gradient_accumulation_steps} must be >= 1.")
    if t.eval_every is not None and t.eval_every < 1:
        problems.append(f"train.eval_every={t.eval_every} must be >= 1 (or null for once per epoch).")
    if t.max_grad_norm is not None and t.max_grad_norm <= 0:
        problems.append(f"train.max_grad_norm={t.max_grad_norm} must be > 0 (or null to disable clipping).")

    if a.type == AdapterType.peft and not a.peft_type:
        problems.append("adapter=peft needs adapter.peft_type (e.g. LOHA, LOKR, ADALORA, BOFT, VERA).")
    if a.type != AdapterType.peft and a.options:
        problems.append(f"adapter.options is for adapter=peft; with adapter={a.type.value} use the adapter.* keys.")
    if a.type in (AdapterType.lora, AdapterType.ia3, AdapterType.peft):
        if a.r < 1:
            problems.append(f"adapter.r={a.r} must be >= 1.")
        if not 0.0 <= a.dropout < 1.0:
            problems.append(f"adapter.dropout={a.dropout} must be in [0, 1).")
        tm = a.target_modules
        if not (tm == "auto" or (isinstance(tm, list) and tm and all(isinstance(x, str) for x in tm))):
            problems.append(
                f"adapter.target_modules={tm!r} must be 'auto' or a non-empty list of module names "
                "(e.g. [query,value])."
            )

    sched = cfg.scheduler
    if not 0.0 <= sched.warmup_ratio < 1.0:
        problems.append(f"scheduler.warmup_ratio={sched.warmup_ratio} must be in [0, 1).")
    if sched.warmup_steps is not None and sched.warmup_steps < 0:
        problems.append(f"scheduler.warmup_steps={sched.warmup_steps} must be >= 0.")
    for key in ("step_size", "patience", "cycle_steps"):
        if getattr(sched, key) < 1:
            problems.append(f"scheduler.{key}={getattr(sched, key)} must be >= 1.")
    if not 0.0 < sched.gamma <= 1.0:
        problems.append(f"scheduler.gamma={sched.gamma} must be in (0, 1].")
    if not 0.0 <= sched.min_lr_ratio <= 1.0:
        problems.append(f"scheduler.min_lr_ratio={sched.min_lr_ratio} must be in [0, 1].")
    if sched.name == SchedulerType.reduce_on_plateau and es.metric is None:
        problems.append("scheduler=reduce_on_plateau needs early_stopping.metric (the metric it watches).")
    o = cfg.optimizer
    if o.momentum < 0 or (o.nesterov and (o.momentum <= 0 or o.name != OptimizerType.sgd)):
        problems.append(
            f"optimizer.momentum={o.momentum}, nesterov={o.nesterov}: momentum must be >= 0, and nesterov needs "
            "optimizer=sgd with momentum > 0."
        )
    if o.l1 < 0:
        problems.append(f"optimizer.l1={o.l1} must be >= 0.")
    lo = cfg.loss
    if not 0.0 <= lo.label_smoothing < 1.0:
        problems.append(f"loss.label_smoothing={lo.label_smoothing} must be in [0, 1).")
    for key in ("class_weights", "pos_weight"):
        value = getattr(lo, key)
        if not (value is None or value == "auto" or (isinstance(value, list) and all(isinstance(v, (int, float)) and v >= 0 for v in value))):
            problems.append(f"loss.{key}={value!r} must be null, auto, or a list of non-negative numbers.")
    if lo.delta <= 0:
        problems.append(f"loss.delta={lo.delta} must be > 0.")
    ck = cfg.checkpoint
    if ck.every is not None and ck.every < 1:
        problems.append(f"checkpoint.every={ck.every} must be >= 1 (or null).")
    if ck.keep_last < 1:
        problems.append(f"checkpoint.keep_last={ck.keep_last} must be >= 1.")
    if len(cfg.optimizer.betas) != 2:
        problems.append(f"optimizer.betas={cfg.optimizer.betas} must hold two numbers.")

    if not cfg.metrics:
        problems.append("metrics: the list is empty; name at least one metric (e.g. [accuracy]).")
    elif es.metric not in set(cfg.metrics) | {"loss"}:
        # Every metric reports under its own name (see finetune.metrics), plus the eval loss.
        problems.append(
            f"early_stopping.metric='{es.metric}' is not produced by metrics={list(cfg.metrics)}; "
            f"valid: {sorted(set(cfg.metrics) | {'loss'})}."
        )
    if es.metric in LOWER_IS_BETTER and es.mode == Mode.max:
        problems.append(
            f"early_stopping.metric={es.metric} is lower-is-better but early_stopping.mode=max; set early_stopping.mode=min."
        )
    if not 0.0 < cfg.eval.threshold < 1.0:
        problems.append(f"eval.threshold={cfg.eval.threshold} must be between 0 and 1.")
    if cfg.eval.calibrate != Calibrate.none and calibration_problem(cfg.task.problem_type, d):  # a declared task
        problems.append(calibration_problem(cfg.task.problem_type, d))
    if cfg.cv.folds is not None and cfg.cv.folds < 2:
        problems.append(f"cv.folds={cfg.cv.folds} must be >= 2 (or null for a single run).")
    if cfg.cv.folds and cfg.resume:
        problems.append("cv.folds with resume: cross-validation runs cannot be resumed; drop resume.")
    if d.label_columns is not None and len(d.label_columns) < 2:
        problems.append(f"data.label_columns={d.label_columns} needs at least two columns (one per label).")
    if d.label_columns and cfg.task not in (TaskType.auto, TaskType.multi_label):
        problems.append(f"data.label_columns describes multi-label data but task={cfg.task.value}.")
    h = cfg.hub
    if h.push and not h.repo_id:
        problems.append("hub.push=true needs hub.repo_id (e.g. hub.repo_id=your-name/bert-sst2).")
    if h.repo_id is not None and not REPO_ID_RE.match(h.repo_id):
        problems.append(f"hub.repo_id='{h.repo_id}' is not a repo id; use 'name' or 'namespace/name' (letters, digits, -, _, .).")
    if h.push and cfg.cv.folds:
        problems.append("hub.push with cv.folds: cross-validation trains one model per fold; push the model of a single run.")
    if es.patience is not None and es.patience < 1:
        problems.append(f"early_stopping.patience={es.patience} must be >= 1 (or null to never stop early).")
    if es.min_delta < 0:
        problems.append(f"early_stopping.min_delta={es.min_delta} must be >= 0.")
    problems += distill_problems(cfg)

    if problems:
        raise ConfigError(problems)




def distill_problems(cfg: FinetuneConfig) -> List[str]:
    """distill.* and model.keep_layers on their own; the teacher's labels are checked against the
    data once it is loaded (finetune.distill.check_teacher), the layer indices against the
    checkpoint in model.check_model."""
    problems: List[str] = []
    dc, keep = cfg.distill, cfg.model.keep_layers
    if keep is not None and (not keep or any(i < 0 for i in keep) or list(keep) != sorted(set(keep))):
        problems.append(
            f"model.keep_layers={list(keep)} must be a non-empty list of distinct layer indices >= 0 in increasing "
            "order (e.g. [0,2,4]), or null to keep every layer."
        )
    if not 0.0 <= dc.alpha <= 1.0:
        problems.append(f"distill.alpha={dc.alpha} must be in [0, 1] (the weight of the teacher's soft targets).")
    if not dc.temperature > 0:
        problems.append(f"distill.temperature={dc.temperature} must be > 0.")
    if dc.teacher is not None:
        if not Path(dc.teacher).expanduser().is_dir():
            problems.append(
                f"distill.teacher='{dc.teacher}' is not a folder; give the output_dir of a finetune run (or its "
                "model/ folder) trained on the same labels."
            )
        if cfg.cv.folds:
            problems.append(
                "distill.teacher with cv.folds: each fold would need teacher logits for rows the teacher may have "
                "been trained on; distil in a single run."
            )
    return problems


def check_engine(cfg: FinetuneConfig, distributed_type: str) -> None:
    """Refuse, before training, what cannot work under the launched engine (accelerate's
    ``DistributedType`` value: NO, MULTI_GPU, FSDP, DEEPSPEED, ...)."""
    problems: List[str] = []
    if distributed_type == "DEEPSPEED" and cfg.train.nan_policy == NanPolicy.skip_step:
        problems.append(
            "train.nan_policy=skip_step cannot work under DeepSpeed: its engine takes the optimizer step "
            "inside backward(), before finetune sees the gradients (its fp16 loss scaler still skips "
            "overflowing steps). Use train.nan_policy=stop, or launch without DeepSpeed (DDP or FSDP)."
        )
    if problems:
        raise ConfigError(problems)


def check_run_length(cfg: FinetuneConfig, train_rows: int, num_processes: int = 1) -> None:
    """Checks that need the number of training rows (windows with data.long_text=window): an
    evaluation interval the run reaches."""
    t = cfg.train
    if t.eval_every is None:
        return
    # As train.py counts: optimizer steps per process after accumulation (batch_size=auto keeps
    # effective_batch_size per step).
    if t.batch_size == "auto":
        steps_per_epoch = math.ceil(train_rows / (t.effective_batch_size * num_processes))
    else:
        batches = math.ceil(math.ceil(train_rows / t.batch_size) / num_processes)
        steps_per_epoch = math.ceil(batches / t.gradient_accumulation_steps)
    total = t.max_steps or t.epochs * steps_per_epoch
    if t.eval_every > total:
        raise ConfigError(
            [f"train.eval_every={t.eval_every} is larger than the whole run ({total} optimizer steps: {train_rows} "
             f"training {'windows' if cfg.data.long_text == LongText.window else 'rows'}, {steps_per_epoch} steps per epoch); set train.eval_every to at most {total}, or null to "
             "evaluate once per epoch."]
        )


def calibration_problem(task: str, data: Optional[DataConfig] = None) -> Optional[str]:
    """Why eval.calibrate=temperature cannot apply to this task, with its documents read as
    ``data`` says when given (None when it can)."""
    if task == REGRESSION:
        return (
            "eval.calibrate=temperature with a regression task: temperature scaling calibrates class "
            "probabilities (softmax / sigmoid over logits) and a regression model predicts values, not "
            "probabilities. Set eval.calibrate=none, or use a classification task."
        )
    # Mean and max of logits, and max of sigmoids, commute with dividing the window logits by T;
    # the log-odds of the mean of sigmoids do not.
    windows_mean = data is not None and data.long_text == LongText.window and data.window_pool == WindowPool.mean
    if task == MULTI_LABEL and windows_mean:
        return (
            "eval.calibrate=temperature with data.long_text=window and data.window_pool=mean on a multi-label task: "
            "a document's logits are then the log-odds of the mean of its windows' sigmoid probabilities, which "
            "folding T into the head (dividing every window's logits by T) does not divide by T, so the temperature "
            "fitted on them and the calibrated metrics would not describe the saved model. Set data.window_pool=max "
            "(the max commutes with T), data.long_text=truncate, or eval.calibrate=none."
        )
    return None


def check_calibration(cfg: FinetuneConfig, task: str) -> None:
    """eval.calibrate once the task is known (detected from the labels), before any model is loaded."""
    problem = calibration_problem(task, cfg.data) if cfg.eval.calibrate != Calibrate.none else None
    if problem:
        raise ConfigError([problem])
