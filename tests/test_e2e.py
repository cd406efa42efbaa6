"""End to end on a tiny model: `python -m finetune` trains, saves, and the saved model reloads."""

import csv
import json
import logging
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from finetune.cli import run
from finetune.config import CONF_DIR


def tiny_overrides(tiny_bert, toy_files, out_dir, *extra):
    return [
        "recipe=minilm_sst2",
        f"model.name_or_path={tiny_bert}",
        f"data.train_file={toy_files['train']}",
        f"data.validation_file={toy_files['validation']}",
        "data.label_names=null",
        "data.max_length=32",
        "train.epochs=4",
        "train.lr=5e-3",
        "train.batch_size=8",
        "early_stopping.patience=null",
        f"output_dir={out_dir}",
        *extra,
    ]


def sweep_overrides(tiny_bert, toy_files, *extra):
    """One epoch on the tiny model for a multirun: no output_dir (each trial writes to its own
    Hydra job directory) and no train.lr (the sweeps choose it)."""
    args = tiny_overrides(tiny_bert, toy_files, "unused", "train.epochs=1", "logger=none", "plots=false", *extra)
    return [a for a in args if not a.startswith(("output_dir=", "train.lr="))]


def run_in_process(overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    return run(cfg)


def train_toy_run(tiny_bert, tmp, *extra):
    """(run directory, toy files): the tiny BERT trained on 160 toy rows, validated on 41, for
    module fixtures that share one trained run between tests."""
    from conftest import sentiment_rows, write_tsv

    files = {
        "train": write_tsv(tmp / "train.tsv", sentiment_rows(160, seed=1)),
        "validation": write_tsv(tmp / "validation.tsv", sentiment_rows(41, seed=2)),
    }
    run_in_process(tiny_overrides(tiny_bert, files, tmp / "run", "train.epochs=2", *extra))
    return tmp / "run", files


class ModelSpy:
    """Records what the model is fed and computes, installed from outside the product: it wraps
    finetune.model.build_model and hooks the model it returns."""

    def __init__(self, monkeypatch):
        import finetune.model

        self.inputs = []  # (training?, token ids of each example, padding removed)
        self.head_dtypes = []  # (training?, dtype of the classification head's output)
        real = finetune.model.build_model

        def build_model(*args, **kwargs):
            model, info = real(*args, **kwargs)
            model.register_forward_pre_hook(self._record_inputs, with_kwargs=True)
            # The head runs inside whatever autocast accelerate wraps the model's forward in.
            model.get_submodule("classifier").register_forward_hook(self._record_head)
            return model, info

        monkeypatch.setattr(finetune.model, "build_model", build_model)

    def _record_inputs(self, model, args, kwargs):
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        # The collator sends no mask for an unpadded batch and a [batch, 1, 1, sequence] one under SDPA.
        mask = torch.ones_like(ids) if mask is None else mask.reshape(ids.shape)
        for ids, mask in zip(ids.tolist(), mask.tolist()):
            self.inputs.append((model.training, tuple(i for i, m in zip(ids, mask) if m)))

    def _record_head(self, module, args, output):
        self.head_dtypes.append((module.training, output.dtype))


def read_predictions(path):
    with open(path) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    probs = np.array([[float(r["prob_negative"]), float(r["prob_positive"])] for r in rows])
    return rows, probs


def validation_texts(toy_files):
    with open(toy_files["validation"]) as f:
        return [line.split("\t")[0] for line in f.read().splitlines()[1:]]


def test_full_finetune_learns_saves_and_reloads(tiny_bert, toy_files, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    out = tmp_path / "run"
    summary = run_in_process(tiny_overrides(tiny_bert, toy_files, out))

    evals = summary["evaluations"]
    assert len(evals) == 4
    assert evals[-1]["loss"] < 0.5 * evals[0]["loss"], evals
    assert summary["best"]["accuracy"] >= 0.9
    for name in ("config.yaml", "metrics.json", "model/config.json", "model/model.safetensors",
                 "model/tokenizer_config.json", "predictions/validation.tsv"):  # fmt: skip
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text())["best"] == summary["best"]

    # The saved weights reproduce the validation predictions written during training.
    rows, probs = read_predictions(out / "predictions" / "validation.tsv")
    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    tok = AutoTokenizer.from_pretrained(out / "model")
    with torch.no_grad():
        logits = model(**tok(validation_texts(toy_files), padding=True, return_tensors="pt")).logits
    np.testing.assert_allclose(torch.softmax(logits, -1).numpy(), probs, atol=1e-5)
    accuracy = np.mean([r["label"] == r["prediction"] for r in rows])
    assert accuracy == pytest.approx(summary["best"]["accuracy"])

    clf = pipeline("text-classification", model=str(out / "model"))
    assert clf("a really great film")[0]["label"] == "positive"
    assert clf("the plot was awful")[0]["label"] == "negative"


def test_lora_adapter_reloads_with_peft_and_same_logits(tiny_bert, toy_files, tmp_path):
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    out = tmp_path / "run"
    summary = run_in_process(tiny_overrides(tiny_bert, toy_files, out, "adapter=lora", "adapter.lr=1e-2"))
    assert summary["trainable_params"] < summary["total_params"]
    assert (out / "model" / "adapter_config.json").is_file()
    assert json.loads((out / "model" / "finetune.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}

    _, probs = read_predictions(out / "predictions" / "validation.tsv")
    model = AutoPeftModelForSequenceClassification.from_pretrained(str(out / "model")).eval()
    tok = AutoTokenizer.from_pretrained(out / "model")
    with torch.no_grad():
        logits = model(**tok(validation_texts(toy_files), padding=True, return_tensors="pt")).logits
    # Equal probabilities means the trained head came back too (a fresh head would be random).
    np.testing.assert_allclose(torch.softmax(logits, -1).numpy(), probs, atol=1e-5)
    # Learning happened (chance is 0.51); accuracy on real data is the integration test's job.
    assert summary["best"]["accuracy"] >= 0.7


def validation_loss(model_dir, toy_files):
    """Cross-entropy of a saved model on the validation file, computed here from scratch."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    with open(toy_files["validation"]) as f:
        rows = [line.split("\t") for line in f.read().splitlines()[1:]]
    labels = torch.tensor([model.config.label2id[label] for _, label in rows])
    with torch.no_grad():
        logits = model(**tok([text for text, _ in rows], padding=True, truncation=True, max_length=32,
                             return_tensors="pt")).logits  # fmt: skip
    return torch.nn.functional.cross_entropy(logits, labels).item()


def test_early_stopping_keeps_the_best_weights(tiny_bert, toy_files, tmp_path):
    # Evaluated every 10 steps with patience 3: accuracy leaves chance after ~30 steps, reaches its
    # best and cannot improve on it, so training stops three evaluations later, well before the
    # 8 epochs (160 steps), while the loss still falls.
    out = tmp_path / "run"
    summary = run_in_process(tiny_overrides(tiny_bert, toy_files, out, "train.eval_every=10", "early_stopping.patience=3",
                                            "train.epochs=8", "logger=none", "plots=false"))  # fmt: skip
    evals, best = summary["evaluations"], summary["best"]
    assert summary["stopped_early"] and summary["steps"] < 160 and summary["steps"] == evals[-1]["step"]
    chosen = evals[-4]  # three evaluations without improvement followed the best one
    assert chosen["step"] == best["step"] and chosen["accuracy"] == max(e["accuracy"] for e in evals)
    if summary["mixed_precision"] == "no":  # else `best` is the kept weights re-evaluated in fp32
        assert chosen == best
    # The saved model holds the best evaluation's weights, not the last step's.
    assert abs(evals[-1]["loss"] - best["loss"]) > 0.05  # (the two are far enough apart to tell)
    assert validation_loss(out / "model", toy_files) == pytest.approx(best["loss"], abs=1e-4)


def test_cli_subprocess_runs_offline_and_refuses_to_overwrite(tiny_bert, toy_files, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "finetune", *tiny_overrides(tiny_bert, toy_files, out, "train.epochs=1")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Trainable parameters" in proc.stderr + proc.stdout
    # The progress bar shows loss, learning rate and real tokens per second.
    import re

    rates = [int(r) for r in re.findall(r"epoch 1/1: 100%.*?tok_s=(\d+)", proc.stderr)]
    assert rates and rates[-1] > 0, proc.stderr[-2000:]
    before = (out / "metrics.json").read_text()

    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0
    assert "overwrite=true" in again.stderr and "Traceback" not in again.stderr
    assert (out / "metrics.json").read_text() == before


def test_bf16_gradient_accumulation_and_test_split(tiny_bert, toy_files, tmp_path, monkeypatch):
    from conftest import sentiment_rows, write_tsv

    spy = ModelSpy(monkeypatch)
    test_file = write_tsv(tmp_path / "test.tsv", sentiment_rows(23, seed=9))
    out = tmp_path / "run"
    summary = run_in_process(
        tiny_overrides(tiny_bert, toy_files, out, "train.mixed_precision=bf16", "train.gradient_accumulation_steps=2",
                       f"data.test_file={test_file}", "train.epochs=2")  # fmt: skip
    )
    # 160 rows / batch 8 = 20 batches per epoch -> 10 optimizer steps per epoch.
    assert summary["steps"] == 20 and [e["step"] for e in summary["evaluations"]] == [10, 20]
    # Every training forward pass ran under bf16 autocast (the head computed in bfloat16).
    training = [dtype for is_training, dtype in spy.head_dtypes if is_training]
    assert len(training) == 40 and set(training) == {torch.bfloat16}  # 2 epochs x 20 micro-batches
    assert set(summary["test"]) >= {"accuracy", "f1", "loss"}
    rows, _ = read_predictions(out / "predictions" / "test.tsv")
    assert len(rows) == 23


def test_lora_merged_save_loads_in_pipeline_and_adapter_is_kept(tiny_bert, toy_files, tmp_path):
    from transformers import pipeline

    out = tmp_path / "run"
    run_in_process(tiny_overrides(tiny_bert, toy_files, out, "adapter=lora", "adapter.lr=1e-2", "train.epochs=1",
                                  "save.merge_adapter=true"))  # fmt: skip
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert not (out / "model" / "adapter_config.json").exists()
    rows, probs = read_predictions(out / "predictions" / "validation.tsv")
    clf = pipeline("text-classification", model=str(out / "model"), top_k=None)
    texts = validation_texts(toy_files)[:5]
    for text, row, expected in zip(texts, rows, probs):
        scores = {d["label"]: d["score"] for d in clf([text])[0]}
        assert scores["positive"] == pytest.approx(expected[1], abs=1e-5)


def test_gradual_unfreezing_and_layer_decay(tiny_bert, toy_files, tmp_path, monkeypatch, caplog):
    import finetune.train as train_mod
    from safetensors.torch import load_file

    peak_lr = {}  # parameter name -> the learning rate the optimizer gives it (before the schedule)
    real = train_mod.build_optimizer

    def build_optimizer(*args, **kwargs):
        optimizer = real(*args, **kwargs)
        peak_lr.update({name: g["lr"] for g in optimizer.param_groups for name in g["names"]})
        return optimizer

    monkeypatch.setattr(train_mod, "build_optimizer", build_optimizer)
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="finetune"):
        summary = run_in_process(tiny_overrides(tiny_bert, toy_files, out, "model.freeze=base", "model.unfreeze_schedule=1",
                                                "optimizer.layer_decay=0.8", "train.epochs=3", "logger=none", "plots=false",
                                                "early_stopping.metric=loss", "early_stopping.mode=min"))  # fmt: skip
    assert len(summary["evaluations"]) == 3
    # Base frozen at the start: the head alone is counted as trainable.
    assert summary["trainable_params"] == 32 * 2 + 2
    # One encoder layer more each epoch, top-most first; the embeddings would come next.
    unfrozen = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Gradual unfreezing")]
    assert unfrozen == ["Gradual unfreezing (epoch 2): bert.encoder.layer.1 is now trained.",
                        "Gradual unfreezing (epoch 3): bert.encoder.layer.0 is now trained."]  # fmt: skip
    assert summary["best"]["step"] == 60  # the kept weights are the last epoch's, after both unfreezings
    base, trained = load_file(f"{tiny_bert}/model.safetensors"), load_file(str(out / "model" / "model.safetensors"))
    for name, before in base.items():  # the unfrozen layers trained; the embeddings stayed frozen
        if name.startswith(("encoder.layer.", "embeddings.")):
            assert torch.equal(trained[f"bert.{name}"], before) == name.startswith("embeddings."), name
    # Layer-wise decay: the head at train.lr (5e-3), each layer down 0.8 times the one above it.
    depth = {"classifier": 3, "bert.encoder.layer.1": 2, "bert.encoder.layer.0": 1, "bert.embeddings": 0}
    for name, lr in peak_lr.items():
        prefix = next((p for p in depth if name.startswith(p + ".")), None)
        if prefix is not None:
            assert lr == pytest.approx(5e-3 * 0.8 ** (3 - depth[prefix])), name
    assert {p for p in depth if any(n.startswith(p + ".") for n in peak_lr)} == set(depth)


def test_batch_size_auto_keeps_the_effective_batch(tiny_bert, toy_files, tmp_path, monkeypatch):
    import finetune.engine

    real = finetune.engine.try_step

    def oom_above_8(model, batch, labels, loss_fn):
        if batch["input_ids"].shape[0] > 8:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, batch, labels, loss_fn)

    monkeypatch.setattr(finetune.engine, "try_step", oom_above_8)
    summary = run_in_process(tiny_overrides(tiny_bert, toy_files, tmp_path / "run", "train.batch_size=auto",
                                            "train.effective_batch_size=32", "train.epochs=1"))  # fmt: skip
    # 160 rows in batches of 8 = 20 micro-batches; 4 of them per optimizer step = 5 steps.
    assert summary["steps"] == 5


def test_sgd_plateau_focal_l1_run_through_the_loop(tiny_bert, toy_files, tmp_path):
    summary = run_in_process(
        tiny_overrides(tiny_bert, toy_files, tmp_path / "run", "optimizer=sgd", "optimizer.l1=1e-5", "train.lr=0.05",
                       "scheduler=reduce_on_plateau", "loss=focal", "loss.class_weights=auto", "train.eval_every=5")  # fmt: skip
    )
    assert summary["steps"] == 80 and len(summary["evaluations"]) == 16
    assert all(math.isfinite(e["loss"]) for e in summary["evaluations"])


def test_loss_that_does_not_fit_the_task_fails_before_training(tiny_bert, toy_files, tmp_path):
    from finetune.losses import LossError

    with pytest.raises(LossError, match="loss=mse does not fit the task"):
        run_in_process(tiny_overrides(tiny_bert, toy_files, tmp_path / "run", "loss=mse"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_training_with_augmentation(tiny_bert, toy_files, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    spy = ModelSpy(monkeypatch)
    summary = run_in_process(tiny_overrides(tiny_bert, toy_files, tmp_path / "run", "data.augment.swap=0.2",
                                            "data.augment.mask=0.1", "logger=none", "plots=false"))  # fmt: skip
    assert summary["best"]["accuracy"] >= 0.9
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    with open(toy_files["train"]) as f:
        originals = {tuple(tok(line.split("\t")[0])["input_ids"]) for line in f.read().splitlines()[1:]}
    train = [ids for is_training, ids in spy.inputs if is_training]
    evaluation = [ids for is_training, ids in spy.inputs if not is_training]
    assert len(train) == 4 * 160
    # Training saw altered sentences (words swapped or masked), new ones every epoch...
    epochs = [set(train[i * 160 : (i + 1) * 160]) for i in range(4)]
    assert all(len(e - originals) > 40 for e in epochs), [len(e - originals) for e in epochs]
    assert len(set.union(*epochs) - originals) > 2 * len(epochs[0] - originals)
    assert any(tok.mask_token_id in ids for ids in train)
    # ...while evaluation saw the sentences as written.
    assert evaluation and not any(tok.mask_token_id in ids for ids in evaluation)


def test_compile_compiles_the_blocks_and_trains_exactly_like_eager(tiny_bert, toy_files, tmp_path):
    import torch._dynamo
    from safetensors.torch import load_file
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    common = ("train.epochs=1", "logger=none", "plots=false")
    run_in_process(tiny_overrides(tiny_bert, toy_files, tmp_path / "eager", *common))
    assert counters["stats"]["unique_graphs"] == 0
    # The "eager" backend traces with dynamo (what regional compilation does) without inductor's
    # code generation, which takes minutes on a CPU; the same ops then run in the same order.
    run_in_process(tiny_overrides(tiny_bert, toy_files, tmp_path / "compiled", *common, "train.compile=true",
                                  "train.compile_backend=eager"))  # fmt: skip
    torch._dynamo.reset()
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo really compiled the blocks
    eager = load_file(str(tmp_path / "eager" / "model" / "model.safetensors"))
    compiled = load_file(str(tmp_path / "compiled" / "model" / "model.safetensors"))
    assert set(compiled) == set(eager)  # plain parameter names, no _orig_mod
    assert "bert.encoder.layer.0.attention.self.query.weight" in compiled
    for name, tensor in eager.items():
        assert torch.equal(compiled[name], tensor), name


def test_unknown_compile_backend_is_a_config_error(tiny_bert, toy_files, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "finetune", *tiny_overrides(tiny_bert, toy_files, tmp_path / "r",
                           "train.compile=true", "train.compile_backend=inductr")], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode != 0 and "train.compile_backend='inductr'" in proc.stderr and "inductor" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any((tmp_path / "r").glob("*"))  # nothing was written (Hydra may create the empty run dir)
