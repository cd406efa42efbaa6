"""Batched inference with a trained model: ``python -m finetune.predict model=... input=...``.

    python -m finetune.predict model=outputs/2026-11-22/10-00-00 input=reviews.tsv output=preds.tsv
    echo "a gorgeous, witty film" | python -m finetune.predict model=run/model input=-
    python -m finetune.predict model=exported/ input=reviews.tsv output=preds.jsonl    (ONNX Runtime)

``model`` is a run directory, its ``model/`` folder, a folder written by ``finetune.export``, or
a Hub model id. ``input`` is a csv / tsv / jsonl / json file, a plain-text file (one text per
line), or ``-`` for text lines on stdin.
The text is preprocessed as in training (finetune.data.encode_texts: same columns, truncation,
max length; a run trained with data.long_text=window scores every window of a long text and pools
them into one row, as its evaluation did), batched by length and decided with the run's threshold;
the output holds one row per input row, in input order: label names and per-class probabilities
(or the predicted value), numbers in .jsonl output. A csv / tsv input is read like the run's
training files: headerless with the run's data.column_names when it had them.

Options (key=value): output=FILE (.tsv/.csv/.jsonl; default: TSV on stdout), batch_size=N,
threshold=T, text_column=C, text_pair_column=C, max_length=N, backend=auto|torch|onnx (auto: onnx
for a folder holding model.onnx; backend=onnx on a run directory reads its onnx/ folder),
threads=N (CPU threads of either backend; ONNX runs up to 4 batches side by side, the threads
shared among them), device=auto|cpu|cuda (PyTorch backend; auto: the GPU when one is present),
column_names=text,label (a csv / tsv without a header row, its columns in order;
column_names=header: the file has a header row, whatever the run's files had).
"""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from finetune.backends import BACKENDS, DEVICES, ONNX_FILE
from finetune.config import REPO_ID_RE, EvalConfig, FinetuneError
from finetune.ranges import Range, field_range, option_problems

OPTIONS = ("model", "input", "output", "batch_size", "threshold", "text_column", "text_pair_column", "max_length",
           "backend", "threads", "device", "column_names")  # fmt: skip
# The numeric options' valid values; the threshold is the one of the config's eval.threshold.
OPTION_RANGES = {"batch_size": Range(lo=1), "threshold": field_range(EvalConfig, "threshold"),
                 "max_length": Range(lo=1), "threads": Range(lo=1)}  # fmt: skip


logger = logging.getLogger(__name__)


class PredictError(FinetuneError):
    """Bad input to finetune.predict."""


def resolve_model_dir(ref: str, backend: str = "auto") -> tuple[str, dict]:
    """(model folder or Hub id, finetune.json contents or {}). A run directory stands for its
    model/ folder, or with backend=onnx for its onnx/ folder (save.export)."""
    path, onnx = Path(ref), backend == "onnx"
    for candidate in (path / ("onnx" if onnx else "model"), path):
        if _is_model_folder(candidate):
            if onnx and not (candidate / ONNX_FILE).is_file():
                raise PredictError(
                    f"backend=onnx but model='{ref}' holds no {ONNX_FILE} (it is a PyTorch model folder). Export it "
                    f"with `python -m finetune.export model={ref} output=DIR` and pass model=DIR, or leave out "
                    "backend=onnx to predict with PyTorch."
                )
            meta_file = candidate / "finetune.json"
            return str(candidate), json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if onnx and _is_model_folder(path / "model"):
        raise PredictError(
            f"backend=onnx but the run model='{ref}' has no ONNX export (no onnx/ folder). Make one with "
            f"`python -m finetune.export model={ref} output={path / 'onnx'}` (quantize=int8 for int8), or train with "
            "save.export=onnx; or leave out backend=onnx to predict with its PyTorch model/."
        )
    if path.exists():
        raise PredictError(
            f"model='{ref}' is not a finetune run: it holds no model/ folder, config.json or adapter_config.json. "
            "Pass the output_dir of a `python -m finetune` run, its model/ folder, or a Hub model id."
        )
    if not REPO_ID_RE.match(ref) or ref.startswith((".", "/", "~")):
        raise PredictError(f"model='{ref}' does not exist. Pass the output_dir of a `python -m finetune` run or its model/ folder.")
    return ref, {}  # a Hub id


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def check_options(values: Dict[str, object]) -> None:
    """Counts, threshold, backend and device of a predict call, all problems in one paragraph,
    before any input is read or model loaded."""
    problems = option_problems(values, OPTION_RANGES)
    for key, choices in (("backend", BACKENDS), ("device", DEVICES)):
        if values.get(key) is not None and values[key] not in choices:
            problems.append(f"{key}={values[key]!r} is not one of {', '.join(choices)}.")
    if problems:
        raise PredictError(" ".join(problems))


