"""What a run leaves behind besides the model: metrics.json and prediction tables."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List, Optional

import numpy as np

from finetune.config import FinetuneConfig
from finetune.data import TaskData
from finetune.data_checks import clean_tsv_field, tsv_writer
from finetune.metrics import label_text, predictions_from_scores, probability_fields, scores_from_logits
from finetune.model import ModelInfo
from finetune.sampling import imbalance_settings
from finetune.tasks import get_task
from finetune.train import EvalOutput, TrainResult

logger = logging.getLogger(__name__)


def write_metrics(out_dir: Path, result: TrainResult, conf: FinetuneConfig, info: ModelInfo, extra: Optional[dict] = None) -> dict:
    """metrics.json: every evaluation, the best one, and the test metrics of the best weights
    (plus ``extra`` entries, e.g. the long-text windowing)."""
    summary = {
        "best": result.best,
        "best_metric": conf.early_stopping.metric,
        "test": result.test,
        "evaluations": result.history,
        "steps": result.steps,
        "stopped_early": result.stopped_early,
        "skipped_steps": result.skipped_steps,
        "scaler_skipped_steps": result.scaler_skipped_steps,
        "threshold": result.threshold,
        # What training and its evaluations ran in; best, test and the prediction tables are
        # computed in fp32, as the saved model runs.
        "mixed_precision": result.mixed_precision,
        "calibration": result.calibration,
        "train_seconds": round(result.train_seconds, 3),
        "eval_seconds": round(result.eval_seconds, 3),
        "trainable_params": info.trainable_params,
        "total_params": info.total_params,
        # How class imbalance was treated (data.sampler, loss weighting) and sub-samples chosen.
        "imbalance": imbalance_settings(conf),
        **(extra or {}),
    }
    if conf.distill.teacher:
        d = conf.distill
        summary["distill"] = {"teacher": d.teacher, "alpha": d.alpha, "temperature": d.temperature}
    if conf.model.keep_layers is not None:
        summary["keep_layers"] = list(conf.model.keep_layers)
    (Path(out_dir) / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def write_prediction_table(path: Path, output: EvalOutput, data: TaskData, split: str, threshold: float) -> None:
    """One row per example, in dataset order: the text, the gold and predicted label names (or
    values), and each class's probability. The TSV is read back as finetune reads TSV (no quote
    handling: `finetune.predict input=<this file>` gets the same texts); a tab or line break in a
    text, which such a file cannot hold, is written as a space."""
    scores = scores_from_logits(output.logits, data.task)
    preds = predictions_from_scores(scores, data.task, threshold)
    texts = data.texts.get(split) or [(None, None)] * len(preds)
    has_pair = any(pair is not None for _, pair in texts)
    changed = 0
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = tsv_writer(f)
        header = ["index", "text", *(["text_pair"] if has_pair else []), "label", "prediction"]
        writer.writerow(header + list(probability_fields(scores[0], data.task, data.id2label)))
        for i, ((text, pair), gold, pred) in enumerate(zip(texts, output.labels, preds)):
            row = [clean_tsv_field(t) for t in (text, *([pair] if has_pair else []))]
            changed += row != [text, *([pair] if has_pair else [])]
            row = [i, *row, label_text(gold, data.task, data.id2label), label_text(pred, data.task, data.id2label)]
            writer.writerow(row + list(probability_fields(scores[i], data.task, data.id2label).values()))
    if changed:
        logger.warning("%s: %d text(s) hold tabs or line breaks, written there as spaces (a TSV field cannot hold "
                       "them).", path, changed)  # fmt: skip


def write_predictions(out_dir: Path, result: TrainResult, data: TaskData) -> None:
    pred_dir = Path(out_dir) / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    for split, output in (("validation", result.validation), ("test", result.test_output)):
        if output is not None:  # the task writes its table (predictions/<split>.tsv or .jsonl)
            get_task(data.task).write_predictions(pred_dir, split, output, data, result.threshold)


def write_cv_summary(out_dir: Path, folds: List[dict]) -> dict:
    """cv.json: each fold's best evaluation and, per metric, the mean and standard deviation."""
    keys = [k for k, v in folds[0]["best"].items() if k not in ("step", "epoch") and isinstance(v, (int, float))]
    values = {k: np.array([f["best"][k] for f in folds], dtype=float) for k in keys}
    summary = {
        "folds": [f["best"] for f in folds],
        "mean": {k: float(v.mean()) for k, v in values.items()},
        "std": {k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items()},
    }
    (Path(out_dir) / "cv.json").write_text(json.dumps(summary, indent=2) + "\n")
    for k in keys:
        logger.info("cross-validation %s: %.4f ± %.4f over %d folds", k, summary["mean"][k], summary["std"][k], len(folds))
    return summary


def write_plots(out_dir: Path, result: TrainResult, data: TaskData) -> None:
    """plots/curves.png, and plots/confusion_matrix.png (classification) or plots/regression.png;
    plots/calibration.png after eval.calibrate."""
    from finetune.plots import plot_confusion_matrix, plot_curves, plot_regression

    plot_dir = Path(out_dir) / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    plot_curves(plot_dir / "curves.png", result.losses, result.history)
    v = result.validation
    if v is None:
        return
    scores = scores_from_logits(v.logits, data.task)
    preds = predictions_from_scores(scores, data.task, result.threshold)
    kind = get_task(data.task).validation_plot
    if kind == "regression":
        plot_regression(plot_dir / "regression.png", np.asarray(v.labels, dtype=float), preds)
    elif kind == "confusion_matrix":
        names = [data.id2label[i] for i in range(data.num_labels)]
        plot_confusion_matrix(plot_dir / "confusion_matrix.png", v.labels, preds, names)
    if result.calibration:
        plot_calibration(plot_dir / "calibration.png", v, data.task, result.calibration)


def plot_calibration(path: Path, calibrated: EvalOutput, task: str, calibration: dict) -> None:
    """Reliability diagram of the validation split before and after temperature scaling (the
    logits before are the calibrated ones times T)."""
    from finetune.calibration import reliability_bins
    from finetune.plots import plot_reliability

    t = calibration["temperature"]
    before = reliability_bins(calibrated.logits * t, calibrated.labels, task, calibration["bins"])
    after = reliability_bins(calibrated.logits, calibrated.labels, task, calibration["bins"])
    kind = get_task(task).reliability_kind
    plot_reliability(path, {f"before (ECE {calibration['ece_before']:.3f})": before,
                            f"after, T = {t:.3g} (ECE {calibration['ece_after']:.3f})": after},
                     f"Reliability (validation, {kind})")  # fmt: skip


def log_final_summary(summary: dict, conf: FinetuneConfig, out_dir: Path) -> None:
    """A closing table on the console: best metric, when, test metrics, time, where the model is."""
    best = summary.get("best") or {}
    metric = conf.early_stopping.metric
    rows = [
        ("best " + metric, f"{best[metric]:.4f}" if metric in best else "-"),
        ("at step / epoch", f"{best.get('step', '-')} / {best.get('epoch', '-')}"),
        ("validation", "  ".join(f"{k} {v:.4f}" for k, v in best.items() if k not in ("step", "epoch"))),
        ("test", "  ".join(f"{k} {v:.4f}" for k, v in (summary.get("test") or {}).items()) or "-"),
        ("training time", f"{summary['train_seconds']:.1f} s ({summary['steps']} steps"
                          f"{', stopped early' if summary['stopped_early'] else ''})"),
        ("model", str((Path(out_dir) / "model").resolve())),
    ]
    width = max(len(k) for k, _ in rows)
    logger.info("Summary\n" + "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows))
