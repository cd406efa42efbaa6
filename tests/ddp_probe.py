"""`python -m finetune` for the 2-process tests, recording from outside the product what each rank
did: the per-process batch it trained with, each training loss it computed, and how often it
tokenized, and how many rows each evaluation held, gathered before pooling windows and counted.
Rank 1 pretends to have less memory (batches above 4 run out of it while probing
train.batch_size=auto). Writes $PROBE_DIR/rank<N>.json at exit."""

import atexit
import json
import os
import sys
import time
from pathlib import Path

import datasets
import torch

import finetune.batching
import finetune.data
import finetune.engine
import finetune.losses
import finetune.train
import finetune.windows

RANK = int(os.environ.get("RANK", "0"))
record = {"batch_size": None, "losses": [], "tokenized": 0, "evaluated": []}


def try_step(model, batch, labels, loss_fn, _real=finetune.engine.try_step):
    if RANK == 1 and labels.shape[0] > 4:
        raise RuntimeError("CUDA out of memory. (simulated on rank 1)")
    return _real(model, batch, labels, loss_fn)


def build_dataloaders(*args, _real=finetune.batching.build_dataloaders, **kwargs):
    record["batch_size"] = kwargs["batch_size"]
    record["losses"].clear()  # those of the batch-size probe: training starts now
    return _real(*args, **kwargs)


def build_loss(*args, _real=finetune.losses.build_loss, **kwargs):
    fn = _real(*args, **kwargs)

    def loss(logits, labels):
        value = fn(logits, labels)
        if torch.is_grad_enabled():  # training, not evaluation
            record["losses"].append(value.item())
        return value

    return loss


def map_counted(self, function=None, *args, _real=datasets.Dataset.map, **kwargs):
    """Counts the tokenizing maps whose function ran (a map served from the cache never calls it)."""
    if not str(kwargs.get("desc", "")).startswith("Tokenizing"):
        return _real(self, function, *args, **kwargs)
    ran = []

    def counted(*a, **k):
        ran.append(1)
        # A slow main process: without a barrier, rank 1 would tokenize too. (The rank is read
        # here, not from a closure, so that both ranks' maps have the same cache fingerprint.)
        if os.environ.get("RANK") == "0":
            time.sleep(2)
        return function(*a, **k)

    out = _real(self, counted, *args, **kwargs)
    record["tokenized"] += bool(ran)
    return out


def pool_windows(logits, documents, *args, _real=finetune.windows.pool_windows, **kwargs):
    """Keeps the documents of the gathered windows, before pooling makes them one row each."""
    record["gathered"] = sorted(int(d) for d in documents)
    return _real(logits, documents, *args, **kwargs)


def evaluate(model, loader, *args, _real=finetune.train.evaluate, **kwargs):
    """Records [rows the split holds (windows with data.long_text=window), rows evaluated,
    windows gathered from all ranks before pooling, whether those are the split's windows, each
    once: their documents, counted with repeats, are the split's]."""
    record["gathered"] = None
    out = _real(model, loader, *args, **kwargs)
    gathered = record.pop("gathered") or []
    split = sorted(int(d) for d in loader.dataset[finetune.train.DOCUMENT]) if gathered else None
    record["evaluated"].append([len(loader.dataset), len(out.labels), len(gathered), gathered == split])
    return out


finetune.engine.try_step = try_step
finetune.train.evaluate = evaluate
finetune.windows.pool_windows = pool_windows  # read by Task.pool_outputs at each call
finetune.batching.build_dataloaders = build_dataloaders
finetune.losses.build_loss = build_loss
datasets.Dataset.map = map_counted
atexit.register(lambda: (Path(os.environ["PROBE_DIR"]) / f"rank{RANK}.json").write_text(json.dumps(record)))

if __name__ == "__main__":
    from finetune.cli import main

    sys.argv = ["finetune", *sys.argv[1:]]
    main()
