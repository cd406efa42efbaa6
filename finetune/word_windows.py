"""Words to sub-tokens and back, for token classification: sentences given as words are tokenized
(a fast tokenizer's ``word_ids``), labels are aligned to sub-tokens, long sentences become windows,
and the model's per-token logits become one row of logits per word.

Windows are cut at word boundaries: each window holds whole words, at most ``max_length`` tokens
with the special ones, and consecutive windows of a sentence share words covering at most ``stride``
tokens (as ``data.window_stride`` tokens are shared for texts). Every window trains with the labels of its
words; for evaluation and prediction each word is read once, from the window where it sits farthest
from its edges (``best_windows``).
Without a stride, a sentence longer than ``max_length`` keeps only its first window: the words left
out are counted (``WordWindows.truncated_words``) so that the caller can log them; they are
predicted ``O``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from finetune.tagging import OUTSIDE
from finetune.windows import check_window_stride

IGNORE = -100  # the label id the loss skips (torch's CrossEntropyLoss ignore_index)


@dataclass
class WordWindows:
    """The windows of a list of sentences. ``encoding``: the tokenizer's output for all windows (one
    row per window: input_ids, attention_mask, ...); per window: ``sentence`` (its row in the input),
    ``spans`` (its words, [start, end) in the sentence) and ``word_ids`` (per token: the index of its
    word in the sentence, None for special tokens); ``words``: the number of words of each sentence."""

    encoding: Any
    sentence: List[int]
    spans: List[Tuple[int, int]]
    word_ids: List[List[Optional[int]]]
    words: List[int]
    truncated_words: int = 0
    truncated_sentences: int = 0
    windowed_sentences: int = 0

    def __len__(self) -> int:
        return len(self.sentence)


def word_lengths(tokenizer, sentences: Sequence[Sequence[str]]) -> List[List[int]]:
    """The number of sub-tokens of each word of each sentence (special tokens left out)."""
    enc = tokenizer([list(s) for s in sentences], is_split_into_words=True, add_special_tokens=False)
    out = []
    for i, words in enumerate(sentences):
        counts = [0] * len(words)
        for w in enc.word_ids(i):
            if w is not None:
                counts[w] += 1
        out.append(counts)
    return out


def word_spans(lengths: Sequence[int], room: int, stride: Optional[int] = None) -> List[Tuple[int, int]]:
    """Windows over one sentence's words, as [start, end) word ranges: each as many whole words as
    fit in ``room`` tokens (a single longer word alone), the next one starting on the earliest word
    after which the shared words hold at most ``stride`` tokens (always at least one word further).
    Without a stride: the first window only."""
    n, spans, start = len(lengths), [], 0
    while True:
        end, used = start, 0
        while end < n and (end == start or used + lengths[end] <= room):
            used += lengths[end]
            end += 1
        spans.append((start, end))
        if end >= n or stride is None:
            return spans
        nxt, shared = end, 0
        while nxt - 1 > start and shared + lengths[nxt - 1] <= stride:
            nxt -= 1
            shared += lengths[nxt]
        start = nxt


def encode_words(tokenizer, sentences: Sequence[Sequence[str]], max_length: int,
                 stride: Optional[int] = None) -> WordWindows:  # fmt: skip
    """Sentences (lists of words) as windows of at most ``max_length`` tokens (``word_spans``), one
    window per sentence where it fits. ``tokenizer`` must be a fast one (``word_ids``).

    Raises:
        DataError: ``stride`` leaves a window no room for new tokens (``check_window_stride``).
    """
    room = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    if stride is not None:
        check_window_stride(tokenizer, max_length, stride, pairs=False)
    sentence, spans, pieces, truncated, cut, windowed = [], [], [], 0, 0, 0
    for i, (words, lengths) in enumerate(zip(sentences, word_lengths(tokenizer, sentences))):
        own = word_spans(lengths, room, stride)
        windowed += len(own) > 1
        left = len(words) - own[-1][1]
        truncated, cut = truncated + left, cut + (left > 0)
        for start, end in own:
            sentence.append(i)
            spans.append((start, end))
            pieces.append(list(words[start:end]))
    enc = tokenizer(pieces, is_split_into_words=True, truncation=True, max_length=max_length)
    word_ids = [[None if w is None else w + start for w in enc.word_ids(k)] for k, (start, _) in enumerate(spans)]
    return WordWindows(enc, sentence, spans, word_ids, [len(s) for s in sentences], truncated, cut, windowed)


def align_labels(word_ids: Sequence[Optional[int]], labels: Sequence[int], label_all_tokens: bool = False,
                 continuation: Optional[Sequence[int]] = None) -> List[int]:  # fmt: skip
    """The label of each token: the first sub-token of a word carries the word's label, the others
    -100 (skipped by the loss and the metrics); with ``label_all_tokens`` every sub-token carries it,
    mapped through ``continuation`` (``tagging.continuation_ids``: B-X -> I-X) on the pieces after
    the first. Special tokens: -100. ``word_ids`` index ``labels``."""
    out, previous = [], None
    for w in word_ids:
        if w is None:
            out.append(IGNORE)
        elif w != previous:
            out.append(labels[w])
        elif label_all_tokens:
            out.append(continuation[labels[w]] if continuation is not None else labels[w])
        else:
            out.append(IGNORE)
        previous = w
    return out


def window_labels(windows: WordWindows, labels: Sequence[Sequence[int]], label_all_tokens: bool = False,
                  continuation: Optional[Sequence[int]] = None) -> List[List[int]]:  # fmt: skip
    """``align_labels`` for every window, ``labels`` holding the label ids of each sentence's words."""
    return [align_labels(ids, labels[s], label_all_tokens, continuation)
            for ids, s in zip(windows.word_ids, windows.sentence)]  # fmt: skip


