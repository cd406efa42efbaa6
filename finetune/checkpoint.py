"""Checkpoints: atomic writes, keep-last-K, finding the one to resume from, run-directory rules.

Layout under ``<output_dir>/checkpoints/``::

    step-0000120/    accelerate state (model, optimizer, scaler, RNGs), scheduler.pt, trainer_state.json
                     and best.safetensors: the best evaluation so far (its record is trainer_state's
                     ``best``), hard-linked from the previous checkpoint when it has not changed;
                     under FSDP / DeepSpeed best-state/ instead (an accelerate state folder, its
                     files hard-linked from the working best-state/ below)
    best-state/      FSDP / DeepSpeed: the best of the running run (see engine.BestWeights)
    superseded/      step folders set aside because a run went on from an earlier point

Every step folder is written under a temporary name and renamed into place, so a kill at any
moment leaves either the previous checkpoint or the complete new one. The best weights travel
inside the step folder they belong to: a resumed run continues from one consistent state.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch

from finetune.config import FinetuneError

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
BEST_WEIGHTS = "best.safetensors"
BEST_STATE = "best-state"
SCHEDULER_STATE = "scheduler.pt"
SUPERSEDED = "superseded"
STEP_RE = re.compile(r"^step-(\d+)$")
# Config keys that may change between a run and its resumption: they do not change training.
RESUME_SAFE_KEYS = ("resume", "overwrite", "output_dir", "train.log_every", "data.num_workers", "train.compile", "train.compile_backend", "hub", "checkpoint.keep_last", "save.export")


class ResumeError(FinetuneError):
    """A checkpoint that cannot be resumed from."""


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: Path) -> List[Path]:
    """Complete step checkpoints, oldest first (temporary folders are ignored)."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and (p / TRAINER_STATE).is_file()]
    return [p for _, p in sorted(found)]


def prune(output_dir: Path, keep_last: int) -> None:
    for path in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def read_trainer_state(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / TRAINER_STATE).read_text())


def save_checkpoint(accelerator, output_dir: Path, trainer_state: dict, scheduler,
                    best: Union[Dict[str, torch.Tensor], Path, None], keep_last: int) -> Path:  # fmt: skip
    """Write ``step-N`` atomically: every process saves into a temporary folder, the main process
    adds the scheduler, the trainer state and the best weights (``best``: trained parameters by name,
    or a sharded engine's state folder), then one rename publishes it all."""
    final = checkpoints_dir(output_dir) / f"step-{trainer_state['step']:07d}"

    def add(tmp: Path) -> None:
        torch.save(scheduler.state_dict(), tmp / SCHEDULER_STATE)
        if isinstance(best, Path):
            link_tree(best, tmp / BEST_STATE)
        elif best is not None:
            _write_best(tmp, best, trainer_state["best"], list_checkpoints(output_dir))
        write_json(tmp / TRAINER_STATE, trainer_state)

    save_state_atomically(accelerator, final, add)
    if accelerator.is_main_process:
        prune(output_dir, keep_last)
    accelerator.wait_for_everyone()
    return final


def save_state_atomically(accelerator, final: Path, add=None) -> None:
    """Every process saves its accelerate state into a temporary folder beside ``final``; the main
    process lets ``add(tmp)`` put more files in, then one rename publishes the whole folder. An
    existing ``final`` is replaced, never written into (checkpoints hold hard links to its files)."""
    final = Path(final)
    tmp = final.parent / f".tmp-{final.name}"
    if accelerator.is_main_process:
        final.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a run killed while writing it
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if add is not None:
            add(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()


def _write_best(tmp: Path, best_state: Dict[str, torch.Tensor], record: dict, earlier: List[Path]) -> None:
    """The best weights into the new checkpoint: a hard link to the previous checkpoint's file when
    the best has not changed since (no extra disk, no extra write), else a new file."""
    from safetensors.torch import save_file

    if earlier and (earlier[-1] / BEST_WEIGHTS).is_file() and read_trainer_state(earlier[-1]).get("best") == record:
        try:
            os.link(earlier[-1] / BEST_WEIGHTS, tmp / BEST_WEIGHTS)
            return
        except OSError:  # a file system without hard links: write it again
            pass
    save_file({k: v.contiguous() for k, v in best_state.items()}, str(tmp / BEST_WEIGHTS))


def link_tree(src: Path, dst: Path) -> None:
    """Copy the folder ``src`` to ``dst`` as hard links (no extra disk, no write), or as copies where
    the file system has none. Safe because state folders are only ever replaced, never rewritten."""
    try:
        shutil.copytree(src, dst, copy_function=os.link)
    except OSError:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)


