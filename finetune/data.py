"""Data: load (Hub or local files) -> map columns -> encode labels -> split -> tokenize.
Batching (samplers, augmentation, collators, DataLoaders) is in finetune.batching."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterable, Iterator, List, Optional

import numpy as np
from transformers import BatchEncoding, PreTrainedTokenizerBase

from finetune.config import SINGLE_LABEL, DataConfig, TaskType
from finetune.data_checks import DataError, check_file, csv_dialect, where
from finetune.sampling import check_labels, describe_sizes, subsample
from finetune.tasks import LABELS, detect, get_task, task_for_choice
from finetune.windows import DOCUMENT, OVERFLOW, FirstTextTooLong, encode_windows, window_stride

if TYPE_CHECKING:  # datasets is imported where it is used: finetune.predict's encode_texts does without it (~1 s)
    from datasets import Dataset, DatasetDict

logger = logging.getLogger(__name__)

# Each row's 0-based data row in the training file (-1: a row of the validation file), kept through
# sub-samples, the automatic validation split and cross-validation's folds (finetune.audit).
SOURCE_ROW = "_finetune_row"
TEACHER_LOGITS = "teacher_logits"  # distillation: the teacher's logits of each training row / window (finetune.distill)
_FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".txt": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class TaskData:
    """Tokenized splits plus what the model and the outputs need to know about the labels."""

    train: Dataset
    validation: Dataset
    test: Optional[Dataset]
    id2label: Dict[int, str]
    label2id: Dict[str, int]
    task: str = SINGLE_LABEL
    # Number of tokens in each training example (before padding), for length grouping.
    train_lengths: List[int] = field(default_factory=list)
    # The raw text (and text pair) of the validation / test rows, for prediction tables.
    texts: Dict[str, List[tuple]] = field(default_factory=dict)
    # With data.augment: the untokenized training rows (text, pair, labels), tokenized per batch.
    train_raw: Optional[Dataset] = None
    # Training documents (rows before data.long_text=window cut them into len(train) windows).
    train_documents: int = 0
    # With windows: each training window's document (its row in the train split), which the
    # balanced sampler weighs by; the training batches themselves do not carry it.
    train_document_index: Optional[List[int]] = None

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    def label_counts(self) -> List[int]:
        """Training examples per class (single-label) or positives per label (multi-label)."""
        task = get_task(self.task)
        return task.label_counts(task.label_array(self.train[LABELS]), self.num_labels).tolist()


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def load_raw_splits(cfg: DataConfig) -> DatasetDict:
    """Load train / validation / test as they come (Hub dataset or local files)."""
    from datasets import DatasetDict, load_dataset

    if cfg.train_file is not None:
        files = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}
        return DatasetDict({split: _load_file(path, cfg) for split, path in files.items() if path is not None})

    try:
        loaded = load_dataset(cfg.dataset, cfg.config)
    except Exception as err:  # the datasets library raises many types for "not found / offline"
        raise DataError(
            f"data.dataset='{cfg.dataset}' (config {cfg.config!r}) could not be loaded: {err}. Check the "
            "dataset id and config name; without network access use local files (data.train_file=...)."
        ) from err
    splits = {"train": cfg.train_split, "validation": cfg.validation_split, "test": cfg.test_split}
    if cfg.train_split not in loaded:
        raise DataError(
            f"data.train_split='{cfg.train_split}' is not a split of {cfg.dataset}; it has {sorted(loaded)}."
        )
    return DatasetDict({name: loaded[split] for name, split in splits.items() if split and split in loaded})


def _load_file(path: str, cfg: DataConfig) -> Dataset:
    from datasets import load_dataset

    suffix = Path(path).suffix.lower()
    fmt = _FILE_FORMATS.get(suffix)
    if fmt is None:
        raise DataError(
            f"data file '{path}' has an unknown extension '{suffix}'; use one of {sorted(_FILE_FORMATS)}."
        )
    check_file(path, cfg)
    kwargs = {}
    if fmt == "csv":
        # Never turn "NA" / "null" sentences into missing values.
        kwargs.update(keep_default_na=False, na_filter=False)
        delimiter, quoting = csv_dialect(suffix)
        kwargs.update(delimiter=delimiter, quoting=quoting)
        if cfg.column_names:
            kwargs.update(column_names=list(cfg.column_names), header=None)
    try:
        return load_dataset(fmt, data_files={"data": str(path)}, split="data", **kwargs)
    except Exception as err:
        raise DataError(f"data file '{path}' could not be read as {fmt}: {err}") from err


# ---------------------------------------------------------------------------------------------
# Columns and labels
# ---------------------------------------------------------------------------------------------
def _check_columns(ds: Dataset, split: str, cfg: DataConfig, task: str) -> None:
    wanted = get_task(task).columns(cfg)
    missing = [f"{key}='{col}'" for key, col in wanted.items() if col not in ds.column_names]
    if missing:
        hint = " (a file without a header row needs data.column_names=[...])" if cfg.train_file else ""
        raise DataError(
            f"the {split} split has no column {', '.join(missing)}; its columns are {ds.column_names}{hint}."
        )


def _has_labels(ds: Dataset, cfg: DataConfig, task: str) -> bool:
    """GLUE-style test splits carry -1 (no label) everywhere: treat them as unlabelled."""
    from datasets import ClassLabel, Value

    if any(col not in ds.column_names for col in get_task(task).columns(cfg).values()):
        return False
    if cfg.label_columns or cfg.label_column not in ds.column_names:
        return True
    feature = ds.features[cfg.label_column]
    if isinstance(feature, ClassLabel) or (isinstance(feature, Value) and feature.dtype.startswith(("int", "float"))):
        return any(v != -1 for v in ds[cfg.label_column])
    return True


def detect_task(train: Dataset, cfg: DataConfig, requested: TaskType = TaskType.auto) -> str:
    """The task from the label column(s) (each task says which data it claims: several 0/1 columns
    or lists -> multi-label, floats -> regression, anything else -> single-label classification).
    ``task=`` overrides, when the column can hold its labels."""
    found = detect(train, cfg)
    wanted = task_for_choice(requested)
    if wanted is None or cfg.label_columns:
        return found.name
    missing = [f"{key}='{col}'" for key, col in wanted.columns(cfg).items() if col not in train.column_names]
    found_columns = found.columns(cfg).values()
    if found is not wanted and missing and all(col in train.column_names for col in found_columns):
        # e.g. word and tag lists given to a text task
        held = ", ".join(f"{key}='{col}'" for key, col in found.columns(cfg).items())
        raise DataError(
            f"task={requested.value} needs {', '.join(missing)}, which the train split ({train.column_names}) lacks; "
            f"its columns ({held}) hold {found.name} data. Set task={found.choice.value} (or auto), or name the "
            f"columns task={requested.value} reads."
        )
    wanted.check_requested(train, cfg, found)
    return wanted.name


def _subsample(ds: Dataset, n: Optional[int], split: str, names: List[str], task: str, cfg: DataConfig, seed: int) -> Dataset:
    keep = subsample(get_task(task).label_array(ds[LABELS]), n, split, names, task, cfg, seed) if n is not None else None
    return ds if keep is None else ds.select(keep.tolist())


def load_and_prepare(cfg: DataConfig, seed: int, task: TaskType = TaskType.auto) -> tuple[DatasetDict, List[str], str]:
    """Raw splits with an encoded `labels` column, the label names and the task; a validation
    split is carved from train (stratified for single-label) when none is given."""
    from datasets import DatasetDict

    raw = load_raw_splits(cfg)
    for split, ds in raw.items():
        if len(ds) == 0:
            raise DataError(f"the {split} split is empty.")
    problem = detect_task(raw["train"], cfg, task)
    if "test" in raw and not _has_labels(raw["test"], cfg, problem):
        logger.info("The test split has no labels; it is not evaluated.")
        del raw["test"]
    for split, ds in raw.items():
        _check_columns(ds, split, cfg, problem)
        get_task(problem).check_split(ds, split, cfg)
    # Each row keeps its place in the training file through sub-samples, splits and folds (a label
    # audit reports it; data.exclude_rows names it); the validation file's rows are marked -1.
    raw["train"] = raw["train"].add_column(SOURCE_ROW, list(range(len(raw["train"]))))
    if "validation" in raw:
        raw["validation"] = raw["validation"].add_column(SOURCE_ROW, [-1] * len(raw["validation"]))
    if cfg.exclude_rows is not None:
        raw["train"] = _exclude_rows(raw["train"], cfg)
    names, splits = get_task(problem).encode_splits(dict(raw), cfg)

    # max_train_samples bounds everything the run trains on: the automatic validation split is
    # held out of the rows it keeps, and cross-validation pools only those.
    label_array = get_task(problem).label_array
    full_train = label_array(splits["train"][LABELS])
    limits = {"train": cfg.max_train_samples, "validation": cfg.max_eval_samples, "test": cfg.max_test_samples}
    splits["train"] = _subsample(splits["train"], limits["train"], "train", names, problem, cfg, seed)
    carved = "validation" not in splits
    if carved:
        splits["train"], splits["validation"] = _split_validation(splits["train"], cfg.validation_size, seed)
    for split in ("validation", "test"):
        if split in splits:
            splits[split] = _subsample(splits[split], limits[split], split, names, problem, cfg, seed)
    check_labels({k: label_array(v[LABELS]) for k, v in splits.items()}, full_train, names, problem, cfg, carved)
    logger.info(describe_sizes({k: len(v) for k, v in splits.items()}, cfg, carved))
    return DatasetDict(splits), names, problem


def _exclude_rows(train: Dataset, cfg: DataConfig) -> Dataset:
    """The training rows data.exclude_rows does not name (DataError for a row the file lacks)."""
    from finetune.data_checks import read_exclude_rows

    rows, why = read_exclude_rows(cfg.exclude_rows)
    total = len(train)
    missing = sorted({r for r in rows if r >= total})
    if missing:
        raise DataError(
            f"data.exclude_rows='{cfg.exclude_rows}' names row(s) {missing[:10]}{' ...' if len(missing) > 10 else ''} "
            f"but {where('train', cfg)} has {total} data rows (0..{total - 1}, header excluded). Give the "
            "exclude file written for this training file (a label audit of another file names other rows)."
        )
    drop = set(rows)
    logger.info("data.exclude_rows: %d of %d training rows dropped (%s).", len(drop), total, why)
    return train.select([i for i in range(total) if i not in drop])


def check_folds(splits: DatasetDict, folds: int, task: str, group_column: Optional[str] = None) -> Optional[List]:
    """Stratified folds need every class in every fold: at least ``folds`` examples per class; with
    ``group_column`` (cv.group_column) every row names its group and there are ``folds`` groups.
    Returns the groups (``fold_groups``; None without ``group_column``)."""
    rows = len(splits["train"]) + len(splits["validation"])
    if rows < folds:
        raise DataError(f"cv.folds={folds} but train + validation hold only {rows} rows; use cv.folds={max(2, rows)} or fewer.")
    groups = fold_groups(splits, folds, group_column) if group_column is not None else None
    if not get_task(task).has_classes:
        return groups
    names = splits["train"].features[LABELS].names
    counts = np.bincount(np.concatenate([splits["train"][LABELS], splits["validation"][LABELS]]), minlength=len(names))
    rare = [i for i in np.argsort(counts, kind="stable") if 0 < counts[i] < folds]
    if rare:
        fewest = int(counts[rare[0]])
        fix = f"use cv.folds={fewest} or fewer, " if fewest >= 2 else ""
        raise DataError(
            f"cv.folds={folds} but class(es) {', '.join(f'{names[i]!r} ({counts[i]} rows)' for i in rare[:10])} have "
            f"fewer rows than folds in train + validation, so stratified k-fold cannot put one in every fold: "
            f"{fix}add examples of those classes, or remove them."
        )
    return groups


def fold_groups(splits: DatasetDict, folds: int, group_column: str) -> List:
    """The group of each row of train + validation pooled (cv.group_column).

    Raises:
        DataError: a split lacks the column, a row has no group, or there are fewer groups than folds.
    """
    from finetune.data_checks import is_missing

    groups = []
    for split in ("train", "validation"):
        ds = splits[split]
        if group_column not in ds.column_names:
            raise DataError(
                f"cv.group_column='{group_column}' is not a column of the {split} split (its columns: "
                f"{ds.column_names}). Name the column that says which group (e.g. document) each row belongs to, "
                "or set cv.group_column=null to split rows one by one."
            )
        values = ds[group_column]
        empty = next((i for i, v in enumerate(values) if is_missing(v)), None)
        if empty is not None:
            raise DataError(f"the {split} split's row {empty + 1} has no value in cv.group_column='{group_column}'; "
                            "give every row its group.")  # fmt: skip
        groups += [str(v) for v in values]
    if len(set(groups)) < folds:
        raise DataError(
            f"cv.folds={folds} but cv.group_column='{group_column}' names only {len(set(groups))} group(s) in train + "
            f"validation, and a group is never split between folds; use cv.folds={max(2, len(set(groups)))} or fewer."
        )
    return groups


def fold_pool(splits: DatasetDict) -> Dataset:
    """The rows cross-validation folds: train + validation, in that order."""
    from datasets import concatenate_datasets

    return concatenate_datasets([splits["train"], splits["validation"]])


def fold_indices(pool: Dataset, folds: int, seed: int, task: str, groups: Optional[List] = None) -> List[tuple]:
    """K (train positions, validation positions) in ``pool``, each ascending; stratified for
    single-label; with ``groups`` (cv.group_column, see fold_groups) all rows of a group in one
    fold. Every position validates in exactly one fold."""
    from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

    strata = get_task(task).stratify_labels(get_task(task).label_array(pool[LABELS]))
    rows = np.zeros(len(pool))
    if groups is not None and strata is not None:
        parts = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(rows, strata, groups)
    elif groups is not None:
        parts = GroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(rows, groups=groups)
    elif strata is not None:
        parts = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(rows, strata)
    else:
        parts = KFold(n_splits=folds, shuffle=True, random_state=seed).split(rows)
    return list(parts)


def kfold_splits(splits: DatasetDict, folds: int, seed: int, task: str,
                 group_column: Optional[str] = None) -> Iterator[DatasetDict]:  # fmt: skip
    """K (train, validation) pairs over train + validation pooled (fold_indices); the test split,
    if any, stays the same in every fold."""
    from datasets import DatasetDict

    groups = check_folds(splits, folds, task, group_column)
    pool = fold_pool(splits)
    for train_idx, val_idx in fold_indices(pool, folds, seed, task, groups):
        fold = {"train": pool.select(train_idx.tolist()), "validation": pool.select(val_idx.tolist())}
        if "test" in splits:
            fold["test"] = splits["test"]
        yield DatasetDict(fold)


def _split_validation(train: Dataset, size: float, seed: int) -> tuple[Dataset, Dataset]:
    from datasets import ClassLabel

    if not isinstance(train.features[LABELS], ClassLabel):  # multi-label / regression: random
        parts = train.train_test_split(test_size=size, seed=seed)
        return parts["train"], parts["test"]
    try:
        parts = train.train_test_split(test_size=size, stratify_by_column=LABELS, seed=seed)
    except ValueError as err:  # a class too rare to stratify
        logger.warning("Stratified validation split impossible (%s); using a random split.", err)
        parts = train.train_test_split(test_size=size, seed=seed)
    return parts["train"], parts["test"]


# ---------------------------------------------------------------------------------------------
# Tokenization and batching
# ---------------------------------------------------------------------------------------------
def encode_texts(
    tokenizer: PreTrainedTokenizerBase, texts: Iterable, pairs: Optional[Iterable], max_length: Optional[int],
    window_stride: Optional[int] = None,
) -> BatchEncoding:
    """THE tokenization of finetune: training, augmented training batches, evaluation and
    ``finetune.predict`` (both backends) all encode text here, so that a model never sees text
    prepared two ways. Texts (and pairs) are taken as strings; pairs are truncated longest-first
    to ``max_length`` tokens (None: the tokenizer's own limit). No padding: batches pad themselves.
    With ``window_stride`` (data.long_text=window) long texts become overlapping windows instead
    (finetune.windows.encode_windows) and the encoding says which row each window belongs to.
    """
    first = [str(t) for t in texts]
    second = [str(t) for t in pairs] if pairs is not None else None
    if window_stride is not None:
        return encode_windows(tokenizer, first, second, max_length, window_stride)
    return tokenizer(first, second, truncation=True, max_length=max_length)


def tokenize_splits(splits: DatasetDict, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> DatasetDict:
    """Tokenize with truncation, or into windows that carry their document's row (`document_index`)
    and label (no padding: batches are padded dynamically)."""
    from datasets import DatasetDict

    text, pair = cfg.text_column, cfg.text_pair_column
    stride = window_stride(cfg)

    def tokenize(batch, rows, split):
        try:
            enc = encode_texts(tokenizer, batch[text], batch[pair] if pair else None, cfg.max_length, stride)
        except FirstTextTooLong as err:  # its row counts from this batch's first row
            raise err.at(f"the {split} split's row {rows[err.row] + 1} (its first text begins "
                         f"{str(batch[text][err.row])[:60]!r})") from None  # fmt: skip
        if stride is None:
            return enc
        owners = enc.pop(OVERFLOW)  # windows: each carries its document's row and label
        out = {**enc, DOCUMENT: [rows[i] for i in owners], LABELS: [batch[LABELS][i] for i in owners]}
        if TEACHER_LOGITS in batch:  # distillation: the teacher's logits of this window (finetune.distill)
            nth = [0] * len(owners)  # each window's place among its document's windows (they are consecutive)
            for j in range(1, len(owners)):
                nth[j] = nth[j - 1] + 1 if owners[j] == owners[j - 1] else 0
            out[TEACHER_LOGITS] = [batch[TEACHER_LOGITS][i][k] for i, k in zip(owners, nth)]
        return out

    out, done = {}, {}
    for split, ds in splits.items():
        if id(ds) in done:  # one dataset given as two splits (cross-validation's pool): encoded once
            out[split] = out[done[id(ds)]]
            continue
        done[id(ds)] = split
        keep = [] if stride is not None else [LABELS, TEACHER_LOGITS]
        out[split] = ds.map(
            tokenize,
            batched=True,
            with_indices=True,
            fn_kwargs={"split": split},
            remove_columns=[c for c in ds.column_names if c not in keep],
            desc=f"Tokenizing {split}",
        )
        if stride is not None:
            out[split] = out[split].cast_column(LABELS, ds.features[LABELS])
            if TEACHER_LOGITS in out[split].column_names:
                out[split] = out[split].cast_column(TEACHER_LOGITS, ds.features[TEACHER_LOGITS].feature)
    return DatasetDict(out)


def build_task_data(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, task: TaskType = TaskType.auto
) -> TaskData:
    splits, names, problem = load_and_prepare(cfg, seed, task)
    return tokenized_task_data(splits, names, problem, tokenizer, cfg)


def tokenized_task_data(
    splits: DatasetDict, names: List[str], problem: str, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig
) -> TaskData:
    """Tokenize prepared splits (also used per fold by cross-validation)."""
    own = get_task(problem).tokenize(splits, tokenizer, cfg, names)  # e.g. words aligned to sub-tokens
    tokenized = own[0] if own is not None else tokenize_splits(splits, tokenizer, cfg)
    id2label = dict(enumerate(names))

    def texts(split: str) -> List[tuple]:
        if own is not None:
            return own[1][split]
        ds = splits[split]
        pairs = ds[cfg.text_pair_column] if cfg.text_pair_column else [None] * len(ds)
        return list(zip(ds[cfg.text_column], pairs))

    augmenting = any((cfg.augment.delete, cfg.augment.swap, cfg.augment.mask))
    keep = [c for c in (cfg.text_column, cfg.text_pair_column, LABELS) if c and c in splits["train"].column_names]
    train, documents = tokenized["train"], None
    if DOCUMENT in train.column_names:  # windows: training batches need only each window's label
        logger.info("data.long_text=window: %d training windows from %d documents.", len(train), len(splits["train"]))
        documents = list(train[DOCUMENT])
        train = train.remove_columns(DOCUMENT)
    keep += [TEACHER_LOGITS] if TEACHER_LOGITS in splits["train"].column_names else []
    return TaskData(
        train_raw=splits["train"].select_columns(keep) if augmenting else None,
        train=train,
        train_documents=len(splits["train"]),
        train_document_index=documents,
        validation=tokenized["validation"],
        test=tokenized.get("test"),
        id2label=id2label,
        label2id={name: i for i, name in id2label.items()},
        task=problem,
        train_lengths=[len(ids) for ids in train["input_ids"]],
        texts={split: texts(split) for split in ("validation", "test") if split in splits},
    )
