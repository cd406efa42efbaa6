"""Faults for the fault-safety tests, installed from outside the product (DESIGN: no test hook
lives in the training loop). Each fault wraps something the loop already calls:

    kill:N        SIGKILL right after optimizer step N (its checkpoint, if due, is not written)
    term:N        SIGTERM right after optimizer step N (the run finishes step N, checkpoints, exits 130)
    nan:N         step N's training loss becomes NaN (once)
    kill-at:NAME  SIGKILL just before the rename that puts checkpoints/NAME (e.g. step-0000020) in place
    raise:N       the N-th training of this process raises torch.OutOfMemoryError (a sweep's N-th trial)

Optimizer steps are counted on accelerate's AcceleratedOptimizer.step (synchronising calls only,
so gradient accumulation counts once per step); the NaN wraps the loss function that
finetune.losses.build_loss returns, planted only where autograd is on (not in evaluation).

In a test:   install("nan:3", monkeypatch)
As a CLI:    python tests/fault_runner.py kill:7 -- recipe=... output_dir=...   (then finetune.cli.main())
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path


def install(spec: str, monkeypatch) -> None:
    """Install the fault ``spec`` (see the module docstring) with ``monkeypatch.setattr``."""
    kind, _, arg = spec.partition(":")
    if kind in ("kill", "term", "nan"):
        _install_step_fault(kind, int(arg), monkeypatch)
    elif kind == "kill-at":
        _install_rename_kill(arg, monkeypatch)
    elif kind == "raise":
        _install_training_error(int(arg), monkeypatch)
    else:
        raise ValueError(f"unknown fault {spec!r}")


def count_optimizer_steps(monkeypatch, after_step=None) -> dict:
    """Count the optimizer steps taken from now on (``counts["done"]``); ``after_step(n)`` is called
    after step n."""
    from accelerate.optimizer import AcceleratedOptimizer

    counts = {"done": 0}
    original_step = AcceleratedOptimizer.step

    def step(self, *args, **kwargs):
        out = original_step(self, *args, **kwargs)
        if self.gradient_state.sync_gradients:  # a micro-batch of gradient accumulation is no step
            counts["done"] += 1
            if after_step is not None:
                after_step(counts["done"])
        return out

    monkeypatch.setattr(AcceleratedOptimizer, "step", step)
    return counts


def _install_step_fault(kind: str, at: int, monkeypatch) -> None:
    import torch

    import finetune.losses

    def signal_after(step: int) -> None:
        if kind != "nan" and step == at:
            os.kill(os.getpid(), signal.SIGKILL if kind == "kill" else signal.SIGTERM)

    steps = count_optimizer_steps(monkeypatch, signal_after)
    steps["planted"] = False
    if kind != "nan":
        return
    original_build = finetune.losses.build_loss

    def build_loss(*args, **kwargs):
        loss_fn = original_build(*args, **kwargs)

        def planted(logits, labels):
            loss = loss_fn(logits, labels)
            if torch.is_grad_enabled() and not steps["planted"] and steps["done"] == at - 1:
                steps["planted"] = True  # once: a skipped step does not advance the count
                return loss * float("nan")
            return loss

        return planted

    monkeypatch.setattr(finetune.losses, "build_loss", build_loss)


def _install_rename_kill(name: str, monkeypatch) -> None:
    original_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == name:
            os.kill(os.getpid(), signal.SIGKILL)
        return original_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def _install_training_error(at: int, monkeypatch) -> None:
    import torch

    import finetune.train

    calls = {"n": 0}
    original_train = finetune.train.train

    def train(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (planted by fault_runner)")
        return original_train(*args, **kwargs)

    monkeypatch.setattr(finetune.train, "train", train)


def main(argv) -> None:
    import pytest

    if "--" not in argv:
        sys.exit("usage: python tests/fault_runner.py FAULT [FAULT ...] -- <finetune arguments>")
    split = argv.index("--")
    faults, args = argv[:split], argv[split + 1 :]
    with pytest.MonkeyPatch.context() as monkeypatch:
        for spec in faults:
            install(spec, monkeypatch)
        from finetune.cli import main as finetune_main

        sys.argv = [sys.argv[0], *args]  # Hydra reads the command line from sys.argv
        finetune_main()


if __name__ == "__main__":
    main(sys.argv[1:])
