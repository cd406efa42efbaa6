"""Checks of raw input data that the datasets library would pass silently or report obscurely:
encoding, empty files, ragged rows, non-text texts, missing labels. Each error names the file
(or split), the row or line, the column and the fix."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.config import DataConfig, FinetuneError

if TYPE_CHECKING:  # this module stays light: the CLI runs its file checks before importing torch
    from datasets import Dataset


class DataError(FinetuneError):
    """Bad input data: a missing column, an unknown label, an empty split, an unreadable file."""


def csv_dialect(suffix: str) -> tuple[str, int]:
    """(delimiter, quoting) of a csv-like file: TSV text holds raw quotes (SST-2: `" wow "`), so
    quote handling would merge lines there."""
    return ("\t", csv.QUOTE_NONE) if suffix in (".tsv", ".txt") else (",", csv.QUOTE_MINIMAL)


def tsv_writer(f):
    """A csv writer whose TSV reads back field for field as finetune reads TSV (csv_dialect: no
    quote handling), so quotes are written as they are, never doubled. A tab or line break cannot
    be held in such a field: clean_tsv_field turns them into spaces first."""
    return csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, quotechar=None, escapechar=None, lineterminator="\n")


def clean_tsv_field(value: object) -> object:
    """``value`` with each tab and line break (\\t, \\r, \\n) turned into a space, for tsv_writer."""
    if isinstance(value, str) and any(c in value for c in "\t\r\n"):
        return value.translate(_TSV_BREAKS)
    return value


_TSV_BREAKS = str.maketrans({"\t": " ", "\r": " ", "\n": " "})


def check_data_files(cfg: DataConfig) -> None:
    """Every local data file (train / validation / test) passes check_file; data.exclude_rows reads."""
    for path in (cfg.train_file, cfg.validation_file, cfg.test_file):
        if path is not None:
            check_file(path, cfg)
    if cfg.exclude_rows is not None:
        read_exclude_rows(cfg.exclude_rows)


# The header a label audit writes (finetune.audit): data.exclude_rows reads its `row` column.
AUDIT_COLUMNS = ("row", "text", "given_label", "suggested_label", "label_quality")


def read_exclude_rows(path: str) -> tuple[list, str]:
    """(0-based training-file rows, why they are excluded) from data.exclude_rows: a TSV whose
    header has a `row` column (a label audit's label_issues.tsv), or one row index per line."""
    where_ = f"data.exclude_rows='{path}'"
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{where_} could not be read ({err}); give a file of 0-based training row indices, one per "
                        "line, or the label_issues.tsv of a label audit.") from None  # fmt: skip
    header = lines[0].split("\t") if lines else []
    column, start, why = 0, 0, f"listed in {path}"
    if "row" in header:
        column, start = header.index("row"), 1
        if set(AUDIT_COLUMNS) <= set(header):
            why = f"flagged as likely mislabelled by the label audit in {path}"
    rows = []
    for n, line in enumerate(lines[start:], start=start + 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        value = fields[column].strip() if column < len(fields) else ""
        if not value.isdigit():
            raise DataError(
                f"{where_}: line {n} holds {value!r} where a row index belongs; give 0-based indices of the training "
                "file's data rows (header excluded), one per line, or a TSV with a `row` column (a label audit's "
                "label_issues.tsv)."
            )
        rows.append(int(value))
    return rows, why


def check_file(path: str, cfg: DataConfig) -> None:
    """A csv / tsv / json(l) data file is UTF-8, has data rows, and (csv, tsv) rows as wide as its header."""
    suffix = Path(path).suffix.lower()
    if suffix in (".csv", ".tsv", ".txt", ".json", ".jsonl"):
        check_text_file(path, cfg)
    if suffix in (".csv", ".tsv", ".txt"):
        check_rows(path, *csv_dialect(suffix), cfg)


def check_text_file(path: str, cfg: DataConfig) -> None:
    """UTF-8 text with at least one data row (the datasets library's own errors say neither)."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"data file '{path}' is not UTF-8 text: line {line} holds the byte 0x{raw[err.start]:02x}. Re-save the "
            f"file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 {Path(path).name} > fixed{Path(path).suffix}`)."
        ) from None
    lines = [line for line in text.splitlines() if line.strip()]
    header = 0 if cfg.column_names or Path(path).suffix.lower() in (".json", ".jsonl") else 1
    if len(lines) <= header:
        what = "has a header row but no data rows" if lines else "is empty"
        raise DataError(
            f"data file '{path}' {what}; it needs a header row naming the columns (e.g. "
            f"{cfg.text_column}<TAB>{cfg.label_column}) and at least one row of data."
        )


def check_rows(path: str, delimiter: str, quoting: int, cfg: DataConfig) -> None:
    """Every row has as many fields as the header (pandas fills short rows with blanks silently)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
        width = len(cfg.column_names) if cfg.column_names else None
        for row in reader:
            if not row or not any(field.strip() for field in row):
                continue
            if width is None:
                width = len(row)
            elif len(row) != width:
                sep = "a tab" if delimiter == "\t" else "a comma"
                raise DataError(
                    f"data file '{path}': line {reader.line_num} has {len(row)} fields but the "
                    f"{'data.column_names' if cfg.column_names else 'header'} has {width}. Fix that line: text "
                    f"holding {sep} must be quoted (csv) or have it replaced (tsv), and no field may be missing."
                )


def is_number(value: Any) -> bool:
    try:
        return math.isfinite(float(value)) and not isinstance(value, bool)
    except (TypeError, ValueError):
        return False


def where(split: str, cfg: DataConfig) -> str:
    """The file (or dataset) a split comes from, for messages."""
    path = getattr(cfg, f"{split}_file", None) if cfg.train_file else None
    return f"data.{split}_file='{path}'" if path else f"the {split} split of {cfg.dataset}"


def is_missing(value: Any) -> bool:
    """None, NaN, or a blank / "nan" string (what a spreadsheet or pandas export writes for nothing)."""
    if isinstance(value, str):
        return not value.strip() or value.strip().lower() == "nan"
    return value is None or (isinstance(value, float) and math.isnan(value))


def check_values(ds: "Dataset", split: str, cfg: DataConfig, need_label: bool) -> None:
    """Text columns hold text and label columns hold a value in every row (row numbers count data
    rows from 1, the header not included)."""
    for key, col in (("data.text_column", cfg.text_column), ("data.text_pair_column", cfg.text_pair_column)):
        if col:
            for i, value in enumerate(ds[col]):
                if not isinstance(value, str):
                    raise DataError(
                        f"{where(split, cfg)}: row {i + 1} of {key}='{col}' holds {value!r} "
                        f"({type(value).__name__}), not text. Every row needs a text there; check that "
                        f"{key} names the text column."
                    )
    if not need_label:
        return
    for col in cfg.label_columns or [cfg.label_column]:
        key = "data.label_columns" if cfg.label_columns else "data.label_column"
        for i, value in enumerate(ds[col]):
            if is_missing(value):
                raise DataError(
                    f"{where(split, cfg)}: row {i + 1} has no label in {key}='{col}' (empty or NaN). "
                    "Fill in the label or remove the row."
                )
