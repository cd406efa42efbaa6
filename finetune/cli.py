"""Entry point: Hydra composes conf/ + recipes/, then one run is orchestrated here.

Only this module and ``config`` know about Hydra; everything below receives dataclasses.
Heavy libraries (torch, transformers, datasets) are imported after the config is validated, so
that a bad config fails in about a second.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from finetune.config import CONF_DIR, ConfigError, FinetuneConfig, FinetuneError, LongText, Mode, register_configs, to_dataclass
from finetune.rundir import check_writable, new_run_dir, prepare_output_dir, put_in_place, replaces_run, settle_failed_run
from finetune.validation import check_engine, validate

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


def resume_checkpoint(conf: FinetuneConfig, cfg: DictConfig, out_dir: Path):
    """The checkpoint to resume from (None: start fresh), after checking that the config of the run
    that wrote it (its own config.yaml, in whichever directory) still fits."""
    from finetune.checkpoint import ResumeError, config_differences, find_resume_checkpoint, run_config_path

    if not conf.resume:
        return None
    checkpoint = find_resume_checkpoint(conf.resume, out_dir, conf.overwrite)
    if checkpoint is None:
        logger.info("resume=%s: no checkpoint in %s; starting from scratch.", conf.resume, out_dir)
        return None
    saved = run_config_path(checkpoint)
    if not saved.is_file():
        raise ResumeError(
            f"cannot resume {checkpoint}: the config.yaml of the run that wrote it is missing (expected {saved}), "
            "so it cannot be checked against this config. Put that run's config.yaml back, or start a new run."
        )
    before = OmegaConf.to_container(OmegaConf.load(saved), resolve=True)
    now = OmegaConf.to_container(cfg, resolve=True)
    recorded = before.get("early_stopping") or {}
    if now["early_stopping"]["metric"] is None and recorded.get("metric") is not None:
        # The task's default, which that run resolved and recorded: the resumed run keeps selecting by it.
        now["early_stopping"].update(metric=recorded["metric"], mode=recorded.get("mode", now["early_stopping"]["mode"]))
        conf.early_stopping.metric, conf.early_stopping.mode = recorded["metric"], Mode(now["early_stopping"]["mode"])
    diffs = config_differences(before, now)
    if diffs:
        raise ResumeError(
            f"cannot resume {checkpoint}: the config differs from the run that wrote it in keys that change "
            f"training: {'; '.join(diffs)}. Use the original values, or start a new run (new output_dir)."
        )
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


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls beat fp32 on a CPU only with AVX512-BF16 or AMX; elsewhere they are emulated
    and many times slower (measured: a 48 s fp32 epoch did not finish in 13 min under bf16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_mixed_precision(choice: str, force_cpu: bool = False) -> str:
    if choice != "auto":
        return choice
    import torch

    if torch.cuda.is_available() and not force_cpu:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "no"


def run(cfg: DictConfig) -> dict:
    """Validate, train, save. Returns the metrics written to metrics.json."""
    conf = compose_checked(cfg)
    try:
        return _run(conf, cfg)
    finally:
        _reset_accelerate_state()


def _run(conf: FinetuneConfig, cfg: DictConfig) -> dict:
    from finetune.data_checks import check_data_files

    # Every check that bad input can fail runs before anything is written into output_dir, so a
    # failed command leaves an earlier run (or an empty directory for the retry) as it was.
    check_data_files(conf.data)  # empty, non-UTF-8 or ragged files: before the heavy imports
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DataLoaderConfiguration, broadcast_object_list, parse_flag_from_env, set_seed

    t = conf.train
    # The process group first: the run directory must be agreed on before trackers start.
    # Accelerator reads ACCELERATE_USE_CPU (set by `accelerate launch` on CPUs); PartialState does not.
    cpu = t.cpu or parse_flag_from_env("ACCELERATE_USE_CPU")
    state = PartialState(cpu=cpu)
    _setup_logging(state.is_main_process)
    check_launch(state.num_processes)
    if state.num_processes > 1:
        if conf.model.unfreeze_schedule:
            raise ConfigError(["model.unfreeze_schedule is not supported with several processes yet (DDP fixes the "
                               "trained parameters when it wraps the model); run it in one process."])  # fmt: skip
        # Every process must write to the main process's run directory (the default name holds
        # the time, which may differ by a second between processes).
        conf.output_dir = broadcast_object_list([conf.output_dir])[0]

    # Paths and credentials before the data and model libraries are imported: a typo fails fast.
    out_dir = prepare_output_dir(conf)
    check_writable(out_dir)
    checkpoint = resume_checkpoint(conf, cfg, out_dir)
    replacing = replaces_run(conf, out_dir, checkpoint)
    from finetune.hub import check_can_push, publish

    check_can_push(conf.hub)

    # Tokenizer, model and data loaded and checked (labels, lengths, adapter targets), still writing nothing.
    from finetune.model import check_model, load_tokenizer

    tokenizer = load_tokenizer(conf.model)
    check_model(conf.model, conf.adapter, tokenizer, conf.data.max_length)
    if conf.data.long_text == LongText.window:  # the tokenizer's special tokens are known now
        from finetune.windows import check_window_stride

        check_window_stride(tokenizer, conf.data.max_length, conf.data.window_stride, bool(conf.data.text_pair_column))
    from finetune.data import check_folds, load_and_prepare, tokenized_task_data
    from finetune.fit import ExportFailed, fit, run_cross_validation
    from finetune.tracking import flat_hparams, log_with
    from finetune.validation import check_calibration, check_run_length, check_task

    with state.main_process_first():  # one process tokenizes and caches, the others read
        splits, names, task = load_and_prepare(conf.data, t.seed, conf.task)
    logger.info("Task: %s; labels: %s", task, names if len(names) <= 20 else names[:20] + ["..."])
    check_calibration(conf, task)
    check_task(conf, task)
    # config.yaml records the metric that selects the best model (the task's default when not named).
    cfg.early_stopping.metric, cfg.early_stopping.mode = conf.early_stopping.metric, conf.early_stopping.mode.value
    if conf.cv.folds:
        check_folds(splits, conf.cv.folds, task, conf.cv.group_column)
    else:
        train_rows = len(splits["train"])
        if conf.data.long_text == LongText.window and t.eval_every is not None:  # training steps through windows
            from finetune.windows import count_windows

            with state.main_process_first():  # cached: training reads these windows back
                train_rows = count_windows(splits["train"], tokenizer, conf.data, task, names)
        check_run_length(conf, train_rows, state.num_processes)
    if conf.distill.teacher:
        from finetune.distill import add_teacher_logits, check_teacher

        teacher = check_teacher(conf.distill, names, task, conf.data)
    state.wait_for_everyone()  # all checks done before anything is written

    # overwrite=true: the new run is built beside the old one and replaces it whole once it ends.
    run_dir = new_run_dir(out_dir) if replacing and state.is_main_process else out_dir
    if replacing and state.num_processes > 1:
        run_dir = broadcast_object_list([run_dir])[0]
    export_failure = None
    try:
        # An Accelerator made earlier in this process (a notebook's, a previous run that did not end
        # cleanly) fixes the process-wide precision; this run chooses its own.
        _reset_accelerate_state()
        accelerator = Accelerator(
            mixed_precision=resolve_mixed_precision(t.mixed_precision.value, cpu),
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            cpu=cpu,
            log_with=log_with(conf.logger, run_dir),
            project_dir=str(run_dir / "logs"),
            # With pinned batches (on CUDA) the host-to-device copies overlap with compute.
            dataloader_config=DataLoaderConfiguration(non_blocking=True),
        )
        check_engine(conf, accelerator.distributed_type.value)
        logger.info("Mixed precision: %s (train.mixed_precision=%s on %s); final metrics and predictions in fp32.",
                    accelerator.mixed_precision, t.mixed_precision.value, accelerator.device)  # fmt: skip
        if accelerator.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg.output_dir = str(out_dir)
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        built = f" (built in {run_dir}; it replaces the earlier run there when it ends)" if replacing else ""
        logger.info("Run directory: %s%s", out_dir.resolve(), built)
        accelerator.init_trackers("finetune", config=flat_hparams(OmegaConf.to_container(cfg, resolve=True)))

        set_seed(t.seed)
        try:
            if conf.cv.folds:
                summary = run_cross_validation(conf, splits, names, task, tokenizer, accelerator, run_dir, out_dir)
            else:
                with accelerator.main_process_first():  # the main process writes the tokenized cache once
                    if conf.distill.teacher:  # computed once, cached with the split (the others read the cache)
                        splits["train"] = add_teacher_logits(splits["train"], teacher, conf.data, tokenizer, accelerator.device)
                    data = tokenized_task_data(splits, names, task, tokenizer, conf.data)
                summary = fit(conf, data, tokenizer, accelerator, run_dir, checkpoint, final_dir=out_dir)
        except ExportFailed as err:  # the run is complete but for its export: it is kept and published
            summary, export_failure = err.summary, err
        accelerator.end_training()
    except BaseException as err:
        if replacing and state.is_main_process:
            settle_failed_run(run_dir, out_dir, err)
        raise
    if replacing and state.is_main_process:
        put_in_place(run_dir, out_dir)
    if not conf.cv.folds and state.is_main_process:  # only the main process publishes
        try:
            publish(out_dir, conf, summary)
        except FinetuneError as err:
            if export_failure is None:
                raise
            raise FinetuneError(f"{err} Besides: {export_failure}") from err
    if export_failure is not None:
        raise export_failure
    return summary


def _reset_accelerate_state() -> None:
    """Accelerate keeps its settings (mixed precision, accumulation) in process-wide singletons;
    clear them so that the next run in this process (a sweep trial, a test) can choose its own.
    The process group (PartialState) is kept."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def _setup_logging(is_main: bool) -> None:
    level = logging.INFO if is_main else logging.WARNING
    logging.getLogger("finetune").setLevel(level)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s", level=level)
    for noisy in ("transformers", "datasets", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _is_sweep() -> bool:
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig):
    sweep = _is_sweep()
    if HydraConfig.initialized():
        # In a sweep each trial writes to its own Hydra job directory; a single run to output_dir,
        # which _run creates once every check has passed (conf/config.yaml: hydra.run.dir is `.`).
        cfg.output_dir = HydraConfig.get().runtime.output_dir if sweep else os.path.abspath(cfg.output_dir)
    if sweep and cfg.hub.push:
        # Trials never push; SweepSummary pushes the best trial once the sweep is over.
        cfg.hub.push = False
    if sweep:
        summary = run_trial(cfg)
    else:
        try:
            summary = run(cfg)
        except FinetuneError as err:
            fail(str(err), code=err.exit_code)
    best = summary.get("best") or {}
    # The objective for sweepers such as Optuna: the early-stopping metric of the best evaluation.
    return best.get(cfg.early_stopping.metric, float("nan"))


