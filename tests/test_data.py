"""Loading, label encoding, splits, tokenization and length-grouped batching."""

import numpy as np
import pytest

from conftest import VOCAB, make_tokenizer, sentiment_rows, write_tsv
from finetune.config import DataConfig
from finetune.batching import LengthGroupedBatchSampler, build_dataloaders
from finetune.data import DataError, build_task_data, load_and_prepare


def test_string_labels_are_encoded_sorted_and_validation_is_carved_stratified(tmp_path):
    rows = sentiment_rows(200, seed=3, labels=("neg", "pos"))
    cfg = DataConfig(train_file=write_tsv(tmp_path / "t.tsv", rows), text_column="sentence", validation_size=0.2)
    splits, names, _ = load_and_prepare(cfg, seed=7)
    assert names == ["neg", "pos"]
    assert len(splits["validation"]) == 40 and len(splits["train"]) == 160
    # Stratified: both classes in the same proportion as the source (50/50).
    assert sorted(np.bincount(splits["validation"]["labels"])) == [20, 20]
    # Seeded: the same seed gives the same split, another seed another one.
    again, _, _ = load_and_prepare(cfg, seed=7)
    other, _, _ = load_and_prepare(cfg, seed=8)
    assert again["validation"]["sentence"] == splits["validation"]["sentence"]
    assert other["validation"]["sentence"] != splits["validation"]["sentence"]
    # The ids follow the names.
    for text, gold, label in zip(splits["train"]["sentence"], splits["train"]["label"], splits["train"]["labels"]):
        assert names[label] == gold


def test_integer_labels_keep_their_ids_and_take_label_names(tmp_path):
    rows = [(t, str(1 if l == "positive" else 0)) for t, l in sentiment_rows(20, seed=1)]
    cfg = DataConfig(
        train_file=write_tsv(tmp_path / "t.tsv", rows),
        validation_file=write_tsv(tmp_path / "v.tsv", rows[:6]),
        text_column="sentence",
        label_names=["negative", "positive"],
    )
    splits, names, _ = load_and_prepare(cfg, seed=0)
    assert names == ["negative", "positive"]
    assert splits["train"]["labels"] == [int(l) for _, l in rows]


def test_tsv_quotes_and_na_words_are_read_verbatim(tmp_path):
    path = tmp_path / "q.tsv"
    path.write_text('sentence\tlabel\n" wow " , it \'s good\t1\nNA\t0\nnull\t1\n" unbalanced\t0\n')
    cfg = DataConfig(train_file=str(path), validation_file=str(path), text_column="sentence")
    splits, _, _ = load_and_prepare(cfg, seed=0)
    assert splits["train"]["sentence"] == ['" wow " , it \'s good', "NA", "null", '" unbalanced']


def test_headerless_file_with_column_names(tmp_path):
    path = tmp_path / "agnews.tsv"
    path.write_text("Stocks rise\tBusiness\nTeam wins\tSports\nMarkets fall\tBusiness\nGoal scored\tSports\n")
    cfg = DataConfig(
        train_file=str(path), validation_file=str(path), column_names=["text", "label"], text_column="text"
    )
    splits, names, _ = load_and_prepare(cfg, seed=0)
    assert names == ["Business", "Sports"] and len(splits["train"]) == 4


def test_missing_column_is_a_clear_error(tmp_path):
    path = write_tsv(tmp_path / "t.tsv", sentiment_rows(10, 0))
    with pytest.raises(DataError, match=r"data.text_column='text'.*columns are \['sentence', 'label'\]"):
        load_and_prepare(DataConfig(train_file=path, validation_file=path), seed=0)


def test_unknown_validation_label_is_a_clear_error(tmp_path):
    train = write_tsv(tmp_path / "t.tsv", sentiment_rows(10, 0))
    val = write_tsv(tmp_path / "v.tsv", [("the movie", "neutral")])
    with pytest.raises(DataError, match=r"validation split has labels \['neutral'\]"):
        load_and_prepare(DataConfig(train_file=train, validation_file=val, text_column="sentence"), seed=0)


def test_empty_file_and_unknown_extension(tmp_path):
    empty = tmp_path / "e.tsv"
    empty.write_text("sentence\tlabel\n")
    with pytest.raises(DataError, match="empty"):
        load_and_prepare(DataConfig(train_file=str(empty), text_column="sentence"), seed=0)
    odd = tmp_path / "d.xlsx"
    odd.write_text("x")
    with pytest.raises(DataError, match="unknown extension"):
        load_and_prepare(DataConfig(train_file=str(odd)), seed=0)