def read_rows(source: str, column_names: Optional[List[str]] = None,
              label_names: Sequence[str] = ()) -> List[Dict[str, str]]:  # fmt: skip
    """Rows of the input file (or stdin lines as {'text': line}). ``column_names`` reads a csv /
    tsv file without a header row, as training reads its files with data.column_names (a first
    row that repeats those names is taken for a header and skipped; one that looks like another
    header by ``label_names``, the run's labels, is kept with a warning)."""
    if source == "-":
        return [{"text": line.rstrip("\n")} for line in sys.stdin if line.strip()]
    path = Path(source)
    if not path.is_file():
        raise PredictError(f"input='{source}' does not exist or is not a file.")
    try:
        return _read_file(path, column_names, label_names)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PredictError(f"input='{source}' could not be read ({err}); give UTF-8 csv / tsv / jsonl / text.") from None


def _read_file(path: Path, column_names: Optional[List[str]] = None, label_names: Sequence[str] = ()) -> List[Dict[str, str]]:
    from finetune.data_checks import csv_dialect

    suffix = path.suffix.lower()
    with open(path, newline="", encoding="utf-8") as f:
        if suffix in (".jsonl", ".json"):
            text = f.read().strip()
            if suffix == ".json" and text.startswith("["):
                return json.loads(text)
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        if suffix in (".tsv", ".csv"):  # the delimiter and quoting training uses for the extension
            delimiter, quoting = csv_dialect(suffix)
            if not column_names:
                return list(csv.DictReader(f, delimiter=delimiter, quoting=quoting))
            rows = _headerless_rows(csv.reader(f, delimiter=delimiter, quoting=quoting), list(column_names), path)
            _warn_if_header(rows, set(label_names), path)
            return rows
        return [{"text": line.rstrip("\n")} for line in f if line.strip()]


def _headerless_rows(reader, names: List[str], path: Path) -> List[Dict[str, str]]:
    rows = []
    for fields in reader:
        if not any(v.strip() for v in fields) or (not rows and fields == names):
            continue  # blank lines; a header row naming the same columns
        if len(fields) != len(names):
            raise PredictError(
                f"input='{path}': line {reader.line_num} has {len(fields)} fields but column_names={names} names "
                f"{len(names)}. Give column_names=... as the file's columns, in order (comma-separated)."
            )
        rows.append(dict(zip(names, fields)))
    return rows


def _warn_if_header(rows: List[Dict[str, str]], label_names: set, path: Path) -> None:
    """A first row whose field in some column is none of the run's labels while every other row's
    is: most likely a header with other names than the run's files had, which is read as a document."""
    if not label_names or len(rows) < 2:
        return
    for column, value in rows[0].items():
        if value not in label_names and all(row[column] in label_names for row in rows[1:]):
            logger.warning(
                "input='%s': its first row %s looks like a header, not a document: its %s field '%s' is none of the "
                "run's labels %s, while every other row's is. It is predicted as a document (the first output row). If "
                "it is a header, remove it, or pass column_names=header (and text_column= its text column).",
                path, list(rows[0].values()), column, value, sorted(label_names)[:20],
            )  # fmt: skip
            return


def column_names_option(value: Optional[str]) -> Optional[List[str]]:
    """column_names=text,label (or [text,label]) as a list; none / header: the file has a header row."""
    if value is None:
        return None
    names = [n.strip() for n in value.strip().strip("[]").split(",") if n.strip()]
    return None if names in ([], ["none"], ["header"]) else names