def run_trial(cfg: DictConfig) -> dict:
    """One sweep trial. Whatever it raises (a bad value, out of memory, a bug) fails this trial only:
    the traceback goes to the log and to <trial>/error.log, trial.json marks the trial failed, and
    the sweep goes on. SIGTERM / SIGINT (after their checkpoint) still end the whole sweep."""
    import traceback

    out = Path(cfg.output_dir)
    record = {"overrides": list(HydraConfig.get().overrides.task), "status": "completed"}
    try:
        summary = run(cfg)
    except Exception as err:
        from finetune.train import TrainingInterrupted

        if isinstance(err, TrainingInterrupted):
            fail(str(err), code=err.exit_code)
        trace = traceback.format_exc()
        detail = "" if isinstance(err, FinetuneError) else "\n" + trace  # a user error needs no traceback
        logger.error("Trial %s failed (the sweep goes on): %s: %s%s", out.name, type(err).__name__, err, detail)
        out.mkdir(parents=True, exist_ok=True)
        (out / "error.log").write_text(trace)
        record.update(status="failed", error=f"{type(err).__name__}: {err}")
        summary = {}
    _release_memory()  # what a failed trial held (an out-of-memory error's tensors) goes before the next
    # The metric that ranks the trials, as each trial resolved it (the task's default when not named).
    record.update(metric=cfg.early_stopping.metric, mode=Mode(cfg.early_stopping.mode).value,
                  best=summary.get("best"), test=summary.get("test"))  # fmt: skip
    (out / "trial.json").write_text(json.dumps(record, indent=2) + "\n")
    return summary


