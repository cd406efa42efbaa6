"""finetune.predict and finetune.serve for token classification (``TokenClassification.row_predictor``):
raw text rows become entities with character offsets, as ``pipeline("token-classification",
aggregation_strategy="simple")`` returns them on the same model/; pre-tokenized rows (a list of
words in the run's data.tokens_column) become one tag per word, read as training read them
(finetune.word_windows, the first sub-token of each word). Either backend (PyTorch, or ONNX Runtime
on an export) gives the logits."""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np


class TokenRows:
    """The rows -> records of a loaded ``finetune.predict.Predictor`` of a token model."""

    def __init__(self, predictor):
        from finetune.tasks.token import check_fast

        check_fast(predictor.tokenizer)
        self.predictor = predictor
        self.tokens_column = predictor.meta.get("tokens_column") or "tokens"

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
        from finetune.predict import padded_batches

        p = self.predictor
        out: List[Optional[np.ndarray]] = [None] * len(enc["input_ids"])
        for idx, batch in padded_batches(p.tokenizer, enc, p.batch_size):
            for j, logits in zip(idx, p.runner(batch)):
                out[j] = logits
        return out

    def tags(self, rows: List[dict]) -> List[Dict[str, object]]:
        from finetune.predict import PredictError
        from finetune.word_windows import encode_words

        p, tokens_column = self.predictor, self.tokens_column
        sentences = [row[tokens_column] for row in rows]
        bad = next((i for i, s in enumerate(sentences) if not isinstance(s, list) or not all(isinstance(w, str) for w in s)), None)
        if bad is not None:
            raise PredictError(f"input row {bad + 1}: '{tokens_column}' must hold a list of words (strings), not "
                               f"{sentences[bad]!r}.")  # fmt: skip
        windows = encode_words(p.tokenizer, sentences, p.max_length or p.tokenizer.model_max_length)
        logits = self.logits_of({k: list(v) for k, v in windows.encoding.items()})
        return [{tokens_column: words,
                 "tags": [p.id2label[t] for t in p.task.word_predictions(logits[i], windows.word_ids[i], len(words))]}
                for i, words in enumerate(sentences)]  # fmt: skip

    def entities(self, texts: List[str]) -> List[Dict[str, object]]:
        from finetune.predict import PROB_DECIMALS
        from finetune.tagging import simple_entities
        from finetune.tasks.base import softmax

        p, tokenizer = self.predictor, self.predictor.tokenizer
        enc = tokenizer(texts, truncation=True, max_length=p.max_length, return_offsets_mapping=True,
                        return_special_tokens_mask=True)  # fmt: skip
        offsets, special = enc.pop("offset_mapping"), enc.pop("special_tokens_mask")
        logits = self.logits_of({k: list(v) for k, v in enc.items()})
        records = []
        for i, text in enumerate(texts):
            keep = [q for q, s in enumerate(special[i]) if not s]
            tokens = tokenizer.convert_ids_to_tokens([enc["input_ids"][i][q] for q in keep])
            probs = softmax(np.asarray(logits[i], dtype=np.float64))[keep]
            found = simple_entities(text, tokens, [offsets[i][q] for q in keep], probs, p.id2label,
                                    tokenizer.convert_tokens_to_string, tokenizer.unk_token)  # fmt: skip
            for e in found:
                e["score"] = round(e["score"], PROB_DECIMALS)
            records.append({"text": text, "entities": found})
        return records
