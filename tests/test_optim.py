"""Every optimizer and schedule is the one configured: single steps and LR trajectories by hand."""

import math

import pytest
import torch
from torch import nn

from finetune.config import OptimizerConfig, OptimizerType, SchedulerConfig, SchedulerType
from finetune.optim import build_optimizer, build_scheduler, l1_penalty


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(2, 1)
        self.LayerNorm = nn.LayerNorm(1)
        with torch.no_grad():
            self.dense.weight.copy_(torch.tensor([[1.0, -2.0]]))
            self.dense.bias.fill_(0.5)


def one_step(name, grad, lr=0.1, **kw):
    """Apply one optimizer step with a given gradient on dense.weight; return the new weight."""
    model = Tiny()
    opt = build_optimizer(model, OptimizerConfig(name=name, **kw), lr)
    model.dense.weight.grad = torch.tensor([grad])
    opt.step()
    return model.dense.weight.detach()[0].tolist(), opt


@pytest.mark.parametrize(
    "name, cls",
    [("adamw", "AdamW"), ("adam", "Adam"), ("sgd", "SGD"), ("rmsprop", "RMSprop"), ("adafactor", "Adafactor")],
)
def test_each_optimizer_is_the_one_built(name, cls):
    opt = build_optimizer(Tiny(), OptimizerConfig(name=OptimizerType(name)), 1e-3)
    assert type(opt).__name__ == cls
    assert all(g["lr"] == 1e-3 for g in opt.param_groups)
    if name in ("adamw", "adam"):
        assert opt.defaults.get("fused")  # fused kernels by default (CPU and CUDA)
        unfused = build_optimizer(Tiny(), OptimizerConfig(name=OptimizerType(name), fused=False), 1e-3)
        assert not unfused.defaults.get("fused")


def test_adamw_decouples_weight_decay_and_adam_folds_it_into_the_gradient():
    # Zero gradient: AdamW only shrinks the weight by lr*wd; Adam sees the L2 term as a gradient
    # and takes a full normalised step against it.
    w_adamw, _ = one_step(OptimizerType.adamw, [0.0, 0.0], lr=0.1, weight_decay=0.1)
    assert w_adamw == pytest.approx([1.0 * (1 - 0.1 * 0.1), -2.0 * (1 - 0.1 * 0.1)])
    w_adam, _ = one_step(OptimizerType.adam, [0.0, 0.0], lr=0.1, weight_decay=0.1)
    assert w_adam == pytest.approx([1.0 - 0.1, -2.0 + 0.1], rel=1e-5)


def test_sgd_momentum_and_nesterov_by_hand():
    g = [0.5, -1.0]
    w, opt = one_step(OptimizerType.sgd, g, lr=0.1, momentum=0.9, weight_decay=0.0)
    assert w == pytest.approx([1.0 - 0.1 * 0.5, -2.0 + 0.1 * 1.0])
    # Second step with the same gradient: buffer b = 0.9 * g + g.
    model_w = torch.tensor(w)
    opt.param_groups[0]["params"][0].grad = torch.tensor([g])
    opt.step()
    b = [1.9 * x for x in g]
    assert opt.param_groups[0]["params"][0].detach()[0].tolist() == pytest.approx((model_w - 0.1 * torch.tensor(b)).tolist())
    # Nesterov: the first step uses g + momentum * b = g + 0.9 g.
    w, _ = one_step(OptimizerType.sgd, g, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.0)
    assert w == pytest.approx([1.0 - 0.1 * 1.9 * 0.5, -2.0 + 0.1 * 1.9 * 1.0])


def test_rmsprop_by_hand():
    g = [0.5, -1.0]
    w, _ = one_step(OptimizerType.rmsprop, g, lr=0.01, alpha=0.9, weight_decay=0.0)
    expected = [w0 - 0.01 * gi / (math.sqrt(0.1 * gi * gi) + 1e-8) for w0, gi in zip([1.0, -2.0], g)]
    assert w == pytest.approx(expected, rel=1e-6)


def test_l1_penalty_covers_weights_not_biases_or_norms():
    model = Tiny()
    opt = build_optimizer(model, OptimizerConfig(l1=0.01), 1e-3)
    assert l1_penalty(opt).item() == pytest.approx(3.0)  # |1| + |-2|; bias and LayerNorm excluded


TOTAL, WARM = 10, 2


def trajectory(name, **kw):
    model = Tiny()
    opt = build_optimizer(model, OptimizerConfig(), 1.0)
    sched = build_scheduler(opt, SchedulerConfig(name=SchedulerType(name), warmup_steps=WARM, **kw), TOTAL)
    lrs = []
    for _ in range(TOTAL):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def warm(s):
    return s / WARM


