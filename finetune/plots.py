"""PNG plots of a run: training loss and validation metrics over steps, a confusion matrix for
classification, predicted against true values for regression, a reliability diagram before and
after calibration."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_curves(path: Path, losses: Sequence[tuple], evaluations: List[Dict[str, float]]) -> None:
    """Left: training loss per logged step. Right: every validation metric per evaluation."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if losses:
        steps, values = zip(*losses)
        left.plot(steps, values, label="train loss", color="tab:blue")
    if evaluations:
        eval_steps = [e["step"] for e in evaluations]
        left.plot(eval_steps, [e["loss"] for e in evaluations], "o-", label="validation loss", color="tab:orange")
        for key in evaluations[0]:
            if key not in ("step", "epoch", "loss"):
                right.plot(eval_steps, [e[key] for e in evaluations], "o-", label=key)
    left.set(title="Loss", xlabel="optimizer step", ylabel="loss")
    right.set(title="Validation metrics", xlabel="optimizer step")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion_matrix(path: Path, gold: np.ndarray, pred: np.ndarray, names: List[str]) -> None:
    plt = _pyplot()
    k = len(names)
    matrix = np.zeros((k, k), dtype=int)
    for g, p in zip(gold, pred):
        matrix[int(g), int(p)] += 1
    fig, ax = plt.subplots(figsize=(1.2 * k + 3, 1.2 * k + 2))
    ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(k), yticks=range(k), xticklabels=names, yticklabels=names, xlabel="predicted", ylabel="true",
           title="Confusion matrix (validation)")  # fmt: skip
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, matrix[i, j], ha="center", va="center", color="white" if matrix[i, j] > matrix.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_regression(path: Path, gold: np.ndarray, pred: np.ndarray) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(gold, pred, s=12, alpha=0.6)
    low, high = float(min(gold.min(), pred.min())), float(max(gold.max(), pred.max()))
    ax.plot([low, high], [low, high], "--", color="gray", label="prediction = truth")
    ax.set(xlabel="true value", ylabel="predicted value", title="Predicted vs true (validation)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reliability(path: Path, curves: Dict[str, tuple], title: str) -> None:
    """Reliability diagram: observed frequency against mean confidence per confidence bin, one
    line per curve (label -> (mean confidence, frequency, count) per bin, as
    finetune.calibration.reliability_bins gives them); the diagonal is perfect calibration."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfectly calibrated")
    for label, (confidence, frequency, counts) in curves.items():
        filled = counts > 0
        line = top.plot(confidence[filled], frequency[filled], "o-", label=label)[0]
        bottom.plot(confidence[filled], counts[filled], "o-", color=line.get_color())
    top.set(ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1), title=title)
    bottom.set(xlabel="confidence", ylabel="predictions")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    top.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_noise_matrix(path: Path, matrix: np.ndarray, rows: List[str], columns: List[str], title: str) -> None:
    """A label audit's estimated noise matrix (finetune.audit): one cell per (row, column) pair,
    shaded and written as a share."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(columns) + 3, 0.6 * len(rows) + 2.5))
    ax.imshow(matrix, cmap="Reds", vmin=0, vmax=max(float(matrix.max()), 1e-9), aspect="auto")
    ax.set(xticks=range(len(columns)), yticks=range(len(rows)), xticklabels=columns, yticklabels=rows, title=title)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    for i in range(len(rows)):
        for j in range(len(columns)):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center",
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
