"""Class frequencies: which rows a sub-sample keeps (``data.subsample``), how often the balanced
sampler draws each training row (``data.sampler``), and the label checks that run before any
model is loaded (a single class, a class the training rows lack, a rare class).

Pure functions of label arrays (class ids for single-label, multi-hot rows for multi-label);
``finetune.data`` applies them to its datasets and ``finetune.batching`` to its sampler.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional, Sequence

import numpy as np

from finetune.config import DataConfig, FinetuneConfig, SamplerType, Subsample
from finetune.data_checks import DataError, where
from finetune.tasks import get_task

logger = logging.getLogger(__name__)

# Fewer training rows than this in a class: the model can hardly learn it (a warning, not an error).
RARE_CLASS_ROWS = 5


# ---------------------------------------------------------------------------------------------
# Sub-samples (data.max_train_samples / max_eval_samples / max_test_samples)
# ---------------------------------------------------------------------------------------------
def subsample_indices(labels: np.ndarray, n: int, how: Subsample, seed: int, task: str) -> np.ndarray:
    """The positions (ascending, so file order is kept) of the ``n`` rows a sub-sample keeps.

    first: the first n rows. random: n rows drawn without replacement. stratified: each class
    in its share of n (largest remainders round; every class keeps a row while n allows), rows
    drawn at random within it; multi-label and regression have no classes to stratify by and
    are drawn at random. Seeded: the same (seed, rows, n) always keeps the same rows.
    """
    total = len(labels)
    if n >= total:
        return np.arange(total)
    if how == Subsample.first:
        return np.arange(n)
    rng = np.random.default_rng([seed, total, n])
    strata = get_task(task).stratify_labels(labels)
    if how == Subsample.random or strata is None:
        return np.sort(rng.choice(total, size=n, replace=False))
    labels = strata
    classes, counts = np.unique(labels, return_counts=True)
    quota = _apportion(counts, n)
    picked = [rng.choice(np.flatnonzero(labels == c), size=q, replace=False) for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked))


def _apportion(counts: np.ndarray, n: int) -> np.ndarray:
    """n rows shared over classes in proportion to ``counts`` (largest remainder), at least one
    per class when n >= the number of classes, never more than a class has."""
    exact = counts * n / counts.sum()
    quota = np.minimum(np.maximum(np.floor(exact).astype(int), 1 if n >= len(counts) else 0), counts)
    while quota.sum() > n:  # the minimum of one row per class overshot: take from the largest
        quota[np.argmax(np.where(quota > 1, quota - exact, -np.inf))] -= 1
    while quota.sum() < n:  # hand out the rest by largest remainder, where rows are left
        room = np.where(quota < counts, exact - quota, -np.inf)
        quota[np.argmax(room)] += 1
    return quota


def present(labels: np.ndarray, task: str, num_labels: int) -> np.ndarray:
    """Rows per class (single-label) or positive rows per label (multi-label)."""
    return get_task(task).label_counts(labels, num_labels)


def subsample(labels: np.ndarray, n: Optional[int], split: str, names: Sequence[str], task: str, cfg: DataConfig,
              seed: int) -> Optional[np.ndarray]:  # fmt: skip
    """The rows ``data.max_<split>_samples`` keeps of a split (None: all of them); warns naming
    the classes the full split has and the chosen rows lack."""
    if n is None or n >= len(labels):
        return None
    how = cfg.subsample
    if how == Subsample.stratified and not get_task(task).has_classes:
        logger.info("data.subsample=stratified needs single-label classes; %s rows of %s are drawn at random.",
                    split, get_task(task).name)  # fmt: skip
    keep = subsample_indices(np.asarray(labels), n, how, seed, task)
    full, chosen = present(labels, task, len(names)), present(np.asarray(labels)[keep], task, len(names))
    missing = [names[i] for i in np.flatnonzero((full > 0) & (chosen == 0))]
    if missing:
        key = "max_train_samples" if split == "train" else f"max_{'eval' if split == 'validation' else split}_samples"
        logger.warning(
            "data.%s=%d (data.subsample=%s) keeps no %s row of class(es) %s, which the full %s split has: %s. Use "
            "data.subsample=stratified (every class keeps its share) or a larger data.%s.",
            key, n, how.value, split, missing[:20], split,
            "the model never learns them" if split == "train" else "its metrics do not measure them", key,
        )  # fmt: skip
    return keep


# ---------------------------------------------------------------------------------------------
# The balanced sampler (data.sampler=balanced)
# ---------------------------------------------------------------------------------------------
def sampling_weights(labels: np.ndarray, task: str, num_labels: int, power: float,
                     documents: Optional[Sequence[int]] = None) -> np.ndarray:  # fmt: skip
    """The probability of each training row per draw of ``data.sampler=balanced``.

    Single-label: a row of class c weighs count[c] ** -power, so with power 1 every class is
    drawn equally often and with power 0 as often as it occurs. Multi-label: a row weighs the
    mean of count[l] ** -power over its labels l (rows without any label count as one more
    class), which balances labels only approximately, since rows carry several.
    With ``documents`` (data.long_text=window: each row's document) the counts are of documents
    and a document's weight is shared by its windows: classes are balanced in documents, and a
    long document is drawn no more often than a short one.
    """
    labels = np.asarray(labels)
    if documents is not None:
        _, first, owner, windows = np.unique(documents, return_index=True, return_inverse=True, return_counts=True)
        weights = sampling_weights(labels[first], task, num_labels, power)[owner] / windows[owner]
        return weights / weights.sum()
    weights = get_task(task).row_weights(labels, num_labels, power)
    return weights / weights.sum()


def describe_balance(labels: np.ndarray, weights: np.ndarray, names: Sequence[str], task: str, power: float,
                     documents: Optional[Sequence[int]] = None) -> str:  # fmt: skip
    """Each class's share of the rows (with ``documents``: of the documents, whose windows the
    rows are) and its expected share of the balanced draws, for the log."""
    rows, counted = "rows", labels
    if documents is not None:
        rows, counted = "documents", np.asarray(labels)[np.unique(documents, return_index=True)[1]]
    share = present(counted, task, len(names)) / max(len(counted), 1)
    drawn = get_task(task).drawn_shares(labels, weights, len(names))
    parts = [f"{names[i]} {100 * share[i]:.1f}% -> {100 * drawn[i]:.1f}%" for i in range(min(len(names), 20))]
    return f"data.sampler=balanced (power {power:g}), share of {rows} -> of draws per epoch: " + ", ".join(parts)


def imbalance_settings(conf: FinetuneConfig) -> Dict[str, object]:
    """How a run treats class imbalance and sub-samples, for metrics.json and the model card."""
    d, lo = conf.data, conf.loss
    return {
        "sampler": d.sampler.value,
        "sampler_power": d.sampler_power if d.sampler == SamplerType.balanced else None,
        "class_weights": lo.class_weights,
        "pos_weight": lo.pos_weight,
        "subsample": d.subsample.value,
    }


def imbalance_text(conf: FinetuneConfig) -> str:
    """One line for the model card: sampler, loss weighting, sub-samples."""
    s = imbalance_settings(conf)
    sampler = f"sampler {s['sampler']}" + (f" (power {s['sampler_power']:g})" if s["sampler_power"] is not None else "")
    weights = ", ".join(f"loss.{k}={s[k]}" for k in ("class_weights", "pos_weight") if s[k] is not None)
    limited = [k for k in ("max_train_samples", "max_eval_samples", "max_test_samples") if getattr(conf.data, k)]
    return "; ".join([sampler, weights or "unweighted loss"] + ([f"subsample {s['subsample']}"] if limited else []))


# ---------------------------------------------------------------------------------------------
# Label checks (before any model is loaded)
# ---------------------------------------------------------------------------------------------
def check_labels(split_labels: Dict[str, np.ndarray], full_train: np.ndarray, names: Sequence[str], task: str,
                 cfg: DataConfig, carved: bool) -> None:  # fmt: skip
    """The rows a run trains and scores on, as chosen (sub-samples, the automatic validation
    split): errors where training cannot mean anything, warnings where it can but poorly.

    Raises DataError: data.sampler=balanced on regression labels; training rows of a single
    class; a validation / test class that the train split lacks altogether.
    """
    if cfg.sampler == SamplerType.balanced and not get_task(task).balances:
        sampling_weights(np.zeros(0), task, 0, cfg.sampler_power)  # raises its message
    if not get_task(task).has_classes:
        return
    counts = {split: present(labels, task, len(names)) for split, labels in split_labels.items()}
    train, in_file = counts["train"], present(full_train, task, len(names))
    chosen = _how_chosen(cfg, carved)
    if (train > 0).sum() < 2:
        raise DataError(
            f"the training rows ({chosen}) hold a single class {[names[i] for i in np.flatnonzero(train)]}; "
            f"classification needs at least two. Use data.subsample=stratified or a larger data.max_train_samples, "
            "or train on data with examples of every class."
        )
    for split, count in counts.items():
        if split == "train":
            continue
        unknown = [names[i] for i in np.flatnonzero((count > 0) & (in_file == 0))]
        if unknown:
            raise unknown_labels_error(split, unknown, [names[i] for i in np.flatnonzero(in_file)], cfg)
        unseen = [names[i] for i in np.flatnonzero((count > 0) & (train == 0))]
        if unseen:
            logger.warning("The %s split has class(es) %s but the training rows (%s) have none: the model never "
                           "learns them. Use data.subsample=stratified or a larger data.max_train_samples.",
                           split, unseen[:20], chosen)  # fmt: skip
    rare = [f"'{names[i]}' ({train[i]} rows)" for i in np.flatnonzero((train > 0) & (train < RARE_CLASS_ROWS))]
    if rare:
        logger.warning("Class(es) %s have fewer than %d training rows: the model can hardly learn them and their "
                       "metrics are noise. Add examples, or merge or drop such classes.",
                       ", ".join(rare[:20]), RARE_CLASS_ROWS)  # fmt: skip
    if "validation" in counts:
        unscored = [names[i] for i in np.flatnonzero((train > 0) & (counts["validation"] == 0))]
        if unscored:
            logger.warning("The validation split has no rows of class(es) %s: validation metrics (and early "
                           "stopping) do not measure them.", unscored[:20])  # fmt: skip


def unknown_labels_error(split: str, unknown: Sequence[str], known: Sequence[str], cfg: DataConfig) -> DataError:
    """A validation / test label that the train split lacks: no model learns a class it never sees."""
    return DataError(
        f"the {split} split has labels {list(unknown)[:10]} that the train split does not have (train has "
        f"{list(known)[:20]}): no model learns a class it never sees. Fix the data ({where(split, cfg)}), or train on "
        "a split that contains every label."
    )


def _how_chosen(cfg: DataConfig, carved: bool) -> str:
    """Which rows of the train split a run trains on, in the keys that chose them."""
    chosen = "all rows of the train split"
    if cfg.max_train_samples is not None:
        chosen = f"data.max_train_samples={cfg.max_train_samples}, data.subsample={cfg.subsample.value}"
    return chosen + (f", less data.validation_size={cfg.validation_size:g} held out for validation" if carved else "")


def describe_sizes(sizes: Dict[str, int], cfg: DataConfig, carved: bool) -> str:
    """"Using N train / M validation / K test rows (...)": what the run trains and scores on."""
    test = sizes.get("test", "no")
    held = f"; the validation rows held out of those {sizes['train'] + sizes['validation']}" if carved else ""
    return (f"Using {sizes['train']} train / {sizes['validation']} validation / {test} test rows "
            f"(train: {_how_chosen(cfg, False)}{held}).")  # fmt: skip
