"""Cross-field validation of a composed config: everything that types alone cannot check,
reported together in one ConfigError, before anything heavy is imported or downloaded."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path
from typing import List, Optional

from finetune.config import (
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
)
from finetune.ranges import range_problems
from finetune.tasks import get_task, task_for_choice

LOWER_IS_BETTER = {"loss", "mse", "mae"}
FREEZE_RE = re.compile(r"^(none|base|embeddings|layers:\d+|regex:.+)$")
FREEZE_FORMS = "none, base, embeddings, layers:N (N = 0..number of layers), regex:PATTERN"


def validate(cfg: FinetuneConfig) -> None:
    """Check everything that types alone cannot; raise one ConfigError listing every problem."""
    # Every numeric key against the range declared next to it in the schema (finetune.ranges);
    # the checks below only relate keys to each other, so no value is reported twice.
    problems: List[str] = range_problems(cfg)
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
    if m.unfreeze_schedule is not None and (m.freeze == "none" or a.type != AdapterType.none):
        problems.append(
            "model.unfreeze_schedule needs frozen layers to unfreeze: set model.freeze=base or layers:N "
            "(and adapter=none)."
        )
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
    if cfg.optimizer.layer_decay is not None and a.type != AdapterType.none:
        problems.append(f"optimizer.layer_decay with adapter={a.type.value}: layer-wise decay is for full or partial fine-tuning (adapter=none).")

    if d.dataset is None and d.train_file is None:
        problems.append("data: no training data; set data.dataset (a Hub dataset) or data.train_file (a local file).")
    if d.dataset is not None and d.train_file is not None:
        problems.append(
            f"data: both data.dataset='{d.dataset}' and data.train_file='{d.train_file}' are set; choose one."
        )
    for key in ("train_file", "validation_file", "test_file", "exclude_rows"):
        value = getattr(d, key)
        if value is not None and not Path(value).is_file():
            problems.append(f"data.{key}='{value}' does not exist or is not a file.")
    declared = task_for_choice(cfg.task)  # None: task=auto, detected from the labels later
    if d.sampler == SamplerType.balanced and declared is not None and not declared.balances:
        problems.append(f"data.sampler=balanced needs classes to balance; with task={cfg.task.value} use data.sampler=random.")
    if d.text_column == d.label_column:
        problems.append(f"data.text_column and data.label_column are both '{d.text_column}'.")
    if d.long_text == LongText.window:
        if d.window_stride >= d.max_length >= 1:  # a negative stride or length: range_problems
            problems.append(
                f"data.window_stride={d.window_stride} must be >= 0 and below data.max_length={d.max_length} (it is "
                "the number of tokens consecutive windows share); e.g. data.window_stride="
                f"{max(d.max_length // 4, 0)}."
            )
        if any((d.augment.delete, d.augment.swap, d.augment.mask)):
            problems.append("data.augment with data.long_text=window is not supported yet; turn one of them off.")

    if t.compile:
        from torch._dynamo import list_backends

        backends = list_backends(exclude_tags=())
        if t.compile_backend not in backends:
            problems.append(f"train.compile_backend='{t.compile_backend}' is not a torch.compile backend; "
                            f"use one of {', '.join(backends)}.")  # fmt: skip

    if a.type == AdapterType.peft and not a.peft_type:
        problems.append("adapter=peft needs adapter.peft_type (e.g. LOHA, LOKR, ADALORA, BOFT, VERA).")
    if a.type != AdapterType.peft and a.options:
        problems.append(f"adapter.options is for adapter=peft; with adapter={a.type.value} use the adapter.* keys.")
    if a.type in (AdapterType.lora, AdapterType.ia3, AdapterType.peft):
        tm = a.target_modules
        if not (tm == "auto" or (isinstance(tm, list) and tm and all(isinstance(x, str) for x in tm))):
            problems.append(
                f"adapter.target_modules={tm!r} must be 'auto' or a non-empty list of module names "
                "(e.g. [query,value])."
            )

    sched = cfg.scheduler
    o = cfg.optimizer
    if o.nesterov and (o.momentum == 0 or o.name != OptimizerType.sgd):  # a negative one: range_problems
        problems.append(
            f"optimizer.nesterov=true with optimizer={o.name.value}, momentum={o.momentum}: nesterov needs "
            "optimizer=sgd with momentum > 0."
        )
    if len(cfg.optimizer.betas) != 2:
        problems.append(f"optimizer.betas={cfg.optimizer.betas} must hold two numbers.")

    if not cfg.metrics:
        problems.append("metrics: the list is empty; name at least one metric (e.g. [accuracy]).")
    elif es.metric is not None or declared is not None:  # else: checked once task=auto has found the task
        problems += early_stopping_problems(cfg, declared)
    if cfg.eval.calibrate != Calibrate.none and declared is not None and calibration_problem(declared, d):
        problems.append(calibration_problem(declared, d))
    if cfg.cv.group_column is not None and not cfg.cv.folds:
        problems.append(f"cv.group_column='{cfg.cv.group_column}' groups the rows of cross-validation folds; set "
                        "cv.folds (e.g. cv.folds=5), or drop cv.group_column.")  # fmt: skip
    if cfg.audit.label_issues and not cfg.cv.folds:
        problems.append(
            "audit.label_issues=true needs cv.folds=K (e.g. cv.folds=5): the audit judges every training row by "
            "the probabilities of a model that never saw it, which only the k folds of cross-validation give."
        )
    if cfg.audit.flag_below is not None and not cfg.audit.label_issues:
        problems.append(f"audit.flag_below={cfg.audit.flag_below} sets which rows the label audit flags, but no audit "
                        "runs; add audit.label_issues=true (with cv.folds=K), or drop audit.flag_below.")  # fmt: skip
    if cfg.cv.folds and cfg.resume:
        problems.append("cv.folds with resume: cross-validation runs cannot be resumed; drop resume.")
    if d.label_columns is not None and len(d.label_columns) < 2:
        problems.append(f"data.label_columns={d.label_columns} needs at least two columns (one per label).")
    if d.label_columns and declared is not None and not declared.reads_label_columns:
        problems.append(f"data.label_columns describes multi-label data but task={cfg.task.value}.")
    h = cfg.hub
    if h.push and not h.repo_id:
        problems.append("hub.push=true needs hub.repo_id (e.g. hub.repo_id=your-name/bert-sst2).")
    if h.repo_id is not None and not REPO_ID_RE.match(h.repo_id):
        problems.append(f"hub.repo_id='{h.repo_id}' is not a repo id; use 'name' or 'namespace/name' (letters, digits, -, _, .).")
    if h.push and cfg.cv.folds:
        problems.append("hub.push with cv.folds: cross-validation trains one model per fold; push the model of a single run.")
    problems += distill_problems(cfg)
    if declared is not None:
        problems += [p for p in declared.config_problems(cfg) + audit_problems(cfg, declared) if p not in problems]

    if problems:
        raise ConfigError(problems)


def early_stopping_metric(es, task) -> tuple:
    """(metric, mode) that select the best model: as configured, or with early_stopping.metric=null
    the task's default (``Task.early_stopping_metric``), minimised when lower is better."""
    if es.metric is not None:
        return es.metric, es.mode
    metric = task.early_stopping_metric
    return metric, Mode.min if metric in LOWER_IS_BETTER else es.mode


