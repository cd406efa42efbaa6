"""Token classification on the paths issue 21 lists besides plain training (tests/test_token_task.py):
the early-stopping metric the task chooses and what config.yaml records, k-fold CV grouped by
document (cv.group_column), loss.class_weights=auto over tags, freezing with gradual unfreezing
and exact resume, a sweep whose best trial is pushed with a token-classification card, and a
2-process run over windows. All on the tiny NER world of tests/ner_toy.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from ner_toy import make_ner_checkpoint, ner_rows, write_jsonl
from test_e2e import run_in_process
from test_token_task import ner_overrides, table

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
RUNNER = Path(__file__).with_name("fault_runner.py")


def with_docs(rows, per_doc=4):
    """Rows with a doc_id: consecutive sentences of one document."""
    return [{**r, "doc_id": f"doc{i // per_doc}"} for i, r in enumerate(rows)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(checkpoint, files, tmp): the tiny NER checkpoint and train / validation files with doc_id."""
    tmp = tmp_path_factory.mktemp("ner_paths")
    files = {"train": write_jsonl(tmp / "train.jsonl", with_docs(ner_rows(120, 1))),
             "validation": write_jsonl(tmp / "validation.jsonl", with_docs(ner_rows(30, 2)))}  # fmt: skip
    return make_ner_checkpoint(tmp / "bert"), files, tmp


def one_thread(fn):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


# --- the early-stopping metric ---------------------------------------------------------------
@pytest.mark.parametrize("task, extra, expected", [
    ("single_label_classification", [], ("accuracy", "max")),
    ("multi_label_classification", ["metrics=[f1_micro,accuracy]"], ("f1_micro", "max")),
    ("regression", ["metrics=[pearson,mse]"], ("mse", "min")),
    ("token_classification", [], ("f1", "max")),
    ("token_classification", ["early_stopping.metric=accuracy"], ("accuracy", "max")),  # named: kept
])  # fmt: skip
def test_early_stopping_metric_null_is_the_tasks_default_and_a_named_one_is_kept(task, extra, expected):
    from test_config import compose_cfg

    from finetune.cli import compose_checked
    from finetune.validation import check_task

    conf = compose_checked(compose_cfg("recipe=bert_sst2", "early_stopping=auto", "output_dir=/tmp/u", *extra))
    assert conf.early_stopping.metric == (None if not extra or "metrics" in extra[0] else "accuracy")
    check_task(conf, task)
    assert (conf.early_stopping.metric, conf.early_stopping.mode.value) == expected


def test_a_task_default_that_the_metrics_do_not_compute_is_refused():
    from test_config import compose_cfg

    from finetune.cli import compose_checked
    from finetune.config import ConfigError
    from finetune.validation import check_task

    conf = compose_checked(compose_cfg("recipe=bert_sst2", "early_stopping=auto", "output_dir=/tmp/u", "metrics=[pearson]"))
    with pytest.raises(ConfigError, match=r"early_stopping.metric=null \(the default of regression: 'mse'\) is not produced"):
        check_task(conf, "regression")


