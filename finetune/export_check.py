"""What finetune.export checks an export on, and how it compares it with PyTorch: a ``Task``'s
``export_check`` (finetune.tasks.base) returns one of these objects. ``TextCheck`` is the sequence
tasks' (one decision per text); token classification has its own (finetune.token_export).

A check reads its rows (the run's validation predictions, ``check_input=FILE``, or built-in
sentences), encodes and batches them exactly as finetune.predict does, runs a backend on them
(``outputs``: one array of logits per row, in row order; per window for a windowed token model)
and says how often two sets of outputs decide the same (``agreement``: ExportReport fields, each
held to the int8 rule).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from finetune.config import FinetuneError

CHECK_BATCH_SIZE = 32

# For model folders without a run: varied lengths, punctuation, casing, a pair-free register.
BUILTIN_SENTENCES = [
    "a gorgeous, witty, seductive movie.",
    "the plot is paper-thin and the acting is wooden.",
    "It's a charming and often affecting journey.",
    "unflinchingly bleak and desperate",
    "the film is strictly routine.",
    "One of the most exciting things I have seen in a theater this year, and I do not say that lightly.",
    "an utterly incompetent conclusion to a series that deserved better",
    "fine.",
    "What a waste of two hours!",
    "the soundtrack alone is worth the price of admission",
    "Neither funny nor scary, the movie drags on far longer than its thin premise can sustain.",
    "a masterpiece",
    "I laughed, I cried, and then I went back and watched it again with my whole family.",
    "the dialogue sounds like it was written by a committee that never met",
    "solid performances lift a familiar story",
    "boring",
    "The customer service was quick and the package arrived two days early.",
    "Stocks fell sharply on Monday after the central bank raised interest rates.",
    "The team scored twice in the final minutes to win the championship.",
    "A new smartphone chip promises longer battery life and faster image processing.",
    "the hotel room was dirty and the staff were rude",
    "Absolutely loved it - would recommend to anyone!",
    "meh",
    "This is, without any doubt, the single worst product I have ever had the misfortune to buy; it broke on day one.",
]


class CheckError(FinetuneError):
    """Rows the export cannot be checked on (finetune.export reports it as an ExportError)."""


class TextCheck:
    """The check of a sequence model: rows are {'text', 'text_pair'?}; int8 must give PyTorch's
    decision (under the run's threshold) on the rows."""

    unit = "rows"  # what the agreement shares count
    decision = "PyTorch's label"  # what an agreement compares: "the int8 model gives <decision> on only 97.0% ..."

    def __init__(self, task, tokenizer, meta: dict):
        self.task, self.tokenizer, self.meta = task, tokenizer, meta

    def rows(self, model_ref: str, model_dir: str, limit: int, check_input: Optional[str],
             extra: int = 0) -> Tuple[List[dict], str]:  # fmt: skip
        """Rows as {'text', 'text_pair'?} dicts (the first ``limit`` check the export; up to ``extra``
        more, where the source has them, calibrate int8), and where they came from."""
        from finetune.predict import read_rows

        meta, limit = self.meta, limit + extra
        if check_input:  # read as finetune.predict reads it: headerless with the run's data.column_names
            raw = read_rows(check_input, meta.get("column_names"), list(meta["id2label"].values()))
            text, pair = meta.get("text_column") or "text", meta.get("text_pair_column")
            if raw and list(raw[0]) == ["text"]:
                text = "text"  # plain text lines
            missing = [c for c in (text, pair) if c and raw and c not in raw[0]]
            if not raw or missing:
                raise CheckError(f"check_input='{check_input}' has no rows with the column(s) {missing or [text]}.")
            rows = [{"text": r[text], **({"text_pair": r[pair]} if pair else {})} for r in raw[:limit]]
            return rows, f"rows of {check_input}"
        table = run_file(model_ref, model_dir, "validation.tsv")
        if table is not None:
            records = read_rows(str(table))[:limit]  # read as predict reads it (texts with quotes intact)
            rows = [{"text": r["text"], **({"text_pair": r["text_pair"]} if "text_pair" in r else {})} for r in records]
            return rows, f"validation rows of {table}"
        if meta.get("text_pair_column"):
            raise CheckError(
                f"model='{model_ref}' takes text pairs and has no run predictions to check the export on; give "
                "check_input=FILE with its text columns."
            )
        return [{"text": t} for t in BUILTIN_SENTENCES[:limit]], "built-in English sentences (no run predictions found)"

    def batches(self, rows: List[dict]) -> Iterator[Tuple[np.ndarray, Dict[str, np.ndarray]]]:
        """(row indices, padded numpy batch) as finetune.predict batches them."""
        from finetune.predict import encoded_batches

        pair = "text_pair" if "text_pair" in rows[0] else None
        return encoded_batches(self.tokenizer, rows, "text", pair, self.meta.get("max_length"), CHECK_BATCH_SIZE)

    def outputs(self, runner, rows: List[dict]) -> np.ndarray:
        """The runner's logits of every row, in row order."""
        from finetune.predict import run_batches

        return run_batches(runner, self.batches(rows), len(rows))

    def agreement(self, rows: List[dict], reference, candidate) -> Dict[str, float]:
        """{'label_agreement': share of rows whose decision is the same under both sets of logits}."""
        threshold = self.meta.get("threshold")
        return {"label_agreement": label_agreement(reference, candidate, self.task, 0.5 if threshold is None else threshold)}

    def describe(self, numbers: Dict[str, float]) -> str:
        return f"{numbers['label_agreement']:.1%}"


def run_file(model_ref: str, model_dir: str, name: str) -> Optional[Path]:
    """The run's predictions/``name``, for a run directory or its model/ folder (None: not a run)."""
    for run_dir in (Path(model_ref), Path(model_dir).parent):
        table = run_dir / "predictions" / name
        if table.is_file():
            return table
    return None


def max_abs_diff(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> float:
    """The largest |difference| of any logit of any row (rows may differ in shape)."""
    return float(max(np.abs(np.asarray(c) - np.asarray(r)).max() for r, c in zip(reference, candidate)))


def label_agreement(reference: np.ndarray, candidate: np.ndarray, task, threshold: float = 0.5) -> float:
    """Share of rows whose decision is the same under both sets of logits: the label (single-label),
    the whole label set (multi-label), or a value within 1% of the reference values' range (regression)."""
    from finetune.tasks import get_task

    decide = get_task(task)
    ref = decide.predictions(decide.scores(reference), threshold)
    got = decide.predictions(decide.scores(candidate), threshold)
    return float(np.mean(decide.agreement(ref, got)))
