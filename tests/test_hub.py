"""Pushing to the Hub, end to end against a local stand-in server; dry runs; failing early."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hub_server import start_hub_server
from test_e2e import run_in_process, sweep_overrides, tiny_overrides

TOKEN = "hf_thisIsASecretTestToken1234567890"


def run_cli(args, env_extra, timeout=300):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)  # fmt: skip


def test_push_creates_a_private_repo_and_uploads_every_file(tiny_bert, toy_files, tmp_path):
    from huggingface_hub import ModelCard

    server, hub, endpoint = start_hub_server()
    try:
        out = tmp_path / "run"
        args = tiny_overrides(tiny_bert, toy_files, out, "train.epochs=1", "hub.push=true", "hub.repo_id=tester/tiny-sst",
                              "hub.private=true", "hub.revision=v1", "hub.base_model=google-bert/bert-base-uncased")  # fmt: skip
        home = tmp_path / "hf_home"
        proc = run_cli(args, {"HF_ENDPOINT": endpoint, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0", "HF_HOME": str(home)})
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        server.shutdown()

    assert hub.repos == {"tester/tiny-sst": {"private": True}}
    assert hub.branches == [("tester/tiny-sst", "v1")]
    (commit,) = hub.commits
    assert commit["repo"] == "tester/tiny-sst" and commit["revision"] == "v1"
    pushed = set(commit["files"])
    folder = {p.relative_to(out / "hub").as_posix() for p in (out / "hub").rglob("*") if p.is_file()}
    assert pushed == folder
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "finetune.json",
            "finetune_config.yaml", "metrics.json", "README.md"} <= pushed  # fmt: skip
    assert commit["files"]["model.safetensors"] == (out / "model" / "model.safetensors").read_bytes()
    # The token authenticated the requests, and appears nowhere else.
    assert any(h.get("authorization") == f"Bearer {TOKEN}" for _, _, h, _ in hub.requests)
    assert TOKEN not in proc.stdout + proc.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    card = ModelCard(commit["files"]["README.md"].decode())
    assert card.data.base_model == "google-bert/bert-base-uncased"
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-classification"
    assert card.data.license == "other" and "finetune" in card.data.tags
    results = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    import json

    best = json.loads((out / "metrics.json").read_text())["best"]
    assert results[("validation", "accuracy")] == pytest.approx(best["accuracy"], abs=1e-6)
    assert "model-index" in commit["files"]["README.md"].decode()


def test_dry_run_folder_loads_in_pipeline_with_label_names(tiny_bert, toy_files, tmp_path):
    from huggingface_hub import ModelCard
    from transformers import pipeline

    out = tmp_path / "run"
    run_in_process(tiny_overrides(tiny_bert, toy_files, out, "train.epochs=1", "hub.dry_run=true", "hub.repo_id=me/x"))
    clf = pipeline("text-classification", model=str(out / "hub"))
    assert clf("the movie was great")[0]["label"] in {"negative", "positive"}
    card = ModelCard.load(out / "hub" / "README.md")
    assert {r.metric_type for r in card.data.eval_results} >= {"accuracy", "f1"}


def test_adapter_dry_run_card_says_peft(tiny_bert, toy_files, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "run"
    run_in_process(tiny_overrides(tiny_bert, toy_files, out, "train.epochs=1", "adapter=lora", "hub.dry_run=true"))
    card = ModelCard.load(out / "hub" / "README.md")
    assert card.data.library_name == "peft" and "lora" in card.data.tags
    assert "AutoPeftModelForSequenceClassification" in card.text and "num_labels=2" in card.text
    assert (out / "hub" / "adapter_config.json").is_file()


def test_missing_token_fails_before_training(tiny_bert, toy_files, tmp_path):
    out = tmp_path / "run"
    args = tiny_overrides(tiny_bert, toy_files, out, "hub.push=true", "hub.repo_id=me/x")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env["HF_HOME"] = str(tmp_path / "empty_home")
    proc = subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "no Hugging Face token" in proc.stderr and "hf auth login" in proc.stderr
    assert not (out / "checkpoints").exists() and not (out / "metrics.json").exists()


def test_missing_repo_id_is_a_config_error(tiny_bert, toy_files, tmp_path):
    from finetune.config import ConfigError

    with pytest.raises(ConfigError, match="hub.push=true needs hub.repo_id"):
        run_in_process(tiny_overrides(tiny_bert, toy_files, tmp_path / "r", "hub.push=true"))


def test_sweep_trials_never_push_and_the_best_trial_is_pushed_once(tiny_bert, toy_files, tmp_path):
    import json

    server, hub, endpoint = start_hub_server()
    sweep_dir = tmp_path / "sweep"
    try:
        args = sweep_overrides(tiny_bert, toy_files, "hub.push=true", "hub.repo_id=tester/best")
        proc = run_cli(["-m", *args, "train.lr=1e-4,5e-3", f"hydra.sweep.dir={sweep_dir}"],
                       {"HF_ENDPOINT": endpoint, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0",
                        "HF_HOME": str(tmp_path / "hf_home")})  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        server.shutdown()

    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert len(summary["trials"]) == 2
    best = Path(summary["best_trial"])
    (commit,) = hub.commits  # one push for the whole sweep
    assert commit["repo"] == "tester/best"
    assert commit["files"]["model.safetensors"] == (best / "model" / "model.safetensors").read_bytes()
    other = next(Path(t["dir"]) for t in summary["trials"] if Path(t["dir"]) != best)
    assert commit["files"]["model.safetensors"] != (other / "model" / "model.safetensors").read_bytes()
    pushed_metrics = json.loads(commit["files"]["metrics.json"])
    assert pushed_metrics["best"][summary["metric"]] == summary["trials"][0]["value"]
    assert TOKEN not in proc.stdout + proc.stderr
