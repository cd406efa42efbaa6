"""Long documents as sliding windows (data.long_text=window): the windows themselves, pooling
back to one row per document, splits and folds drawn from whole documents, and a windowed run
whose evaluation and finetune.predict give one row per document, in input order."""

import csv
import json
import logging
import math
import random

import numpy as np
import pytest
from datasets import Dataset, DatasetDict

from conftest import NEGATIVE, NEUTRAL, POSITIVE, make_tokenizer, write_tsv
from finetune.config import MULTI_LABEL, REGRESSION, SINGLE_LABEL, DataConfig, LongText
from finetune.data import LABELS, kfold_splits, load_and_prepare, tokenize_splits, tokenized_task_data
from finetune.data_checks import DataError
from finetune.windows import DOCUMENT, check_window_stride, encode_windows, pool_windows

DOCS = np.array([0, 0, 1, 2, 2, 2])
LOGITS = np.array([[1.0, -1.0], [3.0, 0.0], [0.5, 0.5], [-2.0, 4.0], [0.0, 1.0], [1.0, -2.0]], dtype=np.float32)


def sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, dtype=np.float64)))


def test_pool_windows_single_label_mean_and_max():
    mean, first = pool_windows(LOGITS, DOCS, SINGLE_LABEL, "mean")
    np.testing.assert_allclose(mean, [[2.0, -0.5], [0.5, 0.5], [-1 / 3, 1.0]], rtol=1e-6)
    assert first.tolist() == [0, 2, 3] and mean.dtype == np.float32
    top, _ = pool_windows(LOGITS, DOCS, SINGLE_LABEL, "max")
    np.testing.assert_allclose(top, [[3.0, 0.0], [0.5, 0.5], [1.0, 4.0]])  # per class, across windows
    # Windows need not come sorted: documents come back in order of their index.
    shuffled, first = pool_windows(LOGITS[::-1], DOCS[::-1], SINGLE_LABEL, "mean")
    np.testing.assert_allclose(shuffled, mean, rtol=1e-6)
    assert first.tolist() == [4, 3, 0]


def test_pool_windows_multi_label_pools_probabilities_and_regression_means():
    mean, _ = pool_windows(LOGITS, DOCS, MULTI_LABEL, "mean")
    probs = sigmoid(LOGITS)
    expected = [probs[:2].mean(0), probs[2], probs[3:].mean(0)]
    np.testing.assert_allclose(sigmoid(mean), expected, rtol=1e-5)  # mean of probabilities, not of logits
    assert not np.allclose(sigmoid(mean)[2], sigmoid(LOGITS[3:].mean(0)), rtol=1e-3)
    top, _ = pool_windows(LOGITS, DOCS, MULTI_LABEL, "max")
    np.testing.assert_allclose(sigmoid(top), [probs[:2].max(0), probs[2], probs[3:].max(0)], rtol=1e-5)
    values = np.array([[1.0], [3.0], [5.0], [0.0], [3.0], [6.0]], dtype=np.float32)
    for pool in ("mean", "max"):  # a regression value is always averaged
        pooled, _ = pool_windows(values, DOCS, REGRESSION, pool)
        np.testing.assert_allclose(pooled[:, 0], [2.0, 5.0, 3.0])


LONG = " ".join(NEUTRAL + POSITIVE + NEGATIVE)  # 26 tokens of the tiny vocabulary


def content(ids, tokenizer):
    return [t for t in ids if t not in tokenizer.all_special_ids]


def test_long_text_becomes_overlapping_windows():
    tok = make_tokenizer()
    enc = encode_windows(tok, [LONG, "good film"], None, 12, 4)
    owners = enc["overflow_to_sample_mapping"]
    windows = [content(ids, tok) for ids, o in zip(enc["input_ids"], owners) if o == 0]
    # 26 text tokens, 10 a window (12 less [CLS] and [SEP]), each window 10 - 4 tokens further on.
    tokens, room = len(content(tok(LONG)["input_ids"], tok)), 12 - 2
    assert tokens == 26 and len(windows) == 1 + math.ceil((tokens - room) / (room - 4)) == 4
    assert owners == [0] * 4 + [1]
    assert max(len(ids) for ids in enc["input_ids"]) == 12
    for a, b in zip(windows, windows[1:]):
        assert a[-4:] == b[:4]  # consecutive windows share window_stride tokens
    whole = content(tok(LONG)["input_ids"], tok)
    assert windows[0] + [t for w in windows[1:] for t in w[4:]] == whole  # together: the text, nothing lost


