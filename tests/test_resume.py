"""Run integrity: exact resume on every path (SIGKILL / SIGTERM, resume=auto / PATH, across run
directories, at the early-stop point, with gradual unfreezing), non-finite losses, run-directory
protection, cross-validation folds sharing nothing. Faults come from tests/fault_runner.py,
installed from outside the product."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import sentiment_rows, write_tsv
from fault_runner import count_optimizer_steps, install
from finetune.checkpoint import BEST_WEIGHTS, TRAINER_STATE, ResumeError, list_checkpoints
from test_e2e import run_in_process, tiny_overrides, validation_loss

RUNNER = Path(__file__).with_name("fault_runner.py")
# Early stopping armed: validation loss every 4 steps, stop after 2 evaluations without improvement (at step 20).
EARLY_STOPPING = ("early_stopping=loss", "train.eval_every=4", "early_stopping.patience=2", "train.epochs=4")
UNFREEZING = ("model.freeze=base", "model.unfreeze_schedule=1")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The toy train / validation files, shared by every run of this module (a resume compares
    data paths, so runs that resume each other must read the same files)."""
    root = tmp_path_factory.mktemp("data")
    return {
        "train": write_tsv(root / "train.tsv", sentiment_rows(160, seed=1)),
        "validation": write_tsv(root / "validation.tsv", sentiment_rows(41, seed=2)),
    }


def overrides(tiny_bert, files, out, *extra):
    """2 epochs of 20 steps, a checkpoint every 3 steps and at each evaluation, the last 2 kept."""
    return tiny_overrides(tiny_bert, files, out, "train.epochs=2", "checkpoint.every=3", "checkpoint.keep_last=2",
                          "logger=none", "plots=false", *extra)  # fmt: skip


@pytest.fixture(scope="module")
def reference(tiny_bert, files, tmp_path_factory):
    """reference(*extra): the run directory of one uninterrupted run per config, trained once for
    the module. Tests must not write into it (copy it first)."""
    runs = {}

    def get(*extra):
        if extra not in runs:
            out = tmp_path_factory.mktemp("reference")
            run_in_process(overrides(tiny_bert, files, out, *extra))
            runs[extra] = out
        return runs[extra]

    return get


