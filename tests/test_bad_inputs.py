"""Bad-input battery (issue 13): the mistakes a new user makes, each run as a subprocess of the real
CLI (`python -m finetune` or `python -m finetune.predict`). Every case must end with a non-zero exit
and one message (no traceback) that names the key / file / row / column and the fix, and must leave
an earlier run's directory byte-for-byte as it was (or a fresh output_dir absent or empty).

The ~40 subprocesses are launched together by one module fixture, a few at a time, and each
parametrized test asserts on its own case's result.
"""

import hashlib
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import pytest

from conftest import make_tiny_checkpoint, new_user_env, sentiment_rows, write_tsv

RUN = "<run>"  # placeholder for the finished run directory every case may point at
FRESH = "<fresh>"  # placeholder for a per-case output_dir that does not exist yet


@dataclass
class Case:
    name: str
    args: List[str]  # overrides (or predict arguments), placeholders and <asset> names allowed
    expect: List[str]  # substrings the error message must contain: the key / file / row and the fix
    base: bool = True  # prepend the tiny-model training overrides
    predict: bool = False  # run finetune.predict instead of finetune
    files: dict = field(default_factory=dict)  # asset name -> (suffix, bytes) written before the run


def tsv(*lines: str) -> bytes:
    return ("\n".join(lines) + "\n").encode()


GOOD = [f"{t}\t{l}" for t, l in sentiment_rows(24, seed=3)]
HEADER = "sentence\tlabel"

