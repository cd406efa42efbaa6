"""The GPU-grade engine, tested on the CPU: fp16 with torch's CPU GradScaler (accelerate refuses fp16
on CPUs, so the tests install the scaler themselves), stand-in accelerators for DeepSpeed's and
FSDP's differences, and a count of device-to-host synchronisations in the loop."""

import csv
import json
import traceback
from pathlib import Path

import accelerate
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType
from safetensors.torch import load_file

import finetune.engine
import finetune.losses
import finetune.train
from finetune.config import CONF_DIR, ConfigError
from finetune.train import NonFiniteLossError
from test_e2e import run_in_process, tiny_overrides

REAL_ACCELERATOR = accelerate.Accelerator


def short_run(tiny_bert, toy_files, out, *extra):
    return tiny_overrides(tiny_bert, toy_files, out, "train.max_steps=6", "train.log_every=2", "logger=none",
                          "plots=false", *extra)  # fmt: skip


def patch_accelerator(monkeypatch, setup):
    """Every Accelerator the run builds goes through ``setup(accelerator)`` before use."""

    def build(*args, **kwargs):
        kwargs["mixed_precision"] = "no"
        acc = REAL_ACCELERATOR(*args, **kwargs)
        setup(acc)
        return acc

    monkeypatch.setattr(accelerate, "Accelerator", build)


def fp16_on_cpu(init_scale, backoff_factor=2.0**-8):
    """What accelerate sets up for fp16 on a GPU, on the CPU: fp16 autocast in the forward pass and
    a GradScaler on every backward / clip / step. The large backoff makes overflows short."""

    def setup(acc):
        acc.state._mixed_precision = "fp16"
        acc.native_amp = True
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, backoff_factor=backoff_factor)

    return setup


def plant_nan(monkeypatch, at_call):
    """The training loss of call ``at_call`` (a micro-batch) becomes NaN, from outside the product."""
    real = finetune.losses.build_loss
    calls = {"n": 0}

    def build(*args, **kwargs):
        fn = real(*args, **kwargs)

        def loss(logits, labels):
            value = fn(logits, labels)
            if torch.is_grad_enabled():
                calls["n"] += 1
                if calls["n"] == at_call:
                    return value * float("nan")
            return value

        return loss

    monkeypatch.setattr(finetune.losses, "build_loss", build)


def saved_weights(out):
    return load_file(str(out / "model" / "model.safetensors"))


@pytest.mark.parametrize("policy", ["stop", "skip_step"])
def test_fp16_overflows_are_skipped_by_the_scaler_and_counted(tiny_bert, toy_files, tmp_path, monkeypatch, policy):
    patch_accelerator(monkeypatch, fp16_on_cpu(init_scale=2.0**40))
    out = tmp_path / "fp16"
    summary = run_in_process(short_run(tiny_bert, toy_files, out, f"train.nan_policy={policy}"))
    assert summary["steps"] == 6
    # 2^40 overflows fp16 gradients; the scaler backs off by 2^-8 per overflow: the first steps are skipped.
    assert 1 <= summary["scaler_skipped_steps"] < 6
    assert summary["skipped_steps"] == 0  # overflows are not NaNs
    assert json.loads((out / "metrics.json").read_text())["scaler_skipped_steps"] == summary["scaler_skipped_steps"]
    weights = saved_weights(out)
    assert all(torch.isfinite(w).all() for w in weights.values())
    # The checkpoint records the per-process batch (train.batch_size=auto reuses it on resume).
    checkpoint = next((out / "checkpoints").glob("step-*"))
    assert json.loads((checkpoint / "trainer_state.json").read_text())["batch_size"] == 8
    # The steps after the overflows trained the encoder.
    pretrained = load_file(str(next(Path(tiny_bert).glob("*.safetensors"))))
    key = "embeddings.word_embeddings.weight"
    assert not torch.equal(weights["bert." + key], pretrained[key])


def test_a_real_nan_in_the_loss_still_stops_an_fp16_run(tiny_bert, toy_files, tmp_path, monkeypatch):
    patch_accelerator(monkeypatch, fp16_on_cpu(init_scale=2.0**8))
    plant_nan(monkeypatch, at_call=3)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match="non-finite at step 3"):
        run_in_process(short_run(tiny_bert, toy_files, out, "checkpoint.every=1"))
    # A checkpoint every step: the last is the step before the NaN, none is written for it or later.
    assert [p.name for p in sorted(out.glob("checkpoints/step-*"))][-1] == "step-0000002"
    assert not list(out.glob("checkpoints/step-000000[3-9]")) and not (out / "metrics.json").exists()


