"""Batched inference with a trained model: ``python -m finetune.predict model=... input=...``.

    python -m finetune.predict model=outputs/2026-11-22/10-00-00 input=reviews.tsv output=preds.tsv
    echo "a gorgeous, witty film" | python -m finetune.predict model=run/model input=-

``model`` is a run directory, its ``model/`` folder, or a Hub model id. ``input`` is a csv / tsv /
jsonl / json file, a plain-text file (one text per line), or ``-`` for text lines on stdin.
The text is preprocessed as in training (same columns, truncation, batching) and decided with the
run's threshold; the output holds label names and per-class probabilities (or the predicted value).

Options (key=value): output=FILE (.tsv/.csv/.jsonl; default: TSV on stdout), batch_size=N,
threshold=T, text_column=C, text_pair_column=C, max_length=N.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

from finetune.config import REGRESSION, REPO_ID_RE, SINGLE_LABEL, FinetuneError

OPTIONS = ("model", "input", "output", "batch_size", "threshold", "text_column", "text_pair_column", "max_length")


class PredictError(FinetuneError):
    """Bad input to finetune.predict."""


def resolve_model_dir(ref: str) -> tuple[str, dict]:
    """(model folder or Hub id, finetune.json contents or {})."""
    path = Path(ref)
    for candidate in (path / "model", path):
        if (candidate / "config.json").is_file() or (candidate / "adapter_config.json").is_file():
            meta_file = candidate / "finetune.json"
            return str(candidate), json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if path.exists():
        raise PredictError(
            f"model='{ref}' is not a finetune run: it holds no model/ folder, config.json or adapter_config.json. "
            "Pass the output_dir of a `python -m finetune` run, its model/ folder, or a Hub model id."
        )
    if not REPO_ID_RE.match(ref) or ref.startswith((".", "/", "~")):
        raise PredictError(f"model='{ref}' does not exist. Pass the output_dir of a `python -m finetune` run or its model/ folder.")
    return ref, {}  # a Hub id


def read_rows(source: str) -> List[Dict[str, str]]:
    """Rows of the input file (or stdin lines as {'text': line})."""
    if source == "-":
        return [{"text": line.rstrip("\n")} for line in sys.stdin if line.strip()]
    path = Path(source)
    if not path.is_file():
        raise PredictError(f"input='{source}' does not exist or is not a file.")
    try:
        return _read_file(path)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PredictError(f"input='{source}' could not be read ({err}); give UTF-8 csv / tsv / jsonl / text.") from None


def _read_file(path: Path) -> List[Dict[str, str]]:
    suffix = path.suffix.lower()
    with open(path, newline="", encoding="utf-8") as f:
        if suffix in (".jsonl", ".json"):
            text = f.read().strip()
            if suffix == ".json" and text.startswith("["):
                return json.loads(text)
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        if suffix == ".tsv":
            return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        if suffix == ".csv":
            return list(csv.DictReader(f))
        return [{"text": line.rstrip("\n")} for line in f if line.strip()]


def predict(
    model_ref: str,
    rows: List[Dict[str, str]],
    batch_size: Optional[int] = None,
    threshold: Optional[float] = None,
    text_column: Optional[str] = None,
    text_pair_column: Optional[str] = None,
    max_length: Optional[int] = None,
    progress: bool = True,
) -> List[Dict[str, object]]:
    """Predictions for ``rows``, in order: text, prediction, and prob_<label> (or the value)."""
    model_dir, meta = resolve_model_dir(model_ref)
    text_column = text_column or meta.get("text_column") or "text"
    text_pair_column = text_pair_column or meta.get("text_pair_column")
    if not rows:
        raise PredictError("the input has no rows; give a file with a header and at least one text.")
    if list(rows[0]) == ["text"] and not text_pair_column:
        text_column = "text"  # plain text lines (stdin / .txt) feed the model's text column
    missing = [c for c in (text_column, text_pair_column) if c and c not in rows[0]]
    if missing:
        raise PredictError(
            f"the input has no column {missing} (columns: {sorted(rows[0])}); name the text column with "
            "text_column=... (and text_pair_column=... for pairs)."
        )

    import numpy as np
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from finetune.metrics import label_text, predictions_from_scores, probability_fields, scores_from_logits
    from finetune.model import load_saved_model

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = load_saved_model(model_dir).eval()
    except Exception as err:  # a Hub id that is not cached offline, a folder without weights, ...
        raise PredictError(
            f"model='{model_ref}' could not be loaded ({type(err).__name__}: {str(err).splitlines()[0]}). Pass a run "
            "directory, its model/ folder, or a Hub model id (offline: one already in the local cache)."
        ) from err
    config = model.config
    task = meta.get("task") or config.problem_type or (REGRESSION if config.num_labels == 1 else SINGLE_LABEL)
    threshold = threshold if threshold is not None else meta.get("threshold", 0.5)
    max_length = max_length or meta.get("max_length")
    batch_size = batch_size or meta.get("eval_batch_size") or 64
    id2label = {int(i): n for i, n in (meta.get("id2label") or config.id2label).items()}

    # Rows of similar length share a batch (little padding); the results go back in input order.
    def chars(row) -> int:
        return len(str(row[text_column])) + (len(str(row[text_pair_column])) if text_pair_column else 0)

    order = sorted(range(len(rows)), key=lambda i: -chars(rows[i]))
    logits = []
    batches = range(0, len(rows), batch_size)
    for start in tqdm(batches, desc="predict", disable=not progress, file=sys.stderr):
        chunk = [rows[i] for i in order[start : start + batch_size]]
        texts = [str(r[text_column]) for r in chunk]
        pairs = [str(r[text_pair_column]) for r in chunk] if text_pair_column else None
        enc = tokenizer(texts, pairs, truncation=max_length is not None, max_length=max_length, padding=True,
                        return_tensors="pt")  # fmt: skip
        with torch.no_grad():
            logits.append(model(**enc).logits.float().numpy())
    sorted_logits = np.concatenate(logits)
    in_input_order = np.empty_like(sorted_logits)
    in_input_order[order] = sorted_logits
    scores = scores_from_logits(in_input_order, task)
    preds = predictions_from_scores(scores, task, threshold)

    out = []
    for i, row in enumerate(rows):
        record: Dict[str, object] = {"text": row[text_column]}
        if text_pair_column:
            record["text_pair"] = row[text_pair_column]
        record["prediction"] = label_text(preds[i], task, id2label)
        record.update(probability_fields(scores[i], task, id2label))
        out.append(record)
    return out


def write_rows(records: List[Dict[str, object]], output: Optional[str]) -> None:
    if output and output.endswith(".jsonl"):
        with open(output, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        return
    f = open(output, "w", newline="") if output else sys.stdout
    try:
        writer = csv.DictWriter(f, fieldnames=list(records[0]), delimiter="," if str(output).endswith(".csv") else "\t")
        writer.writeheader()
        writer.writerows(records)
    finally:
        if output:
            f.close()


def parse_args(argv: List[str]) -> Dict[str, object]:
    args = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in OPTIONS:
            raise PredictError(f"unexpected argument '{arg}'; use key=value with key in {list(OPTIONS)}.")
        args[key] = value
    for key in ("model", "input"):
        if key not in args:
            raise PredictError(f"{key}=... is required: python -m finetune.predict model=RUN_DIR input=FILE [output=FILE]")
    for key, kind in (("batch_size", int), ("max_length", int), ("threshold", float)):
        if key in args:
            try:
                args[key] = kind(args[key])
            except ValueError:
                raise PredictError(f"{key}={args[key]!r} is not a{'n integer' if kind is int else ' number'}.") from None
    return args


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    try:
        args = parse_args(argv)
        records = predict(
            args["model"],
            read_rows(args["input"]),
            batch_size=args.get("batch_size"),
            threshold=args.get("threshold"),
            text_column=args.get("text_column"),
            text_pair_column=args.get("text_pair_column"),
            max_length=args.get("max_length"),
        )
        write_rows(records, args.get("output"))
    except FinetuneError as err:
        print(f"finetune.predict: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