def test_tokenization_truncates_and_batches_pad_dynamically(toy_files):
    tok = make_tokenizer()
    cfg = DataConfig(
        train_file=toy_files["train"], validation_file=toy_files["validation"], text_column="sentence", max_length=6
    )
    data = build_task_data(cfg, tok, seed=0)
    assert max(data.train_lengths) == 6
    assert data.id2label == {0: "negative", 1: "positive"}
    ids = data.train[0]["input_ids"]
    assert ids[0] == tok.cls_token_id and tok.unk_token_id not in ids
    loaders = build_dataloaders(data, tok, batch_size=8, eval_batch_size=16, seed=0)
    batch = next(iter(loaders["train"]))
    assert set(batch) >= {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max())
    assert sum(len(b["labels"]) for b in loaders["validation"]) == 41


def test_length_grouped_sampler_covers_everything_and_cuts_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=1000).tolist()
    grouped = LengthGroupedBatchSampler(lengths, batch_size=16, seed=1, mega_batch_mult=8)
    plain = LengthGroupedBatchSampler(lengths, batch_size=16, seed=1, group_by_length=False)
    for sampler in (grouped, plain):
        batches = list(sampler)
        assert len(batches) == len(sampler) == 63
        assert sorted(i for b in batches for i in b) == list(range(1000))

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    assert padded(list(grouped)) < 0.7 * padded(list(plain))
    # Deterministic per (seed, epoch); a new epoch reshuffles.
    first = list(grouped)
    assert list(grouped) == first
    grouped.set_epoch(1)
    assert list(grouped) != first
    # Randomness across buckets: the first batch is not always the longest.
    assert max(lengths[i] for i in first[0]) < max(lengths)


def test_dataset_path_loads_like_a_hub_dataset_and_skips_unlabelled_test(tmp_path):
    # data.dataset takes what load_dataset takes: a Hub id, or (here, offline) a folder of files.
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    rows = sentiment_rows(30, seed=5)
    for split, part in (("train", rows[:20]), ("validation", rows[20:])):
        (folder / f"{split}.csv").write_text("sentence,label\n" + "".join(f"{t},{l}\n" for t, l in part))
    cfg = DataConfig(dataset=str(folder), text_column="sentence")
    splits, names, _ = load_and_prepare(cfg, seed=0)
    assert names == ["negative", "positive"]
    assert (len(splits["train"]), len(splits["validation"])) == (20, 10)
    # GLUE-style test splits hold -1 (no label) everywhere: they are dropped, not evaluated.
    int_folder = tmp_path / "ints"
    int_folder.mkdir()
    (int_folder / "train.csv").write_text("sentence,label\n" + "".join(f"{t},{i % 2}\n" for i, (t, _) in enumerate(rows)))
    (int_folder / "test.csv").write_text("sentence,label\nthe movie,-1\na film,-1\n")
    splits, _, _ = load_and_prepare(DataConfig(dataset=str(int_folder), text_column="sentence"), seed=0)
    assert "test" not in splits and "validation" in splits


def test_unknown_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="data.dataset='.*nope'"):
        load_and_prepare(DataConfig(dataset=str(tmp_path / "nope")), seed=0)


