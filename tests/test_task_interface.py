"""The task interface (finetune.tasks): the registry, and for each registered task what it decides,
against hand-made logits, labels and datasets."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.config import MULTI_LABEL, REGRESSION, SINGLE_LABEL, TOKEN_CLASSIFICATION, DataConfig, FinetuneError, LongText, LossConfig, LossName, TaskType
from finetune.losses import LossError
from finetune.metrics import bundled_metric_names
from finetune.tasks import Task, TaskError, all_tasks, detect, get_task, model_task, task_for_choice
from finetune.windows import pool_windows

NAMES = {0: "neg", 1: "neu", 2: "pos"}
SEQUENCE_TASKS = [SINGLE_LABEL, MULTI_LABEL, REGRESSION]
TASKS = [TOKEN_CLASSIFICATION, *SEQUENCE_TASKS]  # in the order of detection: word lists claim first


def test_registry_holds_the_four_tasks_under_their_problem_type():
    assert [t.name for t in all_tasks()] == TASKS
    for name in TASKS:
        task = get_task(name)
        assert isinstance(task, Task) and task.name == name
        assert get_task(task) is task  # a task passes through
        assert task_for_choice(task.choice) is task
    assert task_for_choice(TaskType.auto) is None


def test_registry_refuses_an_unknown_problem_type_with_the_known_ones():
    with pytest.raises(TaskError) as err:
        get_task("question_answering")
    message = str(err.value)
    assert "unknown task 'question_answering'" in message
    assert all(name in message for name in TASKS) and "task=" in message
    assert isinstance(err.value, FinetuneError)  # the CLI prints it as one paragraph


def test_single_label_predictions_argmax_and_binary_threshold():
    task = get_task(SINGLE_LABEL)
    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-0.5, 1.5, 0.0]])
    scores = task.scores(logits)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(scores, e / e.sum(axis=1, keepdims=True))
    assert task.predictions(scores).tolist() == [0, 2, 1]
    binary = task.scores(np.array([[0.0, 0.5], [0.0, -0.1], [0.0, 1.0]]))  # P(1) = 0.62, 0.48, 0.73
    assert task.predictions(binary, 0.5).tolist() == [1, 0, 1]
    assert task.predictions(binary, 0.7).tolist() == [0, 0, 1]
    assert task.uses_threshold(2) and not task.uses_threshold(3)
    assert task.label_text(2, NAMES) == "pos"
    assert task.probability_fields(np.array([0.25, 0.5, 0.25]), NAMES) == {
        "prob_neg": "0.250000", "prob_neu": "0.500000", "prob_pos": "0.250000"}
    assert task.predict_record(1, np.array([0.2, 0.7, 0.1]), NAMES, 6) == {
        "prediction": "neu", "prob_neg": 0.2, "prob_neu": 0.7, "prob_pos": 0.1}


def test_multi_label_predictions_are_sigmoids_at_the_threshold():
    task = get_task(MULTI_LABEL)
    logits = np.array([[2.0, -1.0, 0.5], [-3.0, 0.2, -0.2]])
    scores = task.scores(logits)
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-logits)))
    assert task.predictions(scores, 0.5).tolist() == [[1, 0, 1], [0, 1, 0]]
    assert task.predictions(scores, 0.25).tolist() == [[1, 1, 1], [0, 1, 1]]  # sigmoid(-1) = 0.27
    assert task.uses_threshold(3)
    assert task.label_text(np.array([1, 0, 1]), NAMES) == "neg|pos"
    assert task.label_text(np.array([0, 0, 0]), NAMES) == ""
    assert task.agreement(np.array([[1, 0], [1, 1]]), np.array([[1, 0], [1, 0]])).tolist() == [True, False]


def test_regression_predictions_are_the_outputs():
    task = get_task(REGRESSION)
    scores = task.scores(np.array([[0.25], [-1.5], [3.0]]))
    assert scores.tolist() == [0.25, -1.5, 3.0]
    assert task.predictions(scores, 0.9).tolist() == [0.25, -1.5, 3.0]  # no threshold
    assert not task.uses_threshold(1)
    assert task.label_text(1 / 3, {0: "score"}) == "0.333333"
    assert task.probability_fields(scores[:1], {0: "score"}) == {}
    assert task.predict_record(scores[0], scores[0], {0: "score"}, 6) == {"prediction": 0.25}
    # The same decision: within 1% of the reference values' range (here 4.5).
    assert task.agreement(np.array([0.0, 4.5]), np.array([0.04, 4.6])).tolist() == [True, False]


@pytest.mark.parametrize("name", TASKS)
def test_sequence_tasks_keep_one_target_per_text(name):
    labels = [1, 0, 1] if name == MULTI_LABEL else 1
    assert get_task(name).align_labels(labels, [None, 0, 0, 1, None]) == labels


def test_window_pooling_per_task():
    docs = np.array([0, 0, 1])
    two = np.array([[1.0, -1.0], [3.0, 1.0], [0.0, 2.0]])
    pooled, first = pool_windows(two, docs, SINGLE_LABEL, "mean")
    assert pooled.tolist() == [[2.0, 0.0], [0.0, 2.0]] and first.tolist() == [0, 2]
    assert pool_windows(two, docs, SINGLE_LABEL, "max")[0].tolist() == [[3.0, 1.0], [0.0, 2.0]]
    # Multi-label mean: the log-odds of the mean of the window probabilities.
    p = (1 / (1 + np.exp(-two[:2]))).mean(axis=0)
    np.testing.assert_allclose(pool_windows(two, docs, MULTI_LABEL, "mean")[0][0], np.log(p / (1 - p)), rtol=1e-6)
    assert pool_windows(two, docs, MULTI_LABEL, "max")[0].tolist() == [[3.0, 1.0], [0.0, 2.0]]
    # Regression: the mean value, whatever the pool.
    values = np.array([[1.0], [3.0], [5.0]])
    assert pool_windows(values, docs, REGRESSION, "max")[0].tolist() == [[2.0], [5.0]]


def test_losses_the_task_accepts_and_its_default():
    expected = {SINGLE_LABEL: LossName.cross_entropy, MULTI_LABEL: LossName.bce, REGRESSION: LossName.mse}
    for name, default in expected.items():
        task = get_task(name)
        assert task.resolve_loss_name(LossConfig()) == default == task.losses[0]
    with pytest.raises(LossError, match=r"loss=bce does not fit the task \(regression\); valid: mse, mae, huber, log_cosh"):
        get_task(REGRESSION).resolve_loss_name(LossConfig(name=LossName.bce))
    assert get_task(MULTI_LABEL).sigmoid_outputs and not get_task(SINGLE_LABEL).sigmoid_outputs


def test_soft_targets_per_task():
    s, t = torch.tensor([[1.0, -1.0]]), torch.tensor([[2.0, 0.0]])
    assert get_task(REGRESSION).soft_target_loss(s[:, :1], t[:, :1], 2.0).item() == pytest.approx(1.0)
    bce = get_task(MULTI_LABEL).soft_target_loss(s, t, 2.0).item()
    q, x = torch.sigmoid(t / 2), s / 2  # soft targets at T = 2, scaled by T^2
    hand = -(q * torch.log(torch.sigmoid(x)) + (1 - q) * torch.log(1 - torch.sigmoid(x))).mean().item() * 4
    assert bce == pytest.approx(hand, rel=1e-6)
    assert get_task(SINGLE_LABEL).soft_target_loss(t, t, 2.0).item() == pytest.approx(0.0, abs=1e-7)


def test_metrics_each_task_accepts_and_its_defaults():
    known = bundled_metric_names()
    assert get_task(REGRESSION).metric_names(known) == ["mae", "mse", "pearson", "spearman"]
    assert "matthews_correlation" in get_task(SINGLE_LABEL).metric_names(known)
    assert "matthews_correlation" not in get_task(MULTI_LABEL).metric_names(known)
    assert "pearson" not in get_task(MULTI_LABEL).metric_names(known)
    for task in all_tasks():
        assert set(task.default_metrics) <= set(task.metric_names(known))
        assert task.early_stopping_metric in set(task.default_metrics) | {"loss"}
    assert get_task(SINGLE_LABEL).metric_average(2) == "binary" and get_task(SINGLE_LABEL).metric_average(3) == "macro"
    assert get_task(MULTI_LABEL).metric_config("f1", 3, bundled=True) == "multilabel"
    assert get_task(SINGLE_LABEL).metric_config("roc_auc", 3, bundled=True) == "multiclass"


def test_detection_claims_each_kind_of_label_column_once():
    from datasets import Dataset

    cases = {
        SINGLE_LABEL: (Dataset.from_dict({"text": ["a", "b"], "label": ["x", "y"]}), DataConfig()),
        MULTI_LABEL: (Dataset.from_dict({"text": ["a", "b"], "label": [["x"], ["x", "y"]]}), DataConfig()),
        REGRESSION: (Dataset.from_dict({"text": ["a", "b"], "label": [0.5, 1.5]}), DataConfig()),
    }
    cases["columns"] = (Dataset.from_dict({"text": ["a"], "p": [1], "q": [0]}), DataConfig(label_columns=["p", "q"]))
    for name, (train, cfg) in cases.items():
        claimed = [t.name for t in all_tasks() if t.claims(train, cfg)]
        assert claimed == [MULTI_LABEL if name == "columns" else name]
        assert detect(train, cfg).name == claimed[0]


def test_head_and_card_per_task():
    import transformers
    from peft import TaskType as PeftTaskType

    for task in map(get_task, SEQUENCE_TASKS):
        assert task.model_class() is transformers.AutoModelForSequenceClassification
        assert PeftTaskType[task.peft_task_type] == PeftTaskType.SEQ_CLS
        assert task.card_task_type == "text-classification"
    token = get_task(TOKEN_CLASSIFICATION)
    assert token.model_class() is transformers.AutoModelForTokenClassification
    assert PeftTaskType[token.peft_task_type] == PeftTaskType.TOKEN_CLS
    assert token.card_task_type == token.pipeline_tag == "token-classification"
    tags = {t.name: t.card_tag for t in all_tasks()}
    assert tags == {SINGLE_LABEL: "text-classification", MULTI_LABEL: "multi-label-classification",
                    REGRESSION: "text-regression", TOKEN_CLASSIFICATION: "token-classification"}


def test_what_a_task_refuses_before_training():
    windows_mean = DataConfig(long_text=LongText.window)
    assert get_task(SINGLE_LABEL).calibration_problem(windows_mean) is None
    assert "a regression model predicts values" in get_task(REGRESSION).calibration_problem()
    assert "data.window_pool=mean on a multi-label task" in get_task(MULTI_LABEL).calibration_problem(windows_mean)
    assert get_task(MULTI_LABEL).calibration_problem(DataConfig()) is None
    assert not get_task(REGRESSION).balances and get_task(SINGLE_LABEL).balances
    with pytest.raises(FinetuneError, match="labels are numbers"):
        get_task(REGRESSION).row_weights(np.zeros(2), 1, 1.0)


def test_the_task_of_a_saved_model():
    assert model_task(MULTI_LABEL, SINGLE_LABEL, 3).name == MULTI_LABEL  # finetune.json first
    assert model_task(None, MULTI_LABEL, 3).name == MULTI_LABEL
    assert model_task(None, None, 1).name == REGRESSION  # as transformers reads a config without problem_type
    assert model_task(None, None, 2).name == SINGLE_LABEL
    # A config without problem_type (a Hub NER model): its head class decides; a sequence head does not.
    assert model_task(None, None, 5, ["BertForTokenClassification"]).name == TOKEN_CLASSIFICATION
    assert model_task(None, None, 1, ["BertForSequenceClassification"]).name == REGRESSION
    assert model_task(None, None, 2, ["BertForSequenceClassification"]).name == SINGLE_LABEL
    assert model_task(None, SINGLE_LABEL, 5, ["BertForTokenClassification"]).name == SINGLE_LABEL  # problem_type first
    assert get_task(TOKEN_CLASSIFICATION).logit_axes == ("batch", "sequence")  # ONNX dynamic axes of the logits
    assert {get_task(t).logit_axes for t in (SINGLE_LABEL, MULTI_LABEL, REGRESSION)} == {("batch",)}


def test_no_module_outside_tasks_branches_on_the_problem_type():
    package = Path(__file__).resolve().parent.parent / "finetune"
    branch = re.compile(r"(==|!=|\bin\b|\bis\b)\s*\(?\s*(SINGLE_LABEL|MULTI_LABEL|REGRESSION|TaskType\.\w+)\b"
                        r"|\b(SINGLE_LABEL|MULTI_LABEL|REGRESSION)\s*(==|!=)")
    found = [f"{p.name}:{i}: {line.strip()}" for p in sorted(package.glob("*.py"))
             for i, line in enumerate(p.read_text().splitlines(), 1) if branch.search(line)]  # fmt: skip
    assert found == []