@pytest.fixture(scope="module")
def weighted(world, tmp_path_factory, request):
    """A run with loss.class_weights=auto and a named early_stopping.metric=accuracy (the token task's
    default is f1); the tag counts build_loss was given are recorded."""
    import finetune.losses as losses

    checkpoint, files, _ = world
    out = tmp_path_factory.mktemp("weighted") / "run"
    seen, original = [], losses.build_loss

    def spy(cfg, task, counts, *args, **kwargs):
        seen.append((cfg.class_weights, task, list(counts)))
        return original(cfg, task, counts, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(losses, "build_loss", spy)
    try:
        summary = one_thread(lambda: run_in_process(ner_overrides(checkpoint, files, out, "early_stopping.metric=accuracy",
                                                                  "loss.class_weights=auto", "train.epochs=2",
                                                                  "plots=false")))  # fmt: skip
    finally:
        mp.undo()
    return out, summary, seen


def test_a_named_early_stopping_metric_is_kept_and_recorded(weighted):
    out, summary, _ = weighted
    recorded = yaml.safe_load((out / "config.yaml").read_text())["early_stopping"]
    assert (recorded["metric"], recorded["mode"]) == ("accuracy", "max") and summary["best_metric"] == "accuracy"


def test_class_weights_auto_weighs_the_tags_by_their_training_words(world, weighted):
    _, files, _ = world
    _, summary, seen = weighted
    names = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    tags = [t for line in Path(files["train"]).read_text().splitlines() for t in json.loads(line)["ner_tags"]]
    assert seen == [("auto", "token_classification", [tags.count(n) for n in names])]
    assert summary["imbalance"]["class_weights"] == "auto" and summary["best"]["accuracy"] > 0.8


# --- k-fold CV grouped by document -----------------------------------------------------------
def test_folds_keep_every_document_whole_and_a_missing_group_column_is_named(world):
    from finetune.config import DataConfig
    from finetune.data import DataError, kfold_splits, load_and_prepare

    _, files, _ = world
    splits, _, task = load_and_prepare(DataConfig(train_file=files["train"], validation_file=files["validation"]), seed=0)
    folds = list(kfold_splits(splits, 3, seed=0, task=task, group_column="doc_id"))
    held = [set(f["validation"]["doc_id"]) for f in folds]
    assert all(not (h & set(f["train"]["doc_id"])) for h, f in zip(held, folds))  # no document on both sides
    assert sorted(d for h in held for d in h) == sorted({f"doc{i}" for i in range(30)} | {f"doc{i}" for i in range(8)})
    assert sum(len(f["validation"]) for f in folds) == 150
    with pytest.raises(DataError, match=r"cv.group_column='document' is not a column of the train split.*doc_id"):
        list(kfold_splits(splits, 3, seed=0, task=task, group_column="document"))


def test_cross_validation_by_doc_id_runs_and_validates_whole_documents(world, tmp_path, monkeypatch):
    import finetune.data as data

    checkpoint, files, _ = world
    folds, original = [], data.fold_indices

    def spy(pool, *args, **kwargs):  # the documents each fold trains and validates on
        parts = original(pool, *args, **kwargs)
        docs = pool["doc_id"]
        folds.extend(({docs[i] for i in train}, {docs[i] for i in val}) for train, val in parts)
        return parts

    monkeypatch.setattr(data, "fold_indices", spy)
    out = tmp_path / "cv"
    one_thread(lambda: run_in_process(ner_overrides(checkpoint, files, out, "cv.folds=2", "cv.group_column=doc_id",
                                                    "train.max_steps=2", "plots=false")))  # fmt: skip
    assert len(json.loads((out / "cv.json").read_text())["folds"]) == len(folds) == 2
    assert all(train and val and not train & val for train, val in folds)


# --- freezing, gradual unfreezing, exact resume ----------------------------------------------
UNFREEZING = ("model.freeze=base", "model.unfreeze_schedule=1", "train.epochs=2", "checkpoint.every=3",
              "early_stopping=auto", "plots=false")  # fmt: skip


@pytest.fixture(scope="module")
def unfrozen(world, tmp_path_factory):
    checkpoint, files, _ = world
    out = tmp_path_factory.mktemp("unfreezing") / "run"
    one_thread(lambda: run_in_process(ner_overrides(checkpoint, files, out, *UNFREEZING)))
    return out


def test_frozen_base_unfreezes_the_top_layer_in_epoch_2_and_records_the_tasks_metric(world, unfrozen):
    import torch
    from safetensors.torch import load_file

    from finetune.checkpoint import TRAINER_STATE, list_checkpoints

    last = list_checkpoints(unfrozen)[-1]
    assert last.name == "step-0000030" and json.loads((last / TRAINER_STATE).read_text())["unfrozen"] == ["bert.encoder.layer.1"]
    base, trained = load_file(f"{world[0]}/model.safetensors"), load_file(str(last / "model.safetensors"))
    for name, before in base.items():  # layer 1 trained from epoch 2; layer 0 and the embeddings stayed frozen
        if name.startswith(("encoder.layer.", "embeddings.")):
            assert torch.equal(trained[f"bert.{name}"], before) != name.startswith("encoder.layer.1."), name
    # early_stopping=auto (metric: null): config.yaml records the task's choice, which a resume keeps.
    recorded = yaml.safe_load((unfrozen / "config.yaml").read_text())["early_stopping"]
    assert (recorded["metric"], recorded["mode"]) == ("f1", "max")
    assert json.loads((unfrozen / "metrics.json").read_text())["best_metric"] == "f1"


def test_killed_after_the_unfreezing_then_resumed_is_exact(world, unfrozen, tmp_path):
    import torch
    from safetensors.torch import load_file

    from finetune.checkpoint import list_checkpoints

    checkpoint, files, _ = world
    out = tmp_path / "killed"
    args = ner_overrides(checkpoint, files, out, *UNFREEZING)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(RUNNER), "kill:20", "--", *args], capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert list_checkpoints(out)[-1].name == "step-0000018"  # 15 steps an epoch: layer 1 unfrozen at step 15
    one_thread(lambda: run_in_process([*args, "resume=auto"]))
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (unfrozen, out))
    assert a["evaluations"] == b["evaluations"] and a["best"] == b["best"] and a["steps"] == b["steps"] == 30
    wa, wb = (load_file(str(d / "model" / "model.safetensors")) for d in (unfrozen, out))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert table(out) == table(unfrozen)


