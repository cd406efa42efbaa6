"""Distillation (distill.teacher) and layer-subset students (model.keep_layers)."""

import csv
import json
import math
import random

import numpy as np
import pytest
import torch

from conftest import sentiment_rows, write_tsv
from test_e2e import run_in_process, tiny_overrides

from finetune.config import MULTI_LABEL, REGRESSION, SINGLE_LABEL, AdapterConfig, ConfigError, ModelConfig
from finetune.distill import DistillError, distillation_loss, soft_target_loss

LABELS = {0: "negative", 1: "positive", 2: "neutral"}


# ---------------------------------------------------------------------------------------------
# The loss, against formulas written out in numpy
# ---------------------------------------------------------------------------------------------
STUDENT = np.array([[1.0, -0.5, 0.2], [0.3, 0.3, 2.0], [-1.2, 0.8, 0.0]])
TEACHER = np.array([[2.5, -1.0, 0.0], [0.0, 1.0, 1.5], [0.4, 0.1, -2.0]])


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_single_label_loss_is_alpha_kl_t2_plus_task_loss():
    T, alpha = 2.0, 0.3
    p_t, p_s = softmax(TEACHER / T), softmax(STUDENT / T)
    kl = np.mean(np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=1)) * T**2  # KL(teacher || student), batch mean
    labels = np.array([0, 2, 1])
    ce = -np.mean(np.log(softmax(STUDENT)[np.arange(3), labels]))
    s, t = torch.tensor(STUDENT), torch.tensor(TEACHER)
    assert soft_target_loss(s, t, SINGLE_LABEL, T).item() == pytest.approx(kl, rel=1e-9)
    task = lambda logits, y: torch.nn.functional.cross_entropy(logits, y)  # noqa: E731
    loss = distillation_loss(task, SINGLE_LABEL, alpha, T)
    assert loss(s, torch.tensor(labels), t).item() == pytest.approx(alpha * kl + (1 - alpha) * ce, rel=1e-9)
    assert loss(s, torch.tensor(labels)).item() == pytest.approx(ce, rel=1e-9)  # evaluation: no teacher


def test_multi_label_and_regression_soft_targets():
    T = 3.0
    q, p = sigmoid(TEACHER / T), sigmoid(STUDENT / T)
    bce = -np.mean(q * np.log(p) + (1 - q) * np.log(1 - p)) * T**2
    s, t = torch.tensor(STUDENT), torch.tensor(TEACHER)
    assert soft_target_loss(s, t, MULTI_LABEL, T).item() == pytest.approx(bce, rel=1e-9)
    mse = np.mean((STUDENT[:, :1] - TEACHER[:, :1]) ** 2)  # regression: one output, no temperature
    assert soft_target_loss(s[:, :1], t[:, :1], REGRESSION, T).item() == pytest.approx(mse, rel=1e-6)  # in float32


# ---------------------------------------------------------------------------------------------
# keep_layers
# ---------------------------------------------------------------------------------------------
def tiny_config(model_type: str):
    from transformers import BertConfig, DebertaV2Config, DistilBertConfig, ModernBertConfig, RobertaConfig

    common = dict(vocab_size=64, max_position_embeddings=64, num_labels=3, id2label=LABELS,
                  label2id={n: i for i, n in LABELS.items()})  # fmt: skip
    if model_type == "distilbert":
        return DistilBertConfig(dim=16, n_layers=5, n_heads=2, hidden_dim=24, pad_token_id=0, **common)
    sizes = dict(hidden_size=16, num_hidden_layers=5, num_attention_heads=2, intermediate_size=24, **common)
    if model_type == "bert":
        return BertConfig(**sizes)
    if model_type == "roberta":
        return RobertaConfig(pad_token_id=1, **sizes)
    if model_type == "deberta-v2":  # relative attention: rel_embeddings, their LayerNorm and conv outside the layers
        return DebertaV2Config(relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8,
                               norm_rel_ebd="layer_norm", conv_kernel_size=3, pad_token_id=0, **sizes)  # fmt: skip
    return ModernBertConfig(pad_token_id=0, bos_token_id=2, eos_token_id=3, cls_token_id=2, sep_token_id=3,
                            global_attn_every_n_layers=2, local_attention=8, **sizes)  # fmt: skip