def predict(
    model_ref: str,
    rows: List[Dict[str, str]],
    batch_size: Optional[int] = None,
    threshold: Optional[float] = None,
    text_column: Optional[str] = None,
    text_pair_column: Optional[str] = None,
    max_length: Optional[int] = None,
    progress: bool = True,
    backend: str = "auto",
    threads: Optional[int] = None,
    device: str = "auto",
) -> List[Dict[str, object]]:
    """Predictions for ``rows``, in order: text, prediction, and prob_<label> (or the value) as
    numbers rounded as the prediction tables write them."""
    check_options(dict(batch_size=batch_size, threshold=threshold, max_length=max_length, backend=backend,
                       threads=threads, device=device))  # fmt: skip
    model_dir, meta = resolve_model_dir(model_ref, backend)
    if not rows:
        raise PredictError("the input has no rows; give a file with a header and at least one text.")
    from finetune.tasks import get_task

    # A run's finetune.json names its task: a wrong column fails before the model loads. Otherwise only
    # the loaded model's task (its config's problem_type or head, as Predictor resolves it) says whether
    # the rows are texts or, for token classification, texts or word lists that the task reads itself.
    columns = None
    if meta.get("task") and not get_task(meta["task"]).reads_own_rows:
        columns = text_columns(rows, meta, text_column, text_pair_column)
    predictor = Predictor(model_ref, model_dir, meta, batch_size, threshold, max_length, backend, threads, device,
                          parallel_batches=True)  # a batch job: ONNX batches side by side (OnnxBackend)
    if predictor.own_rows is not None:
        return predictor(rows, text_column, progress=progress)
    text_column, text_pair_column = columns or text_columns(rows, meta, text_column, text_pair_column)
    return predictor(rows, text_column, text_pair_column, progress)


def text_columns(rows, meta: dict, text_column: Optional[str], text_pair_column: Optional[str]):
    """(text column, pair column) of the input rows for a sequence model; PredictError if missing."""
    text_column = text_column or meta.get("text_column") or "text"
    text_pair_column = text_pair_column or meta.get("text_pair_column")
    if list(rows[0]) == ["text"] and not text_pair_column:
        text_column = "text"  # plain text lines (stdin / .txt) feed the model's text column
    missing = [c for c in (text_column, text_pair_column) if c and c not in rows[0]]
    if missing:
        raise PredictError(
            f"the input has no column {missing} (columns: {sorted(rows[0])}); name the text column with "
            "text_column=... (and text_pair_column=... for pairs)."
        )
    return text_column, text_pair_column


class Predictor:
    """A loaded model and what the run decided around it (threshold, max length, windows, label
    names): ``predictor(rows, text_column, text_pair_column)`` -> predict's records. Built once and
    called per batch by finetune.serve, so a served row is prepared and decided as predict does."""

    def __init__(self, model_ref: str, model_dir: str, meta: dict, batch_size: Optional[int] = None,
                 threshold: Optional[float] = None, max_length: Optional[int] = None, backend: str = "auto",
                 threads: Optional[int] = None, device: str = "auto", parallel_batches: bool = False):  # fmt: skip
        from finetune.backends import open_backend
        from finetune.tasks import model_task

        try:
            tokenizer = load_tokenizer(model_dir, meta)
            runner = open_backend(model_dir, backend, threads, device, parallel_batches)
        except FinetuneError:
            raise
        except Exception as err:  # a Hub id that is not cached offline, a folder without weights, ...
            raise PredictError(
                f"model='{model_ref}' could not be loaded ({type(err).__name__}: {str(err).splitlines()[0]}). Pass a run "
                "directory, its model/ folder, or a Hub model id (offline: one already in the local cache)."
            ) from err
        config = runner.config
        self.tokenizer, self.runner, self.model_dir, self.meta = tokenizer, runner, model_dir, meta
        self.task = model_task(meta.get("task"), config.problem_type, config.num_labels, config.architectures or ())
        self.threshold = threshold if threshold is not None else meta.get("threshold", 0.5)
        self.max_length = max_length or meta.get("max_length")
        self.batch_size = batch_size or meta.get("eval_batch_size") or 64
        self.id2label = {int(i): n for i, n in (meta.get("id2label") or config.id2label).items()}
        # Long documents are windowed and pooled as the run's evaluation did (finetune.windows).
        self.stride = meta.get("window_stride") if meta.get("long_text") == "window" else None
        self.own_rows = self.task.row_predictor(self)  # a task that reads the rows itself (token classification)

    def __call__(self, rows: List[Dict[str, str]], text_column: Optional[str], text_pair_column: Optional[str] = None,
                 progress: bool = False) -> List[Dict[str, object]]:  # fmt: skip
        from finetune.windows import pool_windows

        if self.own_rows is not None:
            return self.own_rows(rows, text_column)
        tokenizer, runner, task, id2label, stride = self.tokenizer, self.runner, self.task, self.id2label, self.stride
        enc, owners = encode_rows(tokenizer, rows, text_column, text_pair_column, self.max_length, stride)
        logits = run_batches(runner, padded_batches(tokenizer, enc, self.batch_size), len(owners), progress)
        if stride is not None:
            logits, _ = pool_windows(logits, owners, task, self.meta.get("window_pool", "mean"))
        scores = task.scores(logits)
        preds = task.predictions(scores, self.threshold)

        out = []
        for i, row in enumerate(rows):
            record: Dict[str, object] = {"text": row[text_column]}
            if text_pair_column:
                record["text_pair"] = row[text_pair_column]
            record.update(task.predict_record(preds[i], scores[i], id2label, PROB_DECIMALS))
            out.append(record)
        return out


