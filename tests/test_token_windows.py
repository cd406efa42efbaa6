"""Token classification with data.long_text=window (issue 21): sentences longer than
data.max_length become windows of whole words sharing data.window_stride tokens; training labels
every word of every window, evaluation and finetune.predict read each word once, from the window
where it sits farthest from an edge; the prediction table and the metrics score every word."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from ner_toy import make_ner_checkpoint, ner_rows
from test_token_task import table, train_ner_world

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# 10 words, 12 word pieces: parisville = paris ##ville, johnson = john ##son.
WORDS = "john met mary in parisville and johnson saw anna today".split()
TAGS = [3, 0, 3, 0, 1, 0, 3, 0, 3, 0]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(make_ner_checkpoint(tmp_path_factory.mktemp("tok") / "bert"))


def test_a_long_sentence_is_cut_into_windows_of_whole_words_sharing_the_stride(tokenizer):
    from finetune.word_windows import best_windows, encode_words, evaluation_labels, scored_words, window_labels

    # max_length=8: 6 word pieces besides [CLS] / [SEP]; stride 2: consecutive windows share at most 2 pieces.
    windows = encode_words(tokenizer, [WORDS], 8, stride=2)
    assert windows.spans == [(0, 5), (4, 8), (7, 10)] and windows.sentence == [0, 0, 0]
    assert tokenizer.convert_ids_to_tokens(windows.encoding["input_ids"][1]) == \
        ["[CLS]", "paris", "##ville", "and", "john", "##son", "saw", "[SEP]"]  # fmt: skip
    assert windows.word_ids[1] == [None, 4, 4, 5, 6, 6, 7, None] and windows.truncated_words == 0
    # Each word from the window where it is farthest from an edge (the earlier one on a tie):
    # parisville ends window 0 and starts window 1, saw ends window 1 and starts window 2 (no
    # context in either: the earlier window); johnson has 2 pieces each side in window 1.
    assert best_windows(windows)[0] == [(0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (1, 3), (1, 4), (1, 6), (2, 2), (2, 3)]
    assert scored_words(windows) == [list(range(10))]
    # Training: every word of every window carries its tag; evaluation: each word once.
    assert window_labels(windows, [TAGS]) == [[-100, 3, 0, 3, 0, 1, -100, -100],
                                              [-100, 1, -100, 0, 3, -100, 0, -100],
                                              [-100, 0, 3, 0, -100]]  # fmt: skip
    assert evaluation_labels(windows, [TAGS]) == [[-100, 3, 0, 3, 0, 1, -100, -100],
                                                  [-100, -100, -100, 0, 3, -100, 0, -100],
                                                  [-100, -100, 3, 0, -100]]  # fmt: skip
    # Without a stride only the first window is kept, and the words left out are counted.
    cut = encode_words(tokenizer, [WORDS], 8)
    assert cut.spans == [(0, 5)] and (cut.truncated_words, cut.truncated_sentences) == (5, 1)


def test_evaluation_joins_a_sentences_windows_word_by_word(tokenizer):
    from finetune.tasks import get_task
    from finetune.word_windows import assemble_words, encode_words, evaluation_labels

    short = ["anna", "went"]
    windows = encode_words(tokenizer, [WORDS, short], 8, stride=2)
    width = max(len(ids) for ids in windows.word_ids)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(len(windows), width, 5)).astype(np.float32)
    labels = np.full((len(windows), width), -100)
    for k, row in enumerate(evaluation_labels(windows, [TAGS, [3, 0]])):
        labels[k, : len(row)] = row
    pooled, gold = get_task("token_classification").pool_outputs(logits, labels, np.asarray(windows.sentence), "mean")
    assert pooled.shape == (2, 10, 5) and gold.tolist() == [TAGS, [3, 0] + [-100] * 8]
    # The row of each word is its logits in its best window, as finetune.predict assembles them.
    expected = assemble_words(windows, list(logits))
    np.testing.assert_allclose(pooled[0], expected[0], rtol=1e-6)
    np.testing.assert_allclose(pooled[1, :2], expected[1], rtol=1e-6)


def test_raw_text_tokens_are_each_read_from_one_window(tokenizer):
    from finetune.token_predict import text_tokens
    from finetune.windows import OVERFLOW, encode_windows

    text = " ".join(WORDS)
    enc = encode_windows(tokenizer, [text, "anna went"], None, 8, 2, offsets=True)
    owners = list(enc[OVERFLOW])
    content = [[p for p, s in enumerate(enc.sequence_ids(w)) if s is not None] for w in range(len(owners))]
    picked = text_tokens([w for w, o in enumerate(owners) if o == 0], content, 2)
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert [enc["input_ids"][w][p] for w, p in picked] == whole  # every token once, in order
    # paris ends window 0 with one token after it, ##ville starts window 1 with one before it.
    assert [w for w, _ in picked] == [0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2]


def test_truncated_words_are_counted_and_logged(tokenizer, caplog):
    from datasets import Dataset

    from finetune.config import DataConfig
    from finetune.tasks import get_task

    split = Dataset.from_dict({"tokens": [WORDS, ["anna"]], "labels": [TAGS, [3]]})
    with caplog.at_level(logging.WARNING):
        get_task("token_classification").tokenize({"train": split}, tokenizer, DataConfig(max_length=8),
                                                  ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"])  # fmt: skip
    assert any("5 word(s) of 1 sentence(s) lie past data.max_length=8" in r.getMessage() for r in caplog.records)


def long_rows(n, seed):
    """Sentences of two or three toy sentences joined: 10 to 35 words, most past 12 tokens."""
    parts = ner_rows(3 * n, seed)
    rows = []
    for i in range(n):
        group = parts[3 * i : 3 * i + 2 + i % 2]
        rows.append({"tokens": sum((r["tokens"] for r in group), []), "ner_tags": sum((r["ner_tags"] for r in group), [])})
    return rows


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """A tiny NER run on sentences longer than data.max_length=12 with windows sharing 4 tokens."""
    return train_ner_world(tmp_path_factory.mktemp("ner_windows"), long_rows(60, 1), long_rows(12, 2),
                           "data.max_length=12", "data.long_text=window", "data.window_stride=4", "plots=false")  # fmt: skip


def test_every_validation_word_is_predicted_and_scored_once(windowed):
    from seqeval.metrics import accuracy_score, f1_score
    from transformers import AutoTokenizer

    checkpoint, files, run, _ = windowed
    sentences = [json.loads(line) for line in Path(files["validation"]).read_text().splitlines()]
    lengths = [len(t) for t in AutoTokenizer.from_pretrained(checkpoint)([s["tokens"] for s in sentences],
                                                                         is_split_into_words=True)["input_ids"]]  # fmt: skip
    assert sum(n > 12 for n in lengths) >= 6  # most validation sentences need several windows
    rows = table(run)
    assert [r["words"] for r in rows] == [s["tokens"] for s in sentences]
    assert [r["gold"] for r in rows] == [s["ner_tags"] for s in sentences]
    assert all(len(r["predicted"]) == len(r["words"]) for r in rows)
    gold, predicted = [r["gold"] for r in rows], [r["predicted"] for r in rows]
    metrics = json.loads((run / "metrics.json").read_text())
    # The metrics count every word once: token accuracy over all words equals the table's.
    assert metrics["best"]["accuracy"] == pytest.approx(accuracy_score(gold, predicted))
    assert metrics["best"]["f1"] == pytest.approx(f1_score(gold, predicted))
    assert metrics["long_text"] == "window" and metrics["train_windows"] > metrics["train_documents"] == 60


def test_predict_reads_words_and_raw_text_in_windows_as_the_run_did(windowed):
    from transformers import AutoTokenizer

    from finetune.predict import predict

    run = windowed[2]
    rows = table(run)
    out = predict(str(run), [{"tokens": r["words"]} for r in rows], progress=False)
    assert [o["tags"] for o in out] == [r["predicted"] for r in rows]
    texts = [" ".join(r["words"]) for r in rows]
    found = predict(str(run), [{"text": t} for t in texts], progress=False)
    # Entities are found in the text past the first window (what truncation would have dropped).
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    first_window_ends = [enc[-2][1] for enc in tokenizer(texts, truncation=True, max_length=12,
                                                         return_offsets_mapping=True)["offset_mapping"]]  # fmt: skip
    late = [e for record, end in zip(found, first_window_ends) for e in record["entities"] if e["start"] >= end]
    assert len(late) >= 3 and all(e["end"] <= len(t) for record, t in zip(found, texts) for e in record["entities"])