EXPECTED = {
    "linear": lambda s: warm(s) if s < WARM else (TOTAL - s) / (TOTAL - WARM),
    "cosine": lambda s: warm(s) if s < WARM else 0.5 * (1 + math.cos(math.pi * (s - WARM) / (TOTAL - WARM))),
    "constant_with_warmup": lambda s: warm(s) if s < WARM else 1.0,
    "step": lambda s: warm(s) if s < WARM else 0.5 ** ((s - WARM) // 3),
    "exponential": lambda s: warm(s) if s < WARM else 0.8 ** (s - WARM),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_schedule_trajectories(name):
    kw = {"step": {"step_size": 3, "gamma": 0.5}, "exponential": {"gamma": 0.8}}.get(name, {})
    assert trajectory(name, **kw) == pytest.approx([EXPECTED[name](s) for s in range(TOTAL)])


def test_constant_schedule_ignores_warmup_only_when_none_is_set():
    model = Tiny()
    opt = build_optimizer(model, OptimizerConfig(), 0.3)
    sched = build_scheduler(opt, SchedulerConfig(name=SchedulerType.constant, warmup_ratio=0.0), TOTAL)
    lrs = []
    for _ in range(TOTAL):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.3] * TOTAL)


def test_cyclic_schedule_is_triangular_between_min_and_peak():
    lrs = trajectory("cyclic", cycle_steps=4, min_lr_ratio=0.1)
    assert lrs == pytest.approx([0.1, 0.55, 1.0, 0.55, 0.1, 0.55, 1.0, 0.55, 0.1, 0.55])


def test_one_cycle_rises_then_anneals():
    lrs = trajectory("one_cycle")
    initial, peak, final = 1.0 / 25, 1.0, 1.0 / 25 / 1e4
    p1 = 0.2 * TOTAL - 1  # warmup 2 of 10 steps

    def anneal(a, b, pct):
        return b + (a - b) / 2 * (1 + math.cos(math.pi * pct))

    expected = [anneal(initial, peak, s / p1) if s <= p1 else anneal(peak, final, (s - p1) / (TOTAL - 1 - p1))
                for s in range(TOTAL)]  # fmt: skip
    assert lrs == pytest.approx(expected, rel=1e-6)


def test_reduce_on_plateau_follows_the_validation_metric():
    model = Tiny()
    opt = build_optimizer(model, OptimizerConfig(), 1.0)
    sched = build_scheduler(opt, SchedulerConfig(name=SchedulerType.reduce_on_plateau, gamma=0.5, patience=2),
                            TOTAL, mode="max")  # fmt: skip
    lrs = []
    for accuracy in [0.5, 0.6, 0.6, 0.6, 0.7, 0.7, 0.65, 0.7]:
        sched.step(accuracy)
        lrs.append(opt.param_groups[0]["lr"])
    # Halved after the 2nd evaluation in a row without improvement.
    assert lrs == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]


def tiny_token_classifier():
    import transformers as tf

    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=20, max_position_embeddings=32, num_labels=5)  # fmt: skip
    return tf.AutoModelForTokenClassification.from_config(config)


def rates(optimizer):
    return {n: g["lr"] for g in optimizer.param_groups for n in g["names"]}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_head_lr_scale_speeds_up_only_the_head(lora):
    from finetune.optim import body_lr

    model = tiny_token_classifier()
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(task_type="TOKEN_CLS", r=2, target_modules=["query"]))
    optimizer = build_optimizer(model, OptimizerConfig(head_lr_scale=20.0), lr=1e-4)
    lr = rates(optimizer)
    head = {n for n in lr if "classifier" in n}
    assert head and all(math.isclose(lr[n], 2e-3) for n in head)
    body = set(lr) - head
    assert body and all(math.isclose(lr[n], 1e-4) for n in body)
    if lora:  # the adapter's weights are the body's, the head is the saved copy of the classifier
        assert any("lora_" in n for n in body) and all("modules_to_save" in n for n in head)
    assert math.isclose(body_lr(optimizer), 1e-4)  # what the log and the progress bar report
    # The default leaves one rate for all.
    assert set(rates(build_optimizer(tiny_token_classifier(), OptimizerConfig(), lr=1e-4)).values()) == {1e-4}


def test_head_lr_scale_on_a_model_without_a_head_is_an_error():
    from finetune.config import ConfigError

    class Bare(nn.Module):  # no base_model_prefix: nothing to tell the head from the body
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 2)

    with pytest.raises(ConfigError, match="optimizer.head_lr_scale=20: no task head was found in Bare"):
        build_optimizer(Bare(), OptimizerConfig(head_lr_scale=20.0), lr=1e-4)