def load_tokenizer(model_dir: str, meta: dict):
    """The tokenizer of ``model_dir`` as ``AutoTokenizer`` loads it. An export records the class
    AutoTokenizer chose (finetune.json ``tokenizer_class``), and that class is loaded directly:
    AutoTokenizer first reads the model's config with transformers' configuration classes, which
    import torch, ~3 s of an ONNX predict process that otherwise never needs it."""
    import transformers

    name = meta.get("tokenizer_class")
    try:
        cls = getattr(transformers, name) if name and name.endswith(TOKENIZER_SUFFIXES) else None
    except (AttributeError, ImportError):  # a class this transformers lacks (or its extra is not installed)
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedTokenizerBase)):
        cls = transformers.AutoTokenizer
    return cls.from_pretrained(model_dir)


TOKENIZER_SUFFIXES = ("Tokenizer", "TokenizerFast", "Backend")
PROB_DECIMALS = 6  # as in the run's prediction tables (metrics.probability_fields)


def encoded_batches(
    tokenizer, rows: List[Dict[str, str]], text_column: str, text_pair_column: Optional[str], max_length: Optional[int],
    batch_size: int,
) -> Iterator[Tuple[np.ndarray, Dict[str, np.ndarray]]]:
    """(row indices, padded numpy batch), longest rows first: rows of similar length share a batch
    and little is padded, as in evaluation. The text is encoded by data.encode_texts, the one
    preprocessing path of training and evaluation."""
    yield from padded_batches(tokenizer, encode_rows(tokenizer, rows, text_column, text_pair_column, max_length)[0],
                              batch_size)  # fmt: skip


def encode_rows(
    tokenizer, rows: List[Dict[str, str]], text_column: str, text_pair_column: Optional[str], max_length: Optional[int],
    window_stride: Optional[int] = None,
) -> Tuple[Dict[str, list], np.ndarray]:
    """(encoding, the input row of each encoded sequence): one per row, or with ``window_stride``
    the windows of each row (data.encode_texts)."""
    from finetune.data import encode_texts
    from finetune.windows import OVERFLOW

    pairs = [r[text_pair_column] for r in rows] if text_pair_column else None
    enc = encode_texts(tokenizer, [r[text_column] for r in rows], pairs, max_length, window_stride)
    owners = np.asarray(enc.pop(OVERFLOW) if OVERFLOW in enc else range(len(rows)), dtype=np.int64)
    return enc, owners


def padded_batches(tokenizer, enc, batch_size: int) -> Iterator[Tuple[np.ndarray, Dict[str, np.ndarray]]]:
    """(sequence indices, padded numpy batch) over an encoding, longest sequences first."""
    count = len(enc["input_ids"])
    lengths = np.fromiter((len(ids) for ids in enc["input_ids"]), dtype=np.int64, count=count)
    order = np.argsort(-lengths, kind="stable")
    for start in range(0, count, batch_size):
        idx = order[start : start + batch_size]
        features = [{k: enc[k][i] for k in enc} for i in idx]
        yield idx, dict(tokenizer.pad(features, return_tensors="np"))


def run_batches(runner, batches, num_rows: int, progress: bool = False) -> np.ndarray:
    """The runner's logits for every batch, put back in input order."""
    from tqdm.auto import tqdm

    out = None
    with tqdm(total=num_rows, desc="predict", disable=not progress, file=sys.stderr) as bar:
        for idx, logits in ordered_outputs(runner, batches):
            if out is None:
                out = np.empty((num_rows, *logits.shape[1:]), dtype=logits.dtype)
            out[idx] = logits
            bar.update(len(idx))
    return out


