"""Label audit (issue 23): cross-validation's out-of-fold outputs judged (single-label by the noise
matrix estimated from anchor rows, other tasks by cleanlab), label_issues.tsv,
metrics.json's audit block, data.exclude_rows; one cross-validated tiny run shared by the tests."""

import csv
import json
import logging

import numpy as np
import pytest

from conftest import make_tokenizer, sentiment_rows, write_tsv
from test_e2e import run_in_process, tiny_overrides

FOLDS = 3
TRAIN_ROWS, KEPT_ROWS = 150, 138  # data.max_train_samples keeps 138 of the training file's 150 rows


def unique_rows(n, seed):
    seen, rows = set(), []
    for text, label in sentiment_rows(4 * n, seed):
        if text not in seen:
            seen.add(text)
            rows.append((text, label))
    return rows[:n]


def flip(label):
    return "negative" if label == "positive" else "positive"


class AuditSpy:
    """Records what each task's label_issues gets (the out-of-fold logits and labels of the audited
    rows, in training-file order) and returns; installed from outside the product."""

    def __init__(self, monkeypatch):
        from finetune.tasks.base import Task

        self.calls = []
        spy = self

        def wrap(cls):
            original = cls.label_issues

            def label_issues(self, logits, labels, id2label, **cut):
                result = original(self, logits, labels, id2label, **cut)
                spy.calls.append((np.stack(logits), np.asarray(labels), dict(id2label), result))
                return result

            monkeypatch.setattr(cls, "label_issues", label_issues)

        for cls in Task.__subclasses__():
            wrap(cls)


