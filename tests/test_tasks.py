"""Every task type end to end on a tiny model: multi-label, regression, pairs, cross-validation."""

import csv
import json
import random

import numpy as np
import pytest

from conftest import NEGATIVE, NEUTRAL, POSITIVE
from test_e2e import run_in_process


def base_overrides(tiny_bert, train, validation, out, *extra):
    return [
        "recipe=minilm_sst2",
        f"model.name_or_path={tiny_bert}",
        f"data.train_file={train}",
        f"data.validation_file={validation}",
        "data.label_names=null",
        "data.max_length=32",
        "data.text_column=text",
        "train.epochs=4",
        "train.lr=5e-3",
        "train.batch_size=8",
        "early_stopping.patience=null",
        f"output_dir={out}",
        *extra,
    ]


def topic_rows(n, seed):
    """Texts whose labels are the sentiment words present: 'pos' and/or 'neg' (multi-label)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        labels = [["pos"], ["neg"], ["pos", "neg"], []][i % 4]
        words = rng.sample(NEUTRAL, rng.randint(2, 6))
        words += [rng.choice(POSITIVE)] if "pos" in labels else []
        words += [rng.choice(NEGATIVE)] if "neg" in labels else []
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "labels": labels})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def micro_f1_by_threshold(out):
    """Micro-F1 of the validation prediction table at each threshold of the tuning grid, computed
    here (scikit-learn) from the table's probabilities and gold label sets."""
    from sklearn.metrics import f1_score

    with open(out / "predictions" / "validation.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    names = [k[len("prob_") :] for k in rows[0] if k.startswith("prob_")]
    probs = np.array([[float(r[f"prob_{n}"]) for n in names] for r in rows])
    gold = np.array([[n in r["label"].split("|") for n in names] for r in rows])
    grid = np.round(np.arange(0.05, 0.951, 0.05), 2)
    return {float(t): f1_score(gold, probs >= t, average="micro") for t in grid}, rows, probs, names


def assert_threshold_is_tuned(out, summary):
    """eval.tune_threshold: the threshold kept maximises validation micro-F1, is saved with the
    model, and is the one the prediction table applied. Returns micro-F1 by threshold."""
    f1, rows, probs, names = micro_f1_by_threshold(out)
    threshold = summary["threshold"]
    assert f1[threshold] == max(f1.values()), (threshold, f1)
    assert json.loads((out / "model" / "finetune.json").read_text())["threshold"] == threshold
    predicted = [{n for n, p in zip(names, row) if p >= threshold} for row in probs]
    assert [set(filter(None, r["prediction"].split("|"))) for r in rows] == predicted
    return f1


def test_tuned_threshold_beats_the_default(tiny_bert, tmp_path):
    """After one epoch the probabilities still sit near 0.5: a lower threshold gives a better
    micro-F1 than the default 0.5, and tuning must find it."""
    train = write_jsonl(tmp_path / "train.jsonl", topic_rows(160, 1))
    val = write_jsonl(tmp_path / "val.jsonl", topic_rows(40, 2))
    out = tmp_path / "run"
    summary = run_in_process(base_overrides(tiny_bert, train, val, out, "data.label_column=labels", "train.epochs=1",
                                            "metrics=[f1_micro]", "early_stopping.metric=f1_micro", "train.lr=3e-3",
                                            "eval.tune_threshold=true", "logger=none", "plots=false"))  # fmt: skip
    f1 = assert_threshold_is_tuned(out, summary)
    assert f1[summary["threshold"]] > f1[0.5] + 0.05


def test_multi_label_from_lists_learns_and_writes_label_sets(tiny_bert, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", topic_rows(160, 1))
    val = write_jsonl(tmp_path / "val.jsonl", topic_rows(40, 2))
    out = tmp_path / "run"
    summary = run_in_process(base_overrides(tiny_bert, train, val, out, "data.label_column=labels",
                                            "metrics=[f1_micro,accuracy]", "early_stopping.metric=f1_micro",
                                            "train.epochs=15", "train.lr=3e-3", "eval.tune_threshold=true"))  # fmt: skip
    assert summary["best"]["f1_micro"] >= 0.9
    assert_threshold_is_tuned(out, summary)
    meta = json.loads((out / "model" / "finetune.json").read_text())
    assert meta["task"] == "multi_label_classification" and meta["id2label"] == {"0": "neg", "1": "pos"}
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    with open(out / "predictions" / "validation.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert rows[2]["label"] == "neg|pos" and rows[3]["label"] == ""
    assert {"prob_neg", "prob_pos", "text"} <= set(rows[0])


def test_multi_label_from_0_1_columns(tiny_bert, tmp_path):
    def to_columns(rows):
        return [(r["text"], int("pos" in r["labels"]), int("neg" in r["labels"])) for r in rows]

    for name, rows in (("train", topic_rows(160, 1)), ("val", topic_rows(40, 2))):
        lines = ["text\tis_pos\tis_neg"] + [f"{t}\t{p}\t{n}" for t, p, n in to_columns(rows)]
        (tmp_path / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    # The columns encode exactly like the lists do (columns keep their given order).
    from finetune.config import DataConfig
    from finetune.data import load_and_prepare

    cfg = DataConfig(train_file=str(tmp_path / "train.tsv"), validation_file=str(tmp_path / "val.tsv"),
                     label_columns=["is_pos", "is_neg"])  # fmt: skip
    splits, names, task = load_and_prepare(cfg, seed=0)
    assert (names, task) == (["is_pos", "is_neg"], "multi_label_classification")
    expected = [[float("pos" in r["labels"]), float("neg" in r["labels"])] for r in topic_rows(160, 1)]
    assert splits["train"]["labels"] == expected

    summary = run_in_process(base_overrides(tiny_bert, tmp_path / "train.tsv", tmp_path / "val.tsv", tmp_path / "run",
                                            "data.label_columns=[is_pos,is_neg]", "metrics=[f1_macro]",
                                            "early_stopping.metric=f1_macro", "train.epochs=15", "train.lr=3e-3"))  # fmt: skip
    assert summary["best"]["f1_macro"] > summary["evaluations"][0]["f1_macro"]


def score_rows(n, seed):
    """Regression: the score is the number of positive words minus negative ones."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        pos, neg = rng.randint(0, 2), rng.randint(0, 2)
        words = rng.sample(NEUTRAL, 3) + rng.sample(POSITIVE, pos) + rng.sample(NEGATIVE, neg)
        rng.shuffle(words)
        rows.append((" ".join(words), float(pos - neg)))
    return rows


def test_regression_learns_a_score(tiny_bert, tmp_path):
    for name, n, seed in (("train", 200, 1), ("val", 50, 2)):
        (tmp_path / f"{name}.tsv").write_text("text\tscore\n" + "".join(f"{t}\t{s}\n" for t, s in score_rows(n, seed)))
    out = tmp_path / "run"
    summary = run_in_process(base_overrides(tiny_bert, tmp_path / "train.tsv", tmp_path / "val.tsv", out,
                                            "data.label_column=score", "metrics=[pearson,spearman,mse]",
                                            "early_stopping.metric=pearson", "train.epochs=8"))  # fmt: skip
    assert summary["best"]["pearson"] >= 0.8
    with open(out / "predictions" / "validation.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    preds, gold = np.array([float(r["prediction"]) for r in rows]), np.array([float(r["label"]) for r in rows])
    assert np.corrcoef(preds, gold)[0, 1] == pytest.approx(summary["best"]["pearson"], abs=1e-4)


def test_regression_with_classification_metrics_is_an_error(tiny_bert, tmp_path):
    from finetune.metrics import MetricError

    (tmp_path / "t.tsv").write_text("text\tscore\n" + "".join(f"{t}\t{s}\n" for t, s in score_rows(20, 1)))
    with pytest.raises(MetricError, match="do not apply to regression"):
        run_in_process(base_overrides(tiny_bert, tmp_path / "t.tsv", tmp_path / "t.tsv", tmp_path / "r",
                                      "data.label_column=score"))  # fmt: skip


def test_sentence_pairs_single_label(tiny_bert, tmp_path):
    # The label is the sentiment of the *second* text: only a model that reads the pair learns it.
    rng = random.Random(0)

    def rows(n):
        out = []
        for i in range(n):
            label = i % 2
            second = " ".join(rng.sample(NEUTRAL, 2) + [rng.choice(POSITIVE if label else NEGATIVE)])
            first = " ".join(rng.sample(NEUTRAL, 3))
            out.append((first, second, "positive" if label else "negative"))
        return out

    for name, n in (("train", 160), ("val", 40)):
        (tmp_path / f"{name}.tsv").write_text("text\tother\tlabel\n" + "".join("\t".join(r) + "\n" for r in rows(n)))
    out = tmp_path / "run"
    summary = run_in_process(base_overrides(tiny_bert, tmp_path / "train.tsv", tmp_path / "val.tsv", out,
                                            "data.text_pair_column=other"))  # fmt: skip
    assert summary["best"]["accuracy"] >= 0.9
    with open(out / "predictions" / "validation.tsv") as f:
        row = next(csv.DictReader(f, delimiter="\t"))
    assert row["text_pair"] and row["text_pair"] != row["text"]


def test_cross_validation_writes_every_fold_and_mean_std(tiny_bert, toy_files, tmp_path):
    out = tmp_path / "cv"
    summary = run_in_process(base_overrides(tiny_bert, toy_files["train"], toy_files["validation"], out,
                                            "data.text_column=sentence", "cv.folds=3", "train.epochs=2"))  # fmt: skip
    assert len(summary["folds"]) == 3
    for k in range(3):
        assert (out / f"fold_{k}" / "model" / "config.json").is_file()
        assert json.loads((out / f"fold_{k}" / "metrics.json").read_text())["best"] == summary["folds"][k]
    acc = np.array([f["accuracy"] for f in summary["folds"]])
    assert summary["mean"]["accuracy"] == pytest.approx(acc.mean())
    assert summary["std"]["accuracy"] == pytest.approx(acc.std(ddof=1))
    assert json.loads((out / "cv.json").read_text()) == summary
    # 160 + 41 rows pooled: each fold validates on a third.
    rows = [sum(1 for _ in open(out / f"fold_{k}" / "predictions" / "validation.tsv")) - 1 for k in range(3)]
    assert sorted(rows) == [67, 67, 67]
