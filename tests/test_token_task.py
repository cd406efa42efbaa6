"""Token classification end to end (issue 21) on a tiny BERT whose fast tokenizer splits some words
into pieces (tests/ner_toy.py): training, the seqeval metrics against the predictions table,
pipeline() and finetune.predict on the saved model, LoRA, and the bad inputs refused before
anything is written."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from ner_toy import make_ner_checkpoint, ner_rows, write_jsonl
from test_e2e import run_in_process

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def ner_overrides(checkpoint, files, out, *extra):
    return [
        "recipe=minilm_conll2003",
        f"model.name_or_path={checkpoint}",
        f"data.train_file={files['train']}",
        f"data.validation_file={files['validation']}",
        "data.max_length=32",
        "train.epochs=3",
        "train.lr=5e-3",
        "train.batch_size=8",
        "early_stopping.patience=null",
        # The recipe's speed choices (frozen embeddings, no dropout, a 20x head) are for the real
        # encoder; the tiny random one must learn its embeddings.
        "model.freeze=none",
        "optimizer.head_lr_scale=1",
        "logger=none",
        f"output_dir={out}",
        *extra,
    ]


def train_ner_world(tmp: Path, train_rows, validation_rows, *extra):
    """A tiny NER BERT and its jsonl files in ``tmp``, trained once on one thread (as the other
    workers also train): (checkpoint, files, run directory, summary)."""
    import torch

    checkpoint = make_ner_checkpoint(tmp / "bert")
    files = {"train": write_jsonl(tmp / "train.jsonl", train_rows),
             "validation": write_jsonl(tmp / "validation.jsonl", validation_rows)}  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = run_in_process(ner_overrides(checkpoint, files, tmp / "run", *extra))
    finally:
        torch.set_num_threads(threads)
    return checkpoint, files, tmp / "run", summary


@pytest.fixture(scope="module")
def ner(tmp_path_factory):
    """One trained tiny NER run shared by the tests: (checkpoint, files, run directory, summary)."""
    return train_ner_world(tmp_path_factory.mktemp("ner"), ner_rows(120, 1), ner_rows(30, 2))


def table(run):
    return [json.loads(line) for line in (Path(run) / "predictions" / "validation.jsonl").read_text().splitlines()]


def test_metrics_are_seqeval_of_the_predictions_table(ner):
    from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

    _, files, run, summary = ner
    rows = table(run)
    gold, predicted = [r["gold"] for r in rows], [r["predicted"] for r in rows]
    assert [r["words"] for r in rows] == [json.loads(line)["tokens"] for line in Path(files["validation"]).read_text().splitlines()]
    assert all(len(r["words"]) == len(r["gold"]) == len(r["predicted"]) for r in rows)
    best = json.loads((run / "metrics.json").read_text())["best"]
    assert summary["best_metric"] == "f1"
    assert best["f1"] == pytest.approx(f1_score(gold, predicted))
    assert best["precision"] == pytest.approx(precision_score(gold, predicted))
    assert best["recall"] == pytest.approx(recall_score(gold, predicted))
    assert best["accuracy"] == pytest.approx(accuracy_score(gold, predicted))
    assert best["f1"] > 0.3 and {"f1_PER", "f1_LOC"} <= set(best)  # it learned something; per type too


def test_saved_model_tags_raw_text_in_pipeline_as_finetune_predict_does(ner):
    from transformers import pipeline

    from finetune.predict import predict

    run = ner[2]
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "O", "1": "B-LOC", "2": "I-LOC", "3": "B-PER", "4": "I-PER"}
    texts = ["johnson went to parisville today", "the anna met mary in london", "a maryson saw berlin"]
    ours = predict(str(run), [{"text": t} for t in texts], progress=False)
    pipe = pipeline("token-classification", model=str(run / "model"), aggregation_strategy="simple")
    for text, record in zip(texts, ours):
        expected = [{**e, "score": pytest.approx(float(e["score"]), abs=1e-5)} for e in pipe(text)]
        assert record["text"] == text and record["entities"] == expected
    assert any(record["entities"] for record in ours)


def test_predict_on_words_gives_one_tag_per_word_as_the_table(ner):
    from finetune.predict import predict

    rows = table(ner[2])
    out = predict(str(ner[2]), [{"tokens": r["words"]} for r in rows], progress=False)
    assert [o["tags"] for o in out] == [r["predicted"] for r in rows]


def test_first_sub_token_carries_the_tag_and_label_all_tokens_continues_it(ner):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from finetune.config import DataConfig
    from finetune.tasks import get_task

    tokenizer = AutoTokenizer.from_pretrained(ner[0])
    names = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    split = Dataset.from_dict({"tokens": [["johnson", "went", "to", "parisville"]], "labels": [[3, 0, 0, 1]]})
    task = get_task("token_classification")
    for all_tokens, expected in ((False, [-100, 3, -100, 0, 0, 1, -100, -100]), (True, [-100, 3, 4, 0, 0, 1, 2, -100])):
        cfg = DataConfig(label_all_tokens=all_tokens)
        tokenized, tables = task.tokenize({"train": split, "validation": split}, tokenizer, cfg, names)
        assert tokenizer.convert_ids_to_tokens(tokenized["train"]["input_ids"][0])[2] == "##son"
        assert tokenized["train"]["labels"][0] == expected
        assert tokenized["validation"]["labels"][0] == [-100, 3, -100, 0, 0, 1, -100, -100]  # evaluation: first only


def test_loss_skips_padding_and_continuation_pieces_and_weighs_tags():
    import torch

    from finetune.config import LossConfig
    from finetune.losses import build_loss

    logits = torch.randn(2, 4, 3)
    labels = torch.tensor([[-100, 1, -100, 0], [2, 0, -100, -100]])
    kept = labels != -100
    loss = build_loss(LossConfig(), "token_classification", [3, 1, 1])
    assert loss(logits, labels).item() == pytest.approx(torch.nn.functional.cross_entropy(logits[kept], labels[kept]).item())
    weighted = build_loss(LossConfig(class_weights="auto"), "token_classification", [3, 1, 1])
    w = torch.tensor([5 / 9, 5 / 3, 5 / 3])
    assert weighted(logits, labels).item() == pytest.approx(torch.nn.functional.cross_entropy(logits[kept], labels[kept], weight=w).item())


def test_lora_run_saves_the_adapter_with_its_head_and_reloads(ner, tmp_path):
    from finetune.predict import predict

    checkpoint, files, _, _ = ner
    out = tmp_path / "lora"
    run_in_process(ner_overrides(checkpoint, files, out, "adapter=lora", "adapter.target_modules=[query,value]",
                                 "train.epochs=1"))  # fmt: skip
    meta = json.loads((out / "model" / "adapter_config.json").read_text())
    assert meta["task_type"] == "TOKEN_CLS" and "classifier" in (meta.get("modules_to_save") or [])
    rows = table(out)
    again = predict(str(out), [{"tokens": r["words"]} for r in rows], progress=False)
    assert [o["tags"] for o in again] == [r["predicted"] for r in rows]


def test_cross_validation_splits_sentences(ner, tmp_path):
    checkpoint, files, _, _ = ner
    out = tmp_path / "cv"
    run_in_process(ner_overrides(checkpoint, files, out, "cv.folds=2", "train.max_steps=2", "plots=false"))
    cv = json.loads((out / "cv.json").read_text())
    assert len(cv["folds"]) == 2 and "f1" in cv["mean"]


def test_a_chunk_starting_on_i_is_repaired_with_one_warning(tmp_path, caplog):
    from finetune.config import DataConfig
    from finetune.data import load_and_prepare

    rows = ner_rows(10, 3) + [{"tokens": ["the", "john", "went"], "ner_tags": ["O", "I-PER", "O"]},
                              {"tokens": ["a", "paris"], "ner_tags": ["O", "I-LOC"]}]  # fmt: skip
    cfg = DataConfig(train_file=write_jsonl(tmp_path / "t.jsonl", rows), validation_file=write_jsonl(tmp_path / "v.jsonl", rows[:3]))
    with caplog.at_level(logging.WARNING):
        splits, names, task = load_and_prepare(cfg, seed=0)
    assert task == "token_classification"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "continuation tag" in r.getMessage()]
    assert len(warnings) == 1 and "2 entity chunk(s)" in warnings[0] and "row 11, word 2" in warnings[0]
    assert [names[i] for i in splits["train"]["labels"][10]] == ["O", "B-PER", "O"]


BAD = {
    "length_mismatch": ({"tokens": ["john", "went"], "ner_tags": ["B-PER"]}, "train", ["row 31", "2 words but 1 tags"]),
    "empty_sentence": ({"tokens": [], "ner_tags": []}, "train", ["row 31", "empty sentence"]),
    "unknown_tag_in_validation": ({"tokens": ["acme", "went"], "ner_tags": ["B-ORG", "O"]}, "validation",
                                  ["row 31", "'B-ORG'", "training data never uses"]),
    "unreadable_tag": ({"tokens": ["john"], "ner_tags": ["PERSON"]}, "train", ["row 31", "'PERSON'", "no tag scheme reads"]),
}


@pytest.mark.parametrize("bad", list(BAD))
def test_bad_tagged_rows_fail_before_anything_is_written(ner, tmp_path, bad):
    from finetune.config import FinetuneError

    checkpoint = ner[0]
    row, split, expect = BAD[bad]
    rows = {"train": ner_rows(30, 1), "validation": ner_rows(30, 2)}
    rows[split].append(row)
    files = {s: write_jsonl(tmp_path / f"{s}.jsonl", r) for s, r in rows.items()}
    out = tmp_path / "run"
    with pytest.raises(FinetuneError) as err:
        run_in_process(ner_overrides(checkpoint, files, out))
    assert all(e in str(err.value) for e in expect), str(err.value)
    assert not out.exists() or not any(out.iterdir())


def test_tag_columns_on_a_text_task_and_text_on_a_token_task_are_refused(ner, tmp_path):
    from conftest import sentiment_rows, write_tsv

    from finetune.config import FinetuneError

    checkpoint, files, _, _ = ner
    out = tmp_path / "run"
    with pytest.raises(FinetuneError) as err:
        run_in_process(ner_overrides(checkpoint, files, out, "task=single_label"))
    assert "task=single_label needs" in str(err.value) and "data.tags_column='ner_tags'" in str(err.value)
    text = {s: write_tsv(tmp_path / f"{s}.tsv", sentiment_rows(20, seed=i)) for i, s in enumerate(("train", "validation"))}
    with pytest.raises(FinetuneError) as err:
        run_in_process(ner_overrides(checkpoint, text, out))  # the recipe says task=token_classification
    assert "task=token_classification needs a list of words" in str(err.value) and "data.tokens_column" in str(err.value)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("override, key", [("eval.calibrate=temperature", "eval.calibrate=temperature"),
                                           ("data.sampler=balanced", "data.sampler=balanced"),
                                           ("distill.teacher=<run>", "distill.teacher with task=token_classification")])  # fmt: skip
def test_what_token_classification_cannot_do_is_refused_before_training(ner, tmp_path, override, key):
    from finetune.config import FinetuneError

    checkpoint, files, _, _ = ner
    out = tmp_path / "run"
    with pytest.raises(FinetuneError) as err:
        run_in_process(ner_overrides(checkpoint, files, out, override.replace("<run>", str(ner[2]))))
    assert key in str(err.value)
    assert not out.exists() or not any(out.iterdir())


def test_task_auto_detects_word_and_tag_lists_with_classlabel_ids(tmp_path):
    from datasets import ClassLabel, Dataset, Features, List, Value

    from finetune.config import DataConfig
    from finetune.data import load_and_prepare

    names = ["O", "B-PER", "I-PER"]
    features = Features({"tokens": List(Value("string")), "ner_tags": List(ClassLabel(names=names))})
    ds = Dataset.from_dict({"tokens": [["john", "smith", "went"], ["mary", "went"]] * 5,
                            "ner_tags": [[1, 2, 0], [1, 0]] * 5}, features=features)  # fmt: skip
    ds.to_parquet(str(tmp_path / "train.parquet"))
    splits, labels, task = load_and_prepare(DataConfig(train_file=str(tmp_path / "train.parquet")), seed=0)
    assert task == "token_classification" and labels == names
    assert np.concatenate(splits["train"]["labels"]).max() == 2
