#!/usr/bin/env python
"""Does the label audit find flipped labels, and does dropping what it flags pay off?

    python scripts/label_noise_benchmark.py [--rows 2000] [--noise 0.1] [--folds 5] [--epochs 2] [--retrain-epochs N]
        [--test 2000] [--seed 0] [--seeds 1] [--out bench/label_noise] [--source-audit] [--set KEY=VALUE ...]

On AG News (../shared/data/agnews, the minilm_agnews recipe: the packaged all-MiniLM-L6-v2):
1. draws --rows training rows (seeded) and flips --noise of their labels, each to another class
   drawn at random (seeded): the flipped rows are known;
2. runs the audit (cv.folds=--folds audit.label_issues=true) on the noisy rows and reports the
   precision and recall of the flagged rows against the flipped ones; with --source-audit, also
   audits the rows before the flips: AG News's own labels are not all right, and a row flagged in
   both audits but not flipped is more likely a source error than a false alarm;
3. trains (a) on the noisy rows, (b) on the noisy rows minus the flagged ones
   (data.exclude_rows=<audit>/label_issues.tsv), (c) on the clean rows, and reports each one's test
   macro-F1 on --test rows of test.tsv, and how much of the gap between (a) and (c) (b) recovers.

Prints a Markdown table and writes results.json beside the runs. --set passes overrides to every
run (e.g. --set data.max_length=64 train.max_steps=20 for a quick try). Targets (issue 23):
precision >= 0.8, recall >= 0.6, (b) recovers at least half of the gap.
"""

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from finetune.cli import run  # noqa: E402
from finetune.config import CONF_DIR  # noqa: E402
from finetune.data_checks import tsv_writer  # noqa: E402


def read_rows(path: Path):
    with open(path, newline="", encoding="utf-8") as f:
        return [tuple(r) for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def write_rows(path: Path, rows) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        tsv_writer(f).writerows(rows)
    return str(path)


def flagged_rows(run: Path) -> set:
    """The training-file rows a label audit flagged (its label_issues.tsv's `row` column)."""
    with open(run / "label_issues.tsv", newline="", encoding="utf-8") as f:
        return {int(r["row"]) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)}


