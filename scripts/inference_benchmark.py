#!/usr/bin/env python
"""Inference speed and accuracy of one trained run, served four ways on the same rows:
transformers.pipeline (batch 64), finetune.predict with PyTorch, ONNX fp32 and ONNX int8 (both
exported by finetune.export, with its checks), and with --student a smaller (distilled) run in
ONNX int8. Each is timed after a warm-up batch, from raw text
to logits (tokenization included); accuracy is against the file's labels.

    HF_HUB_OFFLINE=1 python scripts/inference_benchmark.py --run outputs/RUN [--student outputs/STUDENT] \
        [--rows 2000] [--threads N]

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


def timed(fn, warmup) -> tuple[object, float]:
    warmup()
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a trained run directory (full model, not an adapter)")
    parser.add_argument("--student", help="a student run (model.keep_layers / distill.teacher), served in ONNX int8")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2" / "validation.tsv"))
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--label-column", default="label")
    args = parser.parse_args()

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
    results = []

    def record(name: str, predicted: list, seconds: float, note: str = "") -> None:
        accuracy = float(np.mean([p == g for p, g in zip(predicted, gold_names)]))
        results.append({"name": name, "rows_per_s": len(texts) / seconds, "accuracy": accuracy, "note": note})

    clf = pipeline("text-classification", model=model_dir, device=-1)
    run = lambda items: clf(items, batch_size=args.batch_size, truncation=True, max_length=meta.get("max_length"))  # noqa: E731
    out, seconds = timed(lambda: run(texts), lambda: run(texts[: args.batch_size]))
    record("transformers.pipeline", [o["label"] for o in out], seconds)

    def serve(folder: str, backend: str, meta: dict = meta):
        runner = open_backend(folder, backend, args.threads)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        rows = [{"text": t} for t in texts]

        def go(part):
            batches = encoded_batches(tokenizer, part, "text", None, meta.get("max_length"), args.batch_size)
            return run_batches(runner, batches, len(part))

        logits, seconds = timed(lambda: go(rows), lambda: go(rows[: args.batch_size]))
        preds = predictions_from_scores(scores_from_logits(logits, meta["task"]), meta["task"], meta.get("threshold", 0.5))
        return [id2label[int(p)] for p in preds], seconds

    record("finetune.predict backend=torch", *serve(model_dir, "torch"))
    exports = [(args.run, f"finetune.predict backend=onnx (ONNX {q or 'fp32'})", q) for q in (None, "int8")]
    if args.student:
        student_dir, student_meta = resolve_model_dir(args.student)
        layers = json.loads((Path(student_dir) / "config.json").read_text())["num_hidden_layers"]
        exports.append((args.student, f"{layers}-layer student, finetune.predict ONNX int8", "int8"))
    with tempfile.TemporaryDirectory() as tmp:
        for i, (run_dir, name, quantize) in enumerate(exports):
            folder = str(Path(tmp) / f"export_{i}")
            try:
                report = export_onnx(run_dir, folder, quantize=quantize)
            except FinetuneError as err:  # a refused export is a result too
                results.append({"name": name, "rows_per_s": None, "accuracy": None, "note": f"export refused: {err}"})
                continue
            note = f"max logit difference {report.max_abs_logit_diff:.1e}"
            if report.label_agreement is not None:
                note += (f", label agreement {report.label_agreement:.1%} on {report.check_rows} rows, "
                         f"kept in fp32: {report.int8_kept_fp32}")
            run_meta = student_meta if run_dir == args.student else meta
            record(name, *serve(folder, "onnx", run_meta), note=note)

    print(f"{len(texts)} rows of {args.data}, batch {args.batch_size}, {args.threads} threads, torch {torch.__version__}\n")
    print("| serving | rows/s | accuracy | note |\n|---|---|---|---|")
    for r in results:
        speed = f"{r['rows_per_s']:.1f}" if r["rows_per_s"] else "-"
        accuracy = f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "-"
        print(f"| {r['name']} | {speed} | {accuracy} | {r['note']} |")
    print("\n" + json.dumps({"rows": len(texts), "threads": args.threads, "results": results}))


if __name__ == "__main__":
    main()