def evaluation_labels(windows: WordWindows, labels: Sequence[Sequence[int]]) -> List[List[int]]:
    """The labels evaluation scores: each word's label at its first sub-token in its best window
    (``best_windows``) only, -100 everywhere else, so that every word a window holds is scored
    exactly once. Without overlapping windows this is ``window_labels`` on first sub-tokens."""
    out = [[IGNORE] * len(ids) for ids in windows.word_ids]
    for s, chosen in enumerate(best_windows(windows)):
        for w, c in enumerate(chosen):
            if c is not None:
                out[c[0]][c[1]] = labels[s][w]
    return out


def scored_words(windows: WordWindows) -> List[List[int]]:
    """Per sentence, the words ``evaluation_labels`` labels, in sentence order: the order in which
    its windows' labelled tokens come, window after window (a later window never wins a word that
    comes before one an earlier window won: ``best_windows``' context rises in one window where it
    falls in the one before)."""
    return [[w for w, c in enumerate(chosen) if c is not None] for chosen in best_windows(windows)]


def best_windows(windows: WordWindows) -> List[List[Optional[Tuple[int, int]]]]:
    """For each word of each sentence: (window, position of the word's first sub-token in it) of the
    window where the word has most context, or None for a word no window holds (truncated, or no
    sub-tokens). A word's context in a window is its distance in tokens to the nearer edge of the
    window (as BERT's SQuAD code picks a token's window); on equal context the earlier window wins.
    (Counting a sentence's own start or end as no edge would pick the same windows: of two
    consecutive windows, the earlier one never reaches the sentence's end, the later one never
    its start.)"""
    best: List[List[Optional[Tuple[int, int]]]] = [[None] * n for n in windows.words]
    context: List[List[int]] = [[-1] * n for n in windows.words]
    for k, (ids, s) in enumerate(zip(windows.word_ids, windows.sentence)):
        content = [p for p, w in enumerate(ids) if w is not None]
        if not content:
            continue
        lo, hi = content[0], content[-1]
        first, last = {}, {}
        for p in content:
            first.setdefault(ids[p], p)
            last[ids[p]] = p
        for w, a in first.items():
            room = min(a - lo, hi - last[w])
            if room > context[s][w]:
                context[s][w], best[s][w] = room, (k, a)
    return best


def assemble_words(windows: WordWindows, logits: Sequence) -> List[np.ndarray]:
    """One row of logits per word: for each sentence an array (words x labels) whose row for a word
    is the logits of its first sub-token in its best window (``best_windows``), NaN for a word no
    window holds. ``logits``: per window, an array (tokens x labels) at least as long as its tokens
    (padding after them is ignored)."""
    out = []
    for s, chosen in enumerate(best_windows(windows)):
        rows = [None if c is None else np.asarray(logits[c[0]][c[1]], dtype=np.float64) for c in chosen]
        width = next((len(r) for r in rows if r is not None), np.asarray(logits[0]).shape[-1] if len(logits) else 0)
        out.append(np.array([r if r is not None else np.full(width, np.nan) for r in rows]).reshape(len(rows), width))
    return out


def word_tags(word_logits: Sequence[np.ndarray], names: Sequence[str]) -> List[List[str]]:
    """The most probable tag of each word (``assemble_words``' rows); a word without logits is O."""
    return [[OUTSIDE if np.isnan(row).any() else names[int(np.argmax(row))] for row in rows] for rows in word_logits]