def test_pairs_keep_the_first_text_whole_and_window_the_second():
    tok = make_tokenizer()
    first = "the movie was really very good"  # longer than the share of the second text in a window
    enc = encode_windows(tok, [first], [LONG], 14, 3)
    assert len(enc["input_ids"]) >= 3
    head = tok(first, add_special_tokens=False)["input_ids"]
    seconds = []
    for ids, types in zip(enc["input_ids"], enc["token_type_ids"]):
        assert ids[1 : 1 + len(head)] == head
        seconds.append(content([t for t, s in zip(ids, types) if s == 1], tok))
    for a, b in zip(seconds, seconds[1:]):
        assert a[-3:] == b[:3]


def test_a_stride_without_room_fails_clearly():
    tok = make_tokenizer()
    check_window_stride(tok, 12, 9, pairs=False)
    with pytest.raises(DataError, match=r"window_stride=10 leaves no room.*below 10"):
        check_window_stride(tok, 12, 10, pairs=False)
    with pytest.raises(DataError, match=r"row 2: its first text has 26 tokens"):
        encode_windows(tok, ["good", LONG], ["bad", "dull"], 16, 3)


def test_a_first_text_too_long_for_windows_is_named_by_its_split_and_row():
    """The row counts from the split's first row, not from the first row of its 1,000-row map batch."""
    tok = make_tokenizer()
    rows = [{"premise": LONG if i == 1001 else "good", "hypothesis": "dull film", LABELS: i % 2} for i in range(1203)]
    cfg = DataConfig(text_column="premise", text_pair_column="hypothesis", max_length=16, long_text=LongText.window,
                     window_stride=3)  # fmt: skip
    with pytest.raises(DataError) as err:
        tokenize_splits(DatasetDict({"train": Dataset.from_list(rows)}), tok, cfg)
    assert str(err.value).startswith(
        f"the train split's row 1002 (its first text begins {LONG[:60]!r}): its first text has 26 tokens, but with "
        "data.long_text=window the first text is kept whole in every window"
    ), str(err.value)