def run_with_fault(fault, args):
    return subprocess.run([sys.executable, str(RUNNER), fault, "--", *args], capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


def assert_same_run(a, b):
    ma, mb = metrics(a), metrics(b)
    assert ma["evaluations"] == mb["evaluations"]
    assert ma["best"] == mb["best"] and ma["steps"] == mb["steps"] and ma["stopped_early"] == mb["stopped_early"]
    wa, wb = (load_file(str(d / "model" / "model.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def trainer_state(checkpoint):
    return json.loads((checkpoint / TRAINER_STATE).read_text())


@pytest.mark.parametrize(
    "extra, kill_after, last_checkpoint",
    [
        ((), 7, 6),  # dies mid-epoch 1, after the step-6 checkpoint
        (("train.gradient_accumulation_steps=2",), 7, 6),
        (EARLY_STOPPING, 7, 6),
        # The top layer is unfrozen at the start of epoch 2 (step 20): the checkpoint must carry it.
        (UNFREEZING, 25, 24),
    ],
    ids=["plain", "grad-accumulation", "early-stopping", "gradual-unfreezing"],
)
def test_sigkill_mid_epoch_then_resume_auto_is_exact(tiny_bert, files, tmp_path, reference, extra, kill_after,
                                                     last_checkpoint):  # fmt: skip
    out = tmp_path / "killed"
    args = overrides(tiny_bert, files, out, *extra)
    proc = run_with_fault(f"kill:{kill_after}", args)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert list_checkpoints(out)[-1].name == f"step-{last_checkpoint:07d}"
    assert not (out / "model").exists()

    run_in_process([*args, "resume=auto"])
    assert_same_run(reference(*extra), out)
    if extra == EARLY_STOPPING:
        assert metrics(out)["stopped_early"]
    if extra == UNFREEZING:
        assert trainer_state(list_checkpoints(out)[-1])["unfrozen"] == ["bert.encoder.layer.1"]


def test_sigterm_checkpoints_and_resume_continues_to_the_same_end(tiny_bert, files, tmp_path, reference):
    out = tmp_path / "terminated"
    args = overrides(tiny_bert, files, out)
    proc = run_with_fault("term:5", args)
    assert proc.returncode == 130
    assert "SIGTERM received" in proc.stderr and "resume=auto" in proc.stderr and "Traceback" not in proc.stderr
    # The signal arrives during step 5: the step is finished and checkpointed (5 is no multiple of 3).
    assert list_checkpoints(out)[-1].name == "step-0000005"
    run_in_process([*args, "resume=auto"])
    assert_same_run(reference(), out)


def test_planted_nan_stops_with_a_message_and_the_last_good_checkpoint_resumes(tiny_bert, files, tmp_path,
                                                                               monkeypatch):  # fmt: skip
    from finetune.train import NonFiniteLossError

    out = tmp_path / "nan"
    with monkeypatch.context() as patched:
        install("nan:8", patched)
        with pytest.raises(NonFiniteLossError, match="non-finite at step 8.*train.lr"):
            run_in_process(overrides(tiny_bert, files, out))
    last = list_checkpoints(out)[-1]
    assert last.name == "step-0000006"
    # Nothing was written for the NaN step or after it, not even half a checkpoint.
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name >= "step-0000007" or p.name.startswith(".tmp-")] == []
    for saved in [*(out / "checkpoints").glob("*/model.safetensors"), *(out / "checkpoints").glob("*/" + BEST_WEIGHTS)]:
        assert all(torch.isfinite(w).all() for w in load_file(str(saved)).values()), saved
    assert not (out / "metrics.json").exists()
    # The checkpoint resumes: the same command with resume=auto and no fault finishes.
    summary = run_in_process([*overrides(tiny_bert, files, out), "resume=auto"])
    assert summary["steps"] == 40


def test_absurd_learning_rate_stops_cleanly(tiny_bert, files, tmp_path):
    from finetune.train import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="non-finite"):
        run_in_process(overrides(tiny_bert, files, tmp_path / "r", "optimizer=sgd", "train.lr=1e30",
                                 "train.max_grad_norm=null"))  # fmt: skip


def test_skip_step_policy_skips_the_bad_step_and_finishes(tiny_bert, files, tmp_path, monkeypatch):
    install("nan:3", monkeypatch)
    summary = run_in_process(overrides(tiny_bert, files, tmp_path / "r", "train.nan_policy=skip_step",
                                       "train.epochs=4"))  # fmt: skip
    assert summary["steps"] == 80 and summary["skipped_steps"] == 1
    assert summary["best"]["accuracy"] >= 0.9


def test_resume_refuses_a_config_that_changes_training(tiny_bert, files, tmp_path, reference, monkeypatch):
    out = copy_run(reference(), tmp_path / "run")
    with pytest.raises(ResumeError, match=r"train.lr: 0.005 -> 0.001"):
        run_in_process([*overrides(tiny_bert, files, out, "train.lr=1e-3"), "resume=auto"])
    # Keys that do not change training may differ: the finished run resumes at its end.
    steps = count_optimizer_steps(monkeypatch)
    run_in_process([*overrides(tiny_bert, files, out, "train.log_every=7"), "resume=auto"])
    assert steps["done"] == 0
    assert_same_run(reference(), out)


def test_keep_last_and_best_checkpoints(reference, files):
    out = reference()
    last_two = list_checkpoints(out)
    assert [p.name for p in last_two] == ["step-0000039", "step-0000040"]
    assert not list((out / "checkpoints").glob(".tmp-*"))
    # The last checkpoint carries the best evaluation: its record and its weights (the final model's).
    chosen, saved = trainer_state(last_two[-1])["best"], metrics(out)
    assert chosen in saved["evaluations"] and chosen["step"] == saved["best"]["step"]
    if saved["mixed_precision"] == "no":  # else metrics.json's best is the kept weights re-evaluated in fp32
        assert chosen == saved["best"]
    best = load_file(str(last_two[-1] / BEST_WEIGHTS))
    final = load_file(str(out / "model" / "model.safetensors"))
    assert best and all(torch.equal(best[k], final[k]) for k in best)
    # Independently: the saved model's validation loss, computed here, is the best evaluation's.
    assert validation_loss(out / "model", files) == pytest.approx(metrics(out)["best"]["loss"], abs=1e-4)
    # An unchanged best is the previous checkpoint's file, hard-linked (written once). After early
    # stopping, the last two checkpoints both follow the best evaluation.
    stopped = list_checkpoints(reference(*EARLY_STOPPING))
    assert trainer_state(stopped[0])["best"] == trainer_state(stopped[1])["best"]
    assert (stopped[0] / BEST_WEIGHTS).samefile(stopped[1] / BEST_WEIGHTS)


def carried_best(run):
    """(the next-to-last checkpoint, the reference run's best): an early-stopped run's best comes
    before that checkpoint, so a resumed run that lost it could not find it again."""
    older, last = list_checkpoints(run)
    best = metrics(run)["best"]
    assert best["step"] < trainer_state(older)["step"] < trainer_state(last)["step"], best
    return older, best


def test_resume_path_to_an_older_checkpoint_of_the_same_run(tiny_bert, files, tmp_path, reference):
    out = copy_run(reference(*EARLY_STOPPING), tmp_path / "run")
    older, best = carried_best(out)
    later = list_checkpoints(out)[-1].name
    run_in_process([*overrides(tiny_bert, files, out, *EARLY_STOPPING), f"resume={older}"])
    assert_same_run(reference(*EARLY_STOPPING), out)
    assert metrics(out)["best"] == best
    # The later checkpoint of the abandoned timeline was moved aside, not resumed or overwritten.
    assert (out / "checkpoints" / "superseded" / later / TRAINER_STATE).is_file()
    assert [p.name for p in list_checkpoints(out)] == [older.name, later]


def test_resume_path_from_another_run_directory(tiny_bert, files, tmp_path, reference):
    source, best = carried_best(reference(*EARLY_STOPPING))
    out = tmp_path / "continued"
    with pytest.raises(ResumeError, match=r"train.lr: 0.005 -> 0.001"):
        run_in_process([*overrides(tiny_bert, files, out, *EARLY_STOPPING, "train.lr=1e-3"), f"resume={source}"])
    assert not out.exists()
    # With the same config the run continues there and carries the source run's best (from
    # before the checkpoint: the steps after it do not find it again).
    run_in_process([*overrides(tiny_bert, files, out, *EARLY_STOPPING), f"resume={source}"])
    assert_same_run(reference(*EARLY_STOPPING), out)
    assert metrics(out)["best"] == best
    assert validation_loss(out / "model", files) == pytest.approx(best["loss"], abs=1e-4)


def test_resume_auto_over_a_finished_run_without_checkpoints_refuses_and_changes_nothing(tiny_bert, files, tmp_path,
                                                                                         reference):  # fmt: skip
    out = copy_run(reference(), tmp_path / "finished")
    shutil.rmtree(out / "checkpoints")

    def snapshot():
        return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.is_file()}

    before = snapshot()
    with pytest.raises(ResumeError, match="no checkpoint.*overwrite=true"):
        run_in_process([*overrides(tiny_bert, files, out), "resume=auto"])
    assert snapshot() == before and len(before) > 5


def test_kill_while_publishing_a_checkpoint_with_a_new_best_loses_neither(tiny_bert, files, tmp_path, reference):
    # The second evaluation that improves (a lower validation loss): its checkpoint (at_eval) brings
    # a new best, while the checkpoint before it holds the previous best.
    evaluations = metrics(reference(*EARLY_STOPPING))["evaluations"]
    improving = [e["step"] for i, e in enumerate(evaluations) if all(e["loss"] < p["loss"] for p in evaluations[:i])]
    assert len(improving) >= 2, evaluations
    at = improving[1]
    out = tmp_path / "killed"
    args = overrides(tiny_bert, files, out, *EARLY_STOPPING)
    proc = run_with_fault(f"kill-at:step-{at:07d}", args)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (out / "checkpoints" / f".tmp-step-{at:07d}" / BEST_WEIGHTS).is_file()  # killed right at the rename
    last = list_checkpoints(out)[-1]
    assert last.name < f"step-{at:07d}"
    # The checkpoint before it is whole: its state and the best it had, together.
    assert trainer_state(last)["best"]["step"] == improving[0]
    assert load_file(str(last / BEST_WEIGHTS))

    run_in_process([*args, "resume=auto"])
    assert_same_run(reference(*EARLY_STOPPING), out)
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_resume_at_the_early_stop_point_trains_zero_steps(tiny_bert, files, tmp_path, reference, monkeypatch):
    out = copy_run(reference(*EARLY_STOPPING), tmp_path / "stopped")
    assert trainer_state(list_checkpoints(out)[-1])["stopped_early"]
    steps = count_optimizer_steps(monkeypatch)
    run_in_process([*overrides(tiny_bert, files, out, *EARLY_STOPPING), "resume=auto"])
    assert steps["done"] == 0
    assert_same_run(reference(*EARLY_STOPPING), out)


def test_cross_validation_folds_share_nothing(tiny_bert, files, tmp_path):
    out = tmp_path / "cv"
    run_in_process(overrides(tiny_bert, files, out, "cv.folds=3", "train.max_steps=4", "checkpoint.every=null"))
    (checkpoint,) = list_checkpoints(out / "fold_2")
    names = sorted(p.name for p in checkpoint.iterdir())
    # One model, one optimizer, one schedule: fold 3's own (earlier folds' objects are not carried along).
    assert [n for n in names if n.startswith("model")] == ["model.safetensors"], names
    assert [n for n in names if n.startswith("optimizer")] == ["optimizer.bin"], names
    assert not [n for n in names if n.startswith("custom_checkpoint")], names
    assert torch.load(checkpoint / "scheduler.pt", weights_only=False)["last_epoch"] == 4
    # Its best weights are those of fold 3's final model.
    best = load_file(str(checkpoint / BEST_WEIGHTS))
    final = load_file(str(out / "fold_2" / "model" / "model.safetensors"))
    assert best and all(torch.equal(best[k], final[k]) for k in best)
    # Independently: the saved model's loss on fold 3's validation rows, computed here, is its best's.
    rows = [line.split("\t") for line in (out / "fold_2" / "predictions" / "validation.tsv").read_text().splitlines()]
    assert rows[0][1:3] == ["text", "label"]
    held_out = write_tsv(tmp_path / "fold_2.tsv", [(r[1], r[2]) for r in rows[1:]])
    loss = validation_loss(out / "fold_2" / "model", {"validation": held_out})
    assert loss == pytest.approx(metrics(out / "fold_2")["best"]["loss"], abs=1e-4)


def test_a_checkpoint_of_an_earlier_layout_is_refused_with_a_message(tmp_path):
    from finetune.checkpoint import find_resume_checkpoint

    old = tmp_path / "run" / "checkpoints" / "step-0000006"
    old.mkdir(parents=True)
    (old / TRAINER_STATE).write_text("{}")
    (old / "custom_checkpoint_0.pkl").write_bytes(b"")  # the scheduler, as accelerate stored it then
    for resume in ("auto", str(old)):
        with pytest.raises(ResumeError, match="earlier finetune.*new run"):
            find_resume_checkpoint(resume, tmp_path / "run")
