"""Cross-validation's data: the pooled rows (train + validation) tokenized once, and each fold's
TaskData cut out of that one tokenization, so that K folds do not tokenize the data K times."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import numpy as np
from datasets import Dataset, DatasetDict

from finetune.config import DataConfig
from finetune.data import TaskData, fold_pool, tokenized_task_data
from finetune.windows import DOCUMENT


def pool_task_data(splits: DatasetDict, names, task: str, tokenizer, cfg: DataConfig) -> Tuple[TaskData, Dataset]:
    """(the pooled rows tokenized once, as training and as evaluation rows; the pooled rows). The
    pool is given as both train and validation: tokenizers reuse the encoding of a split met twice."""
    pool = fold_pool(splits)
    both = {"train": pool, "validation": pool, **({"test": splits["test"]} if "test" in splits else {})}
    return tokenized_task_data(DatasetDict(both), names, task, tokenizer, cfg), pool


def fold_task_data(pool: TaskData, train_idx: Sequence[int], val_idx: Sequence[int]) -> TaskData:
    """One fold's data: the pool's rows at ``train_idx`` to train on and at ``val_idx`` (ascending)
    to validate on; windows (data.long_text=window) go with their document."""
    train_idx, val_idx = np.asarray(train_idx), np.asarray(val_idx)
    owners = np.asarray(pool.train_document_index) if pool.train_document_index is not None else None
    positions, documents = _rows_of(owners, train_idx, len(pool.train))
    validation = pool.validation
    if DOCUMENT in validation.column_names:  # windows name their document: renumbered within the fold
        windows, owner = _rows_of(np.asarray(validation[DOCUMENT]), val_idx, len(validation))
        validation = validation.select(windows).remove_columns(DOCUMENT).add_column(DOCUMENT, owner.tolist())
    else:
        validation = validation.select(val_idx)
    texts = dict(pool.texts)
    texts["validation"] = [pool.texts["validation"][i] for i in val_idx]
    return dataclasses.replace(
        pool,
        train=pool.train.select(positions),
        validation=validation,
        train_lengths=[pool.train_lengths[i] for i in positions],
        texts=texts,
        train_raw=pool.train_raw.select(train_idx) if pool.train_raw is not None else None,
        train_documents=len(train_idx),
        train_document_index=documents.tolist() if documents is not None else None,
    )


def _rows_of(owners: Optional[np.ndarray], idx: np.ndarray, n: int) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(positions of the rows whose document is in ``idx``, each one's document renumbered as its
    place in ``idx``); without windows every row is its own document."""
    if owners is None:
        return idx, None
    positions = np.flatnonzero(np.isin(owners, idx))
    return positions, np.searchsorted(idx, owners[positions])
