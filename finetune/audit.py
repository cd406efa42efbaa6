"""Label audit (audit.label_issues=true with cv.folds=K): which given labels look wrong, judged on
the out-of-fold outputs of cross-validation. Every pooled row is validated by exactly one fold,
whose model never trained on it; those outputs go to the task (``Task.label_issues``: single-label
by the noise matrix estimated from anchor rows, the other tasks by cleanlab), which flags the rows
whose given label looks wrong.

Writes, into the run directory:
  label_issues.tsv   the flagged training-file rows, worst first: row (0-based data row of the
                     training file, header excluded), text, given_label, suggested_label, label_quality
  metrics.json       {"cv": cv.json's summary, "audit": rows audited / flagged, estimated noise rate,
                     the most confused label pairs}
  plots/label_noise.png   the estimated noise matrix (tasks with classes)

Only training-file rows are audited: rows of a validation file (data.validation_file or the Hub
dataset's validation split) are trained on and held out like the others, but have no training-file
row to report, so they are left out of the table and of the estimates.
``data.exclude_rows=<run>/label_issues.tsv`` then retrains without the flagged rows.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List, Sequence

import numpy as np

from finetune.config import FinetuneConfig
from finetune.data import SOURCE_ROW
from finetune.data_checks import AUDIT_COLUMNS, clean_tsv_field, tsv_writer
from finetune.tasks import get_task

logger = logging.getLogger(__name__)

ISSUES_FILE = "label_issues.tsv"
PLOT_FILE = "label_noise.png"
# From this estimated noise rate on, the audit warns that its fold models are the likelier problem.
IMPLAUSIBLE_NOISE = 0.5


def out_of_fold(parts: Sequence[tuple], outputs: Sequence, rows: int) -> tuple[list, list]:
    """Each pooled row's (logits, label) from the one fold that validated it: ``parts`` are the
    folds' (train positions, validation positions) and ``outputs`` their validation outputs, in
    validation order."""
    logits, labels = [None] * rows, [None] * rows
    for (_, val_idx), output in zip(parts, outputs):
        for j, i in enumerate(val_idx):
            logits[i], labels[i] = output.logits[j], output.labels[j]
    return logits, labels


def audit_label_issues(conf: FinetuneConfig, pool, parts: Sequence[tuple], outputs: List, data, out_dir: Path,
                       final_dir: Path, cv_summary: dict) -> dict:  # fmt: skip
    """Flag the training-file rows whose given labels look wrong, write the audit's files into
    ``out_dir`` (named as ``final_dir``, where the run will be) and return metrics.json's audit block."""
    task = get_task(data.task)
    logits, labels = out_of_fold(parts, outputs, len(pool))
    source = np.asarray(pool[SOURCE_ROW])
    audited = np.flatnonzero(source >= 0)
    audited = audited[np.argsort(source[audited], kind="stable")]  # in training-file order
    audited_logits, audited_labels = [logits[i] for i in audited], [labels[i] for i in audited]
    cut = task.audit_flag_below if conf.audit.flag_below is None else conf.audit.flag_below
    # Only a task with a cut gets one (a Task written before audit.flag_below takes three arguments).
    issues = (task.label_issues(audited_logits, audited_labels, data.id2label) if cut is None else
              task.label_issues(audited_logits, audited_labels, data.id2label, flag_below=cut))  # fmt: skip

    flagged = np.flatnonzero(issues.flagged)
    worst_first = flagged[np.lexsort((source[audited][flagged], issues.quality[flagged]))]
    texts = pool.select(audited[worst_first].tolist())
    with open(out_dir / ISSUES_FILE, "w", newline="", encoding="utf-8") as f:
        writer = tsv_writer(f)
        writer.writerow(AUDIT_COLUMNS)
        for k, row in zip(worst_first, texts):
            writer.writerow([int(source[audited[k]]), clean_tsv_field(task.audit_text(row, conf.data)),
                             clean_tsv_field(issues.given[k]), clean_tsv_field(issues.suggested[k]),
                             f"{float(issues.quality[k]):.6f}"])  # fmt: skip

    block = {
        "rows_audited": int(len(audited)),
        "rows_flagged": int(len(flagged)),
        **({"flag_below": cut} if cut is not None else {}),  # P(given label right) below which a row is flagged
        "flagged_share": round(len(flagged) / max(len(audited), 1), 6),
        "estimated_noise_rate": round(issues.noise_rate, 6),
        "noise_rate_of": issues.noise_unit,
        "most_confused": issues.confused,
        "validation_file_rows_not_audited": int(len(source) - len(audited)),
        "folds": conf.cv.folds,
        "file": ISSUES_FILE,
    }
    if conf.plots and issues.noise_matrix is not None:
        from finetune.plots import plot_noise_matrix

        (out_dir / "plots").mkdir(parents=True, exist_ok=True)
        plot_noise_matrix(out_dir / "plots" / PLOT_FILE, *issues.noise_matrix)
        block["plot"] = f"plots/{PLOT_FILE}"
    (out_dir / "metrics.json").write_text(json.dumps({"cv": cv_summary, "audit": block}, indent=2) + "\n")
    problems = []
    if issues.noise_rate >= IMPLAUSIBLE_NOISE:
        problems.append(f"{100 * issues.noise_rate:.0f}% of the {issues.noise_unit} look mislabelled")
    skill = task.audit_skill(audited_logits, audited_labels)
    if skill is not None and skill[0] >= skill[1]:
        problems.append(f"the fold models predict the given labels no better than their frequencies do (out-of-fold "
                        f"log loss {skill[0]:.3f}, the class frequencies' {skill[1]:.3f})")  # fmt: skip
    if problems:
        logger.warning(
            "Label audit: %s. More likely the fold models did not learn the task than the labels are that bad, and "
            "the audit cannot tell a wrong label from what the models do not know. Train the folds longer "
            "(train.epochs, train.lr) or on more rows before acting on %s.", "; and ".join(problems), ISSUES_FILE)  # fmt: skip
    pairs = ", ".join(f"{c['given']} -> {c['likely_true']} ({c['rows']})" for c in issues.confused[:3]) or "none"
    logger.info(
        "Label audit: %d of %d training rows flagged as likely mislabelled%s; estimated noise rate %.2f%% of %s; most "
        "confused (given -> likely true): %s. Table: %s; retrain without them: the same command with "
        "data.exclude_rows=%s (and without audit.label_issues / cv.folds).", len(flagged), len(audited),
        "" if cut is None else f" (probability the given label is right < {cut:g}, audit.flag_below)", 100 * issues.noise_rate, issues.noise_unit, pairs, final_dir / ISSUES_FILE, Path(final_dir).resolve() / ISSUES_FILE)  # fmt: skip
    return block
