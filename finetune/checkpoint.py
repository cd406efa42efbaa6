"""Checkpoints: atomic writes, keep-last-K plus best, finding the one to resume from.

Layout under ``<output_dir>/checkpoints/``::

    step-000120/     accelerate state (model, optimizer, scheduler, scaler, RNGs) + trainer_state.json
    best/            the best evaluation's trainable weights (best.safetensors) + best.json

Every folder is written under a temporary name and renamed into place, so a kill at any moment
leaves either the previous checkpoint or the complete new one, never a half-written folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Dict, List, Optional

import torch

from finetune.config import FinetuneError

TRAINER_STATE = "trainer_state.json"
STEP_RE = re.compile(r"^step-(\d+)$")
# Config keys that may change between a run and its resumption: they do not change training.
RESUME_SAFE_KEYS = ("resume", "overwrite", "output_dir", "train.log_every", "data.num_workers", "train.compile", "train.compile_backend", "hub", "checkpoint.keep_last")


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


def atomic_dir(final: Path, write) -> None:
    """Call ``write(tmp_dir)`` then rename tmp_dir to ``final`` (replacing it)."""
    final = Path(final)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def prune(output_dir: Path, keep_last: int) -> None:
    for path in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def save_best(output_dir: Path, state: Dict[str, torch.Tensor], record: dict) -> None:
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "best.safetensors"))
        write_json(tmp / "best.json", record)

    atomic_dir(checkpoints_dir(output_dir) / "best", write)


def load_best(output_dir: Path) -> Optional[tuple[Dict[str, torch.Tensor], dict]]:
    from safetensors.torch import load_file

    best = checkpoints_dir(output_dir) / "best"
    if not (best / "best.json").is_file():
        return None
    return load_file(str(best / "best.safetensors")), json.loads((best / "best.json").read_text())


def find_resume_checkpoint(resume: str, output_dir: Path) -> Optional[Path]:
    """``auto``: the latest checkpoint in output_dir (None when there is none); else a path."""
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        available = [p.name for p in list_checkpoints(output_dir)]
        raise ResumeError(
            f"resume='{resume}' is not a checkpoint folder (no {TRAINER_STATE} inside). Use resume=auto, or one of "
            f"{available or 'the step-N folders under <output_dir>/checkpoints'}."
        )
    return path


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