def finetune(overrides) -> tuple[dict, float]:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    start = time.perf_counter()
    summary = run(cfg)
    return summary, round(time.perf_counter() - start, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "agnews"))
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each fold of the audit (and of the retrains)")
    parser.add_argument("--retrain-epochs", type=int, default=None,
                        help="epochs of the runs (a) (b) (c) (default: --epochs); longer training memorises more flipped labels")
    parser.add_argument("--test", type=int, default=2000, help="test rows to score on (0: the whole test file)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=1,
                        help="train each of (a) (b) (c) with this many seeds (--seed, --seed+1, ...) and average")
    parser.add_argument("--out", default="bench/label_noise")
    parser.add_argument("--audit-only", action="store_true", help="stop after the audit (no retrains)")
    parser.add_argument("--source-audit", action="store_true",
                        help="also audit the rows before the flips: the source's own suspect labels")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    if args.retrain_epochs is not None and args.retrain_epochs < 1:
        parser.error("--retrain-epochs must be at least 1")
    data, out = Path(args.data), Path(args.out).resolve()
    if not (data / "train.tsv").is_file() or not (data / "test.tsv").is_file():
        sys.exit(f"label_noise_benchmark: {data}/train.tsv or test.tsv not found; pass --data DIR holding AG News.")

    rng = np.random.default_rng(args.seed)
    everything = read_rows(data / "train.tsv")
    clean = [everything[i] for i in np.sort(rng.choice(len(everything), size=args.rows, replace=False))]
    classes = sorted({label for _, label in clean})
    flipped = set(np.sort(rng.choice(args.rows, size=round(args.noise * args.rows), replace=False)).tolist())
    noisy = [(text, rng.choice([c for c in classes if c != label]) if i in flipped else label)
             for i, (text, label) in enumerate(clean)]  # fmt: skip
    files = {"clean": write_rows(out / "clean.tsv", clean), "noisy": write_rows(out / "noisy.tsv", noisy)}
    common = ["recipe=minilm_agnews", f"train.epochs={args.epochs}", "logger=none", "overwrite=true"]
    # --set goes last (Hydra keeps the last value of a key), after each run's own train.seed.

    # 2. The audit: k folds over the noisy rows (no test split: only the out-of-fold outputs matter).
    audit_dir = out / "audit"
    audit_run = [f"train.seed={args.seed}", f"cv.folds={args.folds}", "audit.label_issues=true"]
    _, audit_seconds = finetune(common + audit_run + [f"data.train_file={files['noisy']}", f"output_dir={audit_dir}",
                                                      *args.set])  # fmt: skip
    flagged = flagged_rows(audit_dir)
    hits = len(flagged & flipped)
    precision, recall = hits / max(len(flagged), 1), hits / max(len(flipped), 1)
    audit = json.loads((audit_dir / "metrics.json").read_text())["audit"]
    print(f"Audit ({args.folds} folds, {audit_seconds:.0f} s): {len(flagged)} rows flagged, {hits} of them flipped: "
          f"precision {precision:.3f}, recall {recall:.3f}", flush=True)
    source = {}
    if args.source_audit:
        # The same audit of the rows before the flips: what it flags there are labels the source
        # itself got wrong (or that its models cannot tell), which count against precision above.
        source_dir = out / "audit_clean"
        finetune(common + audit_run + [f"data.train_file={files['clean']}", f"output_dir={source_dir}", *args.set])
        suspect = flagged_rows(source_dir)
        also = len((flagged - flipped) & suspect)
        source = {"source_rows_flagged": len(suspect), "flagged_not_flipped": len(flagged - flipped),
                  "of_those_flagged_before_the_flips": also,
                  "precision_counting_source_suspects": (hits + also) / max(len(flagged), 1)}  # fmt: skip
        print(f"Audit of the rows before the flips: {len(suspect)} flagged. Of the {len(flagged - flipped)} rows flagged "
              f"above but not flipped, {also} were flagged there too; counting them as errors, precision "
              f"{source['precision_counting_source_suspects']:.3f}", flush=True)
    retrain_epochs = args.retrain_epochs or args.epochs
    results = {
        "rows": args.rows, "noise": args.noise, "flipped": len(flipped), "folds": args.folds, "epochs": args.epochs,
        "retrain_epochs": retrain_epochs,
        "seed": args.seed, "seeds": args.seeds, "overrides": args.set, "flagged": len(flagged), "flagged_and_flipped": hits,
        "precision": precision, "recall": recall, "audit_seconds": audit_seconds, "audit": audit, **source,
    }  # fmt: skip
    if args.audit_only:
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        return

    # 3. Three single runs, each scored on the same test rows.
    test = [f"data.test_file={data / 'test.tsv'}"] + ([f"data.max_test_samples={args.test}"] if args.test else [])
    runs = {
        "(a) noisy rows": [f"data.train_file={files['noisy']}"],
        "(b) noisy rows minus the flagged ones": [f"data.train_file={files['noisy']}",
                                                  f"data.exclude_rows={audit_dir / 'label_issues.tsv'}"],
        "(c) clean rows": [f"data.train_file={files['clean']}"],
    }  # fmt: skip
    scores = {}
    for k, (name, extra) in enumerate(runs.items()):
        per_seed = []
        # Training seeds; the training rows and flips stay. (With --test N, data.max_test_samples draws
        # its N rows by train.seed: each seed scores its own N rows, the same for (a), (b) and (c).)
        for seed in range(args.seed, args.seed + args.seeds):
            summary, seconds = finetune(common + test + extra + [f"train.seed={seed}", f"train.epochs={retrain_epochs}",
                                                                 f"output_dir={out / f'run_{k}_seed{seed}'}", *args.set])  # fmt: skip
            per_seed.append((summary["test"]["f1_macro"], summary["test"]["accuracy"], seconds))
        f1, accuracy, seconds = (np.array(v) for v in zip(*per_seed))
        scores[name] = {"test_f1_macro": float(f1.mean()), "test_accuracy": float(accuracy.mean()),
                        "wall_seconds": float(seconds.mean()), "test_f1_macro_per_seed": f1.tolist()}  # fmt: skip
    a, b, c = (scores[n]["test_f1_macro"] for n in runs)
    recovered = (b - a) / (c - a) if c > a else float("nan")  # no gap (clean rows no better): nothing to recover

    results.update(runs=scores, gap_recovered=recovered, targets_met={
        "precision>=0.8": precision >= 0.8, "recall>=0.6": recall >= 0.6, "recovered>=0.5": bool(recovered >= 0.5)})
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nAG News, {args.rows} training rows, {len(flipped)} labels flipped ({args.noise:.0%}), MiniLM-L6, "
          f"{args.epochs} epoch(s) per fold, {retrain_epochs} per run, seed {args.seed}{' ' + ' '.join(args.set) if args.set else ''}\n")
    print(f"Audit ({args.folds} folds, {audit_seconds:.0f} s): {len(flagged)} rows flagged, {hits} of them flipped: "
          f"precision {precision:.3f}, recall {recall:.3f}; estimated noise rate {audit['estimated_noise_rate']:.3f}\n")
    seeds = f", mean of {args.seeds} training seeds" if args.seeds > 1 else ""
    print(f"| training rows | test macro-F1 ({args.test or 'all'} rows{seeds}) | per seed | test accuracy | wall time |")
    print("|---|---|---|---|---|")
    for name, s in scores.items():
        per = " / ".join(f"{v:.4f}" for v in s["test_f1_macro_per_seed"])
        print(f"| {name} | {s['test_f1_macro']:.4f} | {per} | {s['test_accuracy']:.4f} | {s['wall_seconds']:.0f} s |")
    if c > a:
        print(f"\n(b) recovers {recovered:.1%} of the gap between (a) and (c). Targets met: {results['targets_met']}")
    else:
        print(f"\n(c) is no better than (a) ({c:.4f} against {a:.4f}): no gap to recover; (b) - (a) = {b - a:+.4f}. "
              f"Targets met: {results['targets_met']}")
    print(json.dumps({"precision": precision, "recall": recall, "gap_recovered": recovered}))


if __name__ == "__main__":
    main()
