"""scripts/ner_benchmark.py still runs end to end (tiny workload; the numbers are not judged here)."""

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
    (run,) = results["runs"]
    assert run["name"] == "Trainer (run_ner.py)" and run["seconds"] > 0 and run["steps"] == 2
    assert 0 <= run["f1"] <= 1 and set(run["per_type"]) <= {"PER", "LOC", "ORG", "MISC"}
    assert "| Trainer (run_ner.py) |" in stdout
