"""Class imbalance (issue 15): the balanced sampler (class shares per epoch, seeding, length
grouping, multi-process shards, resume), honest sub-samples (data.subsample, the automatic
validation split carved from the sub-sample, cross-validation pooling only it) and the label
checks that run before any model is loaded, with their exact messages."""

import json
import logging

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import DataLoader

from conftest import sentiment_rows, write_tsv
from finetune.batching import LengthGroupedBatchSampler
from finetune.config import MULTI_LABEL, REGRESSION, SINGLE_LABEL, DataConfig, FinetuneConfig, SamplerType, Subsample
from finetune.data import DataError, check_folds, kfold_splits, load_and_prepare
from finetune.sampling import check_labels, imbalance_settings, imbalance_text, sampling_weights, subsample_indices

SHARES = (0.70, 0.20, 0.07, 0.03)  # 2800 / 800 / 280 / 120 of 4,000 rows
ROWS = 4000


def imbalanced_labels(seed=0):
    labels = np.repeat(np.arange(4), [int(s * ROWS) for s in SHARES])
    return np.random.default_rng(seed).permutation(labels)


def balanced_sampler(labels, power, seed=3, group_by_length=True, batch_size=16):
    lengths = np.random.default_rng(1).integers(5, 120, size=len(labels)).tolist()
    weights = sampling_weights(labels, SINGLE_LABEL, 4, power)
    return LengthGroupedBatchSampler(lengths, batch_size, seed, group_by_length=group_by_length, mega_batch_mult=8,
                                     weights=weights)  # fmt: skip


def drawn(sampler, epoch):
    sampler.set_epoch(epoch)
    return [i for batch in sampler for i in batch]


def assert_shares(labels, rows, expected):
    """Each class's share of one epoch's draws is within 4 binomial standard deviations of expected."""
    counts = np.bincount(labels[rows], minlength=4)
    sd = np.sqrt(len(rows) * np.asarray(expected) * (1 - np.asarray(expected)))
    assert np.all(np.abs(counts - len(rows) * np.asarray(expected)) < 4 * sd), (counts, expected)


def test_balanced_sampler_draws_every_class_equally_often_each_epoch_and_power_softens_it():
    labels = imbalanced_labels()
    full = balanced_sampler(labels, power=1.0)
    half = balanced_sampler(labels, power=0.5)
    none = balanced_sampler(labels, power=0.0)
    sqrt = np.sqrt(SHARES) / np.sqrt(SHARES).sum()  # power 0.5: class c drawn in proportion to sqrt(count[c])
    epochs = [drawn(full, epoch) for epoch in range(3)]
    for rows in epochs:
        assert len(rows) == ROWS and len(full) == ROWS // 16
        assert_shares(labels, rows, [0.25] * 4)
    assert_shares(labels, drawn(half, 0), sqrt)
    assert_shares(labels, drawn(none, 0), SHARES)
    # Drawn with replacement: the rare class's 120 rows come back about 8 times each.
    assert len(set(epochs[0])) < 0.7 * ROWS
    # A new draw every epoch; the same one for the same (seed, epoch), in a fresh sampler too.
    assert epochs[0] != epochs[1] != epochs[2]
    assert drawn(balanced_sampler(labels, power=1.0), 1) == epochs[1]
    assert drawn(balanced_sampler(labels, power=1.0, seed=4), 1) != epochs[1]


def test_balanced_sampler_keeps_length_grouping():
    labels = imbalanced_labels()
    grouped = balanced_sampler(labels, power=1.0)
    plain = balanced_sampler(labels, power=1.0, group_by_length=False)
    lengths = grouped.lengths

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    # The same draw, grouped into batches of similar lengths.
    assert sorted(drawn(grouped, 2)) == sorted(drawn(plain, 2))
    assert padded(list(grouped)) < 0.7 * padded(list(plain))