def test_a_collapsed_loss_scale_stops_with_a_clear_message(tiny_bert, toy_files, tmp_path, monkeypatch):
    # One overflow and a backoff that takes the scale below 1.
    patch_accelerator(monkeypatch, fp16_on_cpu(init_scale=2.0**40, backoff_factor=2.0**-45))
    with pytest.raises(NonFiniteLossError, match="loss scale fell to 0.03125 .*mixed_precision=bf16"):
        run_in_process(short_run(tiny_bert, toy_files, tmp_path / "r"))


@pytest.mark.parametrize("norm", [None, 0.5], ids=["none", "float"])
def test_loop_takes_a_grad_norm_that_is_none_or_a_float(tiny_bert, toy_files, tmp_path, monkeypatch, norm):
    """DeepSpeed's clip_grad_norm_ returns None (before its first step) or a float."""

    def setup(acc):
        clip = acc.clip_grad_norm_
        acc.clip_grad_norm_ = lambda *a, **k: (clip(*a, **k), norm)[1]

    patch_accelerator(monkeypatch, setup)
    out = tmp_path / "r"
    summary = run_in_process(short_run(tiny_bert, toy_files, out, "logger=csv"))
    assert summary["steps"] == 6 and summary["skipped_steps"] == 0
    with open(out / "logs" / "finetune" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows if r["name"] == "train/loss"] == ["1", "2", "3", "4", "5", "6"]
    logged = [float(r["value"]) for r in rows if r["name"] == "train/grad_norm"]
    assert logged == ([] if norm is None else [pytest.approx(norm)] * 6)


class LooksLike:
    """Turn an accelerator into one that reports another engine, once built."""

    def __init__(self, kind):
        self.kind = kind

    def __call__(self, acc):
        acc.__class__ = type("StandIn", (REAL_ACCELERATOR,), {"distributed_type": property(lambda s: self.kind)})


def test_skip_step_under_deepspeed_is_refused_before_training(tiny_bert, toy_files, tmp_path, monkeypatch):
    patch_accelerator(monkeypatch, LooksLike(DistributedType.DEEPSPEED))
    out = tmp_path / "r"
    with pytest.raises(ConfigError, match="nan_policy=skip_step cannot work under DeepSpeed"):
        run_in_process(short_run(tiny_bert, toy_files, out, "train.nan_policy=skip_step"))
    assert not (out / "metrics.json").exists() and not (out / "checkpoints").exists()


class FSDPNamed(torch.nn.Module):
    """Wraps a model the way FSDP does: every parameter name gains ``_fsdp_wrapped_module.``."""

    def __init__(self, inner):
        super().__init__()
        self._fsdp_wrapped_module = inner

    def forward(self, **batch):
        return self._fsdp_wrapped_module(**batch)


def test_best_weights_are_restored_under_a_sharded_engine(tiny_bert, toy_files, tmp_path, monkeypatch):
    """Under FSDP / DeepSpeed the best weights are an accelerate state folder, restored by the engine;
    the evaluation scores are scripted so that the best is the first of three."""
    from finetune.batching import build_dataloaders
    from finetune.cli import compose_checked
    from finetune.data import build_task_data
    from finetune.losses import build_loss
    from finetune.metrics import MetricSuite
    from finetune.model import build_model, load_tokenizer
    from hydra import compose, initialize_config_dir

    # Run as if sharded: BestWeights takes the engine's save_state / load_state path.
    monkeypatch.setattr(finetune.engine, "SHARDED_ENGINES", (DistributedType.NO,))
    out = tmp_path / "r"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=short_run(tiny_bert, toy_files, out, "train.eval_every=2"))
    conf = compose_checked(cfg)
    tok = load_tokenizer(conf.model)
    data = build_task_data(conf.data, tok, seed=42)
    model, _ = build_model(conf.model, conf.adapter, data.id2label, problem_type=data.task, tokenizer=tok)
    model = FSDPNamed(model)
    loaders = build_dataloaders(data, tok, batch_size=8, eval_batch_size=16, seed=42)
    loss_fn = build_loss(conf.loss, data.task, data.label_counts())

    real_evaluate, seen = finetune.train.evaluate, []

    def scripted(model, *args, **kwargs):
        result = real_evaluate(model, *args, **kwargs)
        seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
        result.metrics["accuracy"] = 0.9 if len(seen) == 1 else 0.1
        return result

    monkeypatch.setattr(finetune.train, "evaluate", scripted)
    accelerator = REAL_ACCELERATOR(cpu=True)
    result = finetune.train.train(conf, model, loaders, MetricSuite(["accuracy"], 2), accelerator, loss_fn, out)
    assert (out / "checkpoints" / "best-state").is_dir()
    assert result.best["step"] == 2 and len(seen) >= 3
    final = dict(result.model.named_parameters())
    assert all(n.startswith("_fsdp_wrapped_module.") for n in final)
    assert all(torch.equal(final[n], seen[0][n]) for n in final)
    assert not all(torch.equal(seen[0][n], seen[2][n]) for n in final)  # later weights differed
    # Independently: the restored model's validation loss, computed here, is the best evaluation's.
    logits, labels = [], []
    with torch.no_grad():
        for batch in loaders["validation"]:
            labels.append(batch.pop("labels"))
            logits.append(result.model.eval()(**batch).logits)
    loss = torch.nn.functional.cross_entropy(torch.cat(logits), torch.cat(labels)).item()
    assert loss == pytest.approx(result.best["loss"], abs=1e-4)
    accelerator.end_training()


