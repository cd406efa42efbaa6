"""Multi-process training over gloo on CPU, and the guard against silent single-process launches."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.cli import LaunchError, check_launch
from conftest import free_port, subprocess_pythonpath
from test_e2e import tiny_overrides

ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"


def launch(cmd, extra_env=None, timeout=300):
    # A free rendezvous port per launch (read by scripts/launch.sh, accelerate and torchrun), so that
    # launches in parallel test workers never meet on the default 29500.
    port = str(free_port())
    env = {**os.environ, "MAIN_PORT": port, "MASTER_PORT": port, "PET_MASTER_PORT": port, **(extra_env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def test_two_processes_train_and_metrics_equal_a_one_process_evaluation(tiny_bert, toy_files, tmp_path):
    from accelerate import Accelerator
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune.config import DataConfig, LossConfig
    from finetune.batching import build_dataloaders
    from finetune.data import build_task_data
    from finetune.losses import build_loss
    from finetune.metrics import MetricSuite
    from finetune.train import evaluate

    out = tmp_path / "ddp"
    # 41 validation rows: not a multiple of the global eval batch (2 processes x 16).
    args = tiny_overrides(tiny_bert, toy_files, out, "train.epochs=2", "train.eval_batch_size=16")
    # The documented CPU invocation: scripts/launch.sh cpu 2 ... (accelerate launch --multi_gpu over gloo).
    launcher = Path(__file__).resolve().parent.parent / "scripts" / "launch.sh"
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = launch(["bash", str(launcher), "cpu", "2", *args], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr + proc.stdout
    summary = json.loads((out / "metrics.json").read_text())
    # 160 rows / (8 x 2 processes) = 10 steps per epoch.
    assert summary["steps"] == 20
    with open(out / "predictions" / "validation.tsv") as f:
        assert len(list(csv.DictReader(f, delimiter="\t"))) == 41  # no padded duplicates

    # One process, same weights, same validation rows.
    tok = AutoTokenizer.from_pretrained(out / "model")
    cfg = DataConfig(train_file=toy_files["train"], validation_file=toy_files["validation"], text_column="sentence",
                     max_length=32)  # fmt: skip
    data = build_task_data(cfg, tok, seed=42)
    loaders = build_dataloaders(data, tok, batch_size=8, eval_batch_size=7, seed=42)
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")
    accelerator = Accelerator(cpu=True)
    model, loader = accelerator.prepare(model, loaders["validation"])
    suite = MetricSuite(["accuracy", "f1"], 2)
    single = evaluate(model, loader, accelerator, suite, build_loss(LossConfig(), data.task, data.label_counts()))
    best = summary["best"]
    assert single.metrics["accuracy"] == best["accuracy"] and single.metrics["f1"] == best["f1"]
    assert single.metrics["loss"] == pytest.approx(best["loss"], abs=1e-5)
    accelerator.end_training()


def test_guard_accelerate_launch_cpu_runs_one_process(tiny_bert, toy_files, tmp_path):
    args = tiny_overrides(tiny_bert, toy_files, tmp_path / "r", "train.epochs=1")
    proc = launch([ACCELERATE, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "finetune", *args])  # fmt: skip
    assert proc.returncode != 0
    assert "starts a single process" in proc.stderr and "--multi_gpu" in proc.stderr
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_guard_plain_torchrun_without_cpu(tiny_bert, toy_files, tmp_path):
    args = tiny_overrides(tiny_bert, toy_files, tmp_path / "r", "train.epochs=1")
    proc = launch([TORCHRUN, "--nproc_per_node", "2", "-m", "finetune", *args])
    assert proc.returncode != 0
    assert "WORLD_SIZE=2 but this process sees 1 process(es)" in proc.stderr and "train.cpu=true" in proc.stderr


def test_check_launch_rules():
    check_launch(1, {})
    check_launch(2, {"WORLD_SIZE": "2"})
    with pytest.raises(LaunchError, match="WORLD_SIZE=4"):
        check_launch(1, {"WORLD_SIZE": "4"})
    with pytest.raises(LaunchError, match="starts a single process"):
        check_launch(1, {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1"})


def test_two_processes_agree_on_batch_size_log_the_mean_loss_and_tokenize_once(tiny_bert, toy_files, tmp_path):
    """One 2-process gloo run (tests/ddp_probe.py records each rank from outside the product):
    rank 1 runs out of memory above 4 rows while probing train.batch_size=auto, so both ranks must
    take 4; the logged train/loss is the mean of both ranks' losses; one rank writes the tokenized cache.
    The texts are cut into windows (data.long_text=window), whose documents the evaluation counts
    once each although the two ranks evaluate different windows of some documents."""
    out, probe = tmp_path / "ddp", tmp_path / "probe"
    probe.mkdir()
    args = tiny_overrides(tiny_bert, toy_files, out, "train.max_steps=4", "train.batch_size=auto",
                          "train.effective_batch_size=8", "train.log_every=2", "logger=csv", "plots=false",
                          "data.long_text=window", "data.window_stride=1")  # fmt: skip
    args = [a.replace("data.max_length=32", "data.max_length=7") for a in args]  # 5 text tokens a window
    env = {"ACCELERATE_USE_CPU": "1", "PROBE_DIR": str(probe), "PYTHONPATH": subprocess_pythonpath(Path(__file__).parent)}
    proc = launch([ACCELERATE, "launch", "--main_process_port", str(free_port()), "--multi_gpu", "--num_machines", "1", "--num_processes", "2",
                   "--mixed_precision", "no", "--dynamo_backend", "no", str(Path(__file__).parent / "ddp_probe.py"),
                   *args], env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["batch_size"] for r in ranks] == [4, 4]
    assert "4 per process x 2 accumulation steps" in proc.stderr + proc.stdout
    assert sum(r["tokenized"] for r in ranks) == 2  # train and validation, each tokenized by one rank
    # 4 steps x 2 accumulated micro-batches per rank; a rank's step loss is the mean of its two.
    with open(out / "logs" / "finetune" / "metrics.csv") as f:
        logged = {int(r["step"]): float(r["value"]) for r in csv.DictReader(f) if r["name"] == "train/loss"}
    assert sorted(logged) == [1, 2, 3, 4]
    for step in logged:
        per_rank = [sum(r["losses"][2 * step - 2 : 2 * step]) / 2 for r in ranks]
        assert logged[step] == pytest.approx(sum(per_rank) / 2, rel=1e-5)
    assert per_rank[0] != pytest.approx(per_rank[1], rel=1e-3)  # the ranks did see different losses
    # 41 validation documents in more windows; every evaluation on every rank gathers each window
    # once (no padded duplicate of gather_for_metrics, no window missing) and counts 41 rows.
    evaluations = [e for r in ranks for e in r["evaluated"]]
    assert ranks[0]["evaluated"] and len(ranks[0]["evaluated"]) == len(ranks[1]["evaluated"])
    assert all(windows > 41 and gathered == windows and same and rows == 41 for windows, rows, gathered, same in evaluations)
    with open(toy_files["validation"]) as f:
        texts = [line.split("\t")[0] for line in f.read().splitlines()[1:]]
    with open(out / "predictions" / "validation.tsv") as f:
        table = list(csv.DictReader(f, delimiter="\t"))
    assert [r["text"] for r in table] == texts
    # The pooled probabilities are those of one process scoring each window once (finetune.predict).
    from finetune.predict import predict, read_rows

    single = predict(str(out), read_rows(toy_files["validation"]), progress=False)
    columns = [c for c in table[0] if c.startswith("prob_")]
    assert columns and len(single) == len(table)
    for one, two in zip(single, table):
        assert [one[c] for c in columns] == pytest.approx([float(two[c]) for c in columns], abs=1e-5)
    assert json.loads((out / "metrics.json").read_text())["train_windows"] > 160


def test_two_processes_replace_an_earlier_run_with_overwrite(tiny_bert, toy_files, tmp_path):
    """overwrite=true under two processes: both write into the one new folder the main process
    made beside the old run (the broadcast name), and only the main process puts it in place."""
    out = tmp_path / "run"
    (out / "onnx").mkdir(parents=True)
    (out / "config.yaml").write_text("output_dir: earlier\n")
    (out / "onnx" / "model.onnx").write_text("the earlier run's export")
    args = tiny_overrides(tiny_bert, toy_files, out, "train.epochs=1", "logger=none", "plots=false", "overwrite=true",
                          "checkpoint.every=5")  # fmt: skip
    launcher = Path(__file__).resolve().parent.parent / "scripts" / "launch.sh"
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = launch(["bash", str(launcher), "cpu", "2", *args], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr + proc.stdout
    assert not (out / "onnx").exists() and json.loads((out / "metrics.json").read_text())["steps"] == 10
    assert (out / "checkpoints" / "step-0000010" / "random_states_1.pkl").is_file()  # the second process's state
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".run.")]  # nothing left beside it
