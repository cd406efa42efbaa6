"""Nothing lost or stale after training: a failed save.export keeps the rest of the run (plots,
summary, Hub folder) and fails in one paragraph; overwrite=true replaces the earlier run whole
(and a run that dies leaves the earlier one as it was); the files a run writes read back through
finetune identically (texts with quotes)."""

import csv
import hashlib
import json
import logging
import shutil

import pytest

import finetune.export
from conftest import sentiment_rows, write_tsv
from finetune.config import ConfigError, FinetuneError
from finetune.data_checks import clean_tsv_field, tsv_writer
from finetune.export import ExportError
from finetune.predict import predict, read_rows, write_rows
from test_e2e import run_in_process, tiny_overrides

# Quotes as SST-2 has them (`" wow "`, `it 's`), which a quoting TSV writer doubles.
QUOTED = ['" wow " , a really great film', "it 's awful", 'the "best" movie', "'twas lovely", 'a "', '"']


def quoted_rows(n, seed):
    rows = sentiment_rows(n, seed)
    for i, extra in enumerate(QUOTED):
        text, label = rows[i]
        rows[i] = (f"{extra} {text}", label)
    return rows


def snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def tree(folder):
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def run_args(tiny_bert, files, out, *extra):
    return tiny_overrides(tiny_bert, files, out, "train.epochs=1", "logger=none", "checkpoint.every=5", *extra)


def fail_export(monkeypatch):
    def export_onnx(*args, **kwargs):
        raise ExportError("the int8 model agreed with PyTorch on 12% of the rows (check failed)")

    monkeypatch.setattr(finetune.export, "export_onnx", export_onnx)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {
        "train": write_tsv(root / "train.tsv", quoted_rows(160, seed=1)),
        "validation": write_tsv(root / "validation.tsv", quoted_rows(41, seed=2)),
    }


@pytest.fixture(scope="module")
def failed_export(tiny_bert, files, tmp_path_factory):
    """(run directory, the error, the log): a run whose save.export fails, with plots and a Hub dry run."""
    out = tmp_path_factory.mktemp("failed-export") / "run"
    args = run_args(tiny_bert, files, out, "save.export=onnx_int8", "plots=true", "hub.dry_run=true",
                    "hub.repo_id=me/tiny")  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        fail_export(mp)
        records = []
        handler = logging.Handler()
        handler.emit = records.append
        logging.getLogger("finetune").addHandler(handler)
        try:
            with pytest.raises(FinetuneError) as err:
                run_in_process(args)
        finally:
            logging.getLogger("finetune").removeHandler(handler)
    return out, str(err.value), [r.getMessage() for r in records]


# -- 1. a failed save.export loses nothing else ---------------------------------------------------------


def test_failed_export_still_writes_plots_summary_and_hub_folder_and_fails_in_one_paragraph(failed_export):
    out, error, log = failed_export
    for name in ("model/model.safetensors", "metrics.json", "predictions/validation.tsv", "plots/curves.png",
                 "plots/confusion_matrix.png", "hub/model.safetensors", "hub/README.md"):  # fmt: skip
        assert (out / name).is_file(), name
    assert not (out / "onnx").exists()
    assert any(m.startswith("Summary\n") for m in log)  # the closing summary was logged
    assert "\n" not in error
    assert "save.export=onnx_int8 failed after training" in error and "agreed with PyTorch on 12%" in error
    assert f"python -m finetune.export model={out.resolve()} format=onnx quantize=int8 output={out.resolve()}/onnx" in error
    assert "resume=auto" in error


def test_resume_auto_with_save_export_on_a_finished_run_exports_without_training(failed_export, tiny_bert, files,
                                                                                 tmp_path):  # fmt: skip
    out = tmp_path / "run"
    shutil.copytree(failed_export[0], out)
    before = json.loads((out / "metrics.json").read_text())
    summary = run_in_process(run_args(tiny_bert, files, out, "save.export=onnx", "plots=true", "resume=auto"))
    assert summary["steps"] == before["steps"] and summary["evaluations"] == before["evaluations"]
    assert summary["best"] == before["best"]
    assert (out / "onnx" / "model.onnx").is_file()
    # The export was checked on the run's validation texts, read back with their quotes.
    assert json.loads((out / "onnx" / "finetune.json").read_text())["export"]["check_rows"] == 41


# -- 2. overwrite=true replaces the earlier run whole --------------------------------------------------------

STALE = ("onnx/model.onnx", "onnx/config.json", "adapter/adapter_config.json", "predictions/test.tsv", "cv.json",
         "fold_0/metrics.json", "hub/README.md", "checkpoints/step-0000099/trainer_state.json")  # fmt: skip


def earlier_run(src, dst):
    """A copy of a finished run plus what other configs of it would have left (export, adapter,
    test predictions, cross-validation, Hub folder, a later checkpoint)."""
    shutil.copytree(src, dst)
    for name in STALE:
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        (dst / name).write_text("{}")
    return dst