CASES = [
    # --- the config: types, choices, ranges, cross-field checks (fail in about a second) ---
    Case("unknown_key", ["train.lrr=1e-4", f"output_dir={RUN}", "overwrite=true"],
         ["unknown key 'train.lrr'", "did you mean train.lr?"]),
    Case("unknown_top_level_key", ["outptu_dir=/tmp/x"], ["unknown key 'outptu_dir'", "did you mean output_dir?"]),
    Case("bad_type", ["train.lr=fast", f"output_dir={RUN}", "overwrite=true"], ["train.lr", "'fast'", "could not be converted to Float"]),
    Case("bad_choice", ["train.mixed_precision=fp8", f"output_dir={RUN}", "overwrite=true"],
         ["train.mixed_precision", "expected one of [auto, no, fp16, bf16]"]),
    Case("bad_group_option", ["adapter=lorra", f"output_dir={RUN}", "overwrite=true"], ["adapter/lorra", "Available options", "lora"]),
    Case("missing_train_file", ["data.train_file=/nonexistent/train.tsv", f"output_dir={RUN}", "overwrite=true"],
         ["data.train_file='/nonexistent/train.tsv' does not exist"]),
    Case("max_train_samples_0", ["data.max_train_samples=0", f"output_dir={RUN}", "overwrite=true"],
         ["data.max_train_samples=0 must be >= 1", "null for all rows"]),
    Case("negative_lr", ["train.lr=-1e-4", f"output_dir={FRESH}"], ["train.lr=-0.0001 must be > 0"]),
    Case("negative_batch_size", ["train.batch_size=-8", f"output_dir={RUN}", "overwrite=true"],
         ["train.batch_size=-8 must be an integer >= 1 or auto"]),
    Case("negative_epochs", ["train.epochs=-1", f"output_dir={RUN}", "overwrite=true"], ["train.epochs=-1 must be >= 1"]),
    Case("early_stopping_metric_not_computed", ["early_stopping.metric=auc", f"output_dir={RUN}", "overwrite=true"],
         ["early_stopping.metric='auc' is not produced by metrics=", "valid: ['accuracy', 'f1', 'loss']"]),
    Case("cv_folds_1", ["cv.folds=1", f"output_dir={FRESH}"], ["cv.folds=1 must be >= 2"]),
    Case("hub_push_without_repo_id", ["hub.push=true", f"output_dir={RUN}", "overwrite=true"],
         ["hub.push=true needs hub.repo_id", "hub.repo_id=your-name/"]),
    # --- the run directory and resumption ---
    Case("output_dir_is_a_file", ["output_dir=<afile>"], ["output_dir=", "afile", "is not a directory"],
         files={"afile": (".txt", b"my notes\n")}),
    Case("output_dir_not_writable", ["output_dir=/proc/finetune-run"],
         ["output_dir='/proc/finetune-run' cannot be written", "Choose an output_dir in a folder you can write to"]),
    Case("resume_path_missing", [f"output_dir={RUN}", "resume=/nonexistent/step-000009"],
         ["resume='/nonexistent/step-000009' is not a checkpoint folder", "trainer_state.json", "step-000002"]),
    Case("resume_path_not_a_checkpoint", [f"output_dir={RUN}", f"resume={RUN}/model"],
         ["is not a checkpoint folder", "resume=auto"]),
    Case("hub_push_without_token", ["hub.push=true", "hub.repo_id=me/tiny", f"output_dir={RUN}", "overwrite=true"],
         ["hub.push=true but no Hugging Face token", "HF_TOKEN", "hub.dry_run=true"]),
    # --- data files ---
    Case("empty_file", ["data.train_file=<empty>", f"output_dir={RUN}", "overwrite=true"],
         ["empty.tsv' is empty", "header row"], files={"empty": (".tsv", b"")}),
    Case("header_only_file", ["data.train_file=<header>", f"output_dir={FRESH}"],
         ["header.tsv' has a header row but no data rows"], files={"header": (".tsv", tsv(HEADER))}),
    Case("wrong_columns", ["data.train_file=<cols>", f"output_dir={RUN}", "overwrite=true"],
         ["data.text_column='sentence'", "data.label_column='label'", "columns are ['review', 'stars']"],
         files={"cols": (".tsv", tsv("review\tstars", "a good film\t5", "bad\t1"))}),
    Case("empty_label", ["data.train_file=<nolabel>", f"output_dir={RUN}", "overwrite=true"],
         ["nolabel.tsv'", "row 3 has no label in data.label_column='label'", "Fill in the label or remove the row"],
         files={"nolabel": (".tsv", tsv(HEADER, *GOOD[:2], "a good film\t", *GOOD[2:]))}),
    Case("nan_label_in_validation", ["data.validation_file=<nanval>", f"output_dir={RUN}", "overwrite=true"],
         ["data.validation_file=", "row 2 has no label", "(empty or NaN)"],
         files={"nanval": (".tsv", tsv(HEADER, GOOD[0], "a dull film\tNaN", GOOD[1]))}),
    Case("validation_label_unknown_to_train", ["data.validation_file=<neutral>", f"output_dir={RUN}", "overwrite=true"],
         ["validation split has labels ['neutral']", "train split does not have"],
         files={"neutral": (".tsv", tsv(HEADER, GOOD[0], "the plot\tneutral"))}),
    Case("single_class_train", ["data.train_file=<oneclass>", f"output_dir={RUN}", "overwrite=true"],
         ["single label ['positive']", "data.label_column='label'", "at least two"],
         files={"oneclass": (".tsv", tsv(HEADER, *[f"good film {i}\tpositive" for i in range(8)]))}),
    Case("regression_labels_not_numbers", ["task=regression", f"output_dir={RUN}", "overwrite=true"],
         ["task=regression", "data.label_column='label' is not numeric", "row 1", "task=single_label"]),
    Case("regression_validation_value_not_a_number", ["data.train_file=<scores>", "data.validation_file=<badscores>",
                                                      "metrics=[mse]", "early_stopping=loss", f"output_dir={RUN}", "overwrite=true"],  # fmt: skip
         ["badscores.tsv'", "row 2 of data.label_column='label' holds 'high'", "not a finite number"],
         files={"scores": (".tsv", tsv(HEADER, *[f"film {i}\t{i / 10}" for i in range(8)])),
                "badscores": (".tsv", tsv(HEADER, "film a\t0.5", "film b\thigh"))}),  # fmt: skip
    Case("multi_label_unknown_names", ["data.train_file=<ml_train>", "data.validation_file=<ml_val>",
                                       "data.text_column=text", "data.label_column=labels", "metrics=[f1]",
                                       "early_stopping.metric=f1", f"output_dir={RUN}", "overwrite=true"],  # fmt: skip
         ["validation split", "labels ['horror']", "data.label_column='labels'", "known: ['action', 'comedy']"],
         files={"ml_train": (".jsonl", b"".join(json.dumps({"text": f"film {i}", "labels": [["action"], ["comedy"], ["action", "comedy"]][i % 3]}).encode() + b"\n" for i in range(9))),
                "ml_val": (".jsonl", b'{"text": "a film", "labels": ["horror"]}\n')}),  # fmt: skip
    Case("text_not_a_string", ["data.train_file=<numtext>", "data.text_column=text", f"output_dir={RUN}", "overwrite=true"],
         ["row 2 of data.text_column='text' holds None", "not text"],
         files={"numtext": (".jsonl", b'{"text": "a good film", "label": "positive"}\n{"text": null, "label": "negative"}\n')}),
    Case("non_utf8_bytes", ["data.train_file=<latin1>", f"output_dir={RUN}", "overwrite=true"],
         ["latin1.tsv' is not UTF-8 text", "line 3", "0xe9", "iconv"],
         files={"latin1": (".tsv", tsv(HEADER, GOOD[0]) + "caf\u00e9 film\tpositive\n".encode("latin-1"))}),
    Case("ragged_rows", ["data.train_file=<ragged>", f"output_dir={FRESH}"],
         ["ragged.tsv': line 4 has 3 fields but the header has 2", "quoted"],
         files={"ragged": (".tsv", tsv(HEADER, *GOOD[:2], "good\tfilm\tpositive", *GOOD[2:]))}),
    Case("eval_every_larger_than_run", ["train.eval_every=1000", f"output_dir={RUN}", "overwrite=true"],
         ["train.eval_every=1000 is larger than the whole run", "at most 3", "or null"]),
    Case("cv_folds_larger_than_a_class", ["data.train_file=<rare>", "data.validation_file=null", "cv.folds=5",
                                          f"output_dir={RUN}", "overwrite=true"],  # fmt: skip
         ["cv.folds=5 but class(es) 'negative' (3 rows) have fewer rows than folds", "cv.folds=3 or fewer"],
         files={"rare": (".tsv", tsv(HEADER, *[f"good film {i}\tpositive" for i in range(12)],
                                     *[f"bad film {i}\tnegative" for i in range(3)]))}),  # fmt: skip
    # --- label audit and data.exclude_rows (issue 23) ---
    Case("audit_without_cv_folds", ["audit.label_issues=true", f"output_dir={FRESH}"],
         ["audit.label_issues=true needs cv.folds=K", "a model that never saw it"]),
    Case("audit_cv_folds_larger_than_a_class", ["data.train_file=<rare>", "data.validation_file=null", "cv.folds=5",
                                                "audit.label_issues=true", f"output_dir={FRESH}"],  # fmt: skip
         ["cv.folds=5 but class(es) 'negative' (3 rows) have fewer rows than folds", "cv.folds=3 or fewer"]),
    Case("audit_flag_below_without_audit", ["audit.flag_below=0.5", f"output_dir={FRESH}"],
         ["audit.flag_below=0.5 sets which rows the label audit flags", "add audit.label_issues=true"]),
    Case("audit_flag_below_out_of_range", ["cv.folds=2", "audit.label_issues=true", "audit.flag_below=1.5",
                                           f"output_dir={FRESH}"], ["audit.flag_below=1.5 must be in (0, 1)"]),  # fmt: skip
    Case("audit_flag_below_for_regression", ["task=regression", "cv.folds=2", "audit.label_issues=true",
                                             "audit.flag_below=0.5", f"output_dir={FRESH}"],  # fmt: skip
         ["audit.flag_below=0.5", "regression audits flag by cleanlab's rules", "Drop audit.flag_below"]),
    Case("exclude_rows_missing_file", ["data.exclude_rows=/nonexistent/label_issues.tsv", f"output_dir={FRESH}"],
         ["data.exclude_rows='/nonexistent/label_issues.tsv' does not exist"]),
    Case("exclude_rows_past_the_file", ["data.exclude_rows=<beyond>", f"output_dir={RUN}", "overwrite=true"],
         ["data.exclude_rows=", "names row(s) [24, 99]", "has 24 data rows (0..23, header excluded)"],
         files={"beyond": (".tsv", tsv("row\ttext", "3\tx", "24\ty", "99\tz"))}),
    Case("exclude_rows_not_an_index", ["data.exclude_rows=<notindex>", f"output_dir={FRESH}"],
         ["notindex.txt'", "line 2 holds 'seven'", "0-based indices"], files={"notindex": (".txt", b"3\nseven\n")}),
    # --- the model ---
    Case("max_length_larger_than_model", ["data.max_length=512", f"output_dir={RUN}", "overwrite=true"],
         ["data.max_length=512 exceeds", "64 tokens", "at most 64"]),
    Case("model_path_without_weights", ["model.name_or_path=<noweights>", f"output_dir={RUN}", "overwrite=true"],
         ["noweights' holds no model weights", "model.safetensors", "save_pretrained"]),
    Case("model_path_missing", ["model.name_or_path=/nonexistent/model", f"output_dir={FRESH}"],
         ["model.name_or_path='/nonexistent/model' is not a folder", "Hub model id"]),
    Case("tokenizer_model_mismatch", ["model.name_or_path=<smallvocab>", f"output_dir={RUN}", "overwrite=true"],
         ["smallvocab'", "token ids up to 30", "embedding has 10 rows", "tokenizer the model was trained with"]),
    Case("adapter_target_modules_absent", ["adapter=lora", "adapter.target_modules=[q_proj]", f"output_dir={RUN}", "overwrite=true"],
         ["adapter.target_modules=['q_proj']", "not Linear layers of BertForSequenceClassification", "query"]),
    # --- finetune.predict ---
    Case("predict_model_not_a_run", ["model=<notarun>", "input=<val>"], ["notarun' is not a finetune run", "output_dir"],
         base=False, predict=True),
    Case("predict_model_missing", ["model=/nonexistent/run", "input=<val>"], ["model='/nonexistent/run' does not exist"],
         base=False, predict=True),
    Case("predict_input_missing_text_column", [f"model={RUN}", "input=<reviews>"],
         ["no column ['sentence']", "columns: ['review', 'stars']", "text_column="], base=False, predict=True,
         files={"reviews": (".tsv", tsv("review\tstars", "a good film\t5"))}),
    Case("predict_input_not_utf8", [f"model={RUN}", "input=<latin1in>"], ["latin1in.tsv' could not be read", "UTF-8"],
         base=False, predict=True, files={"latin1in": (".tsv", b"sentence\ncaf\xe9\n")}),
]


