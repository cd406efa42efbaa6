"""finetune.predict for token classification (``TokenClassification.predict_rows``): raw text rows
become entities with character offsets, as ``pipeline("token-classification",
aggregation_strategy="simple")`` returns them on the same model/; pre-tokenized rows (a list of
words in the run's data.tokens_column) become one tag per word, read as training read them
(finetune.word_windows, the first sub-token of each word)."""

from __future__ import annotations

from typing import Dict, List, Optional

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

    if words_given:
        from finetune.tasks.token import TokenClassification
        from finetune.word_windows import encode_words

        sentences = [row[tokens_column] for row in rows]
        bad = next((i for i, s in enumerate(sentences) if not isinstance(s, list) or not all(isinstance(w, str) for w in s)), None)
        if bad is not None:
            raise PredictError(f"input row {bad + 1}: '{tokens_column}' must hold a list of words (strings), not "
                               f"{sentences[bad]!r}.")  # fmt: skip
        windows = encode_words(tokenizer, sentences, max_length)
        enc = {k: list(v) for k, v in windows.encoding.items()}
        logits = logits_of(enc)
        task = TokenClassification()
        return [{tokens_column: words,
                 "tags": [id2label[t] for t in task.word_predictions(logits[i], windows.word_ids[i], len(words))]}
                for i, words in enumerate(sentences)]  # fmt: skip

    texts = [str(row[text_column]) for row in rows]
    enc = tokenizer(texts, truncation=True, max_length=max_length, return_offsets_mapping=True,
                    return_special_tokens_mask=True)  # fmt: skip
    offsets, special = enc.pop("offset_mapping"), enc.pop("special_tokens_mask")
    logits = logits_of({k: list(v) for k, v in enc.items()})
    records = []
    for i, text in enumerate(texts):
        keep = [p for p, s in enumerate(special[i]) if not s]
        tokens = tokenizer.convert_ids_to_tokens([enc["input_ids"][i][p] for p in keep])
        probs = softmax(np.asarray(logits[i], dtype=np.float64))[keep]
        found = simple_entities(text, tokens, [offsets[i][p] for p in keep], probs, id2label,
                                tokenizer.convert_tokens_to_string, tokenizer.unk_token)  # fmt: skip
        for e in found:
            e["score"] = round(e["score"], PROB_DECIMALS)
        records.append({"text": text, "entities": found})
    return records