@pytest.mark.parametrize("model_type", ["bert", "roberta", "distilbert", "deberta-v2", "modernbert"])
def test_keep_layers_copies_the_chosen_layers_exactly(model_type, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from conftest import make_tokenizer
    from finetune.model import build_model, encoder_layers, save_model

    torch.manual_seed(0)
    source = AutoModelForSequenceClassification.from_config(tiny_config(model_type)).eval()
    source.save_pretrained(tmp_path / "source")
    keep = [0, 2, 4]
    student, info = build_model(ModelConfig(name_or_path=str(tmp_path / "source"), keep_layers=keep), AdapterConfig(), LABELS)
    layers_name, layers = encoder_layers(student)
    assert len(layers) == info.num_layers == student.config.num_hidden_layers == 3

    src, got = source.state_dict(), student.state_dict()
    prefix = layers_name + "."
    expected = {}
    for key, value in src.items():
        if key.startswith(prefix):
            index, rest = key[len(prefix) :].split(".", 1)
            if int(index) in keep:
                expected[f"{prefix}{keep.index(int(index))}.{rest}"] = value
        else:  # embeddings, relative-position embeddings, final norms, head
            expected[key] = value
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected), [k for k in expected if not torch.equal(got[k], expected[k])]
    if model_type == "modernbert":  # per-layer attention types follow their layers
        assert student.config.layer_types == [source.config.layer_types[i] for i in keep]

    # Saved, it reloads as a 3-layer model computing the same logits.
    tokenizer = make_tokenizer()
    save_model(student, tokenizer, tmp_path / "student", LABELS)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student").eval()
    assert again.config.num_hidden_layers == 3 and len(encoder_layers(again)[1]) == 3
    ids = torch.tensor([[2, 5, 9, 14, 3]])
    student.eval()
    with torch.no_grad():
        assert torch.allclose(student(input_ids=ids).logits, again(input_ids=ids).logits, atol=1e-6)
    assert AutoTokenizer.from_pretrained(tmp_path / "student") is not None


def test_keep_layers_outside_the_checkpoint_is_refused_before_training(tiny_bert, tmp_path):
    from finetune.model import check_model, load_tokenizer
    from finetune.student import StudentError

    cfg = ModelConfig(name_or_path=tiny_bert, keep_layers=[0, 2])
    with pytest.raises(StudentError, match=r"keep_layers=\[0, 2\]: .* has 2 encoder layers \(0..1\), so \[2\] do not exist"):
        check_model(cfg, AdapterConfig(), load_tokenizer(cfg), 32)


# ---------------------------------------------------------------------------------------------
# Distillation end to end on the tiny BERT
# ---------------------------------------------------------------------------------------------
def shuffled_label_rows(n, seed):
    """Toy sentences whose labels were shuffled: they carry no information about the text."""
    rows = sentiment_rows(n, seed)
    labels = [label for _, label in rows]
    random.Random(seed + 100).shuffle(labels)
    return [(text, label) for (text, _), label in zip(rows, labels)]