@pytest.fixture(scope="module")
def audited(tiny_bert, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("audit")
    rows = unique_rows(TRAIN_ROWS + 15, seed=11)
    train, validation = rows[:TRAIN_ROWS], rows[TRAIN_ROWS:]
    flipped = set(range(0, TRAIN_ROWS, 15))  # 10 rows given the wrong label
    noisy = [(t, flip(l) if i in flipped else l) for i, (t, l) in enumerate(train)]
    files = {"train": write_tsv(tmp / "train.tsv", noisy), "validation": write_tsv(tmp / "validation.tsv", validation)}
    with pytest.MonkeyPatch.context() as mp:
        spy = AuditSpy(mp)
        summary = run_in_process(tiny_overrides(
            tiny_bert, files, tmp / "run", f"cv.folds={FOLDS}", "audit.label_issues=true", "train.epochs=6",
            f"data.max_train_samples={KEPT_ROWS}", "logger=none"))  # fmt: skip
    (logits, labels, id2label, result), = spy.calls
    return {"run": tmp / "run", "files": files, "noisy": noisy, "validation": validation, "flipped": flipped,
            "logits": logits, "labels": labels, "id2label": id2label, "summary": summary, "tmp": tmp}  # fmt: skip


def read_issues(run):
    with open(run / "label_issues.tsv", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        return header, [dict(zip(header, r)) for r in reader]


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def audited_rows(audited):
    """The training-file rows the audit judged, in its order: the ones max_train_samples kept."""
    from finetune.config import DataConfig
    from finetune.data import SOURCE_ROW, fold_pool, load_and_prepare

    cfg = DataConfig(train_file=audited["files"]["train"], validation_file=audited["files"]["validation"],
                     text_column="sentence", max_train_samples=KEPT_ROWS)  # fmt: skip
    splits, _, _ = load_and_prepare(cfg, seed=42)
    return sorted(r for r in fold_pool(splits)[SOURCE_ROW] if r >= 0)


def test_out_of_fold_probabilities_are_those_of_the_fold_model_that_never_saw_the_row(audited):
    """Each audited row's probabilities equal those of the one saved fold model that held it out
    (fold_K/predictions/validation.tsv lists the rows it validated on, i.e. was not trained on)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = audited_rows(audited)
    assert len(rows) == KEPT_ROWS == len(audited["logits"])
    oof = softmax(audited["logits"])
    text_of = {audited["noisy"][r][0]: k for k, r in enumerate(rows)}
    seen, other_fold_differs = set(), []
    for fold in range(FOLDS):
        model_dir = audited["run"] / f"fold_{fold}" / "model"
        with open(audited["run"] / f"fold_{fold}" / "predictions" / "validation.tsv", encoding="utf-8") as f:
            held_out = [r["text"] for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
        texts = [t for t in held_out if t in text_of]
        assert not seen & set(texts)  # held out by one fold only
        seen |= set(texts)
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
        with torch.no_grad():
            probs = torch.softmax(model(**tok(texts, padding=True, truncation=True, max_length=32,
                                               return_tensors="pt")).logits, -1).numpy()  # fmt: skip
        np.testing.assert_allclose(oof[[text_of[t] for t in texts]], probs, atol=1e-4)
        others = [text_of[t] for t in text_of if t not in held_out]
        with torch.no_grad():
            probs = torch.softmax(model(**tok([audited["noisy"][rows[k]][0] for k in others], padding=True,
                                              return_tensors="pt")).logits, -1).numpy()  # fmt: skip
        other_fold_differs.append(np.abs(oof[others] - probs).max() > 1e-3)
    assert len(seen) == KEPT_ROWS  # every audited row comes from exactly one fold
    assert all(other_fold_differs)  # a model that trained on the rows gives other probabilities


def anchor_posterior(probs, given, share=0.03):
    """The test's own P(true = given | text, given): the anchor estimate of P(given | true) (column
    t: the mean probabilities of the share x classes x rows-given-t rows most probably t), the
    probabilities with the noise taken out, Bayes' rule."""
    k = probs.shape[1]
    counts = [max(1, round(share * k * (given == t).sum())) for t in range(k)]
    noise = np.stack([probs[np.argsort(-probs[:, t])[:counts[t]]].mean(axis=0) for t in range(k)], axis=1)
    clean = np.clip(probs @ np.linalg.pinv(noise).T, 0, None)
    clean /= clean.sum(axis=1, keepdims=True)
    idx = np.arange(len(given))
    return noise[given, given] * clean[idx, given] / (noise[given] * clean).sum(axis=1), noise


def test_tsv_holds_the_rows_likely_mislabelled_with_cleanlabs_scores(audited):
    """The rows whose given label is less than 30% likely right (audit.flag_below's default), by the
    test's own anchor estimate and Bayes' rule, with cleanlab's scores and the out-of-fold suggestions."""
    from cleanlab.rank import get_label_quality_scores

    header, issues = read_issues(audited["run"])
    assert header == ["row", "text", "given_label", "suggested_label", "label_quality"]
    probs, given, names = softmax(audited["logits"]), audited["labels"].astype(int), audited["id2label"]
    rows = audited_rows(audited)
    flagged = anchor_posterior(probs, given)[0] < 0.3
    scores = get_label_quality_scores(given, probs)
    assert flagged.any()
    assert sorted(int(r["row"]) for r in issues) == sorted(rows[k] for k in np.flatnonzero(flagged))
    k_of = {r: k for k, r in enumerate(rows)}
    for r in issues:
        k = k_of[int(r["row"])]
        assert r["given_label"] == names[given[k]] and r["suggested_label"] == names[int(probs[k].argmax())]
        assert float(r["label_quality"]) == pytest.approx(scores[k], abs=1e-6)
    quality = [float(r["label_quality"]) for r in issues]
    assert quality == sorted(quality)  # worst first


def test_rows_are_training_file_rows_and_the_run_records_the_audit(audited):
    """`row` indexes the training file (through data.max_train_samples); validation-file rows are
    trained on but not audited; metrics.json holds the audit block, plots/ the noise matrix."""
    _, issues = read_issues(audited["run"])
    validation_texts = {t for t, _ in audited["validation"]}
    for r in issues:
        text, label = audited["noisy"][int(r["row"])]
        assert r["text"] == text and r["given_label"] == label and text not in validation_texts
    found = {int(r["row"]) for r in issues} & audited["flipped"]
    assert found  # the tiny model finds some of the flipped rows
    block = json.loads((audited["run"] / "metrics.json").read_text())["audit"]
    assert block["rows_audited"] == KEPT_ROWS and block["rows_flagged"] == len(issues) and block["flag_below"] == 0.3
    assert block["validation_file_rows_not_audited"] == len(audited["validation"])
    assert 0 < block["estimated_noise_rate"] < 1 and block["most_confused"][0]["given"] in ("negative", "positive")
    assert (audited["run"] / "plots" / "label_noise.png").stat().st_size > 0
    assert audited["summary"]["audit"] == block


def test_exclude_rows_drops_exactly_the_named_rows(audited, tmp_path, caplog):
    from finetune.config import DataConfig
    from finetune.data import SOURCE_ROW, load_and_prepare

    _, issues = read_issues(audited["run"])
    named = {int(r["row"]) for r in issues}
    plain = tmp_path / "rows.txt"
    plain.write_text("3\n\n17\n3\n")
    for path, expected, why in ((audited["run"] / "label_issues.tsv", named, "flagged as likely mislabelled"),
                                (plain, {3, 17}, "listed in")):  # fmt: skip
        cfg = DataConfig(train_file=audited["files"]["train"], text_column="sentence", exclude_rows=str(path),
                         validation_size=0.25)  # fmt: skip
        with caplog.at_level(logging.INFO, logger="finetune"):
            splits, _, _ = load_and_prepare(cfg, seed=0)
        kept = list(splits["train"][SOURCE_ROW]) + list(splits["validation"][SOURCE_ROW])
        assert sorted(kept) == sorted(set(range(TRAIN_ROWS)) - expected)
        texts = set(splits["train"]["sentence"]) | set(splits["validation"]["sentence"])
        assert not texts & {audited["noisy"][r][0] for r in expected}
        assert f"{len(expected)} of {TRAIN_ROWS} training rows dropped ({why}" in caplog.text


def test_clean_retrain_is_one_command(audited, tiny_bert):
    """The audit's table given back as data.exclude_rows: a plain run on the rows left."""
    run = audited["tmp"] / "clean"
    summary = run_in_process(tiny_overrides(
        tiny_bert, audited["files"], run, f"data.exclude_rows={audited['run'] / 'label_issues.tsv'}",
        "train.epochs=1", "logger=none", "plots=false"))  # fmt: skip
    assert summary["best"] and (run / "model").is_dir()


# ---------------------------------------------------------------------------------------------
# The folds reuse one tokenization
# ---------------------------------------------------------------------------------------------
def test_folds_are_cut_from_one_tokenization(tmp_path, monkeypatch):
    import finetune.data
    from finetune.config import DataConfig, LongText
    from finetune.data import check_folds, fold_indices, kfold_splits, load_and_prepare, tokenized_task_data
    from finetune.folds import fold_task_data, pool_task_data

    tok = make_tokenizer()
    train = write_tsv(tmp_path / "train.tsv", unique_rows(40, seed=5))
    test = write_tsv(tmp_path / "test.tsv", unique_rows(7, seed=6))
    for long_text in (LongText.truncate, LongText.window):
        cfg = DataConfig(train_file=train, test_file=test, text_column="sentence", max_length=6,
                         long_text=long_text, window_stride=2)  # fmt: skip
        splits, names, task = load_and_prepare(cfg, seed=0)
        encoded = []
        original = finetune.data.encode_texts
        monkeypatch.setattr(finetune.data, "encode_texts", lambda tok_, texts, *a, **k: (
            encoded.extend(texts) or original(tok_, texts, *a, **k)))  # fmt: skip
        pool, rows = pool_task_data(splits, names, task, tok, cfg)
        monkeypatch.setattr(finetune.data, "encode_texts", original)
        assert len(encoded) == 40 + 7  # each pooled row and test row encoded once
        check_folds(splits, 3, task)
        for (train_idx, val_idx), fold in zip(fold_indices(rows, 3, 0, task), kfold_splits(splits, 3, 0, task)):
            cut, alone = fold_task_data(pool, train_idx, val_idx), tokenized_task_data(fold, names, task, tok, cfg)
            for split in ("train", "validation", "test"):
                a, b = getattr(cut, split), getattr(alone, split)
                assert a.column_names == b.column_names and a.to_dict() == b.to_dict(), (long_text, split)
            assert cut.train_lengths == alone.train_lengths and cut.texts == alone.texts
            assert cut.train_document_index == alone.train_document_index
            assert cut.train_documents == alone.train_documents


# ---------------------------------------------------------------------------------------------
# Each task's verdict on made-up out-of-fold logits: single-label's own rule, the others cleanlab's
# ---------------------------------------------------------------------------------------------
def test_single_label_audit_estimates_the_noise_and_flags_the_rows_a_known_noise_makes_wrong():
    """Out-of-fold probabilities as a good model trained on noisy labels gives them: P(given) = T P(true)
    with a known, uneven noise matrix T. The audit recovers T from anchor rows, counts about the wrong
    labels there are and flags the rows whose label is less than 30% likely right under the true T
    (audit.flag_below=0.5: more likely wrong than right)."""
    from finetune.config import SINGLE_LABEL
    from finetune.tasks import get_task

    rng = np.random.default_rng(0)
    k, n = 4, 4000
    noise = np.array([[0.83, 0.02, 0.03, 0.10],  # P(given g | true t): rows given, columns true
                      [0.05, 0.95, 0.02, 0.02],
                      [0.07, 0.01, 0.93, 0.03],
                      [0.05, 0.02, 0.02, 0.85]])  # fmt: skip
    true = rng.choice(k, size=n, p=[0.45, 0.3, 0.23, 0.02])  # c3 rare: 2% of the rows
    clean = rng.dirichlet(np.full(k, 0.3), n)  # P(true | text): mostly sure, a quarter torn
    clean[np.arange(n), true] += np.where(rng.random(n) < 0.75, 30.0, 0.5)
    clean /= clean.sum(axis=1, keepdims=True)
    given = np.array([rng.choice(k, p=noise[:, t]) for t in true])
    probs = clean @ noise.T  # P(given | text)
    # One row per class on which the model is surer than the noise allows (real models' most extreme
    # outputs are overconfident): anchors are a share of the rows, so no single row makes a column.
    true, given, clean = np.r_[true, np.arange(k)], np.r_[given, np.arange(k)], np.r_[clean, np.eye(k)]
    probs = np.r_[probs, np.full((k, k), 0.001) + np.eye(k) * 0.996]
    n += k
    got = get_task(SINGLE_LABEL).label_issues(list(np.log(probs)), list(given), {i: f"c{i}" for i in range(k)})

    estimated = got.noise_matrix[0]
    np.testing.assert_allclose(estimated, noise, atol=0.03)
    wrong = given != true
    assert abs(got.noise_rate - wrong.mean()) < 0.02  # about the share of wrong labels
    bayes = noise[given, given] * clean[np.arange(n), given] / (noise[given] * clean).sum(axis=1)
    assert (got.flagged != (bayes < 0.3)).sum() <= 0.0025 * n  # the rule under the true noise matrix
    assert (got.flagged & wrong).sum() > 0.9 * got.flagged.sum()  # precision
    more = get_task(SINGLE_LABEL).label_issues(list(np.log(probs)), list(given), {i: f"c{i}" for i in range(k)}, 0.5)
    assert (more.flagged != (bayes < 0.5)).sum() <= 0.0025 * n  # audit.flag_below=0.5: more likely wrong than right
    assert more.flagged.sum() > got.flagged.sum() and (more.flagged & wrong).sum() > 0.8 * more.flagged.sum()
    assert more.flagged.sum() < 1.2 * wrong.sum()
    expected = noise * np.bincount(true, minlength=k)  # rows given g whose true label is t
    np.fill_diagonal(expected, 0)
    g, t = np.unravel_index(expected.argmax(), expected.shape)
    assert got.confused[0] == {"given": f"c{g}", "likely_true": f"c{t}", "rows": pytest.approx(expected[g, t], rel=0.25)}


def test_multi_label_regression_and_token_verdicts_are_cleanlabs():
    from cleanlab.multilabel_classification.filter import find_label_issues as multi_issues
    from cleanlab.multilabel_classification.rank import get_label_quality_scores as multi_scores
    from cleanlab.regression.rank import get_label_quality_scores as value_scores
    from cleanlab.token_classification.filter import find_label_issues as token_issues
    from cleanlab.token_classification.rank import get_label_quality_scores as token_scores

    from finetune.config import MULTI_LABEL, REGRESSION, TOKEN_CLASSIFICATION
    from finetune.tasks import get_task

    rng = np.random.default_rng(0)
    hot = (rng.random((60, 3)) < 0.4).astype(np.float32)
    logits = np.where(hot > 0, 2.0, -2.0) + rng.normal(0, 1.5, hot.shape)
    got = get_task(MULTI_LABEL).label_issues(list(logits), list(hot), {0: "a", 1: "b", 2: "c"})
    lists, probs = [np.flatnonzero(r).tolist() for r in hot], 1 / (1 + np.exp(-logits))
    np.testing.assert_array_equal(got.flagged, multi_issues(lists, probs))
    np.testing.assert_allclose(got.quality, multi_scores(lists, probs))
    assert got.given[0] == "|".join("abc"[j] for j in lists[0]) and got.noise_matrix[0].shape == (3, 2)

    values = rng.normal(0, 1, 60)
    predicted = values + rng.normal(0, 0.1, 60)
    predicted[:3] += 5  # three labels far from what the model predicts
    got = get_task(REGRESSION).label_issues(list(predicted[:, None]), list(values), {0: "score"})
    scores = value_scores(values, predicted)
    np.testing.assert_allclose(got.quality, scores)
    np.testing.assert_array_equal(got.flagged, scores < 0.05 * np.median(scores))
    assert got.flagged[:3].all() and got.noise_matrix is None

    names = {0: "O", 1: "B-PER", 2: "I-PER"}
    tags = [rng.integers(0, 3, size=rng.integers(2, 6)) for _ in range(30)]
    width = 8  # sub-token rows padded as evaluation pads them: -100 for special / padding tokens
    labels, token_logits = [], []
    for t in tags:
        row = np.full(width, -100)
        row[1:1 + len(t)] = t
        labels.append(row)
        token_logits.append(np.where(np.arange(3) == row.clip(0)[:, None], 3.0, 0.0) + rng.normal(0, 1.5, (width, 3)))
    got = get_task(TOKEN_CLASSIFICATION).label_issues(token_logits, labels, names)
    word_probs = [softmax(z[1:1 + len(t)]) for z, t in zip(token_logits, tags)]
    found = token_issues([t.tolist() for t in tags], word_probs)
    np.testing.assert_array_equal(np.flatnonzero(got.flagged), sorted({s for s, _ in found}))
    np.testing.assert_allclose(got.quality, token_scores([t.tolist() for t in tags], word_probs)[0])
    assert got.given[0] == " ".join(names[int(x)] for x in tags[0])


def audit_two_folds(logits, labels, out_dir, task=None, **audit):
    """finetune.audit on made-up out-of-fold outputs of two folds (even rows / odd rows), of ``task``
    (default single-label), no plots, with ``audit`` as the audit.* keys; returns metrics.json's
    audit block."""
    from datasets import Dataset

    from finetune.audit import audit_label_issues
    from finetune.config import SINGLE_LABEL, FinetuneConfig
    from finetune.data import SOURCE_ROW
    from finetune.train import EvalOutput

    n, k = logits.shape
    conf = FinetuneConfig()
    conf.plots, conf.cv.folds = False, 2
    for key, value in audit.items():
        setattr(conf.audit, key, value)
    pool = Dataset.from_dict({conf.data.text_column: [f"text {i}" for i in range(n)], SOURCE_ROW: list(range(n))})
    halves = np.arange(n) % 2 == 0
    parts = [(np.flatnonzero(~halves), np.flatnonzero(halves)), (np.flatnonzero(halves), np.flatnonzero(~halves))]
    outputs = [EvalOutput(metrics={}, logits=logits[val], labels=labels[val]) for _, val in parts]

    class Data:
        id2label = {i: f"c{i}" for i in range(k)}

    Data.task = task or SINGLE_LABEL
    return audit_label_issues(conf, pool, parts, outputs, Data, out_dir, out_dir, {})


@pytest.mark.parametrize("models", ["learned", "sure at random", "barely learned"])
def test_audit_warns_when_the_fold_models_did_not_learn_the_task(models, tmp_path, caplog):
    """Out-of-fold outputs of models that did not learn the task make many labels look wrong: the audit
    says that the models, not the labels, are the likelier problem, whether they predict the given
    labels no better than the class frequencies do or leave half the labels looking wrong; outputs of
    models that learned stay quiet."""
    rng = np.random.default_rng(0)
    n, k = 400, 4
    labels = rng.choice(k, size=n, p=[0.4, 0.3, 0.2, 0.1])
    sure, right = {"learned": (3.0, 12.0), "sure at random": (3.0, 0.0), "barely learned": (0.3, 0.1)}[models]
    logits = rng.normal(0, sure, (n, k)) + right * np.eye(k)[labels]
    if models == "barely learned":  # the class frequencies and a little more
        logits += np.log(np.bincount(labels) / n)
    with caplog.at_level(logging.WARNING, logger="finetune.audit"):
        block = audit_two_folds(logits, labels, tmp_path)
    warned = [r.getMessage() for r in caplog.records if "did not learn the task" in r.getMessage()]
    assert bool(warned) == (models != "learned")
    if models == "sure at random":  # its log loss against that of the given labels' frequencies
        frequencies = np.bincount(labels) / n
        assert "train.epochs" in warned[0] and f"the class frequencies' {-np.log(frequencies[labels]).mean():.3f}" in warned[0]
        assert block["estimated_noise_rate"] < 0.5  # the noise estimate alone would not have told
    if models == "barely learned":
        assert block["estimated_noise_rate"] >= 0.5 and "no better than their frequencies" not in warned[0]
        assert f"{100 * block['estimated_noise_rate']:.0f}% of the rows look mislabelled" in warned[0]


@pytest.mark.parametrize("flag_below", [None, 0.5, 0.9])
def test_audit_flag_below_sets_the_cut(flag_below, tmp_path, caplog):
    """audit.flag_below reaches the verdict: the table holds the rows whose given label is less likely
    right than the cut (null: 0.3), and metrics.json and the run's log say the cut."""
    rng = np.random.default_rng(1)
    n, k = 600, 3
    noise = np.full((k, k), 0.075) + 0.775 * np.eye(k)  # P(given | true): 15% given another class
    true = rng.choice(k, size=n)
    labels = np.array([rng.choice(k, p=noise[:, t]) for t in true])
    logits = np.log(softmax(rng.normal(0, 1.5, (n, k)) + 2.5 * np.eye(k)[true]) @ noise.T)  # P(given | text)
    with caplog.at_level(logging.INFO, logger="finetune.audit"):
        block = audit_two_folds(logits, labels, tmp_path, label_issues=True, flag_below=flag_below)
    cut = 0.3 if flag_below is None else flag_below
    right = anchor_posterior(softmax(logits), labels)[0]
    _, issues = read_issues(tmp_path)
    assert sorted(int(r["row"]) for r in issues) == np.flatnonzero(right < cut).tolist()
    assert block["flag_below"] == cut and block["rows_flagged"] == (right < cut).sum() > 0
    assert any(f"flagged as likely mislabelled (probability the given label is right < {cut:g}" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    assert (right < cut).sum() > (right < 0.3).sum() or flag_below is None  # each cut flags other rows


def test_flag_below_is_refused_once_task_auto_finds_a_task_without_a_cut():
    """task=auto: the task is known only from the data; a multi-label or token audit then refuses the cut."""
    from finetune.config import MULTI_LABEL, SINGLE_LABEL, TOKEN_CLASSIFICATION, FinetuneConfig
    from finetune.validation import ConfigError, check_task

    conf = FinetuneConfig()
    conf.cv.folds, conf.audit.label_issues, conf.audit.flag_below = 3, True, 0.4
    check_task(conf, SINGLE_LABEL)
    for task in (MULTI_LABEL, TOKEN_CLASSIFICATION):
        with pytest.raises(ConfigError, match=f"audit.flag_below=0.4 .* {task} audits flag by cleanlab's rules"):
            check_task(conf, task)


def test_an_audit_without_a_cut_records_none(tmp_path, caplog):
    """Tasks that flag by cleanlab's rules (here regression) audit with no cut: none in metrics.json or
    in the log line, and no Task.label_issues argument they would not take."""
    from finetune.config import REGRESSION
    from finetune.tasks import get_task

    rng = np.random.default_rng(2)
    values = rng.normal(0, 1, 200)
    predicted = values + rng.normal(0, 0.1, 200)
    predicted[:4] += 5
    calls = []
    task = get_task(REGRESSION)
    original = type(task).label_issues

    def three_arguments(self, logits, labels, id2label):  # a task written before audit.flag_below
        calls.append(len(labels))
        return original(self, logits, labels, id2label)

    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.INFO, logger="finetune.audit"):
        mp.setattr(type(task), "label_issues", three_arguments)
        block = audit_two_folds(predicted[:, None], values, tmp_path, task=REGRESSION, label_issues=True)
    assert calls == [200] and "flag_below" not in block and block["rows_flagged"] >= 4
    line = next(r.getMessage() for r in caplog.records if "flagged as likely mislabelled" in r.getMessage())
    assert "probability the given label is right" not in line
