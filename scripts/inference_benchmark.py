#!/usr/bin/env python
"""Inference speed and accuracy of one trained run, served four ways on the same rows:
transformers.pipeline (batch 64), finetune.predict with PyTorch, ONNX fp32 and ONNX int8 (both
exported by finetune.export, with its checks), and with --student a smaller (distilled) run in
ONNX int8. Each is timed from raw text to logits (tokenization included), after a warm-up
batch; accuracy is against the file's labels.

All models are loaded (and exported) first; then the servings are timed in turn, round after
round (--rounds, default 3), and each one's median is reported with its range: on a shared
machine whose speed drifts by a quarter from minute to minute, interleaving keeps the ratios
between servings honest where one timing each, minutes apart, would not.

    HF_HUB_OFFLINE=1 python scripts/inference_benchmark.py --run outputs/RUN [--student outputs/STUDENT] \
        [--rows 2000] [--threads N] [--rounds 3]

The run must be trained on the data's labels (e.g. recipe=minilm_sst2 on ../shared/data/sst2):
the gold label id i is compared with the run's label name id2label[i].
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def read_rows(path: str, limit: int, text_column: str, label_column: str) -> tuple[list, list]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:limit]
    return [r[text_column] for r in rows], [int(r[label_column]) for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a trained run directory (full model, not an adapter)")
    parser.add_argument("--student", help="a student run (model.keep_layers / distill.teacher), served in ONNX int8")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2" / "validation.tsv"))
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--rounds", type=int, default=3, help="timings of each serving, interleaved; the median is reported")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: each serving is timed at least once")

    import numpy as np
    import torch
    from transformers import AutoTokenizer, pipeline

    from finetune.backends import open_backend
    from finetune.config import FinetuneError
    from finetune.export import export_onnx
    from finetune.metrics import predictions_from_scores, scores_from_logits
    from finetune.predict import encoded_batches, resolve_model_dir, run_batches

    torch.set_num_threads(args.threads)
    model_dir, meta = resolve_model_dir(args.run)
    texts, gold = read_rows(args.data, args.rows, meta.get("text_column") or "text", args.label_column)
    id2label = {int(i): n for i, n in meta["id2label"].items()}
    gold_names = [id2label[g] for g in gold]
    servings = []  # (name, run: texts -> predicted label names, note)

    clf = pipeline("text-classification", model=model_dir, device=-1)
    servings.append(("transformers.pipeline", lambda part: [o["label"] for o in clf(
        part, batch_size=args.batch_size, truncation=True, max_length=meta.get("max_length"))], ""))  # fmt: skip

    def served(folder: str, backend: str, meta: dict = meta):
        runner = open_backend(folder, backend, args.threads)
        tokenizer = AutoTokenizer.from_pretrained(folder)

        def run(part):
            rows = [{"text": t} for t in part]
            batches = encoded_batches(tokenizer, rows, "text", None, meta.get("max_length"), args.batch_size)
            logits = run_batches(runner, batches, len(rows))
            preds = predictions_from_scores(scores_from_logits(logits, meta["task"]), meta["task"],
                                            meta.get("threshold", 0.5))  # fmt: skip
            return [id2label[int(p)] for p in preds]

        return run

    servings.append(("finetune.predict backend=torch", served(model_dir, "torch"), ""))
    exports = [(args.run, f"finetune.predict backend=onnx (ONNX {q or 'fp32'})", q) for q in (None, "int8")]
    if args.student:
        student_dir, student_meta = resolve_model_dir(args.student)
        layers = json.loads((Path(student_dir) / "config.json").read_text())["num_hidden_layers"]
        exports.append((args.student, f"{layers}-layer student, finetune.predict ONNX int8", "int8"))
    refused = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (run_dir, name, quantize) in enumerate(exports):
            folder = str(Path(tmp) / f"export_{i}")
            try:
                report = export_onnx(run_dir, folder, quantize=quantize)
            except FinetuneError as err:  # a refused export is a result too
                refused.append({"name": name, "rows_per_s": None, "accuracy": None, "note": f"export refused: {err}"})
                continue
            note = f"max logit difference {report.max_abs_logit_diff:.1e}"
            if report.label_agreement is not None:
                note += (f", label agreement {report.label_agreement:.1%} on {report.check_rows} rows, "
                         f"kept in fp32: {report.int8_kept_fp32}, smoothed: {report.int8_smoothed or 'nothing'}")
            servings.append((name, served(folder, "onnx", student_meta if run_dir == args.student else meta), note))

        seconds = {name: [] for name, _, _ in servings}
        predicted = {}
        for _ in range(args.rounds):
            for name, run, _ in servings:
                run(texts[: args.batch_size])  # warm-up
                start = time.perf_counter()
                predicted[name] = run(texts)
                seconds[name].append(time.perf_counter() - start)

    results = []
    for name, _, note in servings:
        speeds = sorted(len(texts) / s for s in seconds[name])
        accuracy = float(np.mean([p == g for p, g in zip(predicted[name], gold_names)]))
        results.append({"name": name, "rows_per_s": float(np.median(speeds)), "rows_per_s_range": [speeds[0], speeds[-1]],
                        "accuracy": accuracy, "note": note})  # fmt: skip
    results += refused
    baseline = results[0]["rows_per_s"]
    print(f"{len(texts)} rows of {args.data}, batch {args.batch_size}, {args.threads} threads, torch {torch.__version__}, "
          f"median of {args.rounds} interleaved rounds\n")  # fmt: skip
    print("| serving | rows/s (median) | range | x pipeline | accuracy | note |\n|---|---|---|---|---|---|")
    for r in results:
        if r["rows_per_s"] is None:
            print(f"| {r['name']} | - | - | - | - | {r['note']} |")
            continue
        low, high = r["rows_per_s_range"]
        print(f"| {r['name']} | {r['rows_per_s']:.1f} | {low:.0f}-{high:.0f} | {r['rows_per_s'] / baseline:.1f} | "
              f"{r['accuracy']:.4f} | {r['note']} |")  # fmt: skip
    print("\n" + json.dumps({"rows": len(texts), "threads": args.threads, "rounds": args.rounds, "results": results}))


if __name__ == "__main__":
    main()
