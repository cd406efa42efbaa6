"""Decisions every process must take together, and best weights that belong to their checkpoint:
a stop signal decided at one step on every process, sharded best weights carried inside each step
checkpoint (never a stale best-state/), a non-finite-weights check over every shard with one host
read, and gradient norms logged per step. Runs call train() in-process on the tiny BERT with
stand-in accelerators (two processes on one, a sharded engine), installed from outside."""

import math
import shutil
import signal

import pytest
import torch
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

import finetune.engine
import finetune.train
from conftest import sentiment_rows, write_tsv
from fault_runner import count_optimizer_steps
from finetune.checkpoint import BEST_STATE, ResumeError, list_checkpoints
from finetune.engine import BestWeights, StepWindow
from finetune.train import NonFiniteLossError, TrainingInterrupted, TrainState
from test_engine import REAL_ACCELERATOR, SYNCS, FSDPNamed, short_run


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Toy data shared by the module (a resumed run must read what its checkpoint was trained on)."""
    root = tmp_path_factory.mktemp("data")
    return {
        "train": write_tsv(root / "train.tsv", sentiment_rows(160, seed=1)),
        "validation": write_tsv(root / "validation.tsv", sentiment_rows(41, seed=2)),
    }


def build_run(tiny_bert, files, out, *extra, sharded=False):
    """train()'s arguments as cli.run builds them (config, model, loaders, metrics, loss)."""
    from hydra import compose, initialize_config_dir

    from finetune.batching import build_dataloaders
    from finetune.cli import compose_checked
    from finetune.config import CONF_DIR
    from finetune.data import build_task_data
    from finetune.losses import build_loss
    from finetune.metrics import MetricSuite
    from finetune.model import build_model, load_tokenizer

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=short_run(tiny_bert, files, out, *extra))
    conf = compose_checked(cfg)
    tok = load_tokenizer(conf.model)
    data = build_task_data(conf.data, tok, seed=42)
    model, _ = build_model(conf.model, conf.adapter, data.id2label, problem_type=data.task, tokenizer=tok)
    loaders = build_dataloaders(data, tok, batch_size=8, eval_batch_size=16, seed=42)
    loss_fn = build_loss(conf.loss, data.task, data.label_counts())
    return conf, FSDPNamed(model) if sharded else model, loaders, MetricSuite(["accuracy"], 2), loss_fn


def two_processes(acc, other_rank):
    """Make ``acc`` rank 0 of two on this one process: its reduce adds what ``other_rank(values)``
    returns for the fake second rank."""
    acc.__class__ = type("TwoProcesses", (REAL_ACCELERATOR,), {
        "num_processes": property(lambda self: 2),
        "reduce": lambda self, tensor, reduction="sum", scale=1.0: tensor + other_rank(tensor.clone()),
    })  # fmt: skip
    return acc


def send_sigterm() -> None:
    """What the kernel does on SIGTERM: call the handler the run installed (never the default one,
    which would end the test process)."""
    handler = signal.getsignal(signal.SIGTERM)
    assert callable(handler), "the run installed no SIGTERM handler"
    handler(signal.SIGTERM, None)


# -- 1. a stop signal: every process stops at the same step -----------------------------------------


@pytest.mark.parametrize(
    "processes, this_rank_at, other_rank_at, stops_at",
    [(1, 5, None, 5), (2, 5, None, 8), (2, None, 6, 8)],
    ids=["alone-stops-at-once", "this-rank-signalled", "other-rank-signalled"],
)
def test_a_stop_signal_stops_every_process_at_the_same_step(tiny_bert, files, tmp_path, monkeypatch, processes,
                                                            this_rank_at, other_rank_at, stops_at):  # fmt: skip
    """Log points every 4 steps. One process stops at the step its signal came; with two, whichever
    rank got the signal, both stop at the next log point (step 8): the flush reduces the flags."""
    steps = count_optimizer_steps(monkeypatch, lambda n: send_sigterm() if n == this_rank_at else None)

    def other_rank(values):
        # The other rank's window is a copy of ours (same losses, tokens, flags)... except its stop
        # request: StepWindow.flush puts that last. A 1-value reduce is all_finite's flag, left alone.
        if values.numel() > 1:
            values[-1] = float(other_rank_at is not None and steps["done"] >= other_rank_at)
        return values

    out = tmp_path / "r"
    conf, model, loaders, suite, loss_fn = build_run(tiny_bert, files, out, "train.max_steps=12", "train.log_every=4",
                                                     "train.eval_every=12")  # fmt: skip
    acc = REAL_ACCELERATOR(cpu=True)
    if processes == 2:
        two_processes(acc, other_rank)
    with pytest.raises(TrainingInterrupted, match=f"SIGTERM.* received: stopped after step {stops_at} and saved"):
        finetune.train.train(conf, model, loaders, suite, acc, loss_fn, out)
    assert steps["done"] == stops_at
    assert [p.name for p in list_checkpoints(out)] == [f"step-{stops_at:07d}"]
    acc.end_training()