SYNCS = ("item", "__bool__", "__int__", "__float__", "tolist", "cpu", "numpy")


def count_syncs(monkeypatch, counting, calls):
    """Record (method, stack) for every Tensor method that makes the host wait for the device
    while ``counting[0]`` is true."""
    for name in SYNCS:
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            if counting[0]:
                calls.append((_name, "".join(traceback.format_stack(limit=4)[:-1])))
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)


def sdpa_models(monkeypatch):
    """Every model loaded runs SDPA attention; returns the count of SDPA calls (a list of one)."""
    from transformers import AutoModelForSequenceClassification

    real_load, real_sdpa, calls = AutoModelForSequenceClassification.from_pretrained, F.scaled_dot_product_attention, [0]

    def sdpa(*a, **k):
        calls[0] += 1
        return real_sdpa(*a, **k)

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained",
                        lambda *a, **k: real_load(*a, **{**k, "attn_implementation": "sdpa"}))  # fmt: skip
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    return calls


def test_at_most_one_host_sync_per_log_window(tiny_bert, toy_files, tmp_path, monkeypatch):
    """Every Tensor method that makes the host wait for the device is counted while the loop runs,
    except inside evaluation and checkpointing (which synchronise anyway). The model runs SDPA
    attention on padded batches, where transformers reads a 2D padding mask back on every forward
    (``masking_utils._ignore_bidirectional_mask_sdpa``): the collator's mask must spare it that."""
    counting, calls = [False], []
    count_syncs(monkeypatch, counting, calls)
    attention_calls = sdpa_models(monkeypatch)

    def paused(fn):
        def run(*a, **k):
            was, counting[0] = counting[0], False
            try:
                return fn(*a, **k)
            finally:
                counting[0] = was

        return run

    def counted_train(*a, **k):
        counting[0] = True
        try:
            return real_train(*a, **k)
        finally:
            counting[0] = False

    real_train = finetune.train.train
    for name in ("evaluate", "save_checkpoint", "_check_finite_weights"):
        monkeypatch.setattr(finetune.train, name, paused(getattr(finetune.train, name)))
    monkeypatch.setattr(finetune.engine.BestWeights, "keep", paused(finetune.engine.BestWeights.keep))
    # Not the loop's: the DataLoader draws its worker seed on the host once per epoch.
    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", paused(torch.utils.data.DataLoader.__iter__))
    monkeypatch.setattr(finetune.train, "train", counted_train)
    summary = run_in_process(short_run(tiny_bert, toy_files, tmp_path / "r", "train.max_steps=12",
                                       "train.log_every=4", "train.eval_every=12"))  # fmt: skip
    assert summary["steps"] == 12 and attention_calls[0] >= 12 * 2  # two layers, every step through SDPA
    # Exactly one per log window (12 steps, log_every=4): the window's tolist().
    assert [name for name, _ in calls] == ["tolist"] * (12 // 4), "\n".join(f"{n} at\n{w}" for n, w in calls)


def test_evaluation_reads_its_outputs_back_once_per_split(tiny_bert, toy_files, monkeypatch):
    """evaluate keeps each batch's gathered outputs on the device and copies them to the host once
    for the split: its host reads do not grow with the number of batches (SDPA, padded batches)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune.batching import build_dataloaders, mask_form
    from finetune.config import DataConfig, LossConfig
    from finetune.data import build_task_data
    from finetune.losses import build_loss
    from finetune.metrics import MetricSuite

    sdpa_models(monkeypatch)
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    cfg = DataConfig(train_file=toy_files["train"], validation_file=toy_files["validation"], text_column="sentence")
    data = build_task_data(cfg, tok, seed=0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    counting, calls, reads, logits = [False], [], {}, {}
    count_syncs(monkeypatch, counting, calls)
    accelerator = REAL_ACCELERATOR(cpu=True)
    for batch_size in (4, 41):  # 11 batches, then 1
        loader = build_dataloaders(data, tok, batch_size=8, eval_batch_size=batch_size, seed=0,
                                   mask=mask_form(model))["validation"]  # fmt: skip
        counting[0], calls[:] = True, []
        out = finetune.train.evaluate(model, loader, accelerator, MetricSuite(["accuracy"], 2),
                                      build_loss(LossConfig(), data.task, data.label_counts()))  # fmt: skip
        counting[0] = False
        reads[batch_size], logits[batch_size] = [name for name, _ in calls], out.logits
    assert reads[4] == reads[41], "\n".join(f"{n} at\n{w}" for n, w in calls)
    np.testing.assert_allclose(logits[4], logits[41], atol=1e-5)


def test_resume_reuses_the_batch_size_its_checkpoint_recorded(tiny_bert, toy_files, tmp_path, monkeypatch):
    """train.batch_size=auto probes once: the resumed run takes the batch its checkpoint recorded
    (probing again could find another batch, and the run would not continue exactly)."""
    real = finetune.engine.try_step

    def oom_above_4(model, batch, labels, loss_fn):
        if batch["input_ids"].shape[0] > 4:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, batch, labels, loss_fn)

    def no_probe(*args):
        raise AssertionError("the resumed run probed the batch size again")

    out = tmp_path / "r"
    args = short_run(tiny_bert, toy_files, out, "train.batch_size=auto", "train.effective_batch_size=8",
                     "checkpoint.every=1")  # fmt: skip
    with monkeypatch.context() as patched:
        patched.setattr(finetune.engine, "try_step", oom_above_4)
        plant_nan(patched, at_call=6)  # the probe's pass, then batches of 4, 2 per step: step 3's first
        with pytest.raises(NonFiniteLossError, match="non-finite at step 3"):
            run_in_process(args)
    assert json.loads((out / "checkpoints" / "step-0000002" / "trainer_state.json").read_text())["batch_size"] == 4
    monkeypatch.setattr(finetune.engine, "try_step", no_probe)
    summary = run_in_process([*args, "resume=auto"])
    assert summary["steps"] == 6
    last = sorted(out.glob("checkpoints/step-*"))[-1]
    assert last.name == "step-0000006" and json.loads((last / "trainer_state.json").read_text())["batch_size"] == 4


def test_a_second_signal_stops_at_once():
    """The first SIGINT / SIGTERM asks for a checkpoint at the end of the step; a second one raises
    KeyboardInterrupt at once, and the handlers found on entry are back."""
    import os
    import signal

    from finetune.engine import StopRequest

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with pytest.raises(KeyboardInterrupt):
            with StopRequest(1) as stop:
                os.kill(os.getpid(), sig)
                assert stop.now and stop.signal == sig.name  # the first: a flag, training goes on
                os.kill(os.getpid(), sig)
                pytest.fail("a second signal did not stop at once")
        assert {s: signal.getsignal(s) for s in before} == before


def test_progress_bar_counts_the_steps_this_run_makes(tiny_bert, toy_files, tmp_path, monkeypatch):
    """160 rows in batches of 8: 20 steps an epoch. train.max_steps=26 makes 20 in the first epoch
    and 6 in the second, and each epoch's bar counts those (not 20 and an ETA for 20)."""
    bars = []
    real = finetune.train.tqdm

    def spy(*args, **kwargs):
        bars.append((kwargs["total"], kwargs["initial"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(finetune.train, "tqdm", spy)
    summary = run_in_process(short_run(tiny_bert, toy_files, tmp_path / "r", "train.max_steps=26", "train.log_every=13"))
    assert summary["steps"] == 26 and bars == [(20, 0), (6, 0)]


def test_predict_device_choice():
    from finetune.backends import BackendError, resolve_device
    from finetune.predict import parse_args

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu", 0)) == torch.device("cpu", 0)  # a run's accelerator.device as it is
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert parse_args(["model=m", "input=i", "device=cpu"])["device"] == "cpu"
    with pytest.raises(BackendError, match="device='tpu' is not one of auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="no CUDA GPU"):
            resolve_device("cuda")