def ordered_outputs(runner, batches) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """(indices, logits) of each batch, in the batches' order: the runner's ``workers``
    (OnnxBackend's parallel batches; else 1) batches run side by side on threads (the runner
    releases the GIL while it computes; the next batches are padded meanwhile), at most
    2 x ``workers`` in flight, so that the padded batches are never all held at once."""
    workers = getattr(runner, "workers", 1)
    if workers <= 1:
        yield from ((idx, runner(batch)) for idx, batch in batches)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers, thread_name_prefix="finetune-predict") as pool:
        pending: deque = deque()
        for idx, batch in batches:
            pending.append((idx, pool.submit(runner, batch)))
            if len(pending) >= 2 * workers:
                idx, future = pending.popleft()
                yield idx, future.result()
        while pending:
            idx, future = pending.popleft()
            yield idx, future.result()


def _cell(key: str, value: object) -> object:
    """A number as the run's prediction tables write it (probabilities fixed, values %.6g); lists
    (a sentence's tags or entities) as JSON."""
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    if not isinstance(value, float):
        return value
    return f"{value:.{PROB_DECIMALS}f}" if key.startswith("prob_") else f"{value:.6g}"


def write_rows(records: List[Dict[str, object]], output: Optional[str]) -> None:
    if output and output.endswith(".jsonl"):
        with open(output, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        return
    from finetune.data_checks import clean_tsv_field, tsv_writer

    records = [{k: _cell(k, v) for k, v in r.items()} for r in records]
    f = open(output, "w", newline="", encoding="utf-8") if output else sys.stdout
    try:
        if str(output).endswith(".csv"):
            writer = csv.writer(f)
        else:  # TSV as predict reads it back: quotes kept as they are (see data_checks.tsv_writer)
            writer = tsv_writer(f)
            records = [{k: clean_tsv_field(v) for k, v in r.items()} for r in records]
        writer.writerow(list(records[0]))
        writer.writerows(list(r.values()) for r in records)
    finally:
        if output:
            f.close()


def parse_options(argv: List[str], options, required, usage: str, error=PredictError, types=None) -> Dict[str, object]:
    """key=value arguments of the finetune.predict / finetune.export commands: known keys only,
    the required ones present, ``types`` ({key: int | float}) converted."""
    args: Dict[str, object] = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in options:
            raise error(f"unexpected argument '{arg}'; use key=value with key in {list(options)}.")
        args[key] = value
    for key in required:
        if key not in args:
            raise error(f"{key}=... is required: {usage}")
    for key, kind in (types or {}).items():
        if key in args:
            try:
                args[key] = kind(args[key])
            except ValueError:
                raise error(f"{key}={args[key]!r} is not a{'n integer' if kind is int else ' number'}.") from None
    return args


def parse_args(argv: List[str]) -> Dict[str, object]:
    args = parse_options(argv, OPTIONS, ("model", "input"),
                         "python -m finetune.predict model=RUN_DIR input=FILE [output=FILE]",
                         types={"batch_size": int, "max_length": int, "threshold": float, "threads": int})  # fmt: skip
    check_options(args)
    return args


def run_command(prog: str, doc: str, argv: Optional[List[str]], body) -> None:
    """The key=value commands' entry: help on no argument or -h, else ``body(argv)``; bad input
    (a FinetuneError) prints one '<prog>: error: ...' paragraph and exits 2, never a traceback."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(doc)
        return
    try:
        body(argv)
    except FinetuneError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)


def main(argv: Optional[List[str]] = None) -> None:
    run_command("finetune.predict", __doc__, argv, _predict_command)


def _predict_command(argv: List[str]) -> None:
    args = parse_args(argv)
    # Files shaped like the run's training files: its data.column_names unless column_names= is given.
    model_dir, meta = resolve_model_dir(args["model"], args.get("backend", "auto"))
    column_names = column_names_option(args["column_names"]) if "column_names" in args else meta.get("column_names")
    config = Path(model_dir) / "config.json"  # the run's label names (absent for a Hub id)
    labels = json.loads(config.read_text()).get("id2label", {}).values() if config.is_file() else ()
    records = predict(
        args["model"],
        read_rows(args["input"], column_names, list(labels)),
        batch_size=args.get("batch_size"),
        threshold=args.get("threshold"),
        text_column=args.get("text_column"),
        text_pair_column=args.get("text_pair_column"),
        max_length=args.get("max_length"),
        backend=args.get("backend", "auto"),
        threads=args.get("threads"),
        device=args.get("device", "auto"),
    )
    write_rows(records, args.get("output"))


if __name__ == "__main__":
    main()
