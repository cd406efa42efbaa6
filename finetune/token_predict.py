"""finetune.predict and finetune.serve for token classification (``TokenClassification.row_predictor``):
raw text rows become entities with character offsets, as ``pipeline("token-classification",
aggregation_strategy="simple")`` returns them on the same model/; pre-tokenized rows (a list of
words in the run's data.tokens_column) become one tag per word, read as training read them
(finetune.word_windows, the first sub-token of each word). A run trained with
data.long_text=window reads long input in windows sharing data.window_stride tokens, each word
(or, for raw text, each token) taken from the window where it has most context. Either backend
(PyTorch, or ONNX Runtime on an export) gives the logits."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np


class TokenRows:
    """The rows -> records of a loaded ``finetune.predict.Predictor`` of a token model."""

    def __init__(self, predictor):
        from finetune.tasks.token import check_fast

        check_fast(predictor.tokenizer)
        self.predictor = predictor
        self.tokens_column = predictor.meta.get("tokens_column") or "tokens"
        self.max_length = predictor.max_length
        if not self.max_length:  # a folder without finetune.json (a Hub NER model): words up to what the model takes
            from finetune.model import input_limit  # (finetune.model imports torch: not for an ONNX run's predict)

            self.max_length = input_limit(predictor.runner.config, predictor.tokenizer)

    def __call__(self, rows: List[dict], text_column: Optional[str] = None) -> List[Dict[str, object]]:
        """One record per row, in order: {text, entities: [...]} or {tokens, tags: [...]}."""
        from finetune.predict import PredictError

        tokens_column, text_column = self.tokens_column, text_column or "text"
        if tokens_column in rows[0]:
            return self.tags(rows)
        if text_column not in rows[0]:
            raise PredictError(
                f"the input has neither a list of words in '{tokens_column}' nor a text in '{text_column}' (columns: "
                f"{sorted(rows[0])}); give jsonl rows {{\"{tokens_column}\": [...]}} or text (text_column=...)."
            )
        return self.entities([str(row[text_column]) for row in rows])

    def logits_of(self, enc) -> List[np.ndarray]:
        from finetune.predict import ordered_outputs, padded_batches

        p = self.predictor
        out: List[Optional[np.ndarray]] = [None] * len(enc["input_ids"])
        batches = padded_batches(p.tokenizer, enc, p.batch_size)
        for idx, batch_logits in ordered_outputs(p.runner, batches):
            for j, logits in zip(idx, batch_logits):
                out[j] = logits
        return out

    def tags(self, rows: List[dict]) -> List[Dict[str, object]]:
        from finetune.predict import PredictError
        from finetune.word_windows import assemble_words, encode_words, word_tags

        p, tokens_column = self.predictor, self.tokens_column
        sentences = [row[tokens_column] for row in rows]
        bad = next((i for i, s in enumerate(sentences) if not isinstance(s, list) or not all(isinstance(w, str) for w in s)), None)
        if bad is not None:
            raise PredictError(f"input row {bad + 1}: '{tokens_column}' must hold a list of words (strings), not "
                               f"{sentences[bad]!r}.")  # fmt: skip
        # A run trained with data.long_text=window reads long input in windows as its evaluation did.
        windows = encode_words(p.tokenizer, sentences, self.max_length, p.stride)
        logits = self.logits_of({k: list(v) for k, v in windows.encoding.items()})
        names = [p.id2label[i] for i in range(len(p.id2label))]
        tags = word_tags(assemble_words(windows, logits), names)
        return [{tokens_column: words, "tags": t} for words, t in zip(sentences, tags)]

    def entities(self, texts: List[str]) -> List[Dict[str, object]]:
        from finetune.predict import PROB_DECIMALS
        from finetune.tagging import simple_entities
        from finetune.tasks.base import softmax

        p, tokenizer, stride = self.predictor, self.predictor.tokenizer, self.predictor.stride
        if stride is not None:
            from finetune.windows import OVERFLOW, encode_windows

            enc = encode_windows(tokenizer, texts, None, p.max_length, stride, offsets=True)
            owners = list(enc.pop(OVERFLOW))
        else:
            enc = tokenizer(texts, truncation=True, max_length=p.max_length, return_offsets_mapping=True)
            owners = list(range(len(texts)))
        offsets = enc.pop("offset_mapping")
        content = [[q for q, seq in enumerate(enc.sequence_ids(w)) if seq is not None] for w in range(len(owners))]
        logits = self.logits_of({k: list(v) for k, v in enc.items()})
        records = []
        for i, text in enumerate(texts):
            picked = text_tokens([w for w, o in enumerate(owners) if o == i], content, stride or 0)
            ids = [enc["input_ids"][w][q] for w, q in picked]
            rows = [np.asarray(logits[w][q], dtype=np.float64) for w, q in picked]
            probs = softmax(np.stack(rows)) if rows else np.zeros((0, len(p.id2label)))
            found = simple_entities(text, tokenizer.convert_ids_to_tokens(ids), [offsets[w][q] for w, q in picked],
                                    probs, p.id2label, tokenizer.convert_tokens_to_string, tokenizer.unk_token)  # fmt: skip
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
