"""finetune.predict reproduces training's validation predictions and reports bad input clearly."""

import csv
import json
import subprocess
import sys

import pytest

from finetune.predict import PredictError, predict, read_rows
from test_e2e import train_toy_run


@pytest.fixture(scope="module")
def trained_run(tiny_bert, tmp_path_factory):
    return train_toy_run(tiny_bert, tmp_path_factory.mktemp("predict"))


def table(path):
    with open(path) as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_predict_reproduces_validation_predictions_exactly(trained_run):
    out, files = trained_run
    expected = table(out / "predictions" / "validation.tsv")
    got = predict(str(out), read_rows(files["validation"]), progress=False)
    assert len(got) == len(expected) == 41
    for g, e in zip(got, expected):
        assert (g["text"], g["prediction"]) == (e["text"], e["prediction"])
        assert (g["prob_negative"], g["prob_positive"]) == (float(e["prob_negative"]), float(e["prob_positive"]))


def test_predict_cli_on_files_and_stdin(trained_run, tmp_path):
    out, files = trained_run
    dest = tmp_path / "preds.jsonl"
    proc = subprocess.run([sys.executable, "-m", "finetune.predict", f"model={out}/model", f"input={files['validation']}",
                           f"output={dest}"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in dest.read_text().splitlines()]
    assert len(rows) == 41 and set(rows[0]) == {"text", "prediction", "prob_negative", "prob_positive"}
    assert isinstance(rows[0]["prob_positive"], float)  # JSON numbers, not strings
    proc = subprocess.run([sys.executable, "-m", "finetune.predict", f"model={out}", "input=-"],
                          input="the movie was great\nthe plot was awful\n", capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split("\t")[:2] == ["text", "prediction"] and len(lines) == 3


def test_missing_text_column_and_empty_file_fail_clearly(trained_run, tmp_path):
    out, _ = trained_run
    bad = tmp_path / "bad.tsv"
    bad.write_text("review\tstars\ngood film\t5\n")
    with pytest.raises(PredictError, match=r"no column \['sentence'\] \(columns: \['review', 'stars'\]\).*text_column="):
        predict(str(out), read_rows(str(bad)), progress=False)
    empty = tmp_path / "empty.tsv"
    empty.write_text("sentence\tlabel\n")
    proc = subprocess.run([sys.executable, "-m", "finetune.predict", f"model={out}", f"input={empty}"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "the input has no rows" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "finetune.predict", f"model={out}", "input=x.tsv", "batch_size=abc"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "batch_size='abc' is not an integer" in proc.stderr


def test_parallel_batches_run_side_by_side_and_come_back_in_order():
    """ordered_outputs of a runner with 2 workers: two batches computed at once, never more than 4 taken from
    the batch iterator ahead of those computed (not all padded at once), each batch's logits
    yielded with its own indices, in the batches' order although they finish out of order."""
    import threading
    import time

    import numpy as np

    from finetune.predict import ordered_outputs, run_batches

    lock, state = threading.Lock(), {"running": 0, "most": 0, "pulled": 0, "done": 0, "ahead": 0}

    def slow_runner(batch):
        with lock:
            state["running"] += 1
            state["most"] = max(state["most"], state["running"])
        time.sleep(0.01 * (4 - batch["n"] % 4))  # later batches finish first
        with lock:
            state["running"] -= 1
            state["done"] += 1
        return np.full((1, 2), batch["n"], dtype=np.float32)

    def batches():
        for n in range(10):
            state["pulled"] += 1
            with lock:
                state["ahead"] = max(state["ahead"], state["pulled"] - state["done"])
            yield np.array([9 - n]), {"n": n}  # (input positions, batch)

    class Runner:
        workers = 2  # as OnnxBackend(parallel_batches=True) on 2 CPUs

        def __call__(self, batch):
            return slow_runner(batch)

    got = list(ordered_outputs(Runner(), batches()))
    assert state["most"] == 2 and state["ahead"] <= 4
    assert [int(idx[0]) for idx, _ in got] == [9 - n for n in range(10)]  # the batches' order
    assert all(logits[0, 0] == 9 - idx[0] for idx, logits in got)  # each with its own indices

    state.update(running=0, most=0, pulled=0, done=0, ahead=0)
    out = run_batches(Runner(), batches(), 10)  # the same through run_batches; put back in input order
    assert state["most"] == 2 and state["ahead"] <= 4
    assert out[:, 0].tolist() == [9 - i for i in range(10)]
