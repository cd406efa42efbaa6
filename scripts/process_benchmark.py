#!/usr/bin/env python
"""Batch prediction as whole processes: ``python -m finetune.predict`` against a script calling
``transformers.pipeline``, each started fresh on the same file and timed from process start to exit
(interpreter and library imports, model loading, tokenization, inference, writing the output), as a
user running a nightly job would time them.

    HF_HUB_OFFLINE=1 python scripts/process_benchmark.py --run RUN --model RUN-int8 \
        [--data ../shared/data/sst2/validation.tsv] [--rows N] [--threads 2] [--rounds 3]

--run is the trained run (its model/ folder is what the pipeline loads); --model what
finetune.predict is given (default: the run; an ONNX export folder runs ONNX Runtime). The two are
started in turn, --rounds times, and each one's median wall time is reported with its range, the
rows/s and the ratio; the labels each wrote are compared (how many rows differ).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The baseline job: the pipeline over every text of a TSV, labels written one per line.
PIPELINE_JOB = """
import csv, sys
import torch
from transformers import pipeline
model, data, out, column, threads, rows = sys.argv[1:7]
torch.set_num_threads(int(threads))
with open(data, newline="", encoding="utf-8") as f:
    texts = [r[column] for r in csv.DictReader(f, delimiter="\\t", quoting=csv.QUOTE_NONE)][: int(rows)]
clf = pipeline("text-classification", model=model, device=-1)
with open(out, "w", encoding="utf-8") as f:
    for result in clf(texts, batch_size=64, truncation=True):
        f.write(result["label"] + "\\n")
"""


def timed(cmd, env) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd[:4]))} ... failed:\n{proc.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a trained run directory (full model)")
    parser.add_argument("--model", default=None, help="what finetune.predict loads (default: --run)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2" / "validation.tsv"))
    parser.add_argument("--text-column", default="sentence")
    parser.add_argument("--rows", type=int, default=None, help="first N rows (default: all)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    with open(args.data, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = rows[: args.rows] if args.rows else rows
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    work = Path(tempfile.mkdtemp(prefix="process-bench-"))
    data = work / "input.tsv"  # the same rows for both, header kept
    with open(data, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        writer.writeheader()
        writer.writerows(rows)
    ours_out, base_out = work / "finetune.tsv", work / "pipeline.txt"
    jobs = {
        "finetune.predict": [sys.executable, "-m", "finetune.predict", f"model={args.model or args.run}",
                             f"input={data}", f"output={ours_out}", f"threads={args.threads}",
                             "column_names=header"],  # fmt: skip
        "transformers.pipeline": [sys.executable, "-c", PIPELINE_JOB, str(Path(args.run) / "model"), str(data),
                                  str(base_out), args.text_column, str(args.threads), str(len(rows))],  # fmt: skip
    }
    times = {name: [] for name in jobs}
    for r in range(args.rounds):
        for name, cmd in jobs.items():
            times[name].append(timed(cmd, env))
            print(f"round {r + 1}: {name} {times[name][-1]:.1f} s", flush=True)

    with open(ours_out, newline="", encoding="utf-8") as f:
        ours = [r["prediction"] for r in csv.DictReader(f, delimiter="\t")]
    theirs = base_out.read_text(encoding="utf-8").splitlines()
    differ = sum(a != b for a, b in zip(ours, theirs)) + abs(len(ours) - len(theirs))
    median = {name: statistics.median(t) for name, t in times.items()}
    ratio = median["transformers.pipeline"] / median["finetune.predict"]
    print(f"\n{len(rows)} rows of {args.data}, {args.threads} thread(s), {args.rounds} round(s), medians (range)\n")
    print("| process | wall time | rows/s | x pipeline |")
    print("|---|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {median[name]:.1f} s ({min(t):.1f}-{max(t):.1f}) | {len(rows) / median[name]:.0f} | "
              f"{median['transformers.pipeline'] / median[name]:.2f} |")
    print(f"\nfinetune.predict vs pipeline: {ratio:.2f}x; labels that differ: {differ} of {len(rows)}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "rows": len(rows), "threads": args.threads, "seconds": times, "ratio": ratio, "labels_differ": differ,
            "predicted": {"finetune.predict": len(ours), "transformers.pipeline": len(theirs)},
            "labels": sorted(set(ours) | set(theirs))}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
