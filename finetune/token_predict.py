"""finetune.predict for token classification (``TokenClassification.predict_rows``): raw text rows
become entities with character offsets, as ``pipeline("token-classification",
aggregation_strategy="simple")`` returns them on the same model/; pre-tokenized rows (a list of
words in the run's data.tokens_column) become one tag per word, read as training read them
(finetune.word_windows, the first sub-token of each word). A run trained with
data.long_text=window reads long input in windows sharing data.window_stride tokens, each word
(or, for raw text, each token) taken from the window where it has most context."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

from finetune.config import FinetuneError


def predict_rows(model_dir: str, meta: dict, rows: List[dict], options: dict) -> List[Dict[str, object]]:
    """One record per row, in order: {text, entities: [...]} or {tokens, tags: [...]}."""
    from transformers import AutoTokenizer

    from finetune.backends import open_backend
    from finetune.predict import PROB_DECIMALS, PredictError, padded_batches
    from finetune.tasks.base import softmax
    from finetune.tasks.token import check_fast
    from finetune.tagging import simple_entities

    tokens_column = options.get("tokens_column") or meta.get("tokens_column") or "tokens"
    text_column = options.get("text_column") or "text"
    words_given = tokens_column in rows[0]
    if not words_given and text_column not in rows[0]:
        raise PredictError(
            f"the input has neither a list of words in '{tokens_column}' nor a text in '{text_column}' (columns: "
            f"{sorted(rows[0])}); give jsonl rows {{\"{tokens_column}\": [...]}} or text (text_column=...)."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        runner = open_backend(model_dir, options.get("backend", "auto"), options.get("threads"), options.get("device", "auto"))
    except FinetuneError:
        raise
    except Exception as err:
        raise PredictError(f"model='{model_dir}' could not be loaded ({type(err).__name__}: {err}).") from err
    check_fast(tokenizer)
    id2label = {int(i): n for i, n in (meta.get("id2label") or runner.config.id2label).items()}
    max_length = options.get("max_length") or meta.get("max_length")
    batch_size = options.get("batch_size") or meta.get("eval_batch_size") or 64

    def logits_of(enc) -> List[np.ndarray]:
        out: List[Optional[np.ndarray]] = [None] * len(enc["input_ids"])
        for idx, batch in padded_batches(tokenizer, enc, batch_size):
            for j, logits in zip(idx, runner(batch)):
                out[j] = logits
        return out

    # A run trained with data.long_text=window reads long input in windows as its evaluation did.
    stride = meta.get("window_stride") if meta.get("long_text") == "window" else None
    if words_given:
        from finetune.word_windows import assemble_words, encode_words, word_tags

        sentences = [row[tokens_column] for row in rows]
        bad = next((i for i, s in enumerate(sentences) if not isinstance(s, list) or not all(isinstance(w, str) for w in s)), None)
        if bad is not None:
            raise PredictError(f"input row {bad + 1}: '{tokens_column}' must hold a list of words (strings), not "
                               f"{sentences[bad]!r}.")  # fmt: skip
        windows = encode_words(tokenizer, sentences, max_length, stride)
        logits = logits_of({k: list(v) for k, v in windows.encoding.items()})
        names = [id2label[i] for i in range(len(id2label))]
        tags = word_tags(assemble_words(windows, logits), names)
        return [{tokens_column: words, "tags": t} for words, t in zip(sentences, tags)]

    texts = [str(row[text_column]) for row in rows]
    if stride is not None:
        from finetune.windows import OVERFLOW, encode_windows

        enc = encode_windows(tokenizer, texts, None, max_length, stride, offsets=True)
        owners = list(enc.pop(OVERFLOW))
    else:
        enc = tokenizer(texts, truncation=True, max_length=max_length, return_offsets_mapping=True)
        owners = list(range(len(texts)))
    offsets = enc.pop("offset_mapping")
    content = [[p for p, seq in enumerate(enc.sequence_ids(w)) if seq is not None] for w in range(len(owners))]
    logits = logits_of({k: list(v) for k, v in enc.items()})
    records = []
    for i, text in enumerate(texts):
        picked = text_tokens([w for w, o in enumerate(owners) if o == i], content, stride or 0)
        ids = [enc["input_ids"][w][p] for w, p in picked]
        rows = [np.asarray(logits[w][p], dtype=np.float64) for w, p in picked]
        probs = softmax(np.stack(rows)) if rows else np.zeros((0, len(id2label)))
        found = simple_entities(text, tokenizer.convert_ids_to_tokens(ids), [offsets[w][p] for w, p in picked], probs,
                                id2label, tokenizer.convert_tokens_to_string, tokenizer.unk_token)  # fmt: skip
        for e in found:
            e["score"] = round(e["score"], PROB_DECIMALS)
        records.append({"text": text, "entities": found})
    return records


def text_tokens(windows: List[int], content: List[List[int]], stride: int) -> List[Tuple[int, int]]:
    """The tokens of one text, in order, as (window, position): each token from the window where it
    sits farthest from the window's edges (earlier window on equal context), as word_windows picks
    a word's window. ``windows``: the text's windows in order, each sharing ``stride`` tokens with
    the one before (the tokenizer's overflow); ``content``: per window, its text tokens' positions."""
    best: Dict[int, Tuple[int, int, int]] = {}  # token of the text -> (context, window, position)
    start = 0
    for w in windows:
        positions = content[w]
        for j, p in enumerate(positions):
            context = min(j, len(positions) - 1 - j)
            if start + j not in best or context > best[start + j][0]:
                best[start + j] = (context, w, p)
        start += len(positions) - stride
    return [best[t][1:] for t in sorted(best)]
