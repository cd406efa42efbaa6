"""finetune.export's check of a token-classification model (``TokenClassification.export_check``):
the rows are sentences as lists of words, encoded as training and finetune.predict encode them
(finetune.word_windows: a run trained with data.long_text=window in its windows); an export is
judged by the tag of each word (the argmax at its first sub-token, in the window where the word
has most context) and by the entities those tags make, against PyTorch's."""

from __future__ import annotations

import json
from typing import Dict, List, Optional, Tuple

import numpy as np

from finetune.export_check import BUILTIN_SENTENCES, CHECK_BATCH_SIZE, CheckError, TextCheck, run_file


class WordCheck(TextCheck):
    """Rows are {"words": [...]}; int8 must give PyTorch's tag on the words (its entities are compared too)."""

    unit = "words"
    decision = "the same tag as PyTorch"

    def rows(self, model_ref: str, model_dir: str, limit: int, check_input: Optional[str],
             extra: int = 0) -> Tuple[List[dict], str]:  # fmt: skip
        """The run's validation sentences (predictions/validation.jsonl), the rows of
        ``check_input`` (its data.tokens_column word lists, or text split at white space), or the
        built-in sentences split at white space."""
        from finetune.predict import read_rows

        limit += extra
        tokens = self.meta.get("tokens_column") or "tokens"
        if check_input:
            raw = read_rows(check_input)
            text = self.meta.get("text_column") or "text"
            if raw and tokens in raw[0]:
                return [{"words": list(r[tokens])} for r in raw[:limit]], f"sentences of {check_input}"
            if raw and text in raw[0]:
                return [{"words": str(r[text]).split()} for r in raw[:limit]], f"rows of {check_input}"
            raise CheckError(f"check_input='{check_input}' has no rows with a list of words in '{tokens}' or a text "
                             f"in '{text}'; give jsonl rows {{\"{tokens}\": [...]}} or text lines.")  # fmt: skip
        table = run_file(model_ref, model_dir, "validation.jsonl")
        if table is not None:
            lines = [line for line in table.read_text(encoding="utf-8").splitlines() if line.strip()][:limit]
            return [{"words": json.loads(line)["words"]} for line in lines], f"validation sentences of {table}"
        return [{"words": t.split()} for t in BUILTIN_SENTENCES[:limit]], "built-in English sentences (no run predictions found)"

    def _encode(self, rows: List[dict]):
        """The rows' windows, as finetune.predict reads them: one per sentence, or for a run trained
        with data.long_text=window the windows sharing data.window_stride tokens."""
        from finetune.word_windows import encode_words

        max_length = self.meta.get("max_length") or self.tokenizer.model_max_length
        stride = self.meta.get("window_stride") if self.meta.get("long_text") == "window" else None
        return encode_words(self.tokenizer, [r["words"] for r in rows], max_length, stride)

    def batches(self, rows: List[dict], windows=None):
        from finetune.predict import padded_batches

        encoding = (windows or self._encode(rows)).encoding
        return padded_batches(self.tokenizer, {k: list(v) for k, v in encoding.items()}, CHECK_BATCH_SIZE)

    def outputs(self, runner, rows: List[dict]) -> List[np.ndarray]:
        """Per window (per row where no sentence is windowed), the logits of its own tokens (the
        batch's padding, on whichever side the tokenizer pads, left out)."""
        windows = self._encode(rows)
        out: List[Optional[np.ndarray]] = [None] * len(windows)
        for idx, batch in self.batches(rows, windows):
            for j, logits, mask in zip(idx, runner(batch), batch["attention_mask"]):
                out[j] = logits[mask.astype(bool)]
        return out

    def agreement(self, rows: List[dict], reference, candidate) -> Dict[str, float]:
        """label_agreement: the share of words (those some window holds: within max_length) tagged
        the same, each word read at its first sub-token in its best window as finetune.predict reads
        it (word_windows.assemble_words); entity_agreement: the F1 of the candidate's entities (type,
        first and last word) against the reference's (1.0 when neither finds any)."""
        from finetune.tagging import entities
        from finetune.word_windows import assemble_words, word_tags

        id2label = {int(i): n for i, n in self.meta["id2label"].items()}
        names = [id2label[i] for i in range(len(id2label))]
        windows = self._encode(rows)
        ref_words, got_words = assemble_words(windows, reference), assemble_words(windows, candidate)
        same = words = both = found = 0
        for ref, got in zip(ref_words, got_words):
            held = ~np.isnan(ref).any(axis=-1)
            ref_tags, got_tags = word_tags([ref, got], names)
            same += sum(a == b for a, b, h in zip(ref_tags, got_tags, held) if h)
            words += int(held.sum())
            ref_entities, got_entities = set(entities(ref_tags)), set(entities(got_tags))
            both += len(ref_entities & got_entities)
            found += len(ref_entities) + len(got_entities)
        return {"label_agreement": same / max(words, 1), "entity_agreement": 2 * both / found if found else 1.0}

    def describe(self, numbers: Dict[str, float]) -> str:
        return f"{numbers['label_agreement']:.1%} of words (entity F1 against PyTorch's {numbers['entity_agreement']:.1%})"
