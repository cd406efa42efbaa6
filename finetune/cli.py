"""Entry point: Hydra composes conf/ + recipes/, then one run is orchestrated here.

Only this module and ``config`` know about Hydra; everything below receives dataclasses.
Heavy libraries (torch, transformers, datasets) are imported after the config is validated, so
that a bad config fails in about a second.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from finetune.config import CONF_DIR, ConfigError, FinetuneConfig, FinetuneError, register_configs, to_dataclass, validate

logger = logging.getLogger("finetune")

register_configs()


def fail(message: str, code: int = 2) -> None:
    """Print a user error as one paragraph (no traceback) and exit non-zero."""
    print(f"finetune: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def compose_checked(cfg: DictConfig) -> FinetuneConfig:
    """Typed, validated config; every problem reported at once."""
    try:
        conf = to_dataclass(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError([_omegaconf_message(err)]) from err
    validate(conf)
    return conf


def _omegaconf_message(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    msg = str(err).splitlines()[0]
    return f"{key}: {msg}" if key and key not in msg else msg


def prepare_output_dir(conf: FinetuneConfig) -> Path:
    """Refuse to write into another run's non-empty directory unless resuming or overwrite=true."""
    out = Path(conf.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError([f"output_dir='{out}' exists and is not a directory."])
    if out.is_dir() and any(out.iterdir()) and not (conf.overwrite or conf.resume):
        raise ConfigError(
            [
                f"output_dir='{out}' is not empty (another run's files are there). Choose a new output_dir, "
                "pass resume=auto to continue that run, or overwrite=true to write into it anyway."
            ]
        )
    return out


def resume_checkpoint(conf: FinetuneConfig, cfg: DictConfig, out_dir: Path):
    """The checkpoint to resume from (None: start fresh), after checking the run's config still fits."""
    from finetune.checkpoint import ResumeError, config_differences, find_resume_checkpoint

    if not conf.resume:
        return None
    checkpoint = find_resume_checkpoint(conf.resume, out_dir)
    saved = out_dir / "config.yaml"
    if checkpoint is not None and saved.is_file():
        before = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
        now = OmegaConf.to_container(cfg, resolve=True)
        diffs = config_differences(before, now)
        if diffs:
            raise ResumeError(
                f"cannot resume {checkpoint}: the config differs from the run that wrote it in keys that change "
                f"training: {'; '.join(diffs)}. Use the original values, or start a new run (new output_dir)."
            )
    if checkpoint is None:
        logger.info("resume=%s: no checkpoint in %s; starting from scratch.", conf.resume, out_dir)
    return checkpoint


class LaunchError(FinetuneError):
    """Several processes were asked for, but they do not form one distributed run."""


def check_launch(num_processes: int, env=os.environ) -> None:
    """Catch the two silent ways a multi-process launch degrades to independent single-process runs."""
    right = (
        "On CPUs run `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N -m finetune ...` "
        "(or torchrun with train.cpu=true); on GPUs `accelerate launch --multi_gpu --num_processes N -m finetune ...`."
    )
    world = env.get("WORLD_SIZE")
    if world and int(world) > 1 and num_processes != int(world):
        raise LaunchError(
            f"WORLD_SIZE={world} but this process sees {num_processes} process(es): each would train on its own "
            f"(e.g. plain torchrun without train.cpu=true on a machine without GPUs). {right}"
        )
    if not world and env.get("MASTER_ADDR") and env.get("ACCELERATE_USE_CPU") and num_processes == 1:
        raise LaunchError(
            "`accelerate launch --cpu --num_processes N` (N > 1) starts a single process, not N. " + right
        )


def run(cfg: DictConfig) -> dict:
    """Validate, train, save. Returns the metrics written to metrics.json."""
    conf = compose_checked(cfg)
    try:
        return _run(conf, cfg)
    finally:
        _reset_accelerate_state()


def _run(conf: FinetuneConfig, cfg: DictConfig) -> dict:
    # Heavy imports only once the config is known to be good.
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list, set_seed

    from finetune.data import load_and_prepare, tokenized_task_data
    from finetune.model import check_max_length, load_tokenizer

    t = conf.train
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision.value,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        cpu=t.cpu,
    )
    check_launch(accelerator.num_processes)
    if accelerator.num_processes > 1:
        if conf.model.unfreeze_schedule:
            raise ConfigError(["model.unfreeze_schedule is not supported with several processes yet (DDP fixes the "
                               "trained parameters when it wraps the model); run it in one process."])  # fmt: skip
        # Every process must write to the main process's run directory (the default name holds
        # the time, which may differ by a second between processes).
        conf.output_dir = broadcast_object_list([conf.output_dir])[0]
    out_dir = prepare_output_dir(conf)
    checkpoint = resume_checkpoint(conf, cfg, out_dir)
    from finetune.hub import check_can_push, publish

    check_can_push(conf.hub)
    accelerator.wait_for_everyone()  # all checks done before anything is written
    _setup_logging(accelerator.is_main_process, out_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.output_dir = str(out_dir)
        (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    logger.info("Run directory: %s", out_dir.resolve())

    set_seed(t.seed)
    tokenizer = load_tokenizer(conf.model)
    check_max_length(conf.model, tokenizer, conf.data.max_length)
    with accelerator.main_process_first():  # one process tokenizes and caches, the others read
        splits, names, task = load_and_prepare(conf.data, t.seed, conf.task)
    logger.info("Task: %s; labels: %s", task, names if len(names) <= 20 else names[:20] + ["..."])
    if conf.cv.folds:
        summary = run_cross_validation(conf, splits, names, task, tokenizer, accelerator, out_dir)
    else:
        data = tokenized_task_data(splits, names, task, tokenizer, conf.data)
        summary = fit(conf, data, tokenizer, accelerator, out_dir, checkpoint)
        if accelerator.is_main_process:  # only the main process publishes
            publish(out_dir, conf, summary)
    accelerator.end_training()
    return summary


def fit(conf: FinetuneConfig, data, tokenizer, accelerator, out_dir: Path, checkpoint=None) -> dict:
    """Train one model on prepared data and write its outputs into ``out_dir``."""
    from finetune.data import build_dataloaders, make_collator
    from finetune.losses import build_loss
    from finetune.metrics import MetricSuite
    from finetune.model import build_model, log_summary, save_merged, save_model
    from finetune.outputs import write_metrics, write_predictions
    from finetune.train import find_batch_size, train

    t = conf.train
    logger.info(
        "Data: %d train / %d validation / %s test rows",
        len(data.train), len(data.validation), len(data.test) if data.test is not None else "no",
    )  # fmt: skip
    loss_fn = build_loss(conf.loss, data.task, data.label_counts(), len(data.train))
    with accelerator.main_process_first():  # evaluate copies metric scripts into a shared cache
        suite = MetricSuite(conf.metrics, data.num_labels, data.task)
    model, info = build_model(conf.model, conf.adapter, data.id2label, problem_type=data.task, tokenizer=tokenizer)
    log_summary(info)

    batch_size = t.batch_size
    if batch_size == "auto":
        # Keep the effective batch: what does not fit in one pass is accumulated.
        batch_size = find_batch_size(model, data.train, make_collator(tokenizer), t.effective_batch_size,
                                     accelerator, loss_fn)  # fmt: skip
        accelerator.gradient_accumulation_steps = math.ceil(t.effective_batch_size / batch_size)
        logger.info("train.batch_size=auto: %d per process x %d accumulation steps.", batch_size,
                    accelerator.gradient_accumulation_steps)  # fmt: skip
    eval_batch_size = t.eval_batch_size or 2 * batch_size
    loaders = build_dataloaders(
        data,
        tokenizer,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        seed=t.seed,
        group_by_length=conf.data.group_by_length,
        num_workers=conf.data.num_workers,
        data_cfg=conf.data,
    )

    result = train(conf, model, loaders, suite, accelerator, loss_fn, out_dir, resume_from=checkpoint)

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(result.model)
    state_dict = accelerator.get_state_dict(result.model)
    summary = {}
    if accelerator.is_main_process:
        # What finetune.predict needs to preprocess and decide exactly as training did.
        meta = {
            "task": data.task,
            "text_column": conf.data.text_column,
            "text_pair_column": conf.data.text_pair_column,
            "max_length": conf.data.max_length,
            "threshold": result.threshold,
            "eval_batch_size": eval_batch_size,
        }
        if conf.save.merge_adapter:
            save_model(unwrapped, tokenizer, out_dir / "adapter", data.id2label, meta=meta)
            save_merged(unwrapped, tokenizer, out_dir / "model", data.id2label, meta=meta)
        else:
            save_model(unwrapped, tokenizer, out_dir / "model", data.id2label, state_dict=state_dict, meta=meta)
        summary = write_metrics(out_dir, result, conf, info)
        write_predictions(out_dir, result, data)
        logger.info("Model saved to %s", (out_dir / "model").resolve())
    return summary


def run_cross_validation(conf: FinetuneConfig, splits, names, task, tokenizer, accelerator, out_dir: Path) -> dict:
    """k-fold cross-validation over train (+ validation): one model per fold in fold_K/, then
    each fold's best metrics and their mean and standard deviation in cv.json."""
    from accelerate.utils import set_seed

    from finetune.data import kfold_splits, tokenized_task_data
    from finetune.outputs import write_cv_summary

    folds = []
    for k, fold in enumerate(kfold_splits(splits, conf.cv.folds, conf.train.seed, task)):
        logger.info("Cross-validation fold %d/%d", k + 1, conf.cv.folds)
        set_seed(conf.train.seed)
        data = tokenized_task_data(fold, names, task, tokenizer, conf.data)
        summary = fit(conf, data, tokenizer, accelerator, out_dir / f"fold_{k}")
        folds.append(summary)
        accelerator.free_memory()
    return write_cv_summary(out_dir, folds) if accelerator.is_main_process else {}


def _reset_accelerate_state() -> None:
    """Accelerate keeps its settings (mixed precision, accumulation) in process-wide singletons;
    clear them so that the next run in this process (a sweep trial, a test) can choose its own.
    The process group (PartialState) is kept."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def _setup_logging(is_main: bool, out_dir: Path) -> None:
    level = logging.INFO if is_main else logging.WARNING
    logging.getLogger("finetune").setLevel(level)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s", level=level)
    for noisy in ("transformers", "datasets", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    # In a sweep each trial writes to its own Hydra job directory.
    if HydraConfig.initialized():
        cfg.output_dir = HydraConfig.get().runtime.output_dir
    try:
        run(cfg)
    except FinetuneError as err:
        fail(str(err), code=err.exit_code)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _hydra_main()
