"""Every numeric setting has a declared valid range and is checked in the one validation pass
(issue 20): the schema is walked, so a key added later without a range fails here. The
finetune.predict and finetune.export options are checked the same way, before anything is read,
loaded or written."""

import copy
import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from finetune import export, predict
from finetune.cli import compose_checked
from finetune.config import ConfigError, FinetuneConfig
from finetune.predict import PredictError
from finetune.validation import validate
from test_config import compose_cfg

# Any-typed keys that never hold a number; their forms are checked in finetune.validation.
NOT_NUMERIC = {"adapter.target_modules"}
# Keys that other keys must enable before any value of theirs is valid.
CONTEXT = {"model.unfreeze_schedule": {"model.freeze": "base"},
           "audit.flag_below": {"audit.label_issues": True, "cv.folds": 3}}


def leaves(cls, prefix=""):
    """(key, field, annotation) of every non-dataclass field of the schema, nested ones included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f, hints[f.name]


def number_type(annotation):
    """int / float / typing.Any for a key that may hold numbers (alone, optional or in a list), else None."""
    if typing.get_origin(annotation) is typing.Union:  # Optional[X]
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is list:
        annotation = typing.get_args(annotation)[0]
    return annotation if annotation in (int, float, typing.Any) else None


NUMERIC = [(key, f, number_type(t)) for key, f, t in leaves(FinetuneConfig) if number_type(t) and key not in NOT_NUMERIC]


def outside(valid, kind):
    """Values just outside each end of the range."""
    ends = []
    if valid.lo is not None:
        ends.append(valid.lo if valid.lo_open else valid.lo - 1)
    if valid.hi is not None:
        ends.append(valid.hi if valid.hi_open else valid.hi + 1)
    return [int(v) if kind is int or valid.integer else float(v) for v in ends]


def inside_edges(valid, kind):
    """The closed ends of the range (a range must not refuse its own edges, e.g. num_workers=0)."""
    ends = [e for e, is_open in ((valid.lo, valid.lo_open), (valid.hi, valid.hi_open)) if e is not None and not is_open]
    return [int(v) if kind is int or valid.integer else float(v) for v in ends]


def with_value(conf, key, value):
    conf = copy.deepcopy(conf)
    *path, name = key.split(".")
    node = conf
    for part in path:
        node = getattr(node, part)
    setattr(node, name, value)
    return conf


def as_set(conf, key, valid, number):
    """The key's value holding ``number``: in place of the first element when the key is a list."""
    if not valid.each:
        return number
    current = conf
    for part in key.split("."):
        current = getattr(current, part)
    return [number, *current[1:]] if isinstance(current, list) else [number]


@pytest.fixture(scope="module")
def base():
    return compose_checked(compose_cfg("recipe=bert_sst2", "output_dir=/tmp/unused"))


def test_the_walk_finds_the_numeric_keys():
    keys = {key for key, _, _ in NUMERIC}
    assert {"train.log_every", "optimizer.weight_decay", "optimizer.betas", "data.num_workers", "train.batch_size",
            "loss.class_weights", "model.keep_layers", "data.augment.mask", "distill.temperature"} <= keys  # fmt: skip
    assert len(keys) > 50


@pytest.mark.parametrize("key, f, kind", NUMERIC, ids=[k for k, _, _ in NUMERIC])
def test_every_numeric_key_declares_a_range_and_validate_enforces_it(base, key, f, kind):
    for other, value in CONTEXT.get(key, {}).items():
        base = with_value(base, other, value)
    valid = f.metadata.get("range")
    assert valid is not None, f"{key} has no declared range: give it one in finetune/config.py (finetune.ranges)"
    bad_values = outside(valid, kind)
    assert bad_values
    for number in bad_values:
        value = as_set(base, key, valid, number)
        with pytest.raises(ConfigError) as info:
            validate(with_value(base, key, value))
        # Exactly one problem (the value is not reported twice) naming the key, the value and the range.
        assert len(info.value.problems) == 1, info.value.problems
        problem = info.value.problems[0]
        assert problem.startswith(f"{key}={value!r}") and valid.rule() in problem, problem
    for number in inside_edges(valid, kind):
        validate(with_value(base, key, as_set(base, key, valid, number)))
    if str(f.type).startswith("Optional[") or None in valid.words:
        validate(with_value(base, key, None))