def load_checkpoint(accelerator, checkpoint: Path, scheduler) -> Tuple[dict, Union[Dict[str, torch.Tensor], Path, None]]:
    """Restore the accelerate state and the scheduler; return the trainer state and the best weights
    as stored: trained parameters by name, a sharded engine's state folder (best-state/), or None."""
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    accelerator.load_state(str(checkpoint))
    scheduler.load_state_dict(torch.load(checkpoint / SCHEDULER_STATE, weights_only=False))
    best = None
    if (checkpoint / BEST_WEIGHTS).is_file():
        best = load_file(str(checkpoint / BEST_WEIGHTS))
    elif (checkpoint / BEST_STATE).is_dir():
        best = checkpoint / BEST_STATE
    return read_trainer_state(checkpoint), best


def set_aside_later_checkpoints(output_dir: Path, resume_from: Optional[Path], step: int) -> None:
    """Before a run writes its first checkpoint: move every checkpoint in output_dir that is not part
    of this run's past (those after ``resume_from`` when it lies in output_dir, else all of them)
    into checkpoints/superseded/, so that no checkpoint of another timeline is ever resumed or linked."""
    root = checkpoints_dir(output_dir)
    ours = resume_from is not None and Path(resume_from).resolve().parent == root.resolve()
    later = [p for p in list_checkpoints(output_dir) if not ours or _step(p) > step]
    if not later:
        return
    aside = root / SUPERSEDED
    aside.mkdir(exist_ok=True)
    for path in later:
        if (aside / path.name).exists():
            shutil.rmtree(aside / path.name)
        os.replace(path, aside / path.name)
    logger.warning("%s continues from %s: moved %s to %s (delete it when no longer needed).", output_dir,
                   resume_from or "scratch", ", ".join(p.name for p in later), aside)  # fmt: skip


def _step(checkpoint: Path) -> int:
    return int(STEP_RE.match(checkpoint.name).group(1))


def run_config_path(checkpoint: Path) -> Path:
    """The config.yaml of the run that wrote ``checkpoint`` (<run>/checkpoints/step-N)."""
    return Path(checkpoint).resolve().parent.parent / "config.yaml"


def find_resume_checkpoint(resume: str, output_dir: Path, overwrite: bool = False) -> Optional[Path]:
    """``auto``: the latest checkpoint in output_dir (None when output_dir is new or empty); else a path.

    Raises:
        ResumeError: resume=auto over a non-empty output_dir without checkpoints (unless
            ``overwrite``), a path that is not a checkpoint folder, or one of an earlier layout.
    """
    output_dir = Path(output_dir)
    if resume == "auto":
        found = list_checkpoints(output_dir)
        if found:
            return _resumable(found[-1])
        if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
            raise ResumeError(
                f"resume=auto: output_dir='{output_dir}' holds files (a finished run without checkpoints, or a run "
                "killed before its first one) but no checkpoint under checkpoints/step-N to continue from; nothing "
                "was changed. Choose a new output_dir, or pass overwrite=true to train from scratch into this one."
            )
        return None
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        available = [p.name for p in list_checkpoints(output_dir)]
        raise ResumeError(
            f"resume='{resume}' is not a checkpoint folder (no {TRAINER_STATE} inside). Use resume=auto, or one of "
            f"{available or 'the step-N folders under <output_dir>/checkpoints'}."
        )
    return _resumable(path)


def _resumable(checkpoint: Path) -> Path:
    if not (checkpoint / SCHEDULER_STATE).is_file():
        raise ResumeError(
            f"{checkpoint} was written by an earlier finetune (it has no {SCHEDULER_STATE}; its best lies outside "
            "the step folder), so it cannot be resumed exactly. Start a new run (new output_dir)."
        )
    return checkpoint


def _flatten(d, prefix="") -> Dict[str, object]:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_differences(saved: dict, current: dict) -> List[str]:
    """Keys whose values differ in a way that changes training (RESUME_SAFE_KEYS excepted)."""
    a, b = _flatten(saved), _flatten(current)

    def safe(key: str) -> bool:
        return any(key == s or key.startswith(s + ".") for s in RESUME_SAFE_KEYS)

    return sorted(
        f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
        for k in set(a) | set(b)
        if not safe(k) and a.get(k) != b.get(k)
    )
