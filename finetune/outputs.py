"""What a run leaves behind besides the model: metrics.json and prediction tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from finetune.config import FinetuneConfig
from finetune.data import TaskData
from finetune.model import ModelInfo
from finetune.train import EvalOutput, TrainResult


def write_metrics(out_dir: Path, result: TrainResult, conf: FinetuneConfig, info: ModelInfo) -> dict:
    """metrics.json: every evaluation, the best one, and the test metrics of the best weights."""
    summary = {
        "best": result.best,
        "best_metric": conf.early_stopping.metric,
        "test": result.test,
        "evaluations": result.history,
        "steps": result.steps,
        "stopped_early": result.stopped_early,
        "skipped_steps": result.skipped_steps,
        "train_seconds": round(result.train_seconds, 3),
        "trainable_params": info.trainable_params,
        "total_params": info.total_params,
    }
    (Path(out_dir) / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def write_prediction_table(path: Path, output: EvalOutput, id2label: dict) -> None:
    """One row per example, in dataset order: gold and predicted label names, class probabilities."""
    probs = _softmax(output.logits)
    names = [id2label[i] for i in range(len(id2label))]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["index", "label", "prediction", *[f"prob_{n}" for n in names]])
        for i, (gold, row) in enumerate(zip(output.labels, probs)):
            writer.writerow([i, id2label[int(gold)], id2label[int(row.argmax())], *[f"{p:.6f}" for p in row]])


def write_predictions(out_dir: Path, result: TrainResult, data: TaskData) -> None:
    pred_dir = Path(out_dir) / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    for split, output in (("validation", result.validation), ("test", result.test_output)):
        if output is not None:
            write_prediction_table(pred_dir / f"{split}.tsv", output, data.id2label)
