"""Long documents as sliding windows (``data.long_text=window``).

A text longer than ``data.max_length`` tokens becomes several windows of at most ``max_length``
tokens; consecutive windows share ``data.window_stride`` tokens (the Hugging Face tokenizer's
``stride``). For sentence pairs the second text is windowed and the first is kept whole in every
window. Training learns from each window with its document's label; evaluation and
``finetune.predict`` pool the logits of a document's windows back into one row per document
(``pool_windows``), so that metrics and prediction tables count documents, not windows.

Windows are made by tokenization (``finetune.data.encode_texts`` calls ``encode_windows``), after
the validation split and the cross-validation folds are drawn from whole documents: the windows
of one document never fall into two splits.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from finetune.config import DataConfig, LongText
from finetune.data_checks import DataError
from finetune.tasks import get_task

# The column that names each window's document: its row in the split (tokenizers call it
# overflow_to_sample_mapping). Evaluation batches carry it; training batches do not.
DOCUMENT = "document_index"
OVERFLOW = "overflow_to_sample_mapping"


def window_stride(cfg: DataConfig) -> Optional[int]:
    """The overlap of consecutive windows, or None when long texts are truncated."""
    return cfg.window_stride if cfg.long_text == LongText.window else None


def check_window_stride(tokenizer, max_length: int, stride: int, pairs: bool) -> None:
    """Windows must advance: the stride leaves room for at least one new token per window.

    Raises:
        DataError: ``stride`` is not below ``max_length`` minus the special tokens.
    """
    room = max_length - tokenizer.num_special_tokens_to_add(pair=pairs)
    if not 0 <= stride < room:
        raise DataError(
            f"data.window_stride={stride} leaves no room for new tokens: a window of data.max_length={max_length} "
            f"holds {room} text tokens besides the special ones, and consecutive windows share window_stride of "
            f"them. Use data.window_stride below {room} (e.g. {room // 2}), or a larger data.max_length."
        )


class FirstTextTooLong(DataError):
    """A pair whose first text leaves a window no room for its second text. ``row`` counts from 0
    in the texts encoded together (one batch of a split's map); ``at`` names the place in full."""

    def __init__(self, row: int, tokens: int, stride: int, room: int, max_length: int, place: Optional[str] = None):
        self.row, self._details = row, (tokens, stride, room, max_length)
        super().__init__(
            f"{place or f'row {row + 1}'}: its first text has {tokens} tokens, but with data.long_text=window the "
            f"first text is kept whole in every window and needs to leave more than data.window_stride={stride} of "
            f"the {room} text tokens of a window (data.max_length={max_length}) to the second text. Raise "
            "data.max_length, lower data.window_stride, or put the long text in data.text_pair_column."
        )

    def at(self, place: str) -> "FirstTextTooLong":
        return FirstTextTooLong(self.row, *self._details, place=place)


def encode_windows(tokenizer, first: List[str], second: Optional[List[str]], max_length: int, stride: int,
                   offsets: bool = False):  # fmt: skip
    """Every text as windows of ``max_length`` tokens sharing ``stride`` tokens; the encoding holds
    ``overflow_to_sample_mapping``, the input row of each window (windows of a row are consecutive),
    and with ``offsets`` each token's character span in its text (``offset_mapping``).

    Raises:
        DataError: the stride does not fit (``check_window_stride``), or for pairs a first text
            leaves no room for the windowed second text (``FirstTextTooLong``).
    """
    check_window_stride(tokenizer, max_length, stride, pairs=second is not None)
    if second is not None:
        room = max_length - tokenizer.num_special_tokens_to_add(pair=True)
        lengths = [len(ids) for ids in tokenizer(first, add_special_tokens=False)["input_ids"]]
        row = next((i for i, n in enumerate(lengths) if n + stride >= room), None)
        if row is not None:
            raise FirstTextTooLong(row, lengths[row], stride, room, max_length)
    return tokenizer(first, second, truncation="only_second" if second is not None else True, max_length=max_length,
                     stride=stride, return_overflowing_tokens=True, return_offsets_mapping=offsets)  # fmt: skip


def window_texts(tokenizer, first: List[str], second: Optional[List[str]], max_length: int,
                 stride: int) -> Tuple[List[Tuple[str, Optional[str]]], List[int]]:  # fmt: skip
    """The windows ``encode_windows`` makes, as text: ((first, second) of each window, the input row
    of each window). A window's windowed text is the span of its text that its tokens cover (for
    pairs the first text is whole in every window), so that another model with its own tokenizer
    (a distillation teacher) reads the text of each window the student trains on."""
    enc = encode_windows(tokenizer, first, second, max_length, stride, offsets=True)
    windowed, texts = (0, first) if second is None else (1, second)
    out = []
    for w, row in enumerate(enc[OVERFLOW]):
        spans = [span for span, seq in zip(enc["offset_mapping"][w], enc.sequence_ids(w)) if seq == windowed]
        piece = texts[row][spans[0][0] : spans[-1][1]] if spans else ""
        out.append((piece, None) if second is None else (first[row], piece))
    return out, list(enc[OVERFLOW])


def count_windows(train, tokenizer, cfg: DataConfig, task: str, names: List[str]) -> int:
    """The number of windows the training documents make (``len(TaskData.train)``, the rows
    training steps through), for the run-length check before anything is written: tokenized
    as training tokenizes them (by the task, or finetune.data.tokenize_splits), so that the map's
    cache serves training the same windows."""
    from finetune.data import tokenize_splits  # finetune.data imports this module

    own = get_task(task).tokenize({"train": train}, tokenizer, cfg, names)
    return len((own[0] if own is not None else tokenize_splits({"train": train}, tokenizer, cfg))["train"])


def pool_windows(logits: np.ndarray, documents: np.ndarray, task: str, pool: str = "mean") -> Tuple[np.ndarray, np.ndarray]:
    """One row of logits per document from the logits of its windows: (pooled logits, the index
    of each document's first window), documents in ascending order of their index.

    Single-label: the mean or the per-class max of the window logits. Multi-label: the mean or max
    of the window probabilities, returned as logits (log-odds), so that everything downstream
    (sigmoid, threshold, loss) reads them as it reads any logits. Regression: the mean value.
    """
    logits = np.asarray(logits)
    documents = np.asarray(documents)
    _, first, owner = np.unique(documents, return_index=True, return_inverse=True)
    flat = logits.reshape(len(logits), -1).astype(np.float64)
    n = len(first)
    pooled = get_task(task).pool(flat, owner, n, pool)
    return pooled.reshape((n, *logits.shape[1:])).astype(logits.dtype), first


def long_text_meta(cfg: DataConfig) -> dict:
    """What finetune.predict needs (in the run's finetune.json) to window and pool as evaluation did."""
    return {"long_text": cfg.long_text.value, "window_stride": cfg.window_stride, "window_pool": cfg.window_pool.value}


def long_text_summary(cfg: DataConfig, data) -> dict:
    """metrics.json's record of long-text handling: the settings, and with windows the number of
    training windows against training documents."""
    summary = {"long_text": cfg.long_text.value}
    if cfg.long_text == LongText.window:
        summary.update(window_stride=cfg.window_stride, window_pool=cfg.window_pool.value,
                       train_windows=len(data.train), train_documents=data.train_documents)  # fmt: skip
    return summary