def test_sentence_pairs_are_tokenized_together(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("first\tsecond\tlabel\nthe movie\twas great\tyes\nthe plot\twas dull\tno\n")
    tok = make_tokenizer()
    cfg = DataConfig(train_file=str(path), validation_file=str(path), text_column="first", text_pair_column="second")
    data = build_task_data(cfg, tok, seed=0)
    row = data.train[0]
    assert row["input_ids"].count(tok.sep_token_id) == 2
    assert row["token_type_ids"].count(1) == 3  # "was great [SEP]"


def test_augment_words_is_seeded_and_follows_its_probabilities():
    from finetune.config import AugmentConfig
    from finetune.batching import augment_words

    text = " ".join(f"w{i}" for i in range(2000))
    rng = lambda: np.random.default_rng([1, 2, 3])  # noqa: E731
    deleted = augment_words(text, rng(), AugmentConfig(delete=0.3), "[MASK]").split()
    assert 0.65 < len(deleted) / 2000 < 0.75 and set(deleted) <= set(text.split())
    masked = augment_words(text, rng(), AugmentConfig(mask=0.2), "[MASK]").split()
    assert 0.15 < masked.count("[MASK]") / 2000 < 0.25 and len(masked) == 2000
    swapped = augment_words(text, rng(), AugmentConfig(swap=0.1), "[MASK]").split()
    assert sorted(swapped) == sorted(text.split()) and swapped != text.split()
    assert augment_words(text, rng(), AugmentConfig(delete=0.3), "[MASK]") == " ".join(deleted)
    assert augment_words("one", rng(), AugmentConfig(delete=0.9), "[MASK]") == "one"


def test_augmentation_changes_training_batches_every_epoch_only(toy_files):
    tok = make_tokenizer()
    cfg = DataConfig(train_file=toy_files["train"], validation_file=toy_files["validation"], text_column="sentence")
    cfg.augment.delete = 0.3
    data = build_task_data(cfg, tok, seed=0)
    loaders = build_dataloaders(data, tok, batch_size=8, eval_batch_size=16, seed=0, data_cfg=cfg)
    sampler = loaders["train"].batch_sampler

    def first_epoch_batches(epoch):
        sampler.set_epoch(epoch)
        return [b["input_ids"].tolist() for b in loaders["train"]]

    first, again, second = first_epoch_batches(0), first_epoch_batches(0), first_epoch_batches(1)
    assert first == again  # deterministic for (seed, epoch)
    assert first != second
    plain = build_dataloaders(data, tok, batch_size=8, eval_batch_size=16, seed=0)
    sampler.set_epoch(0)
    plain["train"].batch_sampler.set_epoch(0)
    shorter = sum(len([t for t in ids if t != 0]) for b in first for ids in b)
    full = sum(len([t for t in ids if t != 0]) for b in plain["train"] for ids in b["input_ids"].tolist())
    assert shorter < full  # words were deleted
    # Evaluation batches are never augmented.
    val_a = [b["input_ids"].tolist() for b in loaders["validation"]]
    val_b = [b["input_ids"].tolist() for b in plain["validation"]]
    assert val_a == val_b


def test_evaluation_batches_are_length_sorted_and_outputs_come_back_in_dataset_order(tiny_bert, toy_files):
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune.batching import ROW_INDEX
    from finetune.config import LossConfig
    from finetune.losses import build_loss
    from finetune.metrics import MetricSuite
    from finetune.train import evaluate

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    cfg = DataConfig(train_file=toy_files["train"], validation_file=toy_files["validation"], text_column="sentence",
                     max_length=32)  # fmt: skip
    data = build_task_data(cfg, tok, seed=0)
    loaders = build_dataloaders(data, tok, batch_size=8, eval_batch_size=8, seed=0)
    batches = list(loaders["validation"])
    widths = [b["input_ids"].shape[1] for b in batches]
    assert widths == sorted(widths, reverse=True)  # longest first
    rows = torch.cat([b[ROW_INDEX] for b in batches]).tolist()
    assert sorted(rows) == list(range(41))
    lengths = [len(ids) for ids in data.validation["input_ids"]]
    in_order = sum(len(c) * max(c) for c in (lengths[i : i + 8] for i in range(0, 41, 8)))
    assert sum(b["attention_mask"].numel() for b in batches) < in_order

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).eval()
    accelerator = Accelerator(cpu=True)
    out = evaluate(model, loaders["validation"], accelerator, MetricSuite(["accuracy"], 2),
                   build_loss(LossConfig(), data.task, data.label_counts()))  # fmt: skip
    model.eval()  # evaluate() leaves the model in training mode
    with torch.no_grad():
        one_by_one = torch.cat([model(input_ids=torch.tensor([r["input_ids"]])).logits for r in data.validation])
    np.testing.assert_allclose(out.logits, one_by_one.numpy(), atol=1e-5)
    np.testing.assert_array_equal(out.labels, np.asarray(data.validation["labels"]))


MASK_ARCHS = ["bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "modernbert", "deberta-v2",
              "bert-eager"]