@pytest.fixture(scope="module")
def runs(tiny_bert, tmp_path_factory):
    """A teacher trained on the toy rule; students (1 of its 2 layers) trained on the same sentences
    with shuffled labels, with and without the teacher. Teacher forward passes are counted."""
    import finetune.backends

    tmp = tmp_path_factory.mktemp("distill")
    files = {"train": write_tsv(tmp / "train.tsv", sentiment_rows(160, seed=1)),
             "validation": write_tsv(tmp / "validation.tsv", sentiment_rows(41, seed=2))}  # fmt: skip
    run_in_process(tiny_overrides(tiny_bert, files, tmp / "teacher", "logger=none", "plots=false"))
    noisy = {**files, "train": write_tsv(tmp / "shuffled.tsv", shuffled_label_rows(160, seed=1))}
    student = ("model.keep_layers=[1]", "train.epochs=6", "logger=none", "plots=false")
    run_in_process(tiny_overrides(tiny_bert, noisy, tmp / "plain", *student))

    calls = []
    real = finetune.backends.TorchBackend.__call__
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(finetune.backends.TorchBackend, "__call__", lambda self, batch: calls.append(len(batch["input_ids"])) or real(self, batch))
        run_in_process(tiny_overrides(tiny_bert, noisy, tmp / "distilled", *student, f"distill.teacher={tmp / 'teacher'}",
                                      "distill.alpha=1", "distill.temperature=1"))  # fmt: skip
    return {"dir": tmp, "files": files, "teacher_calls": calls}


def predicted_labels(run_dir):
    with open(run_dir / "predictions" / "validation.tsv") as f:
        return [row["prediction"] for row in csv.DictReader(f, delimiter="\t")]