@pytest.mark.parametrize("key, value, ok", [
    ("train.seed", 2**32, False),  # numpy's generators take seeds below 2**32
    ("train.seed", 0, True),
    ("train.max_steps", 0, False),  # train.py reads 0 as "not set": refused rather than ignored
    ("checkpoint.keep_last", 0, False),  # prune() keeps every checkpoint with [:-0]
    ("scheduler.patience", 0, False),  # ReduceLROnPlateau gets patience - 1
    ("data.num_workers", 0, True),  # load in the main process
    ("scheduler.warmup_steps", 0, True),
    ("data.window_stride", 0, True),
    ("loss.gamma", 0.0, True),  # focal loss with gamma 0 is cross-entropy
    ("optimizer.momentum", 0.0, True),
    ("train.epochs", 0, False),  # also with train.max_steps: it overrides epochs anyway
])
def test_ranges_fit_how_the_values_are_used(base, key, value, ok):
    conf = with_value(base, key, value)
    if ok:
        validate(conf)
    else:
        with pytest.raises(ConfigError, match=f"{key}={value}"):
            validate(with_value(conf, "train.max_steps", 10) if key == "train.epochs" else conf)


def test_words_and_wrong_kinds_of_any_typed_keys(base):
    validate(with_value(with_value(base, "train.batch_size", "auto"), "loss.class_weights", "auto"))
    with pytest.raises(ConfigError) as info:
        validate(with_value(with_value(base, "train.batch_size", "big"), "loss.pos_weight", ["x"]))
    assert info.value.problems == [
        "train.batch_size='big' must be an integer >= 1 or auto.",
        "loss.pos_weight=['x']: each value must be >= 0; 'x' is not.",
    ]


def test_issue_examples_fail_together_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "finetune", "recipe=bert_sst2", f"output_dir={out}", "train.log_every=0",
                           "optimizer.weight_decay=-0.1", "optimizer.betas=[0.9,1.0]", "data.num_workers=-1"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for line in ("data.num_workers=-1 must be >= 0", "optimizer.weight_decay=-0.1 must be >= 0",
                 "optimizer.betas=[0.9, 1.0]: each value must be in [0, 1); 1.0 is not.",
                 "train.log_every=0 must be >= 1."):  # fmt: skip
        assert line in proc.stderr
    assert "(4 problem(s))" in proc.stderr and not out.exists()


def fail(main, argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    return err


def test_predict_options_out_of_range_fail_before_anything_is_read(tmp_path, capsys):
    dest = tmp_path / "preds.tsv"
    err = fail(predict.main, [f"model={tmp_path / 'no-run'}", f"input={tmp_path / 'no-input.tsv'}", f"output={dest}",
                              "batch_size=0", "threshold=1.5", "max_length=-3", "threads=0", "backend=tensorrt"],
               capsys)  # fmt: skip
    for part in ("batch_size=0 must be >= 1.", "threshold=1.5 must be in (0, 1).", "max_length=-3 must be >= 1.",
                 "threads=0 must be >= 1.", "backend='tensorrt' is not one of auto, torch, onnx."):  # fmt: skip
        assert part in err
    assert not dest.exists()
    with pytest.raises(PredictError, match=r"batch_size=-1 must be >= 1\. device='tpu' is not one of"):
        predict.predict(str(tmp_path / "no-run"), [], batch_size=-1, device="tpu")


def test_backend_onnx_on_a_run_without_an_export_says_how_to_make_one(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (run / "config.yaml").write_text("train: {}\n")
    text = tmp_path / "in.txt"
    text.write_text("a fine film\n")
    dest = tmp_path / "preds.tsv"
    err = fail(predict.main, [f"model={run}", f"input={text}", f"output={dest}", "backend=onnx"], capsys)
    assert f"the run model='{run}' has no ONNX export (no onnx/ folder)" in err
    assert f"python -m finetune.export model={run} output={run / 'onnx'}" in err and "save.export=onnx" in err
    err = fail(predict.main, [f"model={run / 'model'}", f"input={text}", f"output={dest}", "backend=onnx"], capsys)
    assert "holds no model.onnx (it is a PyTorch model folder)" in err and "python -m finetune.export" in err
    assert not dest.exists()


def test_export_options_out_of_range_fail_before_the_model_is_loaded(tmp_path, capsys):
    out = tmp_path / "onnx"
    err = fail(export.main, [f"model={tmp_path / 'no-run'}", f"output={out}", "check_rows=0", "opset=17"], capsys)
    assert "check_rows=0 must be >= 1 (the export is checked on at least one row)." in err
    assert "opset=17 must be in [18, 23]" in err and "does not exist" not in err
    assert not out.exists() and not list(Path(tmp_path).glob(".*"))