def early_stopping_problems(cfg: FinetuneConfig, task) -> List[str]:
    """The early-stopping metric (resolved for ``task``, None when unknown) must be computed and
    fit its mode."""
    es = cfg.early_stopping
    metric, mode = early_stopping_metric(es, task) if task is not None else (es.metric, es.mode)
    if cfg.early_stopping.metric is not None:
        named = f"early_stopping.metric='{metric}'"
    else:
        named = f"early_stopping.metric=null (the default of {task.name}: '{metric}')"
    problems = []
    if metric not in set(cfg.metrics) | {"loss"}:
        # Every metric reports under its own name (see finetune.metrics), plus the eval loss.
        problems.append(
            f"{named} is not produced by metrics={list(cfg.metrics)}; valid: {sorted(set(cfg.metrics) | {'loss'})}"
            " (set early_stopping.metric to one of them)."
        )
    if metric in LOWER_IS_BETTER and mode == Mode.max:
        problems.append(f"{named} is lower-is-better but early_stopping.mode=max; set early_stopping.mode=min.")
    return problems


def audit_problems(cfg: FinetuneConfig, task) -> List[str]:
    """audit.flag_below for a task whose audit takes no cut (it flags by cleanlab's rules)."""
    if cfg.audit.flag_below is None or task.audit_flag_below is not None:
        return []
    return [f"audit.flag_below={cfg.audit.flag_below} is a cut on the probability that a row's one given class is "
            f"right, which single-label audits use; {task.name} audits flag by cleanlab's rules and take no cut. "
            "Drop audit.flag_below."]  # fmt: skip


def check_task(cfg: FinetuneConfig, task: str) -> None:
    """Once the task is known (task=auto detects it from the data): what it cannot do, and the
    metric that selects its best model (``early_stopping_metric``), written into ``cfg``.

    Raises:
        ConfigError: what the task cannot do, or an early-stopping metric that is not computed.
    """
    found = get_task(task)
    problems = found.config_problems(cfg) + early_stopping_problems(cfg, found) + audit_problems(cfg, found)
    if problems:
        raise ConfigError(problems)
    if cfg.early_stopping.metric is None:
        import logging

        cfg.early_stopping.metric, cfg.early_stopping.mode = early_stopping_metric(cfg.early_stopping, found)
        logging.getLogger(__name__).info("early_stopping.metric=%s, mode=%s (the default for %s).",
                                         cfg.early_stopping.metric, cfg.early_stopping.mode.value, task)  # fmt: skip




def distill_problems(cfg: FinetuneConfig) -> List[str]:
    """distill.* and model.keep_layers on their own; the teacher's labels are checked against the
    data once it is loaded (finetune.distill.check_teacher), the layer indices against the
    checkpoint in model.check_model."""
    problems: List[str] = []
    dc, keep = cfg.distill, cfg.model.keep_layers
    if keep is not None and (not keep or list(keep) != sorted(set(keep))):  # negatives: range_problems
        problems.append(
            f"model.keep_layers={list(keep)} must be a non-empty list of distinct layer indices >= 0 in increasing "
            "order (e.g. [0,2,4]), or null to keep every layer."
        )
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
    return get_task(task).calibration_problem(data)


def check_calibration(cfg: FinetuneConfig, task: str) -> None:
    """eval.calibrate once the task is known (detected from the labels), before any model is loaded."""
    problem = calibration_problem(task, cfg.data) if cfg.eval.calibrate != Calibrate.none else None
    if problem:
        raise ConfigError([problem])
