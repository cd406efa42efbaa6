"""Regression: one number per text (the single output is the prediction)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from finetune.config import REGRESSION, DataConfig, LossName, TaskType
from finetune.data_checks import DataError, is_number, where
from finetune.tasks.base import LABELS, LabelIssues, Task, mean_pool

# The metrics of values rather than classes.
VALUE_METRICS = ("pearson", "spearman", "mse", "mae")
# cleanlab's cut for regression label issues from predictions (its Datalab default): a row is flagged
# when its label quality is below this fraction of the median quality.
ISSUE_THRESHOLD = 0.05
# An export "decides the same" as PyTorch when its value is within this fraction of the range of
# the reference values.
VALUE_TOLERANCE = 0.01


def is_float_feature(feature) -> bool:
    from datasets import Value

    return isinstance(feature, Value) and feature.dtype.startswith("float")


class Regression(Task):
    name = REGRESSION
    choice = TaskType.regression
    losses = (LossName.mse, LossName.mae, LossName.huber, LossName.log_cosh)
    default_metrics = ("pearson", "spearman", "mse")
    early_stopping_metric = "mse"
    card_tag = "text-regression"
    validation_plot = "regression"
    balances = False
    teacher_labels_must_match = False  # one output, whatever the column is named

    # --- labels ---------------------------------------------------------------------------------
    def claims(self, train, cfg: DataConfig) -> bool:
        column = train.features.get(cfg.label_column)
        return not cfg.label_columns and column is not None and is_float_feature(column)

    def check_requested(self, train, cfg: DataConfig, found: Task) -> None:
        from datasets import Value

        feature = train.features[cfg.label_column]
        if not (isinstance(feature, Value) and (feature.dtype.startswith(("float", "int")))):
            row, value = next(((i, v) for i, v in enumerate(train[cfg.label_column]) if not is_number(v)), (0, None))
            raise DataError(
                f"task=regression but data.label_column='{cfg.label_column}' is not numeric: row {row + 1} of "
                f"{where('train', cfg)} holds {value!r}. Regression needs a number in every row; fix those values, "
                "or use task=single_label for class names."
            )

    def encode_splits(self, raw, cfg: DataConfig):
        return [cfg.label_column], {split: encode_values(ds, split, cfg) for split, ds in raw.items()}

    def label_counts(self, labels: np.ndarray, num_labels: int) -> np.ndarray:
        return np.zeros(0, dtype=int)

    def row_weights(self, labels: np.ndarray, num_labels: int, power: float) -> np.ndarray:
        raise DataError("data.sampler=balanced needs classes to balance, but the labels are numbers (regression); "
                        "use data.sampler=random.")  # fmt: skip

    def references(self, labels: np.ndarray) -> np.ndarray:
        return np.asarray(labels)

    def default_for_outputs(self, num_labels: int) -> bool:
        return num_labels == 1

    # --- loss -----------------------------------------------------------------------------------
    def soft_target_loss(self, student, teacher, temperature: float):
        import torch.nn.functional as F

        return F.mse_loss(student.squeeze(-1).float(), teacher.squeeze(-1).float())

    # --- predictions ----------------------------------------------------------------------------
    def scores(self, logits: np.ndarray) -> np.ndarray:
        logits = np.asarray(logits, dtype=np.float64)
        return logits.reshape(len(logits), -1)[:, 0]

    def predictions(self, scores: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        return scores

    def label_text(self, value, id2label: Dict[int, str]) -> str:
        return f"{float(value):.6g}"

    def probability_fields(self, scores_row, id2label: Dict[int, str]) -> Dict[str, str]:
        return {}

    def predict_record(self, prediction, scores_row, id2label: Dict[int, str], decimals: int) -> dict:
        return {"prediction": float(self.label_text(prediction, id2label))}

    def agreement(self, reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
        spread = float(reference.max() - reference.min()) or 1.0
        return np.abs(reference - candidate) <= VALUE_TOLERANCE * spread

    def pool(self, flat: np.ndarray, owner: np.ndarray, n: int, how: str) -> np.ndarray:
        return mean_pool(flat, owner, n)  # the mean value, whatever data.window_pool says

    # --- metrics --------------------------------------------------------------------------------
    def metric_names(self, known: Sequence[str]) -> List[str]:
        return sorted(VALUE_METRICS)

    # --- label audit ----------------------------------------------------------------------------
    def label_issues(self, logits, labels, id2label: Dict[int, str]) -> LabelIssues:
        from cleanlab.datalab.internal.issue_manager.regression.label import find_issues_with_predictions

        predicted, given = self.scores(np.stack(logits)), np.asarray(labels, dtype=np.float64)
        found = find_issues_with_predictions(predicted, given, threshold=ISSUE_THRESHOLD)
        flagged = found["is_label_issue"].to_numpy()
        return LabelIssues(
            flagged=flagged,
            quality=found["label_score"].to_numpy(),
            given=[self.label_text(v, id2label) for v in given],
            suggested=[self.label_text(v, id2label) for v in predicted],
            noise_rate=float(flagged.mean()),  # values have no noise matrix: the flagged share
            noise_unit="rows",
            confused=[],
        )

    # --- calibration ----------------------------------------------------------------------------
    def calibration_problem(self, data: Optional[DataConfig] = None) -> Optional[str]:
        return (
            "eval.calibrate=temperature with a regression task: temperature scaling calibrates class "
            "probabilities (softmax / sigmoid over logits) and a regression model predicts values, not "
            "probabilities. Set eval.calibrate=none, or use a classification task."
        )


def encode_values(ds, split: str, cfg: DataConfig):
    """A float `labels` column; every row must hold a finite number."""
    from datasets import Value

    for i, value in enumerate(ds[cfg.label_column]):
        if not is_number(value):
            raise DataError(
                f"{where(split, cfg)}: row {i + 1} of data.label_column='{cfg.label_column}' holds {value!r}, not a "
                "finite number; regression needs a number in every row. Fix the value or remove the row."
            )

    def to_float(batch):
        return {LABELS: [float(v) for v in batch[cfg.label_column]]}

    ds = ds.map(to_float, batched=True, desc=f"Encoding {split} labels")
    return ds.cast_column(LABELS, Value("float32"))