def _release_memory() -> None:
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class SweepSummary(Callback):
    """After a multirun: summary.json and summary.tsv in the sweep directory (every trial's
    overrides and best metrics, best trial first), and the best trial pushed if hub.push was set."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        metric, mode = config.early_stopping.metric, config.early_stopping.mode
        records = [(path, json.loads(path.read_text())) for path in sorted(sweep_dir.glob("*/trial.json"))]
        if metric is None:  # the task's default, which the trials resolved
            resolved = next((r for _, r in records if r.get("metric") is not None), {})
            metric, mode = resolved.get("metric"), resolved.get("mode", mode)
        trials = []
        for path, record in records:
            value = (record.get("best") or {}).get(metric)
            trials.append({"dir": str(path.parent), "value": value, "status": "completed", **record})
        if not trials:
            return
        sign = -1 if Mode(mode) == Mode.max else 1  # best first; trials without a value (failed ones) last
        trials.sort(key=lambda r: (r["value"] is None, sign * (r["value"] or 0)))
        best = trials[0]["dir"] if trials[0]["value"] is not None else None
        failed = [t["dir"] for t in trials if t["status"] == "failed"]
        summary = {"metric": metric, "mode": str(mode), "best_trial": best, "failed_trials": failed, "trials": trials}
        (sweep_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        lines = [f"trial\t{metric}\toverrides"] + [
            f"{Path(t['dir']).name}\t{'FAILED' if t['status'] == 'failed' else t['value']}\t{' '.join(t['overrides'])}"
            for t in trials
        ]
        (sweep_dir / "summary.tsv").write_text("\n".join(lines) + "\n")
        print(f"Sweep summary ({len(trials)} trials, {len(failed)} failed, best {metric} first) in "
              f"{sweep_dir / 'summary.tsv'}:")  # fmt: skip
        print("\n".join(lines))
        for t in (t for t in trials if t["status"] == "failed"):
            print(f"{Path(t['dir']).name} failed: {t['error']} (traceback in {Path(t['dir']) / 'error.log'})")
        if config.hub.push and best:
            self._push_best(Path(best))

    @staticmethod
    def _push_best(best_dir: Path) -> None:
        from finetune.hub import publish

        saved = OmegaConf.merge(OmegaConf.structured(FinetuneConfig), OmegaConf.load(best_dir / "config.yaml"))
        conf = to_dataclass(saved)
        conf.hub.push = True
        publish(best_dir, conf, json.loads((best_dir / "metrics.json").read_text()))


def check_override_keys(args: list) -> None:
    """Command-line keys the schema does not have, with the nearest real key. (Hydra's own message
    suggests `+key=value`, which the typed schema then refuses too.)"""
    import difflib

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")])
    except Exception:  # a syntax error: Hydra reports it with its position
        return
    schema = OmegaConf.structured(FinetuneConfig)
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()} | {"recipe"}
    for override in overrides:
        key = override.key_or_group
        if override.type != OverrideType.CHANGE or key.split("/")[0] in groups or key.startswith("hydra"):
            continue
        parent, _, name = key.rpartition(".")
        node = OmegaConf.select(schema, parent) if parent else schema
        if node is None or (OmegaConf.get_type(node) is not dict and name not in node.keys()):
            close = difflib.get_close_matches(key, _leaf_keys(schema), n=2, cutoff=0.7)
            hint = f"did you mean {' or '.join(close)}? " if close else ""
            fail(f"unknown key '{key}' in '{override.input_line}': {hint}`python -m finetune recipe=NAME --cfg job` "
                 "lists every key.")  # fmt: skip


def _leaf_keys(node, prefix: str = "") -> list:
    keys = []
    for name in node:
        child = node._get_node(name)
        if isinstance(child, DictConfig) and OmegaConf.get_type(child) is not dict:
            keys += _leaf_keys(child, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    check_override_keys(sys.argv[1:])
    _hydra_main()
