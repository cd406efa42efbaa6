"""Temperature calibration: the fit, the ECE, folding T into the head (plain, PEFT, several
architectures), one calibrated end-to-end run (validation, test, pipeline), the binary
threshold mapped and the multi-label one re-tuned, and the refusals (regression, multi-label windows
pooled by their mean)."""

import copy
import csv
import json
import random

import numpy as np
import pytest
import torch

from conftest import sentiment_rows, write_tsv
from finetune import calibration
from finetune.calibration import expected_calibration_error, fit_temperature, fold_temperature, nll
from finetune.config import MULTI_LABEL, SINGLE_LABEL, ConfigError, DataConfig, LongText, WindowPool

REGRESSION_MESSAGE = (
    "eval.calibrate=temperature with a regression task: temperature scaling calibrates class "
    "probabilities (softmax / sigmoid over logits) and a regression model predicts values, not "
    "probabilities. Set eval.calibrate=none, or use a classification task."
)


def softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def sampled(scale, task=SINGLE_LABEL, n=4000, k=3, seed=0):
    """Logits whose probabilities are exactly right, then multiplied by ``scale``: labels drawn
    from softmax (sigmoid) of the base logits, so the temperature that undoes it is ``scale``."""
    rng = np.random.default_rng(seed)
    base = rng.normal(scale=2.0, size=(n, k))
    if task == MULTI_LABEL:
        labels = (rng.random((n, k)) < 1 / (1 + np.exp(-base))).astype(np.float32)
    else:
        p = softmax(base)
        labels = (p.cumsum(-1) < rng.random((n, 1))).sum(-1)
    return (base * scale).astype(np.float32), labels


@pytest.mark.parametrize("task", [SINGLE_LABEL, MULTI_LABEL])
@pytest.mark.parametrize("scale", [4.0, 0.25])  # over-confident, under-confident
def test_fit_temperature_undoes_a_known_scale_and_lowers_ece_and_nll(task, scale):
    logits, labels = sampled(scale, task)
    t = fit_temperature(logits, labels, task)
    assert t == pytest.approx(scale, rel=0.1)
    assert (t > 1) == (scale > 1)
    ece_before, ece_after = (expected_calibration_error(z, labels, task) for z in (logits, logits / t))
    assert ece_after <= ece_before and ece_after < 0.03, (ece_before, ece_after)
    assert nll(logits / t, labels, task) < nll(logits, labels, task)


def test_ece_matches_a_hand_count():
    # Top-label confidences 0.9 (correct), 0.9 (wrong), 0.7 (correct), 0.55 (wrong), 15 bins:
    # bin of 0.9: accuracy 0.5, confidence 0.9; bin of 0.7: 1 vs 0.7; bin of 0.55: 0 vs 0.55.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.55, 0.45]])
    labels = np.array([0, 1, 1, 1])
    expected = 2 / 4 * 0.4 + 1 / 4 * 0.3 + 1 / 4 * 0.55
    assert expected_calibration_error(np.log(probs), labels, SINGLE_LABEL) == pytest.approx(expected)
    # Multi-label: every (row, label) probability against whether the row has that label.
    p = np.array([[0.9, 0.2]])
    assert expected_calibration_error(np.log(p / (1 - p)), np.array([[1, 1]]), MULTI_LABEL) == pytest.approx(
        1 / 2 * 0.1 + 1 / 2 * 0.8
    )


# ---------------------------------------------------------------------------------------------
# Folding T into the head
# ---------------------------------------------------------------------------------------------
def tiny_classifier(arch, num_labels=3):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=50, num_labels=num_labels, max_position_embeddings=64)
    configs = {
        "bert": tf.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20, **common),
        "roberta": tf.RobertaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=20,
                                    **common),  # fmt: skip
        "distilbert": tf.DistilBertConfig(dim=16, n_layers=1, n_heads=2, hidden_dim=20, **common),
        "deberta-v2": tf.DebertaV2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=20, **common),  # fmt: skip
        "modernbert": tf.ModernBertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=20, pad_token_id=0, **common),  # fmt: skip
    }
    return with_random_biases(tf.AutoModelForSequenceClassification.from_config(configs[arch]).eval())