# -- 2. sharded best weights travel inside the step checkpoint ----------------------------------------


def scripted_evaluate(monkeypatch, scores):
    """Evaluation ``i`` reports accuracy ``scores[i]`` (0 past the end); returns the weights each saw."""
    real, seen = finetune.train.evaluate, []

    def scripted(model, *args, **kwargs):
        result = real(model, *args, **kwargs)
        result.metrics["accuracy"] = scores[len(seen)] if len(seen) < len(scores) else 0.0
        seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return result

    monkeypatch.setattr(finetune.train, "evaluate", scripted)
    return seen


SHARDED_RUN = ("train.max_steps=6", "train.eval_every=2", "checkpoint.keep_last=3")


def train_sharded(tiny_bert, files, out, monkeypatch, scores, resume_from=None):
    """A run as if under FSDP (BestWeights keeps an accelerate state folder; names renamed)."""
    monkeypatch.setattr(finetune.engine, "SHARDED_ENGINES", (DistributedType.NO,))
    seen = scripted_evaluate(monkeypatch, scores)
    conf, model, loaders, suite, loss_fn = build_run(tiny_bert, files, out, *SHARDED_RUN, sharded=True)
    acc = REAL_ACCELERATOR(cpu=True)
    result = finetune.train.train(conf, model, loaders, suite, acc, loss_fn, out, resume_from=resume_from)
    acc.end_training()
    return result, seen


@pytest.fixture(scope="module")
def sharded_run(tiny_bert, files, tmp_path_factory):
    """(run directory, weights at each evaluation): the best moves at every evaluation (steps 2, 4,
    6), each checkpointed. Tests copy the directory before writing into it."""
    out = tmp_path_factory.mktemp("sharded") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        result, seen = train_sharded(tiny_bert, files, out, monkeypatch, [0.1, 0.2, 0.3])
    assert result.best["step"] == 6 and len(seen) == 3
    return out, seen


def same_weights(model, weights) -> bool:
    return all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


def test_each_step_checkpoint_holds_its_own_sharded_best(sharded_run):
    out, _ = sharded_run
    checkpoints = list_checkpoints(out)
    assert [p.name for p in checkpoints] == ["step-0000002", "step-0000004", "step-0000006"]
    assert all((p / BEST_STATE).is_dir() for p in checkpoints)
    # The latest best is linked, not copied, from the working best-state/.
    working = out / "checkpoints" / BEST_STATE
    files = sorted(f.relative_to(working) for f in working.rglob("*") if f.is_file())
    assert files and all((working / f).samefile(checkpoints[-1] / BEST_STATE / f) for f in files)


def test_resume_restores_the_best_of_its_checkpoint_not_a_newer_one(sharded_run, tiny_bert, files, tmp_path,
                                                                   monkeypatch):  # fmt: skip
    """Resumed from step 4 (best: step 4) while best-state/ holds step 6's best; the evaluation at
    step 6 does not improve, so the run ends with step 4's weights."""
    out = tmp_path / "run"
    shutil.copytree(sharded_run[0], out)
    result, _ = train_sharded(tiny_bert, files, out, monkeypatch, [0.0], resume_from=out / "checkpoints/step-0000004")
    assert result.best["step"] == 4 and result.steps == 6
    assert same_weights(result.model, sharded_run[1][1])


def test_a_fresh_run_never_restores_a_stale_sharded_best(sharded_run, tiny_bert, files, tmp_path, monkeypatch):
    """overwrite=true over the earlier run: no evaluation of the new run scores (NaN), so it keeps no
    best, ends with its last weights and reports no best (instead of the old run's weights)."""
    out = tmp_path / "run"
    shutil.copytree(sharded_run[0], out)
    result, seen = train_sharded(tiny_bert, files, out, monkeypatch, [math.nan] * 3)
    assert result.best is None and result.validation is None
    assert same_weights(result.model, seen[-1])
    assert not (out / "checkpoints" / BEST_STATE).exists()
    assert all(not (p / BEST_STATE).exists() for p in list_checkpoints(out))