def test_distilled_student_follows_the_teacher(runs):
    teacher = predicted_labels(runs["dir"] / "teacher")
    agree = {name: np.mean([a == b for a, b in zip(teacher, predicted_labels(runs["dir"] / name))])
             for name in ("plain", "distilled")}  # fmt: skip
    # The shuffled labels teach nothing: only the teacher's soft targets carry the rule.
    assert agree["distilled"] >= 0.9 and agree["distilled"] > agree["plain"] + 0.2, agree
    metrics = json.loads((runs["dir"] / "distilled" / "metrics.json").read_text())
    assert metrics["distill"] == {"teacher": str(runs["dir"] / "teacher"), "alpha": 1.0, "temperature": 1.0}
    assert metrics["keep_layers"] == [1]
    config = json.loads((runs["dir"] / "distilled" / "model" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1


def test_teacher_logits_are_computed_once_not_per_epoch(runs):
    batch = json.loads((runs["dir"] / "teacher" / "model" / "finetune.json").read_text())["eval_batch_size"]
    # 6 epochs over 160 training rows; the 41 validation rows get no teacher logits.
    assert len(runs["teacher_calls"]) == math.ceil(160 / batch) and sum(runs["teacher_calls"]) == 160


def test_teacher_with_other_label_names_is_refused_before_anything_is_written(runs, tiny_bert, tmp_path):
    rows = [(t, {"negative": "neg", "positive": "pos"}[label]) for t, label in sentiment_rows(40, seed=3)]
    files = {"train": write_tsv(tmp_path / "t.tsv", rows), "validation": write_tsv(tmp_path / "v.tsv", rows)}
    teacher = runs["dir"] / "teacher"
    with pytest.raises(DistillError) as err:
        run_in_process(tiny_overrides(tiny_bert, files, tmp_path / "run", f"distill.teacher={teacher}"))
    assert str(err.value) == (
        f"distill.teacher='{teacher}' has the labels ['negative', 'positive'] but this run's data has ['neg', 'pos'] "
        "(names and order must match: the teacher's logit i teaches the student's label i). Use a teacher trained "
        "on the same labels, or set data.label_names so that this run's labels match the teacher's."
    )
    assert not (tmp_path / "run").exists()


def test_bad_distill_settings_are_reported_together(tiny_bert, toy_files, tmp_path):
    with pytest.raises(ConfigError) as err:
        run_in_process(tiny_overrides(tiny_bert, toy_files, tmp_path / "run", "distill.alpha=1.5",
                                      "distill.temperature=0", f"distill.teacher={tmp_path / 'none'}",
                                      "model.keep_layers=[2,0]"))  # fmt: skip
    problems = "\n".join(err.value.problems)
    for key in ("distill.alpha=1.5", "distill.temperature=0", "distill.teacher=", "model.keep_layers=[2, 0]"):
        assert key in problems, problems


def test_a_teacher_folder_without_pytorch_weights_is_refused_before_anything_is_written(runs, tiny_bert, tmp_path):
    """The run's ONNX export (model.onnx beside config.json and the tokenizer) cannot teach: the
    teacher's logits are computed with PyTorch."""
    import shutil

    export = tmp_path / "teacher-onnx"
    shutil.copytree(runs["dir"] / "teacher" / "model", export, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    (export / "model.onnx").write_bytes(b"\x08\x07")
    with pytest.raises(DistillError) as err:
        run_in_process(tiny_overrides(tiny_bert, runs["files"], tmp_path / "run", f"distill.teacher={export}"))
    assert str(err.value) == (
        f"distill.teacher='{export}': its model folder {export} holds no PyTorch weights (an ONNX export: it holds "
        "model.onnx), and the teacher's logits are computed with PyTorch. Give the output_dir of the run that "
        "trained the teacher, or its model/ folder (an export serves finetune.predict, not distillation)."
    )
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Distillation with data.long_text=window: the teacher scores each window the student trains on
# ---------------------------------------------------------------------------------------------
def test_each_training_window_gets_the_teachers_logits_of_its_own_text(tmp_path):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
    from transformers import AutoModelForSequenceClassification, BertConfig

    from conftest import NEGATIVE, NEUTRAL, POSITIVE, VOCAB, make_tokenizer
    from finetune.config import DataConfig, LongText
    from finetune.data import LABELS, TEACHER_LOGITS, tokenize_splits
    from finetune.distill import Teacher, add_teacher_logits

    torch.manual_seed(0)
    teacher_dir = tmp_path / "teacher"
    # initializer_range=0.5: logits far apart from window to window
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=64, num_labels=2,
                        initializer_range=0.5)  # fmt: skip
    teacher_model = AutoModelForSequenceClassification.from_config(config).eval()
    teacher_model.save_pretrained(teacher_dir)
    tokenizer = make_tokenizer()  # the student's and, saved with it, the teacher's
    tokenizer.save_pretrained(teacher_dir)
    long = " ".join(NEUTRAL + POSITIVE + NEGATIVE)  # 26 tokens: 5 windows of 10 - 2 special tokens, stride 3
    texts = [long, "good film", " ".join(reversed(long.split()))]
    features = Features({"sentence": Value("string"), LABELS: ClassLabel(names=["negative", "positive"])})
    train = Dataset.from_dict({"sentence": texts, LABELS: [0, 1, 0]}, features=features)
    cfg = DataConfig(text_column="sentence", max_length=10, long_text=LongText.window, window_stride=3)
    teacher = Teacher(ref=str(teacher_dir), model_dir=str(teacher_dir), task=SINGLE_LABEL, max_length=64, batch_size=4)

    windows = tokenize_splits(DatasetDict({"train": add_teacher_logits(train, teacher, cfg, tokenizer)}), tokenizer,
                              cfg)["train"]  # fmt: skip
    assert len(windows) > 6 and windows.features[TEACHER_LOGITS].feature.dtype == "float32"
    for ids, logits in zip(windows["input_ids"], windows[TEACHER_LOGITS]):
        with torch.no_grad():  # the teacher on this window alone (the tiny vocabulary decodes to the text)
            expected = teacher_model(**tokenizer(tokenizer.decode(ids, skip_special_tokens=True), return_tensors="pt"))
        assert np.allclose(logits, expected.logits[0].numpy(), atol=1e-5), tokenizer.decode(ids)
    first_document = [tuple(l) for l, d in zip(windows[TEACHER_LOGITS], windows["document_index"]) if d == 0]
    assert len(first_document) == 5 and len(set(first_document)) == 5  # not the document's first window five times
