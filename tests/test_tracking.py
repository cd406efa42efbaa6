"""Trackers (TensorBoard, CSV), plots and the sweep summary."""

import csv
from pathlib import Path

import numpy as np
import pytest

from test_e2e import run_in_process, sweep_overrides, tiny_overrides


def test_tensorboard_event_files_hold_loss_and_eval_metrics(tiny_bert, toy_files, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    run_in_process(tiny_overrides(tiny_bert, toy_files, out, "train.epochs=2", "logger=tensorboard"))
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    assert events, list((out / "logs").rglob("*"))
    acc = EventAccumulator(str(events[0].parent)).Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "eval/accuracy", "eval/loss"} <= tags
    assert [e.step for e in acc.Scalars("eval/accuracy")] == [20, 40]
    assert len(acc.Scalars("train/loss")) == 40


def test_csv_logger_writes_the_same_series(tiny_bert, toy_files, tmp_path):
    out = tmp_path / "run"
    summary = run_in_process(tiny_overrides(tiny_bert, toy_files, out, "train.epochs=2", "logger=csv"))
    with open(out / "logs" / "finetune" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    names = {r["name"] for r in rows}
    assert {"train/loss", "train/lr", "train/grad_norm", "eval/accuracy", "eval/loss"} <= names
    evals = [(int(r["step"]), float(r["value"])) for r in rows if r["name"] == "eval/accuracy"]
    assert evals == [(e["step"], pytest.approx(e["accuracy"])) for e in summary["evaluations"]]


def _image(path):
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 200
    return img


def test_plots_are_written_and_not_blank(tiny_bert, toy_files, tmp_path):
    out = tmp_path / "run"
    run_in_process(tiny_overrides(tiny_bert, toy_files, out, "train.epochs=2", "logger=none"))
    for name in ("curves.png", "confusion_matrix.png"):
        img = _image(out / "plots" / name)
        assert np.std(img[..., :3]) > 0.05, f"{name} looks blank"


def test_regression_scatter_plot(tmp_path):
    from finetune.plots import plot_regression

    gold = np.linspace(0, 5, 50)
    plot_regression(tmp_path / "r.png", gold, gold + np.random.default_rng(0).normal(0, 0.3, 50))
    assert np.std(_image(tmp_path / "r.png")[..., :3]) > 0.05


def test_multirun_sweep_runs_every_trial_and_writes_the_summary(tiny_bert, toy_files, tmp_path):
    import json
    import subprocess
    import sys

    args = sweep_overrides(tiny_bert, toy_files)
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "finetune", "-m", *args, "train.lr=1e-3,5e-3",
                           f"hydra.sweep.dir={sweep_dir}"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert len(summary["trials"]) == 2 and summary["metric"] == "accuracy"
    swept = {o for t in summary["trials"] for o in t["overrides"] if o.startswith("train.lr=")}
    assert swept == {"train.lr=0.001", "train.lr=0.005"}  # as Hydra writes the swept values
    values = [t["value"] for t in summary["trials"]]
    assert values == sorted(values, reverse=True)  # best first
    for trial in ("trial_0", "trial_1"):
        assert (sweep_dir / trial / "model" / "config.json").is_file()
    assert (sweep_dir / "summary.tsv").read_text().startswith("trial\taccuracy\toverrides")


def test_a_trial_that_raises_fails_alone_and_the_summary_marks_it(tiny_bert, toy_files, tmp_path):
    import json
    import subprocess
    import sys

    # The first trial's training raises an out-of-memory error (no FinetuneError); the sweep goes on.
    runner = Path(__file__).with_name("fault_runner.py")
    args = sweep_overrides(tiny_bert, toy_files, "train.max_steps=3")
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, str(runner), "raise:1", "--", "-m", *args, "train.lr=1e-3,5e-3",
                           f"hydra.sweep.dir={sweep_dir}"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((sweep_dir / "summary.json").read_text())
    by_name = {Path(t["dir"]).name: t for t in summary["trials"]}
    assert by_name["trial_0"]["status"] == "failed" and "OutOfMemoryError" in by_name["trial_0"]["error"]
    assert by_name["trial_1"]["status"] == "completed" and by_name["trial_1"]["value"] is not None
    assert (sweep_dir / "trial_1" / "model" / "config.json").is_file()
    assert summary["failed_trials"] == [str(sweep_dir / "trial_0")] and summary["best_trial"] == str(sweep_dir / "trial_1")
    trace = (sweep_dir / "trial_0" / "error.log").read_text()
    assert trace.startswith("Traceback") and "OutOfMemoryError: CUDA out of memory" in trace
    assert "trial_0\tFAILED\t" in (sweep_dir / "summary.tsv").read_text()


def test_optuna_sweeper_runs_three_trials_and_records_the_best(tiny_bert, toy_files, tmp_path):
    import json
    import subprocess
    import sys

    import yaml

    args = sweep_overrides(tiny_bert, toy_files)
    sweep_dir = tmp_path / "optuna"
    proc = subprocess.run([sys.executable, "-m", "finetune", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3",
                           *args, "train.lr=tag(log,interval(1e-4,1e-2))", "train.batch_size=4,8",
                           f"hydra.sweep.dir={sweep_dir}"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["n_trials"] == results["n_completed"] == 3 and results["direction"] == "maximize"
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert len(summary["trials"]) == 3
    # Optuna's best trial is the one the summary ranks first, with the value that run recorded.
    best = summary["trials"][0]
    assert results["best_value"] == best["value"]
    lrs = set()
    for trial in summary["trials"]:
        lr = float(next(o for o in trial["overrides"] if o.startswith("train.lr=")).split("=")[1])
        assert 1e-4 <= lr <= 1e-2
        lrs.add(lr)
        assert any(o in ("train.batch_size=4", "train.batch_size=8") for o in trial["overrides"])
        saved = yaml.safe_load((Path(trial["dir"]) / "config.yaml").read_text())
        assert saved["train"]["lr"] == lr  # the sampled value reached the run
    assert len(lrs) == 3


def test_optuna_sweeper_without_a_search_space_says_what_to_add(tiny_bert, toy_files, tmp_path):
    import subprocess
    import sys

    args = tiny_overrides(tiny_bert, toy_files, tmp_path / "unused", "logger=none")
    proc = subprocess.run([sys.executable, "-m", "finetune", "-m", "hydra/sweeper=optuna", *args,
                           f"hydra.sweep.dir={tmp_path / 'optuna'}"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0
    assert "nothing to search" in proc.stderr and "interval" in proc.stderr
    assert "Traceback" not in proc.stderr
    bad = subprocess.run([sys.executable, "-m", "finetune", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=0",
                          "hydra.sweeper.sampler=grid", *args, "train.lr=1e-3,5e-3",
                          f"hydra.sweep.dir={tmp_path / 'bad'}"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode != 0 and "n_trials=0 must be a positive integer" in bad.stderr
    assert "sampler='grid' is not one of tpe, random" in bad.stderr
    assert not (tmp_path / "bad").exists()  # nothing was trained