def snapshot(root: Path) -> dict:
    """Every file under root (relative path -> sha256), folders included as entries."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def make_finished_run(out: Path) -> Path:
    """What a finished run leaves (config, metrics, model with finetune.json, a checkpoint, logs)."""
    files = {
        "config.yaml": "train:\n  lr: 0.005\n",
        "metrics.json": json.dumps({"best": {"accuracy": 0.9}}),
        "model/config.json": json.dumps({"model_type": "bert"}),
        "model/finetune.json": json.dumps({"text_column": "sentence", "task": "single_label_classification"}),
        "checkpoints/step-000002/trainer_state.json": json.dumps({"step": 2}),
        "logs/finetune/events.out.tfevents.1": "x",
        "predictions/validation.tsv": "text\tprediction\n",
    }
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    return out


@pytest.fixture(scope="module")
def battery(request, tmp_path_factory, tiny_bert):
    """Run the selected cases (4 at a time; `-k name` runs just those); returns each case's
    (CompletedProcess, fresh output_dir, working dir) and snapshots of the finished run directory
    and of every input, before and after."""
    selected = {item.callspec.params["case"].name for item in request.session.items
                if item.path == request.path and hasattr(item, "callspec") and "case" in item.callspec.params} or {
                c.name for c in CASES}  # fmt: skip
    root = tmp_path_factory.mktemp("bad-inputs")
    assets = {
        "train": write_tsv(root / "train.tsv", sentiment_rows(24, seed=1)),
        "val": write_tsv(root / "val.tsv", sentiment_rows(8, seed=2)),
    }
    noweights = root / "noweights"
    noweights.mkdir()
    for name in Path(tiny_bert).iterdir():
        if not name.name.endswith(".safetensors"):
            (noweights / name.name).write_bytes(name.read_bytes())
    assets["noweights"] = str(noweights)
    small = make_tiny_checkpoint(root / "smallvocab")
    config = json.loads((small / "config.json").read_text())
    config["vocab_size"] = 10
    (small / "config.json").write_text(json.dumps(config))
    assets["smallvocab"] = str(small)
    notarun = root / "notarun"
    notarun.mkdir()
    (notarun / "notes.txt").write_text("not a model\n")
    assets["notarun"] = str(notarun)
    for case in CASES:
        for name, (suffix, data) in case.files.items():
            (root / f"{name}{suffix}").write_bytes(data)
            assets[name] = str(root / f"{name}{suffix}")

    run_dir = make_finished_run(root / "finished-run")
    watched = [Path(assets[n]) for c in CASES for n in c.files] + [noweights, small, notarun]
    before = snapshot(run_dir), {str(p): snapshot(p) if p.is_dir() else p.read_bytes() for p in watched}
    base = [
        "recipe=minilm_sst2", f"model.name_or_path={tiny_bert}", f"data.train_file={assets['train']}",
        f"data.validation_file={assets['val']}", "data.label_names=null", "data.max_length=32", "train.epochs=1",
        "train.batch_size=8", "logger=none", "plots=false",
    ]  # fmt: skip
    home = root / "home"
    home.mkdir()

    def run(case: Case):
        fresh = root / f"fresh-{case.name}"
        args = (base if case.base else []) + case.args
        args = [a.replace(RUN, str(run_dir)).replace(FRESH, str(fresh)) for a in args]
        for name, path in assets.items():
            args = [a.replace(f"<{name}>", path) for a in args]
        module = "finetune.predict" if case.predict else "finetune"
        cwd = root / f"cwd-{case.name}"  # nothing may be written into the working directory either
        cwd.mkdir()
        proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300,
                              env=new_user_env(home), cwd=cwd)  # fmt: skip
        return case.name, (proc, fresh, cwd)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(pool.map(run, [c for c in CASES if c.name in selected]))
    after = snapshot(run_dir), {str(p): snapshot(p) if p.is_dir() else p.read_bytes() for p in watched}
    return {"results": results, "before": before, "after": after}


def test_battery_is_large_enough():
    assert len(CASES) >= 30 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input_fails_with_one_clear_message(battery, case):
    proc, fresh, cwd = battery["results"][case.name]
    err = proc.stderr
    assert proc.returncode != 0, (proc.stdout, err)
    assert "Traceback" not in err, err
    for needle in case.expect:
        assert needle in err, f"{needle!r} not in:\n{err}"
    assert not fresh.exists() or not any(fresh.iterdir()), sorted(fresh.rglob("*"))
    assert not any(cwd.iterdir()), sorted(cwd.rglob("*"))
    if not case.predict and "Could not" not in err and "Error merging" not in err:
        # Our own errors: one paragraph (ConfigError lists each problem on its own line).
        message = err[err.index("finetune: error:"):].strip()
        assert "\n\n" not in message, message


def test_no_bad_command_changed_the_finished_run_or_any_input(battery):
    run_before, inputs_before = battery["before"]
    run_after, inputs_after = battery["after"]
    assert run_after == run_before
    assert inputs_after == inputs_before
