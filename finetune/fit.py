"""One training run on prepared data (``fit``) and k-fold cross-validation over it: model, loss,
metrics, batch size, DataLoaders, the loop, then the run's outputs (model, metrics, predictions,
export, plots). Called by ``finetune.cli`` once every input check has passed; no Hydra here."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from typing import Optional

from finetune.config import FinetuneConfig, FinetuneError

logger = logging.getLogger(__name__)


class ExportFailed(FinetuneError):
    """save.export failed after training; every other output of the run was written (``summary``:
    what fit returns), so the run is kept and the export can be made again from it. ``failures``:
    (run directory, error) of each failed export (one per fold under cross-validation)."""

    def __init__(self, export, failures: list, summary: dict, resumable: bool = False):
        super().__init__(export_failure_message(export, failures, resumable))
        self.failures, self.summary = failures, summary


def fit(conf: FinetuneConfig, data, tokenizer, accelerator, out_dir: Path, checkpoint=None, log_prefix: str = "",
        final_dir: Optional[Path] = None, held_out: Optional[list] = None) -> dict:  # fmt: skip
    """Train one model on prepared data and write its outputs into ``out_dir`` (``final_dir``:
    where that folder will be once the run is in place, when overwrite=true builds it elsewhere).
    ``held_out``: a list the saved model's validation output (``EvalOutput``) is appended to
    (cross-validation's out-of-fold predictions).

    Raises:
        ExportFailed: save.export failed; the model, metrics, predictions and plots were written.
    """
    from finetune.batching import build_dataloaders, make_collator, mask_form
    from finetune.config import Calibrate, ExportFormat, LongText
    from finetune.losses import build_loss
    from finetune.metrics import MetricSuite
    from finetune.model import build_model, log_summary, save_merged, save_model
    from finetune.outputs import log_final_summary, write_metrics, write_plots, write_predictions
    from finetune.engine import find_batch_size
    from finetune.tasks import get_task
    from finetune.train import train
    from finetune.windows import long_text_meta, long_text_summary

    t = conf.train
    test = len(data.test) if data.test is not None else "no"
    if conf.data.long_text == LongText.window:  # the rows are windows; metrics and tables count documents
        docs = [data.train_documents, len(data.texts["validation"]), len(data.texts.get("test", [])) or "no"]
        logger.info("Data: %d train / %d validation / %s test windows of %s / %s / %s documents",
                    len(data.train), len(data.validation), test, *docs)  # fmt: skip
    else:
        logger.info("Data: %d train / %d validation / %s test rows", len(data.train), len(data.validation), test)
    loss_fn = build_loss(conf.loss, data.task, data.label_counts(), len(data.train))
    if conf.distill.teacher:
        from finetune.distill import distillation_loss

        loss_fn = distillation_loss(loss_fn, data.task, conf.distill.alpha, conf.distill.temperature)
    with accelerator.main_process_first():  # evaluate copies metric scripts into a shared cache
        suite = MetricSuite(conf.metrics, data.num_labels, data.task, data.id2label)
    model, info = build_model(conf.model, conf.adapter, data.id2label, problem_type=data.task, tokenizer=tokenizer)
    log_summary(info)
    if conf.eval.calibrate != Calibrate.none:
        from finetune.calibration import head_linear

        head_linear(model)  # a head the temperature cannot be folded into fails now, not after training

    batch_size = t.batch_size
    if batch_size == "auto":
        # Keep the effective batch: what does not fit in one pass is accumulated. A resumed run
        # reuses the batch it found (its checkpoint holds it), so that it continues exactly.
        batch_size = _resumed_batch_size(checkpoint) or find_batch_size(
            model, data.train, make_collator(tokenizer, form=mask_form(model), label_pad_id=get_task(data.task).label_pad_id),
            t.effective_batch_size, accelerator,
            loss_fn,
        )
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
        # Page-locked host batches make the copy to a GPU asynchronous; on a CPU they only cost.
        pin_memory=accelerator.device.type == "cuda",
        mask=mask_form(model),
    )

    result = train(conf, model, loaders, suite, accelerator, loss_fn, out_dir, resume_from=checkpoint,
                   log_prefix=log_prefix)  # fmt: skip

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(result.model)
    if conf.eval.calibrate != Calibrate.none:  # before the state dict is taken: it must hold the folded head
        calibrate_result(conf, result, unwrapped, suite, loss_fn)
    state_dict = accelerator.get_state_dict(result.model)
    if held_out is not None:
        held_out.append(result.validation)
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
            # How the training files were read, so that predict reads files shaped like them.
            "column_names": conf.data.column_names,
            # Token classification: the columns of pre-tokenized input (a list of words per row).
            "tokens_column": conf.data.tokens_column,
            **long_text_meta(conf.data),
        }
        if conf.save.merge_adapter:
            save_model(unwrapped, tokenizer, out_dir / "adapter", data.id2label, meta=meta)
            save_merged(unwrapped, tokenizer, out_dir / "model", data.id2label, meta=meta)
        else:
            save_model(unwrapped, tokenizer, out_dir / "model", data.id2label, state_dict=state_dict, meta=meta)
        summary = write_metrics(out_dir, result, conf, info, extra=long_text_summary(conf.data, data))
        write_predictions(out_dir, result, data)
        export_error = None
        if conf.save.export != ExportFormat.none:  # checked on the validation predictions just written
            export_error = export_run(conf.save.export, out_dir, final_dir or out_dir)
        if conf.plots:
            write_plots(out_dir, result, data)
        log_final_summary(summary, conf, final_dir or out_dir)
        if export_error is not None:
            resumable = any((out_dir / "checkpoints").glob("step-*"))  # resume=auto can redo the export
            raise ExportFailed(conf.save.export, [(final_dir or out_dir, export_error)], summary, resumable)
    return summary


def export_run(export, out_dir: Path, final_dir: Path) -> Optional[str]:
    """save.export of the run in ``out_dir`` into its onnx/ folder; the error if it failed (naming
    ``final_dir``, where the run will be, rather than the folder it is built in)."""
    from finetune.config import ExportFormat
    from finetune.export import describe, export_onnx

    quantize = "int8" if export == ExportFormat.onnx_int8 else None
    try:
        logger.info(describe(export_onnx(str(out_dir), str(out_dir / "onnx"), quantize=quantize)))
        return None
    except FinetuneError as err:
        error = f"{type(err).__name__}: {err}"
    except Exception as err:  # a bug or a library failure: its traceback is logged, the run is kept all the same
        logger.exception("save.export failed:")
        error = f"{type(err).__name__}: {err}"
    return error.replace(str(out_dir), str(final_dir))


def export_failure_message(export, failures, resumable: bool) -> str:
    """One paragraph for the runs (``failures``: (run directory, error)) whose save.export failed."""
    from finetune.config import ExportFormat

    quantize = " quantize=int8" if export == ExportFormat.onnx_int8 else ""
    errors = "; ".join(f"{Path(run).resolve()}: {error}" if len(failures) > 1 else error for run, error in failures)
    commands = " and ".join(f"`python -m finetune.export model={Path(run).resolve()} format=onnx{quantize} "
                            f"output={Path(run).resolve() / 'onnx'}`" for run, _ in failures)  # fmt: skip
    resume = (", or repeat the training command with resume=auto (it trains no further step, and exports)"
              if resumable else "")  # fmt: skip
    return (f"save.export={export.value} failed after training ({errors}). The run itself is complete and kept "
            f"(model/, metrics.json, predictions/, plots/, and its Hub push when asked for). Once the cause is fixed, "
            f"make the export with {commands} (options such as check_rows=N or opset=18 as the error suggests){resume}.")


def calibrate_result(conf: FinetuneConfig, result, model, suite, loss_fn) -> None:
    """eval.calibrate=temperature: T fitted on the validation logits and folded into ``model``'s
    head (on every process alike: the gathered validation logits are the same on all). The
    validation and test outputs (metrics, loss, probabilities) become the calibrated model's.

    The threshold follows: binary single-label maps it exactly (P(class 1) >= t on logits z is
    P >= sigmoid(logit(t) / T) on z / T, so every decision stays); multi-label, as issue 14 asks,
    tunes it again on the calibrated validation probabilities (the mapped one when
    early_stopping.metric is the loss, which has no threshold to tune)."""
    import numpy as np
    import torch

    from finetune.calibration import calibrate, fold_temperature, mapped_threshold
    from finetune.metrics import uses_threshold
    from finetune.tasks import get_task
    from finetune.train import EvalOutput, _tuned_threshold

    v = result.validation
    if v is None:
        logger.warning("eval.calibrate: no evaluation of the kept weights to fit on; the model is saved uncalibrated.")
        return
    c = calibrate(v.logits, v.labels, suite.task)
    fold_temperature(model, c.temperature)

    def rescored(out, threshold: float) -> EvalOutput:
        logits = (out.logits / c.temperature).astype(np.float32)
        loss = loss_fn(torch.from_numpy(logits), torch.from_numpy(out.labels)).item()
        return EvalOutput(metrics={**suite.compute(logits, out.labels, threshold), "loss": loss}, logits=logits,
                          labels=out.labels)  # fmt: skip

    if uses_threshold(suite.task, suite.num_labels):
        uncalibrated = result.threshold
        result.threshold = mapped_threshold(uncalibrated, c.temperature)
        if get_task(suite.task).retune_threshold_after_calibration:
            result.threshold = _tuned_threshold(conf, suite, rescored(v, result.threshold), result.threshold)
        c.threshold_before, c.threshold_after = uncalibrated, result.threshold
    result.validation = rescored(v, result.threshold)
    if result.test_output is not None:
        result.test_output = rescored(result.test_output, result.threshold)
        result.test = result.test_output.metrics
    # The saved model's validation metrics; `evaluations` keep those measured during training.
    result.best = {**(result.best or {}), **result.validation.metrics}
    result.calibration = c.as_dict()
    moved = "" if c.threshold_before is None else f"; threshold {c.threshold_before:.4f} -> {c.threshold_after:.4f}"
    logger.info("eval.calibrate=temperature: T = %.4f; validation ECE %.4f -> %.4f, NLL %.4f -> %.4f%s.",
                c.temperature, c.ece_before, c.ece_after, c.nll_before, c.nll_after, moved)  # fmt: skip


def _resumed_batch_size(checkpoint):
    """The per-process batch a resumed run used (None when starting fresh or not recorded)."""
    from finetune.checkpoint import TRAINER_STATE, read_trainer_state

    if checkpoint is None or not (Path(checkpoint) / TRAINER_STATE).is_file():
        return None
    return read_trainer_state(checkpoint).get("batch_size")


def run_cross_validation(conf: FinetuneConfig, splits, names, task, tokenizer, accelerator, out_dir: Path,
                         final_dir: Optional[Path] = None) -> dict:  # fmt: skip
    """k-fold cross-validation over train (+ validation): one model per fold in fold_K/, then
    each fold's best metrics and their mean and standard deviation in cv.json. The pooled rows are
    tokenized once; each fold's data is cut out of that (finetune.folds). With audit.label_issues,
    every row's out-of-fold probabilities then go to the label audit (finetune.audit).

    Raises:
        ExportFailed: save.export failed for some folds (after every fold and cv.json were written).
    """
    from accelerate.utils import set_seed

    from finetune.data import check_folds, fold_indices
    from finetune.folds import fold_task_data, pool_task_data
    from finetune.outputs import write_cv_summary

    folds, failed, held_out = [], [], []
    final_dir = final_dir or out_dir
    groups = check_folds(splits, conf.cv.folds, task, conf.cv.group_column)
    with accelerator.main_process_first():  # the main process writes the tokenized cache once
        pool_data, pool = pool_task_data(splits, names, task, tokenizer, conf.data)
    parts = fold_indices(pool, conf.cv.folds, conf.train.seed, task, groups)
    for k, (train_idx, val_idx) in enumerate(parts):
        logger.info("Cross-validation fold %d/%d", k + 1, conf.cv.folds)
        set_seed(conf.train.seed)
        data = fold_task_data(pool_data, train_idx, val_idx)
        try:
            summary = fit(conf, data, tokenizer, accelerator, out_dir / f"fold_{k}", log_prefix=f"fold_{k}/",
                          final_dir=final_dir / f"fold_{k}", held_out=held_out)  # fmt: skip
        except ExportFailed as err:  # the other folds still train; the failure is reported at the end
            summary = err.summary
            failed += err.failures
        folds.append(summary)
        accelerator.free_memory()
    summary = write_cv_summary(out_dir, folds) if accelerator.is_main_process else {}
    if conf.audit.label_issues and accelerator.is_main_process:
        from finetune.audit import audit_label_issues

        summary = {**summary, "audit": audit_label_issues(conf, pool, parts, held_out, pool_data, out_dir, final_dir,
                                                          summary)}  # fmt: skip
    if failed:
        raise ExportFailed(conf.save.export, failed, summary)
    return summary
