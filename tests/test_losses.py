"""Every loss against a hand computation on a fixed batch."""

import math

import pytest
import torch

from finetune.config import MULTI_LABEL, REGRESSION, SINGLE_LABEL, LossConfig, LossName
from finetune.losses import LossError, build_loss, inverse_frequency

LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-0.5, 1.5, 0.0], [1.0, 1.0, 3.0]])
LABELS = torch.tensor([0, 2, 1, 0])
COUNTS = [6, 3, 1]  # training examples per class


def softmax_row(row):
    e = [math.exp(v) for v in row]
    return [x / sum(e) for x in e]


def hand_nll(weights=None, smoothing=0.0):
    """Cross-entropy by hand: -sum_k q_k log p_k with q smoothed, class-weighted as torch does."""
    total, norm = 0.0, 0.0
    for row, y in zip(LOGITS.tolist(), LABELS.tolist()):
        logp = [math.log(p) for p in softmax_row(row)]
        k = len(row)
        w = weights or [1.0] * k
        nll = -w[y] * logp[y]
        smooth = -sum(w[j] * logp[j] for j in range(k)) / k
        total += (1 - smoothing) * nll + smoothing * smooth
        norm += w[y]
    return total / norm


def hand_focal(gamma, weights=None):
    """Focal loss by hand: the mean over examples of -alpha_y (1 - p_y)^gamma log p_y."""
    total = 0.0
    for row, y in zip(LOGITS.tolist(), LABELS.tolist()):
        p = softmax_row(row)[y]
        total += -(weights[y] if weights else 1.0) * (1 - p) ** gamma * math.log(p)
    return total / len(LABELS)


def hand_bce(logits, targets, pos_weight):
    """Binary cross-entropy by hand, positives weighted by ``pos_weight``, mean over every entry."""
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    total, n = 0.0, 0
    for row, t in zip(logits.tolist(), targets.tolist()):
        for j, (x, y) in enumerate(zip(row, t)):
            total += -(pos_weight[j] * y * math.log(sig(x)) + (1 - y) * math.log(1 - sig(x)))
            n += 1
    return total / n


def test_cross_entropy_plain_smoothed_and_weighted():
    loss = build_loss(LossConfig(), SINGLE_LABEL, COUNTS)
    assert loss(LOGITS, LABELS).item() == pytest.approx(hand_nll(), rel=1e-6)
    smoothed = build_loss(LossConfig(label_smoothing=0.1), SINGLE_LABEL, COUNTS)
    assert smoothed(LOGITS, LABELS).item() == pytest.approx(hand_nll(smoothing=0.1), rel=1e-6)
    auto = build_loss(LossConfig(class_weights="auto"), SINGLE_LABEL, COUNTS)
    weights = [10 / (3 * 6), 10 / (3 * 3), 10 / (3 * 1)]
    assert inverse_frequency(COUNTS) == pytest.approx(weights)
    assert auto(LOGITS, LABELS).item() == pytest.approx(hand_nll(weights), rel=1e-6)
    given = build_loss(LossConfig(class_weights=[1.0, 2.0, 0.5]), SINGLE_LABEL, COUNTS)
    assert given(LOGITS, LABELS).item() == pytest.approx(hand_nll([1.0, 2.0, 0.5]), rel=1e-6)


def test_focal_loss():
    gamma = 2.0
    loss = build_loss(LossConfig(name=LossName.focal, gamma=gamma), SINGLE_LABEL, COUNTS)
    assert loss(LOGITS, LABELS).item() == pytest.approx(hand_focal(gamma), rel=1e-6)
    # gamma = 0 is plain cross-entropy.
    ce_like = build_loss(LossConfig(name=LossName.focal, gamma=0.0), SINGLE_LABEL, COUNTS)
    assert ce_like(LOGITS, LABELS).item() == pytest.approx(hand_nll(), rel=1e-6)