def tiny_sdpa_classifier(arch):
    """A tiny random sequence classifier of ``arch`` under SDPA attention (where it has SDPA; an
    ``-eager`` suffix: eager attention)."""
    import torch
    from transformers import AutoModelForSequenceClassification, CamembertConfig, ElectraConfig, XLMRobertaConfig

    from test_transfer import tiny_config

    common = dict(vocab_size=len(VOCAB), max_position_embeddings=66, pad_token_id=0, hidden_size=32,
                  num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)  # fmt: skip
    extra = {"xlm-roberta": XLMRobertaConfig, "camembert": CamembertConfig,
             "electra": lambda **kw: ElectraConfig(embedding_size=16, **kw)}  # fmt: skip
    eager, arch = arch.endswith("-eager"), arch.removesuffix("-eager")
    config = extra[arch](**common) if arch in extra else tiny_config(arch)
    torch.manual_seed(0)
    attention = {} if arch == "deberta-v2" else {"attn_implementation": "eager" if eager else "sdpa"}  # DeBERTa: no SDPA
    return AutoModelForSequenceClassification.from_config(config, **attention).eval()


@pytest.mark.parametrize("arch", MASK_ARCHS)
def test_collated_attention_mask_gives_the_same_logits_and_tokens_without_a_host_read(arch, monkeypatch):
    """Under SDPA, transformers reads a 2D mask back (``padding_mask.all()``) on every forward. The
    collator tells padding from the rows' lengths on the host: no mask for an unpadded batch, a
    ready 4D mask for a padded one (architectures it knows), and the model's logits are those of
    the tokenizer's 2D mask; the loop's token count is unchanged."""
    import types

    import torch
    from transformers import BertTokenizer

    from finetune.batching import MaskForm, make_collator, mask_form
    from finetune.engine import StepWindow

    model = tiny_sdpa_classifier(arch)
    expected = {"modernbert": MaskForm.plain, "deberta-v2": MaskForm.plain, "bert-eager": MaskForm.lean}
    form = expected.get(arch, MaskForm.ready)
    assert mask_form(model) == form
    ready = form == MaskForm.ready
    names = ["input_ids", "attention_mask"] + ([] if arch in ("distilbert", "modernbert") else ["token_type_ids"])
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)}, model_input_names=names)

    def features(texts):
        return [{**tok(t), "labels": i % 2} for i, t in enumerate(texts)]

    padded = features(["the movie was great", "bad", "a very dull and boring plot"])
    unpadded = features(["the movie was great", "the film is bad"])
    plain, collate = make_collator(tok), make_collator(tok, form=mask_form(model))
    cases = [(padded, collate), (unpadded, collate)]
    if ready:  # rows of one length padded to a multiple of 8, or padded before they came, are padded after all
        cases.append((unpadded, make_collator(tok, pad_to_multiple_of=8, form=mask_form(model))))
        cases.append((features(["the movie was great", "bad [PAD] [PAD] [PAD]"]), collate))
        cases[-1][0][1]["attention_mask"] = [1, 1, 1, 0, 0, 0]
    reads = []  # Tensor methods that make the host wait for the device, as tests/test_engine.py counts them
    for name in ("item", "__bool__", "__int__", "__float__", "tolist", "cpu", "numpy"):

        def counted(self, *a, _real=getattr(torch.Tensor, name), _name=name, **k):
            reads.append(_name)
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for rows, collator in cases:
        reference, batch = plain(rows), collator(rows)
        if collator.multiple:
            reference = make_collator(tok, pad_to_multiple_of=8)(rows)
        mask = reference["attention_mask"]
        if form != MaskForm.plain and bool(mask.all()):
            assert "attention_mask" not in batch
        elif ready:
            assert batch["attention_mask"].shape == (mask.shape[0], 1, 1, mask.shape[1])
            assert batch["attention_mask"].dtype == torch.bool
        else:
            assert torch.equal(batch["attention_mask"], mask)
        with torch.no_grad():
            want = model(**{k: v for k, v in reference.items() if k != "labels"}).logits
            del reads[:]
            got = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            forward_reads = list(reads)
        assert torch.equal(got, want)
        if ready:
            assert forward_reads == [], forward_reads
        window = StepWindow(torch.device("cpu"))
        window.add_batch(torch.tensor(0.0), batch)
        window.end_step(1, 0.1, None, False)
        stats = window.flush(types.SimpleNamespace(num_processes=1))
        assert stats.tokens == int(mask.sum())
