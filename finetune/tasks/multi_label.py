"""Multi-label classification: any set of labels per text (a sigmoid per label, each decided at
the threshold); labels come as lists in one column or as several 0/1 columns."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from finetune.config import MULTI_LABEL, DataConfig, LossName, TaskType
from finetune.data_checks import DataError, where
from finetune.tasks.base import LABELS, TOP_CONFUSED, LabelIssues, Task, max_pool, mean_pool, sigmoid

if TYPE_CHECKING:
    from datasets import Dataset


def is_list_feature(feature) -> bool:
    from datasets import LargeList, List as ListFeature, Sequence as SequenceFeature

    return isinstance(feature, (SequenceFeature, LargeList, ListFeature))


class MultiLabel(Task):
    name = MULTI_LABEL
    choice = TaskType.multi_label
    losses = (LossName.bce, LossName.focal)
    default_metrics = ("f1_micro", "f1_macro")
    early_stopping_metric = "f1_micro"
    card_tag = "multi-label-classification"
    sigmoid_outputs = True
    reads_label_columns = True
    retune_threshold_after_calibration = True
    reliability_kind = "per-label probabilities"

    # --- labels ---------------------------------------------------------------------------------
    def claims(self, train, cfg: DataConfig) -> bool:
        column = train.features.get(cfg.label_column)
        return bool(cfg.label_columns) or (column is not None and is_list_feature(column))

    def check_requested(self, train, cfg: DataConfig, found: Task) -> None:
        if found is not self:
            raise DataError(
                f"task=multi_label but data.label_column='{cfg.label_column}' holds single values; give a column of "
                "label lists, or several 0/1 columns with data.label_columns=[...]."
            )

    def encode_splits(self, raw, cfg: DataConfig):
        names = label_names(raw["train"], cfg)
        return names, {split: encode_multi_label(ds, split, names, cfg) for split, ds in raw.items()}

    def label_counts(self, labels: np.ndarray, num_labels: int) -> np.ndarray:
        return (np.asarray(labels) > 0.5).sum(axis=0) if len(labels) else np.zeros(num_labels, dtype=int)

    def row_weights(self, labels: np.ndarray, num_labels: int, power: float) -> np.ndarray:
        # A row weighs the mean of its labels' weights; rows without any label count as one more class.
        hot = labels > 0.5
        per_label = np.maximum(hot.sum(axis=0), 1).astype(float) ** -power
        per_row = hot.sum(axis=1)
        weights = (hot * per_label).sum(axis=1) / np.maximum(per_row, 1)
        weights[per_row == 0] = float((per_row == 0).sum()) ** -power
        return weights

    # --- loss -----------------------------------------------------------------------------------
    def soft_target_loss(self, student, teacher, temperature: float):
        import torch
        import torch.nn.functional as F

        t = temperature
        return F.binary_cross_entropy_with_logits(student / t, torch.sigmoid(teacher / t)) * t * t

    # --- predictions ----------------------------------------------------------------------------
    def scores(self, logits: np.ndarray) -> np.ndarray:
        return sigmoid(np.asarray(logits, dtype=np.float64))

    def predictions(self, scores: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        return (scores >= threshold).astype(np.int64)

    def uses_threshold(self, num_labels: int) -> bool:
        return True

    def label_text(self, value, id2label: Dict[int, str]) -> str:
        return "|".join(id2label[j] for j, v in enumerate(value) if v >= 0.5)

    def agreement(self, reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
        return (np.asarray(reference) == np.asarray(candidate)).all(axis=-1)

    def pool(self, flat: np.ndarray, owner: np.ndarray, n: int, how: str) -> np.ndarray:
        # The mean or max of the window probabilities, as log-odds, so that everything downstream
        # reads them as any logits; the max of sigmoids is the sigmoid of the max.
        if how == "max":
            return max_pool(flat, owner, n)
        p = np.clip(mean_pool(sigmoid(flat), owner, n), 1e-7, 1 - 1e-7)
        return np.log(p) - np.log1p(-p)

    # --- metrics --------------------------------------------------------------------------------
    def metric_names(self, known: Sequence[str]) -> List[str]:
        from finetune.tasks.regression import VALUE_METRICS

        return sorted(n for n in known if n not in VALUE_METRICS + ("matthews_correlation",))

    def metric_config(self, module_name: str, num_labels: int, bundled: bool) -> Optional[str]:
        return "multilabel" if bundled else None

    # --- calibration ----------------------------------------------------------------------------
    def calibration_problem(self, data: Optional[DataConfig] = None) -> Optional[str]:
        from finetune.config import LongText, WindowPool

        # Mean and max of logits, and max of sigmoids, commute with dividing the window logits by T;
        # the log-odds of the mean of sigmoids do not.
        if data is not None and data.long_text == LongText.window and data.window_pool == WindowPool.mean:
            return (
                "eval.calibrate=temperature with data.long_text=window and data.window_pool=mean on a multi-label "
                "task: a document's logits are then the log-odds of the mean of its windows' sigmoid probabilities, "
                "which folding T into the head (dividing every window's logits by T) does not divide by T, so the "
                "temperature fitted on them and the calibrated metrics would not describe the saved model. Set "
                "data.window_pool=max (the max commutes with T), data.long_text=truncate, or eval.calibrate=none."
            )
        return None

    def calibration_targets(self, labels):
        import torch

        return labels.to(torch.float64)

    def nll(self, logits, targets):
        import torch.nn.functional as F

        return F.binary_cross_entropy_with_logits(logits, targets)

    def confidence_and_outcome(self, scores: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        return scores.ravel(), (labels.ravel() >= 0.5).astype(np.float64)

    # --- label audit ----------------------------------------------------------------------------
    def label_issues(self, logits, labels, id2label: Dict[int, str]) -> LabelIssues:
        from cleanlab.count import estimate_joint
        from cleanlab.multilabel_classification.filter import find_label_issues
        from cleanlab.multilabel_classification.rank import get_label_quality_scores

        probs, hot = self.scores(np.stack(logits)), np.stack(labels) >= 0.5
        given = [np.flatnonzero(row).tolist() for row in hot]
        names = [id2label[i] for i in range(len(id2label))]
        joint = estimate_joint(given, probs, multi_label=True)  # per label: [given 0/1][true 0/1]
        # Per label, the share of rows where it is given but likely absent, and absent but likely present.
        wrong = np.stack([joint[:, 1, 0], joint[:, 0, 1]], axis=1)
        pairs = sorted(((wrong[k, m], k, m) for k in range(len(names)) for m in (0, 1)), reverse=True)
        confused = [{"given": names[k] if m == 0 else f"not {names[k]}", "likely_true": f"not {names[k]}" if m == 0
                     else names[k], "rows": int(round(p * len(hot)))}
                    for p, k, m in pairs[:TOP_CONFUSED] if round(p * len(hot)) >= 1]  # fmt: skip
        return LabelIssues(
            flagged=find_label_issues(given, probs),
            quality=get_label_quality_scores(given, probs),
            given=[self.label_text(row, id2label) for row in hot],
            suggested=[self.label_text(row, id2label) for row in self.predictions(probs)],
            noise_rate=float(wrong.sum(axis=1).mean()),
            noise_unit="(row, label) decisions",
            confused=confused,
            noise_matrix=(wrong, names, ["given, likely absent", "absent, likely present"],
                          "Estimated share of rows with the label wrong"),
        )


# ---------------------------------------------------------------------------------------------
# Reading label sets
# ---------------------------------------------------------------------------------------------
def label_names(train: "Dataset", cfg: DataConfig) -> List[str]:
    from datasets import ClassLabel

    if cfg.label_columns:
        return list(cfg.label_columns)
    inner = train.features[cfg.label_column].feature
    if isinstance(inner, ClassLabel):
        return list(inner.names)
    values = {v for row in train[cfg.label_column] for v in row}
    return [str(v) for v in sorted(values)]


def encode_multi_label(ds: "Dataset", split: str, names: List[str], cfg: DataConfig) -> "Dataset":
    """A multi-hot float `labels` column from label lists or several 0/1 columns."""
    from datasets import ClassLabel, Sequence as SequenceFeature, Value

    index = {name: i for i, name in enumerate(names)}
    if cfg.label_columns:

        def to_multi_hot(batch):
            rows = zip(*(batch[c] for c in cfg.label_columns))
            return {LABELS: [[float(v) for v in row] for row in rows]}

    else:
        inner = ds.features[cfg.label_column].feature
        to_name: Any = (lambda v: inner.names[v]) if isinstance(inner, ClassLabel) else str
        unknown = sorted({to_name(v) for row in ds[cfg.label_column] for v in row} - set(index))
        if unknown:
            raise DataError(
                f"the {split} split ({where(split, cfg)}) has labels {unknown[:10]} in data.label_column="
                f"'{cfg.label_column}' that the train split does not have (known: {names[:20]}). Fix the label "
                "names, or train on data that contains every label."
            )

        def to_multi_hot(batch):
            out = []
            for row in batch[cfg.label_column]:
                vec = [0.0] * len(names)
                for v in row:
                    vec[index[to_name(v)]] = 1.0
                out.append(vec)
            return {LABELS: out}

    ds = ds.map(to_multi_hot, batched=True, desc=f"Encoding {split} labels")
    return ds.cast_column(LABELS, SequenceFeature(Value("float32")))