def with_random_biases(model, trained_only=False):
    """Fresh heads have zero biases: random ones, so that a bias left undivided shows (with an
    adapter only the trained ones, which the adapter saves)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and (p.requires_grad or not trained_only):
                p.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(len(name)))
    return model


def logits_of(model, seed=1):
    ids = torch.randint(5, 30, (4, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert", "deberta-v2", "modernbert"])
def test_fold_temperature_divides_the_logits(arch):
    model = tiny_classifier(arch)
    before = logits_of(model)
    fold_temperature(model, 2.5)
    after = logits_of(model)
    torch.testing.assert_close(after, before / 2.5, rtol=1e-5, atol=1e-6)
    assert torch.equal(after.argmax(-1), before.argmax(-1))


def test_fold_temperature_under_lora_reaches_the_saved_adapter(tiny_bert, tmp_path):
    """The trained head copy (modules_to_save) is folded, not the frozen original: the running
    model and the adapter reloaded with AutoPeftModelForSequenceClassification both give logits / T."""
    from finetune.config import AdapterConfig, AdapterType, ModelConfig
    from finetune.model import build_model, load_saved_model, save_model
    from transformers import AutoTokenizer

    id2label = {0: "a", 1: "b", 2: "c"}
    model, _ = build_model(ModelConfig(name_or_path=tiny_bert), AdapterConfig(type=AdapterType.lora), id2label)
    with_random_biases(model, trained_only=True).eval()
    before = logits_of(model)
    fold_temperature(model, 3.0)
    torch.testing.assert_close(logits_of(model), before / 3.0, rtol=1e-5, atol=1e-6)
    save_model(model, AutoTokenizer.from_pretrained(tiny_bert), tmp_path / "model", id2label)
    reloaded = load_saved_model(tmp_path / "model").eval()
    torch.testing.assert_close(logits_of(reloaded), before / 3.0, rtol=1e-5, atol=1e-6)


def test_an_adapter_on_the_output_layer_is_refused():
    """PEFT's SEQ_CLS task always trains the head in full (modules_to_save); a PEFT model without
    it can put LoRA on the output layer itself, whose delta dividing the base weights would miss."""
    import peft

    model = peft.get_peft_model(tiny_classifier("bert"), peft.LoraConfig(target_modules=["query", "classifier"]))
    with pytest.raises(calibration.CalibrationError, match="'classifier' carries an adapter"):
        fold_temperature(model, 2.0)


# ---------------------------------------------------------------------------------------------
# Multi-label: one T on the sigmoid NLL, then the threshold tuned again
# ---------------------------------------------------------------------------------------------
def bce(z, y):
    return torch.nn.functional.binary_cross_entropy_with_logits(z, y.float())


def test_multi_label_calibration_retunes_the_threshold():
    """Tuned again on the calibrated probabilities even with eval.tune_threshold=false (issue 14);
    with early_stopping.metric=loss, which has no threshold to tune, the exactly mapped one."""
    from finetune.config import FinetuneConfig
    from finetune.fit import calibrate_result
    from finetune.metrics import MetricSuite, tune_threshold
    from finetune.train import EvalOutput, TrainResult

    logits, labels = sampled(4.0, MULTI_LABEL, n=600, seed=3)
    model = tiny_classifier("bert")
    suite = MetricSuite(["f1_micro"], 3, MULTI_LABEL)
    conf = FinetuneConfig()
    conf.eval.threshold, conf.early_stopping.metric = 0.3, "f1_micro"
    assert not conf.eval.tune_threshold

    def result_at(threshold):
        return TrainResult(model=model, best={"step": 7, "f1_micro": 0.0}, threshold=threshold,
                           validation=EvalOutput(metrics={}, logits=logits, labels=labels))  # fmt: skip

    result = result_at(0.3)
    calibrate_result(conf, result, model, suite, bce)
    t = result.calibration["temperature"]
    assert t == pytest.approx(fit_temperature(logits, labels, MULTI_LABEL)) and t > 1
    np.testing.assert_allclose(result.validation.logits, logits / t, rtol=1e-6)
    tuned_after = tune_threshold(suite, logits / t, labels, "f1_micro", True)
    assert tuned_after not in (0.3, pytest.approx(calibration.mapped_threshold(0.3, t)))  # a re-tune shows
    assert result.threshold == tuned_after
    assert (result.calibration["threshold_before"], result.calibration["threshold_after"]) == (0.3, tuned_after)
    assert result.best["f1_micro"] == pytest.approx(suite.compute(logits / t, labels, tuned_after)["f1_micro"])
    assert result.best["loss"] == pytest.approx(result.calibration["nll_after"], rel=1e-5)
    assert result.best["step"] == 7

    conf.early_stopping.metric, conf.early_stopping.mode = "loss", "min"
    result = result_at(0.3)
    calibrate_result(conf, result, model, suite, bce)
    assert result.threshold == pytest.approx(1 / (1 + np.exp(-np.log(0.3 / 0.7) / t)))


# ---------------------------------------------------------------------------------------------
# Binary single-label: the threshold is mapped with T, so every decision stays
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tune", [False, True])
def test_binary_calibration_maps_the_threshold_and_keeps_every_label(tune):
    """P(class 1) >= 0.3 (fixed, or as tuned during training) decides the same rows after
    calibration: the threshold becomes sigmoid(logit(0.3) / T) and is neither kept nor re-tuned."""
    from finetune.config import FinetuneConfig
    from finetune.fit import calibrate_result
    from finetune.metrics import MetricSuite, predictions_from_scores, scores_from_logits
    from finetune.train import EvalOutput, TrainResult

    logits, labels = sampled(4.0, SINGLE_LABEL, n=600, k=2, seed=5)
    model = tiny_classifier("bert", num_labels=2)
    suite = MetricSuite(["accuracy", "f1"], 2, SINGLE_LABEL)
    conf = FinetuneConfig()
    conf.eval.threshold, conf.eval.tune_threshold, conf.early_stopping.metric = 0.3, tune, "f1"
    result = TrainResult(model=model, best={"step": 3}, threshold=0.3,
                         validation=EvalOutput(metrics={}, logits=logits, labels=labels))  # fmt: skip
    calibrate_result(conf, result, model, suite, torch.nn.functional.cross_entropy)
    t = result.calibration["temperature"]
    assert t > 1

    def labels_at(z, threshold):
        return predictions_from_scores(scores_from_logits(z, SINGLE_LABEL), SINGLE_LABEL, threshold).tolist()

    before = labels_at(logits, 0.3)
    assert labels_at(logits / t, 0.3) != before  # rows between the two thresholds: keeping 0.3 would change them
    assert labels_at(result.validation.logits, result.threshold) == before
    assert result.threshold == pytest.approx(float(1 / (1 + np.exp(-np.log(0.3 / 0.7) / t))))
    assert (result.calibration["threshold_before"], result.calibration["threshold_after"]) == (0.3, result.threshold)
    uncalibrated = suite.compute(logits, labels, 0.3)
    assert result.best["accuracy"] == uncalibrated["accuracy"] and result.best["f1"] == uncalibrated["f1"]


# ---------------------------------------------------------------------------------------------
# End to end: a deliberately over-confident model, calibrated, saved and reloaded
# ---------------------------------------------------------------------------------------------
def noisy(rows, fraction, seed):
    """The same rows with ``fraction`` of their labels flipped: a model trained on clean rows is
    sure of every answer and wrong on those, i.e. over-confident on this split."""
    rng = random.Random(seed)
    flip = {"positive": "negative", "negative": "positive"}
    return [(text, flip[label] if rng.random() < fraction else label) for text, label in rows]


THRESHOLD = 0.3  # the calibrated run's eval.threshold: not 0.5, so that T would move decisions


@pytest.fixture(scope="module")
def calibrated_run(tiny_bert, tmp_path_factory):
    """One tiny run with eval.calibrate=temperature, eval.threshold=0.3 and a test split; a spy
    installed from outside keeps a copy of the model just before T is folded in (the uncalibrated
    model) and the T it was given."""
    from test_e2e import run_in_process, tiny_overrides

    tmp = tmp_path_factory.mktemp("calibrated")
    files = {
        "train": write_tsv(tmp / "train.tsv", sentiment_rows(160, seed=1)),
        "validation": write_tsv(tmp / "validation.tsv", noisy(sentiment_rows(60, seed=2), 0.25, seed=3)),
        "test": write_tsv(tmp / "test.tsv", noisy(sentiment_rows(40, seed=4), 0.25, seed=5)),
    }
    spy, real = {}, calibration.fold_temperature

    def fold_spy(model, temperature):
        spy["model"], spy["temperature"] = copy.deepcopy(model).eval(), temperature
        if "_original_forward" in vars(model):  # mixed precision: run the copy as saved, without autocast
            spy["model"].forward = spy["model"]._original_forward
        real(model, temperature)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(calibration, "fold_temperature", fold_spy)
        # Evaluated (and kept) only at the end of 4 epochs at a high rate: sure of every answer by then.
        summary = run_in_process(tiny_overrides(tiny_bert, files, tmp / "run", "eval.calibrate=temperature",
                                                f"data.test_file={files['test']}", f"eval.threshold={THRESHOLD}",
                                                "train.eval_every=80", "logger=none"))  # fmt: skip
    return tmp / "run", summary, spy, files


def uncalibrated(out, spy, files, split):
    """(texts, gold class ids, the uncalibrated model's logits) of a split's rows, in file order."""
    from transformers import AutoTokenizer

    with open(files[split]) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    texts = [r["sentence"] for r in rows]
    tok = AutoTokenizer.from_pretrained(out / "model")
    with torch.no_grad():
        raw = spy["model"](**tok(texts, padding=True, return_tensors="pt")).logits.numpy()
    return texts, np.array([NAMES.index(r["label"]) for r in rows]), raw


NAMES = ["negative", "positive"]


def decided(logits, threshold=THRESHOLD):
    """Binary labels: P(positive) >= threshold."""
    return [NAMES[int(p >= threshold)] for p in softmax(logits)[:, 1]]


def prediction_table(out, split):
    with open(out / "predictions" / f"{split}.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    return [r["prediction"] for r in rows], np.array([[float(r[f"prob_{n}"]) for n in NAMES] for r in rows])


def test_calibrated_run_lowers_ece_and_keeps_every_prediction(calibrated_run):
    out, summary, spy, files = calibrated_run
    block = json.loads((out / "metrics.json").read_text())["calibration"]
    _, gold, raw = uncalibrated(out, spy, files, "validation")
    t = block["temperature"]
    # Fitted on this model's validation logits, and the one folded into its head.
    assert t == pytest.approx(fit_temperature(raw, gold, SINGLE_LABEL), rel=1e-3) and t == spy["temperature"]
    assert t > 1  # the model was over-confident on validation
    assert block["ece_after"] <= block["ece_before"] and block["nll_after"] < block["nll_before"]
    # The block describes the uncalibrated and calibrated logits of this very model.
    assert block["ece_before"] == pytest.approx(expected_calibration_error(raw, gold, SINGLE_LABEL), abs=1e-4)
    assert block["ece_after"] == pytest.approx(expected_calibration_error(raw / t, gold, SINGLE_LABEL), abs=1e-4)
    # The threshold is mapped with T, saved for finetune.predict, and decides every row as before.
    mapped = calibration.mapped_threshold(THRESHOLD, t)
    assert THRESHOLD < mapped < 0.5 and (block["threshold_before"], block["threshold_after"]) == (THRESHOLD, mapped)
    assert summary["threshold"] == mapped == json.loads((out / "model" / "finetune.json").read_text())["threshold"]
    labels, probs = prediction_table(out, "validation")
    assert labels == decided(raw)  # (this sure model has no row between the thresholds: see the binary unit test)
    np.testing.assert_allclose(probs, softmax(raw / t), atol=1e-5)
    assert summary["best"]["loss"] == pytest.approx(block["nll_after"], rel=1e-4)
    at_best = next(e for e in summary["evaluations"] if e["step"] == summary["best"]["step"])
    assert summary["best"]["accuracy"] == at_best["accuracy"]
    assert (out / "plots" / "calibration.png").is_file()


def test_calibrated_run_rescores_the_test_split(calibrated_run):
    """predictions/test.tsv holds the calibrated probabilities; its labels and the test accuracy
    are those of the uncalibrated model at eval.threshold."""
    out, summary, spy, files = calibrated_run
    _, gold, raw = uncalibrated(out, spy, files, "test")
    t = summary["calibration"]["temperature"]
    labels, probs = prediction_table(out, "test")
    np.testing.assert_allclose(probs, softmax(raw / t), atol=1e-5)
    assert np.abs(probs - softmax(raw)).max() > 0.01  # T really changes them
    assert labels == decided(raw)
    expected = np.mean(np.array(decided(raw)) == np.array(NAMES)[gold])
    assert 0.5 < expected < 1 and summary["test"]["accuracy"] == pytest.approx(expected)


def test_pipeline_on_the_saved_model_returns_calibrated_probabilities(calibrated_run):
    from transformers import pipeline

    out, summary, spy, files = calibrated_run
    texts, _, raw = uncalibrated(out, spy, files, "validation")
    clf = pipeline("text-classification", model=str(out / "model"), top_k=None)
    got = np.array([[{d["label"]: d["score"] for d in row}[name] for name in NAMES] for row in clf(texts)])
    t = summary["calibration"]["temperature"]
    np.testing.assert_allclose(got, softmax(raw / t), atol=1e-5)
    assert np.abs(got - softmax(raw)).max() > 0.01  # T really changes them


# ---------------------------------------------------------------------------------------------
# Regression cannot be calibrated
# ---------------------------------------------------------------------------------------------
def test_regression_with_calibration_is_refused_before_training(tiny_bert, tmp_path):
    from test_tasks import base_overrides, score_rows

    (tmp_path / "t.tsv").write_text("text\tscore\n" + "".join(f"{t}\t{s}\n" for t, s in score_rows(20, 1)))
    args = base_overrides(tiny_bert, tmp_path / "t.tsv", tmp_path / "t.tsv", tmp_path / "r", "data.label_column=score",
                          "metrics=[mse]", "early_stopping.metric=mse", "early_stopping.mode=min",
                          "eval.calibrate=temperature")  # fmt: skip
    assert_refused_before_training(args, tmp_path / "r", "regression", REGRESSION_MESSAGE)


def assert_refused_before_training(args, out, task, message):
    """``message`` alone, whether the task is detected from the labels (after loading the data,
    nothing written to ``out``) or declared as task=``task`` (while validating the config)."""
    from finetune.cli import compose_checked
    from test_config import compose_cfg
    from test_e2e import run_in_process

    with pytest.raises(ConfigError) as detected:
        run_in_process(args)
    assert detected.value.problems == [message]
    assert not out.exists()
    with pytest.raises(ConfigError) as declared:
        compose_checked(compose_cfg(*args, f"task={task}"))
    assert declared.value.problems == [message]


# ---------------------------------------------------------------------------------------------
# Multi-label windows pooled by their mean probability cannot be calibrated by folding T
# ---------------------------------------------------------------------------------------------
WINDOW_MESSAGE = (
    "eval.calibrate=temperature with data.long_text=window and data.window_pool=mean on a multi-label task: "
    "a document's logits are then the log-odds of the mean of its windows' sigmoid probabilities, which "
    "folding T into the head (dividing every window's logits by T) does not divide by T, so the temperature "
    "fitted on them and the calibrated metrics would not describe the saved model. Set data.window_pool=max "
    "(the max commutes with T), data.long_text=truncate, or eval.calibrate=none."
)


def test_multi_label_windows_mean_pooled_with_calibration_are_refused_before_training(tiny_bert, tmp_path):
    from finetune.cli import compose_checked
    from finetune.validation import calibration_problem
    from test_config import compose_cfg
    from test_tasks import base_overrides, topic_rows, write_jsonl

    data = write_jsonl(tmp_path / "t.jsonl", topic_rows(20, 1))
    args = base_overrides(tiny_bert, data, data, tmp_path / "r", "data.label_column=labels", "metrics=[f1_micro]",
                          "early_stopping.metric=f1_micro", "data.long_text=window", "data.window_stride=8",
                          "eval.calibrate=temperature")  # fmt: skip
    assert_refused_before_training(args, tmp_path / "r", "multi_label", WINDOW_MESSAGE)
    # Pooling that commutes with T (any max, single-label means) and truncation are calibrated.
    compose_checked(compose_cfg(*args, "task=multi_label", "data.window_pool=max"))
    window = DataConfig(long_text=LongText.window, window_pool=WindowPool.mean)
    assert calibration_problem(SINGLE_LABEL, window) is None
    assert calibration_problem(MULTI_LABEL, DataConfig(long_text=LongText.truncate)) is None
