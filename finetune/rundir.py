"""Run-directory rules: a run never writes into another run's folder unless told to, and
``overwrite=true`` replaces the earlier run whole.

A replacing run is built in a new folder beside ``output_dir`` (``.NAME.new-XXXXXXXX``) and put in
place at its end with one atomic exchange of the two folders (Linux ``renameat2(RENAME_EXCHANGE)``),
after which the old run is deleted: nothing of it survives (no stale ``onnx/``, ``fold_K/``,
``predictions/test.tsv`` ...), and a crash at any moment leaves either the old run or the new one
whole in ``output_dir``. The old run is read-only while the new one trains, so a run may start
from its predecessor's model (``model.name_or_path=<output_dir>/model``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

from finetune.config import ConfigError, FinetuneConfig, FinetuneError

logger = logging.getLogger(__name__)


def prepare_output_dir(conf: FinetuneConfig) -> Path:
    """Refuse to write into another run's non-empty directory unless resuming or overwrite=true."""
    out = Path(conf.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError([f"output_dir='{out}' exists and is not a directory."])
    if out.is_dir() and any(out.iterdir()) and not (conf.overwrite or conf.resume):
        raise ConfigError(
            [
                f"output_dir='{out}' is not empty (another run's files are there). Choose a new output_dir, "
                "pass resume=auto to continue that run, or overwrite=true to replace it."
            ]
        )
    return out


def check_writable(out_dir: Path) -> None:
    """output_dir can be created and written to: probed with a temporary folder in it (or in its
    nearest existing parent) that is removed at once, since permission bits do not bind root."""
    parent = out_dir.absolute()
    while not parent.exists():
        parent = parent.parent
    _probe(parent, out_dir)


def _probe(folder: Path, out_dir: Path, why: str = "") -> None:
    try:
        if not folder.is_dir():
            raise NotADirectoryError(f"'{folder}' is a file")
        os.rmdir(tempfile.mkdtemp(prefix=".finetune-probe-", dir=folder))
    except OSError as err:
        raise ConfigError(
            [f"output_dir='{out_dir}' cannot be written ({why}creating a folder in {folder}: {err.strerror or err}). "
             "Choose an output_dir in a folder you can write to."]
        ) from err


def replaces_run(conf: FinetuneConfig, out_dir: Path, checkpoint: Optional[Path]) -> bool:
    """True for overwrite=true over a non-empty output_dir by a run that does not continue from one
    of that directory's own checkpoints (which continues in place, as any resume does).

    Raises:
        ConfigError: output_dir holds no config.yaml (not a finetune run, whose files would all be
            deleted), or its parent folder, where the new run is built, cannot be written.
    """
    if not conf.overwrite or not (out_dir.is_dir() and any(out_dir.iterdir())):
        return False
    if checkpoint is not None and Path(checkpoint).resolve().parent.parent == out_dir.resolve():
        return False
    if not (out_dir / "config.yaml").is_file():
        raise ConfigError(
            [f"overwrite=true replaces the run in output_dir='{out_dir}' as a whole, deleting every file there, but "
             "it holds no config.yaml: it is not a finetune run. Choose a new or empty output_dir (or empty this "
             "one yourself)."]  # fmt: skip
        )
    _probe(out_dir.absolute().parent, out_dir, "overwrite=true builds the new run beside it; ")
    return True


def new_run_dir(out_dir: Path) -> Path:
    """An empty folder beside ``out_dir`` for the run that will replace it (a leftover of a
    replacing run that was killed is named, not removed: it may hold checkpoints)."""
    out_dir = out_dir.absolute()
    for left in out_dir.parent.glob(f".{out_dir.name}.new-*"):
        logger.warning("%s was left by a replacing run that was killed (resume one of its checkpoints with "
                       "resume=PATH, or delete it).", left)  # fmt: skip
    path = out_dir.parent / f".{out_dir.name}.new-{secrets.token_hex(4)}"
    path.mkdir()
    return path


def put_in_place(new: Path, out_dir: Path) -> None:
    """``new`` becomes ``out_dir``; the run that was there is deleted."""
    out_dir = out_dir.absolute()
    if _exchange(new, out_dir):
        old = new  # the exchange left the old run under the new run's temporary name
    else:
        # Without an atomic exchange, a crash between these two renames leaves the old run under
        # `old` and the new one under `new`, both whole, and output_dir absent.
        old = out_dir.parent / f".{out_dir.name}.old-{secrets.token_hex(4)}"
        os.rename(out_dir, old)
        os.rename(new, out_dir)
    logger.info("%s now holds the new run; the run it replaces is deleted.", out_dir)
    shutil.rmtree(old, ignore_errors=True)


def settle_failed_run(new: Path, out_dir: Path, err: BaseException) -> None:
    """A replacing run that stopped with an error (SIGTERM, a NaN, a bug) replaces the old run only
    if it left a checkpoint to resume from, so that `resume=auto` continues it; otherwise it is
    deleted and the old run stays. Paths in ``err``'s message are made to name ``out_dir``."""
    resumable = any(new.glob("checkpoints/step-*/trainer_state.json")) or any(
        new.glob("fold_*/checkpoints/step-*/trainer_state.json")
    )
    if not resumable:
        shutil.rmtree(new, ignore_errors=True)
        logger.warning("The run stopped before its first checkpoint; %s keeps the run it was to replace.", out_dir)
        return
    put_in_place(new, out_dir)
    if isinstance(err, FinetuneError) and len(err.args) == 1 and isinstance(err.args[0], str):
        err.args = (err.args[0].replace(str(new), str(out_dir.absolute())),)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic rename (Linux >= 3.15 on ext4, xfs, btrfs, tmpfs ...); False
    where the platform or file system has no such rename."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library without renameat2 (glibc < 2.28, some musl)
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0
