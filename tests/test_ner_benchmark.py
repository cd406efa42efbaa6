"""scripts/ner_benchmark.py still runs end to end, the Trainer reference and finetune side by side
(tiny workload; the numbers are not judged here)."""

import json

import pytest

from conftest import ROOT, SHARED
from test_scripts import run_script

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (SHARED / "data" / "conll2003").is_dir(), reason="the NER benchmark reads ../shared/data"),
]


def test_ner_benchmark_trains_the_trainer_reference_and_scores_entities(tmp_path):
    out = tmp_path / "ner"
    stdout = run_script([str(ROOT / "scripts" / "ner_benchmark.py"), "--rows", "64", "--eval-rows", "32",
                         "--data", str(SHARED / "data" / "conll2003"), "--out", str(out)], tmp_path)  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["train_sentences"] == 64 and results["validation_sentences"] == 32
    trainer, ours = results["runs"]
    assert trainer["name"] == "Trainer (run_ner.py)" and ours["name"] == "finetune (minilm_conll2003)"
    for run in (trainer, ours):  # the same sentences, batch size and epochs: the same number of steps
        assert run["seconds"] > 0 and run["steps"] == 2
        assert 0 <= run["f1"] <= 1 and set(run["per_type"]) <= {"PER", "LOC", "ORG", "MISC"}
        assert f"| {run['name']} |" in stdout
    config = (out / "finetune" / "config.yaml").read_text()
    assert "max_train_samples: 64" in config and "lr: 5.0e-05" in config  # the reference's settings
    # --score reads a run back through finetune.predict: the F1 its own evaluation recorded.
    stdout = run_script([str(ROOT / "scripts" / "ner_benchmark.py"), "--eval-rows", "32", "--data",
                         str(SHARED / "data" / "conll2003"), "--score", str(out / "finetune")], tmp_path)  # fmt: skip
    row = next(line for line in stdout.splitlines() if line.startswith(f"| {out / 'finetune'} |"))
    assert float(row.split("|")[2]) == pytest.approx(ours["f1"], abs=1e-4)