def unique_documents(n, seed):
    """Distinct long documents (12-30 words), labelled by the majority of their sentiment words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.choices(NEUTRAL, k=rng.randint(10, 26)) + rng.choices(POSITIVE if i % 2 else NEGATIVE, k=4)
        rng.shuffle(words)
        rows.append((" ".join(words), ["negative", "positive"][i % 2]))
    assert len({t for t, _ in rows}) == n
    return rows


def documents_of_windows(ds, docs_ids):
    """The documents (indices into docs_ids) whose token sequence contains a window's text (a
    short last window found in several documents names none of them)."""
    found, ambiguous = set(), 0
    tok = make_tokenizer()
    for ids in ds["input_ids"]:
        window = " " + " ".join(map(str, content(ids, tok))) + " "
        owners = [d for d, doc in enumerate(docs_ids) if window in doc]
        assert owners, "a window that is no part of any document"
        found.update(owners if len(owners) == 1 else [])
        ambiguous += len(owners) > 1
    assert ambiguous < len(ds) / 20
    return found


def test_no_document_has_windows_in_two_splits_or_folds(tmp_path):
    tok = make_tokenizer()
    rows = unique_documents(60, seed=3)
    cfg = DataConfig(train_file=write_tsv(tmp_path / "train.tsv", rows), text_column="sentence", max_length=10,
                     long_text=LongText.window, window_stride=3, validation_size=0.25)  # fmt: skip
    splits, names, task = load_and_prepare(cfg, seed=0)
    docs_ids = [" " + " ".join(map(str, content(tok(t)["input_ids"], tok))) + " " for t, _ in rows]
    data = tokenized_task_data(splits, names, task, tok, cfg)
    assert len(data.train) > 2 * data.train_documents  # really windowed
    train_docs, val_docs = documents_of_windows(data.train, docs_ids), documents_of_windows(data.validation, docs_ids)
    assert len(train_docs) == 45 and len(val_docs) == 15 and not train_docs & val_docs
    seen = set()
    for fold in kfold_splits(splits, 3, seed=0, task=task):
        fold_data = tokenized_task_data(fold, names, task, tok, cfg)
        fold_train = documents_of_windows(fold_data.train, docs_ids)
        fold_val = documents_of_windows(fold_data.validation, docs_ids)
        assert not fold_train & fold_val and len(fold_train | fold_val) == 60
        assert not seen & fold_val  # each document validates in one fold only
        seen |= fold_val
    assert len(seen) == 60


def test_windows_carry_their_documents_row_and_label():
    """More rows than one map batch (1,000): each window names its row in the split, not in its batch."""
    tok = make_tokenizer()
    n, long_rows = 1203, {3, 999, 1000, 1202}
    rows = [{"sentence": LONG if i in long_rows else "dull film", LABELS: i % 2} for i in range(n)]
    cfg = DataConfig(text_column="sentence", max_length=10, long_text=LongText.window, window_stride=2)
    ds = tokenize_splits(DatasetDict({"validation": Dataset.from_list(rows)}), tok, cfg)["validation"]
    docs, labels = list(ds[DOCUMENT]), list(ds[LABELS])
    assert docs == sorted(docs) and set(docs) == set(range(n)) and docs[-1] == n - 1
    assert all(docs.count(i) > 1 if i in long_rows else docs.count(i) == 1 for i in (0, 3, 998, 999, 1000, 1001, 1202))
    assert labels == [rows[d][LABELS] for d in docs]


# ---------------------------------------------------------------------------------------------
# A windowed run on headerless files: evaluation and predict, one row per document
# ---------------------------------------------------------------------------------------------
MAX_LENGTH, STRIDE = 10, 3


@pytest.fixture(scope="module")
def windowed_run(tiny_bert, tmp_path_factory):
    from transformers import AutoTokenizer

    from test_e2e import run_in_process, tiny_overrides

    tmp = tmp_path_factory.mktemp("windows")
    files = {
        "train": write_tsv(tmp / "train.tsv", unique_documents(48, seed=1), header=None),
        "validation": write_tsv(tmp / "validation.tsv", unique_documents(30, seed=2), header=None),
    }
    # train.eval_every at the last step: valid for the steps through the windows (26), far
    # beyond the 6 steps that the 48 documents would make in batches of 8.
    texts = [t for t, _ in unique_documents(48, seed=1)]
    windows = len(encode_windows(AutoTokenizer.from_pretrained(tiny_bert), texts, None, MAX_LENGTH, STRIDE)["input_ids"])
    args = [a for a in tiny_overrides(tiny_bert, files, tmp / "run", "train.epochs=1", "logger=none", "plots=false") if "max_length" not in a]
    run_in_process(args + ["data.column_names=[sentence,label]", f"data.max_length={MAX_LENGTH}",
                           "data.long_text=window", f"data.window_stride={STRIDE}", "data.window_pool=mean",
                           f"train.eval_every={math.ceil(windows / 8)}"])  # fmt: skip
    return tmp / "run", files


def table(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_windowed_run_evaluates_and_records_one_row_per_document(windowed_run):
    out, files = windowed_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["long_text"] == "window" and metrics["window_stride"] == STRIDE
    assert metrics["train_documents"] == 48 and metrics["train_windows"] > 2 * 48
    assert metrics["steps"] == math.ceil(metrics["train_windows"] / 8) > math.ceil(48 / 8)  # one epoch of windows
    texts = [line.split("\t")[0] for line in open(files["validation"]).read().splitlines()]
    rows = table(out / "predictions" / "validation.tsv")
    assert [r["text"] for r in rows] == texts  # one row per document, in input order
    correct = sum(r["label"] == r["prediction"] for r in rows)
    assert metrics["best"]["accuracy"] == pytest.approx(correct / 30)  # counted over documents
    meta = json.loads((out / "model" / "finetune.json").read_text())
    assert meta["column_names"] == ["sentence", "label"] and meta["long_text"] == "window"


def test_predict_pools_the_windows_of_a_long_text_into_one_row(windowed_run):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune.predict import predict

    out, _ = windowed_run
    text = LONG + " " + LONG
    got = predict(str(out), [{"sentence": text}], progress=False)
    assert len(got) == 1 and got[0]["text"] == text
    # By hand: every window through the model, mean of their logits, softmax.
    tok = AutoTokenizer.from_pretrained(out / "model")
    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    enc = tok(text, truncation=True, max_length=MAX_LENGTH, stride=STRIDE, return_overflowing_tokens=True,
              return_tensors="pt", padding=True)  # fmt: skip
    enc.pop("overflow_to_sample_mapping")
    assert enc["input_ids"].shape[0] > 5
    with torch.no_grad():
        probs = torch.softmax(model(**enc).logits.mean(0), -1).numpy()
    assert [got[0]["prob_negative"], got[0]["prob_positive"]] == pytest.approx(probs.tolist(), abs=2e-6)


def test_predict_reads_headerless_files_like_training_and_matches_evaluation(windowed_run, tmp_path, caplog):
    from finetune.predict import main

    out, files = windowed_run
    dest = tmp_path / "preds.tsv"
    with caplog.at_level(logging.WARNING, logger="finetune"):
        main([f"model={out}", f"input={files['validation']}", f"output={dest}"])  # the run's column names
    got, expected = table(dest), table(out / "predictions" / "validation.tsv")
    assert len(got) == 30 and not caplog.messages
    for g, e in zip(got, expected):  # windowed and pooled exactly as evaluation did
        assert (g["text"], g["prediction"], g["prob_positive"]) == (e["text"], e["prediction"], e["prob_positive"])

    swapped = tmp_path / "swapped.tsv"  # other columns, named explicitly
    swapped.write_text("".join(f"{r['label']}\t{r['text']}\n" for r in expected))
    main([f"model={out}", f"input={swapped}", f"output={dest}", "column_names=gold,sentence"])
    assert [r["prob_positive"] for r in table(dest)] == [r["prob_positive"] for r in expected]

    # A header naming other columns than the run's files had: read as a document, with a warning.
    headed = tmp_path / "headed.tsv"
    headed.write_text("review\tsentiment\n" + open(files["validation"]).read())
    with caplog.at_level(logging.WARNING, logger="finetune"):
        main([f"model={out}", f"input={headed}", f"output={dest}"])
    assert len(table(dest)) == 31 and table(dest)[0]["text"] == "review"
    assert [m for m in caplog.messages if "['review', 'sentiment'] looks like a header" in m
            and "label field 'sentiment' is none of the run's labels ['negative', 'positive']" in m]  # fmt: skip


def test_a_windowed_student_learns_each_window_from_the_teachers_view_of_it(windowed_run, tiny_bert, tmp_path,
                                                                             monkeypatch):  # fmt: skip
    """The windowed run teaches a windowed student: the teacher scores each of the student's
    training windows (not each document's first max_length tokens), once."""
    from transformers import AutoTokenizer

    import finetune.backends
    from test_e2e import run_in_process, tiny_overrides

    teacher, files = windowed_run
    texts = [line.split("\t")[0] for line in open(files["train"]).read().splitlines()]
    windows = len(encode_windows(AutoTokenizer.from_pretrained(tiny_bert), texts, None, MAX_LENGTH, STRIDE)["input_ids"])
    scored = []
    real = finetune.backends.TorchBackend.__call__
    monkeypatch.setattr(finetune.backends.TorchBackend, "__call__",
                        lambda self, batch: scored.append(len(batch["input_ids"])) or real(self, batch))  # fmt: skip
    args = [a for a in tiny_overrides(tiny_bert, files, tmp_path / "student", "train.epochs=1", "logger=none",
                                      "plots=false") if "max_length" not in a]  # fmt: skip
    run_in_process(args + ["data.column_names=[sentence,label]", f"data.max_length={MAX_LENGTH}",
                           "data.long_text=window", f"data.window_stride={STRIDE}", f"distill.teacher={teacher}",
                           f"train.eval_every={math.ceil(windows / 8)}"])  # fmt: skip
    metrics = json.loads((tmp_path / "student" / "metrics.json").read_text())
    assert sum(scored) == metrics["train_windows"] == windows and metrics["distill"]["teacher"] == str(teacher)


def test_config_checks_the_stride_and_refuses_augmentation_with_windows():
    from finetune.config import AugmentConfig, ConfigError, FinetuneConfig, ModelConfig
    from finetune.validation import validate

    data = DataConfig(dataset="x", max_length=16, long_text=LongText.window, window_stride=16, augment=AugmentConfig(swap=0.1))
    with pytest.raises(ConfigError) as err:
        validate(FinetuneConfig(model=ModelConfig(name_or_path="bert-base-uncased"), data=data, output_dir="out"))
    assert "data.window_stride=16 must be >= 0 and below data.max_length=16" in str(err.value)
    assert "data.augment with data.long_text=window is not supported" in str(err.value)
    data.long_text = LongText.truncate  # the stride means nothing without windows
    validate(FinetuneConfig(model=ModelConfig(name_or_path="bert-base-uncased"), data=data, output_dir="out"))