def test_bce_with_pos_weight():
    logits = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    targets = torch.tensor([[1, 0], [0, 1]])

    def hand(pw):
        return hand_bce(logits, targets, pw)

    plain = build_loss(LossConfig(name=LossName.bce), MULTI_LABEL, [1, 1], num_examples=2)
    assert plain(logits, targets).item() == pytest.approx(hand([1, 1]), rel=1e-6)
    # auto: negatives / positives per label, from the training counts (10 examples: 2 and 5 positives).
    auto = build_loss(LossConfig(name=LossName.bce, pos_weight="auto"), MULTI_LABEL, [2, 5], num_examples=10)
    assert auto(logits, targets).item() == pytest.approx(hand([4.0, 1.0]), rel=1e-6)


@pytest.mark.parametrize(
    "name, fn",
    [
        (LossName.mse, lambda d: d * d),
        (LossName.mae, abs),
        (LossName.huber, lambda d: 0.5 * d * d if abs(d) <= 1.0 else abs(d) - 0.5),
        (LossName.log_cosh, lambda d: math.log(math.cosh(d))),
    ],
)
def test_regression_losses(name, fn):
    pred = torch.tensor([[0.5], [2.0], [-1.0], [3.5]])
    gold = torch.tensor([0.0, 2.5, 1.0, 0.0])
    expected = sum(fn(p - g) for p, g in zip(pred.squeeze(-1).tolist(), gold.tolist())) / 4
    loss = build_loss(LossConfig(name=name), REGRESSION, [])
    assert loss(pred, gold).item() == pytest.approx(expected, rel=1e-6)


def test_log_cosh_does_not_overflow():
    loss = build_loss(LossConfig(name=LossName.log_cosh), REGRESSION, [])
    value = loss(torch.tensor([[1000.0]]), torch.tensor([0.0])).item()
    assert value == pytest.approx(1000 - math.log(2), rel=1e-6)


def test_auto_picks_the_task_default_and_a_misfit_is_an_error():
    auto = build_loss(LossConfig(), SINGLE_LABEL, COUNTS)
    assert auto(LOGITS, LABELS).item() == pytest.approx(hand_nll(), rel=1e-6)
    with pytest.raises(LossError, match="loss=mse does not fit the task .single_label_classification.; valid: cross_entropy, focal"):
        build_loss(LossConfig(name=LossName.mse), SINGLE_LABEL, COUNTS)
    with pytest.raises(LossError, match="class_weights has 2 values but the task has 3 labels"):
        build_loss(LossConfig(class_weights=[1.0, 2.0]), SINGLE_LABEL, COUNTS)


MULTI_TARGETS = torch.tensor([[1.0, 0.0, 1.0]] * 4)


@pytest.mark.parametrize(
    "cfg, task, labels, expected",
    [
        (LossConfig(class_weights="auto"), SINGLE_LABEL, LABELS, lambda: hand_nll(inverse_frequency(COUNTS))),
        (LossConfig(name=LossName.focal, class_weights="auto"), SINGLE_LABEL, LABELS,
         lambda: hand_focal(2.0, inverse_frequency(COUNTS))),
        # auto pos_weight: negatives / positives of 10 examples per label.
        (LossConfig(name=LossName.bce, pos_weight="auto"), MULTI_LABEL, MULTI_TARGETS,
         lambda: hand_bce(LOGITS, MULTI_TARGETS, [4 / 6, 7 / 3, 9 / 1])),
    ],
    ids=["cross_entropy", "focal", "bce"],
)  # fmt: skip
def test_loss_constants_move_to_the_training_device_once(cfg, task, labels, expected, monkeypatch):
    """Class weights / pos_weight are copied to a device on first use, not on every call (a
    host-to-device copy per step on a GPU). The 'meta' device stands in for the GPU."""
    loss_fn = build_loss(cfg, task, COUNTS, num_examples=10)
    copies = []
    real_to = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if out.device.type == "meta" and self.device.type == "cpu":
            copies.append(tuple(self.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    logits, target = LOGITS.to("meta"), labels.to("meta")
    copies.clear()
    for _ in range(3):
        loss_fn(logits, target)
    assert copies == [(3,)]  # the weights, once
    # And the CPU path (gathered evaluation logits) still gives the weighted loss.
    assert loss_fn(LOGITS, labels).item() == pytest.approx(expected(), rel=1e-6)
