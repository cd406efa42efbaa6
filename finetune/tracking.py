"""Experiment tracking through accelerate's trackers: TensorBoard (default), Weights & Biases,
MLflow, a plain CSV file, or none. Files go to <output_dir>/logs/."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Dict, List, Optional

from accelerate.tracking import GeneralTracker, on_main_process

from finetune.config import LoggerType


class CSVTracker(GeneralTracker):
    """Every logged value as a row (step, name, value) of <logging_dir>/metrics.csv."""

    name = "csv"
    requires_logging_directory = True

    @on_main_process
    def __init__(self, run_name: str, logging_dir: str):
        super().__init__()
        self.path = Path(logging_dir) / run_name / "metrics.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        self._file = open(self.path, "a", newline="")
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(["step", "name", "value"])

    @property
    def tracker(self):
        return self._writer

    @on_main_process
    def store_init_configuration(self, values: dict):
        pass  # the run directory's config.yaml holds the configuration

    @on_main_process
    def log(self, values: dict, step: Optional[int] = None, **kwargs):
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self._writer.writerow([step, key, value])
        self._file.flush()

    @on_main_process
    def finish(self):
        self._file.close()


def log_with(kind: LoggerType, out_dir: Path) -> List:
    """The ``log_with`` argument for Accelerator."""
    if kind == LoggerType.none:
        return []
    if kind == LoggerType.csv:
        return [CSVTracker("finetune", str(Path(out_dir) / "logs"))]
    return [kind.value]


def flat_hparams(config: dict, prefix: str = "") -> Dict[str, object]:
    """Scalar config values flattened to dotted keys (what trackers accept as hyperparameters)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_hparams(value, name + "."))
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
        elif value is None:
            out[name] = "null"
        else:
            out[name] = str(value)
    return out


def quiet_tensorboard() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
