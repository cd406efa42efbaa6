"""Fault safety: exact resume after SIGKILL / SIGTERM, non-finite losses, run-directory protection."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from finetune.checkpoint import list_checkpoints
from test_e2e import run_in_process, tiny_overrides


def overrides(tiny_bert, toy_files, out, *extra):
    return tiny_overrides(tiny_bert, toy_files, out, "train.epochs=2", "checkpoint.every=3", "checkpoint.keep_last=2",
                          *extra)  # fmt: skip


def run_subprocess(args, fault):
    env = {**os.environ, "FINETUNE_FAULT": fault}
    return subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip


def assert_same_run(a, b):
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma["evaluations"] == mb["evaluations"]
    assert ma["best"] == mb["best"] and ma["steps"] == mb["steps"] and ma["stopped_early"] == mb["stopped_early"]
    wa, wb = (load_file(str(d / "model" / "model.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["train.gradient_accumulation_steps=2"],
        # Early stopping armed: evaluate every 4 steps, stop after 2 evaluations without improvement.
        ["train.eval_every=4", "early_stopping.patience=2", "train.epochs=4"],
    ],
    ids=["plain", "grad-accumulation", "early-stopping"],
)
def test_sigkill_mid_epoch_then_resume_auto_is_exact(tiny_bert, toy_files, tmp_path, extra):
    reference = tmp_path / "reference"
    run_in_process(overrides(tiny_bert, toy_files, reference, *extra))

    out = tmp_path / "killed"
    args = overrides(tiny_bert, toy_files, out, *extra)
    proc = run_subprocess(args, fault="kill:7")  # dies mid-epoch 1, after the step-6 checkpoint
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [p.name for p in list_checkpoints(out)][-1] == "step-0000006"
    assert not (out / "model").exists()

    run_in_process([*args, "resume=auto"])
    assert_same_run(reference, out)
    if "early_stopping.patience=2" in extra:
        assert json.loads((out / "metrics.json").read_text())["stopped_early"]


def test_sigterm_checkpoints_and_resume_continues_to_the_same_end(tiny_bert, toy_files, tmp_path):
    reference = tmp_path / "reference"
    run_in_process(overrides(tiny_bert, toy_files, reference))
    out = tmp_path / "terminated"
    args = overrides(tiny_bert, toy_files, out)
    proc = run_subprocess(args, fault="term:5")
    assert proc.returncode == 130
    assert "SIGTERM received" in proc.stderr and "resume=auto" in proc.stderr and "Traceback" not in proc.stderr
    # The signal arrives after step 5: step 6, in progress, is finished and checkpointed.
    assert list_checkpoints(out)[-1].name == "step-0000006"
    run_in_process([*args, "resume=auto"])
    assert_same_run(reference, out)


def test_planted_nan_stops_with_a_message_and_the_last_good_checkpoint_loads(tiny_bert, toy_files, tmp_path):
    out = tmp_path / "nan"
    proc = run_subprocess(overrides(tiny_bert, toy_files, out), fault="nan:8")
    assert proc.returncode == 2
    assert "non-finite at step 8" in proc.stderr and "train.lr" in proc.stderr and "Traceback" not in proc.stderr
    last = list_checkpoints(out)[-1]
    assert last.name == "step-0000006"
    weights = load_file(str(last / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    # The checkpoint resumes: the same command with resume=auto and no fault finishes.
    summary = run_in_process([*overrides(tiny_bert, toy_files, out), "resume=auto"])
    assert summary["steps"] == 40


def test_absurd_learning_rate_stops_cleanly(tiny_bert, toy_files, tmp_path):
    from finetune.train import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="non-finite"):
        run_in_process(overrides(tiny_bert, toy_files, tmp_path / "r", "optimizer=sgd", "train.lr=1e30",
                                 "train.max_grad_norm=null"))  # fmt: skip


def test_skip_step_policy_skips_the_bad_step_and_finishes(tiny_bert, toy_files, tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_FAULT", "nan:3")
    summary = run_in_process(overrides(tiny_bert, toy_files, tmp_path / "r", "train.nan_policy=skip_step",
                                       "train.epochs=4"))  # fmt: skip
    assert summary["steps"] == 80 and summary["skipped_steps"] == 1
    assert summary["best"]["accuracy"] >= 0.9


def test_resume_refuses_a_config_that_changes_training(tiny_bert, toy_files, tmp_path):
    from finetune.checkpoint import ResumeError

    out = tmp_path / "run"
    run_in_process(overrides(tiny_bert, toy_files, out))
    with pytest.raises(ResumeError, match=r"train.lr: 0.005 -> 0.001"):
        run_in_process([*overrides(tiny_bert, toy_files, out, "train.lr=1e-3"), "resume=auto"])
    # Keys that do not change training may differ.
    run_in_process([*overrides(tiny_bert, toy_files, out, "train.log_every=7"), "resume=auto"])


def test_keep_last_and_best_checkpoints(tiny_bert, toy_files, tmp_path):
    out = tmp_path / "run"
    run_in_process(overrides(tiny_bert, toy_files, out))
    names = [p.name for p in list_checkpoints(out)]
    assert names == ["step-0000039", "step-0000040"]
    best = json.loads((out / "checkpoints" / "best" / "best.json").read_text())
    assert best == json.loads((out / "metrics.json").read_text())["best"]
    assert not list((out / "checkpoints").glob(".tmp-*"))