def test_two_processes_share_out_exactly_the_epoch_draw():
    labels = imbalanced_labels()
    # Each process builds its own sampler (same seed); accelerate gives process k batches k, k+2, ...
    shards = [BatchSamplerShard(balanced_sampler(labels, power=1.0), num_processes=2, process_index=k)
              for k in range(2)]  # fmt: skip
    whole = balanced_sampler(labels, power=1.0)
    for epoch in (0, 1):
        for shard in shards:
            shard.batch_sampler.set_epoch(epoch)
        whole.set_epoch(epoch)
        batches = list(whole)
        parts = [list(shard) for shard in shards]
        assert parts[0] == batches[0::2] and parts[1] == batches[1::2]
    assert len(parts[0]) == len(parts[1]) == len(batches) // 2


def test_resumed_epoch_continues_with_the_same_remaining_batches():
    """train.py's resume path: a new process builds a new sampler, the accelerator prepares the
    loader, the epoch is set, and accelerator.skip_first_batches skips what was trained on."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    labels = imbalanced_labels()

    def epoch_batches(epoch, skip=0):
        sampler = balanced_sampler(labels, power=1.0)
        loader = accelerator.prepare(DataLoader(torch.arange(ROWS), batch_sampler=sampler))
        loader.set_epoch(epoch)
        sampler.set_epoch(epoch)
        return [b.tolist() for b in (accelerator.skip_first_batches(loader, skip) if skip else loader)]

    accelerator = Accelerator(cpu=True)
    try:
        uninterrupted = epoch_batches(2)
        resumed = epoch_batches(2, skip=37)
    finally:
        AcceleratorState._reset_state()
        GradientState._reset_state()
    assert resumed == uninterrupted[37:] and len(resumed) == len(uninterrupted) - 37 == 250 - 37
    # ...and it is the balanced draw that resumed (rows repeat; the 3% class is a quarter of the draws).
    drawn = [i for batch in uninterrupted for i in batch]
    assert len(set(drawn)) < len(drawn)
    assert abs(np.mean(labels[drawn] == 3) - 0.25) < 0.03


def test_data_sampler_balanced_reaches_the_training_loader(tmp_path, caplog):
    from conftest import make_tokenizer
    from finetune.batching import build_dataloaders
    from finetune.data import build_task_data

    rows = [(t, "negative" if i % 10 else "positive") for i, (t, _) in enumerate(sentiment_rows(400, 0))]
    files = {"train": write_tsv(tmp_path / "t.tsv", rows), "validation": write_tsv(tmp_path / "v.tsv", rows[:20])}
    minority = {}
    for sampler in ("random", "balanced"):
        cfg = data_cfg(files, sampler=SamplerType(sampler))
        data = build_task_data(cfg, make_tokenizer(), seed=0)
        with caplog.at_level(logging.INFO, logger="finetune"):
            loader = build_dataloaders(data, make_tokenizer(), batch_size=16, eval_batch_size=16, seed=0, data_cfg=cfg)
        minority[sampler] = sum(int(b["labels"].sum()) for b in loader["train"])  # label 1 = positive, 10%
    assert minority["random"] == 40
    assert abs(minority["balanced"] - 200) < 40  # 4 standard deviations of Binomial(400, 0.5)
    assert ("data.sampler=balanced (power 1), share of rows -> of draws per epoch: negative 90.0% -> 50.0%, "
            "positive 10.0% -> 50.0%") in caplog.messages  # fmt: skip


def test_balanced_sampler_over_windows_balances_documents(tmp_path, caplog):
    """data.long_text=window: classes share the draws by documents, and a long document's windows
    share its weight (with window counts, the 10 long negative documents would take most draws)."""
    from conftest import make_tokenizer
    from finetune.batching import build_dataloaders
    from finetune.config import LongText
    from finetune.data import build_task_data

    long = "the movie was really very bad and the plot was dull and boring this film is terrible and awful"
    rows = [("a good film", "positive")] * 10 + [("a bad film", "negative")] * 10 + [(long, "negative")] * 10
    files = {"train": write_tsv(tmp_path / "t.tsv", rows), "validation": write_tsv(tmp_path / "v.tsv", rows[:4])}
    cfg = data_cfg(files, sampler=SamplerType.balanced, long_text=LongText.window, max_length=8, window_stride=2)
    data = build_task_data(cfg, make_tokenizer(), seed=0)
    assert len(data.train) > 30 + 10 * 2  # the long documents are several windows each
    with caplog.at_level(logging.INFO, logger="finetune"):
        loader = build_dataloaders(data, make_tokenizer(), batch_size=4, eval_batch_size=4, seed=0, data_cfg=cfg)
    per_document = np.bincount(data.train_document_index, weights=loader["train"].batch_sampler.weights)
    assert per_document == pytest.approx([0.5 / 10] * 10 + [0.5 / 20] * 20)  # rows: 10 positive, then 20 negative
    assert ("data.sampler=balanced (power 1), share of documents -> of draws per epoch: negative 66.7% -> 50.0%, "
            "positive 33.3% -> 50.0%") in caplog.messages  # fmt: skip


def test_multi_label_weights_favour_rare_labels_and_regression_is_refused():
    hot = np.array([[1, 0, 0]] * 90 + [[0, 1, 0]] * 9 + [[1, 1, 0]] + [[0, 0, 0]] * 10, dtype=np.float32)
    w = sampling_weights(hot, MULTI_LABEL, 3, 1.0)
    assert w.sum() == pytest.approx(1.0)
    # Label 0 (91 rows) and label 1 (10 rows) each get about the same share of the draws.
    share = w @ (hot > 0.5)
    assert share[1] == pytest.approx(share[0], rel=0.15)
    # Rows without any label count as one more class (10 rows): a share like label 1's.
    assert w[-10:].sum() == pytest.approx(share[1], rel=0.15)
    with pytest.raises(DataError) as err:
        sampling_weights(np.zeros(5), REGRESSION, 1, 1.0)
    assert str(err.value) == ("data.sampler=balanced needs classes to balance, but the labels are numbers "
                              "(regression); use data.sampler=random.")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Sub-samples
# ---------------------------------------------------------------------------------------------
NAMES = ("alpha", "beta", "gamma", "delta")


@pytest.fixture
def sorted_files(tmp_path):
    """A label-sorted train file (1,000 rows: 250 per class, class by class) and a validation file."""
    rows = [(f"the movie {name} was really {i}", name) for name in NAMES for i in range(250)]
    return {
        "train": write_tsv(tmp_path / "train.tsv", rows),
        "validation": write_tsv(tmp_path / "validation.tsv", [(f"a film {n}", n) for n in NAMES for _ in range(5)]),
    }


def data_cfg(files, **kwargs):
    return DataConfig(train_file=files["train"], validation_file=files.get("validation"), text_column="sentence",
                      **kwargs)  # fmt: skip


@pytest.mark.parametrize("how", ["stratified", "random"])
def test_max_train_samples_on_a_label_sorted_file_keeps_every_class(sorted_files, how, caplog):
    cfg = data_cfg(sorted_files, max_train_samples=400, subsample=Subsample(how))
    with caplog.at_level(logging.WARNING, logger="finetune"):
        splits, names, _ = load_and_prepare(cfg, seed=5)
    counts = np.bincount(splits["train"]["labels"], minlength=4)
    assert len(splits["train"]) == 400 and np.all(counts > 0), counts
    if how == "stratified":
        assert counts.tolist() == [100, 100, 100, 100]
    assert not [r for r in caplog.records if "keeps no" in r.message]
    # Seeded by train.seed: the same rows again, other rows under another seed.
    again, _, _ = load_and_prepare(cfg, seed=5)
    other, _, _ = load_and_prepare(cfg, seed=6)
    assert again["train"]["sentence"] == splits["train"]["sentence"] != other["train"]["sentence"]


def test_first_rows_of_a_label_sorted_file_warn_naming_the_missing_classes(sorted_files, caplog):
    cfg = data_cfg(sorted_files, max_train_samples=400, subsample=Subsample.first)
    with caplog.at_level(logging.WARNING, logger="finetune"):
        splits, _, _ = load_and_prepare(cfg, seed=5)
    assert splits["train"]["sentence"][:2] == ["the movie alpha was really 0", "the movie alpha was really 1"]
    assert (
        "data.max_train_samples=400 (data.subsample=first) keeps no train row of class(es) ['delta', 'gamma'], "
        "which the full train split has: the model never learns them. Use data.subsample=stratified (every class "
        "keeps its share) or a larger data.max_train_samples."
    ) in caplog.messages


def test_stratified_subsample_shares_rows_by_class_and_keeps_rare_classes():
    labels = np.repeat(np.arange(4), [2800, 800, 280, 120])
    keep = subsample_indices(labels, 100, Subsample.stratified, seed=0, task=SINGLE_LABEL)
    assert np.bincount(labels[keep]).tolist() == [70, 20, 7, 3]
    assert np.all(np.diff(keep) > 0)  # file order kept, no row twice
    tiny = np.repeat(np.arange(3), [97, 2, 1])
    keep = subsample_indices(tiny, 5, Subsample.stratified, seed=0, task=SINGLE_LABEL)
    assert np.bincount(tiny[keep]).tolist() == [3, 1, 1]  # every class keeps a row while n allows


def test_automatic_validation_split_is_carved_from_the_subsample_and_cv_pools_only_it(sorted_files, caplog):
    cfg = data_cfg({"train": sorted_files["train"]}, max_train_samples=400)
    with caplog.at_level(logging.INFO, logger="finetune"):
        splits, names, task = load_and_prepare(cfg, seed=5)
    assert len(splits["train"]) == 360 and len(splits["validation"]) == 40
    assert np.bincount(splits["validation"]["labels"]).tolist() == [10, 10, 10, 10]
    assert ("Using 360 train / 40 validation / no test rows (train: data.max_train_samples=400, "
            "data.subsample=stratified; the validation rows held out of those 400).") in caplog.messages  # fmt: skip
    chosen = set(splits["train"]["sentence"]) | set(splits["validation"]["sentence"])
    folds = list(kfold_splits(splits, 3, seed=0, task=task))
    for fold in folds:
        assert len(fold["train"]) + len(fold["validation"]) == 400
        assert set(fold["train"]["sentence"]) | set(fold["validation"]["sentence"]) == chosen


# ---------------------------------------------------------------------------------------------
# Label checks: the exact messages
# ---------------------------------------------------------------------------------------------
def test_validation_label_missing_from_train_is_an_error(tmp_path):
    train = write_tsv(tmp_path / "t.tsv", sentiment_rows(10, 0))
    val = write_tsv(tmp_path / "v.tsv", [("the movie", "neutral"), ("a film", "positive")])
    with pytest.raises(DataError) as err:
        load_and_prepare(DataConfig(train_file=train, validation_file=val, text_column="sentence"), seed=0)
    assert str(err.value) == (
        "the validation split has labels ['neutral'] that the train split does not have (train has ['negative', "
        f"'positive']): no model learns a class it never sees. Fix the data (data.validation_file='{val}'), or train "
        "on a split that contains every label."
    )
    # The same check where labels are ids of a fixed name list (Hub ClassLabel columns): one class has no train row.
    with pytest.raises(DataError) as err:
        check_labels({"train": np.array([0, 1, 0, 1]), "test": np.array([2, 0])}, np.array([0, 1, 0, 1]),
                     ["a", "b", "c"], SINGLE_LABEL, DataConfig(dataset="ag_news"), carved=False)  # fmt: skip
    assert str(err.value) == (
        "the test split has labels ['c'] that the train split does not have (train has ['a', 'b']): no model learns "
        "a class it never sees. Fix the data (the test split of ag_news), or train on a split that contains every label."
    )


def test_single_class_training_rows_are_an_error(tmp_path, sorted_files):
    one = write_tsv(tmp_path / "one.tsv", [(t, "positive") for t, _ in sentiment_rows(10, 0)])
    with pytest.raises(DataError) as err:
        load_and_prepare(DataConfig(train_file=one, text_column="sentence"), seed=0)
    assert str(err.value) == (
        f"the train split (data.train_file='{one}') has a single label ['positive'] in data.label_column='label'; "
        "classification needs at least two. Check the label column, or train on data with examples of every class."
    )
    with pytest.raises(DataError) as err:
        load_and_prepare(data_cfg(sorted_files, max_train_samples=200, subsample=Subsample.first), seed=0)
    assert str(err.value) == (
        "the training rows (data.max_train_samples=200, data.subsample=first) hold a single class ['alpha']; "
        "classification needs at least two. Use data.subsample=stratified or a larger data.max_train_samples, or "
        "train on data with examples of every class."
    )


def test_a_class_with_fewer_rows_than_folds_is_an_error(tmp_path):
    rows = sentiment_rows(40, 0) + [("the plot", "neutral")] * 2
    cfg = DataConfig(train_file=write_tsv(tmp_path / "t.tsv", rows), text_column="sentence")
    splits, _, task = load_and_prepare(cfg, seed=0)
    check_folds(splits, 2, task)  # two rows: one per fold
    with pytest.raises(DataError) as err:
        check_folds(splits, 3, task)
    assert str(err.value) == (
        "cv.folds=3 but class(es) 'neutral' (2 rows) have fewer rows than folds in train + validation, so "
        "stratified k-fold cannot put one in every fold: use cv.folds=2 or fewer, add examples of those classes, "
        "or remove them."
    )


def test_rare_classes_and_classes_missing_from_validation_warn(tmp_path, caplog):
    rows = sentiment_rows(40, 0) + [("the plot", "neutral")] * 3
    val = write_tsv(tmp_path / "v.tsv", sentiment_rows(10, 1))
    cfg = DataConfig(train_file=write_tsv(tmp_path / "t.tsv", rows), validation_file=val, text_column="sentence")
    with caplog.at_level(logging.WARNING, logger="finetune"):
        load_and_prepare(cfg, seed=0)
    assert caplog.messages == [
        "Class(es) 'neutral' (3 rows) have fewer than 5 training rows: the model can hardly learn them and their "
        "metrics are noise. Add examples, or merge or drop such classes.",
        "The validation split has no rows of class(es) ['neutral']: validation metrics (and early stopping) do "
        "not measure them.",
    ]


# ---------------------------------------------------------------------------------------------
# What the run records
# ---------------------------------------------------------------------------------------------
def test_metrics_json_and_model_card_state_sampler_and_loss_weighting(tmp_path):
    from finetune.hub import model_card
    from finetune.model import ModelInfo
    from finetune.outputs import write_metrics
    from finetune.train import TrainResult

    conf = FinetuneConfig()
    conf.model.name_or_path, conf.data.train_file, conf.output_dir = "bert-base-uncased", "t.tsv", str(tmp_path)
    conf.data.sampler, conf.data.sampler_power, conf.loss.class_weights = SamplerType.balanced, 0.5, "auto"
    summary = write_metrics(tmp_path, TrainResult(model=None), conf, ModelInfo("BertForSequenceClassification", []))
    saved = json.loads((tmp_path / "metrics.json").read_text())["imbalance"]
    assert saved == summary["imbalance"] == {"sampler": "balanced", "sampler_power": 0.5, "class_weights": "auto",
                                             "pos_weight": None, "subsample": "stratified"}  # fmt: skip
    assert imbalance_settings(FinetuneConfig())["sampler_power"] is None  # random: no power applies
    card = str(model_card(conf, summary, {"id2label": {"0": "neg", "1": "pos"}}, adapter_only=False))
    assert f"| class imbalance | {imbalance_text(conf)} |" in card
    assert imbalance_text(conf) == "sampler balanced (power 0.5); loss.class_weights=auto"


def test_sampler_settings_are_checked_with_the_config():
    from hydra import compose, initialize_config_dir

    from finetune.cli import compose_checked
    from finetune.config import CONF_DIR, ConfigError

    overrides = ["recipe=bert_stsb", "output_dir=/tmp/u", "task=regression", "data.sampler=balanced",
                 "data.sampler_power=1.5"]  # fmt: skip
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with pytest.raises(ConfigError) as err:
        compose_checked(cfg)
    assert err.value.problems == [
        "data.sampler_power=1.5 must be in [0, 1] (1 = fully balanced classes).",
        "data.sampler=balanced needs classes to balance; with task=regression use data.sampler=random.",
    ]