def test_a_checkpoint_whose_best_this_engine_cannot_restore_is_refused(tmp_path):
    """A best record without best weights in this engine's form (a sharded run's best-state/ resumed
    on one process, or a checkpoint of an earlier layout) is refused, not silently dropped."""
    best = BestWeights(REAL_ACCELERATOR(cpu=True), tmp_path / BEST_STATE)
    step = tmp_path / "step-0000004"
    with pytest.raises(ResumeError, match=r"records a best evaluation \(step 4\) but holds no best weights this "
                                          r"engine can restore \(best.safetensors\)"):  # fmt: skip
        best.start(step / BEST_STATE, {"step": 4}, step)
    best.start(None, None, None)  # starting afresh: nothing to restore
    assert not best.kept


# -- 3. non-finite weights: one decision over every shard ---------------------------------------------


class Rank0Of2:
    """The accelerator as all_finite sees it, for rank 0 of two: the other rank adds ``other_bad``."""

    num_processes, device = 2, torch.device("cpu")

    def __init__(self, other_bad: float):
        self.other_bad = other_bad

    def reduce(self, tensor, reduction="sum"):
        assert reduction == "sum"
        return tensor + self.other_bad


def check(model, accelerator):
    finetune.train._check_finite_weights(model, accelerator, TrainState(step=7), "out")


def test_non_finite_weights_on_any_process_stop_every_process(monkeypatch):
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(5)])
    check(model, Rank0Of2(other_bad=0.0))  # all finite: no error
    with pytest.raises(NonFiniteLossError, match="weights became non-finite by step 7"):
        check(model, Rank0Of2(other_bad=1.0))  # only the other process's shard is bad
    with torch.no_grad():
        model[3].bias[1] = float("nan")
    with pytest.raises(NonFiniteLossError, match="weights became non-finite by step 7.*Lower train.lr"):
        check(model, Rank0Of2(other_bad=0.0))
    # One host read for all 10 parameters, not one per parameter.
    calls = []
    for name in SYNCS:
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _r=real, _n=name, **k: calls.append(_n) or _r(self, *a, **k))
    with pytest.raises(NonFiniteLossError):
        check(model, Rank0Of2(other_bad=0.0))
    assert len(calls) == 1, calls


def test_the_loop_refuses_to_checkpoint_a_nan_weight(tiny_bert, files, tmp_path):
    """NaN planted from outside in a weight the loss never reads (token type 1), so only the weight
    check can see it."""
    out = tmp_path / "r"
    conf, model, loaders, suite, loss_fn = build_run(tiny_bert, files, out, "train.max_steps=2", "train.log_every=2",
                                                     "checkpoint.every=2")  # fmt: skip
    with torch.no_grad():
        model.bert.embeddings.token_type_embeddings.weight[1, 0] = float("nan")
    acc = REAL_ACCELERATOR(cpu=True)
    with pytest.raises(NonFiniteLossError, match="weights became non-finite by step 2; training stopped without"):
        finetune.train.train(conf, model, loaders, suite, acc, loss_fn, out)
    assert not list_checkpoints(out)
    acc.end_training()


# -- 4. gradient norms logged per step --------------------------------------------------------------


class Recorder:
    num_processes = 1

    def __init__(self):
        self.logged = {}

    def log(self, values, step):
        self.logged[step] = values


def test_grad_norm_is_logged_for_every_step_the_engine_reports_one():
    """DeepSpeed reports no norm on its first step: that step logs none, every later one does (in
    its own log window and in the next ones)."""
    window, acc = StepWindow(torch.device("cpu")), Recorder()
    batch = {"attention_mask": torch.ones(2, 3)}
    norms = {1: None, 2: 0.5, 3: 0.25, 4: 0.125}
    for step, norm in norms.items():
        window.add_batch(torch.tensor(0.7), batch)
        window.end_step(step, 1e-3, None if norm is None else torch.tensor(norm), scaler_in_charge=False)
        if step % 2 == 0:  # a log window of two steps
            stats = window.flush(acc)
            assert stats.norms == [norms[step - 1], norm] and not stats.bad_steps
            finetune.train._log_window(stats, 1.0, TrainState(step=step), acc, tqdm(disable=True), "")
    assert {s: acc.logged[s].get("train/grad_norm") for s in norms} == norms