def test_overwrite_replaces_the_earlier_run_and_nothing_of_it_survives(failed_export, tiny_bert, files, tmp_path):
    out = earlier_run(failed_export[0], tmp_path / "run")
    fresh = tmp_path / "fresh"
    run_in_process(run_args(tiny_bert, files, fresh, "plots=false"))
    run_in_process(run_args(tiny_bert, files, out, "plots=false", "overwrite=true"))
    assert tree(out) == tree(fresh)  # exactly what a run in a new directory writes
    expected = (fresh / "config.yaml").read_text().replace(str(fresh), str(out))
    assert (out / "config.yaml").read_text() == expected.replace("overwrite: false", "overwrite: true")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no folder left beside it
    # predict backend=onnx no longer finds the earlier run's export to serve.
    with pytest.raises(FinetuneError, match="has no ONNX export"):
        predict(str(out), [{"sentence": "great"}], backend="onnx", progress=False)


def test_a_replacing_run_that_fails_before_its_first_checkpoint_leaves_the_earlier_run_whole(
        failed_export, tiny_bert, files, tmp_path, monkeypatch):  # fmt: skip
    from fault_runner import install

    out = earlier_run(failed_export[0], tmp_path / "run")
    before = snapshot(out)
    install("raise:1", monkeypatch)  # out of memory as training starts
    with pytest.raises(RuntimeError, match="out of memory"):
        run_in_process(run_args(tiny_bert, files, out, "overwrite=true"))
    assert snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # the partial new run is gone


def test_a_replacing_run_killed_mid_training_leaves_the_earlier_run_whole(failed_export, tiny_bert, files, tmp_path):
    """SIGKILL after step 7: output_dir still holds the earlier run, file for file; the killed run
    (its step-5 checkpoint) is beside it under a hidden name."""
    import subprocess
    import sys

    from test_resume import RUNNER

    out = earlier_run(failed_export[0], tmp_path / "run")
    before = snapshot(out)
    args = [sys.executable, str(RUNNER), "kill:7", "--", *run_args(tiny_bert, files, out, "overwrite=true")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert snapshot(out) == before
    (left,) = [p for p in tmp_path.iterdir() if p.name != "run"]
    assert left.name.startswith(".run.new-") and (left / "checkpoints/step-0000005/trainer_state.json").is_file()


def test_a_replacing_run_stopped_after_a_checkpoint_takes_the_place_of_the_earlier_one(failed_export, tiny_bert,
                                                                                      files, tmp_path, monkeypatch):  # fmt: skip
    """SIGTERM after step 7 (checkpoint written): the stopped run is resumable in output_dir, as
    its message says, and nothing of the earlier run is left there."""
    from fault_runner import install
    from finetune.train import TrainingInterrupted

    out = earlier_run(failed_export[0], tmp_path / "run")
    install("term:7", monkeypatch)
    with pytest.raises(TrainingInterrupted) as err:
        run_in_process(run_args(tiny_bert, files, out, "overwrite=true"))
    assert f"saved {out.resolve()}/checkpoints/step-0000007" in str(err.value)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000005", "step-0000007"]
    assert not any((out / name).exists() for name in STALE + ("model", "metrics.json"))
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_the_new_run_takes_the_place_of_the_old_one_in_one_atomic_exchange(tmp_path, monkeypatch):
    """No moment without a whole run at output_dir: one renameat2(RENAME_EXCHANGE), never two renames."""
    import os

    from finetune.rundir import _exchange, put_in_place

    out, new = tmp_path / "run", tmp_path / ".run.new-1"
    for folder, text in ((out, "old"), (new, "new")):
        (folder / "model").mkdir(parents=True)
        (folder / "model" / "weights").write_text(text)
    if not _exchange(new, new):  # a platform / file system without the exchange: two renames are the fallback
        pytest.skip("no renameat2(RENAME_EXCHANGE) here")
    monkeypatch.setattr(os, "rename", lambda *a: pytest.fail("renamed in two steps"))
    put_in_place(new, out)
    assert (out / "model" / "weights").read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["run"]


def test_overwrite_refuses_a_folder_that_is_not_a_run(tiny_bert, files, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds no config.yaml: it is not a finetune run"):
        run_in_process(run_args(tiny_bert, files, out, "overwrite=true"))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


# -- 3. what a run writes reads back identically ------------------------------------------------------------


def test_prediction_tables_read_back_with_the_same_texts_through_predict(failed_export, files, tmp_path):
    out = failed_export[0]
    texts = [r["sentence"] for r in read_rows(files["validation"])]
    assert any('"' in t for t in texts) and any("'" in t for t in texts)
    table = read_rows(str(out / "predictions" / "validation.tsv"))
    assert [r["text"] for r in table] == texts
    # predict on the table: the same texts and the predictions training wrote; its own TSV output
    # reads back the same way.
    got = predict(str(out), table, text_column="text", progress=False)
    assert [g["text"] for g in got] == texts
    assert [g["prediction"] for g in got] == [r["prediction"] for r in table]
    write_rows(got, str(tmp_path / "again.tsv"))
    assert [r["text"] for r in read_rows(str(tmp_path / "again.tsv"))] == texts


def test_tabs_and_line_breaks_become_spaces_in_a_tsv_field(tmp_path):
    path = tmp_path / "t.tsv"
    with open(path, "w", newline="") as f:
        tsv_writer(f).writerows([["text", "n"], [clean_tsv_field('a\t"b"\r\nc\nd'), 1]])
    assert read_rows(str(path)) == [{"text": 'a "b"  c d', "n": "1"}]
    with open(path, newline="") as f:
        assert list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)) == [["text", "n"], ['a "b"  c d', "1"]]
