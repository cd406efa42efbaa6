"""Write an imbalanced subset of a headerless `text<TAB>label` file (e.g. AG News), for the
balanced-sampler benchmark in BENCHMARKS.md. Never commit its output.

    python scripts/imbalanced_subset.py ../shared/data/agnews/train.tsv /tmp/imb/train.tsv \
        --rows 3000 --shares World=0.70 Sports=0.20 Business=0.07 Sci/Tech=0.03

Rows of each class are drawn at random (seeded) without replacement and written shuffled.
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("dest")
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--shares", nargs="+", required=True, help="LABEL=SHARE, shares summing to 1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    shares = {label: float(share) for label, share in (s.rsplit("=", 1) for s in args.shares)}
    if abs(sum(shares.values()) - 1) > 1e-6:
        parser.error(f"--shares sum to {sum(shares.values())}, not 1")
    by_label: dict = {}
    for line in Path(args.source).read_text(encoding="utf-8").splitlines():
        if line.strip():
            by_label.setdefault(line.rsplit("\t", 1)[1], []).append(line)
    rng = random.Random(args.seed)
    rows = []
    for label, share in shares.items():
        want = round(share * args.rows)
        if want > len(by_label.get(label, [])):
            parser.error(f"{label}: {want} rows wanted, {len(by_label.get(label, []))} available")
        rows += rng.sample(by_label[label], want)
    rng.shuffle(rows)
    Path(args.dest).parent.mkdir(parents=True, exist_ok=True)
    Path(args.dest).write_text("\n".join(rows) + "\n", encoding="utf-8")
    counts = Counter(r.rsplit("\t", 1)[1] for r in rows)
    print(f"{args.dest}: {len(rows)} rows; " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
