"""Single-label classification: one class per text (softmax over the classes, argmax; binary
decisions at a threshold on P(class 1))."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from finetune.config import SINGLE_LABEL, DataConfig, LossName, TaskType
from finetune.data_checks import DataError, where
from finetune.tasks.base import (LABELS, LabelIssues, Task, anchor_noise_matrix, max_pool, mean_pool, posterior_noise,
                                 softmax, true_label_posterior)

if TYPE_CHECKING:
    from datasets import Dataset

# A row is flagged when the probability that its given label is right falls below this (at least
# 70% likely wrong; audit.flag_below sets another cut). On the AG News benchmark (five draws of 10%
# flipped labels) 0.5 flagged at precision 0.72 / recall 0.82, 0.3 at 0.79 / 0.67 (BENCHMARKS.md).
FLAG_BELOW = 0.3


class SingleLabel(Task):
    name = SINGLE_LABEL
    choice = TaskType.single_label
    losses = (LossName.cross_entropy, LossName.focal)
    default_metrics = ("accuracy", "f1")
    early_stopping_metric = "accuracy"
    card_tag = "text-classification"
    has_classes = True
    audit_flag_below = FLAG_BELOW
    validation_plot = "confusion_matrix"

    # --- labels ---------------------------------------------------------------------------------
    def claims(self, train, cfg: DataConfig) -> bool:
        from finetune.tasks.multi_label import is_list_feature
        from finetune.tasks.regression import is_float_feature

        if cfg.label_columns or cfg.label_column not in train.features:
            return False
        feature = train.features[cfg.label_column]
        return not (is_list_feature(feature) or is_float_feature(feature))

    def encode_splits(self, raw, cfg: DataConfig):
        names, encoder = label_vocabulary(raw["train"], cfg)
        if len(names) < 2:
            raise DataError(
                f"the train split ({where('train', cfg)}) has a single label {names} in data.label_column="
                f"'{cfg.label_column}'; classification needs at least two. Check the label column, or train on "
                "data with examples of every class."
            )
        return names, {split: encode_labels(ds, split, names, encoder, cfg) for split, ds in raw.items()}

    def label_counts(self, labels: np.ndarray, num_labels: int) -> np.ndarray:
        return np.bincount(np.asarray(labels, dtype=int), minlength=num_labels)

    def row_weights(self, labels: np.ndarray, num_labels: int, power: float) -> np.ndarray:
        counts = np.bincount(labels, minlength=num_labels).astype(float)
        return counts[labels] ** -power

    def drawn_shares(self, labels: np.ndarray, weights: np.ndarray, num_labels: int) -> np.ndarray:
        return np.bincount(labels, weights=weights, minlength=num_labels)

    def default_for_outputs(self, num_labels: int) -> bool:
        return num_labels != 1

    # --- loss -----------------------------------------------------------------------------------
    def soft_target_loss(self, student, teacher, temperature: float):
        import torch.nn.functional as F

        t = temperature
        kl = F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1), reduction="batchmean",
                      log_target=True)  # fmt: skip
        return kl * t * t

    # --- predictions ----------------------------------------------------------------------------
    def scores(self, logits: np.ndarray) -> np.ndarray:
        return softmax(np.asarray(logits, dtype=np.float64))

    def predictions(self, scores: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        if scores.shape[1] == 2:
            return (scores[:, 1] >= threshold).astype(np.int64)
        return scores.argmax(axis=-1)

    def uses_threshold(self, num_labels: int) -> bool:
        return num_labels == 2

    def label_text(self, value, id2label: Dict[int, str]) -> str:
        return id2label[int(value)]

    def pool(self, flat: np.ndarray, owner: np.ndarray, n: int, how: str) -> np.ndarray:
        return max_pool(flat, owner, n) if how == "max" else mean_pool(flat, owner, n)

    # --- metrics --------------------------------------------------------------------------------
    def metric_names(self, known: Sequence[str]) -> List[str]:
        from finetune.tasks.regression import VALUE_METRICS

        return sorted(n for n in known if n not in VALUE_METRICS)

    def metric_average(self, num_labels: int) -> str:
        return "binary" if num_labels == 2 else "macro"

    def metric_config(self, module_name: str, num_labels: int, bundled: bool) -> Optional[str]:
        return "multiclass" if module_name == "roc_auc" and num_labels > 2 else None

    def ranking_scores(self, scores: np.ndarray, num_labels: int) -> np.ndarray:
        return scores[:, 1] if num_labels == 2 else scores

    # --- label audit ----------------------------------------------------------------------------
    def audit_skill(self, logits, labels) -> Optional[Tuple[float, float]]:
        probs, given = self.scores(np.stack(logits)), np.asarray(labels, dtype=np.int64)
        frequencies = np.bincount(given, minlength=probs.shape[1]) / len(given)
        log_loss = -np.log(np.clip(probs[np.arange(len(given)), given], 1e-12, None)).mean()
        return float(log_loss), float(-np.log(frequencies[given]).mean())

    def label_issues(self, logits, labels, id2label: Dict[int, str], flag_below: float = FLAG_BELOW) -> LabelIssues:
        """A row is flagged when its given label is likely wrong: P(true label = given | text, given)
        < ``flag_below`` (default ``FLAG_BELOW``) under the noise matrix estimated from anchor rows
        (``anchor_noise_matrix``). cleanlab's confident joint, which counts a model's own mistakes on
        correctly labelled rows as noise too, flagged ~1.8x the rows actually flipped on AG News
        (BENCHMARKS.md, "Label audit"). The scores are cleanlab's label quality scores; the
        suggestion is the out-of-fold prediction."""
        from cleanlab.rank import get_label_quality_scores

        probs, given = self.scores(np.stack(logits)), np.asarray(labels, dtype=np.int64)
        names = [id2label[i] for i in range(len(id2label))]
        noise = anchor_noise_matrix(probs, given)
        posterior = true_label_posterior(probs, given, noise)
        rate, confused = posterior_noise(given, posterior, names)
        return LabelIssues(
            flagged=posterior[np.arange(len(given)), given] < flag_below,
            quality=get_label_quality_scores(given, probs),
            given=[names[i] for i in given],
            suggested=[names[i] for i in probs.argmax(axis=-1)],
            noise_rate=rate,
            noise_unit="rows",
            confused=confused,
            noise_matrix=(noise, names, names, "Estimated noise matrix P(given label | true label): rows given, columns true"),
        )


# ---------------------------------------------------------------------------------------------
# Reading class labels
# ---------------------------------------------------------------------------------------------
def label_vocabulary(train: "Dataset", cfg: DataConfig) -> Tuple[List[str], Optional[Dict[Any, int]]]:
    """The label names and how raw label values map to ids (None: the column already holds ids).

    ClassLabel columns keep their names. Integer labels 0..K-1 keep their ids (named by
    ``data.label_names`` or by the ids themselves); string labels are sorted.
    """
    from datasets import ClassLabel

    feature = train.features[cfg.label_column]
    if isinstance(feature, ClassLabel):
        return list(feature.names), None
    values = train.unique(cfg.label_column)
    if any(v is None or v == "" for v in values):
        raise DataError(f"the train split has empty values in data.label_column='{cfg.label_column}'.")
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        ints = sorted(int(v) for v in values)
        if ints[0] < 0:  # arbitrary integers: rank them
            return [str(i) for i in ints], {v: i for i, v in enumerate(ints)}
        n = ints[-1] + 1
        if cfg.label_names:
            if len(cfg.label_names) < n:
                raise DataError(
                    f"data.label_names has {len(cfg.label_names)} names but the labels run up to {ints[-1]}; "
                    f"give one name per label id 0..{ints[-1]}."
                )
            n = len(cfg.label_names)
            return list(cfg.label_names), {i: i for i in range(n)}
        return [str(i) for i in range(n)], {i: i for i in range(n)}
    if all(isinstance(v, str) for v in values):
        if cfg.label_names:
            raise DataError(
                f"data.label_names is set but data.label_column='{cfg.label_column}' already holds names "
                f"({sorted(values)[:5]}); remove data.label_names."
            )
        names = sorted(values)
        return names, {v: i for i, v in enumerate(names)}
    raise DataError(
        f"data.label_column='{cfg.label_column}' holds values of type "
        f"{sorted({type(v).__name__ for v in values})}; expected integer ids or string names."
    )


def encode_labels(ds: "Dataset", split: str, names: List[str], encoder: Optional[Dict[Any, int]], cfg: DataConfig) -> "Dataset":
    """Map the label column to integer ids in a `labels` column typed as ClassLabel(names)."""
    from datasets import ClassLabel

    from finetune.sampling import unknown_labels_error

    feature = ds.features[cfg.label_column]
    if encoder is None:
        if not isinstance(feature, ClassLabel) or list(feature.names) != names:
            raise DataError(f"the {split} split's labels do not match train's label names {names}.")
    else:
        unknown = sorted({str(v) for v in ds.unique(cfg.label_column) if v not in encoder})
        if unknown:
            raise unknown_labels_error(split, unknown, sorted(map(str, encoder)), cfg)

    def to_ids(batch):
        values = batch[cfg.label_column]
        return {LABELS: values if encoder is None else [encoder[v] for v in values]}

    ds = ds.map(to_ids, batched=True, desc=f"Encoding {split} labels")
    return ds.cast_column(LABELS, ClassLabel(names=names))