# --- a sweep, its best trial pushed ----------------------------------------------------------
def test_sweep_ranks_trials_by_entity_f1_and_pushes_the_best_with_a_token_classification_card(world, tmp_path):
    from huggingface_hub import ModelCard

    from hub_server import start_hub_server

    checkpoint, files, _ = world
    token = "hf_thisIsASecretTestToken1234567890"
    sweep_dir = tmp_path / "sweep"
    args = [a for a in ner_overrides(checkpoint, files, "unused", "early_stopping=auto", "train.epochs=1", "plots=false",
                                     "hub.push=true", "hub.repo_id=tester/ner")  # fmt: skip
            if not a.startswith(("output_dir=", "train.lr="))]
    server, hub, endpoint = start_hub_server()
    try:
        env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_TOKEN": token, "HF_HUB_OFFLINE": "0", "OMP_NUM_THREADS": "1",
               "HF_HOME": str(tmp_path / "hf_home")}  # fmt: skip
        proc = subprocess.run([sys.executable, "-m", "finetune", "-m", *args, "train.lr=1e-4,5e-3",
                               f"hydra.sweep.dir={sweep_dir}"], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        server.shutdown()
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["metric"] == "f1" and [t["status"] for t in summary["trials"]] == ["completed"] * 2
    values = [t["value"] for t in summary["trials"]]
    assert values == sorted(values, reverse=True) and values[0] is not None
    (commit,) = hub.commits
    best = Path(summary["best_trial"])
    assert commit["files"]["model.safetensors"] == (best / "model" / "model.safetensors").read_bytes()
    card = ModelCard(commit["files"]["README.md"].decode())
    assert card.data.pipeline_tag == "token-classification"
    (index,) = card.data.to_dict()["model-index"]
    assert {r["task"]["type"] for r in index["results"]} == {"token-classification"}
    results = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results[("validation", "f1")] == pytest.approx(values[0], abs=1e-6)


# --- two processes over windows --------------------------------------------------------------
def test_two_processes_over_windows_score_every_validation_word_once(world, tmp_path):
    from seqeval.metrics import accuracy_score, f1_score

    from conftest import free_port

    checkpoint, files, _ = world
    out = tmp_path / "ddp"
    args = ner_overrides(checkpoint, files, out, "data.max_length=10", "data.long_text=window", "data.window_stride=3",
                         "train.epochs=1", "train.eval_batch_size=4", "plots=false")  # fmt: skip
    launcher = Path(__file__).resolve().parent.parent / "scripts" / "launch.sh"
    port = str(free_port())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "MAIN_PORT": port,
           "MASTER_PORT": port, "PET_MASTER_PORT": port, "OMP_NUM_THREADS": "1"}  # fmt: skip
    proc = subprocess.run(["bash", str(launcher), "cpu", "2", *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr + proc.stdout
    rows = table(out)
    sentences = [json.loads(line) for line in Path(files["validation"]).read_text().splitlines()]
    assert [r["words"] for r in rows] == [s["tokens"] for s in sentences]
    assert all(len(r["predicted"]) == len(r["words"]) for r in rows)
    best = json.loads((out / "metrics.json").read_text())["best"]
    gold, predicted = [r["gold"] for r in rows], [r["predicted"] for r in rows]
    assert best["accuracy"] == pytest.approx(accuracy_score(gold, predicted))
    assert best["f1"] == pytest.approx(f1_score(gold, predicted))
